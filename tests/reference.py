"""Ground truth for every backend's tests: naive attention in float64 NumPy.

It materialises the full ``[B, Hq, Lq, Lk]`` score tensor on purpose: no blocking, no online softmax,
nothing to get subtly wrong. Keep test shapes small enough for that.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from aule_kp.dtypes import to_f32
from aule_kp.problem import Problem


def reference_attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, problem: Problem, mask: Optional[np.ndarray] = None,
    alibi: Optional[np.ndarray] = None, sinks: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """``(out float64 [B, Hq, Lq, Dv], lse float64 [B, Hq, Lq])`` for storage-dtype inputs.

    Score modifiers as flash-attn and gpt-oss define them: the score is
    ``softcap·tanh(scale q.k / softcap)`` (``problem.softcap`` > 0), minus ``slope·|i + Lk - Lq - j|``
    (``alibi``: slopes ``[Hq]`` or ``[B, Hq]``; ``problem.diag`` is ``Lk - Lq`` for flash-attn's
    alignment), plus the mask; ``sinks`` ``[Hq]`` adds one column of that logit to every row's
    softmax, with no value (a row that sees no key is then 0 with lse = sink).

    Same conventions as the backends (README, ``flash_attention``): a key outside the band of
    ``problem`` is not part of the row at all; inside it the score is ``scale q.k + mask``, and a
    score of -inf hides the key (its v unused, whatever it holds). A row with a NaN or +inf score is
    NaN (lse NaN); a row that sees no key has output 0 and lse -inf; otherwise the output is the
    softmax-weighted sum of the v rows of the keys it sees (IEEE arithmetic: a non-finite v entry of
    a seen key makes that output entry non-finite).
    """
    p = problem
    out = np.zeros((p.batch, p.heads_q, p.len_q, p.dim_v))
    lse = np.full((p.batch, p.heads_q, p.len_q), -np.inf)
    if p.heads_q == 0 or p.len_k == 0:
        return out, lse
    vf = np.repeat(to_f32(v, p.dtype).astype(np.float64), p.group, axis=1)
    s = _scores(q, k, p, mask, alibi)
    with np.errstate(all="ignore"):
        poisoned = (np.isnan(s) | (s == np.inf)).any(axis=-1)
        s = np.where(poisoned[..., None], -np.inf, s)  # their result is NaN whatever the rest
        m = s.max(axis=-1, keepdims=True)
        sink = None if sinks is None else np.broadcast_to(_sink_column(sinks, p), m.shape)
        if sink is not None:
            m = np.maximum(m, sink)
        hidden = m == -np.inf
        e = np.exp(s - np.where(hidden, 0.0, m))
        total = e.sum(axis=-1, keepdims=True)
        if sink is not None:
            total = total + np.exp(sink - m)
        if np.isfinite(vf).all():
            weighted = e @ vf
        else:  # a hidden key's v never enters, so no 0 * NaN: sum the seen terms only
            seen = (s > -np.inf)[..., None]
            weighted = np.where(seen, e[..., None] * vf[..., None, :, :], 0.0).sum(axis=-2)
        out = np.where(hidden, 0.0, weighted / np.where(hidden, 1.0, total))
        lse = np.where(hidden, -np.inf, m + np.log(total))[..., 0]
    out[poisoned] = np.nan
    lse[poisoned] = np.nan
    return out, lse


def _sink_column(sinks: np.ndarray, p: Problem) -> np.ndarray:
    """The sink logits as float64 ``[1, Hq, 1, 1]``."""
    return np.asarray(sinks, np.float64).reshape(1, p.heads_q, 1, 1)


def _scores(q: np.ndarray, k: np.ndarray, problem: Problem, mask: Optional[np.ndarray],
            alibi: Optional[np.ndarray] = None) -> np.ndarray:
    """float64 scores ``[B, Hq, Lq, Lk]``: ``cap(scale q.k) + alibi + mask`` inside the band, -inf
    outside it."""
    p = problem
    qf, kf = (to_f32(a, p.dtype).astype(np.float64) for a in (q, k))
    kr = np.repeat(kf, p.group, axis=1)
    with np.errstate(all="ignore"):
        s = (qf @ kr.swapaxes(-1, -2)) * p.scale
        if p.softcap:
            s = p.softcap * np.tanh(s / p.softcap)
        if alibi is not None:
            slopes = np.asarray(alibi, np.float64).reshape(-1, p.heads_q)[:, :, None, None]
            i = np.arange(p.len_q)[:, None]
            j = np.arange(p.len_k)[None, :]
            s = s - slopes * np.abs(i + p.diag - j)
        if mask is not None:
            s = s + np.asarray(mask, dtype=np.float64)
    return np.where(p.visible(np.arange(p.len_q), np.arange(p.len_k)), s, -np.inf)


def reference_backward(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    dout: np.ndarray,
    problem: Problem,
    mask: Optional[np.ndarray] = None,
    alibi: Optional[np.ndarray] = None,
    sinks: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of ``sum(out * dout)``: ``(dq, dk, dv, ds)`` in float64 for storage-dtype inputs.

    Straight from the definition over the full probability matrix P (hidden rows: P = 0; with sinks,
    P is normalised over the keys and the sink column): ``dv = Pᵀ dout``,
    ``dS = P ∘ (dout vᵀ - rowsum(P ∘ dout vᵀ))``, and through the soft-cap ``dS' = dS ∘ (1 - tanh²)``
    (``dS' = dS`` without one), ``dq = dS' k · scale``, ``dk = dS'ᵀ q · scale``; dk and dv summed over
    the query heads that share a kv head. ``ds`` [B, Hq, Lq, Lk] is the gradient wrt the additive
    mask (sum it over broadcast dims). See ``reference_sinks_grad`` for the sinks' gradient.
    """
    p = problem
    qf, kf, vf, do = (to_f32(a, p.dtype).astype(np.float64) for a in (q, k, v, dout))
    kr = np.repeat(kf, p.group, axis=1)
    vr = np.repeat(vf, p.group, axis=1)
    prob = _probabilities(q, k, p, mask, alibi, sinks)
    dp = do @ vr.swapaxes(-1, -2)
    ds = prob * (dp - (prob * dp).sum(axis=-1, keepdims=True))
    dsc = ds
    if p.softcap:
        t = np.tanh((qf @ kr.swapaxes(-1, -2)) * p.scale / p.softcap)
        dsc = ds * (1.0 - t * t)
    dq = dsc @ kr * p.scale
    per_group = (p.batch, p.heads_kv, p.group, p.len_k)
    dk = (dsc.swapaxes(-1, -2) @ qf * p.scale).reshape(*per_group, p.dim_k).sum(axis=2)
    dv = (prob.swapaxes(-1, -2) @ do).reshape(*per_group, p.dim_v).sum(axis=2)
    return dq, dk, dv, ds


def reference_sinks_grad(q: np.ndarray, k: np.ndarray, v: np.ndarray, dout: np.ndarray, problem: Problem,
                         sinks: np.ndarray, mask: Optional[np.ndarray] = None,
                         alibi: Optional[np.ndarray] = None) -> np.ndarray:
    """float64 ``d sum(out * dout) / d sinks`` ``[Hq]``: the sink column's probability ``P_sink``
    times ``-rowsum(P ∘ dout vᵀ)`` (its dS, with no value of its own), summed over batches and rows."""
    p = problem
    vr = np.repeat(to_f32(v, p.dtype).astype(np.float64), p.group, axis=1)
    do = to_f32(dout, p.dtype).astype(np.float64)
    prob = _probabilities(q, k, p, mask, alibi, sinks)
    out = prob @ vr
    _, lse = reference_attention(q, k, v, p, mask, alibi, sinks)
    p_sink = np.exp(_sink_column(sinks, p)[..., 0] - lse)
    return -(p_sink * (do * out).sum(axis=-1)).sum(axis=(0, 2))


def backward_scales(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    dout: np.ndarray,
    problem: Problem,
    mask: Optional[np.ndarray] = None,
    alibi: Optional[np.ndarray] = None,
    sinks: Optional[np.ndarray] = None,
) -> Tuple[float, float, float, float]:
    """``value_scale`` of ``conftest.tolerance`` for ``(dq, dk, dv, dmask)``: the largest sum of
    absolute terms behind an entry of each gradient (the ``|A||B|`` of a product's rounding bound).

    ``dS = P ∘ (dP - D)`` is bounded termwise by ``A = P ∘ (|dO||V|ᵀ + rowsum(|dO| ∘ |O|))`` (both of
    its float32 sums, over Dv), so ``|dq| <= scale·A|K|``, ``|dk| <= scale·Aᵀ|Q|``, ``|dv| <= Pᵀ|dO|``
    (heads of a group summed) and ``|dmask| <= A`` summed over the mask's broadcast dims (a
    soft-cap's derivative ``1 - tanh²`` is at most 1: the same bounds hold).
    """
    p = problem
    qf, kf, vf, do = (np.abs(to_f32(a, p.dtype).astype(np.float64)) for a in (q, k, v, dout))
    if 0 in (p.batch, p.heads_q, p.len_q, p.len_k):  # no terms (dk = 0 still has dv's: scores of 0)
        return 0.0, 0.0, 0.0, 0.0
    kr = np.repeat(kf, p.group, axis=1)
    vr = np.repeat(vf, p.group, axis=1)
    prob = _probabilities(q, k, p, mask, alibi, sinks)
    o = prob @ vr
    a = prob * (do @ vr.swapaxes(-1, -2) + (do * o).sum(axis=-1, keepdims=True))
    per_group = (p.batch, p.heads_kv, p.group, p.len_k)
    s_dq = abs(p.scale) * float((a @ kr).max(initial=0.0))
    s_dk = abs(p.scale) * float((a.swapaxes(-1, -2) @ qf).reshape(*per_group, p.dim_k).sum(axis=2).max(initial=0.0))
    s_dv = float((prob.swapaxes(-1, -2) @ do).reshape(*per_group, p.dim_v).sum(axis=2).max(initial=0.0))
    s_ds = 0.0
    if p.mask_shape is not None:
        axes = tuple(i for i, n in enumerate(p.mask_shape) if n == 1)
        s_ds = float(a.sum(axis=axes).max(initial=0.0))
    return s_dq, s_dk, s_dv, s_ds


def output_scale(q: np.ndarray, k: np.ndarray, v: np.ndarray, problem: Problem,
                 mask: Optional[np.ndarray] = None, alibi: Optional[np.ndarray] = None,
                 sinks: Optional[np.ndarray] = None) -> float:
    """``value_scale`` of ``conftest.tolerance`` for an attention output: the largest ``P|V|`` (each
    output entry's sum of absolute weighted terms, at most ``max |v|``)."""
    p = problem
    if p.len_q == 0 or p.len_k == 0 or p.heads_q == 0 or p.batch == 0:
        return 0.0
    vr = np.repeat(np.abs(to_f32(v, p.dtype).astype(np.float64)), p.group, axis=1)
    return float((_probabilities(q, k, p, mask, alibi, sinks) @ vr).max(initial=0.0))


def _probabilities(q: np.ndarray, k: np.ndarray, problem: Problem, mask: Optional[np.ndarray],
                   alibi: Optional[np.ndarray] = None, sinks: Optional[np.ndarray] = None) -> np.ndarray:
    """The float64 attention probabilities P ``[B, Hq, Lq, Lk]`` of finite inputs (rows that see no key: 0;
    with sinks, normalised over the keys and the sink column, which is left out)."""
    s = _scores(q, k, problem, mask, alibi)
    with np.errstate(all="ignore"):
        m = s.max(axis=-1, keepdims=True)
        sink = None if sinks is None else np.broadcast_to(_sink_column(sinks, problem), m.shape)
        if sink is not None:
            m = np.maximum(m, sink)
        hidden = m == -np.inf
        e = np.exp(s - np.where(hidden, 0.0, m))
        total = e.sum(axis=-1, keepdims=True) + (0.0 if sink is None else np.exp(sink - m))
        return np.where(hidden, 0.0, e / total)
