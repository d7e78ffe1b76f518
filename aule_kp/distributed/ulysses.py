"""Ulysses attention (Jacobs et al., "DeepSpeed Ulysses", 2023) over ``torch.distributed``: one
all-to-all turns sequence chunks of all heads into the whole sequence of ``H/W`` heads, each rank
runs ordinary attention on its heads (the normal dispatch, differentiable), and one all-to-all turns
the output back. The backward pass is the same two all-to-alls reversed around the local backward.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from ..torch.ops import flash_attention
from .checks import check
from .comm import Group
from .layout import natural_order


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                      scale: Optional[float] = None, group: Any = None, backend: str = "auto",
                      layout: str = "contiguous") -> torch.Tensor:
    """Attention over a sequence split across the ranks of ``group``, with arguments, result and
    errors as :func:`aule_kp.distributed.ring_attention`'s; both the query heads ``Hq`` and the
    key/value heads ``Hkv`` must be multiples of the world size (each rank computes ``Hq/W`` query
    heads against their ``Hkv/W`` kv heads, GQA kept). Moves ``q, k, v`` and the output once each
    through an all-to-all, instead of K/V ``W-1`` times round a ring.
    """
    call = check("ulysses_attention", q, k, v, causal, scale, group, backend, layout)
    g = call.group
    _, hq, hkv, lq, lk, _, _ = call.dims
    if hq % g.world or hkv % g.world:
        raise ValueError(f"q, k: ulysses_attention splits the heads over the {g.world} ranks, so the query heads "
                         f"({hq}) and key/value heads ({hkv}) must be multiples of {g.world}; "
                         "ring_attention takes any head counts")
    qh, kh, vh = (_SeqToHeads.apply(x, g, name) for x, name in ((q, "q"), (k, "k"), (v, "v")))
    q_order = natural_order(lq, g.world, layout, q.device)
    if q_order is not None:  # zigzag: the gathered chunks into sequence order, and the output back
        k_order = natural_order(lk, g.world, layout, q.device)
        qh, kh, vh = qh[:, :, q_order], kh[:, :, k_order], vh[:, :, k_order]
    out = flash_attention(qh, kh, vh, causal=call.causal, scale=call.scale, window=None, attn_mask=None,
                          backend=call.backend)
    if q_order is not None:
        out = out[:, :, torch.argsort(q_order)]
    return _HeadsToSeq.apply(out, g, "the output")


def _seq_to_heads(x: torch.Tensor, g: Group, what: str) -> torch.Tensor:
    """``[B, H, L, D]`` chunks of every head -> ``[B, H/W, W·L, D]``: this rank's heads, whole sequence."""
    b, h, n, d = x.shape
    w = g.world
    parts = x.reshape(b, w, h // w, n, d).transpose(0, 1)  # [W (destination), B, H/W, L, D]
    got = g.all_to_all(parts.contiguous(), what)  # [W (source: sequence chunk), B, H/W, L, D]
    return got.permute(1, 2, 0, 3, 4).reshape(b, h // w, w * n, d)


def _heads_to_seq(x: torch.Tensor, g: Group, what: str) -> torch.Tensor:
    """Inverse of :func:`_seq_to_heads`: ``[B, H/W, W·L, D]`` -> ``[B, H, L, D]``."""
    b, hw, wn, d = x.shape
    w = g.world
    n = wn // w
    parts = x.reshape(b, hw, w, n, d).permute(2, 0, 1, 3, 4)  # [W (destination: sequence chunk), B, H/W, L, D]
    got = g.all_to_all(parts.contiguous(), what)  # [W (source: head group), B, H/W, L, D]
    return got.transpose(0, 1).reshape(b, w * hw, n, d)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, g: Group, what: str) -> torch.Tensor:
        ctx.g, ctx.what = g, what
        return _seq_to_heads(x, g, what)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        return _HeadsToSeq.apply(grad, ctx.g, f"the gradient of {ctx.what}"), None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, g: Group, what: str) -> torch.Tensor:
        ctx.g, ctx.what = g, what
        return _heads_to_seq(x, g, what)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        return _SeqToHeads.apply(grad, ctx.g, f"the gradient of {ctx.what}"), None, None
