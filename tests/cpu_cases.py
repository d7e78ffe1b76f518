"""CpuBackend test cases shared by tests/test_cpu_backend.py and tests/test_cpu_backward.py (every feature,
both paths) and tests/test_cpu_native.py (every vector width of the native kernel): problems the way the
API builds them, unit-normal inputs, masks, and the checks of the forward and the backward against the
float64 reference.

Tolerances: max abs error from the suite's error model (``conftest.tolerance``: float32 compute,
dtype epsilon, reduction length, score and value range), computed from each test's own inputs.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
from conftest import gradient_tolerances, lse_tolerance, output_tolerance
from reference import reference_attention, reference_backward

from aule_kp.cpu.backend import CpuBackend
from aule_kp.dtypes import STORAGE, from_f32, to_f32
from aule_kp.problem import Problem, band, default_scale

#: Tiny blocks: a few dozen rows and keys already cross many query blocks, key tiles and band steps.
SMALL = CpuBackend(block_q=16, block_k=24, step=4, workers=2)


def make_problem(
    b: int = 1,
    hq: int = 2,
    hkv: int = 2,
    lq: int = 37,
    lk: int = 53,
    dk: int = 32,
    dv: Optional[int] = None,
    dtype: str = "float32",
    causal: bool = False,
    window: Optional[Tuple[int, int]] = None,
    top_left: bool = False,
    mask_shape: Optional[Tuple[int, int, int, int]] = None,
) -> Problem:
    """A Problem the way the API would build it (band folded from causal/window)."""
    diag, left, right = band(lq, lk, causal=causal, window=window, top_left=top_left)
    dv = dk if dv is None else dv
    return Problem(b, hq, hkv, lq, lk, dk, dv, dtype, default_scale(dk), diag, left, right, mask_shape)


def make_inputs(p: Problem, seed: int = 0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit-normal q, k, v in the problem's storage dtype."""
    rng = np.random.default_rng(seed)
    shapes = [
        (p.batch, p.heads_q, p.len_q, p.dim_k),
        (p.batch, p.heads_kv, p.len_k, p.dim_k),
        (p.batch, p.heads_kv, p.len_k, p.dim_v),
    ]
    return tuple(from_f32(rng.standard_normal(s, dtype=np.float32), p.dtype) for s in shapes)


def check(
    p: Problem,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    mask: Optional[np.ndarray] = None,
    backend: CpuBackend = SMALL,
) -> Tuple[np.ndarray, np.ndarray]:
    """Run the backend, compare with the reference, return ``(out, lse)``."""
    out, lse = backend.forward(p, q, k, v, mask)
    assert out.shape == (p.batch, p.heads_q, p.len_q, p.dim_v) and out.dtype == STORAGE[p.dtype]
    assert lse.shape == (p.batch, p.heads_q, p.len_q) and lse.dtype == np.float32
    ref_out, ref_lse = reference_attention(q, k, v, p, mask)
    hidden = np.isneginf(ref_lse)
    np.testing.assert_array_equal(np.isneginf(lse), hidden)
    got = to_f32(out, p.dtype).astype(np.float64)
    assert np.all(got[hidden] == 0.0)
    np.testing.assert_allclose(got, ref_out, rtol=0, atol=output_tolerance(p, q, k, v, mask))
    qf, kf = to_f32(q, p.dtype), to_f32(k, p.dtype)
    np.testing.assert_allclose(lse[~hidden], ref_lse[~hidden], rtol=0, atol=lse_tolerance(qf, kf, p.scale, mask))
    return out, lse


def float_mask(shape: Tuple[int, ...], seed: int = 1) -> np.ndarray:
    """An additive float32 mask of N(0, 2) values."""
    return np.random.default_rng(seed).normal(0.0, 2.0, shape).astype(np.float32)


def bool_mask(shape: Tuple[int, ...], keep: float = 0.7, seed: int = 2) -> np.ndarray:
    """A boolean mask (True = attend) as the API hands it to backends: 0 / -inf."""
    attend = np.random.default_rng(seed).random(shape) < keep
    return np.where(attend, 0.0, -np.inf).astype(np.float32)


def make_mask(p: Problem, seed: int = 1, hide: float = 0.2) -> np.ndarray:
    """A float32 additive mask of ``p.mask_shape``: normal values, a fraction ``hide`` at -inf."""
    rng = np.random.default_rng(seed)
    mask = rng.standard_normal(p.mask_shape, dtype=np.float32)
    mask[rng.random(p.mask_shape) < hide] = -np.inf
    return mask


def run_backward(p: Problem, mask: Optional[np.ndarray] = None, mask_grad: bool = False, backend: CpuBackend = SMALL,
        seed: int = 0):
    """Forward, then backward of ``sum(out * dout)``: ``(grads, reference grads, inputs)``."""
    rng = np.random.default_rng(seed)
    shapes = [(p.batch, p.heads_q, p.len_q, p.dim_k), (p.batch, p.heads_kv, p.len_k, p.dim_k),
              (p.batch, p.heads_kv, p.len_k, p.dim_v), (p.batch, p.heads_q, p.len_q, p.dim_v)]
    q, k, v, dout = (from_f32(rng.standard_normal(s, dtype=np.float32), p.dtype) for s in shapes)
    out, lse = backend.forward(p, q, k, v, mask)
    grads = backend.backward(p, q, k, v, out, dout, lse, mask, mask_grad)
    ref = reference_backward(q, k, v, dout, p, mask)
    return grads, ref, (q, k, v, dout)


def check_backward(p: Problem, mask: Optional[np.ndarray] = None, mask_grad: bool = False, backend: CpuBackend = SMALL):
    grads, (dq, dk, dv, ds), inputs = run_backward(p, mask, mask_grad, backend)
    tols = gradient_tolerances(p, *inputs, mask)
    for name, got, want, x, tol in zip(("dq", "dk", "dv"), grads[:3], (dq, dk, dv), inputs, tols):
        assert got.dtype == STORAGE[p.dtype] and got.shape == x.shape, name
        got = to_f32(got, p.dtype)
        assert np.isfinite(got).all(), name
        err = np.abs(got - want).max(initial=0.0)
        assert err <= tol, f"{name}: {err} vs {tol}"
    if mask_grad:
        axes = tuple(i for i, n in enumerate(p.mask_shape) if n == 1)
        want = ds.sum(axis=axes, keepdims=True)
        assert grads[3].dtype == np.float32 and grads[3].shape == p.mask_shape
        # A mask constant along the keys has gradient 0 (softmax ignores a row's constant): the
        # tolerance is the rounding of the terms that cancel.
        err = np.abs(grads[3] - want).max(initial=0.0)
        assert err <= tols[3], f"dmask: {err} vs {tols[3]}"
    else:
        assert grads[3] is None
    return grads
