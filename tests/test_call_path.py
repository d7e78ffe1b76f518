"""The issue-16 bar "following ``flash_attention`` to the dispatch of a recorded plan passes through
each module once", checked on a warm call.

A module is *entered* when a function of it is called from a frame of no function of that module
(none of its frames on the stack): calls inside a module, and returns to it, are not new entries.
So ``call.prepare`` asking ``dispatch`` for a backend and then building its result in ``call``
stays one pass through ``call``; ``vulkan.backend`` calling ``vulkan.device`` twice is two.
"""

from __future__ import annotations

import sys
from types import FrameType
from typing import Any, List

import numpy as np
import pytest

import aule_kp
from aule_kp.vulkan import device as devmod
from aule_kp.vulkan import plan as planmod

pytestmark = pytest.mark.skipif(devmod.vulkan_unavailable() is not None, reason="no Vulkan device")

#: Leaf utilities any layer may call, entered many times by design; none calls back up the path.
LEAVES = {
    "aule_kp.inputs": "input checks and normalisation shared by api, call and torch/ops",
    "aule_kp.problem": "the Problem value: its __hash__/__eq__ run wherever it is a memo key",
    "aule_kp.vulkan.configs": "config values: their __hash__ runs wherever they are memo keys",
    "aule_kp.knobs": "the knob snapshot, read where each decision is made",
    "aule_kp.vulkan.tuning_cache": "the tuning cache's generation, part of the choice's memo key",
    "aule_kp.dtypes": "dtype tables",
    "aule_kp.backend": "the Backend base class and the backend-name check",
    "aule_kp.quant": "the precision argument's check (the int8 scheme's code runs only for precision='int8')",
}

def entries() -> List[str]:
    """aule_kp modules in the order a warm second ``flash_attention(..., backend="vulkan")`` enters
    them, up to the eval of its recorded plan."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 16, 32)).astype(np.float32) for _ in range(3))
    aule_kp.flash_attention(q, k, v, backend="vulkan")  # builds and records the plan
    seen: List[str] = []
    stop = planmod.RecordedPlan.eval.__code__
    reached = []

    def on_event(frame: FrameType, event: str, arg: Any) -> None:
        if event != "call":
            return
        module = frame.f_globals.get("__name__", "")
        if not module.startswith("aule_kp"):
            return
        caller = frame.f_back
        while caller is not None and caller.f_globals.get("__name__") != module:
            caller = caller.f_back
        if caller is None:
            seen.append(module)
        if frame.f_code is stop:
            reached.append(module)
            sys.setprofile(None)

    sys.setprofile(on_event)
    try:
        aule_kp.flash_attention(q, k, v, backend="vulkan")
    finally:
        sys.setprofile(None)
    assert reached, "the call never reached the eval of a recorded plan"
    return seen


@pytest.fixture(scope="module")
def path() -> List[str]:
    seen = entries()
    assert seen[0] == "aule_kp.api"
    return [m for m in seen if m not in LEAVES]


# The modules the path goes through (a module missing from it fails its case: update the list).
MODULES = ["aule_kp.api", "aule_kp.call", "aule_kp.scoremods", "aule_kp.dispatch", "aule_kp.vulkan.backend",
           "aule_kp.vulkan.device", "aule_kp.vulkan.probe", "aule_kp.vulkan.plan", "aule_kp.vulkan.hostcopy"]


@pytest.mark.parametrize("module", MODULES)
def test_module_entered_once(path: List[str], module: str) -> None:
    assert path.count(module) == 1, f"{module} entered {path.count(module)} times: {path}"


def test_no_other_module(path: List[str]) -> None:
    assert set(path) <= set(MODULES), f"modules on the path not listed in MODULES: {set(path) - set(MODULES)}"
