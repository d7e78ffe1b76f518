"""The cooperative-matrix variant against float64, on a device that has it (the lent GPU; skipped
on lavapipe, which has no coopmat). Run there by scripts/gpu_run.sh."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from conftest import check, problem

from aule_kp.vulkan import device as devmod
from aule_kp.vulkan.backend import VulkanBackend
from aule_kp.vulkan.configs import coopmat_shared_bytes

coopmat = pytest.mark.skipif(
    devmod.vulkan_unavailable() is not None or not devmod.get_device().caps.coopmat,
    reason="needs a Vulkan device with VK_KHR_cooperative_matrix",
)
CM = VulkanBackend("coopmat")


@coopmat
@pytest.mark.parametrize("dk,dv", [(64, 64), (80, 80), (96, 96), (128, 128), (192, 192), (256, 256), (128, 64),
                                   (64, 128)])
@pytest.mark.parametrize("causal,top_left", [(False, False), (True, False), (True, True)])
def test_coopmat_head_dims(dk, dv, causal, top_left, rng):
    check(problem(hq=4, hkv=2, lq=200, lk=333, dk=dk, dv=dv, dtype="float16", causal=causal,
                  top_left=top_left), rng, backend=CM)


@coopmat
@pytest.mark.parametrize("lq,lk", [(1, 5000), (7, 900), (300, 100), (257, 257)])
@pytest.mark.parametrize("window", [None, (64, 0), (32, 32)])
def test_coopmat_shapes_windows(lq, lk, window, rng):
    check(problem(b=2, hq=8, hkv=2, lq=lq, lk=lk, dk=128, dv=128, dtype="float16", window=window), rng, backend=CM)


@coopmat
@pytest.mark.parametrize("kind", ["float", "bool"])
def test_coopmat_masks(kind, rng):
    shape = (2, 1, 150, 210)
    mask = rng.standard_normal(shape).astype(np.float32) if kind == "float" else np.where(
        rng.random(shape) > 0.3, 0.0, -np.inf).astype(np.float32)
    mask[:, :, 5] = -np.inf  # a fully hidden row
    out, _ = check(problem(b=2, hq=4, hkv=4, lq=150, lk=210, dk=64, dv=64, dtype="float16", mask_shape=shape),
                   rng, mask, backend=CM)
    assert np.all(out[:, :, 5] == 0)


@coopmat
@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("br,bc,wg", [(128, 32, 256), (64, 32, 128), (64, 16, 64), (32, 16, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_coopmat_staging_schedules(stage, br, bc, wg, causal, rng):
    """Both staging schedules (one K/V buffer with four barriers per tile, or K and V apart with two)
    over several tilings, with ragged edges and more than one pass of key tiles."""
    p = problem(b=1, hq=4, hkv=2, lq=333, lk=517, dk=128, dv=128, dtype="float16", causal=causal)
    cfg = replace(CM.config(p), br=br, bc=bc, wg=wg, stage=stage)
    if coopmat_shared_bytes(cfg) > devmod.get_device().caps.shared_memory:
        pytest.skip("over the device's shared memory")
    check(p, rng, backend=CM, config=cfg)


@coopmat
def test_coopmat_is_the_default_for_fp16():
    p = problem(dk=128, dv=128, dtype="float16")
    assert VulkanBackend().config(p).variant == "coopmat"


@coopmat
@pytest.mark.parametrize("softcap,alibi", [(5.0, None), (0.0, "head"), (3.0, "batch")])
@pytest.mark.parametrize("causal", [False, True])
def test_coopmat_score_mods(softcap, alibi, causal, rng):
    """Soft-capped and ALiBi scores through the coopmat forward (its per-score path), which the
    choice keeps off for them until this passes on a GPU: the config is taken directly."""
    from conftest import output_tolerance, problem_inputs
    from reference import reference_attention

    from aule_kp.dtypes import to_f32
    from aule_kp.vulkan.choice import config_for

    rows = {None: 0, "head": 1, "batch": 2}[alibi]
    p = problem(b=2, hq=4, hkv=2, lq=200, lk=333, dk=128, dv=128, dtype="float16", causal=causal,
                softcap=softcap, alibi_rows=rows)
    slopes = rng.uniform(0.0, 0.3, (rows, 4)).astype(np.float32) if rows else None
    q, k, v = problem_inputs(p, rng)
    cfg = config_for("coopmat", devmod.get_device().caps, p)
    out, _ = VulkanBackend().forward(p, q, k, v, None, cfg, alibi=slopes)
    ref, _ = reference_attention(q, k, v, p, None, slopes)
    np.testing.assert_allclose(to_f32(out, p.dtype), ref, atol=output_tolerance(p, q, k, v, alibi=slopes), rtol=0)
