"""Tile tuning (aule_kp/tune.py; the cache file in aule_kp/vulkan/tuning_cache.py): the per-device
cache file, its use by ``config_for`` and ``backward_config``, and ``aule-kp tune`` end to end on lavapipe.

Cache tests run on a made-up lavapipe-like ``DeviceCaps`` (no device needed). The tuning runs use
the tiniest preset (B1 H2 L64 D32 float32) with two or three candidates: every new specialization
costs lavapipe seconds to compile, and the two runs below share theirs.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
from conftest import check, gradient_tolerances, problem
from reference import reference_backward

from aule_kp import tune as autotune
from aule_kp.cli import main
from aule_kp.dtypes import from_f32, to_f32
from aule_kp.vulkan import device as devmod
from aule_kp.vulkan import tuning_cache as tuning
from aule_kp.vulkan.backend import VulkanBackend
from aule_kp.vulkan.choice import backward_config, backward_reasons, config_for, forward_kernel, forward_reasons
from aule_kp.vulkan.probe import DeviceCaps

_NO_VULKAN = devmod.vulkan_unavailable()
needs_vulkan = pytest.mark.skipif(bool(_NO_VULKAN), reason=f"no Vulkan device: {_NO_VULKAN}")

QUICK = autotune.QUICK_CASES[0]


def fake_caps(**kw: Any) -> DeviceCaps:
    """A lavapipe-like CPU device: subgroup 8, 32 KiB shared memory, 1024 invocations."""
    base = dict(index=0, name="llvmpipe (test)", vendor="mesa", vendor_id=0x10005, device_id=0, type="cpu",
                api_version="1.3.0", driver_name="llvmpipe", driver_info="Mesa test", driver_version=7,
                uuid="0123456789abcdef0123456789abcdef", subgroup_size=8, min_subgroup_size=8, max_subgroup_size=8,
                subgroup_shuffle=True, subgroup_arithmetic=True, shared_memory=32768, max_storage_buffer_range=2**27,
                max_workgroup_invocations=1024, max_workgroup_count=(65535, 65535, 65535), max_push_constants=256,
                fp16=True, int8=True, coopmat=False, coopmat_shapes=(), coopmat2=False,
                host_visible_device_memory=True)
    base.update(kw)
    return DeviceCaps(**base)


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own cache dir (never the user's), with the cache switched on."""
    d = tmp_path / "cache"
    monkeypatch.setenv("AULE_KP_CACHE_DIR", str(d))
    monkeypatch.delenv("AULE_KP_NO_TUNING_CACHE", raising=False)
    return d


def entry(**tiles: int) -> Dict[str, Any]:
    return {**tiles, "ms": 1.0, "default_ms": 2.0, "case": "test"}


def defaults(caps: DeviceCaps, p, variant: str = "scalar"):
    with tuning.defaults_only():
        return config_for(variant, caps, p), backward_config(caps, p)


P = problem(lq=64, lk=64, dk=32, dv=32)
FWD_WIN = dict(br=64, bc=4, wg=64, tpr=2, rpt=2, stage=0)  # legal on fake_caps, not its default
BWD_WIN = dict(br=12, bc=1, wg=8, tpr=8, rpt=12, stage=0)


def tiles_of(k) -> Dict[str, int]:
    return {f: getattr(k, f) for f in tuning.TILE_FIELDS}


# ---- the cache file -------------------------------------------------------------------------------

def test_cache_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert tuning.cache_dir() == tmp_path / "cache"
    assert tuning.cache_dir(str(tmp_path / "x")) == tmp_path / "x"
    monkeypatch.delenv("AULE_KP_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tuning.cache_dir() == tmp_path / "xdg" / "aule_kp"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tuning.cache_dir() == tmp_path / "home" / ".cache" / "aule_kp"
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
    assert tuning.cache_dir() == tmp_path / "local" / "aule_kp"


def test_round_trip_merge_memo_and_clear(cache: Path) -> None:
    caps = fake_caps()
    key = tuning.problem_key("fwd.scalar", P)
    assert key == "fwd.scalar/dk32-dv32/float32/full/Lq64-Lk64"
    path = tuning.save(caps, {key: entry(**FWD_WIN)})
    assert path == cache / f"tuning-{caps.uuid}-{caps.driver_version}.json"
    assert [p.name for p in cache.iterdir()] == [path.name]  # the temporary file was renamed
    data = json.loads(path.read_text())
    assert data["format"] == tuning.FORMAT
    assert (data["device"]["uuid"], data["device"]["driver_version"]) == (caps.uuid, caps.driver_version)
    assert tuning.load(caps)[key]["bc"] == 4
    assert tuning.lookup(caps, "fwd.scalar", P) == (key, FWD_WIN)
    # A second save merges.
    key2 = tuning.problem_key("bwd.scalar", P)
    tuning.save(caps, {key2: entry(**BWD_WIN)})
    assert set(tuning.load(caps)) == {key, key2}
    # Reads are memoised per process: an edit behind its back is not seen until a write invalidates.
    data = json.loads(path.read_text())
    data["entries"][key]["bc"] = 2
    path.write_text(json.dumps(data))
    assert tuning.lookup(caps, "fwd.scalar", P)[1]["bc"] == 4
    tuning.save(caps, {})
    assert tuning.lookup(caps, "fwd.scalar", P)[1]["bc"] == 2
    assert tuning.clear(caps) and not path.exists()
    assert tuning.lookup(caps, "fwd.scalar", P) is None and not tuning.clear(caps)


def test_winners_of_another_build_are_ignored(monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    # The file is keyed by device and driver, not by aule-kp's build: tiles timed on other shaders (an
    # upgrade) overrode the defaults of new ones for good, where the self-check's verdicts beside them
    # record the build (version + SPIR-V digest) and check again.
    from aule_kp.vulkan import build

    caps = fake_caps()
    key = tuning.problem_key("fwd.scalar", P)
    path = tuning.save(caps, {key: entry(**FWD_WIN)})
    assert json.loads(path.read_text())["entries"][key]["build"] == build.build_id("fwd.scalar")
    assert tuning.lookup(caps, "fwd.scalar", P) == (key, FWD_WIN)
    monkeypatch.setitem(build._builds, "fwd.scalar", "another-build")
    with caplog.at_level(logging.WARNING, logger="aule_kp"):
        assert tuning.lookup(caps, "fwd.scalar", P) is None
        assert tiles_of(config_for("scalar", caps, P)) == tiles_of(defaults(caps, P)[0])
    assert any("another aule-kp build" in r.getMessage() for r in caplog.records)
    # An entry with no build (written before builds were recorded) is one of another build too.
    data = json.loads(path.read_text())
    del data["entries"][key]["build"]
    path.write_text(json.dumps(data))
    tuning.invalidate(path)
    monkeypatch.delitem(build._builds, "fwd.scalar")
    assert tuning.lookup(caps, "fwd.scalar", P) is None


def test_key_includes_uuid_and_driver_version(cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    caps = fake_caps()
    tuning.save(caps, {tuning.problem_key("fwd.scalar", P): entry(**FWD_WIN)})
    assert tuning.lookup(caps, "fwd.scalar", P) is not None
    new_driver = replace(caps, driver_version=caps.driver_version + 1)
    other_gpu = replace(caps, uuid="f" * 32)
    for c in (new_driver, other_gpu):
        assert tuning.cache_path(c) != tuning.cache_path(caps)
        assert tuning.lookup(c, "fwd.scalar", P) is None
        assert tiles_of(config_for("scalar", c, P)) == tiles_of(defaults(c, P)[0])
    # The old driver's file put where the new driver's belongs: its contents say whose it is.
    tuning.cache_path(new_driver).write_bytes(tuning.cache_path(caps).read_bytes())
    tuning.invalidate(tuning.cache_path(new_driver))
    with caplog.at_level(logging.WARNING, logger="aule_kp"):
        assert tuning.lookup(new_driver, "fwd.scalar", P) is None
    assert "written for device" in caplog.text


@pytest.mark.parametrize("bad", ["not json", "format", "directory"])
def test_corrupt_file_warns_once_and_gives_defaults(bad: str, cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    caps = fake_caps()
    path = tuning.cache_path(caps)
    path.parent.mkdir(parents=True)
    if bad == "not json":
        path.write_text('{"format": 1, "entries": {')
    elif bad == "format":
        path.write_text(json.dumps({"format": 99, "device": {"uuid": caps.uuid, "driver_version": 7}, "entries": {
            tuning.problem_key("fwd.scalar", P): entry(**FWD_WIN)}}))
    else:
        path.mkdir()  # unreadable as a file
    fwd, bwd = defaults(caps, P)
    with caplog.at_level(logging.WARNING, logger="aule_kp"):
        for _ in range(3):
            assert config_for("scalar", caps, P) == fwd
            assert backward_config(caps, P) == bwd
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage()
    if bad != "directory":  # tune can still write over it
        tuning.save(caps, {tuning.problem_key("fwd.scalar", P): entry(**FWD_WIN)})
        assert tiles_of(config_for("scalar", caps, P)) == FWD_WIN


# ---- config_for / backward_config read it -------------------------------------------------------

def test_config_for_and_backward_config_pick_cached_winners(monkeypatch: pytest.MonkeyPatch) -> None:
    caps = fake_caps()
    fwd, bwd = defaults(caps, P)
    assert tiles_of(fwd) != FWD_WIN and tiles_of(bwd.dkdv) != BWD_WIN
    tuning.save(caps, {tuning.problem_key("fwd.scalar", P): entry(**FWD_WIN),
                       tuning.problem_key("bwd.scalar", P): entry(**BWD_WIN)})
    cfg = config_for("scalar", caps, P)
    assert cfg == replace(fwd, **FWD_WIN)
    assert forward_kernel(caps, P) == cfg
    b = backward_config(caps, P)
    assert b.dkdv == replace(bwd.dkdv, **BWD_WIN) and b.dq == replace(bwd.dq, **BWD_WIN) and b.pre == bwd.pre
    # Lengths within a factor of two share the winner; farther lengths, another dtype or causality do not.
    assert tiles_of(config_for("scalar", caps, problem(lq=100, lk=40, dk=32, dv=32))) == FWD_WIN
    for other in (problem(lq=300, lk=64, dk=32, dv=32), problem(lq=64, lk=64, dk=32, dv=32, dtype="float16"),
                  problem(lq=64, lk=64, dk=32, dv=32, causal=True), problem(lq=64, lk=64, dk=64, dv=64)):
        assert config_for("scalar", caps, other) == defaults(caps, other)[0]
    monkeypatch.setenv("AULE_KP_NO_TUNING_CACHE", "1")
    assert config_for("scalar", caps, P) == fwd and backward_config(caps, P) == bwd


@pytest.mark.parametrize("fwd_tiles,why", [
    (dict(FWD_WIN, br=100), "BR must be WG/TPR*RPT"),
    (dict(br=32, bc=128, wg=64, tpr=2, rpt=1, stage=1), "shared memory"),  # 4 * (128 * 64 + 2) B > 32 KiB
    (dict(br=1024, bc=8, wg=2048, tpr=2, rpt=1, stage=0), "invocations per workgroup"),
    (dict(br=4, bc=8, wg=64, tpr=16, rpt=1, stage=0), "TPR must be a power of two"),
    (dict(br=64, bc=8, wg=64, tpr=1, rpt=1, stage=2), "out of range"),
])
def test_illegal_cached_entry_is_ignored(fwd_tiles: Dict[str, int], why: str,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caps = fake_caps()
    fwd, bwd = defaults(caps, P)
    assert why in "; ".join(forward_reasons(replace(fwd, **fwd_tiles), caps, P))
    tuning.save(caps, {tuning.problem_key("fwd.scalar", P): entry(**fwd_tiles),
                       tuning.problem_key("bwd.scalar", P): entry(**dict(BWD_WIN, br=13))})
    with caplog.at_level(logging.WARNING, logger="aule_kp"):
        assert config_for("scalar", caps, P) == fwd
        assert backward_config(caps, P) == bwd
    assert why in caplog.text and "BR must be WG/TPR*RPT (BR=13" in caplog.text


def test_malformed_entry_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    caps = fake_caps()
    tuning.save(caps, {tuning.problem_key("fwd.scalar", P): {"br": "wide", "bc": 8}})
    with caplog.at_level(logging.WARNING, logger="aule_kp"):
        assert config_for("scalar", caps, P) == defaults(caps, P)[0]
    assert "ignoring the tuning cache entry" in caplog.text


def test_candidates_are_legal_and_near_the_default() -> None:
    caps = fake_caps()
    fwd, bwd = defaults(caps, P)
    for default, reasons in ((fwd, forward_reasons), (bwd, backward_reasons)):
        cands = autotune.candidates(default, caps, P, 12)
        assert len(cands) == 12 and default not in cands
        assert all(not reasons(c, caps, P) for c in cands)
        base = tiles_of(default.dkdv if default is bwd else default)
        first = tiles_of(cands[0].dkdv if default is bwd else cands[0])
        assert sum(first[f] != base[f] for f in tuning.TILE_FIELDS if f != "br") == 1  # one step away


# ---- tuning on the device ---------------------------------------------------------------------------

@needs_vulkan
def test_cli_tune_quick_end_to_end(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture) -> None:
    target = tmp_path / "cli-cache"
    assert main(["tune", "--quick", "--repeat", "2", "--cache-dir", str(target)]) == 0
    out = capsys.readouterr().out
    assert "| default |" in out and " * |" in out and "2 winner(s)" in out and str(target) in out
    caps = devmod.get_device().caps
    path = tuning.cache_path(caps, str(target))
    stored = json.loads(path.read_text())["entries"]
    p = QUICK.problem()
    with tuning.defaults_only():
        fwd = forward_kernel(caps, p)
        bwd = backward_config(caps, p)
    fkey, bkey = tuning.problem_key(f"fwd.{fwd.variant}", p), tuning.problem_key(f"bwd.{bwd.variant}", p)
    assert set(stored) == {fkey, bkey}
    # A later config_for / backward_config reads the winners (the default cache dir is elsewhere).
    assert tiles_of(config_for(fwd.variant, caps, p)) == tiles_of(fwd)
    monkeypatch.setenv("AULE_KP_CACHE_DIR", str(target))
    assert tiles_of(config_for(fwd.variant, caps, p)) == {f: stored[fkey][f] for f in tuning.TILE_FIELDS}
    assert tiles_of(backward_config(caps, p).dq) == {f: stored[bkey][f] for f in tuning.TILE_FIELDS}
    assert main(["tune", "--show"]) == 0
    shown = capsys.readouterr().out
    assert fkey in shown and bkey in shown and str(path) in shown
    assert main(["tune", "--clear"]) == 0 and not path.exists()
    assert config_for(fwd.variant, caps, p) == fwd


@needs_vulkan
def test_tune_keeps_the_fastest_correct_candidate(cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Candidate 0 is made the fastest, 1 returns wrong numbers, 2 fails to build: the winner is 0,
    and the tuned configs still match the float64 reference."""
    real = autotune._trial
    seen: Dict[str, List[Any]] = {}

    def trial(job, cfg, dev, repeat):
        if cfg is job.default:
            return 2.0, real(job, cfg, dev, 1)[1]
        i = job.candidates.index(cfg)
        seen.setdefault(job.kind, []).append(cfg)
        if i == 2:
            raise RuntimeError("vkCreateComputePipelines failed")
        outputs = real(job, cfg, dev, 1)[1]
        return (1.0, outputs) if i == 0 else (0.5, tuple(o + np.ones_like(o) for o in outputs))

    monkeypatch.setattr(autotune, "_trial", trial)
    with caplog.at_level(logging.WARNING, logger="aule_kp"):
        report = autotune.tune([QUICK], max_candidates=3, repeat=1)
    assert [r["status"][:8] for r in report.rows] == ["default", "ok", "mismatch", "failed: "] * 2
    assert [r["winner"] for r in report.rows] == [False, True, False, False] * 2
    assert "disagrees with the default" in caplog.text and "vkCreateComputePipelines failed" in caplog.text
    assert report.path == tuning.cache_path(devmod.get_device().caps)

    caps = devmod.get_device().caps
    p = QUICK.problem()
    fwd = config_for(forward_kernel(caps, p).variant, caps, p)
    bwd = backward_config(caps, p)
    assert fwd == seen["forward"][0] and bwd == seen["backward"][0]
    assert fwd != defaults(caps, p, fwd.variant)[0]
    check(p, np.random.default_rng(5), config=fwd)
    rng = np.random.default_rng(6)
    q, k, v, dout = (from_f32(rng.standard_normal(s).astype(np.float32), p.dtype)
                     for s in ((1, 2, 64, 32), (1, 2, 64, 32), (1, 2, 64, 32), (1, 2, 64, 32)))
    out, lse = VulkanBackend().forward(p, q, k, v, None)
    grads = VulkanBackend().backward(p, q, k, v, out, dout, lse, None, config=bwd)
    tols = gradient_tolerances(p, q, k, v, dout)
    for got, want, tol in zip(grads[:3], reference_backward(q, k, v, dout, p)[:3], tols):
        assert np.abs(to_f32(got, p.dtype) - want).max() <= tol


def test_default_cases_by_device_and_overrides() -> None:
    assert autotune.default_cases(fake_caps()) == autotune.CPU_CASES
    assert autotune.default_cases(fake_caps(type="discrete")) == autotune.GPU_CASES
    cases = autotune.default_cases(fake_caps(type="discrete"), quick=True, dtype="float16", head_dims=[64, 128])
    assert [(c.d, c.dtype, c.lq) for c in cases] == [(64, "float16", 64), (128, "float16", 64)]


@needs_vulkan
@pytest.mark.parametrize("args", [["--passes", "sideways"], ["--head-dim", "12"]])
def test_cli_tune_rejects_bad_arguments(args: List[str], capsys: pytest.CaptureFixture) -> None:
    assert main(["tune", "--quick", *args]) == 2
    assert "aule-kp tune:" in capsys.readouterr().err
