"""The error model behind every tolerance (``conftest.tolerance``) still lets tests fail.

A tolerance that passes every correct backend is only useful if a wrong result exceeds it. Here the
float64 reference itself is made wrong the ways a kernel goes wrong (a key dropped from a row, a
wrong softmax scale) at the sizes the suite tests, and the difference must be more than twice the
tolerance (a wrong backend's own rounding cannot hide it).

What 16-bit results cannot resolve, by their precision and not by the model: a dropped key among
2,000 in a single decode row (a 1/2000 share of one output, below a 16-bit ulp), and a scale off by
a few percent in a gradient. The float32 cases check those; the 16-bit cases check the 16-bit
plumbing (conversions, rounding, layouts), where mistakes are far larger.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Tuple

import numpy as np
import pytest
from conftest import gradient_tolerances, output_tolerance, problem, problem_inputs, tolerance
from reference import reference_attention, reference_backward

from aule_kp.dtypes import from_f32
from aule_kp.problem import Problem

DTYPES = ["float32", "float16", "bfloat16"]
#: (Lq, Lk) of the suite's forward tests: the API's, the engine's, the CPU backend's, backward shapes,
#: short and long decode, the CPU backend's long and default-block cases.
FORWARD_SIZES = [(8, 12), (24, 40), (37, 53), (40, 24), (1, 37), (600, 800), (1100, 1300), (1, 2000)]
#: (Lq, Lk) of the suite's backward tests.
BACKWARD_SIZES = [(8, 12), (24, 40), (37, 53), (40, 24), (1, 37)]
#: The smallest relative scale error each type resolves at these sizes.
SCALE_ERROR = {"float32": 0.01, "float16": 0.02, "bfloat16": 0.1}


def _cases(p: Problem) -> Tuple[Problem, np.ndarray, Problem]:
    """The problem with its middle key hidden (and that mask), and the problem with a wrong scale."""
    dropped = replace(p, mask_shape=(1, 1, 1, p.len_k))
    mask = np.zeros(dropped.mask_shape, np.float32)
    mask[..., p.len_k // 2] = -np.inf
    return dropped, mask, replace(p, scale=p.scale * (1 + SCALE_ERROR[p.dtype]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lq,lk", FORWARD_SIZES)
def test_output_tolerance_catches_wrong_results(dtype: str, lq: int, lk: int) -> None:
    p = problem(hq=2, hkv=1, lq=lq, lk=lk, dk=64, dv=64, dtype=dtype)
    q, k, v = problem_inputs(p, np.random.default_rng(0))
    atol = output_tolerance(p, q, k, v)
    right, _ = reference_attention(q, k, v, p)
    dropped, mask, scaled = _cases(p)
    if dtype == "float32" or lq > 1 or lk < 100:
        assert np.abs(reference_attention(q, k, v, dropped, mask)[0] - right).max() > 2 * atol
    assert np.abs(reference_attention(q, k, v, scaled)[0] - right).max() > 2 * atol


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lq,lk", BACKWARD_SIZES)
def test_gradient_tolerance_catches_wrong_results(dtype: str, lq: int, lk: int) -> None:
    p = problem(b=2, hq=4, hkv=2, lq=lq, lk=lk, dtype=dtype)
    rng = np.random.default_rng(1)
    q, k, v = problem_inputs(p, rng)
    dout = from_f32(rng.standard_normal((p.batch, p.heads_q, lq, p.dim_v)).astype(np.float32), dtype)
    tols = gradient_tolerances(p, q, k, v, dout)
    right = reference_backward(q, k, v, dout, p)[:3]
    dropped, mask, scaled = _cases(p)
    errors = [np.abs(a - b).max() for a, b in zip(reference_backward(q, k, v, dout, dropped, mask)[:3], right)]
    # dv of the dropped key is lost outright; dq and dk shift by its share of each row's softmax.
    assert errors[2] > 2 * tols[2]
    if dtype == "float32" or (dtype == "float16" and lq > 1):
        assert errors[0] > 2 * tols[0] and errors[1] > 2 * tols[1]
    if dtype == "float32":
        wrong = reference_backward(q, k, v, dout, scaled)[:3]
        assert all(np.abs(a - b).max() > 2 * t for a, b, t in zip(wrong, right, tols))


def test_tolerance_grows_with_the_model() -> None:
    """Each term of the model in isolation: longer sums, larger scores and values, narrower types
    and more roundings all widen the tolerance; float32 has no storage term."""
    base = tolerance("float32", 64, 1.0, 10.0)
    assert tolerance("float32", 256, 1.0, 10.0) > base  # sqrt of the reduction length
    assert tolerance("float32", 64, 1.0, 100.0) > base  # exponent range
    assert tolerance("float32", 64, 3.0, 10.0) == pytest.approx(3 * base)  # value scale, linearly
    assert tolerance("float32", 64, 1.0, 10.0, roundings=4) == base
    assert base < tolerance("float16", 64, 1.0, 10.0) < tolerance("bfloat16", 64, 1.0, 10.0)
    assert tolerance("float16", 64, 1.0, 10.0, roundings=4) > tolerance("float16", 64, 1.0, 10.0)
    assert tolerance(np.float16, 64) == tolerance("float16", 64)
