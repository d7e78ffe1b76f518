"""The zero-copy API: upload K/V once to a Vulkan device, then run many attention calls on it.

A ``Context`` owns one Vulkan device; ``GpuTensor`` keeps data in device memory between calls, so a
decode-style loop only uploads the new query each step. Run: ``python examples/context_zero_copy.py``.
Prints the device, per-step timings and ``context_zero_copy: OK`` when the results match NumPy.
"""

from __future__ import annotations

import sys
import time

import numpy as np

import aule_kp


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Float64 attention with GQA, not causal."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = q @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def main() -> int:
    try:
        ctx = aule_kp.Context()
    except aule_kp.BackendUnavailable as exc:  # no Vulkan loader or device: nothing to show
        print(f"context_zero_copy: skipped, no Vulkan device ({exc})")
        return 0
    rng = np.random.default_rng(0)
    b, hq, hkv, lk, d, steps = 1, 8, 2, 256, 64, 4
    with ctx:  # frees every GpuTensor of the context on exit
        caps = getattr(ctx.device, "caps", None)
        print(f"device: {getattr(caps, 'name', 'Vulkan device')}")
        k = rng.standard_normal((b, hkv, lk, d)).astype(np.float16)
        v = rng.standard_normal((b, hkv, lk, d)).astype(np.float16)
        k_gpu = ctx.tensor(k.shape, np.float16).upload(k)  # uploaded once, read by every step
        v_gpu = ctx.tensor(v.shape, np.float16).upload(v)
        q_gpu = ctx.tensor((b, hq, 1, d), np.float16)
        out_gpu = ctx.tensor((b, hq, 1, d), np.float16)  # reused: the recorded plan is reused too
        print(f"K/V cache on device: {k_gpu!r}, {v_gpu!r}")
        worst = 0.0
        for step in range(steps):
            q = rng.standard_normal((b, hq, 1, d)).astype(np.float16)
            t0 = time.perf_counter()
            q_gpu.upload(q)
            ctx.attention(q_gpu, k_gpu, v_gpu, out=out_gpu)
            out = out_gpu.download()
            ms = (time.perf_counter() - t0) * 1e3
            err = float(np.abs(out.astype(np.float64) - reference(q, k, v)).max())
            worst = max(worst, err)
            print(f"  step {step}: decode attention {out.shape} {out.dtype}, {ms:7.2f} ms, max |err| {err:.1e}"
                  + ("  (first call records the plan)" if step == 0 else ""))
    ok = worst <= 2.5e-3  # fp16 output, rounded once
    print("context_zero_copy: OK" if ok else f"context_zero_copy: FAILED (max |err| {worst:.2e})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
