"""Score modifiers: tanh soft-capping and ALiBi (flash-attn's ``softcap``, ``alibi_slopes``) and
attention sinks (gpt-oss): their checks, and the host arithmetic of the CPU backend and the
non-finite repairs (the GPU kernels do the same in GLSL and Triton).

For query ``i`` and a key ``j`` its causal/window band lets through (``Problem.visible``) the score is

    s_ij = cap(scale * q_i . k_j) + alibi_ij + mask_ij
    cap(x) = softcap * tanh(x / softcap)            (softcap = 0.0: cap(x) = x)
    alibi_ij = -slope * |j - (i + diag)|            (diag = Lk - Lq: flash-attn's |i + Lk - Lq - j|)

with the slope of the row's query head (and batch, for ``[B, Hq]`` slopes). Soft-capping comes after
the scale and before the bias and mask, as flash-attn applies it. A sink is one logit per query head
that joins every row's softmax denominator but carries no value (gpt-oss): the kernels fold it into
a row's running (max, sum) once its keys are done, so the output is the softmax with the sink
column and the returned log-sum-exp includes it (a row that sees no key is 0, with lse = sink). The
backward pass then needs nothing new for q, k and v (``P = exp(S - lse)`` are the true
probabilities and ``D = rowsum(dO * O)``), and ``d sink_h = -sum over (b, i) of exp(sink_h - lse_bhi) * D_bhi``
(:func:`sinks_grad`).
"""

from __future__ import annotations

import numbers
from typing import Any, Optional, Tuple

import numpy as np

from .inputs import MAX_SCALE, is_torch


def check_softcap(softcap: Any) -> float:
    """The soft-cap as a float (0.0: off); ValueError naming ``softcap`` unless a finite number >= 0."""
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not 0 <= softcap <= MAX_SCALE:
        raise ValueError(f"softcap must be a number in [0, {MAX_SCALE:g}] (0.0 = off; the kernels compute in "
                         f"float32), got {softcap!r}")
    return float(softcap)


def _per_head(name: str, x: Any, shapes: Tuple[Tuple[int, ...], ...], expected: str) -> np.ndarray:
    """``x`` (NumPy or torch, floating point, finite) as a float32 host array; TypeError/ValueError
    naming ``name`` otherwise."""
    if is_torch(x):
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
        host = x.detach().float().cpu().numpy()
    elif isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise TypeError(f"{name} must be floating point, got numpy {x.dtype}")
        host = x.astype(np.float32)
    else:
        raise TypeError(f"{name} must be a numpy.ndarray or torch.Tensor, got {type(x).__name__}")
    if tuple(host.shape) not in shapes:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(host.shape)}")
    if not np.isfinite(host).all():
        raise ValueError(f"{name} must be finite")
    return np.ascontiguousarray(host)


def check_alibi(alibi_slopes: Any, batch: int, heads_q: int) -> Optional[np.ndarray]:
    """float32 slopes ``[1, Hq]`` (``[Hq]`` given) or ``[B, Hq]``, or None; errors name ``alibi_slopes``.
    Slopes are constants: no gradient flows to them (as in flash-attn)."""
    if alibi_slopes is None:
        return None
    slopes = _per_head("alibi_slopes", alibi_slopes, ((heads_q,), (batch, heads_q)),
                       f"[Hq] = ({heads_q},) or [B, Hq] = ({batch}, {heads_q})")
    return slopes.reshape(-1, heads_q)


def check_sinks(sinks: Any, heads_q: int) -> Optional[np.ndarray]:
    """float32 ``[Hq]`` sink logits, or None; errors name ``sinks``."""
    if sinks is None:
        return None
    return _per_head("sinks", sinks, ((heads_q,),), f"[Hq] = ({heads_q},)")


def check(softcap: Any, alibi_slopes: Any, sinks: Any, batch: int,
          heads_q: int) -> Tuple[float, Optional[np.ndarray], Optional[np.ndarray]]:
    """``(check_softcap, check_alibi, check_sinks)`` of one call's modifiers, in one pass through
    this module (tests/test_call_path.py)."""
    return check_softcap(softcap), check_alibi(alibi_slopes, batch, heads_q), check_sinks(sinks, heads_q)


def cap(s: np.ndarray, softcap: float) -> np.ndarray:
    """``softcap * tanh(s / softcap)`` of float scores, in place; ``s`` unchanged for softcap 0."""
    if softcap:
        c = s.dtype.type(softcap)
        np.divide(s, c, out=s)
        np.tanh(s, out=s)
        np.multiply(s, c, out=s)
    return s


def alibi_distance(diag: int, rows: np.ndarray, cols: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
    """``|j - (i + diag)|`` for query rows ``rows`` and keys ``cols``: ``[len(rows), len(cols)]``."""
    return np.abs(cols[None, :] - (rows[:, None] + diag)).astype(dtype)


def fold_sinks(m: np.ndarray, total: np.ndarray, sinks: np.ndarray) -> np.ndarray:
    """Folds one sink logit per row into a finished online softmax, in place: ``m`` (the rows' shift,
    -inf for a row that saw no key) becomes ``max(m, sink)`` and ``total`` (their sum of
    ``exp(s - m)``) gains ``exp(sink - m)``; returns the factor ``exp(m_old - m_new)`` the rows'
    weighted sums must be multiplied by (0 for rows that saw no key; a NaN total stays NaN)."""
    with np.errstate(invalid="ignore", over="ignore"):
        m_new = np.maximum(m, sinks)
        factor = np.exp(m - m_new)
        total *= factor
        total += np.exp(sinks - m_new)
        m[:] = m_new
    return factor


def sink_lse(lse: np.ndarray, sinks: np.ndarray) -> np.ndarray:
    """``logaddexp(lse [B, Hq, Lq], sinks [Hq])``: the log-sum-exp of rows that see no key is the sink."""
    return np.logaddexp(lse, sinks[None, :, None]).astype(np.float32)


def sinks_grad(out: Any, dout: Any, lse: Any, sinks: Any) -> Any:
    """``d sinks [Hq]`` (float32 torch) from the sink-including ``out``, ``lse`` and the output
    gradient ``dout`` (torch tensors): ``-sum_{b,i} exp(sink - lse) * rowsum(dout * out)``."""
    import torch

    delta = (dout.float() * out.float()).sum(-1)
    weight = torch.exp(sinks.float()[None, :, None] - lse.float())
    return -(weight * delta).sum(dim=(0, 2))
