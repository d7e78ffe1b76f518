"""The error model of a whole attention layer (tests/test_nn.py), built on conftest's model of one
float32 computation: each stage's own rounding (conftest.tolerance) plus a first-order bound of
what the stage does to its inputs' errors, carried elementwise (a tensor of bounds beside each
float64 value) through the next stage.

* ``y = x Wᵀ + b`` (float32 sums of ``n`` products): rounding ``λ·u32·(sqrt(n) + 1)·(|x||W|ᵀ + |b|)``
  (conftest.tolerance with the products' one rounding as its exponent term); input errors
  ``E_x`` become ``E_x |W|ᵀ``.
* RoPE ``(x1 c - x2 s, x2 c + x1 s)``: cos/sin, the products and the sum round
  (:func:`conftest.rotation_tolerance` of ``|x1| + |x2|``, float32 tables); input errors become
  ``E1 + E2`` (``|c|, |s| <= 1``).
* attention: its own rounding (conftest.tolerance over ``Lk + D`` terms, scaled by
  :func:`reference.output_scale`, with :func:`conftest.exponent_range`), and first order in the
  inputs' errors: a score moves by ``δs_ij <= scale·(|q_i|·E_kj + E_qi·|k_j|)``, a probability by
  ``|δP_ij| <= P_ij·(δs_ij + Σ_l P_il δs_il)``, so the output by ``P E_v + |δP| |v|``.
* attention backward: conftest.gradient_tolerances for the rounding, and first order in the
  inputs' errors through ``dV = Pᵀ dO``, ``dS = P∘(dO Vᵀ - D)`` (``D_i = dO_i·O_i``),
  ``dQ = scale·dS K``, ``dK = scale·dSᵀ Q``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np
import torch
from conftest import UNIT_ROUNDOFF, exponent_range, gradient_tolerances, rotation_tolerance, tolerance
from reference import output_scale

from aule_kp.problem import Problem, band

U32 = UNIT_ROUNDOFF["float32"]
#: conftest.tolerance per unit of ``|x||W|`` for a float32 sum of one product per term, by length.
_per_unit = lambda n: tolerance("float32", n, 1.0, exponent_range=1.0)  # noqa: E731


@dataclass
class Bounded:
    """A float64 value and elementwise bounds of the float32 computation's error against it."""

    value: torch.Tensor
    err: torch.Tensor


def exact(x: torch.Tensor) -> Bounded:
    x = x.detach().to(torch.float64)
    return Bounded(x, torch.zeros_like(x))


def linear(x: Bounded, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> Bounded:
    """``x Wᵀ + b`` in float64 with the error bounds of its float32 computation."""
    w = weight.detach().to(torch.float64)
    b = None if bias is None else bias.detach().to(torch.float64)
    absolute = x.value.abs() @ w.abs().T + (0 if b is None else b.abs())
    return Bounded(torch.nn.functional.linear(x.value, w, b), _per_unit(w.shape[1]) * absolute + x.err @ w.abs().T)


def _pair_sum(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """``x1 + x2`` of each rotated pair, at both of its channels."""
    if interleaved:
        s = x[..., 0::2] + x[..., 1::2]
        return torch.stack((s, s), -1).flatten(-2)
    half = x.shape[-1] // 2
    s = x[..., :half] + x[..., half:]
    return torch.cat((s, s), -1)


def rope(x: Bounded, rotary: Any, positions: torch.Tensor) -> Bounded:
    """``rotary(x)`` in float64 (angles in float64 as the layer's) with its error bounds."""
    pairs = lambda t: _pair_sum(t, rotary.interleaved)  # noqa: E731
    return Bounded(rotary(x.value, positions), pairs(x.err) + rotation_tolerance(pairs(x.value.abs()),
                                                                                rounded_tables=True))


def _problem(q: torch.Tensor, v: torch.Tensor, scale: float, causal: bool, top_left: bool,
             mask: Optional[np.ndarray]) -> Problem:
    b, hq, lq, dk = q.shape
    _, hkv, lk, dv = v.shape
    diag, left, right = band(lq, lk, causal=causal, window=None, top_left=top_left)
    return Problem(b, hq, hkv, lq, lk, dk, dv, "float32", scale, diag, left, right,
                   None if mask is None else tuple(mask.shape))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


@dataclass
class Attention:
    """The float64 pieces of one attention call that the bounds need (keys/values repeated per group)."""

    q: Bounded
    k: Bounded
    v: Bounded
    p: torch.Tensor  # probabilities [B, Hq, Lq, Lk]
    ds: torch.Tensor  # score error bounds δs
    dp: torch.Tensor  # probability error bounds |δP|
    scale: float
    group: int
    problem: Problem
    mask: Optional[np.ndarray]


def _repeat(x: Bounded, group: int) -> Bounded:
    return Bounded(x.value.repeat_interleave(group, 1), x.err.repeat_interleave(group, 1))


def attention(q: Bounded, k: Bounded, v: Bounded, scale: float, causal: bool = False, top_left: bool = False,
              mask: Optional[np.ndarray] = None) -> Tuple[Bounded, Attention]:
    """Attention in float64 (rows that see no key: 0) with the error bounds of its float32 output,
    and the pieces :func:`attention_backward` needs (``mask``: float64 additive, 4-D, -inf hidden)."""
    group = q.value.shape[1] // k.value.shape[1]
    kr, vr = _repeat(k, group), _repeat(v, group)
    s = q.value @ kr.value.transpose(-1, -2) * scale
    if mask is not None:
        s = s + torch.from_numpy(mask).to(s)
    problem = _problem(q.value, v.value, scale, causal, top_left, mask)
    if causal:
        visible = torch.from_numpy(problem.visible(np.arange(s.shape[-2]), np.arange(s.shape[-1])))
        s = s.masked_fill(~visible, -math.inf)
    top = s.amax(-1, keepdim=True)
    e = torch.exp(s - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))
    p = e / e.sum(-1, keepdim=True).clamp_min(1e-300)
    ds = abs(scale) * (q.value.abs() @ kr.err.transpose(-1, -2) + q.err @ kr.value.abs().transpose(-1, -2))
    dp = p * (ds + (p * ds).sum(-1, keepdim=True))
    qn, kn, vn = _np(q.value), _np(k.value), _np(v.value)
    own = tolerance("float32", problem.len_k + problem.dim_k, output_scale(qn, kn, vn, problem, mask),
                    exponent_range(qn, kn, scale, mask))
    out = Bounded(p @ vr.value, own + p @ vr.err + dp @ vr.value.abs())
    return out, Attention(q, k, v, p, ds, dp, scale, group, problem, mask)


def _group_sum(x: torch.Tensor, group: int) -> torch.Tensor:
    b, h, length, d = x.shape
    return x.reshape(b, h // group, group, length, d).sum(2)


def attention_backward(a: Attention, dout: Bounded) -> Tuple[Bounded, Bounded, Bounded]:
    """``(dq, dk, dv)`` in float64 with the error bounds of the float32 backward pass."""
    kr, vr = _repeat(a.k, a.group), _repeat(a.v, a.group)
    p, dp, scale = a.p, a.dp, abs(a.scale)
    o = p @ vr.value
    o_err = p @ vr.err + dp @ vr.value.abs()
    d_p = dout.value @ vr.value.transpose(-1, -2)
    row = (dout.value * o).sum(-1, keepdim=True)
    d_s = p * (d_p - row)
    row_err = (dout.err * o.abs() + dout.value.abs() * o_err).sum(-1, keepdim=True)
    d_p_err = dout.err @ vr.value.abs().transpose(-1, -2) + dout.value.abs() @ vr.err.transpose(-1, -2)
    d_s_err = dp * (d_p - row).abs() + p * (d_p_err + row_err)
    dq = Bounded(a.scale * d_s @ kr.value, scale * (d_s_err @ kr.value.abs() + d_s.abs() @ kr.err))
    dk_full = a.scale * d_s.transpose(-1, -2) @ a.q.value
    dk_err = scale * (d_s_err.transpose(-1, -2) @ a.q.value.abs() + d_s.abs().transpose(-1, -2) @ a.q.err)
    dv_full = p.transpose(-1, -2) @ dout.value
    dv_err = dp.transpose(-1, -2) @ dout.value.abs() + p.transpose(-1, -2) @ dout.err
    own = gradient_tolerances(a.problem, *(_np(x).astype(np.float32) for x in (a.q.value, a.k.value, a.v.value,
                                                                                dout.value)), a.mask)
    dk = Bounded(_group_sum(dk_full, a.group), own[1] + _group_sum(dk_err, a.group))
    dv = Bounded(_group_sum(dv_full, a.group), own[2] + _group_sum(dv_err, a.group))
    return Bounded(dq.value, own[0] + dq.err), dk, dv


def linear_input_gradient(dy: Bounded, weight: torch.Tensor) -> Bounded:
    """The gradient ``dy W`` at the input of ``x Wᵀ + b`` with its error bounds."""
    w = weight.detach().to(torch.float64)
    return Bounded(dy.value @ w, _per_unit(w.shape[0]) * (dy.value.abs() @ w.abs()) + dy.err @ w.abs())


def heads(x: Bounded, n: int, dim: int) -> Bounded:
    """``[B, L, n·dim]`` -> ``[B, n, L, dim]``."""
    b, length = x.value.shape[:2]
    f = lambda t: t.reshape(b, length, n, dim).transpose(1, 2)  # noqa: E731
    return Bounded(f(x.value), f(x.err))


def merged(x: Bounded) -> Bounded:
    """``[B, n, L, dim]`` -> ``[B, L, n·dim]``."""
    b, n, length, d = x.value.shape
    f = lambda t: t.transpose(1, 2).reshape(b, length, n * d)  # noqa: E731
    return Bounded(f(x.value), f(x.err))


def plus(*xs: Bounded) -> Bounded:
    """The sum of values computed apart (one rounding per addition)."""
    value = sum(x.value for x in xs)
    return Bounded(value, sum(x.err for x in xs) + (len(xs) - 1) * U32 * sum(x.value.abs() for x in xs))


def rotate_back(dx: Bounded, rotary: Any, positions: torch.Tensor) -> Bounded:
    """The gradient through RoPE (the inverse rotation) with its error bounds."""
    inverse = lambda t: rotary(t, -positions)  # noqa: E731  a rotation's transpose is the opposite angle
    pairs = lambda t: _pair_sum(t, rotary.interleaved)  # noqa: E731
    return Bounded(inverse(dx.value), pairs(dx.err) + rotation_tolerance(pairs(dx.value.abs()), rounded_tables=True))


def additive(mask: Optional[torch.Tensor]) -> Optional[np.ndarray]:
    """A bool (True = attend) or float mask as a float64 additive 4-D array, or None."""
    if mask is None:
        return None
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    if m.dtype == torch.bool:
        return np.where(m.cpu().numpy(), 0.0, -math.inf)
    return m.detach().to(torch.float64).cpu().numpy()


def worst(x: Bounded) -> float:
    """The largest error bound of ``x``."""
    return float(x.err.max())


@dataclass
class Projections:
    """The weights of a projected attention layer (any dtype; used as float64): ``x_q W_qᵀ + b_q``, ..."""

    wq: torch.Tensor
    bq: Optional[torch.Tensor]
    wk: torch.Tensor
    bk: Optional[torch.Tensor]
    wv: torch.Tensor
    bv: Optional[torch.Tensor]
    wo: torch.Tensor
    bo: Optional[torch.Tensor]


def projected_layer(x_q: torch.Tensor, x_k: torch.Tensor, x_v: torch.Tensor, w: Projections, heads_q: int,
                    heads_kv: int, dim: int, scale: float, causal: bool = False, top_left: bool = False,
                    mask: Optional[np.ndarray] = None, rotary: Any = None, q_pos: Optional[torch.Tensor] = None,
                    k_pos: Optional[torch.Tensor] = None, dy: Optional[torch.Tensor] = None
                    ) -> Tuple[Bounded, Optional[Tuple[Bounded, Bounded, Bounded]]]:
    """``o_proj(attention(rope(q_proj x_q), rope(k_proj x_k), v_proj x_v))`` in float64 with its
    float32 error bounds, and with ``dy`` the gradients at ``(x_q, x_k, x_v)`` with theirs
    (inputs that are one tensor: :func:`plus` their gradients)."""
    q = heads(linear(exact(x_q), w.wq, w.bq), heads_q, dim)
    k = heads(linear(exact(x_k), w.wk, w.bk), heads_kv, dim)
    v = heads(linear(exact(x_v), w.wv, w.bv), heads_kv, dim)
    if rotary is not None:
        q, k = rope(q, rotary, q_pos), rope(k, rotary, k_pos)
    o, pieces = attention(q, k, v, scale, causal, top_left, mask)
    out = linear(merged(o), w.wo, w.bo)
    if dy is None:
        return out, None
    dq, dk, dv = attention_backward(pieces, heads(linear_input_gradient(exact(dy), w.wo), heads_q, dim))
    if rotary is not None:
        dq, dk = rotate_back(dq, rotary, q_pos), rotate_back(dk, rotary, k_pos)
    grads = (linear_input_gradient(merged(dq), w.wq), linear_input_gradient(merged(dk), w.wk),
             linear_input_gradient(merged(dv), w.wv))
    return out, grads


def rms_norm(x: Bounded, weight: torch.Tensor, eps: float) -> Bounded:
    """``w·x/rms(x)`` in float64 with its float32 error bounds: the mean square is a sum of ``n``
    squares (conftest's rounding, relative), its root and the two products round once each; to
    first order an input error moves ``x/rms`` by ``E_x/rms + |x|·(Σ|x|E_x)/(n·rms³)``."""
    w = weight.detach().to(torch.float64)
    n = x.value.shape[-1]
    rms = torch.sqrt(x.value.pow(2).mean(-1, keepdim=True) + eps)
    y = w * x.value / rms
    moved = x.err / rms + x.value.abs() * (x.value.abs() * x.err).sum(-1, keepdim=True) / (n * rms**3)
    relative = tolerance("float32", n, 1.0, exponent_range=1.0) / 2 + 3 * U32
    return Bounded(y, w.abs() * moved + relative * y.abs())


def split(x: Bounded, sizes, dim: int = -1) -> Tuple[Bounded, ...]:
    return tuple(Bounded(v, e) for v, e in zip(x.value.split(sizes, dim), x.err.split(sizes, dim)))


def cat(xs, dim: int = -1) -> Bounded:
    return Bounded(torch.cat([x.value for x in xs], dim), torch.cat([x.err for x in xs], dim))


def expand(x: Bounded, *shape: int) -> Bounded:
    return Bounded(x.value.expand(*shape), x.err.expand(*shape))


def per_head(x: Bounded, weight: torch.Tensor) -> Bounded:
    """``x [B, H, L, d] @ weight [H, d, c]`` head by head, with its float32 error bounds."""
    w = weight.detach().to(torch.float64)
    absolute = torch.einsum("bhld,hdc->bhlc", x.value.abs(), w.abs())
    return Bounded(torch.einsum("bhld,hdc->bhlc", x.value, w),
                   _per_unit(w.shape[1]) * absolute + torch.einsum("bhld,hdc->bhlc", x.err, w.abs()))
