"""Triton backend on a CUDA GPU: correctness against float64, speed against torch SDPA (flash, cuDNN).

    PYTHONPATH=$PWD python3 benchmarks/triton_gpu.py [--out DIR] [--workers 12] [--budget 420]

1. Correctness grid (every feature: causal both alignments, windows, GQA/MQA, decode with packed
   heads and split-KV, Lq != Lk, Dv != Dk, head dims 96..256, float masks with their gradient, fully
   hidden rows, fp16/bf16/fp32), forward and backward against a float64 autograd reference on the
   GPU. The cases run in a pool of processes: Triton compiles each kernel variant and autotune config
   on the CPU, and compiling them in parallel fills the shared on-disk cache, so the timing phase
   below only loads binaries. Cases at 1024+ tokens go through the autotuned path, which also
   compiles every config the benchmark will tune over.
2. Speed, in this process alone: forward at the issue's bar shapes (fp16/bf16, D64/D128,
   S = 2048..16384, causal or not, B1 H32) and backward at B1 H32 S8192 D128, each against torch
   SDPA's flash and cuDNN backends on the same inputs; medians of ``triton.testing.do_bench`` (L2
   flushed between runs; forward: CUDA-graph replays, the GPU time alone, for all three, and ours
   eagerly too). Each forward shape is also checked against float64 on a sample of rows
   (beside flash's error on the same rows); each backward against flash's gradients.
   TFLOPS = 4·B·H·Lq·Lk·D, halved for causal; backward 2.5x the forward count.

Prints a markdown table last; writes ``triton_gpu.md``, ``triton_gpu.json`` and the log to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import multiprocessing
import os
import platform
import subprocess
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Callable, Dict, List, Optional, Tuple

log = logging.getLogger("aule_kp.bench")

# Errors are relative norms |got - ref| / |ref| for outputs and gradients (max abs for the LSE):
# fp32 runs exact ("ieee") dots, fp16/bf16 round P and dS to the input type before the matmuls.
TOL = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 3e-2}
LSE_TOL = 1e-3

Case = Dict[str, Any]


def grid() -> List[Case]:
    """The correctness grid, longest (most compiling) first."""
    cases: List[Case] = []
    for dtype in ("float16", "bfloat16"):
        for d in (64, 128):
            for causal in (False, True):
                cases.append(dict(name=f"tuned {dtype} D{d} causal={causal}", b=1, hq=4, hkv=4, lq=1024, lk=1024,
                                  dk=d, dv=d, dtype=dtype, causal=causal))
    cases += [
        dict(name="tuned GQA 8/2 causal", b=2, hq=8, hkv=2, lq=1024, lk=1024, dk=128, dv=128, dtype="float16",
             causal=True),
        dict(name="tuned MQA window (256,0)", b=1, hq=8, hkv=1, lq=2048, lk=2048, dk=64, dv=64, dtype="bfloat16",
             window=(256, 0)),
        dict(name="tuned Lq700 Lk1500 causal bottom-right", b=1, hq=4, hkv=4, lq=700, lk=1500, dk=64, dv=64,
             dtype="float16", causal=True),
        dict(name="tuned Lq700 Lk1500 causal top-left", b=1, hq=4, hkv=4, lq=700, lk=1500, dk=64, dv=64,
             dtype="float16", causal=True, top_left=True),
        dict(name="tuned Lq1500 Lk700 causal (hidden rows)", b=1, hq=4, hkv=2, lq=1500, lk=700, dk=128, dv=128,
             dtype="bfloat16", causal=True),
        dict(name="tuned Dk64 Dv128", b=1, hq=4, hkv=4, lq=1024, lk=1024, dk=64, dv=128, dtype="float16",
             causal=True),
        dict(name="tuned D96 (padded)", b=1, hq=4, hkv=4, lq=1024, lk=1024, dk=96, dv=96, dtype="float16"),
        dict(name="tuned key-padding mask", b=2, hq=4, hkv=4, lq=1024, lk=1024, dk=64, dv=64, dtype="bfloat16",
             mask_shape=(2, 1, 1, 1024)),
        dict(name="mask full + causal", b=2, hq=4, hkv=2, lq=384, lk=512, dk=64, dv=64, dtype="float16",
             causal=True, mask_shape=(2, 4, 384, 512)),
        dict(name="mask (1,1,Lq,Lk) window", b=1, hq=4, hkv=4, lq=300, lk=300, dk=128, dv=128, dtype="float16",
             window=(64, 64), mask_shape=(1, 1, 300, 300)),
        dict(name="D256 causal", b=1, hq=4, hkv=4, lq=512, lk=512, dk=256, dv=256, dtype="float16", causal=True),
        dict(name="Dk192 Dv128 bf16", b=1, hq=4, hkv=2, lq=400, lk=600, dk=192, dv=128, dtype="bfloat16"),
        dict(name="decode GQA 32/8 Lk8192", b=4, hq=32, hkv=8, lq=1, lk=8192, dk=128, dv=128, dtype="float16"),
        dict(name="decode MHA Lk4096 causal", b=1, hq=16, hkv=16, lq=1, lk=4096, dk=64, dv=64, dtype="bfloat16",
             causal=True),
        dict(name="spec-decode Lq4 GQA 32/4", b=1, hq=32, hkv=4, lq=4, lk=2048, dk=128, dv=128, dtype="float16",
             causal=True),
        dict(name="fp32 causal", b=1, hq=2, hkv=2, lq=256, lk=256, dk=64, dv=64, dtype="float32", causal=True),
        dict(name="fp32 decode GQA mask", b=1, hq=8, hkv=2, lq=1, lk=1000, dk=64, dv=64, dtype="float32",
             mask_shape=(1, 8, 1, 1000)),
    ]
    return cases


def _problem(c: Case, device: str = "cuda"):
    from aule_kp.problem import Problem, band, default_scale

    diag, left, right = band(c["lq"], c["lk"], causal=c.get("causal", False), window=c.get("window"),
                             top_left=c.get("top_left", False))
    return Problem(c["b"], c["hq"], c["hkv"], c["lq"], c["lk"], c["dk"], c["dv"], c["dtype"], default_scale(c["dk"]),
                   diag, left, right, c.get("mask_shape"), device)


def _reference(p, q, k, v, mask, dout):
    """float64 ``(out, lse, dq, dk, dv, dmask)`` by autograd over naive attention, on the GPU."""
    import numpy as np
    import torch

    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    m = None if mask is None else mask.double().requires_grad_()
    s = q @ k.repeat_interleave(p.group, 1).transpose(-1, -2) * p.scale
    visible = torch.from_numpy(p.visible(np.arange(p.len_q), np.arange(p.len_k))).to(q.device)
    s = s.masked_fill(~visible, -math.inf)
    if m is not None:
        s = s + m
    top = s.amax(-1, keepdim=True).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.exp(s - top)
    total = e.sum(-1, keepdim=True)
    out = (e @ v.repeat_interleave(p.group, 1)) / torch.where(total == 0, torch.ones_like(total), total)
    lse = torch.where(total[..., 0] == 0, -math.inf, (top + torch.log(total))[..., 0])
    out.backward(dout.double())
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad, None if m is None else m.grad


def _rel(got, ref) -> float:
    return float((got.double() - ref).norm() / max(float(ref.norm()), 1e-30))


def check_case(c: Case) -> Dict[str, Any]:
    """Forward + backward of one grid case against float64; runs in a worker process."""
    import torch

    from aule_kp.triton.backend import TritonBackend

    t0 = time.time()
    res: Dict[str, Any] = {"name": c["name"]}
    try:
        p = _problem(c)
        g = torch.Generator(device="cuda").manual_seed(hash(c["name"]) % (1 << 31))
        dt = getattr(torch, p.dtype)

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g, device="cuda").to(dt)

        q, k, v = rand(p.batch, p.heads_q, p.len_q, p.dim_k), rand(p.batch, p.heads_kv, p.len_k, p.dim_k), \
            rand(p.batch, p.heads_kv, p.len_k, p.dim_v)
        dout = rand(p.batch, p.heads_q, p.len_q, p.dim_v)
        mask = None
        if p.mask_shape is not None:
            mask = torch.randn(p.mask_shape, generator=g, device="cuda")
            mask[..., 5:40] = -math.inf  # hidden keys, where the mask has a key dim
            if p.mask_shape[2] > 3:
                mask[..., 3, :] = -math.inf  # a fully hidden row
        backend = TritonBackend()
        out, lse = backend.forward(p, q, k, v, mask)
        dq, dk, dv, dmask = backend.backward(p, q, k, v, out, dout, lse, mask, mask_grad=True)
        torch.cuda.synchronize()
        ref = _reference(p, q, k, v, mask, dout)
        finite = torch.isfinite(ref[1])
        res.update(
            out=_rel(out, ref[0]),
            lse=float((lse[finite].double() - ref[1][finite]).abs().max()) if finite.any() else 0.0,
            lse_inf_ok=bool((torch.isfinite(lse) == finite).all()),
            nan=bool(any(torch.isnan(t).any() for t in (out, dq, dk, dv))),
            dq=_rel(dq, ref[2]), dk=_rel(dk, ref[3]), dv=_rel(dv, ref[4]),
        )
        if dmask is not None:
            res["dmask"] = float((dmask.double() - ref[5]).norm() / max(float(ref[5].norm()), 1.0))
        tol = TOL[p.dtype]
        res["ok"] = (not res["nan"] and res["lse_inf_ok"] and res["lse"] <= LSE_TOL
                     and all(res[n] <= tol for n in ("out", "dq", "dk", "dv", "dmask") if n in res))
    except Exception:  # report and go on: one broken variant must not hide the others
        res.update(ok=False, error=traceback.format_exc(limit=6))
    res["seconds"] = round(time.time() - t0, 1)
    return res


def _worker_init() -> None:
    logging.basicConfig(level=logging.WARNING)


def run_grid(workers: int) -> List[Dict[str, Any]]:
    """The correctness grid in a spawn pool (CUDA cannot fork)."""
    ctx = multiprocessing.get_context("spawn")
    results = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init) as pool:
        futures = {pool.submit(check_case, c): c for c in grid()}
        for fut in as_completed(futures):
            try:
                r = fut.result()
            except Exception:  # a worker died (e.g. a GPU fault): record it, keep the rest
                r = {"name": futures[fut]["name"], "ok": False, "error": traceback.format_exc(limit=3), "seconds": 0}
            results.append(r)
            errs = " ".join(f"{n}={r[n]:.1e}" for n in ("out", "lse", "dq", "dk", "dv", "dmask") if n in r)
            log.info("%-4s %-45s %s (%.0fs)%s", "ok" if r["ok"] else "FAIL", r["name"], errs, r["seconds"],
                     "\n" + r["error"] if "error" in r else "")
    return results


# ----------------------------------------------------------------------------------------------
# Speed
# ----------------------------------------------------------------------------------------------


def _bench(fn: Callable[[], Any], graph: bool = False) -> float:
    """Median milliseconds; NaN if ``fn`` cannot run. Eager: ``do_bench`` (L2 flushed between runs),
    which includes each call's host overhead once the GPU outruns the host. ``graph``: replays of a
    CUDA graph of ``fn``, the GPU time alone, falling back to eager if ``fn`` cannot be captured."""
    import triton

    try:
        if graph:
            try:
                return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))
            except Exception as exc:
                log.info("    no CUDA graph (%s); timing eagerly", str(exc).splitlines()[0][:200])
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    except Exception as exc:  # e.g. an SDPA backend that does not take this shape/dtype
        log.info("    not timed: %s", str(exc).splitlines()[0][:200])
        return float("nan")


def _sdpa(kind: str) -> Any:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION if kind == "flash" else SDPBackend.CUDNN_ATTENTION])


def _rows_error(q, k, v, out, p, heads: Tuple[int, ...], rows) -> float:
    """Relative error of ``out`` on a sample of rows of some heads, against float64."""
    import torch

    errs = []
    for h in heads:
        qq = q[0, h, rows].double()
        kk, vv = k[0, h // p.group].double(), v[0, h // p.group].double()
        s = qq @ kk.T * p.scale
        if p.right is not None:
            cols = torch.arange(p.len_k, device=q.device)
            s = s.masked_fill(cols[None, :] > rows[:, None] + p.diag + p.right, -math.inf)
        ref = torch.softmax(s, -1) @ vv
        errs.append(_rel(out[0, h, rows], ref))
    return max(errs)


def bench_forward(dtype: str, d: int, s: int, causal: bool) -> Dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from aule_kp.triton.backend import TritonBackend

    c = dict(b=1, hq=32, hkv=32, lq=s, lk=s, dk=d, dv=d, dtype=dtype, causal=causal)
    p = _problem(c)
    dt = getattr(torch, dtype)
    q, k, v = (torch.randn(1, 32, s, d, device="cuda", dtype=dt) for _ in range(3))
    backend = TritonBackend()
    t0 = time.time()
    out, _ = backend.forward(p, q, k, v, None)  # autotunes on first use
    torch.cuda.synchronize()
    tune_s = time.time() - t0
    rows = torch.cat([torch.randint(0, s, (254,), device="cuda"), torch.tensor([0, s - 1], device="cuda")])
    err = _rows_error(q, k, v, out, p, (0, 31), rows)
    with _sdpa("flash"):
        flash_out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    flash_err = _rows_error(q, k, v, flash_out, p, (0, 31), rows)
    # Forward kernels last 0.1-5 ms, near the host cost of a launch at the short end: time the GPU
    # alone (graph replays) for every provider, and ours eagerly too.
    ms = {"triton": _bench(lambda: backend.forward(p, q, k, v, None), graph=True)}
    for kind in ("flash", "cudnn"):
        with _sdpa(kind):
            ms[kind] = _bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), graph=True)
    eager_ms = _bench(lambda: backend.forward(p, q, k, v, None))
    flops = 4.0 * 32 * s * s * d * (0.5 if causal else 1.0)
    return dict(pass_="fwd", dtype=dtype, d=d, s=s, causal=causal, ms=ms, eager_ms=eager_ms,
                tflops={n: flops / (t * 1e-3) / 1e12 for n, t in ms.items()}, err=err, flash_err=flash_err,
                ok=err <= TOL[dtype], tune_s=round(tune_s, 1))


def bench_backward(dtype: str, d: int, s: int, causal: bool) -> Dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from aule_kp.triton.backend import TritonBackend

    c = dict(b=1, hq=32, hkv=32, lq=s, lk=s, dk=d, dv=d, dtype=dtype, causal=causal)
    p = _problem(c)
    dt = getattr(torch, dtype)
    q, k, v = (torch.randn(1, 32, s, d, device="cuda", dtype=dt, requires_grad=True) for _ in range(3))
    dout = torch.randn(1, 32, s, d, device="cuda", dtype=dt)
    backend = TritonBackend()
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    out, lse = backend.forward(p, qd, kd, vd, None)
    t0 = time.time()
    dq, dk, dv, _ = backend.backward(p, qd, kd, vd, out, dout, lse, None)
    torch.cuda.synchronize()
    tune_s = time.time() - t0
    ms = {"triton": _bench(lambda: backend.backward(p, qd, kd, vd, out, dout, lse, None))}
    errs: Dict[str, float] = {}
    for kind in ("flash", "cudnn"):
        try:
            with _sdpa(kind):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                o.backward(dout, retain_graph=True)
                if kind == "flash":
                    errs = {n: _rel(ours, t.grad) for n, ours, t in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v))}
                ms[kind] = _bench(lambda o=o: o.backward(dout, retain_graph=True))
        except Exception as exc:
            log.info("    %s backward not timed: %s", kind, str(exc).splitlines()[0][:200])
            ms[kind] = float("nan")
        for t in (q, k, v):
            t.grad = None
    flops = 2.5 * 4.0 * 32 * s * s * d * (0.5 if causal else 1.0)
    return dict(pass_="bwd", dtype=dtype, d=d, s=s, causal=causal, ms=ms,
                tflops={n: flops / (t * 1e-3) / 1e12 for n, t in ms.items()}, vs_flash=errs,
                ok=bool(errs) and max(errs.values()) <= 2 * TOL[dtype], tune_s=round(tune_s, 1))


def tuned_configs() -> List[str]:
    """What the autotuner picked, per key (bucket, flags, dtypes)."""
    from aule_kp.triton import ops

    lines = []
    for name, tuner in [*((f"fwd D<={d}", t) for d, t in ops._fwd_tuned.items()),
                        *((f"bwd dK/dV D<={d}", t) for d, t in ops._dkdv_tuned.items()), ("bwd dQ", ops._dq_tuned)]:
        for key, cfg in tuner.cache.items():
            lines.append(f"{name} {key}: {cfg}")
    return lines


def environment() -> Dict[str, Any]:
    import torch
    import triton

    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        driver = "?"
    props = torch.cuda.get_device_properties(0)
    return {"date": datetime.date.today().isoformat(), "device": props.name, "sms": props.multi_processor_count,
            "driver": driver, "torch": torch.__version__, "triton": triton.__version__,
            "cudnn": torch.backends.cudnn.version(), "python": platform.python_version()}


def table(rows: List[Dict[str, Any]]) -> str:
    out = ["| pass | dtype | D | S | causal | triton ms (eager) | TFLOPS triton | flash | cuDNN | x flash | x cuDNN "
           "| err (flash err) | ok |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["tflops"]
        if r["pass_"] == "fwd":
            err = f"{r['err']:.1e} ({r['flash_err']:.1e})"
        else:
            err = "vs flash " + " ".join(f"{n} {e:.1e}" for n, e in r["vs_flash"].items())
        eager = f" ({r['eager_ms']:.3f})" if "eager_ms" in r else ""
        out.append(f"| {r['pass_']} | {r['dtype']} | {r['d']} | {r['s']} | {r['causal']} "
                   f"| {r['ms']['triton']:.3f}{eager} "
                   f"| {t['triton']:.0f} | {t['flash']:.0f} | {t['cudnn']:.0f} | {t['triton'] / t['flash']:.2f} "
                   f"| {t['triton'] / t['cudnn']:.2f} | {err} | {'ok' if r['ok'] else 'FAIL'} |")
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the md/json/log outputs")
    ap.add_argument("--workers", type=int, default=12, help="processes for the correctness grid")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds after which remaining shapes are skipped")
    ap.add_argument("--skip-grid", action="store_true")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout),
                                  logging.FileHandler(os.path.join(args.out, "triton_gpu.log"))])
    start = time.time()
    import torch

    env = environment()
    log.info("environment: %s", env)
    grid_results = [] if args.skip_grid else run_grid(args.workers)
    log.info("grid: %d/%d ok in %.0fs", sum(r["ok"] for r in grid_results), len(grid_results), time.time() - start)

    shapes = [("fwd", dt, d, s, c) for d in (128, 64) for dt in ("float16", "bfloat16")
              for s in (8192, 2048, 4096, 16384) for c in (False, True)]
    shapes[8:8] = [("bwd", dt, 128, 8192, c) for dt in ("float16", "bfloat16") for c in (False, True)]
    rows: List[Dict[str, Any]] = []
    skipped: List[str] = []
    write_report(args.out, env, grid_results, rows, skipped)  # rewritten after each shape: a cut-off run keeps its rows
    for kind, dt, d, s, causal in shapes:
        if time.time() - start > args.budget:
            skipped.append(f"{kind} {dt} D{d} S{s} causal={causal}")
            continue
        try:
            r = (bench_forward if kind == "fwd" else bench_backward)(dt, d, s, causal)
        except Exception:
            log.info("%s %s D%d S%d causal=%s FAILED\n%s", kind, dt, d, s, causal, traceback.format_exc(limit=6))
            continue
        rows.append(r)
        log.info("%s %s D%d S%d causal=%s: %s TFLOPS (x flash %.2f) tune %.0fs", kind, dt, d, s, causal,
                 {n: round(t) for n, t in r["tflops"].items()}, r["tflops"]["triton"] / r["tflops"]["flash"],
                 r["tune_s"])
        write_report(args.out, env, grid_results, rows, skipped)
        torch.cuda.empty_cache()
    print(write_report(args.out, env, grid_results, rows, skipped), flush=True)
    log.info("total %.0fs", time.time() - start)
    return 0 if all(r["ok"] for r in grid_results) and all(r["ok"] for r in rows) else 1


def write_report(out: str, env: Dict[str, Any], grid_results: List[Dict[str, Any]], rows: List[Dict[str, Any]],
                 skipped: List[str]) -> str:
    """Write ``triton_gpu.md``/``.json`` under ``out``; returns the markdown."""
    configs = tuned_configs()
    md = [f"### Triton backend vs torch SDPA, {env['date']}, {env['device']}",
          "", f"- environment: {env}",
          f"- correctness grid: {sum(r['ok'] for r in grid_results)}/{len(grid_results)} ok", ""]
    md += [f"  - FAIL {r['name']}: {r.get('error', r)}" for r in grid_results if not r["ok"]]
    md += ["", table(rows), ""]
    if skipped:
        md.append(f"- skipped (time budget): {', '.join(skipped)}")
    md += ["", "Autotuned configs:", *(f"- {line}" for line in configs)]
    text = "\n".join(md)
    with open(os.path.join(out, "triton_gpu.md"), "w") as fh:
        fh.write(text + "\n")
    with open(os.path.join(out, "triton_gpu.json"), "w") as fh:
        json.dump({"env": env, "grid": grid_results, "bench": rows, "skipped": skipped, "configs": configs}, fh,
                  indent=1, default=str)
    return text


if __name__ == "__main__":
    sys.exit(main())
