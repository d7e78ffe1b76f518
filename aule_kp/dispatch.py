"""Backend registry: each backend says why it cannot take a Problem; "auto" takes the best that can."""

from __future__ import annotations

import logging
from typing import Dict, List

from .backend import Backend
from .cpu.backend import CpuBackend
from .errors import BackendUnavailable, warn_once
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


def get(name: str) -> Backend:
    if name not in _registry:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    return _registry[name]


def available_backends() -> List[str]:
    """Names of the backends that can run on this machine."""
    return [name for name, b in _registry.items() if not b.available()]


def _warn_fallback(problem: Problem, best: Backend, why: Dict[str, List[str]]) -> None:
    """One AuleFallbackWarning per kind when "auto" runs ``problem`` on the CPU because Vulkan is
    missing, or on a slower backend than an installed one that refused it (e.g. a GPU's Vulkan
    over a device limit). A CPU Vulkan driver (lavapipe) ranks behind the CPU backend: no warning."""
    vulkan_missing = _registry["vulkan"].available()
    if vulkan_missing and best.name == "cpu":
        warn_once("no-vulkan", f"aule-kp: no usable Vulkan device ({'; '.join(vulkan_missing)}); "
                  "backend='auto' runs on the CPU backend")
    for name, reasons in why.items():
        backend = _registry[name]
        if not backend.available() and backend.rank(problem) < best.rank(problem):
            warn_once(f"refused:{name}", f"aule-kp: the {name} backend cannot run this problem "
                      f"({'; '.join(reasons)}); backend='auto' runs it on the {best.name} backend")


def select(problem: Problem, name: str = "auto") -> Backend:
    """The backend that runs ``problem``: the named one, or for "auto" the best able one."""
    if name != "auto":
        backend = get(name)
        reasons = backend.reasons(problem)
        if reasons:
            raise BackendUnavailable(name, reasons)
        return backend
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
    _warn_fallback(problem, best, why)
    log.debug("auto backend for %s: %s", problem, best.name)
    return best
