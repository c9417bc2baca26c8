r"""Sliding-window attention: the last $w$ tokens, attended in full (paper section 3.3.3, Eq. 5).

$$\tilde K^{win}_t = k_{t-w+1:t}, \qquad
  o^{win}_t = \sum_{t - w < s \le t} \mathrm{softmax}_s\big(\tfrac{q_t^\top k_s}{\sqrt{d_k}}\big)\, v_s$$

Exactly $w$ keys once $t \ge w - 1$ (some implementations attend to $w + 1$ keys; spec section 7).
The window branch has its own keys and values (paper section 3.3.3: independent K/V per branch
stop the window's local patterns from shortcutting the other branches).
"""

from __future__ import annotations

import torch

from ._checks import check_config, check_cu_seqlens, check_dim, check_qkv, check_scale
from .config import NSAConfig
from .masks import window_visible
from .softmax import accumulate_dtype, masked_softmax, query_chunk
from .varlen import map_sequences


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

    q [B, T, HQ, DK], k [B, T, H, DK], v [B, T, H, DV]. Returns o [B, T, HQ, DV] in q's dtype.
    """
    config = check_config(config)
    B, T, _, _, DK, _ = check_qkv(q, k, v)
    check_dim("k", k, 1, T, "T, as q")
    scale = check_scale(scale, DK)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, T)
        return map_sequences(  # type: ignore[return-value]
            lambda q_, k_, v_: _window_attention(q_, k_, v_, config, scale), cu_seqlens, config, [q, k, v]
        )
    return _window_attention(q, k, v, config, scale)


def _window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: NSAConfig, scale: float
) -> torch.Tensor:
    B, T, HQ, DK = q.shape
    H, DV, w = k.shape[2], v.shape[3], config.window
    qg = q.view(B, T, H, HQ // H, DK)  # [B, T, H, G, DK]
    acc = accumulate_dtype(q.dtype)
    positions = torch.arange(T, device=q.device)
    chunk = min(T, max(64, w))
    chunk = min(chunk, query_chunk(B * HQ * (chunk + w) * 4 * 4))
    parts = []
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        s0 = max(0, t0 - w + 1)  # the oldest key any query of this chunk can see
        s = torch.einsum("bthgd,bshd->bthgs", qg[:, t0:t1], k[:, s0:t1]).to(acc) * scale  # [B, Tc, H, G, S]
        visible = window_visible(positions[t0:t1], positions[s0:t1], config)  # t - w < s <= t
        p, _ = masked_softmax(s, visible[None, :, None, None, :])
        parts.append(torch.einsum("bthgs,bshd->bthgd", p.to(v.dtype), v[:, s0:t1]))  # [B, Tc, H, G, DV]
    return torch.cat(parts, dim=1).reshape(B, T, HQ, DV)
