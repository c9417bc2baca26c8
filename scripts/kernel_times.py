"""Experiment: which kernels a workload spends its device time in (torch.profiler), one table per workload.

Workloads: the NSA core's forward and backward at one length (``--core``; ``--forward-only``: the forward
alone), and one decode step (``--decode``). Each runs ``--warmup`` times, then ``--iters`` times under the
profiler; the table lists every kernel's calls and device time per iteration, largest first, and the JSON
(``kernel_times.json`` in ``--out``) keeps them with the environment. After the profile, the host's time per
iteration is measured apart from the device's: the device idle before each call, the time to issue the call
(``host_us``) and the time until the device is done (``wall_us``), medians. A device time near ``wall_us``
with a short ``host_us`` means the device is the limit; ``host_us`` near ``wall_us`` means the host is (or the
call waits for the device); ``--host-profile`` adds where that host time goes (cProfile of the same calls: the
top functions by their own time, and this repository's by their cumulative time, in ``host_profile.txt``).
``--selected-forward tiles|blocks`` forces the selected forward (``optimized.selected.forced_forward``). On the
CPU (no CUDA) it profiles CPU ops instead, at small shapes: a smoke test of the script, not a measurement.

    python scripts/kernel_times.py --core default 65536 --decode default 1 65536 --decode default 32 65536
    python scripts/kernel_times.py --core g4 8192 --forward-only --selected-forward blocks
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import optimized
from benchmarks import decode
from benchmarks.run import CONFIGS, environment, make_inputs, nsa_parts


def core_workload(config: str, seq_len: int, device: torch.device, backward: bool = True) -> Callable[[], None]:
    """One forward (and backward) of ``optimized.nsa_attention`` on random inputs (a fixed output gradient)."""
    cfg = CONFIGS[config]
    x = make_inputs(cfg, seq_len, device, seed=0)
    part = nsa_parts(optimized, x, cfg, ("core",))["core"]
    grad = torch.randn_like(part.fwd())

    def run() -> None:
        if backward:
            torch.autograd.grad(part.fwd(), part.grad_inputs, grad)
        else:
            with torch.no_grad():
                part.fwd()

    return run


def decode_workload(config: str, batch: int, context: int, device: torch.device) -> Callable[[], object]:
    """One ``optimized.decode_attention`` step over a filled cache (``benchmarks.decode.optimized_step``)."""
    return decode.optimized_step(decode.make_problem(CONFIGS[config], batch, context, device, seed=batch))


def host_and_wall_us(fn: Callable[[], object], device: torch.device, iters: int) -> dict[str, float]:
    """Medians over ``iters`` calls, each from an idle device: the host's time to issue the call and the
    time until the device has finished it (microseconds)."""
    host, wall = [], []
    for _ in range(iters):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize(device)
        host.append(1e6 * (t1 - t0))
        wall.append(1e6 * (time.perf_counter() - t0))
    return {"host_us": statistics.median(host), "wall_us": statistics.median(wall)}


def host_profile(fn: Callable[[], object], device: torch.device, iters: int, top: int) -> str:
    """cProfile of ``iters`` calls, each from an idle device (so no time is the host waiting for it), as pstats
    prints them: the ``top`` functions by their own time, then the ``top`` of this repository's kernels package
    (``optimized/``) by cumulative time. The backward runs on this thread (cProfile sees one thread; autograd
    would run a CUDA backward on a thread of its own)."""
    profiler = cProfile.Profile()
    with torch.autograd.set_multithreading_enabled(False):
        for _ in range(iters):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            profiler.enable()
            fn()
            profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats("optimized/", top)
    return text.getvalue()


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


def print_table(label: str, rows: list[dict[str, Any]], top: int, what: str, host: dict[str, float]) -> None:
    total = sum(r["us"] for r in rows)
    times = f" (host {host['host_us'] / 1000:.3f} ms, wall {host['wall_us'] / 1000:.3f} ms)" if host else ""
    print(f"== {label}: {total / 1000:.3f} ms of {what} time per iteration{times}")
    for r in rows[:top]:
        print(f"  {r['us']:10.1f} us {100 * r['us'] / total:5.1f}%  x{r['calls']:<5g} {r['name'][:90]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--core", nargs=2, action="append", default=[], metavar=("CONFIG", "T"))
    p.add_argument("--decode", nargs=3, action="append", default=[], metavar=("CONFIG", "B", "CONTEXT"))
    p.add_argument("--forward-only", action="store_true", help="the core's forward alone (no autograd graph)")
    p.add_argument("--selected-forward", choices=("tiles", "blocks"), help="force the selected forward")
    p.add_argument("--host-profile", action="store_true", help="where the host's time goes (cProfile)")
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
    what = "forward" if args.forward_only else "core"
    workloads = [(f"{what} {c} T={t}", core_workload(c, int(t), device, not args.forward_only)) for c, t in args.core]
    workloads += [
        (f"decode {c} B={b} context={n}", decode_workload(c, int(b), int(n), device)) for c, b, n in args.decode
    ]
    if args.selected_forward:
        label_suffix = f" selected-forward={args.selected_forward}"
        forced = optimized.selected.forced_forward(args.selected_forward)
    else:
        label_suffix, forced = "", contextlib.nullcontext()
    results, host_times, profiles = {}, {}, []
    with forced:
        for label, fn in workloads:
            label += label_suffix
            rows = kernel_table(fn, device, args.warmup, args.iters)
            host = host_and_wall_us(fn, device, args.iters) if device.type == "cuda" else {}
            print_table(label, rows, args.top, "device" if device.type == "cuda" else "CPU", host)
            results[label], host_times[label] = rows, host
            if args.host_profile:
                profiles.append(f"== {label}\n{host_profile(fn, device, args.iters, args.top)}")
                print(profiles[-1])
    args.out.mkdir(parents=True, exist_ok=True)
    if profiles:
        (args.out / "host_profile.txt").write_text("\n".join(profiles))
    record = {"env": environment(device), "tables": results, "host": host_times}
    (args.out / "kernel_times.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
