"""Host-side helpers of the sparse kernels (selection, selected attention): packed sequences cut into tiles."""

from __future__ import annotations

import itertools

import torch

from reference.config import NSAConfig

from ._common import device_tensor, shape_metadata


def sequence_lengths(B: int, T: int, cu_seqlens: torch.Tensor | None) -> list[int]:
    """The length of every sequence: B times T for a dense batch, else the differences of ``cu_seqlens``."""
    if cu_seqlens is None:
        return [T] * B
    return [b - a for a, b in itertools.pairwise(cu_seqlens.tolist())]


def sequence_tiles(
    lengths: list[int], config: NSAConfig, BM: int, rows_per_token: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack the sequences back to back and cut each one's rows (``rows_per_token`` per token) into tiles of BM.

    A dense batch is B packed sequences of T tokens, so every kernel has one (packed) code path.
    Returns cu [S + 1] and cu_cmp [S + 1] (token and compressed-block offsets of each sequence), tile_seq [NT]
    and tile_start [NT] (the sequence and first packed row of each tile), all int32 on ``device``. Only the
    S-long lists cross from the host (without a host sync); the tile arrays are built on the device, once per
    list of lengths (``shape_metadata``).
    """

    def build() -> tuple[torch.Tensor, ...]:
        n_tiles = [-(-(n * rows_per_token) // BM) for n in lengths]
        cu = device_tensor([0, *itertools.accumulate(lengths)], torch.int64, device)
        cu_cmp = [0, *itertools.accumulate(config.num_compressed(n) for n in lengths)]
        counts = device_tensor(n_tiles, torch.int64, device)
        total = sum(n_tiles)
        tile_seq = torch.repeat_interleave(torch.arange(len(lengths), device=device), counts, output_size=total)
        first_tile = torch.cumsum(counts, 0) - counts
        tile_start = cu[tile_seq] * rows_per_token + (torch.arange(total, device=device) - first_tile[tile_seq]) * BM
        as_i32 = lambda x: x.to(torch.int32)
        return as_i32(cu), device_tensor(cu_cmp, torch.int32, device), as_i32(tile_seq), as_i32(tile_start)

    l, d = config.compress_block, config.compress_stride
    return shape_metadata(build, ("sequence_tiles", tuple(lengths), l, d, BM, rows_per_token, device))
