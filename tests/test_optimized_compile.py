"""torch.compile(fullgraph=True) traces every public function (custom ops + autograd.Function), dense and packed.

Compiled runs must equal eager ones, outputs and input gradients. With ``cu_seqlens`` nothing may leave the
graph: value checks become device-side asserts and ``mean_pool``'s block count an unbacked size.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from kernel_problems import DEVICE

import optimized
from reference import NativeSparseAttention
from reference.config import NSAConfig

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

CFG = NSAConfig(8, 4, 8, 3, 1, 2, window=12)
T = 29
SEQLENS = (11, 18)  # packed (B = 1): 1 and 3 compressed blocks, where the dense row would have 6


def _cu_seqlens(packed: bool, device: str) -> torch.Tensor | None:
    return torch.tensor([0, SEQLENS[0], T], dtype=torch.int32, device=device) if packed else None


def _branches(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None
) -> tuple[torch.Tensor, ...]:
    """Every public branch function in a row: mean pooling, compressed attention, selection, selected, window."""
    kw = {"cu_seqlens": cu_seqlens}
    k_cmp, v_cmp = optimized.mean_pool(k, CFG, **kw), optimized.mean_pool(v, CFG, **kw)
    o_cmp, lse = optimized.compressed_attention(q, k_cmp, v_cmp, CFG, **kw)
    block_idx = optimized.select_blocks(q, k_cmp, lse, CFG, **kw)
    o_slc = optimized.selected_attention(q, k, v, block_idx, CFG, **kw)
    o_win = optimized.sliding_window_attention(q, k, v, CFG, **kw)
    return o_cmp + o_slc + o_win, lse, k_cmp, block_idx


def _run(fn: Callable[..., tuple[torch.Tensor, ...]], *args: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """fn's outputs and the gradients of its floating inputs under the loss sum(finite outputs ** 2)."""
    args = tuple(x.detach().clone().requires_grad_() if x is not None and x.is_floating_point() else x for x in args)
    outs = fn(*args)
    floats = [o for o in outs if o.is_floating_point()]
    sum(torch.where(torch.isfinite(o), o, 0.0).float().square().sum() for o in floats).backward()
    return (*outs, *(x.grad for x in args if x is not None and x.requires_grad))


def _check(fn: Callable[..., tuple[torch.Tensor, ...]], args: tuple, backend: str) -> None:
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    for got, want in zip(_run(compiled, *args), _run(fn, *args), strict=True):
        if got.dtype in (torch.float16, torch.bfloat16):
            # inductor fuses the elementwise ops between kernels (the branch sum, the loss) in fp32 and rounds
            # once where eager rounds after each op: one or two ulps of the largest value apart
            eps = torch.finfo(got.dtype).eps
            torch.testing.assert_close(got, want, rtol=2 * eps, atol=2 * eps * want.abs().max().item())
        else:
            torch.testing.assert_close(got, want)


def _qkv(batch: int, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    shapes = ((batch, T, 2, 16), (batch, T, 1, 16), (batch, T, 1, 24))  # G = 2, DK != DV (small: the interpreter)
    return tuple(torch.randn(shape, generator=gen).to(device, dtype) for shape in shapes)


def _check_branches(backend: str, device: str, dtype: torch.dtype, packed: bool) -> None:
    _check(_branches, (*_qkv(1 if packed else 2, device, dtype), _cu_seqlens(packed, device)), backend)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_compile_fullgraph_aot_eager(packed: bool) -> None:
    _check_branches("aot_eager", DEVICE, torch.float32, packed)


def test_nsa_compile_fullgraph_packed() -> None:
    """The core with cu_seqlens (the dense core is in test_optimized_nsa): output and every input's gradient."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = _qkv(1, DEVICE, torch.float32)
    cu = _cu_seqlens(True, DEVICE)
    k_cmp, v_cmp = optimized.mean_pool(k, CFG, cu_seqlens=cu), optimized.mean_pool(v, CFG, cu_seqlens=cu)
    gates = torch.rand(1, T, 2, 3, generator=gen).to(DEVICE)

    def core(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(optimized.nsa_attention(*args[:-1], CFG, cu_seqlens=args[-1], return_aux=True))

    _check(core, (q, k_cmp, v_cmp, k, v, k, v, gates, cu), "aot_eager")


def test_layer_compile_fullgraph_packed() -> None:
    """The layer on the Triton backend (RoPE, the MLP phi on gathered blocks, the core), parameters' gradients too."""
    torch.manual_seed(0)
    layer = NativeSparseAttention(32, 2, 1, 16, config=CFG, backend="triton").to(DEVICE)
    x = torch.randn(1, T, 32, device=DEVICE)
    cu = _cu_seqlens(True, DEVICE)

    def run(fn: Callable[..., torch.Tensor]) -> tuple[torch.Tensor, ...]:
        layer.zero_grad()
        outs = _run(lambda x, cu: (fn(x, cu_seqlens=cu),), x, cu)
        return (*outs, *(p.grad.clone() for p in layer.parameters()))

    torch._dynamo.reset()
    eager, compiled = run(layer), run(torch.compile(layer, backend="aot_eager", fullgraph=True))
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a failed device-side assert ends the CUDA context")
def test_compiled_checks_reject_bad_cu_seqlens() -> None:
    """Compiled, the value checks are device-side asserts: bad input still fails, when the graph runs."""
    torch._dynamo.reset()
    q, k, v = _qkv(1, DEVICE, torch.float32)
    window = torch.compile(optimized.sliding_window_attention, backend="aot_eager", fullgraph=True)
    window(q, k, v, CFG, cu_seqlens=_cu_seqlens(True, DEVICE))
    with pytest.raises(RuntimeError, match="cu_seqlens must be strictly increasing"):
        window(q, k, v, CFG, cu_seqlens=torch.tensor([0, 40, T], dtype=torch.int32, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compile_fullgraph_inductor(dtype: torch.dtype, packed: bool) -> None:
    _check_branches("inductor", "cuda", dtype, packed)
