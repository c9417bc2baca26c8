"""Problem strategies for the sparse kernels (selection, selected attention, the NSA core).

Unlike ``kernel_problems`` these draw every selection field of the config (d | l, d | l', l <= l', forced
<= n), since block numbering, spills between selection blocks and the top-n are what these kernels add.
The interpreter runs every program instance in Python, so the product T * G * H stays small on the CPU.
"""

from __future__ import annotations

from hypothesis import strategies as st
from kernel_problems import KERNEL_DTYPES, ON_GPU, problem, split_and_dims

from reference.testing import NSAProblem, nsa_configs

HEAD_DIMS = (16, 24, 32, 48, 64)
ROW_BUDGET = 4096 if ON_GPU else 160  # max T * G * H drawn


@st.composite
def sparse_problems(draw: st.DrawFn, max_seq_len: int = 72, max_group: int = 8) -> NSAProblem:
    """T from 1 (shorter than a block, not a multiple of any block), H in 1..2, G in 1..8, DK != DV, a split."""
    config = draw(nsa_configs(max_block=16, max_window=max_seq_len + 2))
    H = draw(st.integers(1, 2))
    G = draw(st.integers(1, max_group))
    T = draw(st.integers(1, max(4, min(max_seq_len, ROW_BUDGET // (G * H)))))
    seqlens, DK, DV = draw(split_and_dims(T, HEAD_DIMS))
    return problem(
        T,
        H,
        G,
        DK,
        DV,
        config,
        draw(st.sampled_from(KERNEL_DTYPES)),
        batch=1 if seqlens is not None else draw(st.integers(1, 2)),
        seqlens=seqlens,
        seed=draw(st.integers(0, 2**32 - 1)),
    )
