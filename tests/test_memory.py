"""Bounded memory (issue 15, part 4): plans serve a range of problems of one pipeline, so a decode
loop builds a handful of plans, not one per token; the plan cache holds its byte budget.

Results are checked at every step against the float64 reference (tests/reference.py): forward with
the suite's error model (conftest.check and conftest.gradient_tolerances)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import check, gradient_tolerances, problem, problem_inputs
from reference import reference_attention, reference_backward

from aule_kp.vulkan import backward as backmod
from aule_kp.vulkan import device as devmod
from aule_kp.vulkan import plan as planmod
from aule_kp.vulkan.backend import VulkanBackend
from aule_kp.vulkan.choice import backward_config

pytestmark = pytest.mark.skipif(devmod.vulkan_unavailable() is not None, reason="no Vulkan device")


@pytest.fixture(params=["settable", "keyed"])
def grids(request, monkeypatch):
    """Both ways plans serve several problems: one algorithm dispatched with each problem's grid
    (the patched kp's Algorithm.set_workgroup), or the grid in the plan's key (kp without it)."""
    dev = devmod.get_device()
    if request.param == "settable" and not planmod.grids_settable(dev.kp):
        pytest.skip("this kp has no Algorithm.set_workgroup (patch 3)")
    if request.param == "keyed":
        for module in (planmod, backmod):
            monkeypatch.setattr(module, "grids_settable", lambda kp: False)
    dev.plans.clear()  # plans and routes made the other way
    yield request.param
    dev.plans.clear()


def test_decode_loop_builds_a_handful_of_plans(grids, rng):
    # Lq 1 fp16 D64, keys growing by one per step across the split-KV threshold of CPU drivers (512).
    made = dict(planmod.stats)
    for lk in range(440, 600):
        check(problem(b=1, hq=8, hkv=2, lq=1, lk=lk, dk=64, dv=64, dtype="float16"), rng)
    built = {key: planmod.stats[key] - made[key] for key in made}
    assert built["plans"] <= 4 and built["algorithms"] <= 4, built
    assert built["evals"] == 160


def test_one_plan_serves_many_lengths(grids, rng):
    shapes = [dict(lq=1, lk=40), dict(lq=3, lk=17, causal=True), dict(lq=1, lk=90), dict(lq=2, lk=5, window=(2, 0))]
    problems = [problem(b=2, hq=4, hkv=2, dk=32, dv=32, **s) for s in shapes]
    be = VulkanBackend()
    for p in problems:  # the forward kernel (no split-KV below 512 keys on CPU drivers; Lq 1-3 one query tile)
        check(p, rng)
    plans = {id(be.plan(p)) for p in problems}
    assert len(plans) == 1 or (grids == "keyed" and len(plans) <= len(problems))
    made = dict(planmod.stats)
    for _ in range(3):  # alternating problems: recorded sequences are kept, nothing is rebuilt
        for p in problems:
            check(p, rng)
    assert planmod.stats["plans"] == made["plans"] and planmod.stats["algorithms"] == made["algorithms"]
    assert planmod.stats["records"] - made["records"] <= len(problems)


def test_outgrown_plan_is_replaced_once(grids, rng):
    small = problem(b=1, hq=2, hkv=2, lq=20, lk=8, dk=64, dv=64)  # Lq > 16: never split-KV
    big = problem(b=1, hq=2, hkv=2, lq=20, lk=planmod.MIN_CAPACITY_BYTES // (64 * 4) + 1, dk=64, dv=64)
    check(small, rng)
    plans = devmod.get_device().plans
    before, cached = planmod.stats["plans"], len(plans)
    check(big, rng)  # K no longer fits: a larger plan replaces the small one
    assert planmod.stats["plans"] == before + 1 and len(plans) == cached
    check(small, rng)  # ... and serves the small problem too
    assert planmod.stats["plans"] == before + 1


def test_backward_plans_serve_many_lengths(grids):
    be = VulkanBackend()
    caps = devmod.get_device().caps
    made = dict(planmod.stats)
    for lq, lk in [(5, 9), (12, 30), (3, 3), (12, 31)]:
        p = problem(lq=lq, lk=lk, causal=True)
        rng = np.random.default_rng(lq * 100 + lk)
        q, k, v = problem_inputs(p, rng)
        dout = rng.standard_normal((p.batch, p.heads_q, p.len_q, p.dim_v)).astype(np.float32)
        out, lse = reference_attention(q, k, v, p)
        grads = be.backward(p, q, k, v, out.astype(np.float32), dout, lse.astype(np.float32), None)
        for got, want, tol in zip(grads[:3], reference_backward(q, k, v, dout, p)[:3],
                                  gradient_tolerances(p, q, k, v, dout)):
            assert np.abs(got - want).max() <= tol
        assert be.backward_plan(p, backward_config(caps, p, False)).problem == p
    assert planmod.stats["plans"] - made["plans"] <= (1 if grids == "settable" else 4)


def test_cache_holds_its_budget(rng, monkeypatch):
    # Head dims 16-128 need a pipeline each; a budget of three plans keeps at most three.
    dev = devmod.get_device()
    dev.plans.clear()
    p0 = problem(dk=16, dv=16)
    check(p0, rng)
    one = dev.plans.nbytes
    assert one >= planmod.pipeline_bytes(dev) + 6 * planmod.MIN_CAPACITY_BYTES  # pipeline, q k v o lse mask
    monkeypatch.setattr(dev.plans, "max_bytes", 3 * one + one // 2)
    for d in (32, 48, 64, 80, 96, 128):
        check(problem(dk=d, dv=d), rng)
        assert dev.plans.nbytes <= dev.plans.max_bytes and len(dev.plans) <= 3
    assert all(plan.problem.dim_k != 16 for plan in dev.plans._plans.values())  # the oldest went first
    dev.plans.clear()


def test_plan_cache_budget_follows_the_knob_as_it_changes(monkeypatch):
    # README: every AULE_KP_* knob is parsed again when it changes. AULE_KP_PLAN_CACHE_MB was read once,
    # when the device was opened: a budget lowered later (to free device memory) was silently ignored.
    class Fake:
        nbytes = 1 << 20  # 1 MiB each
        problem = None
        destroyed = False

        def destroy(self):
            self.destroyed = True

    cache = planmod.PlanCache()
    monkeypatch.setenv("AULE_KP_PLAN_CACHE_MB", "4")
    plans = [cache.get(i, Fake) for i in range(6)]
    assert len(cache) == 4 and all(p.destroyed for p in plans[:2])
    monkeypatch.setenv("AULE_KP_PLAN_CACHE_MB", "2")
    cache.get(6, Fake)
    assert len(cache) == 2 and cache.nbytes <= 2 << 20
    monkeypatch.setattr(cache, "max_bytes", 3 << 20)  # an explicit budget wins over the knob
    for i in range(7, 10):
        cache.get(i, Fake)
    assert len(cache) == 3


def test_staged_buffers_stay_close_to_the_need(monkeypatch, rng):
    # Where every call copies whole buffers through staging (a discrete GPU without direct I/O),
    # capacities are quarter octaves: a call moves at most a quarter more than it needs.
    dev = devmod.get_device()
    monkeypatch.setattr(devmod.Device, "host_memory", property(lambda self: False))
    monkeypatch.setenv("AULE_KP_DIRECT_IO", "0")
    dev.plans.clear()
    try:
        assert planmod.staged(dev)
        for lk in (300, 301, 390, 700):  # growing keys, one pipeline (Lq 20 never splits)
            p = problem(b=1, hq=4, hkv=2, lq=20, lk=lk, dk=64, dv=64, dtype="float16")
            check(p, rng)
            plan = VulkanBackend().plan(p)
            need = planmod.forward_bytes(p, VulkanBackend().config(p), 2)
            assert all(need[n] <= plan.capacity[n] <= max(1.25 * need[n], planmod.MIN_STAGED_BYTES) for n in need)
    finally:
        dev.plans.clear()


def test_round_up():
    assert [planmod.round_up(n, 1) for n in (1, 3, 4, 5, 1025)] == [1, 4, 4, 8, 2048]
    assert [planmod.round_up(n, 4) for n in (3, 9, 17, 1000, 1025, 1300)] == [3, 10, 20, 1024, 1280, 1536]
