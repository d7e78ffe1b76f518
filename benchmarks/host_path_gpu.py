"""The NumPy path's upload + download against the host<->device copy bandwidth of the same machine
(run by scripts/gpu_run.sh on a discrete GPU; issue 6's host-path bar).

Yardsticks, same run: Vulkan's own staging -> device copy (kp OpTensorSyncDevice of 256 MiB, DMA
only), the reverse, a plain memcpy into / out of mapped staging memory, and torch's pageable and
pinned ``.cuda()`` where CUDA is there. Then B1 H32 S8192 D128 fp16 through ``Plan.run`` (copy in,
sync, kernel, sync, copy out) minus the kernel alone: what is left is the host path, moving q, k, v
in and o out (256 MiB). Prints a markdown table.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from typing import Callable

import numpy as np

from aule_kp.dtypes import from_f32
from aule_kp.problem import Problem, band
from aule_kp.vulkan import device as devmod
from aule_kp.vulkan.backend import VulkanBackend
from aule_kp.vulkan.hostcopy import copy_bytes, copy_threads
from aule_kp.vulkan.plan import Plan

MIB = 1 << 20


def median_s(fn: Callable[[], object], repeat: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def row(what: str, nbytes: int, sec: float, note: str = "") -> None:
    print(f"| {what} | {nbytes / MIB:.0f} | {sec * 1e3:.2f} | {nbytes / sec / 1e9:.1f} | {note} |", flush=True)


def host_call(p: Problem, qkv: tuple, label: str, phases: bool, h2d_rate: float) -> None:
    """Rows for NumPy-path calls of ``p`` through the current plan settings: the whole call against
    the kernel alone, and with ``phases`` Plan.run's steps timed one by one."""
    dev = devmod.get_device()
    q = qkv[0]
    plan = VulkanBackend().plan(p)
    kernel_only = plan.record(dev.manager.sequence(), transfers=False)
    kernel = median_s(kernel_only.eval, 5)
    kernel_only.destroy()
    kinds = {str(t.tensor_type()) for c in plan.chunks for t in c.tensors.values()}
    bar = dev.caps.host_visible_device_heap >> 20
    print(f"\n{label}: {len(plan.chunks)} chunk(s), tensors {sorted(kinds)}; device-local host-visible heap "
          f"{bar} MiB\n")
    moved = 4 * q.nbytes
    shape = f"B{p.batch} H{p.heads_q} S{p.len_q} D{p.dim_k}"
    whole = median_s(lambda: plan.run(*qkv, None), 5)
    row(f"NumPy path {shape} fp16, whole call, {label}", moved, whole,
        f"copy threads {copy_threads()}; kernel alone {kernel * 1e3:.2f} ms")
    row(f"NumPy path: whole - kernel, {label}", moved, whole - kernel,
        f"{moved / (whole - kernel) / h2d_rate:.2f}x the Vulkan H2D yardstick")
    if plan.pipelined:
        print(timeline(plan, qkv))
    if not phases:
        return
    pairs_in = [pair for c in plan.chunks for pair in c.input_pairs(qkv)]
    row("phase: inputs -> plan tensors", 3 * q.nbytes, median_s(lambda: copy_bytes(pairs_in), 5))
    row("phase: sequence eval (kernel, O written to host memory)", q.nbytes, median_s(plan.eval, 5))

    def copy_out() -> None:
        out = np.empty(sum(c.views["o"].nbytes for c in plan.chunks), np.uint8)
        copy_bytes([(out[: c.views["o"].nbytes], c.views["o"]) for c in plan.chunks])

    row("phase: output -> fresh array", q.nbytes, median_s(copy_out, 5))


def timeline(plan: Plan, qkv: tuple) -> str:
    """One pipelined call replayed step by step (Plan._run_pipelined's order), with the time at
    which each step ended: where the pipeline waits."""
    out = np.empty(sum(c.views["o"].nbytes for c in plan.chunks), np.uint8)
    t0 = time.perf_counter()
    marks = []
    for i, c in enumerate(plan.chunks):
        copy_bytes(c.input_pairs(qkv))
        marks.append((f"in{i}", time.perf_counter()))
        c.sequence.eval_async()
    lo = 0
    for i, c in enumerate(plan.chunks):
        c.sequence.eval_await()
        marks.append((f"wait{i}", time.perf_counter()))
        o = c.views["o"]
        copy_bytes([(out[lo:lo + o.nbytes], o)])
        lo += o.nbytes
        marks.append((f"out{i}", time.perf_counter()))
    return "timeline (ms): " + ", ".join(f"{name} {(t - t0) * 1e3:.2f}" for name, t in marks)


def main(s: int = 8192) -> None:
    dev = devmod.get_device()
    kp, mgr = dev.kp, dev.manager
    print(f"{dev.caps.name} ({dev.caps.type}), {dev.caps.driver_name} {dev.caps.driver_info}\n")
    print("| what | MiB | ms | GB/s | note |\n|---|---|---|---|---|")
    size = 256 * MIB
    t = mgr.tensor_t(np.zeros(size // 4, np.uint32), kp.TensorTypes.device)
    mapped = t.data().view(np.uint8)
    up = mgr.sequence().record(kp.OpTensorSyncDevice([t]))
    down = mgr.sequence().record(kp.OpTensorSyncLocal([t]))
    h2d = median_s(up.eval)
    row("Vulkan staging -> device (DMA)", size, h2d, "yardstick")
    row("Vulkan device -> staging (DMA)", size, median_s(down.eval))
    host = np.ones(size, np.uint8)
    for threads in ("1", ""):
        os.environ.pop("AULE_KP_COPY_THREADS", None)
        os.environ["AULE_KP_COPY_THREADS"] = threads or str(copy_threads())
        row(f"memcpy host -> mapped staging, {os.environ['AULE_KP_COPY_THREADS']} thread(s)", size,
            median_s(lambda: copy_bytes([(mapped, host)])))
        row(f"memcpy mapped staging -> host, {os.environ['AULE_KP_COPY_THREADS']} thread(s)", size,
            median_s(lambda: copy_bytes([(host, mapped)])))
    os.environ.pop("AULE_KP_COPY_THREADS")
    t.destroy()
    # What the plan's own tensors take (device-local host-visible memory for inputs where the
    # device has a large BAR, cached host memory for outputs: Device.io_tensor).
    for role in ("in", "out"):
        t = dev.io_tensor(np.zeros(size // 4, np.uint32), role)
        mapped = t.data().view(np.uint8)
        pair = (mapped, host) if role == "in" else (host, mapped)
        what = "host -> plan input tensor" if role == "in" else "plan output tensor -> host"
        row(f"memcpy {what} ({t.tensor_type()}), {copy_threads()} threads", size,
            median_s(lambda pair=pair: copy_bytes([pair])))
        t.destroy()
    try:
        import torch

        if torch.cuda.is_available():
            x = torch.from_numpy(host)
            row("torch pageable .cuda()", size, median_s(lambda: (x.cuda(), torch.cuda.synchronize())))
            xp = x.pin_memory()
            row("torch pinned .cuda()", size, median_s(lambda: (xp.cuda(), torch.cuda.synchronize())))
            del xp
    except ImportError:
        pass

    b, h, d = 1, 32, 128
    diag, left, right = band(s, s, causal=False, window=None, top_left=False)
    p = Problem(b, h, h, s, s, d, d, "float16", 1 / math.sqrt(d), diag, left, right)
    rng = np.random.default_rng(0)
    q, k, v = (from_f32(rng.standard_normal((b, h, s, d), dtype=np.float32), "float16") for _ in range(3))
    # One submission (the phases below add up to it), then the default: chunks pipelined so that
    # copies overlap kernels (Plan._run_pipelined); "whole - kernel" is then what the host path adds
    # to the kernel, not a copy rate.
    # Then both again with staging buffers (AULE_KP_DIRECT_IO=0): memcpy into host memory and DMA,
    # instead of the CPU writing into device memory across the bus.
    for label, chunks, direct in (("one submission", "1", "1"), ("pipelined (default)", "", "1"),
                                  ("one submission, staged", "1", "0"), ("pipelined, staged", "", "0")):
        os.environ["AULE_KP_PIPELINE_CHUNKS"] = chunks
        if not chunks:
            os.environ.pop("AULE_KP_PIPELINE_CHUNKS")
        os.environ["AULE_KP_DIRECT_IO"] = direct
        host_call(p, (q, k, v), label, phases=bool(chunks), h2d_rate=size / h2d)
        dev.plans.clear()
    os.environ.pop("AULE_KP_DIRECT_IO")

    # A repeated tiny call on the GpuTensor path (issue 6: <= 60 us end to end).
    import aule_kp

    ctx = aule_kp.Context()
    tq, tk, tv, to = (ctx.tensor((1, 1, 16, 32), np.float16) for _ in range(4))
    for t in (tq, tk, tv):
        t.upload(rng.standard_normal((1, 1, 16, 32)).astype(np.float16))
    tiny = median_s(lambda: ctx.attention(tq, tk, tv, out=to), 201)
    print(f"| GpuTensor tiny call B1 H1 L16 D32 fp16, out= given | — | {tiny * 1e3:.3f} | — | "
          "median of 201 calls, end to end |")
    ctx.close()


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
