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
    softcap: float = 0.0,
    alibi_slopes: Any = None,
    sinks: Any = None,
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
        softcap: tanh soft-capping of the scores, ``softcap * tanh(s / softcap)``, after the scale
            and before ALiBi and the mask (flash-attn's); ``0.0`` = off.
        alibi_slopes: ALiBi slopes ``[Hq]`` or ``[B, Hq]`` (float, NumPy or torch): the bias
            ``-slope * |i + Lk - Lq - j|`` is added to the score of query ``i`` and key ``j``, as
            flash-attn does (constants: no gradient flows to them).
        sinks: attention sinks ``[Hq]`` (gpt-oss): one logit per query head that joins every row's
            softmax denominator and carries no value; a row that sees no key is still 0.
            Differentiable when a torch tensor that requires grad.

    Returns:
        ``[B, Hq, Lq, Dv]`` in q's type, dtype and device. A row that sees no key is 0. On torch
        tensors that require grad (with grad mode on) the result is differentiable in q, k, v, a
        float ``attn_mask`` and ``sinks`` on every backend (:class:`aule_kp.torch.FlashAttentionFunction`);
        there is no double backward.

    Raises:
        ValueError: bad shapes or values, or inputs whose host copies would not fit in memory.
        TypeError: bad types or dtypes.
        BackendUnavailable: a forced backend cannot take the problem (every reason listed).
    """
    precision = check_precision(precision)
    mods = dict(softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)
    if needs_grad(q, k, v, attn_mask, sinks):
        if precision != "fp":
            raise ValueError(f"precision={precision!r} is forward-only (no backward): call it under "
                             "torch.no_grad() or on tensors that do not require grad, or use precision='fp'")
        from .torch.ops import flash_attention as differentiable

        return differentiable(q, k, v, causal=causal, scale=scale, window=window, attn_mask=attn_mask,
                              backend=backend, **mods)
    out, _, _ = attention_forward(q, k, v, causal=causal, scale=scale, window=window, attn_mask=attn_mask,
                                  backend=backend, precision=precision, **mods)
    return out


def needs_grad(q: Any, k: Any, v: Any, attn_mask: Any, sinks: Any = None) -> bool:
    """Whether the call must record autograd: torch q, k and v, grad mode on, and one of them (or
    the mask, or the sinks) requires grad. Mixed types go to ``prepare``, which says what is wrong."""
    if not all(inputs.is_torch(x) for x in (q, k, v)):
        return False
    import torch

    tensors = (q, k, v) + tuple(x for x in (attn_mask, sinks) if inputs.is_torch(x))
    return torch.is_grad_enabled() and any(bool(getattr(x, "requires_grad", False)) for x in tensors)
