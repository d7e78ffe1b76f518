"""CpuBackend against torch's CPU ``scaled_dot_product_attention``, and CpuBackend's peak memory.

    .venv/bin/python benchmarks/cpu_vs_torch.py [--repeat 7] [--seq 2048] [--mem-seq 16384]

Times are medians over ``--repeat`` runs after one warm-up, same inputs for both, float32,
B1 H16 D64. The memory check runs B1 H1 D64 at ``--mem-seq`` and reports tracemalloc's peak
(NumPy reports its buffers to tracemalloc) beside the output size and what ``Lq x Lk`` scores
would take.
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc
from typing import Callable, List

import numpy as np

from aule_kp.cpu.backend import CpuBackend
from aule_kp.problem import Problem, default_scale


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``fn()`` over ``repeat`` runs after one warm-up run."""
    fn()
    times: List[float] = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def problem(seq: int, heads: int, dim: int, causal: bool) -> Problem:
    """Self-attention ``Problem`` (Lq = Lk, so both causal alignments agree)."""
    return Problem(1, heads, heads, seq, seq, dim, dim, "float32", default_scale(dim), right=0 if causal else None)


def main() -> None:
    """Print the timing table and the memory line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--mem-seq", type=int, default=16384)
    args = ap.parse_args()

    import torch  # optional dependency: only this script needs it

    backend = CpuBackend()
    rng = np.random.default_rng(0)
    shape = (1, args.heads, args.seq, 64)
    q, k, v = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
    tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
    print(f"B1 H{args.heads} S{args.seq} D64 float32, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'':12}{'aule_kp cpu':>14}{'torch sdpa':>14}{'ratio':>8}{'GFLOP/s':>10}")
    for causal in (False, True):
        p = problem(args.seq, args.heads, 64, causal)
        ours = median_seconds(lambda p=p: backend.forward(p, q, k, v, None), args.repeat)
        ref = median_seconds(
            lambda c=causal: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=c),
            args.repeat,
        )
        label = "causal" if causal else "non-causal"
        print(f"{label:12}{ours * 1e3:>11.1f} ms{ref * 1e3:>11.1f} ms{ours / ref:>8.2f}{p.flops() / ours / 1e9:>10.1f}")

    s = args.mem_seq
    p = problem(s, 1, 64, causal=False)
    q, k, v = (rng.standard_normal((1, 1, s, 64), dtype=np.float32) for _ in range(3))
    tracemalloc.start()
    t0 = time.perf_counter()
    backend.forward(p, q, k, v, None)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    mib = 1 << 20
    print(
        f"memory B1 H1 S{s} D64: peak {peak / mib:.1f} MiB traced (output {q.nbytes / mib:.1f} MiB, "
        f"Lq x Lk scores would be {s * s * 4 / mib:.0f} MiB), {seconds:.2f} s"
    )


if __name__ == "__main__":
    main()
