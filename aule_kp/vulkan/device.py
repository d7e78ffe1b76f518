"""One ``kp.Manager`` per Vulkan device, created lazily, plus the device's capabilities.

``AULE_KP_DEVICE`` selects the device index (default 0). kp is not thread-safe, so every use of a
device's Manager goes through ``Device.lock``.

A process forked after it used Vulkan (multiprocessing's default on Linux, torch DataLoader workers)
inherits the parent's Vulkan objects without the driver threads behind them: using them hangs (a
lavapipe submission waits forever for its queue thread). So the child starts afresh
(``_after_fork_in_child``): the next call opens the device again, with a new Manager, plans and copy
threads. The parent's objects are left alone, deliberately leaked: destroying them would call the
driver on state whose threads are gone, and so would the driver's own exit handlers: the child ends
with ``_exit`` ahead of them (``_skip_driver_exit_handlers``). Anything the parent made (a Context,
its GpuTensors) raises in the child, at once, on its next use.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import logging
import os
import threading
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .. import knobs
from .compile import shaders_missing
from .plan import PlanCache
from .probe import DeviceCaps, probe_devices, probe_error

log = logging.getLogger("aule_kp")

#: Smallest device-local host-visible heap that plan inputs are put in (a resizable BAR, not the
#: classic 256 MiB window that drivers keep for themselves).
BAR_MIN_HEAP = 2 << 30

_kp: Any = None
_kp_error: Optional[str] = None


def import_kp() -> Any:
    """Imports kp once (the wheel's ``aule_kp._kp``, else a ``kp`` of the environment), without letting
    its ``logging.basicConfig()`` configure the user's logging."""
    global _kp, _kp_error
    if _kp is None and _kp_error is None:
        root = logging.getLogger()
        guard = logging.NullHandler() if not root.handlers else None
        if guard is not None:
            root.addHandler(guard)  # basicConfig() does nothing when the root logger has a handler
        # The wheel's own patched build first (private: a user's kp never clashes with it). When it is
        # there but fails to load, that is the error to report, not a silent switch to another kp.
        name = "aule_kp._kp" if importlib.util.find_spec("aule_kp._kp") is not None else "kp"
        try:
            _kp = importlib.import_module(name)
        except ImportError as exc:  # pragma: no cover - depends on the install
            _kp_error = f"kp (Kompute) is not importable as {name}: {exc}"
        finally:
            if guard is not None:
                root.removeHandler(guard)
    if _kp is None:
        raise RuntimeError(_kp_error)
    return _kp


def kp_patch_level(kp: Any) -> int:
    """The version of aule-kp's patch the kp module ``kp`` was built with (``kp.aule_patch``; 0 for
    the unpatched release): the one way to ask "is kp patched, and with what?"."""
    return int(getattr(kp, "aule_patch", 0))


def kp_status() -> Dict[str, Any]:
    """Whether kp imports, its version and whether it is the build with aule-kp's patch."""
    try:
        kp = import_kp()
    except RuntimeError as exc:
        return {"available": False, "error": str(exc), "patched": False}
    return {
        "available": True,
        "module": kp.__name__,
        "version": getattr(kp, "__version__", "?"),
        "patched": kp_patch_level(kp) > 0,
        "patch_id": getattr(kp, "aule_patch_id", None),
    }


def selected_index() -> int:
    """The device index ``AULE_KP_DEVICE`` selects (default 0)."""
    return knobs.current().device


class ParentProcessLock:
    """Stands in for ``Device.lock`` in a forked child on the parent's Device: every use raises."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self) -> None:
        raise RuntimeError(f"this Vulkan device ({self.name}) was opened by the parent process before it forked; "
                           "its Vulkan objects cannot be used in the child: make a new Context (and tensors) there")

    def __exit__(self, *exc: Any) -> None:  # pragma: no cover - __enter__ always raises
        pass


class Device:
    """A Vulkan device: its capabilities, its Manager (made on first use) and compiled kernels."""

    def __init__(self, caps: DeviceCaps):
        self.caps = caps
        self.lock = threading.RLock()
        self._manager: Any = None
        self._spirv: Dict[str, bytes] = {}
        self.plans = PlanCache()

    @property
    def kp(self) -> Any:
        return import_kp()

    @property
    def kp_patch(self) -> int:
        """``kp_patch_level`` of the kp this device runs on."""
        return kp_patch_level(self.kp)

    def wanted_extensions(self) -> Tuple[str, ...]:
        """Device extensions the kernels may use. VK_NV_cooperative_matrix2 only where kp's patch
        enables its features (patch 4): the extension alone would not make its shaders legal."""
        return ("VK_KHR_cooperative_matrix",) + (("VK_NV_cooperative_matrix2",) if self.kp_patch >= 4 else ())

    @property
    def manager(self) -> Any:
        with self.lock:
            if self._manager is None:
                wanted = [ext for ext in self.wanted_extensions() if ext in self.caps.extensions]
                log.debug("creating kp.Manager on device %d (%s), extensions %s", self.caps.index,
                          self.caps.name, wanted)
                self._manager = self.kp.Manager(self.caps.index, [], wanted)
            return self._manager

    def spirv(self, kernel: str) -> bytes:
        """SPIR-V of ``glsl/<kernel>.comp``, compiled at install time (compiled now if missing, or
        stale in a checkout: ``compile.ensure``)."""
        if kernel not in self._spirv:
            from .compile import ensure

            self._spirv[kernel] = ensure(kernel).read_bytes()
        return self._spirv[kernel]

    @property
    def host_memory(self) -> bool:
        """Keep tensors in host-visible memory: free syncs where the GPU reads host memory anyway."""
        return self.caps.type in ("cpu", "integrated") or knobs.current().host_tensors

    @property
    def direct_io(self) -> bool:
        """Discrete GPU with the patched kp: a plan's inputs go to device-local host-visible memory
        (resizable BAR, when the heap is large) and its outputs to cached host memory, so a call
        copies each byte once (see ``io_tensor``). ``AULE_KP_DIRECT_IO=0`` keeps staging buffers."""
        return (not self.host_memory and knobs.current().direct_io
                and hasattr(self.kp, "aule_host_device_local"))

    @property
    def staged(self) -> bool:
        """Whether plans' inputs or outputs go through staging buffers, copied whole on every call
        (discrete GPUs without ``direct_io`` or without a large BAR heap, see ``io_tensor``)."""
        return not self.host_memory and (not self.direct_io or self.caps.host_visible_device_heap < BAR_MIN_HEAP)

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


#: Devices opened in this process, by index.
_devices: Dict[int, Device] = {}
_devices_lock = threading.Lock()


def _device(index: int) -> Device:
    dev = _devices.get(index)
    if dev is None:
        with _devices_lock:
            dev = _devices.setdefault(index, Device(devices()[index]))
    return dev


def _skip_driver_exit_handlers() -> None:
    """Ends this (forked) process with ``_exit(status)`` ahead of the C exit handlers registered so
    far. Mesa's handler joins the threads of every queue it made, the parent's too; in a child their
    stacks are reused by the threads of the child's own device, so it would join a live thread that
    waits for work and hang at exit. Python's own shutdown has run by then; skipped are those
    handlers and library destructors, which would only touch the parent's driver state. glibc only
    (``on_exit`` passes the exit status on); elsewhere nothing changes."""
    try:
        libc = ctypes.CDLL(None)
        on_exit, exit_now = libc.on_exit, libc._exit
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return
    on_exit.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    on_exit(ctypes.cast(exit_now, ctypes.c_void_p), None)


def _after_fork_in_child() -> None:
    """Forgets the parent's devices in a forked child (see the module doc): each is kept alive for
    good (never destroyed: its Vulkan objects are the parent's) and its lock raises on use."""
    if _devices:
        _skip_driver_exit_handlers()
    for dev in _devices.values():
        dev.lock = ParentProcessLock(dev.caps.name)
        # One reference that is never dropped, not even at exit: no kp destructor runs in the child.
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(dev))
    _devices.clear()
    global _devices_lock
    _devices_lock = threading.Lock()  # the parent may have held it while forking
    from . import hostcopy

    hostcopy._pool.cache_clear()  # its worker threads did not survive the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def devices() -> List[DeviceCaps]:
    return probe_devices()


_shaders_found = False


def _probed() -> Tuple[List[DeviceCaps], Optional[str]]:
    """The devices found and why none can be used (None: some can). kp is asked first: without it
    nothing is probed."""
    status = kp_status()
    if not status["available"]:
        return [], status["error"]
    global _shaders_found
    if not _shaders_found:  # once found they stay (the hot path asks on every call); a miss asks again
        shaders = shaders_missing()
        if shaders:
            return [], shaders
        _shaders_found = True
    found = devices()
    return found, None if found else (probe_error() or "no Vulkan device found")


def vulkan_unavailable() -> Optional[str]:
    """Why no Vulkan device can be used, or None."""
    return _probed()[1]


def index_error(index: int, what: str, found: Optional[List[DeviceCaps]] = None) -> Optional[str]:
    """Why ``index`` (named ``what`` in the message) selects no device here (None: it does);
    ``found``: the devices probed (None: probe them)."""
    n = len(devices() if found is None else found)
    if 0 <= index < n:
        return None
    return f"{what}={index} is out of range: " + (f"there are {n} Vulkan device(s), valid indices 0-{n - 1}" if n
                                                    else "there is no Vulkan device")


def unavailable() -> Optional[str]:
    """Why the selected Vulkan device cannot be used (no kp, no device, or an ``AULE_KP_DEVICE``
    that selects none), or None. The device list is read once, for both checks."""
    found, why = _probed()
    return why or selected_device_error(found)


def selected_device_error(found: Optional[List[DeviceCaps]] = None) -> Optional[str]:
    """Why ``AULE_KP_DEVICE`` selects no device (not an integer, or out of range); None when it does.
    ``found``: the devices probed (None: probe them)."""
    try:
        return index_error(selected_index(), "AULE_KP_DEVICE", found)
    except ValueError as exc:
        return str(exc)


def usable_device() -> Tuple[Optional[Device], Optional[str]]:
    """``(the selected Device, None)``, or ``(None, why it cannot be used)`` as ``unavailable`` says:
    the availability check and the device in one call."""
    why = unavailable()
    return (None, why) if why else (get_device(), None)


def get_device(index: Optional[int] = None) -> Device:
    """The Device at ``index``, a non-negative int below the number of devices (TypeError /
    ValueError naming ``device`` otherwise); None: ``AULE_KP_DEVICE`` (default 0)."""
    if index is None:
        index = selected_index()
        what = "AULE_KP_DEVICE"
    elif isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        n = len(devices())
        raise TypeError(f"device must be None or a Vulkan device index, an int in 0-{n - 1}; got "
                        f"{type(index).__name__} {index!r}")
    else:
        what = "device"
    dev = _devices.get(index)
    if dev is None:
        why = index_error(int(index), what)
        if why:
            raise ValueError(why)
        dev = _device(int(index))
    return dev
