"""The CPU backward pass's compiled per-tile kernels (numba): everything between its BLAS tile products.

NumPy spends its time on a score tile in separate passes (subtract, exp, mask, each over the tile
in memory); these do them in one pass per row while the row sits in L1. The forward pass has its
own native kernel (:mod:`.native`). The
exponential is ``exp2((s - shift) log2(e))``: a degree-6 polynomial on the fraction times ``2**n``
built from the exponent bits, which LLVM vectorises (numba has no vector ``exp`` without Intel's
SVML). Scores, masks and shifts stay in natural units, and only differences are scaled to base 2:
a float mask of float32's most negative value (what Hugging Face passes) would overflow to -inf
if scaled by log2(e) itself, and hide keys that it only pushes down.

Non-finite scores follow :mod:`aule_kp.nonfinite`: comparisons are written so that NaN passes
through ``_exp2`` (and so into the row's sum), +inf becomes NaN against any shift, -inf gives 0.
The fastmath flags leave out ``nnan``/``ninf`` for that reason.

Importing this module compiles nothing: each kernel compiles on first use, into numba's on-disk
cache (``cache=True``: next to this file, else numba's per-user cache directory).
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.core.errors import NumbaError
from numba.extending import intrinsic

#: What a kernel's first call raises when numba cannot compile it here (the backend then falls back).
CompileError = NumbaError

#: Reassociation (vector sums), contraction (FMA), no signed zeros; not nnan/ninf (see above).
_FAST = {"contract", "afn", "reassoc", "nsz", "arcp"}

_LOG2E = np.float32(1.4426950408889634)


@intrinsic
def _bits_to_f32(typingctx, bits):  # noqa: ARG001 (numba's signature)
    """The float32 whose bit pattern is the int32 ``bits`` (a register move, vectorisable)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):  # noqa: ARG001
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return sig, codegen


@intrinsic
def _f32_to_bits(typingctx, value):  # noqa: ARG001 (numba's signature)
    """The int32 bit pattern of the float32 ``value``."""
    sig = types.int32(types.float32)

    def codegen(context, builder, signature, args):  # noqa: ARG001
        return builder.bitcast(args[0], context.get_value_type(types.int32))

    return sig, codegen


@njit(inline="always", fastmath=_FAST)
def _exp2(x):
    """``2**x`` for ``x <= 0`` within 1 ulp-ish (relative error < 1e-6); ``x < -127`` gives 0,
    NaN gives NaN (``not (x >= -127)`` would drop it, so the test is written the other way)."""
    x = np.float32(-127.0) if x < np.float32(-127.0) else x
    n = np.floor(x + np.float32(0.5))
    f = x - n  # in [-0.5, 0.5]
    p = np.float32(1.5353362e-4)
    p = p * f + np.float32(1.3398874e-3)
    p = p * f + np.float32(9.6180231e-3)
    p = p * f + np.float32(5.5503395e-2)
    p = p * f + np.float32(2.4022652e-1)
    p = p * f + np.float32(6.9314718e-1)
    p = p * f + np.float32(1.0)
    # NaN/inf never reach the int conversion (LLVM leaves that undefined): they are NaN in p already.
    nc = n if n < np.float32(128.0) else np.float32(128.0)
    return p * _bits_to_f32(np.int32(nc + np.float32(127.0)) << 23)


@njit(inline="always", fastmath=_FAST)
def _row_band(i, width, lo0, hi0):
    """Columns ``[lo, hi)`` of tile position ``i`` inside the band (``lo0 + i``, ``hi0 + i`` clipped).
    Loops then run over ``row[lo:hi]`` views: LLVM did not vectorise loops bounded by these
    clipped indices directly (4x slower, measured)."""
    lo = min(max(lo0 + i, 0), width)
    hi = min(max(hi0 + i, lo), width)
    return lo, hi


@njit(inline="always", fastmath=_FAST)
def _add_mask(row, mask_row):
    """``row += mask_row`` (a mask row of one entry broadcasts)."""
    if mask_row.shape[0] > 1:
        for j in range(row.shape[0]):
            row[j] += mask_row[j]
    else:
        c = mask_row[0]
        for j in range(row.shape[0]):
            row[j] += c


@njit(inline="always", fastmath=_FAST)
def _mask_row(mask, pos, lo, hi):
    """The mask entries at row ``pos`` for columns ``[lo, hi)`` of a ``[1, rows, keys]`` tile whose
    size-1 dims broadcast."""
    mi = pos if mask.shape[1] > 1 else 0
    return mask[0, mi, lo:hi] if mask.shape[2] > 1 else mask[0, mi, 0:1]


@njit(nogil=True, cache=True, fastmath=_FAST)
def probs_tile(s, lse, lo0, hi0, mask, has_mask):
    """Backward: ``s`` [rows, keys] scores become ``P = exp(s - lse)`` in place (mask
    ``[1, rows, keys]`` added first, 0 outside the band); ``lse`` is each row's log-sum-exp (+inf
    for a row that sees no key, so its P is 0)."""
    rows, width = s.shape
    for i in range(rows):
        lo, hi = _row_band(i, width, lo0, hi0)
        s[i, :lo] = 0.0
        s[i, hi:] = 0.0
        row = s[i, lo:hi]
        if has_mask:
            _add_mask(row, _mask_row(mask, i, lo, hi))
        shift = lse[i]
        for j in range(row.shape[0]):
            row[j] = _exp2((row[j] - shift) * _LOG2E)


@njit(nogil=True, cache=True, fastmath=_FAST)
def dscores_tile(dp, p, delta):
    """Backward: ``dp`` [rows, keys] becomes ``dS = P (dP - delta)`` in place (``delta`` per row)."""
    rows, width = dp.shape
    for i in range(rows):
        dl = delta[i]
        for j in range(width):
            dp[i, j] = p[i, j] * (dp[i, j] - dl)


@njit(nogil=True, cache=True, fastmath=_FAST)
def half_to_f32(src, out):
    """``out`` [rows, cols] float32 = the float16 values whose bits ``src`` (uint16) holds, exactly
    (NumPy's own conversion takes ~4 ns an element). Normal and subnormal halves alike are their
    exponent and mantissa moved into float32's fields and scaled by 2**112; inf and NaN keep their
    mantissa under an all-ones exponent; the sign bit is copied."""
    for i in range(src.shape[0]):
        for j in range(src.shape[1]):
            h = np.int32(src[i, j])
            x = (h & 0x7FFF) << 13
            if (h & 0x7C00) == 0x7C00:
                v = _bits_to_f32(x | 0x7F800000)
            else:
                v = _bits_to_f32(x) * np.float32(2.0**112)
            out[i, j] = _bits_to_f32(_f32_to_bits(v) | ((h & 0x8000) << 16))


@njit(nogil=True, cache=True, fastmath=_FAST)
def bf16_to_f32(src, out):
    """``out`` [rows, cols] float32 = the bfloat16 values whose bits ``src`` (uint16) holds."""
    for i in range(src.shape[0]):
        for j in range(src.shape[1]):
            out[i, j] = _bits_to_f32(np.int32(src[i, j]) << 16)
