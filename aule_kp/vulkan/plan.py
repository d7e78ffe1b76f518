"""Plans: per-Problem persistent kp tensors, algorithms and one recorded sequence, reused per call.

The first call for a (Problem, config) builds a Plan; later calls copy inputs into the
tensors' mapped memory, ``eval()`` the same sequence and copy the outputs out. Plans live in a
bounded LRU (by bytes) on their Device. Inputs larger than one storage binding are split into
chunks of whole (batch, kv-head) groups, one dispatch each, in the same sequence. Split-KV
(splitkv.py) is one dispatch too, with scratch buffers per chunk.

Large host calls on a discrete GPU are pipelined (``pipeline_chunks``): the groups are split into a
few chunks, each with its own sequence, so that the GPU computes one chunk while the host copies the
next one in, and the host copies a chunk's output out while later chunks compute.
"""

from __future__ import annotations

import logging
import math
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np

from ..dtypes import ITEMSIZE, STORAGE
from ..problem import Problem
from .hostcopy import copy_bytes
from .kernels import KernelConfig, parallelism, positive_int_env, section_heads
from .splitkv import ForwardConfig, SplitKVConfig

log = logging.getLogger("aule_kp")

#: Counters tests use to show that a cached plan creates nothing new.
stats: Dict[str, int] = {"plans": 0, "algorithms": 0, "evals": 0}

LOG2E = 1.4426950408889634
#: Vulkan's guaranteed maxComputeWorkGroupCount per dimension: bounds the query heads of one dispatch
#: (spread over x and z of query_grid) and, with the device's own limit, the query tiles (y).
MAX_GRID_Y = 65535
#: Per-group buffers of float32 values; the others hold ``Problem.dtype`` data packed in uint32 words.
FLOAT_BUFFERS = frozenset({"lse", "stats", "ds"})


def binding_limit(max_storage_buffer_range: int) -> int:
    """Largest buffer one binding may cover (``AULE_KP_MAX_BINDING_BYTES`` lowers it, for tests)."""
    override = os.environ.get("AULE_KP_MAX_BINDING_BYTES")
    return min(max_storage_buffer_range, int(override)) if override else max_storage_buffer_range


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
    return min(per_buffer, MAX_GRID_Y // p.group)


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
    forced = positive_int_env("AULE_KP_PIPELINE_CHUNKS", "chunks")
    if forced is not None:
        return min(forced, n_groups) if getattr(device.kp, "aule_patch", 0) >= 2 else 1
    if (getattr(device.kp, "aule_patch", 0) < 2 or device.host_memory or not isinstance(config, KernelConfig)
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


def push_constants(p: Problem, group0: int) -> np.ndarray:
    """Push constants in the order of ``Push`` in glsl/fa2_common.glsl."""
    scale_bits = struct.unpack("<I", struct.pack("<f", p.scale * LOG2E))[0]
    signed = [p.diag, -1 if p.left is None else p.left, -1 if p.right is None else p.right]
    sb, sh, si, sj = mask_strides(p)
    vals = [p.len_q, p.len_k, p.group, p.heads_kv, group0, scale_bits, *(x & 0xFFFFFFFF for x in signed),
            int(p.has_mask), sb, sh, si, sj, p.heads_q]
    return np.array(vals, dtype=np.uint32)


def query_tiles_reason(p: Problem, br: int, max_grid_y: int) -> Optional[str]:
    """Why a kernel over query tiles of ``br`` rows cannot cover ``p`` in one grid (None: it can)."""
    tiles = math.ceil(p.len_q / br)
    if tiles > max_grid_y:
        return (f"{p.len_q} query rows need {tiles} query tiles of {br}: over the device's "
                f"{max_grid_y} workgroups in grid y")
    return None


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


@dataclass
class Chunk:
    """The dispatch over kv groups ``[g0, g1)`` and, on the host path, views of its mapped memory."""

    g0: int
    g1: int
    tensors: List[Any]  # q, k, v, o, lse (kp tensors)
    algorithms: List[Any]  # the one dispatch's
    scratch: List[Any] = field(default_factory=list)  # split-KV's partials and counters (bindings 6-8)
    sequence: Any = None  # pipelined host calls: this chunk's transfers and dispatch
    inputs: List[np.ndarray] = field(default_factory=list)  # q, k, v mapped memory, as bytes
    input_ranges: List[Tuple[int, int]] = field(default_factory=list)  # their bytes in the caller's arrays
    output: Optional[np.ndarray] = None  # o mapped memory, as bytes
    lse: Optional[np.ndarray] = None  # lse mapped memory, float32


class RecordedPlan:
    """What every plan shares: a mask tensor, chunks of whole (batch, kv-head) groups holding their
    algorithms and tensors, one recorded sequence, and ``nbytes``, what the plan cache bounds."""

    device: Any
    problem: Problem
    sequence: Any
    chunks: List[Any]

    def _chunk_groups(self, device: Any, problem: Problem, per: Dict[str, int],
                      fit: Optional[Callable[[int], int]], what: str) -> List[Tuple[int, int]]:
        """Makes the mask tensor, starts ``nbytes`` and returns the chunks' group ranges ``[g0, g1)``.

        ``per``: bytes per group that ``nbytes`` counts (twice where staging buffers back the
        tensors). ``fit(limit)``: how many groups one dispatch can bind under the storage binding
        limit; None for one chunk of all groups. ``what`` names a group in the error raised when
        not even one fits.
        """
        self.device = device
        self.problem = p = problem
        n_groups = p.batch * p.heads_kv
        limit = binding_limit(device.caps.max_storage_buffer_range)
        step = n_groups if fit is None else fit(limit)
        if step < 1:
            raise ValueError(f"one {what} needs {max(per.values())} B, over the device's storage binding "
                             f"limit of {limit} B")
        mask_elements = int(np.prod(p.mask_shape)) if p.mask_shape else 1
        self.mask = device.io_tensor(np.zeros(max(mask_elements, 1), np.float32), "in")
        self.mask_view = self.mask.data()
        staged = not (device.host_memory or device.direct_io)
        self.nbytes = self.mask_view.nbytes + n_groups * sum(per.values()) * (2 if staged else 1)
        self.chunks = []
        return [(g0, min(n_groups, g0 + step)) for g0 in range(0, n_groups, step)]

    def _io_tensors(self, sizes: Dict[str, int], n: int,
                    outputs: Collection[str]) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
        """Tensors for ``n`` groups of ``sizes`` bytes each (at least one word: every binding needs
        a buffer) that the host writes on every call, or reads when named in ``outputs``
        (``Device.io_tensor`` picks their memory), and their mapped memory as bytes."""
        tensors = {name: self.device.io_tensor(
                       np.zeros(max(math.ceil(n * size / 4), 1), np.float32 if name in FLOAT_BUFFERS else np.uint32),
                       "out" if name in outputs else "in")
                   for name, size in sizes.items()}
        return tensors, {name: t.data().view(np.uint8)[: n * sizes[name]] for name, t in tensors.items()}

    def eval(self) -> None:
        self.sequence.eval()
        stats["evals"] += 1

    def destroy(self) -> None:
        self.sequence.destroy()
        for c in self.chunks:
            for algorithm in c.algorithms:
                algorithm.destroy()
            if getattr(c, "sequence", None) is not None:
                c.sequence.destroy()
        self.chunks.clear()


class Plan(RecordedPlan):
    """Everything one Problem needs on one device, built once.

    ``config``: a forward KernelConfig or a SplitKVConfig (its scratch buffers are the plan's, made
    once, the counters zeroed once). ``io``: kp tensors ``(q, k, v, o)`` owned by the caller
    (the GpuTensor path). Then the plan has one chunk bound to them and its sequence only
    dispatches: data stays on the device.
    """

    def __init__(self, device: Any, problem: Problem, config: ForwardConfig, io: Optional[Sequence[Any]] = None):
        self.config = config
        kp = device.kp
        mgr = device.manager
        p = problem
        per = group_bytes(p)
        pieces = pipeline_chunks(device, p, config) if io is None else 1
        if io is None:
            most = math.ceil(p.batch * p.heads_kv / pieces)
            groups = self._chunk_groups(device, p, per, lambda limit: min(groups_per_chunk(p, limit, config), most),
                                        "(batch, head) slice")
        elif p.group * p.batch * p.heads_kv > MAX_GRID_Y:
            raise ValueError(f"the GpuTensor path takes at most {MAX_GRID_Y} query heads x batch per call")
        else:
            # The caller's tensors stay on the device: nothing to copy per call, so no bytes to count.
            groups = self._chunk_groups(device, p, {}, None, "(batch, head) slice")
        zeroed: List[Any] = []
        for g0, g1 in groups:
            n = g1 - g0
            tensors, views = self._io_tensors(per if io is None else {"lse": per["lse"]}, n, ("o", "lse"))
            if io is not None:
                tensors.update(zip(("q", "k", "v", "o"), io))
            q, k, v, o, lse = (tensors[name] for name in ("q", "k", "v", "o", "lse"))
            # Split-KV scratch lives on the device only. The partials need no initial value; the
            # counters must start at zero (the shader puts them back after each call): device
            # tensors, whose zeros are copied up once below (storage tensors are uninitialised).
            layout = config.scratch_words(p, n) if isinstance(config, SplitKVConfig) else []
            scratch = [mgr.tensor_t(np.zeros(max(words, 1), np.uint32 if counters else np.float32),
                                    kp.TensorTypes.device if counters else kp.TensorTypes.storage)
                       for words, counters in layout]
            zeroed += [t for t, (_, counters) in zip(scratch, layout) if counters]
            self.nbytes += sum(4 * words for words, _ in layout)
            bound = [q, k, v, o, lse, self.mask, *scratch]
            kc, grid, push = dispatch(config, p, n, g0)
            algos = [mgr.algorithm(bound, device.spirv(kc.kernel), grid, kc.spec(), push)]
            stats["algorithms"] += 1
            chunk = Chunk(g0, g1, [q, k, v, o, lse], algos, scratch)
            if io is None:
                chunk.inputs = [views[name] for name in ("q", "k", "v")]
                chunk.input_ranges = [(g0 * per[name], g1 * per[name]) for name in ("q", "k", "v")]
                chunk.output = views["o"]
                chunk.lse = views["lse"].view(np.float32)
            self.chunks.append(chunk)

        if zeroed:
            init = mgr.sequence().record(kp.OpTensorSyncDevice(zeroed))
            init.eval()
            init.destroy()
        self.host_io = io is None
        self.sequence = self.record(mgr.sequence(), transfers=True)
        self.pipelined = pieces > 1 and len(self.chunks) > 1
        if self.pipelined:
            for i, c in enumerate(self.chunks):
                c.sequence = self.record(mgr.sequence(), transfers=True, chunks=self.chunks[i:i + 1])
        stats["plans"] += 1

    def record(self, sequence: Any, transfers: bool, chunks: Optional[List[Chunk]] = None) -> Any:
        """Records the call over ``chunks`` (default: all) into ``sequence``: with ``transfers`` (and
        host I/O), inputs to the device first and outputs back after; without, the dispatches alone
        (what benchmarks and tuning time). The mask goes up with the first chunk: later submissions
        are ordered after it by their own transfer barriers."""
        kp = self.device.kp
        chunks = self.chunks if chunks is None else chunks
        transfers = transfers and self.host_io
        inputs = [t for c in chunks for t in c.tensors[:3]] if transfers else []
        if self.problem.has_mask and chunks[0] is self.chunks[0]:
            inputs.append(self.mask)
        if inputs:
            sequence.record(kp.OpTensorSyncDevice(inputs))
        # Chunks touch disjoint buffers (scratch included): their dispatches need no barrier between
        # them. A plan's dispatch must not be recorded twice in one sequence without one either:
        # split-KV's counters and partials are the plan's.
        for c in chunks:
            sequence.record(kp.OpAlgoDispatch(c.algorithms[0]))
        if transfers:
            sequence.record(kp.OpTensorSyncLocal([t for c in chunks for t in c.tensors[3:]]))
        return sequence

    def run(self, q: np.ndarray, k: np.ndarray, v: np.ndarray,
            mask: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
        """Host arrays in (engine storage, contiguous), ``(out, lse)`` out (see Backend.forward).

        One copy each way between the caller's arrays and mapped memory, as raw bytes (packed
        16-bit data needs no conversion); the slices are computed once, in ``__init__``.
        """
        p = self.problem
        sources = [x.reshape(-1).view(np.uint8) for x in (q, k, v)]
        inputs = [[(dst, src[lo:hi]) for dst, src, (lo, hi) in zip(c.inputs, sources, c.input_ranges)]
                  for c in self.chunks]
        if mask is not None:
            self.mask_view[:] = mask.reshape(-1)
        out = np.empty(sum(c.output.nbytes for c in self.chunks), np.uint8)
        outputs, lo = [], 0
        for c in self.chunks:
            outputs.append([(out[lo:lo + c.output.nbytes], c.output)])
            lo += c.output.nbytes
        if self.pipelined:
            self._run_pipelined(inputs, outputs)
        else:
            copy_bytes([pair for pairs in inputs for pair in pairs])
            self.eval()
            copy_bytes([pair for pairs in outputs for pair in pairs])
        lse = np.concatenate([c.lse for c in self.chunks])
        shape = (p.batch, p.heads_q, p.len_q)
        return out.view(STORAGE[p.dtype]).reshape(*shape, p.dim_v), lse.reshape(shape)



    def _run_pipelined(self, inputs: List[List[Tuple[np.ndarray, np.ndarray]]],
                       outputs: List[List[Tuple[np.ndarray, np.ndarray]]]) -> None:
        """Chunk by chunk: copy in and submit, then (once all are submitted) wait for each and copy
        its output out, so copies overlap the kernels of other chunks. Whatever fails, every
        submitted sequence is waited for before returning (a running sequence cannot be resubmitted)."""
        submitted: List[Chunk] = []
        try:
            for c, pairs in zip(self.chunks, inputs):
                copy_bytes(pairs)
                c.sequence.eval_async()
                submitted.append(c)
            stats["evals"] += 1
            for c, pairs in zip(self.chunks, outputs):
                c.sequence.eval_await()
                submitted.remove(c)
                copy_bytes(pairs)
        finally:
            for c in submitted:
                c.sequence.eval_await()


class PlanCache:
    """Least-recently-used plans, bounded by the bytes their tensors hold."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._plans: OrderedDict[Hashable, Plan] = OrderedDict()

    def get(self, key: Hashable, build: Callable[[], Plan]) -> Plan:
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
            return plan
        plan = build()
        self._plans[key] = plan
        while len(self._plans) > 1 and self.nbytes > self.max_bytes:
            _, old = self._plans.popitem(last=False)
            log.debug("evicting plan for %s", old.problem)
            old.destroy()
        return plan

    def drop(self, match: Callable[[Hashable], bool]) -> None:
        """Destroys the plans whose key matches (e.g. those bound to a freed GpuTensor)."""
        for key in [k for k in self._plans if match(k)]:
            self._plans.pop(key).destroy()

    def clear(self) -> None:
        self.drop(lambda _: True)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self._plans.values())

    def __len__(self) -> int:
        return len(self._plans)
