"""Experiment: the selected branch's and the decode step's matmuls transposed (keys as M) for Hopper's wgmma.

The production forward (``optimized.selected``) multiplies a tile of BM = 16 query rows by a block of BN = 64
keys: ``S = Q K^T`` is [16, 64], below wgmma's M = 64, so Triton emits the older ``mma.sync`` (HMMA in SASS)
and keeps the K and V tiles in registers (246 registers with 2 warps: 4 programs per SM). Here the same
tile computes ``S^T = K Q^T`` [BN, BM] and ``O^T += V^T P^T`` [BV, BM]: M is the 64 keys (and the 128 value
dims), N the 16 query rows, so one warpgroup issues wgmma (HGMMA) with K and V read from shared memory. The
online softmax runs along axis 0 (the keys) of ``S^T``. The ``+tma`` variants also load each block's K and V
with a tensor descriptor (one bulk copy per tile instead of a pointer per element; needs head dims whose rows
are 16-byte aligned, as at the benchmark's D = 128; ``--no-tma`` skips them).

The dq kernel gets the same treatment: ``P^T = exp2(K Q^T - lse)``, ``dP^T = V dO^T``, ``dQ^T += K^T dS^T``
(M = 64 keys, then 128 dims), against production's dq at 16 and at 64 rows per program (64: what the backward
runs, whose HGMMA comes from the larger tile, at 2.3-3.1x the tensor-core work per selected block).

The decode step's compressed pass (``decode_compressed_t_kernel``, G = 16 query heads of one token against 64
compressed keys per tile) is transposed the same way; ``scripts/decode_launch.py --transposed`` times it in the
step. For the selected kernels: same tiles, same union walk, same masks as production; checked against it
(errors relative to the largest output, lse included), then timed with CUDA events on the benchmark's inputs and
selection. Prints ms per pass and variant; writes ``swapab.json`` to ``--out``.

    python scripts/swapab.py --lengths 8192 65536 --configs default g4
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from benchmarks import experiment
from benchmarks.run import CONFIGS
from benchmarks.timing import time_calls
from optimized._common import (
    LOG2E,
    attn_bwd_delta,
    attn_fwd_finish,
    autotune_configs,
    next_power_of_2,
    overlap_strides,
    store_dq,
)
from optimized._sparse import sequence_lengths
from optimized.selected import (
    _ROWS_TUNE_KEY,
    _meta,
    _packed,
    _row_setup,
    _row_tiles,
    selected_attention_fwd,
    selected_bwd_dq_kernel,
)
from reference.config import NSAConfig

_LOG2E = tl.constexpr(LOG2E)


@triton.jit
def attn_fwd_update_t(b_st, b_v, b_m, b_l, b_acct, DOT_PRECISION: tl.constexpr):
    """``optimized._common.attn_fwd_update`` transposed: scores b_st [BN, BM] (log2 units, -inf where masked),
    values b_v [BN, BV], running max / sum [BM], accumulator b_acct = O^T [BV, BM] fp32. The softmax runs along
    axis 0 (the keys), and ``O^T += V^T P^T`` has M = BV, so wgmma serves both products."""
    b_m_new = tl.maximum(b_m, tl.max(b_st, 0))  # [BM]
    b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)  # rows with nothing seen yet
    b_alpha = tl.exp2(b_m - b_m_safe)  # [BM]
    b_pt = tl.exp2(b_st - b_m_safe[None, :])  # [BN, BM], 0 where masked
    b_l = b_l * b_alpha + tl.sum(b_pt, 0)
    b_vt = tl.trans(b_v)  # [BV, BN]
    b_acct = b_acct * b_alpha[None, :] + tl.dot(b_vt, b_pt.to(b_vt.dtype), input_precision=DOT_PRECISION)
    return b_m_new, b_l, b_acct


@triton.jit
def _kv_block(k, v, s0, i_h, m_n, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr,
              BK: tl.constexpr, BV: tl.constexpr, TMA: tl.constexpr):  # fmt: skip
    """K and V of the block whose first key is packed token s0, keys as rows: b_k [BN, BK], b_v [BN, BV]. With TMA
    (k, v tensor descriptors) one bulk copy each: keys past the tensor come back as zeros, keys past the block as
    they are (the callers mask their scores); else pointer loads masked by m_n [BN]."""
    if TMA:
        b_k = k.load([s0, i_h, 0]).reshape(BN, BK)
        b_v = v.load([s0, i_h, 0]).reshape(BN, BV)
    else:
        o_k, o_v = tl.arange(0, BK), tl.arange(0, BV)
        o_key = (s0 + tl.arange(0, BN)).to(tl.int64) * H + i_h  # [BN] index into [TT, H]
        b_k = tl.load(k + o_key[:, None] * DK + o_k[None, :], mask=m_n[:, None] & (o_k < DK)[None, :], other=0.0)
        b_v = tl.load(v + o_key[:, None] * DV + o_v[None, :], mask=m_n[:, None] & (o_v < DV)[None, :], other=0.0)
    return b_k, b_v


def _kv_operands(k2: torch.Tensor, v2: torch.Tensor, meta: dict[str, object], tma: bool) -> tuple[object, object]:
    """K and V [TT, H, D] as the kernels read them: tensor descriptors of [BN, 1, BK] boxes if ``tma``."""
    if not tma:
        return k2, v2
    return (
        TensorDescriptor.from_tensor(k2, [meta["BN"], 1, meta["BK"]]),
        TensorDescriptor.from_tensor(v2, [meta["BN"], 1, meta["BV"]]),
    )


@triton.autotune(configs=autotune_configs({}, num_warps=(4, 8), num_stages=(1, 2, 3)), key=[*_ROWS_TUNE_KEY, "TMA"])
@triton.jit
def selected_fwd_t_kernel(
    q,  # [TT, HQ, DK]
    k,  # [TT, H, DK], or its tensor descriptor (block [BN, 1, BK]) if TMA
    v,  # [TT, H, DV], or its tensor descriptor (block [BN, 1, BV]) if TMA
    block_idx,  # [TT, H, N] int32
    o,  # [TT, HQ, DV]
    lse,  # [TT, HQ] float32
    cu_seqlens,
    tile_seq,
    tile_start,
    union,  # [NT, H, U] int32
    union_len,  # [NT, H] int32
    scale,
    TUNE_T,
    H: tl.constexpr,
    G: tl.constexpr,
    N: tl.constexpr,
    LS: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BN: tl.constexpr,
    NP: tl.constexpr,
    U: tl.constexpr,
    BM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    TMA: tl.constexpr,
):
    """o and lse of one tile of BM rows, as ``selected_fwd_kernel``, with the scores and output transposed."""
    i_tile, i_h = tl.program_id(0), tl.program_id(1)
    bos, o_t, o_row, m_r, b_idx = _row_setup(tile_seq, tile_start, cu_seqlens, block_idx, i_tile, i_h, H, G, N, BM, NP)
    t_last = tl.max(tl.where(m_r, o_t, 0), axis=0)
    o_k, o_v, o_n = tl.arange(0, BK), tl.arange(0, BV), tl.arange(0, BN)
    m_dk, m_dv = o_k < DK, o_v < DV
    qk_scale = scale * _LOG2E
    b_qt = tl.load(q + o_row[None, :] * DK + o_k[:, None], mask=m_r[None, :] & m_dk[:, None], other=0.0)  # [BK, BM]

    b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BV, BM], dtype=tl.float32)  # O^T
    n_union = tl.load(union_len + i_tile * H + i_h)
    for i_u in range(0, n_union):
        i_blk = tl.load(union + (i_tile * H + i_h).to(tl.int64) * U + i_u)
        m_row = tl.max((b_idx == i_blk).to(tl.int32), axis=1) > 0  # [BM]
        s0 = bos + i_blk * LS
        o_s = s0 + o_n  # [BN]
        m_n = (o_n < LS) & (o_s <= t_last)
        b_k, b_v = _kv_block(k, v, s0, i_h, m_n, H, DK, DV, BN, BK, BV, TMA)  # [BN, BK], [BN, BV]
        b_st = tl.dot(b_k, b_qt, input_precision=DOT_PRECISION) * qk_scale  # [BN, BM]  S^T = K Q^T
        m_st = m_row[None, :] & m_n[:, None] & (o_s[:, None] <= o_t[None, :])  # [BN, BM] causal: s <= t
        b_st = tl.where(m_st, b_st, float("-inf"))
        b_m, b_l, b_acc = attn_fwd_update_t(b_st, b_v, b_m, b_l, b_acc, DOT_PRECISION)
    b_ot, b_lse = attn_fwd_finish(b_m, b_l, tl.trans(b_acc))
    tl.store(o + o_row[:, None] * DV + o_v[None, :], b_ot.to(o.dtype.element_ty), mask=m_r[:, None] & m_dv[None, :])
    tl.store(lse + o_row, b_lse, mask=m_r)


def selected_fwd_t(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    config: NSAConfig,
    scale: float,
    tma: bool = False,
    rows: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``optimized.selected.selected_attention_fwd`` (dense batch), with the transposed kernel."""
    B, T, HQ, _ = q.shape
    H, DV, N = k.shape[2], v.shape[3], block_idx.shape[3]
    q2, k2, v2, idx2 = _packed(q, k, v, block_idx.to(torch.int32))
    lengths = sequence_lengths(B, T, None)
    cu, tile_seq, tile_start, union, union_len, BM = _row_tiles(idx2, HQ // H, lengths, config, rows)
    meta = _meta(q, k, v, config.select_block)
    k2, v2 = _kv_operands(k2, v2, meta, tma)
    o = torch.empty(B * T, HQ, DV, dtype=q.dtype, device=q.device)
    lse = torch.empty(B * T, HQ, dtype=torch.float32, device=q.device)
    selected_fwd_t_kernel[(tile_seq.numel(), H)](
        q2, k2, v2, idx2, o, lse, cu, tile_seq, tile_start, union, union_len, scale,
        N=N, NP=next_power_of_2(N, 2), U=union.shape[-1], BM=BM, TMA=tma, **meta,
    )  # fmt: skip
    return o.view(B, T, HQ, DV), lse.view(B, T, HQ)


@triton.autotune(configs=autotune_configs({}, num_warps=(4, 8), num_stages=(1, 2, 3)), key=[*_ROWS_TUNE_KEY, "TMA"])
@triton.jit
def selected_dq_t_kernel(
    q,
    k,  # [TT, H, DK], or its tensor descriptor (block [BN, 1, BK]) if TMA
    v,  # [TT, H, DV], or its tensor descriptor (block [BN, 1, BV]) if TMA
    do,
    lse,
    delta,
    block_idx,
    dq,  # [TT, HQ, DK]
    cu_seqlens,
    tile_seq,
    tile_start,
    union,
    union_len,
    scale,
    TUNE_T,
    H: tl.constexpr,
    G: tl.constexpr,
    N: tl.constexpr,
    LS: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BN: tl.constexpr,
    NP: tl.constexpr,
    U: tl.constexpr,
    BM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    TMA: tl.constexpr,
):
    """dq of one tile of BM rows, as ``selected_bwd_dq_kernel``, transposed: P^T = exp2(K Q^T - lse),
    dP^T = V dO^T, dS^T = P^T (dP^T - delta), dQ^T += K^T dS^T (M = BN keys, then BK dims)."""
    i_tile, i_h = tl.program_id(0), tl.program_id(1)
    bos, o_t, o_row, m_r, b_idx = _row_setup(tile_seq, tile_start, cu_seqlens, block_idx, i_tile, i_h, H, G, N, BM, NP)
    t_last = tl.max(tl.where(m_r, o_t, 0), axis=0)
    o_k, o_v, o_n = tl.arange(0, BK), tl.arange(0, BV), tl.arange(0, BN)
    m_dk, m_dv = o_k < DK, o_v < DV
    qk_scale = scale * _LOG2E
    b_qt = tl.load(q + o_row[None, :] * DK + o_k[:, None], mask=m_r[None, :] & m_dk[:, None], other=0.0)  # [BK, BM]
    b_dot = tl.load(do + o_row[None, :] * DV + o_v[:, None], mask=m_r[None, :] & m_dv[:, None], other=0.0)  # [BV, BM]
    b_lse2 = tl.load(lse + o_row, mask=m_r, other=0.0) * _LOG2E  # [BM]
    b_delta = tl.load(delta + o_row, mask=m_r, other=0.0)  # [BM]

    b_dqt = tl.zeros([BK, BM], dtype=tl.float32)
    n_union = tl.load(union_len + i_tile * H + i_h)
    for i_u in range(0, n_union):
        i_blk = tl.load(union + (i_tile * H + i_h).to(tl.int64) * U + i_u)
        m_row = tl.max((b_idx == i_blk).to(tl.int32), axis=1) > 0  # [BM]
        s0 = bos + i_blk * LS
        o_s = s0 + o_n  # [BN]
        m_n = (o_n < LS) & (o_s <= t_last)
        b_k, b_v = _kv_block(k, v, s0, i_h, m_n, H, DK, DV, BN, BK, BV, TMA)  # [BN, BK], [BN, BV]
        m_st = m_row[None, :] & m_n[:, None] & (o_s[:, None] <= o_t[None, :])  # [BN, BM]
        b_st = tl.dot(b_k, b_qt, input_precision=DOT_PRECISION) * qk_scale  # [BN, BM]
        b_pt = tl.where(m_st, tl.exp2(b_st - b_lse2[None, :]), 0.0)
        b_dpt = tl.dot(b_v, b_dot, input_precision=DOT_PRECISION)  # [BN, BM]
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dqt += tl.dot(tl.trans(b_k), b_dst.to(b_k.dtype), input_precision=DOT_PRECISION)  # [BK, BM]
    store_dq(dq, dq, o_row[:, None] * DK + o_k[None, :], tl.trans(b_dqt), m_r[:, None] & m_dk[None, :], scale, False)


def selected_dq(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    block_idx: torch.Tensor,
    config: NSAConfig,
    scale: float,
    variant: str,
) -> torch.Tensor:
    """The selected branch's dq alone (dense batch): ``production16`` / ``production64`` (``selected_bwd_dq_kernel``
    at 16 or 64 rows per program), ``transposed`` or ``transposed+tma``, at 16 rows or at R with a suffix ``@R``."""
    B, T, HQ, _ = q.shape
    H, N = k.shape[2], block_idx.shape[3]
    q2, k2, v2, o2, do2, idx2 = _packed(q, k, v, o, do, block_idx.to(torch.int32))
    variant, _, at = variant.partition("@")
    rows = int(at) if at else 64 if variant == "production64" else 16
    cu, tile_seq, tile_start, union, union_len, BM = _row_tiles(
        idx2, HQ // H, sequence_lengths(B, T, None), config, rows
    )
    meta = _meta(q, k, v, config.select_block)
    lse2 = lse.contiguous().view(B * T, HQ)
    delta = attn_bwd_delta(o2, do2, None, None).view(B * T, HQ)
    dq = torch.empty_like(q2)
    grid = (tile_seq.numel(), H)
    sizes = dict(N=N, NP=next_power_of_2(N, 2), U=union.shape[-1], BM=BM, **meta)
    if variant.startswith("production"):
        selected_bwd_dq_kernel[grid](
            q2, k2, v2, do2, lse2, delta, idx2, dq, dq, cu, tile_seq, tile_start, union, union_len, scale,
            HAS_DQ_PREV=False, **sizes,
        )  # fmt: skip
        return dq.view(q.shape)
    tma = variant == "transposed+tma"
    k2, v2 = _kv_operands(k2, v2, meta, tma)
    selected_dq_t_kernel[grid](
        q2, k2, v2, do2, lse2, delta, idx2, dq, cu, tile_seq, tile_start, union, union_len, scale, TMA=tma, **sizes
    )  # fmt: skip
    return dq.view(q.shape)


@triton.jit
def decode_compressed_t_kernel(
    q,
    k_cmp,
    v_cmp,
    lengths,
    cmp_m,
    cmp_l,
    cmp_acc,
    sel,
    sel_ref,
    scale,
    TCM,
    NT,
    TPS,
    H: tl.constexpr,
    G: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    L: tl.constexpr,
    D: tl.constexpr,
    LS: tl.constexpr,
    NC: tl.constexpr,
    BG: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BJ: tl.constexpr,
    BH: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    """``optimized.decode.decode_compressed_kernel`` (same arguments, same outputs) with its products transposed:
    ``S^T = K Q^T`` [BC, BG] and ``O^T += V^T P^T`` [BV, BG] (M = 64 keys and 128 dims: wgmma for the G = 16
    query heads), the overlap sums ``u^T = W^T 2^(S^T - r)`` [BJ, BG]. ``scripts/decode_launch.py --transposed``
    swaps it into the decode step."""
    if PDL:
        gdc_launch_dependents()
    i_b, i_h, i_c = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    HQ: tl.constexpr = H * G
    R: tl.constexpr = LS // D
    BC: tl.constexpr = BJ * R
    HALO: tl.constexpr = L // D - 1
    qk_scale = scale * _LOG2E
    t = tl.load(lengths + i_b) - 1
    TC = tl.where(t + 1 >= L, (t + 1 - L) // D + 1, 0)
    NS = t // LS + 1
    o_g, o_k, o_v = tl.arange(0, BG), tl.arange(0, BK), tl.arange(0, BV)
    o_c, o_j, o_hc = tl.arange(0, BC), tl.arange(0, BJ), tl.arange(0, BH) - BH
    m_g, m_dk, m_dv = o_g < G, o_k < DK, o_v < DV
    o_row = i_b * HQ + i_h * G + o_g  # [BG]
    b_qt = tl.load(q + o_row[None, :] * DK + o_k[:, None], mask=m_g[None, :] & m_dk[:, None], other=0.0)  # [BK, BG]
    b_wt = overlap_strides(o_c[None, :], o_j[:, None], L, D, LS).to(tl.float32)  # [BJ, BC] Eq. 9
    b_wht = overlap_strides(o_hc[None, :], o_j[:, None], L, D, LS).to(tl.float32)  # [BJ, BH]

    b_m = tl.full([BG], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BG], dtype=tl.float32)
    b_acc = tl.zeros([BV, BG], dtype=tl.float32)  # O^T
    u_end = tl.minimum(i_c * TPS + TPS, tl.cdiv(NS, BJ))
    for i_u in range(i_c * TPS, u_end):
        o_i, o_ih = i_u * BC + o_c, i_u * BC + o_hc
        m_i, m_ih = o_i < TC, (o_hc >= -HALO) & (o_ih >= 0) & (o_ih < TC)
        o_key, o_keyh = (i_b * TCM + o_i) * H + i_h, (i_b * TCM + o_ih) * H + i_h
        b_k = tl.load(k_cmp + o_key[:, None] * DK + o_k[None, :], mask=m_i[:, None] & m_dk[None, :], other=0.0)
        b_kh = tl.load(k_cmp + o_keyh[:, None] * DK + o_k[None, :], mask=m_ih[:, None] & m_dk[None, :], other=0.0)
        b_v = tl.load(v_cmp + o_key[:, None] * DV + o_v[None, :], mask=m_i[:, None] & m_dv[None, :], other=0.0)
        b_st = tl.dot(b_k, b_qt, input_precision=DOT_PRECISION) * qk_scale  # [BC, BG]
        b_st = tl.where(m_i[:, None] & m_g[None, :], b_st, float("-inf"))
        b_sht = tl.dot(b_kh, b_qt, input_precision=DOT_PRECISION) * qk_scale  # [BH, BG]
        b_sht = tl.where(m_ih[:, None] & m_g[None, :], b_sht, float("-inf"))
        b_m, b_l, b_acc = attn_fwd_update_t(b_st, b_v, b_m, b_l, b_acc, DOT_PRECISION)
        b_r = tl.maximum(tl.max(b_st, 0), tl.max(b_sht, 0))  # [BG] the tile's max score
        b_r = tl.where(b_r == float("-inf"), 0.0, b_r)
        b_ut = tl.dot(b_wt, tl.exp2(b_st - b_r[None, :]), input_precision="ieee")  # [BJ, BG] Eq. 8-9
        b_ut += tl.dot(b_wht, tl.exp2(b_sht - b_r[None, :]), input_precision="ieee")
        tl.store(sel + o_row[None, :] * (NT * BJ) + i_u * BJ + o_j[:, None], b_ut, mask=m_g[None, :])
        tl.store(sel_ref + o_row * NT + i_u, b_r, mask=m_g)

    o_part = o_row * NC + i_c  # [BG]
    tl.store(cmp_m + o_part, b_m, mask=m_g)
    tl.store(cmp_l + o_part, b_l, mask=m_g)
    tl.store(cmp_acc + o_part[None, :] * BV + o_v[:, None], b_acc, mask=m_g[None, :])


def main(argv: list[str] | None = None) -> int:
    p = experiment.parser(__doc__, [8192, 65536], ["default", "g4"])
    p.add_argument("--no-tma", action="store_true", help="only the pointer-load variant")
    p.add_argument("--rows", type=int, nargs="*", default=[], help="transposed variants at these rows per program too")
    args = p.parse_args(argv)
    device, env = experiment.start(args)
    transposed = ["transposed", *([] if args.no_tma else ["transposed+tma"])]
    transposed += [f"{transposed[-1]}@{rows}" for rows in args.rows]
    fwd_variants = ["production", *transposed]
    dq_variants = ["production16", "production64", *transposed]
    records, failed = [], 0
    for name in args.configs:
        cfg = CONFIGS[name]
        for seq_len in args.lengths:
            x = experiment.selected_inputs(cfg, seq_len, device)
            q, k, v, idx, scale = x["q"], x["k"], x["v"], x["block_idx"], x["scale"]
            o, lse = selected_attention_fwd(q, k, v, idx, cfg.nsa, scale, None)
            do = torch.randn(*q.shape[:3], cfg.dim_v, device=device, dtype=q.dtype)
            calls = {
                ("fwd", "production"): functools.partial(selected_attention_fwd, q, k, v, idx, cfg.nsa, scale, None)
            }
            calls |= {("fwd", vr): functools.partial(selected_fwd_t, q, k, v, idx, cfg.nsa, scale, "tma" in vr,
                                                     int(vr.partition("@")[2] or 16))
                      for vr in fwd_variants[1:]}  # fmt: skip
            calls |= {("dq", vr): functools.partial(selected_dq, q, k, v, o, lse, do, idx, cfg.nsa, scale, vr)
                      for vr in dq_variants}  # fmt: skip
            want: dict[str, tuple[torch.Tensor, ...]] = {}
            for (what, label), call in calls.items():
                out = call()
                out = out if isinstance(out, tuple) else (out,)  # fwd: (o, lse); dq: dq
                want.setdefault(what, out)
                err = max(float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1.0))
                          for a, b in zip(out, want[what]))  # fmt: skip
                ok = err <= 2e-2 and all(bool(torch.isfinite(a).all()) for a in out)
                failed += not ok
                ms = time_calls([call], device).median_ms if device.type == "cuda" else None
                rec = {"config": name, "seq_len": seq_len, "pass": what, "variant": label, "ms": ms,
                       "rel_err_vs_production": err, "ok": ok}  # fmt: skip
                records.append(rec)
                shown = f"{ms:8.3f} ms" if ms is not None else "   (cpu)"
                verdict = "ok" if ok else "FAILED"
                print(f"{name:11s} T={seq_len:6d} {what:3s} {label:18s} {shown}  err {err:.1e}  {verdict}")
    experiment.write(args, "swapab", env, records)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
