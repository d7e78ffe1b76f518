"""The CPU backend's ``precision="int8"`` forward: the reference of the scheme in ``aule_kp.quant``.

Vectorised NumPy over blocks of query rows of one head: the int8 Q·Kᵀ as a float32 GEMM of the
integer values (every partial sum stays below 2**24, so it is the int32 accumulation exactly), the
two blocks' scales, mask and band, an exact (two-pass) softmax in the base-2 domain, and P·V with P
and V rounded to 16 bits and float32 accumulation. Scratch is one ``rows x keys`` score block.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np

from ..dtypes import STORAGE, from_f32, to_f32
from ..problem import Problem
from ..quant import BLOCK_K, BLOCK_Q, LOG2E, check_host_values, key_mean, lse_shift, pv_dtype, quantize_qk

#: Scores per block of rows (16 MiB of float32): rows per block = this / visible keys.
_SCORES_PER_BLOCK = 1 << 22
_LN2 = np.float32(math.log(2.0))
_FLT_MAX = np.float32(np.finfo(np.float32).max)


def round16(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 ``x`` rounded to the 16-bit ``dtype`` ("float16" or "bfloat16"), back as float32."""
    return to_f32(from_f32(x, dtype), dtype)


def mask_term(mask: np.ndarray) -> np.ndarray:
    """An additive mask in the base-2 domain: -inf stays (hidden), finite values saturate at
    -FLT_MAX and FLT_MAX rather than overflow (a row masked with float32's minimum stays a uniform
    average; a value above FLT_MAX / log2(e), 2.4e38, is the row's largest score instead of +inf).
    Rows with a +inf or NaN entry are made NaN afterwards (``aule_kp.nonfinite.enforce``)."""
    with np.errstate(over="ignore"):
        scaled = mask * np.float32(LOG2E)
    return np.where(np.isneginf(mask), mask, np.clip(scaled, -_FLT_MAX, _FLT_MAX))


def forward(p: Problem, q: np.ndarray, k: np.ndarray, v: np.ndarray,
            mask: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """``(out [B, Hq, Lq, Dv] in q's storage, lse float32 [B, Hq, Lq])`` (natural log) of the
    INT8 scheme; ValueError for non-finite inputs or fp32 v beyond fp16's range."""
    qf, kf, vf = check_host_values(q, k, v, p.dtype)
    q8, qs, k8, ks = quantize_qk(qf, kf, p.scale)
    pv = pv_dtype(p.dtype)
    v16 = round16(vf, pv)
    out = np.empty((p.batch, p.heads_q, p.len_q, p.dim_v), STORAGE[p.dtype])
    lse = np.empty((p.batch, p.heads_q, p.len_q), np.float32)
    q_row_scale = np.repeat(qs, BLOCK_Q, axis=-1)[..., :p.len_q]
    k_key_scale = np.repeat(ks, BLOCK_K, axis=-1)[..., :p.len_k]
    rows = max(1, min(p.len_q, _SCORES_PER_BLOCK // max(p.len_k, 1)))
    for b in range(p.batch):
        for kv in range(p.heads_kv):
            keys = k8[b, kv].astype(np.float32)
            for h in range(kv * p.group, (kv + 1) * p.group):
                queries = q8[b, h].astype(np.float32)
                for i0 in range(0, p.len_q, rows):
                    i1 = min(p.len_q, i0 + rows)
                    lo, hi = p.key_range(i0, i1)
                    s = queries[i0:i1] @ keys[lo:hi].T  # exact: |sum| <= 127 * 127 * D < 2**24
                    s *= q_row_scale[b, h, i0:i1, None] * k_key_scale[b, kv, None, lo:hi]
                    if mask is not None:
                        s += mask_term(_mask_block(mask, b, h, i0, i1, lo, hi))
                    s[~p.visible(np.arange(i0, i1), np.arange(lo, hi))] = -np.inf
                    o, row_lse = _softmax_pv(s, v16[b, kv, lo:hi], pv)
                    out[b, h, i0:i1] = from_f32(o, p.dtype)
                    lse[b, h, i0:i1] = row_lse
    return out, lse + lse_shift(qf, key_mean(kf), p.scale)


def _mask_block(mask: np.ndarray, b: int, h: int, i0: int, i1: int, lo: int, hi: int) -> np.ndarray:
    mb, mh, mq, mk = mask.shape
    return mask[b if mb > 1 else 0, h if mh > 1 else 0,
                slice(i0, i1) if mq > 1 else slice(0, 1), slice(lo, hi) if mk > 1 else slice(0, 1)]


def _softmax_pv(s: np.ndarray, v16: np.ndarray, pv: str) -> Tuple[np.ndarray, np.ndarray]:
    """Rows of base-2 scores ``s`` (``-inf`` hidden) against ``v16`` (values of the 16-bit type ``pv``,
    which P is rounded to): ``(o, lse)``;
    a row that sees no key is 0 with lse -inf."""
    with np.errstate(invalid="ignore"):
        m = s.max(axis=1, initial=-np.inf)
        seen = np.isfinite(m)
        p = np.exp2(s - np.where(seen, m, 0)[:, None])
        total = p.sum(axis=1, dtype=np.float32)
        o = round16(p, pv) @ v16
    ok = seen & (total > 0)
    o = np.where(ok[:, None], o / np.where(ok, total, 1)[:, None], np.float32(0))
    return o, np.where(ok, (m + np.log2(np.where(ok, total, 1))) * _LN2, -np.inf).astype(np.float32)
