"""Results folder of ``aule-kp bench --plots DIR``: the table as markdown and JSON, and PNG plots.

Files written into DIR:

- ``bench.md``: machine, driver, date, command, the table and the speedups.
- ``bench.json``: ``{"meta": {...}, "rows": [...], "speedups": [...]}``; a row has ``case``, ``backend``,
  ``ms``, ``tflops``, ``max_err``, ``peak_mb`` and ``note`` (``null`` where not measured).
- ``latency_ms.png``, ``tflops.png``, ``peak_host_mb.png``, ``speedup.png``: one group of bars per case,
  one bar per backend (aule-kp vulkan, vulkan GpuTensor, triton, cpu, torch SDPA, aule-attention: the
  rows that ran). The speedup is a baseline's time over each aule-kp row's time on the same case (above 1:
  aule-kp is faster), one bar per (aule-kp row, baseline) pair, for torch SDPA and aule-attention 0.5.0
  where those rows exist; ``bench.md`` and ``bench.json`` list the same speedups.

The PNGs need matplotlib (drawn with the Agg backend, no display); without it only the markdown and
JSON are written and a warning says so.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

log = logging.getLogger("aule_kp")

PNG_FILES = ("latency_ms.png", "tflops.png", "peak_host_mb.png", "speedup.png")
BASELINES = ("torch SDPA", "aule-attention")


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported (the PNG plots need it)."""
    return importlib.util.find_spec("matplotlib") is not None


def _finite(x: Any) -> Any:
    """``x`` with non-finite floats as None (JSON has no NaN)."""
    return None if isinstance(x, float) and not math.isfinite(x) else x


def speedups(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per case, every timed aule-kp row against every timed baseline row (torch SDPA, aule-attention):
    ``{"case", "ours", "baseline", "speedup"}`` with speedup = baseline ms / aule-kp ms (above 1: aule-kp
    is faster). Rows without a time (skipped, failed) are left out."""
    out: List[Dict[str, Any]] = []
    for case in dict.fromkeys(r["case"] for r in rows):
        timed = [r for r in rows if r["case"] == case and r["ms"]]
        ours = [r for r in timed if r["backend"].startswith("aule-kp")]
        for base in (r for r in timed if r["backend"].startswith(BASELINES)):
            out += [{"case": case, "ours": r["backend"], "baseline": base["backend"], "speedup": base["ms"] / r["ms"]}
                    for r in ours]
    return out


def format_speedups(rows: Sequence[Dict[str, Any]]) -> str:
    """The speedups of ``rows`` as a markdown table (with a blank line before it), or "" when there are none."""
    sp = speedups(rows)
    if not sp:
        return ""
    lines = ["", "Speedup = baseline ms / aule-kp ms (above 1: aule-kp faster):", "",
             "| case | aule-kp | baseline | speedup |", "|---" * 4 + "|"]
    lines += [f"| {x['case']} | {x['ours']} | {x['baseline']} | {x['speedup']:.3g} |" for x in sp]
    return "\n".join(lines) + "\n"


def _grouped_barh(path: str, cases: List[str], series: Dict[str, Dict[str, float]], xlabel: str,
                  title: str, logx: bool = False, ref: Optional[float] = None) -> None:
    """Horizontal grouped bars: one group per case (top to bottom), one bar per series, values written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(series)
    height = max(3.0, 0.3 * len(cases) * max(1, len(names)) + 1.5)
    fig, ax = plt.subplots(figsize=(11, height))
    if not names or not cases:
        ax.text(0.5, 0.5, "no rows to plot in this run", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        bar = 0.8 / len(names)
        for j, name in enumerate(names):
            ys: List[float] = []
            xs: List[float] = []
            for i, case in enumerate(cases):
                if case in series[name]:
                    ys.append(len(cases) - 1 - i + (len(names) / 2 - j - 0.5) * bar)
                    xs.append(series[name][case])
            bars = ax.barh(ys, xs, height=bar, label=name)
            ax.bar_label(bars, labels=[f"{x:.3g}" for x in xs], padding=2, fontsize=7)
        ax.set_yticks(range(len(cases)), list(reversed(cases)), fontsize=8)
        if logx:
            from matplotlib.ticker import FuncFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:g}"))
            # Minor ticks: label 2x and 5x of each decade only, so that labels never overlap.
            ax.xaxis.set_minor_formatter(FuncFormatter(
                lambda x, _pos: f"{x:g}" if x > 0 and round(x / 10 ** math.floor(math.log10(x))) in (2, 5) else ""))
            ax.tick_params(axis="x", which="minor", labelsize=7)
        if ref is not None:
            ax.axvline(ref, color="black", linewidth=0.8, linestyle="--")
        ax.set_xlabel(xlabel)
        ax.margins(x=0.15)
        ax.legend(fontsize=8, loc="best")
        ax.grid(axis="x", alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _series(rows: Sequence[Dict[str, Any]], key: str) -> Tuple[List[str], Dict[str, Dict[str, float]]]:
    """Cases in order, and per backend the ``key`` value per case (rows without one left out)."""
    cases: List[str] = []
    series: Dict[str, Dict[str, float]] = {}
    for r in rows:
        value = r.get(key)
        if value is None or not math.isfinite(value) or value <= 0:
            continue
        if r["case"] not in cases:
            cases.append(r["case"])
        series.setdefault(r["backend"], {})[r["case"]] = float(value)
    return cases, series


def write_plots(out_dir: str, rows: Sequence[Dict[str, Any]], title: str) -> List[str]:
    """Draw the four PNGs into ``out_dir``; returns their paths."""
    paths = [os.path.join(out_dir, name) for name in PNG_FILES]
    cases, s = _series(rows, "ms")
    _grouped_barh(paths[0], cases, s, "ms (median, log scale; lower is better)", f"Latency — {title}", logx=True)
    cases, s = _series(rows, "tflops")
    _grouped_barh(paths[1], cases, s, "TFLOPS (higher is better)", f"Throughput — {title}")
    cases, s = _series(rows, "peak_mb")
    _grouped_barh(paths[2], cases, s, "peak host memory of one call, MB (tracemalloc)", f"Host memory — {title}")
    sp = speedups(rows)
    cases = list(dict.fromkeys(x["case"] for x in sp))
    series: Dict[str, Dict[str, float]] = {}
    for x in sp:
        series.setdefault(f"{x['ours'].removeprefix('aule-kp ')} vs {x['baseline']}", {})[x["case"]] = x["speedup"]
    _grouped_barh(paths[3], cases, series, "baseline ms / aule-kp ms (log scale; above 1: aule-kp faster)",
                  f"Speedup — {title}" + ("" if sp else " (no torch SDPA / aule-attention rows)"), logx=True, ref=1.0)
    return paths


def write_results(out_dir: str, rows: Sequence[Dict[str, Any]], meta: Dict[str, Any], markdown: str) -> List[str]:
    """Write ``bench.md``, ``bench.json`` and (with matplotlib) the PNGs into ``out_dir``; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    md = os.path.join(out_dir, "bench.md")
    with open(md, "w") as f:
        f.write(markdown)
    js = os.path.join(out_dir, "bench.json")
    clean = [{k: _finite(v) for k, v in r.items()} for r in rows]
    with open(js, "w") as f:
        json.dump({"meta": meta, "rows": clean, "speedups": speedups(clean)}, f, indent=1, allow_nan=False)
    written = [md, js]
    if matplotlib_available():
        title = f"{meta.get('preset', '?')}" + (f" (lengths / {meta['scale']:g})" if meta.get("scale", 1) != 1 else "")
        device = str(meta.get("device", "")).split(", driver")[0][:60]
        written += write_plots(out_dir, clean, f"{title}, {device}".rstrip(", "))
    else:
        log.warning("matplotlib is not installed: wrote %s and %s but no PNG plots (pip install matplotlib)", md, js)
    log.info("bench: wrote %s", ", ".join(written))
    return written
