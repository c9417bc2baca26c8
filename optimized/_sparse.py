"""Host-side helpers of the sparse kernels (selection, selected attention): packed sequences cut into tiles."""

from __future__ import annotations

import itertools

import torch

from reference.config import NSAConfig


def sequence_lengths(B: int, T: int, cu_seqlens: torch.Tensor | None) -> list[int]:
    """The length of every sequence: B times T for a dense batch, else the differences of ``cu_seqlens``."""
    if cu_seqlens is None:
        return [T] * B
    bounds = cu_seqlens.tolist()
    return [b - a for a, b in itertools.pairwise(bounds)]


def sequence_tiles(
    lengths: list[int], config: NSAConfig, BM: int, rows_per_token: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack the sequences back to back and cut each one's rows (``rows_per_token`` per token) into tiles of BM.

    A dense batch is B packed sequences of T tokens, so every kernel has one (packed) code path.
    Returns cu [S + 1] and cu_cmp [S + 1] (token and compressed-block offsets of each sequence), tile_seq [NT]
    and tile_start [NT] (the sequence and first packed row of each tile), all int32 on ``device``.
    """
    cu, cu_cmp, tile_seq, tile_start = [0], [0], [], []
    for s, length in enumerate(lengths):
        rows = range(cu[-1] * rows_per_token, (cu[-1] + length) * rows_per_token, BM)
        tile_seq += [s] * len(rows)
        tile_start += list(rows)
        cu.append(cu[-1] + length)
        cu_cmp.append(cu_cmp[-1] + config.num_compressed(length))
    as_tensor = lambda x: torch.tensor(x, dtype=torch.int32).to(device, non_blocking=True)
    return as_tensor(cu), as_tensor(cu_cmp), as_tensor(tile_seq), as_tensor(tile_start)
