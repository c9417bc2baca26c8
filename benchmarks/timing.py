"""Timing helpers shared by ``run.py`` and ``decode.py``: CUDA events on the GPU, a host clock on the CPU.

On the GPU every call is bracketed by CUDA events after an untimed warm-up call; the number of timed
calls follows from one synchronised call and a per-measurement budget; the median is reported. The
timed calls are issued back to back, as a training or decoding loop issues them, and the host waits once
at the end: a call's time is the device's, plus any gap where the host launches its kernels slower than
the device runs them. The host's own time per call (launch overhead) is reported beside it.
On the CPU (smoke tests only) ``time.perf_counter`` replaces the events.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    """Median, minimum and count of the timed calls, in milliseconds; host_ms: host time per call."""

    median_ms: float
    min_ms: float
    reps: int
    host_ms: float | None = None


class Budget:
    """A wall-clock deadline: measurements stop once it has passed (``minutes=None``: no deadline)."""

    def __init__(self, minutes: float | None) -> None:
        self.start = time.monotonic()
        self.deadline = None if minutes is None else self.start + 60.0 * minutes

    def expired(self) -> bool:
        """True once the deadline has passed."""
        return self.deadline is not None and time.monotonic() > self.deadline

    def elapsed_s(self) -> float:
        """Seconds since the budget started."""
        return time.monotonic() - self.start


def synchronize(device: torch.device) -> None:
    """Wait for the device (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_one(fn: Callable[[], object], device: torch.device) -> float:
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def time_calls(
    fns: list[Callable[[], object]],
    device: torch.device,
    *,
    budget_ms: float = 300.0,
    min_reps: int = 3,
    max_reps: int = 100,
) -> Timing:
    """Time calls that rotate over ``fns`` (one per input set, so repeated calls do not hit the L2).

    One untimed warm-up call per function (compilation, autotuning, allocator growth), then timed calls
    until ``budget_ms`` is spent, at least ``min_reps`` and at most ``max_reps``; the median is reported.
    """
    for fn in fns:
        fn()
    synchronize(device)
    first = _time_one(fns[0], device)
    reps = max(min_reps, min(max_reps, int(budget_ms / max(first, 1e-3))))
    if device.type != "cuda":
        times = [first] + [_time_one(fns[i % len(fns)], device) for i in range(1, reps)]
        return Timing(statistics.median(times), min(times), len(times))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    t0 = time.perf_counter()
    for i, (start, end) in enumerate(events):
        start.record()
        fns[i % len(fns)]()
        end.record()
    host_ms = 1e3 * (time.perf_counter() - t0) / reps
    events[-1][1].synchronize()
    times = [start.elapsed_time(end) for start, end in events]
    return Timing(statistics.median(times), min(times), reps, host_ms)


def time_graph(
    fns: list[Callable[[], object]],
    device: torch.device,
    *,
    calls_per_graph: int = 20,
    budget_ms: float = 200.0,
    min_reps: int = 5,
) -> tuple[Timing, str]:
    """Per-call time of short calls: a CUDA graph of ``calls_per_graph`` calls (rotating over ``fns``),
    replayed and timed with events. Falls back to ``time_calls`` on the CPU or when capture fails.

    Returns the timing and the method used ("cuda_graph" or "events").
    """
    if device.type != "cuda":
        return time_calls(fns, device, budget_ms=budget_ms, min_reps=min_reps), "host_clock"
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    try:
        with torch.cuda.stream(stream):
            for fn in fns:  # warm-up outside the capture (compilation, workspace allocation)
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(calls_per_graph):
                fns[i % len(fns)]()
    except RuntimeError:
        synchronize(device)
        return time_calls(fns, device, budget_ms=budget_ms, min_reps=min_reps), "events"
    timing = time_calls([graph.replay], device, budget_ms=budget_ms, min_reps=min_reps)
    host_ms = None if timing.host_ms is None else timing.host_ms / calls_per_graph
    per_call = Timing(timing.median_ms / calls_per_graph, timing.min_ms / calls_per_graph, timing.reps, host_ms)
    return per_call, "cuda_graph"


def rotation_sets(set_bytes: int, device: torch.device, *, max_sets: int = 8) -> int:
    """How many input sets to rotate over so that together they exceed twice the L2 (1 on the CPU)."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    return max(1, min(max_sets, -(-2 * l2 // max(set_bytes, 1))))
