"""Backward plans: the FA2 backward pass (glsl/fa2_bwd_*.comp) as one recorded kp sequence.

Like the forward's ``Plan``: built once per (Problem, BackwardConfig), persistent kp tensors,
inputs copied into their mapped memory, one ``eval()`` per call, chunks of whole (batch, kv-head)
groups when a buffer would pass the storage binding limit. Per chunk three dispatches:
``fa2_bwd_pre`` (row statistics: D = rowsum(dO * O) and the softmax normaliser), then
``fa2_bwd_dkdv`` and ``fa2_bwd_dq``, which only read what ``pre`` wrote and are independent of
each other. GQA gradients of dK/dV are summed inside the dK/dV workgroups (no atomics).

The gradient of a float mask is dS (natural units) per (batch, query head, row, key), written by
the dK/dV kernel only when asked for and summed over the mask's broadcast dims here in NumPy.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .. import knobs
from ..dtypes import STORAGE
from ..problem import Problem
from .configs import BackwardConfig, score_spec
from .hostcopy import copy_bytes
from .plan import (
    Chunk,
    RecordedPlan,
    binding_limit,
    capacity,
    grids_settable,
    group_bytes,
    groups_that_fit,
    mask_bytes,
    push_constants,
    query_grid,
    stats,
    uses_mask_buffer,
    write_mask_payload,
)

log = logging.getLogger("aule_kp")

#: Binding order of every backward kernel (glsl/fa2_bwd_common.glsl).
BINDINGS = ("q", "k", "v", "o", "lse", "mask", "do", "stats", "dq", "dk", "dv", "ds")
INPUTS = ("q", "k", "v", "o", "lse", "do")
OUTPUTS = ("dq", "dk", "dv")
STATS_BYTES = 16  # vec4 per query row


def backward_group_bytes(p: Problem, write_ds: bool) -> Dict[str, int]:
    """Bytes each per-chunk buffer needs per (batch, kv-head) group."""
    fwd = group_bytes(p)
    sizes = dict(fwd, do=fwd["o"], stats=STATS_BYTES * p.group * p.len_q, dq=fwd["q"], dk=fwd["k"], dv=fwd["v"])
    if write_ds:
        sizes["ds"] = 4 * p.group * p.len_q * p.len_k
    return sizes


def backward_groups_per_chunk(p: Problem, limit: int, write_ds: bool) -> int:
    """How many groups one dispatch can bind (0: a single group is over the limit)."""
    return groups_that_fit(p, limit, backward_group_bytes(p, write_ds))


def reduce_to_mask(ds: np.ndarray, mask_shape: Tuple[int, ...]) -> np.ndarray:
    """Sums ``ds`` [B, Hq, Lq, Lk] over the dims the mask broadcasts (size 1 in ``mask_shape``)."""
    axes = tuple(a for a, (n, m) in enumerate(zip(ds.shape, mask_shape)) if m == 1 and n != 1)
    return (ds.sum(axis=axes, keepdims=True) if axes else ds).reshape(mask_shape).astype(np.float32, copy=False)


def backward_bytes(p: Problem, write_ds: bool, n_groups: int) -> Dict[str, int]:
    """Bytes each buffer of a backward chunk of ``n_groups`` groups needs (dS none without
    ``write_ds``: its binding still gets a buffer of one word)."""
    return {name: n_groups * b for name, b in backward_group_bytes(p, write_ds).items()}


def grids(p: Problem, config: BackwardConfig, n: int) -> List[Tuple[int, int, int]]:
    """Grids of the pre, dK/dV and dQ dispatches over ``n`` groups."""
    pre, dkdv, dq = config.kernels()
    heads = n * p.group
    return [(math.ceil(p.len_q / pre.wg), heads, 1), (math.ceil(p.len_k / dkdv.br), n, 1), query_grid(p, heads, dq.br)]


class BackwardPlan(RecordedPlan):
    """The backward's buffers and pipelines on one device, built once, bound to ``problem``.
    ``capacity``: buffer bytes of a reusable plan (``backward_plan``); None: exact for ``problem``."""

    def __init__(self, device: Any, problem: Problem, config: BackwardConfig,
                 capacity: Optional[Dict[str, int]] = None):
        kp = device.kp
        mgr = device.manager
        p = problem
        per = backward_group_bytes(p, config.write_ds)
        groups = self._chunk_groups(device, p, config, per,
                                    lambda limit: backward_groups_per_chunk(p, limit, config.write_ds),
                                    "(batch, kv-head) slice of the backward", capacity)
        for g0, g1 in groups:
            n = g1 - g0
            sizes = capacity if capacity is not None else backward_bytes(p, config.write_ds, n)
            tensors, memory = self._io_tensors({name: sizes.get(name, 0) for name in (*INPUTS, *OUTPUTS, "ds")},
                                               (*OUTPUTS, "ds"))
            # Device-local even on host-memory devices: the barrier after fa2_bwd_pre is recorded by
            # syncing it (see record()).
            tensors["stats"] = mgr.tensor_t(np.zeros(max(sizes["stats"] // 4, 1), np.float32), kp.TensorTypes.device)
            tensors["mask"] = self.mask
            bound = [tensors[name] for name in BINDINGS]
            algorithms = [self._algorithm(bound, k.kernel, config.spec(k, score_spec(p)), grid, push)
                          for k, (grid, push) in zip(config.kernels(), self._dispatches(p, g0, n))]
            self.chunks.append(Chunk(g0, g1, tensors, algorithms, memory=memory))
        self.bind(p, config)
        stats["plans"] += 1
        log.debug("backward plan for %s: %d chunk(s), %s", p, len(self.chunks), config)

    def _dispatches(self, p: Problem, g0: int, n: int) -> List[Tuple[Tuple[int, int, int], np.ndarray]]:
        """(grid, push constants) of the pre, dK/dV and dQ dispatches over ``n`` groups from ``g0``."""
        push = push_constants(p, g0)
        return [(grid, push) for grid in grids(p, self.config, n)]

    def _bind_views(self) -> None:
        p = self.problem
        sizes = backward_group_bytes(p, self.config.write_ds)
        if self.capacity is not None:
            self.chunks[0].g1 = p.batch * p.heads_kv
        self.mask_view = self.mask_memory[: mask_bytes(p) // 4]
        for c in self.chunks:
            n = c.g1 - c.g0
            c.views = {name: c.memory[name][: n * sizes.get(name, 0)] for name in (*INPUTS, *OUTPUTS, "ds")}

    def run(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, out: np.ndarray, dout: np.ndarray,
            lse: np.ndarray, mask: Optional[np.ndarray], alibi: Optional[np.ndarray] = None,
            sinks: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """Host arrays in (see ``Backend.backward``; ``alibi``/``sinks``: the float32 slopes and sinks
        the problem has, the sinks read by fa2_bwd_pre's recompute of extreme rows only);
        ``(dq, dk, dv, ds)`` out, ``ds`` the full float32 [B, Hq, Lq, Lk] when the config writes it,
        else None."""
        p = self.problem
        groups = p.batch * p.heads_kv
        shapes = {"q": (p.heads_q, p.len_q, p.dim_k), "k": (p.heads_kv, p.len_k, p.dim_k),
                  "v": (p.heads_kv, p.len_k, p.dim_v), "o": (p.heads_q, p.len_q, p.dim_v),
                  "lse": (p.heads_q, p.len_q), "do": (p.heads_q, p.len_q, p.dim_v)}
        src = {}
        for name, a in zip(INPUTS, (q, k, v, out, lse, dout)):
            # Raw bytes are copied below: a wrong dtype or shape would give garbage, not an error.
            want = np.dtype(np.float32) if name == "lse" else STORAGE[p.dtype]
            if a.dtype != want:
                raise TypeError(f"backward {name}: expected {want}, got {a.dtype}")
            if a.shape != (p.batch, *shapes[name]):
                raise ValueError(f"backward {name}: expected shape {(p.batch, *shapes[name])}, got {a.shape}")
            src[name] = np.ascontiguousarray(a).reshape(groups, -1)
        # One copy into mapped memory; packed 16-bit data goes in as raw bytes.
        copy_bytes([(c.views[name], part.reshape(-1).view(np.uint8))
                    for c in self.chunks for name in INPUTS for part in (src[name][c.g0:c.g1],)])
        write_mask_payload(self.mask_view, mask, alibi, sinks)
        if self.config.write_ds:
            # The dK/dV kernel writes dS only where it computes (tiles the band hides are skipped):
            # the rest must read 0, whatever an earlier problem left in the buffer.
            for c in self.chunks:
                c.views["ds"][:] = 0
        self.eval()
        storage = STORAGE[p.dtype]
        dq = np.empty((groups, p.group * p.len_q * p.dim_k), dtype=storage)
        dk = np.empty((groups, p.len_k * p.dim_k), dtype=storage)
        dv = np.empty((groups, p.len_k * p.dim_v), dtype=storage)
        ds = np.empty((groups, p.group * p.len_q * p.len_k), dtype=np.float32) if self.config.write_ds else None
        copy_bytes([(part.reshape(-1).view(np.uint8), c.views[name])
                    for c in self.chunks for name, dst in (("dq", dq), ("dk", dk), ("dv", dv), ("ds", ds))
                    if dst is not None for part in (dst[c.g0:c.g1],)])
        b, hq, hkv = p.batch, p.heads_q, p.heads_kv
        return (dq.reshape(b, hq, p.len_q, p.dim_k), dk.reshape(b, hkv, p.len_k, p.dim_k),
                dv.reshape(b, hkv, p.len_k, p.dim_v), None if ds is None else ds.reshape(b, hq, p.len_q, p.len_k))

    def record(self, sequence: Any, transfers: bool) -> Any:
        """Records the pass of the bound problem into ``sequence``: with ``transfers``, inputs to the
        device first and gradients back after; without, the dispatches alone (data already on the
        device, as benchmarks time torch's backward)."""
        kp = self.device.kp
        p = self.problem
        if transfers:
            # dS goes up too (zeros where the kernel writes nothing: see run()).
            up = (*INPUTS, "ds") if self.config.write_ds else INPUTS
            inputs = [c.tensors[name] for c in self.chunks for name in up]
            if uses_mask_buffer(p):
                inputs.append(self.mask)
            sequence.record(kp.OpTensorSyncDevice(inputs))
        dispatches = [list(zip(c.algorithms, self._dispatches(p, c.g0, c.g1 - c.g0))) for c in self.chunks]

        def dispatch(algorithm: Any, grid: Tuple[int, int, int], push: np.ndarray) -> None:
            self._set_grid(algorithm, grid)
            sequence.record(kp.OpAlgoDispatch(algorithm, push))

        for chunk in dispatches:
            dispatch(chunk[0][0], *chunk[0][1])
        # dK/dV and dQ read the statistics fa2_bwd_pre wrote. kp's Python API records no
        # compute -> compute barrier, and OpAlgoDispatch's own barrier only orders transfers before
        # the dispatch. Syncing the (device-local) statistics records compute -> transfer (shader
        # writes made available), and the next dispatch's transfer -> compute barrier on the same
        # buffer makes them visible: together a complete dependency, for one small copy.
        sequence.record(kp.OpTensorSyncLocal([c.tensors["stats"] for c in self.chunks]))
        for chunk in dispatches:
            for algorithm, (grid, push) in chunk[1:]:
                dispatch(algorithm, grid, push)
        if transfers:
            outputs = [c.tensors[name] for c in self.chunks
                       for name in (*OUTPUTS, *(("ds",) if self.config.write_ds else ()))]
            sequence.record(kp.OpTensorSyncLocal(outputs))
        return sequence


def backward_plan(device: Any, problem: Problem, config: BackwardConfig) -> BackwardPlan:
    """The device's backward plan that runs ``problem`` with ``config``, bound to it: the reusable
    plan of the three pipelines (built, or replaced by a larger one, when the problem does not fit),
    or an exact plan where the problem needs several chunks. Call under ``device.lock``."""
    p = problem
    route_key = ("backward", p, config, knobs.current())
    route = device.plans.routes.get(route_key)
    if route is None:
        limit = binding_limit(device.caps.max_storage_buffer_range)
        n_groups = p.batch * p.heads_kv
        if backward_groups_per_chunk(p, limit, config.write_ds) < n_groups:
            route = (("backward", p, config), None, limit)
        else:
            grid = None if grids_settable(device.kp) else tuple(grids(p, config, n_groups))
            route = (("backward", config, score_spec(p), limit, grid),
                     dict(backward_bytes(p, config.write_ds, n_groups), mask=mask_bytes(p)), limit)
        device.plans.remember(route_key, route)
    key, need, limit = route
    if need is None:
        return device.plans.get(key, lambda: BackwardPlan(device, p, config))

    def build(old: Optional[BackwardPlan]) -> BackwardPlan:
        return BackwardPlan(device, p, config, capacity(device, old and old.capacity, need, limit))

    return device.plans.fitted(key, need, build).bind(p, config)
