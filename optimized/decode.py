r"""Batched decoding with a pre-allocated KV cache: one token per sequence per step, in four launches.

A decode step for query position $t$ (spec section 8) reads the $T_C(t + 1)$ compressed tokens, the
$n$ selected blocks of $l'$ tokens and the last $w$ tokens, and must equal the parallel forward at $t$.
Sequences of one batch may have different lengths: ``DecodeCache.lengths`` lives on the device, and a
step never synchronises with the host, so ``append`` + ``decode_attention`` can be captured in a CUDA
graph (every grid and buffer size depends only on the cache's shape, never on the lengths).

The cache (per layer) holds, for every sequence of the batch:

* ``k_slc, v_slc [B, max_len, H, D]``: the selection branch's raw keys and values, all tokens;
* ``k_win, v_win [B, W, H, D]``: the window branch's last $W = \min(w, \text{max\_len})$ tokens, a ring
  indexed by $s \bmod W$;
* ``k_tail, v_tail [B, l, H, D]``: the compression branch's last $l$ raw tokens, a ring indexed by
  $s \bmod l$, from which the next compressed block is formed;
* ``k_cmp, v_cmp [B, T_C(\text{max\_len}) + 1, H, D]``: the compressed blocks so far (the extra row is a
  scratch slot that steps completing no block write to, so that no step branches on the host);
* a workspace of fp32 partials and scores for the step's kernels, allocated on the first step.

A new compressed block completes when token $s$ arrives with $s + 1 \ge l$ and $(s + 1 - l) \bmod d = 0$.

**Splitting.** At batch 1 there are only $H$ (kv head) groups, far fewer than the GPU's SMs, so every
pass is split over its keys, flash-decoding style: each program writes a partial softmax state (max,
sum, accumulator) and a later kernel merges them. The split sizes are fixed per cache from $B$, $H$,
``max_len`` and the SM count, so grids never depend on the lengths; splits past a sequence's length
write neutral partials ($m = -\infty$, $\ell = 0$). The compressed pass takes one wave of programs (about
3 per SM: at batch 1 and 64k, 64 splits of one tile for each of the 4 groups; at batch 32, 3 splits of
22 tiles), the sparse pass lengthens its splits (``split_blocks``) while it keeps at least 2 programs per
SM (batch 1: 1 block per split, 24 splits per group; batch 32: 8 blocks, 3 splits). Fewer, longer splits
mean fewer partials to write and merge; at batch 32 these sizes were the fastest measured.

The compressed keys are cut into *tiles* of $16\,l'/d$ keys: the keys whose strides start in 16
consecutive selection blocks (the cache's ``tile_blocks``, 16 by default). Because $l \le l'$, selection
block $j$ overlaps the compressed blocks $j\,l'/d - l/d < i < (j + 1)\,l'/d$ (Eq. 9), i.e. its own tile's
keys plus the $l/d - 1$ keys before it (the *halo*). So one tile maps its probabilities to its own
selection blocks without any other tile, except for the halo, whose scores it recomputes (a 16-key dot,
from L2). The scores therefore never leave the pass as $[B, H_Q, T_C]$ (at batch 32 and 64k, 34 MB written
and read back, 18% on top of the 369 MB of keys and values): a tile writes its blocks' scores per head,
$[B, H_Q, T_C\,d/l']$ (a quarter of that), scaled by the tile's own maximum.

One step is four kernels:

1. ``decode_compressed_kernel``, grid $(B, H, S_C)$: split $c$ walks its tiles for the $G$ query heads of a
   group: online softmax over the tile's keys (partial $m, \ell, acc$ of the compressed branch), and per head
   $g$ and selection block $j$ of the tile $u_{gj} = \sum_i w_{ij}\, 2^{s_{gi} - r_g}$ (Eq. 8-9 before the
   normalisation), with the tile's maximum score $r_g$.
2. ``decode_select_kernel``, grid $(B, H)$, or $(B, H + H_Q)$ when the cache has ``PRE_MERGE_SPLITS`` or more
   compressed splits (batch 1 at long contexts; the extra programs merge each query head's compressed
   partials into one row while the selection runs): merges the partial log-sum-exps, finishes Eq. 8-10
   $p_j = \sum_g 2^{r_g - \mathrm{lse}_g}\, u_{gj}$ and picks the top $n$ with the forced blocks (Eq. 11) by one
   bitonic ``tl.topk`` over the row of $\lceil (t + 1) / l' \rceil$ candidates (1024 at 64k), packed as
   (score, index) keys. The row stays in registers, and the loads do not wait for the sequence's length:
   the entries past its candidates are masked out after loading.
3. ``decode_sparse_kernel``, grid $(B, H, S_S)$: each split attends to ``split_blocks`` selected blocks or
   ``split_blocks`` $\cdot\, l'$ keys of the window, writing a partial.
4. ``decode_combine_kernel``, grid $(B, H_Q, B_V / C)$ ($B_V$: $D_V$ rounded up to a power of two, $C$:
   ``COMBINE_COLUMNS``, at most $B_V$): merges the partials of each branch per query head (the compressed
   branch's already merged row, with the pre-merge) and applies the gates (Eq. 5), for $C$ value columns.

The selection cannot fold into the combine (the sparse pass needs its block indices first), so four
launches is the minimum for this dependency chain without inter-program synchronisation or redundant work
(docs/decoding.md lists the options). Measured and rejected on an H100 (tenth session, one call): the select
folded into every selected split of the sparse pass (three launches: 18.3-18.6 against 18.3-18.4 us at batch 1
and 64k, 164.3 against 162.5 us at batch 32) and programmatic dependent launch (18.6 against 18.3 us; 163 against
162.5). At batch 1 the step is latency: on an H200 at 64k the four kernels take 5.8, 4.6, 3.4 and 4.1 us
(batch 32: 98.9, 6.6, 30.5 and 9.0 us).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from reference._checks import check_config, check_scale, check_tensor
from reference.config import NSAConfig

from ._common import (
    LOG2E,
    attn_fwd_step,
    attn_fwd_update,
    check_kernel_dtype,
    dot_precision,
    next_power_of_2,
    overlap_strides,
)

Compress = Callable[[torch.Tensor], torch.Tensor]  # phi: [..., l, D] -> [..., D], as reference/compression.py

TILE_BLOCKS = 16  # selection blocks per tile of the compressed pass (tl.dot needs >= 16 columns)
CMP_PROGRAMS_PER_SM = 3  # the compressed pass: one wave of programs (about 3 fit on an SM at D = 128)
SPARSE_PROGRAMS_PER_SM = 2  # the sparse pass: at least this many programs per SM
COMBINE_COLUMNS = 64  # value columns per program of the combine (fewer: more programs, each merging a slice)
# from this many compressed splits on, spare programs of the select kernel merge them (None: never). Both timed
# with scripts/decode_launch.py on the H100 at 64k (benchmarks/README.md, sixteenth session)
PRE_MERGE_SPLITS: int | None = 16
SELECT_ENTRIES = 32768  # the select kernel's sel entries in registers at once (128 a thread at 8 warps)
# Launch options per kernel (no autotuning: a step takes microseconds and its grids are fixed per cache;
# chosen from per-kernel timings at 64k, batch 1 and 32, on an H200).
LAUNCH: dict = {
    "compressed": {"num_warps": 4, "num_stages": 2},
    "select": {"num_warps": 8, "num_stages": 1},
    "sparse": {"num_warps": 4, "num_stages": 3},
    "combine": {"num_warps": 4, "num_stages": 1},
}


@triton.jit
def decode_compressed_kernel(
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
):
    """Split c of the compressed pass for sequence b, kv head h: tiles [c * TPS, (c + 1) * TPS).

    q [B, HQ, DK]; k_cmp/v_cmp [B, TCM, H, D]; lengths [B] int32 (the query is token lengths[b] - 1).
    Tile u holds the compressed keys [u * BC, (u + 1) * BC), BC = BJ * LS / D, i.e. those starting in
    selection blocks [u * BJ, (u + 1) * BJ). Writes the split's partial cmp_m / cmp_l [B, HQ, NC] (log2
    units) and cmp_acc [B, HQ, NC, BV], and per tile sel [B, HQ, NT * BJ] (the tile's blocks' overlap sums of
    2^(s - r), Eq. 8-9) and sel_ref [B, HQ, NT] (r, the tile's max score, log2 units; 0 if it has none).
    """
    i_b, i_h, i_c = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    HQ: tl.constexpr = H * G
    R: tl.constexpr = LS // D  # compressed keys per selection block (strides)
    BC: tl.constexpr = BJ * R  # keys per tile
    HALO: tl.constexpr = L // D - 1  # keys before a tile that overlap its first block
    qk_scale = scale * LOG2E
    t = tl.load(lengths + i_b) - 1
    TC = tl.where(t + 1 >= L, (t + 1 - L) // D + 1, 0)  # complete blocks: all visible to t (spec 3)
    NS = t // LS + 1  # candidate selection blocks j <= t // l'
    o_g, o_k, o_v = tl.arange(0, BG), tl.arange(0, BK), tl.arange(0, BV)
    o_c, o_j, o_hc = tl.arange(0, BC), tl.arange(0, BJ), tl.arange(0, BH) - BH
    m_g, m_dk, m_dv = o_g < G, o_k < DK, o_v < DV
    o_row = i_b * HQ + i_h * G + o_g  # [BG]
    b_q = tl.load(q + o_row[:, None] * DK + o_k[None, :], mask=m_g[:, None] & m_dk[None, :], other=0.0)  # [BG, BK]

    # Eq. 9, the same for every tile: key c of the tile (tokens [c d, c d + l) from the tile's first token,
    # halo keys c < 0) against the tile's selection block j (tokens [j l', (j + 1) l')).
    b_w = overlap_strides(o_c[:, None], o_j[None, :], L, D, LS).to(tl.float32)  # [BC, BJ]
    b_wh = overlap_strides(o_hc[:, None], o_j[None, :], L, D, LS).to(tl.float32)  # [BH, BJ], column 0 only

    b_m = tl.full([BG], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BG], dtype=tl.float32)
    b_acc = tl.zeros([BG, BV], dtype=tl.float32)
    u_end = tl.minimum(i_c * TPS + TPS, tl.cdiv(NS, BJ))  # tiles past the candidate blocks hold no key
    for i_u in range(i_c * TPS, u_end):
        o_i, o_ih = i_u * BC + o_c, i_u * BC + o_hc  # [BC] the tile's keys, [BH] its halo (the l/d - 1 keys
        m_i, m_ih = o_i < TC, (o_hc >= -HALO) & (o_ih >= 0) & (o_ih < TC)  # before it, which overlap block 0)
        o_key, o_keyh = (i_b * TCM + o_i) * H + i_h, (i_b * TCM + o_ih) * H + i_h
        # the three loads first, so that they are in flight together
        b_k = tl.load(k_cmp + o_key[None, :] * DK + o_k[:, None], mask=m_dk[:, None] & m_i[None, :], other=0.0)
        b_kh = tl.load(k_cmp + o_keyh[None, :] * DK + o_k[:, None], mask=m_dk[:, None] & m_ih[None, :], other=0.0)
        b_v = tl.load(v_cmp + o_key[:, None] * DV + o_v[None, :], mask=m_i[:, None] & m_dv[None, :], other=0.0)
        b_s = tl.dot(b_q, b_k, input_precision=DOT_PRECISION) * qk_scale  # [BG, BC]
        b_s = tl.where(m_g[:, None] & m_i[None, :], b_s, float("-inf"))
        b_sh = tl.dot(b_q, b_kh, input_precision=DOT_PRECISION) * qk_scale  # [BG, BH]
        b_sh = tl.where(m_g[:, None] & m_ih[None, :], b_sh, float("-inf"))
        b_m, b_l, b_acc = attn_fwd_update(b_s, b_v, b_m, b_l, b_acc, DOT_PRECISION)
        # Eq. 8-9 relative to the tile's max r (<= lse, so the select kernel's 2^(r - lse) <= 1)
        b_r = tl.maximum(tl.max(b_s, 1), tl.max(b_sh, 1))  # [BG]
        b_r = tl.where(b_r == float("-inf"), 0.0, b_r)
        b_u = tl.dot(tl.exp2(b_s - b_r[:, None]), b_w, input_precision="ieee")  # [BG, BJ]
        b_u += tl.dot(tl.exp2(b_sh - b_r[:, None]), b_wh, input_precision="ieee")
        tl.store(sel + o_row[:, None] * (NT * BJ) + i_u * BJ + o_j[None, :], b_u, mask=m_g[:, None])
        tl.store(sel_ref + o_row * NT + i_u, b_r, mask=m_g)

    o_part = o_row * NC + i_c  # [BG]
    tl.store(cmp_m + o_part, b_m, mask=m_g)
    tl.store(cmp_l + o_part, b_l, mask=m_g)
    tl.store(cmp_acc + o_part[:, None] * BV + o_v[None, :], b_acc, mask=m_g[:, None])


@triton.jit
def decode_select_kernel(
    lengths,
    cmp_m,
    cmp_l,
    sel,
    sel_ref,
    block_idx,
    cmp_acc,
    cmp_o,
    NT,
    H: tl.constexpr,
    G: tl.constexpr,
    LS: tl.constexpr,
    N_SEL: tl.constexpr,
    N_INIT: tl.constexpr,
    N_LOCAL: tl.constexpr,
    NC: tl.constexpr,
    BG: tl.constexpr,
    BGC: tl.constexpr,
    BP: tl.constexpr,
    BJ: tl.constexpr,
    NSP: tl.constexpr,
    BSEL: tl.constexpr,
    BV: tl.constexpr,
    PRE_MERGE: tl.constexpr,
):
    """Selection scores (Eq. 8-10) and top-n (Eq. 11) of the newest token of sequence b, kv head h < H.

    Reads the compressed pass's cmp_m / cmp_l [B, HQ, NC], sel [B, HQ, NT * BJ] and sel_ref [B, HQ, NT]
    (NT * BJ <= NSP); writes block_idx [B, H, N_SEL] int32 (ascending, -1 padded). The score row [NSP] never
    leaves registers; the heads are summed BGC at a time (BG at once unless NSP is large).
    With PRE_MERGE the grid is (B, H + HQ) and program (b, H + q) merges query head q's compressed partials
    cmp_acc [B, HQ, NC, BV] into cmp_o [B, HQ, BV] (the branch's output, fp32), on the SMs the selection leaves idle.
    """
    i_b, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    HQ: tl.constexpr = H * G
    if PRE_MERGE:
        if i_h >= H:
            row = i_b * HQ + i_h - H
            b_o = merge_splits(cmp_m + row * NC, cmp_l + row * NC, cmp_acc + row * NC * BV, 0, NC, BP, BV, BV)
            tl.store(cmp_o + row * BV + tl.arange(0, BV), b_o)
            return
    NT2: tl.constexpr = NSP // BJ  # tiles of the padded row
    t = tl.load(lengths + i_b) - 1
    NS = t // LS + 1  # candidate blocks j <= t // l'; the compressed pass wrote the tiles u < cdiv(NS, BJ)
    o_gc, o_p, o_u, o_s = tl.arange(0, BGC), tl.arange(0, BP), tl.arange(0, NT2), tl.arange(0, NSP)
    m_u, m_s = o_u < NT, o_s < NT * BJ  # [NT2], [NSP]: within the buffers

    b_p = tl.zeros([NT2, BJ], dtype=tl.float32)  # [NT2, BJ] group scores of blocks u * BJ + j
    for g0 in range(0, BG, BGC):
        m_g = g0 + o_gc < G
        o_row = i_b * HQ + i_h * G + g0 + o_gc  # [BGC]
        # masked by the buffers' bounds only, so that no load waits for lengths; the entries this step did
        # not write (stale, or NaN in a fresh workspace) are replaced below, before any arithmetic
        b_r = tl.load(sel_ref + o_row[:, None] * NT + o_u[None, :], mask=m_g[:, None] & m_u[None, :], other=0.0)
        b_u = tl.load(sel + o_row[:, None] * (NT * BJ) + o_s[None, :], mask=m_g[:, None] & m_s[None, :], other=0.0)
        # a fence for ptxas, which would otherwise hoist the cmp loads and wait for their reduction before issuing
        # the loads above: two memory round trips instead of one
        tl.debug_barrier()
        # lse of each head (log2 units) from the splits' partial (m, l)
        b_m = tl.full([BGC], float("-inf"), dtype=tl.float32)
        b_l = tl.zeros([BGC], dtype=tl.float32)
        for p0 in range(0, NC, BP):
            m_p = m_g[:, None] & (p0 + o_p < NC)[None, :]  # [BGC, BP]
            b_mp = tl.load(cmp_m + o_row[:, None] * NC + p0 + o_p[None, :], mask=m_p, other=float("-inf"))
            b_lp = tl.load(cmp_l + o_row[:, None] * NC + p0 + o_p[None, :], mask=m_p, other=0.0)
            b_m_new = tl.maximum(b_m, tl.max(b_mp, 1))
            b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
            b_l = b_l * tl.exp2(b_m - b_m_safe) + tl.sum(b_lp * tl.exp2(b_mp - b_m_safe[:, None]), 1)
            b_m = b_m_new
        b_lse2 = tl.where(b_l > 0, b_m + tl.log2(tl.where(b_l > 0, b_l, 1.0)), 0.0)  # no key: u = 0, r = 0
        b_r = tl.where((o_u * BJ < NS)[None, :], b_r, float("-inf"))  # [BGC, NT2] unwritten tiles weigh 0
        b_u = tl.where((o_s < NS)[None, :], b_u, 0.0)  # [BGC, NSP]
        # Eq. 8-10: p_slc[j] = sum_g 2^(r_gu - lse_g) u_gj, with r of the tile u that holds block j
        b_w = tl.exp2(b_r - b_lse2[:, None])  # [BGC, NT2]
        b_p += tl.sum(b_w[:, :, None] * tl.reshape(b_u, [BGC, NT2, BJ]), 0)

    # Eq. 11: forced blocks first, then the highest scores, ties to the lower index.
    b_row = tl.reshape(b_p, [NSP])  # [NSP], 0 past the candidates
    cur = t // LS
    m_forced = (o_s <= cur) & ((o_s < N_INIT) | (o_s > cur - N_LOCAL))
    # One bitonic top-k over keys (score bits << 32 | NSP - 1 - j): for scores >= 0 (and +inf) the bits of an
    # fp32 order like its value, so the keys order like (score, -j); non-candidates get -1. (Measured faster
    # than n rounds of arg-max.)
    b_row = tl.where(m_forced, float("inf"), b_row + 0.0)  # + 0.0: no -0.0
    b_key = (b_row.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (NSP - 1 - o_s).to(tl.int64)
    b_top = tl.topk(tl.where(o_s <= cur, b_key, -1), BSEL)  # [BSEL] descending
    o_sel = tl.arange(0, BSEL)
    b_idx = NSP - 1 - (b_top & 0xFFFFFFFF).to(tl.int32)
    b_sel = tl.where((o_sel < N_SEL) & (b_top >= 0), b_idx, NSP)
    b_sel = tl.sort(b_sel, 0)  # ascending; the untaken (NSP) sort to the end
    b_sel = tl.where(b_sel == NSP, -1, b_sel)
    tl.store(block_idx + (i_b * H + i_h) * N_SEL + o_sel, b_sel, mask=o_sel < N_SEL)


@triton.jit
def decode_sparse_kernel(
    q,
    k_slc,
    v_slc,
    k_win,
    v_win,
    lengths,
    block_idx,
    part_m,
    part_l,
    part_acc,
    scale,
    MAXLEN,
    WR,
    H: tl.constexpr,
    G: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    LS: tl.constexpr,
    W: tl.constexpr,
    N_SEL: tl.constexpr,
    SB: tl.constexpr,
    NSS: tl.constexpr,
    NSPLIT: tl.constexpr,
    BG: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One split of the selected or window branch: a partial (max, sum, acc) of the group's G heads.

    Split p < NSS reads selected blocks block_idx[b, h, p * SB : (p + 1) * SB]; split p >= NSS reads the
    window's keys t - w + 1 + (p - NSS) * SB * BN ... + SB * BN (ring index s mod WR). Writes
    part_m / part_l [B, HQ, NSPLIT] and part_acc [B, HQ, NSPLIT, BV], fp32.
    """
    i_b, i_h, i_p = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    HQ: tl.constexpr = H * G
    t = tl.load(lengths + i_b) - 1
    o_g, o_k, o_v, o_n = tl.arange(0, BG), tl.arange(0, BK), tl.arange(0, BV), tl.arange(0, BN)
    m_g, m_dk, m_dv = o_g < G, o_k < DK, o_v < DV
    o_row = i_b * HQ + i_h * G + o_g  # [BG]
    b_q = tl.load(q + o_row[:, None] * DK + o_k[None, :], mask=m_g[:, None] & m_dk[None, :], other=0.0)  # [BG, BK]
    b_m = tl.full([BG], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BG], dtype=tl.float32)
    b_acc = tl.zeros([BG, BV], dtype=tl.float32)
    for i_s in range(SB):
        if i_p < NSS:
            i_n = i_p * SB + i_s  # the i_n-th selected block
            blk = tl.load(block_idx + (i_b * H + i_h) * N_SEL + i_n, mask=i_n < N_SEL, other=-1)
            o_s = blk * LS + o_n  # [BN] tokens of the selected block (Eq. 12)
            m_n = (blk >= 0) & (o_n < LS) & (o_s <= t)
            o_key = (i_b * MAXLEN + o_s) * H + i_h
            p_k, p_v = k_slc + o_key[None, :] * DK + o_k[:, None], v_slc + o_key[:, None] * DV + o_v[None, :]
        else:
            o_w = ((i_p - NSS) * SB + i_s) * BN + o_n  # [BN] position in the window
            o_s = t - W + 1 + o_w  # window keys t - w < s <= t
            m_n = (o_s >= 0) & (o_w < W)
            o_key = (i_b * WR + o_s % WR) * H + i_h
            p_k, p_v = k_win + o_key[None, :] * DK + o_k[:, None], v_win + o_key[:, None] * DV + o_v[None, :]
        b_m, b_l, b_acc = attn_fwd_step(
            b_q,
            p_k,
            p_v,
            m_dk[:, None] & m_n[None, :],
            m_n[:, None] & m_dv[None, :],
            m_g[:, None] & m_n[None, :],
            scale * LOG2E,
            b_m,
            b_l,
            b_acc,
            DOT_PRECISION,
        )
    o_part = o_row * NSPLIT + i_p  # [BG]
    tl.store(part_m + o_part, b_m, mask=m_g)
    tl.store(part_l + o_part, b_l, mask=m_g)
    tl.store(part_acc + o_part[:, None] * BV + o_v[None, :], b_acc, mask=m_g[:, None])


@triton.jit
def merge_splits(
    p_m, p_l, p_acc, P0: tl.constexpr, P1: tl.constexpr, BP: tl.constexpr, BV: tl.constexpr, SV: tl.constexpr
):
    """Merge the partial softmax states of splits [P0, P1) of one query row: returns b_o [BV] fp32.

    p_m / p_l point at the row's split maxima (log2 units) and sums, p_acc at BV columns of its [splits, SV]
    accumulators. Lane i of a tile of BP splits keeps its own running state; the BP lanes are merged at the
    end. The loop is unrolled, so that all the loads are in flight together.
    """
    o_p, o_v = tl.arange(0, BP), tl.arange(0, BV)
    b_m = tl.full([BP], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BP], dtype=tl.float32)
    b_acc = tl.zeros([BP, BV], dtype=tl.float32)
    for p0 in tl.static_range(P0, P1, BP):
        o_pp = p0 + o_p  # [BP]
        m_p = o_pp < P1
        b_mp = tl.load(p_m + o_pp, mask=m_p, other=float("-inf"))
        b_m_new = tl.maximum(b_m, b_mp)
        b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_a, b_ap = tl.exp2(b_m - b_m_safe), tl.exp2(b_mp - b_m_safe)  # [BP]
        b_l = b_l * b_a + tl.load(p_l + o_pp, mask=m_p, other=0.0) * b_ap
        b_accp = tl.load(p_acc + o_pp[:, None] * SV + o_v[None, :], mask=m_p[:, None], other=0.0)  # [BP, BV]
        b_acc = b_acc * b_a[:, None] + b_accp * b_ap[:, None]
        b_m = b_m_new
    b_mx = tl.max(b_m, 0)
    b_w = tl.exp2(b_m - tl.where(b_mx == float("-inf"), 0.0, b_mx))  # [BP]
    b_lsum = tl.sum(b_l * b_w, 0)
    return tl.sum(b_acc * b_w[:, None], 0) / tl.where(b_lsum > 0, b_lsum, 1.0)  # 0 for a row that saw no key


@triton.jit
def decode_combine_kernel(
    cmp_m,
    cmp_l,
    cmp_acc,
    cmp_o,
    part_m,
    part_l,
    part_acc,
    gates,
    o,
    HQ: tl.constexpr,
    DV: tl.constexpr,
    NC: tl.constexpr,
    NSS: tl.constexpr,
    NSPLIT: tl.constexpr,
    BPC: tl.constexpr,
    BPS: tl.constexpr,
    BPW: tl.constexpr,
    BV: tl.constexpr,
    BVC: tl.constexpr,
    PRE_MERGE: tl.constexpr,
):
    """o [B, HQ, DV] = g_cmp o_cmp + g_slc o_slc + g_win o_win (Eq. 5) for query head (b, hq), columns
    [c BVC, (c + 1) BVC) of the BV; gates [B, HQ, 3]. With PRE_MERGE o_cmp is read from cmp_o [B, HQ, BV]
    (merged by the select kernel), else merged here from the compressed partials."""
    i_b, i_q, i_c = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    row = i_b * HQ + i_q
    o_v = i_c * BVC + tl.arange(0, BVC)  # [BVC]
    if PRE_MERGE:
        b_cmp = tl.load(cmp_o + row * BV + o_v)  # [BVC]
    else:
        p_acc = cmp_acc + row * NC * BV + i_c * BVC
        b_cmp = merge_splits(cmp_m + row * NC, cmp_l + row * NC, p_acc, 0, NC, BPC, BVC, BV)  # [BVC]
    p_m, p_l, p_acc = part_m + row * NSPLIT, part_l + row * NSPLIT, part_acc + row * NSPLIT * BV + i_c * BVC
    b_slc = merge_splits(p_m, p_l, p_acc, 0, NSS, BPS, BVC, BV)
    b_win = merge_splits(p_m, p_l, p_acc, NSS, NSPLIT, BPW, BVC, BV)
    b_g0 = tl.load(gates + row * 3).to(tl.float32)
    b_g1 = tl.load(gates + row * 3 + 1).to(tl.float32)
    b_g2 = tl.load(gates + row * 3 + 2).to(tl.float32)
    b_o = b_g0 * b_cmp + b_g1 * b_slc + b_g2 * b_win
    tl.store(o + row * DV + o_v, b_o.to(o.dtype.element_ty), mask=o_v < DV)


def mean_compress(x: torch.Tensor) -> torch.Tensor:
    """The parameter-free phi: [..., l, D] -> [..., D]."""
    return x.mean(dim=-2)


def _pow2_at_most(n: int, cap: int) -> int:
    return min(cap, triton.next_power_of_2(max(1, n)))


class DecodeCache:
    """Pre-allocated NSA KV cache of one layer for a batch of sequences (spec section 8).

    ``phi_k`` / ``phi_v`` map raw blocks [..., l, D] to compressed tokens [..., D] (default: mean
    pooling; pass a trained layer's compression modules). Unlike ``reference.NSACache``, which grows,
    this cache is allocated once for ``max_len`` tokens and its sequences may have different lengths.

    ``split_tiles`` (tiles of the compressed pass per split) and ``split_blocks`` (selected blocks, or
    ``l'``-key pieces of the window, per split of the sparse pass) default to sizes that give about four
    programs per SM; tests force them small to exercise the merges. ``tile_blocks`` (a power of two >= 16,
    default ``TILE_BLOCKS``): selection blocks per tile of the compressed pass, whose keys one loop
    iteration loads (``scripts/decode_launch.py --tile-blocks`` times larger tiles). ``pre_merge``: whether a
    step's select kernel also merges the compressed partials (``PRE_MERGE_SPLITS`` when the cache was built).
    """

    def __init__(
        self,
        batch_size: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        v_head_dim: int | None = None,
        config: NSAConfig | None = None,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cuda",
        phi_k: Compress = mean_compress,
        phi_v: Compress = mean_compress,
        split_tiles: int | None = None,
        split_blocks: int | None = None,
        tile_blocks: int = TILE_BLOCKS,
    ) -> None:
        config = check_config(config if config is not None else NSAConfig())
        for name, value in (("batch_size", batch_size), ("max_len", max_len), ("num_kv_heads", num_kv_heads)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, value in (("split_tiles", split_tiles), ("split_blocks", split_blocks)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or a positive int, got {value!r}")
        if not isinstance(tile_blocks, int) or tile_blocks < TILE_BLOCKS or tile_blocks & (tile_blocks - 1):
            raise ValueError(f"tile_blocks must be a power of two >= {TILE_BLOCKS}, got {tile_blocks!r}")
        DK, DV = head_dim, v_head_dim if v_head_dim is not None else head_dim
        if not 16 <= DK <= 256 or not 16 <= DV <= 256:
            raise ValueError(f"head dims must be in [16, 256] for the kernels, got head_dim={DK}, v_head_dim={DV}")
        self.config, self.max_len = config, max_len
        self.phi_k, self.phi_v = phi_k, phi_v
        B, H, l = batch_size, num_kv_heads, config.compress_block
        self.window_len = min(config.window, max_len)
        alloc = lambda n, dim: torch.zeros(B, n, H, dim, dtype=dtype, device=device)
        self.k_slc, self.v_slc = alloc(max_len, DK), alloc(max_len, DV)
        self.k_win, self.v_win = alloc(self.window_len, DK), alloc(self.window_len, DV)
        self.k_tail, self.v_tail = alloc(l, DK), alloc(l, DV)
        self.k_cmp, self.v_cmp = (
            alloc(config.num_compressed(max_len) + 1, DK),
            alloc(config.num_compressed(max_len) + 1, DV),
        )
        self.lengths = torch.zeros(B, dtype=torch.int32, device=device)
        self._longest = 0  # host-side bound on lengths (every step adds one token to every sequence)
        self._batch = torch.arange(B, device=device)

        # split sizes: fixed per cache (host-known), so a step's grids never depend on the lengths
        dev = self.lengths.device
        sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 132
        self.tile_blocks = tile_blocks
        self.num_tiles = triton.cdiv(config.num_select_blocks(max_len), tile_blocks)
        if split_tiles is None:  # as many splits as fill one wave, at most one tile each
            split_tiles = triton.cdiv(self.num_tiles, min(self.num_tiles, max(1, CMP_PROGRAMS_PER_SM * sms // (B * H))))
        self.split_tiles = split_tiles
        self.num_cmp_splits = triton.cdiv(self.num_tiles, split_tiles)
        # the select kernel's spare programs merge the compressed partials (PRE_MERGE_SPLITS when the cache is built)
        self.pre_merge = PRE_MERGE_SPLITS is not None and self.num_cmp_splits >= PRE_MERGE_SPLITS
        if split_blocks is None:  # fewer, longer splits (fewer partials to write and merge) while the GPU stays full
            split_blocks, target = 1, SPARSE_PROGRAMS_PER_SM * sms
            while 2 * split_blocks <= config.num_selected and B * H * self._sparse_splits(2 * split_blocks) >= target:
                split_blocks *= 2
        self.split_blocks = split_blocks
        self.num_sparse_splits = self._sparse_splits(split_blocks)
        self._workspaces: dict[int, dict[str, torch.Tensor]] = {}

    def _sparse_splits(self, split_blocks: int) -> int:
        """Splits of the sparse pass: the selected blocks', then the window's."""
        c = self.config
        piece = split_blocks * next_power_of_2(c.select_block)
        return triton.cdiv(c.num_selected, split_blocks) + triton.cdiv(c.window, piece)

    def workspace(self, num_q_heads: int) -> dict[str, torch.Tensor]:
        """The fp32 buffers a step's kernels pass to each other, allocated on the first step (per HQ)."""
        if num_q_heads not in self._workspaces:
            B, _, _, DV = self.v_slc.shape
            HQ, BV, NC, NP = num_q_heads, next_power_of_2(DV), self.num_cmp_splits, self.num_sparse_splits
            empty = lambda *shape: torch.empty(*shape, dtype=torch.float32, device=self.lengths.device)
            ws = {
                "cmp_m": empty(B, HQ, NC),  # compressed pass: partial (max, sum, acc) per split
                "cmp_l": empty(B, HQ, NC),
                "cmp_acc": empty(B, HQ, NC, BV),
                "sel": empty(B, HQ, self.num_tiles * self.tile_blocks),  # per head and selection block, Eq. 8-9
                "sel_ref": empty(B, HQ, self.num_tiles),  # per head and tile: the max score u is relative to
                "part_m": empty(B, HQ, NP),  # sparse pass: partial (max, sum, acc) per split
                "part_l": empty(B, HQ, NP),
                "part_acc": empty(B, HQ, NP, BV),
            }
            if self.pre_merge:
                ws["cmp_o"] = empty(B, HQ, BV)  # the compressed branch's output, merged by the select kernel
            self._workspaces[num_q_heads] = ws
        return self._workspaces[num_q_heads]

    @property
    def scratch_block(self) -> int:
        """The compressed row that steps completing no block write to."""
        return self.k_cmp.shape[1] - 1

    def prefill(
        self,
        k_cmp_raw: torch.Tensor,
        v_cmp_raw: torch.Tensor,
        k_slc: torch.Tensor,
        v_slc: torch.Tensor,
        k_win: torch.Tensor,
        v_win: torch.Tensor,
        lengths: list[int],
    ) -> None:
        """Fill the cache from right-padded prompts [B, P, H, D] of the given lengths (>= 1 each)."""
        B = self.lengths.shape[0]
        if len(lengths) != B or any(not 1 <= n <= min(self.max_len, k_slc.shape[1]) for n in lengths):
            raise ValueError(f"lengths must hold {B} prompt lengths in [1, min(max_len, P)], got {lengths}")
        l, d, W = self.config.compress_block, self.config.compress_stride, self.window_len
        for b, n in enumerate(lengths):
            self.k_slc[b, :n], self.v_slc[b, :n] = k_slc[b, :n], v_slc[b, :n]
            s = torch.arange(max(0, n - W), n)
            self.k_win[b, s % W], self.v_win[b, s % W] = k_win[b, s], v_win[b, s]
            s = torch.arange(max(0, n - l), n)
            self.k_tail[b, s % l], self.v_tail[b, s % l] = k_cmp_raw[b, s], v_cmp_raw[b, s]
            tc = self.config.num_compressed(n)
            if tc:
                blocks = torch.arange(tc)[:, None] * d + torch.arange(l)  # [TC, l] tokens of each block (Eq. 7)
                self.k_cmp[b, :tc] = self.phi_k(k_cmp_raw[b, blocks].transpose(1, 2))  # [TC, H, l, D] -> [TC, H, D]
                self.v_cmp[b, :tc] = self.phi_v(v_cmp_raw[b, blocks].transpose(1, 2))
        self.lengths.copy_(torch.tensor(lengths, dtype=torch.int32))
        self._longest = max(lengths)

    def append(
        self,
        k_cmp_raw: torch.Tensor,
        v_cmp_raw: torch.Tensor,
        k_slc: torch.Tensor,
        v_slc: torch.Tensor,
        k_win: torch.Tensor,
        v_win: torch.Tensor,
    ) -> None:
        """Append one token to every sequence: each argument [B, 1, H, D]. No host synchronisation."""
        if self._longest + 1 > self.max_len:
            raise ValueError(f"DecodeCache is full: a sequence would pass max_len={self.max_len} tokens")
        self._longest += 1
        l, d, W = self.config.compress_block, self.config.compress_stride, self.window_len
        b, s = self._batch, self.lengths.long()  # [B]: the new token's position
        self.k_slc[b, s], self.v_slc[b, s] = k_slc[:, 0], v_slc[:, 0]
        self.k_win[b, s % W], self.v_win[b, s % W] = k_win[:, 0], v_win[:, 0]
        self.k_tail[b, s % l], self.v_tail[b, s % l] = k_cmp_raw[:, 0], v_cmp_raw[:, 0]
        complete = (s + 1 >= l) & ((s + 1 - l) % d == 0)  # a compressed block ends at s (spec 8)
        row = torch.where(complete, torch.div(s + 1 - l, d, rounding_mode="floor"), self.scratch_block)
        ring = (s[:, None] - l + 1 + torch.arange(l, device=s.device)) % l  # [B, l] the block's tokens in order
        self.k_cmp[b, row] = self.phi_k(self.k_tail[b[:, None], ring].transpose(1, 2)).to(self.k_cmp.dtype)  # Eq. 7
        self.v_cmp[b, row] = self.phi_v(self.v_tail[b[:, None], ring].transpose(1, 2)).to(self.v_cmp.dtype)
        self.lengths += 1


def decode_attention(
    q: torch.Tensor,
    gates: torch.Tensor,
    cache: DecodeCache,
    *,
    scale: float | None = None,
    return_block_idx: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """NSA output of the newest token of every sequence in ``cache`` (call after ``cache.append``).

    q [B, 1, HQ, DK], gates [B, 1, HQ, 3]. Returns o [B, 1, HQ, DV] (and block_idx [B, H, n] int32).
    """
    check_tensor("q", q, 4, "[B, 1, HQ, DK]")
    check_kernel_dtype("q", q)
    B, _, HQ, DK = q.shape
    _, _, H, DV = cache.v_slc.shape
    config = cache.config
    if q.shape[1] != 1 or B != cache.lengths.shape[0] or HQ % H != 0 or DK != cache.k_slc.shape[3]:
        raise ValueError(
            f"q must be [B, 1, HQ, DK] = [{cache.lengths.shape[0]}, 1, k*{H}, {cache.k_slc.shape[3]}], "
            f"got {list(q.shape)}"
        )
    if q.dtype != cache.k_slc.dtype or q.device != cache.k_slc.device:
        raise TypeError(f"q must have the cache's dtype and device ({cache.k_slc.dtype}, {cache.k_slc.device})")
    if tuple(gates.shape) != (B, 1, HQ, 3):
        raise ValueError(f"gates must have shape [B, 1, HQ, 3] = {[B, 1, HQ, 3]}, got {list(gates.shape)}")
    scale = check_scale(scale, DK)
    G, n = HQ // H, config.num_selected
    q, gates = q.contiguous(), gates.contiguous()
    ws = cache.workspace(HQ)
    L, D, LS = config.compress_block, config.compress_stride, config.select_block
    BG, BK, BV = next_power_of_2(G), next_power_of_2(DK), next_power_of_2(DV)
    BN, BH = next_power_of_2(LS), next_power_of_2(L // D - 1)
    NT, NC, SB, NSPLIT = cache.num_tiles, cache.num_cmp_splits, cache.split_blocks, cache.num_sparse_splits
    NSS = triton.cdiv(n, SB)
    NSM = config.num_select_blocks(cache.max_len)
    BSEL = triton.next_power_of_2(n)
    BJ = cache.tile_blocks
    NSP = max(BJ, BSEL, triton.next_power_of_2(NSM))  # the score row, padded (tl.topk needs NSP >= BSEL), whole tiles
    block_idx = torch.empty(B, H, n, dtype=torch.int32, device=q.device)
    o = torch.empty(B, 1, HQ, DV, dtype=q.dtype, device=q.device)
    precision = dot_precision(q.dtype)
    decode_compressed_kernel[(B, H, NC)](
        q, cache.k_cmp, cache.v_cmp, cache.lengths, ws["cmp_m"], ws["cmp_l"], ws["cmp_acc"], ws["sel"],
        ws["sel_ref"], scale, cache.k_cmp.shape[1], NT, cache.split_tiles, H=H, G=G, DK=DK, DV=DV, L=L, D=D, LS=LS,
        NC=NC, BG=BG, BK=BK, BV=BV, BJ=BJ, BH=BH, DOT_PRECISION=precision, **LAUNCH["compressed"],
    )  # fmt: skip
    pre_merge = cache.pre_merge
    cmp_o = ws["cmp_o"] if pre_merge else ws["cmp_acc"]  # cmp_acc stands in for the pointer: never read then
    decode_select_kernel[(B, H + HQ * pre_merge)](
        cache.lengths, ws["cmp_m"], ws["cmp_l"], ws["sel"], ws["sel_ref"], block_idx, ws["cmp_acc"], cmp_o,
        NT, H=H, G=G, LS=LS, N_SEL=n, N_INIT=config.num_initial, N_LOCAL=config.num_local, NC=NC, BG=BG,
        BGC=min(BG, max(1, SELECT_ENTRIES // NSP)), BP=_pow2_at_most(NC, 64), BJ=BJ, NSP=NSP, BSEL=BSEL, BV=BV,
        PRE_MERGE=pre_merge, **LAUNCH["select"],
    )  # fmt: skip
    decode_sparse_kernel[(B, H, NSPLIT)](
        q, cache.k_slc, cache.v_slc, cache.k_win, cache.v_win, cache.lengths, block_idx, ws["part_m"],
        ws["part_l"], ws["part_acc"], scale, cache.max_len, cache.window_len, H=H, G=G, DK=DK, DV=DV, LS=LS,
        W=config.window, N_SEL=n, SB=SB, NSS=NSS, NSPLIT=NSPLIT, BG=BG, BK=BK, BV=BV, BN=BN,
        DOT_PRECISION=precision, **LAUNCH["sparse"],
    )  # fmt: skip
    BVC = min(BV, COMBINE_COLUMNS)
    decode_combine_kernel[(B, HQ, BV // BVC)](
        ws["cmp_m"], ws["cmp_l"], ws["cmp_acc"], cmp_o, ws["part_m"], ws["part_l"], ws["part_acc"], gates, o,
        HQ=HQ, DV=DV, NC=NC, NSS=NSS, NSPLIT=NSPLIT, BPC=_pow2_at_most(NC, 32), BPS=_pow2_at_most(NSS, 32),
        BPW=_pow2_at_most(NSPLIT - NSS, 32), BV=BV, BVC=BVC, PRE_MERGE=pre_merge, **LAUNCH["combine"],
    )  # fmt: skip
    return (o, block_idx) if return_block_idx else o
