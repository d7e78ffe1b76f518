"""Sequences of NumPy calls on the Vulkan backend against an independent float64 reference.

The Vulkan backend keeps state between calls: reusable plans per pipeline bound to each problem in
turn, sequences recorded per problem (push constants), a mask buffer written per call, a memoised
kernel choice. A hypothesis test draws sequences of calls from a small pool of shapes and options
(dtype, causal, window, scale, masks of several broadcast shapes and dtypes, soft-cap, ALiBi, sinks,
array layouts) so that one shape comes back with other options, shapes interleave, and arrays are
changed in place between calls; each result must match the reference. The reference here is written
from the definition alone (it uses nothing of aule_kp, not even its Problem or band), so a shared
mistake in the library's band or conversions cannot hide.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytest
from conftest import UNIT_ROUNDOFF, exponent_range, tolerance
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aule_kp
import aule_kp.vulkan.device as devmod

_NO_VULKAN = devmod.vulkan_unavailable()
pytestmark = pytest.mark.skipif(bool(_NO_VULKAN), reason=f"no Vulkan device: {_NO_VULKAN}")


def naive(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, causal: bool = False, scale: Optional[float] = None,
          window: Optional[Tuple[int, int]] = None, mask: Optional[np.ndarray] = None, softcap: float = 0.0,
          alibi: Optional[np.ndarray] = None, sinks: Optional[np.ndarray] = None) -> Tuple[np.ndarray, float, float]:
    """``(out, value_scale, extra_range)`` in float64 from flash-attn's definition: query ``i`` sees
    key ``j`` when ``rel = j - (i + Lk - Lq)`` is ``<= 0`` (causal) and within ``window``; the score
    is ``cap(scale q.k) - slope |rel| + mask``; a row that sees no key is 0; a sink joins each row's
    denominator. ``value_scale``: the largest ``P|V|`` (the error model's value scale);
    ``extra_range``: what soft-cap and ALiBi add to the error model's exponent range."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, hq, lq, dk = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    k, v = np.repeat(k, hq // hkv, axis=1), np.repeat(v, hq // hkv, axis=1)
    s = q @ k.swapaxes(-1, -2) * (dk ** -0.5 if scale is None else scale)
    if softcap:
        s = softcap * np.tanh(s / softcap)
    rel = np.arange(lk)[None, :] - (np.arange(lq)[:, None] + lk - lq)
    seen = np.ones((lq, lk), bool)
    if causal:
        seen &= rel <= 0
    if window is not None:
        seen &= (rel >= -window[0]) if window[0] >= 0 else True
        seen &= (rel <= window[1]) if window[1] >= 0 else True
    extra = 6.0 * softcap
    if alibi is not None:
        slopes = np.asarray(alibi, np.float64).reshape(-1, hq)[:, :, None, None]
        s = s - slopes * np.abs(rel)
        extra += 2.0 * float(np.abs(slopes).max()) * float(np.where(seen, np.abs(rel), 0).max(initial=0))
    if mask is not None:
        m = np.asarray(mask)
        s = s + (np.where(m, 0.0, -np.inf) if m.dtype == bool else m.astype(np.float64))
    s = np.where(seen, s, -np.inf)
    top = s.max(axis=-1, keepdims=True)
    sink = None if sinks is None else np.broadcast_to(np.asarray(sinks, np.float64)[None, :, None, None], top.shape)
    if sink is not None:
        top = np.maximum(top, sink)
    hidden = top == -np.inf
    with np.errstate(invalid="ignore"):
        e = np.exp(s - np.where(hidden, 0.0, top))
    total = e.sum(axis=-1, keepdims=True) + (0.0 if sink is None else np.exp(sink - top))
    p = np.where(hidden, 0.0, e / np.where(hidden, 1.0, total))
    return p @ v, float((p @ np.abs(v)).max(initial=0.0)), extra


def check_close(got: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray, dtype: str, what: str,
                **options: Any) -> None:
    """``got`` against ``naive`` within the error model (conftest.tolerance: float32 sums over Lk + Dk
    terms, the score range of q, k, the mask and the modifiers, and the 16-bit roundings)."""
    want, value_scale, extra = naive(q, k, v, **options)
    scale = options.get("scale") or q.shape[-1] ** -0.5
    mask = options.get("mask")
    float_mask = None if mask is None or np.asarray(mask).dtype == bool else mask
    tol = tolerance(dtype, k.shape[2] + q.shape[-1], max(value_scale, UNIT_ROUNDOFF["float32"]),
                    exponent_range(q, k, scale, float_mask) + extra)
    assert got.shape == want.shape, what
    np.testing.assert_allclose(got.astype(np.float64), want, atol=tol, rtol=0, err_msg=what)


# ---- the pool ---------------------------------------------------------------------------------

#: (B, Hq, Hkv, Lq, Lk, Dk, Dv): a few shapes that share pipelines (Dk, Dv) and some that do not;
#: Lq 1 over 520 keys takes split-KV on a CPU driver.
SHAPES = [(1, 2, 2, 8, 8, 16, 16), (2, 4, 2, 5, 13, 16, 16), (1, 2, 1, 3, 20, 32, 16), (1, 2, 2, 1, 520, 16, 16)]
MASKS = ("none", "bool-LqLk", "bool-B1LqLk", "float-1Hq1Lk", "float-full", "float64-LqLk", "bool-rows-hidden",
         "broadcast-view")
LAYOUTS = ("c", "fortran", "reversed", "transposed", "readonly")

CALL = st.fixed_dictionaries({
    "shape": st.integers(0, len(SHAPES) - 1),
    "dtype": st.sampled_from(["float32", "float16"]),
    "causal": st.booleans(),
    "window": st.sampled_from([None, (2, 1), (-1, 0), (3, -1)]),
    "scale": st.sampled_from([None, 0.3, 1.1]),
    "mask": st.sampled_from(MASKS),
    "softcap": st.sampled_from([0.0, 0.0, 2.5]),
    "alibi": st.sampled_from([None, None, "per-head", "per-batch"]),
    "sinks": st.booleans(),
    "layout": st.sampled_from(LAYOUTS),
    "mutate": st.booleans(),  # change the last call's arrays in place and call again with them
})


def _mask(kind: str, b: int, hq: int, lq: int, lk: int, rng: np.random.Generator) -> Optional[np.ndarray]:
    if kind == "none":
        return None
    if kind == "bool-LqLk":
        m = rng.random((lq, lk)) < 0.7
        m[:, 0] = True
        return m
    if kind == "bool-B1LqLk":
        return rng.random((b, 1, lq, lk)) < 0.6
    if kind == "float-1Hq1Lk":
        return rng.standard_normal((1, hq, 1, lk)).astype(np.float32)
    if kind == "float-full":
        return rng.standard_normal((b, hq, lq, lk)).astype(np.float32)
    if kind == "float64-LqLk":
        return rng.standard_normal((lq, lk))
    if kind == "bool-rows-hidden":
        m = rng.random((b, hq, lq, lk)) < 0.5
        m[..., ::2, :] = False  # every other row sees no key: zeros
        return m
    return np.broadcast_to(rng.standard_normal((1, 1, 1, lk)).astype(np.float32), (b, hq, lq, lk))


def _layout(x: np.ndarray, layout: str) -> np.ndarray:
    """``x``'s values in another memory layout."""
    if layout == "fortran":
        return np.asfortranarray(x)
    if layout == "reversed":
        return np.ascontiguousarray(x[:, :, ::-1])[:, :, ::-1]
    if layout == "transposed":
        return np.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    if layout == "readonly":
        y = x.copy()
        y.flags.writeable = False
        return y
    return x


def _inputs(call: Dict[str, Any], rng: np.random.Generator) -> Dict[str, Any]:
    b, hq, hkv, lq, lk, dk, dv = SHAPES[call["shape"]]
    dt = np.dtype(call["dtype"])
    q, k, v = (_layout(rng.standard_normal(s).astype(dt), call["layout"])
               for s in ((b, hq, lq, dk), (b, hkv, lk, dk), (b, hkv, lk, dv)))
    alibi = {None: None, "per-head": rng.uniform(0.05, 0.5, hq).astype(np.float32),
             "per-batch": rng.uniform(0.05, 0.5, (b, hq)).astype(np.float32)}[call["alibi"]]
    return dict(q=q, k=k, v=v, mask=_mask(call["mask"], b, hq, lq, lk, rng), alibi=alibi,
                sinks=rng.standard_normal(hq).astype(np.float32) if call["sinks"] else None)


def _mutate(arrays: Dict[str, Any], rng: np.random.Generator) -> Dict[str, Any]:
    """The same arrays (same objects where writeable) with new values written in place."""
    out = dict(arrays)
    for name in ("q", "k", "v", "mask"):
        x = arrays[name]
        if x is None:
            continue
        if not x.flags.writeable:  # read-only or a broadcast view: new values in a new array
            out[name] = ~x if x.dtype == bool else -x
        elif x.dtype == bool:
            x[...] = ~x
        else:
            x[...] = rng.standard_normal(x.shape).astype(x.dtype)
    return out


def _run(call: Dict[str, Any], a: Dict[str, Any]) -> np.ndarray:
    return aule_kp.flash_attention(a["q"], a["k"], a["v"], causal=call["causal"], scale=call["scale"],
                                   window=call["window"], attn_mask=a["mask"], backend="vulkan",
                                   softcap=call["softcap"], alibi_slopes=a["alibi"], sinks=a["sinks"])


def _check(call: Dict[str, Any], a: Dict[str, Any], got: np.ndarray, what: str) -> None:
    check_close(got, a["q"], a["k"], a["v"], call["dtype"], what, causal=call["causal"], scale=call["scale"],
                window=call["window"], mask=a["mask"], softcap=call["softcap"], alibi=a["alibi"], sinks=a["sinks"])


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(calls=st.lists(CALL, min_size=2, max_size=6), seed=st.integers(0, 2**16))
def test_call_sequences_match_the_reference(calls: List[Dict[str, Any]], seed: int) -> None:
    rng = np.random.default_rng(seed)
    previous: Optional[Tuple[Dict[str, Any], Dict[str, Any]]] = None
    for n, call in enumerate(calls):
        if call["mutate"] and previous is not None:
            call, arrays = previous[0], _mutate(previous[1], rng)
        else:
            arrays = _inputs(call, rng)
        _check(call, arrays, _run(call, arrays), f"call {n}: {call}")
        previous = (call, arrays)


# ---- targeted: each of these failed before its fix -------------------------------------------

def _qkv(shape: Tuple[int, ...] = (1, 2, 8, 16), seed: int = 0) -> Tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(shape).astype(np.float32) for _ in range(3))


def test_a_failed_record_leaves_no_stale_sequence(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reusable plan bound to a new problem whose recording fails (out of memory, a
    KeyboardInterrupt) kept the last problem's sequence while it said it was bound to the new one:
    the next call of that problem ran the old push constants (here: non-causal for a causal call)."""
    from aule_kp.vulkan import plan as planmod

    q, k, v = _qkv()
    check_close(aule_kp.flash_attention(q, k, v, backend="vulkan"), q, k, v, "float32", "first call")
    record = planmod.Plan.record

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise MemoryError("recording failed")

    monkeypatch.setattr(planmod.Plan, "record", fail)
    with pytest.raises(MemoryError):
        aule_kp.flash_attention(q, k, v, backend="vulkan", causal=True, scale=0.29)
    monkeypatch.setattr(planmod.Plan, "record", record)
    got = aule_kp.flash_attention(q, k, v, backend="vulkan", causal=True, scale=0.29)
    check_close(got, q, k, v, "float32", "the call after the failure", causal=True, scale=0.29)
    check_close(aule_kp.flash_attention(q, k, v, backend="vulkan"), q, k, v, "float32", "the first problem again")


@pytest.mark.parametrize("backend", ["vulkan", "cpu"])
@pytest.mark.parametrize("name, value", [("scale", 1e39), ("scale", -3e38), ("softcap", 1e39), ("softcap", 1e300)])
def test_scale_and_softcap_beyond_float32_name_the_argument(backend: str, name: str, value: float) -> None:
    """Finite float64 values whose float32 (times log2 e) overflows: the Vulkan backend raised
    OverflowError from struct.pack, the CPU backend returned NaN where the float64 reference is finite."""
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=name):
        aule_kp.flash_attention(q, k, v, backend=backend, **{name: value})
    if name == "scale":
        with aule_kp.Context() as ctx:
            qt, kt, vt = (ctx.tensor(x.shape, np.float32).upload(x) for x in (q, k, v))
            with pytest.raises(ValueError, match="scale"):
                ctx.attention(qt, kt, vt, scale=value)


def test_scale_and_softcap_up_to_the_bound_are_exact() -> None:
    """The largest accepted values still compute (reference: float64 from the definition)."""
    q, k, v = _qkv()
    for backend in ("vulkan", "cpu"):
        check_close(aule_kp.flash_attention(q, k, v, backend=backend, softcap=1e38), q, k, v, "float32",
                    f"{backend} softcap 1e38", softcap=1e38)
        check_close(aule_kp.flash_attention(q, k, v, backend=backend, scale=1e-30), q, k, v, "float32",
                    f"{backend} scale 1e-30", scale=1e-30)


def _huge_mask_cases() -> List[Tuple[str, np.ndarray]]:
    """Masks whose entries lie beyond float32 / log2(e) or beyond float32: one key of every row
    lifted far above the rest, and rows 1 and 4 masked entirely with float64's (or float32's) minimum."""
    cases = []
    for dtype, value in ((np.float32, 3e38), (np.float64, 1e39), (np.float64, np.finfo(np.float64).max)):
        m = np.zeros((8, 8), dtype)
        m[:, 3] = value
        cases.append((f"{np.dtype(dtype).name} {value:g} on key 3", m))
    for dtype in (np.float32, np.float64):
        m = np.zeros((8, 8), dtype)
        m[[1, 4]] = np.finfo(dtype).min
        m[:, 6] = np.finfo(dtype).min
        cases.append((f"rows masked with {np.dtype(dtype).name}'s minimum", m))
    return cases


@pytest.mark.parametrize("backend", ["vulkan", "cpu"])
def test_masks_beyond_float32_saturate(backend: str) -> None:
    """A float mask value above float32's largest / log2(e) (Vulkan's exp2 domain overflowed to +inf:
    a NaN row), or a float64 one beyond float32 (cast to +-inf: a NaN row, or a row masked with
    float64's minimum hidden, all zeros, where float64 and torch give the uniform average; with a
    RuntimeWarning from the cast), gives the float64 result (key 3 takes the whole weight; fully
    masked rows average every v row)."""
    import warnings

    import torch

    q, k, v = _qkv()
    for what, m in _huge_mask_cases():
        for mask in (m, torch.from_numpy(m)):
            args = (torch.from_numpy(x) for x in (q, k, v)) if isinstance(mask, torch.Tensor) else (q, k, v)
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)
                got = aule_kp.flash_attention(*args, attn_mask=mask, backend=backend)
            check_close(np.asarray(got), q, k, v, "float32", f"{backend} {what} ({type(mask).__name__})", mask=m)


@pytest.mark.parametrize("bad, exc", [(dict(causal=1), TypeError), (dict(scale=True), ValueError),
                                      (dict(window=(2.0, 1)), ValueError), (dict(window=(True, 1)), ValueError)])
def test_context_repeated_call_still_validates(bad: Dict[str, Any], exc: type) -> None:
    """Context.attention memoises a call with ``out`` by its arguments; the memo compared them by
    value, and 1 == True, (2.0, 1) == (2, 1): after a valid call, arguments that validation refuses
    ran the memoised plan without an error."""
    q, k, v = _qkv()
    good = dict(causal=True, scale=1.0, window=(2, 1))
    with aule_kp.Context() as ctx:
        qt, kt, vt, out = (ctx.tensor(x.shape, np.float32).upload(x) for x in (q, k, v, q))
        for _ in range(2):  # the second call takes the memo
            ctx.attention(qt, kt, vt, out, **good)
            check_close(out.download(), q, k, v, "float32", "a valid call", **good)
        with pytest.raises(exc):
            ctx.attention(qt, kt, vt, out, **dict(good, **bad))
