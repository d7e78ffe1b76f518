"""The ``layers`` and ``serving`` presets of ``aule-kp bench`` at full size, printed row group by row
group as each ends and stopped after a time budget, so that a lent GPU's time limit loses only the
rest (the CLI prints its table at the end). Vulkan and Triton rows with the presets' baselines.

    python3 benchmarks/presets_streamed.py layers|serving SECONDS
"""

from __future__ import annotations

import sys
import time


def main(which: str, budget: float) -> None:
    t0 = time.time()

    def out_of_time() -> bool:
        if time.time() - t0 > budget:
            print(f"stopped: {budget:.0f} s used", flush=True)
            return True
        return False

    if which == "layers":
        from aule_kp import bench_layers as bl

        for m in bl.MODELS:
            for layer in bl.LAYERS:
                if out_of_time():
                    return
                rows = bl.run(3, 1.0, ["vulkan", "triton"], layers=[layer], models=[m])
                print("\n".join(bl.format_table(rows).splitlines()[2:]), flush=True)
        return
    from aule_kp import bench_serving as bs

    for case in bs.cases(True):
        for who, timing in bs.plan_rows(case, ["vulkan", "triton"], True, 5, True):
            if out_of_time():
                return
            try:
                row = timing()
            except Exception as exc:  # noqa: BLE001 - one failed row must not lose the rest
                row = bs._row(case, who, None, note=f"failed: {exc}"[:80])
            if row:
                print("\n".join(bs.format_table([row]).splitlines()[2:]), flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("layers", "serving"):
        sys.exit(__doc__)
    main(sys.argv[1], float(sys.argv[2]))
