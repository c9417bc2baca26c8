r"""The NSA core: three branches read by every query, mixed by learned gates (paper Eq. 5).

$$o^*_t = \sum_{c \in \{cmp,\, slc,\, win\}} g^c_t \cdot \mathrm{Attn}\big(q_t, \tilde K^c_t, \tilde V^c_t\big)$$

with gates $g^c_t \in (0, 1)$, one per query head and branch (``gates[..., c]`` in the order cmp, slc,
win; the layer computes them from $x_t$ with an MLP and a sigmoid). The selected branch reads the
blocks that the compressed branch's probabilities rank highest (Eq. 8-12), so the core runs
compression attention first, selects (no gradient flows through the choice), then the other two.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._checks import check_config, check_nsa_inputs
from .compressed import compressed_attention
from .config import NSAConfig
from .selected import selected_attention
from .selection import select_blocks
from .window import sliding_window_attention


class NSAOutput(NamedTuple):
    """Everything the core computes, for teaching and debugging (``return_aux=True``)."""

    o: torch.Tensor  # [B, T, HQ, DV] the gated sum (Eq. 5)
    o_cmp: torch.Tensor  # [B, T, HQ, DV]
    o_slc: torch.Tensor  # [B, T, HQ, DV]
    o_win: torch.Tensor  # [B, T, HQ, DV]
    lse_cmp: torch.Tensor  # [B, T, HQ] float32 (float64 for float64 inputs)
    block_idx: torch.Tensor  # [B, T, H, n] int32


def combine_gates(gates: torch.Tensor, o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor) -> torch.Tensor:
    """Eq. 5: ``sum_c gates[..., c] * o_c`` in float32 (float64 for float64 branches), in the branches' dtype.

    gates [B, T, HQ, 3].
    """
    acc = torch.promote_types(o_cmp.dtype, torch.float32)
    g = gates.to(acc)[..., None]  # [B, T, HQ, 3, 1]
    o = g[..., 0, :] * o_cmp.to(acc) + g[..., 1, :] * o_slc.to(acc) + g[..., 2, :] * o_win.to(acc)
    return o.to(o_cmp.dtype)


def nsa_attention(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    k_slc: torch.Tensor,
    v_slc: torch.Tensor,
    k_win: torch.Tensor,
    v_win: torch.Tensor,
    gates: torch.Tensor,
    config: NSAConfig,
    *,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    return_aux: bool = False,
) -> torch.Tensor | NSAOutput:
    """Native sparse attention over already-projected (and compressed) keys and values.

    q [B, T, HQ, DK]; k_cmp/v_cmp [B, TC, H, DK/DV] compressed; k_slc/v_slc and k_win/v_win
    [B, T, H, DK/DV]; gates [B, T, HQ, 3] in (0, 1), order (cmp, slc, win).
    Returns o [B, T, HQ, DV] (or an ``NSAOutput`` with every branch when ``return_aux``).
    """
    config = check_config(config)
    check_nsa_inputs(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, config, cu_seqlens)
    kw = {"scale": scale, "cu_seqlens": cu_seqlens}
    o_cmp, lse = compressed_attention(q, k_cmp, v_cmp, config, **kw)
    block_idx = select_blocks(q.detach(), k_cmp.detach(), lse.detach(), config, **kw)  # Eq. 8-11, no gradient
    o_slc = selected_attention(q, k_slc, v_slc, block_idx, config, **kw)  # Eq. 12
    o_win = sliding_window_attention(q, k_win, v_win, config, **kw)
    o = combine_gates(gates, o_cmp, o_slc, o_win)  # Eq. 5
    if return_aux:
        return NSAOutput(o, o_cmp, o_slc, o_win, lse, block_idx)
    return o
