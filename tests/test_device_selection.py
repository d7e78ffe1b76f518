"""Choosing the Vulkan device: ``Context(device=...)`` and ``AULE_KP_DEVICE`` errors name what was
wrong and the valid range; ``info()`` reports a bad ``AULE_KP_DEVICE`` instead of failing (issue 15,
parts 5 and 6)."""

from __future__ import annotations

import numpy as np
import pytest

import aule_kp
from aule_kp.errors import BackendUnavailable
from aule_kp.vulkan import device as devmod

pytestmark = pytest.mark.skipif(devmod.vulkan_unavailable() is not None, reason="no Vulkan device")


@pytest.mark.parametrize("device,error", [("x", TypeError), (1.0, TypeError), (True, TypeError), ([0], TypeError),
                                          (-1, ValueError), (10_000, ValueError)])
def test_context_device_argument(device, error):
    n = len(devmod.devices())
    with pytest.raises(error) as info:
        aule_kp.Context(device=device)
    message = str(info.value)
    assert "device" in message and f"0-{n - 1}" in message and "AULE_KP_DEVICE" not in message


def test_context_device_argument_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("AULE_KP_DEVICE", "not-a-number")
    assert aule_kp.Context(device=0).device is devmod.get_device(0)
    with pytest.raises(ValueError, match="AULE_KP_DEVICE"):
        aule_kp.Context()


@pytest.mark.parametrize("raw,fragment", [("abc", "an integer"), ("10000", "out of range"), ("-3", "out of range")])
def test_bad_environment_is_reported(monkeypatch, raw, fragment):
    monkeypatch.setenv("AULE_KP_DEVICE", raw)
    report = aule_kp.info()
    assert report["selected_device"] is None and "AULE_KP_DEVICE" in report["device_error"]
    assert fragment in report["device_error"] and report["devices"]
    assert "vulkan" not in report["backends"]
    q = np.zeros((1, 1, 2, 16), np.float32)
    with pytest.raises(BackendUnavailable, match="AULE_KP_DEVICE"):
        aule_kp.flash_attention(q, q, q, backend="vulkan")


def test_good_environment(monkeypatch):
    monkeypatch.setenv("AULE_KP_DEVICE", "0")
    report = aule_kp.info()
    assert report["selected_device"] == 0 and report["device_error"] is None and "vulkan" in report["backends"]


def test_missing_shaders_make_vulkan_unavailable(monkeypatch):
    """An install without its SPIR-V (and no way to compile it) lists no vulkan backend and says why,
    instead of failing at the first call (issue 17: `aule-kp info` listed it)."""
    from aule_kp import dispatch

    monkeypatch.setattr(devmod, "_shaders_found", False)
    monkeypatch.setattr(devmod, "shaders_missing", lambda: "9 SPIR-V kernel(s) missing (test)")
    assert devmod.vulkan_unavailable() == "9 SPIR-V kernel(s) missing (test)"
    assert "vulkan" not in dispatch.available_backends()
    assert "SPIR-V" in " ".join(dispatch.get("vulkan").unavailable_reasons())
    monkeypatch.setattr(devmod, "shaders_missing", lambda: None)
    assert devmod.vulkan_unavailable() is None and devmod._shaders_found


def test_shaders_missing_names_a_file_and_the_fix(monkeypatch, tmp_path):
    from aule_kp.vulkan import compile as compmod

    assert compmod.shaders_missing() is None  # this checkout: SPIR-V compiled, sources and glslang here
    monkeypatch.setattr(compmod, "SPIRV_DIR", tmp_path / "spirv")
    monkeypatch.setattr(compmod, "GLSL_DIR", tmp_path / "glsl")
    why = compmod.shaders_missing()
    assert why is not None and "fa2_fwd.spv" in why and "make shaders" in why


def test_stale_spirv_is_compiled_again(monkeypatch, tmp_path):
    """A checkout whose GLSL changed since its shaders were compiled (a pull without `make shaders`)
    must not run the old SPIR-V: with a changed push-constant block its results would be wrong."""
    from aule_kp.vulkan import compile as comp

    monkeypatch.setattr(comp, "SPIRV_DIR", tmp_path)
    out = comp.ensure("fa2_bwd_pre")  # missing: compiled, with the record of its inputs
    assert comp.stale_reason("fa2_bwd_pre") is None and comp.record_path(out).exists()
    comp.record_path(out).write_text("0" * 64 + "  compiled from other sources\n")
    out.write_bytes(b"old")
    assert "another version" in comp.stale_reason("fa2_bwd_pre")
    comp.ensure("fa2_bwd_pre")
    assert comp.stale_reason("fa2_bwd_pre") is None
    assert out.read_bytes()[:4] == bytes([0x03, 0x02, 0x23, 0x07])  # SPIR-V's magic number, little-endian
