r"""Compressed attention in Triton: every query reads the compressed blocks that have ended.

Same definition as ``reference/compressed.py``: block $i$ (tokens $[i d, i d + l)$) is visible to query
$t$ iff $i d + l - 1 \le t$, so query $t$ reads the first $n_t = \lfloor (t + 1 - l) / d \rfloor + 1$
blocks of its sequence (none when $t + 1 < l$: output 0, lse $-\infty$, zero gradients). That is an
interval of keys, so the kernels are the interval-attention kernels of ``_interval.py``, with the
$G$ query heads of a group in the tile rows: the small compressed K/V (about $T / d$ rows) is loaded
once per group and position tile.

With ``cu_seqlens`` the compressed keys of sequence $j$ are packed at $[c_j, c_{j+1})$ with
$c_{j+1} - c_j = T_{C,j}$ of that sequence alone; the intervals below are built from those offsets on the
device (no host loop).
"""

from __future__ import annotations

import torch

from reference._checks import check_compressed_length, check_config, check_cu_seqlens, check_qkv, check_scale
from reference.config import NSAConfig

from ._common import check_kernel_device, check_kernel_dtype, shape_metadata
from ._interval import IntervalAttention, as_bounds, token_sequences
from .compression import compressed_offsets

# dk/dv of a compressed block sum over every later query: the backward splits those (position, head)
# rows into chunks of this many, one program each (fp32 atomics), so that long sequences fill the GPU.
DKV_SPLIT_ROWS = 16384


def compressed_interval_bounds(
    T: int, TC: int, config: NSAConfig, cu_seqlens: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """(q_lo, q_hi) int32 [T]: the visible blocks of query t; (k_first, k_last) int32 [TC]: the queries of block i
    (built once per shape for a dense batch)."""
    l, d = config.compress_block, config.compress_stride

    def build() -> tuple[torch.Tensor, ...]:
        cu, t, seq = token_sequences(T, cu_seqlens, device)
        c_cu = compressed_offsets(cu, config)  # [N + 1]
        visible = torch.clamp(torch.div(t - cu[seq] + 1 - l, d, rounding_mode="floor") + 1, min=0)  # n_t
        q_lo = c_cu[seq]
        i = torch.arange(TC, device=device)
        i_seq = torch.searchsorted(c_cu, i, right=True) - 1  # [TC] which sequence holds block i
        k_first = cu[i_seq] + (i - c_cu[i_seq]) * d + l - 1  # the block's last token: the first query that sees it
        return as_bounds(q_lo, q_lo + visible, k_first, cu[i_seq + 1])

    return shape_metadata(build, ("compressed_bounds", T, TC, l, d, device) if cu_seqlens is None else None)


def compressed_attention(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    config: NSAConfig,
    *,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query over the compressed blocks that have ended.

    q [B, T, HQ, DK], k_cmp [B, TC, H, DK], v_cmp [B, TC, H, DV] (float16, bfloat16 or float32) with
    TC = floor((T - l) / d) + 1 (0 when T < l; with ``cu_seqlens``, the sum of each sequence's TC).
    Returns o [B, T, HQ, DV] (q's dtype) and lse [B, T, HQ] float32 (-inf where no block is visible);
    both are differentiable.
    """
    config = check_config(config)
    B, T, _, _, DK, _ = check_qkv(q, k_cmp, v_cmp, "k_cmp", "v_cmp")
    scale = check_scale(scale, DK)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, T)
    check_compressed_length(k_cmp, T, config, cu_seqlens)
    check_kernel_dtype("q", q)
    check_kernel_device("q", q)
    return compressed_core(q, k_cmp, v_cmp, config, scale, cu_seqlens)


def compressed_core(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    config: NSAConfig,
    scale: float,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`compressed_attention` on checked arguments (``nsa_attention`` checks them once for every branch)."""
    bounds = compressed_interval_bounds(q.shape[1], k_cmp.shape[1], config, cu_seqlens, q.device)
    return IntervalAttention.apply(q, k_cmp, v_cmp, bounds, scale, DKV_SPLIT_ROWS)
