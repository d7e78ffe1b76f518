"""``aule_kp.info()``: version, backends, devices and what each can run."""

from __future__ import annotations

from typing import Any, Dict, List

from . import dispatch, knobs
from ._version import __version__
from .problem import Problem
from .vulkan import device as devmod
from .vulkan import int8, selfcheck, workarounds
from .vulkan.choice import VARIANTS, disabled_reasons, variant_reasons
from .vulkan.probe import probe_error

#: The typical problem ``variants`` answers for: fp16, head dim 64.
_TYPICAL = Problem(1, 1, 1, 64, 64, 64, 64, "float16", 0.125)


def _variant_reasons(caps: Any) -> Dict[str, List[str]]:
    """Forward variant -> why it cannot run a typical fp16 head-dim-64 problem here (empty: it can),
    counting the driver-trap table and recorded self-check verdicts (never running a check)."""
    return {v: disabled_reasons(f"fwd.{v}", caps, _TYPICAL.dtype, warn=False)
            + variant_reasons(v, caps, _TYPICAL, checks=False) for v in VARIANTS}


def info() -> Dict[str, Any]:
    """What this installation can do: ``version``, ``backends``, ``devices``, ``kp``.

    Each device dict has at least ``name``, ``vendor``, ``type``, ``subgroup_size``,
    ``shared_memory``, ``fp16``, ``coopmat`` and ``variants`` (forward kernel variants it can run for
    a typical fp16 problem), plus ``variant_reasons`` (why each other variant cannot: device limits,
    the driver-trap table, a self-check verdict), ``int8_variants`` (the ``precision="int8"`` kernel
    variants it can run for that problem), ``workarounds`` (the table's entries that apply,
    aule_kp/vulkan/workarounds.py) and ``self_check`` (verdicts recorded for this driver, by
    ``<kernel family>/<dtype>``).
    ``selected_device``: the index ``AULE_KP_DEVICE`` selects (None when it selects none);
    ``device_error``: why it selects none (not an integer, out of range), else None.
    ``knobs``: every ``AULE_KP_*`` variable by name: its ``value`` (None: unset), ``default`` and
    ``meaning`` (aule_kp/knobs.py).
    """
    devices = []
    for caps in devmod.devices():
        d = caps.as_dict()
        reasons = _variant_reasons(caps)
        d["variants"] = [v for v in VARIANTS if not reasons[v]]
        d["variant_reasons"] = {v: r for v, r in reasons.items() if r}
        d["int8_variants"] = [v for v in int8.VARIANTS if not int8.variant_reasons(v, caps, _TYPICAL)]
        d["workarounds"] = workarounds.describe(caps)
        d["self_check"] = selfcheck.verdicts_for(caps)
        devices.append(d)
    device_error = devmod.selected_device_error() if devices else None
    out: Dict[str, Any] = {
        "version": __version__,
        "backends": dispatch.available_backends(),
        "devices": devices,
        "selected_device": None if device_error or not devices else devmod.selected_index(),
        "device_error": device_error,
        "kp": devmod.kp_status(),
        "knobs": knobs.current().describe(),
    }
    if not devices:
        out["vulkan_error"] = probe_error() or devmod.vulkan_unavailable()
    return out
