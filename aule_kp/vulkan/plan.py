"""Plans: per-Problem persistent kp tensors, algorithms and one recorded sequence, reused per call.

The first call for a (Problem, config) builds a Plan; later calls copy inputs into the
tensors' mapped memory, ``eval()`` the same sequence and copy the outputs out. Plans live in a
bounded LRU (by bytes) on their Device. Inputs larger than one storage binding are split into
chunks of whole (batch, kv-head) groups, one dispatch each, in the same sequence. Split-KV
(splitkv.py) is one dispatch too, with scratch buffers per chunk.
"""

from __future__ import annotations

import logging
import math
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np

from ..dtypes import ITEMSIZE, STORAGE
from ..problem import Problem
from .hostcopy import copy_bytes
from .kernels import KernelConfig
from .splitkv import ForwardConfig, SplitKVConfig

log = logging.getLogger("aule_kp")

#: Counters tests use to show that a cached plan creates nothing new.
stats: Dict[str, int] = {"plans": 0, "algorithms": 0, "evals": 0}

LOG2E = 1.4426950408889634
MAX_GRID_Y = 65535


def binding_limit(max_storage_buffer_range: int) -> int:
    """Largest buffer one binding may cover (``AULE_KP_MAX_BINDING_BYTES`` lowers it, for tests)."""
    override = os.environ.get("AULE_KP_MAX_BINDING_BYTES")
    return min(max_storage_buffer_range, int(override)) if override else max_storage_buffer_range


def _words(elements: int, dtype: str) -> int:
    """uint32 words holding ``elements`` values of ``dtype`` (16-bit values are packed in pairs)."""
    return math.ceil(elements * ITEMSIZE[dtype] / 4)


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


def groups_per_chunk(p: Problem, limit: int, config: Optional[ForwardConfig] = None) -> int:
    """How many groups one dispatch can bind (0: a single group is over the limit), counting the
    scratch buffers of a split-KV ``config``."""
    sizes = dict(group_bytes(p), **(config.group_bytes(p) if isinstance(config, SplitKVConfig) else {}))
    per_buffer = min(limit // max(b, 1) for b in sizes.values())
    return min(per_buffer, MAX_GRID_Y // p.group)


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


def dispatch(config: ForwardConfig, p: Problem, n_groups: int,
             group0: int) -> Tuple[KernelConfig, Tuple[int, int, int], np.ndarray]:
    """(pipeline, grid, push constants) of the dispatch over the chunk of ``n_groups`` groups from ``group0``."""
    if isinstance(config, SplitKVConfig):
        return config.dispatch(p, n_groups, push_constants(p, group0))
    return config, (math.ceil(p.len_q / config.br), n_groups * p.group, 1), push_constants(p, group0)


@dataclass
class Chunk:
    """The dispatch over kv groups ``[g0, g1)`` and, on the host path, views of its mapped memory."""

    g0: int
    g1: int
    tensors: List[Any]  # q, k, v, o, lse (kp tensors)
    algorithms: List[Any]  # the one dispatch's
    scratch: List[Any] = field(default_factory=list)  # split-KV's partials and counters (bindings 6-8)
    inputs: List[np.ndarray] = field(default_factory=list)  # q, k, v mapped memory, as bytes
    input_ranges: List[Tuple[int, int]] = field(default_factory=list)  # their bytes in the caller's arrays
    output: Optional[np.ndarray] = None  # o mapped memory, as bytes
    lse: Optional[np.ndarray] = None  # lse mapped memory, float32


class RecordedPlan:
    """What every plan shares: chunks holding their algorithms, and one recorded sequence."""

    sequence: Any
    chunks: List[Any]

    def eval(self) -> None:
        self.sequence.eval()
        stats["evals"] += 1

    def destroy(self) -> None:
        self.sequence.destroy()
        for c in self.chunks:
            for algorithm in c.algorithms:
                algorithm.destroy()
        self.chunks.clear()


class Plan(RecordedPlan):
    """Everything one Problem needs on one device, built once.

    ``config``: a forward KernelConfig or a SplitKVConfig (its scratch buffers are the plan's, made
    once, the counters zeroed once). ``io``: kp tensors ``(q, k, v, o)`` owned by the caller
    (the GpuTensor path). Then the plan has one chunk bound to them and its sequence only
    dispatches: data stays on the device.
    """

    def __init__(self, device: Any, problem: Problem, config: ForwardConfig, io: Optional[Sequence[Any]] = None):
        self.problem = problem
        self.config = config
        self.device = device
        kp = device.kp
        mgr = device.manager
        p = problem
        per = group_bytes(p)
        n_groups = p.batch * p.heads_kv
        limit = binding_limit(device.caps.max_storage_buffer_range)
        step = n_groups if io is not None else groups_per_chunk(p, limit, config)
        if step < 1:
            raise ValueError(f"one (batch, head) slice needs {max(per.values())} B, over the device's "
                             f"storage binding limit of {limit} B")
        if io is not None and p.group * n_groups > MAX_GRID_Y:
            raise ValueError(f"the GpuTensor path takes at most {MAX_GRID_Y} query heads x batch per call")

        def tensor(words: int, dtype: Any, role: str = "in") -> Any:
            return device.io_tensor(np.zeros(max(words, 1), dtype=dtype), role)

        self.mask = tensor(int(np.prod(p.mask_shape)) if p.mask_shape else 1, np.float32)
        self.mask_view = self.mask.data()
        self.chunks: List[Chunk] = []
        self.nbytes = self.mask_view.nbytes
        zeroed: List[Any] = []
        for g0 in range(0, n_groups, step):
            g1 = min(n_groups, g0 + step)
            n = g1 - g0
            if io is not None:
                q, k, v, o = io
                lse = tensor(n * p.group * p.len_q, np.float32, "out")
            else:
                q = tensor(_words(n * p.group * p.len_q * p.dim_k, p.dtype), np.uint32)
                k = tensor(_words(n * p.len_k * p.dim_k, p.dtype), np.uint32)
                v = tensor(_words(n * p.len_k * p.dim_v, p.dtype), np.uint32)
                o = tensor(_words(n * p.group * p.len_q * p.dim_v, p.dtype), np.uint32, "out")
                lse = tensor(n * p.group * p.len_q, np.float32, "out")
                self.nbytes += n * sum(per.values()) * (1 if device.host_memory or device.direct_io else 2)
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
                sizes = [n * per[name] for name in ("q", "k", "v", "o", "lse")]
                q_b, k_b, v_b, o_b = (t.data().view(np.uint8)[:size] for t, size in zip((q, k, v, o), sizes))
                chunk.inputs = [q_b, k_b, v_b]
                chunk.input_ranges = [(g0 * per[name], g1 * per[name]) for name in ("q", "k", "v")]
                chunk.output = o_b
                chunk.lse = lse.data()[: n * p.group * p.len_q]
            self.chunks.append(chunk)

        if zeroed:
            init = mgr.sequence().record(kp.OpTensorSyncDevice(zeroed))
            init.eval()
            init.destroy()
        self.host_io = io is None
        self.sequence = self.record(mgr.sequence(), transfers=True)
        stats["plans"] += 1

    def record(self, sequence: Any, transfers: bool) -> Any:
        """Records the call into ``sequence``: with ``transfers`` (and host I/O), inputs to the device
        first and outputs back after; without, the dispatches alone (what benchmarks and tuning time)."""
        kp = self.device.kp
        transfers = transfers and self.host_io
        inputs = [t for c in self.chunks for t in c.tensors[:3]] if transfers else []
        if self.problem.has_mask:
            inputs.append(self.mask)
        if inputs:
            sequence.record(kp.OpTensorSyncDevice(inputs))
        # Chunks touch disjoint buffers (scratch included): their dispatches need no barrier between
        # them. A plan's dispatch must not be recorded twice in one sequence without one either:
        # split-KV's counters and partials are the plan's.
        for c in self.chunks:
            sequence.record(kp.OpAlgoDispatch(c.algorithms[0]))
        if transfers:
            sequence.record(kp.OpTensorSyncLocal([t for c in self.chunks for t in c.tensors[3:]]))
        return sequence

    def run(self, q: np.ndarray, k: np.ndarray, v: np.ndarray,
            mask: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
        """Host arrays in (engine storage, contiguous), ``(out, lse)`` out (see Backend.forward).

        One copy each way between the caller's arrays and mapped memory, as raw bytes (packed
        16-bit data needs no conversion); the slices are computed once, in ``__init__``.
        """
        p = self.problem
        sources = [x.reshape(-1).view(np.uint8) for x in (q, k, v)]
        copy_bytes([(dst, src[lo:hi]) for c in self.chunks
                    for dst, src, (lo, hi) in zip(c.inputs, sources, c.input_ranges)])
        if mask is not None:
            self.mask_view[:] = mask.reshape(-1)
        self.eval()
        out = np.empty(sum(c.output.nbytes for c in self.chunks), np.uint8)
        lse = np.concatenate([c.lse for c in self.chunks])
        pairs, lo = [], 0
        for c in self.chunks:
            pairs.append((out[lo:lo + c.output.nbytes], c.output))
            lo += c.output.nbytes
        copy_bytes(pairs)
        shape = (p.batch, p.heads_q, p.len_q)
        return out.view(STORAGE[p.dtype]).reshape(*shape, p.dim_v), lse.reshape(shape)



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
