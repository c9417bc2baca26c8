"""Which keys each query may read, per branch, as small functions you can plot (spec sections 3, 6, 7).

Each takes index tensors (query positions ``t``, key or block positions) and returns a boolean
matrix ``[len(t), len(keys)]``; the branch modules build their masks from these, so the picture in the
notebooks is the mask the code uses.
"""

from __future__ import annotations

import torch

from .config import NSAConfig


def causal(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Full causal attention: key ``s`` is visible to query ``t`` iff ``s <= t``."""
    return s[None, :] <= t[:, None]


def compressed_visible(t: torch.Tensor, i: torch.Tensor, config: NSAConfig) -> torch.Tensor:
    """Compressed block ``i`` (tokens ``[i d, i d + l)``) is visible once it has ended: ``i d + l - 1 <= t``."""
    end = i * config.compress_stride + config.compress_block - 1
    return end[None, :] <= t[:, None]


def window_visible(t: torch.Tensor, s: torch.Tensor, config: NSAConfig) -> torch.Tensor:
    """Sliding window of ``w`` keys: ``t - w < s <= t`` (exactly ``w`` keys once ``t >= w - 1``)."""
    return (s[None, :] <= t[:, None]) & (s[None, :] > t[:, None] - config.window)


def select_candidates(t: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """Selection block ``j`` is a candidate for ``t`` iff it starts at or before ``t``: ``j <= t // l'``.

    ``t`` here is already the query's block ``t // l'``.
    """
    return j[None, :] <= t[:, None]


def forced_blocks(t: torch.Tensor, j: torch.Tensor, config: NSAConfig) -> torch.Tensor:
    """The always-selected blocks: the first ``num_initial`` and the ``num_local`` ending at ``t // l'``."""
    current = t // config.select_block
    local = (j[None, :] <= current[:, None]) & (j[None, :] > current[:, None] - config.num_local)
    initial = (j[None, :] < config.num_initial) & select_candidates(current, j)
    return local | initial


def compressed_token_mask(seq_len: int, config: NSAConfig) -> torch.Tensor:
    """[T, T] bool: the tokens summarised by the compressed blocks each query can see."""
    t = torch.arange(seq_len)
    i = torch.arange(config.num_compressed(seq_len))
    visible = compressed_visible(t, i, config).to(torch.int32)  # [T, TC]
    starts = i[:, None] * config.compress_stride
    covers = (t[None, :] >= starts) & (t[None, :] < starts + config.compress_block)  # [TC, T]
    return (visible @ covers.to(torch.int32)) > 0


def selected_token_mask(block_idx: torch.Tensor, config: NSAConfig) -> torch.Tensor:
    """[T, T] bool from one head group's block indices ``[T, n]`` (-1 = none): selected keys ``s <= t``."""
    seq_len = block_idx.shape[0]
    s = torch.arange(seq_len)
    block_of_key = s // config.select_block  # [T]
    chosen = (block_idx[:, :, None] == block_of_key[None, None, :]).any(dim=1)  # [T, T]
    return chosen & causal(torch.arange(seq_len), s)


def window_token_mask(seq_len: int, config: NSAConfig) -> torch.Tensor:
    """[T, T] bool: the sliding-window branch's keys."""
    t = torch.arange(seq_len)
    return window_visible(t, t, config)
