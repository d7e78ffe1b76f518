"""The kernel choice over a grid of problems on recorded and faked device capabilities.

``python tests/choice_grid.py --write`` records ``tests/data/choice_snapshot.json.gz``;
``tests/test_choice_snapshot.py`` checks that the choice made now equals the recorded one, so a
refactoring of the choice (or a plan-cache change) cannot move a problem to another kernel unnoticed.
A deliberate change of the choice re-records the snapshot and says why in its commit.

The device profiles: lavapipe as probed on the developers' VM (subgroup 8, 32 KiB shared memory,
128 MiB bindings); the lent H200 as probed by earlier GPU runs (subgroup 32, 48 KiB, KHR coopmat
16x16x16 f16->f32, NV coopmat2); and faked RDNA3 (subgroup 64, KHR coopmat), Intel Arc (subgroup
32 with a 16..32 range, KHR coopmat) and MoltenVK on Apple (subgroup 32, no coopmat).
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple
from unittest import mock

SNAPSHOT = Path(__file__).parent / "data" / "choice_snapshot.json.gz"

_LAVAPIPE: Dict[str, Any] = dict(
    index=0, name="llvmpipe (LLVM 15.0.6, 256 bits)", vendor="mesa", vendor_id=0x10005, device_id=0, type="cpu",
    api_version="1.3.230", driver_name="llvmpipe", driver_info="Mesa 22.3.6 (LLVM 15.0.6)", driver_version=1,
    uuid="6d657361-3232-2e33-2e36-0000000000", subgroup_size=8, min_subgroup_size=8, max_subgroup_size=8,
    subgroup_shuffle=True, subgroup_arithmetic=True, shared_memory=32768, max_storage_buffer_range=2**27,
    max_workgroup_invocations=1024, max_workgroup_count=(65535, 65535, 65535), max_push_constants=256,
    fp16=True, int8=True, coopmat=False, coopmat_shapes=(), coopmat2=False, host_visible_device_memory=True)
_COOPMAT_F16 = ((16, 16, 16, "f16", "f16", "f32", "f32", "subgroup"), (16, 16, 16, "f16", "f16", "f16", "f16",
                                                                          "subgroup"))
PROFILES: Dict[str, Dict[str, Any]] = {
    "lavapipe": {},
    "h200": dict(name="NVIDIA H200", vendor="nvidia", vendor_id=0x10DE, device_id=0x2335, type="discrete",
                 api_version="1.4.312", driver_name="NVIDIA", driver_info="580.159.04", driver_version=0x9127C000,
                 subgroup_size=32, min_subgroup_size=32, max_subgroup_size=32, shared_memory=49152,
                 max_storage_buffer_range=2**32 - 1, max_workgroup_count=(2**31 - 1, 65535, 65535),
                 coopmat=True, coopmat_shapes=_COOPMAT_F16, coopmat2=True, host_visible_device_heap=140 << 30),
    "rdna3": dict(name="AMD Radeon RX 7900 XTX (RADV NAVI31)", vendor="amd", vendor_id=0x1002, device_id=0x744C,
                  type="discrete", driver_name="radv", driver_info="Mesa 25.0.7", subgroup_size=64,
                  min_subgroup_size=32, max_subgroup_size=64, shared_memory=65536,
                  max_storage_buffer_range=2**32 - 1, max_workgroup_count=(2**31 - 1, 65535, 65535),
                  coopmat=True, coopmat_shapes=_COOPMAT_F16, host_visible_device_heap=24 << 30),
    "arc": dict(name="Intel(R) Arc(tm) B580 Graphics (BMG G21)", vendor="intel", vendor_id=0x8086, device_id=0xE20B,
                type="discrete", driver_name="Intel open-source Mesa driver", driver_info="Mesa 25.0.7",
                subgroup_size=32, min_subgroup_size=16, max_subgroup_size=32, shared_memory=65536,
                max_storage_buffer_range=2**30, max_workgroup_count=(65535, 65535, 65535),
                coopmat=True, coopmat_shapes=_COOPMAT_F16[:1], host_visible_device_heap=256 << 20),
    "moltenvk": dict(name="Apple M2 Pro", vendor="apple", vendor_id=0x106B, device_id=0x1A020209,
                     type="integrated", driver_name="MoltenVK", driver_info="1.2.11", subgroup_size=32,
                     min_subgroup_size=4, max_subgroup_size=32, shared_memory=32768,
                     max_storage_buffer_range=2**30, max_workgroup_count=(2**30, 2**30, 2**30), int8=False),
}

DTYPES = ("float32", "float16", "bfloat16")
DIMS = ((32, 32), (64, 64), (128, 128), (256, 256), (192, 128), (40, 40))
LENGTHS = ((1, 1), (1, 200), (1, 4096), (1, 65536), (4, 4096), (16, 16), (128, 128), (1000, 1000), (2048, 2048),
           (8192, 8192), (100, 3000), (3000, 100))
MASKING = ("none", "causal", "window", "mask")
HEADS = ((1, 8, 8), (2, 32, 8), (1, 64, 8), (1, 8, 1))


def caps_of(profile: str) -> Any:
    from aule_kp.vulkan.probe import DeviceCaps

    return replace(DeviceCaps(**_LAVAPIPE), **PROFILES[profile])


def problems() -> Iterator[Tuple[str, Any]]:
    from aule_kp.problem import Problem, band, default_scale

    for dtype, (dk, dv), (lq, lk), masking, (b, hq, hkv) in itertools.product(DTYPES, DIMS, LENGTHS, MASKING, HEADS):
        window = (64, 0) if masking == "window" else None
        diag, left, right = band(lq, lk, causal=masking == "causal", window=window, top_left=False)
        mask_shape = (1, 1, lq, lk) if masking == "mask" else None
        p = Problem(b, hq, hkv, lq, lk, dk, dv, dtype, default_scale(dk), diag, left, right, mask_shape)
        yield f"{dtype} D{dk}/{dv} L{lq}/{lk} {masking} B{b} H{hq}/{hkv}", p


@contextmanager
def on_device(caps: Any) -> Iterator[None]:
    """The Vulkan backend's device replaced by one with ``caps`` (no Manager is ever made)."""
    from aule_kp.vulkan import device as devmod

    fake = mock.Mock(spec=["caps"], caps=caps)
    with mock.patch.object(devmod, "get_device", lambda index=None: fake), \
            mock.patch.object(devmod, "unavailable", lambda: None):
        yield


def choices() -> Dict[str, Dict[str, List[str]]]:
    """``{profile: {problem: [forward choice or reasons, backward choice or reasons]}}``."""
    from aule_kp.vulkan import tuning_cache
    from aule_kp.vulkan.backend import VulkanBackend

    out: Dict[str, Dict[str, List[str]]] = {}
    defaults = {n: v for n, v in os.environ.items() if not n.startswith("AULE_KP_")}
    # The knobs' defaults (no AULE_KP_* set) for the duration only; the self-check would run kernels.
    with mock.patch.dict(os.environ, dict(defaults, AULE_KP_SELF_CHECK="0"), clear=True), tuning_cache.defaults_only():
        for profile in PROFILES:
            with on_device(caps_of(profile)):
                backend = VulkanBackend()
                rows: Dict[str, List[str]] = {}
                for key, p in problems():
                    why = backend.problem_reasons(p)
                    fwd = "refused: " + "; ".join(why) if why else repr(backend.config(p))
                    bwhy = backend.backward_reasons(p, mask_grad=p.has_mask)
                    bwd = "refused: " + "; ".join(bwhy) if bwhy else repr(backend.backward_config(p, p.has_mask))
                    rows[key] = [fwd, bwd]
                out[profile] = rows
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help=f"record the snapshot in {SNAPSHOT}")
    args = ap.parse_args()
    got = choices()
    if args.write:
        SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
        SNAPSHOT.write_bytes(gzip.compress(json.dumps(got, indent=0, sort_keys=True).encode(), mtime=0))
    n = sum(len(v) for v in got.values())
    sys.stdout.write(f"{n} choices over {len(got)} device profiles\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
