"""Vulkan FA2 backward on a GPU beside torch's flash backward (run by scripts/gpu_run.sh).

B1 H32 S8192 D128 fp16, causal and not. Two Vulkan figures: the plan's whole recorded pass with its
inputs and outputs where a host-memory call keeps them (Device.io_tensor: on a discrete GPU inputs
in device-local host-visible memory, gradients written to host memory across the bus), and the
same dispatches on device-local tensors with the data already there (comparable with torch's CUDA
backward, and with the forward's GpuTensor rows); then each kernel alone. TFLOPS count the
backward as 2.5x the forward's multiply-adds.
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np

from aule_kp.bench import median_time
from aule_kp.dtypes import from_f32
from aule_kp.problem import Problem, band
from aule_kp.vulkan import device as devmod
from aule_kp.vulkan.backend import VulkanBackend
from aule_kp.vulkan.choice import backward_config


def main(b: int = 1, h: int = 32, s: int = 8192, d: int = 128, repeat: int = 5) -> None:
    dev = devmod.get_device()
    be = VulkanBackend()
    print(f"| {dev.caps.name} B{b} H{h} S{s} D{d} fp16 | ms | TFLOPS |\n|---|---|---|")
    for causal in (False, True):
        diag, left, right = band(s, s, causal=causal, window=None, top_left=False)
        p = Problem(b, h, h, s, s, d, d, "float16", 1 / math.sqrt(d), diag, left, right)
        rng = np.random.default_rng(0)
        q, k, v, do = (from_f32(rng.standard_normal((b, h, s, d), dtype=np.float32), "float16") for _ in range(4))
        out, lse = be.forward(p, q, k, v, None)
        cfg = backward_config(dev.caps, p)
        flops = 2.5 * p.flops()
        tag = " causal" if causal else ""
        # Host-memory call as users make it (inputs/outputs where Device.io_tensor puts them), then
        # the same pass on device-local tensors (staging buffers) timed without its transfers.
        for direct in ("1", "0"):
            os.environ["AULE_KP_DIRECT_IO"] = direct
            dev.plans.clear()
            grads = be.backward(p, q, k, v, out, do, lse, None, config=cfg)
            assert all(np.isfinite(g.astype(np.float32)).all() for g in grads[:3])
            plan = be.backward_plan(p, cfg)
            if direct == "1":
                t = median_time(plan.eval, repeat)
                print(f"| aule-kp vulkan {cfg.variant} backward{tag}, host memory in and out (whole pass) | "
                      f"{t * 1e3:.2f} | {flops / t / 1e12:.1f} |")
                continue
            resident = plan.record(dev.manager.sequence(), transfers=False)
            t = median_time(resident.eval, repeat)
            resident.destroy()
            print(f"| aule-kp vulkan {cfg.variant} backward{tag}, data on the device | {t * 1e3:.2f} | "
                  f"{flops / t / 1e12:.1f} |")
            for kcfg, algo in zip(cfg.kernels(), plan.chunks[0].algorithms):
                alone = dev.manager.sequence().record(dev.kp.OpAlgoDispatch(algo))
                ta = median_time(alone.eval, repeat)
                print(f"| &nbsp; {kcfg.kernel} alone (BR {kcfg.br}, BC {kcfg.bc}, WG {kcfg.wg}) | {ta * 1e3:.2f} | |")
                alone.destroy()
        os.environ.pop("AULE_KP_DIRECT_IO")
        try:
            import torch
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except ImportError:
            continue
        if not torch.cuda.is_available():
            continue
        tq, tk, tv = (torch.from_numpy(x.view(np.float16)).cuda().requires_grad_() for x in (q, k, v))
        tdo = torch.from_numpy(do.view(np.float16)).cuda()
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
            t = median_time(lambda: torch.autograd.grad(o, (tq, tk, tv), tdo, retain_graph=True),  # noqa: B023
                            repeat, sync=torch.cuda.synchronize)
        print(f"| torch SDPA flash backward{' causal' if causal else ''} | {t * 1e3:.2f} | {flops / t / 1e12:.1f} |")
        dev.plans.clear()


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
