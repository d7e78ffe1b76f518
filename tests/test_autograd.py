"""``aule_kp.flash_attention`` on torch tensors that require grad: gradients of q, k, v and a float
mask against the float64 reference (tests/reference.py), on the CPU and Vulkan backends, for the
flash-attn semantics of that function (causal and windows aligned bottom-right, GQA, Lq != Lk).

Tolerances: the suite's error model (conftest.output_tolerance / gradient_tolerances: float32 sums
over the reduction lengths, scaled by the sums of absolute terms, plus the roundings to the stored
dtype), with the inputs widened exactly to float32 and the results stored in the tensors' dtype.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Tuple

import numpy as np
import pytest
import torch
from conftest import float64_tolerance, gradient_tolerances, output_tolerance
from reference import reference_attention, reference_backward

import aule_kp
import aule_kp.vulkan.device as devmod
from aule_kp.problem import Problem, band

_NO_VULKAN = devmod.vulkan_unavailable()
needs_vulkan = pytest.mark.skipif(bool(_NO_VULKAN), reason=f"no Vulkan device: {_NO_VULKAN}")
BACKENDS = ("cpu", pytest.param("vulkan", marks=needs_vulkan))
D = 32
STORED = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _tensors(shapes: Tuple[Tuple[int, ...], ...], dtype: torch.dtype, seed: int = 0) -> Tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes)


def _problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: Optional[Tuple[int, int]],
             mask_shape: Optional[Tuple[int, ...]], scale: Optional[float] = None) -> Problem:
    b, hq, lq, dk = q.shape
    _, hkv, lk, dv = v.shape
    diag, left, right = band(lq, lk, causal=causal, window=window, top_left=False)
    return Problem(b, hq, hkv, lq, lk, dk, dv, "float32", scale or dk**-0.5, diag, left, right,
                   None if mask_shape is None else (1,) * (4 - len(mask_shape)) + tuple(mask_shape))


def _f32(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().numpy()


def _reduce_to(ds: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
    """The gradient of a mask of ``shape`` broadcast to ``ds``'s shape: summed over broadcast dims."""
    full = (1,) * (4 - len(shape)) + tuple(shape)
    axes = tuple(i for i, (m, t) in enumerate(zip(full, ds.shape)) if m == 1 and t != 1)
    return ds.sum(axis=axes, keepdims=True).reshape(shape)


def _check_grads(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                 window: Optional[Tuple[int, int]] = None, mask: Optional[torch.Tensor] = None,
                 scale: Optional[float] = None) -> None:
    out = aule_kp.flash_attention(q, k, v, causal=causal, window=window, attn_mask=mask, scale=scale,
                                  backend=backend)
    assert out.grad_fn is not None and out.dtype == q.dtype
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(q.dtype)
    wanted = [x for x in (q, k, v, mask) if x is not None and x.requires_grad]
    grads = torch.autograd.grad(out, wanted, dout)
    p = _problem(q, k, v, causal, window, None if mask is None else tuple(mask.shape), scale)
    m = None if mask is None else _f32(mask)
    ref_out, _ = reference_attention(_f32(q), _f32(k), _f32(v), p, m)
    qf, kf, vf, df = _f32(q), _f32(k), _f32(v), _f32(dout)
    stored = STORED[q.dtype]
    np.testing.assert_allclose(_f32(out), ref_out, atol=output_tolerance(p, qf, kf, vf, m, stored), rtol=0)
    dq, dk, dv, ds = reference_backward(qf, kf, vf, df, p, m)
    tq, tk, tv, tm = gradient_tolerances(p, qf, kf, vf, df, m, stored)
    refs = {id(q): (dq, tq), id(k): (dk, tk), id(v): (dv, tv)}
    if mask is not None:
        refs[id(mask)] = (_reduce_to(ds, tuple(mask.shape)), tm)
    for x, g in zip(wanted, grads):
        ref, tol = refs[id(x)]
        assert g.shape == x.shape and g.dtype == x.dtype
        np.testing.assert_allclose(_f32(g), ref, atol=tol, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["plain", "causal-lq<lk", "causal-lq>lk", "window", "window-causal", "gqa",
                                  "mqa-dv", "float-mask-2d", "float-mask-heads", "mask-causal-gqa"])
def test_gradients_match_float64(backend: str, case: str) -> None:
    lq, lk, hq, hkv, dv = {"causal-lq>lk": (20, 12, 2, 2, D), "gqa": (9, 17, 4, 2, D),
                           "mqa-dv": (7, 13, 4, 1, 2 * D), "mask-causal-gqa": (6, 15, 4, 2, D)}.get(
                               case, (10, 19, 2, 2, D))
    q, k, v = _tensors(((2, hq, lq, D), (2, hkv, lk, D), (2, hkv, lk, dv)), torch.float32)
    mask = None
    g = torch.Generator().manual_seed(3)
    if case == "float-mask-2d":
        mask = torch.randn(lq, lk, generator=g).requires_grad_()
    elif case in ("float-mask-heads", "mask-causal-gqa"):
        mask = torch.randn(1, hq, 1, lk, generator=g).requires_grad_()
    _check_grads(backend, q, k, v, mask=mask,
                 causal=case.startswith("causal") or case in ("window-causal", "mask-causal-gqa"),
                 window={"window": (3, 2), "window-causal": (4, -1)}.get(case))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gradients_16_bit(backend: str, dtype: torch.dtype) -> None:
    q, k, v = _tensors(((1, 4, 8, D), (1, 2, 14, D), (1, 2, 14, D)), dtype, seed=1)
    _check_grads(backend, q, k, v, causal=True)


def test_reference_backward_matches_torch_autograd() -> None:
    """Our reference's gradients equal torch.autograd's on a float64 formula (bottom-right causal,
    window, GQA, a broadcast float mask): the tests above compare against the right thing."""
    q, k, v = (x.detach().double().requires_grad_() for x in _tensors(((1, 4, 6, 8), (1, 2, 9, 8), (1, 2, 9, 8)),
                                                                        torch.float32))
    mask = torch.randn(1, 4, 1, 9, dtype=torch.float64, requires_grad=True)
    p = _problem(q, k, v, True, (3, -1), tuple(mask.shape), 0.4)
    visible = torch.from_numpy(p.visible(np.arange(6), np.arange(9)))
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.4 + mask
    out = torch.softmax(s.masked_fill(~visible, -torch.inf), -1) @ v.repeat_interleave(2, 1)
    dout = torch.randn(out.shape).double()  # float32 values: the reference reads its inputs as float32
    want = torch.autograd.grad(out, (q, k, v, mask), dout)
    dq, dk, dv, ds = reference_backward(*(x.detach().numpy() for x in (q, k, v, dout)), p, mask.detach().numpy())
    for got, w in zip((dq, dk, dv, _reduce_to(ds, tuple(mask.shape))), want):
        # float64 against float64: the float32 model at float64's unit roundoff, for two computations.
        tol = float64_tolerance(max(gradient_tolerances(p, *(x.detach().float().numpy() for x in (q, k, v, dout)),
                                                        mask.detach().float().numpy())))
        np.testing.assert_allclose(got, w.numpy(), atol=tol, rtol=0)


def _gradcheck(fn: Any, *args: torch.Tensor) -> bool:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*double precision.*")
        # float32 finite differences with eps 1e-3: truncation ~eps^2 * |f'''| and rounding
        # ~eps32 * |f| / eps ~ 1e-4, so 2e-3 absolute/relative is the bound for O(1) values.
        return torch.autograd.gradcheck(fn, args, eps=1e-3, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend: str) -> None:
    """torch.autograd.gradcheck (finite differences, reentrancy) on small float32 problems."""
    q, k, v = _tensors(((1, 2, 3, 8), (1, 1, 5, 8), (1, 1, 5, 8)), torch.float32, seed=5)
    mask = torch.randn(3, 5, generator=torch.Generator().manual_seed(2), requires_grad=True)
    assert _gradcheck(lambda q, k, v, m: aule_kp.flash_attention(q, k, v, attn_mask=m, causal=True,
                                                                 backend=backend), q, k, v, mask)
    q, k, v = _tensors(((1, 2, 6, 8), (1, 2, 4, 8), (1, 2, 4, 8)), torch.float32, seed=6)
    assert _gradcheck(lambda q, k, v: aule_kp.flash_attention(q, k, v, window=(1, 1), scale=0.7,
                                                              backend=backend), q, k, v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_some_inputs_require_grad(backend: str) -> None:
    q, k, v = _tensors(((1, 2, 5, D), (1, 2, 7, D), (1, 2, 7, D)), torch.float32)
    k.requires_grad_(False)
    mask = torch.randn(1, 1, 5, 7, requires_grad=True)
    out = aule_kp.flash_attention(q, k.detach(), v.detach(), attn_mask=mask, backend=backend)
    dq, dmask = torch.autograd.grad(out.sum(), (q, mask))
    assert dq.shape == q.shape and dmask.shape == mask.shape
    # a bool mask takes no gradient and does not stop the others
    out = aule_kp.flash_attention(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool), backend=backend)
    assert torch.autograd.grad(out.sum(), v)[0].shape == v.shape
    # the mask alone requiring grad still records the graph
    out = aule_kp.flash_attention(q.detach(), k, v.detach(), attn_mask=mask, backend=backend)
    assert torch.autograd.grad(out.sum(), mask)[0].shape == mask.shape


def test_no_graph_without_grad_and_numpy_unchanged() -> None:
    q, k, v = _tensors(((1, 2, 5, D), (1, 2, 7, D), (1, 2, 7, D)), torch.float32)
    with torch.no_grad():
        out = aule_kp.flash_attention(q, k, v, backend="cpu")
    assert out.grad_fn is None and not out.requires_grad
    plain = aule_kp.flash_attention(*(x.detach() for x in (q, k, v)), backend="cpu")
    assert plain.grad_fn is None
    with_grad = aule_kp.flash_attention(q, k, v, backend="cpu")
    assert torch.equal(with_grad.detach(), plain)
    arrays = [x.detach().numpy() for x in (q, k, v)]
    np.testing.assert_array_equal(aule_kp.flash_attention(*arrays, backend="cpu"), plain.numpy())


def test_double_backward_raises() -> None:
    """No second derivative: asking for one is an error, never silently zero."""
    q, k, v = _tensors(((1, 2, 5, D), (1, 2, 7, D), (1, 2, 7, D)), torch.float32)
    out = aule_kp.flash_attention(q, k, v, backend="cpu")
    (dq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="(?i)differentiat"):
        torch.autograd.grad(dq.sum(), q)


@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_kv_gradients(backend: str) -> None:
    """k/v expanded from one head (stride 0): the leaf gets the gradient summed over the heads."""
    q, k1, v1 = _tensors(((1, 4, 6, D), (1, 1, 9, D), (1, 1, 9, D)), torch.float32, seed=4)
    out = aule_kp.flash_attention(q, k1.expand(1, 4, 9, D), v1.expand(1, 4, 9, D), causal=True, backend=backend)
    grads = torch.autograd.grad(out.square().sum(), (q, k1, v1))
    out_mqa = aule_kp.flash_attention(q, k1, v1, causal=True, backend=backend)
    want = torch.autograd.grad(out_mqa.square().sum(), (q, k1, v1))
    # Two computations of one result, each within its own tolerance of the exact one (the error model).
    p = _problem(q, k1, v1, True, None, None)
    qf, kf, vf = _f32(q), _f32(k1), _f32(v1)
    torch.testing.assert_close(out, out_mqa, atol=2 * output_tolerance(p, qf, kf, vf), rtol=0)
    tolerances = gradient_tolerances(p, qf, kf, vf, 2 * _f32(out_mqa))[:3]  # d(sum out^2)/d out = 2 out
    for g, w, tol in zip(grads, want, tolerances):
        torch.testing.assert_close(g, w, atol=2 * tol, rtol=0)
