"""Experiment: which kernels a workload spends its device time in (torch.profiler), one table per workload.

Workloads: the NSA core's forward and backward at one length (``--core``), and one decode step
(``--decode``). Each runs ``--warmup`` times, then ``--iters`` times under the profiler; the table lists every
kernel's calls and device time per iteration, largest first, and the JSON (``kernel_times.json`` in
``--out``) keeps them with the environment. On the CPU (no CUDA) it profiles CPU ops instead, at small
shapes: a smoke test of the script, not a measurement.

    python scripts/kernel_times.py --core default 65536 --decode default 1 65536 --decode default 32 65536
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import optimized
from benchmarks import decode
from benchmarks.run import CONFIGS, environment, make_inputs, nsa_parts


def core_workload(config: str, seq_len: int, device: torch.device) -> Callable[[], None]:
    """One forward and backward of ``optimized.nsa_attention`` on random inputs (a fixed output gradient)."""
    cfg = CONFIGS[config]
    x = make_inputs(cfg, seq_len, device, seed=0)
    part = nsa_parts(optimized, x, cfg, ("core",))["core"]
    grad = torch.randn_like(part.fwd())

    def run() -> None:
        torch.autograd.grad(part.fwd(), part.grad_inputs, grad)

    return run


def decode_workload(config: str, batch: int, context: int, device: torch.device) -> Callable[[], object]:
    """One ``optimized.decode_attention`` step over a filled cache (``benchmarks.decode.optimized_step``)."""
    return decode.optimized_step(decode.make_problem(CONFIGS[config], batch, context, device, seed=batch))


def kernel_table(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> list[dict[str, Any]]:
    """[{name, calls, us}] per iteration, largest first: device kernels on CUDA, CPU ops on the CPU."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(iters):
            fn()
        if cuda:
            torch.cuda.synchronize(device)
    rows = []
    for e in prof.key_averages():
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if us > 0:
            rows.append({"name": e.key, "calls": e.count / iters, "us": us / iters})
    return sorted(rows, key=lambda r: -r["us"])


def print_table(label: str, rows: list[dict[str, Any]], top: int, what: str) -> None:
    total = sum(r["us"] for r in rows)
    print(f"== {label}: {total / 1000:.3f} ms of {what} time per iteration")
    for r in rows[:top]:
        print(f"  {r['us']:10.1f} us {100 * r['us'] / total:5.1f}%  x{r['calls']:<5g} {r['name'][:90]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--core", nargs=2, action="append", default=[], metavar=("CONFIG", "T"))
    p.add_argument("--decode", nargs=3, action="append", default=[], metavar=("CONFIG", "B", "CONTEXT"))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--top", type=int, default=15, help="rows printed per table")
    p.add_argument("--out", type=Path, default=Path("/tmp"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    for name, *_ in args.core + args.decode:
        if name not in CONFIGS:
            p.error(f"config must be one of {sorted(CONFIGS)}, got {name!r}")
    workloads = [(f"core {c} T={t}", core_workload(c, int(t), device)) for c, t in args.core]
    workloads += [
        (f"decode {c} B={b} context={n}", decode_workload(c, int(b), int(n), device)) for c, b, n in args.decode
    ]
    results = {}
    for label, fn in workloads:
        rows = kernel_table(fn, device, args.warmup, args.iters)
        print_table(label, rows, args.top, "device" if device.type == "cuda" else "CPU")
        results[label] = rows
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernel_times.json").write_text(json.dumps({"env": environment(device), "tables": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
