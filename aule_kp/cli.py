"""``aule-kp info | demo | bench | tune | doctor`` (also ``python -m aule_kp``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence


def _positive(kind: type) -> Callable[[str], Any]:
    """An argparse type: a ``kind`` (int or float) above 0, else a usage error (exit 2) saying so."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__} > 0, got {text!r}") from None
        if not value > 0:  # NaN fails too
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _candidate_count(text: str) -> int:
    """``--candidates``: a count >= 0, or ``all`` (every legal candidate)."""
    from .tune import ALL_CANDIDATES

    if text == "all":
        return ALL_CANDIDATES
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a count >= 0 or 'all', got {text!r}")
    return value


def _unwritable(option: str, path: str, folder: bool) -> Optional[str]:
    """Why ``path`` (the value of ``option``) cannot be written, or None: checked before a long run, so that
    a typo does not cost the whole benchmark. A folder is created (it is where the results go anyway)."""
    try:
        if folder:
            os.makedirs(path, exist_ok=True)
            if not os.access(path, os.W_OK | os.X_OK):
                raise PermissionError(f"{path} is not writable")
        else:
            # Append mode creates nothing that was not asked for: the run appends to this file anyway.
            with open(path, "a"):
                pass
    except OSError as exc:
        return f"{option} {path}: cannot write there ({exc.strerror or exc})"
    return None


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> List[str]:
    """Plain-text table lines (header, rule, rows), each column as wide as its widest cell."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
        return " ".join(f"{c:>{w}}" if r else f"{c:<{w}}" for c, w, r in zip(cells, widths, right)).rstrip()

    return [line(header), "-" * len(line(header)), *(line(r) for r in rows)]


def _info(args: argparse.Namespace) -> int:
    from .info import info

    data = info()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    kp = data["kp"]
    print(f"aule-kp {data['version']}")
    print(f"backends: {', '.join(data['backends'])}")
    build = "patched: features + one fence per sequence" if kp.get("patched") else "UNPATCHED release build"
    print(f"kp: {kp.get('version', 'missing')} ({build})")
    if not data["devices"]:
        print(f"Vulkan: no device ({data.get('vulkan_error')})")
    for d in data["devices"]:
        mark = "*" if d["index"] == data["selected_device"] else " "
        print(f"{mark} [{d['index']}] {d['name']} — {d['vendor']} {d['type']}, {d['driver_info'] or d['driver_name']}")
        print(f"      subgroup {d['subgroup_size']}, shared memory {d['shared_memory'] // 1024} KiB, "
              f"storage binding {d['max_storage_buffer_range'] // 2**20} MiB, fp16 {d['fp16']}, int8 {d['int8']}, "
              f"coopmat {d['coopmat']} ({len(d['coopmat_shapes'])} shapes), coopmat2 {d['coopmat2']}")
        print(f"      {d['architecture']}, driver {d['driver'] or '?'} {d['driver_version_text']}, {d['os']}")
        print(f"      variants: {', '.join(d['variants'])}")
        for variant, reasons in d["variant_reasons"].items():
            print(f"        not {variant}: {'; '.join(reasons)}")
        for w in d["workarounds"]:
            print(f"      driver trap {w['id']}: {w['title']} -> {w['effect']} ({w['sources'][0]})")
        wrong = [key for key, v in d["self_check"].items() if v.get("ok") is False]
        if d["self_check"]:
            print(f"      self-check: {len(d['self_check'])} verdict(s) recorded, "
                  f"{'wrong: ' + ', '.join(wrong) if wrong else 'none wrong'} (`aule-kp doctor` re-runs them)")
    print("knobs (environment):")
    for name, k in data["knobs"].items():
        print(f"  {name}={'' if k['value'] is None else k['value']}  {k['meaning']}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Batched attention over NumPy arrays on the Vulkan device and the CPU backend, checked in float64."""
    from .bench import Case, _max_err, median_time
    from .call import attention_forward
    from .cpu.backend import CpuBackend
    from .info import info
    from .vulkan.backend import VulkanBackend

    data = info()
    dev = next((d for d in data["devices"] if d["index"] == data["selected_device"]), None)
    cases = [Case(2, 8, 256, 256, 64, "float32", False), Case(2, 8, 256, 256, 64, "float16", True),
             Case(1, 8, 128, 384, 128, "float32", True, hkv=2), Case(4, 4, 1, 512, 64, "float16", False)]
    print(f"device: {dev['name'] if dev else 'none'} ({dev['type'] if dev else '-'})")
    rows: List[List[str]] = []
    worst = 0.0
    tol = {"float32": 1e-4, "float16": 5e-3}
    for case in cases:
        q, k, v = case.inputs()
        for backend in [b for b in ("vulkan", "cpu") if b in data["backends"]]:
            out, _, p = attention_forward(q, k, v, causal=case.causal, backend=backend)
            ms = median_time(lambda: attention_forward(q, k, v, causal=case.causal, backend=backend),  # noqa: B023
                             args.repeat, warmup=0) * 1e3
            err = _max_err(out, case, q, k, v)
            worst = max(worst, err / tol[case.dtype])
            variant = VulkanBackend().config(p).variant if backend == "vulkan" else \
                (f"native w{kern.width}" if (kern := CpuBackend().native()) is not None else "numpy")
            rows.append([backend, variant, f"{tuple(q.shape)} / {tuple(k.shape)}", case.dtype,
                         "causal" if case.causal else "-", f"{ms:.2f}", f"{p.flops() / ms / 1e6:.2f}", f"{err:.1e}"])
    header = ["backend", "variant", "shape (q / k)", "dtype", "mask", "ms", "GFLOP/s", "max err"]
    print("\n".join(_table(header, rows, [False] * 5 + [True] * 3)))
    ok = worst <= 1.0
    print(f"\nall results within tolerance of the float64 reference: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


def _bench_serving(args: argparse.Namespace, backends: List[str], command: str) -> int:
    """``bench --preset serving``: the sweep sized for the device (scaled down on a CPU device)."""
    from . import bench, bench_serving
    from .vulkan import device as devmod

    dev, _ = devmod.usable_device()
    gpu = dev is not None and dev.caps.type in ("discrete", "integrated")
    ours = [b for b in backends if b in bench.OUR_BACKENDS]
    rows = bench_serving.run(ours, args.vs or "torch" in backends, args.repeat, gpu, args.scale)
    table = bench_serving.format_table(rows)
    print(table)
    if args.markdown or args.plots:
        from .plots import format_speedups, write_results

        m = bench.machine(command)
        head = "\n".join(f"- {k}: {v}" for k, v in m.items())
        text = f"### `serving` preset ({'GPU' if gpu else 'CPU device, scaled down'}), {m['date']}\n\n{head}\n\n" \
               f"{table}\n{format_speedups(rows)}"
        if args.markdown:
            with open(args.markdown, "a") as f:
                f.write(f"\n{text}")
        if args.plots:
            write_results(args.plots, rows, {"preset": "serving", "scale": args.scale, "repeat": args.repeat, **m},
                          text)
    failed = [r for r in rows if r["note"].startswith("failed")]
    for r in failed:
        print(f"aule-kp bench: {r['backend']} on {r['case']}: {r['note']}", file=sys.stderr)
    return 1 if failed else 0


def _bench_layers(args: argparse.Namespace, data: Dict[str, Any]) -> int:
    """``bench --preset layers``: the aule_kp.nn layers on model shapes (aule_kp.bench_layers)."""
    from . import bench, bench_layers

    try:
        backends = bench.select_backends(args.backends, data["backends"])
    except ValueError as exc:
        print(f"aule-kp bench: {exc}", file=sys.stderr)
        return 2
    rows = bench_layers.run(args.repeat, args.scale, backends)
    table = bench_layers.format_table(rows)
    if args.markdown:
        m = bench.machine(" ".join(["aule-kp", *args.argv]))
        title = "### `layers` preset" + (f", lengths, heads and ranks / {args.scale:g}" if args.scale != 1 else "")
        with open(args.markdown, "a") as f:
            f.write(f"\n{title}, {m['date']}\n\n" + "\n".join(f"- {k}: {v}" for k, v in m.items()) + f"\n\n{table}\n")
    print(table)
    failed = [r for r in rows if r["note"].startswith("failed")]
    return 1 if failed else 0


def _bench(args: argparse.Namespace) -> int:
    """Run a preset, print its table on stdout (progress on stderr), write --markdown / --plots."""
    from . import bench
    from .info import info

    for option, path, folder in (("--markdown", args.markdown, False), ("--plots", args.plots, True)):
        why = path and _unwritable(option, path, folder)
        if why:
            print(f"aule-kp bench: {why}", file=sys.stderr)
            return 2
    data = info()
    preset = args.preset
    if preset == "layers":
        return _bench_layers(args, data)
    if preset == "auto":
        dev = next((d for d in data["devices"] if d["index"] == data["selected_device"]), None)
        preset = "gpu" if dev and dev["type"] in ("discrete", "integrated") else "cpu"
    if args.plots:
        from .plots import matplotlib_available

        if not matplotlib_available():
            print(f"aule-kp bench: matplotlib is not installed, so --plots writes only bench.md and bench.json "
                  f"into {args.plots} (no PNGs); `pip install matplotlib` for the plots", file=sys.stderr)
    try:
        backends = bench.select_backends(args.backends, data["backends"])
    except ValueError as exc:
        print(f"aule-kp bench: {exc}", file=sys.stderr)
        return 2
    command = " ".join(["aule-kp", *args.argv])
    if preset == "serving":
        return _bench_serving(args, backends, command)
    rows = bench.run(preset, args.vs, args.repeat, args.markdown, backends, scale=args.scale, plots=args.plots,
                     command=command)
    print(bench.format_table(rows))
    if args.plots:
        from .plots import SPEEDUP_PNG, speedups

        if not speedups(rows):
            print(f"aule-kp bench: no {SPEEDUP_PNG} in {args.plots}: no torch SDPA or aule-attention row ran to "
                  f"compare with (--vs adds them)", file=sys.stderr)
    failed = [r for r in rows if r["note"].startswith("failed")]
    if failed:
        print(f"aule-kp bench: {len(failed)} row(s) failed: "
              + "; ".join(f"{r['backend']} on {r['case']}: {r['note']}" for r in failed), file=sys.stderr)
        return 1
    return 0


def _tune(args: argparse.Namespace) -> int:
    """Time tile candidates on the selected device and cache the winners; --show / --clear: that cache."""
    from . import tune as tuning
    from .vulkan import device as devmod

    why = args.cache_dir and _unwritable("--cache-dir", args.cache_dir, True)
    if why:
        print(f"aule-kp tune: {why}", file=sys.stderr)
        return 2
    why = devmod.vulkan_unavailable()
    if why:
        print(f"aule-kp tune: no Vulkan device ({why})", file=sys.stderr)
        return 2
    passes = [x.strip() for x in args.passes.split(",") if x.strip()]
    if not passes or any(x not in tuning.PASSES for x in passes):
        print(f"aule-kp tune: --passes takes a comma list of {', '.join(tuning.PASSES)}", file=sys.stderr)
        return 2
    if any(d < 8 or d > 256 or d % 8 for d in args.head_dim or []):
        print(f"aule-kp tune: head dims must be multiples of 8 from 8 to 256, got {args.head_dim}", file=sys.stderr)
        return 2
    caps = devmod.get_device().caps
    path = tuning.cache_path(caps, args.cache_dir)
    if args.clear:
        print(f"removed {path}" if tuning.clear(caps, args.cache_dir) else f"no tuning cache at {path}")
    if args.show:
        entries = tuning.load(caps, args.cache_dir)
        print(f"tuning cache of {caps.name}, driver {caps.driver_info or caps.driver_version}: {path}")
        print(tuning.format_entries(entries) if entries else "(no entries)")
    if args.clear or args.show:
        return 0
    if args.quick and args.candidates is not None and args.candidates > tuning.MAX_CANDIDATES["quick"]:
        print(f"aule-kp tune: --quick times at most {tuning.MAX_CANDIDATES['quick']} candidates per problem; "
              f"drop --quick for more", file=sys.stderr)
    report = tuning.tune(quick=args.quick, dtype=args.dtype, head_dims=args.head_dim, repeat=args.repeat,
                         passes=passes, max_candidates=args.candidates, directory=args.cache_dir)
    print(f"device: {report.device}")
    print(tuning.format_rows(report.rows))
    if not report.winners:
        print("\nnothing could be timed: no winners stored")
        return 1
    print(f"\n{len(report.winners)} winner(s) (* above) written to {report.path}")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    """Run the self-check's canaries now on the selected device; exit 1 when a kernel family is wrong."""
    from .problem import DTYPES
    from .vulkan import device as devmod
    from .vulkan import selfcheck, workarounds
    from .vulkan.choice import FAMILIES, canary_config, candidate_families

    why = args.cache_dir and _unwritable("--cache-dir", args.cache_dir, True)
    if why:
        print(f"aule-kp doctor: {why}", file=sys.stderr)
        return 2
    why = devmod.vulkan_unavailable()
    if why:
        print(f"aule-kp doctor: no Vulkan device ({why})", file=sys.stderr)
        return 2
    bad = [k for k in args.kernels or [] if k not in FAMILIES]
    if bad:
        print(f"aule-kp doctor: unknown kernel famil{'y' if len(bad) == 1 else 'ies'} {', '.join(bad)}; "
              f"expected some of {', '.join(FAMILIES)}", file=sys.stderr)
        return 2
    dev = devmod.get_device()
    caps = dev.caps
    path = selfcheck.cache_path(caps, args.cache_dir)
    if args.clear:
        print(f"removed {path}" if selfcheck.clear(caps, args.cache_dir) else f"no self-check verdicts at {path}")
        return 0
    families = args.kernels or candidate_families(caps)
    dtypes = args.dtype or list(DTYPES)

    def progress(family: str, dtype: str) -> None:
        print(f"checking {family} {dtype} ...", file=sys.stderr, flush=True)

    verdicts = selfcheck.run_checks(families, canary_config, dtypes, dev, args.cache_dir, progress)
    wrong = [v for v in verdicts if v.ok is False]
    traps = workarounds.describe(caps)
    # A family the table turns off stays off whatever its canaries say (AULE_KP_WORKAROUNDS=0 lifts it).
    by_table = {f: r for f in dict.fromkeys(v.family for v in verdicts) if (r := workarounds.family_reasons(f, caps))}
    if args.json:
        print(json.dumps({"device": {k: caps.as_dict()[k] for k in (
            "index", "name", "vendor", "type", "driver", "driver_info", "driver_version", "driver_version_text",
            "uuid", "os", "architecture")},
            "workarounds": traps, "checks": [dict(v.record(), family=v.family, dtype=v.dtype) for v in verdicts],
            "wrong": [f"{v.family}/{v.dtype}" for v in wrong], "turned_off_by_traps": by_table, "cache": str(path)},
            indent=2))
        return 1 if wrong else 0
    print(f"device: {caps.name} ({caps.type}, {caps.architecture}), driver "
          f"{caps.driver_info or caps.driver_name} {caps.driver_version_text()}, {caps.os}")
    for w in traps:
        print(f"driver trap {w['id']}: {w['title']}\n  -> {w['effect']} ({', '.join(w['sources'])})")
    if not traps:
        print("driver traps: none known for this device")
    print(selfcheck.format_table(verdicts))
    for family, reasons in by_table.items():
        print(f"{family} stays off on this driver whatever its verdict: {reasons[0]}")
    print(f"\n{len(wrong)} wrong: {', '.join(f'{v.family}/{v.dtype}' for v in wrong)} (turned off for this driver)"
          if wrong else "\nevery kernel checked is correct on this driver")
    print(f"verdicts written to {path}")
    return 1 if wrong else 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``aule-kp`` console script."""
    parser = argparse.ArgumentParser(prog="aule-kp", description="FlashAttention-2 over Vulkan (Kompute)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="version, backends, devices and their capabilities")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_info)
    p = sub.add_parser("demo", help="batched NumPy attention on Vulkan and CPU, checked against float64")
    p.add_argument("--repeat", type=_positive(int), default=3, help="timed calls per row (median)")
    p.set_defaults(fn=_demo)
    p = sub.add_parser("bench", help="benchmark table (ms, TFLOPS, peak memory)")
    from .bench import PRESETS

    p.add_argument("--preset", choices=["auto", *PRESETS, "layers", "serving"], default="auto",
                   help="auto (cpu or gpu by the device), cpu, gpu, model shapes: llama3-8b, llama3-70b, sdxl, flux; "
                        "layers: the aule_kp.nn layers on DeepSeek-V3 / Llama-3-70B / 405B shapes; serving: prefill "
                        "and decode sweeps of the varlen and KV-cache calls")
    p.add_argument("--vs", action="store_true",
                   help="also time torch SDPA and aule-attention 0.5.0 (adds torch,aule-attention to --backends)")
    p.add_argument("--repeat", type=_positive(int), default=5, help="timed calls per row (median)")
    p.add_argument("--backends", metavar="LIST",
                   help="comma-separated rows to run, from vulkan,triton,cpu,torch,aule-attention (default: every "
                        "available aule-kp backend, plus torch,aule-attention with --vs); triton times CUDA/ROCm "
                        "tensors and reports why where it cannot run")
    p.add_argument("--markdown", help="append the table, machine and command to this file")
    p.add_argument("--scale", type=_positive(float), default=1.0,
                   help="divide sequence lengths by F (min 16; decode's Lq=1 kept; the layers preset divides heads "
                        "and LoRA ranks too): smoke-run GPU presets on a CPU")
    p.add_argument("--plots", metavar="DIR",
                   help="write bench.md, bench.json and PNG plots (latency, TFLOPS, memory, host overhead, and speedup "
                        "with --vs) into DIR")
    p.set_defaults(fn=_bench)
    p = sub.add_parser("tune", help="time tile sizes on this device and cache the fastest per problem")
    p.add_argument("--quick", action="store_true", help="tiny shapes and 2 candidates per problem (seconds)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="dtype of the problems (default: float32 on CPU devices, float16 on GPUs)")
    p.add_argument("--head-dim", type=int, nargs="+", metavar="D", help="head dims to tune (default: the preset's)")
    p.add_argument("--repeat", type=_positive(int), default=5,
                   help="timed evals per candidate (median, after a warm-up)")
    p.add_argument("--candidates", type=_candidate_count, metavar="N",
                   help="candidates per problem besides the default: a count >= 0 or 'all' (default: 6 CPU, "
                        "24 GPU); --quick caps it at 2")
    p.add_argument("--passes", default="forward,backward", help="comma list: forward,backward")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="tuning cache folder (default: $AULE_KP_CACHE_DIR, else the user cache dir)")
    p.add_argument("--clear", action="store_true", help="delete this device's tuning cache")
    p.add_argument("--show", action="store_true", help="print this device's tuning cache")
    p.set_defaults(fn=_tune)
    p = sub.add_parser("doctor", help="run the per-driver self-check now: canary problems per kernel family and "
                                      "dtype against float64; exit 1 when a kernel is wrong")
    p.add_argument("--json", action="store_true")
    p.add_argument("--kernels", nargs="+", metavar="FAMILY",
                   help="kernel families to check (default: those the automatic choice may use here), from "
                        "fwd.scalar fwd.wave64 fwd.coopmat fwd.coopmat2 splitkv bwd.scalar bwd.coopmat")
    p.add_argument("--dtype", nargs="+", choices=["float32", "float16", "bfloat16"], help="dtypes (default all)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="where verdicts go (default: $AULE_KP_CACHE_DIR, else the user cache dir)")
    p.add_argument("--clear", action="store_true", help="forget this driver's verdicts (nothing is run)")
    p.set_defaults(fn=_doctor)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
