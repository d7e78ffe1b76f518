"""aule-kp's Triton backend beside aule-attention 0.5.0's Triton kernel and torch SDPA (flash), in one
run on a CUDA GPU: B1 H32 S8192 D128 fp16, forward, causal and not (the issue's 3x bar).

aule-attention's kernel module is loaded from its file so that its package ``__init__`` (which
loads its Vulkan library) stays out of the measurement.
"""

from __future__ import annotations

import importlib.util
import math
import sys

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from aule_kp.problem import Problem, band
from aule_kp.triton.backend import TritonBackend


def _aule_triton():
    spec = importlib.util.find_spec("aule")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = f"{list(spec.submodule_search_locations)[0]}/triton_flash.py"
    mod_spec = importlib.util.spec_from_file_location("aule_triton_flash", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.flash_attention_triton


def main(b: int = 1, h: int = 32, s: int = 8192, d: int = 128) -> None:
    aule = _aule_triton()
    ours = TritonBackend()
    bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")  # noqa: E731
    print(f"| {torch.cuda.get_device_name()} B{b} H{h} S{s} D{d} fp16 forward | ms | TFLOPS | max err vs flash |")
    print("|---|---|---|---|")
    for causal in (False, True):
        diag, left, right = band(s, s, causal=causal, window=None, top_left=False)
        p = Problem(b, h, h, s, s, d, d, "float16", 1 / math.sqrt(d), diag, left, right, device="cuda")
        q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.float16) for _ in range(3))
        flops = p.flops()
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            runs = {"torch SDPA flash": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)}  # noqa: B023
            runs["aule-kp triton"] = lambda: ours.forward(p, q, k, v, None)  # noqa: B023
            if aule is not None:
                runs["aule-attention 0.5.0 triton"] = lambda: aule(q, k, v, causal=causal)  # noqa: B023
            for name, fn in runs.items():
                out = fn()
                out = out[0] if isinstance(out, tuple) else out
                err = (out.float() - ref.float()).abs().max().item()
                ms = bench(fn)
                print(f"| {name}{' causal' if causal else ''} | {ms:.3f} | {flops / ms / 1e9:.1f} | {err:.1e} |")
            sys.stdout.flush()


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
