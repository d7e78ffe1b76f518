"""The zero-copy API: a Context on one device, GpuTensors that keep data there between calls."""

from __future__ import annotations

import itertools
import math
import os
import weakref
from typing import Any, Callable, Dict, Hashable, Optional, Sequence, Tuple, Union

import numpy as np

from ..dtypes import ITEMSIZE, STORAGE
from ..problem import Problem, band
from . import device as devmod
from .plan import Plan, binding_limit
from .splitkv import choose_forward

_serial = itertools.count()
DTypeLike = Union[str, type, np.dtype]


def _dtype_name(dtype: DTypeLike) -> str:
    if isinstance(dtype, str) and dtype in ("bfloat16", "bf16"):
        return "bfloat16"
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32, float16 or 'bfloat16', got {dtype!r}") from None
    names = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}
    if dt not in names:
        raise TypeError(f"dtype must be float32, float16 or 'bfloat16', got {dt}")
    return names[dt]


class GpuTensor:
    """A tensor in device memory (packed like the kernels read it). Made by ``Context.tensor``."""

    def __init__(self, ctx: Context, shape: Sequence[int], dtype: DTypeLike):
        if any(int(s) < 0 for s in shape):
            raise ValueError(f"shape must be non-negative, got {tuple(shape)}")
        self.shape: Tuple[int, ...] = tuple(int(s) for s in shape)
        self.dtype_name = _dtype_name(dtype)
        self._ctx = ctx
        self.serial = next(_serial)
        nbytes = math.prod(self.shape) * ITEMSIZE[self.dtype_name]
        limit = binding_limit(ctx.device.caps.max_storage_buffer_range)
        if nbytes > limit:
            raise ValueError(f"a GpuTensor of {nbytes} B is over the device's {limit} B storage binding limit")
        dev = ctx.device
        kp = dev.kp
        ttype = kp.TensorTypes.host if dev.host_memory else kp.TensorTypes.device
        with dev.lock:
            self.kp_tensor = dev.manager.tensor_t(np.zeros(max(1, math.ceil(nbytes / 4)), np.uint32), ttype)
            self._view = self.kp_tensor.data().view(np.uint8)
            self._to_device = dev.manager.sequence().record(kp.OpTensorSyncDevice([self.kp_tensor]))
            self._to_host = dev.manager.sequence().record(kp.OpTensorSyncLocal([self.kp_tensor]))
        self.nbytes = nbytes

    @property
    def dtype(self) -> Any:
        """``np.float32``/``np.float16`` dtype, or the string ``"bfloat16"``."""
        return "bfloat16" if self.dtype_name == "bfloat16" else STORAGE[self.dtype_name]

    def _live(self) -> None:
        if self.kp_tensor is None:
            raise ValueError("this GpuTensor was freed")

    def upload(self, a: Any) -> GpuTensor:
        """Copies host data in (NumPy, or bf16 as uint16 bits / torch CPU tensors of the same dtype)."""
        self._live()
        from ..api import _dtype_name as api_dtype
        from ..api import _to_host

        if isinstance(a, np.ndarray) and a.dtype == np.uint16 and self.dtype_name == "bfloat16":
            host = np.ascontiguousarray(a)
        else:
            got = api_dtype("a", a)
            if got != self.dtype_name:
                raise TypeError(f"upload expects {self.dtype_name} data, got {got}")
            host = _to_host(a, got)
        if tuple(host.shape) != self.shape:
            raise ValueError(f"upload expects shape {self.shape}, got {tuple(host.shape)}")
        with self._ctx.device.lock:
            self._view[: self.nbytes] = host.reshape(-1).view(np.uint8)
            self._to_device.eval()
        return self

    def download(self) -> np.ndarray:
        """A host copy (bf16 comes back as uint16 bit patterns)."""
        self._live()
        with self._ctx.device.lock:
            self._to_host.eval()
            raw = self._view[: self.nbytes].copy()
        return raw.view(STORAGE[self.dtype_name]).reshape(self.shape)

    def free(self) -> None:
        """Releases the device memory now (and any cached plan bound to it)."""
        if self.kp_tensor is None:
            return
        dev = self._ctx.device
        with dev.lock:
            dev.plans.drop(lambda key: isinstance(key, tuple) and key[0] == "io" and self.serial in key[3:])
            for seq in (self._to_device, self._to_host):
                seq.destroy()
            self.kp_tensor.destroy()
        self.kp_tensor = None

    def __repr__(self) -> str:
        return f"GpuTensor(shape={self.shape}, dtype={self.dtype_name})"


class Context:
    """One Vulkan device for the zero-copy API; also a context manager that frees its tensors."""

    def __init__(self, device: Optional[int] = None):
        why = devmod.vulkan_unavailable()
        if why:
            from ..errors import BackendUnavailable

            raise BackendUnavailable("vulkan", [why])
        self.device = devmod.get_device(device)
        self._tensors: weakref.WeakSet[GpuTensor] = weakref.WeakSet()
        # Repeated calls on the same tensors and arguments skip validation and the kernel choice:
        # call signature -> (plan cache key, plan builder). Plans themselves stay in the device's LRU.
        self._calls: Dict[Hashable, Tuple[Hashable, Callable[[], Plan]]] = {}

    def tensor(self, shape: Sequence[int], dtype: DTypeLike = np.float16) -> GpuTensor:
        """A new zero-filled GpuTensor."""
        t = GpuTensor(self, shape, dtype)
        self._tensors.add(t)
        return t

    def attention(self, q: GpuTensor, k: GpuTensor, v: GpuTensor, out: Optional[GpuTensor] = None, *,
                  causal: bool = False, scale: Optional[float] = None,
                  window: Optional[Tuple[int, int]] = None) -> GpuTensor:
        """FA2 forward on GpuTensors (shapes and semantics of ``aule_kp.flash_attention``).

        Pass ``out`` to reuse an output tensor: a repeated call on the same tensors and arguments
        then costs a dictionary lookup and one recorded dispatch (no allocation, no validation).
        """
        sig = None
        if isinstance(out, GpuTensor):
            sig = (getattr(q, "serial", None), getattr(k, "serial", None), getattr(v, "serial", None), out.serial,
                   bool(causal), scale, window, os.environ.get("AULE_KP_SPLIT_KV"),
                   os.environ.get("AULE_KP_FORCE_VARIANT"))
            hit = self._calls.get(sig)
            if hit is not None and all(t.kp_tensor is not None for t in (q, k, v, out)):
                dev = self.device
                with dev.lock:
                    dev.plans.get(*hit).eval()
                return out
        from ..api import _check_scale_window, _check_shapes

        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, GpuTensor):
                raise TypeError(f"{name} must be a GpuTensor, got {type(t).__name__}")
            t._live()
            if t.dtype_name != q.dtype_name:
                raise TypeError(f"q, k and v must have one dtype; q is {q.dtype_name}, {name} is {t.dtype_name}")
        b, hq, hkv, lq, lk, dk, dv = _check_shapes(q, k, v)
        scale = _check_scale_window(scale, window, dk)
        if out is None:
            out = self.tensor((b, hq, lq, dv), q.dtype)
        elif not isinstance(out, GpuTensor) or out.shape != (b, hq, lq, dv) or out.dtype_name != q.dtype_name:
            raise ValueError(f"out must be a {q.dtype_name} GpuTensor of shape {(b, hq, lq, dv)}")
        out._live()
        diag, left, right = band(lq, lk, causal=bool(causal), window=window, top_left=False)
        problem = Problem(b, hq, hkv, lq, lk, dk, dv, q.dtype_name, scale, diag, left, right)
        if problem.empty or lk == 0:
            out.upload(np.zeros(out.shape, STORAGE[out.dtype_name]))
            return out
        dev = self.device
        cfg = choose_forward(dev.caps, problem)
        key = ("io", problem, cfg, q.serial, k.serial, v.serial, out.serial)
        io = (q.kp_tensor, k.kp_tensor, v.kp_tensor, out.kp_tensor)

        def build() -> Plan:
            return Plan(dev, problem, cfg, io=io)

        with dev.lock:
            dev.plans.get(key, build).eval()
        if sig is not None:
            if len(self._calls) >= 1024:
                self._calls.clear()
            self._calls[sig] = (key, build)
        return out

    def close(self) -> None:
        for t in list(self._tensors):
            t.free()
        self._tensors.clear()

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
