"""The zero-copy API's lifetime (a closed Context stays closed) and its kernel choice: the same
decision as the host-array path (``aule_kp.vulkan.choice.choose_forward``), so a problem past a
device limit (storage binding range, grid y, a CPU driver's loop limit) is refused with the limit
named, never dispatched. Limits are lowered for the test: ``AULE_KP_MAX_BINDING_BYTES``, a faked
grid-y limit in the device's capabilities, and a lower CPU loop limit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Tuple

import numpy as np
import pytest
from conftest import output_tolerance
from reference import reference_attention

import aule_kp
import aule_kp.vulkan.device as devmod
from aule_kp import dispatch
from aule_kp.problem import Problem, band
from aule_kp.vulkan import choice

_NO_VULKAN = devmod.vulkan_unavailable()
pytestmark = pytest.mark.skipif(bool(_NO_VULKAN), reason=f"no Vulkan device: {_NO_VULKAN}")
D = 32


def _arrays(b: int = 1, hq: int = 2, hkv: int = 2, lq: int = 8, lk: int = 8,
            seed: int = 0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(s).astype(np.float32) for s in ((b, hq, lq, D), (b, hkv, lk, D), (b, hkv, lk, D)))


def _expected(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool = False) -> Tuple[np.ndarray, float]:
    """The float64 reference output and its tolerance (the error model, conftest.output_tolerance)."""
    b, hq, lq, _ = q.shape
    diag, left, right = band(lq, k.shape[2], causal=causal, window=None, top_left=False)
    p = Problem(b, hq, k.shape[1], lq, k.shape[2], D, D, "float32", D**-0.5, diag, left, right)
    q, k, v = (np.ascontiguousarray(x) for x in (q, k, v))
    return reference_attention(q, k, v, p)[0], output_tolerance(p, q, k, v)


def _assert_expected(got: Any, expected: Tuple[np.ndarray, float]) -> None:
    """``got`` against the float64 reference within the error model's tolerance."""
    want, tol = expected
    np.testing.assert_allclose(np.asarray(got), want, atol=tol, rtol=0)


@pytest.fixture
def ctx() -> Iterator[aule_kp.Context]:
    with aule_kp.Context() as c:
        yield c


@pytest.fixture
def fresh_choices() -> Iterator[None]:
    """The Vulkan backend memoises its choices per problem: forget them around a test that changes
    what the device reports."""
    vk = dispatch.get("vulkan")
    vk._choices.clear()
    yield
    vk._choices.clear()


def _upload(ctx: aule_kp.Context, *arrays: np.ndarray) -> Tuple[aule_kp.GpuTensor, ...]:
    return tuple(ctx.tensor(a.shape, np.float32).upload(a) for a in arrays)


# ----------------------------------------------------------------------------------------------
# lifetime


def test_close_is_idempotent_and_final(ctx: aule_kp.Context) -> None:
    q, k, v = _arrays()
    qt, kt, vt = _upload(ctx, q, k, v)
    out = ctx.tensor((1, 2, 8, D), np.float32)
    ctx.attention(qt, kt, vt, out)  # the repeated-call fast path is primed
    ctx.close()
    ctx.close()
    assert ctx.closed
    for call in (lambda: ctx.attention(qt, kt, vt, out), lambda: ctx.attention(qt, kt, vt),
                 lambda: ctx.tensor((2,), np.float32), lambda: out.download(), lambda: qt.upload(q)):
        with pytest.raises(ValueError, match="closed"):
            call()
    with pytest.raises(ValueError, match="closed"), ctx:
        pass
    assert "freed" in repr(qt)


def test_exit_closes(ctx: aule_kp.Context) -> None:
    with aule_kp.Context() as other:
        t = other.tensor((4,), np.float32)
    assert other.closed
    with pytest.raises(ValueError, match="closed Context"):
        t.download()
    # the device and other contexts are unaffected
    q, k, v = _arrays(seed=1)
    _assert_expected(ctx.attention(*_upload(ctx, q, k, v)).download(), _expected(q, k, v))


def test_gpu_tensor_records_no_autograd(ctx: aule_kp.Context) -> None:
    """What the docs say: Context/GpuTensor are data only, forward only."""
    assert "forward only" in (aule_kp.Context.attention.__doc__ or "")
    assert "no autograd" in (aule_kp.GpuTensor.__doc__ or "")
    assert not hasattr(ctx.tensor((2,), np.float32), "grad")


# ----------------------------------------------------------------------------------------------
# one decision for both paths


def test_same_choice_as_the_host_path(ctx: aule_kp.Context, fresh_choices: None) -> None:
    """Problems that fit one dispatch get the host path's pipelines on the GpuTensor path."""
    caps = devmod.get_device().caps
    for lq, lk, causal in ((8, 8, False), (1, 700, False), (40, 24, True)):
        q, k, v = _arrays(hq=4, hkv=2, lq=lq, lk=lk)
        diag, left, right = band(lq, lk, causal=causal, window=None, top_left=False)
        p = Problem(1, 4, 2, lq, lk, D, D, "float32", D**-0.5, diag, left, right)
        assert choice.choose_forward(caps, p, whole=True) == choice.choose_forward(caps, p)
        assert dispatch.get("vulkan").config(p) == choice.choose_forward(caps, p, whole=True)[0]
        got = ctx.attention(*_upload(ctx, q, k, v), causal=causal).download()
        _assert_expected(got, _expected(q, k, v, causal))


def test_binding_limit_splits_host_calls_and_refuses_gpu_tensors(ctx: aule_kp.Context, fresh_choices: None,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Four (batch, kv-head) groups and a binding that holds two: the host path runs in chunks,
    the GpuTensor path (tensors bound whole) refuses naming the limit, and runs once it is lifted."""
    q, k, v = _arrays(b=2, hq=4, hkv=2, lq=8, lk=8)
    tensors = _upload(ctx, q, k, v)
    out = ctx.tensor(q.shape, np.float32)
    limit = 2 * 2 * 8 * D * 4  # two groups of q (two query heads each, float32)
    monkeypatch.setenv("AULE_KP_MAX_BINDING_BYTES", str(limit))
    _assert_expected(aule_kp.flash_attention(q, k, v, backend="vulkan"), _expected(q, k, v))
    for o in (out, None):
        with pytest.raises(aule_kp.BackendUnavailable, match=f"over the {limit} B storage binding limit"):
            ctx.attention(*tensors, o)
    monkeypatch.delenv("AULE_KP_MAX_BINDING_BYTES")
    _assert_expected(ctx.attention(*tensors, out).download(), _expected(q, k, v))


def test_grid_y_limit_is_respected(ctx: aule_kp.Context, fresh_choices: None,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A device that takes 1 workgroup in grid y: more than one query tile is refused on both paths."""
    dev = devmod.get_device()
    q, k, v = _arrays(lq=200, lk=32)
    tensors = _upload(ctx, q, k, v)
    monkeypatch.setattr(dev, "caps", dataclasses.replace(dev.caps, max_workgroup_count=(65535, 1, 65535)))
    with pytest.raises(aule_kp.BackendUnavailable, match="workgroups in grid y"):
        ctx.attention(*tensors)
    with pytest.raises(aule_kp.BackendUnavailable, match="workgroups in grid y"):
        aule_kp.flash_attention(q, k, v, backend="vulkan")
    monkeypatch.undo()
    dispatch.get("vulkan")._choices.clear()
    _assert_expected(ctx.attention(*tensors).download(), _expected(q, k, v))


@pytest.mark.parametrize("lq", [8, 1], ids=["forward", "split-kv"])
def test_cpu_loop_limit_is_respected(ctx: aule_kp.Context, fresh_choices: None, monkeypatch: pytest.MonkeyPatch,
                                     lq: int) -> None:
    """lavapipe stops an invocation's loops after 65535 iterations: a problem that needs more is
    refused on both paths (lowered to 1 here), the forward kernel's and split-KV's alike."""
    assert devmod.get_device().caps.type == "cpu", "expected lavapipe (a CPU Vulkan driver)"
    q, k, v = _arrays(lq=lq, lk=600)
    tensors = _upload(ctx, q, k, v)
    monkeypatch.setattr(choice, "CPU_LOOP_LIMIT", 1)
    for call in (lambda: ctx.attention(*tensors), lambda: aule_kp.flash_attention(q, k, v, backend="vulkan")):
        with pytest.raises(aule_kp.BackendUnavailable, match="loop iterations per invocation.*stop loops at 1"):
            call()
    monkeypatch.undo()
    dispatch.get("vulkan")._choices.clear()
    _assert_expected(ctx.attention(*tensors).download(), _expected(q, k, v))


def test_too_many_heads_for_one_grid(ctx: aule_kp.Context, fresh_choices: None) -> None:
    """More query heads x batch than a grid dimension is guaranteed to take: refused up front, not
    by the plan after an output was allocated."""
    caps = devmod.get_device().caps
    p = Problem(2, 40000, 40000, 1, 1, 8, 8, "float16", 1.0)
    cfg, reasons = choice.choose_forward(caps, p, whole=True)
    assert cfg is None and any("80000 query heads x batch" in r for r in reasons), reasons
    assert choice.choose_forward(caps, p)[0] is not None  # the host path splits it into chunks


def test_repeated_call_chooses_again_after_the_tuning_cache_changes(ctx: aule_kp.Context, monkeypatch) -> None:
    """A memoised ``out=`` call must not keep a plan chosen before a tuning file or verdict changed."""
    from aule_kp.vulkan import tensor as tensormod
    from aule_kp.vulkan import tuning_cache

    q, k, v = _arrays(hq=2, hkv=1, lq=8, lk=8)
    tq, tk, tv = _upload(ctx, q, k, v)
    out = ctx.tensor(tq.shape, np.float32)
    calls = []
    real = tensormod.choose_forward
    monkeypatch.setattr(tensormod, "choose_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for _ in range(2):
        ctx.attention(tq, tk, tv, out)
    assert len(calls) == 1  # the second call is the memo's
    tuning_cache.changed()
    got = ctx.attention(tq, tk, tv, out).download()
    assert len(calls) == 2
    _assert_expected(got, _expected(q, k, v, False))
