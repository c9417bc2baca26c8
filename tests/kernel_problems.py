"""Problem strategies for the Triton kernels: head dims 16-64 (not only powers of two), DK != DV, any G.

Shapes stay tiny on the CPU (the Triton interpreter runs every program instance in Python); on a GPU the
same strategies cover bf16 too.
"""

from __future__ import annotations

import torch
from hypothesis import settings
from hypothesis import strategies as st

from reference.config import NSAConfig
from reference.testing import NSAProblem

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16) if ON_GPU else (torch.float32, torch.float16)
# On a GPU every new (head-dim tile, dtype) pair compiles the kernels again: two dims (one a multiple of 16,
# one not) keep the GPU run short; the interpreter, which compiles nothing, takes the whole range.
HEAD_DIMS = (40, 64) if ON_GPU else (16, 24, 32, 40, 64)
GROUPS = (1, 2, 3, 4, 8)


def examples(n: int) -> int:
    """Hypothesis examples per test: at most ``n`` under the interpreter (CI time), the profile's count on a GPU."""
    profile = settings().max_examples
    return profile if ON_GPU else min(n, profile)


@st.composite
def small_configs(draw: st.DrawFn, max_window: int = 72) -> NSAConfig:
    """Small block sizes (l <= 16) and any window; the selection fields are irrelevant to these kernels."""
    d = draw(st.sampled_from([1, 2, 4, 8]))
    l = d * draw(st.integers(1, max(1, 16 // d)))
    return NSAConfig(l, d, l, 3, 1, 2, draw(st.integers(1, max_window)))


@st.composite
def split_and_dims(draw: st.DrawFn, T: int, head_dims: tuple[int, ...]) -> tuple[tuple[int, ...] | None, int, int]:
    """Sometimes a packed varlen split of T tokens (into 2-4 sequences), and head dims DK != DV."""
    seqlens = None
    if T > 1 and draw(st.booleans()):
        cuts = sorted(draw(st.sets(st.integers(1, T - 1), min_size=1, max_size=3)))
        seqlens = tuple(b - a for a, b in zip([0, *cuts], [*cuts, T]))
    DK = draw(st.sampled_from(head_dims))
    DV = draw(st.sampled_from([d for d in head_dims if d != DK]))
    return seqlens, DK, DV


@st.composite
def kernel_problems(
    draw: st.DrawFn, max_seq_len: int = 64, max_kv_heads: int = 2, dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES
) -> NSAProblem:
    """B, T (from 1), H, G, DK != DV, dtype, seed, and sometimes a packed varlen split."""
    T = draw(st.integers(1, max_seq_len))
    seqlens, DK, DV = draw(split_and_dims(T, HEAD_DIMS))
    return problem(
        T,
        draw(st.integers(1, max_kv_heads)),
        draw(st.sampled_from(GROUPS)),
        DK,
        DV,
        draw(small_configs(max_window=max_seq_len + 8)),
        draw(st.sampled_from(dtypes)),
        batch=1 if seqlens is not None else draw(st.integers(1, 2)),
        seqlens=seqlens,
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def problem(
    T: int,
    H: int,
    G: int,
    DK: int,
    DV: int,
    config: NSAConfig,
    dtype: torch.dtype,
    *,
    batch: int = 1,
    seqlens: tuple[int, ...] | None = None,
    seed: int = 0,
) -> NSAProblem:
    """A fixed problem (for edge cases and the GPU tests)."""
    return NSAProblem(batch, T, H, G, DK, DV, config, dtype, seed, seqlens)
