"""q8_0 quantization (llama.cpp's layout): blocks of 32 values along the head dim, each stored as
int8 with one float16 scale ``d = max|x| / 127``; a value reads back as ``q * d``.

A quantized KV cache holds ``qs`` (int8, the cache's shape) and ``scales`` (float16, the head dim
divided by 32): 34 bytes per 32 values, 53% of float16's 64 (a token of ``Hkv x D`` costs
``Hkv * D * 17 / 16`` bytes). Blocks are written when tokens are appended and read back where
attention reads the cache (the Vulkan kernel dequantizes in the shader).
"""

from __future__ import annotations

from typing import Any, Tuple

import numpy as np

#: Values per q8_0 block (along the last axis, the head dim).
BLOCK = 32


def quantize(x: np.ndarray, name: str = "x") -> Tuple[np.ndarray, np.ndarray]:
    """``(qs int8 x.shape, scales float16 x.shape[:-1] + (D/32,))`` of float ``x`` (last axis a
    multiple of 32), rounded to nearest as llama.cpp's ``quantize_row_q8_0``.

    ValueError naming ``name`` when a finite value is too large for a block's float16 scale
    (``|x| >= 127 * 65520``): its block would read back as inf and NaN. Non-finite values stay
    non-finite (their block reads back so)."""
    x = np.asarray(x, dtype=np.float32)
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)
    d = np.abs(blocks).max(axis=-1) / np.float32(127)
    with np.errstate(over="ignore"):
        scales = d.astype(np.float16)
    if (np.isinf(scales) & np.isfinite(d)).any():
        raise ValueError(f"{name} holds values of magnitude up to {float(np.nanmax(d[np.isfinite(d)])) * 127:.4g}: "
                         f"beyond q8_0's range (a block's float16 scale max|x| / 127 must stay below 65520)")
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d > 0)
    with np.errstate(invalid="ignore"):  # a non-finite block: its scale is inf or NaN, whatever qs holds
        qs = np.rint(blocks * inv[..., None]).clip(-127, 127).astype(np.int8)
    return qs.reshape(x.shape), scales


def dequantize(qs: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 values of q8_0 blocks ``(qs, scales)``."""
    blocks = qs.reshape(*qs.shape[:-1], qs.shape[-1] // BLOCK, BLOCK).astype(np.float32)
    return (blocks * scales.astype(np.float32)[..., None]).reshape(qs.shape)


class Q8Cache:
    """A KV cache (K or V) quantized to q8_0, for ``aule_kp.flash_attention_with_kvcache``.

    Same shape as the float cache it replaces: ``[B, S, Hkv, D]`` contiguous or ``[num_blocks,
    page_size, Hkv, D]`` paged; ``D`` a multiple of 32. ``qs`` and ``scales`` are NumPy arrays the
    call updates in place when it appends new keys/values.
    """

    dtype = "q8_0"

    def __init__(self, qs: np.ndarray, scales: np.ndarray) -> None:
        # 4-D as a cache; the serving code also views one as rows [R, Hkv, D].
        if not isinstance(qs, np.ndarray) or qs.dtype != np.int8 or qs.ndim not in (3, 4):
            raise TypeError(f"qs must be a 4-D numpy int8 array, got {type(qs).__name__} {getattr(qs, 'dtype', '')}")
        d = int(qs.shape[-1])
        if d % BLOCK:
            raise ValueError(f"a q8_0 cache's head dim must be a multiple of {BLOCK}, got {d}")
        want = qs.shape[:-1] + (d // BLOCK,)
        if not isinstance(scales, np.ndarray) or scales.dtype != np.float16 or scales.shape != want:
            raise ValueError(f"scales must be a float16 numpy array of shape {want}, got "
                             f"{getattr(scales, 'dtype', type(scales).__name__)} {getattr(scales, 'shape', '')}")
        self.qs = qs
        self.scales = scales

    @classmethod
    def zeros(cls, shape: Tuple[int, int, int, int]) -> Q8Cache:
        """An empty (all-zero) cache of ``shape``."""
        shape = tuple(int(s) for s in shape)
        if len(shape) != 4:
            raise ValueError(f"shape must be 4-D [B or num_blocks, S or page_size, Hkv, D], got {shape}")
        if shape[-1] % BLOCK:
            raise ValueError(f"a q8_0 cache's head dim must be a multiple of {BLOCK}, got {shape[-1]}")
        return cls(np.zeros(shape, np.int8), np.zeros(shape[:-1] + (shape[-1] // BLOCK,), np.float16))

    @classmethod
    def from_float(cls, x: Any) -> Q8Cache:
        """The q8_0 cache of a float cache ``x`` (NumPy or torch, 4-D)."""
        if hasattr(x, "detach"):
            x = x.detach().float().cpu().numpy()
        return cls(*quantize(np.asarray(x, dtype=np.float32), "x"))

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(int(s) for s in self.qs.shape)

    @property
    def nbytes(self) -> int:
        return int(self.qs.nbytes + self.scales.nbytes)

    def dequantize(self) -> np.ndarray:
        """The cache's float32 values."""
        return dequantize(self.qs, self.scales)

    def write(self, index: Tuple[np.ndarray, np.ndarray], qs: np.ndarray, scales: np.ndarray) -> None:
        """Writes quantized rows (:func:`quantize` of ``[n, Hkv, D]`` values) at ``index`` (first axis,
        second axis)."""
        self.qs[index] = qs
        self.scales[index] = scales

    def rows(self, index: Tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """float32 ``[n, Hkv, D]`` of the rows given by ``index``."""
        return dequantize(self.qs[index], self.scales[index])
