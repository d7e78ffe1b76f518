"""``aule_kp.info()``: version, backends, devices and what each can run."""

from __future__ import annotations

from typing import Any, Dict, List

from . import dispatch
from .problem import Problem
from .vulkan import device as devmod
from .vulkan.kernels import VARIANTS, variant_reasons
from .vulkan.probe import probe_error


def _variants(caps: Any) -> List[str]:
    """Variants this device can run for a typical fp16 head-dim-64 problem (forced ones included)."""
    probe = Problem(1, 1, 1, 64, 64, 64, 64, "float16", 0.125)
    return [v for v in VARIANTS if not variant_reasons(v, caps, probe, forced=True)]


def info() -> Dict[str, Any]:
    """What this installation can do: ``version``, ``backends``, ``devices``, ``kp``.

    Each device dict has at least ``name``, ``vendor``, ``type``, ``subgroup_size``,
    ``shared_memory``, ``fp16``, ``coopmat`` and ``variants`` (kernel variants it can run).
    ``selected_device``: the index ``AULE_KP_DEVICE`` selects (None when it selects none);
    ``device_error``: why it selects none (not an integer, out of range), else None.
    """
    from . import __version__

    devices = []
    for caps in devmod.devices():
        d = caps.as_dict()
        d["variants"] = _variants(caps)
        devices.append(d)
    device_error = devmod.selected_device_error() if devices else None
    out: Dict[str, Any] = {
        "version": __version__,
        "backends": dispatch.available_backends(),
        "devices": devices,
        "selected_device": None if device_error or not devices else devmod.selected_index(),
        "device_error": device_error,
        "kp": devmod.kp_status(),
    }
    if not devices:
        out["vulkan_error"] = probe_error() or devmod.vulkan_unavailable()
    return out
