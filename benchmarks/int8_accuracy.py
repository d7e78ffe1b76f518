"""Accuracy of ``precision="int8"`` against float64: SageAttention's metrics over a grid.

For every head dim, length, causal flag, GQA ratio and per-channel K offset, prints cosine
similarity, relative L1 and max absolute error of the int8 result against a float64 reference,
beside the relative L1 of ``precision="fp"`` on the same inputs (what int8 trades away). Inputs are
fp16: q, k, v standard normal, k plus ``offset`` times a per-channel standard normal (the large
channel offsets real keys carry, which smoothing takes out), B = 1, Hq = 8.

    python benchmarks/int8_accuracy.py [--backend cpu|vulkan|triton] [--quick] [--lengths 128 1024 4096]

Prints a markdown table (BENCHMARKS.md, "INT8 accuracy").
"""

from __future__ import annotations

import argparse
import itertools
import math
import platform
import time
from typing import Iterable, Tuple

import numpy as np

import aule_kp


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool) -> np.ndarray:
    """float64 attention, k/v shared by groups of query heads, causal aligned bottom-right."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    g = q.shape[1] // k.shape[1]
    out = np.empty(q.shape[:-1] + (v.shape[-1],))
    lq, lk = q.shape[2], k.shape[2]
    hidden = np.arange(lk)[None, :] > np.arange(lq)[:, None] + lk - lq
    for h in range(q.shape[1]):  # one head at a time: Lq x Lk float64 scores
        s = q[0, h] @ k[0, h // g].T / math.sqrt(q.shape[-1])
        if causal:
            s[hidden] = -np.inf
        p = np.exp(s - s.max(-1, keepdims=True))
        out[0, h] = p @ v[0, h // g] / p.sum(-1, keepdims=True)
    return out


def metrics(out: np.ndarray, ref: np.ndarray) -> Tuple[float, float, float]:
    o, r = out.astype(np.float64).ravel(), ref.ravel()
    return (float(o @ r / (np.linalg.norm(o) * np.linalg.norm(r))), float(np.abs(o - r).sum() / np.abs(r).sum()),
            float(np.abs(o - r).max()))


def grid(lengths: Iterable[int]) -> Iterable[Tuple[int, int, bool, int, float]]:
    return itertools.product((64, 128), lengths, (False, True), (8, 2), (0.0, 10.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cpu", choices=("cpu", "vulkan", "triton"))
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 1024, 4096])
    parser.add_argument("--quick", action="store_true", help="lengths 128 and 1024 only")
    args = parser.parse_args()
    lengths = [128, 1024] if args.quick else args.lengths
    to_input = (lambda x: x) if args.backend != "triton" else _torch_cuda
    print(f"precision='int8' vs float64, backend {args.backend}, fp16 inputs, B=1 Hq=8 "
          f"({platform.node()}, {time.strftime('%Y-%m-%d')})\n")
    print("| D | L | causal | Hq/Hkv | K offset | cosine | rel. L1 | max err | fp rel. L1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for d, length, causal, hkv, offset in grid(lengths):
        q = rng.standard_normal((1, 8, length, d)).astype(np.float16)
        k = (rng.standard_normal((1, hkv, length, d)) + offset * rng.standard_normal(d)).astype(np.float16)
        v = rng.standard_normal((1, hkv, length, d)).astype(np.float16)
        ref = reference(q, k, v, causal)
        outs = [aule_kp.flash_attention(*map(to_input, (q, k, v)), causal=causal, backend=args.backend,
                                        precision=precision) for precision in ("int8", "fp")]
        (cos, l1, err), (_, l1_fp, _) = (metrics(_host(o), ref) for o in outs)
        print(f"| {d} | {length} | {'yes' if causal else 'no'} | 8/{hkv} | {offset:g} | {cos:.6f} | {l1:.4f} | "
              f"{err:.4f} | {l1_fp:.1e} |", flush=True)


def _torch_cuda(x: np.ndarray):
    import torch

    return torch.from_numpy(x).cuda()


def _host(x) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else x.float().cpu().numpy()


if __name__ == "__main__":
    main()
