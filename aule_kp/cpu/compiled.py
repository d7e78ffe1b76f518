"""The CPU backward pass's compiled tile kernels (:mod:`.kernels`, numba): loading them, and their
16-bit conversions.

:func:`load` imports the kernels, or says once why it cannot (no numba): the backward pass then runs
in NumPy alone (:mod:`.backward`). The forward pass has its own native kernel (:mod:`.native`).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

import numpy as np

from ..errors import warn_once

_kernels: Optional[ModuleType] = None
_tried = False
_why = ""


def load(quiet: bool = False) -> Optional[ModuleType]:
    """The compiled kernels module, or None when numba cannot be imported: then, unless ``quiet``
    (a question, not a run), one AuleFallbackWarning per process says why."""
    global _kernels, _tried, _why
    if not _tried:
        _tried = True
        try:
            _kernels = importlib.import_module(f"{__package__}.kernels")
        except Exception as exc:  # ImportError, or a numba/llvmlite that does not load on this platform
            _why = f"{type(exc).__name__}: {exc}"
    if _kernels is None and not quiet:
        warn_once("cpu-compiled", f"aule-kp: the CPU backward pass's compiled kernels are unavailable ({_why}); "
                  "it runs its slower NumPy path (pip install numba)")
    return _kernels


def disable(exc: Exception) -> None:
    """Stop using the kernels after ``exc``, a numba error on first use (a compile that fails on
    this platform): the caller reruns the call on the NumPy path, and this says why, once."""
    global _kernels, _why
    _kernels = None
    _why = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    load()


def to_f32(kern: ModuleType, a: np.ndarray, dtype: str) -> np.ndarray:
    """Host storage of ``dtype`` as float32 (a view when it already is), 16-bit types converted by
    the compiled kernels."""
    if dtype == "float32":
        return np.asarray(a, dtype=np.float32)
    out = np.empty(a.shape, dtype=np.float32)
    if a.size:
        convert = kern.half_to_f32 if dtype == "float16" else kern.bf16_to_f32
        convert(a.view(np.uint16).reshape(-1, a.shape[-1]), out.reshape(-1, a.shape[-1]))
    return out
