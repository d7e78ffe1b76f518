"""Tile tuning: time the legal specializations of a kernel on this device and cache the fastest.

The defaults of :mod:`aule_kp.vulkan.kernels` are chosen per vendor and limits; ``tune`` measures
instead. For each representative problem it takes the specialization the device would use by
default, enumerates neighbouring tile choices that are legal here (shared memory, workgroup size and
the divisibility rules of the shader headers), times each through the real plan (GPU timestamps around its dispatches,
after a warm-up), checks its output against the default's, and stores the winner.

The cache is one JSON file per device and driver version, in the user cache dir
(``AULE_KP_CACHE_DIR``, else ``$XDG_CACHE_HOME/aule_kp`` or ``~/.cache/aule_kp``; on Windows
``%LOCALAPPDATA%\\aule_kp``), named ``tuning-<device uuid>-<driver version>.json``::

    {"format": 1,
     "device": {"name": ..., "uuid": ..., "driver_version": ..., "driver_name": ..., "driver_info": ...},
     "entries": {"fwd.scalar/dk64-dv64/float32/causal/Lq512-Lk512":
                     {"br": 128, "bc": 8, "wg": 64, "tpr": 2, "rpt": 4, "stage": 0,
                      "ms": 1.9, "default_ms": 2.3, "case": "B1 H8 ...", "date": "..."}}}

Keys: kernel family (``fwd.<variant>``, ``bwd.<variant>``), head dims, dtype, causal or not, and the
power-of-two buckets of the query and key lengths (decode and prefill at one key length want other
tiles). A lookup takes the exact bucket, else the nearest tuned one within a factor of two in each
length. ``kernels.config_for`` and ``kernels.backward_config`` read it through :func:`tuned_config`
and :func:`tuned_backward` (``AULE_KP_NO_TUNING_CACHE=1`` turns that off); the file is read once per
process and again after ``tune`` or ``clear`` write it. A corrupt, unreadable or foreign file is
ignored with one warning; writes go to a temporary file and ``os.replace``.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import logging
import math
import os
import re
import sys
import tempfile
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..bench import Case, _progress, gpu_seconds
from ..dtypes import from_f32, to_f32
from ..problem import Problem
from . import workarounds
from .kernels import (
    CPU_LOOP_LIMIT,
    BackwardConfig,
    KernelConfig,
    _fit_tpr,
    backward_config,
    backward_config_reasons,
    choose,
)
from .probe import DeviceCaps

log = logging.getLogger("aule_kp")

FORMAT = 1
ENV_DIR = "AULE_KP_CACHE_DIR"
ENV_OFF = "AULE_KP_NO_TUNING_CACHE"
#: The spec constants a winner sets (the others come from the problem).
TILE_FIELDS = ("br", "bc", "wg", "tpr", "rpt", "stage")
#: The scalar kernels sum a row over at most 8 lanes (three shuffle rounds in fa2_fwd.comp / fa2_bwd_*).
MAX_TPR = 8
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
PASSES = ("forward", "backward")

_memo: Dict[str, Dict[str, Any]] = {}
_paths: Dict[Tuple[Any, ...], Path] = {}
_warned: set = set()
_lock = threading.Lock()
_bypass: contextvars.ContextVar[bool] = contextvars.ContextVar("aule_kp_tuning_bypass", default=False)


# ---- the cache file -----------------------------------------------------------------------------

def cache_dir(override: Optional[str] = None) -> Path:
    """The folder of the tuning cache: ``override``, ``AULE_KP_CACHE_DIR``, else the user cache dir."""
    if override:
        return Path(override).expanduser()
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "aule_kp"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aule_kp"


def device_key(caps: DeviceCaps) -> str:
    """``<uuid>-<driver version>``: a new driver (or another device) starts an empty cache. Devices
    that report no UUID (Vulkan 1.0) use their vendor and device ids and name instead."""
    ident = caps.uuid or re.sub(r"[^A-Za-z0-9]+", "_", f"{caps.vendor_id:x}-{caps.device_id:x}-{caps.name}")
    return f"{ident}-{caps.driver_version}"


def cache_path(caps: DeviceCaps, directory: Optional[str] = None) -> Path:
    """The tuning file of this device and driver."""
    return cache_dir(directory) / f"tuning-{device_key(caps)}.json"


def _warn_once(tag: str, msg: str, *args: Any) -> None:
    if tag not in _warned:
        _warned.add(tag)
        log.warning(msg, *args)


def read_cache_file(path: Path, caps: DeviceCaps, section: str = "entries", what: str = "tuning cache",
                    fmt: int = FORMAT) -> Dict[str, Any]:
    """The ``section`` of the per-device JSON file ``path`` ({} when it is missing; one warning and {}
    when it cannot be used: unreadable, not JSON, another format, another device or driver). Shared
    by the tuning cache and the self-check's verdicts (selfcheck.py), which live side by side."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        _warn_once(f"read:{path}", "aule-kp: ignoring the %s %s: cannot read it (%s)", what, path, exc)
        return {}
    try:
        data = json.loads(text)
    except ValueError as exc:
        _warn_once(f"read:{path}", "aule-kp: ignoring the %s %s: not valid JSON (%s)", what, path, exc)
        return {}
    if not isinstance(data, dict) or data.get("format") != fmt or not isinstance(data.get(section), dict):
        version = data.get("format") if isinstance(data, dict) else None
        _warn_once(f"read:{path}", "aule-kp: ignoring the %s %s: format %r, expected %d", what, path, version, fmt)
        return {}
    dev = data.get("device") if isinstance(data.get("device"), dict) else {}
    if (dev.get("uuid"), dev.get("driver_version")) != (caps.uuid, caps.driver_version):
        _warn_once(f"read:{path}", "aule-kp: ignoring the %s %s: it was written for device %s, driver %s",
                   what, path, dev.get("uuid"), dev.get("driver_version"))
        return {}
    return data[section]


def write_cache_file(path: Path, caps: DeviceCaps, section: str, entries: Dict[str, Any],
                     fmt: int = FORMAT) -> None:
    """Writes ``entries`` as the ``section`` of ``path`` for this device and driver, atomically
    (temporary file + ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": fmt,
            "device": {"name": caps.name, "uuid": caps.uuid, "driver_version": caps.driver_version,
                       "driver_name": caps.driver_name, "driver_info": caps.driver_info},
            section: dict(sorted(entries.items()))}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load(caps: DeviceCaps, directory: Optional[str] = None) -> Dict[str, Any]:
    """This device's cached winners by key (read once per process and path; do not modify)."""
    # Resolving the path costs more than the rest of a lookup (every backward call makes two).
    where = (directory, os.environ.get(ENV_DIR), os.environ.get("XDG_CACHE_HOME"), caps.uuid, caps.driver_version)
    path = _paths.get(where)
    if path is None:
        path = _paths[where] = cache_path(caps, directory)
    key = str(path)
    with _lock:
        if key not in _memo:
            _memo[key] = read_cache_file(path, caps)
        return _memo[key]


def _invalidate(path: Path) -> None:
    with _lock:
        _memo.pop(str(path), None)
        _warned.difference_update({t for t in _warned if t.endswith(str(path))})
    # The Vulkan backend memoises its kernel choice per problem: forget it so new winners apply now.
    from ..dispatch import get

    getattr(get("vulkan"), "_choices", {}).clear()


def save(caps: DeviceCaps, entries: Dict[str, Dict[str, Any]], directory: Optional[str] = None) -> Path:
    """Merges ``entries`` into this device's file (atomically: temporary file + ``os.replace``)."""
    path = cache_path(caps, directory)
    merged = dict(read_cache_file(path, caps))
    merged.update(entries)
    write_cache_file(path, caps, "entries", merged)
    _invalidate(path)
    return path


def clear(caps: DeviceCaps, directory: Optional[str] = None) -> bool:
    """Deletes this device's tuning file; True when there was one."""
    path = cache_path(caps, directory)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    finally:
        _invalidate(path)
    return True


# ---- keys and lookups ---------------------------------------------------------------------------

def length_bucket(n: int) -> int:
    """The power of two at or above ``n`` (1 for 0 and 1)."""
    return 1 << (max(1, n) - 1).bit_length()


def _key(kernel: str, problem: Problem, lq: int, lk: int) -> str:
    causal = "causal" if problem.right == 0 else "full"
    return f"{kernel}/dk{problem.dim_k}-dv{problem.dim_v}/{problem.dtype}/{causal}/Lq{lq}-Lk{lk}"


def problem_key(kernel: str, problem: Problem) -> str:
    """The cache key of ``problem`` for ``kernel`` (``fwd.<variant>`` or ``bwd.<variant>``)."""
    return _key(kernel, problem, length_bucket(problem.len_q), length_bucket(problem.len_k))


def lookup(caps: DeviceCaps, kernel: str, problem: Problem) -> Optional[Tuple[str, Dict[str, int]]]:
    """``(key, tiles)`` of the cached winner for ``problem``: its own length buckets, else the nearest
    tuned ones within a factor of two; None when there is none (or ``AULE_KP_NO_TUNING_CACHE=1``)."""
    if os.environ.get(ENV_OFF, "") not in ("", "0") or _bypass.get():
        return None
    entries = load(caps)
    if not entries:
        return None
    bq, bk = length_bucket(problem.len_q), length_bucket(problem.len_k)
    steps = sorted(((i, j) for i in (0, 1, -1) for j in (0, 1, -1)), key=lambda s: abs(s[0]) + abs(s[1]))
    for i, j in steps:
        key = _key(kernel, problem, bq << i if i >= 0 else bq >> 1, bk << j if j >= 0 else bk >> 1)
        entry = entries.get(key)
        if entry is None:
            continue
        try:
            return key, {f: int(entry[f]) for f in TILE_FIELDS}
        except (KeyError, TypeError, ValueError):
            _warn_once(f"entry:{key}:{cache_path(caps)}", "aule-kp: ignoring the tuning cache entry %s: %r", key,
                       entry)
            return None
    return None


# ---- legality -----------------------------------------------------------------------------------

def kernel_reasons(k: KernelConfig, caps: DeviceCaps, problem: Problem) -> List[str]:
    """The shader headers' rules for the tiles of one kernel (forward or backward; empty: they hold).
    Device limits are checked by :func:`forward_reasons` and ``kernels.backward_config_reasons``; shuffles
    count only where the driver-trap table leaves them (``workarounds.effective``)."""
    caps = workarounds.effective(caps)
    reasons = []
    stages = (1, 2) if k.kernel == "fa2_fwd_coopmat" else (0, 1)
    if min(k.br, k.bc, k.wg, k.tpr, k.rpt) < 1 or k.stage not in stages:
        return [f"tiles out of range: {k}"]
    if k.variant == "coopmat":
        # fa2_fwd_coopmat.comp / fa2_bwd_cm.glsl: 16x16 blocks, whole subgroups.
        wave = max(caps.subgroup_size, 1)
        if k.br % 16 or k.bc % 16:
            reasons.append(f"coopmat tiles must be multiples of 16 (BR={k.br}, BC={k.bc})")
        if k.wg % wave:
            reasons.append(f"coopmat workgroups must be whole subgroups (WG={k.wg}, subgroup {wave})")
        return reasons
    # fa2_fwd.comp / fa2_bwd_dkdv.comp / fa2_bwd_dq.comp: WG/TPR row groups of RPT rows (keys) each.
    if k.tpr > MAX_TPR or k.tpr & (k.tpr - 1):
        reasons.append(f"TPR must be a power of two up to {MAX_TPR}, got {k.tpr}")
    elif _fit_tpr(k.tpr, problem) != k.tpr:
        reasons.append(f"head dims {problem.dim_k}/{problem.dim_v} do not split in pairs over TPR={k.tpr} lanes")
    if k.tpr > 1 and (not caps.subgroup_shuffle or k.tpr > caps.subgroup_size):
        reasons.append(f"TPR={k.tpr} lanes need subgroup shuffles over at least that many lanes")
    if k.wg % k.tpr or k.br != k.wg // k.tpr * k.rpt:
        reasons.append(f"BR must be WG/TPR*RPT (BR={k.br}, WG={k.wg}, TPR={k.tpr}, RPT={k.rpt})")
    return reasons


def forward_reasons(cfg: KernelConfig, caps: DeviceCaps, problem: Problem) -> List[str]:
    """Why the forward specialization ``cfg`` cannot run ``problem`` here (empty: it can)."""
    reasons = kernel_reasons(cfg, caps, problem)
    if cfg.shared_bytes() > caps.shared_memory:
        reasons.append(f"needs {cfg.shared_bytes()} B of shared memory, device has {caps.shared_memory}")
    if cfg.wg > caps.max_workgroup_invocations:
        reasons.append(f"needs {cfg.wg} invocations per workgroup, device allows {caps.max_workgroup_invocations}")
    if caps.type == "cpu" and -(-problem.len_k // cfg.bc) > CPU_LOOP_LIMIT:
        reasons.append(f"{-(-problem.len_k // cfg.bc)} key tiles per invocation; lavapipe stops at {CPU_LOOP_LIMIT}")
    return reasons


def backward_reasons(cfg: BackwardConfig, caps: DeviceCaps, problem: Problem) -> List[str]:
    """Why the backward pipelines ``cfg`` cannot run ``problem`` here (empty: they can)."""
    return (kernel_reasons(cfg.dkdv, caps, problem) + kernel_reasons(cfg.dq, caps, problem)
            + backward_config_reasons(cfg, caps, problem))


def _with_tiles(cfg: Any, tiles: Dict[str, int]) -> Any:
    if isinstance(cfg, BackwardConfig):
        return replace(cfg, dkdv=replace(cfg.dkdv, **tiles), dq=replace(cfg.dq, **tiles))
    return replace(cfg, **tiles)


def _tiles(cfg: Any) -> Dict[str, int]:
    k = cfg.dkdv if isinstance(cfg, BackwardConfig) else cfg
    return {f: getattr(k, f) for f in TILE_FIELDS}


def _apply(kernel: str, cfg: Any, caps: DeviceCaps, problem: Problem,
           reasons: Callable[[Any, DeviceCaps, Problem], List[str]]) -> Any:
    hit = lookup(caps, kernel, problem)
    if hit is None:
        return cfg
    key, tiles = hit
    tuned = _with_tiles(cfg, tiles)
    why = reasons(tuned, caps, problem)
    if why and not reasons(cfg, caps, problem):
        _warn_once(f"illegal:{key}:{cache_path(caps)}", "aule-kp: ignoring the tuned tiles %s for %s: %s", tiles,
                   key, "; ".join(why))
    return cfg if why else tuned


def tuned_config(cfg: KernelConfig, caps: DeviceCaps, problem: Problem) -> KernelConfig:
    """``cfg`` (a default forward specialization) with the tiles of this device's cached winner for
    ``problem`` when there is one and it is legal here; else ``cfg`` itself."""
    return _apply(f"fwd.{cfg.variant}", cfg, caps, problem, forward_reasons)


def tuned_backward(cfg: BackwardConfig, caps: DeviceCaps, problem: Problem) -> BackwardConfig:
    """``cfg`` (the default backward pipelines) with the dK/dV and dQ tiles of this device's cached
    winner for ``problem`` when there is one and it is legal here; else ``cfg`` itself."""
    return _apply(f"bwd.{cfg.variant}", cfg, caps, problem, backward_reasons)


@contextlib.contextmanager
def defaults_only() -> Iterator[None]:
    """Within this block ``config_for`` and ``backward_config`` ignore the cache (this context only)."""
    token = _bypass.set(True)
    try:
        yield
    finally:
        _bypass.reset(token)


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
    check = backward_reasons if isinstance(cfg, BackwardConfig) else forward_reasons
    base = _tiles(cfg)
    budget = 2 * _lane_floats(k)
    legal = []
    for tiles in grid:
        if tiles == base:
            continue
        cand = _with_tiles(cfg, tiles)
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
        return choose(caps, p)
    cfg = backward_config(caps, p)
    why = backward_reasons(cfg, caps, p)
    if why:
        raise ValueError("; ".join(why))
    return cfg


def _prepare(job: _Job, dev: Any, seed: int) -> None:
    """Inputs of the job; for the backward also dO and the forward's O and LSE (default forward)."""
    from .plan import Plan

    p = job.case.problem()
    q, k, v = job.case.inputs(seed)
    if job.kind == "forward":
        job.inputs = (q, k, v, None)
        return
    plan = Plan(dev, p, choose(dev.caps, p))
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
    from .backward import BackwardPlan
    from .plan import Plan

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


def tune(cases: Optional[Sequence[Case]] = None, *, quick: bool = False, dtype: Optional[str] = None,
         head_dims: Optional[Sequence[int]] = None, repeat: int = 5, passes: Sequence[str] = PASSES,
         max_candidates: Optional[int] = None, directory: Optional[str] = None, seed: int = 0,
         min_gain: float = 0.02, save_results: bool = True) -> TuneReport:
    """Times the legal tile choices for ``cases`` (default: :func:`default_cases`; ``dtype`` and
    ``head_dims`` replace theirs) on the selected device, forward and/or backward (``passes``), and
    stores each problem's fastest in the cache.

    Per problem and pass: the default specialization and up to ``max_candidates`` others (default:
    2 quick, 6 on a CPU device, 24 on a GPU) are each built as a real plan, run once, checked against
    the default's outputs (a candidate that fails to build or run, or disagrees, is logged and
    skipped) and timed by GPU timestamps around its dispatches (median of ``repeat``, after a 0.5 s
    warm-up, see ``bench.gpu_seconds``). The fastest wins if it beats
    the default by more than ``min_gain`` (a fraction: timing noise must not replace the default);
    winners go to ``directory`` (default: :func:`cache_dir`) unless ``save_results`` is False.
    """
    from . import device as devmod

    dev = devmod.get_device()
    caps = dev.caps
    preset = "quick" if quick else "cpu" if caps.type == "cpu" else "gpu"
    limit = MAX_CANDIDATES[preset] if max_candidates is None else max_candidates
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
