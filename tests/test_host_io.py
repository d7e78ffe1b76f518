"""Where a plan's inputs and outputs live (aule_kp/vulkan/device.py io_tensor) and how they are copied
(aule_kp/vulkan/hostcopy.py). lavapipe is a CPU device, so by default every tensor is a host tensor;
these tests pretend it is a discrete GPU to run the two other layouts for real: staging buffers
(AULE_KP_DIRECT_IO=0 or an unpatched kp) and direct I/O (inputs in device-local host-visible memory
through the patched kp's preference switch, outputs in cached host memory written by the shader),
forward and backward, against the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import check, problem
from test_vulkan_backward import check as check_backward

from aule_kp.vulkan import device as devmod
from aule_kp.vulkan import hostcopy

pytestmark = pytest.mark.skipif(devmod.vulkan_unavailable() is not None, reason="no Vulkan device")


@pytest.fixture
def discrete(monkeypatch):
    """The selected device, treated as a discrete GPU; plans built under it are dropped after."""
    dev = devmod.get_device()
    monkeypatch.setattr(devmod.Device, "host_memory", property(lambda self: False))
    dev.plans.clear()
    yield dev
    dev.plans.clear()


@pytest.mark.parametrize("direct", ["1", "0"])
def test_forward_and_backward_per_layout(discrete, monkeypatch, direct):
    monkeypatch.setenv("AULE_KP_DIRECT_IO", direct)
    assert discrete.direct_io == (direct == "1" and bool(devmod.kp_status()["patched"]))
    rng = np.random.default_rng(5)
    check(problem(b=2, hq=4, hkv=2, lq=20, lk=33, dtype="float16", causal=True), rng)
    check_backward(problem(b=1, hq=2, hkv=1, lq=17, lk=24, dk=32, dv=16))


def test_layout_choice(discrete, monkeypatch):
    kp = discrete.kp
    monkeypatch.setenv("AULE_KP_DIRECT_IO", "0")
    assert discrete.io_tensor(np.zeros(4, np.uint32), "in").tensor_type() == kp.TensorTypes.device
    if not devmod.kp_status()["patched"]:
        pytest.skip("direct I/O needs the patched kp")
    monkeypatch.setenv("AULE_KP_DIRECT_IO", "1")
    assert discrete.io_tensor(np.zeros(4, np.uint32), "out").tensor_type() == kp.TensorTypes.host
    bar = discrete.caps.host_visible_device_heap >= devmod.BAR_MIN_HEAP
    want = kp.TensorTypes.host if bar else kp.TensorTypes.device
    assert discrete.io_tensor(np.zeros(4, np.uint32), "in").tensor_type() == want


@pytest.mark.parametrize("threads", [1, 3])
def test_copy_bytes_splits_large_copies(monkeypatch, threads):
    monkeypatch.setenv("AULE_KP_COPY_THREADS", str(threads))
    monkeypatch.setattr(hostcopy, "PARALLEL_MIN_BYTES", 1 << 10)
    rng = np.random.default_rng(0)
    srcs = [rng.integers(0, 256, n, dtype=np.uint8) for n in (5 << 20, 3, 1 << 20)]
    dsts = [np.zeros_like(s) for s in srcs]
    hostcopy.copy_bytes(list(zip(dsts, srcs)))
    for d, s in zip(dsts, srcs):
        np.testing.assert_array_equal(d, s)


def test_copy_threads_validation(monkeypatch):
    monkeypatch.setenv("AULE_KP_COPY_THREADS", "many")
    with pytest.raises(ValueError, match="AULE_KP_COPY_THREADS"):
        hostcopy.copy_threads()
