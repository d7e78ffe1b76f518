"""Plans: persistent kp tensors, algorithms and recorded sequences, reused across calls.

A plan holds, per chunk of whole (batch, kv-head) groups, the buffers one dispatch binds and the
algorithm (a pipeline bound to them), and the sequence recorded for the Problem it is bound to
(inputs copied into mapped memory, the dispatches, the outputs copied out). Calls write into the
tensors' mapped memory, ``eval()`` that sequence and copy the outputs out.

Pipelines are what a plan costs: building one compiles it (0.5-5 ms on a GPU, 0.1-0.3 s and
up to 11 MB of JIT code on lavapipe, ``PIPELINE_BYTES``). So plans are not one Problem's: the shaders
read every length, head count and group offset from push constants, so a *reusable* plan (one
chunk: every group fits one binding) is keyed by its pipeline and serves any problem whose data fits
its buffers, packed at the problem's own lengths. Buffers are sized in powers of two (quarter
octaves where calls copy them whole through staging, ``capacity``); a problem that does not fit
replaces the plan with a larger one, so a decode loop whose keys grow by one per step rebuilds a few
times, not once per token. Binding a plan to
another problem records a sequence for it (push constants, and the grid through the patched kp's
``Algorithm.set_workgroup``; without it the grid is part of the plan's key, and plans are reused only
among problems of one grid); the last few stay recorded. A re-record costs ~70 us, and destroying
the sequence it displaces ~80 us, on lavapipe: a decode step whose key length changed pays both.
Problems over one binding, split into chunks, and pipelined host calls get *exact* plans, keyed by
their Problem. The cache (``PlanCache``) is a least-recently-used set bounded by what plans hold:
buffers, staging and pipelines.

Large host calls on a discrete GPU are pipelined (``pipeline_chunks``): the groups are split into a
few chunks, each with its own sequence, so that the GPU computes one chunk while the host copies the
next one in, and the host copies a chunk's output out while later chunks compute.
"""

from __future__ import annotations

import logging
import math
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Collection, Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np

from .. import knobs
from ..dtypes import ITEMSIZE, STORAGE
from ..nonfinite import all_finite, enforce
from ..problem import Problem
from ..rotary import RotaryTables
from . import rope
from .configs import MAX_GRID, ForwardConfig, KernelConfig, SplitKVConfig, score_spec
from .hostcopy import copy_bytes
from .probe import parallelism

log = logging.getLogger("aule_kp")

#: Counters tests use to show what calls create: plans, algorithms (pipelines), sequences recorded
#: when a plan is bound to another problem, and evaluations.
stats: Dict[str, int] = {"plans": 0, "algorithms": 0, "records": 0, "evals": 0}

#: Smallest buffer of a reusable plan: small problems share one plan per pipeline (a decode loop's
#: K of 256 KiB is 1024 keys of a kv head pair at D 64 in fp16 before the plan first grows).
MIN_CAPACITY_BYTES = 256 << 10
#: The same where calls copy whole buffers through staging (``staged``): small calls stay small.
MIN_STAGED_BYTES = 16 << 10
#: Sequences a reusable plan keeps recorded for the problems it was bound to last (a model whose
#: layers alternate between a few shapes does not re-record per call).
RECORDED_SEQUENCES = 8
#: What one pipeline holds in host memory, by device type. lavapipe (Mesa 22.3.6, LLVM 15, measured
#: 2026-12-05, benchmarks/memory_growth.py --pipelines): 0.4-11 MB of JIT code per pipeline of these
#: kernels (forward 4.5-11, split-KV 2.6-4.8, backward 0.4-11 each), given back at the first queue
#: submission after vkDestroyPipeline (lavapipe destroys pipelines on its queue thread). GPU drivers
#: keep compiled code in device memory and little on the host: not measured, an allowance.
PIPELINE_BYTES = {"cpu": 8 << 20}
GPU_PIPELINE_BYTES = 512 << 10

LOG2E = 1.4426950408889634
#: Per-group buffers of float32 values; the others hold ``Problem.dtype`` data packed in uint32 words.
FLOAT_BUFFERS = frozenset({"lse", "stats", "ds"})


def binding_limit(max_storage_buffer_range: int) -> int:
    """Largest buffer one binding may cover (``AULE_KP_MAX_BINDING_BYTES`` lowers it, for tests)."""
    override = knobs.current().max_binding_bytes
    return min(max_storage_buffer_range, override) if override else max_storage_buffer_range


def group_bytes(p: Problem) -> Dict[str, int]:
    """Bytes each buffer needs per (batch, kv-head) group."""
    isz = ITEMSIZE[p.dtype]
    return {
        "q": p.group * p.len_q * p.dim_k * isz,
        "k": p.len_k * p.dim_k * isz,
        "v": p.len_k * p.dim_v * isz,
        "o": p.group * p.len_q * p.dim_v * isz,
        "lse": p.group * p.len_q * 4,
    }


def groups_that_fit(p: Problem, limit: int, sizes: Dict[str, int]) -> int:
    """How many groups one dispatch can bind when each needs ``sizes`` bytes per buffer (0: a single
    group is over the limit)."""
    per_buffer = min(limit // max(b, 1) for b in sizes.values())
    return min(per_buffer, MAX_GRID // p.group)  # the query heads of one dispatch span x and z of query_grid


def groups_per_chunk(p: Problem, limit: int, config: Optional[ForwardConfig] = None) -> int:
    """How many groups one forward dispatch can bind (0: a single group is over the limit), counting
    the scratch buffers of a split-KV ``config``."""
    scratch = config.group_bytes(p) if isinstance(config, SplitKVConfig) else {}
    return groups_that_fit(p, limit, dict(group_bytes(p), **scratch))


#: Host calls that move fewer bytes (inputs and output) run as one submission.
PIPELINE_MIN_BYTES = 32 << 20
#: Chunks a pipelined call is split into: the first chunk's copy and the last chunk's output copy
#: are what the pipeline leaves exposed.
PIPELINE_CHUNKS = 4


def pipeline_chunks(device: Any, p: Problem, config: ForwardConfig) -> int:
    """Chunks the host path of ``p`` is split into so that copies overlap the kernels (1: none).

    Discrete GPUs with the patched kp (``eval_async`` that submits without waiting), forward
    kernels (not split-KV, whose grid is sized for all groups at once), calls moving at least
    ``PIPELINE_MIN_BYTES``, and only while each chunk's grid still has two workgroups per unit of
    the device's parallelism. ``AULE_KP_PIPELINE_CHUNKS`` forces a count (tests; 1: never).
    """
    n_groups = p.batch * p.heads_kv
    patched = device.kp_patch >= 2
    forced = knobs.current().pipeline_chunks
    if forced is not None:
        return min(forced, n_groups) if patched else 1
    if (not patched or device.host_memory or not isinstance(config, KernelConfig)
            or n_groups < 2):
        return 1
    sizes = group_bytes(p)
    moved = n_groups * (sizes["q"] + sizes["k"] + sizes["v"] + sizes["o"])
    pieces = min(PIPELINE_CHUNKS, n_groups)
    tiles = math.ceil(p.len_q / config.br) * p.group * (n_groups // pieces)
    return pieces if moved >= PIPELINE_MIN_BYTES and tiles >= 2 * parallelism(device.caps) else 1


def mask_strides(p: Problem) -> Tuple[int, int, int, int]:
    """Element strides of the contiguous mask over [B, Hq, Lq, Lk]; 0 on broadcast dims."""
    if p.mask_shape is None:
        return (0, 0, 0, 0)
    shape = p.mask_shape
    strides = np.cumprod((1,) + shape[:0:-1])[::-1]
    return tuple(int(s) if n > 1 else 0 for s, n in zip(strides, shape))


def float_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def push_constants(p: Problem, group0: int) -> np.ndarray:
    """Push constants in the order of ``Push`` in glsl/fa2_common.glsl. The ALiBi slopes, then the
    sinks, follow the mask in the mask buffer (``mask_bytes``, ``write_mask_payload``)."""
    signed = [p.diag, -1 if p.left is None else p.left, -1 if p.right is None else p.right]
    sb, sh, si, sj = mask_strides(p)
    alibi_base = math.prod(p.mask_shape) if p.mask_shape else 0
    vals = [p.len_q, p.len_k, p.group, p.heads_kv, group0, float_bits(p.scale * LOG2E),
            *(x & 0xFFFFFFFF for x in signed), int(p.has_mask), sb, sh, si, sj, p.heads_q,
            float_bits(p.softcap * LOG2E), alibi_base, p.heads_q if p.alibi_rows > 1 else 0,
            alibi_base + p.alibi_rows * p.heads_q]
    return np.array(vals, dtype=np.uint32)


def query_tiles_reason(p: Problem, br: int, max_grid_y: int) -> Optional[str]:
    """Why a kernel over query tiles of ``br`` rows cannot cover ``p`` in one grid (None: it can)."""
    tiles = math.ceil(p.len_q / br)
    if tiles > max_grid_y:
        return (f"{p.len_q} query rows need {tiles} query tiles of {br}: over the device's "
                f"{max_grid_y} workgroups in grid y")
    return None


#: K and V bytes the query heads of one scheduling section read (query_grid, glsl/fa2_common.glsl
#: query_head(): longest query tiles first within a section, sections one after another). A fixed
#: budget, not derived from the device (Vulkan does not report cache sizes): on an H200 (50 MiB L2)
#: 16 MiB beat one head per section on most shapes, and 8 or 32 MiB were no better (BENCHMARKS.md,
#: "Notes moved from the sources"). AULE_KP_SECTION_BYTES overrides it; it is read when a plan is
#: built, so plans already cached for a shape keep their order.
SECTION_BYTES = 16 << 20


def section_heads(problem: Problem) -> int:
    """Query heads per scheduling section: as many as keep the K and V they read within the section
    budget (``AULE_KP_SECTION_BYTES``, else SECTION_BYTES)."""
    budget = knobs.current().section_bytes or SECTION_BYTES
    head_bytes = problem.len_k * (problem.dim_k + problem.dim_v) * ITEMSIZE[problem.dtype] / problem.group
    return max(1, int(budget // max(head_bytes, 1)))


def query_grid(p: Problem, heads: int, br: int) -> Tuple[int, int, int]:
    """Grid of a kernel over (query tile, query head) pairs (glsl/fa2_common.glsl ``query_head``):
    x = head within a section, y = query tile, z = section. A section is the largest divisor of
    ``heads`` within ``section_heads(p)`` (so the grid is exact and the shader checks nothing; a
    head count with no such divisor above 1, e.g. a prime one, runs one head per section)."""
    per = max(d for d in range(1, min(heads, section_heads(p)) + 1) if heads % d == 0)
    return per, math.ceil(p.len_q / br), heads // per


def dispatch(config: ForwardConfig, p: Problem, n_groups: int,
             group0: int) -> Tuple[KernelConfig, Tuple[int, int, int], np.ndarray]:
    """(pipeline, grid, push constants) of the dispatch over the chunk of ``n_groups`` groups from ``group0``."""
    if isinstance(config, SplitKVConfig):
        return config.dispatch(p, n_groups, push_constants(p, group0))
    return config, query_grid(p, n_groups * p.group, config.br), push_constants(p, group0)


def pipeline_bytes(device: Any) -> int:
    """Host memory one pipeline holds on ``device`` (``PIPELINE_BYTES``)."""
    return PIPELINE_BYTES.get(device.caps.type, GPU_PIPELINE_BYTES)


def grids_settable(kp: Any) -> bool:
    """Whether one algorithm can be dispatched with several grids (the patched kp's
    ``Algorithm.set_workgroup``); without it a plan serves only the grid it was built with."""
    return hasattr(kp.Algorithm, "set_workgroup")


def staged(device: Any) -> bool:
    """Whether a plan's inputs or outputs go through staging buffers, copied whole on every call
    (``Device.staged``)."""
    return device.staged


def round_up(n: int, steps: int) -> int:
    """The smallest ``m * 2**k >= n`` with ``steps <= m < 2 * steps`` (``steps`` a power of two: the
    sizes per octave)."""
    unit = 1 << max(0, n.bit_length() - steps.bit_length())
    return -(-n // unit) * unit


def capacity(device: Any, old: Optional[Dict[str, int]], need: Dict[str, int], limit: int) -> Dict[str, int]:
    """Buffer sizes of a reusable plan that must hold ``need`` bytes per buffer and what ``old``
    held, at most ``limit`` (one binding). Powers of two of at least ``MIN_CAPACITY_BYTES``; where
    every call copies whole buffers through staging, quarter octaves of at least
    ``MIN_STAGED_BYTES`` (a call then moves at most a quarter more than it needs)."""
    steps, least = (4, MIN_STAGED_BYTES) if staged(device) else (1, MIN_CAPACITY_BYTES)
    old = old or {}
    return {name: min(limit, max(old.get(name, 0), least, round_up(n, steps))) for name, n in need.items()}


def mask_bytes(p: Problem) -> int:
    """Bytes of the mask buffer's data for ``p``: the float32 mask, then the ALiBi slopes
    (``alibi_rows x heads_q``), then the sinks (``heads_q``); 0 bytes with none of them."""
    mask = math.prod(p.mask_shape) if p.mask_shape else 0
    return 4 * (mask + p.alibi_rows * p.heads_q + (p.heads_q if p.sinks else 0))


def uses_mask_buffer(p: Problem) -> bool:
    """Whether the kernels of ``p`` read the mask buffer (a mask, slopes or sinks): it is uploaded then."""
    return p.has_mask or p.alibi_rows > 0 or p.sinks


def write_mask_payload(view: np.ndarray, mask: Optional[np.ndarray], alibi: Optional[np.ndarray],
                       sinks: Optional[np.ndarray] = None) -> None:
    """The mask buffer's data (``mask_bytes``) into its mapped ``view``: the mask, the slopes, the sinks."""
    n = 0
    for part in (mask, alibi, sinks):
        if part is not None:
            view[n:n + part.size] = part.reshape(-1)
            n += part.size


def forward_bytes(p: Problem, config: ForwardConfig, n_groups: int) -> Dict[str, int]:
    """Bytes each buffer of a forward dispatch over ``n_groups`` groups needs, split-KV scratch included."""
    per = dict(group_bytes(p), **(config.group_bytes(p) if isinstance(config, SplitKVConfig) else {}))
    return {name: n_groups * b for name, b in per.items()}


def pipeline_of(config: ForwardConfig) -> KernelConfig:
    """The pipeline a forward config runs (split counts and lengths are push constants)."""
    return config.kernel if isinstance(config, SplitKVConfig) else config


#: Binding order of the forward kernels (glsl/fa2_fwd*.comp); split-KV adds SPLITKV_SCRATCH after.
BINDINGS = ("q", "k", "v", "o", "lse", "mask")
SPLITKV_SCRATCH = ("partial_o", "partial_ml", "counters")
INPUTS = ("q", "k", "v")
#: A rotary plan's rotated inputs: the device buffers its rotary pass writes, which the attention binds.
ROTATED = {"q": "q_rot", "k": "k_rot"}


def rotated_inputs(p: Problem) -> Dict[str, str]:
    """The inputs ``p``'s rotary pass writes rotated copies of, by name (``ROTATED``): q, and k
    unless it comes rotated already (a cache of rotated keys: the attention then binds k itself)."""
    if p.rotary is None:
        return {}
    return ROTATED if p.rotary.rotate_k else {"q": ROTATED["q"]}
OUTPUTS = ("o", "lse")
#: A host call's output check on the device (glsl/nonfinite_count.comp): its counter's name, and the
#: workgroups of its grid-stride pass (fixed: no grid to record per problem).
NONFINITE = "nonfinite"
NONFINITE_GROUPS = 256
#: The kp patch that has ``aule_compute_barrier``, which the device-side check needs.
COMPUTE_BARRIER_PATCH = 5


@dataclass
class Chunk:
    """The dispatches of a forward or backward plan over kv groups ``[g0, g1)``, their kp tensors
    by binding name and, for the tensors the host writes or reads, views of their mapped memory
    for the problem the plan is bound to."""

    g0: int
    g1: int
    tensors: Dict[str, Any]  # kp tensors by binding name (the plan's mask and device-only scratch included)
    algorithms: List[Any]  # forward: the one dispatch's; backward: pre, dkdv, dq
    memory: Dict[str, np.ndarray] = field(default_factory=dict)  # host-copied tensors' whole mapped memory, as bytes
    views: Dict[str, np.ndarray] = field(default_factory=dict)  # the bound problem's bytes of ``memory``
    input_ranges: Dict[str, Tuple[int, int]] = field(default_factory=dict)  # forward: inputs' bytes in the caller's
    sequence: Any = None  # pipelined forward host calls: this chunk's transfers and dispatch

    def input_pairs(self, qkv: Sequence[np.ndarray]) -> List[Tuple[np.ndarray, np.ndarray]]:
        """(mapped memory, bytes of the caller's array) for the forward inputs ``q, k, v`` of this
        chunk: what ``copy_bytes`` copies in."""
        pairs = []
        for name, x in zip(INPUTS, qkv):
            lo, hi = self.input_ranges[name]
            pairs.append((self.views[name], x.reshape(-1).view(np.uint8)[lo:hi]))
        return pairs


def mapped_memory(tensor: Any) -> np.ndarray:
    """``tensor.data()``, the array over a kp tensor's mapped memory, checked to be one: a kp binding
    built with pybind11 < 2.12 hands numpy 2 arrays of stride 0 (every element the first word), so
    nothing written or read through them would be the tensor's."""
    data = tensor.data()
    if data.ndim != 1 or data.strides[0] != data.itemsize:
        raise RuntimeError(
            f"kp returned an array of strides {data.strides} for a tensor of {data.dtype}: this kp was built "
            f"with pybind11 < 2.12, which cannot exchange arrays with numpy {np.__version__}; install the "
            "aule-kp wheel (its own kp works with numpy 1 and 2), rebuild kp with pybind11>=2.12, or use numpy<2")
    return data


class RecordedPlan:
    """What every plan shares: a mask tensor, chunks of whole (batch, kv-head) groups holding their
    algorithms and tensors, the sequence recorded for the bound problem, and ``nbytes``, what the
    plan cache bounds. ``capacity``: buffer bytes of a reusable plan (None: an exact plan, built for
    its one problem)."""

    device: Any
    problem: Problem
    config: Any
    sequence: Any
    chunks: List[Chunk]
    capacity: Optional[Dict[str, int]]

    def _chunk_groups(self, device: Any, problem: Problem, config: Any, per: Dict[str, int],
                      fit: Optional[Callable[[int], int]], what: str,
                      capacity: Optional[Dict[str, int]] = None) -> List[Tuple[int, int]]:
        """Makes the mask tensor, starts ``nbytes`` and returns the chunks' group ranges ``[g0, g1)``.

        ``per``: bytes per group that ``nbytes`` counts (twice where staging buffers back the
        tensors). ``fit(limit)``: how many groups one dispatch can bind under the storage binding
        limit; None for one chunk of all groups. ``what`` names a group in the error raised when
        not even one fits. ``capacity``: a reusable plan's buffer sizes (one chunk).
        """
        self.device = device
        self.problem = p = problem
        self.config = config
        self.capacity = capacity
        self._recorded: OrderedDict[Hashable, Any] = OrderedDict()
        self._fitted: Optional[Dict[str, int]] = None
        self.sequence = None
        n_groups = p.batch * p.heads_kv
        limit = binding_limit(device.caps.max_storage_buffer_range)
        step = n_groups if fit is None or capacity is not None else fit(limit)
        if step < 1:
            raise ValueError(f"one {what} needs {max(per.values())} B, over the device's storage binding "
                             f"limit of {limit} B")
        size = capacity["mask"] if capacity is not None else mask_bytes(p)
        self.mask = device.io_tensor(np.zeros(max(size // 4, 1), np.float32), "in")
        self.mask_memory = mapped_memory(self.mask)
        self.mask_view = self.mask_memory[: mask_bytes(p) // 4]
        # The rotary pass's cos/sin rows (rope.py): a plan-held buffer like the mask.
        size = capacity.get("rotary", 0) if capacity is not None else rope.rotary_bytes(p)
        self.rotary = device.io_tensor(np.zeros(max(size // 4, 1), np.float32), "in") if p.rotary else None
        self.rotary_memory = None if self.rotary is None else mapped_memory(self.rotary)
        self.rotary_view = None if self.rotary is None else self.rotary_memory[: rope.rotary_bytes(p) // 4]
        staged = 2 if not (device.host_memory or device.direct_io) else 1
        held = sum(v for k, v in capacity.items() if k in per) if capacity is not None else n_groups * sum(per.values())
        self.nbytes = self.mask_memory.nbytes + held * staged
        # Without kp's compute -> compute barrier, the rotated q and k are device tensors behind
        # staging (see Plan.record).
        self.rotary_staged = p.rotary is not None and device.kp_patch < COMPUTE_BARRIER_PATCH
        if self.rotary is not None:
            self.nbytes += self.rotary_memory.nbytes
        self.chunks = []
        return [(g0, min(n_groups, g0 + step)) for g0 in range(0, n_groups, step)]

    def _io_tensors(self, sizes: Dict[str, int],
                    outputs: Collection[str]) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
        """Tensors of ``sizes`` bytes (at least one word: every binding needs a buffer) that the
        host writes on every call, or reads when named in ``outputs`` (``Device.io_tensor`` picks
        their memory), and their whole mapped memory as bytes."""
        tensors = {name: self.device.io_tensor(
                       np.zeros(max(math.ceil(size / 4), 1), np.float32 if name in FLOAT_BUFFERS else np.uint32),
                       "out" if name in outputs else "in")
                   for name, size in sizes.items()}
        return tensors, {name: mapped_memory(t).view(np.uint8) for name, t in tensors.items()}

    def _algorithm(self, tensors: List[Any], kernel: str, spec: np.ndarray,
                   grid: Tuple[int, int, int], push: np.ndarray) -> Any:
        """A new algorithm (pipeline of glsl/``kernel``.comp) bound to ``tensors``; ``nbytes`` counts
        what it holds."""
        stats["algorithms"] += 1
        self.nbytes += pipeline_bytes(self.device)
        return self.device.manager.algorithm(tensors, self.device.spirv(kernel), grid, spec, push)

    def fits(self, need: Dict[str, int]) -> bool:
        """Whether this reusable plan's buffers hold ``need`` bytes each (a route's ``need`` is one
        dict, asked again on every call: the last one that fitted is remembered)."""
        if need is self._fitted:
            return True
        ok = self.capacity is not None and all(n <= self.capacity.get(name, 0) for name, n in need.items())
        if ok:
            self._fitted = need
        return ok

    def bind(self, problem: Problem, config: Any) -> RecordedPlan:
        """Makes ``problem`` (run with ``config``, of this plan's pipelines) the one the next calls
        run: the mapped-memory views for its sizes and a sequence recorded for its push constants
        and grids (one of the last ``RECORDED_SEQUENCES`` when it was bound before)."""
        key = (problem, config)
        if self.sequence is not None and key == (self.problem, self.config):
            return self
        if self.capacity is None and self.sequence is not None:
            raise ValueError(f"this plan runs {self.problem} only")
        # Bound to nothing until the new sequence is in place: were recording to fail (out of memory,
        # KeyboardInterrupt), the next bind to this problem must record again, not run the last one's.
        self.sequence = None
        self.problem, self.config = problem, config
        self._bind_views()
        sequence = self._recorded.pop(key, None)
        if sequence is None:
            sequence = self.record(self.device.manager.sequence(), transfers=True)
            stats["records"] += 1
        self._recorded[key] = self.sequence = sequence
        while len(self._recorded) > RECORDED_SEQUENCES:
            self._recorded.popitem(last=False)[1].destroy()
        return self

    def _bind_views(self) -> None:
        """Points the chunks' views at the bound problem's bytes (a reusable plan's one chunk
        covers all its groups)."""
        raise NotImplementedError

    def _set_grid(self, algorithm: Any, grid: Tuple[int, int, int]) -> None:
        """Sets the grid the next dispatch of ``algorithm`` is recorded with (a plan whose kp cannot
        set grids is only ever bound to problems of the grid it was built with: see its key)."""
        if grids_settable(self.device.kp):
            algorithm.set_workgroup(*grid)

    def record(self, sequence: Any, transfers: bool) -> Any:
        raise NotImplementedError

    def eval(self) -> None:
        self.sequence.eval()
        stats["evals"] += 1

    def destroy(self) -> None:
        for sequence in self._recorded.values():
            sequence.destroy()
        self._recorded.clear()
        self.sequence = None
        for c in self.chunks:
            for algorithm in c.algorithms:
                algorithm.destroy()
            if c.sequence is not None:
                c.sequence.destroy()
        self.chunks.clear()


class Plan(RecordedPlan):
    """The forward's buffers and pipeline on one device, built once, bound to ``problem``.

    ``config``: a forward KernelConfig or a SplitKVConfig (its scratch buffers are the plan's, made
    once, the counters zeroed once). ``capacity``: buffer bytes of a reusable plan, one chunk that
    later problems of the same pipeline may be bound to (``forward_plan``); None: an exact plan for
    ``problem``. ``io``: kp tensors ``(q, k, v, o)`` owned by the caller (the GpuTensor path). Then
    the plan has one chunk bound to them and its sequence only dispatches: data stays on the device.
    """

    def __init__(self, device: Any, problem: Problem, config: ForwardConfig, io: Optional[Sequence[Any]] = None,
                 capacity: Optional[Dict[str, int]] = None):
        kp = device.kp
        mgr = device.manager
        p = problem
        per = group_bytes(p)
        pieces = pipeline_chunks(device, p, config) if io is None and capacity is None else 1
        if io is None:
            most = math.ceil(p.batch * p.heads_kv / pieces)
            groups = self._chunk_groups(device, p, config, per,
                                        lambda limit: min(groups_per_chunk(p, limit, config), most),
                                        "(batch, head) slice", capacity)
        elif p.rotary is not None:
            raise ValueError("the GpuTensor path has no fused rotary (rotate the tensors first)")
        elif p.group * p.batch * p.heads_kv > MAX_GRID:
            raise ValueError(f"the GpuTensor path takes at most {MAX_GRID} query heads x batch per call")
        else:
            # The caller's tensors stay on the device: nothing to copy per call, so no bytes to count.
            groups = self._chunk_groups(device, p, config, {}, None, "(batch, head) slice")
        # The output's finite check (aule_kp.nonfinite) runs on the device where kp has the barrier it
        # needs; else in the host's copy threads.
        self.device_check = io is None and device.kp_patch >= COMPUTE_BARRIER_PATCH
        zeroed: List[Any] = []
        for g0, g1 in groups:
            n = g1 - g0
            sizes = capacity if capacity is not None else forward_bytes(p, config, n)
            io_sizes = {name: sizes[name] for name in (("q", "k", "v", "o", "lse") if io is None else ("lse",))}
            if self.device_check:
                io_sizes[NONFINITE] = 4
            tensors, memory = self._io_tensors(io_sizes, (*OUTPUTS, NONFINITE))
            if p.rotary is not None:
                kind = kp.TensorTypes.device if self.rotary_staged else kp.TensorTypes.storage
                for name, rotated in rotated_inputs(p).items():
                    words = max(math.ceil(sizes[name] / 4), 1)
                    tensors[rotated] = mgr.tensor_t(np.zeros(words, np.uint32), kind)
                    self.nbytes += 4 * words * (2 if self.rotary_staged else 1)
            if io is not None:
                tensors.update(zip((*INPUTS, "o"), io))
            tensors["mask"] = self.mask
            # Split-KV scratch lives on the device only. The partials need no initial value; the
            # counters must start at zero (the shader puts them back after each call): device
            # tensors, whose zeros are copied up once below (storage tensors are uninitialised).
            split = isinstance(config, SplitKVConfig)
            if split:
                for name in SPLITKV_SCRATCH:
                    words = max(sizes[name] // 4, 1)
                    tensors[name] = (mgr.tensor_t(np.zeros(words, np.uint32), kp.TensorTypes.device)
                                     if name == "counters"
                                     else mgr.tensor_t(np.zeros(words, np.float32), kp.TensorTypes.storage))
                    self.nbytes += 4 * words
                zeroed.append(tensors["counters"])
            attended = rotated_inputs(p)
            bound = [tensors[attended.get(name, name)] for name in (*BINDINGS, *(SPLITKV_SCRATCH if split else ()))]
            kc, grid, push = dispatch(config, p, n, g0)
            algorithms = [self._algorithm(bound, kc.kernel, kc.spec(mods=score_spec(p)), grid, push)]
            if self.device_check:
                algorithms.append(self._algorithm([tensors["o"], tensors[NONFINITE]], "nonfinite_count",
                                                  np.array([kc.dtype], np.uint32), (NONFINITE_GROUPS, 1, 1),
                                                  np.zeros(1, np.uint32)))
                zeroed.append(tensors[NONFINITE])  # a staged counter's device copy starts at zero too
            if p.rotary is not None:  # the rotary pass: the chunk's last algorithm
                rope_grid, rope_push = rope.dispatch(p, g0, n)
                # Without a k to rotate the pass writes no k row: k stands in for its output binding.
                k_out = tensors[attended.get("k", "k")]
                algorithms.append(self._algorithm([tensors["q"], tensors["k"], self.rotary, tensors["q_rot"], k_out],
                                                  rope.KERNEL, rope.spec(p.dtype), rope_grid, rope_push))
            self.chunks.append(Chunk(g0, g1, tensors, algorithms, memory=memory))

        if zeroed:
            init = mgr.sequence().record(kp.OpTensorSyncDevice(zeroed))
            init.eval()
            init.destroy()
        self.host_io = io is None
        self.bind(p, config)
        self.pipelined = pieces > 1 and len(self.chunks) > 1
        if self.pipelined:
            for i, c in enumerate(self.chunks):
                c.sequence = self.record(mgr.sequence(), transfers=True, chunks=self.chunks[i:i + 1])
        stats["plans"] += 1

    def _bind_views(self) -> None:
        p = self.problem
        per = group_bytes(p)
        if self.capacity is not None:
            self.chunks[0].g1 = p.batch * p.heads_kv
        self.mask_view = self.mask_memory[: mask_bytes(p) // 4]
        if self.rotary is not None:
            self.rotary_view = self.rotary_memory[: rope.rotary_bytes(p) // 4]
        if not self.host_io:
            return
        for c in self.chunks:
            n = c.g1 - c.g0
            c.views = {name: c.memory[name][: n * per[name]] for name in (*INPUTS, *OUTPUTS)}
            c.views["lse"] = c.views["lse"].view(np.float32)
            c.input_ranges = {name: (c.g0 * per[name], c.g1 * per[name]) for name in INPUTS}

    def record(self, sequence: Any, transfers: bool, chunks: Optional[List[Chunk]] = None) -> Any:
        """Records the call over ``chunks`` (default: all) of the bound problem into ``sequence``:
        with ``transfers`` (and host I/O), inputs to the device first and outputs back after;
        without, the dispatches alone (what benchmarks and tuning time). The mask goes up with the
        first chunk: later submissions are ordered after it by their own transfer barriers."""
        kp = self.device.kp
        p = self.problem
        chunks = self.chunks if chunks is None else chunks
        transfers = transfers and self.host_io
        inputs = [c.tensors[name] for c in chunks for name in INPUTS] if transfers else []
        if chunks[0] is self.chunks[0]:
            inputs += ([self.mask] if uses_mask_buffer(p) else []) + ([self.rotary] if p.rotary else [])
        if inputs:
            sequence.record(kp.OpTensorSyncDevice(inputs))
        if p.rotary is not None:
            for c in chunks:
                grid, push = rope.dispatch(p, c.g0, c.g1 - c.g0)
                self._set_grid(c.algorithms[-1], grid)
                sequence.record(kp.OpAlgoDispatch(c.algorithms[-1], push))
            # The attention reads what the rotary pass wrote: kp patch 5's compute -> compute barrier.
            # Without it, syncing the rotated (device) q and k to their staging records compute ->
            # transfer, and the attention dispatch's own transfer -> compute barrier on the same
            # buffers completes the dependency (as backward.py; one on-device copy of q and k).
            rotated = [c.tensors[name] for c in chunks for name in rotated_inputs(p).values()]
            sequence.record(kp.OpTensorSyncLocal(rotated) if self.rotary_staged else kp.aule_compute_barrier(rotated))
        # Chunks touch disjoint buffers (scratch included): their dispatches need no barrier between
        # them. A plan's dispatch must not be recorded twice in one sequence without one either:
        # split-KV's counters and partials are the plan's.
        for c in chunks:
            _, grid, push = dispatch(self.config, p, c.g1 - c.g0, c.g0)
            self._set_grid(c.algorithms[0], grid)
            sequence.record(kp.OpAlgoDispatch(c.algorithms[0], push))
        outputs = OUTPUTS
        if transfers and self.device_check:
            sequence.record(kp.aule_compute_barrier([c.tensors["o"] for c in chunks]))
            for c in chunks:
                elems = c.views["o"].nbytes // ITEMSIZE[p.dtype]
                sequence.record(kp.OpAlgoDispatch(c.algorithms[1], np.array([elems], np.uint32)))
            outputs = (*OUTPUTS, NONFINITE)
        if transfers:
            sequence.record(kp.OpTensorSyncLocal([c.tensors[name] for c in chunks for name in outputs]))
        return sequence

    def run(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: Optional[np.ndarray],
            alibi: Optional[np.ndarray] = None, sinks: Optional[np.ndarray] = None,
            rotary: Optional[RotaryTables] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Host arrays of the bound problem in (engine storage, contiguous), ``(out, lse)`` out (see
        Backend.forward; ``alibi``/``sinks``: the float32 slopes and sinks the problem has;
        ``rotary``: the cos/sin and positions that the plan's rotary pass applies to q and k)."""
        out, lse, _ = self.run_checked(q, k, v, mask, alibi, sinks, rotary)
        return out, lse

    def run_checked(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: Optional[np.ndarray],
                    alibi: Optional[np.ndarray] = None, sinks: Optional[np.ndarray] = None,
                    rotary: Optional[RotaryTables] = None) -> Tuple[np.ndarray, np.ndarray, bool]:
        """``run``, and whether ``out`` is all finite: checked piece by piece by the copy threads as
        they write it (a separate pass over a large output cost as much as the kernel).

        One copy each way between the caller's arrays and mapped memory, as raw bytes (packed
        16-bit data needs no conversion); the slices are computed when the plan is bound.
        """
        p = self.problem
        if q.shape != (p.batch, p.heads_q, p.len_q, p.dim_k) or k.shape != (p.batch, p.heads_kv, p.len_k, p.dim_k):
            raise ValueError(f"q {q.shape} and k {k.shape} are not the shapes of the problem this plan is bound to "
                             f"({p}); get the plan again for theirs")
        if (rotary is None) != (p.rotary is None):
            raise ValueError(f"this plan {'rotates' if p.rotary else 'does not rotate'} q and k: pass rotary "
                             f"{'tables' if p.rotary else 'None'}")
        inputs = [c.input_pairs((q, k, v)) for c in self.chunks]
        write_mask_payload(self.mask_view, mask, alibi, sinks)
        if rotary is not None:
            rope.write_payload(self.rotary_view, p, rotary)
        out = np.empty(sum(c.views["o"].nbytes for c in self.chunks), np.uint8)
        outputs, lo = [], 0
        for c in self.chunks:
            o = c.views["o"]
            outputs.append([(out[lo:lo + o.nbytes], o)])
            lo += o.nbytes
        check = None if self.device_check else partial(all_finite, dtype=p.dtype)
        counts = self._nonfinite_counts()
        if self.pipelined:
            finite = self._run_pipelined(inputs, outputs, check)
        else:
            copy_bytes([pair for pairs in inputs for pair in pairs])
            self.eval()
            finite = copy_bytes([pair for pairs in outputs for pair in pairs], check)
        if self.device_check:
            finite = self._nonfinite_counts() == counts
        lse = (np.concatenate([c.views["lse"] for c in self.chunks]) if len(self.chunks) > 1
               else self.chunks[0].views["lse"].copy())
        shape = (p.batch, p.heads_q, p.len_q)
        return out.view(STORAGE[p.dtype]).reshape(*shape, p.dim_v), lse.reshape(shape), finite

    def _nonfinite_counts(self) -> List[int]:
        """The chunks' device-side check counters (empty without the device-side check)."""
        if not self.device_check:
            return []
        return [int(c.memory[NONFINITE].view(np.uint32)[0]) for c in self.chunks]

    def _run_pipelined(self, inputs: List[List[Tuple[np.ndarray, np.ndarray]]],
                       outputs: List[List[Tuple[np.ndarray, np.ndarray]]],
                       check: Optional[Callable[[np.ndarray], bool]]) -> bool:
        """Chunk by chunk: copy in and submit, then (once all are submitted) wait for each and copy
        its output out, so copies overlap the kernels of other chunks. Whatever fails, every
        submitted sequence is waited for before returning (a running sequence cannot be resubmitted).
        Returns whether ``check`` passed on every piece of the outputs."""
        submitted: List[Chunk] = []
        finite = True
        try:
            for c, pairs in zip(self.chunks, inputs):
                copy_bytes(pairs)
                c.sequence.eval_async()
                submitted.append(c)
            stats["evals"] += 1
            for c, pairs in zip(self.chunks, outputs):
                c.sequence.eval_await()
                submitted.remove(c)
                finite = copy_bytes(pairs, check) and finite
        finally:
            for c in submitted:
                c.sequence.eval_await()
        return finite


def forward_plan(device: Any, problem: Problem, config: ForwardConfig) -> Plan:
    """The device's plan that runs ``problem`` with ``config``, bound to it: the reusable plan of the
    pipeline (built, or replaced by a larger one, when the problem does not fit), or an exact plan
    where the problem needs several chunks (over one binding, or pipelined). Call under ``device.lock``."""
    p = problem
    route_key = (p, config, knobs.current())
    route = device.plans.routes.get(route_key)
    if route is None:
        limit = binding_limit(device.caps.max_storage_buffer_range)
        n_groups = p.batch * p.heads_kv
        if pipeline_chunks(device, p, config) > 1 or groups_per_chunk(p, limit, config) < n_groups:
            route = ((p, config), None, limit)
        else:
            grid = None if grids_settable(device.kp) else dispatch(config, p, n_groups, 0)[1]
            if p.rotary is not None and not grids_settable(device.kp):
                grid = (grid, rope.dispatch(p, 0, n_groups)[0])
            # A rotary plan has another pass and device q (and k): never shared with plans without one,
            # nor across what it rotates (the attention binds k or its rotated copy).
            rotates = None if p.rotary is None else tuple(rotated_inputs(p))
            route = (("forward", pipeline_of(config), score_spec(p), limit, grid, rotates),
                     dict(forward_bytes(p, config, n_groups), mask=mask_bytes(p),
                          **({"rotary": rope.rotary_bytes(p)} if p.rotary else {})), limit)
        device.plans.remember(route_key, route)
    key, need, limit = route
    if need is None:
        return device.plans.get(key, lambda: Plan(device, p, config))

    def build(old: Optional[Plan]) -> Plan:
        return Plan(device, p, config, capacity=capacity(device, old and old.capacity, need, limit))

    return device.plans.fitted(key, need, build).bind(p, config)


def run_forward(device: Any, problem: Problem, config: ForwardConfig, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                mask: Optional[np.ndarray], *, alibi: Optional[np.ndarray] = None,
                sinks: Optional[np.ndarray] = None,
                rotary: Optional[RotaryTables] = None) -> Tuple[np.ndarray, np.ndarray]:
    """One host-path forward call: ``forward_plan(...).run(q, k, v, mask, alibi, sinks, rotary)``
    under ``device.lock``, then the non-finite repairs (``aule_kp.nonfinite.enforce``) outside it
    (on q and k as the rotary pass left them)."""
    with device.lock:
        out, lse, finite = forward_plan(device, problem, config).run_checked(q, k, v, mask, alibi, sinks, rotary)
    if rotary is not None and not finite:
        q, k = rope.host_rotated(problem, q, k, rotary)
    enforce(problem, q, k, v, mask, out, lse, out_finite=finite, alibi=alibi, sinks=sinks)
    return out, lse


class PlanCache:
    """Least-recently-used plans, bounded by what they hold (``RecordedPlan.nbytes``: buffers,
    staging, pipelines)."""

    #: Routes remembered (see ``remember``) before the memo starts over.
    MAX_ROUTES = 4096

    def __init__(self, max_bytes: Optional[int] = None):
        #: The budget in bytes; None: ``AULE_KP_PLAN_CACHE_MB`` as it is when a plan is added.
        self.max_bytes = max_bytes
        self._plans: OrderedDict[Hashable, RecordedPlan] = OrderedDict()
        #: (problem, config, settings) -> how ``forward_plan``/``backward_plan`` find its plan: the
        #: key, the bytes it needs, the binding limit (worked out once per problem: the hot path).
        self.routes: Dict[Hashable, Any] = {}

    def remember(self, key: Hashable, route: Any) -> None:
        if len(self.routes) >= self.MAX_ROUTES:
            self.routes.clear()
        self.routes[key] = route

    def get(self, key: Hashable, build: Callable[[], RecordedPlan]) -> Any:
        """The plan under ``key`` (built on first use)."""
        return self.fitted(key, None, lambda old: build())

    def fitted(self, key: Hashable, need: Optional[Dict[str, int]], build: Callable[[Any], RecordedPlan]) -> Any:
        """The plan under ``key`` when its buffers hold ``need`` bytes each (None: any plan); else
        ``build(the plan it replaces, or None)`` takes its place (the old one is destroyed once the
        new one is built)."""
        plan = self._plans.get(key)
        if plan is not None and (need is None or plan.fits(need)):
            self._plans.move_to_end(key)
            return plan
        new = build(plan)
        if plan is not None:
            log.debug("plan for %s outgrown: rebuilt larger", plan.problem)
            self._plans.pop(key).destroy()
        self._plans[key] = new
        budget = self.limit()
        while len(self._plans) > 1 and self.nbytes > budget:
            _, old = self._plans.popitem(last=False)
            log.debug("evicting plan for %s", old.problem)
            old.destroy()
        return new

    def limit(self) -> int:
        """The bytes the plans may hold: ``max_bytes``, else the knob's value now."""
        return self.max_bytes if self.max_bytes is not None else knobs.current().plan_cache_mb << 20

    def drop(self, match: Callable[[Hashable], bool]) -> None:
        """Destroys the plans whose key matches (e.g. those bound to a freed GpuTensor)."""
        for key in [k for k in self._plans if match(k)]:
            self._plans.pop(key).destroy()

    def clear(self) -> None:
        self.drop(lambda _: True)
        self.routes.clear()

    def forget(self) -> None:
        """Drops every plan without destroying it: for a forked child, whose copies of the parent's
        Vulkan objects must not be touched (see device.py)."""
        self._plans.clear()
        self.routes.clear()

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self._plans.values())

    def __len__(self) -> int:
        return len(self._plans)
