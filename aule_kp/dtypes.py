"""Element types on the host. NumPy has no bfloat16: bf16 data travels as its uint16 bit pattern."""

from __future__ import annotations

import numpy as np

#: Storage dtype on the host for each engine dtype name.
STORAGE = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(np.uint16)}
ITEMSIZE = {name: dt.itemsize for name, dt in STORAGE.items()}


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) to float32, exactly."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 to bf16 bit patterns, rounding to nearest even (NaN stays NaN)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def to_f32(a: np.ndarray, dtype: str) -> np.ndarray:
    """Host storage of ``dtype`` to float32 (a view when it already is)."""
    return bf16_to_f32(a) if dtype == "bfloat16" else np.asarray(a, dtype=np.float32)


def from_f32(a: np.ndarray, dtype: str) -> np.ndarray:
    """float32 to the host storage of ``dtype``."""
    return f32_to_bf16(a) if dtype == "bfloat16" else np.asarray(a, dtype=STORAGE[dtype])
