r"""Rotary position embedding (RoPE, Su et al. 2021) on ``[B, T, H, D]`` tensors.

Split the head dim in halves $x = [x^{(1)}, x^{(2)}]$ (the "rotate half" convention) and rotate each
pair $(x^{(1)}_i, x^{(2)}_i)$ by the angle $p\, \theta_i$ of the token's position $p$:

$$\theta_i = \beta^{-2i/D}, \qquad
  \mathrm{RoPE}(x, p) = \big[x^{(1)} \cos p\theta - x^{(2)} \sin p\theta,\;
                            x^{(2)} \cos p\theta + x^{(1)} \sin p\theta\big], \quad i < D/2,$$

with base $\beta$ = ``base`` (default 10000). Then $\mathrm{RoPE}(q, p)^\top \mathrm{RoPE}(k, s)$
depends on $p - s$ only. Positions restart at 0 for every packed sequence (``cu_seqlens``) and start
at ``offset`` when decoding (the tokens already in the cache).

Where NSA applies it (our choice; the paper does not say): to the queries and to the raw keys of all
three branches, the compression branch's keys *before* $\varphi$ (Eq. 7). So every key the queries
meet lives in the same rotated frame; with mean pooling a compressed key is the average of its block's
rotated keys (what the popular shared-K/V implementations compute), and the MLP $\varphi$ is free to
learn from the rotated block. Values are never rotated.
"""

from __future__ import annotations

import torch

from ._checks import check_cu_seqlens, check_tensor


def rope_positions(
    seq_len: int, *, cu_seqlens: torch.Tensor | None = None, offset: int = 0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """[T] int64 positions: ``offset + t``, or restarting at 0 at each ``cu_seqlens`` boundary."""
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a non-negative int, got {offset!r}")
    if cu_seqlens is None:
        return torch.arange(offset, offset + seq_len, device=device)
    if offset != 0:
        raise ValueError("offset must be 0 with cu_seqlens (packed sequences start at position 0)")
    t = torch.arange(seq_len, device=device)
    starts = cu_seqlens.to(device=device, dtype=torch.int64)
    return t - starts[torch.searchsorted(starts, t, right=True) - 1]  # t minus its sequence's first token


def apply_rope(
    x: torch.Tensor, *, base: float = 10000.0, cu_seqlens: torch.Tensor | None = None, offset: int = 0
) -> torch.Tensor:
    """Rotate x [B, T, H, D] (D even) by its tokens' positions. Returns [B, T, H, D] in x's dtype."""
    check_tensor("x", x, 4, "[B, T, H, D]")
    B, T, _, D = x.shape
    if D % 2 != 0:
        raise ValueError(f"RoPE needs an even head dim, got D={D}")
    if isinstance(base, bool) or not isinstance(base, (int, float)) or base <= 1:
        raise ValueError(f"base must be a number > 1, got {base!r}")
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, T)
    pos = rope_positions(T, cu_seqlens=cu_seqlens, offset=offset, device=x.device).double()  # [T]
    inv_freq = base ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float64) / D)  # theta_i [D/2]
    angle = pos[:, None] * inv_freq[None, :]  # p theta_i: [T, D/2]
    dtype = torch.promote_types(x.dtype, torch.float32)
    cos = angle.cos().to(dtype)[None, :, None, :]  # [1, T, 1, D/2]
    sin = angle.sin().to(dtype)[None, :, None, :]
    x1, x2 = x.to(dtype).chunk(2, dim=-1)  # [B, T, H, D/2] each
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
