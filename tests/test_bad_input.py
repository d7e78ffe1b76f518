"""Bad input to ``flash_attention``, ``Context`` and ``GpuTensor``: every error names what was wrong
(the argument, and the device, size or state that is the problem), and the engine answers the next
valid call correctly. Plus what must be accepted without copies: K/V broadcast over heads (stride
0) and broadcast masks, which the kernels read in place however large their broadcast shape.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import pytest
import torch
from conftest import output_tolerance
from reference import reference_attention

import aule_kp
import aule_kp.vulkan.device as devmod
from aule_kp import inputs
from aule_kp.call import prepare
from aule_kp.problem import Problem, band

_NO_VULKAN = devmod.vulkan_unavailable()
needs_vulkan = pytest.mark.skipif(bool(_NO_VULKAN), reason=f"no Vulkan device: {_NO_VULKAN}")
BACKENDS = ("cpu", pytest.param("vulkan", marks=needs_vulkan))
D = 32


def _arrays(shape_q: Tuple[int, ...] = (1, 2, 8, D), shape_kv: Tuple[int, ...] = (1, 2, 8, D),
            seed: int = 0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(s).astype(np.float32) for s in (shape_q, shape_kv, shape_kv))


def _expected(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool = False) -> Tuple[np.ndarray, float]:
    """The float64 reference output and its tolerance (the error model, conftest.output_tolerance)."""
    b, hq, lq, dk = q.shape
    diag, left, right = band(lq, k.shape[2], causal=causal, window=None, top_left=False)
    p = Problem(b, hq, k.shape[1], lq, k.shape[2], dk, v.shape[-1], "float32", dk**-0.5, diag, left, right)
    q, k, v = (np.ascontiguousarray(x) for x in (q, k, v))
    return reference_attention(q, k, v, p)[0], output_tolerance(p, q, k, v)


def _assert_expected(got: Any, expected: Tuple[np.ndarray, float]) -> None:
    """``got`` against the float64 reference within the error model's tolerance."""
    want, tol = expected
    np.testing.assert_allclose(np.asarray(got), want, atol=tol, rtol=0)


def _engine_intact() -> None:
    """A valid call on every backend (and the zero-copy API) still gives the right answer."""
    q, k, v = _arrays(seed=9)
    want = _expected(q, k, v, causal=True)
    backends = ["cpu"] + ([] if _NO_VULKAN else ["vulkan"])
    for backend in backends:
        _assert_expected(aule_kp.flash_attention(q, k, v, causal=True, backend=backend), want)
        out = aule_kp.flash_attention(*(torch.from_numpy(x) for x in (q, k, v)), causal=True, backend=backend)
        _assert_expected(out.numpy(), want)
    if not _NO_VULKAN:
        with aule_kp.Context() as ctx:
            qt, kt, vt = (ctx.tensor(x.shape, np.float32).upload(x) for x in (q, k, v))
            _assert_expected(ctx.attention(qt, kt, vt, causal=True).download(), want)


# ----------------------------------------------------------------------------------------------
# flash_attention

Call = Callable[[], Any]
_HUGE = (1024, 64, 4096, 256)  # 256 GiB of float32


def _meta(which: str) -> Call:
    def call() -> Any:
        q, k, v = (torch.from_numpy(x) for x in _arrays())
        args = {"q": q, "k": k, "v": v}
        args[which] = args[which].to("meta")
        return aule_kp.flash_attention(args["q"], args["k"], args["v"])
    return call


def _meta_grad() -> Any:
    q, k, v = (torch.from_numpy(x) for x in _arrays())
    return aule_kp.flash_attention(q.to("meta").requires_grad_(), k.to("meta"), v.to("meta"))


def _meta_mask() -> Any:
    q, k, v = (torch.from_numpy(x) for x in _arrays())
    return aule_kp.flash_attention(q, k, v, attn_mask=torch.zeros(8, 8, device="meta"))


def _sparse_q() -> Any:
    q, k, v = (torch.from_numpy(x) for x in _arrays())
    return aule_kp.flash_attention(q.to_sparse(), k, v)


def _huge_numpy_q() -> Any:
    q = np.broadcast_to(np.zeros((1, 1, 1, 256), np.float32), _HUGE)
    k = np.zeros((1024, 64, 8, 256), np.float32)
    return aule_kp.flash_attention(q, k, k)


def _huge_torch_q() -> Any:
    q = torch.zeros(1, 1, 1, 256).expand(*_HUGE)
    k = torch.zeros(1024, 64, 8, 256)
    return aule_kp.flash_attention(q, k, k, backend="cpu")


def _huge_broadcast_kv_batch() -> Any:
    q = np.broadcast_to(np.zeros((1, 64, 4, 256), np.float32), (1024, 64, 4, 256))
    k = np.broadcast_to(np.zeros((1, 64, 4096, 256), np.float32), (1024, 64, 4096, 256))  # batch stride 0
    return aule_kp.flash_attention(q, k, k)


def _huge_grad_q() -> Any:
    q = torch.zeros(1, 1, 1, 256, requires_grad=True).expand(*_HUGE)
    k = torch.zeros(1024, 64, 8, 256)
    return aule_kp.flash_attention(q, k, k)


def _gpu_tensor_q() -> Any:
    with aule_kp.Context() as ctx:
        q = ctx.tensor((1, 2, 8, D), np.float32)
        _, k, v = _arrays()
        return aule_kp.flash_attention(q, k, v)


FLASH_CASES: Dict[str, Tuple[Call, type, List[str]]] = {
    "meta-q": (_meta("q"), ValueError, ["q is on the 'meta' device"]),
    "meta-k": (_meta("k"), ValueError, ["k is on the 'meta' device"]),
    "meta-v": (_meta("v"), ValueError, ["v is on the 'meta' device"]),
    "meta-q-requires-grad": (_meta_grad, ValueError, ["q is on the 'meta' device"]),
    "meta-mask": (_meta_mask, ValueError, ["attn_mask is on the 'meta' device"]),
    "sparse-q": (_sparse_q, TypeError, ["q must be a dense", "sparse"]),
    "huge-broadcast-numpy-q": (_huge_numpy_q, ValueError, ["q 256.0 GiB", "host memory"]),
    "huge-broadcast-torch-q": (_huge_torch_q, ValueError, ["q 256.0 GiB", "host memory"]),
    "huge-broadcast-kv-over-batch": (_huge_broadcast_kv_batch, ValueError, ["k 256.0 GiB", "v 256.0 GiB"]),
    "huge-broadcast-q-requires-grad": (_huge_grad_q, ValueError, ["q 256.0 GiB"]),
    "gpu-tensor-as-q": (_gpu_tensor_q, TypeError, ["q must be a numpy.ndarray or torch.Tensor", "GpuTensor"]),
}


@pytest.mark.parametrize("call, exc, fragments",
                         [pytest.param(*case, id=name, marks=[needs_vulkan] if name == "gpu-tensor-as-q" else [])
                          for name, case in FLASH_CASES.items()])
def test_flash_attention_errors_name_the_argument(call: Call, exc: type, fragments: List[str]) -> None:
    with pytest.raises(exc) as info:
        call()
    assert type(info.value) is exc, f"expected {exc.__name__}, got {type(info.value).__name__}: {info.value}"
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"
    _engine_intact()


def test_size_is_checked_before_copying(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check counts what would be copied (a non-contiguous input) and the output, and nothing
    that is read in place."""
    q, k, v = _arrays((1, 2, 64, D), (1, 2, 64, D))
    out_bytes = q.nbytes
    copied: List[Tuple[int, ...]] = []
    real = inputs.to_host
    monkeypatch.setattr(inputs, "to_host", lambda x, dtype: copied.append(x.shape) or real(x, dtype))
    monkeypatch.setattr(inputs, "CHECK_MEMORY_FROM", 0)  # small arrays here: check them too
    monkeypatch.setattr(inputs, "available_memory", lambda: out_bytes + k.nbytes - 1)
    qt = np.asfortranarray(q)  # a copy of q is needed
    with pytest.raises(ValueError, match=r"q .*MiB.*the output"):
        aule_kp.flash_attention(qt, k, v, backend="cpu")
    assert copied == []  # refused before any copy
    # contiguous inputs are read in place: only the output counts
    monkeypatch.setattr(inputs, "available_memory", lambda: out_bytes)
    _assert_expected(aule_kp.flash_attention(q, k, v, backend="cpu"), _expected(q, k, v))


# ----------------------------------------------------------------------------------------------
# broadcasts read in place


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_kv_broadcast_over_heads_is_not_copied(backend: str, kind: str) -> None:
    q, k1, v1 = _arrays((2, 4, 8, D), (2, 1, 12, D))
    want = _expected(q, k1, v1, causal=True)
    if kind == "numpy":
        k, v = (np.broadcast_to(x, (2, 4, 12, D)) for x in (k1, v1))
        q_in: Any = q
    else:
        q_in, k1t, v1t = (torch.from_numpy(x) for x in (q, k1, v1))
        k, v = k1t.expand(2, 4, 12, D), v1t.expand(2, 4, 12, D)
    call = prepare(q_in, k, v, causal=True, backend=backend)
    assert call.problem.heads_kv == 1 and call.k.shape == (2, 1, 12, D)  # MQA, one head copied at most
    out = aule_kp.flash_attention(q_in, k, v, causal=True, backend=backend)
    _assert_expected(np.asarray(out), want)


def test_huge_broadcast_kv_over_heads_and_mask_are_accepted() -> None:
    """K/V broadcast to 4096 heads and a mask broadcast to [B, H, Lq, Lk] are never materialised."""
    q = np.random.default_rng(1).standard_normal((1, 4096, 2, D)).astype(np.float32)
    _, k1, v1 = _arrays((1, 1, 2, D), (1, 1, 16, D))
    k, v = (np.broadcast_to(x, (1, 4096, 16, D)) for x in (k1, v1))
    mask = np.broadcast_to(np.zeros((1, 1, 1, 16), np.float32), (1, 4096, 2, 16))
    call = prepare(q, k, v, attn_mask=mask, backend="cpu")
    assert call.problem.heads_kv == 1 and call.problem.mask_shape == (1, 1, 1, 16)
    out = aule_kp.flash_attention(q, k, v, attn_mask=mask, backend="cpu")
    _assert_expected(out, _expected(q, k1, v1))


def test_kv_broadcast_of_one_of_them_only_is_copied() -> None:
    """Only k and v broadcast together share a head; k alone broadcast is copied (same result)."""
    q, k1, v = _arrays((1, 4, 8, D), (1, 1, 12, D))
    v4 = np.repeat(v, 4, axis=1)
    k = np.broadcast_to(k1, (1, 4, 12, D))
    assert prepare(q, k, v4, backend="cpu").problem.heads_kv == 4
    _assert_expected(aule_kp.flash_attention(q, k, v4, backend="cpu"), _expected(q, np.ascontiguousarray(k), v4))


# ----------------------------------------------------------------------------------------------
# Context and GpuTensor


def _context_case(body: Callable[[aule_kp.Context], Any]) -> Call:
    def call() -> Any:
        with aule_kp.Context() as ctx:
            return body(ctx)
    return call


def _qkv_t(ctx: aule_kp.Context) -> Tuple[aule_kp.GpuTensor, ...]:
    return tuple(ctx.tensor(x.shape, np.float32).upload(x) for x in _arrays())


def _freed(which: str) -> Call:
    def body(ctx: aule_kp.Context) -> Any:
        q, k, v = _qkv_t(ctx)
        out = ctx.tensor((1, 2, 8, D), np.float32)
        args = {"q": q, "k": k, "v": v, "out": out}
        args[which].free()
        return ctx.attention(args["q"], args["k"], args["v"], args["out"])
    return _context_case(body)


def _closed_tensor(ctx: aule_kp.Context) -> Any:
    q, k, _ = _qkv_t(ctx)
    with aule_kp.Context() as other:
        v = other.tensor((1, 2, 8, D), np.float32)
    return ctx.attention(q, k, v)


def _other_context_tensor(ctx: aule_kp.Context) -> Any:
    q, _, v = _qkv_t(ctx)
    with aule_kp.Context() as other:
        return ctx.attention(q, other.tensor((1, 2, 8, D), np.float32), v)


def _closed_context(method: str) -> Call:
    def call() -> Any:
        ctx = aule_kp.Context()
        q, k, v = _qkv_t(ctx)
        ctx.close()
        return {"tensor": lambda: ctx.tensor((2,), np.float32), "attention": lambda: ctx.attention(q, k, v),
                "enter": lambda: ctx.__enter__(), "upload": lambda: q.upload(_arrays()[0]),
                "download": lambda: q.download()}[method]()
    return call


def _upload(a: Any, shape: Tuple[int, ...] = (1, 2, 8, D), dtype: Any = np.float32) -> Call:
    return _context_case(lambda ctx: ctx.tensor(shape, dtype).upload(a() if callable(a) else a))


def _attention(**kwargs: Any) -> Call:
    return _context_case(lambda ctx: ctx.attention(*_qkv_t(ctx), **kwargs))


CONTEXT_CASES: Dict[str, Tuple[Call, type, List[str]]] = {
    "tensor-none": (_context_case(lambda ctx: ctx.tensor(None)), TypeError, ["shape", "None"]),
    "tensor-float-dim": (_context_case(lambda ctx: ctx.tensor((2.5, 3))), TypeError, ["shape", "2.5"]),
    "tensor-string": (_context_case(lambda ctx: ctx.tensor("abc")), TypeError, ["shape", "'abc'"]),
    "tensor-negative": (_context_case(lambda ctx: ctx.tensor((2, -1))), ValueError, ["shape", "-1"]),
    "tensor-too-big": (_context_case(lambda ctx: ctx.tensor((1 << 20, 1 << 20), np.float32)), ValueError,
                       ["shape (1048576, 1048576)", "binding limit"]),
    "tensor-float64": (_context_case(lambda ctx: ctx.tensor((2,), np.float64)), TypeError, ["dtype", "float64"]),
    "tensor-dtype-none": (_context_case(lambda ctx: ctx.tensor((2,), None)), TypeError, ["dtype", "None"]),
    "tensor-dtype-int8": (_context_case(lambda ctx: ctx.tensor((2,), "int8")), TypeError, ["dtype", "int8"]),
    "upload-shape": (_upload(np.zeros((1, 2, 8, 16), np.float32)), ValueError, ["a must have", "(1, 2, 8, 16)"]),
    "upload-dtype": (_upload(np.zeros((1, 2, 8, D), np.float16)), TypeError, ["a must hold float32", "float16"]),
    "upload-none": (_upload(None), TypeError, ["a must be", "NoneType"]),
    "upload-list": (_upload([0.0] * 4, (4,)), TypeError, ["a must be", "list"]),
    "upload-meta": (_upload(lambda: torch.zeros(1, 2, 8, D, device="meta")), ValueError,
                    ["a is on the 'meta' device"]),
    "upload-torch-shape": (_upload(lambda: torch.zeros(2, 8, D)), ValueError, ["a must have", "(2, 8, 32)"]),
    "freed-q": (_freed("q"), ValueError, ["q was freed"]),
    "freed-v": (_freed("v"), ValueError, ["v was freed"]),
    "freed-out": (_freed("out"), ValueError, ["out was freed"]),
    "closed-context-tensor": (_context_case(_closed_tensor), ValueError, ["v belongs to a closed Context"]),
    "other-context-tensor": (_context_case(_other_context_tensor), ValueError, ["k belongs to another Context"]),
    "closed-tensor": (_closed_context("tensor"), ValueError, ["Context is closed"]),
    "closed-attention": (_closed_context("attention"), ValueError, ["Context is closed"]),
    "closed-enter": (_closed_context("enter"), ValueError, ["Context is closed"]),
    "closed-upload": (_closed_context("upload"), ValueError, ["belongs to a closed Context"]),
    "closed-download": (_closed_context("download"), ValueError, ["belongs to a closed Context"]),
    "q-numpy": (_context_case(lambda ctx: ctx.attention(_arrays()[0], *_qkv_t(ctx)[1:])), TypeError,
                ["q must be a GpuTensor", "ndarray"]),
    "out-is-q": (_context_case(lambda ctx: (lambda q, k, v: ctx.attention(q, k, v, q))(*_qkv_t(ctx))), ValueError,
                 ["out must not be q"]),
    "out-shape": (_context_case(lambda ctx: ctx.attention(*_qkv_t(ctx), ctx.tensor((1, 2, 8, 16), np.float32))),
                  ValueError, ["out must be a float32 GpuTensor of shape (1, 2, 8, 32)"]),
    "causal-str": (_attention(causal="yes"), TypeError, ["causal must be a bool"]),
    "scale-nan": (_attention(scale=float("nan")), ValueError, ["scale must be a finite"]),
    "window-bad": (_attention(window=(1,)), ValueError, ["window must be"]),
    "window-list-unhashable": (_context_case(
        lambda ctx: (lambda q, k, v: ctx.attention(q, k, v, ctx.tensor((1, 2, 8, D), np.float32),
                                                   window=[1, "x"]))(*_qkv_t(ctx))), ValueError, ["window must be"]),
}


@needs_vulkan
@pytest.mark.parametrize("call, exc, fragments", [pytest.param(*case, id=name) for name, case in CONTEXT_CASES.items()])
def test_context_errors_name_the_argument(call: Call, exc: type, fragments: List[str]) -> None:
    with pytest.raises(exc) as info:
        call()
    assert type(info.value) is exc, f"expected {exc.__name__}, got {type(info.value).__name__}: {info.value}"
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"
    _engine_intact()
