"""Backend registry: each backend says why it cannot take a Problem; "auto" takes the best that can."""

from __future__ import annotations

import logging
import threading
from typing import Dict, List

from .backend import Backend
from .cpu.backend import CpuBackend
from .errors import BackendUnavailable
from .problem import Problem
from .triton.backend import TritonBackend
from .vulkan.backend import VulkanBackend

log = logging.getLogger("aule_kp")

BACKEND_NAMES = ("auto", "vulkan", "triton", "cpu")


_registry: Dict[str, Backend] = {
    "vulkan": VulkanBackend(),
    "triton": TritonBackend(),
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
