"""The forward bars' ratios, robust to the GPU's drift: aule-kp's GpuTensor call and torch SDPA's
flash backend timed in alternating rounds on the same inputs (each round: the bench's own row
functions, a 0.2 s warm-up and the median of ``repeat`` synchronised calls), so that clock, power
and thermal changes during the run hit both sides alike. Prints a markdown table: medians over the
rounds and the per-round ratio's median and range; the SM clock and power before and after.

    python3 benchmarks/vs_flash_gpu.py [rounds [repeat]]      # default 5 rounds of 10 calls
"""

from __future__ import annotations

import statistics
import subprocess
import sys

from aule_kp.bench import PRESETS, bench_gpu_tensor, bench_torch

CASES = [c for c in PRESETS["gpu"] if c.dtype == "float16" and c.lq > 1]


def gpu_state() -> str:
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"nvidia-smi: {exc}"


def main(rounds: int = 5, repeat: int = 10) -> None:
    print(f"GPU state before (SM clock, max SM clock, memory clock, power, limit, temperature): {gpu_state()}\n")
    print(f"{rounds} alternating rounds of {repeat} calls each, medians over the rounds\n")
    print("| case | aule-kp GpuTensor ms | torch flash ms | ratio (flash / ours), median | range over rounds |")
    print("|---|---|---|---|---|")
    for case in CASES:
        ours, flash = [], []
        for _ in range(rounds):
            rows = bench_gpu_tensor(case, repeat), bench_torch(case, repeat, "cuda", "FLASH_ATTENTION")
            if any(row["ms"] is None for row in rows):
                print(f"| {case.label()} | not timed: {'; '.join(r['note'] for r in rows if r['ms'] is None)} |")
                break
            ours.append(rows[0]["ms"])
            flash.append(rows[1]["ms"])
        if len(ours) < rounds:
            continue
        ratios = [f / o for o, f in zip(ours, flash)]
        print(f"| {case.label()} | {statistics.median(ours):.3f} | {statistics.median(flash):.3f} | "
              f"{statistics.median(ratios):.3f} | {min(ratios):.3f}-{max(ratios):.3f} |", flush=True)
    print(f"\nGPU state after: {gpu_state()}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
