"""``MultiHeadAttention``: ``torch.nn.MultiheadAttention`` with its attention on aule-kp's kernels."""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import warn_once
from .attend import attend, check_layer_backend


def _mask_shape_error(name: str, got: Tuple[int, ...], *expected: Tuple[int, ...]) -> ValueError:
    return ValueError(f"{name} must have shape {' or '.join(map(str, expected))}, got {got}")


def merge_masks(attn_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor], batch: int,
                heads: int, len_q: int, len_k: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """torch MHA's ``attn_mask`` (``[Lq, Lk]`` or ``[B·H, Lq, Lk]``) and ``key_padding_mask``
    (``[B, Lk]``), whose bool True means *hidden*, as one mask in aule-kp's convention, broadcastable
    to ``[B, H, Lq, Lk]``: bool True = attend when both are bool, else float (added, ``-inf`` hidden)."""
    masks = []
    if attn_mask is not None:
        shape = tuple(attn_mask.shape)
        if shape == (len_q, len_k):
            masks.append(attn_mask[None, None])
        elif shape == (batch * heads, len_q, len_k):
            masks.append(attn_mask.reshape(batch, heads, len_q, len_k))
        else:
            raise _mask_shape_error("attn_mask", shape, (len_q, len_k), (batch * heads, len_q, len_k))
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (batch, len_k):
            raise _mask_shape_error("key_padding_mask", tuple(key_padding_mask.shape), (batch, len_k))
        masks.append(key_padding_mask[:, None, None, :])
    for name, m in zip(("attn_mask", "key_padding_mask"), masks):
        if m.dtype != torch.bool and not m.is_floating_point():
            raise TypeError(f"{name} must be bool (True = not attended) or float (added), got {m.dtype}")
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        hidden = masks[0] if len(masks) == 1 else masks[0] | masks[1]
        return ~hidden
    total = None
    for m in masks:
        additive = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf")) \
            if m.dtype == torch.bool else m.to(dtype)
        total = additive if total is None else total + additive
    return total


class MultiHeadAttention(torch.nn.MultiheadAttention):
    """A drop-in for :class:`torch.nn.MultiheadAttention` (a subclass of it: the same arguments,
    parameters and ``state_dict`` keys, ``in_proj_weight``/``in_proj_bias``/``out_proj.*``, or
    ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when ``kdim``/``vdim`` differ from
    ``embed_dim``) whose attention runs on aule-kp's ``backend``: ``"auto" | "vulkan" | "triton" |
    "cpu" | "torch"`` (torch SDPA). Forward and backward.

    ``forward`` takes torch's arguments with torch's meanings (bool masks: True = *not* attended).
    ``need_weights=True`` (torch's default) returns torch's own answer, computed by torch's
    implementation, with one :class:`aule_kp.AuleFallbackWarning`: pass ``need_weights=False`` to
    run on aule-kp and get ``(out, None)``. ``add_bias_kv``/``add_zero_attn`` likewise run on torch.
    ``is_causal=True`` without ``attn_mask`` applies the causal mask (top-left aligned, as torch's
    SDPA); with ``attn_mask`` the mask is used as given (torch treats ``is_causal`` as a hint then).
    A query row that sees no key gives 0 before ``out_proj`` (as torch 2.13's SDPA path; its fused
    inference fast path gives NaN there). Attention dropout in training
    runs on torch SDPA (see :func:`aule_kp.nn.attend.attend`).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 kdim: Optional[int] = None, vdim: Optional[int] = None, batch_first: bool = False,
                 backend: str = "auto", *, add_bias_kv: bool = False, add_zero_attn: bool = False,
                 device: Any = None, dtype: Any = None):
        # The positional order is aule-kp's public contract (DESIGN.md); torch's add_bias_kv and
        # add_zero_attn, which sit between bias and kdim there, are keyword-only here.
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first,
                         device=device, dtype=dtype)
        self.backend = check_layer_backend(backend)

    def _projection(self, i: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Weight and bias of projection ``i`` (0 = q, 1 = k, 2 = v), views of the parameters."""
        e = self.embed_dim
        bias = None if self.in_proj_bias is None else self.in_proj_bias[i * e:(i + 1) * e]
        if self._qkv_same_embed_dim:
            return self.in_proj_weight[i * e:(i + 1) * e], bias
        return (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)[i], bias

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """torch's ``MultiheadAttention.forward``: ``(attn_output, attn_weights or None)``."""
        if need_weights or self.bias_k is not None or self.add_zero_attn:
            what = "need_weights=True" if need_weights else "add_bias_kv/add_zero_attn"
            warn_once(f"nn-mha-torch:{what}", f"aule_kp.nn.MultiHeadAttention: {what} runs torch's "
                      "implementation (pass need_weights=False to run the attention on aule-kp)")
            if is_causal and attn_mask is None:  # torch wants the mask with its hint: give it the one meant
                axis = 1 if query.dim() == 3 and self.batch_first else 0
                attn_mask = torch.ones(query.shape[axis], key.shape[axis], dtype=torch.bool,
                                       device=query.device).triu(1)
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=bool(is_causal))
        batched = query.dim() == 3
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError("query, key and value must all be 3-D (batched) or all 2-D (unbatched), got "
                             f"{query.dim()}-D, {key.dim()}-D and {value.dim()}-D")
        if not batched:
            query, key, value = query[None], key[None], value[None]
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask[None]
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, len_q, len_k = query.shape[0], query.shape[1], key.shape[1]
        if key.shape[:2] != value.shape[:2] or query.shape[0] != key.shape[0]:
            raise ValueError(f"key and value must have the same batch and length as each other and batch as query, "
                             f"got query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}")
        heads, d = self.num_heads, self.head_dim

        def split(x: torch.Tensor, i: int) -> torch.Tensor:
            w, b = self._projection(i)
            return F.linear(x, w, b).reshape(batch, x.shape[1], heads, d).transpose(1, 2)

        q, k, v = split(query, 0), split(key, 1), split(value, 2)
        mask = merge_masks(attn_mask, key_padding_mask, batch, heads, len_q, len_k, q.dtype)
        out = attend(q, k, v, scale=1.0 / math.sqrt(d), causal=bool(is_causal) and attn_mask is None, top_left=True,
                     attn_mask=mask, backend=self.backend, dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, len_q, self.embed_dim))
        if not batched:
            return out[0], None
        return (out if self.batch_first else out.transpose(0, 1)), None
