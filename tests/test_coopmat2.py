"""The NV cooperative-matrix-2 forward (glsl/fa2_fwd_cm2.comp, variant "coopmat2"): against float64 on a
device that has VK_NV_cooperative_matrix2 (the lent GPU; scripts/gpu_run.sh runs this file there), and
everywhere the reasons the choice gives where it cannot run."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from conftest import check, problem

from aule_kp import knobs
from aule_kp.vulkan import choice
from aule_kp.vulkan import device as devmod
from aule_kp.vulkan.backend import VulkanBackend

has_vulkan = devmod.vulkan_unavailable() is None
coopmat2 = pytest.mark.skipif(
    not has_vulkan or not devmod.get_device().caps.coopmat2 or devmod.get_device().kp_patch < 4,
    reason="needs a Vulkan device with VK_NV_cooperative_matrix2 and kp patch 4",
)
needs_vulkan = pytest.mark.skipif(not has_vulkan, reason="no Vulkan device")


def p_rounding(lk: int) -> float:
    """The LSE error fa2_fwd_cm2 adds by summing the fp16-rounded P (the P that P V uses, so O's weights
    sum to 1): each P in [2^-14, 1] is off by at most float16's unit roundoff 2^-11 relative, each
    smaller one by half the subnormal spacing 2^-25; the row's largest key contributes P = 1, so L >= 1
    and ln L moves by at most 2^-11 + Lk * 2^-25."""
    return 2.0**-11 + lk * 2.0**-25


@coopmat2
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (False, (64, 0)), (False, (32, 32))])
@pytest.mark.parametrize("lq,lk", [(1, 700), (200, 333), (257, 257), (300, 100)])
def test_forward(d, causal, window, lq, lk, rng):
    check(problem(b=2, hq=8, hkv=2, lq=lq, lk=lk, dk=d, dv=d, dtype="float16", causal=causal, window=window), rng,
          backend=VulkanBackend("coopmat2"), lse_rounding=p_rounding(lk))


@coopmat2
@pytest.mark.parametrize("kind", ["float", "bool"])
def test_masks(kind, rng):
    shape = (2, 1, 150, 210)
    mask = rng.standard_normal(shape).astype(np.float32) if kind == "float" else np.where(
        rng.random(shape) > 0.3, 0.0, -np.inf).astype(np.float32)
    mask[:, :, 5] = -np.inf  # a fully hidden row: 0 out, -inf LSE
    out, lse = check(problem(b=2, hq=4, hkv=4, lq=150, lk=210, dk=64, dv=64, dtype="float16", mask_shape=shape),
                     rng, mask, backend=VulkanBackend("coopmat2"), lse_rounding=p_rounding(210))
    assert np.all(out[:, :, 5] == 0) and np.all(lse[:, :, 5] == -np.inf)


@coopmat2
@pytest.mark.parametrize("br,bc,wg", [(64, 32, 128), (64, 64, 128), (128, 64, 256), (64, 16, 128)])
def test_tiles(br, bc, wg, rng):
    p = problem(b=1, hq=4, hkv=2, lq=333, lk=517, dk=128, dv=128, dtype="float16", causal=True)
    backend = VulkanBackend("coopmat2")
    check(p, rng, backend=backend, config=replace(backend.config(p), br=br, bc=bc, wg=wg), lse_rounding=p_rounding(517))


@needs_vulkan
def test_reasons_where_it_cannot_run():
    caps = devmod.get_device().caps
    snap = knobs.current()
    p16 = problem(dk=64, dv=64, dtype="float16")
    if not caps.coopmat2:
        assert "device has no VK_NV_cooperative_matrix2" in choice.variant_reasons("coopmat2", caps, p16)
    fake = replace(caps, coopmat2=True)
    if devmod.get_device().kp_patch < 4:
        assert any("patch 4" in r for r in choice.variant_reasons("coopmat2", fake, p16, snapshot=snap))
    p32 = problem(dk=64, dv=64, dtype="float32")
    assert "coopmat2 reads float16 only; got float32" in choice.variant_reasons("coopmat2", fake, p32)
    for d in (72, 192):  # not a multiple of 16; above the register budget of the tested range
        bad = problem(dk=d, dv=d, dtype="float16")
        assert any("multiples of 16, at most 128" in r for r in choice.variant_reasons("coopmat2", fake, bad))
    modified = replace(p16, softcap=30.0)
    assert any("soft-capped" in r for r in choice.variant_reasons("coopmat2", fake, modified))
    assert "coopmat2" not in choice.preferred_variants(fake)  # opt-in until measured faster


@needs_vulkan
def test_config_and_extensions():
    caps = devmod.get_device().caps
    cfg = choice.config_for("coopmat2", caps, problem(dk=128, dv=128, dtype="float16"))
    assert (cfg.kernel, cfg.variant, cfg.br, cfg.bc, cfg.family) == ("fa2_fwd_cm2", "coopmat2", 64, 32, "fwd.coopmat2")
    assert not choice.kernel_reasons(cfg, caps, problem(dk=128, dv=128, dtype="float16"))
    dev = devmod.get_device()
    assert ("VK_NV_cooperative_matrix2" in dev.wanted_extensions()) == (dev.kp_patch >= 4)
