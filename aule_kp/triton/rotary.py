"""Attention with the rotary embedding (RoPE) fused into the Triton kernels' loads, differentiable.

:func:`rotary_attention` takes q and k **unrotated**: the forward kernel rotates each q block and
each k tile as it loads them (``aule_kp.triton.kernels._load_rope``), and the backward kernels do
the same, then rotate dQ and dK back (``R^T``) before they store them, so the gradients are those
of the unrotated inputs. Nothing rotated is ever written to memory.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from ..call import prepare
from ..problem import Problem
from .ops import Rotary


def _table(name: str, t: Any, device: torch.device) -> torch.Tensor:
    """``t`` as a float32 contiguous ``[P, R/2]`` tensor on ``device``; TypeError/ValueError naming it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [P, R/2], got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (taken in float32), got {t.dtype}")
    if t.dim() != 2 or 0 in t.shape:
        raise ValueError(f"{name} must be 2-D [P, R/2] with P, R/2 >= 1, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on q's device ({device}), got {t.device}")
    if t.requires_grad:
        raise ValueError(f"rotary_attention computes no gradient for {name}; pass it detached")
    return t.detach().to(torch.float32).contiguous()


def _check_range(name: str, pos: torch.Tensor, table_rows: int) -> None:
    """ValueError naming ``pos`` unless its values lie in ``[0, table_rows)``: an index past the
    tables would read outside them. Reads two numbers back from the device (a sync)."""
    lo, hi = int(pos.min()), int(pos.max())
    if lo < 0 or hi >= table_rows:
        raise ValueError(f"{name} must index the {table_rows} rows of cos/sin (0 .. {table_rows - 1}), "
                         f"got values {lo} .. {hi}")


def _positions(name: str, pos: Any, batch: int, length: int, table_rows: int, device: torch.device,
               in_range: bool) -> torch.Tensor:
    """``pos`` (``[L]`` or ``[B, L]`` integers in ``[0, table_rows)``) as an int32 contiguous
    ``[1 or B, L]`` tensor; TypeError/ValueError naming it. ``in_range``: the caller made the values
    within the tables, so their range is not read back (:func:`_check_range`)."""
    if not isinstance(pos, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integers, got {type(pos).__name__}")
    if pos.is_floating_point() or pos.is_complex() or pos.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got {pos.dtype}")
    if pos.device != device:
        raise ValueError(f"{name} must be on q's device ({device}), got {pos.device}")
    if pos.dim() == 1:
        pos = pos[None]
    if pos.dim() != 2 or pos.shape[0] not in (1, batch) or pos.shape[1] != length:
        raise ValueError(f"{name} must be [{length}] or [{batch}, {length}] (its rows' length and the batch), "
                         f"got shape {tuple(pos.shape)}")
    if pos.numel() and not in_range:
        _check_range(name, pos, table_rows)
    return pos.to(torch.int32).contiguous()


def check_rotary(p: Problem, device: torch.device, cos: Any, sin: Any, q_positions: Any, k_positions: Any,
                 interleaved: Any, rotary_start: Any, *, positions_in_range: bool = False) -> Rotary:
    """The kernels' :class:`~aule_kp.triton.ops.Rotary` for a call of ``p``'s shapes on ``device``;
    TypeError/ValueError naming the argument that does not fit. ``positions_in_range``: the caller
    made the positions within the tables' rows (their range check, a device read, is skipped).
    float32 contiguous tables are taken as they are, without a copy."""
    for name, flag in (("interleaved", interleaved), ("positions_in_range", positions_in_range)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    cos_t, sin_t = _table("cos", cos, device), _table("sin", sin, device)
    if cos_t.shape != sin_t.shape:
        raise ValueError(f"cos and sin must have one shape [P, R/2], got {tuple(cos_t.shape)} and {tuple(sin_t.shape)}")
    if not isinstance(rotary_start, numbers.Integral) or isinstance(rotary_start, bool) or rotary_start < 0:
        raise ValueError(f"rotary_start must be an int >= 0, got {rotary_start!r}")
    rotated = 2 * int(cos_t.shape[1])
    if rotary_start + rotated > p.dim_k:
        raise ValueError(f"the rotated channels [rotary_start, rotary_start + 2 * cos.shape[1]) = [{rotary_start}, "
                         f"{rotary_start + rotated}) must fit q/k's head dim {p.dim_k}")
    rows = int(cos_t.shape[0])
    q_pos = _positions("q_positions", q_positions, p.batch, p.len_q, rows, device, positions_in_range)
    k_pos = _positions("k_positions", k_positions, p.batch, p.len_k, rows, device, positions_in_range)
    return Rotary(cos_t, sin_t, q_pos, k_pos, interleaved, int(rotary_start))


class RotaryAttentionFunction(torch.autograd.Function):
    """Autograd over the Triton backend's rotary forward/backward: ``apply(q, k, v, mask, rotary,
    problem, backend)`` with prepared (contiguous) q, k, v, the float32 additive mask or None (no
    gradient), :class:`~aule_kp.triton.ops.Rotary` and the call's Problem and Triton backend (None
    when no query sees a key: zeros, and zero gradients). Returns ``(out, lse)``; lse is not
    differentiable, and there is no double backward."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                rotary: Rotary, problem: Problem, backend: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        if backend is None:
            out = q.new_zeros((*q.shape[:-1], v.shape[-1]))
            lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        else:
            out, lse = backend.forward(problem, q, k, v, mask, rotary=rotary)
        ctx.save_for_backward(q, k, v, out, lse, mask, *rotary[:4])
        ctx.options = (rotary.interleaved, rotary.start, problem, backend)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dout: torch.Tensor, _dlse: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        q, k, v, out, lse, mask, cos, sin, q_pos, k_pos = ctx.saved_tensors
        interleaved, start, problem, backend = ctx.options
        if backend is None:
            return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape), None, None, None, None
        rotary = Rotary(cos, sin, q_pos, k_pos, interleaved, start)
        dq, dk, dv, _ = backend.backward(problem, q, k, v, out, dout.contiguous(), lse, mask, rotary=rotary)
        return dq, dk, dv, None, None, None, None


def rotary_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cos: torch.Tensor, sin: torch.Tensor,
                     q_positions: torch.Tensor, k_positions: torch.Tensor, interleaved: bool = False,
                     rotary_start: int = 0, causal: bool = False, top_left: bool = False,
                     scale: Optional[float] = None, window: Optional[Tuple[int, int]] = None,
                     attn_mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``softmax(rot(q) rot(k)ᵀ·scale + mask) v`` on the Triton backend, the rotation fused into the
    kernels' loads; differentiable in q, k and v (the gradients of the **unrotated** q and k).

    Calling convention (what ``aule_kp.nn``'s attention call needs to pass):

    * ``q [B, Hq, Lq, Dk]``, ``k [B, Hkv, Lk, Dk]``, ``v [B, Hkv, Lk, Dv]`` torch tensors (float32,
      float16, bfloat16) on a CUDA/ROCm device, or on the CPU under ``TRITON_INTERPRET=1``; GQA/MQA
      when ``Hkv < Hq``; ``Dv`` may differ from ``Dk``. q and k are **not** rotated by the caller
      (a KV cache used with this call holds unrotated keys).
    * ``cos``, ``sin``: ``[P, R/2]`` tables, row ``p`` for position ``p`` (any float dtype, taken in
      float32; e.g. ``RotaryEmbedding.cos_sin(torch.arange(P), torch.float32)``), on q's device, not
      requiring grad. ``R = 2 * cos.shape[1]`` channels ``[rotary_start, rotary_start + R)`` are
      rotated (default: the first R, flash-attn's ``apply_rotary_emb``; DeepSeek's MLA puts its
      rope channels last: ``rotary_start = Dk - R``); the others pass unchanged.
    * ``q_positions [Lq]`` or ``[B, Lq]``, ``k_positions [Lk]`` or ``[B, Lk]``: integer positions
      (rows of the tables, ``0 <= p < P``, checked: one device sync) of each query and key row; a
      decoding step with ``n`` cached keys passes ``q_positions = n + arange(Lq)`` and
      ``k_positions = arange(n + Lq)``.
    * ``interleaved``: rotate channel pairs ``(2i, 2i+1)`` (GPT-J) instead of ``(i, i + R/2)``
      (GPT-NeoX / Llama, the default): ``x1·cos - x2·sin, x2·cos + x1·sin`` either way.
    * ``causal`` aligned bottom-right (flash-attn's, query ``i`` sees keys ``j <= i + Lk - Lq``) or,
      with ``top_left=True``, top-left (torch's); the band acts on row indices, not on positions.
      ``scale`` (default ``1/sqrt(Dk)``), ``window=(left, right)`` and ``attn_mask`` (bool, True =
      attend, or float, added; broadcastable to ``[B, Hq, Lq, Lk]``; no gradient) as
      :func:`aule_kp.flash_attention` takes them.

    Rounding: each pair is rotated in float32 and, for 16-bit inputs, rounded to the input dtype
    before the tensor-core dot, as an unfused rotation stored in that dtype would be.

    Returns:
        ``(out [B, Hq, Lq, Dv] in q's dtype, lse float32 [B, Hq, Lq])``: the row log-sum-exp
        (natural log; ``-inf`` for a row that sees no key) is not differentiable.

    Raises:
        TypeError, ValueError: an argument that does not fit, named.
        aule_kp.BackendUnavailable: the Triton backend cannot take the tensors (e.g. CPU tensors
            without ``TRITON_INTERPRET=1``), with its reasons.
    """
    return attend_rotary(q, k, v, cos=cos, sin=sin, q_positions=q_positions, k_positions=k_positions,
                         positions_in_range=False, interleaved=interleaved, rotary_start=rotary_start, causal=causal,
                         top_left=top_left, scale=scale, window=window, attn_mask=attn_mask)


def attend_rotary(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cos: torch.Tensor, sin: torch.Tensor,
                  q_positions: torch.Tensor, k_positions: torch.Tensor, positions_in_range: bool,
                  interleaved: bool = False, rotary_start: int = 0, causal: bool = False, top_left: bool = False,
                  scale: Optional[float] = None, window: Optional[Tuple[int, int]] = None,
                  attn_mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`rotary_attention` for a caller that may vouch for its positions: with
    ``positions_in_range=True`` the caller made them within the tables' rows (``aule_kp.nn``'s layers:
    ``RotarySpec.in_range``), and their range check, a device read per call, is skipped; an index
    past the tables would read outside them. Every other argument is checked as there."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(top_left, bool):
        raise TypeError(f"top_left must be a bool, got {type(top_left).__name__}")
    if isinstance(attn_mask, torch.Tensor) and attn_mask.requires_grad:
        raise ValueError("rotary_attention computes no gradient for attn_mask; pass it detached")
    call = prepare(q, k, v, causal=causal, scale=scale, window=window, attn_mask=attn_mask, backend="triton",
                   top_left=top_left)
    rotary = check_rotary(call.problem, q.device, cos, sin, q_positions, k_positions, interleaved, rotary_start,
                          positions_in_range=positions_in_range)
    if call.backend is None:  # no query or no key: prepare() made no device copies
        return RotaryAttentionFunction.apply(q, k, v, None, rotary, call.problem, None)
    return RotaryAttentionFunction.apply(call.q, call.k, call.v, call.mask, rotary, call.problem, call.backend)
