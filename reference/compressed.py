r"""Compressed attention: every query reads the summaries of the blocks that have ended (paper Eq. 5, 7).

The compressed keys and values (paper Eq. 7) summarise overlapping blocks of $l$ tokens with stride $d$:

$$\tilde K^{cmp}_t = f_K^{cmp}(k_{:t}) = \{\varphi(k_{id+1:id+l}) \mid 0 \le i \le \lfloor (t-l)/d \rfloor\}$$

(``compression.py`` computes them). With our 0-indexed tokens, block $i$ covers $[i d, i d + l)$ and
query $t$ sees it iff it has ended, $i d + l - 1 \le t$, so $n_t = \lfloor (t + 1 - l) / d \rfloor + 1$
blocks are visible (spec section 3). Attention over them (paper Eq. 1-2 applied to $\tilde K, \tilde V$):

$$o^{cmp}_t = \sum_{i < n_t} \mathrm{softmax}_i\big(\tfrac{q_t^\top \tilde k_i}{\sqrt{d_k}}\big)\, \tilde v_i,
\qquad \mathrm{lse}_t = \log \sum_{i < n_t} \exp\big(\tfrac{q_t^\top \tilde k_i}{\sqrt{d_k}}\big)$$

With $n_t = 0$ the output is exactly 0 and $\mathrm{lse}_t = -\infty$ (spec section 4). The
log-sum-exp is returned because the selection scores (``selection.py``, Eq. 8) are these same
probabilities: $p^{cmp}_{t,i} = \exp(q_t^\top \tilde k_i / \sqrt{d_k} - \mathrm{lse}_t)$.
"""

from __future__ import annotations

import torch

from ._checks import check_compressed_length, check_config, check_cu_seqlens, check_qkv, check_scale
from .config import NSAConfig
from .masks import compressed_visible
from .softmax import accumulate_dtype, masked_softmax, query_chunk
from .varlen import map_sequences


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

    q [B, T, HQ, DK], k_cmp [B, TC, H, DK], v_cmp [B, TC, H, DV] with TC = floor((T - l) / d) + 1
    (0 when T < l; with ``cu_seqlens``, the sum of each sequence's TC).
    Returns o [B, T, HQ, DV] (q's dtype) and lse [B, T, HQ] float32 (float64 for float64 inputs; -inf where no
    block is visible).
    """
    config = check_config(config)
    B, T, _, _, DK, _ = check_qkv(q, k_cmp, v_cmp, "k_cmp", "v_cmp")
    scale = check_scale(scale, DK)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, T)
    check_compressed_length(k_cmp, T, config, cu_seqlens)
    if cu_seqlens is not None:
        return map_sequences(  # type: ignore[return-value]
            lambda q_, k_, v_: _compressed_attention(q_, k_, v_, config, scale),
            cu_seqlens,
            config,
            [q],
            [k_cmp, v_cmp],
        )
    return _compressed_attention(q, k_cmp, v_cmp, config, scale)


def _compressed_attention(
    q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, config: NSAConfig, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, HQ, DK = q.shape
    TC, H, DV = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[3]
    qg = q.view(B, T, H, HQ // H, DK)  # [B, T, H, G, DK]: query head h reads kv head h // G
    acc = accumulate_dtype(q.dtype)
    t_all = torch.arange(T, device=q.device)
    i = torch.arange(TC, device=q.device)
    o_parts, lse_parts = [], []
    chunk = query_chunk(B * HQ * max(TC, 1) * 4 * 4)
    for t0 in range(0, T, chunk):
        t = t_all[t0 : t0 + chunk]
        s = torch.einsum("bthgd,bshd->bthgs", qg[:, t0 : t0 + chunk], k_cmp).to(acc) * scale  # [B, Tc, H, G, TC]
        visible = compressed_visible(t, i, config)[None, :, None, None, :]  # i d + l - 1 <= t (spec 3)
        p, lse = masked_softmax(s, visible)  # softmax over the n_t visible blocks (Eq. 1-2)
        o_parts.append(torch.einsum("bthgs,bshd->bthgd", p.to(v_cmp.dtype), v_cmp))  # [B, Tc, H, G, DV]
        lse_parts.append(lse)
    o = torch.cat(o_parts, dim=1).reshape(B, T, HQ, DV)
    lse = torch.cat(lse_parts, dim=1).reshape(B, T, HQ)
    return o, lse
