"""Experiment: the decode step's compressed pass with its matmuls transposed (keys as M) for Hopper's wgmma.

The production pass (``optimized.decode.decode_compressed_kernel``) multiplies the G = 16 query heads of one token by
a tile of compressed keys: ``S = Q K^T`` has M = 16, below wgmma's M = 64, so Triton emits ``mma.sync`` (HMMA).
Here ``S^T = K Q^T`` [BC, BG] and ``O^T += V^T P^T`` [BV, BG] put the keys and the value dims in M, as the
selected dq kernel does (``optimized.selected``; there the swap made the selected backward 13% faster on an H100,
while the selected forward transposed the same way was 4-7% slower: the performance log has the numbers).
``scripts/decode_launch.py --transposed`` swaps this kernel into the step and times it against production;
``tests/test_scripts.py`` checks it writes what production writes.
"""

from __future__ import annotations

import triton
import triton.language as tl

from optimized._common import LOG2E, overlap_strides

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
):
    """``optimized.decode.decode_compressed_kernel`` (same arguments, same outputs) with its products transposed:
    ``S^T = K Q^T`` [BC, BG] and ``O^T += V^T P^T`` [BV, BG] (M = 64 keys and 128 dims: wgmma for the G = 16
    query heads), the overlap sums ``u^T = W^T 2^(S^T - r)`` [BJ, BG]. ``scripts/decode_launch.py --transposed``
    swaps it into the decode step."""
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
