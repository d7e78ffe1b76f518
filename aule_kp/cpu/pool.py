"""What the CPU forward and backward passes share: the worker count, NumPy's OpenBLAS held to one
thread while our pool runs, and even splits of a range."""

from __future__ import annotations

import contextlib
import ctypes
import glob
import logging
import math
import os
import threading
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np

logger = logging.getLogger("aule_kp")


#: Tasks per worker of every CPU pass: enough to even out unequal (causal, windowed) tasks.
TASKS_PER_WORKER = 4


def worker_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects container CPU pinning, unlike os.cpu_count()
    except AttributeError:
        return os.cpu_count() or 1


def _find_openblas() -> Tuple[Optional[Callable[[], int]], Optional[Callable[[int], None]]]:
    """``(get, set)`` for the thread count of NumPy's OpenBLAS, or ``(None, None)``.

    OpenBLAS threads each large GEMM itself and its idle workers spin; with our own pool on top
    that oversubscribes the cores (measured on 2 cores: concurrent matmuls ran no faster than one,
    and spinning BLAS workers halved a concurrent ``np.add``). threadpoolctl does this lookup too,
    but is not a dependency.
    """
    npdir = os.path.dirname(np.__file__)
    paths = glob.glob(os.path.join(npdir, os.pardir, "numpy.libs", "*openblas*"))
    paths += glob.glob(os.path.join(npdir, ".dylibs", "*openblas*"))
    with contextlib.suppress(OSError):
        with open("/proc/self/maps") as maps:
            paths += sorted({line.split()[-1] for line in maps if "openblas" in line and "/" in line})
    symbols = [
        (prefix + "openblas_get_num_threads" + suffix, prefix + "openblas_set_num_threads" + suffix)
        for prefix in ("", "scipy_")
        for suffix in ("64_", "")
    ]
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get_name, set_name in symbols:
            if hasattr(lib, get_name) and hasattr(lib, set_name):
                getter, setter = getattr(lib, get_name), getattr(lib, set_name)
                getter.restype = ctypes.c_int
                setter.argtypes = [ctypes.c_int]
                setter.restype = None
                return getter, setter
    return None, None


class _BlasThreads:
    """Process-wide, reference-counted "OpenBLAS on one thread" while our pools run (other threads'
    NumPy matmuls run single-threaded meanwhile, as with threadpoolctl)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._probed = False
        self._get: Optional[Callable[[], int]] = None
        self._set: Optional[Callable[[int], None]] = None
        self._users = 0
        self._saved = 1

    def controllable(self) -> bool:
        with self._lock:
            if not self._probed:
                self._get, self._set = _find_openblas()
                self._probed = True
                if self._set is None:
                    logger.debug("cpu backend: cannot set BLAS threads; running tasks serially")
            return self._set is not None

    @contextlib.contextmanager
    def single(self) -> Iterator[None]:
        assert self._get is not None and self._set is not None
        with self._lock:
            if self._users == 0:
                self._saved = self._get()
                self._set(1)
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self._set(self._saved)


BLAS = _BlasThreads()


def split_range(lo: int, hi: int, size: int) -> List[Tuple[int, int]]:
    """``[lo, hi)`` in the fewest pieces of at most ``size``, evenly: 1025 keys in three GEMMs of
    342, not two of 512 and one of a single key."""
    if hi <= lo:
        return []
    n = math.ceil((hi - lo) / size)
    step = math.ceil((hi - lo) / n)
    return [(c0, min(c0 + step, hi)) for c0 in range(lo, hi, step)]
