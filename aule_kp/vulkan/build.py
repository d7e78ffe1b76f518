"""Which build of the kernels a kernel family runs: aule-kp's version and a digest of the family's
SPIR-V. What the self-check's verdicts and the tuning cache's winners were obtained on, so that
neither outlives an upgrade of the shaders."""

from __future__ import annotations

import hashlib
from typing import Dict, Tuple

#: The SPIR-V kernels each family runs.
FAMILY_KERNELS: Dict[str, Tuple[str, ...]] = {
    "fwd.scalar": ("fa2_fwd",), "fwd.wave64": ("fa2_fwd",), "fwd.coopmat": ("fa2_fwd_coopmat",),
    "fwd.coopmat2": ("fa2_fwd_cm2",),
    "splitkv": ("fa2_splitkv",), "bwd.scalar": ("fa2_bwd_pre", "fa2_bwd_dkdv", "fa2_bwd_dq"),
    "bwd.coopmat": ("fa2_bwd_pre", "fa2_bwd_dkdv_coopmat", "fa2_bwd_dq_coopmat"),
}
_builds: Dict[str, str] = {}


def build_id(family: str) -> str:
    """aule-kp's version and a digest of the SPIR-V ``family`` runs (the version alone for a family
    not listed in :data:`FAMILY_KERNELS`); computed once per process."""
    if family not in _builds:
        from .._version import __version__
        from .compile import spirv_path

        h = hashlib.sha256(__version__.encode())
        for kernel in FAMILY_KERNELS.get(family, ()):
            path = spirv_path(kernel)
            h.update(path.read_bytes() if path.exists() else b"missing")
        _builds[family] = h.hexdigest()[:16]
    return _builds[family]
