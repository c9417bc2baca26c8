"""Run every sparse kernel (selection, selected attention fwd/dq/dkv, the combine kernels) once, fwd + bwd, on CUDA.

Meant for compute-sanitizer::

    compute-sanitizer --tool memcheck  python scripts/sanitize_sparse.py
    compute-sanitizer --tool racecheck python scripts/sanitize_sparse.py

The reference runs on the CPU, so that only our kernels (not cuBLAS) run under the tool. Small shapes with
ragged edges: T not a multiple of any block, a packed batch, G = 3, DK != DV (not powers of two), and fp16 and
bf16; the selected forward both ways (query tiles, then block-major). Every autotuned kernel keeps only its
first config, so each kernel runs a handful of times (the combine kernels: the backward's inside
``nsa_attention``, whose forward fuses Eq. 5 into the selected kernel, and both through the public
``combine_gates``). Exits non-zero if any result differs from the reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import optimized
import reference
from optimized import _interval, compressed, nsa, selected, selection, window
from reference.config import NSAConfig
from reference.testing import NSAProblem, check_against_reference

PROBLEMS = [
    NSAProblem(1, 300, 2, 3, 48, 40, NSAConfig(32, 16, 64, 4, 1, 2, window=64), torch.bfloat16, seed=0),
    NSAProblem(2, 200, 1, 16, 64, 32, NSAConfig(16, 8, 32, 5, 1, 1, window=48), torch.float16, seed=1),
    NSAProblem(1, 333, 2, 1, 32, 24, NSAConfig(16, 8, 48, 3, 1, 1, window=40), torch.float16, 2, (100, 200, 33)),
]

FUNCTIONS = [
    ("select_blocks", optimized.select_blocks),
    ("selected_attention", optimized.selected_attention),
    ("nsa_attention", optimized.nsa_attention),
]


def check_combine_gates(dtype: torch.dtype, seed: int, device: str = "cuda") -> None:
    """The public ``combine_gates`` (``combine_fwd_kernel``, ``combine_bwd_kernel``) forward and backward against
    the reference's Eq. 5 on the CPU, at a shape whose rows and head dim are no multiple of the kernels' tiles."""
    g = torch.Generator().manual_seed(seed)
    shape = (2, 77, 6, 40)
    xs = [torch.rand((*shape[:3], 3), generator=g), *(torch.randn(shape, generator=g) for _ in range(3))]
    do = torch.randn(shape, generator=g)
    results = []
    for fn, dev in ((optimized.combine_gates, device), (reference.combine_gates, "cpu")):
        ins = [x.to(dtype).to(dev).requires_grad_() for x in xs]
        o = fn(*ins)
        results.append([t.cpu() for t in (o, *torch.autograd.grad(o, ins, do.to(dtype).to(dev)))])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want)  # the dtype's default tolerances (both sum in fp32, then round)


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    for module in (_interval, compressed, nsa, selected, selection, window):
        for kernel in vars(module).values():
            if isinstance(kernel, triton.runtime.Autotuner):
                kernel.configs = kernel.configs[:1]
    failures = 0
    runs = [(p, name, fn, "tiles") for p in PROBLEMS for name, fn in FUNCTIONS]
    runs += [(p, name, fn, "blocks") for p in PROBLEMS for name, fn in FUNCTIONS[1:]]  # the block-major forward
    for p, name, fn, forward in runs:
        try:
            with selected.forced_forward(forward):
                check_against_reference(name, fn, p, device="cuda", reference_device="cpu")
            status = "ok"
        except AssertionError as e:
            failures += 1
            status = f"FAILED: {e}"
        print(f"{name:20s} T={p.seq_len} H={p.kv_heads} G={p.group} {p.dtype} {forward}: {status}")
    for seed, dtype in enumerate((torch.bfloat16, torch.float16)):
        try:
            check_combine_gates(dtype, seed)
            status = "ok"
        except AssertionError as e:
            failures += 1
            status = f"FAILED: {e}"
        print(f"{'combine_gates':20s} {dtype}: {status}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
