"""aule_kp.compat against an independent float64 statement of aule-attention 0.5.0's API, arguments
drawn by hypothesis (tests/test_compat.py holds the fixed cases).

The reference here shares no code with the library: aule-attention's band written out (query ``i``
sees key ``j`` when ``j <= i`` if causal, and ``i - j <= w`` plus, without causal, ``j - i <= w``
for ``window_size = w > 0``), its half rotation ``x*cos + rotate_half(x)*sin`` at positions
``0..L-1`` in float64, a float64 softmax (a row that sees no key is 0, as the README says of
aule-kp). Drawn: NumPy or torch inputs in each storage dtype, GQA, ``Lq`` and ``Lk`` from 1 either
way round, causal, window sizes (0 and negatives mean none), rotary tables or none, ``scale`` None
or given, and which entry point runs the call (``flash_attention``, ``flash_attention_rope``,
``Aule.attention``, ``Aule.attention_gpu``).

Tolerance (error model, conftest.tolerance): the attention output's, computed from the rotated
inputs as stored, plus the rotation's own error carried through the softmax. The rotation of one
channel is off by at most ``rotation_tolerance(|x1| + |x2|, dtype)`` (a float32 rotation against the
float64 one, both rounded to storage); a score moves by at most ``|scale|·Σ_d (|q_d| δk + |k_d| δq)``,
and a softmax whose scores move by ``δ`` moves each output by at most ``(e^{2δ} - 1)·max|v|``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import pytest
from conftest import exponent_range, rotation_tolerance, tolerance
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aule_kp.compat as aule


def _band(lq: int, lk: int, causal: bool, window: int) -> np.ndarray:
    """aule-attention's visibility, top-left: ``[Lq, Lk]`` bool."""
    i, j = np.arange(lq)[:, None], np.arange(lk)[None, :]
    seen = np.ones((lq, lk), dtype=bool)
    if causal:
        seen &= j <= i
    if window > 0:
        seen &= i - j <= window
        if not causal:
            seen &= j - i <= window
    return seen


def _rotate64(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """float64 ``x*cos + rotate_half(x)*sin`` over the last axis at positions ``0..L-1``."""
    h = x.shape[-1] // 2
    c, s = cos[: x.shape[-2]], sin[: x.shape[-2]]
    x1, x2 = x[..., :h], x[..., h:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def _attention64(q: np.ndarray, k: np.ndarray, v: np.ndarray, seen: np.ndarray, scale: float) -> np.ndarray:
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = np.where(seen, scale * (q @ np.swapaxes(k, -1, -2)), -np.inf)
    m = s.max(axis=-1, keepdims=True)
    hidden = m == -np.inf
    e = np.exp(s - np.where(hidden, 0.0, m))
    total = e.sum(axis=-1, keepdims=True)
    return np.where(hidden, 0.0, (e @ v) / np.where(hidden, 1.0, total))


def _storage(x64: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values rounded to ``dtype`` storage, as float64 (bfloat16 by torch's rounding)."""
    if dtype == "bfloat16":
        import torch

        return torch.from_numpy(x64).to(torch.bfloat16).double().numpy()
    return x64.astype(dtype).astype(np.float64)


@st.composite
def calls(draw: Any) -> dict:
    entry = draw(st.sampled_from(["flash_attention", "flash_attention_rope", "Aule.attention", "Aule.attention_gpu"]))
    torch_in = entry in ("flash_attention", "flash_attention_rope") and draw(st.booleans())
    dtype = "float32" if entry.startswith("Aule") else \
        draw(st.sampled_from(["float32", "float16", "bfloat16"] if torch_in else ["float32", "float16"]))
    hkv = draw(st.sampled_from([1, 2]))
    return dict(
        entry=entry, torch_in=torch_in, dtype=dtype, b=draw(st.sampled_from([1, 2])), hkv=hkv,
        hq=hkv * draw(st.sampled_from([1, 2])), lq=draw(st.integers(1, 13)), lk=draw(st.integers(1, 13)),
        d=draw(st.sampled_from([8, 16])), causal=draw(st.booleans()),
        window=-1 if entry == "flash_attention" else draw(st.sampled_from([-1, 0, 1, 2, 5, 20])),
        rope=True if entry == "flash_attention_rope" else draw(st.booleans()),
        scale=None if entry.startswith("Aule") else draw(st.sampled_from([None, 0.3, -0.2])),
        seed=draw(st.integers(0, 2**16)))


def _run(c: dict, q: np.ndarray, k: np.ndarray, v: np.ndarray, cos: Optional[np.ndarray],
         sin: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """The drawn entry point on storage-dtype inputs; the result as float64, checked for type and dtype
    (None: the entry point refused the band, as documented)."""
    kw = {} if c["scale"] is None else {"scale": c["scale"]}
    if c["entry"].startswith("Aule"):
        with aule.Aule() as a:
            if c["entry"] == "Aule.attention":
                out = a.attention(q, k, v, cos, sin, causal=c["causal"], window_size=c["window"])
            else:
                tensors = [a.tensor(x.shape) for x in (q, k, v, q)]
                for t, x in zip(tensors, (q, k, v)):
                    t.upload(x)
                tables = [None, None]
                if cos is not None:
                    tables = [a.tensor((1, 1) + x.shape) for x in (cos, sin)]
                    tables[0].upload(cos)
                    tables[1].upload(sin)
                try:
                    a.attention_gpu(*tensors, *tables, causal=c["causal"], window_size=c["window"])
                except ValueError as exc:  # documented: a band off aule-kp's diagonal needs Aule.attention
                    shift, w = k.shape[2] - q.shape[2], c["window"]
                    assert "needs a mask" in str(exc)
                    assert (c["causal"] and (shift > 0 or (w > 0 and -shift > w))) or \
                        (not c["causal"] and 0 < w < abs(shift)), "refused a band a window can say"
                    return None
                out = tensors[3].download()
        assert isinstance(out, np.ndarray) and out.dtype == np.float32
        return out.astype(np.float64)
    if c["torch_in"]:
        import torch

        dt = getattr(torch, c["dtype"])
        q, k, v = (torch.from_numpy(x.astype(np.float32)).to(dt) for x in (q, k, v))
        if cos is not None:
            cos, sin = torch.from_numpy(cos), torch.from_numpy(sin)
    if c["entry"] == "flash_attention":
        out = aule.flash_attention(q, k, v, cos, sin, causal=c["causal"], **kw)
    else:
        out = aule.flash_attention_rope(q, k, v, cos, sin, causal=c["causal"], window_size=c["window"], **kw)
    if c["torch_in"]:
        assert isinstance(out, torch.Tensor) and out.dtype == q.dtype and out.shape == q.shape
        return out.double().numpy()
    assert isinstance(out, np.ndarray) and out.dtype == q.dtype and out.shape == q.shape
    return out.astype(np.float64)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls())
def test_compat_matches_float64_reference(c: dict) -> None:
    rng = np.random.default_rng(c["seed"])
    b, hq, hkv, lq, lk, d, dt = c["b"], c["hq"], c["hkv"], c["lq"], c["lk"], c["d"], c["dtype"]
    q, k, v = (_storage(rng.standard_normal(s), dt) for s in ((b, hq, lq, d), (b, hkv, lk, d), (b, hkv, lk, d)))
    scale = 1 / math.sqrt(d) if c["scale"] is None else c["scale"]
    cos = sin = None
    qr, kr, rot_err = q, k, 0.0
    if c["rope"]:
        rows = max(lq, lk) + int(rng.integers(0, 3))  # tables may be longer than the sequences
        theta = np.arange(rows)[:, None] * 10000.0 ** (-np.arange(d // 2) / (d // 2))
        cos, sin = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
        qr = _storage(_rotate64(q, cos.astype(np.float64), sin.astype(np.float64)), dt)
        kr = _storage(_rotate64(k, cos.astype(np.float64), sin.astype(np.float64)), dt)
        # Each rotated channel within rotation_tolerance of its pair; the score's move, bounded by the sum
        # over channels of |q|·δk + |k|·δq (pair sums <= 2 max|x|).
        dq, dk = (rotation_tolerance(2 * np.abs(x).max(), dt) for x in (q, k))
        rot_err = abs(scale) * d * (np.abs(qr).max() * dk + np.abs(kr).max() * dq)
    ref = _attention64(qr, kr, v, _band(lq, lk, c["causal"], c["window"]), scale)
    host = np.float32 if dt == "bfloat16" else dt  # bfloat16 values travel as float32 to _run's torch tensors
    out = _run(c, *(x.astype(host) for x in (q, k, v)), cos, sin)
    if out is None:
        return
    vmax = float(np.abs(v).max())
    tol = tolerance(dt, lk + d, vmax, exponent_range(qr, kr, scale)) + math.expm1(2 * rot_err) * vmax
    np.testing.assert_allclose(out, ref, rtol=0, atol=tol)
