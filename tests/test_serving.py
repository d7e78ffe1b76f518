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
from conftest import UNIT_ROUNDOFF, exponent_range, gradient_tolerances, q8_error, rotation_tolerance, tolerance
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aule_kp
from aule_kp.dtypes import from_f32, to_f32
from aule_kp.problem import Problem, band
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
    ([70, 5, 0, 66], [70, 9, 3, 80], 4, 2, 32, 32, True, None, "float16"),   # prefills (>= 64 rows) and short
    ([64, 2], [0, 40], 2, 1, 16, 16, False, None, "float32"),                 # a prefill that sees no key
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
    # The cache holds the new (rotated) keys and values afterwards, and nothing else changed: a rotated
    # channel within the rotation's bound of the reference's (both stored in dtype), |x1| + |x2| of its
    # pair at most twice the largest new key; the rest exact.
    rot_tol = rotation_tolerance(2 * float(np.abs(_f(kn, dtype)).max()), dtype) if rot and new else 0.0
    np.testing.assert_allclose(_f(kc, dtype), kw, atol=rot_tol, rtol=0)
    np.testing.assert_array_equal(_f(vc, dtype), vw)
    scale = 1 / math.sqrt(d)
    assert out.shape == (b, lq, hq, dv)
    tol = _tol("float32", qw, kw, vw, scale, max(lens) + new) if dtype == "float32" else \
        _tol(dtype, from_f32(qw, dtype), from_f32(kw, dtype), from_f32(vw, dtype), scale, max(lens) + new, bool(rot))
    np.testing.assert_allclose(_f(out, dtype), want, atol=tol, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_q8(backend, rng):
    """A q8_0 cache: the appended rows are quantized into it (within ``conftest.q8_error``: half a
    block step, plus the fp16 step's rounding), and the attention reads what the cache holds."""
    b, hq, hkv, d, new, lens, page = 2, 4, 2, 32, 2, [21, 4], 16
    q, kc, vc, kn, vn, seqlens, table = _cache_case(rng, b, 1, hq, hkv, d, new, lens, page)
    k8, v8 = aule_kp.Q8Cache.from_float(kc), aule_kp.Q8Cache.from_float(vc)
    out = aule_kp.flash_attention_with_kvcache(q, k8, v8, kn, vn, cache_seqlens=seqlens, block_table=table,
                                               causal=True, backend=backend)
    _, kw, vw, _ = ref.kvcache(q, kc, vc, kn, vn, seqlens, table, causal=True)
    for cache, want in ((k8, kw), (v8, vw)):
        assert (np.abs(cache.dequantize() - want) <= q8_error(want)).all()
    kq, vq = k8.dequantize(), v8.dequantize()
    want, _, _, _ = ref.kvcache(q, kq, vq, cache_seqlens=seqlens + new, block_table=table, causal=True)
    np.testing.assert_allclose(out, want, atol=_tol("float32", q, kq, vq, 1 / math.sqrt(d), max(lens) + new), rtol=0)


VULKAN_ONLY = pytest.mark.skipif(devmod.vulkan_unavailable() is not None, reason="no Vulkan device")


@VULKAN_ONLY
def test_vulkan_prefills_run_dense(rng, monkeypatch):
    """Host-data sequences of DENSE_QUERY_ROWS query rows or more go through the dense forward
    kernels one by one; the others share one ragged dispatch (and the result is the reference's)."""
    from aule_kp.serving import ragged as serving_ragged
    from aule_kp.vulkan import ragged as vk

    given = []
    real = vk.forward
    monkeypatch.setattr(vk, "forward", lambda *a, **kw: given.append(a[5].copy()) or real(*a, **kw))
    n = serving_ragged.DENSE_QUERY_ROWS
    lens = [n, 3, n + 5, 1]
    q, k, v, cu_q, cu_k = _varlen_case(rng, lens, lens, dtype="float16")
    out = aule_kp.flash_attention_varlen(q, k, v, cu_q, cu_k, n + 5, n + 5, causal=True, backend="vulkan")
    assert len(given) == 1 and sorted(given[0][:, 1]) == [1, 3]
    scale = 1 / math.sqrt(32)
    want = ref.varlen(_f(q, "float16"), _f(k, "float16"), _f(v, "float16"), cu_q, cu_k, scale, True, None)
    np.testing.assert_allclose(_f(out, "float16"), want, atol=_tol("float16", q, k, v, scale, n + 5), rtol=0)


@VULKAN_ONLY
def test_vulkan_decode_splits(rng):
    """A decode step over a long cache splits its keys over workgroups (a merge dispatch follows)."""
    from aule_kp.vulkan import plan as planmod
    from aule_kp.vulkan import ragged as vk

    q, kc, vc, kn, vn, seqlens, _ = _cache_case(rng, 1, 1, 4, 1, 32, 1, [1100])
    assert vk.splits(devmod.get_device().caps, 1, 1101)[0] > 1
    before = planmod.stats["evals"]
    out = aule_kp.flash_attention_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=seqlens, causal=True, backend="vulkan")
    # The split pass and the merge: one submission behind kp patch 5's compute barrier, else two.
    together = devmod.get_device().kp_patch >= planmod.COMPUTE_BARRIER_PATCH
    assert planmod.stats["evals"] == before + (1 if together else 2)
    want, kw, vw, _ = ref.kvcache(q, kc.copy(), vc.copy(), kn, vn, seqlens, causal=True)
    np.testing.assert_allclose(out, want, atol=_tol("float32", q, kw, vw, 1 / math.sqrt(32), 1101), rtol=0)


@VULKAN_ONLY
def test_vulkan_loop_limit_splits():
    """lavapipe ends an invocation's loops after 65535 iterations in all: a long cache is split so
    that no split's key loop gets there (else keys past it would be dropped silently)."""
    from aule_kp.vulkan import ragged as vk
    from aule_kp.vulkan.choice import CPU_LOOP_LIMIT

    caps = devmod.get_device().caps
    cfg = vk.RaggedConfig(64, 64, 64, 1, 2, "float16", False)
    n, length = vk.splits(caps, 10_000, 1 << 20, cfg)
    assert n * length >= 1 << 20
    if caps.type == "cpu":
        assert -(-length // (cfg.bc * cfg.kg)) + cfg.kg < CPU_LOOP_LIMIT


@VULKAN_ONLY
def test_vulkan_key_groups(rng, monkeypatch):
    """GPU tiling on lavapipe: a decode step's few packed rows share the workgroup with key groups
    that merge in shared memory (kg > 1). Head dim 8 keeps lavapipe's compile short."""
    from aule_kp.vulkan import ragged as vk

    monkeypatch.setattr(vk, "key_groups_pay", lambda caps: True)
    q, k, v, cu_q, cu_k = _varlen_case(rng, [1, 2, 1], [40, 9, 0], 4, 2, 8, 8)
    out = aule_kp.flash_attention_varlen(q, k, v, cu_q, cu_k, 2, 40, causal=True, backend="vulkan")
    want = ref.varlen(q, k, v, cu_q, cu_k, 1 / math.sqrt(8), True)
    np.testing.assert_allclose(out, want, atol=_tol("float32", q, k, v, 1 / math.sqrt(8), 40), rtol=0)


torch = pytest.importorskip("torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_kvcache_in_place(backend, rng):
    """torch bf16 tensors: the result is torch bf16, the torch cache holds the appended rows."""
    q, kc, vc, kn, vn, seqlens, table = _cache_case(rng, 2, 1, 4, 2, 32, 1, [5, 18], 16)
    t = {name: torch.from_numpy(x).to(torch.bfloat16) for name, x in dict(q=q, kc=kc, vc=vc, kn=kn, vn=vn).items()}
    out = aule_kp.flash_attention_with_kvcache(t["q"], t["kc"], t["vc"], t["kn"], t["vn"],
                                               cache_seqlens=torch.from_numpy(seqlens),
                                               block_table=torch.from_numpy(table), causal=True, backend=backend)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 1, 4, 32)
    f = {name: x.double().numpy() for name, x in t.items()}
    want, kw, vw, _ = ref.kvcache(f["q"], f["kc"], f["vc"], f["kn"], f["vn"], seqlens, table, causal=True)
    np.testing.assert_array_equal(t["kc"].double().numpy(), kw)
    tol = tolerance("bfloat16", 19 + 32, float(np.abs(vw).max()), exponent_range(f["q"].reshape(-1, 32),
                                                                                  kw.reshape(-1, 32), 32 ** -0.5))
    np.testing.assert_allclose(out.double().numpy(), want, atol=tol, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_varlen_backward(backend, rng):
    """Gradients through varlen (per sequence, the differentiable flash_attention) equal float64
    autograd of the reference attention."""
    q, k, v, cu_q, cu_k = _varlen_case(rng, [4, 7], [6, 7], 2, 1, 16, 16)
    tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
    out = aule_kp.flash_attention_varlen(tq, tk, tv, torch.from_numpy(cu_q), torch.from_numpy(cu_k), 7, 7,
                                         causal=True, backend=backend)
    dout = torch.from_numpy(rng.standard_normal(out.shape).astype(np.float32))
    out.backward(dout)
    rq, rk, rv = (torch.from_numpy(x).double().requires_grad_() for x in (q, k, v))
    pieces = []
    for b in range(2):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        s = torch.einsum("ihd,jhd->hij", rq[qs], rk[ks].repeat_interleave(2, 1)) / 4
        lq, lk = s.shape[1:]
        hide = torch.arange(lk)[None] > torch.arange(lq)[:, None] + lk - lq
        p = torch.softmax(s.masked_fill(hide, -torch.inf), -1)
        pieces.append(torch.einsum("hij,jhd->ihd", p, rv[ks].repeat_interleave(2, 1)))
    torch.cat(pieces).backward(dout.double())
    for b in range(2):
        # Each sequence is one problem of the gradient model (conftest.gradient_tolerances: its inputs'
        # exponent range and backward scales), [1, H, L, D] as the model reads it.
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        lq, lk = qs.stop - qs.start, ks.stop - ks.start
        p = Problem(1, 2, 1, lq, lk, 16, 16, "float32", 0.25, *band(lq, lk, causal=True, window=None, top_left=False))
        heads = lambda x: np.ascontiguousarray(x.swapaxes(0, 1)[None])  # noqa: E731
        tols = gradient_tolerances(p, heads(q[qs]), heads(k[ks]), heads(v[ks]), heads(dout.numpy()[qs]))
        for got, want, rows, tol in ((tq, rq, qs, tols[0]), (tk, rk, ks, tols[1]), (tv, rv, ks, tols[2])):
            np.testing.assert_allclose(got.grad.numpy()[rows], want.grad.numpy()[rows], atol=tol, rtol=0)


BAD_VARLEN = [
    (dict(cu_seqlens_q=np.array([0, 3, 2], np.int32)), ValueError, "cu_seqlens_q"),
    (dict(cu_seqlens_k=np.array([0.0, 5.0])), TypeError, "cu_seqlens_k"),
    (dict(max_seqlen_q=1), ValueError, "max_seqlen_q"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(alibi_slopes=np.ones(3, np.float32)), ValueError, "alibi_slopes"),
    (dict(sinks=np.ones((2, 2), np.float32)), ValueError, "sinks"),
]


@pytest.mark.parametrize("change,error,name", BAD_VARLEN)
def test_varlen_bad_input(change, error, name, rng):
    q, k, v, cu_q, cu_k = _varlen_case(rng, [2, 3], [2, 3], 2, 1, 8, 8)
    args = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=3, max_seqlen_k=3)
    args.update(change)
    with pytest.raises(error, match=name):
        aule_kp.flash_attention_varlen(q, k, v, args.pop("cu_seqlens_q"), args.pop("cu_seqlens_k"),
                                       args.pop("max_seqlen_q"), args.pop("max_seqlen_k"), backend="cpu", **args)


BAD_KVCACHE = [
    (dict(cache_seqlens=None), ValueError, "cache_seqlens"),
    (dict(cache_seqlens=np.array([30, 1], np.int32)), ValueError, "cache_seqlens"),
    (dict(block_table=np.array([[99, 0], [1, 2]], np.int32)), ValueError, "block_table"),
    (dict(rotary_cos=np.ones((4, 8), np.float32)), ValueError, "rotary_cos and rotary_sin"),
    (dict(rotary_cos=np.ones((4, 8), np.float32), rotary_sin=np.ones((4, 8), np.float32)), ValueError, "positions"),
    (dict(k=None), ValueError, "k and v"),
]


@pytest.mark.parametrize("change,error,name", BAD_KVCACHE)
def test_kvcache_bad_input(change, error, name, rng):
    q, kc, vc, kn, vn, seqlens, table = _cache_case(rng, 2, 1, 2, 1, 16, 1, [3, 9], 16)
    args = dict(k=kn, v=vn, cache_seqlens=seqlens, block_table=table)
    args.update(change)
    with pytest.raises(error, match=name):
        aule_kp.flash_attention_with_kvcache(q, kc, vc, args.pop("k"), args.pop("v"), backend="cpu", **args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_modifiers(backend, rng):
    """softcap, ALiBi (per sequence [B, Hq] for varlen, [Hq] for the cache) and sinks go into the core
    attention per sequence; the bias's magnitude widens the exponent range of the error model."""
    q, k, v, cu_q, cu_k = _varlen_case(rng, [4, 9], [7, 9], 4, 2, 16, 16)
    slopes = rng.uniform(0.05, 0.5, (2, 4)).astype(np.float32)
    sinks = rng.standard_normal(4).astype(np.float32)
    out = aule_kp.flash_attention_varlen(q, k, v, cu_q, cu_k, 9, 9, causal=True, softcap=5.0, alibi_slopes=slopes,
                                         sinks=sinks, backend=backend)
    want = ref.varlen(q, k, v, cu_q, cu_k, 0.25, True, None, 5.0, slopes, sinks)
    bias = 2 * float(slopes.max()) * 9
    tol = tolerance("float32", 9 + 16, float(np.abs(v).max()), exponent_range(q.reshape(-1, 16), k.reshape(-1, 16),
                                                                                0.25) + bias)
    np.testing.assert_allclose(out, want, atol=tol, rtol=0)

    qc, kc, vc, kn, vn, seqlens, table = _cache_case(rng, 2, 1, 4, 2, 16, 1, [5, 12], 16)
    out = aule_kp.flash_attention_with_kvcache(qc, kc, vc, kn, vn, cache_seqlens=seqlens, block_table=table,
                                               causal=True, softcap=5.0, alibi_slopes=slopes[0], sinks=sinks,
                                               backend=backend)
    want, kw, vw, _ = ref.kvcache(qc, kc.copy(), vc.copy(), kn, vn, seqlens, table, causal=True, softcap=5.0,
                                  slopes=slopes[0], sinks=sinks)
    tol = tolerance("float32", 13 + 16, float(np.abs(vw).max()), exponent_range(qc.reshape(-1, 16),
                                                                                 kw.reshape(-1, 16), 0.25) + 26 * 0.5)
    np.testing.assert_allclose(out, want, atol=tol, rtol=0)


@VULKAN_ONLY
@pytest.mark.parametrize("quantized", [False, True])
def test_device_resident_cache(quantized, rng):
    """Context.kv_cache: a prefill and decode steps append on the device (glsl/kv_append.comp) and the
    ragged kernel reads the cache in place; its plan holds no host copy of K or V. The cache holds
    the reference's rows (float), or what they quantize to (q8_0, and the attention reads those)."""
    b, hq, hkv, d, page, blocks = 2, 4, 2, 32, 16, 8
    table = rng.permutation(blocks)[:6].reshape(2, 3).astype(np.int32)
    with aule_kp.Context() as ctx:
        kc, vc = (ctx.kv_cache((blocks, page, hkv, d), np.float32, quantized) for _ in range(2))
        hk = np.zeros((blocks, page, hkv, d))
        hv = hk.copy()
        lens = np.zeros(b, np.int32)
        for n in (5, 1, 3):
            q = rng.standard_normal((b, n, hq, d)).astype(np.float32)
            kn, vn = (rng.standard_normal((b, n, hkv, d)).astype(np.float32) for _ in range(2))
            out = aule_kp.flash_attention_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens, block_table=table,
                                                       causal=True)
            want, hk, hv, _ = ref.kvcache(q, hk, hv, kn, vn, lens, table, causal=True)
            if quantized:
                from aule_kp.q8 import dequantize, quantize

                for cache, h in ((kc, hk), (vc, hv)):
                    np.testing.assert_array_equal(cache.download(), dequantize(*quantize(h.astype(np.float32))))
                want, _, _, _ = ref.kvcache(q, kc.download(), vc.download(), cache_seqlens=lens + n,
                                            block_table=table, causal=True)
            else:
                np.testing.assert_array_equal(kc.download(), hk)
                np.testing.assert_array_equal(vc.download(), hv)
            lens = lens + n
            np.testing.assert_allclose(out, want, atol=_tol("float32", q, hk, hv, d ** -0.5, int(lens.max())), rtol=0)
        plans = [p for p in devmod.get_device().plans._plans.values() if getattr(p, "io", None)]
        assert plans and all("k" not in p.memory and "v" not in p.memory for p in plans)
    with pytest.raises(ValueError, match="freed"):
        kc.download()
