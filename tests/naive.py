"""An independent, deliberately naive NSA written from the spec (``shared/nsa-spec.md``), not from ``reference``.

Every function loops over (batch, query, head) in Python and computes in float64, so each line can be
checked against one sentence of the spec. Inputs are ``[B, T, heads, D]`` tensors like the public API;
outputs are float64 and differentiable (autograd through the loops).
"""

from __future__ import annotations

import math

import torch

from reference import NSAConfig


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of one query ``q [DK]`` over ``k [S, DK]``, ``v [S, DV]``: (o [DV], lse []).

    No key at all: o = 0 and lse = -inf (spec section 4).
    """
    if k.shape[0] == 0:
        return q.new_zeros(v.shape[1]), q.new_tensor(-math.inf)
    scores = (k @ q) * scale
    lse = torch.logsumexp(scores, dim=0)
    return torch.exp(scores - lse) @ v, lse


def _f64(*xs: torch.Tensor) -> list[torch.Tensor]:
    return [x.double() for x in xs]


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


def num_visible_compressed(t: int, config: NSAConfig) -> int:
    """n_t: compressed blocks [i d, i d + l) that have ended at query t (spec section 3)."""
    return max(0, (t + 1 - config.compress_block) // config.compress_stride + 1)


def compressed(
    q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, config: NSAConfig, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compressed attention (spec section 4): o [B, T, HQ, DV] and lse [B, T, HQ]."""
    q, k_cmp, v_cmp = _f64(q, k_cmp, v_cmp)
    B, T, HQ, _ = q.shape
    G = HQ // k_cmp.shape[2]
    sc = _scale(q, scale)
    o = [[[None] * HQ for _ in range(T)] for _ in range(B)]
    lse = [[[None] * HQ for _ in range(T)] for _ in range(B)]
    for b in range(B):
        for t in range(T):
            n = num_visible_compressed(t, config)
            for h in range(HQ):
                o[b][t][h], lse[b][t][h] = attend(q[b, t, h], k_cmp[b, :n, h // G], v_cmp[b, :n, h // G], sc)
    return _stack(o), _stack(lse)


def _stack(nested: list) -> torch.Tensor:
    if isinstance(nested, torch.Tensor):
        return nested
    return torch.stack([_stack(x) for x in nested])


def overlap(i: int, j: int, config: NSAConfig) -> float:
    """|[i d, i d + l) ∩ [j l', (j+1) l')| / d (spec section 5)."""
    d, l, ls = config.compress_stride, config.compress_block, config.select_block
    return max(0, min(i * d + l, (j + 1) * ls) - max(i * d, j * ls)) / d


def selection_scores(
    q: torch.Tensor, k_cmp: torch.Tensor, config: NSAConfig, scale: float | None = None
) -> torch.Tensor:
    """P[b, t, g, j] = sum over the group's heads of sum_i overlap(i, j) p_cmp[t, h, i] (spec section 5).

    Returns [B, T, H, ceil(T / l')], 0 for blocks nobody can see yet.
    """
    q, k_cmp = _f64(q.detach(), k_cmp.detach())
    B, T, HQ, _ = q.shape
    H = k_cmp.shape[2]
    G = HQ // H
    sc = _scale(q, scale)
    NS = -(-T // config.select_block)
    W = torch.tensor([[overlap(i, j, config) for j in range(NS)] for i in range(k_cmp.shape[1])], dtype=torch.float64)
    P = torch.zeros(B, T, H, NS, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            n = num_visible_compressed(t, config)
            for h in range(HQ):
                if n > 0:
                    p_cmp = torch.softmax((k_cmp[b, :n, h // G] @ q[b, t, h]) * sc, dim=0)
                    P[b, t, h // G] += p_cmp @ W[:n]
    return P


def forced(t: int, config: NSAConfig) -> set[int]:
    """The always-selected blocks of query t: the first num_initial and the num_local ending at t // l'."""
    current = t // config.select_block
    initial = {j for j in range(config.num_initial) if j <= current}
    local = {j for j in range(current - config.num_local + 1, current + 1) if j >= 0}
    return initial | local


def select(scores: torch.Tensor, config: NSAConfig) -> torch.Tensor:
    """Top-n selection from P [B, T, H, NS] (spec section 6): [B, T, H, n] int32, ascending, -1 padded."""
    B, T, H, _ = scores.shape
    n = config.num_selected
    out = torch.full((B, T, H, n), -1, dtype=torch.int32)
    for b in range(B):
        for t in range(T):
            must = forced(t, config)
            for g in range(H):
                others = [j for j in range(t // config.select_block + 1) if j not in must]
                others.sort(key=lambda j: (-float(scores[b, t, g, j]), j))  # highest first, ties to lower j
                chosen = sorted(must | set(others[: n - len(must)]))
                out[b, t, g, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return out


def selected(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    config: NSAConfig,
    scale: float | None = None,
) -> torch.Tensor:
    """Selected attention (spec section 7): keys s <= t inside the group's blocks (-1 = none)."""
    q, k, v = _f64(q, k, v)
    B, T, HQ, _ = q.shape
    G = HQ // k.shape[2]
    ls = config.select_block
    sc = _scale(q, scale)
    o = [[[None] * HQ for _ in range(T)] for _ in range(B)]
    for b in range(B):
        for t in range(T):
            for h in range(HQ):
                blocks = [int(j) for j in block_idx[b, t, h // G] if j >= 0]
                keys = [s for s in range(t + 1) if s // ls in blocks]
                o[b][t][h] = attend(q[b, t, h], k[b, keys, h // G], v[b, keys, h // G], sc)[0]
    return _stack(o)


def window(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: NSAConfig, scale: float | None = None
) -> torch.Tensor:
    """Sliding window (spec section 7): the w keys t - w < s <= t."""
    q, k, v = _f64(q, k, v)
    B, T, HQ, _ = q.shape
    G = HQ // k.shape[2]
    sc = _scale(q, scale)
    o = [[[None] * HQ for _ in range(T)] for _ in range(B)]
    for b in range(B):
        for t in range(T):
            lo = max(0, t - config.window + 1)
            for h in range(HQ):
                o[b][t][h] = attend(q[b, t, h], k[b, lo : t + 1, h // G], v[b, lo : t + 1, h // G], sc)[0]
    return _stack(o)


def causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Full causal attention (keys s <= t), the limit several properties reach."""
    T = q.shape[1]
    return window(q, k, v, NSAConfig(compress_block=1, compress_stride=1, select_block=1, window=T), scale)


def nsa(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    k_slc: torch.Tensor,
    v_slc: torch.Tensor,
    k_win: torch.Tensor,
    v_win: torch.Tensor,
    gates: torch.Tensor,
    config: NSAConfig,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated core (eq. 5): (o [B, T, HQ, DV], block_idx [B, T, H, n])."""
    o_cmp, _ = compressed(q, k_cmp, v_cmp, config, scale)
    block_idx = select(selection_scores(q, k_cmp, config, scale), config)
    o_slc = selected(q, k_slc, v_slc, block_idx, config, scale)
    o_win = window(q, k_win, v_win, config, scale)
    g = gates.double()
    return g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_win, block_idx


def mean_compress(x: torch.Tensor, config: NSAConfig) -> torch.Tensor:
    """Mean pooling phi (spec section 3): [B, T, H, D] -> [B, TC, H, D], block i = mean of x[i d : i d + l]."""
    T = x.shape[1]
    TC = max(0, (T - config.compress_block) // config.compress_stride + 1)
    d, l = config.compress_stride, config.compress_block
    return torch.stack([x[:, i * d : i * d + l].mean(dim=1) for i in range(TC)], dim=1) if TC else x[:, :0]
