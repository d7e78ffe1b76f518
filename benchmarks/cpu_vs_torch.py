"""CpuBackend against torch's CPU ``scaled_dot_product_attention``, and CpuBackend's peak memory.

    .venv/bin/python benchmarks/cpu_vs_torch.py [--repeat 7] [--seq 2048] [--heads 16] [--mem-seq 16384]

Timing: B1 H16 S2048 D64 float32, the same inputs for both, one warm-up each, then ``--repeat``
rounds that run CpuBackend and torch back to back (a shared machine drifts; interleaving keeps the
two under the same conditions); medians. Memory: B1 H1 D64 at ``--mem-seq``, tracemalloc's peak
(NumPy reports its buffers to it) and the growth of the peak RSS, beside the output's size and
what the ``Lq x Lk`` scores alone would take.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
import tracemalloc
from typing import Callable, Dict, List

import numpy as np

from aule_kp.cpu.backend import CpuBackend
from aule_kp.problem import Problem, default_scale

MIB = 1 << 20


def problem(seq: int, heads: int, dim: int, causal: bool) -> Problem:
    """Self-attention ``Problem`` (Lq = Lk, so both causal alignments agree)."""
    return Problem(1, heads, heads, seq, seq, dim, dim, "float32", default_scale(dim), right=0 if causal else None)


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


def main() -> None:
    """Print the memory line, then the timing table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--mem-seq", type=int, default=16384)
    args = ap.parse_args()

    backend = CpuBackend()
    memory(backend, args.mem_seq)  # first, while the process's peak RSS is still low

    import torch  # optional dependency: only the timing needs it

    rng = np.random.default_rng(0)
    shape = (1, args.heads, args.seq, 64)
    q, k, v = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
    tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    print(f"B1 H{args.heads} S{args.seq} D64 float32; torch {torch.__version__} on {torch.get_num_threads()} threads")
    print(f"{'':12}{'aule_kp cpu':>14}{'torch sdpa':>14}{'ratio':>8}{'GFLOP/s':>10}")
    for causal in (False, True):
        p = problem(args.seq, args.heads, 64, causal)
        t = interleaved_medians(
            {
                "ours": lambda p=p: backend.forward(p, q, k, v, None),
                "torch": lambda c=causal: sdpa(tq, tk, tv, is_causal=c),
            },
            args.repeat,
        )
        label = "causal" if causal else "non-causal"
        print(
            f"{label:12}{t['ours'] * 1e3:>11.1f} ms{t['torch'] * 1e3:>11.1f} ms"
            f"{t['ours'] / t['torch']:>8.2f}{p.flops() / t['ours'] / 1e9:>10.1f}"
        )


if __name__ == "__main__":
    main()
