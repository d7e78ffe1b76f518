"""The CPU backend's three tiers on the same problems: the native kernels, numba's backward tile kernels
(NumPy forward), and NumPy alone, each against the float64 reference (tests/reference.py) on random
problems that combine every feature at once: GQA, Dv != Dk, causal and windowed bands of both
alignments, bool and float masks of every broadcast shape, soft-cap, ALiBi ([Hq] or [B, Hq]), sinks,
float32/float16/bfloat16, rows masked with float32's minimum (saturated: their lse cannot carry log(l)),
forward and backward (with the mask's gradient where the tier takes it).

A tier that gives a result outside the error model where another does not would be a call whose
answer depends on what is installed. Tolerances: the suite's error model (``conftest.output_tolerance``,
``lse_tolerance``, ``gradient_tolerances``: float32 compute, dtype epsilon x sqrt(reduction length) x the
values' range, widened by the score modifiers' terms), computed from each example's own inputs.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Tuple

import numpy as np
import pytest
from conftest import gradient_tolerances, lse_tolerance, output_tolerance
from cpu_cases import bool_mask, float_mask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import reference_attention, reference_backward

from aule_kp.cpu import compiled, native
from aule_kp.cpu.backend import CpuBackend
from aule_kp.dtypes import STORAGE, from_f32, to_f32
from aule_kp.problem import Problem, band


def _tiers() -> Dict[str, CpuBackend]:
    """Each tier this install has, as a backend that runs it (small blocks: many tiles per example)."""
    tiers: Dict[str, CpuBackend] = {}
    if native.load(quiet=True) is not None:
        tiers["native"] = CpuBackend(workers=2)
    if compiled.load(quiet=True) is not None:
        numba_tier = CpuBackend(block_q=16, block_k=24, step=4, workers=2)
        numba_tier.native = lambda: None  # type: ignore[method-assign]
        tiers["numba"] = numba_tier
    tiers["numpy"] = CpuBackend(block_q=16, block_k=24, step=4, workers=2, use_compiled=False)
    return tiers


TIERS = _tiers()


@st.composite
def cases(draw: st.DrawFn) -> Tuple[Problem, Dict[str, Any]]:
    hkv = draw(st.integers(1, 2))
    b, hq = draw(st.integers(1, 2)), hkv * draw(st.integers(1, 3))
    lq, lk = draw(st.integers(1, 40)), draw(st.integers(1, 60) | st.integers(200, 700))
    dk = draw(st.sampled_from([8, 16, 24, 40]))
    dv = draw(st.sampled_from([dk, 8, 32]))
    diag, left, right = band(lq, lk, causal=draw(st.booleans()),
                             window=draw(st.none() | st.tuples(st.integers(-1, 10), st.integers(-1, 10))),
                             top_left=draw(st.booleans()))
    mask_shape = draw(st.none() | st.tuples(*(st.sampled_from([1, n]) for n in (b, hq, lq, lk))))
    softcap = draw(st.sampled_from([0.0, 0.0, 5.0, 30.0]))
    alibi_rows = draw(st.sampled_from([0, 0, 1, b]))
    p = Problem(b, hq, hkv, lq, lk, dk, dv, draw(st.sampled_from(["float32", "float16", "bfloat16"])),
                1 / math.sqrt(dk), diag, left, right, mask_shape, softcap=softcap, alibi_rows=alibi_rows,
                sinks=draw(st.booleans()))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    size = draw(st.sampled_from([1.0, 4.0]))  # 4: scores far past the first tile's shift (rescaling paths)
    x = {name: from_f32(size * rng.standard_normal(shape, dtype=np.float32), p.dtype) for name, shape in (
        ("q", (b, hq, lq, dk)), ("k", (b, hkv, lk, dk)), ("v", (b, hkv, lk, dv)), ("dout", (b, hq, lq, dv)))}
    x["mask"] = None
    x["float_mask"] = False
    if mask_shape is not None:
        x["float_mask"] = draw(st.booleans())
        x["mask"] = (float_mask if x["float_mask"] else bool_mask)(mask_shape, seed=seed % 10)
        if x["float_mask"] and draw(st.booleans()):
            # Hugging Face's padding: rows masked with float32's minimum (every score saturates, the
            # lse cannot carry log(l)), and rows where one key is lifted out of it.
            low = np.finfo(np.float32).min
            rows = draw(st.lists(st.integers(0, mask_shape[2] - 1), min_size=1, max_size=3))
            x["mask"][:, :, rows] = low
            lifted = draw(st.integers(0, mask_shape[2] - 1))
            x["mask"][:, :, lifted] = low
            x["mask"][:, :, lifted, draw(st.integers(0, mask_shape[3] - 1))] = 0.0
    x["alibi"] = rng.uniform(0.0, 0.5, (alibi_rows, hq)).astype(np.float32) if alibi_rows else None
    x["sinks"] = rng.normal(0.0, 2.0, hq).astype(np.float32) if p.sinks else None
    return p, x


def _underflow(p: Problem) -> float:
    """The absolute part of rounding to 16-bit storage: a result below the smallest normal rounds to a
    multiple of the smallest subnormal (float16: 2**-24), off by up to half of it, whatever its size
    (a row whose sink takes nearly all the weight has outputs of 1e-11). The relative model of
    ``conftest.tolerance`` does not cover it; float32 results and bfloat16's float32 range make it
    negligible."""
    return 0.5 * float(np.finfo(np.float16).smallest_subnormal) if p.dtype == "float16" else 0.0


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("tier", sorted(TIERS))
@SETTINGS
@given(cases())
def test_forward_tiers_against_float64(tier: str, case: Tuple[Problem, Dict[str, Any]]) -> None:
    p, x = case
    mods = {"alibi": x["alibi"], "sinks": x["sinks"]}
    out, lse = TIERS[tier].forward(p, x["q"], x["k"], x["v"], x["mask"], **mods)
    assert out.dtype == STORAGE[p.dtype] and out.shape == (p.batch, p.heads_q, p.len_q, p.dim_v)
    ref_out, ref_lse = reference_attention(x["q"], x["k"], x["v"], p, x["mask"], **mods)
    hidden = np.isneginf(ref_lse)
    np.testing.assert_array_equal(np.isneginf(lse), hidden)
    got = to_f32(out, p.dtype).astype(np.float64)
    assert np.all(got[hidden] == 0.0)
    tol = output_tolerance(p, x["q"], x["k"], x["v"], x["mask"], alibi=x["alibi"], sinks=x["sinks"]) + _underflow(p)
    np.testing.assert_allclose(got, ref_out, rtol=0, atol=tol)
    qf, kf = to_f32(x["q"], p.dtype), to_f32(x["k"], p.dtype)
    np.testing.assert_allclose(lse[~hidden], ref_lse[~hidden], rtol=0,
                               atol=lse_tolerance(qf, kf, p.scale, x["mask"], p=p, alibi=x["alibi"]))


@pytest.mark.parametrize("tier", sorted(TIERS))
@SETTINGS
@given(cases())
def test_backward_tiers_against_float64(tier: str, case: Tuple[Problem, Dict[str, Any]]) -> None:
    p, x = case
    backend = TIERS[tier]
    mods = {"alibi": x["alibi"], "sinks": x["sinks"]}
    mask_grad = x["float_mask"]
    q, k, v, dout, mask = x["q"], x["k"], x["v"], x["dout"], x["mask"]
    out, lse = backend.forward(p, q, k, v, mask, **mods)
    dq, dk, dv, dmask = backend.backward(p, q, k, v, out, dout, lse, mask, mask_grad, alibi=x["alibi"],
                                         sinks=x["sinks"])
    ref = reference_backward(q, k, v, dout, p, mask, **mods)
    tols = gradient_tolerances(p, q, k, v, dout, mask, alibi=x["alibi"], sinks=x["sinks"])
    for name, got, want, like, tol in zip(("dq", "dk", "dv"), (dq, dk, dv), ref[:3], (q, k, v), tols):
        assert got.dtype == STORAGE[p.dtype] and got.shape == like.shape, name
        err = np.abs(to_f32(got, p.dtype) - want).max(initial=0.0)
        assert err <= tol + _underflow(p), f"{tier} {name}: {err} > {tol}"
    if mask_grad:
        assert dmask is not None and dmask.shape == p.mask_shape
        axes = tuple(i for i, n in enumerate(p.mask_shape) if n == 1)
        want = ref[3].sum(axis=axes, keepdims=True)
        err = np.abs(dmask - want).max(initial=0.0)
        assert err <= tols[3], f"{tier} dmask: {err} > {tols[3]}"
    else:
        assert dmask is None


@pytest.mark.parametrize("tier", sorted(TIERS))
@pytest.mark.parametrize("mask_shape,dtype,softcap", [
    ((2, 4, 20, 33), "float32", 0.0), ((1, 1, 20, 33), "float16", 0.0), ((2, 1, 1, 33), "float32", 0.0),
    ((2, 4, 20, 33), "float32", 8.0)])
def test_saturated_rows_backward(tier: str, mask_shape: Tuple[int, ...], dtype: str, softcap: float) -> None:
    """Rows masked with float32's minimum (Hugging Face's padding): every score rounds to -3.4e38, the
    forward averages the row uniformly and lse = -3.4e38 + log(Lk) rounds to -3.4e38, so the tiers'
    P = exp(S - lse) was 1 per key instead of 1/Lk (dq off by ~8 at this size). Such rows now go
    through aule_kp.cpu.saturated; a row with one key lifted out of the minimum is ordinary."""
    p = Problem(2, 4, 2, 20, 33, 16, 16, dtype, 0.25, 13, None, None, mask_shape, softcap=softcap)
    rng = np.random.default_rng(5)
    q, k, v, dout = (from_f32(rng.standard_normal(shape, dtype=np.float32), dtype) for shape in (
        (2, 4, 20, 16), (2, 2, 33, 16), (2, 2, 33, 16), (2, 4, 20, 16)))
    low = np.finfo(np.float32).min
    mask = rng.standard_normal(mask_shape).astype(np.float32)
    mask[..., :3, :] = low  # all rows when the mask broadcasts over them
    if mask_shape[2] > 4:
        mask[..., 4, :] = low
        mask[..., 4, 7] = 0.0
    backend = TIERS[tier]
    out, lse = backend.forward(p, q, k, v, mask)
    dq, dk, dv, dmask = backend.backward(p, q, k, v, out, dout, lse, mask, True)
    ref = reference_backward(q, k, v, dout, p, mask)
    tols = gradient_tolerances(p, q, k, v, dout, mask)
    for name, got, want, tol in zip(("dq", "dk", "dv"), (dq, dk, dv), ref[:3], tols):
        err = np.abs(to_f32(got, dtype) - want).max()
        assert err <= tol, f"{name}: {err} > {tol}"
    axes = tuple(i for i, n in enumerate(mask_shape) if n == 1)
    assert np.abs(dmask - ref[3].sum(axis=axes, keepdims=True)).max() <= tols[3]


@pytest.mark.parametrize("tier", sorted(TIERS))
def test_key_lifted_out_of_a_saturated_row(tier: str) -> None:
    """A row masked with float32's minimum but one key: the NumPy forward's online softmax kept the
    first tile's shift (-3.4e38) and scored the next tile relative to it, where the lifted key's own
    score (0.02) rounded away: lse came out 0 for a key past the first tile (the backward then weighed
    that key exp(-score)). Every position of the key, over tiles of 24 keys."""
    p = Problem(1, 1, 1, 1, 50, 8, 8, "float32", 0.35, 49, None, None, (1, 1, 1, 50))
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(shape, dtype=np.float32) for shape in ((1, 1, 1, 8), (1, 1, 50, 8), (1, 1, 50, 8)))
    for key in range(50):
        mask = np.full((1, 1, 1, 50), np.finfo(np.float32).min, dtype=np.float32)
        mask[..., key] = 0.0
        out, lse = TIERS[tier].forward(p, q, k, v, mask)
        ref_out, ref_lse = reference_attention(q, k, v, p, mask)
        tol = lse_tolerance(q, k, p.scale, mask, p=p)
        assert abs(float(lse[0, 0, 0]) - float(ref_lse[0, 0, 0])) <= tol, key
        np.testing.assert_allclose(out, ref_out, rtol=0, atol=output_tolerance(p, q, k, v, mask))


def test_every_tier_is_here() -> None:
    # make install builds the native kernels and installs numba: a tier missing here would leave its
    # grid above unrun without a failure.
    assert sorted(TIERS) == ["native", "numba", "numpy"]

