"""Shared timing helpers for the benchmark scripts.

    from common import time_fn, peak_memory, markdown_table

    t = time_fn(lambda: f(x), device="cpu")          # -> Timing(median_ms=..., ...)
    t = time_back_to_back(lambda: f(x), device="cuda")  # throughput: per call, calls queued
    ts = time_many({"a": fa, "b": fb}, device="cpu")  # -> {"a": Timing, "b": Timing}
    mem = peak_memory(lambda: f(x), device="cpu")     # -> bytes above the starting point

time_fn runs `fn` a few times to warm up (allocator, caches, torch.compile, lazy init), then
times `repeats` calls and reports the median (robust against a noisy shared machine) and the
minimum. On CPU each call is timed with time.perf_counter; on CUDA with a pair of CUDA events
around each call, after a synchronize, so that only GPU time between the events counts. That
is a call's latency: the GPU waits while the host prepares the call, so the host time before
the launch counts too. time_back_to_back measures throughput instead, as a training loop sees
it: `calls` calls queued one after another between two events, so the host prepares the next
call while the GPU runs the current one, and per-call host time counts only where it exceeds
the kernel's. (On CPU, where calls are synchronous, the two are the same.)

peak_memory reports how far memory rose above its level before the call: on CUDA from
torch.cuda.max_memory_allocated; on CPU from the process's peak resident set (Linux VmHWM,
reset through /proc/self/clear_refs), which also counts allocator and page-cache effects, so
read it as an estimate.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

__all__ = ["Timing", "time_fn", "time_back_to_back", "time_many", "peak_memory", "sync", "markdown_table", "gbps"]


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    repeats: int

    def __str__(self) -> str:
        return f"{self.median_ms:.3f} ms (min {self.min_ms:.3f}, n={self.repeats})"


def sync(device) -> None:
    """Wait for queued work on `device` (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], *, device="cpu", warmup: int = 3, repeats: int = 10,
            max_seconds: Optional[float] = 20.0) -> Timing:
    """Median and minimum wall time of fn() in milliseconds.

    warmup: untimed calls first. repeats: timed calls (fewer if they would take longer than
    max_seconds in total, but at least 3).
    """
    dev = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    start_all = time.perf_counter()
    for i in range(repeats):
        times.append(_time_once(fn, dev))
        if (max_seconds is not None and i >= 2
                and time.perf_counter() - start_all > max_seconds):
            break
    return Timing(statistics.median(times), min(times), len(times))


def _time_once(fn, dev) -> float:
    if dev.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_back_to_back(fn: Callable[[], object], *, device="cpu", warmup: int = 3, repeats: int = 10,
                      calls: int = 20, max_seconds: Optional[float] = 20.0) -> Timing:
    """Median and minimum time per call, in milliseconds, of `calls` consecutive calls timed
    together (throughput; see the module docstring); `repeats` such groups."""
    dev = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    start_all = time.perf_counter()
    for i in range(repeats):
        if dev.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / calls)
        else:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / calls)
        if max_seconds is not None and i >= 2 and time.perf_counter() - start_all > max_seconds:
            break
    return Timing(statistics.median(times), min(times), len(times))


def time_many(fns: dict, *, device="cpu", warmup: int = 3, repeats: int = 10,
              max_seconds: Optional[float] = 120.0) -> dict:
    """Like time_fn for several callables, timed round-robin (a, b, c, a, b, c, ...), so that
    a change in machine load hits all of them alike. Returns {name: Timing}."""
    dev = torch.device(device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(dev)
    times = {name: [] for name in fns}
    start_all = time.perf_counter()
    for i in range(repeats):
        for name, fn in fns.items():
            times[name].append(_time_once(fn, dev))
        if max_seconds is not None and i >= 2 and time.perf_counter() - start_all > max_seconds:
            break
    return {name: Timing(statistics.median(v), min(v), len(v)) for name, v in times.items()}


def _cpu_rss_bytes(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_memory(fn: Callable[[], object], *, device="cpu") -> Optional[int]:
    """Bytes by which memory peaked above its level before fn() (None if not measurable)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        fn()
        sync(dev)
        return torch.cuda.max_memory_allocated(dev) - base
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
    except OSError:
        return None
    base = _cpu_rss_bytes("VmRSS")
    fn()
    peak = _cpu_rss_bytes("VmHWM")
    if base is None or peak is None:
        return None
    return max(0, peak - base)


def with_env(name: str, value: str, call: Callable[[], object]) -> object:
    """call() with environment variable `name` set to `value` (restored after): for the
    switches fastattn's CUDA ops read per call (FASTATTN_CUDA_KV_SPLITS, ..._RESCALE_SLACK,
    ..._UNORDERED_DQ), so that one run can time a kernel with and without an optimization."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        return call()
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def gbps(nbytes: float, ms: float) -> float:
    """Throughput in GB/s (1e9 bytes per second)."""
    return nbytes / (ms * 1e-3) / 1e9


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table; floats are printed with 3 significant decimals."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
