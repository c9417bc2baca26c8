"""Masked softmax with its log-sum-exp, safe when a query sees no key at all.

$$p_s = \\frac{\\exp(x_s - m)}{\\sum_{s'} \\exp(x_{s'} - m)}, \\qquad
  \\mathrm{lse} = m + \\log \\sum_{s} \\exp(x_s - m), \\qquad m = \\max_s x_s$$

over the keys the mask lets through. A row with no visible key gets $p = 0$ (so the attention
output is exactly 0) and $\\mathrm{lse} = -\\infty$, and its gradients are 0, never NaN (spec section 4).
"""

from __future__ import annotations

import torch


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last dim of fp32 (or fp64) ``scores`` where ``mask`` is True.

    scores [..., S] float32, mask [..., S] bool (broadcastable). Returns p [..., S] and lse [...] in the scores dtype.
    """
    if scores.shape[-1] == 0:  # no keys at all (e.g. T < l): exp-sum over nothing
        return scores, scores.new_full(scores.shape[:-1], float("-inf"))
    x = scores.masked_fill(~mask, float("-inf"))
    m = x.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    e = torch.exp(x - m)  # masked keys: exp(-inf) = 0
    denom = e.sum(dim=-1, keepdim=True)
    seen = denom > 0
    p = e / torch.where(seen, denom, torch.ones_like(denom))
    lse = torch.where(seen, m + torch.log(torch.where(seen, denom, torch.ones_like(denom))), float("-inf"))
    return p, lse.squeeze(-1)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype scores and softmax are computed in: float32, or float64 for float64 inputs (an exact oracle)."""
    return torch.promote_types(dtype, torch.float32)


def query_chunk(per_query_bytes: int, budget_bytes: int = 1 << 28) -> int:
    """How many queries to process at once so that one chunk's scores stay within ``budget_bytes``."""
    return max(1, budget_bytes // max(1, per_query_bytes))
