"""Timing and memory measurement shared by ``mono-quant bench`` and the suite in ``benchmarks/``: one timer
for host-clocked numbers (medians of synchronized calls, with their spread), a read ceiling of the same
tensor, and the peak extra memory of a call."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "Timing",
    "ceiling_seconds",
    "ceiling_timing",
    "median_seconds",
    "peak_extra_bytes",
    "synchronize",
    "time_calls",
]


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so that host timers see all of it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Wall times of the calls of one measurement: ``median``, ``p25``, ``p75`` (seconds), ``calls``."""

    median: float
    p25: float
    p75: float
    calls: int

    @property
    def spread(self) -> float:
        """Interquartile range over the median (0 for a single call)."""
        return (self.p75 - self.p25) / self.median if self.median > 0 else 0.0


def time_calls(
    fn: Callable[[], object],
    device: torch.device | str = "cpu",
    *,
    rounds: int = 7,
    warmup: int = 1,
    min_seconds: float = 0.0,
    max_calls: int = 100_000,
) -> Timing:
    """Time ``fn()`` after ``warmup`` calls, synchronizing the device: at least ``rounds`` calls and at least
    ``min_seconds`` of them (at most ``max_calls``).

    Raises:
        ValueError: ``rounds < 1`` or ``min_seconds < 0``.
    """
    if rounds < 1:
        raise ValueError(f"rounds={rounds} must be at least 1")
    if not min_seconds >= 0:
        raise ValueError(f"min_seconds={min_seconds} must be >= 0")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    total = 0.0
    while len(times) < rounds or (total < min_seconds and len(times) < max_calls):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
        total += times[-1]
    if len(times) == 1:
        return Timing(times[0], times[0], times[0], 1)
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return Timing(statistics.median(times), q1, q3, len(times))


def median_seconds(
    fn: Callable[[], object],
    device: torch.device | str = "cpu",
    *,
    rounds: int = 7,
    warmup: int = 1,
    min_seconds: float = 0.0,
) -> float:
    """Median wall time of ``fn()`` (``time_calls``: at least ``rounds`` calls and ``min_seconds``).

    Raises:
        ValueError: ``rounds < 1``.
    """
    return time_calls(fn, device, rounds=rounds, warmup=warmup, min_seconds=min_seconds).median


def ceiling_seconds(x: torch.Tensor, op: str = "sum", *, rounds: int = 7, min_seconds: float = 0.0) -> float:
    """Median time of the plain pass over ``x`` that bounds an observer: ``"sum"`` (one read) or ``"clone"``.

    Raises:
        ValueError: unknown ``op``.
    """
    return ceiling_timing(x, op, rounds=rounds, min_seconds=min_seconds).median


def ceiling_timing(x: torch.Tensor, op: str = "sum", *, rounds: int = 7, min_seconds: float = 0.0) -> Timing:
    """``ceiling_seconds`` with the spread of its calls."""
    if op not in ("sum", "clone"):
        raise ValueError(f"op={op!r} is not 'sum' or 'clone'")
    fn = x.sum if op == "sum" else x.clone
    return time_calls(fn, x.device, rounds=rounds, min_seconds=min_seconds)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device | str) -> int | None:
    """Peak memory ``fn()`` allocates on top of what is already allocated, in bytes.

    CUDA: ``torch.cuda.max_memory_allocated`` around the call (exact). CPU: torch's allocator keeps no
    statistics, so the allocation events of ``torch.profiler`` are replayed: each op's allocations count
    from its start, its frees from its end (an upper bound within an op). ``None`` where neither works.
    """
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    if device.type != "cpu":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    changes = []
    for event in prof.events():
        delta = event.self_cpu_memory_usage
        if delta > 0:
            changes.append((event.time_range.start, delta))
        elif delta < 0:
            changes.append((event.time_range.end, delta))
    current = peak = 0
    for _, delta in sorted(changes, key=lambda change: change[0]):
        current += delta
        peak = max(peak, current)
    return peak
