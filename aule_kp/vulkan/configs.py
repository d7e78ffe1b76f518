"""The pipeline configurations the kernel choice (choice.py) returns and the plans build.

A ``KernelConfig`` is the small state struct that keys pipelines (as in llama.cpp's ggml-vulkan):
one GLSL source per kernel, many pipelines through specialization constants. ``BackwardConfig``
holds a backward pass's three, ``SplitKVConfig`` a split-KV forward's one and its split. Beside each:
the shared memory its shader declares (the formulas in the shader headers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Tuple, Union

import numpy as np

from .. import knobs
from ..problem import Problem

#: Vulkan's guaranteed maxComputeWorkGroupCount per dimension (every device allows at least this many).
MAX_GRID = 65535

DTYPE_CODE = {"float32": 0, "float16": 1, "bfloat16": 2}
FLOAT_BYTES = 4
#: Every kernel family (``KernelConfig.family``), in the order the self-check and doctor list them.
FAMILIES = ("fwd.scalar", "fwd.wave64", "fwd.coopmat", "fwd.coopmat2", "splitkv", "bwd.scalar", "bwd.coopmat")
#: Spec constant TEST_CORRUPT (glsl/fa2_common.glsl), set in the pipelines of the families
#: ``AULE_KP_TEST_CORRUPT`` names (TEST ONLY), which then add 1.0 to every output they store: a wrong
#: kernel on the device, for the self-check's tests. Normal pipelines leave it at 0, which the driver
#: folds away when it specialises the shader.
TEST_CORRUPT_ID = 11


def score_spec(problem: Problem) -> Tuple[int, int, int]:
    """Spec constants SOFTCAP, ALIBI and SINKS (constant_id 12, 13, 14; glsl/fa2_common.glsl) of
    ``problem``: all 0 leaves every pipeline the plain one."""
    return int(problem.softcap != 0.0), int(problem.alibi_rows != 0), int(problem.sinks)


@dataclass(frozen=True)
class KernelConfig:
    """One pipeline: which source, and the values of its specialization constants."""

    variant: str
    kernel: str  # glsl/<kernel>.comp
    dk: int
    dv: int
    br: int  # query rows per workgroup
    bc: int  # keys per tile
    tpr: int  # invocations per query row (scalar variants)
    dtype: int  # DTYPE_CODE
    wg: int  # invocations per workgroup
    stage: int  # 1: K/V tiles staged in shared memory
    rpt: int = 1  # query rows per invocation group (scalar variants)

    @property
    def family(self) -> str:
        """The kernel family (``fwd.<variant>``, ``splitkv``, ``bwd.<variant>``): what the driver-trap
        table, the self-check verdicts and the tuning cache are keyed by."""
        if self.kernel.startswith("fa2_bwd"):
            return f"bwd.{self.variant}"
        return self.variant if self.variant == "splitkv" else f"fwd.{self.variant}"

    def spec(self, extra: tuple = (), mods: Tuple[int, ...] = ()) -> np.ndarray:
        """Specialization constants in constant_id order (glsl/fa2_common.glsl), then ``extra``
        (the backward's ids 9 and 10); see ``TEST_CORRUPT_ID`` for constant_id 11; ``mods``: the
        score modifiers' ids 12 to 14 (``score_spec``), left out when all are 0 (the plain
        pipeline, same constants as before they existed)."""
        values = [self.dk, self.dv, self.br, self.bc, self.tpr, self.dtype, self.wg, self.stage, self.rpt, *extra]
        corrupt = self.family in knobs.current().test_corrupt
        if corrupt or any(mods):
            # Ids 9 and 10 do not exist in the forward shaders: entries for them change nothing.
            values += [0] * (TEST_CORRUPT_ID - len(values)) + [int(corrupt)]
        if any(mods):
            values += list(mods)
        return np.array(values, dtype=np.uint32)

    def shared_bytes(self) -> int:
        if self.variant == "coopmat":
            return coopmat_shared_bytes(self)
        if self.variant == "coopmat2":
            return 0  # fa2_fwd_cm2.comp declares none; the driver's own staging is checked at pipeline creation
        return FLOAT_BYTES * (self.stage * self.bc * (self.dk + self.dv) + 2)


def coopmat_shared_bytes(cfg: KernelConfig) -> int:
    """Shared memory of glsl/fa2_fwd_coopmat.comp (the formula in its header): fp16 Q/K/V staging
    (one buffer, or K and V apart with STAGE 2), fp32 scores, fp16 P, and per-row m and l."""
    staging = 2 * cfg.bc * (cfg.dk + cfg.dv + 16) if cfg.stage == 2 else 2 * cfg.bc * (max(cfg.dk, cfg.dv) + 8)
    return staging + 4 * cfg.br * (cfg.bc + 4) + 2 * cfg.br * (cfg.bc + 8) + 8 * cfg.br


# ---- backward -----------------------------------------------------------------------------------
# Three kernels per pass (glsl/fa2_bwd_common.glsl): fa2_bwd_pre (row statistics), fa2_bwd_dkdv
# and fa2_bwd_dq. Each is a KernelConfig with the forward's spec constants, read per kernel as:
#   pre:  WG invocations, one query row each (tiles unused).
#   dkdv: BR keys per workgroup, RPT keys per row group of TPR lanes, BC query rows per step.
#   dq:   as the forward: BR query rows per workgroup, RPT rows per row group, BC keys per step.

@dataclass(frozen=True)
class BackwardConfig:
    """The pipelines of one backward pass. ``write_ds``: dK/dV also writes dS (the float-mask
    gradient); ``has_mask``: the mask code is compiled in (a spec constant, see fa2_bwd_common.glsl)."""

    variant: str
    pre: KernelConfig
    dkdv: KernelConfig
    dq: KernelConfig
    write_ds: bool = False
    has_mask: bool = False

    def spec(self, cfg: KernelConfig, mods: Tuple[int, ...] = ()) -> np.ndarray:
        """Specialization constants of one of the three kernels, + WRITE_DS (constant_id 9, set for
        dK/dV only: the other pipelines do not depend on it) and HAS_MASK (10); ``mods`` as
        ``KernelConfig.spec``."""
        return cfg.spec((int(self.write_ds and cfg is self.dkdv), int(self.has_mask)), mods)

    def kernels(self) -> tuple[KernelConfig, KernelConfig, KernelConfig]:
        return self.pre, self.dkdv, self.dq


def backward_shared_bytes(cfg: KernelConfig) -> int:
    """Shared memory of a backward kernel: the formula in glsl/fa2_bwd_cm.glsl for coopmat, else
    the scalar kernels' two staged tiles (the forward's formula)."""
    if cfg.variant != "coopmat" or cfg.kernel == "fa2_bwd_pre":
        return cfg.shared_bytes()
    return (2 * cfg.bc * (cfg.dk + cfg.dv + 16) + 4 * cfg.br * (cfg.bc + 4) + 2 * cfg.br * (cfg.bc + 8)
            + 16 * max(cfg.br, cfg.bc))


# ---- split-KV -----------------------------------------------------------------------------------
# Split-KV decoding ("flash-decoding"): for a short query block over a long key sequence the
# forward's grid (query tiles x query heads) has a few dozen workgroups, so glsl/fa2_splitkv.comp
# splits the keys of every (batch, kv head) over ``n_split`` workgroups of one dispatch (partial O
# and (m, l) per split, all query heads of a kv head packed in one workgroup so K/V are read once);
# the last workgroup of each row block to finish, found with an atomic counter, merges the splits
# into O and LSE as the forward writes them. When it is used: choice.split_kv_config.

#: Splits the merge reads at once per invocation (glsl/fa2_splitkv.comp MERGE_UNROLL).
MERGE_UNROLL = 8


def merge_lanes(br: int, dv: int, wg: int) -> int:
    """Invocations that share one merge unit's splits (SL in glsl/fa2_splitkv.comp): 1 when the
    BR * DV / 4 units (a row's 4 columns) fill the workgroup, else WG / units."""
    units = br * dv // 4
    return 1 if units >= wg else wg // units


def splitkv_shared_bytes(kernel: KernelConfig) -> int:
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
        return splitkv_shared_bytes(self.kernel)


ForwardConfig = Union[KernelConfig, SplitKVConfig]
