"""Measuring one phase of a run: its peak memory, in a way that works on CPU as well as on GPU.

    >>> with PeakMemory(torch.device("cpu")) as memory:
    ...     block = torch.ones(64, 2**20, dtype=torch.uint8)   # 64 MiB, touched
    >>> memory.peak_mb > 32
    True

On a GPU the figure is CUDA's max allocated during the block minus what was allocated when it
began. On a CPU there is no allocator counter to reset, and the process's ru_maxrss never goes down,
so a background thread samples the resident set size (/proc/self/statm) every millisecond and
reports the highest growth over the RSS at the start. Freed memory that the C allocator keeps
would hide the next phase's growth; `release_freed_memory` hands it back to the OS first.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import resource
import threading
import time
from collections.abc import Iterator

import torch

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_mb() -> float:
    """The process's current resident set size in MiB (Linux), 0.0 where /proc is unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE_BYTES / 2**20
    except (OSError, IndexError, ValueError):
        return 0.0


def release_freed_memory() -> None:
    """Collect garbage and return freed heap pages to the OS (glibc malloc_trim), so that the next
    measured phase starts from the memory actually in use."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Context manager: `peak_mb` is the block's peak memory growth (see the module docstring)."""

    def __init__(self, device: torch.device, interval_s: float = 0.001):
        self.device, self.interval_s = torch.device(device), interval_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        release_freed_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start_mb = torch.cuda.memory_allocated(self.device) / 2**20
            return self
        self._start_mb = self._max_mb = resident_mb()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._max_mb = max(self._max_mb, resident_mb())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20 - self._start_mb
            return
        self._stop.set()
        self._thread.join()
        self._max_mb = max(self._max_mb, resident_mb())
        self.peak_mb = self._max_mb - self._start_mb


@contextlib.contextmanager
def stopwatch(into: dict[str, float], key: str, device: torch.device | None = None) -> Iterator[None]:
    """Add the wall-clock seconds of the block to `into[key]`. With a CUDA `device`, the device is
    synchronised at both ends, so the seconds include the kernels the block launched."""
    synchronize(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        synchronize(device)
        into[key] = into.get(key, 0.0) + time.perf_counter() - start


def synchronize(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Wall-clock seconds per named phase, for the `time/*` metrics."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str) -> contextlib.AbstractContextManager[None]:
        return stopwatch(self.seconds, name)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max allocated on a GPU, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
