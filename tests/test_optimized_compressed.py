"""optimized.compressed_attention against the reference: o, lse, and the gradients through both (spec 3-4)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from kernel_problems import DEVICE, examples, kernel_problems, problem

import optimized.compressed as compressed_module
import reference
from optimized import _common, _interval
from optimized.compressed import compressed_attention
from reference.config import NSAConfig
from reference.testing import NSAProblem, assert_close_to_reference, check_against_reference

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

CFG = NSAConfig(8, 4, 8, 3, 1, 2, window=16)


@settings(max_examples=examples(10))
@given(kernel_problems())
@example(problem(1, 1, 1, 40, 64, CFG, torch.float32))  # T = 1 < l: TC = 0
@example(problem(8, 2, 3, 40, 64, CFG, torch.float16))  # T = l: one block, seen by the last query only
@example(problem(61, 1, 8, 64, 40, NSAConfig(16, 2, 16, 3, 1, 2, 8), torch.float32, seqlens=(5, 40, 16)))
@example(problem(64, 1, 2, 40, 64, NSAConfig(1, 1, 1, 3, 1, 2, 8), torch.float16))  # l = d = 1: unmasked interior
def test_compressed_matches_reference(p: NSAProblem) -> None:
    check_against_reference("compressed_attention", compressed_attention, p, device=DEVICE)


def _lse_loss(o: torch.Tensor, lse: torch.Tensor, grad_o: torch.Tensor, grad_lse: torch.Tensor) -> torch.Tensor:
    return (o * grad_o.to(o.dtype)).sum() + (torch.where(torch.isfinite(lse), lse, 0.0) * grad_lse.to(lse.dtype)).sum()


@settings(max_examples=examples(6))
@given(kernel_problems(max_seq_len=48))
def test_compressed_gradient_through_lse(p: NSAProblem) -> None:
    """The selection reads lse; a loss on lse must back-propagate like the reference's."""
    gen = torch.Generator().manual_seed(p.seed)
    B, T, HQ, DV = p.batch, p.seq_len, p.q_heads, p.head_dim_v
    grad_o, grad_lse = torch.randn(B, T, HQ, DV, generator=gen), torch.randn(B, T, HQ, generator=gen)
    grads = []
    for fn, dtype in (
        (reference.compressed_attention, torch.float64),
        (reference.compressed_attention, None),
        (compressed_attention, None),
    ):
        x = p.tensors(DEVICE, dtype, requires_grad=True)
        o, lse = fn(x.q, x.k_cmp, x.v_cmp, p.config, cu_seqlens=x.cu_seqlens)
        loss = _lse_loss(o, lse, grad_o.to(DEVICE), grad_lse.to(DEVICE))
        grads.append(torch.autograd.grad(loss, (x.q, x.k_cmp, x.v_cmp), allow_unused=True))
    for name, g64, gdt, g in zip(("q", "k_cmp", "v_cmp"), *grads):
        if g64 is None:  # no visible block anywhere: the reference graph does not reach k_cmp
            assert g is None or not g.any()
            continue
        assert_close_to_reference(g, g64, gdt, name=f"gradient of {name} through o and lse", dtype=p.dtype)


def test_no_visible_block_gives_zero_and_minus_inf() -> None:
    """Queries t < l - 1 see nothing: o is exactly 0, lse is -inf, their gradients are 0 (never NaN)."""
    x = problem(20, 1, 2, 16, 32, CFG, torch.float32).tensors(DEVICE, requires_grad=True)
    o, lse = compressed_attention(x.q, x.k_cmp, x.v_cmp, CFG)
    assert torch.equal(o[:, :7], torch.zeros_like(o[:, :7]))
    assert torch.isneginf(lse[:, :7]).all() and torch.isfinite(lse[:, 7:]).all()
    (o.sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()).backward()
    assert torch.equal(x.q.grad[:, :7], torch.zeros_like(x.q.grad[:, :7]))
    assert not x.q.grad.isnan().any() and not x.k_cmp.grad.isnan().any() and not x.v_cmp.grad.isnan().any()


def test_compressed_checks_compressed_length() -> None:
    x = problem(40, 1, 2, 16, 32, CFG, torch.float32).tensors(DEVICE)
    for fn in (reference.compressed_attention, compressed_attention):
        with pytest.raises(ValueError, match="k_cmp"):
            fn(x.q, x.k_cmp[:, 1:], x.v_cmp[:, 1:], CFG)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "p",
    [
        problem(8192, 1, 16, 192, 128, NSAConfig(), torch.bfloat16),
        problem(2048, 2, 4, 128, 128, NSAConfig(), torch.float16, batch=2),
        problem(4096, 1, 16, 128, 128, NSAConfig(), torch.bfloat16, seqlens=(1000, 3000, 96)),
        problem(2048, 2, 3, 96, 80, NSAConfig(16, 8, 32), torch.float32),
    ],
    ids=["T8k-G16-dk192-dv128-bf16", "B2-fp16", "varlen-bf16", "dk96-dv80-fp32"],
)
def test_compressed_gpu_large(p: NSAProblem) -> None:
    check_against_reference("compressed_attention", compressed_attention, p, device="cuda")


@settings(max_examples=examples(5))
@given(kernel_problems(max_seq_len=48))
def test_compressed_split_backward(p: NSAProblem) -> None:
    """The long-sequence dk/dv path (query rows split over programs, fp32 atomics) at interpreter sizes."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compressed_module, "DKV_SPLIT_ROWS", 40)
        check_against_reference("compressed_attention", compressed_attention, p, device=DEVICE)


def test_exact_fp32_launches_get_small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the GPU, float32 ("ieee") launches of the interval kernels only see the 32 x 32 twins of the configs."""
    monkeypatch.setattr(_common, "is_interpreting", lambda: False)
    monkeypatch.setenv("NSA_AUTOTUNE", "1")
    configs = _common.config_list(
        [({"BM": 128, "BN": 64}, 8, 3), ({"BM": 64, "BN": 64}, 4, 3), ({"BM": 32, "BN": 32}, 4, 2)]
    )
    exact = _common.prune_by_precision(configs, {}, DOT_PRECISION="ieee")
    fast = _common.prune_by_precision(configs, {}, DOT_PRECISION="tf32")
    assert [c.kwargs for c in fast] == [{"BM": 128, "BN": 64}, {"BM": 64, "BN": 64}, {"BM": 32, "BN": 32}]
    assert sorted((c.kwargs["BM"], c.kwargs["BN"], c.num_stages, c.num_warps) for c in exact) == [
        (32, 32, 2, 4),
        (32, 32, 3, 4),
    ]
    monkeypatch.setenv("NSA_AUTOTUNE", "0")
    configs = _common.config_list([({"BM": 128, "BN": 64}, 8, 3), ({"BM": 64, "BN": 64}, 4, 3)])
    assert [c.kwargs for c in _common.prune_by_precision(configs, {}, DOT_PRECISION="ieee")] == [{"BM": 32, "BN": 32}]
    assert [c.kwargs for c in _common.prune_by_precision(configs, {}, DOT_PRECISION="tf32")] == [{"BM": 128, "BN": 64}]


def test_autotune_key_separates_sizes_and_branches() -> None:
    """The interval kernels tune per (group, head dims, log2 bucket of B*T, log2 bucket of S): a 2k call and a
    64k call, or the window (S = T) and the compressed branch (S = T / d) at one T, do not share a config."""
    assert {"TUNE_T", "TUNE_S"} <= set(_interval._TUNE_KEY)
    for kernel in (_interval.interval_fwd_kernel, _interval.interval_bwd_dq_kernel, _interval.interval_bwd_dkv_kernel):
        assert set(_interval._TUNE_KEY) <= set(kernel.arg_names)

    def key(T: int, S: int) -> tuple[int, int]:
        meta = _interval._meta(torch.empty(1, T, 16, 128), torch.empty(1, S, 1, 128), torch.empty(1, S, 1, 128))
        return meta["TUNE_T"], meta["TUNE_S"]

    assert key(2048, 2048) != key(65536, 65536)
    assert key(65536, 65536) != key(65536, NSAConfig().num_compressed(65536))
    assert key(40000, 40000) == key(60000, 60000)  # one bucket: no retuning for every length
