"""Hugging Face ``diffusers`` integration: an attention processor computing attention with aule_kp.

::

    from aule_kp.integrations.diffusers import set_aule_attention
    set_aule_attention(pipe.unet)            # or any diffusers model

:class:`AuleAttnProcessor` is diffusers' default ``AttnProcessor2_0`` with the attention call routed
to :func:`aule_kp.scaled_dot_product_attention` (optionally on a chosen backend): the same
projections, norms, mask preparation and output handling, so results match the default processor to
rounding. The score scale is the module's ``attn.scale``, as diffusers' classic ``AttnProcessor``
applies it: ``1/sqrt(dim_head)`` (what ``AttnProcessor2_0`` uses), or 1 for ``scale_qk=False``
(T5-FiLM), where diffusers picks ``AttnProcessor`` because ``AttnProcessor2_0`` ignores the scale.
Unlike ``AttnProcessor``, the module's q/k norms (``qk_norm``) are applied, as ``AttnProcessor2_0`` does.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from ..backend import check_backend_name
from . import backend_scope

log = logging.getLogger("aule_kp")


class AuleAttnProcessor:
    """A diffusers attention processor (for ``diffusers.models.attention_processor.Attention``).

    Args:
        backend: aule_kp backend (``"auto" | "vulkan" | "triton" | "cpu"``); ``None`` follows
            ``aule_kp.install()`` or the per-device default.
    """

    def __init__(self, backend: Optional[str] = None) -> None:
        check_backend_name(backend, allow_none=True)
        self.backend = backend

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Self- or cross-attention of ``hidden_states`` (``[B, L, C]`` or ``[B, C, H, W]``)."""
        from aule_kp.torch import scaled_dot_product_attention

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            # SDPA wants [batch, heads, Lq, Lk]; prepare_attention_mask folds heads into the batch.
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        with backend_scope(self.backend):
            hidden_states = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                         dropout_p=0.0, is_causal=False, scale=attn.scale)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def set_aule_attention(model: torch.nn.Module, backend: Optional[str] = None) -> int:
    """Sets :class:`AuleAttnProcessor` on every attention module of ``model`` that runs diffusers'
    default processor (``AttnProcessor`` / ``AttnProcessor2_0``).

    Modules with a specialised processor (added KV projections, IP-Adapter, LoRA, Flux-style joint
    attention, ...) keep theirs: swapping in the plain processor would silently drop what they add.
    They are logged at debug level.

    Args:
        model: a diffusers model (UNet, transformer, VAE, ...) or any module containing them.
        backend: as for :class:`AuleAttnProcessor`.

    Returns:
        How many attention modules now use aule_kp.
    """
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    processor = AuleAttnProcessor(backend)  # stateless, so one instance serves every module
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, Attention):
            continue
        current = module.processor
        # Exact types: a subclass of the default processor may change what it computes.
        if type(current) in (AttnProcessor, AttnProcessor2_0, AuleAttnProcessor):
            module.set_processor(processor)
            count += 1
        else:
            log.debug("aule_kp: %s keeps its %s", name, type(current).__name__)
    log.debug("aule_kp: AuleAttnProcessor set on %d attention modules", count)
    return count


__all__ = ["AuleAttnProcessor", "set_aule_attention"]
