"""The backward of rows whose log-sum-exp cannot carry log(l): the CPU backend's three tiers take
``P = exp(S - lse)`` from the saved lse, which fails where every score of a row is huge (Hugging Face
pads with float32's minimum: ``S = q·k·scale - 3.4e38`` rounds to -3.4e38 for every key, the forward
averages the row uniformly, and ``lse = -3.4e38 + log(Lk)`` rounds to -3.4e38, so ``P = exp(0) = 1``
per key instead of ``1/Lk``). Such rows are rare; they are taken out of the tiers' call (their lse
made +inf: P = 0, no contribution) and their gradients computed here from the row's float32 scores,
as the forward weighed them (``softmax(S)``), in float64.

The same rows and threshold as the Vulkan backward's recompute (glsl/fa2_bwd_pre.comp).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np

from ..dtypes import to_f32
from ..problem import Problem
from ..scoremods import alibi_distance

#: |lse| above which it is recomputed: 1024 in log2 units. Below it a float32 ulp of lse is at most
#: 2^-13 (P within ~1e-4 relative); far above it log(l) is lost entirely.
SATURATED_LSE = 1024 * math.log(2.0)


def split(lse: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``(lse for the tiers, saturated rows)``: the rows' ``[n, 3]`` (batch, head, row) indices, whose
    lse the tiers' copy holds as +inf (their P is 0 there). ``lse`` itself when no row is saturated."""
    rows = np.argwhere(np.isfinite(lse) & (np.abs(lse) > SATURATED_LSE))
    if len(rows) == 0:
        return lse, rows
    tiers = np.array(lse, dtype=np.float32, copy=True)
    tiers[tuple(rows.T)] = np.inf
    return tiers, rows


def add_gradients(p: Problem, rows: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray, dout: np.ndarray,
                  mask: Optional[np.ndarray], alibi: Optional[np.ndarray], sinks: Optional[np.ndarray],
                  grads: Tuple[np.ndarray, ...], dmask: Optional[np.ndarray]) -> None:
    """Adds the saturated ``rows``' contributions to ``grads`` = (dq, dk, dv) (float32, in place) and to
    ``dmask`` (the mask's shape, broadcast dims summed), one query head at a time; a head's sink logit
    takes its share of the row's weight (it has no value)."""
    dq, dk, dv = grads
    for b, h in {(int(b), int(h)) for b, h, _ in rows}:
        ii = rows[(rows[:, 0] == b) & (rows[:, 1] == h), 2]
        kvh = h // p.group
        qf = to_f32(q[b, h, ii], p.dtype).astype(np.float64)
        kf = to_f32(k[b, kvh], p.dtype).astype(np.float64)
        vf = to_f32(v[b, kvh], p.dtype).astype(np.float64)
        do = to_f32(dout[b, h, ii], p.dtype).astype(np.float64)
        s = qf @ kf.T * p.scale
        tanh = None
        if p.softcap:
            tanh = np.tanh(s / p.softcap)
            s = p.softcap * tanh
        cols = np.arange(p.len_k)
        if alibi is not None:
            slope = float(alibi[b if alibi.shape[0] > 1 else 0, h])
            s = s - slope * alibi_distance(p.diag, ii, cols, np.float64)
        if mask is not None:
            m = mask[b if mask.shape[0] > 1 else 0, h if mask.shape[1] > 1 else 0]
            s = s + m[ii if m.shape[0] > 1 else np.zeros_like(ii)].astype(np.float64)
        # The forward's float32 scores: the part q·k lost against a saturating mask stays lost.
        s = s.astype(np.float32).astype(np.float64)
        s = np.where(p.visible(ii, cols), s, -np.inf)
        shift = s.max(axis=1, keepdims=True)
        sink = -np.inf if sinks is None else float(sinks[h])
        shift = np.maximum(shift, sink)
        prob = np.exp(s - shift)
        prob /= prob.sum(axis=1, keepdims=True) + np.exp(sink - shift)
        dp = do @ vf.T
        ds = prob * (dp - (prob * dp).sum(axis=1, keepdims=True))
        ds = np.where(prob == 0.0, 0.0, ds)  # a key of weight 0 (its v may be NaN) has dS 0
        if dmask is not None:
            _add_to_mask(dmask, b, h, ii, ds)
        if tanh is not None:
            ds = ds * (1.0 - tanh * tanh)
        dq[b, h, ii] += (p.scale * ds @ kf).astype(np.float32)
        dk[b, kvh] += (p.scale * ds.T @ qf).astype(np.float32)
        dv[b, kvh] += (prob.T @ do).astype(np.float32)


def _add_to_mask(dmask: np.ndarray, b: int, h: int, ii: np.ndarray, ds: np.ndarray) -> None:
    """``ds`` [rows, Lk] of query head ``h`` into ``dmask``, summed over its broadcast dims."""
    mb, mh, mq, mk = dmask.shape
    target = dmask[b if mb > 1 else 0, h if mh > 1 else 0]
    part = ds.sum(axis=1, keepdims=True) if mk == 1 else ds
    if mq == 1:
        target[0] += part.sum(axis=0).astype(np.float32)
    else:
        np.add.at(target, ii, part.astype(np.float32))
