"""A self-check on drivers we cannot test: canary problems against a float64 reference.

The first time a kernel family (``KernelConfig.family``: ``fwd.scalar``, ``fwd.wave64``,
``fwd.coopmat``, ``splitkv``, ``bwd.scalar``, ``bwd.coopmat``) is chosen for a dtype on a device and
driver, :func:`ensure` runs its canaries: a few tiny problems (causal, a float mask with hidden keys,
GQA, head dims 64 and 128, Lq = 1 and 2 through split-KV, one backward with the mask's gradient),
each through the real pipelines of that family, compared with a float64 NumPy reference within an
error model (:func:`tolerance`). The verdict is cached beside the tuning cache
(``selfcheck-<device uuid>-<driver version>.json`` in ``tuning_cache.cache_dir()``), so each driver version
pays once; a verdict also records a digest of the family's SPIR-V and the aule-kp version, and a new
build checks again.

A family that gives a wrong result, or whose pipeline fails to build, is turned off on that driver
(``choice.disabled_reasons``): one ``warnings.warn`` per process names it, and ``auto`` takes the
next variant (split-KV -> the forward kernel, coopmat -> scalar, scalar -> Wave64, ...).
``AULE_KP_SELF_CHECK=0`` turns the automatic check off; verdicts already recorded still apply
(``aule-kp doctor --clear`` forgets them). ``aule-kp doctor`` runs every check now (:func:`run_checks`).
"""

from __future__ import annotations

import datetime
import logging
import math
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import knobs
from ..dtypes import from_f32, to_f32
from ..problem import DTYPES, Problem, band
from . import tuning_cache
from .build import FAMILY_KERNELS, build_id
from .probe import DeviceCaps

log = logging.getLogger("aule_kp")

FORMAT = 1
SECTION = "verdicts"
#: stats["runs"]: families checked in this process; stats["canaries"]: canary problems run.
stats: Dict[str, int] = {"runs": 0, "canaries": 0}

_memo: Dict[str, Dict[str, Any]] = {}
_paths: Dict[Tuple[Any, ...], Path] = {}
# (device, family, dtype, cache location) -> the recorded verdict of this build or None: the choice
# asks several times per call (a backward call six), so each answer costs one dict lookup.
_entries: Dict[Tuple[Any, ...], Optional[Dict[str, Any]]] = {}
_warned: set = set()
_lock = threading.RLock()
_active: set = set()  # (device key, family, dtype) being checked: a canary's own choices skip it


def enabled() -> bool:
    """Whether :func:`ensure` runs checks (``AULE_KP_SELF_CHECK=0`` turns that off)."""
    return knobs.current().self_check


# ---- the verdicts file --------------------------------------------------------------------------

def cache_path(caps: DeviceCaps, directory: Optional[str] = None) -> Path:
    """The verdicts of this device and driver, beside its tuning cache."""
    return tuning_cache.cache_dir(directory) / f"selfcheck-{tuning_cache.device_key(caps)}.json"


def _path(caps: DeviceCaps) -> Path:
    where = (*tuning_cache.location_key(), caps.uuid, caps.driver_version, caps.name)
    path = _paths.get(where)
    if path is None:
        path = _paths[where] = cache_path(caps)
    return path


def load(caps: DeviceCaps) -> Dict[str, Any]:
    """This device's recorded verdicts by ``<family>/<dtype>`` (read once per process and path)."""
    path = _path(caps)
    with _lock:
        if str(path) not in _memo:
            _memo[str(path)] = tuning_cache.read_cache_file(path, caps, SECTION, "self-check verdicts", FORMAT)
        return _memo[str(path)]


def _save(caps: DeviceCaps, verdicts: Sequence[Verdict], directory: Optional[str] = None) -> Path:
    path = cache_path(caps, directory)
    with _lock:
        merged = dict(tuning_cache.read_cache_file(path, caps, SECTION, "self-check verdicts", FORMAT))
        merged.update({f"{v.family}/{v.dtype}": v.record() for v in verdicts})
        tuning_cache.write_cache_file(path, caps, SECTION, merged, FORMAT)
        _memo.pop(str(path), None)
        _entries.clear()
    tuning_cache.changed()  # memoised choices made before the new verdicts no longer hold
    return path


def clear(caps: DeviceCaps, directory: Optional[str] = None) -> bool:
    """Deletes this device's verdicts; True when there were some."""
    path = cache_path(caps, directory)
    with _lock:
        _memo.pop(str(path), None)
        _entries.clear()
        _warned.difference_update({w for w in _warned if w[0] == str(path)})
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        finally:
            tuning_cache.changed()
    return True


def _entry(family: str, caps: DeviceCaps, dtype: str) -> Optional[Dict[str, Any]]:
    """The recorded verdict of ``family`` for ``dtype`` on this build, or None."""
    key = (caps.uuid, caps.driver_version, caps.name, family, dtype, *tuning_cache.location_key())
    if key not in _entries:
        entry = load(caps).get(f"{family}/{dtype}")
        ok = isinstance(entry, dict) and entry.get("build") == build_id(family)
        with _lock:
            _entries[key] = entry if ok else None
    return _entries[key]


def _warn_once(caps: DeviceCaps, family: str, dtype: str, detail: str) -> None:
    key = (str(_path(caps)), family, dtype)
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(f"aule-kp: the {family} kernels gave wrong results for {dtype} on {caps.name} (driver "
                  f"{caps.driver_info or caps.driver_version_text()}) in the self-check ({detail}); they are "
                  f"turned off for this driver and the next kernel variant runs instead (`aule-kp doctor` "
                  f"re-checks)", RuntimeWarning, stacklevel=3)


def known_reasons(family: str, caps: DeviceCaps, dtype: str, warn: bool = True) -> List[str]:
    """Why a recorded verdict turns ``family`` off for ``dtype`` on this device (empty: none does).
    Never runs a check; the first time a failed verdict is applied in a process it warns (``warn``)."""
    return _reasons(_entry(family, caps, dtype), family, caps, dtype, warn)


def _reasons(entry: Optional[Dict[str, Any]], family: str, caps: DeviceCaps, dtype: str, warn: bool) -> List[str]:
    if entry is None or entry.get("ok") is not False:
        return []
    detail = str(entry.get("detail", ""))
    if warn:
        _warn_once(caps, family, dtype, detail)
    return [f"turned off by the self-check on this driver ({detail}); `aule-kp doctor` re-checks"]


def _device_of(caps: DeviceCaps) -> Any:
    """The Device these capabilities were probed from (also after ``workarounds.effective``), or
    None for made-up capabilities or when Vulkan cannot run."""
    from . import device as devmod
    from . import workarounds

    if devmod.vulkan_unavailable():
        return None
    for real in devmod.devices():
        if caps == real or caps == workarounds.effective(real):
            return devmod.get_device(real.index)
    return None


#: ``configure(family, caps, problem, n_split) -> (pipelines, reasons they cannot run it)``: the
#: pipelines of one kernel family for a canary, from the kernel choice (``choice.canary_config``),
#: which passes itself in so that this module never imports the choice that consults it.
Configure = Callable[[str, DeviceCaps, Problem, int], Tuple[Any, List[str]]]


def ensure(family: str, caps: DeviceCaps, dtype: str, configure: Configure) -> List[str]:
    """Why ``family`` must not run ``dtype`` here (empty: it may): a recorded failed verdict, or the
    result of its canaries (pipelines from ``configure``), run now when nothing is recorded for this
    build, the self-check is on (:func:`enabled`) and ``caps`` describe a real device. A failure warns
    once and is recorded."""
    entry = _entry(family, caps, dtype)
    if entry is not None or not enabled():
        return _reasons(entry, family, caps, dtype, True)
    device = _device_of(caps)
    if device is None:
        return []
    key = (str(_path(caps)), family, dtype)
    with device.lock, _lock:  # the device's lock first, as every other caller that takes both
        if key in _active or _entry(family, caps, dtype) is not None:
            return known_reasons(family, caps, dtype)
        _active.add(key)
        try:
            verdict = check(family, dtype, device, configure)
        finally:
            _active.discard(key)
        _save(device.caps, [verdict])
    log.info("aule-kp self-check: %s", verdict.summary())
    return known_reasons(family, caps, dtype)


# ---- canaries -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Canary:
    """One small problem: ``mask`` gives the shape of a float mask (with hidden keys), ``n_split``
    the splits of a split-KV run, ``backward`` a backward pass with the mask's gradient."""

    name: str
    b: int
    hq: int
    hkv: int
    lq: int
    lk: int
    d: int
    causal: bool = False
    mask: Optional[Tuple[int, int, int, int]] = None
    n_split: int = 0
    backward: bool = False

    def problem(self, dtype: str) -> Problem:
        diag, left, right = band(self.lq, self.lk, causal=self.causal, window=None, top_left=False)
        return Problem(self.b, self.hq, self.hkv, self.lq, self.lk, self.d, self.d, dtype, 1 / math.sqrt(self.d),
                       diag, left, right, self.mask)


_FORWARD = (Canary("causal GQA D64", 1, 4, 2, 20, 37, 64, causal=True),
            Canary("float mask D64", 2, 2, 2, 16, 40, 64, mask=(2, 1, 16, 40)),
            Canary("GQA D128", 1, 2, 1, 33, 50, 128))
_SPLIT = (Canary("Lq1 GQA D64 split-KV", 1, 4, 1, 1, 600, 64, n_split=3),
          Canary("Lq2 causal mask D128 split-KV", 1, 2, 2, 2, 520, 128, causal=True, mask=(1, 2, 2, 520), n_split=2))
_BACKWARD = (Canary("backward causal GQA mask-grad D64", 1, 4, 2, 24, 40, 64, causal=True, mask=(1, 1, 24, 40),
                    backward=True),)
CANARIES = {"fwd.scalar": _FORWARD, "fwd.wave64": _FORWARD, "fwd.coopmat": _FORWARD, "fwd.coopmat2": _FORWARD,
            "splitkv": _SPLIT,
            "bwd.scalar": _BACKWARD, "bwd.coopmat": _BACKWARD}


def _inputs(canary: Canary, p: Problem, seed: int) -> Dict[str, np.ndarray]:
    """q, k, v (and dO) in storage dtype, standard normal; a float32 mask with ~15% hidden keys."""
    rng = np.random.default_rng(seed)

    def normal(*shape: int) -> np.ndarray:
        return from_f32(rng.standard_normal(shape, dtype=np.float32), p.dtype)

    out = {"q": normal(p.batch, p.heads_q, p.len_q, p.dim_k), "k": normal(p.batch, p.heads_kv, p.len_k, p.dim_k),
           "v": normal(p.batch, p.heads_kv, p.len_k, p.dim_v), "do": normal(p.batch, p.heads_q, p.len_q, p.dim_v)}
    if p.mask_shape is not None:
        m = rng.standard_normal(p.mask_shape).astype(np.float32)
        out["mask"] = np.where(rng.random(p.mask_shape) < 0.15, np.float32(-np.inf), m)
    return out


def reference(p: Problem, x: Dict[str, np.ndarray], out_used: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """Dense float64 attention of the storage-dtype inputs ``x`` (``q``, ``k``, ``v``, ``mask``), and
    with ``out_used`` (the O a backward pass is given) the FA2 backward of ``sum(O * dO)``: dS from
    D = rowsum(dO * out_used), as the kernels compute it. Also the magnitudes the error model needs:
    ``bound_s`` (largest sum of |q_d k_d| * scale) and, per output, the sum of absolute terms."""
    f = {n: to_f32(x[n], p.dtype).astype(np.float64) for n in ("q", "k", "v", "do")}
    k, v = (np.repeat(f[n], p.group, axis=1) for n in ("k", "v"))
    with np.errstate(all="ignore"):
        s = f["q"] @ k.swapaxes(-1, -2) * p.scale
        s = np.where(p.visible(np.arange(p.len_q), np.arange(p.len_k)), s, -np.inf)
        if "mask" in x:
            s = s + x["mask"].astype(np.float64)
        m = s.max(axis=-1, keepdims=True)
        hidden = m == -np.inf
        e = np.exp(s - np.where(hidden, 0.0, m))
        total = e.sum(axis=-1, keepdims=True)
        prob = np.where(hidden, 0.0, e / total)
        lse = np.where(hidden, -np.inf, m + np.log(total))[..., 0]
    r = {"o": prob @ v, "lse": lse, "bound_s": float((np.abs(f["q"]) @ np.abs(k).swapaxes(-1, -2)).max() * p.scale),
         "mag_o": np.full(1, np.abs(v).max(initial=0.0))}
    if out_used is None:
        return r
    do = f["do"]
    dp = do @ v.swapaxes(-1, -2)
    dvec = (do * to_f32(out_used, p.dtype).astype(np.float64)).sum(axis=-1, keepdims=True)
    ds = prob * (dp - dvec)
    mag_ds = prob * (np.abs(dp) + np.abs(dvec))
    per_group = (p.batch, p.heads_kv, p.group, p.len_k)

    def to_kv(a: np.ndarray, d: int) -> np.ndarray:
        return a.reshape(*per_group, d).sum(axis=2)

    q = f["q"]
    r.update(dq=ds @ k * p.scale, dk=to_kv(ds.swapaxes(-1, -2) @ q * p.scale, p.dim_k),
             dv=to_kv(prob.swapaxes(-1, -2) @ do, p.dim_v), ds=ds,
             mag_dq=mag_ds @ np.abs(k) * p.scale, mag_dk=to_kv(mag_ds.swapaxes(-1, -2) @ np.abs(q) * p.scale, p.dim_k),
             mag_dv=to_kv(prob.swapaxes(-1, -2) @ np.abs(do), p.dim_v), mag_ds=mag_ds)
    return r


#: Unit roundoff (half an ulp at 1) of each storage type.
UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
#: Headroom over the error model: its terms are random-walk estimates (sqrt of the reduction
#: length), not worst cases.
SAFETY = 8.0


def tolerance(family: str, p: Problem, bound_s: float, magnitude: float, stored: Optional[str] = None) -> float:
    """Largest acceptable |error| of one output element whose terms sum to ``magnitude`` in absolute
    value (|O| <= max|v|, and the sums of |terms| of each gradient, from :func:`reference`).

    Error model (u = unit roundoff): the output is rounded once to its storage type (u_out); scores
    are fp32 sums of Dk products, so each is off by ~u32 * sqrt(Dk) * bound_s, which moves P (and the
    log-sum-exp) relatively by that much; sums over Lk keys (forward) or Lq rows and Lk keys
    (backward) add ~u32 * sqrt(length); the cooperative-matrix kernels round P to fp16 (u16), and
    fp32/bf16 inputs too when they convert them (``AULE_KP_COOPMAT_CONVERT``), which moves scores by
    u16 * bound_s. ``SAFETY`` times the sum. ``stored``: the type the output is stored in (default
    the problem's; the log-sum-exp and dS are float32).
    """
    u32 = UNIT_ROUNDOFF["float32"]
    coop = family.endswith("coopmat")
    u_p = UNIT_ROUNDOFF["float16"] if coop else 0.0
    u_in = UNIT_ROUNDOFF["float16"] if coop and p.dtype != "float16" else 0.0
    lengths = math.sqrt(p.len_k) + (math.sqrt(p.len_q) if family.startswith("bwd") else 0.0)
    relative = (UNIT_ROUNDOFF[stored or p.dtype] + u_p + u_in * (1.0 + bound_s)
                + u32 * (lengths + math.sqrt(p.dim_k) * (1.0 + bound_s)))
    return SAFETY * relative * magnitude


def _compare(family: str, p: Problem, got: Dict[str, np.ndarray], want: Dict[str, np.ndarray]) -> Tuple[float, str]:
    """The largest error / tolerance over the outputs, and which output it was; inf when the
    kernel's non-finite values are not the reference's (a NaN, a hidden row that is not -inf)."""
    worst, where = 0.0, ""
    for name, g in got.items():
        w = want[name]
        fp32 = name in ("lse", "ds")  # float32 outputs; the others are in the problem's storage type
        gf = (g if fp32 else to_f32(g, p.dtype)).astype(np.float64)
        finite = np.isfinite(w)
        if gf.shape != w.shape or not np.array_equal(np.isfinite(gf), finite) or \
                not np.array_equal(gf[~finite], w[~finite]):
            return math.inf, f"{name}: non-finite values differ"
        magnitude = 1.0 if name == "lse" else np.broadcast_to(want[f"mag_{name}"], w.shape)
        tol = tolerance(family, p, want["bound_s"], 1.0, "float32" if fp32 else None) * np.broadcast_to(
            magnitude, w.shape)
        err = np.abs(gf - w)[finite]
        ratio = float((err / np.maximum(tol[finite], np.finfo(np.float64).tiny)).max(initial=0.0))
        if ratio > worst:
            worst, where = ratio, name
    return worst, where


def _run(family: str, canary: Canary, cfg: Any, device: Any, dtype: str, seed: int) -> Tuple[float, str]:
    from .backward import BackwardPlan
    from .plan import Plan

    p = canary.problem(dtype)
    x = _inputs(canary, p, seed)
    want = reference(p, x)
    with device.lock:
        if canary.backward:
            out = from_f32(want["o"].astype(np.float32), dtype)
            lse = want["lse"].astype(np.float32)
            want = reference(p, x, out)
            plan: Any = BackwardPlan(device, p, cfg)
            try:
                dq, dk, dv, ds = plan.run(x["q"], x["k"], x["v"], out, x["do"], lse, x.get("mask"))
            finally:
                plan.destroy()
            got = {"dq": dq, "dk": dk, "dv": dv, "ds": ds}
        else:
            plan = Plan(device, p, cfg)
            try:
                o, lse = plan.run(x["q"], x["k"], x["v"], x.get("mask"))
            finally:
                plan.destroy()
            got = {"o": o, "lse": lse}
    stats["canaries"] += 1
    return _compare(family, p, got, want)


@dataclass
class Verdict:
    """What the canaries of one kernel family and dtype said on this device and driver. ``ok`` is
    None when no canary applies here (e.g. coopmat on a device without it): nothing is turned off."""

    family: str
    dtype: str
    ok: Optional[bool]
    canaries: int
    worst: float  # largest error / tolerance (inf: a NaN or a failure)
    seconds: float
    detail: str
    build: str
    date: str = ""

    def record(self) -> Dict[str, Any]:
        out = asdict(self)
        out.pop("family")
        out.pop("dtype")
        out["worst"] = None if math.isinf(self.worst) else round(self.worst, 4)
        out["seconds"] = round(self.seconds, 3)
        return out

    def summary(self) -> str:
        state = {True: "ok", False: "WRONG", None: "n/a"}[self.ok]
        return f"{self.family} {self.dtype}: {state} ({self.canaries} canaries, {self.detail})"


def check(family: str, dtype: str, device: Any, configure: Configure) -> Verdict:
    """Runs the canaries of ``family`` for ``dtype`` on ``device`` now (nothing recorded), with the
    pipelines ``configure`` gives (``choice.canary_config``). Stops at
    the first wrong one; an exception (a pipeline the driver refuses, ...) is a wrong result."""
    caps = device.caps
    t0 = time.perf_counter()
    worst, detail, ran, ok = 0.0, "", 0, None
    stats["runs"] += 1
    for i, canary in enumerate(CANARIES[family]):
        p = canary.problem(dtype)
        try:
            cfg, why = configure(family, caps, p, canary.n_split)
            if why:
                detail = detail or f"{canary.name}: {why[0]}"
                continue
            ratio, where = _run(family, canary, cfg, device, dtype, seed=1000 + i)
        except Exception as exc:  # noqa: BLE001 - a driver failure is the verdict, not a crash
            worst, detail, ok = math.inf, f"{canary.name}: {type(exc).__name__}: {exc}"[:300], False
            break
        ran += 1
        if ratio > 1.0:
            worst, ok = ratio, False
            detail = f"{canary.name}: {where} off by {ratio:.3g}x the tolerance" if math.isfinite(ratio) \
                else f"{canary.name}: {where}"
            break
        if ratio >= worst:
            worst, detail, ok = ratio, f"worst {canary.name}: {where} at {ratio:.2f}x the tolerance", True
    if ran == 0 and ok is None:
        detail = f"no canary applies here ({detail})" if detail else "no canary applies here"
    return Verdict(family, dtype, ok, ran, worst, time.perf_counter() - t0, detail, build_id(family),
                   datetime.datetime.now().isoformat(timespec="seconds"))


def run_checks(families: Sequence[str], configure: Configure, dtypes: Optional[Sequence[str]] = None,
               device: Any = None, directory: Optional[str] = None,
               progress: Optional[Callable[[str, str], None]] = None) -> List[Verdict]:
    """Runs checks now, whatever is recorded (``aule-kp doctor``): each kernel family (the caller
    passes those the automatic choice may use, ``choice.candidate_families``) and dtype (default
    all) on ``device`` (default the selected one), with pipelines from ``configure``; records the
    verdicts (in ``directory``, default the cache dir). ``progress(family, dtype)`` is called before
    each check."""
    from . import device as devmod

    dev = device or devmod.get_device()
    verdicts = []
    for family in families:
        for dtype in dtypes or DTYPES:
            if progress is not None:
                progress(family, dtype)
            with dev.lock:
                verdicts.append(check(family, dtype, dev, configure))
    _save(dev.caps, [v for v in verdicts if v.ok is not None], directory)
    return verdicts


def verdicts_for(caps: DeviceCaps) -> Dict[str, Dict[str, Any]]:
    """The recorded verdicts of this build on this device, for ``aule_kp.info()`` (never runs one)."""
    entries = load(caps)
    return {key: entry for key, entry in sorted(entries.items())
            if isinstance(entry, dict) and entry.get("build") == build_id(key.split("/")[0])
            and key.split("/")[0] in FAMILY_KERNELS}


def format_table(verdicts: Sequence[Verdict]) -> str:
    """Verdicts as a markdown table."""
    lines = ["| kernel | dtype | verdict | canaries | worst error / tolerance | ms | detail |", "|---" * 7 + "|"]
    for v in verdicts:
        state = {True: "ok", False: "**WRONG**", None: "n/a"}[v.ok]
        worst = "—" if v.canaries == 0 else ("inf" if math.isinf(v.worst) else f"{v.worst:.3f}")
        lines.append(f"| {v.family} | {v.dtype} | {state} | {v.canaries} | {worst} | {v.seconds * 1e3:.0f} | "
                     f"{v.detail} |")
    return "\n".join(lines)

