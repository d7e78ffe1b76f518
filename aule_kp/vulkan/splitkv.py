"""Split-KV decoding ("flash-decoding"): when it is used, how the keys are split, its pipeline.

For a short query block (Lq <= 16) over a long key sequence the forward's grid (query tiles x
query heads) has a few dozen workgroups: most of a GPU idles while it streams K and V. Split-KV
splits the keys of every (batch, kv head) over ``n_split`` workgroups of one dispatch
(glsl/fa2_splitkv.comp: partial O and (m, l) per split, all query heads of a kv head packed in one
workgroup so K/V are read once); the last workgroup of each row block to finish, found with an
atomic counter, merges the splits into O and LSE as the forward writes them. ``Plan`` records one
dispatch per chunk and holds the scratch buffers (partials, counters) across calls.

``AULE_KP_SPLIT_KV``: ``0`` never splits; ``N`` forces N splits whenever Lq <= 16 (tests,
benchmarks); unset: automatic (``split_kv_config``).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple, Union

import numpy as np

from ..problem import Problem
from . import workarounds
from .kernels import DTYPE_CODE, FLOAT_BYTES, KernelConfig, choose, disabled_reasons, parallelism, passes_self_check
from .probe import DeviceCaps

log = logging.getLogger("aule_kp")

#: Longest query block split-KV takes (decoding, speculative decoding, small chunked prefill).
MAX_SPLIT_LQ = 16
#: Fewest keys per split the automatic choice makes: below that the per-workgroup setup and the
#: merge cost more than the extra parallelism gains.
MIN_SPLIT_KEYS = 256
#: Most splits the automatic choice makes (scratch and the merge's work grow with it).
MAX_AUTO_SPLITS = 1024
#: Split-KV is considered when the forward's grid has fewer workgroups than SMALL_GRID_FACTOR
#: times the device's parallelism, and aims at TARGET_GRID_FACTOR times it (on an H200, 2x ran
#: faster than 4x: BENCHMARKS.md, "Notes moved from the sources").
SMALL_GRID_FACTOR = 4
TARGET_GRID_FACTOR = 2
#: Splits the merge reads at once per invocation (glsl/fa2_splitkv.comp MERGE_UNROLL).
MERGE_UNROLL = 8


def merge_lanes(br: int, dv: int, wg: int) -> int:
    """Invocations that share one merge unit's splits (SL in glsl/fa2_splitkv.comp): 1 when the
    BR * DV / 4 units (a row's 4 columns) fill the workgroup, else WG / units."""
    units = br * dv // 4
    return 1 if units >= wg else wg // units


def shared_bytes(kernel: KernelConfig) -> int:
    """Shared memory of glsl/fa2_splitkv.comp (the formula in its header): the key groups' merge
    (a tree: half of them hand their O over per round), reused by the split lanes' merge, and the
    last-workgroup flag."""
    c = kernel
    sl = merge_lanes(c.br, c.dv, c.wg)
    key_groups = c.wg // c.tpr
    return FLOAT_BYTES * (c.br * c.dv * max(sl, key_groups // 2) + 2 * max(key_groups, sl) * c.br + 1)


@dataclass(frozen=True)
class SplitKVConfig:
    """The pipeline of a split-KV forward and how the keys are split.

    ``kernel``: glsl/fa2_splitkv.comp (BR rows per workgroup, BC keys per key group and step, TPR
    invocations per key, WG invocations); one dispatch computes the partials and merges them.
    Split s covers keys ``[lo + s * split_len, lo + (s + 1) * split_len)`` of the band's key range
    ``[lo, hi)`` (``Problem.key_range(0, len_q)``).
    """

    kernel: KernelConfig
    n_split: int
    split_len: int
    variant: str = "splitkv"  # what callers that report the chosen variant show

    def push(self, base: np.ndarray) -> np.ndarray:
        """Push constants: the common ones, then n_split and split_len (``Push`` with
        ``FA2_SPLIT_KV`` in glsl/fa2_common.glsl)."""
        return np.concatenate([base, np.array([self.n_split, self.split_len], np.uint32)])

    def blocks(self, p: Problem) -> int:
        """Row blocks per (batch, kv-head) group: the grid's z."""
        return math.ceil(p.group * p.len_q / self.kernel.br)

    def group_bytes(self, p: Problem) -> Dict[str, int]:
        """Scratch bytes per (batch, kv-head) group: partial O (fp32) and (m, l) per row and split,
        and a uint counter per row block."""
        rows = p.group * p.len_q * self.n_split
        return {"partial_o": rows * p.dim_v * FLOAT_BYTES, "partial_ml": rows * 2 * FLOAT_BYTES,
                "counters": self.blocks(p) * 4}

    def dispatch(self, p: Problem, n_groups: int,
                 base_push: np.ndarray) -> Tuple[KernelConfig, Tuple[int, int, int], np.ndarray]:
        """(pipeline, grid, push constants) of the dispatch over a chunk of ``n_groups`` groups."""
        return self.kernel, (self.n_split, n_groups, self.blocks(p)), self.push(base_push)

    def loops(self) -> int:
        """Loop iterations per invocation, an upper bound (CPU drivers stop an invocation at 65535
        in total): the key loop, the partial store loop and the merge's unit and split loops."""
        c = self.kernel
        units = c.br * c.dv // 4
        sl = merge_lanes(c.br, c.dv, c.wg)
        per_unit = 1 + math.ceil(self.n_split / (sl * MERGE_UNROLL))
        return (math.ceil(self.split_len / (c.wg // c.tpr * c.bc)) + math.ceil(units / c.wg)
                + math.ceil(units * sl / c.wg) * per_unit)

    def shared_bytes(self) -> int:
        """Shared memory of the kernel (the formula in glsl/fa2_splitkv.comp's header)."""
        return shared_bytes(self.kernel)


ForwardConfig = Union[KernelConfig, SplitKVConfig]


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


def split_kernel(caps: DeviceCaps, problem: Problem) -> KernelConfig:
    """The split-KV pipeline of ``problem`` on this device (before the split count)."""
    p = problem
    caps = workarounds.effective(caps)
    cpu = caps.type == "cpu"
    vec = 4 if p.dtype == "float32" else 8  # elements per 16-byte load
    shuffle = max(caps.subgroup_size, 1) if caps.subgroup_shuffle else 1
    # Lanes per key: enough that each loads one 16-byte vector of the longer row, at most a subgroup.
    tpr = min(_pow2_floor(max(p.dim_k, p.dim_v) // vec), shuffle, 32)
    vectors = math.ceil(p.dim_k // vec / tpr) + math.ceil(p.dim_v // vec / tpr)  # K + V uvec4 per lane and key
    # Rows per workgroup: all of a kv head's rows (rounded up to a power of two, which bounds the
    # pipelines a model needs) within a budget of q and O floats per invocation: 128 on GPUs (8 rows
    # ran faster than 4 on an H200: BENCHMARKS.md, "Notes moved from the sources"), 64 on CPU
    # drivers (keeps the unrolled code, and lavapipe's compile time, small).
    rows = p.group * p.len_q
    budget = 64 if cpu else 128
    br = max(1, min(_pow2_floor(budget // (vectors * vec)), 1 << (rows - 1).bit_length()))
    # GPUs: 128 invocations, each step's loads issued a step ahead (STAGE 2), as many keys per key
    # group and step (at most 4) as keep those loads, both steps', at 64 registers: the fastest of
    # those swept on an H200 (BENCHMARKS.md, "Notes moved from the sources").
    # CPU drivers: few key groups (merged over a tree of barriers) and short unrolled steps.
    wg = max(tpr, 32 if cpu else 128)
    bc = 2 if cpu else max(1, min(4, _pow2_floor(64 // (2 * 4 * vectors))))
    stage = 0 if cpu else 2
    kernel = KernelConfig("splitkv", "fa2_splitkv", p.dim_k, p.dim_v, br, bc, tpr, DTYPE_CODE[p.dtype], wg, stage)
    while kernel.br > 1 and shared_bytes(kernel) > caps.shared_memory:
        kernel = replace(kernel, br=kernel.br // 2)
    return kernel


def split_env() -> Optional[int]:
    """``AULE_KP_SPLIT_KV`` as a number (None: unset, automatic)."""
    raw = os.environ.get("AULE_KP_SPLIT_KV", "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"AULE_KP_SPLIT_KV must be 0 (never split) or a number of splits, got {raw!r}")
    return value


def split_kv_config(caps: DeviceCaps, problem: Problem, forward: Optional[KernelConfig] = None,
                    groups: Optional[int] = None) -> Optional[SplitKVConfig]:
    """Split-KV for ``problem`` on this device, or None when the forward kernel ``forward`` should run.

    Automatic: Lq <= 16, the band leaves at least 2 x ``MIN_SPLIT_KEYS`` keys, and the forward's
    grid over one dispatch of ``groups`` kv groups (default all) has fewer than
    ``SMALL_GRID_FACTOR`` x ``parallelism`` workgroups (GPUs), or the device is a CPU driver. The
    split count then aims the grid at ``TARGET_GRID_FACTOR`` x ``parallelism`` workgroups
    (e.g. 1024 on a discrete GPU) with at least ``MIN_SPLIT_KEYS`` keys each. ``AULE_KP_SPLIT_KV``
    overrides (see the module doc). None too when the driver-trap table or a recorded self-check
    verdict turns split-KV off on this device (``kernels.disabled_reasons``).
    """
    p = problem
    forced = split_env()
    if forced == 0 or p.len_q > MAX_SPLIT_LQ or p.len_k == 0 or p.empty:
        return None
    if disabled_reasons("splitkv", caps, p.dtype):
        return None
    kernel = split_kernel(caps, p)
    lo, hi = p.key_range(0, p.len_q)
    keys = hi - lo
    step = kernel.wg // kernel.tpr * kernel.bc  # keys a workgroup takes per step
    n_groups = p.batch * p.heads_kv if groups is None else max(1, min(groups, p.batch * p.heads_kv))
    max_grid_x = min(caps.max_workgroup_count[0], 65535)
    if forced is not None:
        n_split = min(forced, max_grid_x)
        split_len = step * math.ceil(max(keys, 1) / (n_split * step))
    else:
        par = parallelism(caps)
        fwd = forward or choose(caps, p)
        fwd_grid = math.ceil(p.len_q / fwd.br) * n_groups * p.group
        # CPU drivers take split-KV even when the forward's grid is full (then often with one
        # split): the forward's query tile (32+ rows) runs mostly idle lanes for Lq <= 16 and reads
        # K/V once per query head (15-50x faster on lavapipe: BENCHMARKS.md, "Notes moved from the
        # sources").
        cpu = caps.type == "cpu"
        if keys < 2 * MIN_SPLIT_KEYS or (fwd_grid >= SMALL_GRID_FACTOR * par and not cpu):
            return None
        blocks = math.ceil(p.group * p.len_q / kernel.br)
        want = math.ceil(TARGET_GRID_FACTOR * par / (n_groups * blocks))
        n_split = max(1, min(want, keys // MIN_SPLIT_KEYS, MAX_AUTO_SPLITS, max_grid_x))
        if n_split < 2 and not cpu:
            return None
        split_len = step * math.ceil(keys / (n_split * step))
        n_split = math.ceil(keys / split_len)  # rounding split_len up may leave a split empty
    cfg = SplitKVConfig(kernel, n_split, split_len)
    if cfg.shared_bytes() > caps.shared_memory or kernel.wg > caps.max_workgroup_invocations:
        return None
    log.debug("split-KV for %s: %d splits of %d keys, %s", p, n_split, split_len, kernel)
    return cfg


def choose_forward(caps: DeviceCaps, problem: Problem, variant: Optional[str] = None,
                   groups: Optional[int] = None) -> ForwardConfig:
    """The forward's pipelines: split-KV where ``split_kv_config`` takes the problem, else the best
    forward variant (``choose``). A pinned ``variant`` (argument or ``AULE_KP_FORCE_VARIANT``)
    runs that forward kernel unless ``AULE_KP_SPLIT_KV`` forces splits. Split-KV's self-check runs
    the first time it is chosen on this device (``kernels.passes_self_check``); if it fails, the forward runs."""
    forward = choose(caps, problem, variant)
    pinned = bool(variant or os.environ.get("AULE_KP_FORCE_VARIANT"))
    if pinned and not split_env():
        return forward
    split = split_kv_config(caps, problem, forward, groups)
    return split if split is not None and passes_self_check(split.kernel, caps, problem.dtype) else forward
