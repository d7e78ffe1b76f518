"""The per-driver self-check (aule_kp/vulkan/selfcheck.py) and ``aule-kp doctor``, on lavapipe.

A wrong kernel is made on the device: ``AULE_KP_TEST_CORRUPT=<family>`` (test-only) sets the
TEST_CORRUPT specialization constant of that family's pipelines, whose stores then add 1.0 to every
output. The check must turn that family off with one warning, the automatic choice must take the
next variant (split-KV -> the forward kernel; the scalar forward -> no Vulkan kernel, so ``auto``
takes the CPU backend), results must stay right, and a second process must reuse the verdict.

The rest of the suite runs with the automatic check off (conftest.py); every test here turns it on
with a cache directory of its own.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Iterator, List

import numpy as np
import pytest
from conftest import output_tolerance
from reference import reference_attention

import aule_kp
from aule_kp import dispatch
from aule_kp.call import attention_forward
from aule_kp.cli import main
from aule_kp.dtypes import from_f32, to_f32
from aule_kp.errors import BackendUnavailable
from aule_kp.vulkan import device as devmod
from aule_kp.vulkan import selfcheck, tuning_cache
from aule_kp.vulkan.backend import VulkanBackend
from aule_kp.vulkan.choice import canary_config
from aule_kp.vulkan.configs import KernelConfig, SplitKVConfig

_NO_VULKAN = devmod.vulkan_unavailable()
pytestmark = pytest.mark.skipif(bool(_NO_VULKAN), reason=f"no Vulkan device: {_NO_VULKAN}")

# Lq = 1 over 600 keys, GQA 4:1: lavapipe (a CPU driver) always runs it through split-KV.
DECODE_SHAPES = ((1, 4, 1, 64), (1, 1, 600, 64), (1, 1, 600, 64))


@pytest.fixture(autouse=True)
def checking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The automatic check on, verdicts in a directory of this test's own, no corruption, and the
    Vulkan backend's memoised choices forgotten before and after."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("AULE_KP_CACHE_DIR", str(cache))
    monkeypatch.setenv("AULE_KP_SELF_CHECK", "1")
    monkeypatch.delenv("AULE_KP_TEST_CORRUPT", raising=False)
    for name in ("AULE_KP_SPLIT_KV", "AULE_KP_FORCE_VARIANT", "AULE_KP_FORCE_BWD_VARIANT", "AULE_KP_WORKAROUNDS"):
        monkeypatch.delenv(name, raising=False)
    dispatch.get("vulkan")._choices.clear()
    yield cache
    dispatch.get("vulkan")._choices.clear()


def decode_inputs(dtype: str = "float32"):
    rng = np.random.default_rng(7)
    return tuple(from_f32(rng.standard_normal(s).astype(np.float32), dtype) for s in DECODE_SHAPES)


def checked_forward(q, k, v, backend: str) -> np.ndarray:
    """The call's output, checked against the float64 reference."""
    out, _, p = attention_forward(q, k, v, backend=backend)
    ref, _ = reference_attention(q, k, v, p)
    np.testing.assert_allclose(to_f32(out, p.dtype), ref, atol=output_tolerance(p, q, k, v), rtol=0)
    return out


def self_check_warnings(caught: List[warnings.WarningMessage]) -> List[str]:
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and "self-check" in str(w.message)]


def test_clean_kernels_pass_and_are_checked_once(checking: Path) -> None:
    runs = selfcheck.stats["runs"]
    families = ("fwd.scalar", "splitkv", "bwd.scalar")
    verdicts = selfcheck.run_checks(families, canary_config, ["float32"])
    assert [v.ok for v in verdicts] == [True] * 3
    assert all(v.canaries >= 1 and v.worst < 1.0 for v in verdicts)
    assert selfcheck.stats["runs"] == runs + 3
    recorded = json.loads(next(checking.glob("selfcheck-*.json")).read_text())["verdicts"]
    assert set(recorded) == {f"{f}/float32" for f in families}
    # Recorded: using those kernels checks nothing again, in this process or (same file) another.
    q, k, v = decode_inputs()
    checked_forward(q, k, v, "vulkan")
    assert selfcheck.stats["runs"] == runs + 3
    dev = aule_kp.info()["devices"][devmod.selected_index()]
    assert dev["self_check"]["splitkv/float32"]["ok"] is True


def test_corrupt_split_kv_is_turned_off_and_the_verdict_reused(checking: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = decode_inputs()
    p = attention_forward(q, k, v, backend="cpu")[2]
    with monkeypatch.context() as m:
        m.setenv("AULE_KP_SELF_CHECK", "0")
        assert isinstance(VulkanBackend().config(p), SplitKVConfig)  # the choice without the check
    monkeypatch.setenv("AULE_KP_TEST_CORRUPT", "splitkv")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = checked_forward(q, k, v, "vulkan")
        second = checked_forward(q, k, v, "vulkan")
    np.testing.assert_array_equal(first, second)
    messages = self_check_warnings(caught)
    assert len(messages) == 1 and "splitkv" in messages[0] and "float32" in messages[0]
    cfg = VulkanBackend().config(p)
    assert isinstance(cfg, KernelConfig) and cfg.variant == "scalar"
    recorded = json.loads(next(checking.glob("selfcheck-*.json")).read_text())["verdicts"]
    assert recorded["splitkv/float32"]["ok"] is False and recorded["fwd.scalar/float32"]["ok"] is True
    assert "off by" in recorded["splitkv/float32"]["detail"]
    reasons = aule_kp.info()["devices"][devmod.selected_index()]["self_check"]
    assert reasons["splitkv/float32"]["ok"] is False

    # A second process, without the corruption: the verdict is read, not re-run (a re-run would
    # pass and bring split-KV back), and that process warns once too.
    code = textwrap.dedent("""
        import json, warnings
        import numpy as np
        from aule_kp.call import attention_forward
        from aule_kp.vulkan import selfcheck
        from aule_kp.vulkan.backend import VulkanBackend
        from aule_kp.vulkan.configs import SplitKVConfig
        rng = np.random.default_rng(7)
        q, k, v = (rng.standard_normal(s).astype(np.float32) for s in SHAPES)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out, _, p = attention_forward(q, k, v, backend="vulkan")
            attention_forward(q, k, v, backend="vulkan")
        print(json.dumps({"split": isinstance(VulkanBackend().config(p), SplitKVConfig),
                          "runs": selfcheck.stats["runs"],
                          "warnings": [str(w.message) for w in caught if "self-check" in str(w.message)]}))
    """).replace("SHAPES", repr(DECODE_SHAPES))
    env = {key: val for key, val in os.environ.items() if key != "AULE_KP_TEST_CORRUPT"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"split": False, "runs": 0, "warnings": result["warnings"]}
    assert len(result["warnings"]) == 1 and "splitkv" in result["warnings"][0]


def test_doctor_reports_and_rechecks(checking: Path, capsys: pytest.CaptureFixture,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AULE_KP_TEST_CORRUPT", "splitkv")
    assert main(["doctor", "--kernels", "splitkv", "fwd.scalar", "--dtype", "float32", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["wrong"] == ["splitkv/float32"]
    assert {(c["family"], c["ok"]) for c in report["checks"]} == {("splitkv", False), ("fwd.scalar", True)}
    q, k, v = decode_inputs()
    p = attention_forward(q, k, v, backend="cpu")[2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert isinstance(VulkanBackend().config(p), KernelConfig)
    # Fixed (here: the corruption gone), doctor re-checks and split-KV comes back.
    monkeypatch.delenv("AULE_KP_TEST_CORRUPT")
    assert main(["doctor", "--kernels", "splitkv", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "| splitkv | float32 | ok |" in out and "every kernel checked is correct" in out
    assert isinstance(VulkanBackend().config(p), SplitKVConfig)
    assert main(["doctor", "--clear"]) == 0 and "removed" in capsys.readouterr().out
    assert not list(checking.glob("selfcheck-*.json"))
    assert main(["doctor", "--kernels", "nope"]) == 2


def test_corrupt_scalar_forward(checking: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The only forward variant lavapipe runs, wrong: Vulkan says why, ``auto`` takes the CPU backend."""
    monkeypatch.setenv("AULE_KP_TEST_CORRUPT", "fwd.scalar")
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((1, 2, 24, 64), (1, 2, 40, 64), (1, 2, 40, 64)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(BackendUnavailable, match="self-check"):
            aule_kp.flash_attention(q, k, v, causal=True, backend="vulkan")
        out = aule_kp.flash_attention(q, k, v, causal=True)
    assert len(self_check_warnings(caught)) == 1
    p = attention_forward(q, k, v, causal=True, backend="cpu")[2]
    np.testing.assert_allclose(out, reference_attention(q, k, v, p)[0], atol=output_tolerance(p, q, k, v), rtol=0)


def test_corrupt_backward_is_turned_off(checking: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AULE_KP_TEST_CORRUPT", "bwd.scalar")
    q, k, v = decode_inputs()
    p = attention_forward(q, k, v, backend="cpu")[2]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reasons = VulkanBackend().backward_reasons(p)
        again = VulkanBackend().backward_reasons(p)
    assert reasons == again and any("self-check" in r for r in reasons)
    assert len(self_check_warnings(caught)) == 1


def test_off_switch(checking: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AULE_KP_SELF_CHECK", "0")
    monkeypatch.setenv("AULE_KP_TEST_CORRUPT", "splitkv")
    runs = selfcheck.stats["runs"]
    q, k, v = decode_inputs()
    p = attention_forward(q, k, v, backend="cpu")[2]
    assert isinstance(VulkanBackend().config(p), SplitKVConfig)
    assert selfcheck.stats["runs"] == runs and not list(checking.glob("selfcheck-*.json"))


def test_a_pipeline_the_driver_refuses_is_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    """MoltenVK's failing pipeline creation (llama.cpp #13450) as the check sees it: an exception."""
    def refuse(*args, **kwargs):
        raise RuntimeError("vkCreateComputePipelines failed: VK_ERROR_INITIALIZATION_FAILED")

    monkeypatch.setattr(selfcheck, "_run", refuse)
    verdict = selfcheck.check("splitkv", "float32", devmod.get_device(), canary_config)
    assert verdict.ok is False and math.isinf(verdict.worst) and "VK_ERROR_INITIALIZATION_FAILED" in verdict.detail


def test_stale_or_inapplicable_verdicts_change_nothing(checking: Path) -> None:
    dev = devmod.get_device()
    path = selfcheck.cache_path(dev.caps)
    tuning_cache.write_cache_file(path, dev.caps, selfcheck.SECTION,
                            {"splitkv/float32": {"ok": False, "detail": "old build", "build": "0" * 16}},
                            selfcheck.FORMAT)
    assert selfcheck.known_reasons("splitkv", dev.caps, "float32") == []
    coop = selfcheck.check("fwd.coopmat", "float16", dev, canary_config)
    assert coop.ok is None and coop.canaries == 0 and "cooperative" in coop.detail


def test_error_model_separates_rounding_from_garbage() -> None:
    """Outputs rounded once to their storage type pass; the test corruption (+1.0) does not."""
    canary = selfcheck.CANARIES["fwd.scalar"][1]
    for dtype in ("float32", "float16", "bfloat16"):
        p = canary.problem(dtype)
        x = selfcheck._inputs(canary, p, seed=1)
        want = selfcheck.reference(p, x)
        rounded = {"o": from_f32(want["o"].astype(np.float32), dtype), "lse": want["lse"].astype(np.float32)}
        ratio, _ = selfcheck._compare("fwd.scalar", p, rounded, want)
        assert ratio <= 1 / selfcheck.SAFETY, dtype  # one rounding <= u·|o|, the tolerance >= SAFETY·u·|o|
        garbage = dict(rounded, o=from_f32(to_f32(rounded["o"], dtype) + 1.0, dtype))
        assert selfcheck._compare("fwd.scalar", p, garbage, want)[0] > 1.0, dtype
        nan = dict(rounded, lse=np.where(np.isfinite(rounded["lse"]), np.float32(np.nan), rounded["lse"]))
        assert math.isinf(selfcheck._compare("fwd.scalar", p, nan, want)[0])


def test_shuffle_free_kernels_pass_on_lavapipe(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the driver-trap table runs on MoltenVK with AMD and on Intel (no subgroup shuffles:
    TPR = 1 in the forward, split-KV and backward kernels) computes right on a real device. Small
    head dims: one lane per row unrolls q and o whole, which lavapipe compiles for minutes at D128."""
    dev = devmod.get_device()
    monkeypatch.setattr(dev, "caps", replace(dev.caps, subgroup_shuffle=False))
    cases = [("fwd.scalar", selfcheck.Canary("causal GQA D16", 1, 4, 2, 20, 37, 16, causal=True)),
             ("splitkv", selfcheck.CANARIES["splitkv"][0]), ("bwd.scalar", selfcheck.CANARIES["bwd.scalar"][0])]
    for family, canary in cases:
        cfg, why = canary_config(family, dev.caps, canary.problem("float32"), canary.n_split)
        assert not why
        kernels = cfg.kernels() if family.startswith("bwd") else [cfg.kernel if family == "splitkv" else cfg]
        assert all(k.tpr == 1 for k in kernels), family
        ratio, where = selfcheck._run(family, canary, cfg, dev, "float32", seed=5)
        assert ratio <= 1.0, f"{family}: {where} off by {ratio:.3g}x the tolerance"
