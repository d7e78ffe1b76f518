"""Vulkan calls for ``test_validation_layers``, run in a process with the validation layer loaded.

``python tests/validation_workload.py engine``: a representative set of engine calls (every forward
variant the device runs, GPU-style staged tiles, 16-bit types, causal/window/mask, GQA, split-KV
decoding, the backward with its mask gradient, a Context's zero-copy calls, RoPE fused into the
forward with and without kp's compute barrier, a layer decoding over its device cache), each checked
against the float64 reference so that a call that silently did nothing cannot pass.
``python tests/validation_workload.py hazard``: the positive control, two buffer fills with no
barrier between them (a write-after-write hazard that synchronization validation must report).
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

from conftest import check, gradient_tolerances, output_tolerance, problem, problem_inputs  # noqa: E402
from reference import reference_attention, reference_backward  # noqa: E402


def engine() -> None:
    import aule_kp
    from aule_kp.vulkan import device as devmod
    from aule_kp.vulkan.backend import VulkanBackend
    from aule_kp.vulkan.choice import config_for
    from aule_kp.vulkan.configs import DTYPE_CODE, KernelConfig

    caps = devmod.get_device().caps
    rng = np.random.default_rng(0)
    masked = problem(b=2, hq=4, hkv=2, lq=24, lk=40, causal=True, mask_shape=(2, 1, 24, 40))
    mask = rng.standard_normal(masked.mask_shape).astype(np.float32)
    variants = aule_kp.info()["devices"][0]["variants"]
    for variant in variants:
        check(masked, rng, mask, config=config_for(variant, caps, masked))
    staged = KernelConfig("scalar", "fa2_fwd", 32, 32, br=16, bc=8, tpr=8, dtype=0, wg=128, stage=1)
    check(masked, rng, mask, config=staged)
    for dtype in ("float16", "bfloat16"):
        p = problem(lq=20, lk=33, dtype=dtype, window=(6, 2))
        check(p, rng, config=replace(config_for(variants[0], caps, p), dtype=DTYPE_CODE[dtype]))
    os.environ["AULE_KP_SPLIT_KV"] = "3"  # split-KV decoding (Lq = 1), then automatic again
    check(problem(b=1, hq=4, hkv=1, lq=1, lk=70, causal=True), rng)
    del os.environ["AULE_KP_SPLIT_KV"]

    p = replace(masked, dtype="float32")
    q, k, v = problem_inputs(p, rng)
    dout = rng.standard_normal((p.batch, p.heads_q, p.len_q, p.dim_v)).astype(np.float32)
    out, lse = VulkanBackend().forward(p, q, k, v, mask)
    grads = VulkanBackend().backward(p, q, k, v, out, dout, lse, mask, mask_grad=True)
    want = reference_backward(q, k, v, dout, p, mask)
    tols = gradient_tolerances(p, q, k, v, dout, mask)
    assert all(np.abs(g - w).max() <= t for g, w, t in zip(grads[:3], want[:3], tols)) and grads[3] is not None

    with aule_kp.Context() as ctx:
        p = problem(b=1, hq=4, hkv=2, lq=8, lk=16, dtype="float16", causal=True)
        q, k, v = problem_inputs(p, rng)
        tq, tk, tv = (ctx.tensor(x.shape, np.float16).upload(x) for x in (q, k, v))
        o = ctx.attention(tq, tk, tv, causal=True)
        ctx.attention(tq, tk, tv, o, causal=True)  # into an existing output
        want, _ = reference_attention(q, k, v, p)
        assert np.abs(o.download().astype(np.float64) - want).max() <= output_tolerance(p, q, k, v)
    # RoPE fused into the forward (rope.comp, a compute barrier, the attention), and a layer decoding
    # with its cache on the device (kv_append.comp rotating keys, rope.comp on the queries, the ragged
    # kernel): each against float64 by its own test's checks.
    import test_nn
    from test_rope_fused import check_fused

    rotary = problem(b=2, hq=4, hkv=2, lq=3, lk=6, dk=16, dv=16, dtype="float16", causal=True)
    check_fused(rotary, rng, 4, False, 0, 3)
    # The same without kp patch 5's barrier: q and k synced through staging between the passes.
    dev, kind = devmod.get_device(), type(devmod.get_device())
    held = kind.kp_patch
    kind.kp_patch = property(lambda self: 4)
    dev.plans.clear()
    check_fused(rotary, rng, 4, True, 0, 3)
    kind.kp_patch = held
    dev.plans.clear()
    test_nn.test_decode_equals_full_recompute("vulkan", "rope")
    # The ragged kernel's split pass and its merge (one submission behind the compute barrier).
    import test_serving

    test_serving.test_vulkan_decode_splits(rng)
    print("engine calls done")


def hazard() -> None:
    """Two vkCmdFillBuffer writes of one buffer with no barrier: SYNC-HAZARD-WRITE-AFTER-WRITE."""
    import vulkan as vk

    app = vk.VkApplicationInfo(sType=vk.VK_STRUCTURE_TYPE_APPLICATION_INFO, apiVersion=vk.VK_MAKE_VERSION(1, 1, 0))
    inst = vk.vkCreateInstance(vk.VkInstanceCreateInfo(sType=vk.VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO,
                                                       pApplicationInfo=app), None)
    phys = vk.vkEnumeratePhysicalDevices(inst)[0]
    queue = vk.VkDeviceQueueCreateInfo(sType=vk.VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO, queueFamilyIndex=0,
                                       queueCount=1, pQueuePriorities=[1.0])
    dev = vk.vkCreateDevice(phys, vk.VkDeviceCreateInfo(sType=vk.VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO,
                                                       queueCreateInfoCount=1, pQueueCreateInfos=[queue]), None)
    buf = vk.vkCreateBuffer(dev, vk.VkBufferCreateInfo(sType=vk.VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO, size=256,
                                                       usage=vk.VK_BUFFER_USAGE_TRANSFER_DST_BIT,
                                                       sharingMode=vk.VK_SHARING_MODE_EXCLUSIVE), None)
    need = vk.vkGetBufferMemoryRequirements(dev, buf)
    kinds = vk.vkGetPhysicalDeviceMemoryProperties(phys)
    kind = next(i for i in range(kinds.memoryTypeCount) if need.memoryTypeBits & (1 << i))
    mem = vk.vkAllocateMemory(dev, vk.VkMemoryAllocateInfo(sType=vk.VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO,
                                                           allocationSize=need.size, memoryTypeIndex=kind), None)
    vk.vkBindBufferMemory(dev, buf, mem, 0)
    pool = vk.vkCreateCommandPool(dev, vk.VkCommandPoolCreateInfo(
        sType=vk.VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO, queueFamilyIndex=0), None)
    cmd = vk.vkAllocateCommandBuffers(dev, vk.VkCommandBufferAllocateInfo(
        sType=vk.VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO, commandPool=pool,
        level=vk.VK_COMMAND_BUFFER_LEVEL_PRIMARY, commandBufferCount=1))[0]
    vk.vkBeginCommandBuffer(cmd, vk.VkCommandBufferBeginInfo(sType=vk.VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO))
    vk.vkCmdFillBuffer(cmd, buf, 0, 256, 1)
    vk.vkCmdFillBuffer(cmd, buf, 0, 256, 2)
    vk.vkEndCommandBuffer(cmd)
    vk.vkDestroyCommandPool(dev, pool, None)
    vk.vkDestroyBuffer(dev, buf, None)
    vk.vkFreeMemory(dev, mem, None)
    vk.vkDestroyDevice(dev, None)
    vk.vkDestroyInstance(inst, None)
    print("hazard recorded")


def compute_hazard() -> None:
    """Through kp: glsl/kv_append.comp writes a buffer, then glsl/nonfinite_count.comp reads it, with
    no barrier between (kp records none between dispatches): SYNC-HAZARD-READ-AFTER-WRITE, the kind
    of hazard kp patch 5's ``aule_compute_barrier`` removes (the engine's rotary pass and output check
    rely on it). The layer here does not see hazards between two dispatches of one algorithm."""
    from aule_kp.vulkan import device as devmod

    dev = devmod.get_device()
    kp, mgr = dev.kp, dev.manager
    n = 1024
    written = mgr.tensor_t(np.zeros(n, np.uint32), kp.TensorTypes.storage)
    count = mgr.tensor_t(np.zeros(1, np.uint32), kp.TensorTypes.device)
    src = mgr.tensor_t(np.ones(n, np.uint32), kp.TensorTypes.device)
    rows = mgr.tensor_t(np.zeros(1, np.uint32), kp.TensorTypes.device)
    tables = mgr.tensor_t(np.zeros(4, np.float32), kp.TensorTypes.device)
    append = mgr.algorithm([written, src, rows, tables], dev.spirv("kv_append"), (n // 64, 1, 1),
                           np.zeros(2, np.uint32), np.zeros(8, np.uint32))
    check = mgr.algorithm([written, count], dev.spirv("nonfinite_count"), (4, 1, 1), np.zeros(1, np.uint32),
                          np.zeros(1, np.uint32))
    seq = mgr.sequence()
    seq.record(kp.OpTensorSyncDevice([src, rows, tables, count]))
    seq.record(kp.OpAlgoDispatch(append, np.array([n, n, 0, 0, 0, 0, 0, 0], np.uint32)))
    seq.record(kp.OpAlgoDispatch(check, np.array([n], np.uint32)))
    seq.eval()
    print("compute hazard recorded")


if __name__ == "__main__":
    {"engine": engine, "hazard": hazard, "compute_hazard": compute_hazard}[sys.argv[1]]()
