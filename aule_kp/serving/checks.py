"""Argument checks shared by the serving entry points (errors name the argument)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import inputs
from ..problem import MAX_HEAD_DIM


def int_array(name: str, x: Any, ndim: int, expected: str) -> np.ndarray:
    """``x`` (NumPy or torch, an integer dtype, ``ndim`` axes) as a host int64 array."""
    if inputs.is_torch(x):
        if x.is_floating_point() or x.is_complex() or str(x.dtype) == "torch.bool":
            raise TypeError(f"{name} must be an integer (int32) tensor {expected}, got {x.dtype}")
        x = x.detach().cpu().numpy()
    elif isinstance(x, np.ndarray):
        if x.dtype.kind not in "iu":
            raise TypeError(f"{name} must be an integer (int32) array {expected}, got numpy {x.dtype}")
    else:
        raise TypeError(f"{name} must be a numpy.ndarray or torch.Tensor {expected}, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D {expected}, got shape {tuple(x.shape)}")
    return x.astype(np.int64)


def head_dim(name: str, d: int) -> None:
    if d % 8 or not 0 < d <= MAX_HEAD_DIM:
        raise ValueError(f"{name} must be a multiple of 8 in [8, {MAX_HEAD_DIM}], got {d}")



