"""Score modifiers: tanh soft-capping and ALiBi (flash-attn's ``softcap``, ``alibi_slopes``) and
attention sinks (gpt-oss): their checks, and the host arithmetic every backend shares.

For query ``i`` and a key ``j`` its causal/window band lets through (``Problem.visible``) the score is

    s_ij = cap(scale * q_i . k_j) + alibi_ij + mask_ij
    cap(x) = softcap * tanh(x / softcap)            (softcap = 0.0: cap(x) = x)
    alibi_ij = -slope * |j - (i + diag)|            (diag = Lk - Lq: flash-attn's |i + Lk - Lq - j|)

with the slope of the row's query head (and batch, for ``[B, Hq]`` slopes). Soft-capping comes after
the scale and before the bias and mask, as flash-attn applies it. A sink is one logit per query head
that joins every row's softmax denominator but carries no value (gpt-oss): with ``lse`` the row's
log-sum-exp over its keys, ``lse' = logaddexp(lse, sink)`` and ``out' = out * exp(lse - lse')``. The
kernels never see sinks: :func:`apply_sinks` rescales their ``(out, lse)``, which is exactly the
softmax with the sink column (a row that sees no key stays 0, with ``lse' = sink``). The backward
pass then needs nothing new for q, k and v (``P = exp(S - lse')`` are the true probabilities and
``D = rowsum(dO * O')``), and ``d sink_h = -sum over (b, i) of exp(sink_h - lse'_bhi) * D_bhi``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Tuple

import numpy as np

from .dtypes import from_f32, to_f32


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def check_softcap(softcap: Any) -> float:
    """The soft-cap as a float (0.0: off); ValueError naming ``softcap`` unless a finite number >= 0."""
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not math.isfinite(softcap) \
            or softcap < 0:
        raise ValueError(f"softcap must be a finite number >= 0 (0.0 = off), got {softcap!r}")
    return float(softcap)


def _per_head(name: str, x: Any, shapes: Tuple[Tuple[int, ...], ...], expected: str) -> np.ndarray:
    """``x`` (NumPy or torch, floating point, finite) as a float32 host array; TypeError/ValueError
    naming ``name`` otherwise."""
    if _is_torch(x):
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
        host = x.detach().float().cpu().numpy()
    elif isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise TypeError(f"{name} must be floating point, got numpy {x.dtype}")
        host = x.astype(np.float32)
    else:
        raise TypeError(f"{name} must be a numpy.ndarray or torch.Tensor, got {type(x).__name__}")
    if tuple(host.shape) not in shapes:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(host.shape)}")
    if not np.isfinite(host).all():
        raise ValueError(f"{name} must be finite")
    return np.ascontiguousarray(host)


def check_alibi(alibi_slopes: Any, batch: int, heads_q: int) -> Optional[np.ndarray]:
    """float32 slopes ``[1, Hq]`` (``[Hq]`` given) or ``[B, Hq]``, or None; errors name ``alibi_slopes``.
    Slopes are constants: no gradient flows to them (as in flash-attn)."""
    if alibi_slopes is None:
        return None
    slopes = _per_head("alibi_slopes", alibi_slopes, ((heads_q,), (batch, heads_q)),
                       f"[Hq] = ({heads_q},) or [B, Hq] = ({batch}, {heads_q})")
    return slopes.reshape(-1, heads_q)


def check_sinks(sinks: Any, heads_q: int) -> Optional[np.ndarray]:
    """float32 ``[Hq]`` sink logits, or None; errors name ``sinks``."""
    if sinks is None:
        return None
    return _per_head("sinks", sinks, ((heads_q,),), f"[Hq] = ({heads_q},)")


def cap(s: np.ndarray, softcap: float) -> np.ndarray:
    """``softcap * tanh(s / softcap)`` of float scores, in place; ``s`` unchanged for softcap 0."""
    if softcap:
        c = s.dtype.type(softcap)
        np.divide(s, c, out=s)
        np.tanh(s, out=s)
        np.multiply(s, c, out=s)
    return s


def alibi_distance(diag: int, rows: np.ndarray, cols: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
    """``|j - (i + diag)|`` for query rows ``rows`` and keys ``cols``: ``[len(rows), len(cols)]``."""
    return np.abs(cols[None, :] - (rows[:, None] + diag)).astype(dtype)


def sink_lse(lse: Any, sinks: Any) -> Any:
    """``logaddexp(lse [B, Hq, Lq], sinks [Hq])`` (NumPy or torch, as given)."""
    if _is_torch(lse):
        import torch

        return torch.logaddexp(lse, sinks.to(lse.dtype)[None, :, None])
    return np.logaddexp(lse, sinks[None, :, None]).astype(np.float32)


def apply_sinks(out: Any, lse: Any, sinks: Any, dtype: str) -> Tuple[Any, Any]:
    """``(out', lse')`` of a kernel's ``(out [B, Hq, Lq, Dv], lse [B, Hq, Lq])`` with one sink logit
    per query head: ``lse' = logaddexp(lse, sink)``, ``out' = out * exp(lse - lse')`` (rows that see
    no key: ``lse = -inf``, so they stay 0). Host storage arrays (``dtype``, bf16 as uint16 bits)
    with NumPy sinks, or torch tensors with torch sinks (differentiable)."""
    new = sink_lse(lse, sinks)
    if _is_torch(out):
        import torch

        weight = torch.exp(lse - new).unsqueeze(-1)
        return (out.float() * weight).to(out.dtype), new
    with np.errstate(invalid="ignore"):
        weight = np.exp(lse - new)[..., None]
    return from_f32(to_f32(out, dtype) * weight, dtype), new


def sinks_grad(out: Any, dout: Any, lse: Any, sinks: Any) -> Any:
    """``d sinks [Hq]`` (float32 torch) from the sink-including ``out``, ``lse`` and the output
    gradient ``dout`` (torch tensors): ``-sum_{b,i} exp(sink - lse) * rowsum(dout * out)``."""
    import torch

    delta = (dout.float() * out.float()).sum(-1)
    weight = torch.exp(sinks.float()[None, :, None] - lse.float())
    return -(weight * delta).sum(dim=(0, 2))
