"""Peak memory of a call on the CPU, which has no allocator counter like CUDA's ``max_memory_allocated``."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable


def child_env() -> dict[str, str]:
    """Environment of a measuring child process.

    glibc then serves every block above 64 KiB with its own mapping and returns it on free, so the resident set
    follows the live tensors instead of the allocator's free lists.
    """
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def rss_bytes() -> int:
    """Resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_growth_mb(fn: Callable[[], object]) -> float:
    """Peak growth of the resident set size while ``fn()`` runs, sampled every 0.5 ms by a thread, in MiB.

    Run it in a fresh process per measured thing, so that memory freed by an earlier call does not hide growth.
    """
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.0005)

    base = rss_bytes()
    thread = threading.Thread(target=sample)
    thread.start()
    try:
        fn()
    finally:
        stop.set()
        thread.join()
    return (max(peak[0], rss_bytes()) - base) / 2**20
