"""torch.compile(fullgraph=True) traces the Triton branches (custom ops + autograd.Function), forward and backward."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from kernel_problems import DEVICE

from optimized.compressed import compressed_attention
from optimized.compression import mean_pool
from optimized.window import sliding_window_attention
from reference.config import NSAConfig

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

CFG = NSAConfig(8, 4, 8, 3, 1, 2, window=12)


def _branches(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pooled compression, compressed attention (o and lse) and the window, summed."""
    k_cmp, v_cmp = mean_pool(k, CFG), mean_pool(v, CFG)
    o_cmp, lse = compressed_attention(q, k_cmp, v_cmp, CFG)
    return o_cmp + sliding_window_attention(q, k, v, CFG), torch.where(torch.isfinite(lse), lse, 0.0)


def _run(fn: Callable, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(shape, generator=gen).to(device, dtype)
        for shape in ((2, 37, 6, 16), (2, 37, 2, 16), (2, 37, 2, 24))
    )
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    o, lse = fn(q, k, v)
    (o.float().square().sum() + lse.sum()).backward()
    return o, lse, q.grad, k.grad, v.grad


def _check(backend: str, device: str, dtype: torch.dtype) -> None:
    torch._dynamo.reset()
    compiled = torch.compile(_branches, backend=backend, fullgraph=True)
    for got, want in zip(_run(compiled, device, dtype), _run(_branches, device, dtype)):
        torch.testing.assert_close(got, want)


def test_compile_fullgraph_aot_eager() -> None:
    _check("aot_eager", DEVICE, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compile_fullgraph_inductor(dtype: torch.dtype) -> None:
    _check("inductor", "cuda", dtype)
