"""The Vulkan tests again at a second subgroup size: 4, where lavapipe's default is 8.

Lavapipe's subgroup size is its native vector width / 32 (8 with AVX2), and
``LP_NATIVE_VECTOR_WIDTH=128`` makes it 4. The driver reads that when it loads, so the subset runs
in a fresh ``pytest`` process with it set; ``test_device_subgroup_size`` (in that run only) asserts
that the device really has 4-wide subgroups. The subset covers every forward variant lavapipe runs
(forced tiles included), causal/window/mask, GQA, split-KV decoding at Lq = 1, the backward and the
non-finite semantics, in about a minute on 2 cores: only the D = 256 forward (20 s of pipeline
compilation, the same code at other head dims) is left out.
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
SUBSET = ["tests/test_vulkan.py", "tests/test_splitkv.py", "tests/test_vulkan_backward.py", "tests/test_nonfinite.py"]
LEFT_OUT = ["tests/test_vulkan.py::test_head_dims[256-256]"]


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
    env = {**os.environ, "LP_NATIVE_VECTOR_WIDTH": "128", EXPECT: "4"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    cases = {c.get("name"): c for c in ET.parse(report).iter("testcase")}
    check = cases["test_device_subgroup_size"]
    assert check.find("skipped") is None and check.find("failure") is None, "the subgroup size was not checked"
    ran = [c for c in cases.values() if c.find("skipped") is None]
    assert len(ran) > 200, f"only {len(ran)} tests ran at subgroup size 4"
