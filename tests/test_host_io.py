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
from aule_kp.vulkan import plan as planmod
from aule_kp.vulkan.backend import VulkanBackend

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
    assert hostcopy.copy_bytes(list(zip(dsts, srcs))) is True
    for d, s in zip(dsts, srcs):
        np.testing.assert_array_equal(d, s)
    # A check runs on every piece written; one failing piece fails the copy's answer, not the copy.
    seen = []
    dsts = [np.zeros_like(s) for s in srcs]
    fail_3_bytes = lambda piece: seen.append(piece.nbytes) or piece.nbytes != 3  # noqa: E731
    assert not hostcopy.copy_bytes(list(zip(dsts, srcs)), fail_3_bytes)
    assert sum(seen) == sum(s.nbytes for s in srcs)
    for d, s in zip(dsts, srcs):
        np.testing.assert_array_equal(d, s)


def test_copy_threads_validation(monkeypatch):
    monkeypatch.setenv("AULE_KP_COPY_THREADS", "many")
    with pytest.raises(ValueError, match="AULE_KP_COPY_THREADS"):
        hostcopy.copy_threads()


def _async_kp() -> bool:
    return devmod.vulkan_unavailable() is None and devmod.kp_patch_level(devmod.get_device().kp) >= 2


needs_async = pytest.mark.skipif(not _async_kp(), reason="pipelined calls need kp with our patch (eval_async)")


@needs_async
@pytest.mark.parametrize("direct", ["1", "0"])
def test_pipelined_host_calls(discrete, monkeypatch, direct):
    # Chunks copied in and submitted one by one, outputs copied out as each finishes: same results
    # as the reference, with a mask (sent up with the first chunk only) and repeated calls.
    monkeypatch.setenv("AULE_KP_DIRECT_IO", direct)
    monkeypatch.setenv("AULE_KP_PIPELINE_CHUNKS", "3")
    rng = np.random.default_rng(7)
    p = problem(b=2, hq=6, hkv=3, lq=19, lk=40, dtype="float16", causal=True)
    plan = VulkanBackend().plan(p)
    assert plan.pipelined and len(plan.chunks) == 3
    for _ in range(2):
        check(p, rng)
    mask = rng.standard_normal((1, 6, 19, 40)).astype(np.float32)
    check(problem(b=2, hq=6, hkv=3, lq=19, lk=40, dtype="float32", mask_shape=mask.shape), rng, mask)


def test_pipeline_choice(discrete, monkeypatch):
    monkeypatch.delenv("AULE_KP_PIPELINE_CHUNKS", raising=False)
    p = problem(b=1, hq=32, hkv=32, lq=4096, lk=4096, dk=128, dv=128, dtype="float16")
    cfg = VulkanBackend().config(p)
    # lavapipe's parallelism is its core count: a 4096-row problem has workgroups to spare.
    assert planmod.pipeline_chunks(discrete, p, cfg) == (planmod.PIPELINE_CHUNKS if _async_kp() else 1)
    small = problem(b=1, hq=4, hkv=4, lq=64, lk=64, dtype="float16")
    assert planmod.pipeline_chunks(discrete, small, VulkanBackend().config(small)) == 1
    monkeypatch.setenv("AULE_KP_PIPELINE_CHUNKS", "0")
    with pytest.raises(ValueError, match="AULE_KP_PIPELINE_CHUNKS"):
        planmod.pipeline_chunks(discrete, small, cfg)
