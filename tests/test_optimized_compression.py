"""optimized.compression.mean_pool (Triton) against reference.compression.mean_pool, forward and gradient."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_problems import DEVICE, KERNEL_DTYPES, examples, small_configs

from optimized.compression import mean_pool
from reference.compression import mean_pool as reference_mean_pool
from reference.config import NSAConfig
from reference.testing import assert_close_to_reference

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def _check(x64: torch.Tensor, dtype: torch.dtype, config: NSAConfig, cu: torch.Tensor | None, seed: int) -> None:
    runs = []
    for fn, x in ((reference_mean_pool, x64), (reference_mean_pool, x64.to(dtype)), (mean_pool, x64.to(dtype))):
        x = x.detach().requires_grad_()
        y = fn(x, config, cu_seqlens=cu)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y)
        (dx,) = torch.autograd.grad(y, x, dy) if y.numel() else (torch.zeros_like(x),)
        runs.append((y, dx))
    (y64, dx64), (ydt, dxdt), (y, dx) = runs
    assert_close_to_reference(y, y64, ydt, name="mean_pool", dtype=dtype)
    assert_close_to_reference(dx, dx64, dxdt, name="mean_pool gradient", dtype=dtype)


@settings(max_examples=examples(10))
@given(
    config=small_configs(),
    T=st.integers(1, 70),
    H=st.integers(1, 3),
    D=st.sampled_from([16, 24, 40, 64, 7]),
    dtype=st.sampled_from(KERNEL_DTYPES),
    data=st.data(),
    seed=st.integers(0, 2**31),
)
def test_mean_pool_matches_reference(
    config: NSAConfig, T: int, H: int, D: int, dtype: torch.dtype, data: st.DataObject, seed: int
) -> None:
    cu = None
    if T > 1 and data.draw(st.booleans()):
        cuts = sorted(data.draw(st.sets(st.integers(1, T - 1), min_size=1, max_size=3)))
        cu = torch.tensor([0, *cuts, T], dtype=torch.int32, device=DEVICE)
    B = 1 if cu is not None else data.draw(st.integers(1, 2))
    x = torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    _check(x.double().to(DEVICE), dtype, config, cu, seed)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_mean_pool_gpu_large(dtype: torch.dtype) -> None:
    x = torch.randn(2, 8192, 4, 192, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    _check(x.double().cuda(), dtype, NSAConfig(), None, 1)
    cu = torch.tensor([0, 1000, 1010, 7000, 8192], dtype=torch.int32, device="cuda")
    _check(x[:1].double().cuda(), dtype, NSAConfig(), cu, 2)
