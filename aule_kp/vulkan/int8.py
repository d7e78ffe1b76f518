"""``precision="int8"`` on Vulkan (the scheme is aule_kp/quant.py): its kernel choice and its plan.

One recorded sequence per call: ``fa2_int8_quant`` smooths and quantizes K into two device-only
buffers (glsl/fa2_int8.glsl), then the attention kernel quantizes each workgroup's Q block as it
loads it and runs Q·Kᵀ on int8. Variants:

* ``int8dot`` (glsl/fa2_fwd_int8.comp): scalar/subgroup, packed 4 x int8 dot products
  (``GL_EXT_integer_dot_product``; core in Vulkan 1.3, lavapipe runs it). Its SPIR-V ships prebuilt.
* ``int8coopmat`` (glsl/fa2_fwd_int8_coopmat.comp): ``coopmat<int8_t>`` for Q·Kᵀ, chosen where the
  device reports a subgroup-scope s8 x s8 + s32 shape of the kernel's size.

A plan binds every (batch, kv-head) group in one dispatch (a problem over one storage binding is
refused, not split) and is reused, as the fp plans are, by every problem of its pipelines that fits
its buffers. The self-check, the tuning cache and split-KV do not cover these kernels (yet).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .. import knobs
from ..nonfinite import enforce
from ..problem import Problem
from ..quant import BLOCK_K, BLOCK_Q, check_host_values, key_mean, lse_shift
from .choice import CPU_LOOP_LIMIT, pow2_floor
from .configs import DTYPE_CODE, MAX_GRID, KernelConfig
from .plan import (
    BINDINGS,
    INPUTS,
    OUTPUTS,
    Chunk,
    Plan,
    binding_limit,
    capacity,
    group_bytes,
    mask_bytes,
    push_constants,
    query_grid,
    query_tiles_reason,
    stats,
)
from .probe import DeviceCaps

VARIANTS = ("int8coopmat", "int8dot")
#: What the automatic choice tries, in order. int8coopmat ran correctly on an H200 once (BENCHMARKS.md,
#: 2026-12-05), but no self-check covers the int8 kernels on other drivers: it is used only where
#: AULE_KP_FORCE_VARIANT names it, never silently.
AUTOMATIC = ("int8dot",)
#: Device-only buffers the quantize pass writes and the attention reads (bindings 6 and 7).
SCRATCH = ("k8", "kscale")
#: Invocations of fa2_int8_quant.comp (a power of two, a multiple of DK/2 for every DK <= 256).
QUANT_WG = 256
#: The int8 coopmat shape the kernel is written for: (M, N, K) of a subgroup-scope s8 x s8 + s32 matrix.
COOPMAT_SHAPE = (16, 16, 32)


@dataclass(frozen=True)
class Int8Config:
    """The two pipelines of an int8 forward: ``quant`` (fa2_int8_quant) and ``kernel`` (the attention)."""

    kernel: KernelConfig
    quant: KernelConfig

    @property
    def variant(self) -> str:
        return self.kernel.variant


def int8_group_bytes(p: Problem) -> Dict[str, int]:
    """Bytes each buffer needs per (batch, kv-head) group: the forward's and the quantized K's."""
    return dict(group_bytes(p), k8=p.len_k * p.dim_k, kscale=4 * math.ceil(p.len_k / BLOCK_K))


def integer_dot(caps: DeviceCaps) -> bool:
    """Whether the device has packed int8 dot products (Vulkan 1.3 core, where the patched kp enables them)."""
    major, minor = (int(x) for x in caps.api_version.split(".")[:2])
    return (major, minor) >= (1, 3) and "VK_KHR_shader_integer_dot_product" in caps.extensions


#: The fp16 shape its P·V runs on: 16 x 16 x 16, f16 x f16 + f32.
PV_SHAPE = (16, 16, 16, "f16", "f16", "f32", "f32")


def _has_shape(caps: DeviceCaps, shape: Tuple[Any, ...]) -> bool:
    """Whether the device reports ``(M, N, K, a, b, c, result)`` at subgroup scope."""
    return any(tuple(s[:7]) == shape and s[7] == "subgroup" for s in caps.coopmat_shapes)


def int8_coopmat(caps: DeviceCaps) -> bool:
    """Whether the device reports both cooperative-matrix shapes of the int8coopmat kernel: the
    subgroup-scope s8 x s8 + s32 one of Q·Kᵀ and the f16 one of P·V."""
    return _has_shape(caps, (*COOPMAT_SHAPE, "s8", "s8", "s32", "s32")) and _has_shape(caps, PV_SHAPE)


def _dot_kernel(caps: DeviceCaps, p: Problem) -> KernelConfig:
    """glsl/fa2_fwd_int8.comp's tiles: BR = BLOCK_Q rows (one Q scale per workgroup), TPR lanes per
    row with a whole number of packed q words and o pairs each, RPT rows per lane group."""
    dmax = max(p.dim_k, p.dim_v)
    shuffle = caps.subgroup_size if caps.subgroup_shuffle else 1
    cpu = caps.type == "cpu"
    tpr = min(8, shuffle, pow2_floor(dmax // (16 if cpu else 32)))
    while tpr > 1 and (p.dim_k % (4 * tpr) or p.dim_v % (2 * tpr)):
        tpr //= 2
    # CPU drivers: 4 rows per lane group so each K/V load feeds 4 rows (as the scalar forward).
    rpt, bc = (4, 8) if cpu else (1, 16)
    wg = BLOCK_Q // rpt * tpr
    return KernelConfig("int8dot", "fa2_fwd_int8", p.dim_k, p.dim_v, BLOCK_Q, bc, tpr, DTYPE_CODE[p.dtype], wg, 0, rpt)


def _coopmat_kernel(caps: DeviceCaps, p: Problem) -> KernelConfig:
    """glsl/fa2_fwd_int8_coopmat.comp: BR = BLOCK_Q rows over 4 subgroups of 16, BC = 32 keys."""
    wave = max(caps.subgroup_size, 1)
    return KernelConfig("int8coopmat", "fa2_fwd_int8_coopmat", p.dim_k, p.dim_v, BLOCK_Q, 32, 1,
                        DTYPE_CODE[p.dtype], 4 * wave, 1, 1)


def coopmat_shared_bytes(k: KernelConfig) -> int:
    """Shared memory of glsl/fa2_fwd_int8_coopmat.comp (the formula in its header)."""
    return (k.br * k.dk + k.bc * k.dk + 4 * k.br * k.bc + 2 * k.br * k.bc + 2 * k.bc * k.dv + 4 * k.br * 16
            + 4 * 2 * k.br + 4 * k.wg + 4 * k.bc)


def _quant_kernel(p: Problem) -> KernelConfig:
    return KernelConfig("int8quant", "fa2_int8_quant", p.dim_k, p.dim_v, BLOCK_Q, BLOCK_K, 1, DTYPE_CODE[p.dtype],
                        QUANT_WG, 0, 1)


def cpu_loops(kernel: KernelConfig, p: Problem) -> Dict[str, int]:
    """Loop iterations per invocation of each int8 kernel, an upper bound (CPU drivers stop an
    invocation at 65535 in all): the reduction trees (log2 WG each), the quantize pass's mean
    stripes and its two passes over each key block, the attention's key tiles."""
    tree = QUANT_WG.bit_length() - 1
    blocks = -(-p.len_k // BLOCK_K)
    per_block = 2 * -(-(BLOCK_K * p.dim_k // 4) // QUANT_WG) + tree
    return {"fa2_int8_quant": -(-p.len_k // (QUANT_WG // (p.dim_k // 2))) + 1 + blocks * (per_block + 1),
            kernel.kernel: -(-p.len_k // kernel.bc) + kernel.wg.bit_length()}


def variant_reasons(name: str, caps: DeviceCaps, p: Problem) -> List[str]:
    """Why int8 variant ``name`` cannot run ``p`` on this device (empty: it can)."""
    from .device import kp_status

    reasons = []
    if not kp_status()["patched"]:
        reasons.append("kp is the unpatched release build: the int8 kernels' device features are not enabled")
    if name == "int8dot":
        if not integer_dot(caps):
            reasons.append("device has no Vulkan 1.3 VK_KHR_shader_integer_dot_product")
        if p.dim_k % 4 or p.dim_v % 2:
            reasons.append("int8dot needs Dk a multiple of 4 and Dv a multiple of 2")
        if max(p.dim_k, p.dim_v) > 256:
            reasons.append("int8dot takes head dims up to 256")
    elif name == "int8coopmat":
        if not int8_coopmat(caps):
            reasons.append(f"device lacks the {'x'.join(map(str, COOPMAT_SHAPE))} s8*s8+s32 or the 16x16x16 "
                           "f16*f16+f32 subgroup cooperative matrix")
        if p.dim_k % 32 or p.dim_v % 16 or max(p.dim_k, p.dim_v) > 128:
            reasons.append("int8coopmat needs Dk a multiple of 32, Dv a multiple of 16, both at most 128")
        if caps.min_subgroup_size not in (0, caps.max_subgroup_size):
            reasons.append("int8coopmat needs a fixed subgroup size (4 subgroups of the reported size per workgroup)")
        if p.dtype == "bfloat16":
            reasons.append("int8coopmat runs P·V in fp16: bfloat16 runs on int8dot (P·V in bf16)")
        elif coopmat_shared_bytes(_coopmat_kernel(caps, p)) > caps.shared_memory:
            reasons.append(f"int8coopmat needs {coopmat_shared_bytes(_coopmat_kernel(caps, p))} B of shared memory")
    else:
        reasons.append(f"unknown int8 variant {name!r}; expected one of {VARIANTS}")
    return reasons


def choose(caps: DeviceCaps, p: Problem, snapshot: Optional[knobs.Snapshot] = None) -> Tuple[Optional[Int8Config],
                                                                                            Tuple[str, ...]]:
    """``(config, ())`` of the int8 forward for ``p`` on this device, or ``(None, reasons)``.
    ``AULE_KP_FORCE_VARIANT`` (or the backend's ``variant``) pins one of ``VARIANTS``."""
    snap = snapshot or knobs.current()
    names = [snap.force_variant] if snap.force_variant in VARIANTS else list(AUTOMATIC)
    why: Dict[str, List[str]] = {name: variant_reasons(name, caps, p) for name in names}
    usable = [name for name in names if not why[name]]
    if not usable:
        detail = "; ".join(f"{n}: {', '.join(r)}" for n, r in why.items())
        return None, (f"no Vulkan int8 kernel variant can run this problem ({detail})",)
    kernel = (_coopmat_kernel if usable[0] == "int8coopmat" else _dot_kernel)(caps, p)
    cfg = Int8Config(kernel, _quant_kernel(p))
    reasons = []
    for k in (kernel, cfg.quant):
        if k.wg > caps.max_workgroup_invocations:
            reasons.append(f"{k.kernel} needs {k.wg} invocations per workgroup, device allows "
                           f"{caps.max_workgroup_invocations}")
    tall = query_tiles_reason(p, kernel.br, caps.max_workgroup_count[1])
    reasons += [tall] if tall else []
    n_groups = p.batch * p.heads_kv
    if p.group * n_groups > MAX_GRID or n_groups > caps.max_workgroup_count[0]:
        reasons.append(f"{p.group * n_groups} query heads x batch: over one dispatch's grid (int8 plans are not split)")
    limit = binding_limit(caps.max_storage_buffer_range)
    reasons += [f"its {name} buffer needs {n_groups * size} B in one binding: over the {limit} B storage binding "
                "limit (int8 plans are not split)" for name, size in int8_group_bytes(p).items()
                if n_groups * size > limit]
    if mask_bytes(p) > limit:
        reasons.append(f"the mask is over the {limit} B storage binding limit")
    if caps.type == "cpu":
        reasons += [f"{what} would loop {n} times per invocation; CPU drivers (lavapipe) stop at {CPU_LOOP_LIMIT}"
                    for what, n in cpu_loops(kernel, p).items() if n > CPU_LOOP_LIMIT]
    return (None, tuple(reasons)) if reasons else (cfg, ())


class Int8Plan(Plan):
    """The int8 forward's buffers and two pipelines, one chunk of every (batch, kv-head) group.
    Reusable as the fp forward's plans are (plan.py): buffers of ``capacity`` bytes (``need_bytes``
    names them) serve every problem of the same pipelines that fits them, bound in turn."""

    def __init__(self, device: Any, problem: Problem, config: Int8Config, capacity: Dict[str, int]):
        kp = device.kp
        p = problem
        io_names = (*INPUTS, *OUTPUTS)
        ((g0, g1),) = self._chunk_groups(device, p, config, {n: capacity[n] for n in io_names}, None,
                                         "(batch, head) slice", capacity)
        n = g1 - g0
        tensors, memory = self._io_tensors({name: capacity[name] for name in io_names}, OUTPUTS)
        tensors["mask"] = self.mask
        for name in SCRATCH:
            words = max(math.ceil(capacity[name] / 4), 1)
            tensors[name] = device.manager.tensor_t(np.zeros(words, np.uint32), kp.TensorTypes.device)
            self.nbytes += 2 * 4 * words  # device memory and its staging copy
        bound = [tensors[name] for name in (*BINDINGS, *SCRATCH)]
        push = push_constants(p, g0)
        quant = self._algorithm(bound, config.quant.kernel, config.quant.spec(), (n, 1, 1), push)
        attention = self._algorithm(bound, config.kernel.kernel, config.kernel.spec(),
                                    query_grid(p, n * p.group, config.kernel.br), push)
        self.chunks.append(Chunk(g0, g1, tensors, [quant, attention], memory=memory))
        self.host_io = True
        self.device_check = False  # the output's finite check stays in the host's copy threads
        self.pipelined = False
        self.bind(p, config)
        stats["plans"] += 1

    def record(self, sequence: Any, transfers: bool, chunks: Optional[List[Chunk]] = None) -> Any:
        """Inputs up (with ``transfers``), the quantize pass, the attention, outputs back."""
        kp = self.device.kp
        p = self.problem
        (c,) = self.chunks
        inputs = [c.tensors[name] for name in INPUTS] if transfers else []
        if p.has_mask:
            inputs.append(self.mask)
        if inputs:
            sequence.record(kp.OpTensorSyncDevice(inputs))
        quant, attention = c.algorithms
        n = c.g1 - c.g0
        push = push_constants(p, c.g0)
        self._set_grid(quant, (n, 1, 1))
        sequence.record(kp.OpAlgoDispatch(quant, push))
        # The attention reads what the quantize pass wrote. kp records no compute -> compute barrier:
        # syncing the scratch out records compute -> transfer, and the next dispatch's own
        # transfer -> compute barrier on the same buffers completes the dependency (as backward.py).
        sequence.record(kp.OpTensorSyncLocal([c.tensors[name] for name in SCRATCH]))
        self._set_grid(attention, query_grid(p, n * p.group, self.config.kernel.br))
        sequence.record(kp.OpAlgoDispatch(attention, push))
        if transfers:
            sequence.record(kp.OpTensorSyncLocal([c.tensors[name] for name in OUTPUTS]))
        return sequence


def need_bytes(p: Problem) -> Dict[str, int]:
    """Bytes each buffer of an int8 plan needs for ``p`` (every group in one chunk, the mask)."""
    n_groups = p.batch * p.heads_kv
    return dict({name: n_groups * size for name, size in int8_group_bytes(p).items()}, mask=mask_bytes(p))


def int8_plan(device: Any, problem: Problem, config: Int8Config) -> Int8Plan:
    """The device's plan of ``config``'s pipelines, bound to ``problem``: reused while the problem
    fits its buffers, else replaced by a larger one (``plan.capacity``). Call under ``device.lock``."""
    limit = binding_limit(device.caps.max_storage_buffer_range)
    need = need_bytes(problem)

    def build(old: Optional[Int8Plan]) -> Int8Plan:
        return Int8Plan(device, problem, config, capacity(device, old and old.capacity, need, limit))

    return device.plans.fitted(("int8", config, limit), need, build).bind(problem, config)


def run_forward(device: Any, problem: Problem, config: Int8Config, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                mask: Optional[np.ndarray], *, alibi: Optional[np.ndarray] = None,
                sinks: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """One host-path int8 forward: ``(out, lse)`` as ``Backend.forward`` (ValueError for non-finite
    inputs or float32 v beyond fp16's range, ``aule_kp.quant.check_values``). The kernels' lse is
    that of the smoothed scores: the host adds the smoothing shift back (``quant.lse_shift``).
    ``alibi``/``sinks``: never given (``call.prepare`` refuses score modifiers with int8)."""
    if alibi is not None or sinks is not None:
        raise ValueError("precision='int8' takes no alibi_slopes or sinks")
    p = problem
    qf, kf, _ = check_host_values(q, k, v, p.dtype)
    with device.lock:
        out, lse, finite = int8_plan(device, p, config).run_checked(q, k, v, mask)
    # The kernel saturates the mask (fa2_common.glsl's mask_term): a NaN or +inf entry in a row's band
    # makes that row NaN here, as aule_kp.nonfinite says.
    enforce(p, q, k, v, mask, out, lse, out_finite=finite)
    return out, lse + lse_shift(qf, key_mean(kf), p.scale)
