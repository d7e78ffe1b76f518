"""``precision="int8"`` on a GPU through Vulkan: the int8 variants checked and timed against the fp path.

Run on the lent GPU (scripts/gpu_run.sh with STEPS=cmd GPU_CMD='python3 benchmarks/int8_gpu.py'):

1. what the device reports for int8 (integer dot product, s8 cooperative-matrix shapes);
2. each int8 variant the device can run, on small problems, against the CPU reference of the same
   scheme (max abs difference) and against float64 (SageAttention's cosine / relative L1);
3. GPU time of the dispatches alone (timestamps, data on the device; ``aule_kp.bench.gpu_seconds``)
   of each int8 variant and of the fp16 path's best kernel, in TFLOPS (4·B·Hq·Lq·Lk·D, halved for
   causal), and int8's speed-up over fp16.

Prints markdown tables.
"""

from __future__ import annotations

import math
import time

import numpy as np

import aule_kp
from aule_kp.bench import gpu_seconds
from aule_kp.problem import Problem, band
from aule_kp.vulkan import device as devmod
from aule_kp.vulkan import int8
from aule_kp.vulkan.backend import VulkanBackend


def inputs(rng: np.random.Generator, b: int, hq: int, hkv: int, length: int, d: int, offset: float = 10.0):
    q = rng.standard_normal((b, hq, length, d)).astype(np.float16)
    k = (rng.standard_normal((b, hkv, length, d)) + offset * rng.standard_normal(d)).astype(np.float16)
    v = rng.standard_normal((b, hkv, length, d)).astype(np.float16)
    return q, k, v


def reference(q, k, v, causal):
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    s = q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])
    if causal:
        lq, lk = s.shape[-2:]
        s = np.where(np.arange(lk)[None, :] <= np.arange(lq)[:, None] + lk - lq, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return p @ v / p.sum(-1, keepdims=True)


def problem(b, hq, hkv, length, d, causal, precision):
    diag, left, right = band(length, length, causal=causal, window=None, top_left=False)
    return Problem(b, hq, hkv, length, length, d, d, "float16", 1 / math.sqrt(d), diag, left, right,
                   precision=precision)


def main() -> None:
    dev = devmod.get_device()
    caps = dev.caps
    print(f"{caps.name}, driver {caps.driver_version_text()}, {time.strftime('%Y-%m-%d')}")
    print(f"integer dot product: {int8.integer_dot(caps)}; s8 coopmat shapes: "
          f"{[s for s in caps.coopmat_shapes if s[3] in ('s8', 'u8')]}")
    variants = [name for name in int8.VARIANTS
                if not int8.variant_reasons(name, caps, problem(1, 8, 2, 256, 128, False, "int8"))]
    print(f"int8 variants here: {variants}\n")

    rng = np.random.default_rng(0)
    print("| variant | D | L | causal | max abs vs CPU int8 | cosine vs f64 | rel. L1 vs f64 |")
    print("|---|---|---|---|---|---|---|")
    for name in variants:
        backend = VulkanBackend(variant=name)
        for d in (64, 128):
            for causal in (False, True):
                q, k, v = inputs(rng, 1, 8, 2, 333, d)
                out = backend.forward(problem(1, 8, 2, 333, d, causal, "int8"), q, k, v, None)[0]
                cpu = aule_kp.flash_attention(q, k, v, causal=causal, backend="cpu", precision="int8")
                ref = reference(q, k, v, causal)
                o, r = out.astype(np.float64).ravel(), ref.ravel()
                cos = o @ r / (np.linalg.norm(o) * np.linalg.norm(r))
                l1 = np.abs(o - r).sum() / np.abs(r).sum()
                diff = np.abs(out.astype(np.float32) - cpu.astype(np.float32)).max()
                print(f"| {name} | {d} | 333 | {causal} | {diff:.2e} | {cos:.6f} | {l1:.4f} |", flush=True)

    print("\n| D | L | causal | kernel | ms | TFLOPS | vs fp16 |")
    print("|---|---|---|---|---|---|---|")
    for d in (64, 128):
        for length in (4096, 8192):
            for causal in (False, True):
                q, k, v = inputs(rng, 1, 32, 32, length, d)
                flops = 4 * 32 * length * length * d / (2 if causal else 1)
                fp_backend = VulkanBackend()
                pf = problem(1, 32, 32, length, d, causal, "fp")
                plan = fp_backend.plan(pf)
                plan.run(q, k, v, None)
                t_fp = gpu_seconds(plan, repeat=20)
                print(f"| {d} | {length} | {causal} | fp16 {fp_backend.config(pf).variant} | {t_fp * 1e3:.2f} | "
                      f"{flops / t_fp / 1e12:.1f} | 1.00 |", flush=True)
                for name in variants:
                    backend = VulkanBackend(variant=name)
                    pi = problem(1, 32, 32, length, d, causal, "int8")
                    cfg = backend.config(pi)
                    with dev.lock:
                        plan = int8.int8_plan(dev, pi, cfg)
                        plan.run(q, k, v, None)
                    t = gpu_seconds(plan, repeat=20)
                    print(f"| {d} | {length} | {causal} | int8 {name} | {t * 1e3:.2f} | {flops / t / 1e12:.1f} | "
                          f"{t_fp / t:.2f} |", flush=True)


if __name__ == "__main__":
    main()
