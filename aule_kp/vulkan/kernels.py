"""Kernel variants, their specialization, and per-device tile choice (all tuning lives here).

A ``KernelConfig`` is the small state struct that keys pipelines (as in llama.cpp's ggml-vulkan):
one GLSL source per kernel, many pipelines through specialization constants.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np

from ..dtypes import ITEMSIZE
from ..problem import Problem
from . import selfcheck, workarounds
from .probe import DeviceCaps

DTYPE_CODE = {"float32": 0, "float16": 1, "bfloat16": 2}
#: Opt-in that lets fp32/bf16 data run the fp16 cooperative-matrix kernels (rounded on load).
COOPMAT_CONVERT_ENV = "AULE_KP_COOPMAT_CONVERT"
FLOAT_BYTES = 4


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

    def spec(self, extra: tuple = ()) -> np.ndarray:
        """Specialization constants in constant_id order (glsl/fa2_common.glsl), then ``extra``
        (the backward's ids 9 and 10); see :func:`test_corruption` for constant_id 11."""
        values = [self.dk, self.dv, self.br, self.bc, self.tpr, self.dtype, self.wg, self.stage, self.rpt, *extra]
        if self.family in test_corruption():
            # Ids 9 and 10 do not exist in the forward shaders: entries for them change nothing.
            values += [0] * (TEST_CORRUPT_ID - len(values)) + [1]
        return np.array(values, dtype=np.uint32)

    def shared_bytes(self) -> int:
        if self.variant == "coopmat":
            return coopmat_shared_bytes(self)
        return FLOAT_BYTES * (self.stage * self.bc * (self.dk + self.dv) + 2)


def coopmat_shared_bytes(cfg: KernelConfig) -> int:
    """Shared memory of glsl/fa2_fwd_coopmat.comp (the formula in its header): fp16 Q/K/V staging
    (one buffer, or K and V apart with STAGE 2), fp32 scores, fp16 P, and per-row m and l."""
    staging = 2 * cfg.bc * (cfg.dk + cfg.dv + 16) if cfg.stage == 2 else 2 * cfg.bc * (max(cfg.dk, cfg.dv) + 8)
    return staging + 4 * cfg.br * (cfg.bc + 4) + 2 * cfg.br * (cfg.bc + 8) + 8 * cfg.br


VARIANTS = ("scalar", "wave64", "coopmat")
#: Every kernel family (``KernelConfig.family``), in the order the self-check and doctor list them.
FAMILIES = ("fwd.scalar", "fwd.wave64", "fwd.coopmat", "splitkv", "bwd.scalar", "bwd.coopmat")

#: TEST ONLY. ``AULE_KP_TEST_CORRUPT=<family>[,<family>...]`` sets spec constant TEST_CORRUPT
#: (constant_id 11, glsl/fa2_common.glsl) in the pipelines of those kernel families, which then add
#: 1.0 to every output they store: a wrong kernel on the device, for the self-check's tests. Normal
#: pipelines leave the constant at 0, which the driver folds away when it specialises the shader.
TEST_CORRUPT_ENV = "AULE_KP_TEST_CORRUPT"
TEST_CORRUPT_ID = 11


def test_corruption() -> frozenset:
    """The kernel families ``AULE_KP_TEST_CORRUPT`` corrupts (test-only; empty normally)."""
    raw = os.environ.get(TEST_CORRUPT_ENV, "")
    return frozenset(x.strip() for x in raw.split(",") if x.strip()) if raw else frozenset()

#: Compute units of a device Vulkan cannot count (it has no SM/CU count): high-end discrete GPUs
#: have ~100-140 (H100/H200 132 SMs, RX 7900 XTX 96 CUs, RTX 4090 128 SMs); integrated ones far fewer.
GPU_PARALLELISM = {"discrete": 128, "integrated": 16}
OTHER_PARALLELISM = 32


def parallelism(caps: DeviceCaps) -> int:
    """Workgroups the device runs at once, roughly: CPU drivers run one per core; for GPUs Vulkan
    reports no compute-unit count, so a typical count for the device type."""
    if caps.type == "cpu":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return GPU_PARALLELISM.get(caps.type, OTHER_PARALLELISM)


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


def _fit_tpr(tpr: int, problem: Problem) -> int:
    """Largest power of two <= tpr that leaves each lane an even slice of q and o (pairs are packed)."""
    while tpr > 1 and (problem.dim_k % (2 * tpr) or problem.dim_v % (2 * tpr)):
        tpr //= 2
    return tpr


def _scalar_tiles(caps: DeviceCaps, problem: Problem, wave: int, cpu: bool) -> Dict[str, int]:
    """Tiles for the scalar/subgroup source on this device."""
    dmax = max(problem.dim_k, problem.dim_v)
    if cpu:
        # CPU drivers (lavapipe): no staging (barriers are expensive, caches stage anyway); 4 rows per
        # invocation so each K/V load feeds 4 rows; 16 q values per lane keep the unrolled code small
        # enough to compile in seconds (B1 H8 S512 D64 fp32: 0.29 s, 1.8 GFLOP/s on 2 cores).
        tpr = _fit_tpr(min(8, caps.subgroup_size if caps.subgroup_shuffle else 1, _pow2_floor(max(1, dmax // 16))),
                       problem)
        wg = 64
        return dict(tpr=tpr, br=wg // tpr * 4, bc=8, stage=0, wg=wg, rpt=4)
    # GPUs: split a row over lanes so each holds at most ~32 q/o values in registers.
    tpr = _fit_tpr(min(_pow2_floor(max(1, dmax // 32)), 8, caps.subgroup_size if caps.subgroup_shuffle else 1),
                   problem)
    wg = max(wave * 2, 128)
    br = wg // tpr
    bc = 32
    while bc > 8 and FLOAT_BYTES * bc * (problem.dim_k + problem.dim_v) > caps.shared_memory - 64:
        bc //= 2
    return dict(tpr=tpr, br=br, bc=bc, stage=1, wg=wg, rpt=1)


#: K and V bytes the query heads of one scheduling section read (plan.query_grid, glsl/fa2_common.glsl
#: query_head(): longest query tiles first within a section, sections one after another). A fixed
#: budget, not derived from the device (Vulkan does not report cache sizes): on an H200 (50 MiB L2)
#: 16 MiB beat one head per section on most shapes, and 8 or 32 MiB were no better (BENCHMARKS.md,
#: "Notes moved from the sources"). AULE_KP_SECTION_BYTES overrides it; it is read when a plan is
#: built, so plans already cached for a shape keep their order.
SECTION_BYTES = 16 << 20
SECTION_BYTES_ENV = "AULE_KP_SECTION_BYTES"


def positive_int_env(name: str, what: str) -> Optional[int]:
    """The environment variable ``name`` as a positive integer (None when unset or empty); anything
    else is a ValueError that says it must be a positive number of ``what``."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{name} must be a positive number of {what}, got {raw!r}")
    return value


def section_bytes() -> int:
    """The section budget: ``AULE_KP_SECTION_BYTES`` (a positive integer) or SECTION_BYTES."""
    return positive_int_env(SECTION_BYTES_ENV, "bytes") or SECTION_BYTES


def section_heads(problem: Problem) -> int:
    """Query heads per scheduling section: as many as keep the K and V they read within section_bytes()."""
    head_bytes = problem.len_k * (problem.dim_k + problem.dim_v) * ITEMSIZE[problem.dtype] / problem.group
    return max(1, int(section_bytes() // max(head_bytes, 1)))


def _coopmat_tiles(caps: DeviceCaps, problem: Problem) -> Dict[str, int]:
    # First candidate that fits wins, smaller tiles where shared memory is short; the first ones
    # were the fastest on an H200 (`aule-kp tune`, benchmarks/ab_gpu.py --tiles; BENCHMARKS.md,
    # "Notes moved from the sources"):
    # * D=128: BR=64, BC=32, 4 subgroups, K/V sharing one buffer (STAGE 1). Above D=128, BR=128 / 8
    #   subgroups.
    # * D<=64: K and V in separate buffers (STAGE 2: two barriers per key tile instead of four),
    #   BR=128 with 4 subgroups of 32 rows and BC=16, on small grids too. BR=64 stays for query
    #   lengths the taller tile would pad by more than an eighth (short prompts, a few decode rows
    #   beyond split-KV's range) and for grids of fewer tall tiles than the device runs at once (not
    #   measured there: the older choice).
    wave = max(caps.subgroup_size, 1)
    dmax = max(problem.dim_k, problem.dim_v)
    if dmax > 128:
        candidates = ((128, 32, 256), (64, 32, 128), (64, 16, 128), (32, 16, 64))
    elif dmax > 64:
        candidates = ((64, 32, 128), (128, 32, 256), (64, 16, 128), (32, 16, 64))
    else:
        tall_grid = -(-problem.len_q // 128) * problem.batch * problem.heads_q
        tall = -problem.len_q % 128 <= problem.len_q // 8 and tall_grid >= parallelism(caps)
        candidates = ((128, 16, 128),) * tall + ((64, 32, 128), (64, 16, 128), (32, 16, 64))
    for br, bc, wg in candidates:
        wg = max(wg, wave) // wave * wave
        for stage in ((1,) if dmax > 64 else (2, 1)):
            cfg = KernelConfig("coopmat", "fa2_fwd_coopmat", problem.dim_k, problem.dim_v, br, bc, 1,
                               DTYPE_CODE[problem.dtype], wg, stage)
            if coopmat_shared_bytes(cfg) <= caps.shared_memory and wg <= caps.max_workgroup_invocations:
                return dict(tpr=1, br=br, bc=bc, stage=stage, wg=wg)
    return dict(tpr=1, br=16, bc=16, stage=1, wg=wave)


def _has_coopmat_16(caps: DeviceCaps) -> bool:
    return any(
        s[:3] == (16, 16, 16) and s[3] == "f16" and s[4] == "f16" and s[5] == "f32" and s[6] == "f32"
        for s in caps.coopmat_shapes
    )


def coopmat_reasons(caps: DeviceCaps, problem: Problem) -> List[str]:
    """What every cooperative-matrix kernel (forward and backward) needs from the build, the device
    and the data; each kernel adds its own head-dim limits."""
    from .device import kp_status

    reasons = []
    if not kp_status()["patched"]:
        # The released kp creates the device with no features enabled: coopmat is then outside
        # the spec (some drivers tolerate it, others may not). The scalar variants need none.
        reasons.append("kp is the unpatched release build: cooperative-matrix features are not enabled")
    if not caps.coopmat:
        reasons.append("device has no VK_KHR_cooperative_matrix")
    elif not _has_coopmat_16(caps):
        reasons.append("device has no 16x16x16 f16*f16+f32 cooperative matrix shape")
    if problem.dtype != "float16" and os.environ.get(COOPMAT_CONVERT_ENV) != "1":
        # fp32/bf16 would be rounded to fp16 on load: exact only for fp16 data, so opt-in.
        reasons.append(f"coopmat computes on float16; got {problem.dtype} ({COOPMAT_CONVERT_ENV}=1 allows it)")
    return reasons


def disabled_reasons(family: str, caps: DeviceCaps, dtype: str, warn: bool = True) -> List[str]:
    """Why kernel family ``family`` is turned off on this device for ``dtype``: the driver-trap
    table (workarounds.py) and the verdicts the self-check recorded (selfcheck.py; never runs it).
    ``warn``: the first failed verdict applied in a process warns (selfcheck.known_reasons)."""
    return workarounds.family_reasons(family, caps) + selfcheck.known_reasons(family, caps, dtype, warn)


def variant_reasons(variant: str, caps: DeviceCaps, problem: Problem, checks: bool = True) -> List[str]:
    """Why ``variant`` cannot run ``problem`` on this device (empty: it can); with ``checks``, also
    a variant the driver-trap table or a recorded self-check verdict turns off (``disabled_reasons``).

    Wave64 is correct on any subgroup size (its cross-lane sums never span more lanes than the
    device has): ``preferred_variants`` decides where the automatic choice tries it.
    """
    reasons: List[str] = []
    if variant not in VARIANTS:
        return [f"unknown variant {variant!r}; expected one of {VARIANTS}"]
    caps = workarounds.effective(caps)
    if variant == "coopmat":
        reasons += coopmat_reasons(caps, problem)
        if problem.dim_k % 16 or problem.dim_v % 16:
            reasons.append("coopmat needs head dims that are multiples of 16")
    if not reasons:
        cfg = config_for(variant, caps, problem)
        if cfg.shared_bytes() > caps.shared_memory:
            reasons.append(f"needs {cfg.shared_bytes()} B of shared memory, device has {caps.shared_memory}")
        if cfg.wg > caps.max_workgroup_invocations:
            reasons.append(f"needs {cfg.wg} invocations per workgroup, device allows {caps.max_workgroup_invocations}")
    # Only for a variant the device could run: the reasons above say enough otherwise.
    return reasons or (disabled_reasons(f"fwd.{variant}", caps, problem.dtype) if checks else [])


def config_for(variant: str, caps: DeviceCaps, problem: Problem) -> KernelConfig:
    """The specialization of ``variant`` for ``problem`` on this device (the tuning cache's winner
    when ``aule-kp tune`` stored one, see aule_kp/vulkan/tuning.py)."""
    caps = workarounds.effective(caps)
    if variant == "coopmat":
        t = _coopmat_tiles(caps, problem)
        kernel = "fa2_fwd_coopmat"
    else:
        wave = 64 if variant == "wave64" else max(caps.subgroup_size, 1)
        t = _scalar_tiles(caps, problem, wave, cpu=variant == "scalar" and caps.type == "cpu")
        kernel = "fa2_fwd"
    from .tuning import tuned_config  # the tuning cache's winner, when there is one

    return tuned_config(KernelConfig(variant, kernel, problem.dim_k, problem.dim_v, t["br"], t["bc"], t["tpr"],
                                     DTYPE_CODE[problem.dtype], t["wg"], t["stage"], t.get("rpt", 1)), caps, problem)


def preferred_variants(caps: DeviceCaps) -> List[str]:
    """Variants in the order this device prefers them. On GPUs whose subgroups are not 64 wide
    Wave64 comes last: the same source with GPU tiles, the fallback when the scalar variant is off.
    CPU drivers have none (lavapipe compiles GPU tiles for minutes; the NumPy backend is faster)."""
    order = ["coopmat"] if caps.coopmat else []
    if caps.subgroup_size == 64:
        return order + ["wave64", "scalar"]
    return order + (["scalar"] if caps.type == "cpu" else ["scalar", "wave64"])


def candidate_families(caps: DeviceCaps) -> List[str]:
    """The kernel families the automatic choice may use on this device, in ``FAMILIES`` order (what
    ``aule-kp doctor`` checks by default)."""
    used = {f"fwd.{v}" for v in preferred_variants(caps)} | {"splitkv", "bwd.scalar"}
    used |= {"bwd.coopmat"} if caps.coopmat else set()
    return [f for f in FAMILIES if f in used]


def passes_self_check(cfg: Any, caps: DeviceCaps, dtype: str) -> bool:
    """Runs the self-check of ``cfg``'s kernel family the first time it is used on this device and
    driver (selfcheck.ensure); False when it is wrong here (then turned off, with one warning)."""
    return not selfcheck.ensure(cfg.family, caps, dtype)


def choose(caps: DeviceCaps, problem: Problem, variant: Optional[str] = None) -> KernelConfig:
    """The best variant that can run ``problem`` (``variant`` or ``AULE_KP_FORCE_VARIANT`` forces one).
    A variant the driver-trap table or the self-check turns off is skipped (or, forced, refused)."""
    forced = variant or os.environ.get("AULE_KP_FORCE_VARIANT") or None
    names = [forced] if forced else preferred_variants(caps)
    for name in names:
        if not variant_reasons(name, caps, problem):
            cfg = config_for(name, caps, problem)
            if passes_self_check(cfg, caps, problem.dtype):
                return cfg
    detail = "; ".join(f"{n}: {', '.join(variant_reasons(n, caps, problem))}" for n in names)
    raise ValueError(f"no Vulkan kernel variant can run this problem ({detail})")


# ---- backward -----------------------------------------------------------------------------------
# Three kernels per pass (glsl/fa2_bwd_common.glsl): fa2_bwd_pre (row statistics), fa2_bwd_dkdv
# and fa2_bwd_dq. Each is a KernelConfig with the forward's spec constants, read per kernel as:
#   pre:  WG invocations, one query row each (tiles unused).
#   dkdv: BR keys per workgroup, RPT keys per row group of TPR lanes, BC query rows per step.
#   dq:   as the forward: BR query rows per workgroup, RPT rows per row group, BC keys per step.

#: Backward variants: "coopmat" where the device and problem allow it (on an H200 it runs 10-20x
#: faster than "scalar", still ~3.5x slower than torch's flash backward), else "scalar".
BACKWARD_VARIANTS = ("scalar", "coopmat")
#: lavapipe (gallivm) ends every loop of an invocation once 65535 iterations have run in total.
CPU_LOOP_LIMIT = 65535
#: Register budget of the coopmat backward kernels (fa2_bwd_cm.glsl): head dims up to this.
COOPMAT_BWD_MAX_DIM = 128


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

    def spec(self, cfg: KernelConfig) -> np.ndarray:
        """Specialization constants of one of the three kernels, + WRITE_DS (constant_id 9, set for
        dK/dV only: the other pipelines do not depend on it) and HAS_MASK (10)."""
        return cfg.spec((int(self.write_ds and cfg is self.dkdv), int(self.has_mask)))

    def kernels(self) -> tuple[KernelConfig, KernelConfig, KernelConfig]:
        return self.pre, self.dkdv, self.dq


def backward_shared_bytes(cfg: KernelConfig) -> int:
    """Shared memory of a backward kernel: the formula in glsl/fa2_bwd_cm.glsl for coopmat, else
    the scalar kernels' two staged tiles (the forward's formula)."""
    if cfg.variant != "coopmat" or cfg.kernel == "fa2_bwd_pre":
        return cfg.shared_bytes()
    return (2 * cfg.bc * (cfg.dk + cfg.dv + 16) + 4 * cfg.br * (cfg.bc + 4) + 2 * cfg.br * (cfg.bc + 8)
            + 16 * max(cfg.br, cfg.bc))


def _backward_scalar_tiles(caps: DeviceCaps, problem: Problem) -> Dict[str, int]:
    """Tiles of the scalar dK/dV and dQ kernels on this device (the same for both)."""
    shuffle_width = caps.subgroup_size if caps.subgroup_shuffle else 1
    dsum = problem.dim_k + problem.dim_v
    if caps.type == "cpu":
        # CPU drivers run a load lane by lane (~100 FMAs each) while shuffles are nearly free, so
        # a whole subgroup shares each row group: its q/dO (dkdv) or k/v (dq) loads are split over
        # every lane, and each feeds RPT rows/keys. RPT keeps k, v, dk, dv at ~384 floats per lane
        # (more spills and compiles for tens of seconds). BC = 2: the per-step code stays small.
        # lavapipe timings of RPT 8, 12 and 16: BENCHMARKS.md, "Notes moved from the sources".
        tpr = _fit_tpr(min(8, shuffle_width), problem)
        rpt = max(1, 192 * tpr // dsum)
        wg = max(tpr, caps.subgroup_size)
        return dict(tpr=tpr, br=wg // tpr * rpt, bc=2, stage=0, wg=wg, rpt=rpt)
    # GPUs: at most ~32 of each per-row array per lane; BC rows (dkdv) or keys (dq) of two
    # matrices staged in shared memory.
    tpr = _fit_tpr(min(_pow2_floor(max(1, max(problem.dim_k, problem.dim_v) // 32)), 8, shuffle_width), problem)
    wg = max(max(caps.subgroup_size, 1) * 2, 128)
    bc = 32
    while bc > 8 and FLOAT_BYTES * bc * dsum > caps.shared_memory - 64:
        bc //= 2
    return dict(tpr=tpr, br=wg // tpr, bc=bc, stage=1, wg=wg, rpt=1)


def _backward_coopmat_tiles(caps: DeviceCaps, problem: Problem) -> Dict[str, int]:
    """Largest tiles of glsl/fa2_bwd_cm.glsl that fit the device's shared memory, the fastest on an
    H200 first (BENCHMARKS.md, "Notes moved from the sources")."""
    wave = max(caps.subgroup_size, 1)
    tiles = dict(tpr=1, stage=1, rpt=1)
    for br, bc, wg in ((128, 32, 256), (64, 16, 128), (64, 32, 128), (32, 16, 64), (16, 16, 32)):
        tiles.update(br=br, bc=bc, wg=max(wg, wave) // wave * wave)
        probe = KernelConfig("coopmat", "fa2_bwd_dq_coopmat", problem.dim_k, problem.dim_v, br, bc, 1, 0, wg, 1)
        if backward_shared_bytes(probe) <= caps.shared_memory and wg <= caps.max_workgroup_invocations:
            break
    return tiles


def backward_config(caps: DeviceCaps, problem: Problem, write_ds: bool = False,
                    variant: Optional[str] = None) -> BackwardConfig:
    """The backward pipelines for ``problem``: ``variant`` or ``AULE_KP_FORCE_BWD_VARIANT`` picks one;
    by default coopmat where the device and problem allow it (10-20x the scalar variant on an H200).
    The self-check of the returned pipelines' family runs the first time they are used here
    (selfcheck.ensure); one that fails shows in ``backward_config_reasons``."""
    name = variant or os.environ.get("AULE_KP_FORCE_BWD_VARIANT")
    if not name:
        coop = backward_pipelines(caps, problem, write_ds, "coopmat")
        if not backward_config_reasons(coop, caps, problem) and passes_self_check(coop.dq, caps, problem.dtype):
            return coop
        name = "scalar"
    cfg = backward_pipelines(caps, problem, write_ds, name)
    if not backward_config_reasons(cfg, caps, problem):
        passes_self_check(cfg.dq, caps, problem.dtype)
    return cfg


def backward_pipelines(caps: DeviceCaps, problem: Problem, write_ds: bool, name: str) -> BackwardConfig:
    """The backward pipelines of variant ``name`` for ``problem`` (``backward_config`` without the
    choice and the self-check: what the self-check's canaries build)."""
    caps = workarounds.effective(caps)
    if name not in BACKWARD_VARIANTS:
        raise ValueError(f"unknown backward variant {name!r}; expected one of {BACKWARD_VARIANTS}")
    tiles = _backward_coopmat_tiles(caps, problem) if name == "coopmat" else _backward_scalar_tiles(caps, problem)
    suffix = "_coopmat" if name == "coopmat" else ""
    dtype = DTYPE_CODE[problem.dtype]

    def make(kernel: str, t: Dict[str, int]) -> KernelConfig:
        return KernelConfig(name, kernel, problem.dim_k, problem.dim_v, t["br"], t["bc"], t["tpr"], dtype,
                            t["wg"], t["stage"], t["rpt"])

    pre = dict(br=1, bc=1, tpr=1, stage=0, wg=64, rpt=1)
    from .tuning import tuned_backward  # the tuning cache's winner, when there is one

    return tuned_backward(BackwardConfig(name, make("fa2_bwd_pre", pre), make("fa2_bwd_dkdv" + suffix, tiles),
                                         make("fa2_bwd_dq" + suffix, tiles), bool(write_ds), problem.has_mask),
                          caps, problem)


def backward_config_reasons(cfg: BackwardConfig, caps: DeviceCaps, problem: Problem,
                            checks: bool = True) -> List[str]:
    """Why this device cannot run ``cfg`` for ``problem`` (empty: it can); with ``checks``, also when
    the driver-trap table or a recorded self-check verdict turns its family off."""
    reasons = []
    if cfg.variant == "coopmat":
        reasons += coopmat_reasons(caps, problem)
        if problem.dim_k % 16 or problem.dim_v % 16 or max(problem.dim_k, problem.dim_v) > COOPMAT_BWD_MAX_DIM:
            reasons.append(f"the coopmat backward needs head dims that are multiples of 16, at most "
                           f"{COOPMAT_BWD_MAX_DIM}")
    for k in cfg.kernels():
        if backward_shared_bytes(k) > caps.shared_memory:
            reasons.append(f"{k.kernel} needs {backward_shared_bytes(k)} B of shared memory, "
                           f"device has {caps.shared_memory}")
        if k.wg > caps.max_workgroup_invocations:
            reasons.append(f"{k.kernel} needs {k.wg} invocations per workgroup, "
                           f"device allows {caps.max_workgroup_invocations}")
    if caps.type == "cpu":
        loops = {
            "fa2_bwd_dkdv": problem.group * -(-problem.len_q // cfg.dkdv.bc),
            "fa2_bwd_dq": -(-problem.len_k // cfg.dq.bc),
            "fa2_bwd_pre": problem.len_k,  # rows whose statistics are recomputed
        }
        reasons += [f"{name} would loop {n} times per invocation; CPU drivers (lavapipe) stop at {CPU_LOOP_LIMIT}"
                    for name, n in loops.items() if n > CPU_LOOP_LIMIT]
    # Only for pipelines the device could run: the reasons above say enough otherwise.
    return reasons or (disabled_reasons(cfg.dq.family, caps, problem.dtype) if checks else [])
