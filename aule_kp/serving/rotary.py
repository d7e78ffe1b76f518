"""flash-attn's rotary embedding for ``flash_attention_with_kvcache`` (``apply_rotary_emb``):
``x[..., :R] * cos + rotate_half(x[..., :R]) * sin``, ``R = 2 * cos.shape[1]``, the rest of the head
dim unchanged. Interleaved (GPT-J) pairs dims ``(2i, 2i+1)``; otherwise (GPT-NeoX) ``(i, i + R/2)``.
"""

from __future__ import annotations

import numpy as np


def apply_rotary(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, positions: np.ndarray,
                 interleaved: bool) -> np.ndarray:
    """float32 ``x [B, L, H, D]`` rotated at ``positions [B, L]`` (rows of ``cos``/``sin``
    ``[S, R/2]``, float32); a new array."""
    half = cos.shape[1]
    c = cos[positions][:, :, None, :]
    s = sin[positions][:, :, None, :]
    out = x.copy()
    if interleaved:
        x1, x2 = x[..., 0 : 2 * half : 2], x[..., 1 : 2 * half : 2]
        out[..., 0 : 2 * half : 2] = x1 * c - x2 * s
        out[..., 1 : 2 * half : 2] = x2 * c + x1 * s
    else:
        x1, x2 = x[..., :half], x[..., half : 2 * half]
        out[..., :half] = x1 * c - x2 * s
        out[..., half : 2 * half] = x2 * c + x1 * s
    return out
