"""Benchmark hygiene shared by every ``veca bench``: warm-up, medians, spread, peak memory, tables.

Benchmark hygiene: warm up each shape at least 3 times, take the median of at least 5 runs and report the
spread (min–max). Timings run under :func:`steady_allocator` (freed memory stays in glibc's heap, as
with jemalloc/tcmalloc, so no call pays page faults for fresh mappings). Peak memory is measured, not
estimated: on CUDA with the caching allocator's peak counter; on Linux CPUs with the kernel's
resident-set high-water mark (``VmHWM``), reset through ``/proc/self/clear_refs`` before the measured
call, with every allocation >= 64 KiB a fresh mapping returned to the kernel when freed. Measure
memory before timing in a process: a heap grown by heap-reuse timing recycles freed chunks inside
itself, and a peak measured after it counts memory that was never live at once.
"""

from __future__ import annotations

import ctypes
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass
class Stats:
    """Latency of repeated calls, in seconds."""

    median: float
    min: float
    max: float
    runs: int

    def fmt_ms(self) -> str:
        return f"{self.median * 1e3:.1f} ({self.min * 1e3:.1f}–{self.max * 1e3:.1f})"


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(fn: Callable[[], object], warmup: int = 3, repeats: int = 5, device=None) -> Stats:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; return median and spread."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"warmup must be >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    steady_allocator()
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return Stats(statistics.median(times), min(times), max(times), repeats)


def time_round_robin(calls: Sequence[Callable[[], object]], warmup: int = 3, repeats: int = 5,
                     device=None) -> list[list[float]]:
    """Warm every call up, then time them round-robin (one call of each per round), so load from
    elsewhere on the machine hits every call alike; returns the ``repeats`` timings of each call."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"warmup must be >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    steady_allocator()
    for call in calls:
        for _ in range(warmup):
            call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for i, call in enumerate(calls):
            _sync(device)
            t0 = time.perf_counter()
            call()
            _sync(device)
            times[i].append(time.perf_counter() - t0)
    return times


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_HEAP_REUSE_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed mmap threshold (64-bit)


def _libc(name: str, *args: int) -> None:
    """Call a glibc malloc tuning function; a no-op where there is no glibc (measurements still run,
    just less exact)."""
    try:
        getattr(ctypes.CDLL("libc.so.6"), name)(*args)
    except (OSError, AttributeError):
        pass


def steady_allocator() -> None:
    """Keep freed memory in glibc's heap between calls (what jemalloc/tcmalloc set-ups give PyTorch on
    CPU), so every timed call runs without page faults. Setting the mmap threshold alone is not
    enough: it also switches off glibc's dynamic trim threshold, and the default 128 KiB one hands the
    top of the heap back after each large free, so the next call faults it in again (measured at
    1344 px: 0.84M minor faults per 8 forwards by default, 0 with both set; latency −5 %)."""
    _libc("mallopt", _M_MMAP_THRESHOLD, _HEAP_REUSE_THRESHOLD)
    _libc("mallopt", _M_TRIM_THRESHOLD, 1 << 30)


def _read_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_memory_bytes(fn: Callable[[], object], device=None) -> int | None:
    """Peak memory (bytes) that one call of ``fn`` adds over what was resident before it.

    Returns ``None`` where the platform gives no way to measure it (non-Linux CPU).
    """
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    _libc("mallopt", _M_MMAP_THRESHOLD, 64 * 1024)  # every tensor a fresh mapping, unmapped when freed
    _libc("mallopt", _M_TRIM_THRESHOLD, 128 * 1024)  # glibc's default: freed heap tops go back too
    _libc("malloc_trim", 0)  # free heap pages back to the kernel, so this call's allocations show in the RSS
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return None
    base = _read_status_kib("VmRSS")
    fn()
    peak = _read_status_kib("VmHWM")
    if base is None or peak is None:
        return None
    return max(0, peak - base) * 1024


__all__ = ["Stats", "measure", "time_round_robin", "peak_memory_bytes", "steady_allocator"]
