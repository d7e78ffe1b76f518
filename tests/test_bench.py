"""``aule-kp bench``: model presets, ``--scale``, and the ``--plots`` results folder (table, JSON, PNGs)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
from conftest import LAMBDA, output_tolerance, q8_error, tolerance

import aule_kp.vulkan.device as devmod
from aule_kp import bench, dispatch, plots
from aule_kp.bench import PRESETS, TRITON_ROW, Case, scale_cases
from aule_kp.cli import main
from aule_kp.problem import Problem, band

_NO_VULKAN = devmod.vulkan_unavailable()
needs_vulkan = pytest.mark.skipif(bool(_NO_VULKAN), reason=f"no Vulkan device: {_NO_VULKAN}")
needs_matplotlib = pytest.mark.skipif(not plots.matplotlib_available(), reason="matplotlib not installed")


def _check_folder(out: Path) -> Dict[str, Any]:
    """The results folder holds the table, the JSON and the four PNGs; every row has a finite positive ms."""
    md = (out / "bench.md").read_text()
    assert "| case | backend | ms |" in md
    data = json.loads((out / "bench.json").read_text())
    rows: List[Dict[str, Any]] = data["rows"]
    assert rows
    for r in rows:
        assert isinstance(r["ms"], float) and math.isfinite(r["ms"]) and r["ms"] > 0, r
        assert r["case"] in md
    # The end-to-end plots always; the breakdown's and the speedups' only when there are such rows.
    expected = {plots.LATENCY_PNG, plots.TFLOPS_PNG, plots.MEMORY_PNG}
    expected |= {plots.OVERHEAD_PNG} if any(r.get("breakdown") for r in rows) else set()
    expected |= {plots.SPEEDUP_PNG} if data["speedups"] else set()
    assert {p.name for p in out.glob("*.png")} == expected
    for name in expected:
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000, name
    return data


def test_presets_are_model_shapes() -> None:
    l8, l70 = PRESETS["llama3-8b"], PRESETS["llama3-70b"]
    assert {(c.h, c.hkv, c.d) for c in l8} == {(32, 8, 128)}
    assert {(c.h, c.hkv, c.d) for c in l70} == {(64, 8, 128)}
    for cases in (l8, l70):
        assert sorted(c.lq for c in cases if c.causal and c.lq == c.lk) == [2048, 4096, 8192]
        assert sorted(c.lk for c in cases if c.lq == 1) == [8192, 32768]
    sdxl = PRESETS["sdxl"]
    assert {c.d for c in sdxl} == {64} and {c.h for c in sdxl} == {10, 20} and not any(c.causal for c in sdxl)
    assert {c.lq for c in sdxl} == {1024, 4096} and 77 in {c.lk for c in sdxl}
    flux = PRESETS["flux"]
    assert {(c.h, c.d, c.lq, c.causal) for c in flux} == {(24, 128, 4096, False), (24, 128, 4608, False)}


def test_scale_divides_lengths_min_16_and_keeps_decode() -> None:
    cases = [Case(1, 32, 8192, 8192, 128, "float16", True, hkv=8), Case(1, 32, 1, 32768, 128, "float16", False, hkv=8),
             Case(2, 10, 4096, 77, 64, "float16", False), Case(1, 32, 2048, 2048, 128, "float16", True, hkv=8),
             Case(1, 32, 4096, 4096, 128, "float16", True, hkv=8)]
    got = [(c.lq, c.lk) for c in scale_cases(cases, 256)]
    # 2048 / 256 and 4096 / 256 both land on 16: that (otherwise equal) shape is kept once.
    assert got == [(32, 32), (1, 128), (16, 16), (16, 16)]
    assert scale_cases(cases, 64)[2].lk == 16 and scale_cases(cases, 2)[2].lk == 38
    assert scale_cases(cases, 1) == cases
    with pytest.raises(ValueError):
        scale_cases(cases, 0)


def test_speedups_pair_every_timed_aule_kp_row_with_every_baseline() -> None:
    rows = [{"case": "c", "backend": "aule-kp vulkan", "ms": 2.0}, {"case": "c", "backend": "aule-kp cpu", "ms": 4.0},
            {"case": "c", "backend": "torch SDPA cpu", "ms": 6.0},
            {"case": "c", "backend": "aule-attention 0.5.0", "ms": None},
            {"case": "d", "backend": "aule-kp cpu", "ms": 1.0}]
    assert plots.speedups(rows) == [
        {"case": "c", "ours": "aule-kp vulkan", "baseline": "torch SDPA cpu", "speedup": 3.0},
        {"case": "c", "ours": "aule-kp cpu", "baseline": "torch SDPA cpu", "speedup": 1.5}]
    assert plots.format_speedups(rows[-1:]) == ""


@needs_matplotlib
def test_llama3_8b_scaled_cpu_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "llama3-8b"
    assert main(["bench", "--preset", "llama3-8b", "--scale", "256", "--repeat", "1", "--backends", "cpu",
                 "--plots", str(out)]) == 0
    data = _check_folder(out)
    assert data["meta"]["preset"] == "llama3-8b" and data["meta"]["scale"] == 256
    assert "--scale 256" in data["meta"]["command"]
    assert {r["backend"] for r in data["rows"]} == {"aule-kp cpu"}
    assert len(data["rows"]) == len(scale_cases(PRESETS["llama3-8b"], 256))
    assert all(r["tflops"] > 0 and r["peak_mb"] is not None for r in data["rows"])
    assert "| B1 H32/8 Lq1 Lk128 D128 float16 | aule-kp cpu |" in capsys.readouterr().out


@needs_vulkan
@needs_matplotlib
def test_tiny_vulkan_case_with_baselines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    case = Case(1, 2, 32, 32, 32, "float32", False)
    monkeypatch.setitem(PRESETS, "tiny", [case])
    out = tmp_path / "tiny"
    argv = ["bench", "--preset", "tiny", "--repeat", "1", "--backends", "vulkan", "--vs", "--plots", str(out)]
    assert main(argv) == 0
    data = _check_folder(out)
    backends = {r["backend"] for r in data["rows"]}
    assert "aule-kp vulkan" in backends
    assert all(r["max_err"] <= bench_tol(case) for r in data["rows"] if r["backend"] == "aule-kp vulkan")
    # torch (CPU) is installed for the tests: a speedup against it is recorded.
    if "torch SDPA cpu" in backends:
        assert any(s["baseline"] == "torch SDPA cpu" and s["speedup"] > 0 for s in data["speedups"])


def test_plots_without_matplotlib_write_table_and_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(plots, "matplotlib_available", lambda: False)
    rows = [bench._row(Case(1, 1, 16, 16, 32, "float32", False), "aule-kp cpu", 1e-3)]
    written = plots.write_results(str(tmp_path), rows, {"preset": "x", "scale": 1.0}, bench.format_table(rows))
    assert sorted(Path(p).name for p in written) == ["bench.json", "bench.md"]
    assert not list(tmp_path.glob("*.png"))
    assert "matplotlib is not installed" in caplog.text


# --- the aule-kp Triton row, --backends, and a triton column in the outputs --------------------------------

TINY = Case(1, 2, 32, 32, 16, "float32", False)


def bench_tol(case: Case) -> float:
    """Largest ``max_err`` of a correct row (``conftest.tolerance``): the benchmark's inputs are seeded
    standard normals, whose |v| stays below 6 at these sizes (probability 1 - 2e-9 per element)."""
    return tolerance(case.dtype, case.lk + case.d, value_scale=6.0)
HAS_TRITON = not dispatch.get("triton").unavailable_reasons()
CUDA = bool(HAS_TRITON and __import__("torch").cuda.is_available())
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="torch or triton not installed")


@needs_triton
@pytest.mark.skipif(CUDA, reason="this checks the skip on a machine without CUDA/ROCm")
def test_triton_row_is_skipped_with_its_reason_here() -> None:
    reasons = bench.triton_skip_reasons(TINY)
    assert reasons and "no CUDA/ROCm device" in reasons[0]
    row = bench.bench_triton(TINY, repeat=1)
    assert row["backend"] == TRITON_ROW and row["ms"] is None and row["tflops"] is None
    assert row["note"] == "skipped: " + "; ".join(reasons)
    # The default row selection keeps triton (it is installed), so the table says why instead of omitting it.
    assert "triton" in bench.select_backends(None, dispatch.available_backends())


@needs_triton
def test_triton_skip_reasons_on_a_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a CUDA device (faked), the reasons are the interpreter switch and what the backend refuses."""
    monkeypatch.setattr(bench, "_torch_on", lambda device: (object(), []))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert bench.triton_skip_reasons(TINY) == []
    wide = Case(1, 2, 32, 32, 512, "float16", False)
    assert any("Dk = 512" in r for r in bench.triton_skip_reasons(wide))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert any("TRITON_INTERPRET=1" in r for r in bench.triton_skip_reasons(TINY))
    assert bench.triton_skip_reasons(TINY, device="cpu") == []  # the interpreter does take CPU tensors


def test_triton_row_reports_missing_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = ["triton is not installed (pip install x)"]
    monkeypatch.setattr(dispatch.get("triton"), "unavailable_reasons", lambda: missing)
    row = bench.bench_triton(TINY, repeat=1)
    assert row["ms"] is None and row["note"] == "skipped: triton is not installed (pip install x)"


def test_torch_rows_skip_or_fail_with_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")

    def refuses(q: Any, k: Any, v: Any) -> Any:
        def call() -> None:
            raise RuntimeError("no kernel for this shape")
        return call

    row = bench.bench_torch_call(TINY, "torch SDPA cpu", "cpu", 1, refuses)
    assert row["ms"] is None and row["note"] == "not run: no kernel for this shape"
    if not CUDA:
        assert "no CUDA/ROCm device" in bench.bench_torch(TINY, 1, "cuda", "FLASH_ATTENTION")["note"]
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now fails
    assert bench.bench_torch(TINY, 1, "cpu")["note"] == "skipped: torch is not installed"


@needs_triton
def test_triton_row_times_and_checks_through_the_interpreter(tmp_path: Path) -> None:
    """The Triton row's timing path for real, on CPU tensors through Triton's interpreter (the only device
    here; ``triton.jit`` reads TRITON_INTERPRET at import, hence the subprocess): a time and a small error."""
    code = ("import json; from aule_kp import bench; "
            "print(json.dumps([bench.bench_triton(bench.Case(1, 2, 32, 48, 16, dt, True, hkv=1), 1, device='cpu') "
            "for dt in ('float32', 'float16')]))")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    f32, f16 = json.loads(done.stdout.strip().splitlines()[-1])
    for row in (f32, f16):
        assert row["backend"] == TRITON_ROW and row["note"] == "" and row["ms"] > 0 and row["tflops"] > 0, row
    assert f32["max_err"] <= bench_tol(Case(1, 2, 32, 48, 16, "float32", True, hkv=1))
    assert f16["max_err"] <= bench_tol(Case(1, 2, 32, 48, 16, "float16", True, hkv=1))


def test_select_backends() -> None:
    assert bench.select_backends(None, ["vulkan", "triton", "cpu"]) == ["vulkan", "triton", "cpu"]
    assert bench.select_backends("", ["cpu", "triton"]) == ["triton", "cpu"]
    assert bench.select_backends("torch, triton,torch", ["cpu"]) == ["torch", "triton"]
    with pytest.raises(ValueError, match="'cuda', 'sdpa'.*vulkan,triton,cpu,torch,aule-attention"):
        bench.select_backends("cpu,cuda,sdpa", ["cpu"])


def _planned(case: Case, preset: str, backends: List[str], scale: float = 1.0) -> List[str]:
    return [who for who, _ in bench.plan_rows(case, preset, backends, 1, scale)]


def test_plan_rows_follow_backends() -> None:
    every = ["vulkan", "triton", "cpu", "torch", "aule-attention"]
    sdxl = PRESETS["sdxl"][1]  # 1024 tokens, D64: aule-attention 0.5.0 can take it
    assert _planned(sdxl, "sdxl", every) == [
        "aule-kp vulkan", "aule-kp vulkan GpuTensor", TRITON_ROW, "torch SDPA cuda flash_attention",
        "torch SDPA cuda cudnn_attention", "aule-attention 0.5.0 vulkan"]
    assert _planned(sdxl, "sdxl", ["triton"]) == [TRITON_ROW]
    assert _planned(sdxl, "sdxl", ["cpu", "torch"]) == ["torch SDPA cuda flash_attention",
                                                         "torch SDPA cuda cudnn_attention"]
    # Scaled down for a CPU: the CPU backend and torch on the CPU; the Triton row stays (skipped or not).
    small = scale_cases([sdxl], 64)[0]
    assert _planned(small, "sdxl", every, scale=64) == [
        "aule-kp vulkan", "aule-kp cpu", TRITON_ROW, "torch SDPA cpu", "aule-attention 0.5.0 vulkan"]
    timing = dict(bench.plan_rows(small, "sdxl", ["triton"], 3, 64))[TRITON_ROW]
    assert timing.func is bench.bench_triton and timing.args == (small, 3)


@needs_matplotlib
def test_cli_backends_filter_rows_and_say_why_triton_did_not_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    monkeypatch.setitem(PRESETS, "tiny", [TINY])
    out = tmp_path / "tiny"
    assert main(["bench", "--preset", "tiny", "--repeat", "1", "--backends", "triton,torch", "--plots", str(out)]) == 0
    table = capsys.readouterr().out
    data = json.loads((out / "bench.json").read_text())
    by = {r["backend"]: r for r in data["rows"]}
    assert set(by) == {TRITON_ROW, "torch SDPA cpu"}
    assert by["torch SDPA cpu"]["ms"] > 0 and by["torch SDPA cpu"]["max_err"] <= bench_tol(TINY)
    triton = by[TRITON_ROW]
    if CUDA:
        assert triton["ms"] > 0 and triton["max_err"] <= bench_tol(TINY)
    else:
        assert triton["ms"] is None and triton["note"].startswith("skipped: ") and len(triton["note"]) > 12
        assert f"| {TRITON_ROW} | — | — | — | — | — | {triton['note']} |" in table
        assert triton["note"] in (out / "bench.md").read_text()
    # --vs adds the baselines to an explicit list; an unknown name is refused before anything runs.
    assert main(["bench", "--preset", "tiny", "--repeat", "1", "--backends", "cpu", "--vs"]) == 0
    assert "| aule-kp cpu |" in capsys.readouterr().out
    assert main(["bench", "--preset", "tiny", "--backends", "cpu,cuda"]) == 2
    assert "unknown backend(s) 'cuda'" in capsys.readouterr().err


def _fake_gpu_rows() -> List[Dict[str, Any]]:
    """A result set as the llama3-8b preset gives on a CUDA machine, with a triton column."""
    a, b = (Case(1, 32, s, s, 128, "float16", True, hkv=8) for s in (2048, 4096))
    rows = []
    for case, figures in ((a, {"aule-kp vulkan": 8.0, "aule-kp vulkan GpuTensor": 0.5, TRITON_ROW: 0.25,
                               "torch SDPA cuda flash_attention": 0.2, "torch SDPA cuda cudnn_attention": 0.125}),
                          (b, {"aule-kp vulkan GpuTensor": 1.6, TRITON_ROW: None,
                               "torch SDPA cuda flash_attention": 0.5})):
        for who, ms in figures.items():
            err = None if who.startswith("torch") or ms is None else 2e-4
            rows.append(bench._row(case, who, None if ms is None else ms / 1e3, err,
                                   note="" if ms else "failed: out of memory"))
    return rows


def test_outputs_carry_a_triton_column(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = _fake_gpu_rows()
    drawn: Dict[str, Any] = {}
    monkeypatch.setattr(plots, "matplotlib_available", lambda: True)
    monkeypatch.setattr(plots, "_grouped_barh", lambda path, cases, series, *a, **k: drawn.update(
        {Path(path).name: (cases, series)}))
    md = bench.format_table(rows) + plots.format_speedups(rows)
    plots.write_results(str(tmp_path), rows, {"preset": "llama3-8b", "scale": 1.0}, md)
    a, b = rows[0]["case"], rows[-1]["case"]
    # Latency and TFLOPS: triton is a series, present only where it has a time.
    for name in ("latency_ms.png", "tflops.png"):
        cases, series = drawn[name]
        assert cases == [a, b] and set(series[TRITON_ROW]) == {a}
    assert drawn["latency_ms.png"][1][TRITON_ROW][a] == pytest.approx(0.25)
    # Speedup: every aule-kp row against every torch row; triton beats cuDNN by 0.125 / 0.25 = 0.5x.
    cases, series = drawn["speedup.png"]
    assert series["triton vs torch SDPA cuda cudnn_attention"] == {a: pytest.approx(0.5)}
    assert series["triton vs torch SDPA cuda flash_attention"] == {a: pytest.approx(0.8)}
    assert series["vulkan GpuTensor vs torch SDPA cuda flash_attention"] == {a: pytest.approx(0.4),
                                                                             b: pytest.approx(0.5 / 1.6)}
    assert len(series) == 6
    data = json.loads((tmp_path / "bench.json").read_text())
    assert [r["backend"] for r in data["rows"]].count(TRITON_ROW) == 2
    assert {(s["ours"], s["baseline"]) for s in data["speedups"] if s["case"] == b} == {
        ("aule-kp vulkan GpuTensor", "torch SDPA cuda flash_attention")}
    text = (tmp_path / "bench.md").read_text()
    assert f"| {a} | {TRITON_ROW} | 0.250 | " in text and f"| {b} | {TRITON_ROW} | — |" in text
    assert f"| {a} | {TRITON_ROW} | torch SDPA cuda cudnn_attention | 0.5 |" in text


@needs_matplotlib
def test_triton_column_plots_for_real(tmp_path: Path) -> None:
    part = dict(bench._row(TINY, "host overhead", 5e-5), tflops=None, breakdown=True)
    written = plots.write_results(str(tmp_path), [*_fake_gpu_rows(), part], {"preset": "llama3-8b", "scale": 1.0},
                                  "x")
    # No row measured peak host memory: that plot is the one left out.
    pngs = [n for n in plots.PNG_FILES if n != plots.MEMORY_PNG]
    assert sorted(Path(p).name for p in written) == sorted(["bench.md", "bench.json", *pngs])
    assert all((tmp_path / n).read_bytes()[:4] == b"\x89PNG" for n in pngs)


def test_breakdown_rows_plot_apart_in_ms_and_no_speedup_without_baselines(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The host-overhead parts never share an axis with end-to-end rows and have no TFLOPS; without a
    baseline row there is no speedup plot at all (not an empty one)."""
    case = Case(1, 8, 64, 64, 64, "float32", False)
    rows = [bench._row(case, "aule-kp vulkan", 2e-3, 1e-7, 1.0), bench._row(case, "aule-kp cpu", 1e-3, 1e-7, 1.0),
            *(dict(bench._row(TINY, who, s), tflops=None, breakdown=True)
              for who, s in (("kp Sequence.eval()", 1e-4), ("host overhead", 5e-5)))]
    drawn: Dict[str, Any] = {}
    monkeypatch.setattr(plots, "matplotlib_available", lambda: True)
    monkeypatch.setattr(plots, "_grouped_barh", lambda path, cases, series, *a, **k: drawn.update(
        {Path(path).name: (cases, series)}))
    written = plots.write_results(str(tmp_path), rows, {"preset": "cpu", "scale": 1.0}, "x")
    assert set(drawn) == {plots.LATENCY_PNG, plots.TFLOPS_PNG, plots.MEMORY_PNG, plots.OVERHEAD_PNG}
    assert plots.SPEEDUP_PNG not in {Path(p).name for p in written}
    for name in (plots.LATENCY_PNG, plots.TFLOPS_PNG, plots.MEMORY_PNG):
        assert drawn[name][0] == [case.label()] and set(drawn[name][1]) == {"aule-kp vulkan", "aule-kp cpu"}
    cases, series = drawn[plots.OVERHEAD_PNG]
    assert cases == [TINY.label()] and series == {"kp Sequence.eval()": {TINY.label(): pytest.approx(0.1)},
                                                 "host overhead": {TINY.label(): pytest.approx(0.05)}}


@needs_vulkan
def test_tiny_call_overhead_rows_are_a_breakdown_without_tflops() -> None:
    rows = bench.tiny_call_overhead(repeat=3)
    assert len(rows) == 5 and all(r["breakdown"] and r["tflops"] is None and r["ms"] > 0 for r in rows)


@needs_matplotlib
def test_serving_preset_writes_its_five_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``bench --preset serving`` on the CPU backend with the baselines, contexts / 64 (all 16 or 32):
    prefill and decode rows with tokens/s, decode's KV cache size (q8_0 about a quarter of float32's),
    and the five PNGs."""
    from aule_kp import bench_serving

    assert main(["bench", "--preset", "serving", "--backends", "cpu", "--vs", "--repeat", "1", "--scale", "64",
                 "--plots", str(tmp_path)]) == 0
    assert "tokens/s" in capsys.readouterr().out
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    kinds = {r["case"].split()[0] for r in rows}
    assert kinds == {"prefill", "decode"}
    tol = {(c.label(), q8): serving_tolerance(c, q8) for c in bench_serving.cases(gpu=False, scale=64)
           for q8 in ((False, True) if c.kind == "decode" else (False,))}
    assert all(r["tokens_per_s"] > 0 and r["max_err"] <= tol[r["case"], r["backend"].endswith("q8_0")] for r in rows)
    q8 = {r["case"]: r["kv_cache_mb"] for r in rows if r["backend"] == "aule-kp cpu q8_0"}
    f32 = {r["case"]: r["kv_cache_mb"] for r in rows if r["backend"] == "aule-kp cpu" and r["kv_cache_mb"]}
    assert q8 and all(math.isclose(q8[c] / f32[c], 34 / 128) for c in q8)
    assert {p.name for p in tmp_path.glob("*.png")} == set(plots.SERVING_PNG_FILES)
    assert len(bench_serving.cases(gpu=True)) == 3 * 3 + 3 * 4  # prefill up to 8K, decode up to 32K


def serving_tolerance(case: Any, q8: bool) -> float:
    """Largest ``max_err`` of a correct serving row: the error of head 0 of the first sequence (what
    ``bench_serving._max_err`` measures, against float64 of the float inputs) on the benchmark's own
    seeded inputs. The float32 model (``conftest.output_tolerance``), and for a q8_0 cache
    (``q8_error`` per key and value: ``e_k``, ``e_v`` within ``h_k``, ``h_v``) the quantization's:

    * To first order the scores move by ``δ_j = scale·q·e_kj`` and the output channel ``c`` by
      ``Σ_j p_j e_vjc + Σ_j p_j (δ_j - δ̄) w_jc`` with ``w_jc = v_jc - o_c``; as ``Σ_j p_j w_jc = 0`` the
      second sum is ``Σ_jd scale·p_j q_d w_jc e_kjd``. Rounding errors of independent values are
      independent and zero-mean: Hoeffding bounds each sum by ``λ·sqrt(Σ (coefficient·h)²)`` (with
      conftest's λ, each failing with probability 2·exp(-λ²/2)); the value sum, given the keys' errors,
      weighs by the perturbed ``p̃_j <= p_j·exp(2Δ)`` (``Δ_j = scale·|q|·h_kj``, the worst score move;
      ``Δ = max Δ_j``).
    * Beyond first order (rigorous, worst case): with ``g_j = e^δ_j - 1 - δ_j`` (``|g_j| <= G_j =
      Δ_j²·e^Δ_j / 2``) and ``Z = Σ p e^δ`` (``|Z - 1| <= E = Σ p (e^Δ - 1)``, ``1/Z <= e^Δ̄``),
      ``p̃_j - p_j - p_j (δ_j - δ̄) = p_j ((δ_j - δ̄)(1/Z - 1) + (g_j - ḡ)/Z)``, so the output's remainder
      is at most ``Σ_j p_j |w_jc| ((Δ_j + Δ̄)·E + G_j + Ḡ)·e^Δ̄``.
    """
    from aule_kp import bench_serving

    data = bench_serving._rng_data(case)
    q, k, v = (x[:1, :1].astype(np.float64) for x in bench_serving._dense(case, data))
    lq, lk, d = q.shape[2], k.shape[2], case.d
    diag, left, right = band(lq, lk, causal=True, window=None, top_left=False)
    p = Problem(1, 1, 1, lq, lk, d, d, "float32", d ** -0.5, diag, left, right)
    tol = output_tolerance(p, q.astype(np.float32), k.astype(np.float32), v.astype(np.float32))
    if not q8:
        return tol
    q, k, v = q[0, 0], k[0, 0], v[0, 0]
    s = p.scale * q @ k.T
    s[~p.visible(np.arange(lq), np.arange(lk))] = -np.inf
    prob = np.exp(s - s.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    w = v[None] - (prob @ v)[:, None]  # [i, j, c]
    h_k, h_v = q8_error(k), q8_error(v)
    move = p.scale * np.abs(q) @ h_k.T  # Δ_ij
    top = float(move.max())
    scores = p.scale ** 2 * np.einsum("ij,id,jd,ijc->ic", prob ** 2, q ** 2, h_k ** 2, w ** 2)
    values = math.exp(4 * top) * (prob ** 2 @ h_v ** 2)
    first = LAMBDA * (np.sqrt(scores) + np.sqrt(values))
    mean = (prob * move).sum(-1, keepdims=True)
    e = (prob * np.expm1(move)).sum(-1, keepdims=True)
    g = move ** 2 * np.exp(move) / 2
    rest = np.exp(mean) * ((move + mean) * e + g + (prob * g).sum(-1, keepdims=True))  # [i, j]
    beyond = np.einsum("ij,ij,ijc->ic", prob, rest, np.abs(w))
    return tol + float((first + beyond).max())

