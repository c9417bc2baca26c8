"""Every autotune config of every kernel, forced one at a time: correct by the tolerance rule, and repeatable.

The GPU tests run each kernel under its first config (``NSA_AUTOTUNE=0``: many shapes, no time to tune),
but the autotuner may pick any config of the list in a benchmark or a user's run. A config can be wrong on
its own: the interval dk/dv kernel raced under two of its four (docs/kernels.md). This script sets each
autotuner's config list to one config at a time, runs that kernel's public function through
``check_against_reference`` (output and every gradient, the fp64 rule), then twice more on the same inputs
and requires bitwise-equal outputs and gradients, except the gradients summed with fp32 atomics (the
selected branch's dK/dV, the compressed branch's split rows). A config the card cannot hold (shared
memory, registers) is reported as skipped, as the autotuner would skip it.

Each kernel runs in its own process (``--jobs`` at a time: compiling is CPU-bound). Exits 1 on any failure.

    python scripts/check_configs.py                       # every kernel, problems g16 and g1 (GPU)
    python scripts/check_configs.py --kernels interval_dkv --problems g16 dk192
    python scripts/check_configs.py --kernels selected_dq selected_dq_pointers --problems g16 dk60

``selected_dq_pointers`` is the selected dq kernel with K/V through pointer loads at every head dim (what cards
without TMA run), ``dk60`` a problem whose rows are not 16-byte aligned (pointer loads on any card).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("NSA_AUTOTUNE", "1")  # before optimized is imported: the full config lists
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import torch
import triton

import optimized
from optimized import _interval, compression, selected, selection
from optimized._common import ExactFp32Config
from reference.compression import mean_pool as reference_mean_pool
from reference.config import NSAConfig
from reference.testing import NSAProblem, _args, _run, assert_close_to_reference, check_against_reference

# kernel -> (autotuner, public function it is checked through)
KERNELS: dict[str, tuple[triton.runtime.Autotuner, str]] = {
    "interval_fwd": (_interval.interval_fwd_kernel, "sliding_window_attention"),
    "interval_dq": (_interval.interval_bwd_dq_kernel, "sliding_window_attention"),
    "interval_dkv": (_interval.interval_bwd_dkv_kernel, "sliding_window_attention"),
    "interval_dkv_split": (_interval.interval_bwd_dkv_kernel, "compressed_attention"),
    "selection": (selection.select_blocks_kernel, "select_blocks"),
    "selected_fwd": (selected.selected_fwd_kernel, "selected_attention"),
    "selected_dq": (selected.selected_bwd_dq_kernel, "selected_attention"),
    # the same kernel through pointer loads (as on cards without TMA) at any head dim, not only unaligned rows
    "selected_dq_pointers": (selected.selected_bwd_dq_kernel, "selected_attention"),
    "selected_dkv": (selected.selected_bwd_dkv_kernel, "selected_attention"),
    # the block-major forward and its merge, forced at every group size and length (BLOCK_MAJOR_KERNELS)
    "selected_fwd_block": (selected.selected_fwd_block_kernel, "selected_attention"),
    "selected_fwd_merge": (selected.selected_fwd_merge_kernel, "selected_attention"),
    "mean_pool_fwd": (compression.mean_pool_fwd_kernel, "mean_pool"),
    "mean_pool_bwd": (compression.mean_pool_bwd_kernel, "mean_pool"),
}
BLOCK_MAJOR_KERNELS = ("selected_fwd_block", "selected_fwd_merge")
# gradients summed with fp32 atomics: equal up to the order of the adds, so not compared bitwise
ATOMIC_GRADS = {"selected_attention": {"k_slc", "v_slc"}, "compressed_attention": {"k_cmp", "v_cmp"}}


def problems(device: str) -> dict[str, NSAProblem]:
    """Medium shapes (T not a multiple of any block) on the GPU; small ones on the CPU (interpreter smoke test)."""
    bf16, cfg = torch.bfloat16, NSAConfig()
    if device == "cpu":
        return {"g16": NSAProblem(1, 70, 1, 4, 16, 16, NSAConfig(8, 4, 16, 3, 1, 1, window=12), torch.float32)}
    return {
        "g16": NSAProblem(1, 3000, 2, 16, 128, 128, cfg, bf16),
        "g1": NSAProblem(1, 3000, 4, 1, 128, 128, cfg, bf16),
        "dk192": NSAProblem(1, 3000, 2, 16, 192, 128, cfg, bf16),
        "fp32": NSAProblem(1, 1000, 2, 4, 96, 80, cfg, torch.float32),
        "dk60": NSAProblem(1, 2000, 2, 4, 60, 36, cfg, bf16),  # rows not 16-byte aligned: pointer loads, not TMA
    }


def configs_for(kernel: triton.runtime.Autotuner, dtype: torch.dtype) -> list[triton.Config]:
    """The configs the autotuner would consider for ``dtype`` (float32 launches take the exact-fp32 twins)."""
    if not any(isinstance(c, ExactFp32Config) for c in kernel.configs):
        return list(kernel.configs)
    return [c for c in kernel.configs if isinstance(c, ExactFp32Config) == (dtype == torch.float32)]


def check_mean_pool(p: NSAProblem, device: str) -> Callable[[], None]:
    """mean_pool of k_slc against the reference (value and gradient), then two repeats, bitwise."""
    x64 = p.tensors(device, torch.float64).k_slc
    shape = reference_mean_pool(x64, p.config).shape
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)

    def run(fn: Callable, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        x = x64.to(dtype).requires_grad_()
        y = fn(x, p.config)
        return y, torch.autograd.grad(y, x, dy.to(y.dtype))[0]

    def check() -> None:
        (y64, dx64), (ydt, dxdt) = run(reference_mean_pool, torch.float64), run(reference_mean_pool, p.dtype)
        y, dx = run(optimized.mean_pool, p.dtype)
        assert_close_to_reference(y, y64, ydt, name="mean_pool")
        assert_close_to_reference(dx, dx64, dxdt, name="mean_pool gradient")
        for again in (run(optimized.mean_pool, p.dtype), run(optimized.mean_pool, p.dtype)):
            assert torch.equal(again[0], y) and torch.equal(again[1], dx), "mean_pool differs between runs"

    return check


def check_function(fn_name: str, p: NSAProblem, device: str) -> Callable[[], None]:
    """check_against_reference, then the implementation twice more: outputs and gradients bitwise equal."""
    if fn_name == "mean_pool":
        return check_mean_pool(p, device)
    impl = getattr(optimized, fn_name)

    def check() -> None:
        check_against_reference(fn_name, impl, p, device=device)
        x = p.tensors(device, requires_grad=fn_name != "select_blocks")
        lse = block_idx = grad_out = None
        if fn_name in ("select_blocks", "selected_attention"):
            with torch.no_grad():
                lse = optimized.compressed_attention(x.q, x.k_cmp, x.v_cmp, p.config)[1]
                block_idx = optimized.select_blocks(x.q, x.k_cmp, lse, p.config)
        if fn_name != "select_blocks":
            gen = torch.Generator().manual_seed(p.seed + 1)
            shape = (p.batch, p.seq_len, p.q_heads, p.head_dim_v)
            grad_out = torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=p.dtype)
        runs = [_run(impl, fn_name, _args(fn_name, x, lse, block_idx), p.config, None, grad_out) for _ in range(2)]
        (outs_a, grads_a), (outs_b, grads_b) = runs
        for i, (a, b) in enumerate(zip(outs_a, outs_b)):
            assert torch.equal(a, b), f"{fn_name} output {i} differs between runs"
        for name in grads_a:
            if name not in ATOMIC_GRADS.get(fn_name, ()):
                assert torch.equal(grads_a[name], grads_b[name]), f"{fn_name} gradient of {name} differs between runs"

    return check


def check_kernel(name: str, problem_names: list[str], device: str) -> int:
    """Every config of kernel ``name`` on every problem; prints one line each; returns the number of failures."""
    kernel, fn_name = KERNELS[name]
    saved, failures = kernel.configs, 0
    kv_operands = selected._kv_operands
    if name.endswith("_pointers"):  # K/V as tensors, never descriptors (restored below)
        selected._kv_operands = lambda k2, v2, meta: (k2, v2, False)
    all_problems = problems(device)
    try:
        for pname in problem_names:
            if pname not in all_problems:
                continue
            p = all_problems[pname]
            check = check_function(fn_name, p, device)
            for config in configs_for(kernel, p.dtype):
                kernel.configs = [config]
                t0 = time.time()
                try:
                    block_major = name in BLOCK_MAJOR_KERNELS  # then at every group size and length
                    with selected.forced_forward("blocks") if block_major else contextlib.nullcontext():
                        check()
                    status = "ok"
                except triton.runtime.errors.OutOfResources as e:
                    status = f"skipped ({str(e).splitlines()[0][:80]})"
                except AssertionError as e:
                    status, failures = f"FAILED: {str(e).splitlines()[0][:160]}", failures + 1
                finally:
                    kernel.configs = saved
                print(f"{name:20s} {pname:6s} {config!s:70s} {time.time() - t0:5.1f}s {status}", flush=True)
    finally:
        selected._kv_operands = kv_operands
    return failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    p.add_argument("--problems", nargs="+", default=["g16", "g1"], choices=["g16", "g1", "dk192", "fp32", "dk60"])
    p.add_argument("--jobs", type=int, default=8, help="kernels checked at once, one process each")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if len(args.kernels) == 1 or args.jobs == 1:
        return 1 if sum(check_kernel(k, args.problems, args.device) for k in args.kernels) else 0

    def worker(kernel: str) -> int:
        cmd = [sys.executable, __file__, "--kernels", kernel, "--problems", *args.problems, "--device", args.device]
        done = subprocess.run(cmd, capture_output=True, text=True)
        print(done.stdout + (done.stderr[-2000:] if done.returncode not in (0, 1) else ""), end="", flush=True)
        return done.returncode

    with ThreadPoolExecutor(args.jobs) as pool:
        codes = list(pool.map(worker, args.kernels))
    return 1 if any(codes) else 0


if __name__ == "__main__":
    raise SystemExit(main())
