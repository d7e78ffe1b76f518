"""Copies between caller arrays and mapped Vulkan memory at memory speed.

One ``memcpy`` per direction is the whole host-side cost of the NumPy path, and a single thread
moves ~5-10 GB/s where a server's memory system moves several times that; NumPy releases the GIL
for plain copies, so large copies are split over a small thread pool. ``AULE_KP_COPY_THREADS``
caps the threads (1: always inline).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import Callable, List, Optional, Tuple

import numpy as np

from .. import knobs

#: Copies below this many bytes stay on the calling thread (pool hand-off costs ~10-50 us).
PARALLEL_MIN_BYTES = 8 << 20


def copy_threads() -> int:
    """Threads a large copy is split over."""
    forced = knobs.current().copy_threads
    if forced:
        return forced
    # Every core, at most 16 (the most measured): on a 16-core H200 host each doubling of the threads
    # made the copies faster (BENCHMARKS.md, "Notes moved from the sources").
    return max(1, min(16, os.cpu_count() or 1))


@cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="aule_kp_copy")


def copy_bytes(pairs: List[Tuple[np.ndarray, np.ndarray]],
               check: Optional[Callable[[np.ndarray], bool]] = None) -> bool:
    """``dst[:] = src`` for each (dst, src) pair of equal-sized uint8 views, split over threads when
    large. ``check`` runs on each piece of ``dst`` right after its copy, while the piece is in cache;
    returns whether every check passed (True without one)."""
    total = sum(src.nbytes for _, src in pairs)
    threads = copy_threads() if total >= PARALLEL_MIN_BYTES else 1
    if threads == 1:
        jobs = pairs
    else:
        piece = max(1 << 20, -(-total // (threads * 2)))
        jobs = [(dst[lo:lo + piece], src[lo:lo + piece]) for dst, src in pairs for lo in range(0, src.nbytes, piece)]

    def run(job: Tuple[np.ndarray, np.ndarray]) -> bool:
        job[0][:] = job[1]
        return check is None or check(job[0])

    if threads == 1:
        return all([run(job) for job in jobs])  # a list: every copy runs, whatever a check says
    return all(list(_pool(threads).map(run, jobs)))
