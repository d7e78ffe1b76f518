"""The ragged forward on Vulkan (glsl/fa2_ragged.comp): packed variable-length sequences and KV
caches, contiguous or paged, float or q8_0, in flash-attn's layouts, in one dispatch.

The host lists the tiles (sequence, first packed row) in a small buffer, so a workgroup never
crosses a sequence and nothing is padded to the longest; the sequences' offsets and lengths and a
paged cache's block table are buffers too, read by the shader. Plans (``RaggedPlan``) hold the
buffers, sized in powers of two so that a decode loop whose lengths grow rebuilds a few times, not
per step, and live in the device's plan cache beside the forward's. A KV cache resident on the device
(``aule_kp.vulkan.kvcache``) binds its own tensors as K and V: a call then moves q, the new rows
and the small buffers only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..dtypes import ITEMSIZE, STORAGE
from . import rope
from .choice import CPU_LOOP_LIMIT, MIN_SPLIT_KEYS
from .configs import DTYPE_CODE, FLOAT_BYTES
from .kvcache import RowRotation
from .plan import (
    COMPUTE_BARRIER_PATCH,
    LOG2E,
    MIN_STAGED_BYTES,
    binding_limit,
    float_bits,
    grids_settable,
    mapped_memory,
    pipeline_bytes,
    round_up,
    stats,
)
from .probe import parallelism


def rotates_queries(device: Any, call: RaggedCall, rotation: RowRotation) -> bool:
    """Whether ``forward`` can rotate the queries on ``device`` (glsl/rope.comp on the packed rows:
    even head dim and offset, R/2 even for the half layout; kp patch 5's compute barrier)."""
    return device.kp_patch >= COMPUTE_BARRIER_PATCH and not rope.layout_reasons(call.dk, rotation) and not call.q8

KERNEL = "fa2_ragged"
#: Invocations per workgroup on GPUs (packed rows x key groups).
WG = 64
#: Keys per step (BC in the shader), unrolled. lavapipe (LLVM) compiles the kernel in time that
#: grows faster than the unrolled code: 44 s at BC 8, 6.6 s at BC 2 (D 64, 2 loaded cores, measured
#: 2026-12-05; the scalar forward takes 5.3 s there), so CPU drivers take CPU_STEP_KEYS.
STEP_KEYS = 8
CPU_STEP_KEYS = 2
#: Buffers the host writes, in binding order, then the output and the scratch.
INPUTS = ("q", "k", "v", "seqs", "tiles", "table", "k_scales", "v_scales")
BINDINGS = ("q", "k", "v", "o", "seqs", "tiles", "table", "k_scales", "v_scales", "partials")
#: Those a device-resident cache supplies (``io``).
CACHE_BUFFERS = ("k", "v", "k_scales", "v_scales")


@dataclass(frozen=True)
class RaggedConfig:
    """The pipeline: head dims, packed rows per workgroup (``br``), key groups per row (``kg``),
    keys per step (``bc``), the dtype of q/o (and of a float cache), whether K/V are q8_0."""

    dk: int
    dv: int
    br: int
    kg: int
    bc: int
    dtype: str
    q8: bool

    @property
    def wg(self) -> int:
        """Invocations per workgroup."""
        return self.br * self.kg

    def spec(self) -> np.ndarray:
        """Specialization constants in constant_id order (11, TEST_CORRUPT, left at 0)."""
        values = [self.dk, self.dv, self.br, self.kg, self.bc, DTYPE_CODE[self.dtype], self.wg, int(self.q8)]
        return np.array(values, np.uint32)

    def shared_bytes(self) -> int:
        return FLOAT_BYTES * ((self.br * self.dv if self.kg > 1 else 0) + 1 + 2 * self.br)


@dataclass(frozen=True)
class RaggedCall:
    """One call's shape: what the kernel choice and the plan need (data travels separately)."""

    heads_q: int
    heads_kv: int
    dk: int
    dv: int
    dtype: str
    q8: bool
    scale: float
    left: int  # -1: unbounded
    right: int  # -1: unbounded (causal: 0)
    page: int  # 0: contiguous rows
    max_len_q: int
    max_len_k: int

    @property
    def group(self) -> int:
        return self.heads_q // self.heads_kv


def choose(caps: Any, call: RaggedCall, n_tiles_hint: int) -> Tuple[Optional[RaggedConfig], List[str]]:
    """The pipeline for ``call`` on a device of ``caps`` (None and the reasons when none fits).

    Packed rows per workgroup follow the longest sequence's ``group * Lq``: a decode step's few rows
    share the workgroup with key groups (``kg``) that split its keys instead of idling."""
    why = []
    if call.q8 and (call.dk % 32 or call.dv % 32):
        why.append(f"a q8_0 cache needs head dims that are multiples of 32, got Dk {call.dk}, Dv {call.dv}")
    rows = max(1, call.group * call.max_len_q)
    br = WG if rows >= WG else 1 << (rows - 1).bit_length()
    if key_groups_pay(caps):
        if FLOAT_BYTES * br * call.dv > caps.shared_memory // 2:
            br = WG  # the key groups' merge would not fit: one key group, as for long query blocks
        cfg = RaggedConfig(call.dk, call.dv, br, WG // br, STEP_KEYS, call.dtype, call.q8)
    else:
        # A CPU driver runs a workgroup as SIMD lanes: no wider than the rows (nor than a vector).
        cfg = RaggedConfig(call.dk, call.dv, max(br, max(caps.subgroup_size, 1)), 1, CPU_STEP_KEYS, call.dtype,
                           call.q8)
    if cfg.shared_bytes() > caps.shared_memory:
        why.append(f"needs {cfg.shared_bytes()} B of shared memory, the device has {caps.shared_memory}")
    if call.heads_kv > caps.max_workgroup_count[1]:
        why.append(f"{call.heads_kv} kv heads exceed the device's {caps.max_workgroup_count[1]} workgroups in grid y")
    if n_tiles_hint > caps.max_workgroup_count[0]:
        why.append(f"{n_tiles_hint} tiles exceed the device's {caps.max_workgroup_count[0]} workgroups in grid x")
    return (None if why else cfg), why


def key_groups_pay(caps: Any) -> bool:
    """Whether a workgroup's spare invocations should split a short block's keys (``kg > 1``). Not
    on CPU drivers: there a workgroup's invocations are SIMD lanes of one thread, and lavapipe
    compiles the key groups' merge (barriers around live arrays: coroutine frames) for seconds."""
    return caps.type != "cpu"


def tiles(seqs: np.ndarray, group: int, br: int) -> np.ndarray:
    """uint32 ``[n_tiles, 2]``: (sequence, first packed row) of every tile, longest sequences' first
    (they take longest: with a causal band the last rows see the most keys)."""
    packed = seqs[:, 1].astype(np.int64) * group
    counts = -(-packed // br)
    order = np.argsort(-(seqs[:, 3].astype(np.int64) * counts), kind="stable")
    seq = np.repeat(order, counts[order])
    first = np.concatenate([np.arange(c) * br for c in counts[order]]) if len(seq) else np.zeros(0, np.int64)
    return np.stack([seq, first], axis=1).astype(np.uint32)


def splits(caps: Any, n_workgroups: int, max_len_k: int, cfg: Optional[RaggedConfig] = None) -> Tuple[int, int]:
    """``(n_split, split_len)``: keys split over workgroups when the tiles alone leave the device idle
    (decode), each split at least ``MIN_SPLIT_KEYS`` keys; and on CPU drivers, which end an
    invocation's loops after ``CPU_LOOP_LIMIT`` iterations in all, often enough that a split's key
    loop stays below that (``cfg``: the pipeline, whose ``bc * kg`` keys make one iteration)."""
    want = math.ceil(2 * parallelism(caps) / max(n_workgroups, 1))
    n = max(1, min(want, max_len_k // MIN_SPLIT_KEYS))
    if caps.type == "cpu" and cfg is not None:
        n = max(n, math.ceil(max_len_k / ((CPU_LOOP_LIMIT - cfg.kg - 1) * cfg.bc * cfg.kg)))
    length = -(-max(max_len_k, 1) // n)
    return n, -(-length // STEP_KEYS) * STEP_KEYS


def push_constants(call: RaggedCall, max_blocks: int, n_split: int, split_len: int, mode: int,
                   rows: int) -> np.ndarray:
    """``Push`` of glsl/fa2_ragged.comp."""
    scale_bits = float_bits(call.scale * LOG2E)
    vals = [call.heads_q, call.heads_kv, call.group, scale_bits, call.left & 0xFFFFFFFF, call.right & 0xFFFFFFFF,
            call.page, max_blocks, n_split, split_len, mode, rows]
    return np.array(vals, np.uint32)


class RaggedPlan:
    """Buffers of ``capacity`` bytes each and the pipeline bound to them (one algorithm per grid
    where kp cannot set grids). ``io``: kp tensors of a device-resident cache for K, V and their
    scales, bound in place of host-written buffers."""

    def __init__(self, device: Any, config: RaggedConfig, capacity: Dict[str, int],
                 io: Optional[Dict[str, Any]] = None):
        self.device = device
        self.config = config
        self.capacity = capacity
        self.problem = config  # what the plan cache's log lines name
        self.io = io or {}
        kp = device.kp
        self.tensors: Dict[str, Any] = dict(self.io)
        self.memory: Dict[str, np.ndarray] = {}
        for name in (*INPUTS, "o"):
            if name in self.tensors:
                continue
            words = max(math.ceil(capacity[name] / 4), 1)
            self.tensors[name] = device.io_tensor(np.zeros(words, np.uint32), "out" if name == "o" else "in")
            self.memory[name] = mapped_memory(self.tensors[name]).view(np.uint8)
        # The queries' rotation (rope.token_dispatch): its cos/sin rows and pipeline, made on first use.
        self.rope_tables = device.io_tensor(np.zeros(max(capacity.get("rope_tables", 4) // 4, 1), np.float32), "in")
        self.rope_memory = mapped_memory(self.rope_tables)
        self.rope: Any = None
        words = max(capacity["partials"] // 4, 1)
        self.tensors["partials"] = device.manager.tensor_t(np.zeros(words, np.float32), kp.TensorTypes.storage)
        staged = 1 if (device.host_memory or device.direct_io) else 2
        self.nbytes = sum(m.nbytes for m in self.memory.values()) * staged + 4 * words
        self._algorithms: Dict[Any, Any] = {}

    def fits(self, need: Dict[str, int]) -> bool:
        return all(n <= self.capacity.get(name, 0) for name, n in need.items())

    def _algorithm(self, grid: Tuple[int, int, int], rotated: bool = False) -> Any:
        """The kernel's algorithm for ``grid``; ``rotated``: bound to the queries' rotated copy."""
        key = (None if grids_settable(self.device.kp) else grid, rotated)
        algorithm = self._algorithms.get(key)
        if algorithm is None:
            stats["algorithms"] += 1
            self.nbytes += pipeline_bytes(self.device)
            bound = [self.tensors["q_rot" if rotated and name == "q" else name] for name in BINDINGS]
            algorithm = self._algorithms[key] = self.device.manager.algorithm(
                bound, self.device.spirv(KERNEL), grid, self.config.spec(), np.zeros(12, np.uint32))
        if key[0] is None:
            algorithm.set_workgroup(*grid)
        return algorithm

    def _rope(self, grid: Tuple[int, int, int]) -> Any:
        """glsl/rope.comp from q into its rotated copy ``q_rot`` (device-only; made on first use;
        out of place: an in-place write after q's upload would need a barrier kp does not record).
        No k rows: the k bindings repeat q's buffers, untouched."""
        if self.rope is None:
            stats["algorithms"] += 1
            self.nbytes += pipeline_bytes(self.device) + self.capacity["q"]
            q = self.tensors["q"]
            self.tensors["q_rot"] = rot = self.device.manager.tensor_t(
                np.zeros(max(self.capacity["q"] // 4, 1), np.uint32), self.device.kp.TensorTypes.storage)
            self.rope = self.device.manager.algorithm([q, q, self.rope_tables, rot, rot],
                                                      self.device.spirv(rope.KERNEL), grid,
                                                      rope.spec(self.config.dtype), np.zeros(17, np.uint32))
        if grids_settable(self.device.kp):
            self.rope.set_workgroup(*grid)
        return self.rope

    def run(self, data: Dict[str, np.ndarray], dispatches: Sequence[Tuple[Tuple[int, int, int], np.ndarray]],
            out_bytes: int, q_rotation: Optional[Tuple[np.ndarray, Tuple[int, int, int], np.ndarray]] = None
            ) -> np.ndarray:
        """Writes ``data`` (host arrays by buffer name) into mapped memory, runs ``dispatches``
        ((grid, push) each; a later one reads the partials the earlier wrote: one submission behind
        kp patch 5's compute barrier, else each its own) and returns O's first ``out_bytes``
        bytes. ``q_rotation``: (float32 cos/sin rows, grid, push) of the queries' rotation,
        recorded before the first dispatch behind that barrier (the caller checks the patch)."""
        kp = self.device.kp
        for name, arr in data.items():
            raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
            self.memory[name][: raw.nbytes] = raw
        sent = [self.tensors[name] for name in INPUTS if name in data]
        if q_rotation is not None:
            self.rope_memory[: q_rotation[0].size] = q_rotation[0]
            sent.append(self.rope_tables)
        indices = list(range(len(dispatches)))
        together = self.device.kp_patch >= COMPUTE_BARRIER_PATCH
        for submission in ([indices] if together else [[i] for i in indices]):
            seq = self.device.manager.sequence()
            try:
                for i in submission:
                    if i == 0:
                        seq.record(kp.OpTensorSyncDevice(sent))
                        if q_rotation is not None:
                            seq.record(kp.OpAlgoDispatch(self._rope(q_rotation[1]), q_rotation[2]))
                            seq.record(kp.aule_compute_barrier([self.tensors["q_rot"]]))
                    elif together:  # the merge reads the partials the split pass wrote
                        seq.record(kp.aule_compute_barrier([self.tensors["partials"]]))
                    grid, push = dispatches[i]
                    seq.record(kp.OpAlgoDispatch(self._algorithm(grid, q_rotation is not None), push))
                    if i == indices[-1]:
                        seq.record(kp.OpTensorSyncLocal([self.tensors["o"]]))
                seq.eval()
                stats["evals"] += 1
            finally:
                seq.destroy()
        return self.memory["o"][:out_bytes].copy()

    def destroy(self) -> None:
        for algorithm in (*self._algorithms.values(), *([self.rope] if self.rope is not None else [])):
            algorithm.destroy()
        self._algorithms.clear()
        self.rope = None


def capacity(device: Any, old: Optional[Dict[str, int]], need: Dict[str, int]) -> Dict[str, int]:
    """Buffer sizes holding ``need`` and what ``old`` held: powers of two, at least a few KiB."""
    old = old or {}
    limit = binding_limit(device.caps.max_storage_buffer_range)
    return {name: min(limit, max(old.get(name, 0), MIN_STAGED_BYTES, round_up(n, 1))) for name, n in need.items()}


def forward(device: Any, call: RaggedCall, q: np.ndarray, k: Optional[np.ndarray], v: Optional[np.ndarray],
            seqs: np.ndarray, table: Optional[np.ndarray], scales: Tuple[Optional[np.ndarray], Optional[np.ndarray]],
            io: Optional[Tuple[Any, Dict[str, Any]]] = None, q_rotary: Optional[RowRotation] = None) -> np.ndarray:
    """O ``[total_q, Hq, Dv]`` (host storage of ``call.dtype``) of packed q ``[total_q, Hq, Dk]`` over
    the store rows ``k``/``v`` (``[R, Hkv, D]``: floats in q's storage, or int8 with float16
    ``scales`` ``[R, Hkv, D/32]``), sequences ``seqs`` (int32 ``[B, 4]``: q_start, len_q, k_start,
    len_k) and a paged cache's block table (int32 ``[B, max_blocks]``, ``call.page`` > 0).

    ``io``: ``(key, tensors)`` of a device-resident cache: its kp tensors stand for k, v and the
    scales (then None here), ``key`` names them in the plan cache. ``q_rotary``: q comes unrotated
    and is rotated on the device first (one cos/sin row per query token; ``rotates_queries`` says
    where this is possible).
    ValueError when the device cannot take the call (``choose``'s reasons)."""
    cfg_tiles = None
    cfg, why = choose(device.caps, call, 0)
    if cfg is not None:
        cfg_tiles = tiles(seqs, call.group, cfg.br)
        cfg, why = choose(device.caps, call, len(cfg_tiles))
    if cfg is None:
        raise ValueError("; ".join(why))
    n_seq = seqs.shape[0]
    total_q = q.shape[0]
    n_split, split_len = splits(device.caps, len(cfg_tiles) * call.heads_kv, call.max_len_k, cfg)
    rows = total_q * call.heads_q
    table_arr = np.zeros((n_seq, 1), np.uint32) if table is None else table.astype(np.uint32)
    data: Dict[str, np.ndarray] = {"q": q, "seqs": seqs.astype(np.uint32), "tiles": cfg_tiles, "table": table_arr}
    if io is None:
        data.update(k=k, v=v)
        if call.q8:
            data.update(k_scales=scales[0], v_scales=scales[1])
    need = {name: arr.nbytes for name, arr in data.items()}
    q_rotation = None
    if q_rotary is not None:
        tables = np.concatenate([q_rotary.cos.reshape(-1), q_rotary.sin.reshape(-1)]).astype(np.float32)
        q_rotation = (tables, *rope.token_dispatch(total_q, call.heads_q, call.dk, q_rotary.half,
                                                   q_rotary.interleaved, q_rotary.offset))
        need["rope_tables"] = tables.nbytes
    need.update(o=rows * call.dv * ITEMSIZE[call.dtype],
                partials=rows * n_split * (call.dv + 2) * 4 if n_split > 1 else 4)
    for name in CACHE_BUFFERS:
        need.setdefault(name, 4)
    limit = binding_limit(device.caps.max_storage_buffer_range)
    over = [f"{name} ({n} B)" for name, n in need.items() if n > limit]
    if over:
        raise ValueError(f"over the device's {limit} B storage binding limit: {', '.join(over)}")
    key: Tuple[Any, ...] = ("ragged", cfg)
    io_tensors = None
    if io is not None:
        io_key, io_tensors = io
        key += ("io", io_key)
        for name in CACHE_BUFFERS:
            need.pop(name, None)

    def build(old: Optional[RaggedPlan]) -> RaggedPlan:
        sizes = capacity(device, old and old.capacity, need)
        return RaggedPlan(device, cfg, sizes, io_tensors)

    dispatches = [((len(cfg_tiles), call.heads_kv, n_split),
                   push_constants(call, table_arr.shape[1], n_split, split_len, 0, rows))]
    if n_split > 1:
        dispatches.append(((math.ceil(rows / cfg.wg), 1, 1), push_constants(call, table_arr.shape[1], n_split,
                                                                         split_len, 1, rows)))
    out_bytes = need["o"]
    with device.lock:
        plan = device.plans.fitted(key, need, build)
        raw = plan.run(data, dispatches, out_bytes, q_rotation)
    return raw.view(STORAGE[call.dtype]).reshape(total_q, call.heads_q, call.dv)
