"""Results folder of ``aule-kp bench --plots DIR``: the table as markdown and JSON, and PNG plots.

Files written into DIR:

- ``bench.md``: machine, driver, date, command, the table and the speedups.
- ``bench.json``: ``{"meta": {...}, "rows": [...], "speedups": [...]}``; a row has ``case``, ``backend``,
  ``ms``, ``tflops``, ``max_err``, ``peak_mb`` and ``note`` (``null`` where not measured).
- ``latency_ms.png``, ``tflops.png``, ``peak_host_mb.png``: one group of bars per case, one bar per
  backend that ran on it (aule-kp vulkan, vulkan GpuTensor, triton, cpu, torch SDPA, aule-attention), on
  a log axis (the values span decades).
- ``host_overhead_ms.png`` (``cpu`` and ``gpu`` presets with the vulkan row): the host-overhead breakdown
  of a tiny call (whole call, ``Sequence.eval()``, kernel, Python path, host overhead), in ms only: those
  rows are parts of one call, not attention throughput, so they are kept off the plots above.
- ``--preset serving`` instead: ``latency_ms.png``, ``tokens_per_s.png``, ``memory_mb.png`` (a decode
  row's KV cache, a prefill row's peak host memory), ``dashboard.png`` (the panels together) and
  ``speedup.png`` (:func:`write_serving_plots`).
- ``speedup.png``, only when torch SDPA or aule-attention rows ran (``--vs``): a baseline's time over
  each aule-kp row's time on the same case (above 1: aule-kp is faster), one bar per (aule-kp row,
  baseline) pair; ``bench.md`` and ``bench.json`` list the same speedups.

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

LATENCY_PNG, TFLOPS_PNG, MEMORY_PNG, OVERHEAD_PNG, SPEEDUP_PNG = (
    "latency_ms.png", "tflops.png", "peak_host_mb.png", "host_overhead_ms.png", "speedup.png")
#: Every PNG ``--plots`` may write; a run writes those it has rows for (see :func:`write_plots`).
PNG_FILES = (LATENCY_PNG, TFLOPS_PNG, MEMORY_PNG, OVERHEAD_PNG, SPEEDUP_PNG)
BASELINES = ("torch SDPA", "aule-attention", "naive numpy", "flash-attn")
#: The serving preset's plots (``aule-kp bench --preset serving``): latency, throughput in tokens/s,
#: memory (a decode row's KV cache, a prefill row's peak host memory), a dashboard of the four
#: panels, and the speedups.
TOKENS_PNG, SERVING_MEMORY_PNG, DASHBOARD_PNG = "tokens_per_s.png", "memory_mb.png", "dashboard.png"
SERVING_PNG_FILES = (LATENCY_PNG, TOKENS_PNG, SERVING_MEMORY_PNG, DASHBOARD_PNG, SPEEDUP_PNG)


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
                  title: str, ref: Optional[float] = None) -> None:
    """One figure of :func:`_draw_barh`, its legend below it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 1.4 + 0.22 * _slots(cases, series) + 0.1 * len(series)), layout="constrained")
    _draw_barh(ax, cases, series, xlabel, title, ref)
    fig.legend(fontsize=8, loc="outside lower center", ncol=min(3, len(series)), frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _slots(cases: List[str], series: Dict[str, Dict[str, float]]) -> float:
    """Height of a bar group plot in bar slots (half a slot between groups)."""
    return sum(sum(case in values for values in series.values()) + 0.5 for case in cases)


def _draw_barh(ax: Any, cases: List[str], series: Dict[str, Dict[str, float]], xlabel: str, title: str,
               ref: Optional[float] = None) -> None:
    """Horizontal grouped bars on a log axis: one group per case (top to bottom) holding a bar for each
    series that has a value there (no empty slots), values written beside the bars."""
    from matplotlib.ticker import FuncFormatter

    names = list(series)
    # Bars from the top: one slot per (case, series) present, half a slot between groups.
    ys: Dict[str, List[float]] = {n: [] for n in names}
    xs: Dict[str, List[float]] = {n: [] for n in names}
    centres: List[float] = []
    y = 0.0
    for case in cases:
        first = y
        for n in names:
            if case in series[n]:
                ys[n].append(-y)
                xs[n].append(series[n][case])
                y += 1
        centres.append(-(first + y - 1) / 2)
        y += 0.5
    for n in names:
        bars = ax.barh(ys[n], xs[n], height=0.9, label=n)
        ax.bar_label(bars, labels=[f"{x:.3g}" for x in xs[n]], padding=2, fontsize=7)
    ax.set_yticks(centres, cases, fontsize=8)
    # Values span decades (a decode row beside a prefill row): a linear axis hides the small ones.
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:g}"))
    # Minor ticks: label 2x and 5x of each decade only, so that labels never overlap.
    ax.xaxis.set_minor_formatter(FuncFormatter(
        lambda x, _pos: f"{x:g}" if x > 0 and round(x / 10 ** math.floor(math.log10(x))) in (2, 5) else ""))
    ax.tick_params(axis="x", which="minor", labelsize=7)
    if ref is not None:
        ax.axvline(ref, color="black", linewidth=0.8, linestyle="--")
    ax.set_ylim(-y + 0.25, 0.75)
    ax.set_xlabel(xlabel)
    ax.margins(x=0.1)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=10)


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
    """Draw the PNGs of ``rows`` into ``out_dir`` (a plot with nothing to show is not drawn); returns their paths.

    End-to-end rows go to the latency, TFLOPS and memory plots; the parts of the host-overhead breakdown
    (rows with ``"breakdown": True``) to their own plot in ms; the speedups only where a baseline ran."""
    whole = [r for r in rows if not r.get("breakdown")]
    parts = [r for r in rows if r.get("breakdown")]
    sp = speedups(whole)
    speedup_series: Dict[str, Dict[str, float]] = {}
    for x in sp:
        speedup_series.setdefault(f"{x['ours'].removeprefix('aule-kp ')} vs {x['baseline']}", {})[x["case"]] = \
            x["speedup"]
    plots = [
        (LATENCY_PNG, *_series(whole, "ms"), "ms (median, log scale; lower is better)", "Latency", None),
        (TFLOPS_PNG, *_series(whole, "tflops"), "TFLOPS (log scale; higher is better)", "Throughput", None),
        (MEMORY_PNG, *_series(whole, "peak_mb"), "peak host memory of one call, MB (tracemalloc, log scale)",
         "Host memory", None),
        (OVERHEAD_PNG, *_series(parts, "ms"), "ms (median, log scale), tiny shape, cached plan",
         "Host overhead of a call, in parts", None),
        (SPEEDUP_PNG, list(dict.fromkeys(x["case"] for x in sp)), speedup_series,
         "baseline ms / aule-kp ms (log scale; above 1: aule-kp faster)", "Speedup", 1.0),
    ]
    paths = []
    for name, cases, series, xlabel, what, ref in plots:
        if not cases:
            continue
        paths.append(os.path.join(out_dir, name))
        _grouped_barh(paths[-1], cases, series, xlabel, f"{what} — {title}", ref=ref)
    return paths


def _speedup_series(rows: Sequence[Dict[str, Any]]) -> Tuple[List[str], Dict[str, Dict[str, float]]]:
    sp = speedups(rows)
    series: Dict[str, Dict[str, float]] = {}
    for x in sp:
        series.setdefault(f"{x['ours'].removeprefix('aule-kp ')} vs {x['baseline']}", {})[x["case"]] = x["speedup"]
    return list(dict.fromkeys(x["case"] for x in sp)), series


def _memory_series(rows: Sequence[Dict[str, Any]]) -> Tuple[List[str], Dict[str, Dict[str, float]]]:
    """A decode row's KV cache size where it has one, else its peak host memory, per backend."""
    memory = [dict(r, backend=f"{r['backend']} ({'KV cache' if r.get('kv_cache_mb') else 'peak host'})",
                   mem=r.get("kv_cache_mb") or r.get("peak_mb")) for r in rows]
    return _series(memory, "mem")


def write_serving_plots(out_dir: str, rows: Sequence[Dict[str, Any]], title: str) -> List[str]:
    """The serving preset's five PNGs (:data:`SERVING_PNG_FILES`; the speedup and its dashboard panel
    only where a baseline ran); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (LATENCY_PNG, *_series(rows, "ms"), "ms (median, log scale; lower is better)", "Latency", None),
        (TOKENS_PNG, *_series(rows, "tokens_per_s"), "tokens/s (log scale; higher is better)", "Throughput", None),
        (SERVING_MEMORY_PNG, *_memory_series(rows), "MB (decode: KV cache; prefill: peak host memory of a call)",
         "Memory", None),
        (SPEEDUP_PNG, *_speedup_series(rows), "baseline ms / aule-kp ms (log; above 1: aule-kp faster)", "Speedup",
         1.0),
    ]
    panels = [p for p in panels if p[1]]
    paths = []
    for name, cases, series, xlabel, what, ref in panels:
        paths.append(os.path.join(out_dir, name))
        _grouped_barh(paths[-1], cases, series, xlabel, f"{what} — {title}", ref=ref)
    if panels:
        height = max(_slots(p[1], p[2]) for p in panels)
        fig, axes = plt.subplots(2, 2, figsize=(20, 2 + 0.2 * height * 2), layout="constrained", squeeze=False)
        for ax, (_, cases, series, xlabel, what, ref) in zip(axes.flat, panels):
            _draw_barh(ax, cases, series, xlabel, what, ref)
            ax.legend(fontsize=6, loc="lower right")
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.suptitle(f"Serving dashboard — {title}")
        paths.append(os.path.join(out_dir, DASHBOARD_PNG))
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)
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
        draw = write_serving_plots if meta.get("preset") == "serving" else write_plots
        written += draw(out_dir, clean, f"{title}, {device}".rstrip(", "))
    else:
        log.warning("matplotlib is not installed: wrote %s and %s but no PNG plots (pip install matplotlib)", md, js)
    log.info("bench: wrote %s", ", ".join(written))
    return written
