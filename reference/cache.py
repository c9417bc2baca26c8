r"""The decoding KV cache and one decode step (spec section 8).

Per layer the cache holds what the next query can read, per branch:

* selection branch: the raw keys and values of **all** tokens, $k^{slc}_{0:t+1}$ (any block may be selected);
* window branch: the last $w$ tokens, $k^{win}_{t-w+1:t+1}$;
* compression branch: the compressed tokens produced so far, $\tilde k_{0:T_C(t+1)}$, and the raw tail
  of at most $l - 1$ tokens that the next block needs. Block $i$ covers $[i d, i d + l)$, so a new
  block completes at token $t$ whenever $t + 1 \ge l$ and $(t + 1 - l) \bmod d = 0$; it is then
  $\varphi(k^{cmp}_{t-l+1:t+1})$ (Eq. 7) and every later query sees it (spec section 3).

Keys are stored rotated (RoPE is applied before caching; ``rope.py``). One decode step at position $t$
computes, for the single query $q_t$, exactly what the parallel forward computes at row $t$:
compressed attention over all cached compressed tokens (all of them have ended), the selection scores
(Eq. 8-10) and top-$n$ (Eq. 11) for that one query, selected attention (Eq. 12) over the cached raw
tokens, window attention over the cached window, and the gated sum (Eq. 5).

The batch holds sequences of equal length (B >= 1); ragged decoding is the optimized package's job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from ._checks import check_config, check_scale
from .config import NSAConfig
from .nsa import NSAOutput, combine_gates
from .selected import selected_core
from .selection import overlap_weights, top_n_blocks
from .softmax import accumulate_dtype, masked_softmax


def _filled(*tensors: torch.Tensor | None) -> list[torch.Tensor]:
    """The cache's tensors, which exist once it has been prefilled."""
    if any(x is None for x in tensors):
        raise ValueError("the cache is empty: run the layer on a prompt with cache=... first")
    return [x for x in tensors if x is not None]


class BranchKV(NamedTuple):
    """Raw (uncompressed, rotated) keys and values of the three branches, each [B, T, H, DK or DV]."""

    k_cmp: torch.Tensor
    v_cmp: torch.Tensor
    k_slc: torch.Tensor
    v_slc: torch.Tensor
    k_win: torch.Tensor
    v_win: torch.Tensor


@dataclass
class NSACache:
    """One layer's decoding state; starts empty, filled by a prefill, grown by one token per step.

    Use it through the layer: ``y = layer(prompt, cache=cache)`` on an empty cache runs the parallel
    forward and fills the cache; every later ``layer(x, cache=cache)`` decodes ``x``'s tokens one by one.
    A model keeps one ``NSACache`` per layer.
    """

    config: NSAConfig | None = None
    length: int = 0  # tokens seen so far; the next token has position `length`
    k_slc: torch.Tensor | None = None  # [B, length, H, DK]: all tokens
    v_slc: torch.Tensor | None = None  # [B, length, H, DV]
    k_win: torch.Tensor | None = None  # [B, min(length, w), H, DK]: the last w tokens
    v_win: torch.Tensor | None = None  # [B, min(length, w), H, DV]
    k_cmp: torch.Tensor | None = None  # [B, TC(length), H, DK]: compressed tokens so far
    v_cmp: torch.Tensor | None = None  # [B, TC(length), H, DV]
    k_tail: torch.Tensor | None = None  # [B, min(length, l - 1), H, DK]: raw compression-branch tail
    v_tail: torch.Tensor | None = None  # [B, min(length, l - 1), H, DV]

    @property
    def is_empty(self) -> bool:
        return self.length == 0

    def reset(self) -> None:
        """Forget everything (start a new sequence)."""
        for name in self.__dataclass_fields__:
            setattr(self, name, None)
        self.length = 0

    def prefill(self, kv: BranchKV, k_cmp: torch.Tensor, v_cmp: torch.Tensor, config: NSAConfig) -> None:
        """Fill an empty cache from a prompt's raw branch K/V [B, T, H, D] and its compressed K/V [B, TC, H, D]."""
        config = check_config(config)
        if not self.is_empty:
            raise ValueError(f"prefill needs an empty cache, this one holds {self.length} tokens (call reset())")
        T, w, tail = kv.k_slc.shape[1], config.window, config.compress_block - 1
        if k_cmp.shape[1] != config.num_compressed(T):
            raise ValueError(f"k_cmp must hold TC = {config.num_compressed(T)} blocks, got {k_cmp.shape[1]}")
        self.config, self.length = config, T
        self.k_slc, self.v_slc = kv.k_slc, kv.v_slc
        self.k_win, self.v_win = kv.k_win[:, max(0, T - w) :], kv.v_win[:, max(0, T - w) :]
        self.k_cmp, self.v_cmp = k_cmp, v_cmp
        self.k_tail, self.v_tail = kv.k_cmp[:, max(0, T - tail) :], kv.v_cmp[:, max(0, T - tail) :]

    def append(self, kv: BranchKV, phi_k: nn.Module, phi_v: nn.Module) -> bool:
        """Add one token (kv tensors [B, 1, H, D]); compress a block if it completes. Returns whether one did."""
        if self.config is None:
            raise ValueError("append needs a prefilled cache (run the layer on a prompt with cache=... first)")
        k_slc, v_slc, k_win, v_win, k_tail, v_tail, k_cmp, v_cmp = _filled(
            self.k_slc, self.v_slc, self.k_win, self.v_win, self.k_tail, self.v_tail, self.k_cmp, self.v_cmp
        )
        if kv.k_slc.shape[1] != 1:
            raise ValueError(f"append takes one token (T = 1), got T = {kv.k_slc.shape[1]}")
        if kv.k_slc.shape[0] != k_slc.shape[0]:
            raise ValueError(f"batch size {kv.k_slc.shape[0]} does not match the cache's {k_slc.shape[0]}")
        config, t = self.config, self.length  # the new token's position
        l, d, w = config.compress_block, config.compress_stride, config.window
        self.k_slc = torch.cat([k_slc, kv.k_slc], dim=1)
        self.v_slc = torch.cat([v_slc, kv.v_slc], dim=1)
        self.k_win = torch.cat([k_win, kv.k_win], dim=1)[:, -w:]  # keys t - w < s <= t
        self.v_win = torch.cat([v_win, kv.v_win], dim=1)[:, -w:]
        k_tail = torch.cat([k_tail, kv.k_cmp], dim=1)  # [B, min(t + 1, l), H, DK]
        v_tail = torch.cat([v_tail, kv.v_cmp], dim=1)
        completes = t + 1 >= l and (t + 1 - l) % d == 0  # block (t + 1 - l) / d ends at t
        if completes:
            self.k_cmp = torch.cat([k_cmp, phi_k(k_tail[:, None].transpose(2, 3))], dim=1)  # Eq. 7
            self.v_cmp = torch.cat([v_cmp, phi_v(v_tail[:, None].transpose(2, 3))], dim=1)
        keep = max(0, k_tail.shape[1] - (l - 1))  # the next block needs at most l - 1 of these
        self.k_tail, self.v_tail = k_tail[:, keep:], v_tail[:, keep:]
        self.length = t + 1
        return completes


def decode_attention(q: torch.Tensor, gates: torch.Tensor, cache: NSACache, *, scale: float | None = None) -> NSAOutput:
    """NSA for the one query at position t = cache.length - 1 (its token already appended).

    q [B, 1, HQ, DK], gates [B, 1, HQ, 3]. Returns an ``NSAOutput`` whose tensors have T = 1.
    """
    if cache.config is None:
        raise ValueError("decode_attention needs a cache holding at least the current token")
    k_slc, v_slc, k_win, v_win, k_cmp, v_cmp = _filled(
        cache.k_slc, cache.v_slc, cache.k_win, cache.v_win, cache.k_cmp, cache.v_cmp
    )
    config, t = cache.config, cache.length - 1
    B, _, HQ, DK = q.shape
    H, DV = k_slc.shape[2], v_slc.shape[3]
    scale = check_scale(scale, DK)
    qg = q.reshape(B, H, HQ // H, DK)  # [B, H, G, DK]: query head h reads kv head h // G
    acc = accumulate_dtype(q.dtype)  # float32, or float64 for float64 inputs, as the parallel branches

    # Compressed attention: every cached compressed token has ended (i d + l - 1 <= t).
    s = torch.einsum("bhgd,bshd->bhgs", qg, k_cmp).to(acc) * scale  # [B, H, G, TC]
    p, lse = masked_softmax(s, torch.ones_like(s, dtype=torch.bool))
    o_cmp = torch.einsum("bhgs,bshd->bhgd", p.to(v_cmp.dtype), v_cmp)  # [B, H, G, DV]

    # Selection: scores (Eq. 8-10) and top-n with forced blocks (Eq. 11), as selection.py does for row t.
    NS = config.num_select_blocks(t + 1)  # candidates j <= t // l'
    p_cmp = torch.exp(s - lse[..., None])  # Eq. 8
    weights = overlap_weights(s.shape[-1], NS, config, q.device).to(acc)  # [TC, NS] (Eq. 9)
    scores = (p_cmp @ weights).sum(dim=2)  # Eq. 9-10: [B, H, NS]
    position = torch.tensor([t], device=q.device)
    block_idx = top_n_blocks(scores[:, None], position, config)  # [B, 1, H, n] (Eq. 11)

    # Selected attention (Eq. 12) over the cached raw tokens of the chosen blocks, s <= t.
    o_slc = selected_core(q, k_slc, v_slc, block_idx, config, scale, positions=position)  # [B, 1, HQ, DV]

    # Sliding window over the cached last w tokens, all visible.
    s = torch.einsum("bhgd,bshd->bhgs", qg, k_win).to(acc) * scale  # [B, H, G, min(t + 1, w)]
    p, _ = masked_softmax(s, torch.ones_like(s, dtype=torch.bool))
    o_win = torch.einsum("bhgs,bshd->bhgd", p.to(v_win.dtype), v_win)

    o_cmp, o_win = (o.reshape(B, 1, HQ, DV) for o in (o_cmp, o_win))
    o = combine_gates(gates, o_cmp, o_slc, o_win)  # Eq. 5
    return NSAOutput(o, o_cmp, o_slc, o_win, lse.reshape(B, 1, HQ), block_idx)
