"""Public entry point: ``flash_attention`` (validation and dispatch are ``aule_kp.call``'s)."""

from __future__ import annotations

from typing import Any, Optional, Tuple

from . import inputs
from .call import attention_forward
from .quant import check_precision


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
    precision: Optional[str] = None,
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
        precision: ``"fp"`` (default, also None): exact attention. ``"int8"``: SageAttention-style
            INT8 Q·Kᵀ (K smoothed by its per-channel mean, Q and K quantized per block of 64 rows,
            int32 accumulation, P·V in 16 bits with float32 accumulation; ``aule_kp.quant``), close
            to but not equal to the exact result; forward only, finite inputs only.

    Returns:
        ``[B, Hq, Lq, Dv]`` in q's type, dtype and device. A row that sees no key is 0. On torch
        tensors that require grad (with grad mode on) the result is differentiable in q, k, v and a
        float ``attn_mask`` on every backend (:class:`aule_kp.torch.FlashAttentionFunction`); there
        is no double backward.

    Raises:
        ValueError: bad shapes or values, or inputs whose host copies would not fit in memory.
        TypeError: bad types or dtypes.
        BackendUnavailable: a forced backend cannot take the problem (every reason listed).
    """
    precision = check_precision(precision)
    if _needs_grad(q, k, v, attn_mask):
        if precision != "fp":
            raise ValueError(f"precision={precision!r} is forward-only (no backward): call it under "
                             "torch.no_grad() or on tensors that do not require grad, or use precision='fp'")
        from .torch.ops import flash_attention as differentiable

        return differentiable(q, k, v, causal=causal, scale=scale, window=window, attn_mask=attn_mask,
                              backend=backend)
    out, _, _ = attention_forward(q, k, v, causal=causal, scale=scale, window=window, attn_mask=attn_mask,
                                  backend=backend, precision=precision)
    return out


def _needs_grad(q: Any, k: Any, v: Any, attn_mask: Any) -> bool:
    """Whether the call must record autograd: torch q, k and v, grad mode on, and one of them (or
    the mask) requires grad. Mixed types go to ``prepare``, which says what is wrong."""
    if not all(inputs.is_torch(x) for x in (q, k, v)):
        return False
    import torch

    tensors = (q, k, v, attn_mask) if inputs.is_torch(attn_mask) else (q, k, v)
    return torch.is_grad_enabled() and any(bool(getattr(x, "requires_grad", False)) for x in tensors)
