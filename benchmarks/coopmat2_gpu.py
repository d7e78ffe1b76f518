"""GL_NV_cooperative_matrix2 on this device: the matmul ceiling of workgroup-scope matrices
(glsl/glslang15/bench_gemm_coopmat2.comp, beside the KHR kernel's best and cuBLAS), and the cm2 forward
(glsl/glslang15/fa2_fwd_cm2.comp) against the engine's own choice and torch SDPA's flash backend.

Needs a device with VK_NV_cooperative_matrix2, kp patch 4 (its features enabled) and the two kernels'
SPIR-V in the SPIR-V folder (compiled by glslang >= 15.2). Correctness first: the forward over odd
shapes, a float mask, GQA, a window, against float64; then GPU-timestamp medians of alternating rounds
(benchmarks/ab_gpu.py's ``alternate``) on the bars' shapes. Prints markdown tables.

    python3 benchmarks/coopmat2_gpu.py [gemm] [check] [time] [TILES...]   # TILES: BRxBCxWG, e.g. 64x64x128
"""

from __future__ import annotations

import math
import statistics
import sys
from typing import List, Optional, Tuple

import numpy as np

from aule_kp.problem import Problem, band
from aule_kp.vulkan import device as devmod
from aule_kp.vulkan.backend import VulkanBackend
from aule_kp.vulkan.configs import KernelConfig
from aule_kp.vulkan.plan import Plan

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from ab_gpu import alternate  # noqa: E402
from coopmat_gemm_gpu import Gemm, torch_matmul  # noqa: E402

GEMM_TILES = [(128, 128, 32, 256), (128, 128, 64, 256), (128, 256, 32, 256), (256, 128, 32, 256),
              (128, 128, 32, 128), (64, 128, 64, 128), (128, 64, 64, 128)]
FWD_TILES = [(64, 32, 128), (64, 64, 128), (128, 64, 256), (128, 32, 256), (64, 16, 128)]
PROBLEMS = [(32, 8192, 128, False), (32, 8192, 128, True), (32, 2048, 64, False), (32, 8192, 64, False),
            (32, 16384, 64, True)]


def cm2(p: Problem, br: int, bc: int, wg: int) -> KernelConfig:
    """The cm2 forward with these tiles."""
    return KernelConfig("coopmat2", "fa2_fwd_cm2", p.dim_k, p.dim_v, br, bc, 1, 1, wg, 1)


def tile_label(t: Tuple[int, ...]) -> str:
    return "x".join(map(str, t))


def gemm(sizes: List[int]) -> None:
    dev = devmod.get_device()
    print("| cm2 GEMM tile (BMxBNxBK, invocations) | " + " | ".join(f"{s}^3 TFLOPS" for s in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    gemms = {s: Gemm(dev, s, s, s) for s in sizes}
    check = Gemm(dev, 512, 512, 512, seed=1)
    want = check.a.astype(np.float64) @ check.b.astype(np.float64)
    for bt in (0, 1):
        for bm, bn, bk, wg in GEMM_TILES:
            label = f"{bm}x{bn}x{bk} wg {wg}{' B^T' if bt else ''}"
            spec = np.array([bm, bn, bk, 0, 0, wg, bt], np.uint32)

            def algo(g: Gemm, spec: np.ndarray = spec, bt: int = bt, bm: int = bm, bn: int = bn):
                push = np.array([g.m, g.n, g.k], np.uint32)
                return dev.manager.algorithm([g.ta, g.tbt if bt else g.tb, g.tc], dev.spirv("bench_gemm_coopmat2"),
                                             (g.n // bn, g.m // bm, 1), spec, push)
            try:
                a = algo(check)
                err = float(np.max(np.abs(check.result(a) - want)) / np.max(np.abs(want)))
                a.destroy()
                if err > 1e-3:
                    print(f"| {label} | wrong: max error {err:.1e} |")
                    continue
                cells = []
                for s, g in gemms.items():
                    a = algo(g)
                    sec = g.time(a, reps=max(2, int(2e12 / (2 * s ** 3))))
                    a.destroy()
                    cells.append(f"{2 * s ** 3 / sec / 1e12:.1f}")
                print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
            except Exception as exc:  # a tile the driver refuses: say so, go on
                print(f"| {label} | failed: {str(exc).splitlines()[0][:100]} |")
    anchors = {s: torch_matmul(s) for s in sizes}
    print("| torch.matmul fp16 (cuBLAS), same run | " + " | ".join(
        f"{2 * s ** 3 / anchors[s] / 1e12:.1f}" if anchors[s] else "—" for s in sizes) + " |\n")


def reference(p: Problem, q, k, v, mask) -> np.ndarray:
    qf, kf, vf = (x.astype(np.float64) for x in (q, k, v))
    kf = np.repeat(kf, p.group, axis=1)
    vf = np.repeat(vf, p.group, axis=1)
    s = qf @ kf.transpose(0, 1, 3, 2) * p.scale
    i, j = np.arange(p.len_q)[:, None], np.arange(p.len_k)[None, :]
    s = np.where(p.visible(np.arange(p.len_q), np.arange(p.len_k)), s, -np.inf)
    del i, j
    if mask is not None:
        s = s + mask
    m = s.max(-1, keepdims=True)
    w = np.exp(s - np.where(np.isfinite(m), m, 0))
    tot = w.sum(-1, keepdims=True)
    return np.where(tot > 0, (w / np.where(tot > 0, tot, 1)) @ vf, 0.0)


def check(tiles: List[Tuple[int, ...]]) -> None:
    """The cm2 forward against float64 over shapes that exercise every edge (partial tiles, GQA, a
    window, a float mask); the error bound is the fp16 model: inputs and P rounded to fp16, O to fp16."""
    dev = devmod.get_device()
    rng = np.random.default_rng(0)
    cases = [  # (B, Hq, Hkv, Lq, Lk, D, causal, window, mask)
        (1, 4, 4, 200, 333, 128, False, None, False), (2, 8, 2, 129, 129, 64, True, None, False),
        (1, 4, 1, 77, 300, 64, True, (32, 0), False), (1, 2, 2, 100, 150, 128, False, None, True),
        (1, 2, 2, 1, 500, 128, False, None, False), (1, 4, 2, 300, 100, 64, True, None, False)]
    print("| cm2 tile | case | max abs error | bound | ok |\n|---|---|---|---|---|")
    for tile in tiles:
        for b, hq, hkv, lq, lk, d, causal, window, with_mask in cases:
            diag, left, right = band(lq, lk, causal=causal, window=window, top_left=False)
            mshape = (b, 1, lq, lk) if with_mask else None
            p = Problem(b, hq, hkv, lq, lk, d, d, "float16", 1 / math.sqrt(d), diag, left, right, mshape)
            q = rng.standard_normal((b, hq, lq, d)).astype(np.float16)
            k = rng.standard_normal((b, hkv, lk, d)).astype(np.float16)
            v = rng.standard_normal((b, hkv, lk, d)).astype(np.float16)
            mask = rng.standard_normal(mshape).astype(np.float32) if with_mask else None
            label = f"B{b} H{hq}/{hkv} Lq{lq} Lk{lk} D{d}{' causal' if causal else ''}" \
                    f"{f' window {window}' if window else ''}{' mask' if with_mask else ''}"
            try:
                plan = Plan(dev, p, cm2(p, *tile))
                out, _ = plan.run(q, k, v, mask)
                plan.destroy()
            except Exception as exc:
                print(f"| {tile_label(tile)} | {label} | failed: {str(exc).splitlines()[0][:100]} | | no |")
                continue
            want = reference(p, q, k, v, mask)
            err = float(np.max(np.abs(out.astype(np.float64) - want)))
            bound = 4 * 2.0 ** -11 * (1 + math.sqrt(lk) * 2.0 ** -11) * max(1.0, float(np.abs(want).max()))
            print(f"| {tile_label(tile)} | {label} | {err:.2e} | {bound:.1e} | {'yes' if err <= bound else 'NO'} |",
                  flush=True)


def torch_flash_ms(h: int, s: int, d: int, causal: bool) -> Optional[float]:
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return None
    q, k, v = (torch.randn(1, h, s, d, device="cuda", dtype=torch.float16) for _ in range(3))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        f = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
        for _ in range(5):
            f()
        torch.cuda.synchronize()
        times = []
        for _ in range(7):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                f()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 10)
    return statistics.median(times)


def timing(tiles: List[Tuple[int, ...]]) -> None:
    dev = devmod.get_device()
    print("\n| problem | engine's choice | ms | "
          + " | ".join(f"cm2 {tile_label(t)} ms (max diff)" for t in tiles)
          + " | torch flash ms | best cm2 / flash |")
    print("|---|---|---|" + "---|" * len(tiles) + "---|---|")
    for h, s, d, causal in PROBLEMS:
        diag, left, right = band(s, s, causal=causal, window=None, top_left=False)
        p = Problem(1, h, h, s, s, d, d, "float16", 1 / math.sqrt(d), diag, left, right)
        base = VulkanBackend().config(p)
        configs = [base] + [cm2(p, *t) for t in tiles]
        try:
            medians, diffs = alternate(dev, p, configs)
        except Exception as exc:
            print(f"| H{h} S{s} D{d}{' causal' if causal else ''} | failed: {str(exc).splitlines()[0][:120]} |")
            continue
        flash = torch_flash_ms(h, s, d, causal)
        best = min(medians[1:]) * 1e3
        print(f"| H{h} S{s} D{d}{' causal' if causal else ''} | {base.kernel} {base.br}x{base.bc}x{base.wg} | "
              f"{medians[0] * 1e3:.3f} | " + " | ".join(f"{m * 1e3:.3f} ({df:.0e})" for m, df in
                                                      zip(medians[1:], diffs[1:]))
              + f" | {flash:.3f} | {flash / best:.2f}x speed |" if flash else " | — | — |", flush=True)


def main(argv: List[str]) -> None:
    steps = [a for a in argv if a in ("gemm", "check", "time")] or ["gemm", "check", "time"]
    tiles = [tuple(int(x) for x in a.split("x")) for a in argv if "x" in a] or FWD_TILES
    dev = devmod.get_device()
    print(f"{dev.caps.name}, {dev.caps.driver_info}; coopmat2 {dev.caps.coopmat2}, kp patch {dev.kp_patch}\n")
    if "gemm" in steps:
        gemm([4096, 8192])
    if "check" in steps:
        check(tiles)
    if "time" in steps:
        timing(tiles)


if __name__ == "__main__":
    main(sys.argv[1:])
