"""Tests of the public API (its names are fixed: code outside this repository calls them): validation,
dispatch, semantics, info() and Context.

Vulkan runs on Mesa's lavapipe here, where each new pipeline specialisation (head dims x dtype)
costs about a second to compile: the Vulkan cases keep to tiny shapes and almost all use D=32, so
only a handful of pipelines are ever built. Every result is checked against the float64 reference
in ``tests/reference.py`` (or against a mask built by hand, for the causal/window alignment).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, NamedTuple, Optional, Tuple

import numpy as np
import pytest
import torch
from conftest import exponent_range, float64_tolerance, lse_tolerance, output_tolerance, tolerance
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import output_scale, reference_attention

import aule_kp
import aule_kp.vulkan.device as devmod
from aule_kp import call, dispatch, errors
from aule_kp.dtypes import bf16_to_f32
from aule_kp.problem import Problem, default_scale

_NO_VULKAN = devmod.vulkan_unavailable()
#: The Vulkan tests run for real (on lavapipe in CI); without a Vulkan device only they are skipped.
needs_vulkan = pytest.mark.skipif(bool(_NO_VULKAN), reason=f"no Vulkan device: {_NO_VULKAN}")
BACKENDS = ("cpu", pytest.param("vulkan", marks=needs_vulkan))
D = 32  # the head dim of (nearly) every test: one pipeline per dtype on lavapipe
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# ----------------------------------------------------------------------------------------------
# helpers


def _randn(rng: np.random.Generator, shape: Tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


def _qkv(
    rng: np.random.Generator,
    b: int = 1,
    hq: int = 2,
    hkv: int = 2,
    lq: int = 8,
    lk: int = 8,
    dk: int = D,
    dv: int = D,
    dtype: Any = np.float32,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        _randn(rng, (b, hq, lq, dk), dtype),
        _randn(rng, (b, hkv, lk, dk), dtype),
        _randn(rng, (b, hkv, lk, dv), dtype),
    )


def _torch(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(dtype)


def _f32(x: Any) -> np.ndarray:
    """The values of an input as float32 NumPy (exact for float32/float16/bfloat16)."""
    if isinstance(x, torch.Tensor):
        return x.detach().float().numpy()
    return np.asarray(x, dtype=np.float32)


def _f64(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _additive(mask: Any) -> Optional[np.ndarray]:
    """A bool (True = attend) or float mask as a float64 additive mask (-inf hides)."""
    if mask is None:
        return None
    if isinstance(mask, torch.Tensor):
        m = mask.numpy() if mask.dtype == torch.bool else mask.double().numpy()
    else:
        m = np.asarray(mask)
    if m.dtype == np.bool_:
        return np.where(m, 0.0, -np.inf)
    return m.astype(np.float64)


class Expected(NamedTuple):
    """The float64 result and what its tolerance depends on (``conftest.tolerance``)."""

    out: np.ndarray
    reduction_len: int
    value_scale: float
    exponent_range: float

    def atol(self, dtype: str) -> float:
        """Largest error of a correct ``dtype`` result."""
        return tolerance(dtype, self.reduction_len, self.value_scale, self.exponent_range)


def _expected(
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: bool = False,
    window: Optional[Tuple[int, int]] = None,
    scale: Optional[float] = None,
    mask: Any = None,
) -> Expected:
    """float64 attention, with the causal/window band built by hand (bottom-right aligned)."""
    qf, kf, vf = _f32(q), _f32(k), _f32(v)
    b, hq, lq, dk = qf.shape
    _, hkv, lk, _ = kf.shape
    dv = vf.shape[-1]
    add = np.zeros((lq, lk))
    if causal or window is not None:
        i = np.arange(lq)[:, None]
        j = np.arange(lk)[None, :]
        diag = lk - lq
        ok = np.ones((lq, lk), dtype=bool)
        if causal:
            ok &= j <= i + diag
        if window is not None:
            left, right = window
            if left >= 0:
                ok &= j >= i + diag - left
            if right >= 0:
                ok &= j <= i + diag + right
        add = np.where(ok, 0.0, -np.inf)
    user = _additive(mask)
    if user is not None:
        add = add + user
    s = default_scale(dk) if scale is None else scale
    problem = Problem(b, hq, hkv, lq, lk, dk, dv, "float32", s)  # no band: the mask above is the band
    out, _ = reference_attention(qf, kf, vf, problem, add)
    return Expected(out, lk + dk, output_scale(qf, kf, vf, problem, add), exponent_range(qf, kf, s, user))


def _check(out: Any, like: Any, expected: Expected, dtype: str) -> None:
    """``out`` has q's type/dtype/shape and matches ``expected`` within the dtype's tolerance."""
    if isinstance(like, torch.Tensor):
        assert isinstance(out, torch.Tensor), f"torch q gave {type(out).__name__}"
        assert out.dtype == like.dtype
        assert out.device == like.device
    else:
        assert isinstance(out, np.ndarray), f"numpy q gave {type(out).__name__}"
        assert out.dtype == like.dtype
    assert tuple(out.shape) == expected.out.shape
    got = _f64(out)
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, expected.out, rtol=0, atol=expected.atol(dtype))


# ----------------------------------------------------------------------------------------------
# 1. bad input


Args = Tuple[Tuple[Any, ...], Dict[str, Any]]


def _base() -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    r = np.random.default_rng(7)
    return _qkv(r, b=1, hq=2, hkv=2, lq=8, lk=8)


def _shape(q: Tuple[int, ...], k: Tuple[int, ...], v: Tuple[int, ...]) -> Callable[[], Args]:
    return lambda: ((np.zeros(q, np.float32), np.zeros(k, np.float32), np.zeros(v, np.float32)), {})


def _kw(**kwargs: Any) -> Callable[[], Args]:
    return lambda: (_base(), kwargs)


def _dtypes(qd: Any, kd: Any, vd: Any) -> Callable[[], Args]:
    def make() -> Args:
        q, k, v = _base()
        return tuple(x.astype(d) for x, d in zip((q, k, v), (qd, kd, vd))), {}

    return make


def _torch_dtypes(qd: torch.dtype, kd: torch.dtype, vd: torch.dtype) -> Callable[[], Args]:
    def make() -> Args:
        q, k, v = _base()
        return tuple(torch.from_numpy(x).to(d) for x, d in zip((q, k, v), (qd, kd, vd))), {}

    return make


def _mixed_numpy_torch(which: int) -> Callable[[], Args]:
    def make() -> Args:
        xs = list(_base())
        xs[which] = torch.from_numpy(xs[which])
        return tuple(xs), {}

    return make


def _as_list(which: int) -> Callable[[], Args]:
    def make() -> Args:
        xs: list = list(_base())
        xs[which] = xs[which].tolist()
        return tuple(xs), {}

    return make


def _mask(m: Any) -> Callable[[], Args]:
    return lambda: (_base(), {"attn_mask": m() if callable(m) else m})


OK = (1, 2, 8, D)
BAD_INPUTS = [
    # (id, builder, exception type, message fragments)
    ("q-rank3", _shape((2, 8, D), OK, OK), ValueError, ["q must be 4-D", "[B, Hq, Lq, Dk]", "(2, 8, 32)"]),
    ("k-rank5", _shape(OK, (1, 1, 2, 8, D), OK), ValueError, ["k must be 4-D", "[B, Hkv, Lk, Dk]"]),
    ("v-rank2", _shape(OK, OK, (8, D)), ValueError, ["v must be 4-D", "[B, Hkv, Lk, Dv]"]),
    ("batch-k", _shape(OK, (2, 2, 8, D), (2, 2, 8, D)), ValueError, ["batch", "q 1", "k 2"]),
    ("batch-v", _shape(OK, OK, (3, 2, 8, D)), ValueError, ["batch", "v 3"]),
    ("head-dim-qk", _shape(OK, (1, 2, 8, 64), OK), ValueError, ["head dim", "64", "32"]),
    ("kv-heads", _shape((1, 4, 8, D), (1, 2, 8, D), (1, 1, 8, D)), ValueError, ["Hkv and Lk", "(1, 1, 8, 32)"]),
    ("kv-len", _shape(OK, (1, 2, 8, D), (1, 2, 9, D)), ValueError, ["Hkv and Lk", "(1, 2, 9, 32)"]),
    ("gqa-ratio", _shape((1, 3, 8, D), (1, 2, 8, D), (1, 2, 8, D)), ValueError, ["multiple of", "(3)", "(2)"]),
    ("kv-heads-0", _shape((1, 2, 8, D), (1, 0, 8, D), (1, 0, 8, D)), ValueError, ["multiple of"]),
    ("dk-12", _shape((1, 2, 8, 12), (1, 2, 8, 12), OK), ValueError, ["Dk", "multiple of 8", "12"]),
    ("dk-0", _shape((1, 2, 8, 0), (1, 2, 8, 0), OK), ValueError, ["Dk", "multiple of 8"]),
    ("dk-264", _shape((1, 2, 8, 264), (1, 2, 8, 264), OK), ValueError, ["Dk", "256", "264"]),
    ("dv-20", _shape(OK, OK, (1, 2, 8, 20)), ValueError, ["Dv", "multiple of 8", "20"]),
    ("dv-512", _shape(OK, OK, (1, 2, 8, 512)), ValueError, ["Dv", "256", "512"]),
    ("np-float64", _dtypes(np.float64, np.float64, np.float64), TypeError, ["q", "float32 or float16", "float64"]),
    ("np-int32", _dtypes(np.int32, np.int32, np.int32), TypeError, ["q", "float32 or float16", "int32"]),
    ("np-bool", _dtypes(np.bool_, np.bool_, np.bool_), TypeError, ["q", "float32 or float16", "bool"]),
    ("np-v-float64", _dtypes(np.float32, np.float32, np.float64), TypeError, ["v", "float64"]),
    (
        "torch-float64",
        _torch_dtypes(torch.float64, torch.float64, torch.float64),
        TypeError,
        ["q", "float32, float16 or bfloat16", "float64"],
    ),
    (
        "torch-int32",
        _torch_dtypes(torch.int32, torch.int32, torch.int32),
        TypeError,
        ["q", "float32, float16 or bfloat16", "int32"],
    ),
    ("mixed-np", _dtypes(np.float32, np.float16, np.float32), TypeError, ["one type and dtype", "float32", "float16"]),
    (
        "mixed-torch",
        _torch_dtypes(torch.float16, torch.float16, torch.bfloat16),
        TypeError,
        ["one type and dtype", "bfloat16"],
    ),
    ("np-q-torch-k", _mixed_numpy_torch(1), TypeError, ["mixing numpy and torch"]),
    ("torch-v-np-q", _mixed_numpy_torch(2), TypeError, ["mixing numpy and torch"]),
    ("list-q", _as_list(0), TypeError, ["q must be a numpy.ndarray or torch.Tensor", "list"]),
    ("list-k", _as_list(1), TypeError, ["k must be a numpy.ndarray or torch.Tensor", "list"]),
    ("mask-shape", _mask(np.ones((1, 2, 8, 9), bool)), ValueError, ["attn_mask", "(1, 2, 8, 9)", "[B, Hq, Lq, Lk]"]),
    ("mask-rank5", _mask(np.ones((1, 1, 2, 8, 8), bool)), ValueError, ["attn_mask", "[B, Hq, Lq, Lk]"]),
    ("mask-int", _mask(np.ones((8, 8), np.int32)), TypeError, ["attn_mask", "bool or floating point", "int32"]),
    (
        "mask-torch-int",
        _mask(lambda: torch.ones(8, 8, dtype=torch.int64)),
        TypeError,
        ["attn_mask", "bool or floating point", "int64"],
    ),
    ("mask-list", _mask([[True] * 8] * 8), TypeError, ["attn_mask", "list"]),
    ("window-3", _kw(window=(1, 2, 3)), ValueError, ["window", "(left, right)", "(1, 2, 3)"]),
    ("window-neg2", _kw(window=(-2, 0)), ValueError, ["window", ">= -1", "-2"]),
    ("window-float", _kw(window=(1.5, 0)), ValueError, ["window", "integers", "1.5"]),
    ("window-int", _kw(window=3), ValueError, ["window", "(left, right)"]),
    ("window-bool", _kw(window=(True, 0)), ValueError, ["window"]),
    ("scale-nan", _kw(scale=float("nan")), ValueError, ["scale", "finite", "nan"]),
    ("scale-inf", _kw(scale=float("inf")), ValueError, ["scale", "finite", "inf"]),
    ("scale-neg-inf", _kw(scale=-np.inf), ValueError, ["scale", "finite"]),
    ("backend-name", _kw(backend="metal"), ValueError, ["backend", "'metal'", "vulkan", "cpu"]),
    ("backend-case", _kw(backend="Vulkan"), ValueError, ["backend", "'Vulkan'"]),
    ("causal-int", _kw(causal=1), TypeError, ["causal must be a bool", "int"]),
    ("causal-str", _kw(causal="yes"), TypeError, ["causal must be a bool", "str"]),
    ("causal-none", _kw(causal=None), TypeError, ["causal must be a bool", "NoneType"]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "make, exc, fragments", [pytest.param(*case[1:], id=case[0]) for case in BAD_INPUTS]
)
def test_bad_input_is_a_clear_error(
    backend: str, make: Callable[[], Args], exc: type, fragments: list
) -> None:
    args, kwargs = make()
    kwargs = {"backend": backend, **kwargs}
    with pytest.raises(exc) as info:
        aule_kp.flash_attention(*args, **kwargs)
    assert type(info.value) is exc, f"expected exactly {exc.__name__}, got {type(info.value).__name__}"
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    # the engine is not corrupted: a valid call on the same backend still gives the right answer
    q, k, v = _base()
    _check(aule_kp.flash_attention(q, k, v, backend=backend), q, _expected(q, k, v), "float32")


# ----------------------------------------------------------------------------------------------
# 2. dispatch


def _problem(lq: int = 16, lk: int = 16, dtype: str = "float32") -> Problem:
    return Problem(1, 2, 2, lq, lk, D, D, dtype, default_scale(D))


@pytest.fixture
def warned_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh set of once-per-process fallback warnings for this test (the real one comes back after)."""
    monkeypatch.setattr(errors, "_warned", set())


@needs_vulkan
def test_auto_picks_cpu_over_lavapipe() -> None:
    assert devmod.get_device().caps.type == "cpu", "expected lavapipe (a CPU-type Vulkan device) here"
    for dtype in ("float32", "float16", "bfloat16"):
        assert dispatch.select(_problem(dtype=dtype), "auto").name == "cpu"
    # a forced backend is taken as named
    assert dispatch.select(_problem(), "vulkan").name == "vulkan"
    assert dispatch.select(_problem(), "cpu").name == "cpu"
    assert set(dispatch.available_backends()) >= {"cpu", "vulkan"}


def test_auto_call_works(rng: np.random.Generator) -> None:
    q, k, v = _qkv(rng, hq=4, hkv=2, lq=8, lk=12)
    _check(aule_kp.flash_attention(q, k, v), q, _expected(q, k, v), "float32")
    _check(aule_kp.flash_attention(q, k, v, backend="auto", causal=True), q, _expected(q, k, v, causal=True),
           "float32")


def test_triton_refuses_numpy_inputs_with_its_reason(rng: np.random.Generator) -> None:
    q, k, v = _qkv(rng)
    with pytest.raises(aule_kp.BackendUnavailable) as info:
        aule_kp.flash_attention(q, k, v, backend="triton")
    err = info.value
    assert isinstance(err, RuntimeError)
    assert err.backend == "triton"
    assert err.reasons and all(isinstance(r, str) and r for r in err.reasons)
    assert "triton" in str(err)
    for reason in err.reasons:
        assert reason in str(err)
    with pytest.raises(aule_kp.BackendUnavailable):
        dispatch.select(_problem(), "triton")
    # Available (installed) is not able: the Triton backend takes torch tensors only.
    triton_installed = all(importlib.util.find_spec(m) for m in ("torch", "triton"))
    assert ("triton" in dispatch.available_backends()) == triton_installed


@needs_vulkan
def test_forced_vulkan_over_binding_limit(monkeypatch: pytest.MonkeyPatch, rng: np.random.Generator,
                                         warned_flag: None) -> None:
    q, k, v = _qkv(rng, lq=16, lk=16)
    problem = _problem()
    # Make Vulkan the preferred backend, so that "auto" falling back to the CPU is observable.
    monkeypatch.setattr(dispatch, "PRIORITY", (("vulkan", lambda p: True), *dispatch.PRIORITY))
    assert dispatch.select(problem, "auto").name == "vulkan"

    monkeypatch.setenv("AULE_KP_MAX_BINDING_BYTES", "64")
    with pytest.raises(aule_kp.BackendUnavailable) as info:
        aule_kp.flash_attention(q, k, v, backend="vulkan")
    err = info.value
    assert isinstance(err, RuntimeError)
    assert err.backend == "vulkan"
    assert any("binding limit" in r for r in err.reasons), err.reasons
    assert "binding limit" in str(err) and "64 B" in str(err)

    # "auto" runs it on the CPU, with one warning: the preferred backend refused it
    with pytest.warns(aule_kp.AuleFallbackWarning, match="vulkan backend cannot run this problem.*64 B"):
        assert dispatch.select(problem, "auto").name == "cpu"
    _check(aule_kp.flash_attention(q, k, v), q, _expected(q, k, v), "float32")
    _check(aule_kp.flash_attention(q, k, v, backend="auto"), q, _expected(q, k, v), "float32")

    monkeypatch.delenv("AULE_KP_MAX_BINDING_BYTES")
    _check(aule_kp.flash_attention(q, k, v, backend="vulkan"), q, _expected(q, k, v), "float32")


def test_no_vulkan_falls_back_and_warns_once(
    monkeypatch: pytest.MonkeyPatch, warned_flag: None, rng: np.random.Generator
) -> None:
    """One AuleFallbackWarning (visible without any logging set up), naming the reason."""
    reason = "simulated: no Vulkan ICD installed"
    monkeypatch.setattr(devmod, "vulkan_unavailable", lambda: reason)  # what Context asks
    monkeypatch.setattr(devmod, "unavailable", lambda: reason)  # what the Vulkan backend asks
    q, k, v = _qkv(rng, hq=4, hkv=2, lq=8, lk=12)
    expected = _expected(q, k, v)
    with pytest.warns(aule_kp.AuleFallbackWarning) as record:
        for _ in range(3):
            _check(aule_kp.flash_attention(q, k, v), q, expected, "float32")
        _check(aule_kp.flash_attention(_torch(q, torch.float16), _torch(k, torch.float16),
                                       _torch(v, torch.float16)), _torch(q, torch.float16), expected, "float16")
        assert dispatch.select(_problem(), "auto").name == "cpu"
    fallbacks = [w for w in record if issubclass(w.category, aule_kp.AuleFallbackWarning)]
    assert len(fallbacks) == 1, [str(w.message) for w in fallbacks]
    assert reason in str(fallbacks[0].message)
    assert fallbacks[0].filename == __file__  # attributed to the caller's line, not the library's

    with pytest.raises(aule_kp.BackendUnavailable) as info:
        aule_kp.flash_attention(q, k, v, backend="vulkan")
    assert reason in info.value.reasons
    assert reason in str(info.value)
    assert "vulkan" not in dispatch.available_backends()
    assert "vulkan" not in aule_kp.info()["backends"]
    with pytest.raises(aule_kp.BackendUnavailable, match="no Vulkan ICD"):
        aule_kp.Context()


# ----------------------------------------------------------------------------------------------
# 3. semantics through flash_attention, on both backends


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_numpy(backend: str, rng: np.random.Generator) -> None:
    b, hq, hkv, lq, lk = 2, 4, 2, 12, 20
    q = _randn(rng, (b, lq, hq, D)).transpose(0, 2, 1, 3)  # transposed view
    k = _randn(rng, (b, hkv, 2 * lk, D))[:, :, ::2]  # stepped slice
    v = _randn(rng, (b, hkv, lk, 2 * D))[..., ::2]  # stepped along the head dim
    assert not (q.flags.c_contiguous or k.flags.c_contiguous or v.flags.c_contiguous)
    contiguous = [np.ascontiguousarray(x) for x in (q, k, v)]
    out = aule_kp.flash_attention(q, k, v, backend=backend, causal=True)
    ref = aule_kp.flash_attention(*contiguous, backend=backend, causal=True)
    np.testing.assert_array_equal(out, ref)
    _check(out, q, _expected(q, k, v, causal=True), "float32")


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_numpy_odd_strides(backend: str, rng: np.random.Generator) -> None:
    """Reversed (negative-stride) views, and stride-0 broadcast views (read-only)."""
    q = _randn(rng, (2, 2, 8, D))[:, :, ::-1]
    k = np.broadcast_to(_randn(rng, (1, 2, 8, D)), (2, 2, 8, D))
    v = _randn(rng, (2, 2, 8, D))[::-1]
    contiguous = [np.ascontiguousarray(x) for x in (q, k, v)]
    out = aule_kp.flash_attention(q, k, v, backend=backend)
    np.testing.assert_array_equal(out, aule_kp.flash_attention(*contiguous, backend=backend))
    _check(out, q, _expected(q, k, v), "float32")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_noncontiguous_torch(backend: str, dtype: torch.dtype, rng: np.random.Generator) -> None:
    b, hq, hkv, lq, lk = 1, 4, 2, 8, 12
    q = _torch(_randn(rng, (b, lq, hq, D)), dtype).transpose(1, 2)
    k = _torch(_randn(rng, (b, hkv, 3 * lk, D)), dtype)[:, :, ::3]
    v = _torch(_randn(rng, (b, hkv, D, lk)), dtype).transpose(2, 3)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out = aule_kp.flash_attention(q, k, v, backend=backend)
    ref = aule_kp.flash_attention(q.contiguous(), k.contiguous(), v.contiguous(), backend=backend)
    assert torch.equal(out, ref)
    name = "float32" if dtype == torch.float32 else "bfloat16"
    _check(out, q, _expected(q, k, v), name)


EMPTY = [
    # (b, hq, hkv, lq, lk)
    pytest.param((1, 2, 2, 0, 8), id="Lq0"),
    pytest.param((1, 2, 2, 8, 0), id="Lk0"),
    pytest.param((1, 4, 2, 5, 0), id="Lk0-gqa"),
    pytest.param((0, 2, 2, 8, 8), id="B0"),
    pytest.param((1, 2, 2, 0, 0), id="Lq0-Lk0"),
    pytest.param((0, 2, 2, 0, 0), id="all0"),
]


@pytest.mark.parametrize("shape", EMPTY)
def test_empty_call_on_a_missing_forced_backend_raises(monkeypatch: pytest.MonkeyPatch, shape: Tuple[int, ...],
                                                       rng: np.random.Generator) -> None:
    # backend="vulkan" on a machine without Vulkan raises BackendUnavailable for a call with data; the same
    # call with an empty dimension returned zeros computed on the host, as if the forced backend were there.
    from aule_kp.vulkan.backend import VulkanBackend

    monkeypatch.setattr(VulkanBackend, "unavailable_reasons", lambda self: ["no Vulkan here (test)"])
    b, hq, hkv, lq, lk = shape
    q, k, v = _qkv(rng, b, hq, hkv, lq, lk, D, 64)
    with pytest.raises(aule_kp.BackendUnavailable, match="no Vulkan here"):
        aule_kp.flash_attention(q, k, v, backend="vulkan")
    assert aule_kp.flash_attention(q, k, v, backend="auto").shape == (b, hq, lq, 64)  # auto needs none


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", EMPTY)
@pytest.mark.parametrize("causal", [False, True])
def test_empty_sequences(backend: str, shape: Tuple[int, ...], causal: bool, rng: np.random.Generator) -> None:
    b, hq, hkv, lq, lk = shape
    q, k, v = _qkv(rng, b, hq, hkv, lq, lk, D, 64)
    out = aule_kp.flash_attention(q, k, v, backend=backend, causal=causal)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert out.shape == (b, hq, lq, 64)
    assert not out.any() and not np.isnan(out).any()  # Lk = 0: every row sees no key -> zeros

    tq, tk, tv = (_torch(x, torch.bfloat16) for x in (q, k, v))
    mask = torch.ones(lq, lk, dtype=torch.bool)
    tout = aule_kp.flash_attention(tq, tk, tv, backend=backend, causal=causal, attn_mask=mask)
    assert isinstance(tout, torch.Tensor) and tout.dtype == torch.bfloat16
    assert tuple(tout.shape) == (b, hq, lq, 64)
    assert not tout.float().any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_follows_the_reference(backend: str, where: str, rng: np.random.Generator) -> None:
    """A NaN input gives the NaN entries of our float64 reference (README: non-finite inputs; the
    cases in depth are in test_nonfinite.py), never another library's CPU-dependent ones."""
    q, k, v = _qkv(rng, b=2, hq=4, hkv=2, lq=8, lk=12)
    xs = {"q": q, "k": k, "v": v}
    xs[where][(1, 1, 3, 5)] = np.nan
    out = aule_kp.flash_attention(q, k, v, backend=backend)
    expected = _expected(q, k, v)
    nan = np.isnan(out)
    np.testing.assert_array_equal(nan, np.isnan(expected.out))
    if where == "q":  # only that query row
        assert nan[1, 1, 3].all() and nan.sum() == D
    elif where == "k":  # every row of query heads 2 and 3 (they share kv head 1)
        assert nan[1, 2:].all() and nan.sum() == 2 * 8 * D
    else:  # v: column 5 of those rows
        assert nan[1, 2:, :, 5].all() and nan.sum() == 2 * 8
    clean = _expected(*(np.nan_to_num(x) for x in (q, k, v)))
    np.testing.assert_allclose(out[~nan], expected.out[~nan], rtol=0, atol=clean.atol("float32"))
    # and the engine still works afterwards
    q2, k2, v2 = _qkv(rng, b=2, hq=4, hkv=2, lq=8, lk=12)
    _check(aule_kp.flash_attention(q2, k2, v2, backend=backend), q2, _expected(q2, k2, v2), "float32")


DTYPE_CASES = [
    pytest.param("numpy", np.float32, "float32", id="np-f32"),
    pytest.param("numpy", np.float16, "float16", id="np-f16"),
    pytest.param("torch", torch.float32, "float32", id="torch-f32"),
    pytest.param("torch", torch.float16, "float16", id="torch-f16"),
    pytest.param("torch", torch.bfloat16, "bfloat16", id="torch-bf16"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind, dtype, name", DTYPE_CASES)
@pytest.mark.parametrize("causal", [False, True])
def test_result_mirrors_q(
    backend: str, kind: str, dtype: Any, name: str, causal: bool, rng: np.random.Generator
) -> None:
    q, k, v = _qkv(rng, b=2, hq=4, hkv=2, lq=12, lk=20)
    if kind == "numpy":
        q, k, v = (x.astype(dtype) for x in (q, k, v))
    else:
        q, k, v = (_torch(x, dtype) for x in (q, k, v))
    out = aule_kp.flash_attention(q, k, v, backend=backend, causal=causal)
    _check(out, q, _expected(q, k, v, causal=causal), name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_requires_grad_input(backend: str, rng: np.random.Generator) -> None:
    q, k, v = (_torch(x, torch.float32).requires_grad_() for x in _qkv(rng))
    out = aule_kp.flash_attention(q, k, v, backend=backend)
    _check(out, q, _expected(q, k, v), "float32")


@pytest.mark.parametrize("backend", BACKENDS)
def test_dv_differs_from_dk_and_gqa(backend: str, rng: np.random.Generator) -> None:
    q, k, v = _qkv(rng, b=1, hq=6, hkv=2, lq=9, lk=17, dk=D, dv=64)
    out = aule_kp.flash_attention(q, k, v, backend=backend, causal=True)
    _check(out, q, _expected(q, k, v, causal=True), "float32")
    q1, k1, v1 = _qkv(rng, b=2, hq=4, hkv=1, lq=5, lk=11, dk=D, dv=64)  # MQA
    _check(aule_kp.flash_attention(q1, k1, v1, backend=backend), q1, _expected(q1, k1, v1), "float32")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [0.5, 0.0, -0.3, np.float32(0.07)])
def test_custom_scale(backend: str, scale: float, rng: np.random.Generator) -> None:
    q, k, v = _qkv(rng, lq=8, lk=12)
    out = aule_kp.flash_attention(q, k, v, backend=backend, scale=scale)
    _check(out, q, _expected(q, k, v, scale=float(scale)), "float32")


MASK_SHAPES = [
    pytest.param((2, 4, 8, 12), id="full"),
    pytest.param((8, 12), id="LqLk"),
    pytest.param((12,), id="Lk"),
    pytest.param((1, 4, 1, 12), id="1H1Lk"),
    pytest.param((2, 1, 8, 1), id="B1Lq1"),
    pytest.param((4, 8, 12), id="HLqLk"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", MASK_SHAPES)
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_bool_mask_equals_float_mask(
    backend: str, shape: Tuple[int, ...], kind: str, rng: np.random.Generator
) -> None:
    q, k, v = _qkv(rng, b=2, hq=4, hkv=2, lq=8, lk=12)
    keep = rng.random(shape) < 0.6
    keep.reshape(-1)[0] = False
    additive = np.where(keep, np.float32(0), np.float32(-np.inf))
    if kind == "torch":
        bool_mask: Any = torch.from_numpy(keep)
        float_mask: Any = torch.from_numpy(additive)
    else:
        bool_mask, float_mask = keep, additive
    out_bool = aule_kp.flash_attention(q, k, v, backend=backend, attn_mask=bool_mask)
    out_float = aule_kp.flash_attention(q, k, v, backend=backend, attn_mask=float_mask)
    expected = _expected(q, k, v, mask=keep)
    _check(out_bool, q, expected, "float32")
    _check(out_float, q, expected, "float32")
    np.testing.assert_array_equal(out_bool, out_float)
    # rows that see no key at all are exactly zero
    hidden = ~np.broadcast_to(keep, (2, 4, 8, 12)).any(axis=-1)
    assert not out_bool[hidden].any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind, dtype, name", DTYPE_CASES)
def test_float_mask_is_added(backend: str, kind: str, dtype: Any, name: str, rng: np.random.Generator) -> None:
    q, k, v = _qkv(rng, b=1, hq=4, hkv=2, lq=8, lk=12)
    mask = rng.standard_normal((1, 4, 8, 12)).astype(np.float32) * 2
    mask[0, 1, 2, 5:] = -np.inf  # partly hidden row
    if kind == "numpy":
        q, k, v = (x.astype(dtype) for x in (q, k, v))
        m: Any = mask.astype(dtype)
    else:
        q, k, v = (_torch(x, dtype) for x in (q, k, v))
        m = _torch(mask, dtype)
    out = aule_kp.flash_attention(q, k, v, backend=backend, attn_mask=m, causal=True)
    _check(out, q, _expected(q, k, v, mask=m, causal=True), name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind, dtype, name", DTYPE_CASES)
def test_fully_masked_row_is_zero(backend: str, kind: str, dtype: Any, name: str, rng: np.random.Generator) -> None:
    q, k, v = _qkv(rng, b=1, hq=2, hkv=2, lq=8, lk=12)
    keep = np.ones((1, 2, 8, 12), dtype=bool)
    keep[0, 0, 2] = False  # bool mask hides a whole row
    fmask = np.zeros((1, 2, 8, 12), dtype=np.float32)
    fmask[0, 1, 6] = -np.inf  # float mask hides a whole row
    if kind == "numpy":
        q, k, v = (x.astype(dtype) for x in (q, k, v))
    else:
        q, k, v = (_torch(x, dtype) for x in (q, k, v))
    for mask, row in ((keep, (0, 0, 2)), (fmask, (0, 1, 6))):
        out = aule_kp.flash_attention(q, k, v, backend=backend, attn_mask=mask)
        got = _f64(out)
        assert not np.isnan(got).any()
        assert not got[row].any(), f"fully masked row {row} is {got[row]}"
        _check(out, q, _expected(q, k, v, mask=mask), name)
    # a causal problem with Lq > Lk: the first Lq - Lk rows see no key (bottom-right alignment)
    q2, k2, v2 = _qkv(rng, b=1, hq=2, hkv=2, lq=12, lk=5)
    out = aule_kp.flash_attention(q2, k2, v2, backend=backend, causal=True)
    assert not out[:, :, :7].any() and not np.isnan(out).any()
    _check(out, q2, _expected(q2, k2, v2, causal=True), "float32")


@pytest.mark.parametrize("backend", BACKENDS)
def test_finite_mask_minimum_is_added_not_hidden(backend: str, rng: np.random.Generator) -> None:
    """A float mask is *added* to the scores: a row filled with the most negative finite float32 (what
    Hugging Face models pass as their additive mask) still sees every key equally, as in torch; only
    -inf (or a False bool) hides a key. So that row is the mean of v, not 0."""
    q, k, v = _qkv(rng, b=1, hq=2, hkv=2, lq=8, lk=12)
    lowest = np.finfo(np.float32).min
    mask = np.zeros((1, 1, 8, 12), dtype=np.float32)
    mask[..., 3, :] = lowest  # the whole row
    mask[..., 5, 4:] = lowest  # part of a row: behaves like -inf there
    out = aule_kp.flash_attention(q, k, v, backend=backend, attn_mask=mask)
    want = torch.nn.functional.scaled_dot_product_attention(
        torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), attn_mask=torch.from_numpy(mask)
    ).numpy()
    expected = _expected(q, k, v, mask=mask)
    atol = expected.atol("float32")
    np.testing.assert_allclose(want[0, :, 3], v[0].mean(axis=1), rtol=0, atol=atol)  # torch: mean of v
    np.testing.assert_allclose(out[0, :, 3], v[0].mean(axis=1), rtol=0, atol=atol)
    np.testing.assert_allclose(out, want, rtol=0, atol=2 * atol)  # each within its own tolerance
    _check(out, q, expected, "float32")


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_untouched_and_results_independent(backend: str, rng: np.random.Generator) -> None:
    q, k, v = _qkv(rng, b=1, hq=4, hkv=2, lq=8, lk=12)
    mask = rng.random((8, 12)) < 0.7
    saved = [x.copy() for x in (q, k, v, mask)]
    first = aule_kp.flash_attention(q, k, v, backend=backend, attn_mask=mask)
    first_copy = first.copy()
    for x, y in zip((q, k, v, mask), saved):
        np.testing.assert_array_equal(x, y)
    q2, k2, v2 = _qkv(rng, b=1, hq=4, hkv=2, lq=8, lk=12)  # same problem, new data
    second = aule_kp.flash_attention(q2, k2, v2, backend=backend, attn_mask=mask)
    np.testing.assert_array_equal(first, first_copy)  # the first result is not engine memory
    assert not np.shares_memory(first, second)
    first[...] = 7.0  # writing into a result does not disturb the next call
    _check(aule_kp.flash_attention(q, k, v, backend=backend, attn_mask=mask), q, _expected(q, k, v, mask=mask),
           "float32")
    tq, tk, tv = (_torch(x, torch.bfloat16) for x in (q, k, v))
    tsaved = [x.clone() for x in (tq, tk, tv)]
    tout = aule_kp.flash_attention(tq, tk, tv, backend=backend)
    for x, y in zip((tq, tk, tv), tsaved):
        assert torch.equal(x, y)
    _check(tout, tq, _expected(tq, tk, tv), "bfloat16")


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_calls(backend: str, rng: np.random.Generator) -> None:
    """Threads sharing one cached plan (same problem) each get their own answer."""
    cases = [_qkv(rng, b=1, hq=4, hkv=2, lq=16, lk=24) for _ in range(12)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        outs = list(pool.map(lambda c: aule_kp.flash_attention(*c, backend=backend, causal=True), cases))
    for (q, k, v), out in zip(cases, outs):
        _check(out, q, _expected(q, k, v, causal=True), "float32")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lq, lk", [(8, 20), (20, 8), (1, 13), (13, 1), (12, 12), (7, 40)])
def test_causal_is_bottom_right(backend: str, lq: int, lk: int, rng: np.random.Generator) -> None:
    q, k, v = _qkv(rng, b=1, hq=4, hkv=2, lq=lq, lk=lk)
    out = aule_kp.flash_attention(q, k, v, backend=backend, causal=True)
    # the expected visibility, by hand: query i sees key j iff j <= i + Lk - Lq
    i, j = np.arange(lq)[:, None], np.arange(lk)[None, :]
    keep = j <= i + (lk - lq)
    _check(out, q, _expected(q, k, v, mask=keep), "float32")
    # the same as passing that mask explicitly
    explicit = aule_kp.flash_attention(q, k, v, backend=backend, attn_mask=keep)
    expected = _expected(q, k, v, mask=keep)
    np.testing.assert_allclose(out, explicit, rtol=0, atol=2 * expected.atol("float32"))  # each within its own
    if lq != lk:  # and not torch's top-left alignment
        top_left = _expected(q, k, v, mask=j <= i)
        assert np.abs(out - top_left.out).max() > expected.atol("float32")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [(3, 1), (0, 0), (2, -1), (-1, 2), (-1, -1)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq, lk", [(8, 14), (14, 8)])
def test_window_is_bottom_right(
    backend: str, window: Tuple[int, int], causal: bool, lq: int, lk: int, rng: np.random.Generator
) -> None:
    q, k, v = _qkv(rng, b=1, hq=2, hkv=1, lq=lq, lk=lk)
    out = aule_kp.flash_attention(q, k, v, backend=backend, causal=causal, window=window)
    _check(out, q, _expected(q, k, v, causal=causal, window=window), "float32")
    listed = aule_kp.flash_attention(q, k, v, backend=backend, causal=causal, window=list(window))
    np.testing.assert_array_equal(out, listed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dk, dv, dtype, name",
    [
        (8, 8, np.float32, "float32"),
        (64, 64, np.float32, "float32"),
        (256, 256, np.float32, "float32"),
        (40, 72, np.float16, "float16"),
    ],
    ids=["d8", "d64", "d256", "d40-72-f16"],
)
def test_head_dims(backend: str, dk: int, dv: int, dtype: Any, name: str, rng: np.random.Generator) -> None:
    """Other head dims, and Lq/Lk longer than one Vulkan workgroup's rows / one key tile."""
    for lq, lk, causal in ((70, 150, True), (200, 33, False), (1, 300, False)):
        q, k, v = _qkv(rng, b=1, hq=2, hkv=1, lq=lq, lk=lk, dk=dk, dv=dv, dtype=dtype)
        out = aule_kp.flash_attention(q, k, v, backend=backend, causal=causal, window=(40, -1))
        _check(out, q, _expected(q, k, v, causal=causal, window=(40, -1)), name)


@needs_vulkan
def test_vulkan_splits_work_over_the_binding_limit(monkeypatch: pytest.MonkeyPatch, rng: np.random.Generator) -> None:
    """A binding limit that holds only some (batch, kv-head) groups splits the call into several
    dispatches; the answer must not change (each chunk offsets its groups and the mask)."""
    vk = dispatch.get("vulkan")
    # q/o take 2 * 8 * 32 * 4 = 2048 B per group (group of 2 query heads): 2 groups per chunk, then 1
    for limit, chunks, mask_shape in ((4200, 3, (2, 6, 7, 9)), (2100, 6, (1, 6, 7, 1))):
        monkeypatch.setenv("AULE_KP_MAX_BINDING_BYTES", str(limit))
        q, k, v = _qkv(rng, b=2, hq=6, hkv=3, lq=7, lk=9)
        mask = rng.standard_normal(mask_shape).astype(np.float32)
        mask[..., 0, :] = -np.inf  # the first query row of every (batch, head) sees nothing
        out, lse, problem = call.attention_forward(q, k, v, attn_mask=mask, causal=True, backend="vulkan")
        assert len(vk.plan(problem).chunks) == chunks
        _check(out, q, _expected(q, k, v, mask=mask, causal=True), "float32")
        assert not out[:, :, 0].any()
        assert np.isneginf(lse[:, :, 0]).all()


_shape_st = st.tuples(
    st.integers(1, 2),  # batch
    st.integers(1, 3),  # kv heads
    st.integers(1, 3),  # query heads per kv head
    st.integers(0, 70),  # Lq
    st.integers(0, 70),  # Lk
)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=_shape_st,
    dv=st.sampled_from([32, 64]),
    causal=st.booleans(),
    window=st.none() | st.tuples(st.integers(-1, 9), st.integers(-1, 9)),
    mask_kind=st.sampled_from([None, "bool", "float"]),
    mask_dims=st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()),
    dtype=st.sampled_from(["float32", "float16"]),
    seed=st.integers(0, 2**31),
)
def test_matches_reference_property(
    backend: str,
    shape: Tuple[int, int, int, int, int],
    dv: int,
    causal: bool,
    window: Optional[Tuple[int, int]],
    mask_kind: Optional[str],
    mask_dims: Tuple[bool, bool, bool, bool],
    dtype: str,
    seed: int,
) -> None:
    b, hkv, group, lq, lk = shape
    r = np.random.default_rng(seed)
    q, k, v = _qkv(r, b, hkv * group, hkv, lq, lk, D, dv, np.dtype(dtype))
    mask = None
    if mask_kind is not None:
        full = (b, hkv * group, lq, lk)
        mshape = tuple(n if keep else 1 for n, keep in zip(full, mask_dims))
        mask = r.random(mshape) < 0.7 if mask_kind == "bool" else r.standard_normal(mshape).astype(np.float32)
    out, lse, problem = call.attention_forward(q, k, v, causal=causal, window=window, attn_mask=mask,
                                              backend=backend)
    expected = _expected(q, k, v, causal=causal, window=window, mask=mask)
    _check(out, q, expected, dtype)
    # the row log-sum-exp the backward pass and split-KV decoding rely on
    p32 = dataclasses.replace(problem, dtype="float32")
    ref_out, ref_lse = reference_attention(_f32(q), _f32(k), _f32(v), p32, _additive(mask))
    # two float64 paths: the float32 output model at float64's unit roundoff
    np.testing.assert_allclose(ref_out, expected.out, rtol=0, atol=float64_tolerance(
        output_tolerance(p32, _f32(q), _f32(k), _f32(v), _additive(mask))))
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=0,
                               atol=lse_tolerance(_f32(q), _f32(k), problem.scale, _additive(mask)))


# ----------------------------------------------------------------------------------------------
# 4. info()


@needs_vulkan
def test_info() -> None:
    info = aule_kp.info()
    assert info["version"] == aule_kp.__version__
    assert isinstance(info["version"], str) and info["version"]
    assert {"cpu", "vulkan"} <= set(info["backends"])
    assert ("triton" in info["backends"]) == ("triton" in dispatch.available_backends())
    assert isinstance(info["devices"], list) and info["devices"]
    for dev in info["devices"]:
        for key in ("name", "vendor", "type", "subgroup_size", "shared_memory", "fp16", "coopmat", "variants"):
            assert key in dev, f"device dict lacks {key!r}: {sorted(dev)}"
        assert isinstance(dev["name"], str) and dev["name"]
        assert isinstance(dev["subgroup_size"], int) and dev["subgroup_size"] > 0
        assert isinstance(dev["shared_memory"], int) and dev["shared_memory"] > 0
        assert isinstance(dev["fp16"], bool) and isinstance(dev["coopmat"], bool)
        assert isinstance(dev["variants"], list) and "scalar" in dev["variants"]
        if not dev["coopmat"]:
            assert "coopmat" not in dev["variants"]
    lavapipe = [d for d in info["devices"] if "llvmpipe" in d["name"]]
    if lavapipe:
        assert lavapipe[0]["type"] == "cpu"
        assert lavapipe[0]["subgroup_size"] == 8
        assert lavapipe[0]["shared_memory"] == 32768
    assert info["kp"]["available"] is True
    assert info["kp"]["patched"] is True
    json.dumps(info)  # plain data


# ----------------------------------------------------------------------------------------------
# 5. Context / GpuTensor


@pytest.fixture
def ctx() -> Iterator[aule_kp.Context]:
    with aule_kp.Context() as c:
        yield c


@needs_vulkan
@pytest.mark.parametrize("shape", [(2, 3, 5, 8), (1, 1, 3, 5), (7,), (1, 2, 0, 32)], ids=str)
def test_tensor_round_trip(ctx: aule_kp.Context, shape: Tuple[int, ...], rng: np.random.Generator) -> None:
    a32 = _randn(rng, shape)
    t = ctx.tensor(shape, np.float32)
    assert isinstance(t, aule_kp.GpuTensor)
    assert t.shape == shape and t.dtype == np.float32
    assert not t.download().any()  # zero-filled
    assert t.upload(a32) is t
    back = t.download()
    assert back.dtype == np.float32 and back.shape == shape
    np.testing.assert_array_equal(back, a32)

    a16 = _randn(rng, shape, np.float16)
    t16 = ctx.tensor(shape, np.float16).upload(a16)
    assert t16.dtype == np.float16
    back16 = t16.download()
    assert back16.dtype == np.float16
    np.testing.assert_array_equal(back16, a16)
    # torch CPU tensors upload too
    np.testing.assert_array_equal(ctx.tensor(shape, "float16").upload(torch.from_numpy(a16)).download(), a16)

    bits = rng.integers(0, 2**16, size=shape, dtype=np.uint16)
    tb = ctx.tensor(shape, "bfloat16").upload(bits)
    assert tb.dtype == "bfloat16"
    backb = tb.download()
    assert backb.dtype == np.uint16
    np.testing.assert_array_equal(backb, bits)
    tbf = _torch(a32, torch.bfloat16)
    want = tbf.view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ctx.tensor(shape, "bf16").upload(tbf).download(), want)


@needs_vulkan
def test_tensor_bad_upload(ctx: aule_kp.Context) -> None:
    t = ctx.tensor((1, 2, 8, D), np.float32)
    with pytest.raises(ValueError, match=r"\(1, 2, 8, 32\)"):
        t.upload(np.zeros((1, 2, 8, 16), np.float32))
    with pytest.raises(ValueError, match="shape"):
        t.upload(np.zeros((2, 8, 32), np.float32))  # same byte count, wrong shape
    with pytest.raises(TypeError, match="float32"):
        t.upload(np.zeros((1, 2, 8, D), np.float16))
    with pytest.raises(TypeError, match="float64"):
        t.upload(np.zeros((1, 2, 8, D), np.float64))
    with pytest.raises(TypeError, match="list"):
        t.upload([0.0] * 8)
    with pytest.raises(TypeError):
        t.upload(np.zeros((1, 2, 8, D), np.uint16))  # bf16 bits go to bf16 tensors only
    tb = ctx.tensor((4,), "bfloat16")
    with pytest.raises(TypeError, match="bfloat16"):
        tb.upload(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match=r"\(4,\)"):
        tb.upload(np.zeros(5, np.uint16))
    with pytest.raises(TypeError, match="float32, float16 or 'bfloat16'"):
        ctx.tensor((4,), np.float64)
    with pytest.raises(TypeError):
        ctx.tensor((4,), np.int32)
    with pytest.raises(ValueError, match="non-negative"):
        ctx.tensor((2, -1), np.float32)
    # the tensor still works after the failed uploads
    a = np.arange(2 * 8 * D, dtype=np.float32).reshape(1, 2, 8, D)
    np.testing.assert_array_equal(t.upload(a).download(), a)


def _upload(ctx: aule_kp.Context, a: np.ndarray, dtype: Any) -> aule_kp.GpuTensor:
    return ctx.tensor(a.shape, dtype).upload(a)


@needs_vulkan
@pytest.mark.parametrize("dtype, name", [(np.float32, "float32"), (np.float16, "float16")])
@pytest.mark.parametrize("causal", [False, True])
def test_context_attention(
    ctx: aule_kp.Context, dtype: Any, name: str, causal: bool, rng: np.random.Generator
) -> None:
    q, k, v = _qkv(rng, b=2, hq=4, hkv=2, lq=12, lk=20, dtype=dtype)
    tq, tk, tv = (_upload(ctx, x, dtype) for x in (q, k, v))
    o = ctx.attention(tq, tk, tv, causal=causal)
    assert isinstance(o, aule_kp.GpuTensor)
    assert o.shape == (2, 4, 12, D) and o.dtype == dtype
    got = o.download()
    _check(got, q, _expected(q, k, v, causal=causal), name)
    # the same as flash_attention on the Vulkan backend
    np.testing.assert_allclose(got.astype(np.float64),
                               aule_kp.flash_attention(q, k, v, backend="vulkan", causal=causal).astype(np.float64),
                               rtol=0, atol=2 * _expected(q, k, v, causal=causal).atol(name))


@needs_vulkan
def test_context_attention_bf16(ctx: aule_kp.Context, rng: np.random.Generator) -> None:
    q, k, v = (_torch(x, torch.bfloat16) for x in _qkv(rng, b=1, hq=4, hkv=2, lq=8, lk=12))
    tq, tk, tv = (ctx.tensor(tuple(x.shape), "bfloat16").upload(x) for x in (q, k, v))
    got = bf16_to_f32(ctx.attention(tq, tk, tv, scale=0.2).download())
    expected = _expected(q, k, v, scale=0.2)
    np.testing.assert_allclose(got, expected.out, rtol=0, atol=expected.atol("bfloat16"))


@needs_vulkan
def test_context_out_reuse_and_reupload(ctx: aule_kp.Context, rng: np.random.Generator) -> None:
    q, k, v = _qkv(rng, b=1, hq=4, hkv=2, lq=8, lk=16)
    tq, tk, tv = (_upload(ctx, x, np.float32) for x in (q, k, v))
    out = ctx.tensor((1, 4, 8, D), np.float32)
    assert ctx.attention(tq, tk, tv, out=out) is out
    _check(out.download(), q, _expected(q, k, v), "float32")
    # new q, same tensors: the cached plan must see the new data
    q2 = _randn(rng, q.shape)
    tq.upload(q2)
    assert ctx.attention(tq, tk, tv, out=out) is out
    _check(out.download(), q2, _expected(q2, k, v), "float32")
    # new k and v too, and a window this time (a different problem on the same tensors)
    k2, v2 = _randn(rng, k.shape), _randn(rng, v.shape)
    tk.upload(k2)
    tv.upload(v2)
    ctx.attention(tq, tk, tv, out=out, window=(2, 2))
    _check(out.download(), q2, _expected(q2, k2, v2, window=(2, 2)), "float32")
    ctx.attention(tq, tk, tv, out=out)
    _check(out.download(), q2, _expected(q2, k2, v2), "float32")
    # self-attention with one tensor bound three times
    x = _randn(rng, (1, 2, 8, D))
    tx = _upload(ctx, x, np.float32)
    _check(ctx.attention(tx, tx, tx).download(), x, _expected(x, x, x), "float32")


@needs_vulkan
def test_context_attention_empty(ctx: aule_kp.Context, rng: np.random.Generator) -> None:
    q = _randn(rng, (1, 2, 8, D))
    tq = _upload(ctx, q, np.float32)
    tk, tv = ctx.tensor((1, 2, 0, D), np.float32), ctx.tensor((1, 2, 0, D), np.float32)
    out = ctx.tensor((1, 2, 8, D), np.float32).upload(np.ones((1, 2, 8, D), np.float32))
    assert ctx.attention(tq, tk, tv, out=out) is out
    assert not out.download().any()  # Lk = 0: zeros, overwriting what was there


@needs_vulkan
def test_context_attention_bad_arguments(ctx: aule_kp.Context, rng: np.random.Generator) -> None:
    q, k, v = _qkv(rng)
    tq, tk, tv = (_upload(ctx, x, np.float32) for x in (q, k, v))
    t16 = _upload(ctx, k.astype(np.float16), np.float16)
    with pytest.raises(TypeError, match="one dtype"):
        ctx.attention(tq, t16, tv)
    with pytest.raises(TypeError, match="GpuTensor"):
        ctx.attention(tq, k, tv)
    with pytest.raises(ValueError, match="out must be"):
        ctx.attention(tq, tk, tv, out=ctx.tensor((1, 2, 8, 16), np.float32))
    with pytest.raises(ValueError, match="out must be"):
        ctx.attention(tq, tk, tv, out=ctx.tensor((1, 2, 8, D), np.float16))
    with pytest.raises(ValueError, match="4-D"):
        ctx.attention(ctx.tensor((2, 8, D), np.float32), tk, tv)
    with pytest.raises(ValueError, match="Hkv and Lk"):
        ctx.attention(tq, tk, ctx.tensor((1, 2, 9, D), np.float32))
    with pytest.raises(ValueError, match="window"):
        ctx.attention(tq, tk, tv, window=(1, 2, 3))
    with pytest.raises(ValueError, match="scale"):
        ctx.attention(tq, tk, tv, scale=float("nan"))
    # still fine afterwards
    _check(ctx.attention(tq, tk, tv).download(), q, _expected(q, k, v), "float32")


@needs_vulkan
def test_use_after_free(ctx: aule_kp.Context, rng: np.random.Generator) -> None:
    q, k, v = _qkv(rng)
    tq, tk, tv = (_upload(ctx, x, np.float32) for x in (q, k, v))
    out = ctx.attention(tq, tk, tv)  # builds a plan bound to these tensors
    tk.free()
    tk.free()  # idempotent
    with pytest.raises(ValueError, match="freed"):
        tk.download()
    with pytest.raises(ValueError, match="freed"):
        tk.upload(k)
    with pytest.raises(ValueError, match="freed"):
        ctx.attention(tq, tk, tv)
    with pytest.raises(ValueError, match="freed"):
        ctx.attention(tk, tq, tv)
    # the other tensors are unharmed
    tk2 = _upload(ctx, k, np.float32)
    assert ctx.attention(tq, tk2, tv, out=out) is out
    _check(out.download(), q, _expected(q, k, v), "float32")


@needs_vulkan
def test_repeated_call_fast_path(ctx: aule_kp.Context, rng: np.random.Generator) -> None:
    """Repeated calls with ``out=`` skip validation; they must still see new data and new
    arguments, and a freed tensor must still be an error."""
    q, k, v = _qkv(rng)
    tq, tk, tv = (_upload(ctx, x, np.float32) for x in (q, k, v))
    out = ctx.tensor((1, 2, 8, D), np.float32)
    for _ in range(2):
        assert ctx.attention(tq, tk, tv, out=out, causal=True) is out
        _check(out.download(), q, _expected(q, k, v, causal=True), "float32")
    assert len(ctx._calls) == 1
    v2 = _randn(rng, v.shape)
    tv.upload(v2)
    ctx.attention(tq, tk, tv, out=out, causal=True)
    _check(out.download(), q, _expected(q, k, v2, causal=True), "float32")
    ctx.attention(tq, tk, tv, out=out, scale=0.5)
    _check(out.download(), q, _expected(q, k, v2, scale=0.5), "float32")
    tk.free()
    with pytest.raises(ValueError, match="freed"):
        ctx.attention(tq, tk, tv, out=out, causal=True)


@needs_vulkan
def test_freed_out_tensor_is_an_error_not_a_crash() -> None:
    """A freed ``out`` must raise ValueError like a freed q/k/v. Run in a child process, because
    binding a destroyed kp tensor kills the interpreter (SIGSEGV) instead of failing one test."""
    code = textwrap.dedent(
        """
        import numpy as np, aule_kp
        ctx = aule_kp.Context()
        q, k, v = (ctx.tensor((1, 2, 8, 32), np.float32) for _ in range(3))
        out = ctx.tensor((1, 2, 8, 32), np.float32)
        out.free()
        try:
            ctx.attention(q, k, v, out=out)
        except ValueError as exc:
            print("ValueError:", exc)
        else:
            print("no error")
        """
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=REPO)
    assert proc.returncode == 0, f"child died with {proc.returncode}: {proc.stderr[-2000:]}"
    assert "ValueError:" in proc.stdout and "freed" in proc.stdout, proc.stdout + proc.stderr


@needs_vulkan
def test_context_manager_frees_tensors(rng: np.random.Generator) -> None:
    q, k, v = _qkv(rng)
    with aule_kp.Context() as ctx:
        tq, tk, tv = (_upload(ctx, x, np.float32) for x in (q, k, v))
        out = ctx.attention(tq, tk, tv)
        _check(out.download(), q, _expected(q, k, v), "float32")
    for t in (tq, tk, tv, out):
        with pytest.raises(ValueError, match="freed"):
            t.download()
    # a new Context on the same device still works
    with aule_kp.Context() as ctx2:
        tq, tk, tv = (_upload(ctx2, x, np.float32) for x in (q, k, v))
        _check(ctx2.attention(tq, tk, tv).download(), q, _expected(q, k, v), "float32")
    # and so does the array API
    _check(aule_kp.flash_attention(q, k, v, backend="vulkan"), q, _expected(q, k, v), "float32")


@needs_vulkan
def test_context_bad_device() -> None:
    with pytest.raises(ValueError, match="device"):
        aule_kp.Context(99)
