"""Score modifiers (``softcap``, ``alibi_slopes``, ``sinks`` of ``aule_kp.flash_attention``) on the CPU
and Vulkan (lavapipe) backends against the float64 reference (tests/reference.py): forward over a
grid and random problems (hypothesis), gradients of q, k, v, a float mask and the sinks through the
torch autograd path, bad arguments, and the modifiers-off path left as it was.

Tolerances: the suite's error model (conftest.output_tolerance, lse_tolerance, gradient_tolerances)
with the modifiers' terms (conftest.score_mods_range: the soft-cap's tanh rounding, the ALiBi bias's
size). The sinks' gradient is a float32 sum over batches and rows of ``P_sink * D``: its tolerance is
``conftest.tolerance`` over that length, with the gradients' four roundings of 16-bit data.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import pytest
import torch
from conftest import gradient_tolerances, lse_tolerance, make_inputs, output_tolerance, tolerance
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import reference_attention, reference_backward, reference_sinks_grad

import aule_kp
import aule_kp.vulkan.device as devmod
from aule_kp import dispatch
from aule_kp.dtypes import to_f32
from aule_kp.problem import Problem, band

_NO_VULKAN = devmod.vulkan_unavailable()
needs_vulkan = pytest.mark.skipif(bool(_NO_VULKAN), reason=f"no Vulkan device: {_NO_VULKAN}")
BACKENDS = ("cpu", pytest.param("vulkan", marks=needs_vulkan))


def _problem(b: int, hq: int, hkv: int, lq: int, lk: int, dk: int, dv: int, dtype: str, causal: bool,
             window: Optional[Tuple[int, int]], softcap: float, alibi: Optional[np.ndarray],
             mask_shape: Optional[Tuple[int, ...]] = None) -> Problem:
    diag, left, right = band(lq, lk, causal=causal, window=window, top_left=False)
    return Problem(b, hq, hkv, lq, lk, dk, dv, dtype, 1 / math.sqrt(dk), diag, left, right, mask_shape,
                   softcap=softcap, alibi_rows=0 if alibi is None else alibi.reshape(-1, hq).shape[0])


def _mods(rng: np.random.Generator, b: int, hq: int, alibi: str, sinks: bool):
    """ALiBi slopes of the kind asked (None, ``[Hq]`` or ``[B, Hq]``; the geometric slopes of the
    ALiBi paper, shuffled, for ``[Hq]``) and sink logits around the scores' size."""
    slopes = None
    if alibi == "head":
        slopes = rng.permutation(2.0 ** (-8.0 * np.arange(1, hq + 1) / hq)).astype(np.float32)
    elif alibi == "batch":
        slopes = rng.uniform(0.0, 0.5, (b, hq)).astype(np.float32)
    sink = rng.normal(0.0, 2.0, hq).astype(np.float32) if sinks else None
    return slopes, sink


def _check_forward(backend: str, rng: np.random.Generator, b: int, hq: int, hkv: int, lq: int, lk: int, d: int,
                   dtype: str, causal: bool, window: Optional[Tuple[int, int]], softcap: float, alibi: str,
                   sinks: bool, dv: Optional[int] = None) -> None:
    dv = dv or d
    slopes, sink = _mods(rng, b, hq, alibi, sinks)
    q, k, v = make_inputs(rng, (b, hq, lq, d), (b, hkv, lk, d), (b, hkv, lk, dv), dtype)
    p = _problem(b, hq, hkv, lq, lk, d, dv, dtype, causal, window, softcap, slopes)
    if dtype == "bfloat16":  # NumPy has no bf16: the call takes torch tensors
        qt, kt, vt = (torch.from_numpy(x.view(np.int16)).view(torch.bfloat16) for x in (q, k, v))
        out = aule_kp.flash_attention(qt, kt, vt, causal=causal, window=window, softcap=softcap,
                                      alibi_slopes=slopes, sinks=sink, backend=backend)
        got = out.float().numpy()
    else:
        out = aule_kp.flash_attention(q, k, v, causal=causal, window=window, softcap=softcap, alibi_slopes=slopes,
                                      sinks=sink, backend=backend)
        got = to_f32(out, dtype)
    ref, _ = reference_attention(q, k, v, p, None, slopes, sink)
    np.testing.assert_allclose(got, ref, atol=output_tolerance(p, q, k, v, alibi=slopes, sinks=sink), rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [0.0, 2.0])
@pytest.mark.parametrize("alibi", [None, "head", "batch"])
@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("band_kind", ["full", "causal", "window"])
def test_forward_grid(backend, softcap, alibi, sinks, band_kind, rng):
    """Every combination of the modifiers, with and without a band, GQA, Lq != Lk, Dv != Dk."""
    causal = band_kind == "causal"
    window = (7, 3) if band_kind == "window" else None
    _check_forward(backend, rng, 2, 4, 2, 19, 37, 32, "float32", causal, window, softcap, alibi, sinks, dv=16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_forward_16bit(backend, dtype, rng):
    _check_forward(backend, rng, 1, 4, 1, 24, 40, 64, dtype, True, None, 5.0, "head", True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lq", [1, 3])
def test_decode(backend, lq, rng):
    """Short query blocks over longer keys (Vulkan: the split-KV kernel; its merge meets the sinks)."""
    _check_forward(backend, rng, 2, 8, 2, lq, 700, 64, "float32", True, None, 3.0, "batch", True)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_forward_random(data):
    """Random shapes, bands and modifiers on the CPU backend (Vulkan's random problems: below)."""
    _random_case(data, "cpu")


@needs_vulkan
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_forward_random_vulkan(data):
    _random_case(data, "vulkan")


def _random_case(data, backend: str) -> None:
    draw = data.draw
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.integers(1, 3))
    causal = draw(st.booleans())
    window = draw(st.one_of(st.none(), st.tuples(st.integers(-1, 20), st.integers(-1, 20))))
    _check_forward(backend, np.random.default_rng(draw(st.integers(0, 2**16))), draw(st.integers(1, 2)), hq, hkv,
                   draw(st.integers(1, 40)), draw(st.integers(1, 70)), draw(st.sampled_from([8, 32, 64])),
                   draw(st.sampled_from(["float32", "float16"])), causal, window,
                   draw(st.sampled_from([0.0, 0.5, 4.0, 30.0])), draw(st.sampled_from([None, "head", "batch"])),
                   draw(st.booleans()))


def _grad_case(backend: str, dtype: torch.dtype, causal: bool, softcap: float, alibi: Optional[str],
               with_mask: bool, seed: int = 0) -> None:
    """Gradients of q, k, v, a float mask and the sinks through ``aule_kp.flash_attention``."""
    rng = np.random.default_rng(seed)
    b, hq, hkv, lq, lk, d = 2, 4, 2, 13, 21, 32
    slopes, sink = _mods(rng, b, hq, alibi, True)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(s, generator=g).to(dtype).requires_grad_()
               for s in ((b, hq, lq, d), (b, hkv, lk, d), (b, hkv, lk, d)))
    mask = torch.randn((1, hq, 1, lk), generator=g).requires_grad_() if with_mask else None
    sinks = torch.from_numpy(sink).requires_grad_()
    out = aule_kp.flash_attention(q, k, v, causal=causal, attn_mask=mask, softcap=softcap, alibi_slopes=slopes,
                                  sinks=sinks, backend=backend)
    dout = torch.randn(out.shape, generator=g).to(dtype)
    wanted = [x for x in (q, k, v, mask, sinks) if x is not None]
    grads = torch.autograd.grad(out, wanted, dout)
    name = str(dtype).replace("torch.", "")
    qf, kf, vf, df = (x.detach().float().numpy() for x in (q, k, v, dout))
    m = None if mask is None else mask.detach().numpy()
    p = _problem(b, hq, hkv, lq, lk, d, d, "float32", causal, None, softcap, slopes,
                 None if mask is None else tuple(mask.shape))
    ref_out, _ = reference_attention(qf, kf, vf, p, m, slopes, sink)
    np.testing.assert_allclose(out.detach().float().numpy(), ref_out, rtol=0,
                               atol=output_tolerance(p, qf, kf, vf, m, stored=name, alibi=slopes, sinks=sink))
    dq, dk, dv, ds = reference_backward(qf, kf, vf, df, p, m, slopes, sink)
    tols = gradient_tolerances(p, qf, kf, vf, df, m, stored=name, alibi=slopes, sinks=sink)
    refs = [dq, dk, dv] + ([ds.sum(axis=(0, 2), keepdims=True)] if mask is not None else [])
    for got, want, tol in zip(grads, refs, tols):
        np.testing.assert_allclose(got.float().numpy(), want, atol=tol, rtol=0)
    want_sinks = reference_sinks_grad(qf, kf, vf, df, p, sink, m, slopes)
    # A float32 sum over batches x rows of terms each at most |D| <= max |dO| |O| summed over Dv.
    bound = float(np.abs(df).max() * np.abs(ref_out).max() * d)
    tol = tolerance(name, b * lq + d, bound, roundings=4)
    np.testing.assert_allclose(grads[-1].numpy(), want_sinks, atol=tol, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap,alibi,causal,with_mask", [
    (0.0, None, False, False), (3.0, None, True, False), (0.0, "head", True, True), (2.0, "batch", False, True),
])
def test_gradients(backend, softcap, alibi, causal, with_mask):
    _grad_case(backend, torch.float32, causal, softcap, alibi, with_mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_16bit(backend):
    _grad_case(backend, torch.float16, True, 4.0, "head", False, seed=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinks_without_keys(backend):
    """Rows that see no key (a bool mask hides every key from them) are 0, with their whole mass on
    the sink."""
    rng = np.random.default_rng(0)
    q, k, v = make_inputs(rng, (1, 2, 6, 16), (1, 2, 4, 16), (1, 2, 4, 16), "float32")
    sink = np.array([0.5, -1.0], np.float32)
    keep = np.ones((1, 1, 6, 4), bool)
    keep[:, :, :2] = False
    out = aule_kp.flash_attention(q, k, v, attn_mask=keep, sinks=sink, backend=backend)
    assert np.isfinite(out).all()
    p = _problem(1, 2, 2, 6, 4, 16, 16, "float32", False, None, 0.0, None, (1, 1, 6, 4))
    additive = np.where(keep, 0.0, -np.inf).astype(np.float32)
    ref, _ = reference_attention(q, k, v, p, additive, None, sink)
    np.testing.assert_allclose(out, ref, atol=output_tolerance(p, q, k, v, additive, sinks=sink), rtol=0)
    assert (out[:, :, :2] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_includes_modifiers(backend, rng):
    """The forward's row log-sum-exp (what backward passes use) is the modified scores', sinks included."""
    from aule_kp.call import attention_forward

    slopes, sink = _mods(rng, 1, 4, "head", True)
    q, k, v = make_inputs(rng, (1, 4, 9, 32), (1, 2, 30, 32), (1, 2, 30, 32), "float32")
    _, lse, p = attention_forward(q, k, v, causal=True, softcap=3.0, alibi_slopes=slopes, sinks=sink, backend=backend)
    _, ref = reference_attention(q, k, v, p, None, slopes, sink)
    np.testing.assert_allclose(lse, ref, atol=lse_tolerance(q, k, p.scale, p=p, alibi=slopes), rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_modifiers_off_is_plain(backend, rng):
    """softcap=0.0, no slopes, no sinks: the very same result as a call without them."""
    q, k, v = make_inputs(rng, (1, 2, 17, 32), (1, 2, 33, 32), (1, 2, 33, 32), "float16")
    plain = aule_kp.flash_attention(q, k, v, causal=True, backend=backend)
    off = aule_kp.flash_attention(q, k, v, causal=True, softcap=0.0, alibi_slopes=None, sinks=None, backend=backend)
    np.testing.assert_array_equal(plain, off)


def test_bad_arguments():
    q = np.zeros((2, 4, 3, 8), np.float32)
    k = v = np.zeros((2, 2, 5, 8), np.float32)
    with pytest.raises(ValueError, match="softcap"):
        aule_kp.flash_attention(q, k, v, softcap=-1.0)
    with pytest.raises(ValueError, match="softcap"):
        aule_kp.flash_attention(q, k, v, softcap=float("inf"))
    with pytest.raises(ValueError, match="alibi_slopes"):
        aule_kp.flash_attention(q, k, v, alibi_slopes=np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="alibi_slopes"):
        aule_kp.flash_attention(q, k, v, alibi_slopes=np.full(4, np.nan, np.float32))
    with pytest.raises(TypeError, match="alibi_slopes"):
        aule_kp.flash_attention(q, k, v, alibi_slopes=np.zeros(4, np.int32))
    with pytest.raises(ValueError, match="sinks"):
        aule_kp.flash_attention(q, k, v, sinks=np.zeros((2, 4), np.float32))
    with pytest.raises(TypeError, match="sinks"):
        aule_kp.flash_attention(q, k, v, sinks=[0.0] * 4)


def test_every_backend_takes_them():
    """No backend refuses a problem for its modifiers (they are part of every kernel)."""
    p = Problem(1, 2, 1, 8, 8, 16, 16, "float32", 0.25, softcap=3.0, alibi_rows=1)
    for name in ("cpu", "vulkan", "triton"):
        why = dispatch.get(name).problem_reasons(p)
        assert not any("softcap" in r or "alibi" in r for r in why), why


def test_plain_pipelines_unchanged():
    """Without modifiers the specialization constants are exactly the plain kernels' (ids 0..8 and,
    for the backward, 9 and 10: SOFTCAP, ALIBI and SINKS left at their 0 default, so the driver folds
    their code away); with them, ids 12 to 14 are set and TEST_CORRUPT (11) stays 0."""
    from aule_kp.vulkan.configs import BackwardConfig, KernelConfig, score_spec

    k = KernelConfig("scalar", "fa2_fwd", 64, 64, 16, 16, 4, 1, 64, 0, 2)
    plain = Problem(1, 2, 1, 8, 8, 64, 64, "float16", 0.125)
    assert score_spec(plain) == (0, 0, 0)
    assert k.spec(mods=score_spec(plain)).tolist() == k.spec().tolist() == [64, 64, 16, 16, 4, 1, 64, 0, 2]
    capped = Problem(1, 2, 1, 8, 8, 64, 64, "float16", 0.125, softcap=30.0, alibi_rows=1)
    assert k.spec(mods=score_spec(capped)).tolist() == [64, 64, 16, 16, 4, 1, 64, 0, 2, 0, 0, 0, 1, 1, 0]
    bwd = BackwardConfig("scalar", k, k, k, has_mask=True)
    assert bwd.spec(k).tolist() == [64, 64, 16, 16, 4, 1, 64, 0, 2, 0, 1]
    assert bwd.spec(k, (1, 0, 1)).tolist() == [64, 64, 16, 16, 4, 1, 64, 0, 2, 0, 1, 0, 1, 0, 1]


@needs_vulkan
@pytest.mark.parametrize("splits", [3, 8])
def test_vulkan_split_kv_merge(splits, rng):
    """Several key splits per row block: their merge (glsl/fa2_splitkv.comp) folds in the sinks."""
    from aule_kp.vulkan.backend import VulkanBackend

    slopes, sink = _mods(rng, 2, 8, "batch", True)
    q, k, v = make_inputs(rng, (2, 8, 2, 64), (2, 2, 300, 64), (2, 2, 300, 64), "float16")
    p = _problem(2, 8, 2, 2, 300, 64, 64, "float16", True, None, 3.0, slopes)
    p = Problem(**{**p.__dict__, "sinks": True})
    backend = VulkanBackend(num_splits=splits)
    assert backend.config(p).n_split == splits
    out, lse = backend.forward(p, q, k, v, None, alibi=slopes, sinks=sink)
    ref, ref_lse = reference_attention(q, k, v, p, None, slopes, sink)
    np.testing.assert_allclose(to_f32(out, "float16"), ref, atol=output_tolerance(p, q, k, v, alibi=slopes, sinks=sink),
                               rtol=0)
    qf, kf = to_f32(q, "float16"), to_f32(k, "float16")
    np.testing.assert_allclose(lse, ref_lse, atol=lse_tolerance(qf, kf, p.scale, p=p, alibi=slopes), rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_extreme_rows(backend):
    """Scores near 1000 and a sink among them: the Vulkan backward recomputes such rows' statistics
    (fa2_bwd_pre.comp, |lse| over 1024 ln 2) and must fold the sink in there too."""
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(s, generator=g).requires_grad_() for s in ((1, 2, 5, 16), (1, 1, 9, 16), (1, 1, 9, 16)))
    sinks = torch.tensor([760.0, 740.0], requires_grad=True)
    scale = 200.0
    out = aule_kp.flash_attention(q, k, v, scale=scale, sinks=sinks, backend=backend)
    dout = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, (q, k, v, sinks), dout)
    qf, kf, vf, df = (x.detach().numpy() for x in (q, k, v, dout))
    sk = sinks.detach().numpy()
    p = Problem(1, 2, 1, 5, 9, 16, 16, "float32", scale, 4, sinks=True)
    np.testing.assert_allclose(out.detach().numpy(), reference_attention(qf, kf, vf, p, None, None, sk)[0], rtol=0,
                               atol=output_tolerance(p, qf, kf, vf, sinks=sk))
    refs = reference_backward(qf, kf, vf, df, p, None, None, sk)[:3]
    for got, want, tol in zip(grads[:3], refs, gradient_tolerances(p, qf, kf, vf, df, sinks=sk)):
        np.testing.assert_allclose(got.numpy(), want, atol=tol, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_v_with_modifiers(backend, rng):
    """A NaN in v of a key hidden from most rows (causal): those rows stay exact (the host repair
    recomputes them with the modifiers), the rows that see it are NaN."""
    slopes, sink = _mods(rng, 1, 2, "head", True)
    q, k, v = make_inputs(rng, (1, 2, 6, 16), (1, 1, 6, 16), (1, 1, 6, 16), "float32")
    v[0, 0, 5, 3] = np.nan
    out = aule_kp.flash_attention(q, k, v, causal=True, softcap=2.0, alibi_slopes=slopes, sinks=sink, backend=backend)
    p = _problem(1, 2, 1, 6, 6, 16, 16, "float32", True, None, 2.0, slopes)
    ref, _ = reference_attention(q, k, v, p, None, slopes, sink)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    seen = ~np.isnan(ref)
    clean = np.where(np.isnan(v), 0, v)
    np.testing.assert_allclose(out[seen], ref[seen], rtol=0,
                               atol=output_tolerance(p, q, k, clean, alibi=slopes, sinks=sink))
