"""Accuracy of a q8_0 KV cache (aule_kp.Q8Cache): attention over the quantized cache against float64
attention over the float values it replaced, for a decode step (Lq=1) over caches of a few lengths.

Prints a table: the cache's bytes per token against float16's, and the max / mean absolute error of
the output and its max error relative to the output's own scale (max |out|), for unit-normal K/V
and for K with a few large outlier channels (as LLM keys have), which widen each block's scale.

    python benchmarks/q8_kvcache_accuracy.py
"""

from __future__ import annotations

import math

import numpy as np

import aule_kp


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """float64 attention of q [B, 1, Hq, D] over k, v [B, L, Hkv, D] (GQA)."""
    g = q.shape[2] // k.shape[2]
    kk, vv = (np.repeat(x.astype(np.float64), g, axis=2) for x in (k, v))
    s = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), kk) / math.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), vv)


def main() -> None:
    rng = np.random.default_rng(0)
    b, hq, hkv, d = 2, 8, 2, 128
    print("| keys | K/V | q8_0 bytes/token vs fp16 | max abs err | mean abs err | max err / max abs out |")
    print("|---|---|---|---|---|---|")
    for outliers in (False, True):
        for length in (128, 1024, 4096):
            q, k, v = (rng.standard_normal(s).astype(np.float32) for s in
                       ((b, 1, hq, d), (b, length, hkv, d), (b, length, hkv, d)))
            if outliers:
                k[..., :4] *= 20.0
            k8, v8 = aule_kp.Q8Cache.from_float(k), aule_kp.Q8Cache.from_float(v)
            out = aule_kp.flash_attention_with_kvcache(q, k8, v8, backend="cpu")
            want = reference(q, k, v)
            err = np.abs(out - want)
            ratio = k8.nbytes / (k.size * 2)
            kind = "K with 4 outlier channels (x20)" if outliers else "unit normal"
            print(f"| {length} | {kind} | {ratio:.3f} | {err.max():.2e} | {err.mean():.2e} | "
                  f"{err.max() / np.abs(want).max():.2e} |")


if __name__ == "__main__":
    main()
