"""Tests of the Vulkan capability probe (aule_kp.vulkan.probe).

CI runs on Mesa's lavapipe, so its limits (from ``vulkaninfo`` on Mesa 22.3) are checked exactly; the
failure paths are simulated by breaking the ``vulkan`` binding or hiding every ICD.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Iterator

import pytest

from aule_kp.vulkan import probe
from aule_kp.vulkan.probe import DeviceCaps, probe_devices, probe_error, vendor_name


@pytest.fixture
def fresh_cache() -> Iterator[None]:
    """Forget the cached probe before and after a test that simulates a broken Vulkan."""
    probe_devices.cache_clear()
    yield
    probe_devices.cache_clear()


def _lavapipe() -> DeviceCaps:
    for dev in probe_devices():
        if dev.vendor_id == 0x10005 and "llvmpipe" in dev.name:
            return dev
    pytest.skip("no lavapipe (llvmpipe) Vulkan device on this machine")


def test_probe_finds_a_device() -> None:
    devices = probe_devices()
    assert devices, f"no Vulkan device found: {probe_error()}"
    assert probe_error() is None
    assert [d.index for d in devices] == list(range(len(devices)))


def test_probe_is_cached_and_returns_copies() -> None:
    first = probe_devices()
    first.clear()  # a caller mutating its list must not empty the cache
    assert probe_devices() == probe_devices()
    assert probe_devices()


def test_lavapipe_matches_vulkaninfo() -> None:
    dev = _lavapipe()
    assert dev.vendor == "mesa"
    assert dev.type == "cpu"
    assert dev.subgroup_size == 8
    assert dev.min_subgroup_size == 8
    assert dev.max_subgroup_size == 8
    assert dev.shared_memory == 32768
    assert dev.max_storage_buffer_range == 134217728
    assert dev.max_workgroup_invocations == 1024
    assert dev.max_push_constants >= 128
    assert dev.driver_name == "llvmpipe"
    assert dev.driver_info.startswith("Mesa")
    assert dev.api_version.startswith("1.")
    assert len(dev.uuid) == 32 and int(dev.uuid, 16) > 0
    assert dev.subgroup_shuffle and dev.subgroup_arithmetic
    assert dev.fp16 and dev.int8
    assert dev.host_visible_device_memory  # a CPU device: all memory is host memory
    # lavapipe has no cooperative matrix of either kind.
    assert not dev.coopmat and dev.coopmat_shapes == () and not dev.coopmat2
    assert "VK_KHR_shader_float16_int8" in dev.extensions


def test_as_dict_is_json_serialisable() -> None:
    for dev in probe_devices():
        d = dev.as_dict()
        back = json.loads(json.dumps(d))
        assert back == d
        # the keys aule_kp.info() promises for every device (its docstring)
        for key in ("name", "vendor", "type", "subgroup_size", "shared_memory", "fp16", "coopmat"):
            assert key in back
        assert back["extensions"] == sorted(dev.extensions)
        assert len(back["max_workgroup_count"]) == 3


def test_as_dict_coopmat_shapes() -> None:
    dev = DeviceCaps(
        index=0, name="x", vendor="nvidia", vendor_id=0x10DE, device_id=1, type="discrete",
        api_version="1.3.0", driver_name="", driver_info="", driver_version=0, uuid="",
        subgroup_size=32, min_subgroup_size=32, max_subgroup_size=32, subgroup_shuffle=True,
        subgroup_arithmetic=True, shared_memory=49152, max_storage_buffer_range=2**32 - 1,
        max_workgroup_invocations=1024, max_workgroup_count=(2**31 - 1, 65535, 65535),
        max_push_constants=256, fp16=True, int8=True, coopmat=True,
        coopmat_shapes=((16, 16, 16, "f16", "f16", "f32", "f32", "subgroup"),), coopmat2=True,
        host_visible_device_memory=True, extensions=frozenset({"VK_KHR_cooperative_matrix"}),
    )  # fmt: skip
    shapes = json.loads(json.dumps(dev.as_dict()))["coopmat_shapes"]
    assert shapes == [
        {"M": 16, "N": 16, "K": 16, "a": "f16", "b": "f16", "c": "f32", "result": "f32", "scope": "subgroup"}
    ]


@pytest.mark.parametrize("cap", [probe._V1_0, probe._V1_1, probe._V1_2])
def test_older_api_paths_agree(cap: int) -> None:
    """Capping the instance version drives the 1.0/1.1 struct paths on the same driver."""
    dev = _lavapipe()
    devices, error = probe._probe_all(cap)
    assert error is None
    old = devices[dev.index]
    assert (old.name, old.shared_memory, old.max_storage_buffer_range) == (
        dev.name,
        dev.shared_memory,
        dev.max_storage_buffer_range,
    )
    # fp16/int8 come from the per-extension structs below 1.2, from Vulkan11/12Features at 1.2
    assert (old.fp16, old.int8) == (dev.fp16, dev.int8)
    if cap >= probe._V1_1:
        assert old.subgroup_size == dev.subgroup_size
        assert old.uuid == dev.uuid
    else:
        assert old.subgroup_size == 0  # VkPhysicalDeviceSubgroupProperties needs 1.1


def test_missing_binding_gives_empty_list(monkeypatch: pytest.MonkeyPatch, fresh_cache: None) -> None:
    monkeypatch.setitem(sys.modules, "vulkan", None)  # makes `import vulkan` raise ImportError
    assert probe_devices() == []
    error = probe_error()
    assert error and "Vulkan binding" in error


def test_loader_error_gives_empty_list_and_destroys_instance(
    monkeypatch: pytest.MonkeyPatch, fresh_cache: None
) -> None:
    import vulkan as vk

    destroyed: list[object] = []
    real_destroy = vk.vkDestroyInstance

    def failing_enumerate(instance: object) -> None:
        raise vk.VkErrorInitializationFailed()

    def counting_destroy(instance: object, allocator: object) -> None:
        destroyed.append(instance)
        real_destroy(instance, allocator)

    monkeypatch.setattr(vk, "vkEnumeratePhysicalDevices", failing_enumerate)
    monkeypatch.setattr(vk, "vkDestroyInstance", counting_destroy)
    assert probe_devices() == []
    error = probe_error()
    assert error and "vkEnumeratePhysicalDevices" in error and "InitializationFailed" in error
    assert len(destroyed) == 1


def test_create_instance_error(monkeypatch: pytest.MonkeyPatch, fresh_cache: None) -> None:
    import vulkan as vk

    def failing_create(info: object, allocator: object) -> None:
        raise vk.VkErrorIncompatibleDriver()

    monkeypatch.setattr(vk, "vkCreateInstance", failing_create)
    assert probe_devices() == []
    error = probe_error()
    assert error and "vkCreateInstance" in error and "ICD" in error


def test_unexpected_exception_is_contained(monkeypatch: pytest.MonkeyPatch, fresh_cache: None) -> None:
    import vulkan as vk

    def broken_enumerate(instance: object) -> None:
        raise ZeroDivisionError("simulated bug")

    monkeypatch.setattr(vk, "vkEnumeratePhysicalDevices", broken_enumerate)
    assert probe_devices() == []
    error = probe_error()
    assert error and "ZeroDivisionError" in error


def test_one_failing_device_is_skipped(monkeypatch: pytest.MonkeyPatch, fresh_cache: None) -> None:
    real = probe._Session.probe

    def flaky(self: probe._Session, index: int, pd: object) -> DeviceCaps:
        if index == 0:
            raise RuntimeError("simulated driver trouble")
        return real(self, index, pd)

    monkeypatch.setattr(probe._Session, "probe", flaky)
    devices = probe_devices()
    assert all(d.index != 0 for d in devices)
    error = probe_error()
    assert error and "device 0" in error and "simulated driver trouble" in error


def test_no_icd_in_a_fresh_process() -> None:
    """A real loader with every ICD hidden: [] and an error, exit status 0."""
    env = dict(os.environ)
    env["VK_DRIVER_FILES"] = env["VK_ICD_FILENAMES"] = "/nonexistent/no_icd.json"
    code = textwrap.dedent(
        """
        import json
        from aule_kp.vulkan.probe import probe_devices, probe_error
        print(json.dumps([len(probe_devices()), probe_error()]))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    count, error = json.loads(out.stdout.strip().splitlines()[-1])
    assert count == 0
    assert error


def test_vendor_name() -> None:
    assert vendor_name(0x10DE) == "nvidia"
    assert vendor_name(0x1002) == "amd"
    assert vendor_name(0x8086) == "intel"
    assert vendor_name(0x106B) == "apple"
    assert vendor_name(0x10005) == "mesa"
    assert vendor_name(0x13B5) == "arm"
    assert vendor_name(0x5143) == "qualcomm"
    assert vendor_name(0x1AF4) == "0x1af4"


def test_component_names() -> None:
    assert probe._component(0) == "f16"
    assert probe._component(1) == "f32"
    assert probe._component(3) == "s8"
    assert probe._component(5) == "s32"
    assert probe._component(7) == "u8"
    assert probe._component(1000141000) == "bf16"
    assert probe._component(12345) == "12345"
