"""``aule-kp bench``: model presets, ``--scale``, and the ``--plots`` results folder (table, JSON, PNGs)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List

import pytest

import aule_kp.vulkan.device as devmod
from aule_kp import bench, plots
from aule_kp.bench import PRESETS, Case, scale_cases
from aule_kp.cli import main

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
    for name in plots.PNG_FILES:
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


def test_speedups_use_fastest_aule_kp_row() -> None:
    rows = [{"case": "c", "backend": "aule-kp vulkan", "ms": 2.0}, {"case": "c", "backend": "aule-kp cpu", "ms": 4.0},
            {"case": "c", "backend": "torch SDPA cpu", "ms": 6.0}, {"case": "c", "backend": "aule-attention 0.5.0",
                                                                  "ms": None}]
    assert plots.speedups(rows) == [{"case": "c", "baseline": "torch SDPA cpu", "ours": "aule-kp vulkan",
                                     "speedup": 3.0}]


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
    monkeypatch.setitem(PRESETS, "tiny", [Case(1, 2, 32, 32, 32, "float32", False)])
    out = tmp_path / "tiny"
    argv = ["bench", "--preset", "tiny", "--repeat", "1", "--backends", "vulkan", "--vs", "--plots", str(out)]
    assert main(argv) == 0
    data = _check_folder(out)
    backends = {r["backend"] for r in data["rows"]}
    assert "aule-kp vulkan" in backends
    assert all(r["max_err"] < 1e-4 for r in data["rows"] if r["backend"] == "aule-kp vulkan")
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
