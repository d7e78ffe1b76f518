"""flash_attention_varlen and flash_attention_with_kvcache (issue 19) on the CPU and Vulkan backends
against float64 references written from flash-attn's documented semantics (serving_reference.py).

Tolerances: the suite's error model (``conftest.tolerance``) with the sequence's key count as the
reduction length, ``max |v|`` as the value scale and the exponent range of q, k; where rotary runs
in 16-bit storage, one storage ulp of a rotated q or k element (the float32 and float64 rotations
may round apart) adds ``2·u·exponent_range`` of the value scale.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import serving_reference as ref
from conftest import UNIT_ROUNDOFF, exponent_range, tolerance
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aule_kp
from aule_kp.dtypes import from_f32, to_f32
from aule_kp.vulkan import device as devmod

BACKENDS = ["cpu", pytest.param("vulkan", marks=pytest.mark.skipif(devmod.vulkan_unavailable() is not None,
                                                                     reason="no Vulkan device"))]


def _f(x, dtype):
    return to_f32(x, dtype).astype(np.float64)


def _tol(dtype, q, k, v, scale, keys, rotary=False):
    qf, kf = (np.asarray(_f(x, dtype)).reshape(-1, x.shape[-1]) for x in (q, k))
    e = exponent_range(qf, kf, scale)
    vs = float(np.abs(_f(v, dtype)).max(initial=0.0))
    extra = 2 * UNIT_ROUNDOFF[dtype] * e * vs if rotary and dtype != "float32" else 0.0
    return tolerance(dtype, keys + q.shape[-1], vs, e) + extra


def _rand(rng, shape, dtype):
    return from_f32(rng.standard_normal(shape).astype(np.float32), dtype)


def _varlen_case(rng, lens_q, lens_k, hq=4, hkv=2, dk=32, dv=32, dtype="float32"):
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    q = _rand(rng, (cu_q[-1], hq, dk), dtype)
    k = _rand(rng, (cu_k[-1], hkv, dk), dtype)
    v = _rand(rng, (cu_k[-1], hkv, dv), dtype)
    return q, k, v, cu_q, cu_k


VARLEN = [  # (lens_q, lens_k, hq, hkv, dk, dv, causal, window, dtype)
    ([5, 17, 1, 9], [5, 17, 1, 9], 4, 2, 32, 32, True, None, "float32"),       # causal self
    ([3, 20, 7], [11, 6, 30], 4, 1, 32, 48, True, None, "float32"),            # cross, Lq > Lk, MQA, Dv != Dk
    ([3, 20, 7], [11, 6, 30], 2, 2, 16, 16, False, None, "float32"),
    ([12, 0, 9], [12, 4, 0], 4, 2, 32, 32, False, None, "float16"),            # empty sequences
    ([16, 9], [24, 9], 6, 2, 64, 32, False, (4, 2), "float16"),                # window
    ([33], [33], 2, 1, 32, 32, True, (8, -1), "float32"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", VARLEN)
def test_varlen(backend, case, rng):
    lens_q, lens_k, hq, hkv, dk, dv, causal, window, dtype = case
    q, k, v, cu_q, cu_k = _varlen_case(rng, lens_q, lens_k, hq, hkv, dk, dv, dtype)
    out = aule_kp.flash_attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                         window=window, backend=backend)
    scale = 1 / math.sqrt(dk)
    want = ref.varlen(_f(q, dtype), _f(k, dtype), _f(v, dtype), cu_q, cu_k, scale, causal, window)
    assert out.shape == want.shape and out.dtype == q.dtype
    np.testing.assert_allclose(_f(out, dtype), want, atol=_tol(dtype, q, k, v, scale, max(lens_k)), rtol=0)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20)), min_size=1, max_size=4),
       st.sampled_from([(1, 1), (2, 1), (4, 2)]), st.booleans(), st.integers(0, 2**16))
def test_varlen_random_cpu(lens, heads, causal, seed):
    rng = np.random.default_rng(seed)
    lens_q, lens_k = [a for a, _ in lens], [b for _, b in lens]
    q, k, v, cu_q, cu_k = _varlen_case(rng, lens_q, lens_k, heads[0], heads[1], 16, 24)
    out = aule_kp.flash_attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, backend="cpu")
    want = ref.varlen(q, k, v, cu_q, cu_k, 0.25, causal)
    np.testing.assert_allclose(out, want, atol=_tol("float32", q, k, v, 0.25, max(lens_k)), rtol=0)


def _cache_case(rng, b, lq, hq, hkv, d, new, lens, page=None, num_blocks=None, dv=None, dtype="float32"):
    """Random q, caches (paged with shuffled pages when ``page``), new k/v and the block table."""
    dv = dv or d
    cap = max(int(x) for x in lens) + new
    if page:
        per = -(-cap // page)
        num_blocks = num_blocks or b * per + 3
        table = rng.permutation(num_blocks)[: b * per].reshape(b, per).astype(np.int32)
        shape = (num_blocks, page)
    else:
        table, shape = None, (b, cap + 3)
    kc = _rand(rng, (*shape, hkv, d), dtype)
    vc = _rand(rng, (*shape, hkv, dv), dtype)
    q = _rand(rng, (b, lq, hq, d), dtype)
    kn = _rand(rng, (b, new, hkv, d), dtype) if new else None
    vn = _rand(rng, (b, new, hkv, dv), dtype) if new else None
    return q, kc, vc, kn, vn, np.asarray(lens, np.int32), table


def _rotary_tables(seqlen, rot_dim):
    inv = 1.0 / 10000 ** (np.arange(0, rot_dim, 2) / rot_dim)
    ang = np.arange(seqlen)[:, None] * inv[None]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


KVCACHE = [  # (b, lq, hq, hkv, d, dv, new, lens, page, rotary (dim, interleaved) or None, causal, dtype)
    (3, 1, 4, 2, 32, 32, 1, [0, 7, 40], 16, (32, False), True, "float32"),   # paged decode, NeoX rotary
    (2, 5, 4, 1, 32, 32, 5, [9, 30], 16, (16, True), True, "float32"),       # paged chunked prefill, GPT-J
    (2, 1, 2, 2, 32, 32, 0, [20, 3], 16, None, False, "float32"),            # paged, no append
    (2, 3, 4, 2, 32, 48, 2, [12, 0], None, (32, False), True, "float32"),    # contiguous, Dv != Dk
    (2, 4, 4, 2, 32, 32, 0, [13, 25], None, None, True, "float16"),          # contiguous, no append
    (2, 2, 4, 2, 64, 64, 2, [17, 5], 16, (64, False), False, "float16"),     # non-causal rotary (q at seqlen)
    (1, 6, 2, 1, 32, 32, 3, [2], 32, None, True, "float32"),                 # Lq > Lk's visible part
]


def _round(dtype):
    return lambda x: _f(from_f32(np.asarray(x, np.float32), dtype), dtype) if dtype != "float32" else x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", KVCACHE)
def test_kvcache(backend, case, rng):
    b, lq, hq, hkv, d, dv, new, lens, page, rot, causal, dtype = case
    q, kc, vc, kn, vn, seqlens, table = _cache_case(rng, b, lq, hq, hkv, d, new, lens, page, dv=dv, dtype=dtype)
    cos = sin = None
    if rot:
        cos, sin = _rotary_tables(max(lens) + new + lq + 4, rot[0])
    kc0, vc0 = kc.copy(), vc.copy()
    out = aule_kp.flash_attention_with_kvcache(
        q, kc, vc, kn, vn, cache_seqlens=seqlens, block_table=table, rotary_cos=cos, rotary_sin=sin,
        rotary_interleaved=bool(rot and rot[1]), causal=causal, backend=backend)
    want, kw, vw, qw = ref.kvcache(_f(q, dtype), _f(kc0, dtype), _f(vc0, dtype), None if kn is None else _f(kn, dtype),
                               None if vn is None else _f(vn, dtype), seqlens, table, cos, sin,
                               bool(rot and rot[1]), causal, round_to=_round(dtype))
    # The cache holds the new (rotated) keys and values afterwards, and nothing else changed.
    rot_tol = 4 * UNIT_ROUNDOFF[dtype] * float(np.abs(kw).max())
    np.testing.assert_allclose(_f(kc, dtype), kw, atol=rot_tol, rtol=0)
    np.testing.assert_array_equal(_f(vc, dtype), vw)
    scale = 1 / math.sqrt(d)
    assert out.shape == (b, lq, hq, dv)
    tol = _tol("float32", qw, kw, vw, scale, max(lens) + new) if dtype == "float32" else \
        _tol(dtype, from_f32(qw, dtype), from_f32(kw, dtype), from_f32(vw, dtype), scale, max(lens) + new, bool(rot))
    np.testing.assert_allclose(_f(out, dtype), want, atol=tol, rtol=0)
