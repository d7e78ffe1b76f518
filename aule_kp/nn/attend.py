"""The attention call under every layer: aule-kp's kernels (``backend`` vulkan, triton, cpu or auto,
differentiable through :class:`aule_kp.torch.FlashAttentionFunction`) or torch's SDPA ("torch")."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..backend import BACKEND_NAMES
from ..errors import warn_once
from ..quant import check_precision
from ..torch.sdpa import state
from .positions import RotarySpec

#: ``backend=`` values of the layers: aule-kp's (see :data:`aule_kp.backend.BACKEND_NAMES`) and torch SDPA.
LAYER_BACKENDS = (*BACKEND_NAMES, "torch")
#: Layer backends whose inference calls may rotate q and k inside the attention
#: (``Backend.bind_rotary``); Triton rotates in its kernels' loads (:func:`_triton_rotary`), training
#: calls included; the others rotate in torch without asking.
FUSED_ROTARY_BACKENDS = ("auto", "vulkan")


def check_layer_backend(backend: Any) -> str:
    """``backend`` when a layer takes it; ValueError naming ``backend`` otherwise."""
    if backend not in LAYER_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, LAYER_BACKENDS))}, got {backend!r}")
    return backend


def _as_4d(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A mask of rank <= 4 as a rank-4 view (leading axes of size 1)."""
    if mask is None:
        return None
    if mask.dim() > 4:
        raise ValueError(f"attn_mask must have at most 4 dims, got shape {tuple(mask.shape)}")
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))


def _band_mask(len_q: int, len_k: int, top_left: bool, device: torch.device) -> torch.Tensor:
    """bool ``[Lq, Lk]``, True = visible, of a causal band aligned top-left or bottom-right."""
    offset = 0 if top_left else len_k - len_q
    return torch.ones(len_q, len_k, dtype=torch.bool, device=device).tril(offset)


def _torch_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], causal: bool,
                top_left: bool, scale: float, dropout_p: float) -> torch.Tensor:
    """torch SDPA with aule-kp's conventions: rows that see no key give 0, bottom-right causal."""
    len_q, len_k = q.shape[-2], k.shape[-2]
    if causal and not (top_left or len_q == len_k):
        band = _band_mask(len_q, len_k, False, q.device)
        mask = band if mask is None else (mask & band if mask.dtype == torch.bool
                                           else mask.masked_fill(~band, float("-inf")))
        causal = False
    gqa = q.shape[1] != k.shape[1]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, scale=scale,
                                         enable_gqa=gqa)
    # torch gives NaN where a row sees no key; aule-kp (and this layer on every backend) gives 0.
    return torch.nan_to_num(out, nan=0.0) if mask is not None else out


def _needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _runs_on_triton(q: torch.Tensor, backend: str) -> bool:
    """Whether this call runs on the Triton backend: named, or ``auto`` on a device tensor where
    Triton is available (the dispatcher's first choice there, ``aule_kp.dispatch.PRIORITY``)."""
    if backend == "triton":
        return True
    if backend != "auto" or q.device.type == "cpu":
        return False
    from .. import dispatch

    return not dispatch.get("triton").unavailable_reasons()


def _triton_rotary(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary: RotarySpec, scale: float,
                   causal: bool, top_left: bool, mask: Optional[torch.Tensor], backend: str, dropout_p: float,
                   precision: str) -> Optional[torch.Tensor]:
    """The attention with RoPE fused into the Triton kernels' loads (:func:`aule_kp.triton.rotary.
    rotary_attention`, differentiable in q, k, v), or None where it does not apply: another backend,
    dropout, int8, k already rotated, or a mask that needs its gradient (the caller rotates in torch).
    The layers' specs carry positions they made or checked (``RotarySpec.in_range``: not read back
    again, a sync per layer and step) and their tables' float32 copies (not converted per call)."""
    if (not _runs_on_triton(q, backend) or dropout_p > 0 or precision != "fp" or rotary.k_positions is None
            or (mask is not None and mask.requires_grad and torch.is_grad_enabled())):
        return None
    from ..triton.rotary import attend_rotary

    cos, sin = rotary.kernel_tables(q.device)
    out, _ = attend_rotary(q, k, v, cos=cos, sin=sin, q_positions=rotary.q_positions.to(q.device),
                           k_positions=rotary.k_positions.to(q.device), positions_in_range=bool(rotary.in_range),
                           interleaved=rotary.interleaved, rotary_start=rotary.offset, causal=causal,
                           top_left=top_left, scale=scale, attn_mask=mask)
    return out


def _fused_rotary(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary: RotarySpec, scale: float, causal: bool,
                  top_left: bool, mask: Optional[torch.Tensor], backend: str, dropout_p: float,
                  precision: str) -> Optional[torch.Tensor]:
    """The attention with q and k rotated by the backend's fused kernel (inference calls on a
    backend that has one), or None: the caller rotates in torch. The one place the layers reach
    fused rotations through (``call.prepare(rotary=)`` asks the chosen backend's ``bind_rotary``)."""
    if backend not in FUSED_ROTARY_BACKENDS or dropout_p > 0 or _needs_grad(q, k, v, mask):
        return None
    from ..call import attention_forward

    result = attention_forward(q, k, v, causal=bool(causal), scale=float(scale), attn_mask=mask, backend=backend,
                               top_left=bool(top_left), precision=precision, rotary=rotary.tables())
    return None if result is None else result[0]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool = False,
           top_left: bool = False, attn_mask: Optional[torch.Tensor] = None, backend: str = "auto",
           dropout_p: float = 0.0, precision: Optional[str] = None,
           rotary: Optional[RotarySpec] = None) -> torch.Tensor:
    """``softmax(q kᵀ·scale + mask) v`` for ``q [B, Hq, Lq, Dk]``, ``k [B, Hkv, Lk, Dk]``,
    ``v [B, Hkv, Lk, Dv]`` (GQA when Hkv < Hq), differentiable in q, k, v and a float mask.

    ``causal`` aligned top-left (torch's) or bottom-right (flash-attn's, what a KV cache needs);
    ``attn_mask`` bool (True = attend) or float (added), broadcastable to ``[B, Hq, Lq, Lk]``.
    Attention dropout exists only in torch's kernel: a training call with ``dropout_p > 0`` on an
    aule-kp backend runs torch SDPA, with one :class:`aule_kp.AuleFallbackWarning`.
    ``precision``: ``"fp"`` or ``"int8"`` (:func:`aule_kp.flash_attention`'s) on aule-kp backends;
    None takes what :func:`aule_kp.install` / :func:`aule_kp.enabled` set (default ``"fp"``). int8
    is forward-only: calls that need gradients run ``"fp"``, with one AuleFallbackWarning.

    ``rotary``: q and k come unrotated and are rotated as the :class:`RotarySpec` says. On Triton
    the kernels rotate them as they load them (training calls too); inference calls whose backend
    has a fused rotation (``Backend.bind_rotary``: Vulkan, and "auto" where it picks Vulkan) rotate
    on the device in the attention's own sequence; every other call rotates in torch first
    (:meth:`RotarySpec.apply`).
    """
    mask = _as_4d(attn_mask)
    precision = state.setting()[1] if precision is None else check_precision(precision)
    if rotary is not None:
        out = _triton_rotary(q, k, v, rotary, scale, causal, top_left, mask, backend, dropout_p, precision)
        if out is None:
            out = _fused_rotary(q, k, v, rotary, scale, causal, top_left, mask, backend, dropout_p, precision)
        if out is not None:
            return out
        q, k = rotary.apply(q, k)
    if backend == "torch":
        return _torch_sdpa(q, k, v, mask, causal, top_left, scale, dropout_p)
    if dropout_p > 0:
        warn_once("nn-dropout", "aule_kp.nn: attention dropout runs only in torch's SDPA; this layer's training "
                  "calls with dropout > 0 run there (set dropout=0.0 to use aule-kp's kernels)")
        return _torch_sdpa(q, k, v, mask, causal, top_left, scale, dropout_p)
    if _needs_grad(q, k, v, mask):
        from ..torch.ops import FlashAttentionFunction

        if precision != "fp":
            warn_once("nn-int8-grad", f"aule_kp.nn: precision={precision!r} is forward-only; layer calls that "
                      "need gradients run precision='fp'")
        out, _ = FlashAttentionFunction.apply(q, k, v, mask, bool(causal), float(scale), backend, -1, -1,
                                              bool(top_left))
        return out
    # Inference (decoding steps): the validated call alone, without the autograd op around it.
    from ..call import attention_forward

    out, _, _ = attention_forward(q, k, v, causal=bool(causal), scale=float(scale), attn_mask=mask, backend=backend,
                                  top_left=bool(top_left), precision=precision)
    return out
