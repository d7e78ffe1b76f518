"""Public entry points: validate and normalise inputs into a Problem, dispatch, convert back."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np

from . import dispatch
from .backend import Backend
from .dtypes import STORAGE
from .problem import MAX_HEAD_DIM, Problem, band, default_scale

_NUMPY_DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}
_TORCH_DTYPES = ("float32", "float16", "bfloat16")


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _dtype_name(name: str, x: Any) -> str:
    """Engine dtype name of an array/tensor, or TypeError naming the argument."""
    if _is_torch(x):
        dt = str(x.dtype).replace("torch.", "")
        if dt in _TORCH_DTYPES:
            return dt
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got torch.{dt}")
    if isinstance(x, np.ndarray):
        if x.dtype in _NUMPY_DTYPES:
            return _NUMPY_DTYPES[x.dtype]
        raise TypeError(f"{name} must be float32 or float16, got numpy {x.dtype}")
    raise TypeError(f"{name} must be a numpy.ndarray or torch.Tensor, got {type(x).__name__}")


def _to_host(x: Any, dtype: str) -> np.ndarray:
    """Contiguous host array in engine storage (bf16 as uint16 bits). Copies only when needed."""
    if _is_torch(x):
        t = x.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if dtype == "bfloat16":
            import torch

            t = t.contiguous().view(torch.int16)
            return t.numpy().view(np.uint16)
        return np.ascontiguousarray(t.contiguous().numpy())
    return np.ascontiguousarray(x)


def _from_host(out: np.ndarray, like: Any, dtype: str) -> Any:
    """The result in the type, dtype and device of ``like`` (q)."""
    if not _is_torch(like):
        return out
    import torch

    if dtype == "bfloat16":
        t = torch.from_numpy(out.view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(out)
    return t.to(like.device) if like.device.type != "cpu" else t


def _check_shapes(q: Any, k: Any, v: Any) -> Tuple[int, ...]:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if len(x.shape) != 4:
            letters = {"q": "[B, Hq, Lq, Dk]", "k": "[B, Hkv, Lk, Dk]", "v": "[B, Hkv, Lk, Dv]"}[name]
            raise ValueError(f"{name} must be 4-D {letters}, got shape {tuple(x.shape)}")
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


def _check_scale_window(scale: Optional[float], window: Any, dk: int) -> float:
    """The scale to use; ValueError for a non-finite scale or a malformed window."""
    if window is not None and (
        not isinstance(window, (tuple, list)) or len(window) != 2
        or not all(isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= -1 for w in window)
    ):
        raise ValueError(f"window must be (left, right) integers >= -1 (-1 = unbounded), got {window!r}")
    if scale is None:
        return default_scale(dk)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    return float(scale)


def _mask_to_additive(attn_mask: Any, b: int, hq: int, lq: int, lk: int) -> Tuple[np.ndarray, Tuple[int, ...]]:
    """float32 additive mask (0 / -inf for bool) with broadcast dims kept at size 1."""
    if _is_torch(attn_mask):
        m = attn_mask.detach().cpu()
        is_bool = str(m.dtype) == "torch.bool"
        if not is_bool and not m.is_floating_point():
            raise TypeError(f"attn_mask must be bool or floating point, got {m.dtype}")
        arr = m.numpy() if is_bool else m.float().numpy()
    elif isinstance(attn_mask, np.ndarray):
        arr = attn_mask
        is_bool = arr.dtype == np.bool_
        if not is_bool and arr.dtype.kind != "f":
            raise TypeError(f"attn_mask must be bool or floating point, got numpy {arr.dtype}")
    else:
        raise TypeError(f"attn_mask must be a numpy.ndarray or torch.Tensor, got {type(attn_mask).__name__}")
    target = (b, hq, lq, lk)
    if arr.ndim > 4 or any(s not in (1, t) for s, t in zip(arr.shape[::-1], target[::-1])):
        raise ValueError(f"attn_mask of shape {tuple(arr.shape)} does not broadcast to [B, Hq, Lq, Lk] = {target}")
    arr = arr.reshape((1,) * (4 - arr.ndim) + arr.shape)
    if is_bool:
        add = np.where(arr, np.float32(0), np.float32(-np.inf))
    else:
        add = np.ascontiguousarray(arr, dtype=np.float32)
    return add, tuple(int(s) for s in add.shape)


@dataclass
class Prepared:
    """A validated call: its Problem, the backend that runs it, and inputs in that backend's form.

    ``q``/``k``/``v`` are host arrays in engine storage, or contiguous torch tensors where they live
    for a ``native_torch`` backend; ``mask`` is the float32 additive mask (same form) or None.
    ``backend`` is None when the result is empty or trivially zero (no query, no key).
    """

    problem: Problem
    backend: Optional[Backend]
    q: Any
    k: Any
    v: Any
    mask: Any
    like: Any  # the caller's q: the result takes its type, dtype and device

    def forward(self) -> Tuple[Any, Any]:
        """``(out, lse)``: out in the type/dtype/device of the caller's q; lse float32 [B, Hq, Lq]."""
        p = self.problem
        if self.backend is None:
            out = np.zeros((p.batch, p.heads_q, p.len_q, p.dim_v), dtype=STORAGE[p.dtype])
            return _from_host(out, self.like, p.dtype), np.full((p.batch, p.heads_q, p.len_q), -np.inf, np.float32)
        out, lse = self.backend.forward(p, self.q, self.k, self.v, self.mask)
        return (out if self.backend.native_torch else _from_host(out, self.like, p.dtype)), lse


def prepare(
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    window: Optional[Tuple[int, int]] = None,
    attn_mask: Any = None,
    backend: str = "auto",
    top_left: bool = False,
) -> Prepared:
    """Validates and normalises one call (errors name the argument), and picks its backend."""
    if backend not in dispatch.BACKEND_NAMES:
        raise ValueError(f"backend must be one of {dispatch.BACKEND_NAMES}, got {backend!r}")
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    dtype = _dtype_name("q", q)
    for name, x in (("k", k), ("v", v)):
        other = _dtype_name(name, x)
        if other != dtype or _is_torch(x) != _is_torch(q):
            raise TypeError(f"q, k and v must have one type and dtype; q is {dtype}, {name} is {other}"
                            + ("" if _is_torch(x) == _is_torch(q) else " (mixing numpy and torch)"))
    b, hq, hkv, lq, lk, dk, dv = _check_shapes(q, k, v)
    scale = _check_scale_window(scale, window, dk)
    diag, left, right = band(lq, lk, causal=bool(causal), window=window, top_left=top_left)
    mask, mask_shape = (None, None)
    if attn_mask is not None:
        mask, mask_shape = _mask_to_additive(attn_mask, b, hq, lq, lk)
    device = q.device.type if _is_torch(q) else None
    problem = Problem(b, hq, hkv, lq, lk, dk, dv, dtype, float(scale), diag, left, right, mask_shape, device)
    if problem.empty or lk == 0:
        return Prepared(problem, None, None, None, None, None, q)
    chosen = dispatch.select(problem, backend)
    if chosen.native_torch:
        import torch

        if mask is not None:
            mask = torch.from_numpy(mask).to(q.device)
        return Prepared(problem, chosen, q.contiguous(), k.contiguous(), v.contiguous(), mask, q)
    return Prepared(problem, chosen, _to_host(q, dtype), _to_host(k, dtype), _to_host(v, dtype), mask, q)


def attention_forward(q: Any, k: Any, v: Any, **options: Any) -> Tuple[Any, Any, Problem]:
    """Validated forward pass: ``(out, lse, problem)``; options as ``prepare``."""
    call = prepare(q, k, v, **options)
    out, lse = call.forward()
    return out, lse, call.problem


def flash_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    window: Optional[Tuple[int, int]] = None,
    attn_mask: Any = None,
    backend: str = "auto",
) -> Any:
    """Exact attention ``softmax(q kᵀ · scale + mask) v`` (FlashAttention-2 semantics).

    Args:
        q: ``[B, Hq, Lq, Dk]``; k: ``[B, Hkv, Lk, Dk]``; v: ``[B, Hkv, Lk, Dv]`` with ``Hq % Hkv == 0``.
            NumPy (float32/float16) or torch (float32/float16/bfloat16), all of one type and dtype.
        causal: hide keys after the query's diagonal, aligned bottom-right (query ``i`` sees keys
            ``j <= i + Lk - Lq``), as flash-attn.
        scale: score scale, default ``1/sqrt(Dk)``.
        window: ``(left, right)`` sliding window around the diagonal, ``-1`` = unbounded.
        attn_mask: bool (True = attend) or float (added to scores), broadcastable to ``[B, Hq, Lq, Lk]``.
        backend: ``"auto" | "vulkan" | "triton" | "cpu"``.

    Returns:
        ``[B, Hq, Lq, Dv]`` in q's type, dtype and device. A row that sees no key is 0.

    Raises:
        ValueError: bad shapes or values. TypeError: bad types or dtypes.
        BackendUnavailable: a forced backend cannot take the problem (every reason listed).
    """
    out, _, _ = attention_forward(q, k, v, causal=causal, scale=scale, window=window, attn_mask=attn_mask,
                                  backend=backend)
    return out
