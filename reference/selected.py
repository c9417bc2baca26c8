r"""Selected attention: each query reads, in full, the blocks its GQA group selected (paper Eq. 12).

$$\tilde K^{slc}_t = \mathrm{Cat}\big[\{k_{j l' : (j+1) l'} \mid j \in I_t\}\big], \qquad
  o^{slc}_t = \sum_{s \in \tilde K^{slc}_t,\; s \le t}
  \mathrm{softmax}_s\big(\tfrac{q_t^\top k_s}{\sqrt{d_k}}\big)\, v_s$$

$I_t$ are the block indices from ``selection.py`` (Eq. 11), shared by the query heads of a kv head's
group (Eq. 10). The current block is causally masked ($s \le t$). This function takes any indices,
so it can check another implementation's selected-attention kernel on that implementation's own
selection: order does not matter, -1 means "no block", duplicates are rejected (they would count
keys twice).
"""

from __future__ import annotations

import torch

from ._checks import check_config, check_cu_seqlens, check_dim, check_qkv, check_scale, require
from .config import NSAConfig
from .softmax import accumulate_dtype, masked_softmax, query_chunk
from .varlen import map_sequences


def check_block_idx(
    block_idx: object,
    B: int,
    T: int,
    H: int,
    config: NSAConfig,
    device: torch.device,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """block_idx [B, T, H, S] integer, -1 or a block that starts at or before t, no duplicates per row.

    ``positions`` [T]: each token's position t inside its own sequence (packed batches; default 0 .. T-1).
    """
    if not isinstance(block_idx, torch.Tensor):
        raise TypeError(f"block_idx must be an integer torch.Tensor [B, T, H, S], got {type(block_idx).__name__}")
    if block_idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"block_idx must be int32 or int64, got {block_idx.dtype}")
    if block_idx.dim() != 4 or tuple(block_idx.shape[:3]) != (B, T, H) or block_idx.shape[3] == 0:
        raise ValueError(f"block_idx must have shape [B, T, H, S] = [{B}, {T}, {H}, S>0], got {tuple(block_idx.shape)}")
    if block_idx.device != device:
        raise ValueError(f"block_idx is on {block_idx.device} but q is on {device}; they must match")
    require(block_idx >= -1, ValueError, "block_idx entries must be >= 0 or -1 (no block)")
    t = torch.arange(T, device=device) if positions is None else positions
    require(
        block_idx * config.select_block <= t[None, :, None, None],
        ValueError,
        "block_idx is not causal: block j must start at or before t (j * select_block <= t)",
    )
    ordered = torch.sort(block_idx, dim=-1).values
    repeated = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
    require(~repeated, ValueError, "block_idx has a block index repeated within one (b, t, h) row")
    return block_idx


def selected_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    config: NSAConfig,
    *,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over the keys of the selected blocks, ``s <= t``.

    q [B, T, HQ, DK], k [B, T, H, DK], v [B, T, H, DV], block_idx [B, T, H, S] (-1 = none; with
    ``cu_seqlens``, counted from each sequence's first token). Returns o [B, T, HQ, DV] in q's dtype.
    """
    config = check_config(config)
    B, T, _, H, DK, _ = check_qkv(q, k, v)
    check_dim("k", k, 1, T, "T, as q")
    scale = check_scale(scale, DK)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, T)
        return map_sequences(  # type: ignore[return-value]
            lambda q_, k_, v_, i_: selected_core(
                q_, k_, v_, check_block_idx(i_, 1, q_.shape[1], H, config, q.device), config, scale
            ),
            cu_seqlens,
            config,
            [q, k, v, block_idx],
        )
    check_block_idx(block_idx, B, T, H, config, q.device)
    return selected_core(q, k, v, block_idx, config, scale)


def selected_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    config: NSAConfig,
    scale: float,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """The dense-batch core; ``positions`` [T] are the queries' token positions (default 0 .. T-1; a decode
    step passes its one position)."""
    B, T, HQ, DK = q.shape
    S_kv, H, DV, S, ls = k.shape[1], k.shape[2], v.shape[3], block_idx.shape[3], config.select_block
    qg = q.view(B, T, H, HQ // H, DK)  # [B, T, H, G, DK]
    acc = accumulate_dtype(q.dtype)
    k_rows, v_rows = k.transpose(1, 2).reshape(B * H * S_kv, DK), v.transpose(1, 2).reshape(B * H * S_kv, DV)
    row0 = (torch.arange(B * H, device=q.device) * S_kv).view(B, 1, H, 1)  # first row of (b, h) in k_rows
    offsets = torch.arange(ls, device=q.device)
    if positions is None:
        positions = torch.arange(T, device=q.device)
    parts = []
    chunk = query_chunk(B * H * S * ls * ((DK + DV) * k.element_size() + (HQ // H) * 4 * 3))
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        idx = block_idx[:, t0:t1].long()  # [B, Tc, H, S]
        keys = idx[..., None] * ls + offsets  # [B, Tc, H, S, l']: tokens of the selected blocks (Eq. 12)
        valid = (idx[..., None] >= 0) & (keys <= positions[t0:t1, None, None, None])  # s <= t
        rows = (row0 + torch.where(valid, keys, 0).flatten(-2)).flatten()  # [B * Tc * H * S * l']
        shape = (B, t1 - t0, H, S * ls)
        kg = k_rows.index_select(0, rows).view(*shape, DK)  # [B, Tc, H, S * l', DK]: gathered once per group
        vg = v_rows.index_select(0, rows).view(*shape, DV)
        s = torch.einsum("bthgd,bthsd->bthgs", qg[:, t0:t1], kg).to(acc) * scale  # [B, Tc, H, G, S * l']
        p, _ = masked_softmax(s, valid.flatten(-2)[:, :, :, None, :])
        parts.append(torch.einsum("bthgs,bthsd->bthgd", p.to(v.dtype), vg))  # [B, Tc, H, G, DV]
    return torch.cat(parts, dim=1).reshape(B, T, HQ, DV)
