"""Split-KV decode tiles on this device: GPU time of the split-KV dispatch (partials and the merge)
for several tiles and split counts, each checked against the default choice's output (run by
scripts/gpu_run.sh).

    python3 benchmarks/splitkv_sweep_gpu.py [Lk [Hq]]   # B1 Hkv8 Lq1 D128 fp16, default Lk 32768, Hq 32
"""

from __future__ import annotations

import math
import sys
from dataclasses import replace

import numpy as np

from aule_kp.bench import gpu_seconds
from aule_kp.dtypes import from_f32, to_f32
from aule_kp.problem import Problem, band
from aule_kp.vulkan import device as devmod
from aule_kp.vulkan.choice import split_kv_config
from aule_kp.vulkan.configs import SplitKVConfig
from aule_kp.vulkan.plan import Plan


def main(lk: int = 32768, hq: int = 32) -> None:
    dev = devmod.get_device()
    b, hkv, d = 1, 8, 128
    diag, left, right = band(1, lk, causal=False, window=None, top_left=False)
    p = Problem(b, hq, hkv, 1, lk, d, d, "float16", 1 / math.sqrt(d), diag, left, right)
    rng = np.random.default_rng(0)
    q = from_f32(rng.standard_normal((b, hq, 1, d), dtype=np.float32), "float16")
    k, v = (from_f32(rng.standard_normal((b, hkv, lk, d), dtype=np.float32), "float16") for _ in range(2))
    base = split_kv_config(dev.caps, p)
    assert base is not None
    kv_bytes = k.nbytes + v.nbytes
    print(f"{dev.caps.name}: B{b} Hq{hq} Hkv{hkv} Lq1 Lk{lk} D{d} fp16, K/V {kv_bytes >> 20} MiB\n")
    print("| BR/BC/TPR/WG/STAGE | splits x keys | GPU ms | K/V GB/s | max diff vs default |\n|---|---|---|---|---|")
    want = None
    # Rows per workgroup: the default's, twice (up to all of a kv head's: each K/V element read
    # once) or half (fewer registers, more resident workgroups; the row blocks of a split share K/V
    # in L2). STAGE 2 issues each step's loads a step ahead.
    most = 1 << (p.group * p.len_q - 1).bit_length()
    rows = sorted({min(2 * base.kernel.br, most), base.kernel.br, max(1, base.kernel.br // 2)}, reverse=True)
    grid = [(br, bc, wg, stage, n) for br in rows for bc in (2, 4, 8) for wg in (128, 256) for stage in (0, 2)
            for n in (32, 64)]
    for br, bc, wg, stage, n_split in grid:
        kernel = replace(base.kernel, br=br, bc=bc, wg=wg, stage=stage)
        step = wg // kernel.tpr * bc
        split_len = step * math.ceil(lk / (n_split * step))
        cfg = SplitKVConfig(kernel, math.ceil(lk / split_len), split_len)
        if cfg.shared_bytes() > dev.caps.shared_memory:
            continue
        plan = Plan(dev, p, cfg)
        out, _ = plan.run(q, k, v, None)
        out = to_f32(out, "float16")
        if want is None:
            want = Plan(dev, p, base).run(q, k, v, None)[0]
            want = to_f32(want, "float16")
        t = gpu_seconds(plan, 50)
        plan.destroy()
        diff = float(np.abs(out - want).max())
        tag = " (default)" if kernel == base.kernel and cfg.n_split == base.n_split else ""
        print(f"| {kernel.br}/{bc}/{kernel.tpr}/{wg}/{stage}{tag} | {cfg.n_split} x {split_len} | {t * 1e3:.3f} | "
              f"{kv_bytes / t / 1e9:.0f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
