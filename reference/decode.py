r"""Decoding: what one step reads (spec section 8, paper Table 4).

At context length $s$ a decode step reads the $T_C(s) = \lfloor (s - l)/d \rfloor + 1$ compressed
tokens, the $n$ selected blocks of $l'$ tokens (at most $s$) and the window of $w$ (at most $s$):

$$N(s) = T_C(s) + \min(n l', s) + \min(w, s).$$
"""

from __future__ import annotations

from ._checks import check_config
from .config import NSAConfig


def decode_tokens_read(context_len: int, config: NSAConfig) -> int:
    """Key/value tokens one decode step reads at ``context_len`` (reproduces the paper's Table 4 within 1)."""
    config = check_config(config)
    if isinstance(context_len, bool) or not isinstance(context_len, int) or context_len < 1:
        raise ValueError(f"context_len must be a positive int, got {context_len!r}")
    s = context_len
    selected = min(config.num_selected * config.select_block, s)
    return config.num_compressed(s) + selected + min(config.window, s)
