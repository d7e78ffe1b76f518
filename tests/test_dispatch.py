"""``backend="auto"``'s priority list (aule_kp.dispatch.PRIORITY) and the backend-name check.

The list replaced per-backend ``rank()`` numbers (triton 5 on CUDA tensors else 90, vulkan 10 on a
GPU else 80, cpu 50; lowest wins). ``_old_choice`` keeps those numbers, and every combination of
"which backends can take the problem" x where the tensors live x the Vulkan device's type must pick
the same backend, and warn about the same refusals, as they did.
"""

from __future__ import annotations

import itertools
import warnings
from types import SimpleNamespace
from typing import Dict, List, Optional

import pytest

from aule_kp import dispatch, errors
from aule_kp.backend import BACKEND_NAMES, Backend, check_backend_name
from aule_kp.errors import AuleFallbackWarning, BackendUnavailable
from aule_kp.problem import Problem


class _Fake(Backend):
    def __init__(self, name: str, missing: bool, refuses: bool) -> None:
        self.name = name
        self.missing = ["not installed"] if missing else []
        self.refuses = ["refuses"] if refuses else []

    def unavailable_reasons(self) -> List[str]:
        return list(self.missing)

    def problem_reasons(self, problem: Problem) -> List[str]:
        return self.missing + self.refuses


def _old_rank(name: str, device: Optional[str], vulkan_type: str) -> int:
    """The rank() numbers before PRIORITY (lower was preferred)."""
    if name == "triton":
        return 5 if device == "cuda" else 90
    if name == "vulkan":
        return 80 if vulkan_type == "cpu" else 10
    return 50


def _old_choice(states: Dict[str, str], device: Optional[str], vulkan_type: str) -> Optional[str]:
    able = [n for n in ("vulkan", "triton", "cpu") if states[n] == "able"]
    return min(able, key=lambda n: _old_rank(n, device, vulkan_type)) if able else None


def _old_refusal_warnings(states: Dict[str, str], best: str, device: Optional[str], vulkan_type: str) -> List[str]:
    return sorted(n for n, s in states.items() if s == "refuses"
                  and _old_rank(n, device, vulkan_type) < _old_rank(best, device, vulkan_type))


@pytest.fixture
def fake_world(monkeypatch: pytest.MonkeyPatch):
    """Installs fake backends in the given states and a Vulkan device of the given type."""
    monkeypatch.setattr(errors, "_warned", set())

    def install(states: Dict[str, str], vulkan_type: str) -> None:
        errors._warned.clear()
        monkeypatch.setattr(dispatch, "_registry", {
            n: _Fake(n, missing=s == "missing", refuses=s == "refuses") for n, s in states.items()})
        device = SimpleNamespace(caps=SimpleNamespace(type=vulkan_type))
        monkeypatch.setattr(dispatch.devmod, "get_device", lambda: device)

    return install


def test_priority_keeps_the_old_ranks(fake_world) -> None:
    """Every case picks what the old rank numbers picked, with the same refusal warnings."""
    compared = 0
    for vk, tr, device, vulkan_type in itertools.product(
            ("able", "refuses", "missing"), ("able", "refuses", "missing"), (None, "cpu", "cuda"), ("gpu", "cpu")):
        states = {"vulkan": vk, "triton": tr, "cpu": "able"}
        fake_world(states, vulkan_type)
        problem = Problem(1, 1, 1, 8, 8, 16, 16, "float32", 0.25, device=device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = dispatch.select(problem, "auto").name
        want = _old_choice(states, device, vulkan_type)
        assert got == want, (states, device, vulkan_type)
        refused = sorted(str(w.message).split()[2] for w in caught
                         if issubclass(w.category, AuleFallbackWarning) and "cannot run" in str(w.message))
        assert refused == _old_refusal_warnings(states, got, device, vulkan_type), (states, device, vulkan_type)
        compared += 1
    assert compared == 54


@pytest.mark.parametrize("device, vulkan_type, want", [
    ("cuda", "gpu", "triton"),  # CUDA tensors stay where they are
    (None, "gpu", "vulkan"),    # NumPy on a machine with a GPU behind Vulkan
    ("cpu", "gpu", "vulkan"),   # CPU torch tensors likewise
    (None, "cpu", "cpu"),       # lavapipe comes after the NumPy backend (this machine, in CI)
    ("cpu", "cpu", "cpu"),
])
def test_auto_choices_today(fake_world, device: Optional[str], vulkan_type: str, want: str) -> None:
    """The choices the rest of the suite relies on, written out, with every backend able to run."""
    fake_world({"vulkan": "able", "triton": "able", "cpu": "able"}, vulkan_type)
    assert dispatch.select(Problem(1, 1, 1, 8, 8, 16, 16, "float32", 0.25, device=device)).name == want


def test_every_backend_has_an_unconditional_place() -> None:
    """A backend that can take a problem always has a place in the list (else select would fail)."""
    for name in dispatch._registry:
        assert any(entry == name and holds(Problem(1, 1, 1, 8, 8, 16, 16, "float32", 0.25))
                   for entry, holds in dispatch.PRIORITY if holds is dispatch._always), name


def test_no_backend_can(fake_world) -> None:
    fake_world({"vulkan": "missing", "triton": "refuses", "cpu": "refuses"}, "gpu")
    with pytest.raises(BackendUnavailable, match="vulkan: not installed"):
        dispatch.select(Problem(1, 1, 1, 8, 8, 16, 16, "float32", 0.25), "auto")


@pytest.mark.parametrize("bad", ["gpu", "", None, 3, "AUTO"])
def test_backend_name_check(bad: object) -> None:
    with pytest.raises(ValueError, match=r"backend must be one of .*'auto', 'vulkan', 'triton', 'cpu'"):
        check_backend_name(bad)
    if bad is not None:
        with pytest.raises(ValueError, match=r"backend must be None or one of"):
            check_backend_name(bad, allow_none=True)
    check_backend_name(None, allow_none=True)
    for name in BACKEND_NAMES:
        check_backend_name(name)


def test_get_refuses_auto_and_unknown_names() -> None:
    with pytest.raises(ValueError, match="choice among the backends"):
        dispatch.get("auto")
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.get("metal")
    assert dispatch.get("cpu").name == "cpu"


@pytest.mark.parametrize("compiled", [True, False])
def test_lavapipe_only_ahead_of_the_numpy_path_on_long_fp16_decode(monkeypatch: pytest.MonkeyPatch,
                                                                    compiled: bool) -> None:
    # The measured rule (benchmarks/cpu_vs_lavapipe.py): the compiled CPU path beats lavapipe
    # everywhere; the NumPy path loses to it on float16 decode against long caches only.
    monkeypatch.setattr(dispatch.cpu_native, "load", lambda quiet=False: object() if compiled else None)
    decode = Problem(1, 32, 8, 1, 4096, 128, 128, "float16", 0.1)
    others = [Problem(1, 32, 8, 1, 4096, 128, 128, "float32", 0.1),
              Problem(1, 32, 8, 1, 512, 128, 128, "float16", 0.1),
              Problem(1, 8, 8, 1024, 4096, 64, 64, "float16", 0.1)]
    assert dispatch._lavapipe_faster(decode) is not compiled
    assert not any(dispatch._lavapipe_faster(p) for p in others)
    lavapipe = dispatch.PRIORITY.index(("vulkan", dispatch._lavapipe_faster))
    assert lavapipe < dispatch.PRIORITY.index(("cpu", dispatch._always))


@pytest.mark.parametrize("vulkan", ["able", "missing"])
def test_cuda_tensors_without_triton_warn_that_they_leave_the_gpu(fake_world, vulkan: str) -> None:
    # CUDA/ROCm tensors belong to Triton (PRIORITY's first entry). Without Triton installed (torch's CUDA
    # wheels for Windows carry none) "auto" copied them to host memory and ran Vulkan or the CPU backend
    # with no warning: a change of device and speed class the caller did not ask for.
    fake_world({"vulkan": vulkan, "triton": "missing", "cpu": "able"}, "gpu")
    problem = Problem(1, 1, 1, 8, 8, 16, 16, "float32", 0.25, device="cuda")
    with pytest.warns(AuleFallbackWarning) as record:
        for _ in range(2):
            assert dispatch.select(problem).name == ("vulkan" if vulkan == "able" else "cpu")
    notices = [str(w.message) for w in record if "Triton" in str(w.message)]
    assert len(notices) == 1 and "not installed" in notices[0] and "host memory" in notices[0]
    # CPU tensors and NumPy arrays never belonged to Triton: no such warning for them.
    for device in (None, "cpu"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dispatch.select(Problem(1, 1, 1, 8, 8, 16, 16, "float32", 0.25, device=device))
        assert not [w for w in caught if "Triton" in str(w.message)]
