"""aule_kp.scaled_dot_product_attention and its torch integration against torch itself.

The reference is torch's math SDPA on float64 copies of the inputs (``REF``); the engine computes in
float32. Outputs and gradients are held to the suite's error model (``conftest.tolerance``), with the
value scales of each call worked out by ``error_scales`` for any SDPA layout (issue 3's bar, 1e-3
relative, is far looser).

``torch.autograd.gradcheck`` runs on the engine's float32 (it takes no float64): finite differences
with ``eps=1e-3`` have float32 rounding error ~1e-7/1e-3 = 1e-4 relative and truncation error ~1e-6,
so ``atol=rtol=1e-3`` separates a right gradient from a wrong one by orders of magnitude.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import warnings
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import tolerance
from torch.nn.attention import SDPBackend, sdpa_kernel

import aule_kp
from aule_kp import dispatch, errors
from aule_kp.cpu.backend import CpuBackend
from aule_kp.torch import sdpa as sdpa_mod
from aule_kp.vulkan import device as devmod
from aule_kp.vulkan.backend import VulkanBackend

TORCH_SDPA = torch._C._nn.scaled_dot_product_attention  # the builtin behind F's attribute
assert F.scaled_dot_product_attention is TORCH_SDPA
OURS = aule_kp.scaled_dot_product_attention

needs_vulkan = pytest.mark.skipif(devmod.vulkan_unavailable() is not None, reason="no Vulkan device")


@pytest.fixture(autouse=True)
def _unpatched() -> Any:
    """Every test starts and ends with torch's own function in place."""
    assert F.scaled_dot_product_attention is TORCH_SDPA
    yield
    aule_kp.uninstall()
    assert F.scaled_dot_product_attention is TORCH_SDPA


@pytest.fixture
def went_to_torch(caplog: pytest.LogCaptureFixture) -> Callable[[], List[str]]:
    """Returns a function listing the reasons logged for calls handed to torch so far."""
    caplog.set_level(logging.DEBUG, logger="aule_kp")
    return lambda: [r.getMessage() for r in caplog.records if "goes to torch" in r.getMessage()]


def ref_sdpa(*args: Any, **kwargs: Any) -> torch.Tensor:
    """torch's math SDPA on float64 copies (kept in the autograd graph of the inputs)."""
    def f64(x: Any) -> Any:
        return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    with sdpa_kernel(SDPBackend.MATH):
        return TORCH_SDPA(*[f64(a) for a in args], **{k: f64(v) for k, v in kwargs.items()})


class Scales(NamedTuple):
    """What the tolerances of one SDPA call depend on (see ``conftest.tolerance``)."""

    out: float  # max P|V| (at most max |v|: the output is a convex combination of rows of v)
    grads: Tuple[float, ...]  # sums of absolute terms behind dq, dk, dv (and dmask)
    reduction_len: int  # query rows of a group + keys + head dim
    exponent_range: float

    def out_tol(self, dtype: Any) -> float:
        return tolerance(dtype, self.reduction_len, self.out, self.exponent_range)

    def grad_tol(self, dtype: Any, which: int) -> float:
        return tolerance(dtype, self.reduction_len, self.grads[which], self.exponent_range, roundings=4)


def error_scales(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: Optional[torch.Tensor] = None,
                 attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False, scale: Optional[float] = None,
                 enable_gqa: bool = False, **_: Any) -> Scales:
    """``Scales`` of an SDPA call in any layout, in float64 (``reference.backward_scales`` for torch's
    broadcasting): ``A = P (|dO||V|ᵀ + rowsum(|dO||O|))`` bounds dS termwise, so ``scale·A|K|``,
    ``scale·Aᵀ|Q|``, ``Pᵀ|dO|`` and ``A`` (summed to the mask's shape) bound dq, dk, dv and dmask."""
    qd, kd, vd = (x.detach().double() for x in (q, k, v))
    group = qd.shape[-3] // kd.shape[-3] if enable_gqa and qd.dim() >= 3 else 1
    kr, vr = (x.repeat_interleave(group, -3) if group > 1 else x for x in (kd, vd))
    sc = 1 / math.sqrt(qd.shape[-1]) if scale is None else scale
    lq, lk = qd.shape[-2], kd.shape[-2]
    bias = torch.zeros(lq, lk, dtype=torch.float64)
    if is_causal:
        bias = bias.masked_fill(~torch.ones(lq, lk, dtype=torch.bool).tril(), -math.inf)
    finite_mask = 0.0
    if attn_mask is not None:
        m = attn_mask.detach()
        m = torch.where(m, 0.0, -math.inf).double() if m.dtype == torch.bool else m.double()
        bias = bias + m
        finite = m[m.isfinite()].abs()
        finite_mask = finite.max().item() if finite.numel() else 0.0
    prob = torch.softmax(qd @ kr.mT * sc + bias, -1).nan_to_num(0.0)  # rows that see no key: 0
    exponent = 2 * (abs(sc) * (qd.abs() @ kr.abs().mT).max().item() + finite_mask)
    n = lq * group + lk + max(qd.shape[-1], vd.shape[-1])
    grads: Tuple[float, ...] = ()
    if dout is not None:
        do = dout.detach().double().abs()
        a = prob * (do @ vr.abs().mT + (do * (prob @ vr).abs()).sum(-1, keepdim=True))

        def to_kv(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            if group > 1:
                x = x.unflatten(-3, (like.shape[-3], group)).sum(-3)
            return x.sum_to_size(like.shape)

        grads = (abs(sc) * (a @ kr.abs()).max().item(),
                 abs(sc) * to_kv(a.mT @ qd.abs(), kd).max().item(),
                 to_kv(prob.mT @ do, vd).max().item(),
                 a.sum_to_size(attn_mask.shape).max().item() if attn_mask is not None else 0.0)
    return Scales((prob @ vr.abs()).max().item(), grads, n, max(exponent, 1.0))


def assert_within(got: torch.Tensor, ref: torch.Tensor, atol: float, what: str = "") -> None:
    """``max |got - ref| <= atol``."""
    torch.testing.assert_close(got.double(), ref.double(), rtol=0, atol=atol, msg=lambda m: f"{what}: {m}")


def inputs(shape_q: Sequence[int], shape_k: Sequence[int], shape_v: Sequence[int], dtype: torch.dtype = torch.float32,
           seed: int = 0) -> Tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*s, generator=g).to(dtype).requires_grad_() for s in (shape_q, shape_k, shape_v))


def check_against_torch(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """Forward and gradients (of q, k, v and a mask that requires grad) against float64 torch."""
    with aule_kp.enabled(backend):
        out = OURS(q, k, v, **kwargs)
    ref = ref_sdpa(q, k, v, **kwargs)
    assert out.dtype == q.dtype and out.shape == ref.shape and out.device == q.device
    wrt = [q, k, v] + [m for m in (kwargs.get("attn_mask"),) if m is not None and m.requires_grad]
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype)
    scales = error_scales(q, k, v, dout, **kwargs)
    assert_within(out, ref, scales.out_tol(q.dtype), "out")
    grads = torch.autograd.grad(out, wrt, dout)
    refs = torch.autograd.grad(ref, wrt, dout.double())
    for i, (name, g, r, x) in enumerate(zip(("dq", "dk", "dv", "dmask"), grads, refs, wrt)):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        assert_within(g, r, scales.grad_tol(q.dtype, i), name)
    return out


# ---------------------------------------------------------------------------------------------------
# Every SDPA argument combination, CPU backend.

# (query, key, value shapes, enable_gqa) as functions of L and S.
LAYOUTS: Dict[str, Callable[[int, int], Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...], bool]]] = {
    "4d": lambda L, S: ((2, 4, L, 32), (2, 4, S, 32), (2, 4, S, 32), False),
    "4d-gqa-dv": lambda L, S: ((2, 4, L, 32), (2, 2, S, 32), (2, 2, S, 16), True),
    "4d-mqa-broadcast": lambda L, S: ((2, 4, L, 16), (2, 1, S, 16), (2, 1, S, 16), False),
    "3d": lambda L, S: ((4, L, 32), (4, S, 32), (4, S, 32), False),
    "3d-gqa": lambda L, S: ((4, L, 16), (2, S, 16), (2, S, 16), True),
    "5d": lambda L, S: ((2, 3, 2, L, 16), (2, 3, 2, S, 16), (2, 3, 2, S, 24), False),
    "2d": lambda L, S: ((L, 32), (S, 32), (S, 32), False),
}


def make_mask(kind: str, target: Tuple[int, ...], seed: int = 3) -> Optional[torch.Tensor]:
    """A mask of ``kind`` for scores of shape ``target = (*lead, [Hq,] L, S)``."""
    g = torch.Generator().manual_seed(seed)
    n = len(target)
    shapes = {
        "bool-2d": target[-2:],
        "bool-full": target,
        "float-2d": target[-2:],
        "float-keys": (1,) * (n - 1) + target[-1:],  # a padding mask: one row of key biases
        "float-full": target,
        "float-first-dim": (target[0],) + (1,) * (n - 3) + target[-2:] if n >= 3 else target,
    }
    shape = shapes[kind]
    if kind.startswith("bool"):
        return torch.rand(shape, generator=g) < 0.7
    mask = torch.randn(shape, generator=g)
    mask[torch.rand(shape, generator=g) < 0.15] = -math.inf
    return mask.requires_grad_()


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("lq,lk", [(12, 20), (20, 12), (16, 16)])
@pytest.mark.parametrize("masking", ["none", "causal", "bool-2d", "bool-full", "float-2d", "float-keys", "float-full",
                                     "float-first-dim"])
def test_matches_torch_math_float64(layout: str, lq: int, lk: int, masking: str,
                                    went_to_torch: Callable[[], List[str]]) -> None:
    sq, sk, sv, gqa = LAYOUTS[layout](lq, lk)
    q, k, v = inputs(sq, sk, sv)
    kwargs: Dict[str, Any] = {"enable_gqa": gqa}
    if masking == "causal":
        kwargs["is_causal"] = True
    elif masking != "none":
        kwargs["attn_mask"] = make_mask(masking, (*sq[:-1], lk))
    check_against_torch("cpu", q, k, v, **kwargs)
    assert went_to_torch() == []


@pytest.mark.parametrize("scale", [0.3, 2, -0.5])
@pytest.mark.parametrize("layout", ["4d-gqa-dv", "3d"])
def test_scale(scale: float, layout: str) -> None:
    sq, sk, sv, gqa = LAYOUTS[layout](9, 14)
    check_against_torch("cpu", *inputs(sq, sk, sv), scale=scale, enable_gqa=gqa, is_causal=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("masking", ["causal", "float-full"])
def test_16bit_inputs(dtype: torch.dtype, masking: str) -> None:
    """16-bit storage, float32 compute: the output and gradients are rounded to 16 bits (half an ulp
    of the largest entries: 5e-4 / 4e-3 of max |ref|), and the saved 16-bit output enters dq and dk."""
    q, k, v = inputs((2, 4, 12, 32), (2, 2, 20, 32), (2, 2, 20, 32), dtype)
    kwargs: Dict[str, Any] = {"enable_gqa": True}
    if masking == "causal":
        kwargs["is_causal"] = True
    else:
        kwargs["attn_mask"] = make_mask(masking, (2, 4, 12, 20)).detach().to(dtype).requires_grad_()
    check_against_torch("cpu", q, k, v, **kwargs)


def test_float32_mask_with_bf16_query() -> None:
    """torch lets a float32 mask go with any query dtype; its gradient stays float32."""
    q, k, v = inputs((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16), torch.bfloat16)
    mask = make_mask("float-full", (1, 2, 8, 8))
    check_against_torch("cpu", q, k, v, attn_mask=mask)
    assert mask.grad is None  # autograd.grad above does not accumulate
    OURS(q, k, v, attn_mask=mask).float().sum().backward()
    assert mask.grad is not None and mask.grad.dtype == torch.float32


def test_fully_masked_rows_give_zero_like_torch() -> None:
    """A row with no visible key: output 0 and no gradient, as torch 2.13's math kernel (safe softmax)."""
    q, k, v = inputs((2, 2, 6, 16), (2, 2, 9, 16), (2, 2, 9, 16))
    bool_mask = torch.rand(2, 1, 6, 9, generator=torch.Generator().manual_seed(1)) < 0.6
    bool_mask[:, :, 2] = False
    float_mask = torch.zeros(6, 9)
    float_mask[4] = -math.inf
    for mask in (bool_mask, float_mask.requires_grad_()):
        out = check_against_torch("cpu", q, k, v, attn_mask=mask)
        row = 2 if mask.dtype == torch.bool else 4
        assert torch.equal(out[:, :, row], torch.zeros_like(out[:, :, row]))
        dq = torch.autograd.grad(OURS(q, k, v, attn_mask=mask).sum(), q)[0]
        assert not dq[:, :, row].any()


def test_noncontiguous_inputs() -> None:
    """The usual [B, L, H, D] projections transposed to [B, H, L, D]."""
    b, lq, h, d = 2, 10, 4, 16
    x = torch.randn(b, lq, 3, h, d, requires_grad=True)
    q, k, v = x.unbind(2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    assert not q.is_contiguous()
    with aule_kp.enabled("cpu"):
        out = OURS(q, k, v, is_causal=True)
    ref = ref_sdpa(q, k, v, is_causal=True)
    scales = error_scales(q, k, v, torch.ones_like(out), is_causal=True)
    assert_within(out, ref, scales.out_tol(q.dtype), "out")
    (g,) = torch.autograd.grad(out.sum(), x)
    (r,) = torch.autograd.grad(ref.sum(), x)
    assert_within(g, r, max(scales.grad_tol(q.dtype, i) for i in range(3)), "dx")  # dq, dk, dv side by side


def test_result_keeps_dtype_device_and_grad() -> None:
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        q, k, v = (t.detach() for t in inputs((1, 2, 5, 8), (1, 2, 7, 8), (1, 2, 7, 8), dtype))
        out = OURS(q, k, v)
        assert out.dtype == dtype and out.device == q.device and not out.requires_grad
        out = OURS(q.requires_grad_(), k, v)
        assert out.requires_grad and out.grad_fn is not None
    with torch.no_grad():
        assert not OURS(q, k, v).requires_grad


def test_cpu_tensors_reach_the_backend_without_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Contiguous CPU tensors are handed over as views of their own memory, and the output is the
    backend's array, not a copy."""
    seen: Dict[str, Any] = {}
    forward = CpuBackend.forward

    def spy(self: CpuBackend, problem: Any, q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: Any) -> Any:
        seen["qkv"] = (q, k, v)
        seen["result"] = forward(self, problem, q, k, v, mask)
        return seen["result"]

    monkeypatch.setattr(CpuBackend, "forward", spy)
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (t.detach() for t in inputs((2, 2, 8, 16), (2, 2, 8, 16), (2, 2, 8, 16), dtype))
        with aule_kp.enabled("cpu"):
            out = OURS(q, k, v)
        for t, a in zip((q, k, v), seen["qkv"]):
            assert a.__array_interface__["data"][0] == t.data_ptr()
        assert out.data_ptr() == seen["result"][0].__array_interface__["data"][0]


def test_autocast_like_torch() -> None:
    """Under CPU autocast torch runs SDPA in bfloat16; so does the patched call."""
    q, k, v = (t.detach() for t in inputs((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)))
    mask = torch.randn(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = TORCH_SDPA(q, k, v, attn_mask=mask)
        with aule_kp.enabled("cpu"):
            got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert got.dtype == want.dtype == torch.bfloat16
    qb, kb, vb, mb = (x.bfloat16() for x in (q, k, v, mask))
    atol = error_scales(qb, kb, vb, attn_mask=mb).out_tol(torch.bfloat16)
    ref = ref_sdpa(qb, kb, vb, attn_mask=mb)
    assert_within(got, ref, atol, "ours")
    assert_within(got, want, 2 * atol, "ours vs torch")  # each within its own tolerance of float64


# ---------------------------------------------------------------------------------------------------
# Same errors (and results) as torch for the calls it does not take.

def _qkv(*shapes: Sequence[int], dtype: torch.dtype = torch.float32) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randn(*s, generator=g).to(dtype) for s in shapes]


Q, K, V = _qkv((2, 4, 8, 16), (2, 4, 10, 16), (2, 4, 10, 16))
BAD: Dict[str, Callable[[], Tuple[tuple, dict]]] = {
    "causal-with-mask-4d": lambda: ((Q, K, V), {"attn_mask": torch.ones(8, 10, dtype=torch.bool), "is_causal": True}),
    "causal-with-mask-3d": lambda: ((Q[0], K[0], V[0]), {"attn_mask": torch.ones(8, 10, dtype=torch.bool),
                                                         "is_causal": True}),
    "1d": lambda: (tuple(_qkv((16,), (16,), (16,))), {}),
    "dtype-mismatch": lambda: ((Q, K.double(), V), {}),
    "dtype-half-value": lambda: ((Q, K, V.half()), {}),
    "integer": lambda: ((Q.long(), K.long(), V.long()), {}),
    "head-dim-mismatch": lambda: ((Q, K[..., :8], V), {}),
    "key-value-lengths": lambda: ((Q, K, torch.cat([V, V[:, :, :1]], 2)), {}),
    "batch-mismatch": lambda: ((Q, K[:1].expand(3, -1, -1, -1), V[:1].expand(3, -1, -1, -1)), {}),
    "gqa-without-flag": lambda: ((Q, K[:, :2], V[:, :2]), {}),
    "gqa-not-divisible": lambda: ((torch.cat([Q, Q[:, :2]], 1), K, V), {"enable_gqa": True}),
    "gqa-fewer-query-heads": lambda: ((Q[:, :2], K, V), {"enable_gqa": True}),
    "gqa-no-kv-heads": lambda: ((Q, K[:, :0], V[:, :0]), {"enable_gqa": True}),
    "mask-int": lambda: ((Q, K, V), {"attn_mask": torch.ones(8, 10, dtype=torch.long)}),
    "mask-half-for-float": lambda: ((Q, K, V), {"attn_mask": torch.zeros(8, 10, dtype=torch.half)}),
    "mask-double": lambda: ((Q, K, V), {"attn_mask": torch.zeros(8, 10, dtype=torch.double)}),
    "mask-shape": lambda: ((Q, K, V), {"attn_mask": torch.ones(7, 10, dtype=torch.bool)}),
    "mask-5d": lambda: ((Q, K, V), {"attn_mask": torch.ones(3, 2, 4, 8, 10, dtype=torch.bool)}),
    "mask-1d": lambda: ((Q, K, V), {"attn_mask": torch.ones(10, dtype=torch.bool)}),
    "mask-list": lambda: ((Q, K, V), {"attn_mask": [[True]]}),
    "query-list": lambda: (([1.0], K, V), {}),
    "scale-str": lambda: ((Q, K, V), {"scale": "a"}),
    "scale-inf": lambda: ((Q, K, V), {"scale": math.inf}),
    "scale-tensor": lambda: ((Q, K, V), {"scale": torch.tensor(0.5)}),
    "dropout-2": lambda: ((Q, K, V), {"dropout_p": 2.0}),
    "dropout-negative": lambda: ((Q, K, V), {"dropout_p": -0.5}),
    "causal-int": lambda: ((Q, K, V), {"is_causal": 1}),
    "gqa-int": lambda: ((Q, K, V), {"enable_gqa": 1}),
    "meta-key": lambda: ((Q, K.to("meta"), V), {}),
    "unknown-keyword": lambda: ((Q, K, V), {"foo": 1}),
    "seven-positionals": lambda: ((Q, K, V, None, 0.0, False, None), {}),
    "scale-positional": lambda: ((Q, K, V, None, 0.0, False, 0.5), {}),
}


def _outcome(f: Callable[..., torch.Tensor], args: tuple, kwargs: dict) -> Tuple[str, Any]:
    try:
        return "ok", f(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - comparing whatever torch raises
        return "error", (type(exc), str(exc))


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_same_as_torch(case: str) -> None:
    """Each call torch rejects raises the same exception type with the same message; the few it
    accepts (4-D causal with a mask on CPU, differing value length, ...) give torch's result."""
    args, kwargs = BAD[case]()
    want = _outcome(TORCH_SDPA, args, kwargs)
    got = _outcome(OURS, args, kwargs)
    assert got[0] == want[0], (got, want)
    if want[0] == "error":
        # torch names the position of an argument passed by position; its arguments after value
        # reach torch as keywords (see aule_kp.torch.sdpa).
        assert got[1] == (want[1][0], re.sub(r" \(position [4-9]\)", "", want[1][1]))
    else:
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0, equal_nan=True)


def test_missing_argument_is_a_type_error() -> None:
    """Python words a missing argument differently for a Python function; the type is the same."""
    with pytest.raises(TypeError):
        TORCH_SDPA(Q, K)
    with pytest.raises(TypeError, match="value"):
        OURS(Q, K)


@pytest.mark.parametrize("case,why", [
    ("float64", "dtypes torch.float64"),
    ("head-dim-12", "head dim 12"),
    ("head-dim-264", "head dim 264"),
    ("value-dim-4", "value head dim 4"),
    ("broadcast-batch", "batch dims"),
    ("empty-query", "empty"),
    ("empty-keys", "empty"),
])
def test_outside_the_engine_goes_to_torch(case: str, why: str, went_to_torch: Callable[[], List[str]]) -> None:
    shapes = {
        "float64": ((2, 2, 6, 16), (2, 2, 7, 16), (2, 2, 7, 16)),
        "head-dim-12": ((2, 2, 6, 12), (2, 2, 7, 12), (2, 2, 7, 12)),
        "head-dim-264": ((1, 1, 6, 264), (1, 1, 7, 264), (1, 1, 7, 264)),
        "value-dim-4": ((2, 2, 6, 16), (2, 2, 7, 16), (2, 2, 7, 4)),
        "broadcast-batch": ((2, 2, 6, 16), (1, 2, 7, 16), (1, 2, 7, 16)),
        "empty-query": ((2, 2, 0, 16), (2, 2, 7, 16), (2, 2, 7, 16)),
        "empty-keys": ((2, 2, 6, 16), (2, 2, 0, 16), (2, 2, 0, 16)),
    }[case]
    q, k, v = _qkv(*shapes, dtype=torch.float64 if case == "float64" else torch.float32)
    q.requires_grad_()
    out = OURS(q, k, v)
    assert torch.equal(out, TORCH_SDPA(q, k, v))
    assert out.requires_grad
    reasons = went_to_torch()
    assert len(reasons) == 1 and why in reasons[0], reasons


def test_dropout_goes_to_torch_with_one_notice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(errors, "_warned", set())
    q, k, v = _qkv((2, 2, 6, 16), (2, 2, 7, 16), (2, 2, 7, 16))
    with pytest.warns(aule_kp.AuleFallbackWarning) as record:
        for _ in range(3):
            torch.manual_seed(11)
            got = OURS(q, k, v, dropout_p=0.3)
            torch.manual_seed(11)
            assert torch.equal(got, TORCH_SDPA(q, k, v, dropout_p=0.3))
    notices = [w for w in record if "dropout" in str(w.message)]
    assert len(notices) == 1


def test_backend_reasons_send_the_call_to_torch(monkeypatch: pytest.MonkeyPatch,
                                                went_to_torch: Callable[[], List[str]]) -> None:
    monkeypatch.setattr(VulkanBackend, "bind", lambda self, problem: (None, ["no room for it (test)"]))
    q, k, v = _qkv((1, 2, 6, 16), (1, 2, 7, 16), (1, 2, 7, 16))
    with aule_kp.enabled("vulkan"):
        assert torch.equal(OURS(q, k, v), TORCH_SDPA(q, k, v))
    assert len(went_to_torch()) == 1 and "no room for it (test)" in went_to_torch()[0]


def test_configured_backend_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU tensors go to "auto" by default; enabled()/install() pick the backend for forward and backward."""
    names: List[str] = []
    select = dispatch.select_bound
    monkeypatch.setattr(dispatch, "select_bound",
                        lambda problem, name="auto": names.append(name) or select(problem, name))
    q, k, v = inputs((1, 2, 6, 16), (1, 2, 7, 16), (1, 2, 7, 16))
    OURS(q, k, v).sum().backward()
    assert set(names) == {"auto"}
    names.clear()
    with aule_kp.enabled("cpu"):
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    assert set(names) == {"cpu"} and len(names) == 3  # routing check, forward op, backward op


# ---------------------------------------------------------------------------------------------------
# install() / uninstall() / enabled()

def test_install_uninstall_round_trip() -> None:
    aule_kp.install()
    assert F.scaled_dot_product_attention is OURS
    aule_kp.install("cpu")  # idempotent: only the backend changes
    assert F.scaled_dot_product_attention is OURS and sdpa_mod.state.backend == "cpu"
    aule_kp.uninstall()
    assert F.scaled_dot_product_attention is TORCH_SDPA and sdpa_mod.state.backend is None
    aule_kp.uninstall()
    assert F.scaled_dot_product_attention is TORCH_SDPA


def test_enabled_nests_and_restores() -> None:
    with aule_kp.enabled("cpu"):
        assert F.scaled_dot_product_attention is OURS and sdpa_mod.state.backend == "cpu"
        with aule_kp.enabled("vulkan"):
            assert sdpa_mod.state.backend == "vulkan"
        assert F.scaled_dot_product_attention is OURS and sdpa_mod.state.backend == "cpu"
        with pytest.raises(KeyError), aule_kp.enabled():
            assert sdpa_mod.state.backend is None
            raise KeyError("left by an exception")
        assert sdpa_mod.state.backend == "cpu"
    assert F.scaled_dot_product_attention is TORCH_SDPA
    aule_kp.install("cpu")
    with aule_kp.enabled("vulkan"):
        assert sdpa_mod.state.backend == "vulkan"
    assert F.scaled_dot_product_attention is OURS and sdpa_mod.state.backend == "cpu"
    with aule_kp.enabled():
        aule_kp.uninstall()
        assert F.scaled_dot_product_attention is OURS  # the block still holds it
    assert F.scaled_dot_product_attention is TORCH_SDPA


def test_unknown_backend_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="backend"):
        aule_kp.install("metal")
    with pytest.raises(ValueError, match="backend"), aule_kp.enabled("opencl"):
        pass
    assert F.scaled_dot_product_attention is TORCH_SDPA


def test_fallback_calls_the_saved_original_not_the_patch() -> None:
    """A call handed to torch while the patch is on must not come back to the patch (recursion)."""
    q, k, v = _qkv((1, 2, 6, 16), (1, 2, 7, 16), (1, 2, 7, 16), dtype=torch.float64)
    aule_kp.install()
    assert torch.equal(F.scaled_dot_product_attention(q, k, v), TORCH_SDPA(q, k, v))


def test_someone_patching_over_us_is_left_alone(caplog: pytest.LogCaptureFixture) -> None:
    theirs = lambda *a, **kw: TORCH_SDPA(*a, **kw)  # noqa: E731
    aule_kp.install()
    F.scaled_dot_product_attention = theirs
    try:
        aule_kp.uninstall()
        assert F.scaled_dot_product_attention is theirs
        assert any("replaced" in r.getMessage() for r in caplog.records)
    finally:
        F.scaled_dot_product_attention = TORCH_SDPA


def test_threads() -> None:
    """Threads entering and leaving enabled() blocks and calling F.scaled_dot_product_attention at
    once: every call is right, and the original is back at the end."""
    q, k, v = (t.detach() for t in inputs((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)))
    want = TORCH_SDPA(q, k, v, is_causal=True)
    atol = 2 * error_scales(q, k, v, is_causal=True).out_tol(q.dtype)  # both float32, each within one tolerance
    errors: List[BaseException] = []
    start = threading.Barrier(6)

    def worker(i: int) -> None:
        try:
            start.wait()
            for j in range(25):
                if (i + j) % 3 == 0:
                    aule_kp.install("cpu")
                    aule_kp.uninstall()
                with aule_kp.enabled("cpu" if i % 2 else None):
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                assert_within(out, want, atol)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert F.scaled_dot_product_attention is TORCH_SDPA


def test_a_threads_own_block_decides_its_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another thread's enabled() block, entered later, must not change what this thread's own block
    asked for: the latest block of any thread chose for all, so a thread inside enabled("cpu") ran
    its calls with another thread's precision="int8" (approximate Q.K) or backend. A thread without
    a block of its own follows install() and the latest block, as before."""
    seen: Dict[str, Tuple[Any, Any]] = {}
    route = sdpa_mod._route

    def spy(*args: Any) -> Any:
        seen[threading.current_thread().name] = (args[8], args[9])  # backend, precision
        return route(*args)

    monkeypatch.setattr(sdpa_mod, "_route", spy)
    q, k, v = (t.detach() for t in inputs((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)))
    inside, other_in, other_out = threading.Event(), threading.Event(), threading.Event()

    def mine() -> None:
        with aule_kp.enabled("cpu"):
            inside.set()
            other_in.wait(30)
            F.scaled_dot_product_attention(q, k, v)
        other_out.set()

    def other() -> None:
        inside.wait(30)
        with aule_kp.enabled("auto", precision="int8"):
            other_in.set()
            other_out.wait(30)

    def bystander() -> None:
        F.scaled_dot_product_attention(q, k, v)

    threads = [threading.Thread(target=mine, name="mine"), threading.Thread(target=other, name="other")]
    for t in threads:
        t.start()
    other_in.wait(30)
    by = threading.Thread(target=bystander, name="bystander")
    by.start()
    by.join()
    for t in threads:
        t.join()
    assert seen["mine"] == ("cpu", "fp")
    assert seen["bystander"] == ("auto", "int8")
    assert F.scaled_dot_product_attention is TORCH_SDPA


# ---------------------------------------------------------------------------------------------------
# Autograd Function, custom ops, gradcheck

def _gradcheck(fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> bool:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not of double precision.*")
        warnings.filterwarnings("ignore", message=".*double precision floating point.*")
        return torch.autograd.gradcheck(fn, args, eps=1e-3, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("vulkan", marks=needs_vulkan)])
def test_gradcheck(backend: str) -> None:
    """torch.autograd.gradcheck (finite differences, reentrancy, undefined gradients) in float32."""
    q, k, v = inputs((1, 2, 3, 8), (1, 1, 5, 8), (1, 1, 5, 8))
    mask = torch.randn(3, 5, generator=torch.Generator().manual_seed(2), requires_grad=True)
    with aule_kp.enabled(backend):
        assert _gradcheck(lambda q, k, v, m: OURS(q, k, v, attn_mask=m, enable_gqa=True), q, k, v, mask)
        q, k, v = inputs((1, 1, 5, 8), (1, 1, 3, 8), (1, 1, 3, 8))
        assert _gradcheck(lambda q, k, v: OURS(q, k, v, is_causal=True, scale=0.7), q, k, v)


def test_custom_ops_pass_opcheck() -> None:
    """Schema, fake (meta) kernels against the real ones, autograd registration, AOT dispatch."""
    q, k, v = inputs((1, 2, 5, 8), (1, 1, 7, 8), (1, 1, 7, 16))
    mask = torch.randn(1, 2, 5, 7, requires_grad=True)
    fwd = torch.ops.aule_kp.flash_attention_forward.default
    bwd = torch.ops.aule_kp.flash_attention_backward.default
    for args in ((q, k, v, mask, False, 0.3, "cpu"), (q, k, v, None, True, 0.5, "auto")):
        torch.library.opcheck(fwd, args)
        out, lse = fwd(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
        dout = torch.randn_like(out)
        plain = [a.detach() for a in (q, k, v)]
        m = None if args[3] is None else args[3].detach()
        torch.library.opcheck(bwd, (dout, *plain, out, lse, m, args[4], args[5], args[6], m is not None))


def test_forward_op_alone_is_differentiable() -> None:
    """register_autograd gives the op the Function's backward: same gradients as the public path."""
    q, k, v = inputs((1, 2, 5, 8), (1, 2, 7, 8), (1, 2, 7, 8))
    mask = torch.randn(1, 1, 5, 7, requires_grad=True)
    out, lse = torch.ops.aule_kp.flash_attention_forward(q, k, v, mask, False, 0.25, "cpu")
    assert not lse.requires_grad
    grads = torch.autograd.grad(out.sum(), (q, k, v, mask))
    with aule_kp.enabled("cpu"):
        want = torch.autograd.grad(OURS(q, k, v, attn_mask=mask, scale=0.25).sum(), (q, k, v, mask))
    for g, w in zip(grads, want):
        assert torch.equal(g, w)


@needs_vulkan
def test_backward_falls_back_to_cpu_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend without a backward (NotImplementedError) gets its gradients from the CPU backend,
    with one AuleFallbackWarning."""
    def missing(self: VulkanBackend, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("no Vulkan backward in this test")

    monkeypatch.setattr(VulkanBackend, "backward", missing)
    monkeypatch.setattr(errors, "_warned", set())
    q, k, v = inputs((1, 2, 6, 32), (1, 1, 9, 32), (1, 1, 9, 32))
    with pytest.warns(aule_kp.AuleFallbackWarning) as record:
        for _ in range(2):
            check_against_torch("vulkan", q, k, v, is_causal=True, enable_gqa=True)
    notices = [w for w in record if "no Vulkan backward in this test" in str(w.message)]
    assert len(notices) == 1


@needs_vulkan
@pytest.mark.parametrize("case", ["plain", "causal-top-left", "gqa-float-mask", "3d-bool-mask"])
def test_vulkan_matches_torch(case: str, went_to_torch: Callable[[], List[str]]) -> None:
    """A few calls on the Vulkan backend (lavapipe in CI: one head dim, tiny shapes)."""
    if case == "plain":
        check_against_torch("vulkan", *inputs((2, 2, 9, 32), (2, 2, 9, 32), (2, 2, 9, 32)))
    elif case == "causal-top-left":
        check_against_torch("vulkan", *inputs((1, 2, 6, 32), (1, 2, 11, 32), (1, 2, 11, 32)), is_causal=True)
    elif case == "gqa-float-mask":
        check_against_torch("vulkan", *inputs((1, 4, 7, 32), (1, 2, 10, 32), (1, 2, 10, 32)), enable_gqa=True,
                            attn_mask=make_mask("float-first-dim", (1, 4, 7, 10)))
    else:
        check_against_torch("vulkan", *inputs((3, 8, 32), (3, 5, 32), (3, 5, 32)),
                            attn_mask=make_mask("bool-2d", (3, 8, 5)))
    assert went_to_torch() == []


# ---------------------------------------------------------------------------------------------------
# Training and torch.compile

class Block(nn.Module):
    """Pre-norm transformer block whose attention calls F.scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, n, d = x.shape
        h = self.norm1(x)
        q = self.q(h).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(h).view(b, n, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=bias is None,
                                           enable_gqa=self.heads != self.kv_heads)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """Two blocks (causal GQA, then a learned float attention bias), and a multi-head attention layer."""

    def __init__(self, vocab: int = 40, dim: int = 64, length: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([Block(dim, 4, 2), Block(dim, 4, 4)])
        self.bias = nn.Parameter(torch.zeros(4, length, length))
        self.mha = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        x = self.blocks[0](x)
        causal = torch.full(self.bias.shape[-2:], -math.inf).triu(1)
        x = self.blocks[1](x, self.bias + causal)
        x = x + self.mha(x, x, x, key_padding_mask=padding, need_weights=False)[0]
        return self.head(x)


def _train(patched: bool, steps: int = 6) -> List[float]:
    """Losses of a few Adam steps on one batch (the same data and initial weights every time)."""
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 40, (4, 17), generator=g)
    padding = torch.zeros(4, 16, dtype=torch.bool)
    padding[1, 12:] = True
    losses = []
    if patched:
        aule_kp.install("cpu")
    try:
        for _ in range(steps):
            opt.zero_grad()
            logits = model(tokens[:, :-1], padding)
            loss = F.cross_entropy(logits.reshape(-1, 40), tokens[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        aule_kp.uninstall()
    return losses


def test_training_reaches_the_same_loss(monkeypatch: pytest.MonkeyPatch,
                                        went_to_torch: Callable[[], List[str]]) -> None:
    """A few training steps with the patch (all three attention layers on the engine, forward and
    backward) follow torch's own losses."""
    plain = _train(False)
    taken: List[bool] = []
    route = sdpa_mod._route
    monkeypatch.setattr(sdpa_mod, "_route", lambda *a: taken.append(True) or route(*a))
    patched = _train(True)
    assert len(taken) == 3 * 6 and went_to_torch() == []
    assert plain[-1] < plain[0] - 0.1  # it does learn
    # Each step's attention (outputs and gradients of O(1) values, 16-token rows, D 16) is off by at
    # most one float32 tolerance, relative; over a short, stable run the losses drift apart at most
    # linearly in the steps.
    np.testing.assert_allclose(patched, plain, rtol=len(plain) * tolerance("float32", 16 + 16 + 16), atol=0)


class Attention(nn.Module):
    def __init__(self, call: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.call = call
        self.qkv = nn.Linear(32, 96)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, 16).permute(2, 0, 3, 1, 4)
        return self.call(q, k, v, attn_mask=mask, is_causal=mask is None).transpose(1, 2).reshape(b, n, 32)


@pytest.mark.parametrize("compiler,patched,masked", [("inductor", True, False), ("aot_eager", False, True)])
def test_torch_compile_fullgraph(compiler: str, patched: bool, masked: bool) -> None:
    """torch.compile(fullgraph=True) traces the call (patched F or aule_kp's function) without a
    graph break, into the custom ops, and gives eager's output and gradients."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = Attention(lambda *a, **kw: F.scaled_dot_product_attention(*a, **kw)) if patched else Attention(OURS)
    x = torch.randn(2, 12, 32, requires_grad=True)
    mask = torch.randn(12, 12, requires_grad=True) if masked else None
    wrt = [x, *module.parameters()] + ([mask] if masked else [])
    if patched:
        aule_kp.install("cpu")
    try:
        eager = module(x, mask)
        eager_grads = torch.autograd.grad(eager.square().sum(), wrt)
        explained = torch._dynamo.explain(module)(x, mask)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        compiled = torch.compile(module, backend=compiler, fullgraph=True)
        out = compiled(x, mask)
        grads = torch.autograd.grad(out.square().sum(), wrt)
    finally:
        aule_kp.uninstall()
    # Both run the engine's attention in float32 around torch's projections (compiled: fused, in
    # another order): each within one float32 tolerance, relative to its values, of exact.
    n = 12 * 2 + 12 + 32
    assert_within(out, eager, 2 * tolerance("float32", n, eager.abs().max().item()), "out")
    for g, e in zip(grads, eager_grads):
        assert_within(g, e, 2 * tolerance("float32", n, e.abs().max().item()), "grad")


# ---------------------------------------------------------------------------------------------------
# Packaging and the native-torch (Triton) path

def _python(code: str, **env: str) -> str:
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_import_aule_kp_does_not_import_torch() -> None:
    out = _python("import sys, aule_kp; print('torch' in sys.modules); aule_kp.install; print('torch' in sys.modules)")
    assert out.split() == ["False", "True"]


@pytest.mark.skipif(bool(dispatch.get("triton").unavailable_reasons()), reason="triton is not installed")
def test_native_torch_backend_through_triton_interpreter() -> None:
    """A backend that takes torch tensors where they live (Triton; here its CPU interpreter):
    forward and backward receive and return tensors, gradients match float64 torch."""
    code = """
import json, torch, aule_kp
from torch.nn.attention import sdpa_kernel, SDPBackend
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(*s, generator=g).requires_grad_() for s in ((1, 2, 16, 16), (1, 1, 24, 16), (1, 1, 24, 16)))
m = torch.randn(16, 24, generator=g).requires_grad_()
with aule_kp.enabled("triton"):
    out = aule_kp.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
grads = torch.autograd.grad(out.sum(), (q, k, v, m))
with sdpa_kernel(SDPBackend.MATH):
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=m.double(),
                                                           enable_gqa=True)
refs = torch.autograd.grad(ref.sum(), (q, k, v, m))
print(json.dumps([(a - b).abs().max().item() for a, b in zip((out, *grads), (ref, *refs))]))
"""
    errors = json.loads(_python(code, TRITON_INTERPRET="1").strip().splitlines()[-1])
    g = torch.Generator().manual_seed(0)  # the subprocess's inputs again
    q, k, v = (torch.randn(*s, generator=g) for s in ((1, 2, 16, 16), (1, 1, 24, 16), (1, 1, 24, 16)))
    m = torch.randn(16, 24, generator=g)
    scales = error_scales(q, k, v, torch.ones(1, 2, 16, 16), attn_mask=m, enable_gqa=True)
    tols = [scales.out_tol(torch.float32)] + [scales.grad_tol(torch.float32, i) for i in range(4)]
    assert all(e <= t for e, t in zip(errors, tols)), (errors, tols)
