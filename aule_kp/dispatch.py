"""Backend registry: each backend says why it cannot take a Problem; "auto" walks one priority list."""

from __future__ import annotations

import logging
from typing import Callable, Dict, List, Tuple

from .backend import BACKEND_NAMES, Backend, Runner, check_backend_name
from .cpu import native as cpu_native
from .cpu.backend import CpuBackend
from .errors import BackendUnavailable, warn_once
from .problem import Problem
from .triton.backend import TritonBackend
from .vulkan import device as devmod
from .vulkan.backend import VulkanBackend

log = logging.getLogger("aule_kp")

__all__ = ["BACKEND_NAMES", "PRIORITY", "available_backends", "get", "select", "select_bound"]

_registry: Dict[str, Backend] = {
    "vulkan": VulkanBackend(),
    "triton": TritonBackend(),
    "cpu": CpuBackend(),
}


def _cuda_tensors(problem: Problem) -> bool:
    return problem.device == "cuda"


def _vulkan_gpu(problem: Problem) -> bool:
    # Asked only of an installed Vulkan backend, so a device is there to ask.
    return devmod.get_device().caps.type != "cpu"


def _always(problem: Problem) -> bool:
    return True


def _lavapipe_faster(problem: Problem) -> bool:
    """A float16 decode-like problem while the CPU backend runs its NumPy path (no native kernel):
    NumPy's float16 conversion (~4 ns an element) makes that path slower than a CPU Vulkan driver
    on long caches. benchmarks/cpu_vs_lavapipe.py, 2-core Xeon, lavapipe (LLVM 15), 2026-12-05:
    decode H32/8 Lq1 Lk4096 D128 fp16, NumPy path 72-171 ms vs lavapipe 49-52 ms; Lk512: 0.5 vs
    0.4-0.6 ms (even). The native kernel beat lavapipe on every problem there (2.1x-24.6x, fourth
    session; that decode 2.1 ms vs 8.9 in fp16, 2.8 vs 15.0 in fp32), as numba's path had before it."""
    return (problem.dtype == "float16" and problem.len_q <= 16 and problem.len_k >= 2048
            and cpu_native.load(quiet=True) is None)


#: ``backend="auto"`` runs a problem on the first entry whose backend can take it
#: (``bind`` gives no reasons) and whose condition holds. Every backend's last entry holds always,
#: so each backend that can take a problem has a place in the list.
PRIORITY: Tuple[Tuple[str, Callable[[Problem], bool]], ...] = (
    ("triton", _cuda_tensors),  # torch tensors on a CUDA/ROCm GPU, computed where they live
    ("vulkan", _vulkan_gpu),    # a GPU behind Vulkan
    ("vulkan", _lavapipe_faster),  # a CPU Vulkan driver, where measured faster than the CPU backend
    ("cpu", _always),           # compiled kernels (or NumPy) on the host's cores
    ("vulkan", _always),        # a CPU Vulkan driver (lavapipe): measured slower than the CPU backend
                                # on the same cores (benchmarks/cpu_vs_lavapipe.py, BENCHMARKS.md)
    ("triton", _always),        # CPU tensors under TRITON_INTERPRET=1: each tile op in NumPy, far slower than BLAS
)


def _place(name: str, problem: Problem) -> int:
    """The index in ``PRIORITY`` at which backend ``name`` would take ``problem``."""
    return next(i for i, (entry, holds) in enumerate(PRIORITY) if entry == name and holds(problem))


def get(name: str) -> Backend:
    """The registered backend ``name`` (ValueError naming ``backend`` for an unknown name, and for
    "auto", which is a choice among backends, not one: ``select`` makes it)."""
    if name not in _registry:
        check_backend_name(name)
        raise ValueError("backend 'auto' is a choice among the backends, not one of them (select() makes it)")
    return _registry[name]


def available_backends() -> List[str]:
    """Names of the backends that can run on this machine."""
    return [name for name, b in _registry.items() if not b.unavailable_reasons()]


def _warn_fallback(problem: Problem, best: Backend, why: Dict[str, List[str]]) -> None:
    """One AuleFallbackWarning per kind when "auto" runs ``problem`` on the CPU because Vulkan is
    missing, CUDA/ROCm tensors off their GPU because Triton is missing, or ``problem`` on a backend
    behind an installed one that refused it in ``PRIORITY`` (e.g. a GPU's Vulkan over a device limit).
    A CPU Vulkan driver (lavapipe) comes after the CPU backend: no warning."""
    if not why:
        return
    # A backend whose bind succeeded is not in ``why``: only a refused backend can be a missing one.
    vulkan_missing = _registry["vulkan"].unavailable_reasons() if best.name == "cpu" and "vulkan" in why else []
    if vulkan_missing:
        warn_once("no-vulkan", f"aule-kp: no usable Vulkan device ({'; '.join(vulkan_missing)}); "
                  "backend='auto' runs on the CPU backend")
    triton_missing = _registry["triton"].unavailable_reasons() if _cuda_tensors(problem) and "triton" in why else []
    if triton_missing:
        warn_once("no-triton", f"aule-kp: Triton is unavailable ({'; '.join(triton_missing)}); backend='auto' "
                  f"copies CUDA/ROCm tensors to host memory and runs them on the {best.name} backend")
    best_place = _place(best.name, problem)
    for name, reasons in why.items():
        backend = _registry[name]
        if not backend.unavailable_reasons() and _place(name, problem) < best_place:
            warn_once(f"refused:{name}", f"aule-kp: the {name} backend cannot run this problem "
                      f"({'; '.join(reasons)}); backend='auto' runs it on the {best.name} backend")


def select_bound(problem: Problem, name: str = "auto") -> Tuple[Backend, Runner]:
    """The backend that runs ``problem`` (the named one, or for "auto" the first in ``PRIORITY`` that
    can) and its forward pass bound to ``problem`` (``Backend.bind``); BackendUnavailable with every
    reason when none can."""
    if name != "auto":
        backend = get(name)
        runner, reasons = backend.bind(problem)
        if runner is None:
            raise BackendUnavailable(name, reasons)
        return backend, runner
    able: Dict[str, Tuple[Backend, Runner]] = {}
    why: Dict[str, List[str]] = {}
    for backend in _registry.values():
        runner, reasons = backend.bind(problem)
        if runner is None:
            why[backend.name] = reasons
        else:
            able[backend.name] = (backend, runner)
    if not able:
        raise BackendUnavailable("auto", [f"{n}: {'; '.join(r)}" for n, r in why.items()])
    best = min(able.values(), key=lambda pair: _place(pair[0].name, problem))
    _warn_fallback(problem, best[0], why)
    log.debug("auto backend for %s: %s", problem, best[0].name)
    return best


def select(problem: Problem, name: str = "auto") -> Backend:
    """The backend that runs ``problem``: the named one, or for "auto" the first in ``PRIORITY`` that can."""
    return select_bound(problem, name)[0]
