"""The Vulkan tests again at a second subgroup size: 4, where lavapipe's default is 8.

Lavapipe's subgroup size is its native vector width / 32 (8 with AVX2), and
``LP_NATIVE_VECTOR_WIDTH=128`` makes it 4. The driver reads that when it loads, so the subset runs
in a fresh ``pytest`` process with it set; ``test_device_subgroup_size`` (in that run only) asserts
that the device really has 4-wide subgroups.

Mesa's shader cache does not key its entries on the vector width: with the default cache, the
4-wide run silently reuses pipelines compiled 8-wide (and the reverse), and passes whatever the
4-wide code does. The run therefore gets its own cache (``build/mesa-shader-cache-lp128``).

The subset covers every forward variant lavapipe runs, causal/window/mask, GQA, split-KV decoding at
Lq = 1, the backward and the non-finite semantics. Compiling its pipelines from a cold cache takes
about 50 s on 2 cores (a warm run 15 s), so head dims beyond 64 and most forced tile shapes are
left to the 8-wide run. Forced tiles with 8 lanes per row (TPR = 8) are left out: they are illegal
with 4-wide subgroups (the engine's tile choice and the tuning cache refuse them), and forced there
through ``config=`` they give NaN.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import aule_kp.vulkan.device as devmod

REPO = Path(__file__).resolve().parent.parent
#: Set (to the expected size) in the subset's process only.
EXPECT = "AULE_KP_TEST_SUBGROUP_SIZE"
MESA_CACHE = REPO / "build" / "mesa-shader-cache-lp128"
SUBSET = [
    *(f"tests/test_vulkan.py::{t}" for t in (
        "test_causal_alignment_dtypes", "test_windows", "test_gqa_mqa_batches", "test_masks",
        "test_fully_masked_rows_are_zero", "test_random_problems",
        "test_forced_variants[causal-wave64-tpr2-stage1-rpt1]",
        "test_forced_variants[causal-scalar-tpr2-stage0-rpt2]")),
    "tests/test_splitkv.py",
    *(f"tests/test_vulkan_backward.py::{t}" for t in (
        "test_causal_alignment_dtypes", "test_windows", "test_gqa_mqa_batches", "test_masks",
        "test_forced_tiles[causal-gqa-tpr2-rpt5-stage0]")),
    "tests/test_nonfinite.py",
]
LEFT_OUT = ["tests/test_splitkv.py::test_gpu_style_tiles"]  # TPR = 8


def _lavapipe() -> bool:
    if devmod.vulkan_unavailable() is not None:
        return False
    return "llvmpipe" in devmod.get_device().caps.name


def test_device_subgroup_size() -> None:
    want = os.environ.get(EXPECT)
    if want is None:
        pytest.skip(f"runs inside test_vulkan_at_subgroup_size_4 ({EXPECT} set)")
    assert devmod.get_device().caps.subgroup_size == int(want)
    import aule_kp

    assert [d["subgroup_size"] for d in aule_kp.info()["devices"]] == [int(want)]


@pytest.mark.skipif(not _lavapipe(), reason="LP_NATIVE_VECTOR_WIDTH sets the subgroup size of lavapipe only")
def test_vulkan_at_subgroup_size_4(tmp_path: Path) -> None:
    report = tmp_path / "subgroup4.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
           f"tests/{Path(__file__).name}::test_device_subgroup_size", *SUBSET,
           *(f"--deselect={node}" for node in LEFT_OUT)]
    MESA_CACHE.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "LP_NATIVE_VECTOR_WIDTH": "128", EXPECT: "4", "MESA_SHADER_CACHE_DIR": str(MESA_CACHE)}
    env.pop("MESA_SHADER_CACHE_DISABLE", None)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    cases = {c.get("name"): c for c in ET.parse(report).iter("testcase")}
    check = cases["test_device_subgroup_size"]
    assert check.find("skipped") is None and check.find("failure") is None, "the subgroup size was not checked"
    ran = [c for c in cases.values() if c.find("skipped") is None]
    assert len(ran) > 150, f"only {len(ran)} tests ran at subgroup size 4"
