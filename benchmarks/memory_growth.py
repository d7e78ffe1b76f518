"""How much memory the Vulkan engine keeps as calls of new shapes come (issue 15, part 4).

Modes (each prints a markdown table; RSS is the process's resident set from /proc/self/status,
growth counted from just before the first Vulkan call, so the Manager and first pipeline count):

* ``--shapes N``: N distinct random problems (NumPy host path, ``backend="vulkan"``, seeded): batch
  1-4, 1-4 kv heads, GQA groups 1/2/4, Lq 1-300, Lk 1-600, head dims 32/64/80/128 (Dk = Dv), fp16 or
  fp32, causal or not. Bar: 396 shapes grow RSS by at most 1,280 MB on lavapipe.
* ``--decode STEPS``: a decode loop, Lq 1, fp16, D 64, B1 Hq8 Hkv2, the keys growing by one per step
  from ``--start``. Bar: 300 steps grow RSS by at most 300 MB.
* ``--pipelines``: what one pipeline of each kernel holds on this driver (built and destroyed three
  times each with no queue submission between: lavapipe frees a destroyed pipeline's JIT code at the
  next submission, so the growth is what each holds), the source of ``plan.PIPELINE_BYTES``.
* ``--timing DIR``: one-process A/B of a repeated same-shape call (B1 H8 L128 D64 fp16), this
  checkout against the ``aule_kp`` package in DIR (e.g. a ``git worktree`` of the commit before),
  loaded under another name; rounds alternate, medians per round.

Results are checked against a float64 reference at every call of ``--shapes`` and ``--decode``.
Run from the repository root: ``python -m benchmarks.memory_growth --shapes 396``; ``PYTHONPATH=DIR
python benchmarks/memory_growth.py ...`` measures the package in DIR (an older checkout) instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

import aule_kp
from aule_kp.vulkan import device as devmod
from aule_kp.vulkan import plan as planmod

MB = 1 << 20


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool) -> np.ndarray:
    """float64 attention, causal bottom-right aligned; rows that see no key give 0."""
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k64, v64 = np.repeat(k64, group, 1), np.repeat(v64, group, 1)
    s = q64 @ k64.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1])
    lq, lk = q.shape[2], k.shape[2]
    if causal:
        s = np.where(np.arange(lk)[None, :] <= np.arange(lq)[:, None] + lk - lq, s, -np.inf)
    top = s.max(-1, keepdims=True)
    p = np.exp(s - np.where(np.isfinite(top), top, 0))
    total = p.sum(-1, keepdims=True)
    return (p / np.where(total > 0, total, 1)) @ v64


def tolerance(dtype: Any, lk: int) -> float:
    """Max abs error allowed on standard-normal inputs: the output is a convex combination of v
    rows (|o| <~ 4), rounded once to its storage (half an ulp: 2e-3 fp16 near 4); fp32 accumulation
    over lk keys adds ~lk * 2^-24 relative."""
    return 2e-3 if dtype == np.float16 else 4 * (1 + lk) * 2.0 ** -24 + 1e-6


def call(rng: np.random.Generator, shape: Tuple[int, ...], dtype: Any, causal: bool) -> float:
    """Runs one problem on Vulkan; its max error over the tolerance (<= 1 passes)."""
    b, hq, hkv, lq, lk, d = shape
    q, k, v = (rng.standard_normal(s).astype(dtype) for s in ((b, hq, lq, d), (b, hkv, lk, d), (b, hkv, lk, d)))
    out = aule_kp.flash_attention(q, k, v, causal=causal, backend="vulkan")
    return float(np.abs(out.astype(np.float64) - reference(q, k, v, causal)).max()) / tolerance(dtype, lk)


def distinct_shapes(n: int, seed: int = 0) -> List[Tuple[Tuple[int, ...], Any, bool]]:
    rng = np.random.default_rng(seed)
    seen: Dict[Tuple[Any, ...], Tuple[Tuple[int, ...], Any, bool]] = {}
    while len(seen) < n:
        hkv, group = int(rng.integers(1, 5)), int(rng.choice([1, 2, 4]))
        shape = (int(rng.integers(1, 5)), hkv * group, hkv, int(rng.integers(1, 301)), int(rng.integers(1, 601)),
                 int(rng.choice([32, 64, 80, 128])))
        dtype, causal = (np.float16, np.float32)[int(rng.integers(2))], bool(rng.integers(2))
        seen.setdefault((shape, np.dtype(dtype).name, causal), (shape, dtype, causal))
    return list(seen.values())


def run_loop(items: List[Any], one: Callable[[Any], float], what: str, every: int) -> None:
    """Runs ``one`` over ``items``, printing a row of RSS growth and plan counters every ``every``."""
    plans = devmod.get_device().plans
    devmod.get_device().manager  # noqa: B018 - made before the baseline: the Manager is kp's fixed cost
    start, t0 = rss_mb(), time.perf_counter()
    print(f"| {what} | RSS growth MB | plans built | algorithms built | sequences recorded | plans cached "
          "| cache MB | worst err / tol |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    worst = 0.0
    for i, item in enumerate(items, 1):
        worst = max(worst, one(item))
        if i % every == 0 or i == len(items):
            s = planmod.stats
            print(f"| {i} | {rss_mb() - start:.0f} | {s['plans']} | {s['algorithms']} | {s.get('records', '-')} | "
                  f"{len(plans)} | {plans.nbytes / MB:.0f} | {worst:.3f} |", flush=True)
    print(f"\n{time.perf_counter() - t0:.1f} s in all\n")
    if worst > 1:
        raise SystemExit(f"a result was off by {worst:.2f} x its tolerance")


def pipelines() -> None:
    """What one pipeline of each kernel holds in RSS (see the module doc)."""
    from aule_kp.problem import Problem
    from aule_kp.vulkan.choice import backward_config, forward_kernel, split_kernel

    dev = devmod.get_device()
    kp, mgr = dev.kp, dev.manager
    tensors = [mgr.tensor_t(np.zeros(1024, np.uint32), kp.TensorTypes.host) for _ in range(12)]

    def cost(kernel: Any, spec: np.ndarray, bindings: int, push: int, n: int = 3) -> float:
        spirv, before = dev.spirv(kernel.kernel), rss_mb()
        for _ in range(n):
            mgr.algorithm(tensors[:bindings], spirv, (1, 1, 1), spec, np.zeros(push, np.uint32)).destroy()
        return (rss_mb() - before) / n

    print("| D | dtype | forward MB | split-KV MB | backward pre / dK dV / dQ MB |")
    print("|---:|---|---:|---:|---|")
    for d in (32, 64, 128, 256):
        for dtype in ("float16", "float32"):
            p = Problem(1, 8, 2, 1, 1024, d, d, dtype, 0.1)
            fwd, split = forward_kernel(dev.caps, p), split_kernel(dev.caps, p)
            bwd = backward_config(dev.caps, p, False)
            back = " / ".join(f"{cost(k, bwd.spec(k), 12, 15):.1f}" for k in bwd.kernels())
            print(f"| {d} | {dtype} | {cost(fwd, fwd.spec(), 6, 15):.1f} | {cost(split, split.spec(), 9, 17):.1f} | "
                  f"{back} |")


def load_package(root: Path, name: str) -> Any:
    """The ``aule_kp`` package under ``root``, imported as ``name`` (its imports are relative)."""
    spec = importlib.util.spec_from_file_location(name, root / "aule_kp" / "__init__.py",
                                                  submodule_search_locations=[str(root / "aule_kp")])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


#: Shapes of ``--timing``: a tiny one (the host path's overhead), a decode step, a small prefill.
TIMED = {"B1 H2 L4 D32": ((1, 2, 4, 32), (1, 2, 4, 32)), "B1 Hq8 Hkv2 Lq1 Lk512 D64": ((1, 8, 1, 64), (1, 2, 512, 64)),
         "B1 H8 L128 D64": ((1, 8, 128, 64), (1, 8, 128, 64))}


def _host_call(package: Any, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> Callable[[], Any]:
    return lambda: package.flash_attention(q, k, v, backend="vulkan")


def _gpu_tensor_call(package: Any, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> Callable[[], Any]:
    """A repeated ``Context.attention`` into the same output (the data stays on the device)."""
    ctx = package.Context()
    qt, kt, vt = (ctx.tensor(x.shape, np.float16).upload(x) for x in (q, k, v))
    out = ctx.attention(qt, kt, vt)
    return lambda: ctx.attention(qt, kt, vt, out)


def timing(base: Path, rounds: int = 7, calls: int = 300) -> None:
    """Median per-call time of repeated same-shape calls (fp16), this checkout vs ``base``, on the
    NumPy host path and the GpuTensor path: rounds of ``calls`` calls each, the two in turns, either
    one first by turns."""
    other = load_package(base, "aule_kp_base")
    packages = {"before": other, "after": aule_kp}
    rng = np.random.default_rng(0)
    print("| fp16, repeated call | before µs | after µs | after / before | rounds before; after (µs) |")
    print("|---|---:|---:|---:|---|")
    for label, (q_shape, kv_shape) in TIMED.items():
        q, k, v = (rng.standard_normal(s).astype(np.float16) for s in (q_shape, kv_shape, kv_shape))
        for path, make in (("NumPy", _host_call), ("GpuTensor", _gpu_tensor_call)):
            runs = {name: make(package, q, k, v) for name, package in packages.items()}
            medians: Dict[str, List[float]] = {name: [] for name in runs}
            for f in runs.values():
                for _ in range(20):
                    f()
            for r in range(rounds):
                for name, f in sorted(runs.items(), reverse=r % 2 == 1):  # either one first, by turns
                    times = []
                    for _ in range(calls):
                        t0 = time.perf_counter()
                        f()
                        times.append(time.perf_counter() - t0)
                    medians[name].append(statistics.median(times) * 1e6)
            before, after = (statistics.median(medians[name]) for name in runs)
            detail = "; ".join(", ".join(f"{x:.0f}" for x in medians[name]) for name in runs)
            print(f"| {label} {path} | {before:.0f} | {after:.0f} | {after / before:.3f} | {detail} |", flush=True)


def main(argv: List[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", type=int, help="distinct random problems")
    ap.add_argument("--decode", type=int, help="decode steps (keys grow by one per step)")
    ap.add_argument("--start", type=int, default=1, help="keys at the first decode step")
    ap.add_argument("--pipelines", action="store_true", help="RSS kept per pipeline, by kernel")
    ap.add_argument("--timing", type=Path, metavar="DIR", help="A/B against the aule_kp package in DIR")
    args = ap.parse_args(argv)
    dev = devmod.get_device()
    print(f"device: {dev.caps.name} ({dev.caps.type}), kp patch {devmod.kp_patch_level(dev.kp)}, "
          f"grids settable: {hasattr(dev.kp.Algorithm, 'set_workgroup')}, plan cache {dev.plans.limit() // MB} MB\n")
    rng = np.random.default_rng(1)
    if args.shapes:
        shapes = distinct_shapes(args.shapes)
        run_loop(shapes, lambda s: call(rng, *s), "distinct shapes", max(1, args.shapes // 12))
    if args.decode:
        steps = list(range(args.start, args.start + args.decode))
        run_loop(steps, lambda lk: call(rng, (1, 8, 2, 1, lk, 64), np.float16, False), "decode steps",
                 max(1, args.decode // 10))
    if args.pipelines:
        pipelines()
    if args.timing:
        timing(args.timing)


if __name__ == "__main__":
    main()
