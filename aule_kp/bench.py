"""``aule-kp bench``: times the real calls over a shape table, beside torch SDPA and aule-attention.

Prints a table and, with ``--markdown FILE``, appends it with the machine, driver, date and command,
ready for BENCHMARKS.md; with ``--plots DIR`` writes the table as markdown and JSON plus PNG plots
(see :mod:`aule_kp.plots`). Every figure is a median over repeated calls after a warm-up.

Presets: ``cpu`` and ``gpu`` (the engine's bars) and real model shapes (``llama3-8b``, ``llama3-70b``,
``sdxl``, ``flux``). Rows (``--backends``, default every available aule-kp backend; ``--vs`` adds the
baselines): aule-kp ``vulkan`` and ``cpu`` on NumPy inputs (host copies included) and Vulkan's zero-copy
``Context`` path on GPU-sized shapes; aule-kp ``triton`` on torch tensors already on the CUDA/ROCm device
(CUDA-synchronised; a skipped row says why where it cannot run); ``torch`` SDPA (CUDA flash and cuDNN on
GPU-sized shapes, else CPU) and ``aule-attention`` 0.5.0. Every row that returns an output is checked
against float64 on a sample of rows; TFLOPS count the visible (query, key) pairs (halved for causal).

``--scale F`` divides every sequence length by F (down to 16, decode's Lq=1 kept) so that the model
presets can be smoke-run on a CPU device such as lavapipe.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass, replace
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .call import attention_forward
from .dtypes import from_f32
from .knobs import COOPMAT_CONVERT_ENV
from .problem import Problem, band

log = logging.getLogger("aule_kp")


@dataclass(frozen=True)
class Case:
    """One attention shape: batch, query heads, query/key lengths, head dim, dtype, mask (hkv: GQA key heads)."""

    b: int
    h: int
    lq: int
    lk: int
    d: int
    dtype: str
    causal: bool
    hkv: Optional[int] = None

    def problem(self) -> Problem:
        diag, left, right = band(self.lq, self.lk, causal=self.causal, window=None, top_left=False)
        return Problem(self.b, self.h, self.hkv or self.h, self.lq, self.lk, self.d, self.d, self.dtype,
                       1 / math.sqrt(self.d), diag, left, right)

    def label(self) -> str:
        kv = f"/{self.hkv}" if self.hkv else ""
        causal = " causal" if self.causal else ""
        return f"B{self.b} H{self.h}{kv} Lq{self.lq} Lk{self.lk} D{self.d} {self.dtype}{causal}"

    def inputs(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        hkv = self.hkv or self.h
        shapes = [(self.b, self.h, self.lq, self.d), (self.b, hkv, self.lk, self.d), (self.b, hkv, self.lk, self.d)]
        return [from_f32(rng.standard_normal(s, dtype=np.float32), self.dtype) for s in shapes]


PRESETS: Dict[str, List[Case]] = {
    # CPU machines (lavapipe): the bars of the engine issue.
    "cpu": [
        Case(1, 8, 512, 512, 64, "float32", False),
        Case(1, 16, 2048, 2048, 64, "float32", False),
        Case(1, 16, 2048, 2048, 64, "float32", True),
        Case(1, 1, 16384, 16384, 64, "float32", True),
    ],
    # A real GPU: the shapes the project's anchors were measured on (NVIDIA H200, 2026-11-22; fp16 B1 H32
    # D128 S8192: torch SDPA flash 357/321 TFLOPS non-causal/causal, cuDNN 652/587; the design notes that
    # record them are not in this repository), and neighbours.
    "gpu": [
        Case(1, 32, 8192, 8192, 128, "float16", False),
        Case(1, 32, 8192, 8192, 128, "float16", True),
        Case(1, 32, 2048, 2048, 64, "float16", False),
        Case(1, 32, 4096, 4096, 64, "float16", False),
        Case(1, 32, 8192, 8192, 64, "float16", False),
        Case(1, 32, 16384, 16384, 64, "float16", True),
        Case(1, 32, 1, 32768, 128, "float16", False, hkv=8),
        # aule-attention 0.5.0's Vulkan path takes only fp32 and D <= 64: the shape it is compared on.
        Case(1, 32, 8192, 8192, 64, "float32", False),
    ],
}


def _llama(hq: int, hkv: int) -> List[Case]:
    """Llama-3 attention (D128, GQA): causal prefill at S 2048/4096/8192 and decode (Lq=1) at Lk 8K/32K."""
    prefill = [Case(1, hq, s, s, 128, "float16", True, hkv=hkv) for s in (2048, 4096, 8192)]
    # One new token sees the whole cache: causal (bottom-right) and non-causal are the same mask.
    decode = [Case(1, hq, 1, lk, 128, "float16", False, hkv=hkv) for lk in (8192, 32768)]
    return prefill + decode


# Real model shapes, fp16, batch 1 (SDXL: batch 2, the two halves of classifier-free guidance).
PRESETS.update({
    "llama3-8b": _llama(32, 8),
    "llama3-70b": _llama(64, 8),
    # SDXL's UNet at 1024x1024 (latent 128x128): 10 heads at 64x64 = 4096 tokens, 20 heads at 32x32 =
    # 1024 tokens, D64; self-attention (non-causal) and cross-attention to the 77 text tokens.
    "sdxl": [
        Case(2, 10, 4096, 4096, 64, "float16", False),
        Case(2, 20, 1024, 1024, 64, "float16", False),
        Case(2, 10, 4096, 77, 64, "float16", False),
        Case(2, 20, 1024, 77, 64, "float16", False),
    ],
    # Flux at 1024x1024: 4096 image tokens, and 4096 + 512 text tokens in the joint blocks; 24 heads, D128.
    "flux": [
        Case(1, 24, 4096, 4096, 128, "float16", False),
        Case(1, 24, 4608, 4608, 128, "float16", False),
    ],
})

#: The row of fp32/bf16 data run by the fp16 cooperative-matrix kernel (an opt-in).
GPU_TENSOR_CONVERT_ROW = "aule-kp vulkan GpuTensor, converted to fp16"

#: Presets sized for a real GPU: the CPU backend is skipped there and torch SDPA runs on CUDA.
GPU_PRESETS = ("gpu", "llama3-8b", "llama3-70b", "sdxl", "flux")


def _scale_len(n: int, scale: float) -> int:
    """``n / scale`` rounded, at least 16 (a length already below 16, e.g. decode's Lq=1, is kept)."""
    return n if n <= 16 else max(16, int(round(n / scale)))


def scale_cases(cases: List[Case], scale: float) -> List[Case]:
    """Divide the sequence lengths of ``cases`` by ``scale`` (min 16); shapes that coincide are kept once."""
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if scale == 1:
        return list(cases)
    out: List[Case] = []
    for c in cases:
        s = replace(c, lq=_scale_len(c.lq, scale), lk=_scale_len(c.lk, scale))
        if s not in out:
            out.append(s)
    return out


#: GPU rows (GpuTensor, Triton, torch on CUDA) call for this long before timing: a GPU that idled
#: while the host moved data (the NumPy row before them) runs at low clocks for a while, and a few
#: repeats of a short call are then timed at those (H200, decode Lk 32768, 10 repeats: 0.12 ms
#: after the NumPy row, 0.07 ms warmed up).
GPU_WARMUP_S = 0.2


def median_time(fn: Callable[[], Any], repeat: int, warmup: int = 1, sync: Callable[[], None] = lambda: None,
                warmup_s: float = 0.0) -> float:
    """Median wall time of ``fn`` in seconds over ``repeat`` calls after ``warmup`` calls and then
    ``warmup_s`` seconds of calls (``sync`` after each)."""
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    while time.perf_counter() - start < warmup_s:
        fn()
        sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _row(case: Case, who: str, seconds: Optional[float], err: Optional[float] = None,
         mem: Optional[float] = None, note: str = "") -> Dict[str, Any]:
    flops = case.problem().flops()
    return {"case": case.label(), "backend": who, "ms": None if seconds is None else seconds * 1e3,
            "tflops": None if not seconds else flops / seconds / 1e12, "max_err": err, "peak_mb": mem, "note": note}


def _max_err(out: np.ndarray, case: Case, q, k, v) -> Optional[float]:
    """Max abs error vs float64, checked on at most 64 query rows of head 0 (keeps the check cheap)."""
    p = case.problem()
    rows = np.linspace(0, case.lq - 1, min(64, case.lq)).astype(int)
    from .dtypes import to_f32

    qf = to_f32(q, case.dtype)[0, 0, rows].astype(np.float64)
    kf = to_f32(k, case.dtype)[0, 0].astype(np.float64)
    vf = to_f32(v, case.dtype)[0, 0].astype(np.float64)
    s = qf @ kf.T * p.scale
    s = np.where(p.visible(rows, np.arange(case.lk)), s, -np.inf)
    m = s.max(axis=1, keepdims=True)
    e = np.exp(s - np.where(np.isfinite(m), m, 0))
    ref = e @ vf / np.maximum(e.sum(axis=1, keepdims=True), 1e-300)
    return float(np.abs(to_f32(out, case.dtype)[0, 0, rows] - ref).max())


def bench_ours(case: Case, backend: str, repeat: int) -> Dict[str, Any]:
    """Time ``attention_forward`` on NumPy inputs (host copies included), with its peak host memory and error."""
    q, k, v = case.inputs()
    call = lambda: attention_forward(q, k, v, causal=case.causal, backend=backend)  # noqa: E731
    out, _, _ = call()
    tracemalloc.start()
    call()
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    seconds = median_time(call, repeat, warmup=0)
    note = ""
    if backend == "vulkan":
        from .vulkan.backend import VulkanBackend

        note = VulkanBackend().config(case.problem()).variant
    return _row(case, f"aule-kp {backend}", seconds, _max_err(out, case, q, k, v), peak, note)


def bench_gpu_tensor(case: Case, repeat: int, convert: bool = False) -> Dict[str, Any]:
    """The zero-copy path: data already on the device, one recorded dispatch per call. ``convert``:
    fp32/bf16 data runs the cooperative-matrix kernel, rounded to fp16 as it is loaded
    (``AULE_KP_COOPMAT_CONVERT=1``, the opt-in the row's name says)."""
    from .vulkan.tensor import Context

    q, k, v = case.inputs()
    saved = os.environ.get(COOPMAT_CONVERT_ENV)
    if convert:
        os.environ[COOPMAT_CONVERT_ENV] = "1"
    try:
        with Context() as ctx:
            dt = "bfloat16" if case.dtype == "bfloat16" else np.dtype(case.dtype)
            qt, kt, vt = (ctx.tensor(a.shape, dt).upload(a) for a in (q, k, v))
            out = ctx.attention(qt, kt, vt, causal=case.causal)
            seconds = median_time(lambda: ctx.attention(qt, kt, vt, out, causal=case.causal), repeat,
                                  warmup_s=GPU_WARMUP_S)
            err = _max_err(out.download(), case, q, k, v)
    finally:
        if saved is None:
            os.environ.pop(COOPMAT_CONVERT_ENV, None)
        else:
            os.environ[COOPMAT_CONVERT_ENV] = saved
    return _row(case, GPU_TENSOR_CONVERT_ROW if convert else "aule-kp vulkan GpuTensor", seconds, err)


def _torch_on(device: str) -> Tuple[Any, List[str]]:
    """``(torch, [])`` when torch can run on ``device`` ("cpu" or "cuda", ROCm included), else ``(None, reasons)``."""
    try:
        import torch
    except ImportError:
        return None, ["torch is not installed"]
    if device == "cuda" and not torch.cuda.is_available():
        return None, [f"torch {torch.__version__} sees no CUDA/ROCm device"]
    return torch, []


def _skipped(case: Case, who: str, reasons: List[str]) -> Dict[str, Any]:
    """A row with no figures that says why ``who`` did not run on ``case``."""
    return _row(case, who, None, note="skipped: " + "; ".join(reasons))


def bench_torch_call(case: Case, who: str, device: str, repeat: int,
                     make_call: Callable[[Any, Any, Any], Callable[[], Any]],
                     within: Callable[[], ContextManager[Any]] = contextlib.nullcontext) -> Dict[str, Any]:
    """Time ``make_call(q, k, v)()`` on the case's inputs as torch tensors already on ``device`` (each call
    synchronised with ``torch.cuda.synchronize`` there), inside ``within()``; max error against the same
    float64 reference as every row. The path shared by the torch SDPA rows and the aule-kp Triton row: a
    ``RuntimeError`` (a kernel refusing the shape) gives a "not run" row, a missing torch/device a skipped one."""
    torch, why = _torch_on(device)
    if torch is None:
        return _skipped(case, who, why)
    host = case.inputs()
    q, k, v = (torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if case.dtype == "bfloat16"
               else torch.from_numpy(a) for a in host)
    call = make_call(q.to(device), k.to(device), v.to(device))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with within():
        try:
            out = call()
            seconds = median_time(call, repeat, sync=sync, warmup_s=GPU_WARMUP_S if device == "cuda" else 0.0)
        except RuntimeError as exc:
            return _row(case, who, None, note=f"not run: {exc}"[:80])
    # _max_err reads head 0 of batch 0 only: copy just that slice to the host.
    err = _max_err(from_f32(out[:1, :1].float().cpu().numpy(), case.dtype), case, *host)
    return _row(case, who, seconds, err)


def bench_torch(case: Case, repeat: int, device: str, sdpa_backend: Optional[str] = None) -> Dict[str, Any]:
    """Time torch's ``scaled_dot_product_attention`` on ``device`` (``sdpa_backend``: an ``SDPBackend`` name
    to pin, e.g. ``"FLASH_ATTENTION"``); a skipped row when torch or the device is missing."""
    who = f"torch SDPA {device} {(sdpa_backend or '').lower()}".strip()
    gqa = bool(case.hkv and case.hkv != case.h)
    # torch's causal is top-left; with Lq == Lk it is the same mask as ours.
    causal = case.causal and case.lq == case.lk

    def make_call(q: Any, k: Any, v: Any) -> Callable[[], Any]:
        import torch.nn.functional as F

        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    def within() -> ContextManager[Any]:
        if not sdpa_backend:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(getattr(SDPBackend, sdpa_backend))

    return bench_torch_call(case, who, device, repeat, make_call, within)


#: The backend name of the aule-kp Triton row.
TRITON_ROW = "aule-kp triton"


def triton_skip_reasons(case: Case, device: str = "cuda") -> List[str]:
    """Why the Triton row cannot time ``case`` on torch tensors on ``device`` here (empty: it can): a
    missing package, no CUDA/ROCm device, Triton's CPU interpreter switched on for CUDA tensors, or what
    the Triton backend itself refuses (see :meth:`aule_kp.triton.backend.TritonBackend.reasons`)."""
    from . import dispatch
    from .triton.interpreter import interpreting

    backend = dispatch.get("triton")
    why = backend.unavailable_reasons()
    if why:
        return why
    torch, why = _torch_on(device)
    if torch is None:
        return why
    if device == "cuda" and interpreting():
        why.append("TRITON_INTERPRET=1 runs Triton's CPU interpreter: its timings would mean nothing")
    return why + backend.problem_reasons(replace(case.problem(), device=device))


def bench_triton(case: Case, repeat: int, device: str = "cuda") -> Dict[str, Any]:
    """aule-kp's Triton backend forward (``flash_attention(..., backend="triton")``) on torch tensors already
    on ``device``, timed and checked like the torch SDPA rows (:func:`bench_torch_call`); a skipped row with
    the reasons when it cannot run here. ``device="cpu"`` runs only under ``TRITON_INTERPRET=1`` (tests)."""
    why = triton_skip_reasons(case, device)
    if why:
        return _skipped(case, TRITON_ROW, why)
    from .api import flash_attention

    def make_call(q: Any, k: Any, v: Any) -> Callable[[], Any]:
        return lambda: flash_attention(q, k, v, causal=case.causal, backend="triton")

    return bench_torch_call(case, TRITON_ROW, device, repeat, make_call)


_AULE_SCRIPT = """
import json, statistics, sys, time, numpy as np
from aule.vulkan import Aule
b, h, s, d, causal, repeat = json.loads(sys.argv[1])
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((b, h, s, d), dtype=np.float32) for _ in range(3))
a = Aule()
a.attention(q, k, v, causal=causal)
ts = []
for _ in range(repeat):
    t0 = time.perf_counter(); a.attention(q, k, v, causal=causal); ts.append(time.perf_counter() - t0)
print(json.dumps(statistics.median(ts)))
"""


def bench_aule_attention(case: Case, repeat: int) -> Optional[Dict[str, Any]]:
    """aule-attention 0.5.0's Vulkan path (fp32, Lq == Lk, D <= 64), in a subprocess: it can crash."""
    try:
        import importlib.util

        if importlib.util.find_spec("aule") is None:
            return None
    except ImportError:
        return None
    if case.lq != case.lk or case.d > 64 or case.hkv:
        return None
    args = json.dumps([case.b, case.h, case.lq, case.d, case.causal, repeat])
    done = subprocess.run([sys.executable, "-c", _AULE_SCRIPT, args], capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        return _row(case, "aule-attention 0.5.0 vulkan", None, note=f"failed (exit {done.returncode})")
    return _row(case, "aule-attention 0.5.0 vulkan", float(done.stdout.strip().splitlines()[-1]), note="fp32")


def gpu_seconds(plan: Any, repeat: int = 200, warmup_s: float = 0.5) -> float:
    """Median GPU time of a plan's dispatches alone, from timestamps around them (data already there).

    Runs them for ``warmup_s`` first: a GPU that idled while the host prepared inputs runs at low
    clocks for a while (on the H200 a first 8K-token forward measured 3-4x its settled time)."""
    dev = plan.device
    with dev.lock:
        timed = plan.record(dev.manager.sequence(0, 64), transfers=False)
        start = time.perf_counter()
        while time.perf_counter() - start < warmup_s:
            timed.eval()
        ticks = []
        for _ in range(repeat):
            timed.eval()
            stamps = timed.get_timestamps()
            ticks.append(stamps[-1] - stamps[0])
        timed.destroy()
    # timestampPeriod is 1 ns on lavapipe and NVIDIA; the probe does not report it yet.
    return statistics.median(ticks) * 1e-9


def tiny_call_overhead(repeat: int = 2000, path: str = "numpy") -> List[Dict[str, Any]]:
    """Host overhead of a repeated call with a cached plan at a tiny shape, in parts: the Python
    path (the call with the plan's eval stubbed out), and kp's submit + fence wait (the eval minus
    the kernel's own time, read from GPU timestamps around the same dispatch). ``path``: "numpy"
    (``attention_forward`` on host arrays; bar 0.150 ms) or "gputensor" (``Context.attention`` with
    ``out=`` on device tensors; bar 0.060 ms end to end). The rows carry ``"breakdown": True`` and no TFLOPS."""
    from .vulkan import device as devmod
    from .vulkan.backend import VulkanBackend

    dev = devmod.get_device()
    if path == "numpy":
        case = Case(1, 1, 16, 16, 32, "float32", False)
        q, k, v = case.inputs()
        call = lambda: attention_forward(q, k, v, backend="vulkan")  # noqa: E731
        call()
        plan = VulkanBackend().plan(case.problem())
        label, bars = "aule-kp vulkan", ("", "; bar <= 0.150 ms")
    else:
        from .vulkan.tensor import Context

        case = Case(1, 1, 16, 16, 32, "float16", False)
        ctx = Context()
        tq, tk, tv = (ctx.tensor(x.shape, np.float16).upload(x) for x in case.inputs())
        out = ctx.tensor(tq.shape, np.float16)
        call = lambda: ctx.attention(tq, tk, tv, out=out)  # noqa: E731
        call()
        plan = dev.plans.get(*next(iter(ctx._calls.values())))
        label, bars = "aule-kp vulkan GpuTensor", ("; bar <= 0.060 ms end to end", "")
    full = median_time(call, repeat, warmup=20)
    evaluate = median_time(plan.eval, repeat, warmup=20)
    kernel = gpu_seconds(plan)
    plan.eval = lambda: None  # type: ignore[method-assign]
    try:
        python = median_time(call, repeat, warmup=20)
    finally:
        del plan.eval
    host = python + max(0.0, evaluate - kernel)
    parts = [_row(case, f"{label}, whole call", full, note="cached plan" + bars[0]),
             _row(case, "kp Sequence.eval()", evaluate, note="submit + kernel + fence"),
             _row(case, "kernel (GPU timestamps)", kernel, note="same dispatch"),
             _row(case, "Python path (eval stubbed)", python, note="validate, dispatch, copies"),
             _row(case, "host overhead", host, note="Python + eval - kernel" + bars[1])]
    # Parts of one tiny call, not attention throughput: no TFLOPS, and plotted apart (plots.write_plots).
    return [dict(r, tflops=None, breakdown=True) for r in parts]


def machine(command: Optional[str] = None) -> Dict[str, str]:
    """The machine, device, driver, versions, date and command line (default: this process's), for the record."""
    from .info import info

    i = info()
    dev = next((d for d in i["devices"] if d["index"] == i["selected_device"]), {})
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "date": datetime.date.today().isoformat(),
        "host": f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs ({cpu})",
        "device": f"{dev.get('name', 'none')} ({dev.get('type', '?')}), driver {dev.get('driver_info', '?')}",
        "kp": f"{i['kp'].get('version')} patched={i['kp'].get('patched')}",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "command": command or " ".join(["aule-kp", *sys.argv[1:]]),
    }


def format_table(rows: List[Dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    def fmt(x: Any, spec: str) -> str:
        return "—" if x is None else format(x, spec)

    lines = ["| case | backend | ms | TFLOPS | GFLOP/s | max err | peak host MB | note |", "|---" * 8 + "|"]
    for r in rows:
        gf = None if r["tflops"] is None else r["tflops"] * 1e3
        lines.append(f"| {r['case']} | {r['backend']} | {fmt(r['ms'], '.3f')} | {fmt(r['tflops'], '.3f')} | "
                     f"{fmt(gf, '.2f')} | {fmt(r['max_err'], '.1e')} | {fmt(r['peak_mb'], '.1f')} | {r['note']} |")
    return "\n".join(lines)


def _guarded(fn: Callable[[], Optional[Dict[str, Any]]], case: Case, who: str) -> Optional[Dict[str, Any]]:
    """Run one timing; a failure becomes a row with no figures and the reason as its note."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - one failed shape must not lose the rest of the table
        log.warning("bench: %s on %s failed: %s", who, case.label(), exc)
        return _row(case, who, None, note=f"failed: {exc}"[:80])


def _progress(cases: List[Case]) -> Any:
    """A tqdm progress bar over ``cases`` on stderr, or the plain list when tqdm is not installed."""
    try:
        from tqdm import tqdm
    except ImportError:
        return cases
    return tqdm(cases, desc="bench", unit="shape", file=sys.stderr)


#: ``--backends`` names: aule-kp's backends, then the baselines (``--vs`` adds those).
OUR_BACKENDS = ("vulkan", "triton", "cpu")
BASELINE_BACKENDS = ("torch", "aule-attention")


def select_backends(spec: Optional[str], available: Sequence[str]) -> List[str]:
    """The rows a ``--backends`` value asks for, in its order: a comma list of :data:`OUR_BACKENDS` and
    :data:`BASELINE_BACKENDS` names. Empty or None: every aule-kp backend in ``available`` (the baselines
    come with ``--vs``). Raises ValueError naming what is not a known row."""
    if not spec:
        return [b for b in OUR_BACKENDS if b in available]
    names = [n.strip() for n in spec.split(",")]
    known = OUR_BACKENDS + BASELINE_BACKENDS
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown backend(s) {', '.join(map(repr, unknown))} in --backends; "
                         f"choose from {','.join(known)}")
    return list(dict.fromkeys(names))


Timing = Callable[[], Optional[Dict[str, Any]]]


def plan_rows(case: Case, preset: str, backends: Sequence[str], repeat: int,
              scale: float = 1.0) -> List[Tuple[str, Timing]]:
    """The rows ``run`` times for ``case`` as ``(name, timing)`` pairs in table order, for the selected
    ``backends`` (names as :func:`select_backends`): aule-kp on NumPy inputs, the Vulkan zero-copy path and
    the Triton row (torch tensors on the CUDA/ROCm device, or a skipped row saying why), then torch SDPA
    and aule-attention 0.5.0. Shapes too big for a CPU device, or the CPU backend on GPU-sized shapes,
    are left out."""
    # GPU-sized shapes: the CPU backend is no contender there, and the baselines are CUDA's SDPA kernels.
    gpu_sized = preset in GPU_PRESETS and scale == 1
    plan: List[Tuple[str, Timing]] = []
    for be in backends:
        if be not in ("vulkan", "cpu") or (gpu_sized and be == "cpu"):
            continue
        if preset == "cpu" and be == "vulkan" and case.lq > 512:
            continue  # lavapipe at S >= 2048 takes minutes per call; the bar shape is S=512
        plan.append((f"aule-kp {be}", functools.partial(bench_ours, case, be, repeat)))
    if gpu_sized and "vulkan" in backends:
        plan.append(("aule-kp vulkan GpuTensor", functools.partial(bench_gpu_tensor, case, repeat)))
        if case.dtype != "float16":
            plan.append((GPU_TENSOR_CONVERT_ROW, functools.partial(bench_gpu_tensor, case, repeat, True)))
    if "triton" in backends:
        plan.append((TRITON_ROW, functools.partial(bench_triton, case, repeat)))
    if "torch" in backends:
        if gpu_sized:
            for sdpa in ("FLASH_ATTENTION", "CUDNN_ATTENTION"):
                timing = functools.partial(bench_torch, case, repeat, "cuda", sdpa)
                plan.append((f"torch SDPA cuda {sdpa.lower()}", timing))
        elif case.lq <= 2048:
            plan.append(("torch SDPA cpu", functools.partial(bench_torch, case, repeat, "cpu")))
    # aule-attention runs at ~0.1 GFLOP/s on lavapipe: only the bar shape there.
    if "aule-attention" in backends and case.lq <= (8192 if gpu_sized else 512):
        few = max(1, min(repeat, 3))
        plan.append(("aule-attention 0.5.0 vulkan", functools.partial(bench_aule_attention, case, few)))
    return plan


def run(preset: str, vs: bool, repeat: int, markdown: Optional[str], backends: Sequence[str],
        scale: float = 1.0, plots: Optional[str] = None, command: Optional[str] = None) -> List[Dict[str, Any]]:
    """Time the preset's cases (lengths divided by ``scale``) on ``backends`` (names as
    :func:`select_backends`; ``vs`` adds the baselines); append the table to ``markdown`` and write
    table, JSON and PNGs to ``plots`` when given. ``command`` is the command line recorded beside the
    table. Returns the rows; printing the table is the caller's business."""
    selected = list(backends) + [b for b in BASELINE_BACKENDS if vs and b not in backends]
    rows: List[Dict[str, Any]] = []
    cases = scale_cases(PRESETS[preset], scale)
    steps = _progress(cases)
    for case in steps:
        if hasattr(steps, "set_postfix_str"):
            steps.set_postfix_str(case.label())
        for who, timing in plan_rows(case, preset, selected, repeat, scale):
            row = _guarded(timing, case, who)
            if row:
                rows.append(row)
    if hasattr(steps, "close"):
        steps.close()
    if preset in ("cpu", "gpu") and "vulkan" in selected:
        rows += tiny_call_overhead(path="numpy") + tiny_call_overhead(path="gputensor")
    table = format_table(rows)
    title = f"`{preset}` preset" + (f", lengths / {scale:g}" if scale != 1 else "")
    if markdown or plots:
        from .plots import format_speedups, write_results

        m = machine(command)
        head = "\n".join(f"- {k}: {v}" for k, v in m.items())
        text = f"### {title}, {m['date']}\n\n{head}\n\n{table}\n{format_speedups(rows)}"
        if markdown:
            with open(markdown, "a") as f:
                f.write(f"\n{text}")
        if plots:
            write_results(plots, rows, {"preset": preset, "scale": scale, "repeat": repeat, **m}, text)
    return rows
