"""Run every dense-branch Triton kernel (mean pooling, compressed and window attention) forward and backward once.

For the CUDA sanitizers (each kernel compiles once: ``NSA_AUTOTUNE=0``)::

    compute-sanitizer --tool memcheck python scripts/sanitize_dense.py
    compute-sanitizer --tool racecheck python scripts/sanitize_dense.py

Shapes are small but hit the edges: head dims that are not powers of two, DK != DV, G = 3, a sequence
shorter than a compression block, packed sequences and a partial last tile.
"""

from __future__ import annotations

import os

os.environ.setdefault("NSA_AUTOTUNE", "0")  # before the kernels are defined

import torch

from optimized.compressed import compressed_attention
from optimized.compression import mean_pool
from optimized.window import sliding_window_attention
from reference.config import NSAConfig


def run(T: int, cu: list[int] | None, dtype: torch.dtype) -> None:
    config = NSAConfig(32, 16, 64, window=40)
    H, G, DK, DV = 2, 3, 40, 24
    cu_seqlens = None if cu is None else torch.tensor(cu, dtype=torch.int32, device="cuda")
    B = 1 if cu is not None else 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, T, H * G, DK, device="cuda", dtype=dtype, generator=gen, requires_grad=True)
    k = torch.randn(B, T, H, DK, device="cuda", dtype=dtype, generator=gen, requires_grad=True)
    v = torch.randn(B, T, H, DV, device="cuda", dtype=dtype, generator=gen, requires_grad=True)
    k_cmp = mean_pool(k, config, cu_seqlens=cu_seqlens)
    v_cmp = mean_pool(v, config, cu_seqlens=cu_seqlens)
    o_cmp, lse = compressed_attention(q, k_cmp, v_cmp, config, cu_seqlens=cu_seqlens)
    o_win = sliding_window_attention(q, k, v, config, cu_seqlens=cu_seqlens)
    loss = o_cmp.float().sum() + o_win.float().square().sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()
    loss.backward()
    torch.cuda.synchronize()
    for name, x in (("o_cmp", o_cmp), ("o_win", o_win), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert torch.isfinite(x).all(), f"{name} has non-finite values (T={T}, cu={cu}, {dtype})"


def main() -> None:
    for dtype in (torch.bfloat16, torch.float32):
        run(200, None, dtype)
        run(20, None, dtype)  # T < l: no compressed block at all
        run(230, [0, 10, 150, 230], dtype)
    print("dense kernels ran: mean_pool, compressed_attention, sliding_window_attention (fwd + bwd)")


if __name__ == "__main__":
    main()
