"""Where the time of a NumPy-path Vulkan call goes: the public ``flash_attention`` call on host
arrays, timed whole and in parts (validation, plan lookup, the plan's copies + kernels, the
non-finite repairs), then a cProfile of one call. Run by ``STEPS=cmd GPU_CMD='python3
benchmarks/host_call_profile_gpu.py' scripts/gpu_run.sh``; found the finite check's cost on the H200.

    python3 benchmarks/host_call_profile_gpu.py [H,S,D ...]     # default 32,8192,128 32,8192,64
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import sys
import time
from typing import Any, Callable, Dict, List

import numpy as np

import aule_kp
from aule_kp import call
from aule_kp.vulkan import plan as planmod

PARTS: Dict[str, List[float]] = {}


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            PARTS.setdefault(name, []).append(time.perf_counter() - start)
    return wrapper


def main(shapes: List[str]) -> None:
    call.prepare = timed("validation (call.prepare)", call.prepare)
    planmod.forward_plan = timed("plan lookup", planmod.forward_plan)
    planmod.enforce = timed("non-finite repairs", planmod.enforce)
    planmod.Plan.run_checked = timed("plan: copies + kernels + finite check", planmod.Plan.run_checked)
    rng = np.random.default_rng(0)
    for shape in shapes:
        h, s, d = (int(x) for x in shape.split(","))
        q, k, v = (rng.standard_normal((1, h, s, d), dtype=np.float32).astype(np.float16) for _ in range(3))

        def run(q: np.ndarray = q, k: np.ndarray = k, v: np.ndarray = v) -> None:
            aule_kp.flash_attention(q, k, v, backend="vulkan")

        run()
        PARTS.clear()
        whole = []
        for _ in range(7):
            start = time.perf_counter()
            run()
            whole.append(time.perf_counter() - start)
        print(f"\nB1 H{h} S{s} D{d} fp16: whole call median {statistics.median(whole) * 1e3:.2f} ms")
        for name, times in PARTS.items():
            print(f"  {name}: {statistics.median(times) * 1e3:.2f} ms")
        profile = cProfile.Profile()
        profile.enable()
        run()
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main(sys.argv[1:] or ["32,8192,128", "32,8192,64"])
