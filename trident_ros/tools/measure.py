"""What the benchmarks measure with: timings, peak memory, a synthetic frame, the machine's name.

Shared by ``trident-bench`` (:mod:`.bench`, :mod:`.method_bench`) and the
scripts in ``bench/``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import cv2
import numpy as np
import torch

T = TypeVar('T')

BENCH_NAMES = ('door', 'chair', 'table', 'person')
"""The vocabulary every benchmark labels with."""


@dataclass
class Timing:
    """Seconds of each repetition of one measured thing."""

    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)


class PeakRss:
    """Samples this process's RSS in a thread; ``extra`` = peak above the RSS at entry (bytes).

    RSS follows tensor memory only where freed blocks go back to the OS: see
    :func:`release_freed_memory`, which callers use first. The sampling interval (0.5 ms) can miss
    very short peaks, so this is a lower bound.
    """

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self._stop = threading.Event()
        self.base = self.peak = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(0.0005)

    def __enter__(self) -> PeakRss:
        self.base = self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def extra(self) -> int:
        return self.peak - self.base


M_MMAP_THRESHOLD = -3
"""glibc ``mallopt`` parameter: allocations at least this big get their own mapping."""


def release_freed_memory(mmap_threshold: int = 64 * 1024) -> bool:
    """Make RSS follow live tensor memory on glibc: return freed heap memory to the OS now
    (``malloc_trim``) and give every later allocation of ``mmap_threshold`` bytes or more its own
    mapping, unmapped when freed. (By default glibc raises that threshold up to 32 MiB as big blocks
    are freed, and keeps the freed ones: RSS then stays near its high-water mark and a peak *above
    the start* says little.) Process-wide and permanent; False where glibc is not there.
    """
    name = ctypes.util.find_library('c')
    try:
        libc = ctypes.CDLL(name)
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return False
    mallopt(M_MMAP_THRESHOLD, mmap_threshold)
    malloc_trim(0)
    return True


def synthetic_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8: smooth colour blobs (not noise, so SAM regions are image-like)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(height // 40, 2), max(width // 40, 2), 3), dtype=np.uint8)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


CLOCKS: dict[str, Callable[[], float]] = {'wall': time.perf_counter, 'cpu': time.process_time}
"""``wall``: elapsed time; ``cpu``: CPU time of this process, all threads (on a CPU shared with other
jobs it leaves out the time they take; it also counts a parallel region once per thread)."""


def timed_call(fn: Callable[[], T], device: torch.device,
               clock: Callable[[], float] = time.perf_counter) -> tuple[float, T]:
    """Run ``fn`` once: (seconds by ``clock``, device work included, its result)."""
    sync(device)
    start = clock()
    result = fn()
    sync(device)
    return clock() - start, result


def time_call(fn: Callable[[], object], device: torch.device, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds ``fn()`` takes by ``clock``, device work included."""
    return timed_call(fn, device, clock)[0]


def cpu_name() -> str:
    """The CPU model and core count, e.g. ``Intel(R) Xeon(R) ... (2 cores)``."""
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as stream:
            for line in stream:
                if line.startswith('model name'):
                    return f'{line.split(":", 1)[1].strip()} ({os.cpu_count()} cores)'
    except OSError:
        pass
    return f'CPU ({os.cpu_count()} cores)'


def parse_size(text: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` (e.g. ``640x480``) -> (width, height)."""
    width, height = (int(v) for v in text.lower().split('x'))
    return width, height
