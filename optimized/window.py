r"""Sliding-window attention in Triton: flash-style tiles over the keys $t - w < s \le t$ only.

Same definition as ``reference/window.py`` (exactly $w$ keys once $t \ge w - 1$, spec section 7). The
window is *interval attention* (``_interval.py``): query $t$ reads keys $[\max(t - w + 1, \mathrm{start}_t),
t + 1)$, and key $s$ is read by queries $[s, \min(s + w, \mathrm{end}_s))$, where $[\mathrm{start}, \mathrm{end})$
is the token's own sequence (the whole row without ``cu_seqlens``). A tile of ``BM`` rows (all query heads
of a GQA group times ``BM / G`` positions) visits only the about $w + BM / G$ keys its rows can see.
"""

from __future__ import annotations

import torch

from reference._checks import check_config, check_cu_seqlens, check_dim, check_qkv, check_scale
from reference.config import NSAConfig

from ._common import check_kernel_device, check_kernel_dtype, shape_metadata
from ._interval import IntervalAttention, as_bounds, token_sequences


def window_bounds(
    T: int, window: int, cu_seqlens: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """(q_lo, q_hi, k_first, k_last) int32 [T]: the keys of query t and the queries of key s (built once per
    shape for a dense batch)."""

    def build() -> tuple[torch.Tensor, ...]:
        cu, t, seq = token_sequences(T, cu_seqlens, device)
        start, end = cu[seq], cu[seq + 1]
        q_lo = torch.maximum(t - window + 1, start)
        k_last = torch.minimum(t + window, end)
        return as_bounds(q_lo, t + 1, t, k_last)

    return shape_metadata(build, ("window_bounds", T, window, device) if cu_seqlens is None else None)


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: NSAConfig,
    *,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention over keys ``t - w < s <= t``.

    q [B, T, HQ, DK], k [B, T, H, DK], v [B, T, H, DV] (float16, bfloat16 or float32).
    Returns o [B, T, HQ, DV] in q's dtype.
    """
    config = check_config(config)
    B, T, _, _, DK, _ = check_qkv(q, k, v)
    check_dim("k", k, 1, T, "T, as q")
    scale = check_scale(scale, DK)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, T)
    check_kernel_dtype("q", q)
    check_kernel_device("q", q)
    return window_core(q, k, v, config, scale, cu_seqlens)


def window_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: NSAConfig,
    scale: float,
    cu_seqlens: torch.Tensor | None,
) -> torch.Tensor:
    """:func:`sliding_window_attention` on checked arguments (``nsa_attention`` checks them once)."""
    bounds = window_bounds(q.shape[1], config.window, cu_seqlens, q.device)
    o, _ = IntervalAttention.apply(q, k, v, bounds, scale)
    return o
