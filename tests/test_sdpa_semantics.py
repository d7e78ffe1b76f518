"""aule_kp.scaled_dot_product_attention against torch's own function, argument combinations drawn
by hypothesis (tests/test_torch.py holds the fixed cases and the helpers used here).

Each drawn call: the number of dims (2-D to 5-D), heads with and without ``enable_gqa`` (2-D
inputs too, where torch raises), query and key lengths from 1 (top-left causal with Lq != Lk),
head dims the engine takes and one it does not, float32/float16/bfloat16/float64, contiguous,
transposed or expanded (stride 0) inputs, no mask, ``is_causal``, or a bool or float mask of any
broadcastable shape (fully hidden rows included; a float mask in float32 or q's dtype, which may
require grad), ``scale`` None or given (0 and negative ones included), and grad mode, no_grad or
inference_mode. Where torch raises, the drop-in raises the same type; else it returns torch's
shape, dtype, device, ``requires_grad`` and ``is_inference``, an output within the error model's
tolerance (``test_torch.error_scales``: ``conftest.tolerance``) of torch's math kernel on float64
copies, and gradients of every input that requires one within theirs. Calls that go to torch
(float64, head dim 12) must equal torch's result exactly.

The reference is the math kernel, not torch's default CPU kernel: the latter returns NaN rows for a
negative scale with ``is_causal`` (torch 2.13), which the engine (and the math kernel) do not.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Dict, Optional, Tuple

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_torch import TORCH_SDPA, assert_within, error_scales, needs_vulkan, ref_sdpa

import aule_kp
from aule_kp.torch import FlashAttentionFunction

OURS = aule_kp.scaled_dot_product_attention
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _outcome(backend: str, args: Tuple[torch.Tensor, ...], kwargs: Dict[str, Any], grad_mode: str,
             fn: Any) -> Tuple[Optional[torch.Tensor], Optional[BaseException]]:
    modes = {"grad": contextlib.nullcontext, "no_grad": torch.no_grad, "inference": torch.inference_mode}
    try:
        with modes[grad_mode](), aule_kp.enabled(backend), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs), None
    except Exception as exc:  # noqa: BLE001 - compared with torch's
        return None, exc


@st.composite
def calls(draw: Any, vulkan: bool = False) -> Tuple[Tuple[torch.Tensor, ...], Dict[str, Any], str]:
    """``((q, k, v), kwargs, grad_mode)`` of one SDPA call."""
    ndim = draw(st.sampled_from([2, 3, 3, 4, 4, 4, 5]))
    hk = draw(st.sampled_from([1, 2]))
    hq = hk * draw(st.sampled_from([1, 2, 3]))
    gqa = draw(st.booleans())
    lead = {2: (), 3: (), 4: (draw(st.sampled_from([1, 2])),), 5: (2, draw(st.sampled_from([1, 3])))}[ndim]
    heads = (lambda h: (h,)) if ndim > 2 else (lambda h: ())
    hq = hq if ndim > 2 else 1
    lq, lk = draw(st.sampled_from([1, 2, 5, 17, 40])), draw(st.sampled_from([1, 3, 8, 33]))
    dk = 32 if vulkan else draw(st.sampled_from([8, 16, 32, 64, 12]))
    dv = 32 if vulkan else draw(st.sampled_from([dk, 8, 24]))
    dtype = draw(st.sampled_from(DTYPES[:2] if vulkan else DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    spread = draw(st.sampled_from([0.5, 1.0, 3.0]))

    def tensor(shape: Tuple[int, ...]) -> torch.Tensor:
        layout = draw(st.sampled_from(["contiguous", "transposed", "expanded"]))
        if layout == "expanded" and shape[0] > 1 and len(shape) > 2:  # one row of the first dim, stride 0
            x = (torch.randn(1, *shape[1:], generator=g) * spread).to(dtype).expand(shape)
        else:
            x = (torch.randn(shape, generator=g) * spread).to(dtype)
            if layout == "transposed" and len(shape) >= 3:  # [.., L, H, D] memory seen as [.., H, L, D]
                x = x.transpose(-2, -3).contiguous().transpose(-2, -3)
        return x.requires_grad_(draw(st.booleans()))

    q = tensor((*lead, *heads(hq), lq, dk))
    k = tensor((*lead, *heads(hk), lk, dk))
    v = tensor((*lead, *heads(hk), lk, dv))
    kwargs: Dict[str, Any] = {"enable_gqa": gqa}
    masking = draw(st.sampled_from(["none", "causal", "bool", "float"]))
    target = (*q.shape[:-1], lk)
    if masking == "causal":
        kwargs["is_causal"] = True
    elif masking != "none":
        n = draw(st.integers(2, len(target)))
        shape = [t if draw(st.booleans()) else 1 for t in target[-n:]]
        if masking == "bool":  # few True entries: some rows see no key
            kwargs["attn_mask"] = torch.rand(shape, generator=g) < draw(st.sampled_from([0.2, 0.7, 1.0]))
        else:
            mask = torch.randn(shape, generator=g) * 2
            mask[torch.rand(shape, generator=g) < draw(st.sampled_from([0.0, 0.3, 0.9]))] = -math.inf
            kwargs["attn_mask"] = mask.to(draw(st.sampled_from([torch.float32, dtype]))).requires_grad_(
                draw(st.booleans()))
    kwargs["scale"] = draw(st.sampled_from([None, None, 0.0, 0.3, 2, -0.7]))
    grad_mode = draw(st.sampled_from(["grad", "grad", "no_grad", "inference"]))
    return (q, k, v), kwargs, grad_mode


def check_call(backend: str, args: Tuple[torch.Tensor, ...], kwargs: Dict[str, Any], grad_mode: str) -> None:
    got, got_exc = _outcome(backend, args, kwargs, grad_mode, OURS)
    want, want_exc = _outcome(backend, args, kwargs, grad_mode, TORCH_SDPA)
    if want_exc is not None or got_exc is not None:
        assert type(got_exc) is type(want_exc), (got_exc, want_exc)
        event(f"torch raises {type(want_exc).__name__}")
        return
    assert got is not None and want is not None
    assert (got.shape, got.dtype, got.device) == (want.shape, want.dtype, want.device)
    assert (got.requires_grad, got.is_inference()) == (want.requires_grad, want.is_inference())
    q, k, v = args
    if q.dtype == torch.float64 or q.shape[-1] % 8 or v.shape[-1] % 8:  # torch's own kernel, same arguments
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
        event("torch's kernel")
        return
    ref = ref_sdpa(q, k, v, **kwargs)
    dout = torch.randn(got.shape, generator=torch.Generator().manual_seed(7)).to(got.dtype)
    scales = error_scales(q, k, v, dout, **kwargs)
    assert_within(got, ref, scales.out_tol(q.dtype), "out")
    event(f"engine, {'gradients' if got.requires_grad else 'forward'}, {grad_mode}")
    if not got.requires_grad:
        return
    wrt = {i: x for i, x in enumerate((q, k, v, kwargs.get("attn_mask"))) if x is not None and x.requires_grad}
    grads = torch.autograd.grad(got, list(wrt.values()), dout)
    refs = torch.autograd.grad(ref, list(wrt.values()), dout.double())
    for (i, x), g, r in zip(wrt.items(), grads, refs):
        name = ("dq", "dk", "dv", "dmask")[i]
        assert (g.shape, g.dtype) == (x.shape, x.dtype), name
        assert_within(g, r, scales.grad_tol(q.dtype, i), name)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(calls())
def test_cpu_matches_torch(call: Tuple[Tuple[torch.Tensor, ...], Dict[str, Any], str]) -> None:
    check_call("cpu", *call)


@needs_vulkan
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(calls(vulkan=True))
def test_vulkan_matches_torch(call: Tuple[Tuple[torch.Tensor, ...], Dict[str, Any], str]) -> None:
    """lavapipe: head dim 32, float32/float16, fewer calls."""
    check_call("vulkan", *call)


# ---------------------------------------------------------------------------------------------------
# Cases the drawn calls found.

def test_enable_gqa_with_2d_inputs_raises_as_torch() -> None:
    """torch reads the heads at dim -3 when ``enable_gqa`` (an IndexError for 2-D inputs); the
    drop-in computed a result."""
    q, k, v = (torch.randn(5, 16) for _ in range(3))
    with pytest.raises(IndexError) as want:
        TORCH_SDPA(q, k, v, enable_gqa=True)
    with pytest.raises(IndexError) as got:
        OURS(q, k, v, enable_gqa=True)
    assert str(got.value) == str(want.value)


def test_vmap_like_torch() -> None:
    """Under ``torch.func.vmap`` the call goes to torch (the Function has no vmap rule: it raised)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, n, 16, generator=g) for n in (5, 7, 7))
    got, want = (torch.func.vmap(lambda a, b, c, f=f: f(a, b, c, is_causal=True))(q, k, v) for f in (OURS, TORCH_SDPA))
    assert torch.equal(got, want)


def _sdpa_on_function(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return FlashAttentionFunction.apply(q, k, v, None, False, 0.25, "cpu", -1, -1, True)[0]


@pytest.mark.parametrize("fn", [OURS, _sdpa_on_function])
def test_double_backward_raises_instead_of_dropping_terms(fn: Any) -> None:
    """No double backward: differentiating a gradient taken with ``create_graph=True`` raises.
    With a constant output gradient (``out.sum()``) the gradient came back as a plain tensor, so a
    penalty on it added nothing to the input's gradient, silently (torch's math kernel gives the
    term; its CPU flash kernel raises)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 5, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(1, 2, 7, 16, generator=g) for _ in range(2))
    (dx,) = torch.autograd.grad(fn(x, k, v).sum(), x, create_graph=True)
    assert dx.requires_grad
    with pytest.raises(RuntimeError, match="differentiate twice"):
        (x.pow(2).sum() + dx.pow(2).sum()).backward()
