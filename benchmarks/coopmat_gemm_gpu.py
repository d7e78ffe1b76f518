"""The matmul ceiling through Vulkan on this device: glsl/bench_gemm_coopmat.comp over several tilings
beside torch.matmul (cuBLAS) in the same run (run by scripts/gpu_run.sh; needs a coopmat device).

fp16 A, B; fp32 accumulate and C. Each tiling is first checked against NumPy at 512^3, then timed
as the median over a few evaluations of one sequence holding ``reps`` dispatches (submit and fence
amortised). TFLOPS = 2 M N K / time. Prints a markdown table.

    python3 benchmarks/coopmat_gemm_gpu.py [sizes...]     # default 4096 8192
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any, List, NamedTuple, Optional

import numpy as np

from aule_kp.vulkan import device as devmod


class Tiling(NamedTuple):
    bm: int
    bn: int
    bk: int
    wm: int
    wn: int
    wg: int
    bt: int  # 1: B given transposed ([N, K], as K in Q K^T)
    cn: int = 16  # coopmat shape 16 x cn x 16

    def shared_bytes(self) -> int:
        brows, bcols = (self.bn, self.bk) if self.bt else (self.bk, self.bn)
        return 2 * 2 * (self.bm * (self.bk + 8) + brows * (bcols + 8))

    def label(self) -> str:
        return (f"{self.bm}x{self.bn}x{self.bk} sg {self.wm}x{self.wn} wg {self.wg} 16x{self.cn}x16"
                f"{' B^T' if self.bt else ''}")


TILINGS = [
    Tiling(128, 128, 32, 64, 64, 128, 0),
    Tiling(128, 128, 32, 64, 32, 256, 0),
    Tiling(128, 128, 32, 32, 64, 256, 0),
    Tiling(128, 128, 16, 64, 64, 128, 0),
    Tiling(256, 128, 16, 64, 64, 256, 0),
    Tiling(128, 256, 16, 64, 64, 256, 0),
    Tiling(64, 128, 32, 32, 64, 128, 0),
    Tiling(128, 64, 32, 64, 32, 128, 0),
    Tiling(64, 64, 32, 32, 32, 128, 0),
    Tiling(128, 128, 32, 64, 64, 128, 1),
    Tiling(128, 128, 32, 64, 32, 256, 1),
    Tiling(64, 128, 32, 16, 128, 128, 1),
    Tiling(128, 128, 16, 64, 64, 128, 0, 8),
    Tiling(128, 256, 16, 64, 64, 256, 0, 8),
    Tiling(128, 128, 32, 32, 64, 256, 0, 8),
    Tiling(128, 128, 32, 64, 32, 256, 1, 8),
]


class Gemm:
    """Persistent tensors for one size; ``algorithm`` per tiling; ``time`` of one dispatch."""

    def __init__(self, dev: Any, m: int, n: int, k: int, seed: int = 0):
        kp = dev.kp
        self.dev, self.m, self.n, self.k = dev, m, n, k
        rng = np.random.default_rng(seed)
        self.a = rng.standard_normal((m, k), dtype=np.float32).astype(np.float16)
        self.b = rng.standard_normal((k, n), dtype=np.float32).astype(np.float16)
        mgr = dev.manager
        self.ta = mgr.tensor_t(self.a.reshape(-1).view(np.uint32), kp.TensorTypes.device)
        self.tb = mgr.tensor_t(np.ascontiguousarray(self.b).reshape(-1).view(np.uint32), kp.TensorTypes.device)
        self.tbt = mgr.tensor_t(np.ascontiguousarray(self.b.T).reshape(-1).view(np.uint32), kp.TensorTypes.device)
        self.tc = mgr.tensor_t(np.zeros(m * n, np.float32), kp.TensorTypes.device)
        mgr.sequence().eval(kp.OpTensorSyncDevice([self.ta, self.tb, self.tbt]))

    def algorithm(self, t: Tiling) -> Any:
        spec = np.array([t.bm, t.bn, t.bk, t.wm, t.wn, t.wg, t.bt, t.cn], np.uint32)
        push = np.array([self.m, self.n, self.k], np.uint32)
        grid = (self.n // t.bn, self.m // t.bm, 1)
        b = self.tbt if t.bt else self.tb
        return self.dev.manager.algorithm([self.ta, b, self.tc], self.dev.spirv("bench_gemm_coopmat"), grid, spec, push)

    def result(self, algo: Any) -> np.ndarray:
        kp = self.dev.kp
        self.dev.manager.sequence().record(kp.OpAlgoDispatch(algo)).record(kp.OpTensorSyncLocal([self.tc])).eval()
        return self.tc.data().reshape(self.m, self.n).copy()

    def time(self, algo: Any, reps: int, evals: int = 5) -> float:
        kp = self.dev.kp
        seq = self.dev.manager.sequence()
        for _ in range(reps):
            seq.record(kp.OpAlgoDispatch(algo))
        seq.eval()
        times = []
        for _ in range(evals):
            t0 = time.perf_counter()
            seq.eval()
            times.append((time.perf_counter() - t0) / reps)
        seq.destroy()
        return statistics.median(times)


def check(dev: Any, t: Tiling) -> Optional[str]:
    """None when the tiling computes A B at 512^3 within fp16-input / fp32-accumulate error."""
    g = Gemm(dev, 512, 512, 512, seed=1)
    algo = g.algorithm(t)
    got = g.result(algo)
    algo.destroy()
    want = g.a.astype(np.float64) @ g.b.astype(np.float64)
    err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    return None if err < 1e-3 else f"max error {err:.2e}"


def torch_matmul(size: int) -> Optional[float]:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    a = torch.randn(size, size, device="cuda", dtype=torch.float16)
    b = torch.randn(size, size, device="cuda", dtype=torch.float16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / 10)
    return statistics.median(times)


def main(sizes: List[int]) -> None:
    dev = devmod.get_device()
    caps = dev.caps
    print(f"{caps.name}, {caps.driver_name} {caps.driver_info}; coopmat shapes: {caps.coopmat_shapes}\n")
    print("| tiling (BMxBNxBK, subgroup tile, invocations) | " + " | ".join(f"{s}^3 TFLOPS" for s in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    shapes = {(m, n, k) for m, n, k, a, b, c, r, _ in caps.coopmat_shapes if (a, b, c) == ("f16", "f16", "f32")}
    tilings = [t for t in TILINGS if t.shared_bytes() <= caps.shared_memory and t.wg <= caps.max_workgroup_invocations
               and (16, t.cn, 16) in shapes]
    gemms = {s: Gemm(dev, s, s, s) for s in sizes}
    best = {s: 0.0 for s in sizes}
    for t in tilings:
        why = check(dev, t)
        if why:
            print(f"| {t.label()} | wrong: {why} |")
            continue
        cells = []
        for s, g in gemms.items():
            algo = g.algorithm(t)
            sec = g.time(algo, reps=max(2, int(2e12 / (2 * s ** 3))))
            algo.destroy()
            tf = 2 * s ** 3 / sec / 1e12
            best[s] = max(best[s], tf)
            cells.append(f"{tf:.1f}")
        print(f"| {t.label()} | " + " | ".join(cells) + " |", flush=True)
    anchors = {s: torch_matmul(s) for s in sizes}
    if any(anchors.values()):
        print("| torch.matmul fp16 (cuBLAS), same run | " + " | ".join(
            f"{2 * s ** 3 / anchors[s] / 1e12:.1f}" if anchors[s] else "—" for s in sizes) + " |")
    print("\nbest Vulkan coopmat: " + ", ".join(f"{s}^3 {best[s]:.1f} TFLOPS" for s in sizes))


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [4096, 8192])
