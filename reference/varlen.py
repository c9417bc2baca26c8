"""Packed variable-length batches (``cu_seqlens``, as in FlashAttention; spec section 1).

With ``cu_seqlens`` = ``[0, T_0, T_0 + T_1, ...]`` the batch is one row (``B = 1``) holding the
sequences back to back. Every sequence restarts its block numbering at its first token, so the
reference simply runs the dense function on each sequence and concatenates: the clearest statement
of what a packed kernel must compute.

One count is data-dependent: a packed batch holds ``TC`` = the sum of each sequence's compressed blocks, known
only from the values of ``cu_seqlens``. :func:`compressed_block_starts` is therefore a ``torch.library`` custom
op: ``torch.compile`` does not trace into it and its fake implementation returns an unbacked ("dynamic") size,
so a compiled layer or ``mean_pool`` keeps one graph.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch

from .config import NSAConfig


def token_bounds(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of each packed sequence."""
    values = cu_seqlens.tolist()
    return list(itertools.pairwise(values))


def compressed_bounds(cu_seqlens: torch.Tensor, config: NSAConfig) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of each sequence's compressed blocks in a packed ``k_cmp``."""
    bounds, start = [], 0
    for t0, t1 in token_bounds(cu_seqlens):
        n = config.num_compressed(t1 - t0)
        bounds.append((start, start + n))
        start += n
    return bounds


def compressed_cu_seqlens(cu_seqlens: torch.Tensor, config: NSAConfig) -> torch.Tensor:
    """The ``cu_seqlens`` of the packed compressed sequence (int32, same device)."""
    ends = [end for _, end in compressed_bounds(cu_seqlens, config)]
    return torch.tensor([0, *ends], dtype=torch.int32, device=cu_seqlens.device)


def compressed_counts(cu_seqlens: torch.Tensor, compress_block: int, compress_stride: int) -> torch.Tensor:
    """int64 [N]: each packed sequence's number of compressed blocks, floor((T_i - l) / d) + 1 (0 when T_i < l),
    on the device (no host sync)."""
    l, d = compress_block, compress_stride
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    return torch.where(lengths >= l, torch.div(lengths - l, d, rounding_mode="floor") + 1, 0)


@torch.library.custom_op("nsa::compressed_block_starts", mutates_args=())
def _block_starts(x: torch.Tensor, cu_seqlens: torch.Tensor, compress_block: int, compress_stride: int) -> torch.Tensor:
    """The custom op behind :func:`compressed_block_starts` (host sync for TC: fine outside a graph)."""
    cu = cu_seqlens.long()
    counts = compressed_counts(cu, compress_block, compress_stride)  # [N] TC of each sequence
    seq = torch.repeat_interleave(torch.arange(len(counts), device=cu.device), counts)  # [TC] block -> sequence
    first = torch.cumsum(counts, 0) - counts  # [N] each sequence's first block
    return cu[seq] + (torch.arange(len(seq), device=cu.device) - first[seq]) * compress_stride


@_block_starts.register_fake
def _(x: torch.Tensor, cu_seqlens: torch.Tensor, compress_block: int, compress_stride: int) -> torch.Tensor:
    return cu_seqlens.new_empty(torch.library.get_ctx().new_dynamic_size(), dtype=torch.int64)


def compressed_block_starts(x: torch.Tensor, cu_seqlens: torch.Tensor, config: NSAConfig) -> torch.Tensor:
    """int64 [TC]: the first (packed) token of every compressed block of x [1, T, ...], sequence after sequence.

    Block i of the sequence at ``[t0, t1)`` starts at ``t0 + i d``. TC depends on the values of ``cu_seqlens``:
    under ``torch.compile`` it is an unbacked size. The op reads nothing of ``x``; taking it keeps the compiler
    from merging the calls for k and v (identical arguments), whose two sizes it would then mix up.
    """
    return _block_starts(x, cu_seqlens, config.compress_block, config.compress_stride)


def map_sequences(
    fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    cu_seqlens: torch.Tensor,
    config: NSAConfig,
    token_args: Sequence[torch.Tensor],
    compressed_args: Sequence[torch.Tensor] = (),
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Call ``fn(*token_slices, *compressed_slices)`` per sequence and concatenate the outputs along time.

    ``token_args`` are ``[1, T, ...]`` tensors sliced by ``cu_seqlens``; ``compressed_args`` are
    ``[1, TC_total, ...]`` tensors sliced by each sequence's own compressed length.
    """
    outputs = []
    for (t0, t1), (c0, c1) in zip(token_bounds(cu_seqlens), compressed_bounds(cu_seqlens, config)):
        args = [x[:, t0:t1] for x in token_args] + [x[:, c0:c1] for x in compressed_args]
        outputs.append(fn(*args))
    if isinstance(outputs[0], tuple):
        return tuple(torch.cat(parts, dim=1) for parts in zip(*outputs))
    return torch.cat(outputs, dim=1)
