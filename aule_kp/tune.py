"""Tile tuning (``aule-kp tune``): time the legal specializations of a kernel on this device and
cache the fastest. A benchmark, beside bench.py: nothing in aule_kp/vulkan imports it.

The default tiles come from the kernel choice's tile tables (aule_kp/vulkan/choice.py); ``tune``
measures instead. For each representative problem it takes the specialization the device would use
by default, enumerates neighbouring tile choices that are legal here (shared memory, workgroup size
and the divisibility rules of the shader headers: ``choice.forward_reasons`` and
``choice.backward_reasons``), times each through the real plan (GPU timestamps around its
dispatches, after a warm-up), checks its output against the default's, and stores the winner in the
tuning cache (aule_kp/vulkan/tuning_cache.py, which documents the file), whence the choice reads it.
"""

from __future__ import annotations

import datetime
import logging
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .bench import Case, _progress, gpu_seconds
from .dtypes import from_f32, to_f32
from .problem import Problem
from .vulkan import choice
from .vulkan.configs import BackwardConfig, KernelConfig
from .vulkan.probe import DeviceCaps
from .vulkan.tuning_cache import TILE_FIELDS, cache_dir, cache_path, clear, defaults_only, load, problem_key, save

__all__ = ["ALL_CANDIDATES", "PASSES", "TuneReport", "cache_dir", "cache_path", "candidate_limit", "candidates",
           "clear", "default_cases", "format_entries", "format_rows", "load", "tune"]

log = logging.getLogger("aule_kp")

#: Candidate outputs may differ from the default's by this much, times max(1, max |default|): the
#: same sums in another order (fp32), plus one rounding to the 16-bit storage type.
TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}

# Representative problems. QUICK: seconds on lavapipe; CPU: the lavapipe bar's head dim; GPU: prefill
# at two lengths (their buckets and neighbours cover 1K..16K), causal or not, and one decode shape.
QUICK_CASES = [Case(1, 2, 64, 64, 32, "float32", False)]
CPU_CASES = [Case(1, 8, 256, 256, 64, "float32", False), Case(1, 8, 256, 256, 64, "float32", True)]
GPU_CASES = [Case(1, 32, s, s, d, "float16", causal) for d in (64, 128) for s in (2048, 8192)
             for causal in (False, True)] + [Case(1, 32, 1, 8192, d, "float16", False, hkv=8) for d in (64, 128)]
#: Candidates timed per problem and pass besides the default.
MAX_CANDIDATES = {"quick": 2, "cpu": 6, "gpu": 24}
#: ``max_candidates`` that times every legal candidate (``aule-kp tune --candidates all``).
ALL_CANDIDATES = sys.maxsize
PASSES = ("forward", "backward")


def _tiles(cfg: Any) -> Dict[str, int]:
    k = cfg.dkdv if isinstance(cfg, BackwardConfig) else cfg
    return {f: getattr(k, f) for f in TILE_FIELDS}


# ---- candidates ---------------------------------------------------------------------------------

def _around(value: int, lo: int, hi: int, step: int = 1) -> List[int]:
    """``value`` times 1/4 .. 4, as multiples of ``step`` within [lo, hi]."""
    out = {value * 4, value * 2, value, value // 2, value // 4}
    return sorted(v for v in out if lo <= v <= hi and v % step == 0)


def _lane_floats(k: KernelConfig) -> int:
    """Rough per-lane register count of a scalar kernel (rows x (its q/o or k/v slice + scores)):
    the unrolled code, and lavapipe's compile time, grow with it."""
    return k.rpt * ((k.dk + k.dv) // k.tpr + k.bc)


def _distance(a: Dict[str, int], b: Dict[str, int]) -> float:
    return sum(abs(math.log2(a[f] / b[f])) for f in ("br", "bc", "wg", "tpr", "rpt")) + abs(a["stage"] - b["stage"])


def candidates(cfg: Any, caps: DeviceCaps, problem: Problem, limit: int) -> List[Any]:
    """Up to ``limit`` legal specializations near the default ``cfg`` (a forward KernelConfig or a
    BackwardConfig), nearest first: each tile size from a quarter to four times the default's."""
    k = cfg.dkdv if isinstance(cfg, BackwardConfig) else cfg
    wave = max(caps.subgroup_size, 1)
    wgs = _around(k.wg, wave, caps.max_workgroup_invocations, wave if k.variant == "coopmat" else 1)
    grid: List[Dict[str, int]] = []
    if k.variant == "coopmat":
        for br in _around(k.br, 16, 256, 16):
            for bc in _around(k.bc, 16, 128, 16):
                stages = (1, 2) if k.kernel == "fa2_fwd_coopmat" else (1,)
                grid += [dict(br=br, bc=bc, wg=wg, tpr=1, rpt=1, stage=stage) for wg in wgs for stage in stages]
    else:
        for tpr in (1, 2, 4, 8):
            for rpt in _around(k.rpt, 1, 64):
                for bc in _around(k.bc, 1, 128):
                    grid += [dict(br=wg // tpr * rpt, bc=bc, wg=wg, tpr=tpr, rpt=rpt, stage=stage)
                             for wg in wgs for stage in (0, 1) if wg >= tpr]
    check = choice.backward_reasons if isinstance(cfg, BackwardConfig) else choice.forward_reasons
    base = _tiles(cfg)
    budget = 2 * _lane_floats(k)
    legal = []
    for tiles in grid:
        if tiles == base:
            continue
        cand = choice.with_tiles(cfg, tiles)
        ck = cand.dkdv if isinstance(cand, BackwardConfig) else cand
        if k.variant != "coopmat" and _lane_floats(ck) > budget:
            continue
        if not check(cand, caps, problem):
            legal.append((_distance(tiles, base), _lane_floats(ck), tuple(tiles.values()), cand))
    legal.sort(key=lambda t: t[:3])
    return [t[3] for t in legal[:limit]]


# ---- timing -------------------------------------------------------------------------------------

@dataclass
class _Job:
    """One problem and pass: its default, candidates, inputs and the default's outputs."""

    case: Case
    kind: str  # "forward" | "backward"
    default: Any
    candidates: List[Any]
    key: str
    inputs: Optional[Tuple[np.ndarray, ...]] = None
    reference: Optional[Tuple[np.ndarray, ...]] = None
    rows: List[Dict[str, Any]] = field(default_factory=list)


@dataclass
class TuneReport:
    """What ``tune`` did: a row per candidate timed, the winners stored, and the cache file."""

    rows: List[Dict[str, Any]]
    winners: Dict[str, Dict[str, Any]]
    path: Optional[Path]
    device: str


def default_cases(caps: DeviceCaps, quick: bool = False, dtype: Optional[str] = None,
                  head_dims: Optional[Sequence[int]] = None, base: Optional[Sequence[Case]] = None) -> List[Case]:
    """The representative problems: ``base``, else tiny ones (``quick``), else the CPU or GPU preset by
    device type; ``dtype`` and ``head_dims`` replace theirs (every case at every given head dim)."""
    base = base or (QUICK_CASES if quick else CPU_CASES if caps.type == "cpu" else GPU_CASES)
    out: List[Case] = []
    for c in base:
        for d in head_dims or [c.d]:
            case = replace(c, d=int(d), dtype=dtype or c.dtype)
            if case not in out:
                out.append(case)
    return out


def _describe(cfg: Any) -> str:
    t = _tiles(cfg)
    return " ".join(f"{f}{t[f]}" for f in TILE_FIELDS)


def _default(case: Case, kind: str, caps: DeviceCaps) -> Any:
    """The default specialization (ValueError when the device cannot take the problem)."""
    p = case.problem()
    if kind == "forward":
        return choice.forward_kernel(caps, p)
    cfg = choice.backward_config(caps, p)
    why = choice.backward_reasons(cfg, caps, p)
    if why:
        raise ValueError("; ".join(why))
    return cfg


def _prepare(job: _Job, dev: Any, seed: int) -> None:
    """Inputs of the job; for the backward also dO and the forward's O and LSE (default forward)."""
    from .vulkan.plan import Plan

    p = job.case.problem()
    q, k, v = job.case.inputs(seed)
    if job.kind == "forward":
        job.inputs = (q, k, v, None)
        return
    plan = Plan(dev, p, choice.forward_kernel(dev.caps, p))
    try:
        out, lse = plan.run(q, k, v, None)
    finally:
        plan.destroy()
    dout = from_f32(np.random.default_rng(seed + 1).standard_normal(out.shape, dtype=np.float32), p.dtype)
    job.inputs = (q, k, v, out, dout, lse, None)


def _trial(job: _Job, cfg: Any, dev: Any, repeat: int) -> Tuple[float, Tuple[np.ndarray, ...]]:
    """Builds the real plan of ``cfg``, runs it once (its outputs) and times its dispatches alone by
    GPU timestamps (host transfers and submit jitter would add the same noise to every candidate):
    median of ``repeat``."""
    from .vulkan.backward import BackwardPlan
    from .vulkan.plan import Plan

    p = job.case.problem()
    plan = (Plan if job.kind == "forward" else BackwardPlan)(dev, p, cfg)
    try:
        outputs = plan.run(*job.inputs)
        seconds = gpu_seconds(plan, repeat)
    finally:
        plan.destroy()
    return seconds, tuple(o for o in outputs if o is not None)


def _mismatch(got: Tuple[np.ndarray, ...], want: Tuple[np.ndarray, ...], dtype: str,
              computed_in: Optional[str] = None) -> Optional[float]:
    """The largest error relative to max(1, max |want|) when it is over the tolerance of
    ``computed_in`` (default: the storage ``dtype``), else None."""
    worst = 0.0
    for g, w in zip(got, want):
        gf = to_f32(g, dtype) if g.dtype != np.float32 else g
        wf = to_f32(w, dtype) if w.dtype != np.float32 else w
        finite = np.isfinite(wf)
        if not np.array_equal(np.isfinite(gf), finite):
            return math.inf
        scale = max(1.0, float(np.abs(wf[finite]).max(initial=0.0)))
        worst = max(worst, float(np.abs(gf[finite] - wf[finite]).max(initial=0.0)) / scale)
    return worst if worst > TOLERANCE[computed_in or dtype] else None


def _measure(job: _Job, cfg: Any, dev: Any, repeat: int, seed: int) -> Dict[str, Any]:
    """The row of one candidate of ``job`` (the default first: its outputs become the reference)."""
    row = {"case": job.case.label(), "pass": job.kind, "variant": cfg.variant, "tiles": _describe(cfg),
           "ms": None, "speedup": None, "status": "", "winner": False, "key": job.key, "config": cfg}
    is_default = cfg is job.default
    if not is_default and job.reference is None:
        row["status"] = "skipped: the default failed"
        return row
    try:
        with dev.lock:
            if job.inputs is None:
                _prepare(job, dev, seed)
            seconds, outputs = _trial(job, cfg, dev, repeat)
    except Exception as exc:  # noqa: BLE001 - a pipeline the driver refuses must not end the run
        log.warning("tune: %s %s, %s failed: %s", job.kind, job.case.label(), _describe(cfg), exc)
        row["status"] = f"failed: {exc}"[:80]
        return row
    if is_default:
        job.reference = outputs
        row["status"] = "default"
    else:
        # Cooperative-matrix kernels compute on fp16 whatever the storage (fp32/bf16 rounded on load).
        err = _mismatch(outputs, job.reference, job.case.dtype,
                        "float16" if cfg.variant == "coopmat" and job.case.dtype == "float32" else None)
        if err is not None:
            log.warning("tune: %s %s, %s disagrees with the default (error %.2e); skipped", job.kind,
                        job.case.label(), _describe(cfg), err)
            row["status"] = f"mismatch ({err:.1e})"
            return row
        row["status"] = "ok"
    row["ms"] = seconds * 1e3
    return row


def candidate_limit(caps: DeviceCaps, quick: bool = False, max_candidates: Optional[int] = None) -> int:
    """Candidates timed per problem and pass besides the default: ``max_candidates`` (None: 6 on a CPU
    device, 24 on a GPU; :data:`ALL_CANDIDATES`: every legal one), capped at 2 when ``quick`` (a quick
    run stays seconds long whatever else is asked). Raises ValueError for a negative count."""
    if max_candidates is not None and max_candidates < 0:
        raise ValueError(f"max_candidates must be >= 0 or ALL_CANDIDATES, got {max_candidates}")
    limit = MAX_CANDIDATES["cpu" if caps.type == "cpu" else "gpu"] if max_candidates is None else max_candidates
    return min(limit, MAX_CANDIDATES["quick"]) if quick else limit


def tune(cases: Optional[Sequence[Case]] = None, *, quick: bool = False, dtype: Optional[str] = None,
         head_dims: Optional[Sequence[int]] = None, repeat: int = 5, passes: Sequence[str] = PASSES,
         max_candidates: Optional[int] = None, directory: Optional[str] = None, seed: int = 0,
         min_gain: float = 0.02, save_results: bool = True) -> TuneReport:
    """Times the legal tile choices for ``cases`` (default: :func:`default_cases`; ``dtype`` and
    ``head_dims`` replace theirs) on the selected device, forward and/or backward (``passes``), and
    stores each problem's fastest in the cache.

    Per problem and pass: the default specialization and up to ``max_candidates`` others (see
    :func:`candidate_limit`: default 6 on a CPU device, 24 on a GPU, :data:`ALL_CANDIDATES` for every
    legal one; ``quick`` caps it at 2) are each built as a real plan, run once, checked against
    the default's outputs (a candidate that fails to build or run, or disagrees, is logged and
    skipped) and timed by GPU timestamps around its dispatches (median of ``repeat``, after a 0.5 s
    warm-up, see ``bench.gpu_seconds``). The fastest wins if it beats
    the default by more than ``min_gain`` (a fraction: timing noise must not replace the default);
    winners go to ``directory`` (default: :func:`cache_dir`) unless ``save_results`` is False.
    """
    from .vulkan import device as devmod

    dev = devmod.get_device()
    caps = dev.caps
    limit = candidate_limit(caps, quick, max_candidates)
    cases = default_cases(caps, quick, dtype, head_dims, cases)
    repeat = max(1, repeat)
    jobs: List[_Job] = []
    with defaults_only():
        for case in cases:
            for kind in passes:
                try:
                    cfg = _default(case, kind, caps)
                except ValueError as exc:
                    log.warning("tune: %s %s: no kernel can run it here: %s", kind, case.label(), exc)
                    continue
                kernel = f"{'fwd' if kind == 'forward' else 'bwd'}.{cfg.variant}"
                job = _Job(case, kind, cfg, candidates(cfg, caps, case.problem(), limit),
                           problem_key(kernel, case.problem()))
                jobs.append(job)
        work = [(job, cfg) for job in jobs for cfg in [job.default, *job.candidates]]
        steps = _progress(work)
        if hasattr(steps, "set_description"):
            steps.set_description("tune")
            steps.unit = "candidate"
        for job, cfg in steps:
            if hasattr(steps, "set_postfix_str"):
                steps.set_postfix_str(f"{job.kind} {job.case.label()}: {_describe(cfg)}")
            job.rows.append(_measure(job, cfg, dev, repeat, seed))
        if hasattr(steps, "close"):
            steps.close()
    winners: Dict[str, Dict[str, Any]] = {}
    today = datetime.datetime.now().isoformat(timespec="seconds")
    for job in jobs:
        timed = [r for r in job.rows if r["ms"] is not None]
        if not timed or job.rows[0]["ms"] is None:
            continue
        default_ms = job.rows[0]["ms"]
        for r in timed:
            r["speedup"] = default_ms / r["ms"] if r["ms"] > 0 else None
        best = min(timed, key=lambda r: r["ms"])
        if best["ms"] * (1 + min_gain) >= default_ms:
            best = job.rows[0]
        best["winner"] = True
        winners[job.key] = {**_tiles(best["config"]), "ms": round(best["ms"], 4), "default_ms": round(default_ms, 4),
                            "case": job.case.label(), "date": today}
    path = save(caps, winners, directory) if save_results and winners else None
    rows = [r for job in jobs for r in job.rows]
    return TuneReport(rows, winners, path, f"{caps.name} ({caps.type}), driver {caps.driver_info or caps.driver_name}")


def format_rows(rows: List[Dict[str, Any]]) -> str:
    """Candidate rows as a markdown table (``*`` marks each problem's winner)."""
    lines = ["| case | pass | variant | tiles | ms | vs default | status |", "|---" * 7 + "|"]
    for r in rows:
        ms = "—" if r["ms"] is None else f"{r['ms']:.3f}"
        speed = "—" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        mark = " *" if r["winner"] else ""
        lines.append(f"| {r['case']} | {r['pass']} | {r['variant']} | {r['tiles']}{mark} | {ms} | {speed} | "
                     f"{r['status']} |")
    return "\n".join(lines)


def format_entries(entries: Dict[str, Dict[str, Any]]) -> str:
    """Cached winners as a markdown table."""
    lines = ["| key | tiles | ms | default ms | tuned on |", "|---" * 5 + "|"]
    for key, e in sorted(entries.items()):
        tiles = " ".join(f"{f}{e.get(f)}" for f in TILE_FIELDS)
        lines.append(f"| {key} | {tiles} | {e.get('ms', '—')} | {e.get('default_ms', '—')} | {e.get('case', '')} |")
    return "\n".join(lines)
