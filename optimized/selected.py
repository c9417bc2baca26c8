r"""Selected attention (paper Eq. 12, spec section 7): group-centric Triton kernels, forward and backward.

**Rows.** As in the other branches, the ``G`` query heads of kv head ``h`` and the positions are flattened
into rows ``r = t G + g`` (``q`` is ``[T, HQ, DK]``, so a group's heads are adjacent), and a program owns
``BM`` consecutive rows of one sequence: all ``G`` heads of ``BM / G`` positions (paper section 3.4: the
heads of a group share their blocks, so each K/V block is loaded once for all of them). ``BM = 16``, the
smallest tensor-core tile, so ``G = 16`` gives one position per program (the paper's kernel) and a small
group fills the tile with neighbouring positions instead of padding (``G = 4``: 4 positions). The launchers
take ``rows`` for larger tiles (``scripts/selected_tiles.py`` times them); both kernels run 16.

**Forward** (grid: row tiles x H). The rows' block lists ``[BM, n]`` are loaded once, and the program
walks the *union* of the tile's blocks in ascending order (a one-position tile's own row of ``block_idx``,
which the layers below the public function take ascending and -1 padded, as the selection writes it; for
several positions, precomputed per tile by a few sorts on the device), so the walk is a plain ``for`` loop
that Triton can software-pipeline, running the shared
online-softmax step (``_common.attn_fwd_step``) over each block's ``l'`` keys with the mask "this row's
position selected the block, and ``s <= t``". Waste: a block selected by only some of the tile's positions
is computed (and masked) for all rows. With ``G >= 16`` there is none; with smaller groups the union of
the ``16 / G`` positions' lists is between ``n`` blocks (neighbours agree, as in trained models where the
forced local blocks and the scores are shared) and ``16 / G`` times ``n`` (independent random scores):
the tensor-core work per position is then what a padded one-position tile would cost, and every union
block is still loaded once per tile. The branch is bound by memory traffic (each loaded key element
serves ``2 G`` flops per position), so the shared loads are what counts. Head dims are padded to powers
of two and ``l'`` to a power of two >= 16 (one key tile per block; ``l' <= 128`` keeps it in registers).

**Forward, block-major** (small groups at long sequences: ``BLOCK_MAJOR_MAX_GROUP``, ``BLOCK_MAJOR_MIN_TOKENS``).
With ``G = 4`` a 16-row tile covers 4 positions whose blocks mostly differ (a union of about ``3 n`` blocks on
random inputs), so the tile kernel gathers each (position, kv head)'s ``n`` blocks, ``n l' (DK + DV)`` elements, to
serve only ``G`` query heads. Turned around, each selected block is loaded once per chunk of the queries that
chose it (the inverted lists of the dK/dV pass below, ``invert_blocks``) and meets their ``G`` heads' rows, gathered
from ``q`` (``G DK`` elements per position). ``selected_fwd_block_kernel`` stores each (position, head)'s softmax
over that one block as a partial (its output normalised, in q's dtype, and its log-sum-exp: ``T H_Q n (DV + 1)``
values), and ``selected_fwd_merge_kernel`` merges a row's ``n`` partials by their log-sum-exps (with Eq. 5 fused
when the core asks). Per (position, kv head, block) the traffic is ``G DK`` elements of q read plus ``2 G DV`` of
partials written and read back, against the tile kernel's ``l' (DK + DV)``: 4x less at ``G = 4`` and the
paper's sizes, 16x at ``G = 1``, none at ``G = 16``, where the tile kernel stays. Measured on an H100 at 64k
(``scripts/selected_tiles.py --block-major``): the branch 15.1 -> 5.8 ms at ``G = 4`` and 11.7 -> 2.2 ms at
``G = 1``; the partials cost ``T H_Q n DV`` elements of memory (4.3 GB at 64k, ``G = 4``, bf16).

**Backward.** ``delta = rowsum(o * do)`` (``_common``); dq with the forward's tiles and union loop, its products
transposed: with 16 rows, ``S = Q K^T`` has M = 16, below the M = 64 of Hopper's wgmma, and Triton falls back to
``mma.sync``; the dq kernel computes ``S^T = K Q^T``, ``dP^T = V dO^T`` and ``dQ^T += K^T dS^T`` instead (M = the
block's keys, then the head dims), so wgmma reads K and V from shared memory, and loads each block's K and V by TMA
(``_kv_operands``: host tensor descriptors) where the rows are 16-byte aligned and the card has it. Elsewhere the
dq loads K/V by pointers and keeps the untransposed products (``mma.sync``): with pointer-loaded operands the
transposed kernel failed on an H100 at D = 128 (Triton 3.6.0). On an H100 the selected backward took 4.90 -> 4.26
ms at 8k and 40.2 -> 34.8 ms at 64k (``G = 16``) against the earlier dq (``mma.sync``-free only at 64 rows per
program). The forward transposed the same way was 4-7% slower (2.14 -> 2.25 ms at 8k, 18.3 -> 19.6 at 64k): it
keeps ``mma.sync``. dK/dV are *inverted*: for each kv head
and block, the list of query positions that selected it, built with one stable sort of the ``T H n`` (key = head,
global block) pairs in PyTorch (no host sync). Long lists (the initial and local blocks are chosen by every query)
are cut into chunks of ``CH`` positions so no program serialises a whole sequence; each chunk program keeps its
block's K/V resident, walks its positions' ``G`` heads in tiles of rows (``attn_bwd_dkv_step``) and adds its partial
dK/dV into a float32 buffer with one atomic add per element: a block with ``c`` chunks sees ``c`` adds (``c <= T /
CH``), never a per-query atomic.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from reference._checks import check_config, check_cu_seqlens, check_dim, check_qkv, check_scale
from reference.config import NSAConfig
from reference.selected import check_block_idx

from ._common import (
    LOG2E,
    attn_bwd_delta,
    attn_bwd_dkv_step,
    attn_bwd_dq_step,
    attn_fwd_finish,
    attn_fwd_step,
    attn_fwd_update,
    autotune_configs,
    check_int32_offsets,
    check_kernel_dtype,
    device_tensor,
    dot_precision,
    gated_sum,
    is_interpreting,
    next_power_of_2,
    shape_metadata,
    store_dq,
    tma_descriptor,
    tune_bucket,
)
from ._interval import token_sequences
from ._sparse import sequence_lengths, sequence_tiles

_LOG2E = tl.constexpr(LOG2E)  # jit code may only read constexpr globals
_TUNE_KEY = ["G", "BK", "BV", "BN", "TUNE_T"]  # TUNE_T: log2 bucket of the tokens (tune_bucket)
_ROWS_TUNE_KEY = [*_TUNE_KEY, "BM"]  # the forward and dq kernels: tuned per row tile (``rows``)


@triton.jit
def _row_setup(
    tile_seq,
    tile_start,
    cu_seqlens,
    block_idx,
    i_tile,
    i_h,
    H: tl.constexpr,
    G: tl.constexpr,
    N: tl.constexpr,
    BM: tl.constexpr,
    NP: tl.constexpr,
):
    """The tile's rows: packed positions o_t [BM], query rows o_row [BM] (into [TT, HQ]), row mask, and block lists."""
    i_seq = tl.load(tile_seq + i_tile)
    eos = tl.load(cu_seqlens + i_seq + 1)
    bos = tl.load(cu_seqlens + i_seq)
    o_r = tl.load(tile_start + i_tile).to(tl.int64) + tl.arange(0, BM)  # [BM] packed rows t * G + g
    m_r = o_r < eos.to(tl.int64) * G
    o_t = o_r // G
    o_row = o_t * (H * G) + i_h * G + o_r % G  # [BM] int64 index into [TT, HQ]
    p_idx = block_idx + (o_t * H + i_h)[:, None] * N + tl.arange(0, NP)[None, :]
    b_idx = tl.load(p_idx, mask=m_r[:, None] & (tl.arange(0, NP) < N)[None, :], other=-1)  # [BM, NP]
    return bos, o_t, o_row, m_r, b_idx


@triton.autotune(configs=autotune_configs({}, num_warps=(2, 4), num_stages=(1, 2, 3)), key=_ROWS_TUNE_KEY)
@triton.jit
def selected_fwd_kernel(
    q,  # [TT, HQ, DK]
    k,  # [TT, H, DK]
    v,  # [TT, H, DV]
    block_idx,  # [TT, H, N] int32, -1 padded, counted from each sequence's first token
    o,  # [TT, HQ, DV]
    lse,  # [TT, HQ] float32
    cu_seqlens,
    tile_seq,
    tile_start,
    union,  # [NT, H, U] int32: each tile's blocks (the union over its positions), ascending
    union_len,  # [NT, H] int32: how many
    gates,  # [TT, HQ, 3] (GATED)
    o_cmp,  # [TT, HQ, DV] (GATED)
    o_win,  # [TT, HQ, DV] (GATED)
    o_gated,  # [TT, HQ, DV] (GATED): Eq. 5's o
    scale,
    TUNE_T,  # the autotuner's size bucket (_TUNE_KEY), not read
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
    GATED: tl.constexpr,
):
    """o and lse of one tile of BM rows (positions x the group's heads) over the union of their blocks; with GATED
    also the core's o = g_cmp o_cmp + g_slc o + g_win o_win (Eq. 5), from this o as stored (so it equals the
    combine kernel's sum) without reading it back."""
    i_tile, i_h = tl.program_id(0), tl.program_id(1)
    bos, o_t, o_row, m_r, b_idx = _row_setup(tile_seq, tile_start, cu_seqlens, block_idx, i_tile, i_h, H, G, N, BM, NP)
    t_last = tl.max(tl.where(m_r, o_t, 0), axis=0)  # the tile's last position
    o_k, o_v, o_n = tl.arange(0, BK), tl.arange(0, BV), tl.arange(0, BN)
    m_dk, m_dv = o_k < DK, o_v < DV
    qk_scale = scale * _LOG2E
    b_q = tl.load(q + o_row[:, None] * DK + o_k[None, :], mask=m_r[:, None] & m_dk[None, :], other=0.0)  # [BM, BK]

    b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, BV], dtype=tl.float32)
    n_union = tl.load(union_len + i_tile * H + i_h)
    for i_u in range(0, n_union):  # the union of the rows' blocks, ascending
        i_blk = tl.load(union + (i_tile * H + i_h).to(tl.int64) * U + i_u)
        m_row = tl.max((b_idx == i_blk).to(tl.int32), axis=1) > 0  # [BM] rows whose position selected it
        o_s = bos + i_blk * LS + o_n  # [BN] packed keys of the block
        m_n = o_n < LS
        o_key = o_s.to(tl.int64) * H + i_h  # [BN] index into [TT, H]
        m_s = m_row[:, None] & m_n[None, :] & (o_s[None, :] <= o_t[:, None])  # [BM, BN] causal: s <= t
        m_n = m_n & (o_s <= t_last)  # never load past the tile's last position
        b_m, b_l, b_acc = attn_fwd_step(
            b_q,
            k + o_key[None, :] * DK + o_k[:, None],  # [BK, BN]
            v + o_key[:, None] * DV + o_v[None, :],  # [BN, BV]
            m_dk[:, None] & m_n[None, :],
            m_n[:, None] & m_dv[None, :],
            m_s,
            qk_scale,
            b_m,
            b_l,
            b_acc,
            DOT_PRECISION,
        )
    b_o, b_lse = attn_fwd_finish(b_m, b_l, b_acc)
    b_o = b_o.to(o.dtype.element_ty)  # [BM, BV]
    p_o, m_o = o_row[:, None] * DV + o_v[None, :], m_r[:, None] & m_dv[None, :]
    tl.store(o + p_o, b_o, mask=m_o)
    tl.store(lse + o_row, b_lse, mask=m_r)
    if GATED:  # Eq. 5, as combine_fwd_kernel
        b_cmp = tl.load(o_cmp + p_o, mask=m_o, other=0.0)  # [BM, BV]
        b_win = tl.load(o_win + p_o, mask=m_o, other=0.0)
        b_y = gated_sum(gates, o_row, m_r, b_cmp, b_o, b_win)  # [BM, BV] fp32
        tl.store(o_gated + p_o, b_y.to(o_gated.dtype.element_ty), mask=m_o)


@triton.jit
def _work_block(
    k, v, work_key, block_start, block_end, i_w, NB, H, DK, DV, BK: tl.constexpr, BV: tl.constexpr, BN: tl.constexpr
):
    """The selected block of work item i_w of the inverted lists (``invert_blocks``): its kv head i_h, packed keys
    o_s [BN] (mask m_n: inside the block), their rows o_key into [TT, H], and its K [BN, BK] and V [BN, BV]."""
    i_key = tl.load(work_key + i_w)
    i_h, i_blk = i_key // NB, i_key % NB
    s0, s1 = tl.load(block_start + i_blk), tl.load(block_end + i_blk)
    o_k, o_v = tl.arange(0, BK), tl.arange(0, BV)
    o_s = s0 + tl.arange(0, BN)  # [BN] packed keys
    m_n = o_s < s1
    o_key = o_s.to(tl.int64) * H + i_h  # [BN]
    b_k = tl.load(k + o_key[:, None] * DK + o_k[None, :], mask=m_n[:, None] & (o_k < DK)[None, :], other=0.0)
    b_v = tl.load(v + o_key[:, None] * DV + o_v[None, :], mask=m_n[:, None] & (o_v < DV)[None, :], other=0.0)
    return i_h, o_s, m_n, o_key, b_k, b_v


@triton.jit
def _entry_rows(entry_of, e0, o_r, m_r, i_h, H: tl.constexpr, G: tl.constexpr, N: tl.constexpr):
    """Rows o_r [BM] = (entry, head) of a chunk starting at entry e0 of ``entry_of``: returns the entries o_e (the
    (t H + h) N + j of block_idx, uint32), their packed query positions o_t and rows o_row into [TT, HQ] (int64;
    computed in 32 bits: an unsigned division by H N is a shift, and TT HQ < 2^31, ``check_int32_offsets``)."""
    o_e = tl.load(entry_of + e0 + o_r // G, mask=m_r, other=0).to(tl.uint32)  # [BM]
    o_t = (o_e // (H * N)).to(tl.int32)  # [BM]
    o_row = (o_t * (H * G) + i_h * G + o_r % G).to(tl.int64)  # [BM]
    return o_e, o_t, o_row


@triton.autotune(
    configs=autotune_configs({"BM": (64, 128)}, num_warps=(4, 8), num_stages=(1, 2), interpreter={"BM": 16}),
    key=_TUNE_KEY,
)
@triton.jit
def selected_fwd_block_kernel(
    q,  # [TT, HQ, DK]
    k,  # [TT, H, DK]
    v,  # [TT, H, DV]
    o_part,  # [TT * H * N * G, DV] q's dtype: each (entry, head)'s output over its one block, normalised
    lse_part,  # [TT * H * N * G] float32: its log-sum-exp (natural log)
    work_key,  # [W] int32: kv head * NB + global block of each chunk (``invert_blocks``)
    work_start,  # [W] int32: the chunk's first entry in `entry_of`
    work_end,  # [W] int32: one past its last (<= start for an empty chunk)
    entry_of,  # [TT * H * N] int32: the entries (t H + h) N + j of block_idx, grouped by (head, block)
    block_start,  # [NB] int32: first packed token of every global block
    block_end,  # [NB] int32: one past its last
    scale,
    NB,
    TUNE_T,  # the autotuner's size bucket (_TUNE_KEY), not read
    H: tl.constexpr,
    G: tl.constexpr,
    N: tl.constexpr,
    LS: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BN: tl.constexpr,
    BM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Block-major forward, pass 1: one selected block against one chunk of the queries that selected it (all G
    heads). The block's K and V are loaded once; each row's attention over this block alone is stored as a
    partial (o normalised, lse), for ``selected_fwd_merge_kernel`` to merge over the row's n blocks."""
    i_w = tl.program_id(0)
    e0, e1 = tl.load(work_start + i_w), tl.load(work_end + i_w)
    if e0 < e1:
        i_h, o_s, m_n, _, b_k, b_v = _work_block(k, v, work_key, block_start, block_end, i_w, NB, H, DK, DV, BK, BV, BN)
        b_kt = tl.trans(b_k)  # [BK, BN]
        qk_scale = scale * _LOG2E
        o_k, o_v, o_m = tl.arange(0, BK), tl.arange(0, BV), tl.arange(0, BM)
        m_dk, m_dv = o_k < DK, o_v < DV
        for r0 in range(0, (e1 - e0) * G, BM):
            o_r = r0 + o_m  # [BM] rows (entry, head) of the chunk
            m_r = o_r < (e1 - e0) * G
            o_e, o_t, o_row = _entry_rows(entry_of, e0, o_r, m_r, i_h, H, G, N)
            b_q = tl.load(q + o_row[:, None] * DK + o_k[None, :], mask=m_r[:, None] & m_dk[None, :], other=0.0)
            b_s = tl.dot(b_q, b_kt, input_precision=DOT_PRECISION)  # [BM, BN], scaled in the update
            b_s = tl.where(m_n[None, :] & (o_s[None, :] <= o_t[:, None]), b_s, float("-inf"))  # causal: s <= t
            b_m, b_l, b_acc = attn_fwd_update(
                b_s,
                b_v,
                tl.full([BM], float("-inf"), dtype=tl.float32),
                tl.zeros([BM], dtype=tl.float32),
                tl.zeros([BM, BV], dtype=tl.float32),
                DOT_PRECISION,
                qk_scale,
            )
            b_o, b_lse = attn_fwd_finish(b_m, b_l, b_acc)
            o_part_row = o_e.to(tl.int64) * G + o_r % G  # [BM] the (entry, head) row of the partials
            p_o = o_part + o_part_row[:, None] * DV + o_v[None, :]
            tl.store(p_o, b_o.to(o_part.dtype.element_ty), mask=m_r[:, None] & m_dv[None, :])
            tl.store(lse_part + o_part_row, b_lse, mask=m_r)


@triton.autotune(
    configs=autotune_configs({"BR": (16, 8)}, num_warps=(4,), num_stages=(1, 2)), key=["G", "N", "BV", "TUNE_T"]
)
@triton.jit
def selected_fwd_merge_kernel(
    block_idx,  # [TT, H, N] int32, -1 padded
    o_part,  # [TT * H * N * G, DV] (selected_fwd_block_kernel)
    lse_part,  # [TT * H * N * G] float32
    o,  # [TT, HQ, DV]
    lse,  # [TT, HQ] float32
    gates,  # [TT, HQ, 3] (GATED)
    o_cmp,  # [TT, HQ, DV] (GATED)
    o_win,  # [TT, HQ, DV] (GATED)
    o_gated,  # [TT, HQ, DV] (GATED): Eq. 5's o
    TT,
    TUNE_T,  # the autotuner's size bucket (_TUNE_KEY), not read
    H: tl.constexpr,
    G: tl.constexpr,
    N: tl.constexpr,
    NP: tl.constexpr,
    DV: tl.constexpr,
    BV: tl.constexpr,
    BR: tl.constexpr,
    GATED: tl.constexpr,
):
    """Block-major forward, pass 2: o and lse of BR rows (t, g) of kv head h, the log-sum-exp merge of their
    blocks' partials (slots with block -1 hold none); with GATED also Eq. 5, as ``selected_fwd_kernel``."""
    i_r, i_h = tl.program_id(0), tl.program_id(1)
    o_r = i_r * BR + tl.arange(0, BR)  # [BR] rows t * G + g
    m_r = o_r < TT * G
    o_t = (o_r // G).to(tl.int64)
    o_row = o_t * (H * G) + i_h * G + o_r % G  # [BR] index into [TT, HQ]
    o_j, o_v = tl.arange(0, NP), tl.arange(0, BV)
    m_dv = o_v < DV
    m_rj = m_r[:, None] & (o_j < N)[None, :]
    b_idx = tl.load(block_idx + (o_t * H + i_h)[:, None] * N + o_j[None, :], mask=m_rj, other=-1)  # [BR, NP]
    o_part_row = ((o_t * H + i_h)[:, None] * N + o_j[None, :]) * G + (o_r % G)[:, None]  # [BR, NP]
    b_lse_j = tl.load(lse_part + o_part_row, mask=b_idx >= 0, other=float("-inf"))  # [BR, NP]
    b_max = tl.max(b_lse_j, axis=1)
    b_max = tl.where(b_max == float("-inf"), 0.0, b_max)  # rows without a block: o 0, lse -inf
    b_sum = tl.sum(tl.exp2((b_lse_j - b_max[:, None]) * _LOG2E), axis=1)  # [BR]
    b_lse = tl.where(b_sum > 0, b_max + tl.log2(tl.where(b_sum > 0, b_sum, 1.0)) / _LOG2E, float("-inf"))
    b_w_j = tl.exp2((b_lse_j - tl.where(b_sum > 0, b_lse, 0.0)[:, None]) * _LOG2E)  # [BR, NP] each slot's weight
    b_acc = tl.zeros([BR, BV], dtype=tl.float32)
    for j in tl.static_range(N):
        b_w = tl.sum(tl.where(o_j[None, :] == j, b_w_j, 0.0), axis=1)  # [BR]
        m_j = b_w > 0  # slot j holds a block that the row sees (a partial was written)
        p_j = o_part + (((o_t * H + i_h) * N + j) * G + o_r % G)[:, None] * DV + o_v[None, :]
        b_oj = tl.load(p_j, mask=(m_r & m_j)[:, None] & m_dv[None, :], other=0.0)  # [BR, BV]
        b_acc += tl.where(m_j, b_w, 0.0)[:, None] * b_oj.to(tl.float32)
    b_o = b_acc.to(o.dtype.element_ty)
    p_o, m_o = o_row[:, None] * DV + o_v[None, :], m_r[:, None] & m_dv[None, :]
    tl.store(o + p_o, b_o, mask=m_o)
    tl.store(lse + o_row, b_lse, mask=m_r)
    if GATED:  # Eq. 5, as combine_fwd_kernel
        b_cmp = tl.load(o_cmp + p_o, mask=m_o, other=0.0)  # [BR, BV]
        b_win = tl.load(o_win + p_o, mask=m_o, other=0.0)
        b_y = gated_sum(gates, o_row, m_r, b_cmp, b_o, b_win)  # [BR, BV] fp32
        tl.store(o_gated + p_o, b_y.to(o_gated.dtype.element_ty), mask=m_o)


@triton.autotune(configs=autotune_configs({}, num_warps=(4, 8), num_stages=(1, 2, 3)), key=[*_ROWS_TUNE_KEY, "TMA"])
@triton.jit
def selected_bwd_dq_kernel(
    q,
    k,  # [TT, H, DK], or its tensor descriptor (box [BN, 1, BK]) if TMA
    v,  # [TT, H, DV], or its tensor descriptor (box [BN, 1, BV]) if TMA
    do,
    lse,
    delta,
    block_idx,
    dq,  # [TT, HQ, DK]
    dq_prev,  # [TT, HQ, DK]: added to dq if HAS_DQ_PREV (the dq of the branches before this one)
    cu_seqlens,
    tile_seq,
    tile_start,
    union,  # [NT, H, U] int32: each tile's blocks (the union over its positions), ascending
    union_len,  # [NT, H] int32: how many
    scale,
    TUNE_T,  # the autotuner's size bucket (_TUNE_KEY), not read
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
    HAS_DQ_PREV: tl.constexpr,
    TMA: tl.constexpr,
):
    """dq of one tile of BM rows (the forward's grid and union loop). With TMA transposed for wgmma: ``P^T = exp2(K
    Q^T - lse)``, ``dP^T = V dO^T``, ``dS^T = P^T (dP^T - delta)``, ``dQ^T += K^T dS^T`` (M = BN keys, then BK dims),
    each block's K and V one bulk copy (keys past the tensor come back as zeros, keys past the block as they are:
    their scores are masked, so they weigh 0). Else pointer loads and the untransposed step of every other dq kernel
    (``attn_bwd_dq_step``, ``mma.sync`` at 16 rows): the transposed products with pointer-loaded K/V read shared memory
    out of bounds or gave NaN on an H100 at D = 128 (Triton 3.6.0, every warp and stage count; tenth session)."""
    i_tile, i_h = tl.program_id(0), tl.program_id(1)
    bos, o_t, o_row, m_r, b_idx = _row_setup(tile_seq, tile_start, cu_seqlens, block_idx, i_tile, i_h, H, G, N, BM, NP)
    t_last = tl.max(tl.where(m_r, o_t, 0), axis=0)  # the tile's last position
    o_k, o_v, o_n = tl.arange(0, BK), tl.arange(0, BV), tl.arange(0, BN)
    m_dk, m_dv = o_k < DK, o_v < DV
    qk_scale = scale * _LOG2E
    b_lse2 = tl.load(lse + o_row, mask=m_r, other=0.0) * _LOG2E  # [BM]
    b_delta = tl.load(delta + o_row, mask=m_r, other=0.0)  # [BM]
    n_union = tl.load(union_len + i_tile * H + i_h)
    if TMA:
        m_qt, m_dot = m_r[None, :] & m_dk[:, None], m_r[None, :] & m_dv[:, None]
        b_qt = tl.load(q + o_row[None, :] * DK + o_k[:, None], mask=m_qt, other=0.0)  # [BK, BM]
        b_dot = tl.load(do + o_row[None, :] * DV + o_v[:, None], mask=m_dot, other=0.0)  # [BV, BM]
        b_dqt = tl.zeros([BK, BM], dtype=tl.float32)  # dQ^T
        for i_u in range(0, n_union):  # the union of the rows' blocks, ascending
            i_blk = tl.load(union + (i_tile * H + i_h).to(tl.int64) * U + i_u)
            m_row = tl.max((b_idx == i_blk).to(tl.int32), axis=1) > 0  # [BM]
            s0 = bos + i_blk * LS
            o_s = s0 + o_n  # [BN]
            m_n = (o_n < LS) & (o_s <= t_last)
            b_k = k.load([s0, i_h, 0]).reshape(BN, BK)  # [BN, BK]
            b_v = v.load([s0, i_h, 0]).reshape(BN, BV)  # [BN, BV]
            m_st = m_row[None, :] & m_n[:, None] & (o_s[:, None] <= o_t[None, :])  # [BN, BM]
            b_st = tl.dot(b_k, b_qt, input_precision=DOT_PRECISION) * qk_scale  # [BN, BM]
            b_pt = tl.where(m_st, tl.exp2(b_st - b_lse2[None, :]), 0.0)  # P^T
            b_dpt = tl.dot(b_v, b_dot, input_precision=DOT_PRECISION)  # [BN, BM] dP^T = V dO^T
            b_dst = b_pt * (b_dpt - b_delta[None, :])  # dS^T
            b_dqt += tl.dot(tl.trans(b_k), b_dst.to(b_k.dtype), input_precision=DOT_PRECISION)  # [BK, BM]
        b_dq = tl.trans(b_dqt)  # [BM, BK]
    else:
        m_q, m_do = m_r[:, None] & m_dk[None, :], m_r[:, None] & m_dv[None, :]
        b_q = tl.load(q + o_row[:, None] * DK + o_k[None, :], mask=m_q, other=0.0)  # [BM, BK]
        b_do = tl.load(do + o_row[:, None] * DV + o_v[None, :], mask=m_do, other=0.0)  # [BM, BV]
        b_dq = tl.zeros([BM, BK], dtype=tl.float32)
        for i_u in range(0, n_union):
            i_blk = tl.load(union + (i_tile * H + i_h).to(tl.int64) * U + i_u)
            m_row = tl.max((b_idx == i_blk).to(tl.int32), axis=1) > 0  # [BM]
            o_s = bos + i_blk * LS + o_n  # [BN]
            m_n = (o_n < LS) & (o_s <= t_last)
            o_key = o_s.to(tl.int64) * H + i_h  # [BN] index into [TT, H]
            m_s = m_row[:, None] & m_n[None, :] & (o_s[None, :] <= o_t[:, None])  # [BM, BN]
            b_dq = attn_bwd_dq_step(
                b_q,
                b_do,
                b_lse2,
                b_delta,
                k + o_key[None, :] * DK + o_k[:, None],  # [BK, BN]
                v + o_key[None, :] * DV + o_v[:, None],  # [BV, BN]
                m_dk[:, None] & m_n[None, :],
                m_dv[:, None] & m_n[None, :],
                m_s,
                qk_scale,
                b_dq,
                DOT_PRECISION,
            )
    m_rk = m_r[:, None] & m_dk[None, :]
    store_dq(dq, dq_prev, o_row[:, None] * DK + o_k[None, :], b_dq, m_rk, scale, HAS_DQ_PREV)


@triton.autotune(
    configs=autotune_configs({"BM": (32, 64)}, num_warps=(4, 8), num_stages=(1, 2), interpreter={"BM": 16}),
    key=_TUNE_KEY,
    reset_to_zero=["dk", "dv"],
)
@triton.jit
def selected_bwd_dkv_kernel(
    q,
    k,
    v,
    do,
    lse,
    delta,
    dk,  # [TT, H, DK] float32, zeroed: chunks add into it
    dv,  # [TT, H, DV] float32, zeroed
    work_key,  # [W] int32: kv head * NB + global block of each chunk
    work_start,  # [W] int32: the chunk's first entry in `entry_of`
    work_end,  # [W] int32: one past its last (<= start for an empty chunk)
    entry_of,  # [TT * H * N] int32: the entries (t H + h) N + j of block_idx, grouped by (head, block)
    block_start,  # [NB] int32: first packed token of every global block
    block_end,  # [NB] int32: one past its last (the sequence may end inside it)
    scale,
    NB,
    TUNE_T,  # the autotuner's size bucket (_TUNE_KEY), not read
    H: tl.constexpr,
    G: tl.constexpr,
    N: tl.constexpr,
    LS: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BN: tl.constexpr,
    BM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Partial dk, dv of one selected block from one chunk of the queries that selected it (all G heads)."""
    i_w = tl.program_id(0)
    e0, e1 = tl.load(work_start + i_w), tl.load(work_end + i_w)
    if e0 < e1:
        i_h, o_s, m_n, o_key, b_k, b_v = _work_block(
            k, v, work_key, block_start, block_end, i_w, NB, H, DK, DV, BK, BV, BN
        )
        qk_scale = scale * _LOG2E
        o_k, o_v, o_m = tl.arange(0, BK), tl.arange(0, BV), tl.arange(0, BM)
        m_dk, m_dv = o_k < DK, o_v < DV
        b_dk = tl.zeros([BN, BK], dtype=tl.float32)
        b_dv = tl.zeros([BN, BV], dtype=tl.float32)
        for r0 in range(0, (e1 - e0) * G, BM):
            o_r = r0 + o_m  # [BM] rows (entry, head) of the chunk
            m_r = o_r < (e1 - e0) * G
            _, o_t, o_row = _entry_rows(entry_of, e0, o_r, m_r, i_h, H, G, N)
            m_st = m_n[:, None] & m_r[None, :] & (o_s[:, None] <= o_t[None, :])  # [BN, BM]
            b_dk, b_dv = attn_bwd_dkv_step(
                b_k,
                b_v,
                q + o_row[None, :] * DK + o_k[:, None],  # [BK, BM]
                do + o_row[:, None] * DV + o_v[None, :],  # [BM, BV]
                lse + o_row,
                delta + o_row,
                m_dk[:, None] & m_r[None, :],
                m_r[:, None] & m_dv[None, :],
                m_r,
                m_st,
                qk_scale,
                b_dk,
                b_dv,
                DOT_PRECISION,
            )
        tl.atomic_add(dk + o_key[:, None] * DK + o_k[None, :], b_dk * scale, mask=m_n[:, None] & m_dk[None, :])
        tl.atomic_add(dv + o_key[:, None] * DV + o_v[None, :], b_dv, mask=m_n[:, None] & m_dv[None, :])


def _meta(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, select_block: int) -> dict[str, object]:
    HQ, DK, H, DV = q.shape[-2], q.shape[-1], k.shape[-2], v.shape[-1]
    check_int32_offsets("B * T * HQ", q.numel() // DK)  # the packed query rows
    return dict(
        TUNE_T=tune_bucket(q.numel() // (HQ * DK)),
        H=H,
        G=HQ // H,
        LS=select_block,
        DK=DK,
        DV=DV,
        BK=next_power_of_2(DK),
        BV=next_power_of_2(DV),
        BN=next_power_of_2(select_block),
        DOT_PRECISION=dot_precision(q.dtype),
    )


def _kv_operands(k2: torch.Tensor, v2: torch.Tensor, meta: dict[str, object]) -> tuple[object, object, bool]:
    """K and V [TT, H, D] (packed) as the dq kernel reads them, and whether through TMA: tensor descriptors of
    [BN, 1, BD] boxes (:func:`tma_descriptor`) where both can be, else the tensors."""
    k_desc = tma_descriptor(k2, [meta["BN"], 1, meta["BK"]])
    v_desc = tma_descriptor(v2, [meta["BN"], 1, meta["BV"]])
    if k_desc is None or v_desc is None:
        return k2, v2, False
    return k_desc, v_desc, True


def _packed(*xs: torch.Tensor) -> list[torch.Tensor]:
    """[B, T, ...] -> contiguous [B * T, ...]: a dense batch is B packed sequences."""
    return [x.contiguous().view(x.shape[0] * x.shape[1], *x.shape[2:]) for x in xs]


TILE_ROWS = 16  # rows (t G + g) per program of the forward and dq kernels: the smallest tensor-core tile


def _row_tiles(
    block_idx: torch.Tensor, G: int, lengths: list[int], config: NSAConfig, rows: int = TILE_ROWS
) -> tuple[torch.Tensor, ...]:
    """Tiles of BM = ``rows`` rows (``t G + g``) and the union of the blocks their positions selected.

    block_idx [TT, H, n] int32 (packed), each row ascending and -1 padded (``ascending_blocks``). Returns cu
    [S + 1], tile_seq [NT], tile_start [NT] (first row), union [NT, H, U] (ascending, padded with -1) and
    union_len [NT, H], all int32, plus BM. When a tile is one position (BM = G, as at G = 16) its union is its
    own row of block_idx (only counted); else it is built on the device, a gather of the tile's positions (their
    indices built once per shape) and two sorts. It lets the kernels walk the blocks with a plain (pipelined)
    ``for`` loop.
    ``rows`` above ``TILE_ROWS`` lets neighbouring positions share each block's load also when G = 16
    (``scripts/selected_tiles.py`` times it): fewer loads per position, more masked tensor-core work.
    """
    if rows < TILE_ROWS or rows & (rows - 1):
        raise ValueError(f"rows must be a power of two >= {TILE_ROWS}, got {rows}")
    BM = rows
    cu, _, tile_seq, tile_start = sequence_tiles(lengths, config, BM, G, block_idx.device)
    TT, H, N = block_idx.shape
    P = BM // G if BM % G == 0 else BM // G + 2  # positions a tile of BM rows can touch
    if P == 1:  # BM = G: tile i is position i, its union its own row, already ascending (a row repeats no block)
        return cu, tile_seq, tile_start, block_idx, (block_idx >= 0).sum(-1, dtype=torch.int32), BM

    def positions() -> tuple[torch.Tensor]:  # sizes only: built once per shape (shape_metadata)
        first = tile_start.long() // G
        last = (torch.minimum(tile_start.long() + BM, cu.long()[tile_seq.long() + 1] * G) - 1) // G
        return (torch.minimum(first[:, None] + torch.arange(P, device=first.device), last[:, None]),)  # [NT, P]

    (pos,) = shape_metadata(positions, ("tile_positions", tuple(lengths), G, BM, block_idx.device))
    idx = block_idx[pos].permute(0, 2, 1, 3).reshape(-1, H, P * N)  # [NT, H, P n]
    idx = torch.sort(torch.where(idx >= 0, idx, TT), dim=-1).values  # "none" sorts last
    # a block that several positions selected: keep one
    repeat = torch.nn.functional.pad(idx[..., 1:] == idx[..., :-1], (1, 0), value=False)
    idx = torch.sort(torch.where(repeat, TT, idx), dim=-1).values
    union_len = (idx < TT).sum(-1, dtype=torch.int32)
    union = torch.where(idx < TT, idx, -1)
    return cu, tile_seq, tile_start, union, union_len, BM


def ascending_blocks(block_idx: torch.Tensor) -> torch.Tensor:
    """Any order, -1 anywhere -> each row ascending, -1 padded: the selection's own form (spec section 6),
    which the layers below ``selected_attention`` take. block_idx [..., n] -> int32 [..., n]."""
    none = torch.iinfo(torch.int32).max
    ordered = torch.sort(torch.where(block_idx >= 0, block_idx.to(torch.int32), none), dim=-1).values
    return torch.where(ordered == none, -1, ordered)


# The block-major forward runs for groups of at most BLOCK_MAJOR_MAX_GROUP heads from BLOCK_MAJOR_MIN_TOKENS packed
# tokens on: on an H100 at G = 4 it took the branch from 15.1 to 5.8 ms at 64k and 3.2 to 1.5 at 16k. At 8k the core's
# forward read slower with it (1.9 -> 2.8 ms) on a machine whose host was the limit (its device time is about 1.3 ms:
# benchmarks/README.md, "The 8k question"); the threshold stays until one machine times both.
BLOCK_MAJOR_MAX_GROUP = 4
BLOCK_MAJOR_MIN_TOKENS = 16384
FWD_CHUNK = 128  # query positions per program of the block-major forward (the interpreter: 64)


@contextlib.contextmanager
def forced_forward(method: str) -> Iterator[None]:
    """Run every selected forward inside as ``"tiles"`` or ``"blocks"`` (block-major), whatever the group and
    length (tests, sanitizer and config checks; sets the module's dispatch constants, so not thread-safe)."""
    global BLOCK_MAJOR_MAX_GROUP, BLOCK_MAJOR_MIN_TOKENS
    if method not in ("tiles", "blocks"):
        raise ValueError(f"method must be 'tiles' or 'blocks', got {method!r}")
    default = BLOCK_MAJOR_MAX_GROUP, BLOCK_MAJOR_MIN_TOKENS
    BLOCK_MAJOR_MAX_GROUP, BLOCK_MAJOR_MIN_TOKENS = (0, 1 << 40) if method == "tiles" else (1 << 20, 0)
    try:
        yield
    finally:
        BLOCK_MAJOR_MAX_GROUP, BLOCK_MAJOR_MIN_TOKENS = default


def selected_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    config: NSAConfig,
    scale: float,
    cu_seqlens: torch.Tensor | None,
    rows: int = TILE_ROWS,
    gated: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    block_major: bool | None = None,
) -> tuple[torch.Tensor, ...]:
    """q [B, T, HQ, DK], k [B, T, H, DK], v [B, T, H, DV], block_idx [B, T, H, n] (ascending, -1 padded) ->
    o [B, T, HQ, DV], lse fp32. ``rows``: query rows per program (``_row_tiles``). ``gated`` = (gates [B, T, HQ,
    3], o_cmp, o_win [B, T, HQ, DV]): the core's combine (Eq. 5) fused, returned third. ``block_major``: walk the
    blocks instead of the query tiles (default: for groups of at most ``BLOCK_MAJOR_MAX_GROUP`` heads and at
    least ``BLOCK_MAJOR_MIN_TOKENS`` tokens, at the default ``rows``)."""
    B, T, HQ, _ = q.shape
    H, DV, N = k.shape[2], v.shape[3], block_idx.shape[3]
    q2, k2, v2, idx2 = _packed(q, k, v, block_idx.to(torch.int32))
    lengths = sequence_lengths(B, T, cu_seqlens)
    o = torch.empty(B * T, HQ, DV, dtype=q.dtype, device=q.device)
    lse = torch.empty(B * T, HQ, dtype=torch.float32, device=q.device)
    gates, o_cmp, o_win = (x.contiguous() for x in gated) if gated is not None else (o, o, o)
    o_gated = torch.empty_like(o) if gated is not None else o
    meta = _meta(q, k, v, config.select_block)
    if block_major is None:
        big = B * T >= BLOCK_MAJOR_MIN_TOKENS
        block_major = HQ // H <= BLOCK_MAJOR_MAX_GROUP and big and rows == TILE_ROWS
    if block_major:
        chunk = 64 if is_interpreting() else FWD_CHUNK
        key, start, end, entry_of, block_start, block_end, NB = invert_blocks(idx2, lengths, config.select_block, chunk)
        o_part = torch.empty(B * T * HQ * N, DV, dtype=q.dtype, device=q.device)
        lse_part = torch.full((B * T * HQ * N,), float("-inf"), device=q.device)  # unlisted slots: none
        selected_fwd_block_kernel[(key.numel(),)](
            q2, k2, v2, o_part, lse_part, key, start, end, entry_of, block_start, block_end, scale, NB, N=N, **meta
        )  # fmt: skip
        selected_fwd_merge_kernel[lambda m: (triton.cdiv(B * T * meta["G"], m["BR"]), H)](
            idx2, o_part, lse_part, o, lse, gates, o_cmp, o_win, o_gated, B * T, TUNE_T=meta["TUNE_T"], H=H,
            G=meta["G"], N=N, NP=next_power_of_2(N, 2), DV=DV, BV=meta["BV"], GATED=gated is not None,
        )  # fmt: skip
    else:
        cu, tile_seq, tile_start, union, union_len, BM = _row_tiles(idx2, HQ // H, lengths, config, rows)
        selected_fwd_kernel[(tile_seq.numel(), H)](
            q2, k2, v2, idx2, o, lse, cu, tile_seq, tile_start, union, union_len, gates, o_cmp, o_win, o_gated,
            scale, N=N, NP=next_power_of_2(N, 2), U=union.shape[-1], BM=BM, GATED=gated is not None, **meta,
        )  # fmt: skip
    out = o.view(B, T, HQ, DV), lse.view(B, T, HQ)
    return (*out, o_gated.view(B, T, HQ, DV)) if gated is not None else out


def invert_blocks(
    block_idx: torch.Tensor, lengths: list[int], select_block: int, chunk: int
) -> tuple[torch.Tensor, ...]:
    """For every (kv head, block): the packed query positions that selected it, cut into chunks of ``chunk``.

    block_idx [TT, H, n] int32 (per-sequence block numbers, -1 = none). Blocks are numbered globally
    (sequence after sequence, NB in all). One stable sort on the device, no host sync. Returns
    (work_key, work_start, work_end) [W] with W an upper bound (extra chunks are empty), entry_of [TT * H * n]
    (each listed entry's flat index ``(t H + h) n + j`` into block_idx, so its packed query position is
    ``entry // (H n)``), block_start [NB], block_end [NB], all int32, and NB.
    """
    device = block_idx.device
    TT, H, N = block_idx.shape
    n_blocks = [-(-length // select_block) for length in lengths]
    NB = sum(n_blocks)

    def blocks() -> tuple[torch.Tensor, ...]:  # sizes only: built once per list of lengths (shape_metadata)
        lens = device_tensor(lengths, torch.int64, device)  # [S]
        counts = device_tensor(n_blocks, torch.int64, device)
        seq_first_token, seq_first_block = torch.cumsum(lens, 0) - lens, torch.cumsum(counts, 0) - counts
        block_seq = torch.repeat_interleave(torch.arange(len(lengths), device=device), counts, output_size=NB)
        local = torch.arange(NB, device=device) - seq_first_block[block_seq]  # [NB]
        block_start = seq_first_token[block_seq] + local * select_block
        block_end = torch.minimum(block_start + select_block, (seq_first_token + lens)[block_seq])
        token_block0 = torch.repeat_interleave(seq_first_block, lens, output_size=TT)  # [TT]
        token_blocks = torch.repeat_interleave(counts, lens, output_size=TT)  # [TT] blocks of the token's sequence
        return block_start.to(torch.int32), block_end.to(torch.int32), token_block0, token_blocks

    block_start, block_end, token_block0, token_blocks = shape_metadata(
        blocks, ("blocks", tuple(lengths), select_block, device)
    )
    idx = block_idx.long()
    heads = torch.arange(H, device=device)[None, :, None]
    listed = (idx >= 0) & (idx < token_blocks[:, None, None])  # a block past the sequence's end: none
    key = torch.where(listed, heads * NB + token_block0[:, None, None] + idx, H * NB).flatten()  # [TT * H * n]
    key_sorted, order = torch.sort(key, stable=True)
    entry_of = order.to(torch.int32)
    # entries per (head, block) from the sorted keys: torch.bincount would sync with the host to size its output
    ends = torch.searchsorted(key_sorted, torch.arange(1, H * NB + 1, device=device))  # [H * NB] keys <= b
    counts = ends - torch.nn.functional.pad(ends[:-1], (1, 0))
    n_chunks = (counts + chunk - 1) // chunk
    last_chunk = torch.cumsum(n_chunks, 0)
    W = H * NB + -(-(TT * H * N) // chunk)  # >= sum of n_chunks
    w = torch.arange(W, device=device)
    owner = torch.searchsorted(last_chunk, w, right=True).clamp_max(H * NB - 1)
    start = ends[owner] - counts[owner] + (w - (last_chunk[owner] - n_chunks[owner])) * chunk
    end = torch.where(w < last_chunk[-1], torch.minimum(start + chunk, ends[owner]), start)
    as_i32 = lambda x: x.to(torch.int32)
    return as_i32(owner), as_i32(start), as_i32(end), entry_of, block_start, block_end, NB


def selected_attention_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    block_idx: torch.Tensor,
    config: NSAConfig,
    scale: float,
    cu_seqlens: torch.Tensor | None,
    o_dot_do: torch.Tensor | None = None,
    dq_prev: torch.Tensor | None = None,
    rows: int = TILE_ROWS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of selected attention, shapes as q, k, v. ``o_dot_do`` (rowsum(o * do), fp32
    [B, T, HQ]) and ``dq_prev`` as in ``interval_attention_bwd``: precomputed by a fused caller, or None.
    ``rows``: query rows per program of the dq kernel (``_row_tiles``)."""
    B, T, HQ, _ = q.shape
    H, N = k.shape[2], block_idx.shape[3]
    meta = _meta(q, k, v, config.select_block)
    q2, k2, v2, o2, do2, idx2 = _packed(q, k, v, o, do, block_idx.to(torch.int32))
    lengths = sequence_lengths(B, T, cu_seqlens)
    cu, tile_seq, tile_start, union, union_len, BM = _row_tiles(idx2, HQ // H, lengths, config, rows)
    lse2 = lse.contiguous().view(B * T, HQ)
    delta = attn_bwd_delta(o2, do2, None, o_dot_do).view(B * T, HQ)  # [TT, HQ]
    dq = torch.empty_like(q2)
    has_prev = dq_prev is not None
    k_dq, v_dq, tma = _kv_operands(k2, v2, meta)
    selected_bwd_dq_kernel[(tile_seq.numel(), H)](
        q2, k_dq, v_dq, do2, lse2, delta, idx2, dq, _packed(dq_prev)[0] if has_prev else dq, cu, tile_seq,
        tile_start, union, union_len, scale, N=N, NP=next_power_of_2(N, 2), U=union.shape[-1], BM=BM,
        HAS_DQ_PREV=has_prev, TMA=tma, **meta,
    )  # fmt: skip
    chunk = 64 if is_interpreting() else 512
    key, start, end, entry_of, block_start, block_end, NB = invert_blocks(idx2, lengths, config.select_block, chunk)
    dk = torch.zeros(k2.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v2.shape, dtype=torch.float32, device=q.device)
    selected_bwd_dkv_kernel[(key.numel(),)](
        q2, k2, v2, do2, lse2, delta, dk, dv, key, start, end, entry_of, block_start, block_end, scale, NB, N=N,
        **meta,
    )  # fmt: skip
    return dq.view(q.shape), dk.view(k.shape).to(k.dtype), dv.view(v.shape).to(v.dtype)


def _config_of(select_block: int) -> NSAConfig:
    """The kernels only read l' from the config (the compressed sizes do not matter here)."""
    return NSAConfig(compress_block=select_block, compress_stride=select_block, select_block=select_block)


@torch.library.custom_op("nsa::selected_attention_fwd", mutates_args=())
def selected_attention_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    select_block: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Custom op around :func:`selected_attention_fwd`: o [B, T, HQ, DV], lse [B, T, HQ] fp32."""
    return selected_attention_fwd(q, k, v, block_idx, _config_of(select_block), scale, cu_seqlens)


@selected_attention_fwd_op.register_fake
def _(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    select_block: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, HQ, _ = q.shape
    return q.new_empty(B, T, HQ, v.shape[3]), q.new_empty(B, T, HQ, dtype=torch.float32)


@torch.library.custom_op("nsa::selected_attention_gated_fwd", mutates_args=())
def selected_attention_gated_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    select_block: int,
    scale: float,
    gates: torch.Tensor,
    o_cmp: torch.Tensor,
    o_win: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward with the core's combine fused (:class:`optimized.nsa.NSACore`): o_slc, lse and Eq. 5's o."""
    cfg = _config_of(select_block)
    return selected_attention_fwd(q, k, v, block_idx, cfg, scale, cu_seqlens, gated=(gates, o_cmp, o_win))


@selected_attention_gated_fwd_op.register_fake
def _(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    select_block: int,
    scale: float,
    gates: torch.Tensor,
    o_cmp: torch.Tensor,
    o_win: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T, HQ, _ = q.shape
    o = q.new_empty(B, T, HQ, v.shape[3])
    return o, q.new_empty(B, T, HQ, dtype=torch.float32), torch.empty_like(o)


@torch.library.custom_op("nsa::selected_attention_bwd", mutates_args=())
def selected_attention_bwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    block_idx: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    select_block: int,
    scale: float,
    o_dot_do: torch.Tensor | None = None,
    dq_prev: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Custom op around :func:`selected_attention_bwd`: (dq, dk, dv)."""
    return selected_attention_bwd(
        q, k, v, o, lse, do, block_idx, _config_of(select_block), scale, cu_seqlens, o_dot_do, dq_prev
    )


@selected_attention_bwd_op.register_fake
def _(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    block_idx: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    select_block: int,
    scale: float,
    o_dot_do: torch.Tensor | None = None,
    dq_prev: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class SelectedAttention(torch.autograd.Function):
    """Differentiable selected attention over the custom ops; no gradient for the block indices, which must be
    ascending per row and -1 padded (the selection's output, or ``ascending_blocks``)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        block_idx: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        select_block: int,
        scale: float,
    ) -> torch.Tensor:
        o, lse = torch.ops.nsa.selected_attention_fwd(q, k, v, block_idx, cu_seqlens, select_block, scale)
        ctx.save_for_backward(q, k, v, o, lse, block_idx, cu_seqlens)
        ctx.select_block, ctx.scale = select_block, scale
        return o

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, do: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, o, lse, block_idx, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = torch.ops.nsa.selected_attention_bwd(
            q, k, v, o, lse, do, block_idx, cu_seqlens, ctx.select_block, ctx.scale
        )
        return dq, dk, dv, None, None, None, None


def selected_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    config: NSAConfig,
    *,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over the keys of the selected blocks, ``s <= t`` (Eq. 12).

    q [B, T, HQ, DK], k [B, T, H, DK], v [B, T, H, DV], block_idx [B, T, H, S] (-1 = none, any order, no
    duplicates; with ``cu_seqlens``, counted from each sequence's first token). Returns o [B, T, HQ, DV].
    """
    config = check_config(config)
    B, T, _, H, DK, _ = check_qkv(q, k, v)
    check_dim("k", k, 1, T, "T, as q")
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_kernel_dtype(name, x)
    scale = check_scale(scale, DK)
    positions = None  # of each token inside its sequence
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, T)
        cu, t, seq = token_sequences(T, cu_seqlens, q.device)
        positions = t - cu[seq]
    check_block_idx(block_idx, B, T, H, config, q.device, positions)
    return SelectedAttention.apply(q, k, v, ascending_blocks(block_idx), cu_seqlens, config.select_block, scale)
