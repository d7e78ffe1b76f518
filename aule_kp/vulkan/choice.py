"""The Vulkan kernel choice: which kernel variant and tiles run a problem on a device, or why none can.

Everything that decides lives here, in the order a choice is made:

1. the variants and what they need (:class:`Variant`, declarative limits checked by
   :func:`limit_reasons`, in the style of xformers' ``AttentionOpBase``), and what turns a variant
   off on a device (the driver-trap table, workarounds.py; the self-check's verdicts, selfcheck.py);
2. the tile tables per code path (scalar/Wave64, coopmat, split-KV, backward), each returning typed
   tiles with the shared-memory check of its shader beside it (as llama.cpp's
   ``get_fa_tuning_params_{scalar,coopmat1,coopmat2}``), and the shader headers' tile rules
   (:func:`kernel_reasons`);
3. the tuned overlay: the tuning cache's winner (tuning_cache.py, written by ``aule-kp tune``)
   replaces the default tiles once, where it is legal;
4. split-KV for short query blocks over long keys (:func:`split_kv_config`);
5. the device limits of the dispatch (storage binding range, grid size, CPU drivers' loop limit).

:func:`choose_forward` and :func:`choose_backward` are the entry points; the backend, ``Context``,
``info``, ``aule-kp tune`` and the self-check all choose through this module. The knobs
(aule_kp/knobs.py) come in as one snapshot; ``variant``, ``num_splits`` and ``coopmat_convert``
override it for one call.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from .. import knobs
from ..problem import Problem
from . import selfcheck, tuning_cache, workarounds
from .backward import backward_groups_per_chunk
from .configs import (
    DTYPE_CODE,
    FAMILIES,
    FLOAT_BYTES,
    MAX_GRID,
    BackwardConfig,
    ForwardConfig,
    KernelConfig,
    SplitKVConfig,
    backward_shared_bytes,
    coopmat_shared_bytes,
    splitkv_shared_bytes,
)
from .plan import binding_limit, group_bytes, groups_per_chunk, mask_bytes, query_tiles_reason
from .probe import DeviceCaps, parallelism

log = logging.getLogger("aule_kp")

Choice = Tuple[Optional[ForwardConfig], Tuple[str, ...]]
BackwardChoice = Tuple[Optional[BackwardConfig], Tuple[str, ...]]

#: lavapipe (gallivm) ends every loop of an invocation once 65535 iterations have run in total.
CPU_LOOP_LIMIT = 65535


# ---- 1. variants and their limits ---------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    """A kernel variant and what it needs from the build, the device and the problem."""

    name: str
    family: str  # KernelConfig.family: what the trap table, verdicts and tuning cache are keyed by
    needs_coopmat: bool = False  # the patched kp and a 16x16x16 f16*f16+f32 VK_KHR_cooperative_matrix shape
    needs_coopmat2: bool = False  # kp patch 4 (its features enabled) and VK_NV_cooperative_matrix2
    only_dtype: Optional[str] = None  # reads this storage dtype alone (no conversion on load)
    computes_in: Optional[str] = None  # other storage dtypes only with AULE_KP_COOPMAT_CONVERT
    head_dim_multiple: int = 1
    max_head_dim: Optional[int] = None  # register budget
    label: str = ""  # how its head-dim reason names it


#: Forward variants. Wave64 is correct on any subgroup size (its cross-lane sums never span more lanes
#: than the device has): ``preferred_variants`` decides where the automatic choice tries it.
FORWARD: Dict[str, Variant] = {
    "scalar": Variant("scalar", "fwd.scalar"),
    "wave64": Variant("wave64", "fwd.wave64"),
    "coopmat": Variant("coopmat", "fwd.coopmat", needs_coopmat=True, computes_in="float16", head_dim_multiple=16,
                       label="coopmat"),
    # Opt-in (AULE_KP_FORCE_VARIANT=coopmat2): on an H200 it ran at 0.88-1.03x the coopmat kernel's
    # speed (BENCHMARKS.md, 2026-12-05), so the automatic choice does not take it yet.
    "coopmat2": Variant("coopmat2", "fwd.coopmat2", needs_coopmat2=True, only_dtype="float16", head_dim_multiple=16,
                        max_head_dim=128, label="coopmat2"),
}
#: Backward variants: "coopmat" where the device and problem allow it (on an H200 it runs 10-20x
#: faster than "scalar", still ~3.5x slower than torch's flash backward), else "scalar".
BACKWARD: Dict[str, Variant] = {
    "scalar": Variant("scalar", "bwd.scalar"),
    "coopmat": Variant("coopmat", "bwd.coopmat", needs_coopmat=True, computes_in="float16", head_dim_multiple=16,
                       max_head_dim=128, label="the coopmat backward"),
}
VARIANTS = tuple(FORWARD)
BACKWARD_VARIANTS = tuple(BACKWARD)


def _has_coopmat_16(caps: DeviceCaps) -> bool:
    return any(
        s[:3] == (16, 16, 16) and s[3] == "f16" and s[4] == "f16" and s[5] == "f32" and s[6] == "f32"
        for s in caps.coopmat_shapes
    )


def limit_reasons(variant: Variant, caps: DeviceCaps, problem: Problem, snapshot: knobs.Snapshot) -> List[str]:
    """Why ``variant`` cannot take ``problem`` by its declared limits (empty: they hold)."""
    reasons = []
    if variant.needs_coopmat:
        from .device import kp_status

        if not kp_status()["patched"]:
            # The released kp creates the device with no features enabled: coopmat is then outside
            # the spec (some drivers tolerate it, others may not). The scalar variants need none.
            reasons.append("kp is the unpatched release build: cooperative-matrix features are not enabled")
        if not caps.coopmat:
            reasons.append("device has no VK_KHR_cooperative_matrix")
        elif not _has_coopmat_16(caps):
            reasons.append("device has no 16x16x16 f16*f16+f32 cooperative matrix shape")
    if variant.needs_coopmat2:
        from .device import import_kp, kp_patch_level

        if not caps.coopmat2:
            reasons.append("device has no VK_NV_cooperative_matrix2")
        elif kp_patch_level(import_kp()) < 4:
            reasons.append("kp is older than aule-kp's patch 4: VK_NV_cooperative_matrix2's features are not enabled")
    if variant.only_dtype and problem.dtype != variant.only_dtype:
        reasons.append(f"{variant.name} reads {variant.only_dtype} only; got {problem.dtype}")
    if variant.computes_in and problem.dtype != variant.computes_in and not snapshot.coopmat_convert:
        # fp32/bf16 would be rounded to fp16 on load: exact only for fp16 data, so opt-in.
        reasons.append(f"{variant.name} computes on {variant.computes_in}; got {problem.dtype} "
                       "(AULE_KP_COOPMAT_CONVERT=1 allows it)")
    if variant.needs_coopmat and (problem.has_score_mods or (problem.sinks and variant.family == "fwd.coopmat")):
        # The coopmat backward does not compute soft-caps or ALiBi (sinks need nothing there); the
        # coopmat forward computes all three (glsl/fa2_fwd_coopmat.comp: the per-score path, the sinks
        # in the epilogue) but has not run on a GPU with them yet. The scalar kernels, checked on
        # lavapipe, take them.
        reasons.append(f"{variant.label} does not take soft-capped or ALiBi scores"
                       + (" or sinks" if variant.family == "fwd.coopmat" else "") + " (the scalar kernels do)")
    if variant.needs_coopmat2 and (problem.has_score_mods or problem.sinks):
        reasons.append(f"{variant.label} does not take soft-capped or ALiBi scores or sinks (the scalar kernels do)")
    m, top = variant.head_dim_multiple, variant.max_head_dim
    if problem.dim_k % m or problem.dim_v % m or (top is not None and max(problem.dim_k, problem.dim_v) > top):
        reasons.append(f"{variant.label} needs head dims that are multiples of {m}"
                       + (f", at most {top}" if top is not None else ""))
    return reasons


def disabled_reasons(family: str, caps: DeviceCaps, dtype: str, warn: bool = True) -> List[str]:
    """Why kernel family ``family`` is turned off on this device for ``dtype``: the driver-trap
    table (workarounds.py) and the verdicts the self-check recorded (selfcheck.py; never runs it).
    ``warn``: the first failed verdict applied in a process warns (selfcheck.known_reasons)."""
    return workarounds.family_reasons(family, caps) + selfcheck.known_reasons(family, caps, dtype, warn)


def passes_self_check(cfg: Any, caps: DeviceCaps, dtype: str) -> bool:
    """Runs the self-check of ``cfg``'s kernel family the first time it is used on this device and
    driver (selfcheck.ensure); False when it is wrong here (then turned off, with one warning)."""
    return not selfcheck.ensure(cfg.family, caps, dtype, canary_config)


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


# ---- 2. tile tables -----------------------------------------------------------------------------

class Tiles(NamedTuple):
    """The tile spec constants of one kernel (glsl/fa2_common.glsl)."""

    br: int
    bc: int
    wg: int
    tpr: int = 1
    stage: int = 1
    rpt: int = 1


def pow2_floor(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


def _fit_tpr(tpr: int, problem: Problem) -> int:
    """Largest power of two <= tpr that leaves each lane an even slice of q and o (pairs are packed)."""
    while tpr > 1 and (problem.dim_k % (2 * tpr) or problem.dim_v % (2 * tpr)):
        tpr //= 2
    return tpr


def _kernel(variant: str, kernel: str, problem: Problem, t: Tiles) -> KernelConfig:
    return KernelConfig(variant, kernel, problem.dim_k, problem.dim_v, t.br, t.bc, t.tpr, DTYPE_CODE[problem.dtype],
                        t.wg, t.stage, t.rpt)


def scalar_tiles(caps: DeviceCaps, problem: Problem, wave: int, cpu: bool) -> Tiles:
    """Tiles for the scalar/subgroup forward source (glsl/fa2_fwd.comp) on this device."""
    dmax = max(problem.dim_k, problem.dim_v)
    if cpu:
        # CPU drivers (lavapipe): no staging (barriers are expensive, caches stage anyway); 4 rows per
        # invocation so each K/V load feeds 4 rows; 16 q values per lane keep the unrolled code small
        # enough to compile in seconds (B1 H8 S512 D64 fp32: 0.29 s, 1.8 GFLOP/s on 2 cores).
        tpr = _fit_tpr(min(8, caps.subgroup_size if caps.subgroup_shuffle else 1, pow2_floor(max(1, dmax // 16))),
                       problem)
        wg = 64
        return Tiles(br=wg // tpr * 4, bc=8, wg=wg, tpr=tpr, stage=0, rpt=4)
    # GPUs: split a row over lanes so each holds at most ~32 q/o values in registers.
    tpr = _fit_tpr(min(pow2_floor(max(1, dmax // 32)), 8, caps.subgroup_size if caps.subgroup_shuffle else 1),
                   problem)
    wg = max(wave * 2, 128)
    bc = 32
    # Shared memory: the staged K and V tiles (KernelConfig.shared_bytes).
    while bc > 8 and FLOAT_BYTES * bc * (problem.dim_k + problem.dim_v) > caps.shared_memory - 64:
        bc //= 2
    return Tiles(br=wg // tpr, bc=bc, wg=wg, tpr=tpr, stage=1, rpt=1)


def coopmat_tiles(caps: DeviceCaps, problem: Problem) -> Tiles:
    """Tiles for glsl/fa2_fwd_coopmat.comp: the first candidate that fits wins, smaller tiles where
    shared memory is short."""
    # The first ones were the fastest on an H200 (`aule-kp tune`, benchmarks/ab_gpu.py --tiles;
    # BENCHMARKS.md, "Notes moved from the sources"):
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
            tiles = Tiles(br=br, bc=bc, wg=wg, stage=stage)
            cfg = _kernel("coopmat", "fa2_fwd_coopmat", problem, tiles)
            if coopmat_shared_bytes(cfg) <= caps.shared_memory and wg <= caps.max_workgroup_invocations:
                return tiles
    return Tiles(br=16, bc=16, wg=wave, stage=1)


def coopmat2_tiles(caps: DeviceCaps, problem: Problem) -> Tiles:
    """Tiles for glsl/fa2_fwd_cm2.comp: the fastest of those timed on an H200 (BR x BC x invocations
    64x32x128 at D=128, 64x64x128 at D=64; benchmarks/coopmat2_gpu.py, BENCHMARKS.md 2026-12-05)."""
    wave = max(caps.subgroup_size, 1)
    return Tiles(br=64, bc=32 if max(problem.dim_k, problem.dim_v) > 64 else 64, wg=max(128, wave) // wave * wave)


def backward_scalar_tiles(caps: DeviceCaps, problem: Problem) -> Tiles:
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
        return Tiles(br=wg // tpr * rpt, bc=2, wg=wg, tpr=tpr, stage=0, rpt=rpt)
    # GPUs: at most ~32 of each per-row array per lane; BC rows (dkdv) or keys (dq) of two
    # matrices staged in shared memory.
    tpr = _fit_tpr(min(pow2_floor(max(1, max(problem.dim_k, problem.dim_v) // 32)), 8, shuffle_width), problem)
    wg = max(max(caps.subgroup_size, 1) * 2, 128)
    bc = 32
    while bc > 8 and FLOAT_BYTES * bc * dsum > caps.shared_memory - 64:
        bc //= 2
    return Tiles(br=wg // tpr, bc=bc, wg=wg, tpr=tpr, stage=1, rpt=1)


def backward_coopmat_tiles(caps: DeviceCaps, problem: Problem) -> Tiles:
    """Largest tiles of glsl/fa2_bwd_cm.glsl that fit the device's shared memory, the fastest on an
    H200 first (BENCHMARKS.md, "Notes moved from the sources")."""
    wave = max(caps.subgroup_size, 1)
    for br, bc, wg in ((128, 32, 256), (64, 16, 128), (64, 32, 128), (32, 16, 64), (16, 16, 32)):
        tiles = Tiles(br=br, bc=bc, wg=max(wg, wave) // wave * wave)
        probe = KernelConfig("coopmat", "fa2_bwd_dq_coopmat", problem.dim_k, problem.dim_v, br, bc, 1, 0, wg, 1)
        if backward_shared_bytes(probe) <= caps.shared_memory and wg <= caps.max_workgroup_invocations:
            break
    return tiles


def split_kernel(caps: DeviceCaps, problem: Problem) -> KernelConfig:
    """The split-KV pipeline (glsl/fa2_splitkv.comp) of ``problem`` on this device, before the split count."""
    p = problem
    caps = workarounds.effective(caps)
    cpu = caps.type == "cpu"
    vec = 4 if p.dtype == "float32" else 8  # elements per 16-byte load
    shuffle = max(caps.subgroup_size, 1) if caps.subgroup_shuffle else 1
    # Lanes per key: enough that each loads one 16-byte vector of the longer row, at most a subgroup.
    tpr = min(pow2_floor(max(p.dim_k, p.dim_v) // vec), shuffle, 32)
    vectors = math.ceil(p.dim_k // vec / tpr) + math.ceil(p.dim_v // vec / tpr)  # K + V uvec4 per lane and key
    # Rows per workgroup: all of a kv head's rows (rounded up to a power of two, which bounds the
    # pipelines a model needs) within a budget of q and O floats per invocation: 128 on GPUs (8 rows
    # ran faster than 4 on an H200: BENCHMARKS.md, "Notes moved from the sources"), 64 on CPU
    # drivers (keeps the unrolled code, and lavapipe's compile time, small).
    rows = p.group * p.len_q
    budget = 64 if cpu else 128
    br = max(1, min(pow2_floor(budget // (vectors * vec)), 1 << (rows - 1).bit_length()))
    # GPUs: 128 invocations, each step's loads issued a step ahead (STAGE 2), as many keys per key
    # group and step (at most 4) as keep those loads, both steps', at 64 registers: the fastest of
    # those swept on an H200 (BENCHMARKS.md, "Notes moved from the sources").
    # CPU drivers: few key groups (merged over a tree of barriers) and short unrolled steps.
    wg = max(tpr, 32 if cpu else 128)
    bc = 2 if cpu else max(1, min(4, pow2_floor(64 // (2 * 4 * vectors))))
    stage = 0 if cpu else 2
    kernel = KernelConfig("splitkv", "fa2_splitkv", p.dim_k, p.dim_v, br, bc, tpr, DTYPE_CODE[p.dtype], wg, stage)
    while kernel.br > 1 and splitkv_shared_bytes(kernel) > caps.shared_memory:
        kernel = replace(kernel, br=kernel.br // 2)
    return kernel


#: The scalar kernels sum a row over at most 8 lanes (three shuffle rounds in fa2_fwd.comp / fa2_bwd_*).
MAX_TPR = 8


def kernel_reasons(k: KernelConfig, caps: DeviceCaps, problem: Problem) -> List[str]:
    """The shader headers' rules for the tiles of one kernel (forward or backward; empty: they hold).
    Device limits are checked by :func:`forward_reasons` and :func:`backward_config_reasons`; shuffles
    count only where the driver-trap table leaves them (``workarounds.effective``)."""
    caps = workarounds.effective(caps)
    reasons = []
    stages = (1, 2) if k.kernel == "fa2_fwd_coopmat" else (0, 1)
    if min(k.br, k.bc, k.wg, k.tpr, k.rpt) < 1 or k.stage not in stages:
        return [f"tiles out of range: {k}"]
    if k.variant in ("coopmat", "coopmat2"):
        # fa2_fwd_coopmat.comp / fa2_bwd_cm.glsl / fa2_fwd_cm2.comp: 16x16 blocks, whole subgroups.
        wave = max(caps.subgroup_size, 1)
        if k.br % 16 or k.bc % 16:
            reasons.append(f"coopmat tiles must be multiples of 16 (BR={k.br}, BC={k.bc})")
        if k.wg % wave:
            reasons.append(f"coopmat workgroups must be whole subgroups (WG={k.wg}, subgroup {wave})")
        return reasons
    # fa2_fwd.comp / fa2_bwd_dkdv.comp / fa2_bwd_dq.comp: WG/TPR row groups of RPT rows (keys) each.
    if k.tpr > MAX_TPR or k.tpr & (k.tpr - 1):
        reasons.append(f"TPR must be a power of two up to {MAX_TPR}, got {k.tpr}")
    elif _fit_tpr(k.tpr, problem) != k.tpr:
        reasons.append(f"head dims {problem.dim_k}/{problem.dim_v} do not split in pairs over TPR={k.tpr} lanes")
    if k.tpr > 1 and (not caps.subgroup_shuffle or k.tpr > caps.subgroup_size):
        reasons.append(f"TPR={k.tpr} lanes need subgroup shuffles over at least that many lanes")
    if k.wg % k.tpr or k.br != k.wg // k.tpr * k.rpt:
        reasons.append(f"BR must be WG/TPR*RPT (BR={k.br}, WG={k.wg}, TPR={k.tpr}, RPT={k.rpt})")
    return reasons


def forward_reasons(cfg: KernelConfig, caps: DeviceCaps, problem: Problem) -> List[str]:
    """Why the forward specialization ``cfg`` cannot run ``problem`` here (empty: it can)."""
    reasons = kernel_reasons(cfg, caps, problem)
    if cfg.shared_bytes() > caps.shared_memory:
        reasons.append(f"needs {cfg.shared_bytes()} B of shared memory, device has {caps.shared_memory}")
    if cfg.wg > caps.max_workgroup_invocations:
        reasons.append(f"needs {cfg.wg} invocations per workgroup, device allows {caps.max_workgroup_invocations}")
    if caps.type == "cpu" and -(-problem.len_k // cfg.bc) > CPU_LOOP_LIMIT:
        reasons.append(f"{-(-problem.len_k // cfg.bc)} key tiles per invocation; lavapipe stops at {CPU_LOOP_LIMIT}")
    return reasons


def backward_config_reasons(cfg: BackwardConfig, caps: DeviceCaps, problem: Problem, checks: bool = True,
                            snapshot: Optional[knobs.Snapshot] = None) -> List[str]:
    """Why this device cannot run ``cfg`` for ``problem`` (empty: it can); with ``checks``, also when
    the driver-trap table or a recorded self-check verdict turns its family off."""
    reasons = limit_reasons(BACKWARD[cfg.variant], caps, problem, snapshot or knobs.current())
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


def backward_reasons(cfg: BackwardConfig, caps: DeviceCaps, problem: Problem) -> List[str]:
    """Why the backward pipelines ``cfg`` cannot run ``problem`` here, tile rules included (empty: they can)."""
    return (kernel_reasons(cfg.dkdv, caps, problem) + kernel_reasons(cfg.dq, caps, problem)
            + backward_config_reasons(cfg, caps, problem))


# ---- 3. the tuned overlay -----------------------------------------------------------------------

def with_tiles(cfg: Any, tiles: Dict[str, int]) -> Any:
    """``cfg`` (a KernelConfig, or a BackwardConfig's dK/dV and dQ kernels) with ``tiles``."""
    if isinstance(cfg, BackwardConfig):
        return replace(cfg, dkdv=replace(cfg.dkdv, **tiles), dq=replace(cfg.dq, **tiles))
    return replace(cfg, **tiles)


def _tuned(cfg: Any, family: str, caps: DeviceCaps, problem: Problem, snapshot: knobs.Snapshot,
           reasons: Callable[[Any, DeviceCaps, Problem], List[str]]) -> Any:
    """``cfg`` with the tiles of this device's cached winner for ``problem`` when there is one and
    it is legal here; else ``cfg`` itself."""
    hit = tuning_cache.lookup(caps, family, problem, snapshot)
    if hit is None:
        return cfg
    key, tiles = hit
    tuned = with_tiles(cfg, tiles)
    why = reasons(tuned, caps, problem)
    if why and not reasons(cfg, caps, problem):
        tuning_cache.warn_once(f"illegal:{key}:{tuning_cache.cache_path(caps)}",
                               "aule-kp: ignoring the tuned tiles %s for %s: %s", tiles, key, "; ".join(why))
    return cfg if why else tuned


# ---- the forward kernel -------------------------------------------------------------------------

def config_for(variant: str, caps: DeviceCaps, problem: Problem,
               snapshot: Optional[knobs.Snapshot] = None) -> KernelConfig:
    """The specialization of forward ``variant`` for ``problem`` on this device: its tile table,
    then the tuning cache's winner where ``aule-kp tune`` stored one."""
    caps = workarounds.effective(caps)
    if variant == "coopmat":
        cfg = _kernel(variant, "fa2_fwd_coopmat", problem, coopmat_tiles(caps, problem))
    elif variant == "coopmat2":
        cfg = _kernel(variant, "fa2_fwd_cm2", problem, coopmat2_tiles(caps, problem))
    else:
        wave = 64 if variant == "wave64" else max(caps.subgroup_size, 1)
        cfg = _kernel(variant, "fa2_fwd", problem,
                      scalar_tiles(caps, problem, wave, cpu=variant == "scalar" and caps.type == "cpu"))
    return _tuned(cfg, cfg.family, caps, problem, snapshot or knobs.current(), forward_reasons)


def _forward_variant(name: str, caps: DeviceCaps, problem: Problem, snapshot: knobs.Snapshot,
                     checks: bool = True) -> Tuple[Optional[KernelConfig], List[str]]:
    """``(config, [])`` of forward variant ``name`` for ``problem``, or ``(None, reasons)``."""
    if name not in FORWARD:
        return None, [f"unknown variant {name!r}; expected one of {VARIANTS}"]
    caps = workarounds.effective(caps)
    reasons = limit_reasons(FORWARD[name], caps, problem, snapshot)
    cfg = None
    if not reasons:
        cfg = config_for(name, caps, problem, snapshot)
        if cfg.shared_bytes() > caps.shared_memory:
            reasons.append(f"needs {cfg.shared_bytes()} B of shared memory, device has {caps.shared_memory}")
        if cfg.wg > caps.max_workgroup_invocations:
            reasons.append(f"needs {cfg.wg} invocations per workgroup, device allows {caps.max_workgroup_invocations}")
    # Only for a variant the device could run: the reasons above say enough otherwise.
    reasons = reasons or (disabled_reasons(FORWARD[name].family, caps, problem.dtype) if checks else [])
    return (None if reasons else cfg), reasons


def variant_reasons(variant: str, caps: DeviceCaps, problem: Problem, checks: bool = True,
                    snapshot: Optional[knobs.Snapshot] = None) -> List[str]:
    """Why forward ``variant`` cannot run ``problem`` on this device (empty: it can); with ``checks``,
    also a variant the driver-trap table or a recorded self-check verdict turns off."""
    return _forward_variant(variant, caps, problem, snapshot or knobs.current(), checks)[1]


def forward_kernel(caps: DeviceCaps, problem: Problem, snapshot: Optional[knobs.Snapshot] = None,
                   variant: Optional[str] = None) -> KernelConfig:
    """The best forward variant that can run ``problem`` (``variant`` or ``AULE_KP_FORCE_VARIANT``
    forces one), split-KV aside. A variant the driver-trap table or the self-check turns off is
    skipped (or, forced, refused): ValueError listing why each variant cannot."""
    snap = (snapshot or knobs.current()).override(force_variant=variant)
    names = [snap.force_variant] if snap.force_variant else preferred_variants(caps)
    why: Dict[str, List[str]] = {}
    for name in names:
        cfg, why[name] = _forward_variant(name, caps, problem, snap)
        if cfg is not None:
            if passes_self_check(cfg, caps, problem.dtype):
                return cfg
            why[name] = disabled_reasons(cfg.family, workarounds.effective(caps), problem.dtype)
    detail = "; ".join(f"{n}: {', '.join(why[n])}" for n in names)
    raise ValueError(f"no Vulkan kernel variant can run this problem ({detail})")


# ---- 4. split-KV --------------------------------------------------------------------------------

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


def split_kv_config(caps: DeviceCaps, problem: Problem, forward: Optional[KernelConfig] = None,
                    groups: Optional[int] = None, snapshot: Optional[knobs.Snapshot] = None,
                    num_splits: Optional[int] = None) -> Optional[SplitKVConfig]:
    """Split-KV for ``problem`` on this device, or None when the forward kernel ``forward`` should run.

    Automatic: Lq <= 16, the band leaves at least 2 x ``MIN_SPLIT_KEYS`` keys, and the forward's
    grid over one dispatch of ``groups`` kv groups (default all) has fewer than
    ``SMALL_GRID_FACTOR`` x ``parallelism`` workgroups (GPUs), or the device is a CPU driver. The
    split count then aims the grid at ``TARGET_GRID_FACTOR`` x ``parallelism`` workgroups
    (e.g. 1024 on a discrete GPU) with at least ``MIN_SPLIT_KEYS`` keys each. ``num_splits`` (or
    ``AULE_KP_SPLIT_KV``): 0 never splits, N forces N splits whenever Lq <= 16. None too when the
    driver-trap table or a recorded self-check verdict turns split-KV off on this device.
    """
    p = problem
    snap = (snapshot or knobs.current()).override(split_kv=num_splits)
    forced = snap.split_kv
    if forced == 0 or p.len_q > MAX_SPLIT_LQ or p.len_k == 0 or p.empty:
        return None
    if disabled_reasons("splitkv", caps, p.dtype):
        return None
    kernel = split_kernel(caps, p)
    lo, hi = p.key_range(0, p.len_q)
    keys = hi - lo
    step = kernel.wg // kernel.tpr * kernel.bc  # keys a workgroup takes per step
    n_groups = p.batch * p.heads_kv if groups is None else max(1, min(groups, p.batch * p.heads_kv))
    max_grid_x = min(caps.max_workgroup_count[0], MAX_GRID)
    if forced is not None:
        n_split = min(forced, max_grid_x)
        split_len = step * math.ceil(max(keys, 1) / (n_split * step))
    else:
        par = parallelism(caps)
        fwd = forward or forward_kernel(caps, p, snap)
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


def _pipelines(caps: DeviceCaps, problem: Problem, snapshot: knobs.Snapshot, groups: int) -> ForwardConfig:
    """Split-KV where ``split_kv_config`` takes the problem, else the best forward variant. A pinned
    variant runs that forward kernel unless a split count is forced. Split-KV's self-check runs the
    first time it is chosen on this device; if it fails, the forward runs."""
    forward = forward_kernel(caps, problem, snapshot)
    if snapshot.force_variant and not snapshot.split_kv:
        return forward
    split = split_kv_config(caps, problem, forward, groups, snapshot)
    return split if split is not None and passes_self_check(split.kernel, caps, problem.dtype) else forward


# ---- 5. the entry points, with the dispatch's device limits -------------------------------------

def choose_forward(caps: DeviceCaps, problem: Problem, snapshot: Optional[knobs.Snapshot] = None, *,
                   variant: Optional[str] = None, num_splits: Optional[int] = None,
                   coopmat_convert: Optional[bool] = None, whole: bool = False) -> Choice:
    """``(config, ())`` with the forward pipelines for ``problem`` on a device with ``caps``, or
    ``(None, reasons)`` listing every limit it passes.

    ``snapshot``: the knobs (default ``knobs.current()``); ``variant`` (pin a forward variant),
    ``num_splits`` (0: never split-KV; N: N splits for Lq <= 16) and ``coopmat_convert`` override them.
    ``whole``: one dispatch binds all (batch, kv-head) groups, as on the GpuTensor path, whose
    tensors are the caller's and cannot be cut into chunks. Otherwise the groups are split into
    chunks of whole groups that each fit one storage binding (the host-array path).
    """
    p = problem
    snap = (snapshot or knobs.current()).override(force_variant=variant, split_kv=num_splits,
                                                  coopmat_convert=coopmat_convert)
    reasons: List[str] = []
    cfg: Optional[ForwardConfig] = None
    limit = binding_limit(caps.max_storage_buffer_range)
    n_groups = p.batch * p.heads_kv
    try:
        cfg = _pipelines(caps, p, snap, n_groups if whole else groups_per_chunk(p, limit))
    except ValueError as exc:
        reasons.append(str(exc))
    if cfg is not None and caps.type == "cpu":
        loops = cfg.loops() if isinstance(cfg, SplitKVConfig) else -(-p.len_k // cfg.bc)
        if loops > CPU_LOOP_LIMIT:
            reasons.append(f"{loops} loop iterations per invocation; CPU drivers (lavapipe) stop loops at "
                           f"{CPU_LOOP_LIMIT}")
    if isinstance(cfg, KernelConfig):
        too_tall = query_tiles_reason(p, cfg.br, caps.max_workgroup_count[1])
        reasons += [too_tall] if too_tall else []
    fit = groups_per_chunk(p, limit, cfg)
    if fit < 1:
        reasons.append(f"one (batch, kv-head) slice is over the {limit} B storage binding limit")
    elif whole:
        if p.group * n_groups > MAX_GRID:
            reasons.append(f"{p.group * n_groups} query heads x batch in one dispatch: over the {MAX_GRID} "
                           "workgroups a grid dimension is guaranteed to take (GpuTensors are not split)")
        sizes = dict(group_bytes(p), **(cfg.group_bytes(p) if isinstance(cfg, SplitKVConfig) else {}))
        reasons += [f"its {name} buffer needs {size * n_groups} B in one binding: over the {limit} B storage "
                    "binding limit (GpuTensors are not split)" for name, size in sizes.items()
                    if size * n_groups > limit]
    if mask_bytes(p) > limit:
        reasons.append(f"the mask is over the {limit} B storage binding limit")
    return (None if reasons else cfg), tuple(reasons)


def backward_pipelines(caps: DeviceCaps, problem: Problem, write_ds: bool, name: str,
                       snapshot: Optional[knobs.Snapshot] = None) -> BackwardConfig:
    """The backward pipelines of variant ``name`` for ``problem``: its tile table, then the tuning
    cache's winner (no choice and no self-check: also what the self-check's canaries build)."""
    caps = workarounds.effective(caps)
    if name not in BACKWARD:
        raise ValueError(f"unknown backward variant {name!r}; expected one of {BACKWARD_VARIANTS}")
    tiles = backward_coopmat_tiles(caps, problem) if name == "coopmat" else backward_scalar_tiles(caps, problem)
    suffix = "_coopmat" if name == "coopmat" else ""
    pre = Tiles(br=1, bc=1, wg=64, tpr=1, stage=0, rpt=1)
    cfg = BackwardConfig(name, _kernel(name, "fa2_bwd_pre", problem, pre),
                         _kernel(name, "fa2_bwd_dkdv" + suffix, problem, tiles),
                         _kernel(name, "fa2_bwd_dq" + suffix, problem, tiles), bool(write_ds), problem.has_mask)
    return _tuned(cfg, f"bwd.{name}", caps, problem, snapshot or knobs.current(), backward_reasons)


def backward_config(caps: DeviceCaps, problem: Problem, write_ds: bool = False, variant: Optional[str] = None,
                    snapshot: Optional[knobs.Snapshot] = None) -> BackwardConfig:
    """The backward pipelines for ``problem``, device limits aside: ``variant`` or
    ``AULE_KP_FORCE_BWD_VARIANT`` picks one; by default coopmat where the device and problem allow it
    (10-20x the scalar variant on an H200). The self-check of the returned pipelines' family runs the
    first time they are used here (selfcheck.ensure); one that fails shows in ``backward_config_reasons``."""
    snap = (snapshot or knobs.current()).override(force_bwd_variant=variant)
    name = snap.force_bwd_variant
    if not name:
        coop = backward_pipelines(caps, problem, write_ds, "coopmat", snap)
        if (not backward_config_reasons(coop, caps, problem, snapshot=snap)
                and passes_self_check(coop.dq, caps, problem.dtype)):
            return coop
        name = "scalar"
    cfg = backward_pipelines(caps, problem, write_ds, name, snap)
    if not backward_config_reasons(cfg, caps, problem, snapshot=snap):
        passes_self_check(cfg.dq, caps, problem.dtype)
    return cfg


def backward_limits(cfg: BackwardConfig, caps: DeviceCaps, problem: Problem,
                    snapshot: Optional[knobs.Snapshot] = None) -> List[str]:
    """Why the backward pipelines ``cfg`` cannot run ``problem`` on this device (empty: they can):
    ``backward_config_reasons`` and the dispatch's grid and storage binding limits."""
    reasons = backward_config_reasons(cfg, caps, problem, snapshot=snapshot)
    too_tall = query_tiles_reason(problem, cfg.dq.br, caps.max_workgroup_count[1])
    reasons += [too_tall] if too_tall else []
    limit = binding_limit(caps.max_storage_buffer_range)
    if backward_groups_per_chunk(problem, limit, cfg.write_ds) < 1:
        what = "with its mask gradient (dS) " if cfg.write_ds else ""
        reasons.append(f"one (batch, kv-head) slice of the backward {what}is over the {limit} B storage "
                       "binding limit")
    if mask_bytes(problem) > limit:
        reasons.append(f"the mask is over the {limit} B storage binding limit")
    return reasons


def choose_backward(caps: DeviceCaps, problem: Problem, snapshot: Optional[knobs.Snapshot] = None, *,
                    write_ds: bool = False, variant: Optional[str] = None) -> BackwardChoice:
    """The backward twin of :func:`choose_forward`: ``(config, ())``, or ``(None, reasons)``.
    ``write_ds``: dK/dV also writes the float mask's gradient."""
    snap = (snapshot or knobs.current()).override(force_bwd_variant=variant)
    cfg = backward_config(caps, problem, write_ds, snapshot=snap)
    reasons = backward_limits(cfg, caps, problem, snap)
    return (None if reasons else cfg), tuple(reasons)


def canary_config(family: str, caps: DeviceCaps, p: Problem, n_split: int) -> Tuple[Any, List[str]]:
    """The pipelines of kernel family ``family`` for the self-check's canary problem ``p`` (split-KV:
    ``n_split`` splits) and why they cannot run it: static legality only, since recorded verdicts are
    what the self-check re-checks (selfcheck.Configure)."""
    kind, _, variant = family.partition(".")
    if family == "splitkv":
        kernel = split_kernel(caps, p)
        step = kernel.wg // kernel.tpr * kernel.bc
        lo, hi = p.key_range(0, p.len_q)
        split_len = step * math.ceil((hi - lo) / (n_split * step))
        cfg = SplitKVConfig(kernel, math.ceil((hi - lo) / split_len), split_len)
        why = [] if cfg.shared_bytes() <= caps.shared_memory else [f"needs {cfg.shared_bytes()} B of shared memory"]
        return cfg, why + ([f"needs {kernel.wg} invocations"] if kernel.wg > caps.max_workgroup_invocations else [])
    if kind == "bwd":
        cfg = backward_pipelines(caps, p, True, variant)
        return cfg, backward_config_reasons(cfg, caps, p, checks=False)
    why = variant_reasons(variant, caps, p, checks=False)
    cfg = None if why else config_for(variant, caps, p)
    return cfg, why if why else forward_reasons(cfg, caps, p)
