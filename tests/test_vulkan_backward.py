"""The Vulkan FA2 backward (glsl/fa2_bwd_*.comp) on lavapipe against the float64 reference.

Inputs are standard normal in the engine's storage dtype; ``out`` and ``lse`` come from the float64
reference forward rounded to what the forward returns (storage dtype / float32), so each test
checks the backward alone, except ``test_after_engine_forward``. Every new head dim, dtype or mask
flag is a new pipeline specialisation (seconds on lavapipe), so the grid crosses features over a
few of them: D=32 float32 carries most features.

Tolerance, per gradient: max abs error from the suite's error model (``conftest.gradient_tolerances``:
float32 compute, dtype epsilon, the lengths of the sums, and the sum of absolute terms behind each
gradient; a gradient that is 0 in exact arithmetic, such as the dq of a row that sees one key, is
held to the rounding of the terms that cancel). For 16-bit types it allows dq/dk/dv rounded once to
storage and D = rowsum(dO * O) built from the stored (rounded) O, as in FlashAttention.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import numpy as np
import pytest
from conftest import gradient_tolerances, problem
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import reference_attention, reference_backward

from aule_kp.dtypes import STORAGE, from_f32, to_f32
from aule_kp.problem import Problem
from aule_kp.vulkan import device as devmod
from aule_kp.vulkan import plan as planmod
from aule_kp.vulkan.backend import VulkanBackend
from aule_kp.vulkan.backward import backward_group_bytes, reduce_to_mask
from aule_kp.vulkan.choice import backward_config, backward_config_reasons
from aule_kp.vulkan.configs import DTYPE_CODE, BackwardConfig, KernelConfig

pytestmark = pytest.mark.skipif(devmod.vulkan_unavailable() is not None, reason="no Vulkan device")



def inputs(p: Problem, seed: int = 0, mask: Optional[np.ndarray] = None):
    """q, k, v, dout in storage dtype, and the forward's out (storage) and lse (float32)."""
    rng = np.random.default_rng(seed)
    shapes = [(p.batch, p.heads_q, p.len_q, p.dim_k), (p.batch, p.heads_kv, p.len_k, p.dim_k),
              (p.batch, p.heads_kv, p.len_k, p.dim_v), (p.batch, p.heads_q, p.len_q, p.dim_v)]
    q, k, v, dout = (from_f32(rng.standard_normal(s).astype(np.float32), p.dtype) for s in shapes)
    out, lse = reference_attention(q, k, v, p, mask)
    return q, k, v, dout, from_f32(out.astype(np.float32), p.dtype), lse.astype(np.float32)


def check(p: Problem, mask: Optional[np.ndarray] = None, mask_grad: bool = False,
          config: Optional[BackwardConfig] = None, seed: int = 0, forward: bool = False):
    """Backward vs the reference; returns the gradients. ``forward``: out/lse from the engine."""
    q, k, v, dout, out, lse = inputs(p, seed, mask)
    if forward:
        out, lse = VulkanBackend().forward(p, q, k, v, mask)
    grads = VulkanBackend().backward(p, q, k, v, out, dout, lse, mask, mask_grad, config=config)
    ref = reference_backward(q, k, v, dout, p, mask)
    tols = gradient_tolerances(p, q, k, v, dout, mask)
    for name, got, want, x, tol in zip(("dq", "dk", "dv"), grads[:3], ref[:3], (q, k, v), tols):
        assert got.dtype == STORAGE[p.dtype] and got.shape == x.shape, name
        got = to_f32(got, p.dtype)
        assert np.isfinite(got).all(), name
        err = np.abs(got - want).max(initial=0.0)
        assert err <= tol, f"{name}: {err} vs {tol}"
    if mask_grad and mask is not None:
        want = reduce_to_mask(ref[3], p.mask_shape)
        assert grads[3].dtype == np.float32 and grads[3].shape == p.mask_shape
        # dS is in natural units; a sum over keys of a row's dS is 0 up to float32 rounding.
        np.testing.assert_allclose(grads[3], want, rtol=0, atol=tols[3])
    else:
        assert grads[3] is None
    return grads


def float_mask(shape, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def bool_mask(shape, seed=1) -> np.ndarray:
    keep = np.random.default_rng(seed).random(shape) > 0.3
    return np.where(keep, 0.0, -np.inf).astype(np.float32)


# ---- features, over D=32 float32 unless the test is about something else -------------------------

@pytest.mark.parametrize("dk,dv", [(32, 32), (64, 64), (64, 32), (128, 128)])
def test_head_dims(dk, dv):
    check(problem(dk=dk, dv=dv, lq=21, lk=35, causal=dk == dv))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("causal,top_left", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("lq,lk", [(24, 40), (40, 24), (1, 37)])
def test_causal_alignment_dtypes(dtype, causal, top_left, lq, lk):
    check(problem(lq=lq, lk=lk, dtype=dtype, causal=causal, top_left=top_left))


@pytest.mark.parametrize("window", [(4, 0), (0, 3), (8, 8), (-1, 2), (5, -1)])
@pytest.mark.parametrize("causal", [False, True])
def test_windows(window, causal):
    check(problem(lq=30, lk=45, window=window, causal=causal))


@pytest.mark.parametrize("b,hq,hkv", [(2, 4, 4), (2, 6, 2), (1, 4, 1), (3, 2, 1)])
def test_gqa_mqa_batches(b, hq, hkv):
    check(problem(b=b, hq=hq, hkv=hkv, lq=20, lk=28, causal=True))


@pytest.mark.parametrize("mask_shape", [(2, 4, 24, 40), (1, 1, 24, 40), (2, 1, 1, 40), (1, 4, 24, 1)])
@pytest.mark.parametrize("kind", ["float", "bool"])
@pytest.mark.parametrize("mask_grad", [False, True])
def test_masks(mask_shape, kind, mask_grad):
    mask = (float_mask if kind == "float" else bool_mask)(mask_shape)
    check(problem(b=2, hq=4, hkv=2, mask_shape=mask_shape), mask, mask_grad)


def test_mask_grad_without_mask_is_none():
    assert check(problem(), None, mask_grad=True)[3] is None


def test_hidden_rows_contribute_nothing():
    # Rows 0..15 see no key (Lq > Lk, causal bottom-right): lse = -inf, dq = 0, no NaN anywhere.
    dq = check(problem(lq=40, lk=24, causal=True))[0]
    assert np.all(dq[:, :, :16] == 0)
    # A row hidden by the mask, with its dS (mask gradient) 0 too.
    shape = (1, 2, 24, 40)
    mask = np.zeros(shape, np.float32)
    mask[:, :, 3] = -np.inf
    dq, _, _, dmask = check(problem(mask_shape=shape, window=(2, 0)), mask, mask_grad=True)
    assert np.all(dq[:, :, 3] == 0) and np.all(dmask[:, :, 3] == 0)


def test_saturated_mask_rows():
    # Hugging Face masks padding with float32's minimum: every score of such a row saturates at
    # -FLT_MAX, the forward averages it uniformly, and the lse cannot carry log2(l) any more; the
    # backward recomputes the row's statistics (fa2_bwd_pre) and gets the same uniform P.
    shape = (1, 2, 24, 40)
    mask = float_mask(shape)
    mask[:, :, 5] = np.finfo(np.float32).min
    mask[:, 1, 7, ::2] = np.finfo(np.float32).min
    mask[:, 1, 7, 1::2] = -np.inf
    p = problem(mask_shape=shape)
    check(p, mask, mask_grad=True)
    check(p, mask, mask_grad=True, forward=True)


def test_after_engine_forward():
    # out and lse from the Vulkan forward (what autograd saves), bf16 through both passes.
    check(problem(b=2, hq=4, hkv=2, lq=33, lk=47, causal=True), forward=True)
    check(problem(lq=19, lk=30, dtype="bfloat16", window=(6, 2)), forward=True)


def test_wrong_inputs_raise():
    p = problem()
    q, k, v, dout, out, lse = inputs(p)
    with pytest.raises(TypeError, match="do"):
        VulkanBackend().backward(p, q, k, v, out, dout.astype(np.float64), lse, None)
    with pytest.raises(ValueError, match="lse"):
        VulkanBackend().backward(p, q, k, v, out, dout, lse[:, :1], None)


def test_empty_problems():
    for p in (problem(lk=0), problem(lq=0)):
        q, k, v, dout, out, lse = inputs(p)
        dq, dk, dv, dmask = VulkanBackend().backward(p, q, k, v, out, dout, lse, None)
        assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape) and dmask is None
        assert not dq.any() and not dk.any() and not dv.any()


# ---- specialisations the device's own choice would not exercise ----------------------------------
# GPU-style staged tiles (shared memory + barriers, one row per lane group); several row groups per
# subgroup with RPT not a multiple of TPR (mask loads and dS stores split unevenly over lanes);
# TPR = 1 (no cross-lane sums; statistics loaded in three rounds).
FORCED = [
    dict(tpr=4, rpt=1, br=32, bc=8, stage=1, wg=128),
    dict(tpr=2, rpt=5, br=20, bc=3, stage=0, wg=8),
    dict(tpr=1, rpt=3, br=48, bc=1, stage=0, wg=16),
]


def forced(p: Problem, tiles: dict, mask_grad: bool = False) -> BackwardConfig:
    cfg = backward_config(devmod.get_device().caps, p, mask_grad)
    assert cfg.dkdv.dtype == DTYPE_CODE[p.dtype]
    return replace(cfg, dkdv=replace(cfg.dkdv, **tiles), dq=replace(cfg.dq, **tiles))


@pytest.mark.parametrize("tiles", FORCED, ids=lambda t: f"tpr{t['tpr']}-rpt{t['rpt']}-stage{t['stage']}")
@pytest.mark.parametrize("case", ["causal-gqa", "window-mask-grad", "bf16-lq1"])
def test_forced_tiles(tiles, case):
    if case == "causal-gqa":
        p = problem(b=2, hq=6, hkv=2, lq=37, lk=50, causal=True)
        check(p, config=forced(p, tiles))
    elif case == "window-mask-grad":
        shape = (1, 2, 33, 45)
        p = problem(lq=33, lk=45, window=(6, 6), mask_shape=shape)
        check(p, bool_mask(shape) + float_mask(shape), True, config=forced(p, tiles, True))
    else:
        p = problem(lq=1, lk=77, dtype="bfloat16")
        check(p, config=forced(p, tiles))


# ---- plans ------------------------------------------------------------------------------------------

def test_chunked_bindings(monkeypatch):
    shape = (3, 1, 20, 30)
    p = problem(b=3, hq=4, hkv=2, lq=20, lk=30, causal=True, mask_shape=shape)
    per_group = max(backward_group_bytes(p, True).values())
    monkeypatch.setenv("AULE_KP_MAX_BINDING_BYTES", str(2 * per_group))  # 6 groups -> 3 dispatches each
    be = VulkanBackend()
    cfg = backward_config(devmod.get_device().caps, p, True)
    assert [(c.g0, c.g1) for c in be.backward_plan(p, cfg).chunks] == [(0, 2), (2, 4), (4, 6)]
    check(p, float_mask(shape), mask_grad=True)


@pytest.mark.parametrize("heads_per_section", [1, 4])
def test_scheduling_sections(monkeypatch, heads_per_section):
    # dQ takes its (query tile, head) from the same section order as the forward (fa2_common.glsl).
    from aule_kp.vulkan import plan as planmod

    plans = devmod.get_device().plans
    plans.clear()  # cached plans keep the grid they were recorded with
    monkeypatch.setattr(planmod, "section_heads", lambda p: heads_per_section)
    try:
        check(problem(b=1, hq=6, hkv=3, lq=90, lk=50, causal=True))
    finally:
        plans.clear()


def test_plan_reuse():
    p = problem(lq=12, lk=20, causal=True)
    q, k, v, dout, out, lse = inputs(p)
    be = VulkanBackend()
    first = be.backward(p, q, k, v, out, dout, lse, None)
    made = dict(planmod.stats)
    again = be.backward(p, q, k, v, out, dout, lse, None)
    for a, b in zip(first[:3], again[:3]):
        np.testing.assert_array_equal(a, b)
    assert planmod.stats["algorithms"] == made["algorithms"] and planmod.stats["plans"] == made["plans"]
    assert planmod.stats["evals"] == made["evals"] + 1
    # Forward and backward plans of one Problem live side by side in the device's cache.
    be.forward(p, q, k, v, None)
    cached = list(devmod.get_device().plans._plans.values())
    backward = be.backward_plan(p, backward_config(devmod.get_device().caps, p, False))
    assert backward in cached and be.plan(p) in cached and backward is not be.plan(p)


def test_cpu_loop_limit_is_a_reason():
    caps = devmod.get_device().caps
    if caps.type != "cpu":
        pytest.skip("the loop limit is lavapipe's")
    p = problem(hq=4, hkv=1, lq=50_000, lk=40)
    assert any("65535" in r for r in backward_config_reasons(backward_config(caps, p), caps, p))
    assert any("65535" in r for r in VulkanBackend().backward_reasons(p))
    with pytest.raises(ValueError, match="65535"):
        VulkanBackend().backward(p, *(np.zeros(1, np.float32),) * 6, None)


def test_binding_limit_is_a_reason(monkeypatch):
    shape = (1, 1, 20, 100)  # dS of a group (16000 B) is larger than any other of its buffers
    p = problem(lq=20, lk=100, mask_shape=shape)
    monkeypatch.setenv("AULE_KP_MAX_BINDING_BYTES", str(max(backward_group_bytes(p, False).values())))
    assert VulkanBackend().backward_reasons(p) == []
    assert any("dS" in r for r in VulkanBackend().backward_reasons(p, mask_grad=True))


def test_device_choice_is_cpu_tiles():
    caps = devmod.get_device().caps
    if caps.type != "cpu":
        pytest.skip("CPU-driver tiles are chosen only on CPU Vulkan devices (lavapipe)")
    cfg = backward_config(caps, problem(dk=64, dv=64))
    for k in (cfg.dkdv, cfg.dq):
        assert isinstance(k, KernelConfig) and k.stage == 0 and k.tpr == min(8, caps.subgroup_size)
        assert k.rpt * (k.dk + k.dv) * 2 // k.tpr <= 400  # registers per lane (see choice.py)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    b=st.integers(1, 2), hkv=st.integers(1, 2), group=st.sampled_from([1, 2, 3]),
    lq=st.integers(1, 40), lk=st.integers(1, 40), causal=st.booleans(), top_left=st.booleans(),
    window=st.one_of(st.none(), st.tuples(st.integers(-1, 20), st.integers(-1, 20))),
    masked=st.booleans(), scale=st.floats(0.05, 1.0),
)
def test_random_problems(b, hkv, group, lq, lk, causal, top_left, window, masked, scale):
    shape = (b, 1, lq, lk) if masked else None
    mask = float_mask(shape, seed=lq * 100 + lk) * 2 if masked else None
    check(problem(b, hkv * group, hkv, lq, lk, 32, 32, "float32", causal, window, top_left, shape, scale),
          mask, mask_grad=masked, seed=lq * 1000 + lk)


# ---- the coopmat variant: on a device that has KHR cooperative matrices (the lent GPU) -------------

coopmat = pytest.mark.skipif(
    devmod.vulkan_unavailable() is not None or not devmod.get_device().caps.coopmat,
    reason="needs a Vulkan device with VK_KHR_cooperative_matrix",
)


def coopmat_config(p: Problem, mask_grad: bool = False) -> BackwardConfig:
    caps = devmod.get_device().caps
    cfg = backward_config(caps, p, mask_grad, variant="coopmat")
    assert not backward_config_reasons(cfg, caps, p)
    return cfg


@coopmat
@pytest.mark.parametrize("dk,dv", [(64, 64), (128, 128), (128, 64), (32, 96)])
@pytest.mark.parametrize("causal,top_left", [(False, False), (True, False), (True, True)])
def test_coopmat_head_dims(dk, dv, causal, top_left):
    p = problem(b=2, hq=4, hkv=2, lq=200, lk=333, dk=dk, dv=dv, dtype="float16", causal=causal, top_left=top_left)
    check(p, config=coopmat_config(p))


@coopmat
@pytest.mark.parametrize("lq,lk", [(1, 500), (7, 90), (300, 100), (257, 257)])
@pytest.mark.parametrize("window", [None, (64, 0), (32, 32)])
def test_coopmat_shapes_windows(lq, lk, window):
    p = problem(b=2, hq=8, hkv=2, lq=lq, lk=lk, dk=64, dv=64, dtype="float16", window=window)
    check(p, config=coopmat_config(p))


@coopmat
@pytest.mark.parametrize("kind", ["float", "bool"])
def test_coopmat_masks(kind):
    shape = (2, 1, 150, 210)
    mask = (float_mask if kind == "float" else bool_mask)(shape)
    mask[:, :, 5] = -np.inf  # a fully hidden row
    mask[:, :, 9] = np.finfo(np.float32).min  # a saturated one
    p = problem(b=2, hq=4, hkv=4, lq=150, lk=210, dk=64, dv=64, dtype="float16", mask_shape=shape)
    dq = check(p, mask, mask_grad=True, config=coopmat_config(p, True), forward=True)[0]
    assert np.all(dq[:, :, 5] == 0)
