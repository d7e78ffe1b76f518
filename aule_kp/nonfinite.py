"""Non-finite inputs: the semantics every host-array backend's result follows (README, flash_attention).

For query row ``i`` and a key ``j`` inside its causal/window band the score is
``s_ij = scale * q_i . k_j + mask_ij`` in IEEE arithmetic; keys outside the band are never part of
the row, whatever their k, v or mask entries hold (NaN included). Then:

* a NaN or +inf score makes the whole row NaN (output and log-sum-exp);
* otherwise a score of -inf hides its key (a False bool mask entry, a -inf float one): its v is
  never used, NaN or not;
* a row that sees no key is 0 (log-sum-exp -inf);
* else the row is ``sum_j softmax(s)_j v_j`` over the keys it sees, so a NaN or inf in v of a key the
  row sees makes those output entries non-finite, as IEEE arithmetic gives.

The kernels get this right by construction except in two places, repaired by :func:`enforce` after
they ran, at the cost of two reductions (over the output and over a float mask) when all is finite:

* a NaN float-mask entry: GLSL's ``max`` (the Vulkan kernels' mask saturation) may drop it;
* a non-finite v of a key hidden from a row: it reaches the row as ``0 * NaN`` in the P·V product of a
  tile that the row sees only partly. Any such leak leaves a non-finite output entry, so a finite
  output proves there was none; rows that are not finite while v holds non-finite values are
  recomputed here, exactly, in float64.
"""

from __future__ import annotations

import threading
from typing import Optional

import numpy as np

from .dtypes import from_f32, to_f32
from .problem import Problem
from .scoremods import alibi_distance, cap, fold_sinks

#: Largest ``bits & 0x7fff`` of a finite 16-bit value (exponent all ones: inf or NaN).
_FINITE_BELOW = {"float16": 0x7C00, "bfloat16": 0x7F80}

#: Scores a recompute holds at once (rows x keys, float64), bounding its scratch memory.
_CHUNK_SCORES = 1 << 22


#: Bytes one pass of :func:`all_finite` reduces: few enough passes that the Python between them
#: costs nothing (the copy threads check 1-2 MiB pieces in one or two), and no whole-array temporary.
_BLOCK_BYTES = 1 << 20
_scratch = threading.local()


def _scratch_u16(n: int) -> np.ndarray:
    """This thread's reusable uint16 scratch of at least ``n`` elements (a fresh array per call would
    page-fault its memory in every time)."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.size < n:
        buf = _scratch.buf = np.empty(n, np.uint16)
    return buf[:n]


def all_finite(a: np.ndarray, dtype: str) -> bool:
    """Whether host storage ``a`` of ``dtype`` (bf16 as uint16 bits; any contiguous view of the bytes
    will do) holds no NaN or inf. Block by block, with no array as large as ``a``: a whole-array
    temporary cost more than the check (page faults) on the Vulkan host path's outputs."""
    if a.size == 0:
        return True
    flat = np.ascontiguousarray(a).reshape(-1)
    if dtype == "float32":
        f = flat.view(np.float32)
        step = _BLOCK_BYTES // 4
        # NaN propagates through max; +inf shows in max, -inf in min.
        return all(np.isfinite(f[lo:lo + step].max()) and np.isfinite(f[lo:lo + step].min())
                   for lo in range(0, f.size, step))
    bits = flat.view(np.uint16)
    step = _BLOCK_BYTES // 2
    below = _FINITE_BELOW[dtype]
    for lo in range(0, bits.size, step):
        block = _scratch_u16(min(step, bits.size - lo))
        np.bitwise_and(bits[lo:lo + step], 0x7FFF, out=block)  # NumPy's float16 reductions are slow
        if block.max() >= below:
            return False
    return True


def _row_is_nonfinite(out: np.ndarray, dtype: str) -> np.ndarray:
    """``[B, Hq, Lq]``: rows of ``out`` with a NaN or inf entry."""
    return ~np.isfinite(to_f32(out, dtype)).all(axis=-1)


def _row_has_nan(out: np.ndarray, dtype: str) -> np.ndarray:
    return np.isnan(to_f32(out, dtype)).any(axis=-1)


def poisoned_by_mask(problem: Problem, mask: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """``[B, Hq, Lq]`` rows that see a NaN or +inf float-mask entry inside their band, or None when
    the mask holds none at all (one reduction over the mask)."""
    if mask is None or mask.size == 0 or np.max(mask) < np.inf:  # NaN propagates through max
        return None
    p = problem
    bad = ~(np.asarray(mask) < np.inf)  # NaN or +inf
    band = p.visible(np.arange(p.len_q), np.arange(p.len_k))
    rows = (bad & band).any(axis=-1)  # broadcast over the mask's size-1 dims
    return np.broadcast_to(rows, (p.batch, p.heads_q, p.len_q))


def enforce(problem: Problem, q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: Optional[np.ndarray],
            out: np.ndarray, lse: np.ndarray, out_finite: Optional[bool] = None,
            alibi: Optional[np.ndarray] = None, sinks: Optional[np.ndarray] = None) -> None:
    """Make a backend's ``(out, lse)`` for these host inputs follow the module's semantics, in place.

    ``q``/``k``/``v``/``out`` in engine storage, ``mask`` float32 additive (or None), ``lse`` float32;
    ``out_finite``: whether ``out`` is known to be all finite (None: checked here); ``alibi`` the
    float32 slopes of ``problem.alibi_rows`` and ``sinks`` the float32 sink logits (the scores are
    modified as :mod:`aule_kp.scoremods` says; a soft-capped score is finite wherever the plain one is).
    """
    p = problem
    if out.size == 0:
        return
    by_mask = poisoned_by_mask(p, mask)
    if out_finite is None:
        out_finite = all_finite(out, p.dtype)
    if out_finite and by_mask is None:
        return
    if not all_finite(v, p.dtype):
        # Non-finite rows may hold a hidden key's leaked v: recompute them exactly.
        rows = _row_is_nonfinite(out, p.dtype)
        if by_mask is not None:
            rows &= ~by_mask
        _recompute(p, q, k, v, mask, rows, out, lse, alibi, sinks)
    else:
        # With v finite, only a NaN or +inf score makes NaN: that whole row is NaN.
        nan_rows = _row_has_nan(out, p.dtype)
        _fill_nan(p, out, lse, nan_rows)
    if by_mask is not None:
        _fill_nan(p, out, lse, by_mask)


def _fill_nan(p: Problem, out: np.ndarray, lse: np.ndarray, rows: np.ndarray) -> None:
    if rows.any():
        out[rows] = from_f32(np.full(p.dim_v, np.nan, np.float32), p.dtype)
        lse[rows] = np.nan


def _recompute(p: Problem, q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: Optional[np.ndarray],
               rows: np.ndarray, out: np.ndarray, lse: np.ndarray, alibi: Optional[np.ndarray],
               sinks: Optional[np.ndarray]) -> None:
    """Rows ``rows`` (``[B, Hq, Lq]`` bools) of ``out``/``lse`` from the definition, in float64."""
    for b, h in zip(*np.nonzero(rows.any(axis=-1))):
        kv = h // p.group
        kf = to_f32(k[b, kv], p.dtype).astype(np.float64)
        vf = to_f32(v[b, kv], p.dtype).astype(np.float64)
        finite_v = np.isfinite(vf)
        bad_keys = np.nonzero(~finite_v.all(axis=-1))[0]
        v0 = np.where(finite_v, vf, 0.0)
        idx = np.nonzero(rows[b, h])[0]
        step = max(1, _CHUNK_SCORES // max(1, p.len_k))
        for c in range(0, len(idx), step):
            i = idx[c : c + step]
            o, s_lse = _rows(p, q, kf, v0, vf[bad_keys], bad_keys, mask, b, h, i, alibi,
                             None if sinks is None else float(sinks[h]))
            out[b, h, i] = from_f32(o.astype(np.float32), p.dtype)
            lse[b, h, i] = s_lse


def _rows(p: Problem, q: np.ndarray, kf: np.ndarray, v0: np.ndarray, v_bad: np.ndarray, bad_keys: np.ndarray,
          mask: Optional[np.ndarray], b: int, h: int, i: np.ndarray, alibi: Optional[np.ndarray] = None,
          sink: Optional[float] = None):
    """``(out [n, Dv], lse [n])`` float64 of query rows ``i`` of (batch ``b``, head ``h``); ``v0`` is v
    with its non-finite entries zeroed, ``v_bad`` the full rows of v at keys ``bad_keys``."""
    qf = to_f32(q[b, h, i], p.dtype).astype(np.float64)
    with np.errstate(all="ignore"):
        s = cap(qf @ kf.T * p.scale, p.softcap)
        if alibi is not None:
            s -= alibi[b if alibi.shape[0] > 1 else 0, h] * alibi_distance(p.diag, i, np.arange(p.len_k), np.float64)
        if mask is not None:
            mb, mh, mq, _ = mask.shape
            s = s + mask[b if mb > 1 else 0, h if mh > 1 else 0][i if mq > 1 else np.zeros_like(i)]
        s = np.where(p.visible(i, np.arange(p.len_k)), s, -np.inf)  # outside the band: never part of the row
        poisoned = (np.isnan(s) | (s == np.inf)).any(axis=-1)
        m = np.where(poisoned, 0.0, s.max(axis=-1, initial=-np.inf))
        hidden = m == -np.inf
        w = np.exp(s - np.where(hidden | poisoned, 0.0, m)[:, None])
        w[poisoned] = 0.0
        total = w.sum(axis=-1)
        acc = w @ v0
        if len(bad_keys):
            seen = s[:, bad_keys] > -np.inf  # the non-finite v of a hidden key is never used
            terms = np.where(seen[:, :, None], w[:, bad_keys, None] * v_bad[None], 0.0)
            acc = acc + np.where(np.isfinite(v_bad)[None], 0.0, terms).sum(axis=1)
        if sink is not None:  # the sink joins every row's sum; a hidden row's lse is the sink
            acc = acc * fold_sinks(m, total, np.full_like(m, sink))[:, None]
        o = np.where(hidden[:, None], 0.0, acc / np.where(hidden, 1.0, total)[:, None])
        o[poisoned] = np.nan
        row_lse = m + np.log(total) if sink is not None else np.where(hidden, -np.inf, m + np.log(total))
        row_lse[poisoned] = np.nan
    return o, row_lse.astype(np.float32)

