"""A/B of a shader or tile change in one process: device-resident tensors (the GpuTensor path), GPU
timestamps, the variants timed in alternation so that clock and thermal drift hit all alike (run by
scripts/gpu_run.sh, STEPS=ab). Two modes:

    python3 benchmarks/ab_gpu.py VARIANT[,VARIANT...] [kernel ...]   # default: fa2_fwd_coopmat
    python3 benchmarks/ab_gpu.py --tiles H,S,D[,causal] BR,BC,WG,STAGE [...]

The first times the working tree's kernels (A) against other revisions' or variants' (B1, B2, ...,
compiled by scripts/spirv_at.sh into a folder) on the forward bars' problems: each B kernel is
copied next to the tree's SPIR-V as ``<kernel>_ab<i>.spv`` and run through the same KernelConfig
with only the kernel name changed, so B must follow this tree's grid and push-constant contract
(revisions from 946fbed on: x = head in section, y = query tile, z = section). A VARIANT of the
form NAME=VALUE instead runs this tree's kernels, the choice and the plan made under that
environment variable (a host-side knob). The second times the tile the library picks for one B1
fp16 problem against the given tiles of the same kernel. Prints a markdown table of medians,
ratios and max differences (outputs start as NaN, so work a variant skips shows).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

import aule_kp
from aule_kp.bench import gpu_seconds
from aule_kp.problem import Problem, band
from aule_kp.vulkan import device as devmod
from aule_kp.vulkan.backend import VulkanBackend
from aule_kp.vulkan.compile import spirv_path
from aule_kp.vulkan.configs import KernelConfig
from aule_kp.vulkan.plan import Plan

#: (heads, length, head dim, causal), B1 fp16: the forward bars' shapes.
PROBLEMS = [(32, 8192, 128, False), (32, 8192, 128, True), (32, 2048, 64, False), (32, 8192, 64, False),
            (32, 16384, 64, True)]
ROUNDS = int(os.environ.get("AB_ROUNDS", "5"))


def problem(h: int, s: int, d: int, causal: bool) -> Problem:
    diag, left, right = band(s, s, causal=causal, window=None, top_left=False)
    return Problem(1, h, h, s, s, d, d, "float16", 1 / math.sqrt(d), diag, left, right)


def label(h: int, s: int, d: int, causal: bool) -> str:
    return f"H{h} S{s} D{d}{' causal' if causal else ''}"


@contextlib.contextmanager
def environment(env: Dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def alternate(dev, p: Problem, configs: Sequence[KernelConfig],
              envs: Optional[Sequence[Dict[str, str]]] = None) -> Tuple[List[float], List[float]]:
    """Median GPU seconds of each config (its plan built under the matching ``envs`` entry) on the
    same device tensors, timed in alternation, and each output's max difference from the first's."""
    rng = np.random.default_rng(0)
    ctx = aule_kp.Context()
    shape = (p.batch, p.heads_q, p.len_q, p.dim_k)
    tensors = [ctx.tensor(shape, np.float16) for _ in range(4)]
    for t in tensors[:3]:
        t.upload(rng.standard_normal(shape, dtype=np.float32).astype(np.float16))
    io = [t.kp_tensor for t in tensors]
    plans = []
    for cfg, env in zip(configs, envs or [{}] * len(configs)):
        with environment(env):
            plans.append(Plan(dev, p, cfg, io))
    outs = []
    for plan in plans:
        tensors[3].upload(np.full(shape, np.nan, np.float16))  # work a variant skips shows as NaN
        plan.eval()
        outs.append(tensors[3].download().astype(np.float32))
    times: List[List[float]] = [[] for _ in plans]
    for _ in range(ROUNDS):
        for side, plan in enumerate(plans):
            times[side].append(gpu_seconds(plan, 20, warmup_s=0.2))
    for plan in plans:
        plan.destroy()
    for t in tensors:
        t.free()
    return [statistics.median(t) for t in times], [float(np.abs(o - outs[0]).max()) for o in outs]


def revisions(variants: List[str], kernels: List[str]) -> None:
    """B variants: a folder of another revision's SPIR-V, or NAME=VALUE (this tree's kernels, the plan
    built with that environment variable set, e.g. AULE_KP_SECTION_BYTES=1)."""
    dev = devmod.get_device()
    envs: List[Dict[str, str]] = [{}]
    for i, variant in enumerate(variants, 1):
        if "=" in variant and not Path(variant).is_dir():
            name, value = variant.split("=", 1)
            envs.append({name: value})
            continue
        envs.append({})
        for kernel in kernels:
            shutil.copy(Path(variant) / f"{kernel}.spv", spirv_path(f"{kernel}_ab{i}"))
    names = [f"B{i}" for i in range(1, len(variants) + 1)] if len(variants) > 1 else ["B"]
    print(f"{dev.caps.name}, {dev.caps.driver_info}: A = this tree, "
          + ", ".join(f"{n} = {d}" for n, d in zip(names, variants))
          + f" ({', '.join(kernels)}); {ROUNDS} alternating rounds, median of each\n")
    print("| problem | A ms | " + " | ".join(f"{n} ms | {n} / A | {n} max diff" for n in names) + " |")
    print("|---|---|" + "---|---|---|" * len(names))
    for shape in PROBLEMS:
        p = problem(*shape)
        cfg = VulkanBackend().config(p)
        if not isinstance(cfg, KernelConfig) or cfg.kernel not in kernels:
            print(f"| {label(*shape)} | {cfg} is not an A/B kernel |")
            continue
        configs = [cfg]
        for i, env in enumerate(envs[1:], 1):
            with environment(env):  # a knob may change the choice too (a fresh backend: no cached one)
                configs.append(VulkanBackend().config(p) if env else replace(cfg, kernel=f"{cfg.kernel}_ab{i}"))
        medians, diffs = alternate(dev, p, configs, envs)
        print(f"| {label(*shape)} | {medians[0] * 1e3:.3f} | "
              + " | ".join(f"{m * 1e3:.3f} | {m / medians[0]:.3f} | {d:.1e}" for m, d in zip(medians[1:], diffs[1:]))
              + " |", flush=True)


def tiles(spec: str, tile_specs: List[str]) -> None:
    dev = devmod.get_device()
    fields = spec.split(",")
    shape = (int(fields[0]), int(fields[1]), int(fields[2]), len(fields) > 3 and fields[3] == "causal")
    p = problem(*shape)
    cfg = VulkanBackend().config(p)
    if not isinstance(cfg, KernelConfig):
        sys.exit(f"{label(*shape)}: {cfg} is not a KernelConfig")
    configs = [cfg]
    for t in tile_specs:
        br, bc, wg, stage = (int(x) for x in t.split(","))
        configs.append(replace(cfg, br=br, bc=bc, wg=wg, stage=stage))
    print(f"{dev.caps.name}, {dev.caps.driver_info}: {label(*shape)} B1 fp16, {cfg.kernel}; "
          f"{ROUNDS} alternating rounds, median of each; first row = the library's choice\n")
    print("| BR, BC, WG, STAGE | ms | / first | max diff |\n|---|---|---|---|")
    medians, diffs = alternate(dev, p, configs)
    for c, m, diff in zip(configs, medians, diffs):
        print(f"| {c.br}, {c.bc}, {c.wg}, {c.stage} | {m * 1e3:.3f} | {m / medians[0]:.3f} | {diff:.1e} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    if sys.argv[1] == "--tiles":
        tiles(sys.argv[2], sys.argv[3:])
    else:
        revisions(sys.argv[1].split(","), sys.argv[2:] or ["fa2_fwd_coopmat"])
