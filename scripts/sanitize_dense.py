"""Run every dense-branch Triton kernel (mean pooling, compressed and window attention) forward and backward once.

For the CUDA sanitizers (each kernel compiles once: ``NSA_AUTOTUNE=0``)::

    compute-sanitizer --tool memcheck python scripts/sanitize_dense.py
    compute-sanitizer --tool racecheck python scripts/sanitize_dense.py

Shapes are small but hit the edges: head dims that are not powers of two, DK != DV, G = 3, a sequence
shorter than a compression block, packed sequences, a partial last tile, and the split (atomic) dk/dv path
of compressed attention. Without a GPU it runs the same calls in the Triton interpreter (a smoke test).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("NSA_AUTOTUNE", "0")  # before the kernels are defined
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: `optimized`, `reference`

import optimized.compressed as compressed_module
from optimized.compressed import compressed_attention
from optimized.compression import mean_pool
from optimized.window import sliding_window_attention
from reference.config import NSAConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run(T: int, cu: list[int] | None, dtype: torch.dtype) -> None:
    config = NSAConfig(32, 16, 64, window=40)
    H, G, DK, DV = 2, 3, 40, 24
    cu_seqlens = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=DEVICE)
    B = 1 if cu is not None else 2
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(B, T, heads, dim, generator=gen).to(DEVICE, dtype).requires_grad_()
        for heads, dim in ((H * G, DK), (H, DK), (H, DV))
    )
    k_cmp = mean_pool(k, config, cu_seqlens=cu_seqlens)
    v_cmp = mean_pool(v, config, cu_seqlens=cu_seqlens)
    o_cmp, lse = compressed_attention(q, k_cmp, v_cmp, config, cu_seqlens=cu_seqlens)
    o_win = sliding_window_attention(q, k, v, config, cu_seqlens=cu_seqlens)
    loss = o_cmp.float().sum() + o_win.float().square().sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()
    loss.backward()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    for name, x in (("o_cmp", o_cmp), ("o_win", o_win), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert torch.isfinite(x).all(), f"{name} has non-finite values (T={T}, cu={cu}, {dtype})"


def main() -> None:
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16  # (bf16 dots are wrong in the interpreter)
    run(200, None, dtype)
    run(20, None, dtype)  # T < l: no compressed block at all
    run(230, [0, 10, 150, 230], dtype)
    compressed_module.DKV_SPLIT_ROWS = 64  # the atomic dk/dv path of long sequences
    run(230, [0, 10, 150, 230], dtype)
    print("dense kernels ran: mean_pool, compressed_attention, sliding_window_attention (fwd + bwd)")


if __name__ == "__main__":
    main()
