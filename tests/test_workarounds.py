"""The driver-trap table (aule_kp/vulkan/workarounds.py) applied by the kernel choice.

Each trap users hit in the field (the table cites each one's source) gets a made-up device with the capabilities
the probe would record there (vendor id, VkDriverId, name, OS, architecture, subgroup facts), and
the test checks what the automatic choice then runs: which variant, with or without subgroup
shuffles, and that a turned-off variant says why (choice.variant_reasons, aule_kp.info()). No
device is needed: these only ask the choice, never run a kernel.
"""

from __future__ import annotations

import platform
import re
from dataclasses import replace
from typing import Any

import pytest
from conftest import problem

import aule_kp
from aule_kp.vulkan import device as devmod
from aule_kp.vulkan import workarounds
from aule_kp.vulkan.choice import (
    backward_config,
    choose_forward,
    config_for,
    disabled_reasons,
    forward_kernel,
    kernel_reasons,
    split_kernel,
    variant_reasons,
)
from aule_kp.vulkan.configs import FAMILIES, KernelConfig, SplitKVConfig
from aule_kp.vulkan.probe import DeviceCaps, detect_architecture, probe_devices

COOPMAT_16 = ((16, 16, 16, "f16", "f16", "f32", "f32", "subgroup"),)
AMD, INTEL, NVIDIA, APPLE = 0x1002, 0x8086, 0x10DE, 0x106B
AMD_PROPRIETARY, RADV, NVIDIA_DRIVER, ANV, MOLTENVK = 1, 3, 4, 6, 14


def gpu(**kw: Any) -> DeviceCaps:
    """A discrete GPU description (32-wide subgroups with shuffles, 48 KiB shared memory)."""
    base = dict(index=0, name="test GPU", vendor="other", vendor_id=0x1234, device_id=1, type="discrete",
                api_version="1.3.0", driver_name="test", driver_info="test 1.0", driver_version=1,
                uuid="fe" * 16, subgroup_size=32, min_subgroup_size=32, max_subgroup_size=32,
                subgroup_shuffle=True, subgroup_arithmetic=True, shared_memory=48 << 10,
                max_storage_buffer_range=2**32 - 1, max_workgroup_invocations=1024,
                max_workgroup_count=(2**31 - 1, 65535, 65535), max_push_constants=256, fp16=True, int8=True,
                coopmat=False, coopmat_shapes=(), coopmat2=False, host_visible_device_memory=True,
                os="linux", architecture="other")
    base.update(kw)
    return DeviceCaps(**base)


RDNA2_WINDOWS = gpu(name="AMD Radeon RX 6800 XT", vendor="amd", vendor_id=AMD, driver_id=AMD_PROPRIETARY,
                    os="windows", architecture="amd-rdna2", subgroup_size=64, min_subgroup_size=32,
                    max_subgroup_size=64, shared_memory=64 << 10)
MOLTENVK_AMD = gpu(name="AMD Radeon RX 6900 XT", vendor="amd", vendor_id=AMD, driver_id=MOLTENVK, os="darwin",
                   subgroup_size=64, min_subgroup_size=64, max_subgroup_size=64, shared_memory=64 << 10)
ARC_B580 = gpu(name="Intel(R) Arc(TM) B580 Graphics", vendor="intel", vendor_id=INTEL, driver_id=ANV,
               architecture="intel-xe2", min_subgroup_size=16, coopmat=True, coopmat_shapes=COOPMAT_16)
TURING = gpu(name="NVIDIA GeForce RTX 2080 Ti", vendor="nvidia", vendor_id=NVIDIA, driver_id=NVIDIA_DRIVER,
             architecture="nvidia-turing", coopmat=True, coopmat_shapes=COOPMAT_16)
AMPERE = replace(TURING, name="NVIDIA GeForce RTX 3090", architecture="other", uuid="ab" * 16)
ARC_A770_LINUX = gpu(name="Intel(R) Arc(tm) A770 Graphics (DG2)", vendor="intel", vendor_id=INTEL, driver_id=ANV,
                     architecture="intel-xe1", min_subgroup_size=8, coopmat=True, coopmat_shapes=COOPMAT_16)
MOLTENVK_APPLE = gpu(name="Apple M2 Pro", vendor="apple", vendor_id=APPLE, driver_id=MOLTENVK, os="darwin",
                     type="integrated", shared_memory=32 << 10)

D128_FP16 = problem(hq=8, hkv=2, lq=512, lk=512, dk=128, dv=128, dtype="float16")
DECODE = problem(b=1, hq=32, hkv=8, lq=1, lk=32768, dk=128, dv=128, dtype="float16")


@pytest.fixture(autouse=True)
def patched_kp(monkeypatch: pytest.MonkeyPatch) -> None:
    """The choice as with the patched kp (coopmat needs it), whatever this machine built; the table on."""
    monkeypatch.setattr(devmod, "kp_status", lambda: {"available": True, "patched": True})
    monkeypatch.delenv("AULE_KP_WORKAROUNDS", raising=False)
    monkeypatch.delenv("AULE_KP_FORCE_VARIANT", raising=False)
    monkeypatch.delenv("AULE_KP_FORCE_BWD_VARIANT", raising=False)
    monkeypatch.delenv("AULE_KP_SPLIT_KV", raising=False)


def ids(caps: DeviceCaps) -> set:
    return {w.id for w in workarounds.matching(caps)}


def test_amd_windows_before_rdna3() -> None:
    """f16vec4 shuffles (#19881): our shuffles move fp32 values, so Wave64 keeps its shuffles."""
    assert ids(RDNA2_WINDOWS) == {"amd-windows-fp16"}
    cfg = forward_kernel(RDNA2_WINDOWS, D128_FP16)
    assert cfg.variant == "wave64" and cfg.tpr > 1
    assert workarounds.effective(RDNA2_WINDOWS) is RDNA2_WINDOWS
    # fp16 arithmetic is avoided: the coopmat kernels would be off, had these GPUs any.
    assert any("19881" in r for r in disabled_reasons("fwd.coopmat", RDNA2_WINDOWS, "float16"))
    assert not disabled_reasons("fwd.wave64", RDNA2_WINDOWS, "float16")
    # Not RDNA3 on that driver, not RDNA2 on RADV.
    assert not ids(replace(RDNA2_WINDOWS, architecture="amd-rdna3"))
    assert not ids(replace(RDNA2_WINDOWS, driver_id=RADV, os="linux"))


def test_moltenvk_amd_runs_without_shuffles() -> None:
    """Shuffles wrong on MoltenVK + AMD (#20029): TPR = 1 in every kernel that would shuffle."""
    assert ids(MOLTENVK_AMD) == {"moltenvk-amd-shuffle", "moltenvk-pipeline-creation"}
    fwd = forward_kernel(MOLTENVK_AMD, D128_FP16)
    assert fwd.variant == "wave64" and fwd.tpr == 1
    assert config_for("scalar", MOLTENVK_AMD, D128_FP16).tpr == 1
    assert split_kernel(MOLTENVK_AMD, DECODE).tpr == 1
    bwd = backward_config(MOLTENVK_AMD, D128_FP16)
    assert bwd.variant == "scalar" and bwd.dkdv.tpr == bwd.dq.tpr == 1
    # The same GPU elsewhere shuffles.
    assert forward_kernel(replace(MOLTENVK_AMD, driver_id=RADV, os="linux"), D128_FP16).tpr > 1
    # A cached tuning winner that shuffles is not legal there.
    assert any("shuffles" in r for r in kernel_reasons(replace(fwd, tpr=4, br=32), MOLTENVK_AMD, D128_FP16))


def test_intel_needs_full_subgroups() -> None:
    """Intel subgroup crash without full subgroups (#17356): no subgroup ops, no coopmat."""
    assert ids(ARC_B580) == {"intel-full-subgroups"}
    reasons = variant_reasons("coopmat", ARC_B580, D128_FP16)
    assert reasons and "full_subgroups" in reasons[0] and "17356" in reasons[0]
    cfg = forward_kernel(ARC_B580, D128_FP16)
    assert cfg.variant == "scalar" and cfg.tpr == 1
    assert backward_config(ARC_B580, D128_FP16).variant == "scalar"
    assert ids(replace(ARC_B580, type="integrated", name="Intel(R) Graphics (LNL)")) == {"intel-full-subgroups"}


def test_nvidia_turing_avoids_coopmat() -> None:
    """KHR coopmat flash attention wrong on Turing (#19290): scalar forward and backward there."""
    assert ids(TURING) == {"nvidia-turing-coopmat"}
    reasons = variant_reasons("coopmat", TURING, D128_FP16)
    assert any("pull/19290" in r for r in reasons)
    cfg = forward_kernel(TURING, D128_FP16)
    assert cfg.variant == "scalar" and cfg.tpr > 1
    assert backward_config(TURING, D128_FP16).variant == "scalar"
    # Ampere on the same driver keeps coopmat.
    assert not ids(AMPERE)
    assert forward_kernel(AMPERE, D128_FP16).variant == "coopmat"
    assert backward_config(AMPERE, D128_FP16).variant == "coopmat"
    # A driver without VK_NV_shader_sm_builtins does not give warps per SM: the names catch it.
    for name in ("NVIDIA GeForce RTX 2060 SUPER", "Tesla T4", "NVIDIA GeForce GTX 1660 Ti", "Quadro RTX 6000"):
        assert ids(replace(AMPERE, name=name)) == {"nvidia-turing-coopmat"}, name
    assert not ids(replace(AMPERE, name="NVIDIA GeForce RTX 4090"))


def test_arc_a770_linux_avoids_coopmat() -> None:
    """KHR coopmat slower than scalar on the Arc A770 (#24404), besides Intel's subgroup trap."""
    assert ids(ARC_A770_LINUX) == {"intel-full-subgroups", "intel-xe1-coopmat-slow"}
    reasons = " ".join(variant_reasons("coopmat", ARC_A770_LINUX, D128_FP16))
    assert "pull/24404" in reasons and "pull/17356" in reasons
    assert forward_kernel(ARC_A770_LINUX, D128_FP16).variant == "scalar"
    # Known by name too, when the probe could not tell the architecture.
    assert "intel-xe1-coopmat-slow" in ids(replace(ARC_A770_LINUX, architecture="other"))


def test_moltenvk_pipeline_creation() -> None:
    """Pipeline creation failing on MoltenVK (#13450): no shader feature to avoid statically (the
    self-check builds each pipeline before first use); Apple GPUs keep their shuffles."""
    assert ids(MOLTENVK_APPLE) == {"moltenvk-pipeline-creation"}
    entry = next(w for w in workarounds.TABLE if w.id == "moltenvk-pipeline-creation")
    assert not entry.avoid and "self-check" in entry.effect
    cfg = forward_kernel(MOLTENVK_APPLE, D128_FP16)
    assert cfg.variant == "scalar" and cfg.tpr > 1
    assert all(not workarounds.family_reasons(f, MOLTENVK_APPLE) for f in FAMILIES)


def test_split_kv_follows_the_table() -> None:
    cfg = choose_forward(MOLTENVK_AMD, DECODE)[0]
    assert isinstance(cfg, SplitKVConfig) and cfg.kernel.tpr == 1
    assert isinstance(choose_forward(TURING, DECODE)[0], SplitKVConfig)


def test_the_table_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AULE_KP_WORKAROUNDS", "0")
    assert not workarounds.matching(TURING)
    assert forward_kernel(TURING, D128_FP16).variant == "coopmat"
    assert forward_kernel(MOLTENVK_AMD, D128_FP16).tpr > 1


def test_forced_variant_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="19290"):
        forward_kernel(TURING, D128_FP16, variant="coopmat")


def test_nothing_matches_lavapipe_or_a_plain_gpu() -> None:
    assert not ids(gpu())
    for caps in probe_devices():
        if caps.driver_id == 13:  # llvmpipe
            assert not ids(caps)


def test_info_shows_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devmod, "devices", lambda: [TURING, ARC_A770_LINUX, MOLTENVK_AMD])
    devs = aule_kp.info()["devices"]
    turing, arc, mac = devs
    assert turing["variants"] == ["scalar", "wave64"]
    assert any("19290" in r for r in turing["variant_reasons"]["coopmat"])
    assert [w["id"] for w in turing["workarounds"]] == ["nvidia-turing-coopmat"]
    assert "coopmat" not in arc["variants"] and any("24404" in r for r in arc["variant_reasons"]["coopmat"])
    assert {w["id"] for w in mac["workarounds"]} == {"moltenvk-amd-shuffle", "moltenvk-pipeline-creation"}
    assert turing["architecture"] == "nvidia-turing" and turing["driver"] == "nvidia-proprietary"


def test_table_entries_are_complete() -> None:
    assert {w.id for w in workarounds.TABLE} == {
        "amd-windows-fp16", "moltenvk-amd-shuffle", "intel-full-subgroups", "nvidia-turing-coopmat",
        "intel-xe1-coopmat-slow", "moltenvk-pipeline-creation"}
    for w in workarounds.TABLE:
        assert w.sources and all(re.match(r"https://github\.com/ggml-org/llama\.cpp/(issues|pull)/\d+", s)
                                 for s in w.sources), w.id
        assert w.reason and w.effect and w.matches
        assert w.avoid <= set(workarounds.FEATURES), w.id
        assert w.as_dict()["match"]
    assert set(workarounds.NEEDS) == set(FAMILIES)
    assert all(needs <= set(workarounds.FEATURES) for needs in workarounds.NEEDS.values())


@pytest.mark.parametrize("facts, arch", [
    (dict(vendor_id=AMD, size_control=(64, 64), wavefronts_per_simd=10), "amd-gcn"),
    (dict(vendor_id=AMD, size_control=(32, 64), wavefronts_per_simd=20), "amd-rdna1"),
    (dict(vendor_id=AMD, size_control=(32, 64), wavefronts_per_simd=16), "amd-rdna2"),
    (dict(vendor_id=AMD, size_control=(32, 64), wavefronts_per_simd=16, mixed_dot_accelerated=True), "amd-rdna3"),
    (dict(vendor_id=AMD, size_control=(32, 64), wavefronts_per_simd=16, extensions={"VK_EXT_shader_float8"}),
     "amd-rdna4"),
    (dict(vendor_id=AMD, size_control=(32, 64)), "other"),  # MoltenVK: no AMD shader-core properties
    (dict(vendor_id=INTEL, size_control=(16, 32)), "intel-xe2"),
    (dict(vendor_id=INTEL, size_control=(8, 32)), "intel-xe1"),
    (dict(vendor_id=INTEL), "other"),
    (dict(vendor_id=NVIDIA), "nvidia-pre-turing"),
    (dict(vendor_id=NVIDIA, extensions={"VK_KHR_cooperative_matrix"}, warps_per_sm=32), "nvidia-turing"),
    (dict(vendor_id=NVIDIA, extensions={"VK_KHR_cooperative_matrix"}, warps_per_sm=48), "other"),
    (dict(vendor_id=0x10005, size_control=(8, 8)), "other"),
])
def test_detect_architecture(facts: dict, arch: str) -> None:
    facts = dict(facts)
    assert detect_architecture(facts.pop("vendor_id"), frozenset(facts.pop("extensions", ())), **facts) == arch


def test_probe_records_what_the_table_matches() -> None:
    devices = probe_devices()
    if not devices:
        pytest.skip("no Vulkan device")
    for caps in devices:
        d = caps.as_dict()
        assert d["os"] == platform.system().lower()
        assert {"driver_id", "driver", "architecture", "driver_version_text"} <= set(d)
        if caps.vendor_id == 0x10005 and "llvmpipe" in caps.name:
            assert (caps.driver_id, d["driver"], caps.architecture) == (13, "llvmpipe", "other")


def test_driver_version_text() -> None:
    nvidia = replace(TURING, driver_version=(580 << 22) | (159 << 14) | (3 << 6))
    assert nvidia.driver_version_text() == "580.159.3.0"
    intel_windows = replace(ARC_B580, os="windows", driver_version=(101 << 14) | 8331)
    assert intel_windows.driver_version_text() == "101.8331"
    assert gpu(driver_version=(25 << 22) | (2 << 12) | 3).driver_version_text() == "25.2.3"


def test_kernel_config_family() -> None:
    fwd = forward_kernel(TURING, D128_FP16)
    assert isinstance(fwd, KernelConfig) and fwd.family == "fwd.scalar"
    assert split_kernel(TURING, DECODE).family == "splitkv"
    bwd = backward_config(AMPERE, D128_FP16)
    assert {k.family for k in bwd.kernels()} == {"bwd.coopmat"}


def test_cli_info_prints_traps(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from aule_kp.cli import main

    monkeypatch.setattr(devmod, "devices", lambda: [TURING])
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "driver trap nvidia-turing-coopmat" in out and "not coopmat: turned off for this driver" in out
    assert "nvidia-turing, driver nvidia-proprietary" in out


def test_doctor_says_what_the_table_keeps_off(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                              tmp_path: Any) -> None:
    """Doctor still runs a family the table turns off (is the driver fixed?) and says it stays off."""
    from aule_kp.cli import main
    from aule_kp.vulkan import selfcheck

    if devmod.vulkan_unavailable():
        pytest.skip("no Vulkan device")
    monkeypatch.setenv("AULE_KP_CACHE_DIR", str(tmp_path))
    dev = devmod.get_device()
    monkeypatch.setattr(dev, "caps", replace(dev.caps, name="NVIDIA GeForce RTX 2080 (test)", vendor_id=NVIDIA))
    monkeypatch.setattr(selfcheck, "check", lambda family, dtype, device, configure: selfcheck.Verdict(
        family, dtype, True, 1, 0.1, 0.0, "stub", "0" * 16))
    assert main(["doctor", "--kernels", "fwd.coopmat", "fwd.scalar", "--dtype", "float16"]) == 0
    out = capsys.readouterr().out
    assert "driver trap nvidia-turing-coopmat" in out
    assert "fwd.coopmat stays off on this driver whatever its verdict" in out and "fwd.scalar stays off" not in out
