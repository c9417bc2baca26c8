r"""Fused block selection (paper Eq. 8-12, spec sections 5-6): scores, overlap mapping, GQA sum and top-n in one kernel.

Design. One program owns ``BT`` query positions of one sequence and one kv head, as a tile of
``BT * GP`` rows (position, query head) with the group padded to a power of two ``GP`` (up to 128 rows; tile
sizes from :func:`select_tiles`): the group's ``q`` tile is loaded once and stays in registers. The program
walks the selection blocks in chunks of ``BS`` (a chunk is ``BS * l'/d`` compressed blocks, in tiles of ``BC``):

1. for each compressed tile, ``s = q k~^T`` ``[BT * GP, BC]`` in one matmul and the probability
   ``p = exp2(s * scale * log2 e - lse * log2 e)`` rebuilt from the compressed branch's saved
   log-sum-exp (Eq. 8), then summed over the group's rows (Eq. 10; the overlap map is linear, so summing
   first is exact and maps once instead of ``G`` times);
2. the overlap map (Eq. 9), ``W[i, j] = |[i d, i d + l) ∩ [j l', (j+1) l')| / d``. Where a chunk is one tile of
   exactly ``R = l' / d`` compressed blocks per selection block (``STENCIL``), it is a stencil on the sums
   viewed as ``[BT, BS, R]`` (``l <= l'``: a compressed block reaches at most into the next selection block):
   compressed block ``j R + r`` gives block ``j`` its ``b_win[r]`` strides and block ``j + 1`` its
   ``b_wout[r]`` (shifted by one block with ``tl.gather``), in fp32. Otherwise the weight tile ``[BC, BS]``
   is built on the fly (small integers, so exact in tf32; ``tf32x3`` keeps the probabilities at fp32
   accuracy). The part of the chunk's last compressed blocks
   that spills into the next chunk's first selection block is carried in a ``[BT]`` vector;
3. each block of the chunk gets an int64 key, all distinct: the score's float bits (non-negative floats
   order as integers; forced blocks ``+inf``) in the high word, ``2^31 - 1 - j`` in the low word, so that of
   equal scores the lower index wins, as in the spec; non-candidates get negative keys. Each row keeps the
   ``NP`` best keys so far as a list ``[BT, NP]`` in registers, sorted ascending. A chunk goes in as a merge
   of two sorted lists: its top ``NP`` keys sorted descending (``tl.topk``, a bitonic network), then the
   larger of each pair of slots, which is the top ``NP`` of both lists as a bitonic sequence, sorted
   ascending again by ``tl.bitonic_merge``. Chunks hold ``BS >= NP`` blocks (``NP`` by default).

At the end each row's top ``n`` keys (the list's last ``n`` slots) are stored in ascending block order
(``tl.sort`` of their indices), with ``-1`` padding. Memory is ``O(T n)``: no ``[T, TC]`` or ``[T, NS]`` tensor
is ever written, and the registers hold ``[BT, BS]`` scores and ``[BT, NP]`` list entries whatever the sequence
length, so there is no limit on ``NS`` (128k tokens are 2048 blocks at ``l' = 64``). ``DK <= 256`` (one ``q``
tile).

Costs: the ``q k~^T`` products equal one compressed-attention forward's first matmul (this is the second
pass, which needs the final log-sum-exp), and one ``exp2`` per (row, visible compressed block). Per
compressed tile a program reads one ``[BK, BC]`` key tile; ``q`` is read once. The stencil map adds
``2 BT BC`` multiply-adds per tile, once per group (the weight tile: ``BT * BC * BS``, a tf32x3 matmul when
``BT >= 16``, else a broadcast sum). A chunk of ``BS = NP`` blocks costs ``log2(NP) (log2(NP) + 3) / 2``
compare-exchange stages for its top-n (14 at 16 blocks), each an int64 partner exchange (two shuffles where the partner
sits in another lane), a comparison and two selects per key, whatever the scores. The kernel is bound by the
instructions it issues and their latencies, not by its matmuls or memory, so its cost is read on the SASS
(``scripts/spills.py --sass``): at G = 16 (``num_warps=4``) 16 selection blocks cost about 1020 instructions
per thread and position, of which the compressed tile's product, ``exp2``, masks, group sum and stencil are
850. History (performance log): before this merge, insertion rounds (3.7 per chunk on random scores at 64k,
each two 16-lane reductions in a dependent chain) and merges by ranks cost 1244 at G = 16; with the broadcast
map before the stencil about 1580 (13.0 ms on an H100 at 64k, 10.9 with the stencil). Nsight Compute on the
rounds' kernel: warps waited on the shuffles', ``exp2``'s and shared memory's results (2.1 warps per issue)
and on dependent ALU chains (1.4), issuing 45% of the time; neither 4 programs per SM (a register cap) nor
the group's rows head-major (fewer shuffles, more barriers) helped. :func:`select_tiles` keeps the tiles small
enough that nothing spills at G = 16, 4, 2 or 1. Hence also the per-row visibility counts, the overlap
weights built once per program, and no visibility mask on the tiles that every row sees whole.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from reference.config import NSAConfig
from reference.selection import _check_selection_inputs

from ._common import (
    LOG2E,
    autotune_configs,
    check_kernel_dtype,
    dot_precision,
    next_power_of_2,
    overlap_strides,
    tune_bucket,
)
from ._sparse import sequence_lengths, sequence_tiles

BIG = tl.constexpr(1 << 30)  # an index past every real block: sorts empty slots last
IDX = tl.constexpr((1 << 31) - 1)  # a key's low 32 bits hold IDX - j for block j
_LOG2E = tl.constexpr(LOG2E)  # jit code may only read constexpr globals


@triton.autotune(
    configs=autotune_configs({}, num_warps=(4, 8), num_stages=(1, 2)), key=["G", "BK", "N", "BS", "BC", "TUNE_T"]
)
@triton.jit
def select_blocks_kernel(
    q,  # [TT, HQ, DK] packed tokens
    k_cmp,  # [TCT, H, DK] packed compressed keys
    lse,  # [TT, HQ] float32
    out,  # [TT, H, N] int32
    cu_seqlens,  # [S + 1] int32
    cu_cmp,  # [S + 1] int32
    tile_seq,  # [NT] int32: the sequence of each query tile
    tile_start,  # [NT] int32: its first packed token
    s_qt,
    s_qh,
    s_kt,
    s_kh,
    s_lt,
    s_ot,
    s_oh,
    qk_scale,  # scale * log2(e)
    TUNE_T,  # the autotuner's size bucket (tune_bucket of the tokens), not read
    G: tl.constexpr,
    GP: tl.constexpr,
    DK: tl.constexpr,
    L: tl.constexpr,
    D: tl.constexpr,
    LS: tl.constexpr,
    N: tl.constexpr,
    N_INIT: tl.constexpr,
    N_LOCAL: tl.constexpr,
    BT: tl.constexpr,
    BS: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    NP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """block_idx of BT positions of one sequence for kv head i_h (grid: query tiles x H).

    The tile's rows are (position, head) pairs ``r = t * GP + g`` (the group padded to a power of two):
    one ``[BT * GP, BK]`` q tile stays in registers and meets every compressed key tile in one matmul.
    """
    i_tile, i_h = tl.program_id(0), tl.program_id(1)
    i_seq = tl.load(tile_seq + i_tile)
    bos, eos = tl.load(cu_seqlens + i_seq), tl.load(cu_seqlens + i_seq + 1)
    cbos = tl.load(cu_cmp + i_seq)
    t0 = tl.load(tile_start + i_tile)
    R: tl.constexpr = LS // D  # compressed blocks starting in one selection block
    BM: tl.constexpr = BT * GP

    o_t = t0 + tl.arange(0, BT)  # [BT] packed positions
    m_t = o_t < eos
    p_t = o_t - bos  # [BT] positions inside the sequence
    o_r = tl.arange(0, BM)  # [BM] rows t * GP + g
    o_rt, o_rg = t0 + o_r // GP, o_r % GP
    m_r = (o_rt < eos) & (o_rg < G)
    p_rt = o_rt - bos  # [BM]
    n_vis_r = tl.where(m_r & (p_rt + 1 >= L), (p_rt + 1 - L) // D + 1, 0)  # [BM] compressed blocks each row sees
    t_last = tl.minimum(t0 + BT, eos) - 1 - bos
    n_vis = tl.max(n_vis_r, axis=0)  # compressed blocks the last row sees
    n_min = tl.min(n_vis_r, axis=0)  # ... and every row (0 if a row is padding)
    n_blk = t_last // LS + 1  # candidate blocks of the last row
    o_k = tl.arange(0, BK)
    m_k = o_k < DK
    o_c = tl.arange(0, BC)
    o_s = tl.arange(0, BS)
    o_slot = tl.arange(0, NP)

    o_rq = i_h * G + o_rg  # [BM] query head of each row
    p_q = q + o_rt.to(tl.int64)[:, None] * s_qt + o_rq[:, None] * s_qh + o_k[None, :]
    b_q = tl.load(p_q, mask=m_r[:, None] & m_k[None, :], other=0.0)  # [BM, BK]
    b_lse = tl.load(lse + o_rt.to(tl.int64) * s_lt + o_rq, mask=m_r, other=0.0)  # [BM]
    b_list = (o_slot - NP).to(tl.int64)[None, :] + tl.zeros([BT, NP], tl.int64)  # [BT, NP] the top NP, ascending
    b_lse2 = b_lse * _LOG2E  # [BM]
    b_carry = tl.zeros([BT], tl.float32)
    # the overlap weights (Eq. 9) repeat from chunk to chunk (i + R and j + 1 overlap as i and j do). With one
    # compressed tile of exactly R blocks per selection block the map is a stencil, since no compressed block
    # reaches past the next selection block (l <= l'): compressed block j R + r gives b_win[r] strides to block j
    # and b_wout[r] to block j + 1. Otherwise it is a [BC, BS] weight tile (computed once with one tile per chunk)
    # and a [BC] vector for the next chunk's first block.
    ONE_TILE: tl.constexpr = BC >= BS * R
    STENCIL: tl.constexpr = BC == BS * R
    o_rr = tl.arange(0, R if STENCIL else 1)
    b_win = overlap_strides(o_rr, 0, L, D, LS).to(tl.float32)  # [R]
    b_wout = overlap_strides(o_rr, 1, L, D, LS).to(tl.float32)  # [R]
    b_w0 = overlap_strides(o_c[:, None], o_s[None, :], L, D, LS).to(tl.float32)  # [BC, BS]
    b_next0 = overlap_strides(o_c, BS, L, D, LS).to(tl.float32)  # [BC]
    o_prev = (o_s[None, :] + BS - 1) % BS + tl.zeros([BT, BS], tl.int32)  # [BT, BS] the block before, cyclic
    for j0 in range(0, n_blk, BS):
        b_acc = tl.zeros([BT, BS], tl.float32)  # [BT, BS] group scores of blocks j0 ... j0 + BS - 1
        b_acc += tl.where(o_s == 0, 1.0, 0.0)[None, :] * b_carry[:, None]
        b_carry = tl.zeros([BT], tl.float32)
        o_j = j0 + o_s
        c_end = tl.minimum((j0 + BS) * R, n_vis)
        n_lim = tl.minimum(n_vis_r, c_end)  # [BM]
        n_full = tl.minimum(n_min, c_end)  # blocks before it every row sees, inside the chunk
        for c0 in range(j0 * R, c_end, BC):
            o_i = c0 + o_c  # [BC] compressed blocks inside the sequence
            m_i = o_i < c_end
            p_k = k_cmp + (cbos + o_i).to(tl.int64)[None, :] * s_kt + i_h * s_kh + o_k[:, None]
            b_kt = tl.load(p_k, mask=m_k[:, None] & m_i[None, :], other=0.0)  # [BK, BC]
            b_s = tl.dot(b_q, b_kt, input_precision=DOT_PRECISION)  # [BM, BC]
            b_p = tl.math.exp2(b_s * qk_scale - b_lse2[:, None])  # (Eq. 8)
            if c0 + BC > n_full:  # some row does not see every block of the tile, or it passes the chunk: mask
                b_p = tl.where(o_i[None, :] < n_lim[:, None], b_p, 0.0)  # [BM, BC]: block i ends by the row
            b_p = tl.sum(tl.reshape(b_p, (BT, GP, BC)), axis=1)  # [BT, BC] summed over the group (Eq. 10)
            if STENCIL:  # (Eq. 9) as the stencil; the spill of the chunk's last block is carried
                b_p3 = tl.reshape(b_p, (BT, BS, R))  # [BT, BS, R]: compressed block j R + r
                b_acc += tl.sum(b_p3 * b_win[None, None, :], axis=2)
                b_out = tl.sum(b_p3 * b_wout[None, None, :], axis=2)  # [BT, BS] what block j gives block j + 1
                b_acc += tl.where(o_s[None, :] > 0, tl.gather(b_out, o_prev, axis=1), 0.0)
                b_carry += tl.sum(tl.where(o_s[None, :] == BS - 1, b_out, 0.0), axis=1)
            else:
                if ONE_TILE:
                    b_w, b_next = b_w0, b_next0
                else:
                    b_w = overlap_strides(o_i[:, None], o_j[None, :], L, D, LS).to(tl.float32)  # [BC, BS] (Eq. 9)
                    b_next = overlap_strides(o_i, j0 + BS, L, D, LS).to(tl.float32)  # [BC] into the next chunk
                if BT >= 16:
                    b_acc = tl.dot(b_p, b_w, b_acc, input_precision="tf32x3")
                else:
                    b_acc += tl.sum(b_p[:, :, None] * b_w[None, :, :], axis=1)
                b_carry += tl.sum(b_p * b_next[None, :], axis=1)

        # ranks as int64 keys, all distinct: the score's bits (non-negative floats order as integers; forced
        # blocks +inf) above IDX - j, so that of equal scores the lower index ranks higher; a non-candidate
        # (spec 6) gets -(NP + 1 + j), below every list entry
        b_cur = p_t // LS  # [BT]
        m_cand = (o_j[None, :] <= b_cur[:, None]) & m_t[:, None]  # [BT, BS]
        m_force = m_cand & ((o_j[None, :] < N_INIT) | (o_j[None, :] > b_cur[:, None] - N_LOCAL))
        b_cv = tl.where(m_force, float("inf"), tl.maximum(b_acc, 0.0) + 0.0)  # + 0.0: no -0.0
        b_key = (b_cv.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (-o_j + IDX).to(tl.int64)[None, :]
        b_key = tl.where(m_cand, b_key, (-o_j - (NP + 1)).to(tl.int64)[None, :])  # [BT, BS]

        # Eq. 11, a merge of two sorted lists: the chunk's top NP descending against the list ascending, the
        # larger of each pair is the top NP of both, a bitonic sequence that a bitonic merge sorts ascending
        b_list = tl.bitonic_merge(tl.maximum(b_list, tl.topk(b_key, NP, dim=1)), dim=1)  # [BT, NP]

    # the top N (the list's last N slots), the empty ones (negative keys) out, stored in ascending block order
    # with -1 in the slots after them
    m_top = (o_slot >= NP - N)[None, :] & (b_list >= 0)  # [BT, NP]
    b_idx = tl.sort(tl.where(m_top, -(b_list & 0xFFFFFFFF) + IDX, BIG), dim=1)  # [BT, NP]
    p_o = out + o_t.to(tl.int64)[:, None] * s_ot + i_h * s_oh + o_slot[None, :]
    tl.store(p_o, tl.where(b_idx < BIG, b_idx, -1).to(tl.int32), mask=m_t[:, None] & (o_slot < N)[None, :])


def select_tiles(G: int, DK: int, n: int, R: int, bs: int | None = None, rows: int | None = None) -> dict[str, int]:
    """The launch's tile sizes for group size ``G``, head dim ``DK``, ``n`` selected blocks, ``R = l' / d``.

    ``BT`` positions of ``GP`` rows: up to ``rows`` rows (default 128, 64 for DK > 128: the ``q`` tile stays in
    registers) and at most 256 chunk keys ``[BT, BS]``, but at least 16 rows for ``tl.dot``; chunks of ``BS``
    selection blocks (``bs``: a power of two, at least ``NP``, the list's length; default ``NP``); compressed
    tiles of ``BC`` (at most 8192 elements in the ``[BT, BC, BS]`` product of the broadcast map, used for
    ``BT < 16``).
    """
    GP, NP = triton.next_power_of_2(G), next_power_of_2(n, 2)
    if bs is not None and (bs < NP or bs & (bs - 1)):
        raise ValueError(f"bs must be a power of two >= {NP} (the top-n list's length), got {bs}")
    BS = bs or NP
    rows = rows or (128 if DK <= 128 else 64)
    BT = max(1, 16 // GP, min(rows // GP, 256 // BS))
    BC = min(128, next_power_of_2(BS * R))
    if BT < 16:
        BC = min(BC, max(16, 8192 // (BT * BS)))
    return {"GP": GP, "BT": BT, "BS": BS, "BC": BC, "BK": next_power_of_2(DK), "NP": NP}


def select_blocks_fwd(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    lse: torch.Tensor,
    config: NSAConfig,
    scale: float,
    cu_seqlens: torch.Tensor | None,
    bs: int | None = None,
    rows: int | None = None,
) -> torch.Tensor:
    """Launch the fused selection. q [B, T, HQ, DK], k_cmp [B, TC, H, DK], lse [B, T, HQ] -> [B, T, H, n] int32.

    ``bs``, ``rows``: the chunk of selection blocks and the most query rows per program (defaults:
    :func:`select_tiles`'s; for experiments, ``scripts/selection_tiles.py``).
    """
    B, T, HQ, DK = q.shape
    H, n = k_cmp.shape[2], config.num_selected
    G = HQ // H
    tiles = select_tiles(G, DK, n, config.select_block // config.compress_stride, bs, rows)
    cu, cu_c, tile_seq, tile_start = sequence_tiles(
        sequence_lengths(B, T, cu_seqlens), config, tiles["BT"], 1, q.device
    )
    q2 = q.contiguous().view(B * T, HQ, DK)
    k2 = k_cmp.contiguous().view(k_cmp.shape[0] * k_cmp.shape[1], H, DK)
    lse2 = lse.float().contiguous().view(B * T, HQ)
    out = torch.empty(B * T, H, n, dtype=torch.int32, device=q.device)
    select_blocks_kernel[(tile_seq.numel(), H)](
        q2, k2, lse2, out, cu, cu_c, tile_seq, tile_start,
        q2.stride(0), q2.stride(1), k2.stride(0), k2.stride(1), lse2.stride(0), out.stride(0), out.stride(1),
        scale * LOG2E.value,  # a float: a constexpr here would compile one kernel per scale
        TUNE_T=tune_bucket(B * T), G=G, DK=DK, L=config.compress_block, D=config.compress_stride,
        LS=config.select_block, N=n, N_INIT=config.num_initial, N_LOCAL=config.num_local,
        DOT_PRECISION=dot_precision(q.dtype), **tiles,
    )  # fmt: skip
    return out.view(B, T, H, n)


def _config(l: int, d: int, ls: int, n: int, n_init: int, n_local: int) -> NSAConfig:
    return NSAConfig(compress_block=l, compress_stride=d, select_block=ls, num_selected=n, num_initial=n_init,
                     num_local=n_local)  # fmt: skip


@torch.library.custom_op("nsa::select_blocks", mutates_args=())
def select_blocks_op(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    l: int,
    d: int,
    ls: int,
    n: int,
    n_init: int,
    n_local: int,
    scale: float,
) -> torch.Tensor:
    """Custom op around :func:`select_blocks_fwd` (the config as its integers) -> block_idx [B, T, H, n] int32."""
    return select_blocks_fwd(q, k_cmp, lse, _config(l, d, ls, n, n_init, n_local), scale, cu_seqlens)


@select_blocks_op.register_fake
def _(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    l: int,
    d: int,
    ls: int,
    n: int,
    n_init: int,
    n_local: int,
    scale: float,
) -> torch.Tensor:
    return q.new_empty(q.shape[0], q.shape[1], k_cmp.shape[2], n, dtype=torch.int32)


def select_blocks(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    lse: torch.Tensor,
    config: NSAConfig,
    *,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``num_selected`` blocks each query and kv head reads (Eq. 8-12, spec sections 5-6).

    q [B, T, HQ, DK], k_cmp [B, TC, H, DK] (float16, bfloat16 or float32), lse [B, T, HQ] from
    ``compressed_attention``. Returns block_idx [B, T, H, num_selected] int32: ascending, forced blocks
    included, -1 padded; with ``cu_seqlens`` indices count from each sequence's first token. No gradient.
    """
    config, scale = _check_selection_inputs(q, k_cmp, lse, config, scale, cu_seqlens)
    check_kernel_dtype("q", q)
    return select_core(q, k_cmp, lse, config, scale, cu_seqlens)


def select_core(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    lse: torch.Tensor,
    config: NSAConfig,
    scale: float,
    cu_seqlens: torch.Tensor | None,
) -> torch.Tensor:
    """:func:`select_blocks` on checked arguments (``nsa_attention`` checks them once)."""
    c = config
    return torch.ops.nsa.select_blocks(
        q.detach(), k_cmp.detach(), lse.detach(), cu_seqlens, c.compress_block, c.compress_stride, c.select_block,
        c.num_selected, c.num_initial, c.num_local, scale,
    )  # fmt: skip
