"""The NSA hyper-parameters (spec section 11) and the block arithmetic that follows from them.

Notation (spec sections 3, 5, 6, 7):

* $l$ = ``compress_block``, $d$ = ``compress_stride``: compressed block $i$ summarises tokens
  $[i d, i d + l)$; a sequence of $T$ tokens has $T_C = \\lfloor (T - l) / d \\rfloor + 1$ complete blocks.
* $l'$ = ``select_block``: selection block $j$ holds tokens $[j l', (j + 1) l')$.
* $n$ = ``num_selected`` blocks per query and GQA group, of which ``num_initial`` + ``num_local`` are forced.
* $w$ = ``window``: the sliding window attends to keys $t - w < s \\le t$.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NSAConfig:
    """NSA block sizes and counts; the defaults are the paper's (l=32, d=16, l'=64, n=16, w=512)."""

    compress_block: int = 32
    compress_stride: int = 16
    select_block: int = 64
    num_selected: int = 16
    num_initial: int = 1
    num_local: int = 2
    window: int = 512

    def __post_init__(self) -> None:
        for name in ("compress_block", "compress_stride", "select_block", "num_selected", "window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"NSAConfig.{name} must be a positive int, got {value!r}")
        for name in ("num_initial", "num_local"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"NSAConfig.{name} must be a non-negative int, got {value!r}")
        l, d, ls = self.compress_block, self.compress_stride, self.select_block
        if l % d != 0:
            raise ValueError(f"NSAConfig: compress_stride d={d} must divide compress_block l={l}")
        if ls % d != 0:
            raise ValueError(f"NSAConfig: compress_stride d={d} must divide select_block l'={ls}")
        if l > ls:
            raise ValueError(f"NSAConfig: compress_block l={l} must be <= select_block l'={ls}")
        if self.num_selected < self.num_forced:
            raise ValueError(
                f"NSAConfig.num_selected={self.num_selected} must be >= the forced blocks "
                f"num_initial + num_local = {self.num_forced}"
            )

    @property
    def num_forced(self) -> int:
        """Blocks every query selects whatever the scores say (initial + local)."""
        return self.num_initial + self.num_local

    def num_compressed(self, seq_len: int) -> int:
        """$T_C$: complete compressed blocks in a sequence of ``seq_len`` tokens (spec section 3)."""
        if seq_len < self.compress_block:
            return 0
        return (seq_len - self.compress_block) // self.compress_stride + 1

    def num_select_blocks(self, seq_len: int) -> int:
        """Selection blocks covering ``seq_len`` tokens (the last one may be partial)."""
        return -(-seq_len // self.select_block)
