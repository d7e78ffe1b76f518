"""CpuBackend (compiled kernels and NumPy path) against torch's CPU ``scaled_dot_product_attention``,
forward and backward, and CpuBackend's peak memory.

    .venv/bin/python benchmarks/cpu_vs_torch.py [--repeat 7] [--seqs 512 2048 8192 16384]
        [--dtypes float32 bfloat16] [--passes forward backward] [--no-numpy] [--mem-seq 16384]

Timing: B1 D64 self-attention, H16 up to S2048 and ``16 * (2048 / S)**2`` heads beyond (at least
1), so every row is about the same work; the same inputs for all. One warm-up each, then
``--repeat`` rounds that run the compiled path and torch back to back (a shared machine drifts;
alternating keeps them under the same conditions); medians, and each one's time over torch's. The
NumPy path alternates with torch in rounds of its own: OpenBLAS's idle workers spin after its calls
and slowed the next contender. For the same reason torch's OpenMP runs with
``OMP_WAIT_POLICY=passive`` (unless set): its spinning workers added 1.3-3 ms to whatever ran next
at S512 on 2 cores, even 0.3 s later, while torch's own times were no slower passive (2026-12-05:
S512 4.87 vs 5.01 ms, S2048 73.4 vs 78.5 ms). Backward: the
gradients of q, k, v from saved forward results (torch: ``backward`` of a retained graph).
Memory: B1 H1 D64 at ``--mem-seq``, tracemalloc's peak (NumPy reports its buffers to it) and the
growth of the peak RSS, beside what the ``Lq x Lk`` scores alone would take.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import resource
import statistics
import subprocess
import time
import tracemalloc
from typing import Callable, Dict, List

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # before torch loads its OpenMP (see above)

from aule_kp.cpu.backend import CpuBackend  # noqa: E402
from aule_kp.dtypes import from_f32  # noqa: E402
from aule_kp.problem import Problem, default_scale  # noqa: E402

MIB = 1 << 20


def problem(seq: int, heads: int, dim: int, causal: bool, dtype: str = "float32") -> Problem:
    """Self-attention ``Problem`` (Lq = Lk, so both causal alignments agree)."""
    return Problem(1, heads, heads, seq, seq, dim, dim, dtype, default_scale(dim), right=0 if causal else None)


def heads_for(seq: int) -> int:
    return max(1, round(16 * (2048 / seq) ** 2)) if seq > 2048 else 16


def interleaved_medians(fns: Dict[str, Callable[[], object]], repeat: int) -> Dict[str, float]:
    """Median seconds of each function, run in turn ``repeat`` times after one warm-up each."""
    for fn in fns.values():
        fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def memory(backend: CpuBackend, seq: int) -> None:
    """Print the peak extra memory of one B1 H1 D64 non-causal forward at ``seq``."""
    rng = np.random.default_rng(1)
    p = problem(seq, 1, 64, causal=False)
    q, k, v = (rng.standard_normal((1, 1, seq, 64), dtype=np.float32) for _ in range(3))
    backend.forward(problem(64, 1, 64, False), q[:, :, :64], k[:, :, :64], v[:, :, :64], None)  # JIT/cache load
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    tracemalloc.start()
    t0 = time.perf_counter()
    backend.forward(p, q, k, v, None)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    print(
        f"memory B1 H1 S{seq} D64: tracemalloc peak {peak / MIB:.1f} MiB, peak RSS +{rss / 1024:.1f} MiB "
        f"(output {q.nbytes / MIB:.1f} MiB; Lq x Lk float32 scores would be {seq * seq * 4 / MIB:.0f} MiB), "
        f"{seconds:.2f} s"
    )


def contenders(which: str, backends: Dict[str, CpuBackend], p: Problem,
               causal: bool) -> Dict[str, Callable[[], object]]:
    """One call per contender for ``which`` pass of ``p``, on the same unit-normal inputs."""
    import torch

    rng = np.random.default_rng(0)
    shape = (p.batch, p.heads_q, p.len_q, p.dim_k)
    q, k, v, do = (from_f32(rng.standard_normal(shape, dtype=np.float32), p.dtype) for _ in range(4))
    tdt = torch.float32 if p.dtype == "float32" else torch.bfloat16
    tq, tk, tv, tdo = (torch.from_numpy(a).view(tdt) for a in (q, k, v, do))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    fns: Dict[str, Callable[[], object]] = {}
    if which == "forward":
        for name, be in backends.items():
            fns[name] = functools.partial(be.forward, p, q, k, v, None)
        fns["torch"] = functools.partial(sdpa, tq, tk, tv, is_causal=causal)
    else:
        for name, be in backends.items():
            out, lse = be.forward(p, q, k, v, None)
            fns[name] = functools.partial(be.backward, p, q, k, v, out, do, lse, None)
        leaves = tuple(t.clone().requires_grad_() for t in (tq, tk, tv))
        tout = sdpa(*leaves, is_causal=causal)
        fns["torch"] = functools.partial(torch.autograd.grad, tout, leaves, tdo, retain_graph=True)
    return fns


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    """Print the memory line, then one timing table per pass."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--seqs", type=int, nargs="+", default=[512, 2048, 8192, 16384])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--passes", nargs="+", default=["forward", "backward"], choices=["forward", "backward"])
    ap.add_argument("--no-numpy", action="store_true", help="leave out the NumPy path")
    ap.add_argument("--mem-seq", type=int, default=16384)
    args = ap.parse_args()

    compiled = CpuBackend()
    if compiled.native() is None:
        raise SystemExit("the native CPU kernel is not installed (python scripts/cpu_build.py --into aule_kp)")
    backends = {"compiled": compiled}
    if not args.no_numpy:
        backends["numpy"] = CpuBackend(use_compiled=False)
    if args.mem_seq:
        memory(compiled, args.mem_seq)  # first, while the process's peak RSS is still low

    import torch  # optional dependency: only the timing needs it

    print(f"{cpu_model()}, {len(os.sched_getaffinity(0))} CPUs; torch {torch.__version__} "
          f"on {torch.get_num_threads()} threads; numpy {np.__version__}; times are medians of {args.repeat} rounds")
    # Each contender's rounds against torch: the compiled path's, then the NumPy path's (its own torch column).
    columns = ["compiled", "torch"] + (["numpy", "torch*"] if "numpy" in backends else [])
    head = "".join(f"{n:>14}" for n in columns) + "".join(f"{n + '/torch':>15}" for n in backends)
    if "numpy" in backends:
        print("torch*: torch in the NumPy path's rounds")
    for which in args.passes:
        print(f"\n{which}\n{'problem':34}{head}")
        for dtype in args.dtypes:
            for seq in args.seqs:
                for causal in (False, True):
                    h = heads_for(seq)
                    p = problem(seq, h, 64, causal, dtype)
                    fns = contenders(which, backends, p, causal)
                    times, ratios = [], []
                    for name in backends:
                        t = interleaved_medians({name: fns[name], "torch": fns["torch"]}, args.repeat)
                        times += [t[name], t["torch"]]
                        ratios.append(t[name] / t["torch"])
                    label = f"{dtype} H{h} S{seq}{' causal' if causal else ''}"
                    print(f"{label:34}" + "".join(f"{x * 1e3:>11.1f} ms" for x in times)
                          + "".join(f"{r:>14.2f}x" for r in ratios), flush=True)

if __name__ == "__main__":
    main()
