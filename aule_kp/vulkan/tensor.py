"""The zero-copy API: a Context on one device, GpuTensors that keep data there between calls."""

from __future__ import annotations

import itertools
import math
import numbers
import weakref
from typing import Any, Callable, Dict, Hashable, Optional, Sequence, Tuple, Union

import numpy as np

from .. import knobs
from ..dtypes import ITEMSIZE, STORAGE
from ..errors import BackendUnavailable
from ..inputs import check_causal, check_scale_window, check_shapes, check_torch_tensor, dtype_name, is_torch, to_host
from ..problem import Problem, band
from . import device as devmod
from . import tuning_cache
from .choice import choose_forward
from .kvcache import DeviceKVCache
from .plan import Plan, binding_limit, mapped_memory

_serial = itertools.count()
DTypeLike = Union[str, type, np.dtype]
_TORCH_DTYPES = {"torch.float32": "float32", "torch.float16": "float16", "torch.bfloat16": "bfloat16"}


def _dtype_name(dtype: DTypeLike) -> str:
    """Engine dtype name of a ``Context.tensor`` dtype; TypeError naming ``dtype`` otherwise."""
    expected = "dtype must be float32, float16 or 'bfloat16' (numpy or torch dtypes, or the string)"
    if isinstance(dtype, str) and dtype in ("bfloat16", "bf16"):
        return "bfloat16"
    if str(dtype) in _TORCH_DTYPES:
        return _TORCH_DTYPES[str(dtype)]
    if dtype is None:
        raise TypeError(f"{expected}, got None")
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{expected}, got {dtype!r}") from None
    names = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}
    if dt not in names:
        raise TypeError(f"{expected}, got {dt}")
    return names[dt]


def _shape(shape: Any) -> Tuple[int, ...]:
    """``shape`` as a tuple of ints >= 0 (an int alone is a 1-D shape); errors name ``shape``."""
    dims = (shape,) if isinstance(shape, numbers.Integral) else shape
    try:
        dims = tuple(dims)
    except TypeError:
        raise TypeError(f"shape must be a tuple of non-negative ints, got {shape!r}") from None
    if not all(isinstance(s, numbers.Integral) and not isinstance(s, (bool, np.bool_)) for s in dims):
        raise TypeError(f"shape must be a tuple of non-negative ints, got {shape!r}")
    if any(int(s) < 0 for s in dims):
        raise ValueError(f"shape must be non-negative, got {tuple(int(s) for s in dims)}")
    return tuple(int(s) for s in dims)


def _typed(x: Any) -> Any:
    """``x`` with its type and, for a tuple or list, its items' types: a memo key that tells apart
    equal values of different types."""
    items = tuple(_typed(item) for item in x) if isinstance(x, (tuple, list)) else x
    return type(x), items


class GpuTensor:
    """A tensor in device memory (packed like the kernels read it). Made by ``Context.tensor``.

    Data only: a GpuTensor records no autograd history and ``Context.attention`` is forward only
    (for gradients use :func:`aule_kp.flash_attention` on torch tensors). It lives until
    ``free()`` or until its Context is closed; after that every use raises ``ValueError``.
    """

    def __init__(self, ctx: Context, shape: Any, dtype: DTypeLike):
        self.shape: Tuple[int, ...] = _shape(shape)
        self.dtype_name = _dtype_name(dtype)
        self._ctx = ctx
        self.serial = next(_serial)
        nbytes = math.prod(self.shape) * ITEMSIZE[self.dtype_name]
        limit = binding_limit(ctx.device.caps.max_storage_buffer_range)
        if nbytes > limit:
            raise ValueError(f"a GpuTensor of shape {self.shape} needs {nbytes} B: over the device's {limit} B "
                             "storage binding limit")
        dev = ctx.device
        kp = dev.kp
        ttype = kp.TensorTypes.host if dev.host_memory else kp.TensorTypes.device
        with dev.lock:
            self.kp_tensor = dev.manager.tensor_t(np.zeros(max(1, math.ceil(nbytes / 4)), np.uint32), ttype)
            self._view = mapped_memory(self.kp_tensor).view(np.uint8)
            self._to_device = dev.manager.sequence().record(kp.OpTensorSyncDevice([self.kp_tensor]))
            self._to_host = dev.manager.sequence().record(kp.OpTensorSyncLocal([self.kp_tensor]))
        self.nbytes = nbytes

    @property
    def dtype(self) -> Any:
        """``np.float32``/``np.float16`` dtype, or the string ``"bfloat16"``."""
        return "bfloat16" if self.dtype_name == "bfloat16" else STORAGE[self.dtype_name]

    def _live(self, name: str = "this GpuTensor") -> None:
        """ValueError naming ``name`` when the tensor's Context is closed or it was freed."""
        if self._ctx.closed:
            raise ValueError(f"{name} belongs to a closed Context (its memory was freed by Context.close)")
        if self.kp_tensor is None:
            raise ValueError(f"{name} was freed (GpuTensor.free)")

    def upload(self, a: Any) -> GpuTensor:
        """Copies host data in: a NumPy array or torch tensor of this tensor's shape and dtype (bf16
        also as NumPy uint16 bit patterns). Errors name the array ``a``."""
        self._live()
        if isinstance(a, np.ndarray) and a.dtype == np.uint16 and self.dtype_name == "bfloat16":
            got = "bfloat16"
        else:
            got = dtype_name("a", a)
            if got != self.dtype_name:
                raise TypeError(f"upload: a must hold {self.dtype_name} data like this GpuTensor, got {got}")
        if is_torch(a):
            check_torch_tensor("a", a)
        if tuple(a.shape) != self.shape:
            raise ValueError(f"upload: a must have this GpuTensor's shape {self.shape}, got {tuple(a.shape)}")
        host = to_host(a, got)
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
        """Releases the device memory now (and any cached plan bound to it); idempotent."""
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
        state = "" if self.kp_tensor is not None else ", freed"
        return f"GpuTensor(shape={self.shape}, dtype={self.dtype_name}{state})"


class Context:
    """One Vulkan device for the zero-copy API; also a context manager that frees its tensors.

    Forward only: ``attention`` computes no gradients (use :func:`aule_kp.flash_attention` on torch
    tensors for training). After ``close()`` (or leaving the ``with`` block) the Context and its
    tensors raise ``ValueError`` on every use; ``close()`` itself may be called again.
    """

    def __init__(self, device: Optional[int] = None):
        why = devmod.vulkan_unavailable()
        if why:
            raise BackendUnavailable("vulkan", [why])
        self.device = devmod.get_device(device)
        self.closed = False
        self._tensors: weakref.WeakSet[Union[GpuTensor, DeviceKVCache]] = weakref.WeakSet()
        # Repeated calls on the same tensors and arguments skip validation and the kernel choice:
        # call signature -> (plan cache key, plan builder). Plans themselves stay in the device's LRU.
        self._calls: Dict[Hashable, Tuple[Hashable, Callable[[], Plan]]] = {}

    def _open(self) -> None:
        if self.closed:
            raise ValueError("this Context is closed (Context.close or the end of its with block)")

    def tensor(self, shape: Sequence[int], dtype: DTypeLike = np.float16) -> GpuTensor:
        """A new zero-filled GpuTensor of ``shape`` and ``dtype`` (float32, float16 or "bfloat16")."""
        self._open()
        t = GpuTensor(self, shape, dtype)
        self._tensors.add(t)
        return t

    def kv_cache(self, shape: Sequence[int], dtype: DTypeLike = np.float16, quantized: bool = False) -> DeviceKVCache:
        """A zero-filled K or V cache on this Context's device for
        :func:`aule_kp.flash_attention_with_kvcache`: ``[B, S, Hkv, D]``, or ``[num_blocks, page_size,
        Hkv, D]`` with a block table; of ``dtype`` (q's), or q8_0 with ``quantized`` (int8 and an fp16
        scale per 32 values, D a multiple of 32). Calls append to it and read it in place."""
        self._open()
        dims = _shape(shape)
        if len(dims) != 4:
            raise ValueError(f"shape must be 4-D [B, S, Hkv, D] or [num_blocks, page_size, Hkv, D], got {dims}")
        cache = DeviceKVCache(self.device, dims, _dtype_name(dtype), bool(quantized))
        self._tensors.add(cache)
        return cache

    def _own(self, name: str, t: Any) -> GpuTensor:
        """``t`` if it is a live GpuTensor of this Context; an error naming ``name`` otherwise."""
        if not isinstance(t, GpuTensor):
            raise TypeError(f"{name} must be a GpuTensor (from Context.tensor), got {type(t).__name__}")
        t._live(name)
        if t._ctx is not self:
            raise ValueError(f"{name} belongs to another Context; use tensors of the Context whose attention runs")
        return t

    def attention(self, q: GpuTensor, k: GpuTensor, v: GpuTensor, out: Optional[GpuTensor] = None, *,
                  causal: bool = False, scale: Optional[float] = None,
                  window: Optional[Tuple[int, int]] = None) -> GpuTensor:
        """FA2 forward on GpuTensors (shapes and semantics of ``aule_kp.flash_attention``); forward only.

        Pass ``out`` to reuse an output tensor (it must not be q, k or v): a repeated call on the
        same tensors and arguments then costs a dictionary lookup and one recorded dispatch (no
        allocation, no validation). A problem over a device limit (storage binding range, grid
        size, a CPU driver's loop limit) raises :class:`aule_kp.BackendUnavailable` naming it.
        """
        self._open()
        sig = None
        if isinstance(out, GpuTensor):
            # The tuning cache's generation: a tuned tile or a self-check verdict written since makes
            # the memoised plan stale (the choice is made again below).
            # The arguments with their types: 1 == True and (2.0, 1) == (2, 1), which validation refuses.
            sig = (getattr(q, "serial", None), getattr(k, "serial", None), getattr(v, "serial", None), out.serial,
                   _typed(causal), _typed(scale), _typed(window), knobs.current(), tuning_cache.generation())
            try:
                hit = self._calls.get(sig)
            except TypeError:  # an unhashable argument (a list window): validated below
                hit = sig = None
            if hit is not None and all(t.kp_tensor is not None for t in (q, k, v, out)):
                dev = self.device
                with dev.lock:
                    dev.plans.get(*hit).eval()
                return out
        for name, t in (("q", q), ("k", k), ("v", v)):
            self._own(name, t)
            if t.dtype_name != q.dtype_name:
                raise TypeError(f"q, k and v must have one dtype; q is {q.dtype_name}, {name} is {t.dtype_name}")
        check_causal(causal)
        b, hq, hkv, lq, lk, dk, dv = check_shapes(q, k, v)
        scale = check_scale_window(scale, window, dk)
        if out is not None:
            self._own("out", out)
            if out.shape != (b, hq, lq, dv) or out.dtype_name != q.dtype_name:
                raise ValueError(f"out must be a {q.dtype_name} GpuTensor of shape {(b, hq, lq, dv)}, got "
                                 f"{out.dtype_name} {out.shape}")
            if any(out is t for t in (q, k, v)):
                raise ValueError("out must not be q, k or v (the kernel reads them while it writes out)")
        diag, left, right = band(lq, lk, causal=bool(causal), window=window, top_left=False)
        problem = Problem(b, hq, hkv, lq, lk, dk, dv, q.dtype_name, scale, diag, left, right)
        if problem.empty or lk == 0:
            out = out if out is not None else self.tensor((b, hq, lq, dv), q.dtype)
            out.upload(np.zeros(out.shape, STORAGE[out.dtype_name]))
            return out
        dev = self.device
        cfg, reasons = choose_forward(dev.caps, problem, knobs.current(), whole=True)
        if cfg is None:
            raise BackendUnavailable("vulkan", list(reasons))
        out = out if out is not None else self.tensor((b, hq, lq, dv), q.dtype)
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
        """Frees every tensor of this Context; later uses of it or its tensors raise. Idempotent."""
        self.closed = True
        for t in list(self._tensors):
            t.free()
        self._tensors.clear()
        self._calls.clear()

    def __enter__(self) -> Context:
        self._open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
