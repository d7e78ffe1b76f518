"""The CPU backward pass's compiled kernels (numba) on their own, and the fallback to NumPy without them.

The backend's results on both paths are checked against the float64 reference by
tests/test_cpu_backend.py and tests/test_cpu_backward.py (grids and hypothesis, ``cpu_path``).
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
from conftest import UNIT_ROUNDOFF, gradient_tolerances
from reference import reference_backward

from aule_kp import errors
from aule_kp.cpu import compiled
from aule_kp.cpu.backend import CpuBackend
from aule_kp.dtypes import to_f32
from aule_kp.errors import AuleFallbackWarning
from aule_kp.problem import Problem, band, default_scale

U32 = UNIT_ROUNDOFF["float32"]


def _problem(n: int, **kwargs) -> Problem:
    diag, left, right = band(n, n, causal=kwargs.get("causal", False), window=kwargs.get("window"), top_left=False)
    return Problem(1, 1, 1, n, n, 8, 8, "float32", default_scale(8), diag, left, right)


@pytest.fixture
def kernels():
    kern = compiled.load()
    if kern is None:
        pytest.skip("numba is not installed: no compiled CPU path")
    return kern


#: Relative error of the polynomial of ``kernels._exp2`` itself (its float32 coefficients, evaluated
#: exactly), the design's claim: below float32's half ulp.
EXP2_APPROXIMATION = U32 / 2
#: Relative rounding of its Horner evaluation in float32 (first order), with ``f = x - n`` in [-1/2, 1/2]
#: exact (``n`` an integer within a factor 2 of x: Sterbenz): step k computes ``t_k = t_(k+1)·f + c_k``,
#: rounding the product (``u·|t_(k+1) f|``) and the sum (``u·|t_k|``); later steps multiply that by
#: ``|f|`` each, so ``|p̂ - p| <= u·Σ_k |f|^k (|t_(k+1) f| + |t_k|)``. With the kernel's coefficients the
#: sum over p(f) is at most 2.0 (at f = -1/2: 1.41 from the last step, (0.707 + 0.293)/0.707, and 0.59
#: from the earlier ones; 1.7 at f = 1/2). A fused multiply-add drops the products' share. Scaling by
#: ``2**n`` is exact (normal results: x >= -126 here).
EXP2_HORNER = 2.0 * U32


def test_exp2_against_float64(kernels) -> None:
    # Over the range a softmax weight takes (x <= 0) down to float32's smallest normal, 2**-126.
    x = np.concatenate([np.linspace(-126.0, 0.0, 4001), -np.logspace(-8, 0, 200)]).astype(np.float32)
    want = np.exp2(x.astype(np.float64))
    # The same kernel on float64 arguments runs its polynomial in float64 (float32 coefficients, float64
    # arithmetic): the approximation error alone.
    poly = np.array([kernels._exp2(np.float64(v)) for v in x])
    assert np.all(np.abs(poly - want) <= EXP2_APPROXIMATION * want)
    got = np.array([kernels._exp2(v) for v in x], dtype=np.float64)
    assert np.all(np.abs(got - want) <= (EXP2_APPROXIMATION + EXP2_HORNER) * want)


def test_exp2_special_values(kernels) -> None:
    assert kernels._exp2(np.float32(-np.inf)) == 0.0  # a hidden key's weight
    assert kernels._exp2(np.float32(-200.0)) == 0.0  # below float32's range
    assert np.isnan(kernels._exp2(np.float32(np.nan)))  # a NaN score poisons its row
    assert np.isnan(kernels._exp2(np.float32(np.inf)))  # +inf - shift: +inf scores make NaN rows
    assert kernels._exp2(np.float32(0.0)) == 1.0


def _backward_case(monkeypatch):
    """A small causal problem, its forward results and an output gradient; the native kernel hidden, so that
    the backward takes the numba path (as for soft-caps, ALiBi or a shared mask's gradient)."""
    monkeypatch.setattr(CpuBackend, "native", lambda self: None)
    p = _problem(40, causal=True)
    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((1, 1, 40, 8), dtype=np.float32) for _ in range(4))
    out, lse = CpuBackend().forward(p, q, k, v, None)
    return p, q, k, v, out, dout, lse


def _assert_gradients(p: Problem, q, k, v, dout, grads) -> None:
    want = reference_backward(q, k, v, dout, p)
    for got, ref, tol in zip(grads[:3], want[:3], gradient_tolerances(p, q, k, v, dout)[:3]):
        np.testing.assert_allclose(got, ref, rtol=0, atol=tol)


def test_without_numba_numpy_runs_and_says_why_once(monkeypatch) -> None:
    monkeypatch.setattr(compiled, "_tried", False)
    monkeypatch.setattr(compiled, "_kernels", None)
    monkeypatch.setitem(sys.modules, "aule_kp.cpu.kernels", None)  # import of it raises ImportError
    monkeypatch.setattr(errors, "_warned", set())
    p, q, k, v, out, dout, lse = _backward_case(monkeypatch)
    backend = CpuBackend()
    with pytest.warns(AuleFallbackWarning, match="compiled kernels are unavailable.*NumPy path"):
        grads = backend.backward(p, q, k, v, out, dout, lse, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backend.backward(p, q, k, v, out, dout, lse, None)
    _assert_gradients(p, q, k, v, dout, grads)
    assert backend.kernels() is None


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_conversion_is_exact(kernels, dtype: str) -> None:
    # Every 16-bit pattern: normals, subnormals, zeros of both signs, inf, NaN (payload aside).
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).reshape(256, 256)
    got = compiled.to_f32(kernels, bits if dtype == "bfloat16" else bits.view(np.float16), dtype)
    want = to_f32(bits, dtype) if dtype == "bfloat16" else bits.view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))  # -0.0 too


def test_a_kernel_that_fails_to_compile_falls_back_to_numpy(kernels, monkeypatch) -> None:
    # A platform where numba imports but cannot compile: the call reruns on the NumPy path, says why
    # once, and later calls go straight there.
    def broken(*args):
        raise kernels.CompileError("no LLVM target here (test)")

    monkeypatch.setattr(compiled, "_kernels", compiled._kernels)  # restored after the test
    monkeypatch.setattr(kernels, "probs_tile", broken)
    monkeypatch.setattr(errors, "_warned", set())
    p, q, k, v, out, dout, lse = _backward_case(monkeypatch)
    with pytest.warns(AuleFallbackWarning, match="NumbaError: no LLVM target here"):
        grads = CpuBackend().backward(p, q, k, v, out, dout, lse, None)
    _assert_gradients(p, q, k, v, dout, grads)
    assert CpuBackend().kernels() is None
