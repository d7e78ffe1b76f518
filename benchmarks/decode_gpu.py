"""Decoding (Lq = 1) against the GPU's memory bandwidth (run by scripts/gpu_run.sh; issue 6's split-KV bar).

Yardstick, same run: a device-to-device copy of 1 GiB (kp's OpTensorCopy between device buffers, GPU
timestamps; and torch's ``copy_`` on CUDA where it is there), counted as bytes read + bytes written.
Then B1 Hq32 Hkv8 Lq1 D128 fp16 at several key lengths: the split-KV kernel's GPU time (timestamps
around its dispatch, data on the device), the K/V bytes it must read / that time, and the
whole GpuTensor call; torch SDPA flash on CUDA beside it. Prints a markdown table.
"""

from __future__ import annotations

import math
import statistics
import time

import numpy as np

from aule_kp.bench import gpu_seconds
from aule_kp.dtypes import from_f32
from aule_kp.problem import Problem, band
from aule_kp.vulkan import device as devmod
from aule_kp.vulkan.backend import VulkanBackend
from aule_kp.vulkan.tensor import Context

GIB = 1 << 30


def copy_bandwidth(dev) -> float:
    """Read + write bytes per second of a device-to-device copy of 1 GiB (GPU timestamps)."""
    kp, mgr = dev.kp, dev.manager
    a, b = (mgr.tensor_t(np.zeros(GIB // 4, np.uint32), kp.TensorTypes.storage) for _ in range(2))
    seq = mgr.sequence(0, 4).record(kp.OpTensorCopy([a, b]))
    ticks = []
    for _ in range(10):
        seq.eval()
        stamps = seq.get_timestamps()
        ticks.append(stamps[-1] - stamps[0])
    seq.destroy()
    a.destroy()
    b.destroy()
    return 2 * GIB / (statistics.median(ticks) * 1e-9)


def torch_copy_bandwidth() -> float:
    import torch

    a = torch.empty(GIB, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * GIB / statistics.median(times)


def main(lengths=(8192, 32768, 131072)) -> None:
    dev = devmod.get_device()
    print(f"{dev.caps.name}, {dev.caps.driver_name} {dev.caps.driver_info}\n")
    yard = copy_bandwidth(dev)
    print("| what | ms | GB/s | fraction of the copy yardstick | note |\n|---|---|---|---|---|")
    print(f"| Vulkan device-to-device copy, 1 GiB | — | {yard / 1e9:.0f} | 1.00 | read + write, GPU timestamps |")
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if cuda:
        print(f"| torch CUDA copy_, 1 GiB | — | {torch_copy_bandwidth() / 1e9:.0f} | | read + write |")
    b, hq, hkv, d = 1, 32, 8, 128
    for lk in lengths:
        diag, left, right = band(1, lk, causal=False, window=None, top_left=False)
        p = Problem(b, hq, hkv, 1, lk, d, d, "float16", 1 / math.sqrt(d), diag, left, right)
        rng = np.random.default_rng(0)
        q = from_f32(rng.standard_normal((b, hq, 1, d), dtype=np.float32), "float16")
        k, v = (from_f32(rng.standard_normal((b, hkv, lk, d), dtype=np.float32), "float16") for _ in range(2))
        be = VulkanBackend()
        cfg = be.config(p)
        plan = be.plan(p)
        plan.run(q, k, v, None)
        kernel = gpu_seconds(plan, 100)
        kv_bytes = k.nbytes + v.nbytes
        bw = kv_bytes / kernel
        ctx = Context()
        tq, tk, tv = (ctx.tensor(x.shape, np.float16).upload(x) for x in (q, k, v))
        out = ctx.tensor(tq.shape, np.float16)
        ctx.attention(tq, tk, tv, out=out)
        times = []
        for _ in range(200):
            t0 = time.perf_counter()
            ctx.attention(tq, tk, tv, out=out)
            times.append(time.perf_counter() - t0)
        whole = statistics.median(times)
        ctx.close()
        label = f"B{b} Hq{hq} Hkv{hkv} Lq1 Lk{lk} D{d} fp16"
        print(f"| {label}, Vulkan kernels ({type(cfg).__name__}) | {kernel * 1e3:.3f} | {bw / 1e9:.0f} | "
              f"{bw / yard:.2f} | K/V {kv_bytes / 2**20:.0f} MiB / GPU time |")
        print(f"| {label}, GpuTensor call end to end | {whole * 1e3:.3f} | {kv_bytes / whole / 1e9:.0f} | "
              f"{kv_bytes / whole / yard:.2f} | submit + kernels + fence |")
        if cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            tq_, tk_, tv_ = (torch.from_numpy(x.view(np.float16)).cuda() for x in (q, k, v))
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                def f(tq_=tq_, tk_=tk_, tv_=tv_):
                    return torch.nn.functional.scaled_dot_product_attention(tq_, tk_, tv_, enable_gqa=True)
                f()
                torch.cuda.synchronize()
                times = []
                for _ in range(50):
                    t0 = time.perf_counter()
                    f()
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
            t = statistics.median(times)
            print(f"| {label}, torch SDPA flash | {t * 1e3:.3f} | {kv_bytes / t / 1e9:.0f} | "
                  f"{kv_bytes / t / yard:.2f} | launch + kernel + sync |")
        dev.plans.clear()


if __name__ == "__main__":
    main()
