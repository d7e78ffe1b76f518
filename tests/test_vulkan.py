"""The Vulkan engine on lavapipe against the float64 reference: every variant lavapipe can run.

Compiling a new pipeline specialisation costs lavapipe seconds, so the grid reuses a few head dims;
each feature is still crossed with the variants and dtypes that matter.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import check, check_plan_reuse, problem
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aule_kp.problem import Problem
from aule_kp.vulkan import device as devmod
from aule_kp.vulkan import plan as planmod
from aule_kp.vulkan.backend import VulkanBackend
from aule_kp.vulkan.choice import forward_kernel
from aule_kp.vulkan.configs import KernelConfig

pytestmark = pytest.mark.skipif(devmod.vulkan_unavailable() is not None, reason="no Vulkan device")


# Configurations lavapipe can run that the device's own choice would not exercise: GPU-style
# staged tiles (shared memory + barriers), lanes per row from 1 to 8 (subgroup shuffles), rows per
# invocation 1 and 2. Forcing them checks the scalar and Wave64 specialisations on this device.
FORCED = [
    KernelConfig("wave64", "fa2_fwd", 0, 0, br=64, bc=16, tpr=2, dtype=0, wg=128, stage=1),
    KernelConfig("scalar", "fa2_fwd", 0, 0, br=16, bc=8, tpr=8, dtype=0, wg=128, stage=1),
    KernelConfig("scalar", "fa2_fwd", 0, 0, br=64, bc=8, tpr=2, dtype=0, wg=64, stage=0, rpt=2),
]


def forced(cfg: KernelConfig, p: Problem) -> KernelConfig:
    from dataclasses import replace

    from aule_kp.vulkan.configs import DTYPE_CODE

    return replace(cfg, dk=p.dim_k, dv=p.dim_v, dtype=DTYPE_CODE[p.dtype])


@pytest.mark.parametrize("dk,dv", [(32, 32), (64, 64), (80, 80), (96, 96), (128, 128), (256, 256), (64, 32), (32, 96)])
def test_head_dims(dk, dv, rng):
    check(problem(dk=dk, dv=dv, lq=17, lk=29), rng)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("causal,top_left", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("lq,lk", [(24, 40), (40, 24), (1, 37), (33, 33)])
def test_causal_alignment_dtypes(dtype, causal, top_left, lq, lk, rng):
    check(problem(lq=lq, lk=lk, dtype=dtype, causal=causal, top_left=top_left), rng)


@pytest.mark.parametrize("window", [(4, 0), (0, 3), (8, 8), (-1, 2), (5, -1)])
@pytest.mark.parametrize("causal", [False, True])
def test_windows(window, causal, rng):
    check(problem(lq=30, lk=45, window=window, causal=causal), rng)


@pytest.mark.parametrize("b,hq,hkv", [(2, 4, 4), (2, 6, 2), (1, 4, 1), (3, 2, 1)])
def test_gqa_mqa_batches(b, hq, hkv, rng):
    check(problem(b=b, hq=hq, hkv=hkv, lq=20, lk=28, causal=True), rng)


@pytest.mark.parametrize("mask_shape", [(2, 4, 24, 40), (1, 1, 24, 40), (2, 1, 1, 40), (1, 4, 24, 1)])
@pytest.mark.parametrize("kind", ["float", "bool"])
def test_masks(mask_shape, kind, rng):
    p = problem(b=2, hq=4, hkv=2, mask_shape=mask_shape)
    if kind == "float":
        mask = rng.standard_normal(mask_shape).astype(np.float32)
    else:
        keep = rng.random(mask_shape) > 0.3
        mask = np.where(keep, 0.0, -np.inf).astype(np.float32)
    check(p, rng, mask)


def test_fully_masked_rows_are_zero(rng):
    shape = (1, 2, 24, 40)
    mask = np.zeros(shape, np.float32)
    mask[:, :, 3] = -np.inf  # row 3 sees nothing
    p = problem(mask_shape=shape, window=(2, 0))
    out, lse = check(p, rng, mask)
    assert np.all(out[:, :, 3] == 0) and np.all(np.isneginf(lse[:, :, 3]))
    # A band that hides everything from the first rows (Lq > Lk, causal bottom-right).
    out, lse = check(problem(lq=40, lk=24, causal=True), rng)
    assert np.all(out[:, :, :16] == 0) and np.all(np.isneginf(lse[:, :, :16]))


@pytest.mark.parametrize("cfg", FORCED, ids=lambda c: f"{c.variant}-tpr{c.tpr}-stage{c.stage}-rpt{c.rpt}")
@pytest.mark.parametrize("case", ["causal", "window-mask", "gqa-fp16", "lq1-bf16"])
def test_forced_variants(cfg, case, rng):
    if case == "causal":
        p, mask = problem(lq=50, lk=70, dk=64, dv=64, causal=True), None
    elif case == "window-mask":
        p = problem(lq=33, lk=45, dk=64, dv=64, window=(6, 6), mask_shape=(1, 2, 33, 45))
        mask = rng.standard_normal((1, 2, 33, 45)).astype(np.float32)
    elif case == "gqa-fp16":
        p, mask = problem(b=2, hq=4, hkv=2, lq=19, lk=90, dk=64, dv=64, dtype="float16", causal=True), None
    else:
        p, mask = problem(lq=1, lk=77, dk=64, dv=64, dtype="bfloat16"), None
    check(p, rng, mask, config=forced(cfg, p))


def test_chunked_bindings(monkeypatch, rng):
    p = problem(b=3, hq=4, hkv=2, lq=20, lk=30, causal=True)
    per_group = max(planmod.group_bytes(p).values())
    monkeypatch.setenv("AULE_KP_MAX_BINDING_BYTES", str(2 * per_group))  # 6 groups -> 3 dispatches
    plan = VulkanBackend().plan(p)
    assert [(c.g0, c.g1) for c in plan.chunks] == [(0, 2), (2, 4), (4, 6)]
    check(p, rng)


@pytest.mark.parametrize("heads_per_section", [1, 4, 64])
@pytest.mark.parametrize("causal", [False, True])
def test_scheduling_sections(monkeypatch, heads_per_section, causal, rng):
    # Sections of 1 head, of 3 (at most 4 asked; 3 divides the 6 query heads) and one for all: each
    # order must still cover every (query tile, head) exactly once. 300 rows: several query tiles.
    plans = devmod.get_device().plans
    plans.clear()  # cached plans keep the grid they were recorded with
    monkeypatch.setattr(planmod, "section_heads", lambda p: heads_per_section)
    try:
        check(problem(b=1, hq=6, hkv=3, lq=300, lk=70, causal=causal), rng)
    finally:
        plans.clear()


def test_query_grid_sections_divide_the_heads(monkeypatch):
    p = problem(lq=150)
    for asked, heads, grid in [(4, 6, (3, 3, 2)), (4, 32, (4, 3, 8)), (1, 6, (1, 3, 6)), (64, 6, (6, 3, 1)),
                               (4, 7, (1, 3, 7))]:
        monkeypatch.setattr(planmod, "section_heads", lambda p, asked=asked: asked)
        assert planmod.query_grid(p, heads, 64) == grid


def test_section_heads_fit_the_bytes(monkeypatch):
    monkeypatch.delenv("AULE_KP_SECTION_BYTES", raising=False)
    monkeypatch.setattr(planmod, "SECTION_BYTES", 1 << 20)
    # fp16, Lk 1024, D 64 + 64: 256 KiB of K and V per kv head; 2 query heads share them.
    assert planmod.section_heads(problem(hq=4, hkv=2, lk=1024, dk=64, dv=64, dtype="float16")) == 8
    assert planmod.section_heads(problem(lk=1024, dk=64, dv=64, dtype="float32", hq=1, hkv=1)) == 2
    assert planmod.section_heads(problem(lk=1 << 20, dk=256, dv=256, hq=1, hkv=1)) == 1


def test_section_bytes_env(monkeypatch):
    p = problem(lk=1024, dk=64, dv=64, dtype="float16", hq=1, hkv=1)  # 256 KiB of K and V
    monkeypatch.setenv("AULE_KP_SECTION_BYTES", str(1 << 20))
    assert planmod.section_heads(p) == 4
    for bad in ("16M", "0", "-5"):
        monkeypatch.setenv("AULE_KP_SECTION_BYTES", bad)
        with pytest.raises(ValueError, match="AULE_KP_SECTION_BYTES must be a positive"):
            planmod.section_heads(p)


def test_query_tiles_over_the_grid_limit_is_a_reason():
    assert planmod.query_tiles_reason(problem(lq=1000), 16, 65535) is None
    why = planmod.query_tiles_reason(problem(lq=65535 * 16 + 1), 16, 65535)
    assert "65536 query tiles of 16" in why and "65535 workgroups in grid y" in why


def test_plan_reuse(rng):
    p = problem(lq=12, lk=20)
    check_plan_reuse(p, check(p, rng)[0])


def test_device_choice_is_cpu_tiles():
    caps = devmod.get_device().caps
    if caps.type != "cpu":
        pytest.skip("CPU-driver tiles are chosen only on CPU Vulkan devices (lavapipe)")
    cfg = forward_kernel(caps, problem(dk=64, dv=64))
    assert cfg.variant == "scalar" and cfg.stage == 0 and cfg.rpt == 4 and cfg.tpr <= caps.subgroup_size


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    b=st.integers(1, 2), hkv=st.integers(1, 2), group=st.sampled_from([1, 2, 3]),
    lq=st.integers(1, 48), lk=st.integers(1, 48), d=st.sampled_from([32, 64]),
    dtype=st.sampled_from(["float32", "float16"]), causal=st.booleans(), top_left=st.booleans(),
    window=st.one_of(st.none(), st.tuples(st.integers(-1, 20), st.integers(-1, 20))),
    masked=st.booleans(), scale=st.floats(0.05, 1.0),
)
def test_random_problems(b, hkv, group, lq, lk, d, dtype, causal, top_left, window, masked, scale):
    rng = np.random.default_rng(lq * 1000 + lk)
    shape = (b, 1, lq, lk) if masked else None
    mask = rng.standard_normal(shape).astype(np.float32) * 2 if masked else None
    check(problem(b, hkv * group, hkv, lq, lk, d, d, dtype, causal, window, top_left, shape, scale), rng, mask)


def test_unpatched_kp_disables_coopmat(monkeypatch):
    from dataclasses import replace

    from aule_kp.vulkan.choice import variant_reasons

    caps = replace(devmod.get_device().caps, coopmat=True,
                   coopmat_shapes=((16, 16, 16, "f16", "f16", "f32", "f32", "subgroup"),))
    p = problem(dk=64, dv=64, dtype="float16")
    assert variant_reasons("coopmat", caps, p) == []
    monkeypatch.setattr(devmod, "kp_status", lambda: {"available": True, "patched": False})
    assert any("unpatched" in r for r in variant_reasons("coopmat", caps, p))
    assert variant_reasons("scalar", caps, p) == []


def test_kp_patch_level() -> None:
    """One answer to "is kp patched?": the unpatched release has no ``aule_patch`` (level 0)."""
    from types import SimpleNamespace

    assert devmod.kp_patch_level(SimpleNamespace()) == 0
    assert devmod.kp_patch_level(SimpleNamespace(aule_patch=3)) == 3
    status = devmod.kp_status()
    if status["available"]:
        assert status["patched"] == (devmod.kp_patch_level(devmod.import_kp()) > 0)


def test_coopmat_d64_tile_choice():
    from dataclasses import replace

    from aule_kp.vulkan.choice import coopmat_tiles

    caps = replace(devmod.get_device().caps, type="discrete", subgroup_size=32, shared_memory=48 << 10,
                   max_workgroup_invocations=1024)

    def tall(h: int, s: int) -> bool:
        return coopmat_tiles(caps, problem(hq=h, hkv=h, lq=s, lk=s, dk=64, dv=64, dtype="float16")).br == 128

    assert tall(32, 2048) and tall(32, 8192) and tall(20, 1024)  # 512, 2048, 160 tiles of 128 rows
    assert not tall(8, 1024)  # 64 tiles: fewer than a discrete GPU runs at once
    assert not tall(32, 200)  # 56 of 256 rows would be padding


def test_long_key_rows(rng, monkeypatch):
    # Thousands of key tiles per invocation: lavapipe ends an invocation's loops after 65535
    # iterations in all, so every inner loop must unroll (a rolled one truncated rows at Lk ~ 4096).
    # Split-KV would take this decode-like shape (tests/test_splitkv.py): keep the forward kernel.
    monkeypatch.setenv("AULE_KP_SPLIT_KV", "0")
    check(problem(lq=5, lk=9000, causal=True), rng)


def test_one_choice_builds_each_config_once(monkeypatch):
    """A forward choice builds the chosen variant's specialization once (no second config_for)."""
    from aule_kp.vulkan import choice

    calls = []
    real = choice.config_for
    monkeypatch.setattr(choice, "config_for", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    caps = devmod.get_device().caps
    cfg, reasons = choice.choose_forward(caps, problem(lq=64, lk=64, dk=64, dv=64), num_splits=0)
    assert cfg is not None and not reasons
    assert len(calls) == len(set(calls)) == 1 and calls == [cfg.variant]
