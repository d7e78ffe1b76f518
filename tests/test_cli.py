"""``aule-kp`` as a new user meets it: bad numbers refused up front, unwritable outputs refused before a
long run, failed rows in the exit code, ``tune --quick`` bounded, and a demo table whose columns line up."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List

import pytest

from aule_kp import bench
from aule_kp import tune as autotune
from aule_kp.bench import PRESETS, Case
from aule_kp.cli import _table, main
from aule_kp.vulkan import device as devmod

_NO_VULKAN = devmod.vulkan_unavailable()
needs_vulkan = pytest.mark.skipif(bool(_NO_VULKAN), reason=f"no Vulkan device: {_NO_VULKAN}")

TINY = Case(1, 2, 32, 32, 16, "float32", False)


@pytest.mark.parametrize("argv, option", [
    (["demo", "--repeat", "0"], "--repeat"),
    (["bench", "--repeat", "0"], "--repeat"),
    (["bench", "--repeat", "-3"], "--repeat"),
    (["bench", "--repeat", "two"], "--repeat"),
    (["bench", "--scale", "0"], "--scale"),
    (["bench", "--scale", "nan"], "--scale"),
    (["tune", "--repeat", "0"], "--repeat"),
    (["tune", "--quick", "--candidates", "-1"], "--candidates"),
    (["tune", "--candidates", "many"], "--candidates"),
])
def test_bad_numbers_are_usage_errors(argv: List[str], option: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Refused by argparse (exit 2, the option named) before anything runs: no StatisticsError, no failed rows."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}:" in err and ("> 0" in err or ">= 0" in err)


def _must_not_run(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the benchmark ran although an output path was unwritable")


def test_unwritable_outputs_fail_before_the_benchmark(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(bench, "run", _must_not_run)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    # Paths under a regular file: unwritable even as root (permission bits are not).
    for argv, option in ((["--plots", str(a_file / "plots")], "--plots"),
                         (["--markdown", str(a_file / "bench.md")], "--markdown"),
                         (["--markdown", str(tmp_path)], "--markdown")):
        assert main(["bench", "--preset", "cpu", *argv]) == 2
        err = capsys.readouterr().err
        assert f"aule-kp bench: {option} " in err and "cannot write there" in err, err
    assert a_file.read_text() == "x"


def test_writable_outputs_are_prepared_and_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: Dict[str, Any] = {}

    def run(preset: str, vs: bool, repeat: int, markdown: str, backends: List[str], **kw: Any) -> List[Any]:
        seen.update(markdown=markdown, plots=kw["plots"])
        return []

    monkeypatch.setattr(bench, "run", run)
    plots_dir, md = tmp_path / "new" / "plots", tmp_path / "bench.md"
    assert main(["bench", "--preset", "cpu", "--plots", str(plots_dir), "--markdown", str(md)]) == 0
    assert plots_dir.is_dir() and seen == {"markdown": str(md), "plots": str(plots_dir)}


def test_a_failed_row_gives_a_nonzero_exit(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def broken(case: Case, backend: str, repeat: int) -> Dict[str, Any]:
        raise RuntimeError("device lost")

    monkeypatch.setitem(PRESETS, "tiny", [TINY])
    monkeypatch.setattr(bench, "bench_ours", broken)
    assert main(["bench", "--preset", "tiny", "--repeat", "1", "--backends", "cpu"]) == 1
    captured = capsys.readouterr()
    assert "| aule-kp cpu | — |" in captured.out and "failed: device lost" in captured.out
    assert "1 row(s) failed" in captured.err and "device lost" in captured.err


def test_candidate_limit() -> None:
    caps = type("Caps", (), {"type": "cpu"})()
    gpu = type("Caps", (), {"type": "discrete"})()
    assert autotune.candidate_limit(caps) == autotune.MAX_CANDIDATES["cpu"]
    assert autotune.candidate_limit(gpu) == autotune.MAX_CANDIDATES["gpu"]
    assert autotune.candidate_limit(caps, max_candidates=autotune.ALL_CANDIDATES) == autotune.ALL_CANDIDATES
    assert autotune.candidate_limit(gpu, quick=True) == 2
    assert autotune.candidate_limit(gpu, quick=True, max_candidates=autotune.ALL_CANDIDATES) == 2
    assert autotune.candidate_limit(gpu, quick=True, max_candidates=1) == 1
    assert autotune.candidate_limit(gpu, max_candidates=0) == 0
    with pytest.raises(ValueError, match="max_candidates"):
        autotune.candidate_limit(caps, max_candidates=-1)


@needs_vulkan
def test_tune_quick_bounds_the_work_whatever_candidates_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """``tune --quick --candidates all`` times at most 2 candidates per problem and pass (counted, not timed)."""
    measured: List[Any] = []

    def measure(job: Any, cfg: Any, dev: Any, repeat: int, seed: int) -> Dict[str, Any]:
        measured.append((job.kind, cfg))
        return {"case": job.case.label(), "pass": job.kind, "variant": cfg.variant, "tiles": "", "ms": None,
                "speedup": None, "status": "failed: not timed in this test", "winner": False, "key": job.key,
                "config": cfg}

    monkeypatch.setattr(autotune, "_measure", measure)
    main(["tune", "--quick", "--candidates", "all", "--cache-dir", str(tmp_path)])
    assert "--quick times at most 2 candidates" in capsys.readouterr().err
    # One quick problem, forward and backward: the default and 2 candidates each.
    assert len(autotune.QUICK_CASES) == 1
    assert sorted(kind for kind, _ in measured) == ["backward"] * 3 + ["forward"] * 3
    # Without the cap there would be far more to time (the issue saw 980).
    caps = devmod.get_device().caps
    forward_default = next(cfg for kind, cfg in measured if kind == "forward")
    p = autotune.QUICK_CASES[0].problem()
    assert len(autotune.candidates(forward_default, caps, p, autotune.ALL_CANDIDATES)) > 2


def test_table_columns_fit_their_widest_cell() -> None:
    lines = _table(["a", "shape", "ms"], [["x", "(1, 2)", "1.5"], ["yy", "(10, 20) causal", "100.25"]],
                   [False, False, True])
    assert lines == ["a  shape               ms",
                     "-------------------------",
                     "x  (1, 2)             1.5",
                     "yy (10, 20) causal 100.25"]


def test_demo_table_columns_line_up(capsys: pytest.CaptureFixture[str]) -> None:
    """Every row's dtype and mask cells start where their headers start, and the numbers end where theirs end."""
    assert main(["demo", "--repeat", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(out) if line.startswith("backend"))
    rows = out[header + 2:out.index("", header)]
    assert len(rows) >= 4 and any("causal" in r for r in rows) and any(" - " in r for r in rows)
    starts = {name: out[header].index(name) for name in ("dtype", "mask")}
    ends = [m.end() for m in re.finditer(r"\S+(?: err)?", out[header])][-3:]  # ms, GFLOP/s, max err
    for row in rows:
        dtype = re.search(r"float(16|32)", row)
        assert dtype and dtype.start() == starts["dtype"], (row, starts)
        assert row[starts["mask"]:].split()[0] in ("causal", "-"), row
        assert [m.end() for m in re.finditer(r"\S+", row)][-3:] == ends, (row, out[header])


@pytest.mark.parametrize("argv", [["tune", "--quick"], ["tune", "--clear"], ["tune", "--show"], ["doctor"],
                                  ["doctor", "--clear"]])
def test_unwritable_cache_dir_is_refused_up_front(argv: List[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A --cache-dir that cannot be a folder: exit 2 naming the option before any work (tune wrote its
    winners only after timing every candidate and died there with a NotADirectoryError traceback;
    --clear and doctor raised it at once)."""
    from aule_kp.vulkan import selfcheck

    monkeypatch.setattr(autotune, "tune", _must_not_run)
    monkeypatch.setattr(selfcheck, "run_checks", _must_not_run)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for cache_dir in (a_file, a_file / "sub"):
        assert main([*argv, "--cache-dir", str(cache_dir)]) == 2
        err = capsys.readouterr().err
        assert f"aule-kp {argv[0]}: --cache-dir {cache_dir}: cannot write there" in err, err
    assert a_file.read_text() == "x"
