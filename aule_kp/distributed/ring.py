"""Ring attention (Liu et al., "Ring Attention with Blockwise Transformers", 2023) over
``torch.distributed``: each rank keeps its query chunk, and the key/value chunks travel once round the
ring. At every step the next chunk's transfer is posted before the local block is computed, so the
two overlap; the partial outputs merge through their row log-sum-exp. The backward pass sends K/V
round again, with float32 dK/dV accumulators travelling one hop behind them, so each rank's dK/dV
arrive home summed over every query that saw its keys.

Local blocks run through the normal dispatch (``torch.ops.aule_kp.flash_attention_forward`` /
``_backward``), so any backend runs them; the backward op takes the merged output and row
log-sum-exp, which makes each block's gradients its exact share of the full ones. GQA travels as
is: the chunks carry ``Hkv`` heads and the backends share them among the query heads.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from ..torch.ops import flash_attention_backward, flash_attention_forward
from .checks import Call, check
from .layout import block


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                   scale: Optional[float] = None, group: Any = None, backend: str = "auto",
                   layout: str = "contiguous") -> torch.Tensor:
    """Attention over a sequence split across the ranks of ``group`` (default: the world), each rank
    holding its chunk as ``q [B, Hq, L, Dk]``, ``k [B, Hkv, L, Dk]``, ``v [B, Hkv, L, Dv]``.

    Returns this rank's rows of the output, ``[B, Hq, L, Dv]`` like q; differentiable in q, k and v
    (every rank must then run the backward pass too). ``layout``: ``"contiguous"`` (rank ``r`` holds
    the ``r``-th chunk, in rank order) or ``"zigzag"`` (chunks ``r`` and ``2W-1-r`` of ``2W``, which
    evens out causal work; :func:`aule_kp.distributed.shard` cuts a sequence either way).
    ``causal``: position ``i`` of the whole sequence sees positions ``j <= i``; a step whose keys no
    local query sees is skipped. ``scale`` defaults to ``1/sqrt(Dk)``; ``backend`` runs the local
    blocks (``"auto" | "vulkan" | "triton" | "cpu"``).

    Every rank must make the same call (shapes, dtype, options): a disagreement is a ValueError naming
    the rank. A rank that dies or stalls makes the others raise
    :class:`aule_kp.distributed.PeerFailure` within the group's timeout.
    """
    call = check("ring_attention", q, k, v, causal, scale, group, backend, layout)
    return _RingAttention.apply(q, k, v, call)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: Call) -> torch.Tensor:
        out, lse = _forward(q, k, v, call)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call = call
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dout: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        q, k, v, out, lse = ctx.saved_tensors
        return (*_backward(dout, q, k, v, out, lse, ctx.call), None)


def _pack(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """K and V in one flat buffer: one message per ring step."""
    return torch.cat([k.reshape(-1), v.reshape(-1)])


def _unpack(buf: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Views of ``buf`` shaped as ``k`` and ``v``."""
    n = k.numel()
    return buf[:n].view(k.shape), buf[n:].view(v.shape)


def _merge(acc: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Folds a block's ``(out, lse)`` into the float32 running ``(acc, acc_lse)`` in place: each side
    weighted by ``exp(its lse - the combined lse)``. Rows that see no key yet stay 0 with lse -inf."""
    total = torch.logaddexp(acc_lse, lse)
    shift = torch.where(torch.isneginf(total), torch.zeros_like(total), total)
    acc.mul_(torch.exp(acc_lse - shift).unsqueeze(-1)).add_(out.float() * torch.exp(lse - shift).unsqueeze(-1))
    acc_lse.copy_(total)


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: Call) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out like q, lse float32 [B, Hq, L])`` of this rank's queries against the whole sequence."""
    g = call.group
    b, hq, _, lq, lk, _, dv = call.dims
    acc = torch.zeros((b, hq, lq, dv), dtype=torch.float32, device=q.device)
    acc_lse = torch.full((b, hq, lq), float("-inf"), dtype=torch.float32, device=q.device)
    kv = _pack(k, v)
    for step in range(g.world):
        source = (g.rank - step) % g.world
        pending = g.exchange(kv, step, 0, "K/V") if step < g.world - 1 else None
        blk = block(g.rank, source, lq, lk, call.causal, call.layout)
        if blk is not None:
            ks, vs = _unpack(kv, k, v)
            rows = (slice(None), slice(None), blk.rows)
            cols = (slice(None), slice(None), blk.cols)
            out, lse = flash_attention_forward(q[rows], ks[cols], vs[cols], None, blk.causal, call.scale,
                                               call.backend, -1, -1, True)
            _merge(acc[rows], acc_lse[rows], out, lse)
        if pending is not None:
            kv = pending.wait()
    return acc.to(q.dtype), acc_lse


def _backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor, call: Call) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of this rank's chunks. The dK/dV accumulator of the chunk visiting at step s
    arrives from the previous rank while this rank computes step s's block (posted one step ahead)."""
    g = call.group
    _, _, _, lq, lk, _, _ = call.dims
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    kv = _pack(k, v)
    arriving = None  # the exchange bringing the visiting chunk's dK/dV accumulator
    for step in range(g.world):
        source = (g.rank - step) % g.world
        pending = g.exchange(kv, step, 0, "K/V") if step < g.world - 1 else None
        blk = block(g.rank, source, lq, lk, call.causal, call.layout)
        if blk is not None:
            ks, vs = _unpack(kv, k, v)
            rows = (slice(None), slice(None), blk.rows)
            cols = (slice(None), slice(None), blk.cols)
            gq, gk, gv = flash_attention_backward(dout[rows], q[rows], ks[cols], vs[cols], out[rows], lse[rows],
                                                  None, blk.causal, call.scale, call.backend, False, -1, -1, True)[:3]
            dq[rows] += gq
        acc = torch.zeros(k.numel() + v.numel(), dtype=torch.float32, device=k.device) if arriving is None \
            else arriving.wait()
        if blk is not None:
            dk, dv = _unpack(acc, k, v)
            dk[cols] += gk
            dv[cols] += gv
        arriving = g.exchange(acc, step, 1, "dK/dV")
        if pending is not None:
            kv = pending.wait()
    dk, dv = _unpack(arriving.wait(), k, v)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
