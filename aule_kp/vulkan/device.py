"""One ``kp.Manager`` per Vulkan device, created lazily, plus the device's capabilities.

``AULE_KP_DEVICE`` selects the device index (default 0). kp is not thread-safe, so every use of a
device's Manager goes through ``Device.lock``.
"""

from __future__ import annotations

import logging
import os
import threading
from functools import cache
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from .probe import DeviceCaps, probe_devices, probe_error

log = logging.getLogger("aule_kp")

#: Smallest device-local host-visible heap that plan inputs are put in (a resizable BAR, not the
#: classic 256 MiB window that drivers keep for themselves).
BAR_MIN_HEAP = 2 << 30

_kp: Any = None
_kp_error: Optional[str] = None


def import_kp() -> Any:
    """Imports kp once, without letting its ``logging.basicConfig()`` configure the user's logging."""
    global _kp, _kp_error
    if _kp is None and _kp_error is None:
        root = logging.getLogger()
        guard = logging.NullHandler() if not root.handlers else None
        if guard is not None:
            root.addHandler(guard)  # basicConfig() does nothing when the root logger has a handler
        try:
            import kp

            _kp = kp
        except ImportError as exc:  # pragma: no cover - depends on the install
            _kp_error = f"kp (Kompute) is not importable: {exc}"
        finally:
            if guard is not None:
                root.removeHandler(guard)
    if _kp is None:
        raise RuntimeError(_kp_error)
    return _kp


def kp_status() -> Dict[str, Any]:
    """Whether kp imports, its version and whether it is the build with aule-kp's patch."""
    try:
        kp = import_kp()
    except RuntimeError as exc:
        return {"available": False, "error": str(exc), "patched": False}
    return {
        "available": True,
        "version": getattr(kp, "__version__", "?"),
        "patched": bool(getattr(kp, "aule_patch", 0)),
        "patch_id": getattr(kp, "aule_patch_id", None),
    }


def selected_index() -> int:
    raw = os.environ.get("AULE_KP_DEVICE", "0")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"AULE_KP_DEVICE must be a device index (an integer), got {raw!r}") from None


class Device:
    """A Vulkan device: its capabilities, its Manager (made on first use) and compiled kernels."""

    def __init__(self, caps: DeviceCaps):
        self.caps = caps
        self.lock = threading.RLock()
        self._manager: Any = None
        self._spirv: Dict[str, bytes] = {}
        from .plan import PlanCache  # plan imports device types; keep the cycle lazy

        self.plans = PlanCache(int(os.environ.get("AULE_KP_PLAN_CACHE_MB", "1024")) << 20)

    @property
    def kp(self) -> Any:
        return import_kp()

    @property
    def manager(self) -> Any:
        with self.lock:
            if self._manager is None:
                wanted = [ext for ext in ("VK_KHR_cooperative_matrix",) if ext in self.caps.extensions]
                log.debug("creating kp.Manager on device %d (%s), extensions %s", self.caps.index,
                          self.caps.name, wanted)
                self._manager = self.kp.Manager(self.caps.index, [], wanted)
            return self._manager

    def spirv(self, kernel: str) -> bytes:
        """SPIR-V of ``glsl/<kernel>.comp``, compiled at install time (compiled now if missing)."""
        if kernel not in self._spirv:
            from .compile import GLSL_DIR, compile_one, spirv_path

            path: Path = spirv_path(kernel)
            if not path.exists():
                log.warning("%s is missing; compiling it now (run `make shaders` at install)", path.name)
                compile_one(GLSL_DIR / f"{kernel}.comp")
            self._spirv[kernel] = path.read_bytes()
        return self._spirv[kernel]

    @property
    def host_memory(self) -> bool:
        """Keep tensors in host-visible memory: free syncs where the GPU reads host memory anyway."""
        return self.caps.type in ("cpu", "integrated") or os.environ.get("AULE_KP_HOST_TENSORS") == "1"

    @property
    def direct_io(self) -> bool:
        """Discrete GPU with the patched kp: a plan's inputs go to device-local host-visible memory
        (resizable BAR, when the heap is large) and its outputs to cached host memory, so a call
        copies each byte once (see ``io_tensor``). ``AULE_KP_DIRECT_IO=0`` keeps staging buffers."""
        return (not self.host_memory and os.environ.get("AULE_KP_DIRECT_IO", "1") != "0"
                and hasattr(self.kp, "aule_host_device_local"))

    def io_tensor(self, data: np.ndarray, role: str) -> Any:
        """A kp tensor for data the host writes (``role="in"``) or reads (``"out"``) on every call.

        Host-memory devices: host tensors. Discrete GPUs with ``direct_io``: inputs in device-local
        host-visible memory when its heap holds at least ``BAR_MIN_HEAP`` (the CPU writes straight
        into device memory; a small 256 MiB BAR is left to the driver), else staged; outputs in
        cached host memory that shaders write across the bus while they run (no copy after the
        kernel; the CPU reads it at memcpy speed). Otherwise device tensors with staging buffers.
        """
        kp = self.kp
        mgr = self.manager
        if self.host_memory:
            return mgr.tensor_t(data, kp.TensorTypes.host)
        if not self.direct_io:
            return mgr.tensor_t(data, kp.TensorTypes.device)
        if role == "out":
            return mgr.tensor_t(data, kp.TensorTypes.host)
        if self.caps.host_visible_device_heap < BAR_MIN_HEAP:
            return mgr.tensor_t(data, kp.TensorTypes.device)
        with self.lock:
            kp.aule_host_device_local(True)
            try:
                return mgr.tensor_t(data, kp.TensorTypes.host)
            except RuntimeError as exc:  # that heap is full: stage through host memory instead
                log.debug("device-local host-visible allocation of %d B failed (%s); staging", data.nbytes, exc)
            finally:
                kp.aule_host_device_local(False)
        return mgr.tensor_t(data, kp.TensorTypes.device)


@cache
def _device(index: int) -> Device:
    caps = devices()
    if not 0 <= index < len(caps):
        raise ValueError(f"AULE_KP_DEVICE={index} but there are {len(caps)} Vulkan device(s)")
    return Device(caps[index])


def devices() -> List[DeviceCaps]:
    return probe_devices()


def vulkan_unavailable() -> Optional[str]:
    """Why no Vulkan device can be used, or None."""
    status = kp_status()
    if not status["available"]:
        return status["error"]
    if not devices():
        return probe_error() or "no Vulkan device found"
    return None


def get_device(index: Optional[int] = None) -> Device:
    """The Device at ``index`` (default: ``AULE_KP_DEVICE`` or 0)."""
    return _device(selected_index() if index is None else index)
