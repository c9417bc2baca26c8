r"""The NSA core in Triton: compressed -> select -> selected and window branches -> gated sum (paper Eq. 5).

$$o_t = g^{cmp}_t\, o^{cmp}_t + g^{slc}_t\, o^{slc}_t + g^{win}_t\, o^{win}_t$$

The three branch kernels live in ``compressed.py``/``_interval.py``, ``selection.py``, ``selected.py`` and
``window.py``; this module chains them (the selection reads the compressed branch's log-sum-exp and has no
gradient) and fuses the combine: the forward runs the window before the selected branch, whose kernel adds
``g_cmp o_cmp + g_win o_win`` to its own gated output in its epilogue and writes ``o`` (no pass that reads
the three outputs back; ``combine_gates`` keeps that kernel for the public function); the backward's combine
kernel reads ``do``, the gates and the three outputs once and writes
``dgates = rowsum(do * o_c)`` and what each branch backward needs in place of its gradient ``do_c = g_c do``,
which is never formed (*gate folding*): a softmax branch's gradients from ``do_c`` equal those from ``do`` with
its probabilities scaled by ``g_c``,

$$P' = g_c P = \exp(S - (\mathrm{lse} - \ln g_c)), \quad dV = P'^\top do, \quad
dS = P \odot (g_c\, do V^\top - g_c\, \delta) = P' \odot (do V^\top - \delta),
\quad \delta = \mathrm{rowsum}(o_c \odot do),$$

so each branch runs its usual kernels on ``do``, ``lse - ln g_c`` and ``delta`` (per-row vectors). Three tensors
the size of ``o`` (1 GiB each at 64k, ``default``) are neither written nor held. It needs ``g_c >= 0`` (the spec's
sigmoid gates; ``g_c = 0`` gives ``lse = +inf``, ``P' = 0``); a negative gate gives NaN gradients.

The core is one autograd node (:class:`NSACore`), so that its backward can use those rowsums (each branch
backward would otherwise re-read ``o_c`` and ``do_c`` for them: three passes of ``2 T HQ DV`` elements) and let
each branch's dq kernel add the previous branch's dq (instead of two more passes that sum them).
:func:`nsa_attention` checks its inputs once (``check_nsa_inputs``, ``cu_seqlens`` included) and calls the
custom ops directly, not the public branch functions, which would check ``cu_seqlens`` again (a host sync
each in eager mode).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from reference._checks import check_config, check_nsa_inputs, check_scale
from reference.config import NSAConfig
from reference.nsa import NSAOutput

from ._common import check_kernel_device, check_kernel_dtype, gated_sum, is_interpreting, next_power_of_2
from .compressed import DKV_SPLIT_ROWS, compressed_interval_bounds
from .selection import select_core
from .window import window_bounds


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
    b_cmp = tl.load(o_cmp + p_x, mask=m_rv, other=0.0)  # [BR, BV]
    b_slc = tl.load(o_slc + p_x, mask=m_rv, other=0.0)
    b_win = tl.load(o_win + p_x, mask=m_rv, other=0.0)
    b_o = gated_sum(gates, o_r, m_r, b_cmp, b_slc, b_win)  # [BR, BV] fp32
    tl.store(o + p_x, b_o.to(o.dtype.element_ty), mask=m_rv)


@triton.jit
def combine_bwd_kernel(
    gates,  # [R, 3]
    o_cmp,  # [R, DV]
    o_slc,
    o_win,
    do,  # [R, DV]
    dgates,  # [R, 3]
    out_cmp,  # [R, DV] do_c, or under FOLD [R] float32 lse_c - ln g_c
    out_slc,
    out_win,
    r_cmp,  # [R] float32
    r_slc,
    r_win,
    lse_cmp,  # [R] float32, read under FOLD only: the branches' lse
    lse_slc,
    lse_win,
    R,
    DV: tl.constexpr,
    BR: tl.constexpr,
    BV: tl.constexpr,
    FOLD: tl.constexpr,
):
    """dgates[:, c] = rowsum(do * o_c), do_c = g_c do and r_c = rowsum(o_c * do_c), one pass over BR rows.

    r_c is the branch backward's rowsum(o * do) (the softmax-gradient term delta), from the do_c it stores.
    FOLD (gate folding, the module's docstring): no do_c; r_c = rowsum(o_c * do), and out_c = lse_c - ln g_c (+inf
    where g_c = 0).
    """
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)  # [BR]
    o_v = tl.arange(0, BV)
    m_r = o_r < R
    m_rv = m_r[:, None] & (o_v[None, :] < DV)  # [BR, BV]
    p_x = o_r[:, None] * DV + o_v[None, :]
    b_do = tl.load(do + p_x, mask=m_rv, other=0.0).to(tl.float32)  # [BR, BV]
    for c in tl.static_range(3):
        if c == 0:
            p_in, p_out, p_r, p_lse = o_cmp, out_cmp, r_cmp, lse_cmp
        elif c == 1:
            p_in, p_out, p_r, p_lse = o_slc, out_slc, r_slc, lse_slc
        else:
            p_in, p_out, p_r, p_lse = o_win, out_win, r_win, lse_win
        b_g = tl.load(gates + o_r * 3 + c, mask=m_r, other=0.0).to(tl.float32)  # [BR]
        b_x = tl.load(p_in + p_x, mask=m_rv, other=0.0).to(tl.float32)  # [BR, BV]
        b_dg = tl.sum(b_do * b_x, axis=1)  # [BR]
        tl.store(dgates + o_r * 3 + c, b_dg.to(dgates.dtype.element_ty), mask=m_r)
        if FOLD:
            b_lse = tl.load(p_lse + o_r, mask=m_r, other=0.0)
            tl.store(p_out + o_r, tl.where(b_g == 0, float("inf"), b_lse - tl.log(b_g)), mask=m_r)
            tl.store(p_r + o_r, b_dg, mask=m_r)
        else:
            b_doc = (b_g[:, None] * b_do).to(p_out.dtype.element_ty)  # [BR, BV]
            tl.store(p_out + p_x, b_doc, mask=m_rv)
            tl.store(p_r + o_r, tl.sum(b_x * b_doc.to(tl.float32), axis=1), mask=m_r)


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


_SEVEN = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]  # custom ops need the arity spelled out


@torch.library.custom_op("nsa::combine_gates_bwd", mutates_args=())
def combine_gates_bwd(
    gates: torch.Tensor, o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor, do: torch.Tensor
) -> _SEVEN:
    """(dgates [B, T, HQ, 3], do_cmp, do_slc, do_win [B, T, HQ, DV], r_cmp, r_slc, r_win [B, T, HQ] fp32) in one
    pass; r_c = rowsum(o_c * do_c), which the branch backwards of :class:`NSACore` take instead of recomputing."""
    return _combine_bwd(gates, o_cmp, o_slc, o_win, do, None)


def _combine_bwd(
    gates: torch.Tensor,
    o_cmp: torch.Tensor,
    o_slc: torch.Tensor,
    o_win: torch.Tensor,
    do: torch.Tensor,
    lse: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> _SEVEN:
    """Launch ``combine_bwd_kernel``: (dgates, do_cmp, do_slc, do_win, r_cmp, r_slc, r_win), or with the three
    branches' ``lse`` the gates folded (FOLD): (dgates, r_cmp, r_slc, r_win, lse_cmp - ln g_cmp, ...)."""
    gates, o_cmp, o_slc, o_win, do = (x.contiguous() for x in (gates, o_cmp, o_slc, o_win, do))
    DV = o_cmp.shape[-1]
    R = o_cmp.numel() // DV
    dgates = torch.empty_like(gates)
    r = tuple(o_cmp.new_empty(o_cmp.shape[:-1], dtype=torch.float32) for _ in range(3))
    fold = lse is not None
    if fold:  # out: lse - ln g
        out = tuple(torch.empty_like(x) for x in r)
        lse = tuple(x.float().contiguous() for x in lse)
    else:  # out: do_c
        out = tuple(torch.empty_like(x) for x in (o_cmp, o_slc, o_win))
    BR, BV = _rows(DV)
    combine_bwd_kernel[(triton.cdiv(R, BR),)](
        gates, o_cmp, o_slc, o_win, do, dgates, *out, *r, *(lse if fold else r), R, DV=DV, BR=BR, BV=BV, FOLD=fold
    )
    return (dgates, *r, *out) if fold else (dgates, *out, *r)


@combine_gates_bwd.register_fake
def _(gates: torch.Tensor, o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor, do: torch.Tensor) -> _SEVEN:
    rowsum = lambda: o_cmp.new_empty(o_cmp.shape[:-1], dtype=torch.float32)
    return (
        torch.empty_like(gates), torch.empty_like(o_cmp), torch.empty_like(o_slc), torch.empty_like(o_win),
        rowsum(), rowsum(), rowsum(),
    )  # fmt: skip


@torch.library.custom_op("nsa::combine_gates_bwd_folded", mutates_args=())
def combine_gates_bwd_folded(
    gates: torch.Tensor,
    o_cmp: torch.Tensor,
    o_slc: torch.Tensor,
    o_win: torch.Tensor,
    do: torch.Tensor,
    lse_cmp: torch.Tensor,
    lse_slc: torch.Tensor,
    lse_win: torch.Tensor,
) -> _SEVEN:
    """The combine's backward with the gates folded into the branches (module docstring): (dgates, r_cmp, r_slc,
    r_win, lse_cmp - ln g_cmp, lse_slc - ln g_slc, lse_win - ln g_win), r_c = rowsum(o_c * do) fp32 [B, T, HQ]."""
    return _combine_bwd(gates, o_cmp, o_slc, o_win, do, (lse_cmp, lse_slc, lse_win))


@combine_gates_bwd_folded.register_fake
def _(
    gates: torch.Tensor,
    o_cmp: torch.Tensor,
    o_slc: torch.Tensor,
    o_win: torch.Tensor,
    do: torch.Tensor,
    lse_cmp: torch.Tensor,
    lse_slc: torch.Tensor,
    lse_win: torch.Tensor,
) -> _SEVEN:
    rowsum = lambda: o_cmp.new_empty(o_cmp.shape[:-1], dtype=torch.float32)
    return torch.empty_like(gates), rowsum(), rowsum(), rowsum(), rowsum(), rowsum(), rowsum()


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
        return torch.ops.nsa.combine_gates_bwd(*ctx.saved_tensors, do)[:4]


def combine_gates(gates: torch.Tensor, o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor) -> torch.Tensor:
    """Eq. 5: ``sum_c gates[..., c] * o_c`` in float32, returned in the branches' dtype. gates [B, T, HQ, 3]."""
    return CombineGates.apply(gates, o_cmp, o_slc, o_win)


class NSACore(torch.autograd.Function):
    """The whole core as one autograd node, so that its backward can fuse across the branches.

    Forward: the three branch forwards and the selection (the same custom ops as the per-branch functions), the
    window's before the selected branch's, whose kernel writes the combine (Eq. 5) in its epilogue. Backward:
    the combine's pass also writes each branch's rowsum(o * do) (the softmax-gradient term that each branch
    backward would otherwise compute in a pass of its own), and each dq kernel adds the dq of the branch before
    it (window, then selected, then compressed), so no separate sums of dq are run.
    Every output is differentiable but ``block_idx``: gradients that reach the branch outputs or ``lse``
    directly (``return_aux``) are added to the combine's.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor,
        k_cmp: torch.Tensor,
        v_cmp: torch.Tensor,
        k_slc: torch.Tensor,
        v_slc: torch.Tensor,
        k_win: torch.Tensor,
        v_win: torch.Tensor,
        gates: torch.Tensor,
        bounds_cmp: tuple[torch.Tensor, ...],
        bounds_win: tuple[torch.Tensor, ...],
        cu_seqlens: torch.Tensor | None,
        config: NSAConfig,
        scale: float,
    ) -> tuple[torch.Tensor, ...]:
        nsa = torch.ops.nsa
        o_cmp, lse = nsa.interval_attention_fwd(q, k_cmp, v_cmp, bounds_cmp[0], bounds_cmp[1], scale)
        block_idx = select_core(q, k_cmp, lse, config, scale, cu_seqlens)  # Eq. 8-11, no gradient
        o_win, lse_win = nsa.interval_attention_fwd(q, k_win, v_win, bounds_win[0], bounds_win[1], scale)
        o_slc, lse_slc, o = nsa.selected_attention_gated_fwd(
            q, k_slc, v_slc, block_idx, cu_seqlens, config.select_block, scale, gates, o_cmp, o_win
        )  # and Eq. 5 in its epilogue
        ctx.save_for_backward(
            q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, o_cmp, lse, o_slc, lse_slc, o_win, lse_win,
            block_idx, cu_seqlens, *bounds_cmp, *bounds_win,
        )  # fmt: skip
        ctx.select_block, ctx.scale = config.select_block, scale
        ctx.mark_non_differentiable(block_idx)
        ctx.set_materialize_grads(False)
        return o, o_cmp, o_slc, o_win, lse, block_idx

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx,
        do: torch.Tensor | None,
        do_cmp_aux: torch.Tensor | None,
        do_slc_aux: torch.Tensor | None,
        do_win_aux: torch.Tensor | None,
        dlse: torch.Tensor | None,
        _: None,
    ) -> tuple[torch.Tensor | None, ...]:
        q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, o_cmp, lse, o_slc, lse_slc, o_win, lse_win = (
            ctx.saved_tensors[:14]
        )
        block_idx, cu_seqlens = ctx.saved_tensors[14:16]
        bounds_cmp, bounds_win = ctx.saved_tensors[16:20], ctx.saved_tensors[20:24]
        nsa, scale = torch.ops.nsa, ctx.scale
        if do is None:
            do = torch.zeros_like(o_cmp)
        if do_cmp_aux is None and do_slc_aux is None and do_win_aux is None and dlse is None:
            # gate folding: every branch on the core's do (the module's docstring)
            dgates, r_cmp, r_slc, r_win, lse, lse_slc, lse_win = nsa.combine_gates_bwd_folded(
                gates, o_cmp, o_slc, o_win, do, lse, lse_slc, lse_win
            )
            do_cmp = do_slc = do_win = do
        else:  # a gradient reached a branch output or the lse directly (return_aux): each branch gets its own do
            dgates, do_cmp, do_slc, do_win, r_cmp, r_slc, r_win = nsa.combine_gates_bwd(gates, o_cmp, o_slc, o_win, do)
            if do_cmp_aux is not None:  # the branch recomputes its rowsum from the sum
                do_cmp, r_cmp = do_cmp + do_cmp_aux, None
            if do_slc_aux is not None:
                do_slc, r_slc = do_slc + do_slc_aux, None
            if do_win_aux is not None:
                do_win, r_win = do_win + do_win_aux, None
        dq, dk_win, dv_win = nsa.interval_attention_bwd(
            q, k_win, v_win, o_win, lse_win, do_win, None, *bounds_win, scale, 0, r_win, None
        )
        del do_win  # a branch's own do (return_aux) is freed once its backward has run (peak memory)
        dq, dk_slc, dv_slc = nsa.selected_attention_bwd(
            q, k_slc, v_slc, o_slc, lse_slc, do_slc, block_idx, cu_seqlens, ctx.select_block, scale, r_slc, dq
        )
        del do_slc
        dq, dk_cmp, dv_cmp = nsa.interval_attention_bwd(
            q, k_cmp, v_cmp, o_cmp, lse, do_cmp, dlse, *bounds_cmp, scale, DKV_SPLIT_ROWS, r_cmp, dq
        )
        return dq, dk_cmp, dv_cmp, dk_slc, dv_slc, dk_win, dv_win, dgates, None, None, None, None, None


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
    [B, T, H, DK/DV]; gates [B, T, HQ, 3] in (0, 1), order (cmp, slc, win) (the backward needs them >= 0:
    gate folding, above); float16, bfloat16 or float32.
    Returns o [B, T, HQ, DV] (or an ``NSAOutput`` with every branch when ``return_aux``).
    """
    config = check_config(config)
    check_nsa_inputs(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, config, cu_seqlens)  # cu_seqlens once
    check_kernel_dtype("q", q)
    check_kernel_device("q", q)
    scale = check_scale(scale, q.shape[-1])
    T = q.shape[1]
    bounds_cmp = compressed_interval_bounds(T, k_cmp.shape[1], config, cu_seqlens, q.device)
    bounds_win = window_bounds(T, config.window, cu_seqlens, q.device)
    o, o_cmp, o_slc, o_win, lse, block_idx = NSACore.apply(
        q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, bounds_cmp, bounds_win, cu_seqlens, config, scale
    )
    if return_aux:
        return NSAOutput(o, o_cmp, o_slc, o_win, lse, block_idx)
    return o
