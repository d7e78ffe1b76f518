"""Rotary position embedding handed to the attention call instead of applied before it, so that a
backend with a fused rotation (Vulkan: glsl/rope.comp in the forward's own recorded sequence) rotates
q and k where they already are.

flash-attn's ``apply_rotary`` semantics over channels ``[offset, offset + R)`` of the head dim
(``R = 2 * cos.shape[1]``; the rest unchanged): "half" pairs channel ``offset + i`` with
``offset + i + R/2`` (GPT-NeoX, Llama), "interleaved" pairs ``offset + 2i`` with ``offset + 2i + 1``
(GPT-J). ``offset`` > 0 serves DeepSeek's latent attention, whose rotated channels come last.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .dtypes import from_f32, to_f32


@dataclass(frozen=True)
class RotaryLayout:
    """What a fused kernel's plan depends on (hashable: part of the plan's key): ``half`` = R/2
    rotation pairs, the layout, the first rotated channel, and whether k is rotated too."""

    half: int
    interleaved: bool
    offset: int = 0
    rotate_k: bool = True


@dataclass
class RotaryTables:
    """A rotation as host data: float32 ``cos``/``sin`` ``[P, R/2]`` (angles computed in float64),
    integer positions ``q_positions [B, Lq]`` and ``k_positions [B, Lk]`` (None: k is not rotated,
    e.g. keys read back from a cache already rotated) indexing their rows, and the layout."""

    cos: np.ndarray
    sin: np.ndarray
    q_positions: np.ndarray
    k_positions: Optional[np.ndarray]
    interleaved: bool
    offset: int = 0

    @property
    def layout(self) -> RotaryLayout:
        return RotaryLayout(int(self.cos.shape[1]), bool(self.interleaved), int(self.offset),
                            self.k_positions is not None)


def rotate_host(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, positions: np.ndarray, interleaved: bool,
                offset: int = 0) -> np.ndarray:
    """float ``x [B, H, L, D]`` rotated at ``positions [B, L]``, computed in x's float type (a new
    array): what a fused kernel computes in float32 before rounding to its storage."""
    half = cos.shape[1]
    c = cos[positions][:, None].astype(x.dtype)
    s = sin[positions][:, None].astype(x.dtype)
    out = x.copy()
    if interleaved:
        first, second = slice(offset, offset + 2 * half, 2), slice(offset + 1, offset + 2 * half, 2)
    else:
        first, second = slice(offset, offset + half), slice(offset + half, offset + 2 * half)
    x1, x2 = x[..., first], x[..., second]
    out[..., first] = x1 * c - x2 * s
    out[..., second] = x2 * c + x1 * s
    return out


def rotate_stored(x: np.ndarray, dtype: str, cos: np.ndarray, sin: np.ndarray, positions: np.ndarray,
                  interleaved: bool, offset: int = 0) -> np.ndarray:
    """Host storage ``x [B, H, L, D]`` of ``dtype`` rotated as the fused kernels rotate it: in float32,
    rounded once to the storage (a new array)."""
    return from_f32(rotate_host(to_f32(x, dtype), cos, sin, positions, interleaved, offset), dtype)


def check_tables(rotary: RotaryTables, batch: int, len_q: int, len_k: int, dim_k: int) -> None:
    """ValueError naming the field of ``rotary`` that does not fit a call of these sizes."""
    if rotary.cos.dtype != np.float32 or rotary.sin.dtype != np.float32 or rotary.cos.ndim != 2 \
            or rotary.sin.shape != rotary.cos.shape or rotary.cos.shape[1] < 1:
        raise ValueError(f"rotary cos and sin must be float32 [P, R/2] of one shape, got {rotary.cos.dtype} "
                         f"{rotary.cos.shape} and {rotary.sin.dtype} {rotary.sin.shape}")
    half = int(rotary.cos.shape[1])
    if not 0 <= rotary.offset or rotary.offset + 2 * half > dim_k:
        raise ValueError(f"rotary channels [{rotary.offset}, {rotary.offset + 2 * half}) exceed the head dim {dim_k}")
    for name, pos, length in (("q_positions", rotary.q_positions, len_q), ("k_positions", rotary.k_positions, len_k)):
        if pos is None and name == "k_positions":
            continue
        if pos.shape != (batch, length) or pos.dtype.kind not in "iu":
            raise ValueError(f"rotary {name} must be integers [B={batch}, {length}], got {pos.dtype} {pos.shape}")
        if pos.size and not (0 <= pos.min() and pos.max() < rotary.cos.shape[0]):
            raise ValueError(f"rotary {name} must index the {rotary.cos.shape[0]} rows of cos/sin, got "
                             f"[{pos.min()}, {pos.max()}]")
