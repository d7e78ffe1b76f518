"""The CPU backend against the Vulkan backend on a CPU driver (lavapipe), the two choices
``backend="auto"`` has on a machine without a GPU (aule_kp.dispatch.PRIORITY cites this table).

    .venv/bin/python benchmarks/cpu_vs_lavapipe.py [--repeat 5]

Both through ``flash_attention`` on NumPy arrays (the whole call: validation, plan, copies), the
same inputs; one warm-up each (JIT, pipelines), then ``--repeat`` alternating rounds; medians.
Problems: decode (one query row against a long cache, GQA), short and long prefill, causal or not,
float32 and float16.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from typing import Callable, Dict, List

import numpy as np

from aule_kp import flash_attention
from aule_kp.dispatch import available_backends
from aule_kp.vulkan import device as devmod

#: (label, B, Hq, Hkv, Lq, Lk, D)
CASES = [
    ("decode", 1, 8, 2, 1, 512, 64),
    ("decode", 1, 32, 8, 1, 4096, 128),
    ("prefill", 1, 8, 8, 64, 64, 64),
    ("prefill", 1, 8, 8, 256, 256, 64),
    ("prefill", 1, 8, 2, 1024, 1024, 64),
]


def medians(fns: Dict[str, Callable[[], object]], repeat: int) -> Dict[str, float]:
    for fn in fns.values():
        fn()
    times: Dict[str, List[float]] = {n: [] for n in fns}
    for _ in range(repeat):
        for n, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if "vulkan" not in available_backends():
        raise SystemExit("no Vulkan device")
    caps = devmod.get_device().caps
    print(f"Vulkan device: {caps.name} (type {caps.type}); times are medians of {args.repeat} rounds")
    print(f"{'problem':44}{'cpu':>12}{'vulkan':>12}{'vulkan/cpu':>12}")
    rng = np.random.default_rng(0)
    for label, b, hq, hkv, lq, lk, d in CASES:
        for dtype in (np.float32, np.float16):
            for causal in (False, True):
                q = rng.standard_normal((b, hq, lq, d)).astype(dtype)
                k, v = (rng.standard_normal((b, hkv, lk, d)).astype(dtype) for _ in range(2))
                fns = {name: functools.partial(flash_attention, q, k, v, causal=causal, backend=name)
                       for name in ("cpu", "vulkan")}
                t = medians(fns, args.repeat)
                what = f"{label} B{b} H{hq}/{hkv} Lq{lq} Lk{lk} D{d} {np.dtype(dtype).name}"
                what += " causal" if causal else ""
                print(f"{what:44}{t['cpu'] * 1e3:>9.2f} ms{t['vulkan'] * 1e3:>9.2f} ms{t['vulkan'] / t['cpu']:>11.1f}x",
                      flush=True)


if __name__ == "__main__":
    main()
