"""``precision="int8"``: SageAttention's INT8 Q·Kᵀ, the scheme every backend implements.

* K is *smoothed*: its mean over the keys is subtracted per channel (per batch and kv head). Every
  score of a query row then moves by the same ``q·mean``, which softmax cancels: exact, and it
  takes the large per-channel offsets real keys carry out of the quantization range.
* Q is multiplied by ``scale * log2(e)`` (the softmax scale and the exp2 domain folded in), then Q
  and K are quantized to int8 symmetrically per *block*: ``BLOCK_Q`` consecutive query rows of one
  head, ``BLOCK_K`` consecutive keys of one kv head, one float32 scale ``max|x| / 127`` each;
  values round half away from zero.
* ``Q·Kᵀ`` is accumulated in int32 (exact) and scaled by the two blocks' scales: base-2 scores.
* The softmax runs in float32 with exp2 (the row log-sum-exp a backend returns has the smoothing
  shift ``scale·q·mean(k)`` added back: it is that of the scores the result comes from); ``P·V``
  takes P rounded to 16 bits and V in 16 bits (fp16, or bf16 for bf16 inputs: V is then exact) and
  accumulates in float32. The row sums use the unrounded P, as FlashAttention's fp16 kernels do.

This module holds the constants and the NumPy form of the quantization (the CPU backend's reference,
and what tests compare the device kernels with). The attention is opt-in and forward-only.
"""

from __future__ import annotations

import math
from typing import Any, Tuple

import numpy as np

#: What ``precision=`` takes: "fp" (exact attention in the inputs' precision) or "int8".
PRECISIONS = ("fp", "int8")
#: Query rows (of one head) that share a scale.
BLOCK_Q = 64
#: Keys (of one kv head) that share a scale.
BLOCK_K = 64
INT8_MAX = 127
LOG2E = 1.4426950408889634
#: Largest finite fp16: fp32 V is rounded to fp16 for P·V and must stay within it.
FP16_MAX = 65504.0


def check_precision(precision: Any) -> str:
    """``precision`` itself when it is one of ``PRECISIONS``; None means "fp". ValueError otherwise."""
    if precision is None:
        return "fp"
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} (or None for 'fp'), got {precision!r}")
    return precision


def pv_dtype(dtype: str) -> str:
    """The 16-bit type P·V runs in for inputs of ``dtype``: bf16 for bf16, else fp16."""
    return "bfloat16" if dtype == "bfloat16" else "float16"


def check_values(v_max_abs: float, finite: bool, dtype: str) -> None:
    """ValueError unless q, k and v were all finite (a NaN or inf key would spread through K's mean
    to every row) and, for float32 inputs, ``max|v|`` fits fp16 (P·V runs in fp16)."""
    if not finite:
        raise ValueError("precision='int8' needs finite q, k and v (K's mean over the keys would carry a NaN or "
                         "inf to every query row); use precision='fp'")
    if dtype == "float32" and v_max_abs > FP16_MAX:
        raise ValueError(f"precision='int8' runs P·V in fp16: max |v| = {v_max_abs:g} is over fp16's {FP16_MAX:g}; "
                         "use precision='fp' or scale v")


def check_host_values(q: np.ndarray, k: np.ndarray, v: np.ndarray,
                      dtype: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``check_values`` for host arrays in engine storage (bf16 as uint16 bits); returns their float32
    values, which the callers compute with (one conversion per call)."""
    from .dtypes import to_f32

    arrays = tuple(to_f32(x, dtype) for x in (q, k, v))
    finite = all(bool(np.isfinite(x).all()) for x in arrays)
    check_values(float(np.abs(arrays[2]).max()) if arrays[2].size else 0.0, finite, dtype)
    return arrays


def round_half_away(x: np.ndarray) -> np.ndarray:
    """Round to the nearest integer, halves away from zero (what every kernel does)."""
    return np.trunc(x + np.copysign(np.float32(0.5), x))


def key_mean(k: np.ndarray) -> np.ndarray:
    """float32 mean of ``k [..., Lk, D]`` over the keys, ``[..., 1, D]``: what smoothing subtracts."""
    return np.asarray(k, dtype=np.float32).mean(axis=-2, dtype=np.float32, keepdims=True)


def smooth_k(k: np.ndarray) -> np.ndarray:
    """float32 ``k - mean(k over the keys)`` per channel; k ``[..., Lk, D]``."""
    return np.asarray(k, dtype=np.float32) - key_mean(k)


def lse_shift(q: np.ndarray, mean: np.ndarray, scale: float) -> np.ndarray:
    """float32 ``scale · q · mean`` per query row ``[B, Hq, Lq]``: what smoothing took off every score
    of the row (natural-log units), added back to the log-sum-exp. ``q`` float32 ``[B, Hq, Lq, D]``,
    ``mean`` ``[B, Hkv, 1, D]`` (``key_mean``)."""
    b, hq, lq, d = q.shape
    hkv = mean.shape[1]
    q5 = np.asarray(q, np.float32).reshape(b, hkv, hq // hkv, lq, d)
    shift = np.einsum("bhgld,bhd->bhgl", q5, mean[:, :, 0, :], dtype=np.float32)
    return (np.float32(scale) * shift).reshape(b, hq, lq)


def quantize_blocks(x: np.ndarray, block: int) -> Tuple[np.ndarray, np.ndarray]:
    """``(int8 values [..., L, D], float32 scales [..., ceil(L / block)])`` of float32 ``x [..., L, D]``:
    ``x ≈ values * scale`` of the row's block. An all-zero block has scale 0 and values 0."""
    x = np.asarray(x, dtype=np.float32)
    *lead, length, dim = x.shape
    n = math.ceil(length / block)
    padded = np.zeros((*lead, n * block, dim), np.float32)
    padded[..., :length, :] = x
    blocks = padded.reshape(*lead, n, block * dim)
    amax = np.abs(blocks).max(axis=-1) if blocks.size else np.zeros((*lead, n), np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(INT8_MAX) / amax, np.float32(0)).astype(np.float32)
    values = round_half_away(blocks * inv[..., None]).clip(-INT8_MAX, INT8_MAX).astype(np.int8)
    scales = (amax / np.float32(INT8_MAX)).astype(np.float32)
    return values.reshape(*lead, n * block, dim)[..., :length, :], scales


def quantize_qk(q: np.ndarray, k: np.ndarray, scale: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The scheme's Q and K: ``(q8 [B, Hq, Lq, D], q_scales [B, Hq, nq], k8 [B, Hkv, Lk, D],
    k_scales [B, Hkv, nk])`` from float32 q and k. Scores in the base-2 domain are
    ``(q8 · k8) * q_scale * k_scale``."""
    q8, qs = quantize_blocks(np.asarray(q, np.float32) * np.float32(scale * LOG2E), BLOCK_Q)
    k8, ks = quantize_blocks(smooth_k(k), BLOCK_K)
    return q8, qs, k8, ks
