"""Backend registry: each backend says why it cannot take a Problem; "auto" takes the best that can."""

from __future__ import annotations

import logging
import threading
from typing import Dict, List

from .backend import Backend
from .cpu.backend import CpuBackend
from .errors import BackendUnavailable
from .problem import Problem
from .vulkan.backend import VulkanBackend

log = logging.getLogger("aule_kp")

BACKEND_NAMES = ("auto", "vulkan", "triton", "cpu")


class _Unbuilt(Backend):
    """A backend name of the public API whose implementation is not in this build."""

    def __init__(self, name: str, why: str):
        self.name = name
        self._why = why

    def available(self) -> List[str]:
        return [self._why]


_registry: Dict[str, Backend] = {
    "vulkan": VulkanBackend(),
    "triton": _Unbuilt("triton", "the Triton backend is not part of this build yet"),
    "cpu": CpuBackend(),
}
_warned = threading.Event()


def get(name: str) -> Backend:
    if name not in _registry:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    return _registry[name]


def available_backends() -> List[str]:
    """Names of the backends that can run on this machine."""
    return [name for name, b in _registry.items() if not b.available()]


def select(problem: Problem, name: str = "auto") -> Backend:
    """The backend that runs ``problem``: the named one, or for "auto" the best able one."""
    if name != "auto":
        backend = get(name)
        reasons = backend.reasons(problem)
        if reasons:
            raise BackendUnavailable(name, reasons)
        return backend
    vulkan_missing = _registry["vulkan"].available()
    if vulkan_missing and not _warned.is_set():
        _warned.set()
        log.warning("aule-kp: no usable Vulkan device (%s); using the CPU backend", "; ".join(vulkan_missing))
    able = []
    why: Dict[str, List[str]] = {}
    for backend in _registry.values():
        reasons = backend.reasons(problem)
        if reasons:
            why[backend.name] = reasons
        else:
            able.append(backend)
    if not able:
        raise BackendUnavailable("auto", [f"{n}: {'; '.join(r)}" for n, r in why.items()])
    best = min(able, key=lambda b: b.rank(problem))
    log.debug("auto backend for %s: %s", problem, best.name)
    return best
