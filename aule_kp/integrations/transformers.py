"""Hugging Face ``transformers`` integration: an attention implementation named ``"aule_kp"``.

::

    from aule_kp.integrations import transformers as aule_tf
    aule_tf.register()                       # once per process
    model = AutoModelForCausalLM.from_config(config, attn_implementation="aule_kp")

The attention function computes what transformers' ``"sdpa"`` implementation computes, through
:func:`aule_kp.scaled_dot_product_attention`: grouped-query attention goes to the engine as it is
(``enable_gqa``), without the ``repeat_kv`` copy; the module's ``is_causal``, ``scaling`` and
``dropout`` are respected (dropout is only non-zero in training, and such calls run on torch's own
SDPA, as aule_kp's SDPA does). The mask function is the one transformers pairs with ``"sdpa"``
(``sdpa_mask``): a boolean ``[B, 1, Lq, Lk]`` mask (True = attend), or ``None`` when the mask is
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

    Returns:
        ``(attn_output [B, Lq, Hq, D], None)``: no attention weights are materialised.
    """
    from aule_kp.torch import scaled_dot_product_attention

    if kwargs.get("output_attentions", False) or kwargs.get("head_mask") is not None:
        log.warning("aule_kp attention cannot return attention weights or apply head_mask; use 'eager' for those")
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
    with backend_scope(_backend):
        out = scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=float(dropout), is_causal=is_causal,
            scale=scaling, enable_gqa=enable_gqa,
        )
    return out.transpose(1, 2).contiguous(), None


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
