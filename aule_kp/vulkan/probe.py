"""Capability probe of the Vulkan physical devices.

``kp.Manager.get_device_properties()`` reports five fields; picking a shader variant needs far more
(subgroup sizes and operations, shared memory, storage-buffer range, fp16/int8 support, cooperative
matrix shapes, ...). This module reads them through the PyPI ``vulkan`` cffi binding, on a private
``VkInstance`` that it destroys again before returning.

Rules this module keeps:

* It never raises. No loader, no ICD or any Vulkan error gives ``[]`` and :func:`probe_error` says why.
* Structures are chained into ``pNext`` only where the device's (and instance's) API version or an
  advertised extension allows it, so a 1.1 driver is never handed a 1.2 struct it may not know.
* Every cffi object in a ``pNext`` chain stays referenced in a local list until the call returns: cffi
  frees an ``ffi.new`` block as soon as its Python owner is garbage.
* Devices are reported in ``vkEnumeratePhysicalDevices`` order, which is the order ``kp.Manager(index)``
  uses; :attr:`DeviceCaps.index` is that index.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["DeviceCaps", "detect_architecture", "driver_id_name", "parallelism", "probe_devices", "probe_error",
           "vendor_name"]

logger = logging.getLogger("aule_kp")

# --- constants --------------------------------------------------------------------------------------
# Written out rather than read from the ``vulkan`` package: 1.3.275.1 has no VK_API_VERSION_1_x beyond
# 1_0, lacks enums newer than its headers (bf16/fp8 component types) and some of its result codes
# carry the wrong sign, so numbers that matter here are pinned to the spec.

_VENDORS = {
    0x10DE: "nvidia",
    0x1002: "amd",
    0x1022: "amd",
    0x8086: "intel",
    0x106B: "apple",
    0x10005: "mesa",  # VK_VENDOR_ID_MESA: lavapipe/llvmpipe and other software drivers
    0x13B5: "arm",
    0x5143: "qualcomm",
    0x1010: "imgtec",
    0x14E4: "broadcom",
    0x1414: "microsoft",  # Dozen (Vulkan on D3D12)
    0x144D: "samsung",
}

_DEVICE_TYPES = {0: "other", 1: "integrated", 2: "discrete", 3: "virtual", 4: "cpu"}

#: VkDriverId (VK_KHR_driver_properties / Vulkan 1.2) -> short name. Driver traps are often tied to
#: one driver rather than to a vendor (AMD's proprietary driver vs RADV on the same GPU).
DRIVER_IDS = {
    1: "amd-proprietary",
    2: "amd-open-source",  # AMDVLK
    3: "radv",
    4: "nvidia-proprietary",
    5: "intel-proprietary-windows",
    6: "intel-mesa",  # ANV
    7: "imagination-proprietary",
    8: "qualcomm-proprietary",
    9: "arm-proprietary",
    10: "swiftshader",
    11: "ggp-proprietary",
    12: "broadcom-proprietary",
    13: "llvmpipe",
    14: "moltenvk",
    15: "coreavi-proprietary",
    16: "juice-proprietary",
    17: "verisilicon-proprietary",
    18: "turnip",
    19: "v3dv",
    20: "panvk",
    21: "samsung-proprietary",
    22: "venus",
    23: "dozen",
    24: "nvk",
    25: "imagination-mesa",
    26: "honeykrisp",
}

# VkComponentTypeKHR -> short name. bf16 and fp8 come from extensions newer than the binding.
_COMPONENT_TYPES = {
    0: "f16",
    1: "f32",
    2: "f64",
    3: "s8",
    4: "s16",
    5: "s32",
    6: "s64",
    7: "u8",
    8: "u16",
    9: "u32",
    10: "u64",
    1000141000: "bf16",  # VK_COMPONENT_TYPE_BFLOAT16_KHR
    1000491000: "s8packed",  # VK_COMPONENT_TYPE_SINT8_PACKED_NV
    1000491001: "u8packed",  # VK_COMPONENT_TYPE_UINT8_PACKED_NV
    1000491002: "e4m3",  # VK_COMPONENT_TYPE_FLOAT8_E4M3_EXT / FLOAT_E4M3_NV
    1000491003: "e5m2",  # VK_COMPONENT_TYPE_FLOAT8_E5M2_EXT / FLOAT_E5M2_NV
}

_SCOPES = {1: "device", 2: "workgroup", 3: "subgroup", 5: "queue_family"}

_RESULT_NAMES = {
    0: "VK_SUCCESS",
    5: "VK_INCOMPLETE",
    -1: "VK_ERROR_OUT_OF_HOST_MEMORY",
    -2: "VK_ERROR_OUT_OF_DEVICE_MEMORY",
    -3: "VK_ERROR_INITIALIZATION_FAILED",
    -4: "VK_ERROR_DEVICE_LOST",
    -6: "VK_ERROR_LAYER_NOT_PRESENT",
    -7: "VK_ERROR_EXTENSION_NOT_PRESENT",
    -9: "VK_ERROR_INCOMPATIBLE_DRIVER",
    -13: "VK_ERROR_UNKNOWN",
}

_VK_SUCCESS = 0
_VK_INCOMPLETE = 5

_SUBGROUP_FEATURE_ARITHMETIC = 0x4
_SUBGROUP_FEATURE_SHUFFLE = 0x10
_SHADER_STAGE_COMPUTE = 0x20
_MEMORY_DEVICE_LOCAL = 0x1
_MEMORY_HOST_VISIBLE = 0x2
_INSTANCE_CREATE_ENUMERATE_PORTABILITY = 0x1

# sType values (identical in every header version; the binding has them too, pinned for clarity).
_ST_APPLICATION_INFO = 0
_ST_INSTANCE_CREATE_INFO = 1
_ST_PROPERTIES_2 = 1000059001
_ST_FEATURES_2 = 1000059000
_ST_SUBGROUP_PROPERTIES = 1000094000
_ST_ID_PROPERTIES = 1000071004
_ST_DRIVER_PROPERTIES = 1000196000
_ST_SUBGROUP_SIZE_CONTROL_PROPERTIES = 1000225000
_ST_SHADER_CORE_PROPERTIES_AMD = 1000185000
_ST_INTEGER_DOT_PRODUCT_PROPERTIES = 1000280001
_ST_SM_BUILTINS_PROPERTIES_NV = 1000154001
_ST_VULKAN_1_1_FEATURES = 49
_ST_VULKAN_1_2_FEATURES = 51
_ST_16BIT_STORAGE_FEATURES = 1000083000
_ST_8BIT_STORAGE_FEATURES = 1000177000
_ST_FLOAT16_INT8_FEATURES = 1000082000
_ST_COOPMAT_FEATURES_KHR = 1000506000
_ST_COOPMAT_PROPERTIES_KHR = 1000506001

_EXT_COOPMAT = "VK_KHR_cooperative_matrix"
_EXT_COOPMAT2 = "VK_NV_cooperative_matrix2"


def _make_version(major: int, minor: int, patch: int = 0) -> int:
    return (major << 22) | (minor << 12) | patch


def _version_tuple(version: int) -> tuple[int, int]:
    return (version >> 22) & 0x7F, (version >> 12) & 0x3FF


def _version_str(version: int) -> str:
    major, minor = _version_tuple(version)
    return f"{major}.{minor}.{version & 0xFFF}"


_V1_0 = _make_version(1, 0)
_V1_1 = _make_version(1, 1)
_V1_2 = _make_version(1, 2)
_V1_3 = _make_version(1, 3)


def driver_id_name(driver_id: int) -> str:
    """Short name of a ``VkDriverId`` (``"amd-proprietary"``, ``"radv"``, ``"moltenvk"``, ...); ``""``
    for 0 (a driver older than VK_KHR_driver_properties), the number for one newer than this table."""
    return DRIVER_IDS.get(int(driver_id), str(int(driver_id)) if driver_id else "")


def detect_architecture(vendor_id: int, extensions: frozenset[str], size_control: tuple[int, int] = (0, 0),
                        wavefronts_per_simd: int = 0, mixed_dot_accelerated: bool = False,
                        warps_per_sm: int = 0) -> str:
    """GPU generation from the facts Vulkan reports, as llama.cpp's ggml-vulkan tells them apart
    (``get_device_architecture``): no device-id tables, so new parts of a known generation classify.

    ``size_control``: (min, max) subgroup size from VK_EXT_subgroup_size_control ((0, 0) without it);
    ``wavefronts_per_simd`` from VK_AMD_shader_core_properties; ``mixed_dot_accelerated``:
    integerDotProduct4x8BitPackedMixedSignednessAccelerated; ``warps_per_sm`` from
    VK_NV_shader_sm_builtins. Returns ``"amd-gcn"`` (64/64-wide), ``"amd-rdna1"`` (20 wavefronts per
    SIMD), ``"amd-rdna2"``, ``"amd-rdna3"`` (mixed-signedness int8 dot accelerated), ``"amd-rdna4"``
    (VK_EXT_shader_float8), ``"intel-xe2"`` (SIMD16: minimum subgroup 16), ``"intel-xe1"`` (SIMD8:
    Gen9-12, Xe-LP, Xe-HPG such as the Arc A series), ``"nvidia-pre-turing"`` (no
    VK_KHR_cooperative_matrix), ``"nvidia-turing"`` (32 warps per SM; later generations have 48 or
    64), or ``"other"`` when the facts are missing (e.g. AMD GPUs under MoltenVK).
    """
    vendor = vendor_name(vendor_id)
    lo, hi = size_control
    if vendor == "amd" and wavefronts_per_simd and lo:
        if (lo, hi) == (64, 64):
            return "amd-gcn"
        if (lo, hi) == (32, 64):
            if wavefronts_per_simd == 20:
                return "amd-rdna1"
            if "VK_EXT_shader_float8" in extensions:
                return "amd-rdna4"
            return "amd-rdna3" if mixed_dot_accelerated else "amd-rdna2"
    elif vendor == "intel" and lo:
        return "intel-xe2" if lo >= 16 else "intel-xe1"
    elif vendor == "nvidia":
        if _EXT_COOPMAT not in extensions:
            return "nvidia-pre-turing"
        if warps_per_sm == 32:
            return "nvidia-turing"
    return "other"


def vendor_name(vendor_id: int) -> str:
    """Short vendor name for a PCI / Khronos vendor id.

    ``"nvidia"``, ``"amd"``, ``"intel"``, ``"apple"``, ``"mesa"`` (0x10005: lavapipe/llvmpipe),
    ``"arm"``, ``"qualcomm"``, a few others, or the id in hex (``"0x1af4"``) when unknown.
    """
    return _VENDORS.get(int(vendor_id), f"0x{int(vendor_id):04x}")


# --- result type ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceCaps:
    """What one Vulkan physical device can do, as far as attention kernels care.

    ``index`` is the device's position in ``vkEnumeratePhysicalDevices`` (= ``kp.Manager(index)``).
    ``driver_id`` is the ``VkDriverId`` (0: unknown; :func:`driver_id_name` names it), ``os`` the
    host's ``platform.system()`` in lower case (``"linux"``, ``"windows"``, ``"darwin"``) and
    ``architecture`` the GPU generation (:func:`detect_architecture`): what the driver-trap table
    (aule_kp/vulkan/workarounds.py) matches on. Sizes are in bytes. ``subgroup_size`` is 0 when the
    driver is Vulkan 1.0 and cannot say.
    ``coopmat_shapes`` holds ``(M, N, K, a_type, b_type, c_type, result_type, scope)`` tuples with short
    type names (``"f16"``, ``"f32"``, ``"bf16"``, ``"s8"``, ``"s32"``, ``"u8"``, ...) and scope names
    (``"subgroup"``, ``"workgroup"``, ...), duplicates (differing only in saturating accumulation) removed.
    """

    index: int
    name: str
    vendor: str
    vendor_id: int
    device_id: int
    type: str
    api_version: str
    driver_name: str
    driver_info: str
    driver_version: int
    uuid: str
    subgroup_size: int
    min_subgroup_size: int
    max_subgroup_size: int
    subgroup_shuffle: bool
    subgroup_arithmetic: bool
    shared_memory: int
    max_storage_buffer_range: int
    max_workgroup_invocations: int
    max_workgroup_count: tuple[int, int, int]
    max_push_constants: int
    fp16: bool
    int8: bool
    coopmat: bool
    coopmat_shapes: tuple[tuple[Any, ...], ...]
    coopmat2: bool
    host_visible_device_memory: bool
    host_visible_device_heap: int = 0  # bytes of the largest heap with device-local host-visible memory
    extensions: frozenset[str] = field(default_factory=frozenset)
    driver_id: int = 0
    os: str = ""
    architecture: str = "other"

    def driver_version_text(self) -> str:
        """``driver_version`` decoded the way the vendor packs it (NVIDIA 10.8.8.6 bits, Intel's
        Windows driver 18.14 bits, others Vulkan's major.minor.patch)."""
        v = self.driver_version
        if self.vendor == "nvidia":
            return f"{v >> 22}.{(v >> 14) & 0xFF}.{(v >> 6) & 0xFF}.{v & 0x3F}"
        if self.vendor == "intel" and self.os == "windows":
            return f"{v >> 14}.{v & 0x3FFF}"
        return _version_str(v)

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable view (lists instead of tuples/sets, coopmat shapes as dicts)."""
        return {
            "index": self.index,
            "name": self.name,
            "vendor": self.vendor,
            "vendor_id": self.vendor_id,
            "device_id": self.device_id,
            "type": self.type,
            "api_version": self.api_version,
            "driver_name": self.driver_name,
            "driver_info": self.driver_info,
            "driver_version": self.driver_version,
            "uuid": self.uuid,
            "subgroup_size": self.subgroup_size,
            "min_subgroup_size": self.min_subgroup_size,
            "max_subgroup_size": self.max_subgroup_size,
            "subgroup_shuffle": self.subgroup_shuffle,
            "subgroup_arithmetic": self.subgroup_arithmetic,
            "shared_memory": self.shared_memory,
            "max_storage_buffer_range": self.max_storage_buffer_range,
            "max_workgroup_invocations": self.max_workgroup_invocations,
            "max_workgroup_count": list(self.max_workgroup_count),
            "max_push_constants": self.max_push_constants,
            "fp16": self.fp16,
            "int8": self.int8,
            "coopmat": self.coopmat,
            "coopmat_shapes": [
                dict(zip(("M", "N", "K", "a", "b", "c", "result", "scope"), shape))
                for shape in self.coopmat_shapes
            ],
            "coopmat2": self.coopmat2,
            "host_visible_device_memory": self.host_visible_device_memory,
            "host_visible_device_heap": self.host_visible_device_heap,
            "extensions": sorted(self.extensions),
            "driver_id": self.driver_id,
            "driver": driver_id_name(self.driver_id),
            "driver_version_text": self.driver_version_text(),
            "os": self.os,
            "architecture": self.architecture,
        }


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


# --- probing ----------------------------------------------------------------------------------------


class _ProbeFailure(RuntimeError):
    """A Vulkan call failed; the message is what :func:`probe_error` reports."""


def _result_name(result: int) -> str:
    return _RESULT_NAMES.get(int(result), f"VkResult {int(result)}")


def _check(result: int, what: str) -> None:
    # VK_INCOMPLETE is a success code: callers that enumerate loop on it themselves.
    if result not in (_VK_SUCCESS, _VK_INCOMPLETE):
        raise _ProbeFailure(f"{what} failed: {_result_name(result)}")


def _describe_vk_exception(exc: BaseException, what: str) -> str:
    # The binding's exception classes carry their name but an empty message.
    name = type(exc).__name__
    text = str(exc)
    msg = f"{what} failed: {name}" + (f" ({text})" if text else "")
    if name == "VkErrorIncompatibleDriver":
        msg += " - no usable Vulkan driver (ICD) is installed, or none supports the requested API version"
    elif name == "VkErrorInitializationFailed":
        msg += " - the Vulkan loader or a driver failed to initialise"
    return msg


def _cstr(ffi: Any, chars: Any) -> str:
    return ffi.string(chars).decode("utf-8", "replace")


def _enumerate(
    ffi: Any, ctype: str, call: Callable[[Any, Any], int], what: str, convert: Callable[[Any], Any]
) -> list[Any]:
    """Run a Vulkan two-call enumeration (retrying on VK_INCOMPLETE) and convert each item.

    Items are converted while their owning array is alive: a struct taken out of an ``ffi.new`` array
    does not keep the array's memory alive.
    """
    count = ffi.new("uint32_t*")
    for _ in range(8):
        _check(call(count, ffi.NULL), what)
        n = int(count[0])
        if n == 0:
            return []
        items = ffi.new(f"{ctype}[]", n)
        result = call(count, items)
        _check(result, what)
        if result == _VK_SUCCESS:
            return [convert(items[i]) for i in range(int(count[0]))]
    raise _ProbeFailure(f"{what} kept returning VK_INCOMPLETE")


class _Session:
    """One private VkInstance and everything read through it."""

    def __init__(self, vk: Any, max_api_version: int = _V1_3) -> None:
        self.vk = vk
        # Capping below 1.3 is for tests: it drives the Vulkan 1.0/1.1 code paths on a 1.3 driver.
        self.max_api_version = max_api_version
        self.ffi = vk.ffi
        self.lib = vk.lib
        self.instance: Any = None
        self.instance_version = _V1_0
        self.instance_extensions: set[str] = set()
        self.properties2_khr = False  # Vulkan 1.0 instance: use the KHR entry points instead of core
        self._get_props2: Callable[[Any, Any], Any] | None = None
        self._get_feats2: Callable[[Any, Any], Any] | None = None

    # -- instance ---------------------------------------------------------------------------------

    def create_instance(self) -> None:
        """Create the instance at the highest API version (<= 1.3) that the loader supports."""
        vk, ffi, lib = self.vk, self.ffi, self.lib
        try:
            version_fn = lib.vkEnumerateInstanceVersion
        except AttributeError:
            # A Vulkan 1.0 loader does not export it; asking such a loader for 1.1 fails outright.
            version_fn = None
        if version_fn is not None:
            p_version = ffi.new("uint32_t*")
            _check(version_fn(p_version), "vkEnumerateInstanceVersion")
            self.instance_version = min(int(p_version[0]) & ~0xFFF, self.max_api_version)

        self.instance_extensions = set(
            _enumerate(
                ffi,
                "VkExtensionProperties",
                lambda count, items: lib.vkEnumerateInstanceExtensionProperties(ffi.NULL, count, items),
                "vkEnumerateInstanceExtensionProperties",
                lambda p: _cstr(ffi, p.extensionName),
            )
        )

        wanted: list[str] = []
        flags = 0
        # MoltenVK and other non-conformant drivers are only listed with portability enumeration.
        if "VK_KHR_portability_enumeration" in self.instance_extensions:
            wanted.append("VK_KHR_portability_enumeration")
            flags |= _INSTANCE_CREATE_ENUMERATE_PORTABILITY
        props2_ext = "VK_KHR_get_physical_device_properties2"
        if self.instance_version < _V1_1 and props2_ext in self.instance_extensions:
            wanted.append(props2_ext)
            self.properties2_khr = True

        keep: list[Any] = []  # owners of every pointer stored in the create-info structs
        app = ffi.new("VkApplicationInfo*")
        app.sType = _ST_APPLICATION_INFO
        app_name = ffi.new("char[]", b"aule-kp probe")
        keep.append(app_name)
        app.pApplicationName = app_name
        app.pEngineName = app_name
        app.apiVersion = self.instance_version
        names = [ffi.new("char[]", n.encode()) for n in wanted]
        keep.extend(names)
        name_array = ffi.new("char*[]", names) if names else ffi.NULL
        keep.append(name_array)
        info = ffi.new("VkInstanceCreateInfo*")
        info.sType = _ST_INSTANCE_CREATE_INFO
        info.flags = flags
        info.pApplicationInfo = app
        info.enabledExtensionCount = len(names)
        info.ppEnabledExtensionNames = name_array

        try:
            self.instance = vk.vkCreateInstance(info, None)
        except vk.VkError as exc:
            raise _ProbeFailure(_describe_vk_exception(exc, "vkCreateInstance")) from exc

        if self.instance_version >= _V1_1:
            self._get_props2 = lib.vkGetPhysicalDeviceProperties2
            self._get_feats2 = lib.vkGetPhysicalDeviceFeatures2
        elif self.properties2_khr:
            self._get_props2 = self._instance_proc(
                "vkGetPhysicalDeviceProperties2KHR", "PFN_vkGetPhysicalDeviceProperties2"
            )
            self._get_feats2 = self._instance_proc(
                "vkGetPhysicalDeviceFeatures2KHR", "PFN_vkGetPhysicalDeviceFeatures2"
            )

    def _instance_proc(self, name: str, pfn_type: str) -> Any | None:
        """Raw function pointer from vkGetInstanceProcAddr, or None when the loader lacks it.

        The binding's own ``vkGetInstanceProcAddr`` wraps the pointer in helpers that skip details
        (e.g. the cooperative-matrix wrapper leaves each output struct's ``sType`` zero), so the raw
        pointer is cast here instead.
        """
        ptr = self.lib.vkGetInstanceProcAddr(self.instance, name.encode())
        if ptr == self.ffi.NULL:
            return None
        return self.ffi.cast(pfn_type, ptr)

    def destroy(self) -> None:
        """Destroy the instance (idempotent)."""
        if self.instance is not None:
            instance, self.instance = self.instance, None
            self.vk.vkDestroyInstance(instance, None)

    # -- devices ----------------------------------------------------------------------------------

    def physical_devices(self) -> list[Any]:
        """Physical devices in the loader's order (the order kp.Manager(index) sees)."""
        try:
            handles = self.vk.vkEnumeratePhysicalDevices(self.instance)
        except self.vk.VkError as exc:
            raise _ProbeFailure(_describe_vk_exception(exc, "vkEnumeratePhysicalDevices")) from exc
        return [handles[i] for i in range(len(handles))]

    def device_extensions(self, pd: Any) -> frozenset[str]:
        ffi, lib = self.ffi, self.lib
        return frozenset(
            _enumerate(
                ffi,
                "VkExtensionProperties",
                lambda count, items: lib.vkEnumerateDeviceExtensionProperties(pd, ffi.NULL, count, items),
                "vkEnumerateDeviceExtensionProperties",
                lambda p: _cstr(ffi, p.extensionName),
            )
        )

    def coopmat_shapes(self, pd: Any) -> tuple[tuple[Any, ...], ...]:
        """Cooperative-matrix shapes of VK_KHR_cooperative_matrix (caller checked the extension)."""
        ffi = self.ffi
        fn = self._instance_proc(
            "vkGetPhysicalDeviceCooperativeMatrixPropertiesKHR",
            "PFN_vkGetPhysicalDeviceCooperativeMatrixPropertiesKHR",
        )
        if fn is None:
            return ()
        count = ffi.new("uint32_t*")
        for _ in range(8):
            _check(fn(pd, count, ffi.NULL), "vkGetPhysicalDeviceCooperativeMatrixPropertiesKHR")
            n = int(count[0])
            if n == 0:
                return ()
            items = ffi.new("VkCooperativeMatrixPropertiesKHR[]", n)
            for i in range(n):  # output structs must carry their sType, the binding's wrapper skips it
                items[i].sType = _ST_COOPMAT_PROPERTIES_KHR
            result = fn(pd, count, items)
            _check(result, "vkGetPhysicalDeviceCooperativeMatrixPropertiesKHR")
            if result == _VK_SUCCESS:
                break
        else:
            raise _ProbeFailure(
                "vkGetPhysicalDeviceCooperativeMatrixPropertiesKHR kept returning VK_INCOMPLETE"
            )
        shapes: list[tuple[Any, ...]] = []
        for i in range(int(count[0])):
            p = items[i]
            shape = (
                int(p.MSize),
                int(p.NSize),
                int(p.KSize),
                _component(p.AType),
                _component(p.BType),
                _component(p.CType),
                _component(p.ResultType),
                _SCOPES.get(int(p.scope), str(int(p.scope))),
            )
            if shape not in shapes:
                shapes.append(shape)
        return tuple(shapes)

    def probe(self, index: int, pd: Any) -> DeviceCaps:
        """Read one device; falls back to core 1.0 queries when the chained ones are unavailable."""
        ffi, lib = self.ffi, self.lib
        base = ffi.new("VkPhysicalDeviceProperties*")
        lib.vkGetPhysicalDeviceProperties(pd, base)
        device_version = int(base.apiVersion)
        # Physical-device structs promoted to core need both the instance and the device at that version.
        version = min(device_version, self.instance_version)
        exts = self.device_extensions(pd)

        def allowed(core: int, extension: str | None = None) -> bool:
            return version >= core or (extension is not None and extension in exts)

        keep: list[Any] = []  # every struct of a pNext chain, alive until the query returns

        def chain(head: Any, ctype: str, stype: int) -> Any:
            s = ffi.new(f"{ctype}*")
            s.sType = stype
            s.pNext = head.pNext
            head.pNext = s
            keep.append(s)
            return s

        subgroup = ids = driver = size_ctl = amd_core = int_dot = sm_builtins = None
        if self._get_props2 is not None:
            props2 = ffi.new("VkPhysicalDeviceProperties2*")
            props2.sType = _ST_PROPERTIES_2
            keep.append(props2)
            if allowed(_V1_1):
                subgroup = chain(props2, "VkPhysicalDeviceSubgroupProperties", _ST_SUBGROUP_PROPERTIES)
                ids = chain(props2, "VkPhysicalDeviceIDProperties", _ST_ID_PROPERTIES)
            if allowed(_V1_2, "VK_KHR_driver_properties"):
                driver = chain(props2, "VkPhysicalDeviceDriverProperties", _ST_DRIVER_PROPERTIES)
            if allowed(_V1_3, "VK_EXT_subgroup_size_control"):
                size_ctl = chain(
                    props2,
                    "VkPhysicalDeviceSubgroupSizeControlProperties",
                    _ST_SUBGROUP_SIZE_CONTROL_PROPERTIES,
                )
            # The facts detect_architecture() needs, each only where its extension is advertised.
            if "VK_AMD_shader_core_properties" in exts:
                amd_core = chain(props2, "VkPhysicalDeviceShaderCorePropertiesAMD", _ST_SHADER_CORE_PROPERTIES_AMD)
            if allowed(_V1_3, "VK_KHR_shader_integer_dot_product"):
                int_dot = chain(props2, "VkPhysicalDeviceShaderIntegerDotProductProperties",
                                _ST_INTEGER_DOT_PRODUCT_PROPERTIES)
            if "VK_NV_shader_sm_builtins" in exts:
                sm_builtins = chain(props2, "VkPhysicalDeviceShaderSMBuiltinsPropertiesNV",
                                    _ST_SM_BUILTINS_PROPERTIES_NV)
            self._get_props2(pd, props2)
            props = props2.properties
        else:
            props = base[0]

        fp16 = int8 = coopmat = False
        if self._get_feats2 is not None:
            feats2 = ffi.new("VkPhysicalDeviceFeatures2*")
            feats2.sType = _ST_FEATURES_2
            keep.append(feats2)
            v11 = v12 = s16 = s8 = f16i8 = cm = None
            # Vulkan11/12Features may only be chained on a 1.2 device; older ones get the per-feature
            # structs, each only when core or its extension makes it known to the driver.
            if allowed(_V1_2):
                v11 = chain(feats2, "VkPhysicalDeviceVulkan11Features", _ST_VULKAN_1_1_FEATURES)
                v12 = chain(feats2, "VkPhysicalDeviceVulkan12Features", _ST_VULKAN_1_2_FEATURES)
            else:
                if allowed(_V1_1, "VK_KHR_16bit_storage"):
                    s16 = chain(feats2, "VkPhysicalDevice16BitStorageFeatures", _ST_16BIT_STORAGE_FEATURES)
                if "VK_KHR_8bit_storage" in exts:
                    s8 = chain(feats2, "VkPhysicalDevice8BitStorageFeatures", _ST_8BIT_STORAGE_FEATURES)
                if "VK_KHR_shader_float16_int8" in exts:
                    f16i8 = chain(
                        feats2, "VkPhysicalDeviceShaderFloat16Int8Features", _ST_FLOAT16_INT8_FEATURES
                    )
            if _EXT_COOPMAT in exts:
                cm = chain(feats2, "VkPhysicalDeviceCooperativeMatrixFeaturesKHR", _ST_COOPMAT_FEATURES_KHR)
            self._get_feats2(pd, feats2)
            if v11 is not None and v12 is not None:
                fp16 = bool(v12.shaderFloat16) and bool(v11.storageBuffer16BitAccess)
                int8 = bool(v12.shaderInt8) and bool(v12.storageBuffer8BitAccess)
            elif f16i8 is not None:
                fp16 = bool(f16i8.shaderFloat16) and s16 is not None and bool(s16.storageBuffer16BitAccess)
                int8 = bool(f16i8.shaderInt8) and s8 is not None and bool(s8.storageBuffer8BitAccess)
            coopmat = cm is not None and bool(cm.cooperativeMatrix)

        limits = props.limits
        wg_count = limits.maxComputeWorkGroupCount
        subgroup_size = int(subgroup.subgroupSize) if subgroup is not None else 0
        if size_ctl is not None and int(size_ctl.minSubgroupSize):
            min_sg, max_sg = int(size_ctl.minSubgroupSize), int(size_ctl.maxSubgroupSize)
        else:
            min_sg = max_sg = subgroup_size  # without size control only the default size is certain
        compute_ops = 0
        if subgroup is not None and int(subgroup.supportedStages) & _SHADER_STAGE_COMPUTE:
            compute_ops = int(subgroup.supportedOperations)

        memory = ffi.new("VkPhysicalDeviceMemoryProperties*")
        lib.vkGetPhysicalDeviceMemoryProperties(pd, memory)
        both = _MEMORY_DEVICE_LOCAL | _MEMORY_HOST_VISIBLE
        bar_heaps = [int(memory.memoryHeaps[int(memory.memoryTypes[i].heapIndex)].size)
                     for i in range(int(memory.memoryTypeCount))
                     if int(memory.memoryTypes[i].propertyFlags) & both == both]
        host_visible_device = bool(bar_heaps)

        vendor_id = int(props.vendorID)
        architecture = detect_architecture(
            vendor_id, exts,
            size_control=(min_sg, max_sg) if size_ctl is not None and int(size_ctl.minSubgroupSize) else (0, 0),
            wavefronts_per_simd=int(amd_core.wavefrontsPerSimd) if amd_core is not None else 0,
            mixed_dot_accelerated=int_dot is not None
            and bool(int_dot.integerDotProduct4x8BitPackedMixedSignednessAccelerated),
            warps_per_sm=int(sm_builtins.shaderWarpsPerSM) if sm_builtins is not None else 0,
        )
        result = DeviceCaps(
            index=index,
            name=_cstr(ffi, props.deviceName),
            vendor=vendor_name(vendor_id),
            vendor_id=vendor_id,
            device_id=int(props.deviceID),
            type=_DEVICE_TYPES.get(int(props.deviceType), "other"),
            api_version=_version_str(device_version),
            driver_name=_cstr(ffi, driver.driverName) if driver is not None else "",
            driver_info=_cstr(ffi, driver.driverInfo) if driver is not None else "",
            driver_version=int(props.driverVersion),
            uuid=bytes(ffi.buffer(ids.deviceUUID)).hex() if ids is not None else "",
            subgroup_size=subgroup_size,
            min_subgroup_size=min_sg,
            max_subgroup_size=max_sg,
            subgroup_shuffle=bool(compute_ops & _SUBGROUP_FEATURE_SHUFFLE),
            subgroup_arithmetic=bool(compute_ops & _SUBGROUP_FEATURE_ARITHMETIC),
            shared_memory=int(limits.maxComputeSharedMemorySize),
            max_storage_buffer_range=int(limits.maxStorageBufferRange),
            max_workgroup_invocations=int(limits.maxComputeWorkGroupInvocations),
            max_workgroup_count=(int(wg_count[0]), int(wg_count[1]), int(wg_count[2])),
            max_push_constants=int(limits.maxPushConstantsSize),
            fp16=fp16,
            int8=int8,
            coopmat=coopmat,
            coopmat_shapes=self.coopmat_shapes(pd) if coopmat else (),
            coopmat2=_EXT_COOPMAT2 in exts,
            host_visible_device_memory=host_visible_device,
            host_visible_device_heap=max(bar_heaps, default=0),
            extensions=exts,
            driver_id=int(driver.driverID) if driver is not None else 0,
            os=platform.system().lower(),
            architecture=architecture,
        )
        return result


def _component(value: Any) -> str:
    return _COMPONENT_TYPES.get(int(value), str(int(value)))


_lock = threading.Lock()


def _probe_all(max_api_version: int = _V1_3) -> tuple[tuple[DeviceCaps, ...], str | None]:
    """Probe every device now: (devices, error). Never raises."""
    try:
        import vulkan as vk  # lazy: the binding dlopens libvulkan at import time
    except Exception as exc:  # OSError without libvulkan.so.1, ImportError without the package, ...
        error = f"cannot load the Vulkan binding: {type(exc).__name__}: {exc}"
        logger.debug("Vulkan probe failed: %s", error)
        return (), error

    session = _Session(vk, max_api_version)
    devices: list[DeviceCaps] = []
    problems: list[str] = []
    try:
        session.create_instance()
        handles = session.physical_devices()
        if not handles:
            problems.append("the Vulkan loader reports no physical devices")
        for index, handle in enumerate(handles):
            try:
                devices.append(session.probe(index, handle))
            except Exception as exc:  # one odd driver must not hide the others
                problems.append(f"device {index}: {type(exc).__name__}: {exc}")
    except _ProbeFailure as exc:
        problems.append(str(exc))
    except Exception as exc:  # anything from the binding or the driver: report, never raise
        problems.append(f"Vulkan probe failed: {type(exc).__name__}: {exc}")
    finally:
        try:
            session.destroy()
        except Exception as exc:
            problems.append(f"vkDestroyInstance failed: {type(exc).__name__}: {exc}")

    error = "; ".join(problems) if problems else None
    if error:
        logger.debug("Vulkan probe: %s", error)
    return tuple(devices), error


@functools.lru_cache(maxsize=1)
def _probe_cached() -> tuple[tuple[DeviceCaps, ...], str | None]:
    """Probe once per process (creating a VkInstance costs milliseconds, more on real drivers)."""
    return _probe_all()


def probe_devices() -> list[DeviceCaps]:
    """Capabilities of every Vulkan physical device, in ``vkEnumeratePhysicalDevices`` order.

    Probed once per process (``probe_devices.cache_clear()`` forgets the result). Returns ``[]`` when
    Vulkan is unusable, and :func:`probe_error` then says why. A device whose probe fails is left out
    (and named in :func:`probe_error`); ``DeviceCaps.index`` stays its enumeration index.
    """
    with _lock:
        return list(_probe_cached()[0])


def probe_error() -> str | None:
    """Why probing failed or was incomplete (no binding, no loader, no ICD, a Vulkan error), else None."""
    with _lock:
        return _probe_cached()[1]


probe_devices.cache_clear = _probe_cached.cache_clear  # type: ignore[attr-defined]
