"""Batched NumPy attention (GQA, causal, sliding window, masks) checked against a float64 reference.

Run: ``python examples/numpy_batched.py [--backend auto|vulkan|cpu]``. Prints one line per case and
``numpy_batched: OK`` when every case is within tolerance.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Optional, Tuple

import numpy as np

import aule_kp


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, causal: bool = False,
              window: Optional[Tuple[int, int]] = None, mask: Optional[np.ndarray] = None) -> np.ndarray:
    """Naive float64 attention with aule_kp's conventions (bottom-right causal/window, GQA)."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    lq, lk = q.shape[2], k.shape[2]
    s = q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1])
    i, j = np.arange(lq)[:, None] + (lk - lq), np.arange(lk)[None, :]  # bottom-right alignment
    visible = np.ones((lq, lk), bool)
    if causal:
        visible &= j <= i
    if window is not None:
        left, right = window
        if left >= 0:
            visible &= j >= i - left
        if right >= 0:
            visible &= j <= i + right
    if mask is not None:
        visible = visible & mask
    s = np.where(visible, s, -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.exp(s - np.where(np.isfinite(m), m, 0))
    denom = p.sum(-1, keepdims=True)
    return np.where(denom > 0, (p / np.where(denom > 0, denom, 1)) @ v, 0.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto", help="auto, vulkan, triton or cpu")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    b, hq, hkv, lq, lk, d = 2, 8, 2, 64, 96, 64  # GQA: 4 query heads per KV head
    q = rng.standard_normal((b, hq, lq, d), dtype=np.float32)
    k = rng.standard_normal((b, hkv, lk, d), dtype=np.float32)
    v = rng.standard_normal((b, hkv, lk, d), dtype=np.float32)
    padding = np.ones((b, 1, 1, lk), bool)
    padding[1, ..., :20] = False  # the second sequence is left-padded by 20 keys

    cases = [
        ("full", {}, 2e-5),
        ("causal", {"causal": True}, 2e-5),
        ("window(32,0)", {"causal": True, "window": (32, 0)}, 2e-5),
        ("padding mask", {"attn_mask": padding}, 2e-5),
    ]
    failed = 0
    print(f"aule_kp {aule_kp.__version__}, backends {aule_kp.info()['backends']}, running on {args.backend!r}")
    print(f"q {q.shape} k {k.shape} v {v.shape} float32")
    for name, kwargs, atol in cases:
        t0 = time.perf_counter()
        out = aule_kp.flash_attention(q, k, v, backend=args.backend, **kwargs)
        ms = (time.perf_counter() - t0) * 1e3
        ref_kwargs = {key: val for key, val in kwargs.items() if key != "attn_mask"}
        want = reference(q, k, v, mask=kwargs.get("attn_mask"), **ref_kwargs)
        err = float(np.abs(out - want).max())
        ok = out.dtype == np.float32 and out.shape == want.shape and err <= atol
        failed += not ok
        print(f"  {name:<14} max |err| {err:.2e} (tol {atol:.0e}) {ms:8.1f} ms  {'ok' if ok else 'FAIL'}")

    # float16 inputs: the output is float16 too, rounded once (half an ulp at |o| ~ 3 is ~1e-3).
    q16, k16, v16 = (x.astype(np.float16) for x in (q, k, v))
    out16 = aule_kp.flash_attention(q16, k16, v16, causal=True, backend=args.backend)
    err16 = float(np.abs(out16.astype(np.float64) - reference(q16, k16, v16, causal=True)).max())
    ok16 = out16.dtype == np.float16 and err16 <= 2.5e-3
    failed += not ok16
    print(f"  {'causal fp16':<14} max |err| {err16:.2e} (tol 2.5e-03)           {'ok' if ok16 else 'FAIL'}")

    print("numpy_batched: OK" if not failed else f"numpy_batched: {failed} case(s) FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
