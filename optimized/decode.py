r"""Batched decoding with a pre-allocated KV cache: one token per sequence per step, in a few launches.

A decode step for query position $t$ (spec section 8) reads the $T_C(t + 1)$ compressed tokens, the
$n$ selected blocks of $l'$ tokens and the last $w$ tokens, and must equal the parallel forward at $t$.
Sequences of one batch may have different lengths: ``DecodeCache.lengths`` lives on the device, and a
step never synchronises with the host, so ``append`` + ``decode_attention`` can be captured in a CUDA
graph.

The cache (per layer) holds, for every sequence of the batch:

* ``k_slc, v_slc [B, max_len, H, D]``: the selection branch's raw keys and values, all tokens;
* ``k_win, v_win [B, W, H, D]``: the window branch's last $W = \min(w, \text{max\_len})$ tokens, a ring
  indexed by $s \bmod W$;
* ``k_tail, v_tail [B, l, H, D]``: the compression branch's last $l$ raw tokens, a ring indexed by
  $s \bmod l$, from which the next compressed block is formed;
* ``k_cmp, v_cmp [B, T_C(\text{max\_len}) + 1, H, D]``: the compressed blocks so far (the extra row is a
  scratch slot that steps completing no block write to, so that no step branches on the host).

A new compressed block completes when token $s$ arrives with $s + 1 \ge l$ and $(s + 1 - l) \bmod d = 0$.

One step is three kernels:

1. ``decode_compressed_kernel``, grid $(B, H)$: the $G$ query heads of a group attend to the compressed
   keys (online softmax), then recompute the probabilities from the log-sum-exp, map them to selection
   blocks by overlap (Eq. 8-10, tiles of selection blocks with their compressed neighbours), and pick
   the top $n$ with the forced blocks (Eq. 11) by $n$ rounds of arg-max over the score row.
2. ``decode_sparse_kernel``, grid $(B, H, n + \lceil w / l' \rceil)$: flash-decoding splits, one per
   selected block and one per $l'$ keys of the window, each writing a partial (max, sum, accumulator).
3. ``decode_combine_kernel``, grid $(B, H)$: merges the partials per branch and applies the gates (Eq. 5).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from reference._checks import check_config, check_scale, check_tensor
from reference.config import NSAConfig

from ._common import LOG2E, attn_fwd_finish, attn_fwd_step, check_kernel_dtype, dot_precision, next_power_of_2

Compress = Callable[[torch.Tensor], torch.Tensor]  # phi: [..., l, D] -> [..., D], as reference/compression.py


@triton.jit
def decode_compressed_kernel(
    q,
    k_cmp,
    v_cmp,
    lengths,
    o_cmp,
    lse,
    scores,
    block_idx,
    scale,
    TCM,
    NSM,
    H: tl.constexpr,
    G: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    L: tl.constexpr,
    D: tl.constexpr,
    LS: tl.constexpr,
    N_SEL: tl.constexpr,
    N_INIT: tl.constexpr,
    N_LOCAL: tl.constexpr,
    BG: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BC: tl.constexpr,
    BJ: tl.constexpr,
    BI: tl.constexpr,
    NSP: tl.constexpr,
    BSEL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Compressed attention, selection scores and top-n for the newest token of sequence b, kv head h.

    q [B, HQ, DK]; k_cmp/v_cmp [B, TCM, H, D]; lengths [B] int32 (the query is token lengths[b] - 1);
    writes o_cmp [B, HQ, DV] fp32, lse [B, HQ] fp32, scores [B, H, NSM] fp32 (scratch) and
    block_idx [B, H, N_SEL] int32 (ascending, -1 padded).
    """
    i_b, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    HQ: tl.constexpr = H * G
    qk_scale = scale * LOG2E
    t = tl.load(lengths + i_b) - 1
    TC = tl.where(t + 1 >= L, (t + 1 - L) // D + 1, 0)  # complete blocks: all visible to t (spec 3)
    o_g, o_k, o_v, o_c = tl.arange(0, BG), tl.arange(0, BK), tl.arange(0, BV), tl.arange(0, BC)
    m_g, m_dk, m_dv = o_g < G, o_k < DK, o_v < DV
    o_row = i_b * HQ + i_h * G + o_g  # [BG]
    b_q = tl.load(q + o_row[:, None] * DK + o_k[None, :], mask=m_g[:, None] & m_dk[None, :], other=0.0)  # [BG, BK]

    b_m = tl.full([BG], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BG], dtype=tl.float32)
    b_acc = tl.zeros([BG, BV], dtype=tl.float32)
    for c0 in range(0, TC, BC):
        o_i = c0 + o_c  # [BC]
        m_i = o_i < TC
        o_key = (i_b * TCM + o_i) * H + i_h  # [BC]
        b_m, b_l, b_acc = attn_fwd_step(
            b_q,
            k_cmp + o_key[None, :] * DK + o_k[:, None],
            v_cmp + o_key[:, None] * DV + o_v[None, :],
            m_dk[:, None] & m_i[None, :],
            m_i[:, None] & m_dv[None, :],
            m_g[:, None] & m_i[None, :],
            qk_scale,
            b_m,
            b_l,
            b_acc,
            DOT_PRECISION,
        )
    b_o, b_lse = attn_fwd_finish(b_m, b_l, b_acc)
    tl.store(o_cmp + o_row[:, None] * DV + o_v[None, :], b_o, mask=m_g[:, None] & m_dv[None, :])
    tl.store(lse + o_row, b_lse, mask=m_g)

    # Eq. 8-10: p_slc[j] = sum_g sum_i overlap(i, j) / d * exp(s_gi - lse_g), tile by tile of BJ blocks.
    NS = t // LS + 1  # candidate blocks j <= t // l'
    b_lse2 = tl.where(m_g, b_lse * LOG2E, float("inf"))  # rows outside the group contribute exp2(-inf) = 0
    o_j, o_ii = tl.arange(0, BJ), tl.arange(0, BI)
    p_scores = scores + (i_b * H + i_h) * NSM
    for j0 in range(0, NS, BJ):
        o_i = j0 * (LS // D) - (L // D) + 1 + o_ii  # [BI] the compressed blocks overlapping this tile
        m_i = (o_i >= 0) & (o_i < TC) & (o_ii < BJ * (LS // D) + L // D - 1)
        o_key = (i_b * TCM + o_i) * H + i_h
        b_k = tl.load(k_cmp + o_key[None, :] * DK + o_k[:, None], mask=m_dk[:, None] & m_i[None, :], other=0.0)
        b_s = tl.dot(b_q, b_k, input_precision=DOT_PRECISION) * qk_scale  # [BG, BI]
        b_p = tl.where(m_i[None, :], tl.exp2(b_s - b_lse2[:, None]), 0.0)  # Eq. 8
        b_pg = tl.sum(b_p, 0)  # [BI]: the group sum (Eq. 10) commutes with the mapping
        o_blk = j0 + o_j  # [BJ]
        lo = tl.maximum(o_i[:, None] * D, o_blk[None, :] * LS)
        hi = tl.minimum(o_i[:, None] * D + L, o_blk[None, :] * LS + LS)
        b_w = tl.maximum(hi - lo, 0).to(tl.float32) / D  # [BI, BJ] overlap in strides (Eq. 9)
        tl.store(p_scores + o_blk, tl.sum(b_pg[:, None] * b_w, 0), mask=o_blk < NS)
    tl.debug_barrier()

    # Eq. 11: forced blocks first, then the highest scores, ties to the lower index.
    o_s = tl.arange(0, NSP)
    b_row = tl.load(p_scores + o_s, mask=o_s < NS, other=0.0)  # [NSP]
    cur = t // LS
    m_forced = (o_s <= cur) & ((o_s < N_INIT) | (o_s > cur - N_LOCAL))
    b_rank = tl.where(m_forced, float("inf"), tl.where(o_s <= cur, b_row, float("-inf")))
    o_sel = tl.arange(0, BSEL)
    b_sel = tl.full([BSEL], NSP, dtype=tl.int32)
    for it in tl.static_range(N_SEL):
        best = tl.argmax(b_rank, 0, tie_break_left=True)
        best = tl.where(tl.max(b_rank, 0) > float("-inf"), best, NSP)  # no candidate left
        b_sel = tl.where(o_sel == it, best, b_sel)
        b_rank = tl.where(o_s == best, float("-inf"), b_rank)
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
    NSPLIT: tl.constexpr,
    BG: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One split of the selected or window branch: a partial (max, sum, acc) of the group's G heads.

    Split p < N_SEL reads selected block block_idx[b, h, p]; split p >= N_SEL reads the window's keys
    t - w + 1 + (p - N_SEL) * BN ... + BN (ring index s mod WR). Writes part_m / part_l [B, H, NSPLIT, BG]
    and part_acc [B, H, NSPLIT, BG, BV], fp32.
    """
    i_b, i_h, i_p = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    HQ: tl.constexpr = H * G
    t = tl.load(lengths + i_b) - 1
    o_g, o_k, o_v, o_n = tl.arange(0, BG), tl.arange(0, BK), tl.arange(0, BV), tl.arange(0, BN)
    m_g, m_dk, m_dv = o_g < G, o_k < DK, o_v < DV
    o_row = i_b * HQ + i_h * G + o_g
    b_q = tl.load(q + o_row[:, None] * DK + o_k[None, :], mask=m_g[:, None] & m_dk[None, :], other=0.0)  # [BG, BK]
    if i_p < N_SEL:
        blk = tl.load(block_idx + (i_b * H + i_h) * N_SEL + i_p)
        o_s = blk * LS + o_n  # [BN] tokens of the selected block (Eq. 12)
        m_n = (blk >= 0) & (o_n < LS) & (o_s <= t)
        o_key = (i_b * MAXLEN + o_s) * H + i_h
        p_k, p_v = k_slc + o_key[None, :] * DK + o_k[:, None], v_slc + o_key[:, None] * DV + o_v[None, :]
    else:
        o_s = t - W + 1 + (i_p - N_SEL) * BN + o_n  # [BN] window keys t - w < s <= t
        m_n = (o_s >= 0) & (o_s <= t) & ((i_p - N_SEL) * BN + o_n < W)
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
        tl.full([BG], float("-inf"), dtype=tl.float32),
        tl.zeros([BG], dtype=tl.float32),
        tl.zeros([BG, BV], dtype=tl.float32),
        DOT_PRECISION,
    )
    o_part = ((i_b * H + i_h) * NSPLIT + i_p) * BG + o_g  # [BG]
    tl.store(part_m + o_part, b_m)
    tl.store(part_l + o_part, b_l)
    tl.store(part_acc + o_part[:, None] * BV + o_v[None, :], b_acc)


@triton.jit
def merge_partials(part_m, part_l, part_acc, o_part0, P0, P1, BG: tl.constexpr, BV: tl.constexpr):
    """Merge the partial softmax states of splits [P0, P1) (rows o_part0 + p * BG): returns b_o [BG, BV]."""
    o_g, o_v = tl.arange(0, BG), tl.arange(0, BV)
    b_m = tl.full([BG], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BG], dtype=tl.float32)
    b_acc = tl.zeros([BG, BV], dtype=tl.float32)
    for p in range(P0, P1):
        o_part = o_part0 + p * BG + o_g
        b_mp = tl.load(part_m + o_part)
        b_m_new = tl.maximum(b_m, b_mp)
        b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_a, b_ap = tl.exp2(b_m - b_m_safe), tl.exp2(b_mp - b_m_safe)
        b_l = b_l * b_a + tl.load(part_l + o_part) * b_ap
        b_acc = b_acc * b_a[:, None] + tl.load(part_acc + o_part[:, None] * BV + o_v[None, :]) * b_ap[:, None]
        b_m = b_m_new
    b_o, _ = attn_fwd_finish(b_m, b_l, b_acc)
    return b_o


@triton.jit
def decode_combine_kernel(
    o_cmp,
    gates,
    part_m,
    part_l,
    part_acc,
    o,
    H: tl.constexpr,
    G: tl.constexpr,
    DV: tl.constexpr,
    N_SEL: tl.constexpr,
    NSPLIT: tl.constexpr,
    BG: tl.constexpr,
    BV: tl.constexpr,
):
    """o [B, HQ, DV] = g_cmp o_cmp + g_slc o_slc + g_win o_win (Eq. 5); gates [B, HQ, 3]."""
    i_b, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    HQ: tl.constexpr = H * G
    o_g, o_v = tl.arange(0, BG), tl.arange(0, BV)
    m_g, m_dv = o_g < G, o_v < DV
    o_row = i_b * HQ + i_h * G + o_g  # [BG]
    o_part0 = (i_b * H + i_h) * NSPLIT * BG
    b_slc = merge_partials(part_m, part_l, part_acc, o_part0, 0, N_SEL, BG, BV)  # [BG, BV]
    b_win = merge_partials(part_m, part_l, part_acc, o_part0, N_SEL, NSPLIT, BG, BV)
    m_gv = m_g[:, None] & m_dv[None, :]
    b_cmp = tl.load(o_cmp + o_row[:, None] * DV + o_v[None, :], mask=m_gv, other=0.0)
    b_g0 = tl.load(gates + o_row * 3, mask=m_g, other=0.0).to(tl.float32)[:, None]
    b_g1 = tl.load(gates + o_row * 3 + 1, mask=m_g, other=0.0).to(tl.float32)[:, None]
    b_g2 = tl.load(gates + o_row * 3 + 2, mask=m_g, other=0.0).to(tl.float32)[:, None]
    b_o = b_g0 * b_cmp + b_g1 * b_slc + b_g2 * b_win
    tl.store(o + o_row[:, None] * DV + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_gv)


def mean_compress(x: torch.Tensor) -> torch.Tensor:
    """The parameter-free phi: [..., l, D] -> [..., D]."""
    return x.mean(dim=-2)


class DecodeCache:
    """Pre-allocated NSA KV cache of one layer for a batch of sequences (spec section 8).

    ``phi_k`` / ``phi_v`` map raw blocks [..., l, D] to compressed tokens [..., D] (default: mean
    pooling; pass a trained layer's compression modules). Unlike ``reference.NSACache``, which grows,
    this cache is allocated once for ``max_len`` tokens and its sequences may have different lengths.
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
    ) -> None:
        config = check_config(config if config is not None else NSAConfig())
        for name, value in (("batch_size", batch_size), ("max_len", max_len), ("num_kv_heads", num_kv_heads)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
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
    BG, BK, BV = next_power_of_2(G), next_power_of_2(DK), next_power_of_2(DV)
    BN = next_power_of_2(config.select_block)
    NSM = config.num_select_blocks(cache.max_len)
    NSPLIT = n + triton.cdiv(config.window, BN)
    BJ = 16
    BI = next_power_of_2(
        BJ * (config.select_block // config.compress_stride) + config.compress_block // config.compress_stride
    )
    dev, f32 = q.device, torch.float32
    o_cmp = torch.empty(B, HQ, DV, dtype=f32, device=dev)
    lse = torch.empty(B, HQ, dtype=f32, device=dev)
    scores = torch.empty(B, H, NSM, dtype=f32, device=dev)
    block_idx = torch.empty(B, H, n, dtype=torch.int32, device=dev)
    part_m = torch.empty(B, H, NSPLIT, BG, dtype=f32, device=dev)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(B, H, NSPLIT, BG, BV, dtype=f32, device=dev)
    o = torch.empty(B, 1, HQ, DV, dtype=q.dtype, device=dev)
    precision = dot_precision(q.dtype)
    decode_compressed_kernel[(B, H)](
        q, cache.k_cmp, cache.v_cmp, cache.lengths, o_cmp, lse, scores, block_idx, scale,
        cache.k_cmp.shape[1], NSM, H=H, G=G, DK=DK, DV=DV, L=config.compress_block, D=config.compress_stride,
        LS=config.select_block, N_SEL=n, N_INIT=config.num_initial, N_LOCAL=config.num_local, BG=BG, BK=BK, BV=BV,
        BC=64, BJ=BJ, BI=BI, NSP=triton.next_power_of_2(NSM), BSEL=triton.next_power_of_2(n), DOT_PRECISION=precision,
    )  # fmt: skip
    decode_sparse_kernel[(B, H, NSPLIT)](
        q, cache.k_slc, cache.v_slc, cache.k_win, cache.v_win, cache.lengths, block_idx, part_m, part_l, part_acc,
        scale, cache.max_len, cache.window_len, H=H, G=G, DK=DK, DV=DV, LS=config.select_block, W=config.window,
        N_SEL=n, NSPLIT=NSPLIT, BG=BG, BK=BK, BV=BV, BN=BN, DOT_PRECISION=precision,
    )  # fmt: skip
    decode_combine_kernel[(B, H)](
        o_cmp, gates, part_m, part_l, part_acc, o, H=H, G=G, DV=DV, N_SEL=n, NSPLIT=NSPLIT, BG=BG, BV=BV
    )
    return (o, block_idx) if return_block_idx else o
