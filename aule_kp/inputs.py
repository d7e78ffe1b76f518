"""Input checks and conversions shared by every entry point (``api``, ``torch.ops``, ``vulkan.tensor``).

Every error names the argument and what was expected. Nothing here picks a backend or computes:
these helpers turn NumPy arrays and torch tensors into the engine's host form (contiguous arrays in
storage dtype, bf16 as uint16 bits), and check sizes *before* anything is copied, so that a broadcast
view of hundreds of GiB is refused with its name and size instead of failing inside an allocation.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, Iterable, Optional, Tuple

import numpy as np

from .problem import MAX_HEAD_DIM, default_scale

NUMPY_DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}
TORCH_DTYPES = ("float32", "float16", "bfloat16")
SHAPES = {"q": "[B, Hq, Lq, Dk]", "k": "[B, Hkv, Lk, Dk]", "v": "[B, Hkv, Lk, Dv]"}
#: Largest |scale| and soft-cap: the kernels compute in float32, with these times log2(e) (float32's
#: largest value is 3.4e38); beyond it the Vulkan backend failed to pack them and the CPU one returned NaN.
MAX_SCALE = 1e38


def is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def dtype_name(name: str, x: Any) -> str:
    """Engine dtype name of an array/tensor, or TypeError naming the argument."""
    if is_torch(x):
        dt = str(x.dtype).replace("torch.", "")
        if dt in TORCH_DTYPES:
            return dt
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got torch.{dt}")
    if isinstance(x, np.ndarray):
        if x.dtype in NUMPY_DTYPES:
            return NUMPY_DTYPES[x.dtype]
        raise TypeError(f"{name} must be float32 or float16, got numpy {x.dtype}")
    raise TypeError(f"{name} must be a numpy.ndarray or torch.Tensor, got {type(x).__name__}")


def check_torch_tensor(name: str, x: Any) -> None:
    """TypeError/ValueError naming ``name`` for torch tensors the engine cannot read: sparse or
    nested layouts and the data-less ``meta`` device."""
    if getattr(x, "is_nested", False):
        raise TypeError(f"{name} must be a dense (strided) torch.Tensor, got a nested tensor")
    if str(getattr(x, "layout", "torch.strided")) != "torch.strided":
        raise TypeError(f"{name} must be a dense (strided) torch.Tensor, got layout {x.layout}")
    if x.device.type == "meta":
        raise ValueError(f"{name} is on the 'meta' device, which holds no data; pass a tensor with data "
                         "(cpu, cuda, ...)")


def check_causal(causal: Any) -> None:
    """TypeError naming ``causal`` unless it is a bool."""
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")


def check_types(q: Any, k: Any, v: Any) -> str:
    """The engine dtype of q, k and v; TypeError/ValueError naming the argument that does not fit
    (not an array or tensor, a dtype the engine lacks, mixed types or dtypes, torch tensors that
    hold no data or live on different devices)."""
    dtype = dtype_name("q", q)
    for name, x in (("k", k), ("v", v)):
        other = dtype_name(name, x)
        if other != dtype or is_torch(x) != is_torch(q):
            raise TypeError(f"q, k and v must have one type and dtype; q is {dtype}, {name} is {other}"
                            + ("" if is_torch(x) == is_torch(q) else " (mixing numpy and torch)"))
    if is_torch(q):
        for name, x in (("q", q), ("k", k), ("v", v)):
            check_torch_tensor(name, x)
        for name, x in (("k", k), ("v", v)):
            if x.device != q.device:
                raise ValueError(f"q, k and v must be on one device; q is on {q.device}, {name} on {x.device}")
    return dtype


def check_shapes(q: Any, k: Any, v: Any) -> Tuple[int, int, int, int, int, int, int]:
    """``(B, Hq, Hkv, Lq, Lk, Dk, Dv)``; ValueError naming the argument whose shape does not fit."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if len(x.shape) != 4:
            raise ValueError(f"{name} must be 4-D {SHAPES[name]}, got shape {tuple(x.shape)}")
    b, hq, lq, dk = (int(s) for s in q.shape)
    bk, hkv, lk, dk2 = (int(s) for s in k.shape)
    bv, hkv2, lk2, dv = (int(s) for s in v.shape)
    if bk != b or bv != b:
        raise ValueError(f"batch sizes differ: q {b}, k {bk}, v {bv}")
    if dk2 != dk:
        raise ValueError(f"k's head dim ({dk2}) must equal q's ({dk})")
    if hkv2 != hkv or lk2 != lk:
        raise ValueError(f"k [B, Hkv, Lk, Dk] and v [B, Hkv, Lk, Dv] must agree on Hkv and Lk, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q's heads ({hq}) must be a multiple of k/v's heads ({hkv})")
    for name, d in (("Dk (q/k head dim)", dk), ("Dv (v head dim)", dv)):
        if d % 8 or not 0 < d <= MAX_HEAD_DIM:
            raise ValueError(f"{name} must be a multiple of 8 in [8, {MAX_HEAD_DIM}], got {d}")
    return b, hq, hkv, lq, lk, dk, dv


def check_scale_window(scale: Optional[float], window: Any, dk: int) -> float:
    """The scale to use; ValueError for a non-finite scale or a malformed window."""
    if window is not None and (
        not isinstance(window, (tuple, list)) or len(window) != 2
        or not all(isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= -1 for w in window)
    ):
        raise ValueError(f"window must be (left, right) integers >= -1 (-1 = unbounded), got {window!r}")
    if scale is None:
        return default_scale(dk)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not abs(scale) <= MAX_SCALE:
        raise ValueError(f"scale must be a finite number of magnitude at most {MAX_SCALE:g} (the kernels "
                         f"compute in float32), got {scale!r}")
    return float(scale)


def _strides(x: Any) -> Tuple[int, ...]:
    return tuple(x.stride()) if is_torch(x) else tuple(x.strides)


def shared_kv_head(k: Any, v: Any) -> Tuple[Any, Any]:
    """``(k, v)`` with one kv head when both are broadcast over their head axis (stride 0, e.g.
    ``k1.expand(B, Hq, L, D)`` of one head): the kernels read one head for all query heads in place
    (MQA), the same result without materialising the copies. Otherwise ``(k, v)`` unchanged."""
    if int(k.shape[1]) > 1 and _strides(k)[1] == 0 and _strides(v)[1] == 0:
        return k[:, :1], v[:, :1]
    return k, v


def collapse_broadcast(x: Any) -> Any:
    """``x`` with every stride-0 axis of size > 1 cut to size 1 (a mask that broadcasts anyway)."""
    cut = [st == 0 and n > 1 for n, st in zip(x.shape, _strides(x))]
    return x[tuple(slice(0, 1) if c else slice(None) for c in cut)] if any(cut) else x


def host_copy_bytes(x: Any) -> int:
    """Bytes ``to_host`` allocates for ``x`` (0 when it reads x's memory as it is)."""
    n = math.prod(int(s) for s in x.shape) * int(x.element_size() if is_torch(x) else x.itemsize)
    if is_torch(x):
        return 0 if x.device.type == "cpu" and x.is_contiguous() else n
    return 0 if x.flags.c_contiguous else n


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def available_memory() -> Optional[int]:
    """Host memory a call may allocate now (``MemAvailable`` on Linux, free physical pages elsewhere);
    None when the system does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


#: Calls that allocate less than this skip the memory check: reading /proc/meminfo costs ~20 us, a
#: sizeable part of a small call, and an allocation this small fails only on a machine out of memory.
CHECK_MEMORY_FROM = 64 << 20


def check_memory(needs: Iterable[Tuple[str, int]]) -> None:
    """ValueError (before anything is allocated) when the host copies and results of a call,
    ``(what, bytes)`` each, need more memory than is available; the message names each part."""
    parts = [(what, n) for what, n in needs if n > 0]
    total = sum(n for _, n in parts)
    free = available_memory() if total >= CHECK_MEMORY_FROM else None
    if free is not None and total > free:
        listed = ", ".join(f"{what} {_gib(n)}" for what, n in sorted(parts, key=lambda p: -p[1]))
        raise ValueError(f"this call needs {_gib(total)} ({total} B) of host memory ({listed}), but only "
                         f"{_gib(free)} is available: use smaller inputs (a broadcast view is copied unless it "
                         "is k/v broadcast over heads)")


def to_host(x: Any, dtype: str) -> np.ndarray:
    """Contiguous host array in engine storage (bf16 as uint16 bits). Copies only when needed."""
    if is_torch(x):
        t = x.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if dtype == "bfloat16":
            import torch

            t = t.contiguous().view(torch.int16)
            return t.numpy().view(np.uint16)
        return np.ascontiguousarray(t.contiguous().numpy())
    return np.ascontiguousarray(x)


def from_host(out: np.ndarray, like: Any, dtype: str) -> Any:
    """The result in the type, dtype and device of ``like`` (q)."""
    if not is_torch(like):
        return out
    import torch

    if dtype == "bfloat16":
        t = torch.from_numpy(out.view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(out)
    return t.to(like.device) if like.device.type != "cpu" else t


def mask_view(attn_mask: Any, target: Tuple[int, int, int, int], collapse: bool = True) -> Tuple[Any, bool]:
    """``(mask, is_bool)``: ``attn_mask`` checked against ``target = (B, Hq, Lq, Lk)``, as a 4-D view
    (NumPy or torch), with its broadcast (stride-0) axes cut to size 1 when ``collapse``. Nothing is copied."""
    if is_torch(attn_mask):
        check_torch_tensor("attn_mask", attn_mask)
        is_bool = str(attn_mask.dtype) == "torch.bool"
        if not is_bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")
    elif isinstance(attn_mask, np.ndarray):
        is_bool = attn_mask.dtype == np.bool_
        if not is_bool and attn_mask.dtype.kind != "f":
            raise TypeError(f"attn_mask must be bool or floating point, got numpy {attn_mask.dtype}")
    else:
        raise TypeError(f"attn_mask must be a numpy.ndarray or torch.Tensor, got {type(attn_mask).__name__}")
    shape = tuple(int(s) for s in attn_mask.shape)
    if len(shape) > 4 or any(s not in (1, t) for s, t in zip(shape[::-1], target[::-1])):
        raise ValueError(f"attn_mask of shape {shape} does not broadcast to [B, Hq, Lq, Lk] = {target}")
    mask = attn_mask.reshape((1,) * (4 - len(shape)) + shape)
    return (collapse_broadcast(mask) if collapse else mask), is_bool


def mask_to_additive(mask: Any, is_bool: bool) -> np.ndarray:
    """A ``mask_view`` result as the float32 additive mask (0 / -inf for bool), same shape. Finite
    values beyond float32's range (a float64 mask) saturate at its largest magnitude, as the kernels
    saturate scores: float64's minimum masks a key as float32's does (a row it masks entirely is a
    uniform average, as in torch) instead of hiding it, and a huge positive value does not become
    +inf (which makes the row NaN)."""
    if is_torch(mask):
        m = mask.detach().cpu()
        mask = m.numpy() if is_bool or m.element_size() > 4 else m.float().numpy()
    if is_bool:
        return np.where(mask, np.float32(0), np.float32(-np.inf))
    with np.errstate(over="ignore"):
        additive = np.ascontiguousarray(mask, dtype=np.float32)
    if mask.dtype.itemsize > 4 and not np.isfinite(additive).all():
        overflowed = np.isinf(additive) & np.isfinite(mask)
        additive[overflowed] = np.copysign(np.finfo(np.float32).max, mask[overflowed])
    return additive
