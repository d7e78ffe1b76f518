"""Hugging Face ``transformers`` integration: an attention implementation named ``"aule_kp"``.

::

    from aule_kp.integrations import transformers as aule_tf
    aule_tf.register()                       # once per process
    model = AutoModelForCausalLM.from_config(config, attn_implementation="aule_kp")

The attention function computes what transformers' ``"sdpa"`` implementation computes, through
:func:`aule_kp.scaled_dot_product_attention`: grouped-query attention goes to the engine as it is
(``enable_gqa``), without the ``repeat_kv`` copy; the module's ``is_causal``, ``scaling`` and
``dropout`` are respected (dropout is only non-zero in training, and such calls run on torch's own
SDPA, as aule_kp's SDPA does). Score modifiers that transformers' ``"sdpa"`` drops but ``"eager"``
applies are computed too, through :func:`aule_kp.flash_attention`: Gemma-2's ``softcap`` and
gpt-oss's attention sinks (``s_aux``, differentiable); with dropout in training those raise. The
mask function is the one transformers pairs with ``"sdpa"`` (``sdpa_mask``): a boolean
``[B, 1, Lq, Lk]`` mask (True = attend, sliding windows included), or ``None`` when the mask is
purely causal so that the kernel can skip the hidden tiles.

Written against transformers 4.57 (``AttentionInterface`` / ``AttentionMaskInterface``, 4.53+).
Models whose attention does not go through ``AttentionInterface`` (BERT and RoBERTa in 4.57 still
pick their own classes) reject the name; use ``aule_kp.install()`` for those instead.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Tuple

import torch

from ..backend import check_backend_name
from . import backend_scope

log = logging.getLogger("aule_kp")

#: The name under which the attention and mask functions are registered.
NAME = "aule_kp"

_backend: Optional[str] = None


def aule_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs: Any,
) -> Tuple[torch.Tensor, None]:
    """transformers attention function (``AttentionInterface`` signature).

    Args:
        module: the attention module (read: ``num_key_value_groups``, ``is_causal``).
        query: ``[B, Hq, Lq, D]``; key/value ``[B, Hkv, Lk, D]``.
        attention_mask: as made by the paired mask function (bool, True = attend) or a float
            additive mask from older code paths; ``None`` for none.
        dropout: attention dropout probability (the model passes 0 outside training).
        scaling: score scale; ``None`` for ``1/sqrt(D)``.
        is_causal: forced causality; ``None`` derives it as transformers' sdpa does.
        kwargs: ``softcap`` (tanh soft-capping of the scaled scores, as eager's; ``None`` = off) and
            ``s_aux`` (sink logits ``[Hq]``) are applied; ``sliding_window`` is already in the mask;
            a ``head_mask`` raises; the rest are ignored.

    Returns:
        ``(attn_output [B, Lq, Hq, D], None)``: no attention weights are materialised.

    Raises:
        ValueError: a ``head_mask``; with ``softcap``/``s_aux``, ``dropout`` > 0 (eager applies it;
            this function would drop it) or ``is_causal=True`` together with a mask.
        TypeError: ``softcap``/``s_aux`` with a query dtype other than float32/float16/bfloat16.
    """
    from aule_kp.torch import scaled_dot_product_attention

    if kwargs.get("head_mask") is not None:
        raise ValueError("aule_kp attention cannot apply head_mask; use attn_implementation='eager' for it")
    if kwargs.get("output_attentions", False):
        log.warning("aule_kp attention cannot return attention weights; use 'eager' for those")
    hq, hkv = query.shape[1], key.shape[1]
    # GQA: the engine reads each KV head once for its group of query heads, so no repeat_kv copy.
    enable_gqa = hq != hkv
    if attention_mask is not None and attention_mask.ndim == 4:
        # A static cache makes the mask longer than the keys filled so far; sdpa trims it the same way.
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    if is_causal is None:
        # Same rule as transformers' sdpa: causal only when no mask was built (the mask function
        # returns None for a purely causal pattern) and the module is causal (decoders).
        is_causal = bool(query.shape[2] > 1 and attention_mask is None and getattr(module, "is_causal", True))
    softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")
    if softcap is not None or sinks is not None:
        return _score_mod_attention(query, key, value, attention_mask, float(dropout), is_causal, scaling,
                                    softcap, sinks), None
    with backend_scope(_backend):
        out = scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=float(dropout), is_causal=is_causal,
            scale=scaling, enable_gqa=enable_gqa,
        )
    return out.transpose(1, 2).contiguous(), None


def _score_mod_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float,
    is_causal: bool,
    scaling: Optional[float],
    softcap: Optional[float],
    sinks: Optional[torch.Tensor],
) -> torch.Tensor:
    """:func:`aule_attention_forward` with a soft-cap or sinks, as eager computes them: through
    :func:`aule_kp.flash_attention` (differentiable in q, k, v, a float mask and the sinks), on
    the backend SDPA calls would take. Returns ``[B, Lq, Hq, D]``."""
    from aule_kp.api import flash_attention
    from aule_kp.torch.sdpa import backend_for

    if query.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"query is {query.dtype}: aule_kp computes softcap/s_aux attention in float32, float16 or "
                        "bfloat16; use attn_implementation='eager' for other dtypes")
    if dropout:
        raise ValueError(f"dropout={dropout} with softcap/s_aux: aule_kp has no dropout for these; use "
                         "attn_implementation='eager', or set the attention dropout to 0")
    lq, lk = query.shape[2], key.shape[2]
    causal = False
    if is_causal and lq == lk and attention_mask is None:
        causal = True  # top-left (torch's is_causal) and bottom-right (flash_attention's) agree
    elif is_causal:  # torch's top-left causal mask, spelled out
        if attention_mask is not None:
            raise ValueError("is_causal together with attention_mask is ambiguous (torch's SDPA kernels "
                             "disagree on it); pass one of them")
        attention_mask = torch.ones(lq, lk, dtype=torch.bool, device=query.device).tril()
    out = flash_attention(query, key, value, causal=causal, scale=scaling, attn_mask=attention_mask,
                          backend=backend_for(query.device.type, _backend), softcap=0.0 if softcap is None else softcap,
                          sinks=sinks)
    return out.transpose(1, 2).contiguous()


def register(backend: Optional[str] = None) -> str:
    """Registers ``"aule_kp"`` with transformers' attention and mask interfaces.

    Args:
        backend: aule_kp backend for these calls (``"auto" | "vulkan" | "triton" | "cpu"``);
            ``None`` follows ``aule_kp.install()`` or the per-device default.

    Returns:
        The registered name, for ``attn_implementation=``.
    """
    global _backend
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as exc:  # transformers missing, or older than 4.53 (no mask interface)
        raise ImportError("aule_kp.integrations.transformers needs transformers >= 4.53 "
                          f"(AttentionInterface and AttentionMaskInterface): {exc}") from exc

    check_backend_name(backend, allow_none=True)
    _backend = backend
    AttentionInterface.register(NAME, aule_attention_forward)
    # The sdpa mask: boolean (True = attend), None when purely causal (lets the kernel skip tiles).
    AttentionMaskInterface.register(NAME, sdpa_mask)
    log.debug("aule_kp: registered transformers attention %r (backend %r)", NAME, backend)
    return NAME


__all__ = ["NAME", "aule_attention_forward", "register"]
