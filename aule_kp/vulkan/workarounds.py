"""Driver traps in one table: which devices/drivers break what, and what the kernel choice avoids.

Each :class:`Workaround` matches on what the probe records (:class:`~aule_kp.vulkan.probe.DeviceCaps`:
vendor id, ``VkDriverId``, device-name pattern, host OS, GPU generation, device type) and names the
*features* that are broken or slow there. The choice applies the table in two ways:

* a kernel variant that cannot run without an avoided feature (:data:`NEEDS`) is turned off, with a
  reason naming the trap and its source (``choice.variant_reasons``, ``aule_kp.info()``), and
  ``auto`` takes the next variant;
* a feature the scalar kernels can do without (:data:`DO_WITHOUT`) is taken away from the
  capabilities the tile choice sees (:func:`effective`): e.g. no subgroup shuffles means TPR = 1,
  one invocation per query row, no subgroup operation at all.

The facts come from llama.cpp's Vulkan backend, whose users hit these traps in the field (its
issues and pull requests are the sources). ``AULE_KP_WORKAROUNDS=0`` ignores the table (for a driver
known to be fixed); the self-check (aule_kp/vulkan/selfcheck.py) still guards the results.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Dict, FrozenSet, List, Optional, Tuple

from .. import knobs
from .probe import DeviceCaps

#: What a trap can break, in the terms the kernels are written in.
FEATURES = {
    "subgroup_shuffle": "subgroupShuffle / subgroupShuffleXor across the lanes of a subgroup",
    "fp16_shuffle": "subgroup shuffles of float16 values",
    "fp16_arithmetic": "float16 arithmetic in shaders (the cooperative-matrix kernels' P and operands)",
    "coopmat": "VK_KHR_cooperative_matrix",
    "coopmat2": "VK_NV_cooperative_matrix2 (workgroup-scope matrices, tensor addressing, reductions)",
    "full_subgroups": "every subgroup fully populated at the size the device reports (needs "
                      "VK_PIPELINE_SHADER_STAGE_CREATE_REQUIRE_FULL_SUBGROUPS_BIT, which kp cannot set)",
}

#: Features each kernel family cannot run without (families as in ``KernelConfig.family``). Every
#: shuffle in glsl/ moves fp32 values: no kernel needs ``fp16_shuffle``.
NEEDS: Dict[str, FrozenSet[str]] = {
    "fwd.scalar": frozenset(),
    "fwd.wave64": frozenset(),
    "splitkv": frozenset(),
    "bwd.scalar": frozenset(),
    # fa2_fwd_coopmat.comp: subgroup-scope matrices, row max/sum by subgroupShuffleXor over the lanes
    # of a row, subgroupAny; fa2_bwd_cm.glsl: subgroup-scope matrices and subgroup barriers.
    "fwd.coopmat": frozenset({"coopmat", "fp16_arithmetic", "subgroup_shuffle", "full_subgroups"}),
    "bwd.coopmat": frozenset({"coopmat", "fp16_arithmetic", "full_subgroups"}),
    # fa2_fwd_cm2.comp: workgroup-scope matrices; no subgroup operation of its own.
    "fwd.coopmat2": frozenset({"coopmat2", "fp16_arithmetic"}),
}

#: Features the other kernels use only when the device offers them, and what they do instead.
DO_WITHOUT = {
    "subgroup_shuffle": "TPR = 1: one invocation holds a whole query row (more registers, no subgroup "
                        "operation) in the scalar, Wave64, split-KV and scalar backward kernels",
}


@dataclass(frozen=True)
class Match:
    """A device pattern: every field that is set must hold (``name``: a case-insensitive regex)."""

    vendor_ids: Tuple[int, ...] = ()
    driver_ids: Tuple[int, ...] = ()
    architectures: Tuple[str, ...] = ()
    name: Optional[str] = None
    os: Tuple[str, ...] = ()
    types: Tuple[str, ...] = ()

    def __call__(self, caps: DeviceCaps) -> bool:
        return ((not self.vendor_ids or caps.vendor_id in self.vendor_ids)
                and (not self.driver_ids or caps.driver_id in self.driver_ids)
                and (not self.architectures or caps.architecture in self.architectures)
                and (self.name is None or re.search(self.name, caps.name, re.IGNORECASE) is not None)
                and (not self.os or caps.os in self.os)
                and (not self.types or caps.type in self.types))

    def describe(self) -> str:
        from .probe import driver_id_name, vendor_name

        parts = [f"vendor {'/'.join(vendor_name(v) for v in self.vendor_ids)}" if self.vendor_ids else "",
                 f"driver {'/'.join(driver_id_name(d) for d in self.driver_ids)}" if self.driver_ids else "",
                 f"architecture {'/'.join(self.architectures)}" if self.architectures else "",
                 f"name ~ /{self.name}/" if self.name else "",
                 f"OS {'/'.join(self.os)}" if self.os else "",
                 f"type {'/'.join(self.types)}" if self.types else ""]
        return ", ".join(p for p in parts if p)


@dataclass(frozen=True)
class Workaround:
    """One driver trap: where it happens (any of ``matches``), what to avoid there, why, and what
    the choice does about it (``effect``, in words, for the table a user reads)."""

    id: str
    title: str
    matches: Tuple[Match, ...]
    avoid: FrozenSet[str]
    reason: str
    effect: str
    sources: Tuple[str, ...]

    def applies(self, caps: DeviceCaps) -> bool:
        return any(m(caps) for m in self.matches)

    def as_dict(self) -> Dict[str, Any]:
        """JSON-serialisable view."""
        return {"id": self.id, "title": self.title, "match": " or ".join(m.describe() for m in self.matches),
                "avoid": sorted(self.avoid), "reason": self.reason, "effect": self.effect,
                "sources": list(self.sources)}


_AMD, _INTEL, _NVIDIA = 0x1002, 0x8086, 0x10DE
_AMD_PROPRIETARY, _INTEL_WINDOWS, _INTEL_MESA, _MOLTENVK = 1, 5, 6, 14
_LLAMA = "https://github.com/ggml-org/llama.cpp"

#: The table. Order is only the order of display.
TABLE: Tuple[Workaround, ...] = (
    Workaround(
        id="amd-windows-fp16",
        title="fp16 subgroup shuffles wrong on AMD's proprietary driver before RDNA3",
        matches=(Match(vendor_ids=(_AMD,), driver_ids=(_AMD_PROPRIETARY,),
                       architectures=("amd-gcn", "amd-rdna1", "amd-rdna2")),),
        avoid=frozenset({"fp16_shuffle", "fp16_arithmetic"}),
        reason="subgroupShuffleXor of f16vec4 gives wrong flash-attention output on GCN, RDNA1 and RDNA2 "
               "with AMD's proprietary (Windows) driver; llama.cpp's author found shuffling vec4 fails "
               "too and suspects the driver's fp16 handling rather than the shuffle.",
        effect="no variant changes in practice: every shuffle in our kernels moves fp32 values and the "
               "scalar kernels compute in fp32; the fp16 cooperative-matrix kernels are turned off (these "
               "GPUs have no VK_KHR_cooperative_matrix anyway).",
        sources=(f"{_LLAMA}/issues/19881", f"{_LLAMA}/pull/19921"),
    ),
    Workaround(
        id="moltenvk-amd-shuffle",
        title="subgroup shuffles wrong on MoltenVK with AMD GPUs",
        matches=(Match(vendor_ids=(_AMD,), driver_ids=(_MOLTENVK,)),
                 Match(vendor_ids=(_AMD,), os=("darwin",))),
        avoid=frozenset({"subgroup_shuffle"}),
        reason="MoltenVK reports subgroup shuffles but its Metal translation of subgroupShuffleXor returns "
               "wrong values on AMD GPUs (RDNA1/RDNA2 Macs): garbage flash-attention output.",
        effect="no shuffles: the scalar, Wave64, split-KV and scalar backward kernels run with TPR = 1 "
               "(one invocation per row); cooperative matrix is not offered by MoltenVK.",
        sources=(f"{_LLAMA}/issues/20029", f"{_LLAMA}/pull/23218"),
    ),
    Workaround(
        id="intel-full-subgroups",
        title="Intel subgroup crash unless full subgroups are required",
        matches=(Match(vendor_ids=(_INTEL,), types=("discrete", "integrated")),),
        avoid=frozenset({"subgroup_shuffle", "full_subgroups"}),
        reason="Intel's drivers pick the subgroup size per pipeline and may leave subgroups partly "
               "populated unless the pipeline requires full subgroups; llama.cpp's flash attention "
               "crashed until it did (and later stopped using subgroup operations in its scalar path on "
               "Intel). kp creates pipelines without VK_PIPELINE_SHADER_STAGE_CREATE_REQUIRE_FULL_"
               "SUBGROUPS_BIT.",
        effect="no subgroup operation: TPR = 1 in the scalar, split-KV and backward kernels; the "
               "cooperative-matrix kernels (which need full subgroups) are turned off.",
        sources=(f"{_LLAMA}/pull/17356", f"{_LLAMA}/issues/17297", f"{_LLAMA}/pull/18831"),
    ),
    Workaround(
        id="nvidia-turing-coopmat",
        title="KHR cooperative-matrix flash attention wrong on NVIDIA Turing",
        matches=(Match(vendor_ids=(_NVIDIA,), architectures=("nvidia-turing",)),
                 # Drivers without VK_NV_shader_sm_builtins do not say warps per SM: the names.
                 Match(vendor_ids=(_NVIDIA,),
                       name=r"\b(RTX 20\d\d|GTX 16\d\d|TITAN RTX|Quadro RTX|Tesla T4|T4\b|T[46]00\b|T1[02]00\b|"
                            r"Quadro T\d)")),
        avoid=frozenset({"coopmat"}),
        reason="NVIDIA's shader compiler miscompiles llama.cpp's coopmat1 flash-attention shader on Turing "
               "(RTX 20xx, GTX 16xx, T4): wrong output; llama.cpp runs its scalar shader there.",
        effect="the cooperative-matrix forward and backward are turned off; the scalar kernels run.",
        sources=(f"{_LLAMA}/pull/19290", f"{_LLAMA}/pull/19075#issuecomment-3820716090"),
    ),
    Workaround(
        id="intel-xe1-coopmat-slow",
        title="KHR cooperative matrix slower than scalar on Intel Arc A-series (Xe-HPG)",
        matches=(Match(vendor_ids=(_INTEL,), architectures=("intel-xe1",), types=("discrete",)),
                 Match(vendor_ids=(_INTEL,), name=r"Arc\(tm\) A\d|Arc A\d|\bDG2\b")),
        avoid=frozenset({"coopmat"}),
        reason="on discrete pre-Xe2 Intel GPUs (Arc A770 and its family) cooperative-matrix kernels ran "
               "slower than scalar ones (down to 0.0007x, a quarter of cases 5% or more slower); "
               "llama.cpp enables coopmat only on Xe2 and integrated Xe.",
        effect="the cooperative-matrix kernels are turned off (a speed trap, not a wrong result).",
        sources=(f"{_LLAMA}/pull/24404",),
    ),
    Workaround(
        id="moltenvk-pipeline-creation",
        title="flash-attention pipeline creation failing on MoltenVK",
        matches=(Match(driver_ids=(_MOLTENVK,)), Match(os=("darwin",))),
        avoid=frozenset(),
        reason="vkCreateComputePipelines returned VK_ERROR_INITIALIZATION_FAILED for llama.cpp's "
               "flash-attention shaders on MoltenVK (Metal rejects some translated kernels); the thread "
               "names no shader feature to avoid.",
        effect="no static avoidance: the self-check builds every pipeline a kernel family uses before it "
               "is first used, and a family whose pipeline fails to build is turned off with one "
               "warning (auto takes the next).",
        sources=(f"{_LLAMA}/issues/13450",),
    ),
)


def enabled() -> bool:
    """Whether the table applies (``AULE_KP_WORKAROUNDS=0`` turns it off)."""
    return knobs.current().workarounds


class _Applied:
    """What the table says about one DeviceCaps object, worked out once: the choice asks several
    times per call, and hashing a DeviceCaps costs more than a dict lookup by identity."""

    def __init__(self, caps: DeviceCaps):
        self.caps = caps  # held, so that id(caps) stays this object's
        self.matching = tuple(w for w in TABLE if w.applies(caps))
        self.avoided: Dict[str, List[Workaround]] = {}
        for w in self.matching:
            for feature in sorted(w.avoid):
                self.avoided.setdefault(feature, []).append(w)
        shuffles = caps.subgroup_shuffle and "subgroup_shuffle" in self.avoided
        self.effective = replace(caps, subgroup_shuffle=False) if shuffles else caps


_applied: Dict[int, _Applied] = {}


def _apply(caps: DeviceCaps) -> Optional[_Applied]:
    """The table applied to ``caps``; None when nothing matches or ``AULE_KP_WORKAROUNDS=0`` (the
    environment is read only when something matches)."""
    hit = _applied.get(id(caps))
    if hit is None or hit.caps is not caps:
        if len(_applied) > 256:
            _applied.clear()
        hit = _applied[id(caps)] = _Applied(caps)
    return hit if hit.matching and enabled() else None


def matching(caps: DeviceCaps) -> Tuple[Workaround, ...]:
    """The table's entries that apply to this device (none when ``AULE_KP_WORKAROUNDS=0``)."""
    hit = _apply(caps)
    return hit.matching if hit else ()


def avoided(caps: DeviceCaps) -> Dict[str, List[Workaround]]:
    """Avoided feature -> the entries that avoid it on this device (do not modify)."""
    hit = _apply(caps)
    return hit.avoided if hit else {}


def family_reasons(family: str, caps: DeviceCaps) -> List[str]:
    """Why the table turns kernel family ``family`` off on this device (empty: it does not)."""
    hit = _apply(caps)
    if hit is None:
        return []
    needs = NEEDS.get(family, frozenset())
    return [f"turned off for this driver: needs {feature}, avoided because {w.title} ({w.sources[0]})"
            for feature, entries in hit.avoided.items() if feature in needs for w in entries]


def effective(caps: DeviceCaps) -> DeviceCaps:
    """The capabilities the tile choice may use: ``caps`` less the features the table avoids that
    the kernels can do without (:data:`DO_WITHOUT`). The same object for the same ``caps``."""
    hit = _apply(caps)
    return hit.effective if hit else caps


def describe(caps: DeviceCaps) -> List[Dict[str, Any]]:
    """The entries that apply to this device, as dicts (``Workaround.as_dict``)."""
    return [w.as_dict() for w in matching(caps)]
