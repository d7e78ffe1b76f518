"""Float64 references for the serving calls, written from flash-attn's documented semantics
(``flash_attn_interface.py``: ``flash_attn_varlen_func``, ``flash_attn_with_kvcache``;
``flash_attn/layers/rotary.py``: ``apply_rotary_emb_torch``), independent of aule_kp's code.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, causal: bool,
           window: Optional[Tuple[int, int]], softcap: float = 0.0, slopes: Optional[np.ndarray] = None,
           sinks: Optional[np.ndarray] = None) -> np.ndarray:
    """One sequence: q ``[Lq, Hq, D]``, k ``[Lk, Hkv, D]``, v ``[Lk, Hkv, Dv]`` -> ``[Lq, Hq, Dv]``.
    Causal and window are aligned bottom-right: query ``i`` sees keys in
    ``[i + Lk - Lq - left, i + Lk - Lq + right]`` (causal: right = 0); a row with no key is 0.
    ``softcap``: scores ``softcap * tanh(s / softcap)``; ``slopes [Hq]``: ALiBi bias
    ``-slope * |i + Lk - Lq - j|`` (flash-attn); ``sinks [Hq]``: a logit per head in every row's
    softmax denominator that carries no value (gpt-oss)."""
    lq, hq, _ = q.shape
    lk, hkv, dv = v.shape
    out = np.zeros((lq, hq, dv))
    if lq == 0 or lk == 0:
        return out
    g = hq // hkv
    kk = np.repeat(k.astype(np.float64), g, axis=1)
    vv = np.repeat(v.astype(np.float64), g, axis=1)
    s = np.einsum("ihd,jhd->hij", q.astype(np.float64), kk) * scale
    i = np.arange(lq)[:, None] + lk - lq
    j = np.arange(lk)[None, :]
    if softcap:
        s = softcap * np.tanh(s / softcap)
    if slopes is not None:
        s = s - np.asarray(slopes, np.float64)[:, None, None] * np.abs(i - j)[None]
    ok = np.ones((lq, lk), bool)
    left, right = (-1, -1) if window is None else window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    s = np.where(ok[None], s, -np.inf)
    if sinks is not None:  # a sink column: in the softmax, no value
        s = np.concatenate([s, np.broadcast_to(np.asarray(sinks, np.float64)[:, None, None], (hq, lq, 1))], -1)
        vv = np.concatenate([vv, np.zeros((1, hq, dv))], 0)
    m = s.max(axis=-1, keepdims=True)
    seen = np.isfinite(m)
    p = np.exp(s - np.where(seen, m, 0.0))
    p = np.where(seen, p / np.where(seen, p.sum(-1, keepdims=True), 1.0), 0.0)
    return np.einsum("hij,jhd->ihd", p, vv)


def varlen(q, k, v, cu_q, cu_k, scale, causal=False, window=None, softcap=0.0, slopes=None, sinks=None):
    """``flash_attn_varlen_func``: each sequence attends to its own keys only (``slopes`` ``[Hq]``
    or per sequence ``[B, Hq]``)."""
    out = np.zeros((q.shape[0], q.shape[1], v.shape[2]))
    for b in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        sl = None if slopes is None else (slopes[b] if np.ndim(slopes) == 2 else slopes)
        out[qs] = attend(q[qs], k[ks], v[ks], scale, causal, window, softcap, sl, sinks)
    return out


def rotary(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, pos: np.ndarray, interleaved: bool) -> np.ndarray:
    """``apply_rotary_emb_torch``: ``x[..., :R] * cos + rotate_half(x[..., :R]) * sin`` at positions
    ``pos`` (x ``[L, H, D]``, pos ``[L]``); ``rotate_half`` is ``(-x2, x1)`` of the halves (NeoX) or
    of the even/odd dims (interleaved), cos repeated to match."""
    ro = 2 * cos.shape[1]
    c, s = cos[pos][:, None, :], sin[pos][:, None, :]
    if interleaved:
        c, s = np.repeat(c, 2, axis=-1), np.repeat(s, 2, axis=-1)
        x1, x2 = x[..., 0:ro:2], x[..., 1:ro:2]
        half = np.stack([-x2, x1], axis=-1).reshape(*x.shape[:-1], ro)
    else:
        c, s = np.concatenate([c, c], -1), np.concatenate([s, s], -1)
        x1, x2 = x[..., : ro // 2], x[..., ro // 2 : ro]
        half = np.concatenate([-x2, x1], axis=-1)
    return np.concatenate([x[..., :ro] * c + half * s, x[..., ro:]], axis=-1)


def kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, block_table=None, cos=None, sin=None,
            interleaved=True, causal=False, scale=None, window=None, round_to=None, softcap=0.0, slopes=None,
            sinks=None):
    """``flash_attn_with_kvcache`` in float64: ``(out [B, Lq, Hq, Dv], k_cache, v_cache, q_rotated)`` with
    the caches as they are after the call (new k rotated at ``cache_seqlens + i``, then written at those
    positions; q rotated at ``cache_seqlens + i`` when causal or local, i.e. a ``window`` side in
    ``[0, capacity)`` (flash-attn makes -1 of a side at least the cache's seqlen_k), else at
    ``cache_seqlens``).
    ``round_to``: a function rounding rotated values to the storage type, as the cache stores them."""
    kc, vc = k_cache.astype(np.float64).copy(), v_cache.astype(np.float64).copy()
    b, lq, hq, d = q.shape
    page = kc.shape[1]
    new = 0 if k is None else k.shape[1]
    cap = page * (block_table.shape[1] if block_table is not None else 1)
    lens = np.full(b, cap) if cache_seqlens is None else np.broadcast_to(np.asarray(cache_seqlens), (b,))
    rnd = round_to or (lambda x: x)
    scale = 1 / np.sqrt(d) if scale is None else scale

    def slot(s, t):
        return (block_table[s, t // page], t % page) if block_table is not None else (s, t)

    out = np.zeros((b, lq, hq, v_cache.shape[-1]))
    q_rot = q.astype(np.float64).copy()
    for s in range(b):
        n = int(lens[s])
        qs = q[s].astype(np.float64)
        if cos is not None:
            local = window is not None and any(0 <= w < cap for w in window)
            qpos = n + (np.arange(lq) if (causal or local) else np.zeros(lq, int))
            qs = rnd(rotary(qs, cos, sin, qpos, interleaved))
        q_rot[s] = qs
        for i in range(new):
            kn = k[s, i : i + 1].astype(np.float64)
            if cos is not None:
                kn = rnd(rotary(kn, cos, sin, np.array([n + i]), interleaved))
            kc[slot(s, n + i)] = kn[0]
            vc[slot(s, n + i)] = v[s, i]
        total = n + new
        ks = np.stack([kc[slot(s, t)] for t in range(total)]) if total else kc[:0, 0]
        vs = np.stack([vc[slot(s, t)] for t in range(total)]) if total else vc[:0, 0]
        sl = None if slopes is None else (slopes[s] if np.ndim(slopes) == 2 else slopes)
        out[s] = attend(qs, ks, vs, scale, causal, window, softcap, sl, sinks)
    return out, kc, vc, q_rot
