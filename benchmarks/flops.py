r"""What each NSA branch must compute and move: FLOPs and the fewest HBM bytes, per forward pass.

An attention "pair" is one (query token, key token) product that the sparse pattern really needs.
Each pair costs $2 D_K$ FLOPs for $q \cdot k$ and $2 D_V$ for $p \, v$, per query head, so a branch's
forward FLOPs are $2 \, B \, H_Q \, (D_K + D_V) \sum_t \mathrm{pairs}_t$ (with $D_K = D_V = D$:
$4 B H_Q D \sum_t \mathrm{pairs}_t$). Backward is counted as 2.5x forward by convention (the
FlashAttention papers' count: five matrix products instead of two). Bytes are each input read once
and each output written once: the memory floor, not what a kernel really moves.
"""

from __future__ import annotations

from dataclasses import dataclass

from reference import NSAConfig

BWD_FLOPS_FACTOR = 2.5
"""Backward FLOPs = 2.5 x forward FLOPs (convention; the selection step has no backward)."""

CEILINGS = {"H100": (790.0, 3.0), "H200": (790.0, 4.3)}
"""Measured ceilings per card (dense bf16 TFLOP/s of an 8192^3 matmul, device-to-device copy TB/s)."""


@dataclass(frozen=True)
class AttnShape:
    """Batch, query heads, kv heads, head dims and bytes per element of one attention problem."""

    batch: int
    heads_q: int
    heads_kv: int
    dim_k: int
    dim_v: int
    elem_bytes: int = 2


def ceilings(card_name: str) -> tuple[float, float]:
    """(TFLOP/s, TB/s) for a card name such as 'NVIDIA H100 80GB HBM3'; the H100's when unknown."""
    for key, value in CEILINGS.items():
        if key in card_name:
            return value
    return CEILINGS["H100"]


def causal_pairs(seq_len: int) -> int:
    """Full causal attention: query ``t`` reads ``t + 1`` keys."""
    return seq_len * (seq_len + 1) // 2


def window_pairs(seq_len: int, config: NSAConfig) -> int:
    """Sliding window: ``min(w, t + 1)`` keys per query."""
    w = config.window
    if seq_len <= w:
        return causal_pairs(seq_len)
    return causal_pairs(w) + (seq_len - w) * w


def compressed_pairs(seq_len: int, config: NSAConfig) -> int:
    """Compressed branch: ``n_t = floor((t + 1 - l) / d) + 1`` visible blocks per query (0 before the first)."""
    l, d = config.compress_block, config.compress_stride
    return sum((t + 1 - l) // d + 1 for t in range(l - 1, seq_len))


def selected_pairs(seq_len: int, config: NSAConfig) -> int:
    """Selected branch: keys ``s <= t`` in the selected blocks, per query and kv-head group.

    With ``num_local >= 1`` the current block is always selected, so the count does not depend on the
    data: all ``t + 1`` keys while at most ``n`` blocks are candidates, else ``n - 1`` full blocks plus
    the ``t mod l' + 1`` keys of the current one.
    """
    if config.num_local < 1:
        raise ValueError("selected_pairs needs num_local >= 1 (otherwise the count depends on the data)")
    ls, n = config.select_block, config.num_selected
    full = n * ls  # queries t < n * l' have at most n candidate blocks and read every key
    head = causal_pairs(min(seq_len, full))
    rest = range(full, seq_len)
    return head + sum((n - 1) * ls + t % ls + 1 for t in rest)


def attention_flops(pairs: int, shape: AttnShape) -> int:
    """Forward FLOPs of attention over ``pairs`` (query, key) products: 2 (DK + DV) per pair and query head."""
    return 2 * shape.batch * shape.heads_q * (shape.dim_k + shape.dim_v) * pairs


def branch_flops(seq_len: int, shape: AttnShape, config: NSAConfig) -> dict[str, int]:
    """Forward FLOPs per part: compressed, selection (score recompute, q.k only), selected, window,
    core (all of them) and full (dense causal attention, the baselines)."""
    cmp_pairs = compressed_pairs(seq_len, config)
    flops = {
        "compressed": attention_flops(cmp_pairs, shape),
        "selection": 2 * shape.batch * shape.heads_q * shape.dim_k * cmp_pairs,
        "selected": attention_flops(selected_pairs(seq_len, config), shape),
        "window": attention_flops(window_pairs(seq_len, config), shape),
    }
    flops["core"] = sum(flops.values())
    flops["full"] = attention_flops(causal_pairs(seq_len), shape)
    return flops


def backward_flops(part: str, fwd_flops: int, flops: dict[str, int]) -> int:
    """Backward FLOPs of ``part`` = 2.5 x its forward (the core's excludes the selection, which has none)."""
    if part == "selection":
        return 0
    if part == "core":
        fwd_flops -= flops["selection"]
    return round(BWD_FLOPS_FACTOR * fwd_flops)


def branch_bytes(seq_len: int, shape: AttnShape, config: NSAConfig) -> dict[str, int]:
    """Fewest HBM bytes of each part's forward pass: inputs read once, outputs written once.

    lse is float32 and block indices are int32; everything else has ``shape.elem_bytes``.
    """
    e, b, hq, h, dk, dv = shape.elem_bytes, shape.batch, shape.heads_q, shape.heads_kv, shape.dim_k, shape.dim_v
    tc = config.num_compressed(seq_len)
    q = b * seq_len * hq * dk * e
    o = b * seq_len * hq * dv * e
    kv = b * seq_len * h * (dk + dv) * e
    kv_cmp = b * tc * h * (dk + dv) * e
    k_cmp = b * tc * h * dk * e
    lse = b * seq_len * hq * 4
    idx = b * seq_len * h * config.num_selected * 4
    gates = b * seq_len * hq * 3 * e
    return {
        "compressed": q + kv_cmp + o + lse,
        "selection": q + k_cmp + lse + idx,
        "selected": q + kv + idx + o,
        "window": q + kv + o,
        "core": q + kv_cmp + 2 * kv + gates + o,
        "full": q + kv + o,
    }


def decode_bytes(tokens_read: int, shape: AttnShape) -> int:
    """HBM bytes of one decode step that reads ``tokens_read`` cached tokens per kv head (K and V),
    plus the query in and the output out."""
    kv = shape.batch * tokens_read * shape.heads_kv * (shape.dim_k + shape.dim_v) * shape.elem_bytes
    return kv + shape.batch * shape.heads_q * (shape.dim_k + shape.dim_v) * shape.elem_bytes
