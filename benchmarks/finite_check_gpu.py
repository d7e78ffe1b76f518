"""What the Vulkan host path's output check costs on this machine's host: ``copy_bytes`` of a
64 MiB fp16 output (B1 H32 S8192 D128) into a fresh array, without and with the per-piece finite
check (``nonfinite.all_finite``), over the copy threads, and the check alone on one thread.
Prints a markdown table (medians of 9 calls).

    python3 benchmarks/finite_check_gpu.py
"""

from __future__ import annotations

import statistics
import time
from functools import partial

import numpy as np

from aule_kp.nonfinite import all_finite
from aule_kp.vulkan.hostcopy import copy_bytes, copy_threads


def median_ms(fn) -> float:
    fn()
    times = []
    for _ in range(9):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    src = np.random.default_rng(0).standard_normal(32 << 20).astype(np.float16).view(np.uint8)
    check = partial(all_finite, dtype="float16")
    kept = np.empty_like(src)
    rows = [
        ("copy into a fresh array", lambda: copy_bytes([(np.empty_like(src), src)])),
        ("copy into a fresh array + check", lambda: copy_bytes([(np.empty_like(src), src)], check)),
        ("copy into a kept array", lambda: copy_bytes([(kept, src)])),
        ("copy into a kept array + check", lambda: copy_bytes([(kept, src)], check)),
        ("check alone, one thread", lambda: all_finite(src, "float16")),
    ]
    print(f"64 MiB fp16, {copy_threads()} copy threads\n\n| what | ms |\n|---|---|")
    for name, fn in rows:
        print(f"| {name} | {median_ms(fn):.2f} |", flush=True)


if __name__ == "__main__":
    main()
