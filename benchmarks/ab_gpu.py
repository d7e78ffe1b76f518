"""A/B of a shader change in one process: the working tree's kernels against another revision's
(compiled by scripts/spirv_at.sh into a folder), same problems, same pipelines' specialisation,
device-resident tensors (the GpuTensor path), GPU timestamps, timed in alternation so that clock
and thermal drift hit both sides alike (run by scripts/gpu_run.sh, STEPS=ab).

    python3 benchmarks/ab_gpu.py SPIRV_DIR [kernel ...]   # default kernels: fa2_fwd_coopmat

Each B kernel is copied next to the tree's SPIR-V as ``<kernel>_ab.spv`` and run through the same
KernelConfig with only the kernel name changed. Prints a markdown table of medians and B/A.
"""

from __future__ import annotations

import math
import shutil
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import List

import numpy as np

import aule_kp
from aule_kp.bench import gpu_seconds
from aule_kp.problem import Problem, band
from aule_kp.vulkan import device as devmod
from aule_kp.vulkan.backend import VulkanBackend
from aule_kp.vulkan.compile import spirv_path
from aule_kp.vulkan.kernels import KernelConfig
from aule_kp.vulkan.plan import Plan

#: (heads, length, head dim, causal), B1 fp16: the forward bars' shapes.
PROBLEMS = [(32, 8192, 128, False), (32, 8192, 128, True), (32, 2048, 64, False), (32, 8192, 64, False),
            (32, 16384, 64, True)]
ROUNDS = 5


def main(spirv_dir: str, kernels: List[str]) -> None:
    dev = devmod.get_device()
    for kernel in kernels:
        shutil.copy(Path(spirv_dir) / f"{kernel}.spv", spirv_path(f"{kernel}_ab"))
    print(f"{dev.caps.name}, {dev.caps.driver_info}: A = this tree, B = {spirv_dir} ({', '.join(kernels)}); "
          f"{ROUNDS} alternating rounds, median of each\n")
    print("| problem | A ms | B ms | B / A | max diff |\n|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    ctx = aule_kp.Context()
    for h, s, d, causal in PROBLEMS:
        diag, left, right = band(s, s, causal=causal, window=None, top_left=False)
        p = Problem(1, h, h, s, s, d, d, "float16", 1 / math.sqrt(d), diag, left, right)
        cfg = VulkanBackend().config(p)
        if not isinstance(cfg, KernelConfig) or cfg.kernel not in kernels:
            print(f"| H{h} S{s} D{d}{' causal' if causal else ''} | — | — | — | {cfg} is not an A/B kernel |")
            continue
        # Device-resident tensors (the GpuTensor path): no host-memory output in the timings.
        tensors = [ctx.tensor((1, h, s, d), np.float16) for _ in range(4)]
        for t in tensors[:3]:
            t.upload(rng.standard_normal((1, h, s, d), dtype=np.float32).astype(np.float16))
        io = [t.kp_tensor for t in tensors]
        plans = [Plan(dev, p, cfg, io), Plan(dev, p, replace(cfg, kernel=f"{cfg.kernel}_ab"), io)]
        outs = []
        for plan in plans:
            plan.eval()
            outs.append(tensors[3].download().astype(np.float32))
        times: List[List[float]] = [[], []]
        for _ in range(ROUNDS):
            for side, plan in enumerate(plans):
                times[side].append(gpu_seconds(plan, 20, warmup_s=0.2))
        a, b = (statistics.median(t) for t in times)
        for plan in plans:
            plan.destroy()
        for t in tensors:
            t.free()
        print(f"| H{h} S{s} D{d}{' causal' if causal else ''} | {a * 1e3:.3f} | {b * 1e3:.3f} | {b / a:.3f} | "
              f"{float(np.abs(outs[0] - outs[1]).max()):.1e} |", flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:] or ["fa2_fwd_coopmat"])
