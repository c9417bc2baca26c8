r"""The NSA core in Triton: compressed -> select -> selected and window branches -> gated sum (paper Eq. 5).

$$o_t = g^{cmp}_t\, o^{cmp}_t + g^{slc}_t\, o^{slc}_t + g^{win}_t\, o^{win}_t$$

The three branch kernels live in ``compressed.py``/``_interval.py``, ``selection.py``, ``selected.py`` and
``window.py``; this module chains them (the selection reads the compressed branch's log-sum-exp and has no
gradient) and adds one fused combine kernel: the forward reads the three branch outputs and the gates once
and writes ``o``; the backward reads ``do``, the gates and the three outputs once and writes, in the same
pass, ``dgates = rowsum(do * o_c)`` and the three branch gradients ``do_c = g_c do`` that the branch
backwards consume.

:func:`nsa_attention` checks its inputs once (``check_nsa_inputs``, ``cu_seqlens`` included) and calls the
branches' unchecked cores (``compressed_core``, ``select_core``, ``window_core``), not the public functions,
which would check ``cu_seqlens`` again (a host sync each in eager mode).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from reference._checks import check_config, check_nsa_inputs, check_scale
from reference.config import NSAConfig
from reference.nsa import NSAOutput

from ._common import check_kernel_device, check_kernel_dtype, is_interpreting, next_power_of_2
from .compressed import compressed_core
from .selected import SelectedAttention
from .selection import select_core
from .window import window_core


@triton.jit
def combine_fwd_kernel(
    gates,  # [R, 3]
    o_cmp,  # [R, DV]
    o_slc,
    o_win,
    o,  # [R, DV]
    R,
    DV: tl.constexpr,
    BR: tl.constexpr,
    BV: tl.constexpr,
):
    """o = g_cmp o_cmp + g_slc o_slc + g_win o_win over BR rows, in fp32."""
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)  # [BR]
    o_v = tl.arange(0, BV)
    m_r = o_r < R
    m_rv = m_r[:, None] & (o_v[None, :] < DV)  # [BR, BV]
    p_x = o_r[:, None] * DV + o_v[None, :]
    b_g0 = tl.load(gates + o_r * 3, mask=m_r, other=0.0).to(tl.float32)  # [BR]
    b_g1 = tl.load(gates + o_r * 3 + 1, mask=m_r, other=0.0).to(tl.float32)
    b_g2 = tl.load(gates + o_r * 3 + 2, mask=m_r, other=0.0).to(tl.float32)
    b_o = b_g0[:, None] * tl.load(o_cmp + p_x, mask=m_rv, other=0.0).to(tl.float32)  # [BR, BV]
    b_o += b_g1[:, None] * tl.load(o_slc + p_x, mask=m_rv, other=0.0).to(tl.float32)
    b_o += b_g2[:, None] * tl.load(o_win + p_x, mask=m_rv, other=0.0).to(tl.float32)
    tl.store(o + p_x, b_o.to(o.dtype.element_ty), mask=m_rv)


@triton.jit
def combine_bwd_kernel(
    gates,  # [R, 3]
    o_cmp,  # [R, DV]
    o_slc,
    o_win,
    do,  # [R, DV]
    dgates,  # [R, 3]
    do_cmp,  # [R, DV]
    do_slc,
    do_win,
    R,
    DV: tl.constexpr,
    BR: tl.constexpr,
    BV: tl.constexpr,
):
    """dgates[:, c] = rowsum(do * o_c) and do_c = g_c do, one pass over BR rows."""
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)  # [BR]
    o_v = tl.arange(0, BV)
    m_r = o_r < R
    m_rv = m_r[:, None] & (o_v[None, :] < DV)  # [BR, BV]
    p_x = o_r[:, None] * DV + o_v[None, :]
    b_do = tl.load(do + p_x, mask=m_rv, other=0.0).to(tl.float32)  # [BR, BV]
    for c in tl.static_range(3):
        if c == 0:
            p_in, p_out = o_cmp, do_cmp
        elif c == 1:
            p_in, p_out = o_slc, do_slc
        else:
            p_in, p_out = o_win, do_win
        b_g = tl.load(gates + o_r * 3 + c, mask=m_r, other=0.0).to(tl.float32)  # [BR]
        b_x = tl.load(p_in + p_x, mask=m_rv, other=0.0).to(tl.float32)  # [BR, BV]
        tl.store(dgates + o_r * 3 + c, tl.sum(b_do * b_x, axis=1).to(dgates.dtype.element_ty), mask=m_r)
        tl.store(p_out + p_x, (b_g[:, None] * b_do).to(p_out.dtype.element_ty), mask=m_rv)


def _rows(DV: int) -> tuple[int, int]:
    BV = next_power_of_2(DV)
    return (64 if is_interpreting() else max(1, 8192 // BV)), BV


@torch.library.custom_op("nsa::combine_gates_fwd", mutates_args=())
def combine_gates_fwd(
    gates: torch.Tensor, o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor
) -> torch.Tensor:
    """gates [B, T, HQ, 3], o_* [B, T, HQ, DV] -> o [B, T, HQ, DV] (Eq. 5)."""
    gates, o_cmp, o_slc, o_win = (x.contiguous() for x in (gates, o_cmp, o_slc, o_win))
    DV = o_cmp.shape[-1]
    R = o_cmp.numel() // DV
    o = torch.empty_like(o_cmp)
    BR, BV = _rows(DV)
    combine_fwd_kernel[(triton.cdiv(R, BR),)](gates, o_cmp, o_slc, o_win, o, R, DV=DV, BR=BR, BV=BV)
    return o


@combine_gates_fwd.register_fake
def _(gates: torch.Tensor, o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(o_cmp)


@torch.library.custom_op("nsa::combine_gates_bwd", mutates_args=())
def combine_gates_bwd(
    gates: torch.Tensor, o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor, do: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dgates [B, T, HQ, 3], do_cmp, do_slc, do_win [B, T, HQ, DV]) in one pass."""
    gates, o_cmp, o_slc, o_win, do = (x.contiguous() for x in (gates, o_cmp, o_slc, o_win, do))
    DV = o_cmp.shape[-1]
    R = o_cmp.numel() // DV
    dgates = torch.empty_like(gates)
    d_cmp, d_slc, d_win = torch.empty_like(o_cmp), torch.empty_like(o_slc), torch.empty_like(o_win)
    BR, BV = _rows(DV)
    combine_bwd_kernel[(triton.cdiv(R, BR),)](
        gates, o_cmp, o_slc, o_win, do, dgates, d_cmp, d_slc, d_win, R, DV=DV, BR=BR, BV=BV
    )
    return dgates, d_cmp, d_slc, d_win


@combine_gates_bwd.register_fake
def _(
    gates: torch.Tensor, o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor, do: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(gates), torch.empty_like(o_cmp), torch.empty_like(o_slc), torch.empty_like(o_win)


class CombineGates(torch.autograd.Function):
    """Differentiable Eq. 5 over the fused combine kernels."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        gates: torch.Tensor,
        o_cmp: torch.Tensor,
        o_slc: torch.Tensor,
        o_win: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(gates, o_cmp, o_slc, o_win)
        return torch.ops.nsa.combine_gates_fwd(gates, o_cmp, o_slc, o_win)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, do: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.ops.nsa.combine_gates_bwd(*ctx.saved_tensors, do)


def combine_gates(gates: torch.Tensor, o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor) -> torch.Tensor:
    """Eq. 5: ``sum_c gates[..., c] * o_c`` in float32, returned in the branches' dtype. gates [B, T, HQ, 3]."""
    return CombineGates.apply(gates, o_cmp, o_slc, o_win)


def nsa_attention(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    k_slc: torch.Tensor,
    v_slc: torch.Tensor,
    k_win: torch.Tensor,
    v_win: torch.Tensor,
    gates: torch.Tensor,
    config: NSAConfig,
    *,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    return_aux: bool = False,
) -> torch.Tensor | NSAOutput:
    """Native sparse attention over already-projected (and compressed) keys and values.

    q [B, T, HQ, DK]; k_cmp/v_cmp [B, TC, H, DK/DV] compressed; k_slc/v_slc and k_win/v_win
    [B, T, H, DK/DV]; gates [B, T, HQ, 3] in (0, 1), order (cmp, slc, win); float16, bfloat16 or float32.
    Returns o [B, T, HQ, DV] (or an ``NSAOutput`` with every branch when ``return_aux``).
    """
    config = check_config(config)
    check_nsa_inputs(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, config, cu_seqlens)  # cu_seqlens once
    check_kernel_dtype("q", q)
    check_kernel_device("q", q)
    scale = check_scale(scale, q.shape[-1])
    o_cmp, lse = compressed_core(q, k_cmp, v_cmp, config, scale, cu_seqlens)
    block_idx = select_core(q, k_cmp, lse, config, scale, cu_seqlens)  # Eq. 8-11, no gradient
    o_slc = SelectedAttention.apply(  # Eq. 12; block_idx comes from select_blocks, no need to check it
        q, k_slc, v_slc, block_idx, cu_seqlens, config.select_block, scale
    )
    o_win = window_core(q, k_win, v_win, config, scale, cu_seqlens)
    o = combine_gates(gates, o_cmp, o_slc, o_win)  # Eq. 5
    if return_aux:
        return NSAOutput(o, o_cmp, o_slc, o_win, lse, block_idx)
    return o
