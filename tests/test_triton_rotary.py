"""RoPE fused into the Triton kernels' loads (``aule_kp.triton.rotary``), through Triton's CPU
interpreter, against float64: rotate (float64, autograd) then attend, gradients of the unrotated q
and k. Most cases pin 16 x 16 tiles so that rows cross several key tiles and band edges.

Tolerances (``rotary_tolerances``): the suite's error model (``conftest``) evaluated on the
rotated q and k, plus a rotation term derived there: the kernels attend over rotated operands that
differ from the exact rotation by their float32 rotation and, for 16-bit inputs, their rounding
to the input dtype before the dot. That term is a worst case (every rounding aligned): for 16-bit
inputs it is some 10-1000 times the errors seen, so the float32 cases carry the sensitivity, and
``test_tolerance_sees_a_wrong_rotation`` checks that the 16-bit bounds still reject wrong rotations.

``TRITON_INTERPRET=1`` is set before anything imports triton (see tests/test_triton.py).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402
import warnings  # noqa: E402
from dataclasses import replace  # noqa: E402
from typing import Dict, Optional, Tuple  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from conftest import (  # noqa: E402
    UNIT_ROUNDOFF,
    gradient_tolerances,
    lse_tolerance,
    output_tolerance,
    rotation_tolerance,
)
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from reference import _probabilities, backward_scales, output_scale  # noqa: E402
from test_triton import TINY, attend64, make_inputs, make_problem  # noqa: E402

import aule_kp  # noqa: E402
from aule_kp.nn.positions import RotaryEmbedding  # noqa: E402
from aule_kp.problem import Problem  # noqa: E402
from aule_kp.rotary import rotate_host  # noqa: E402
from aule_kp.triton import rotary as triton_rotary  # noqa: E402
from aule_kp.triton.backend import TritonBackend  # noqa: E402
from aule_kp.triton.rotary import attend_rotary, check_rotary, rotary_attention  # noqa: E402

U32 = UNIT_ROUNDOFF["float32"]


def tables(rows: int, rotated: int, theta: float = 10000.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """float32 cos/sin ``[rows, rotated/2]`` of RoPE (angles in float64)."""
    freq = theta ** (-torch.arange(0, rotated, 2, dtype=torch.float64) / rotated)
    angles = torch.arange(rows, dtype=torch.float64)[:, None] * freq
    return angles.cos().float(), angles.sin().float()


def rotate64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, interleaved: bool,
             start: int = 0) -> torch.Tensor:
    """float64 ``x [B, H, L, D]`` rotated at ``pos [B or 1, L]`` over channels ``[start, start + R)``
    (differentiable); flash-attn's ``apply_rotary_emb`` (``test_rotate64_is_flash_attn_rotary``)."""
    half = cos.shape[1]
    c = cos.double()[pos.long()][:, None]
    s = sin.double()[pos.long()][:, None]
    seg = x[..., start:start + 2 * half]
    if interleaved:
        x1, x2 = seg[..., 0::2], seg[..., 1::2]
        y = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    else:
        x1, x2 = seg[..., :half], seg[..., half:]
        y = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return torch.cat((x[..., :start], y, x[..., start + 2 * half:]), dim=-1)


def pair_magnitude(x: torch.Tensor, half: int, interleaved: bool, start: int) -> np.ndarray:
    """``rho_d = |x_d| + |x_partner(d)|`` on the rotated channels, 0 on the others (float64)."""
    a = x.double().abs()
    rho = torch.zeros_like(a)
    seg = a[..., start:start + 2 * half]
    if interleaved:
        pair = seg.reshape(*seg.shape[:-1], half, 2).sum(-1, keepdim=True).expand(*seg.shape[:-1], half, 2)
        rho[..., start:start + 2 * half] = pair.flatten(-2)
    else:
        pair = seg[..., :half] + seg[..., half:]
        rho[..., start:start + 2 * half] = torch.cat((pair, pair), dim=-1)
    return rho.numpy()


def rotary_tolerances(p: Problem, x: Dict[str, torch.Tensor], q_rot: np.ndarray, k_rot: np.ndarray,
                      rho_q: np.ndarray, rho_k: np.ndarray) -> Dict[str, float]:
    """Max abs errors of ``out, lse, dq, dk, dv`` for inputs ``x`` (q, k, v, dout, mask; storage
    dtype ``p.dtype``) whose exact rotations are ``q_rot``/``k_rot`` (float64).

    Model: the kernels compute attention, within the suite's error model (``conftest``, evaluated on
    the rotated operands), of rotated operands ``q~``, ``k~``. Each rotated lane is rotated in
    float32, within ``r = conftest.rotation_tolerance(rho, "float32")`` of the exact rotation
    (``rho_d = |x_d| + |x_partner|``; the tables are inputs, exact), then, for 16-bit inputs, rounded
    to the input dtype (``u_dt (|x'_d| + r)``; the reference here does not round):
    ``|q~ - q'| <= dq = r (1 + u_dt) + u_dt |q'|`` on rotated lanes, 0 on the others (likewise
    ``dk``). Worst case, not probabilistic:

    * a score moves by at most ``E = scale max_ij sum_d (dq |k'| + |q'| dk + dq dk)``, the row's
      log-sum-exp by at most ``E``, so every weight ``P`` by a factor within ``exp(+-2E)``:
      ``eta = expm1(2E)``; out ``<= eta max P|V|``; lse ``<= E``; dv ``<= eta max P^T|dO|``;
    * ``dS = P (dP - D)``, ``D = sum P dP``: ``|dS~ - dS| <= eta (2 + eta) A'`` with
      ``A' = P (|dO||V|^T + rowsum(|dO| (P|V|)))`` (>= ``|dS|``), so the rotated-query gradient
      ``scale dS~ k~`` moves by ``scale A' (eta (2 + eta)(|k'| + dk) + dk)`` (and dk's likewise);
    * the kernels rotate dq/dk back by ``R^T``: a pair of errors ``e`` becomes ``c e_1 + s e_2``,
      at most ``sqrt(2) max |e|``, plus that float32 rotation's own ``2 u32 (|g_1| + |g_2|)``.
    """
    p32 = replace(p, dtype="float32")  # the operands given widened; `stored` keeps p.dtype's rounding
    u_dt = 0.0 if p.dtype == "float32" else UNIT_ROUNDOFF[p.dtype]
    widen = {n: (None if x[n] is None else x[n].float().numpy()) for n in ("q", "k", "v", "dout", "mask")}
    qr, kr = q_rot.astype(np.float32), k_rot.astype(np.float32)
    v, dout, mask = widen["v"], widen["dout"], widen["mask"]
    dq_in = rotation_tolerance(rho_q) * (1 + u_dt) + u_dt * np.abs(q_rot)
    dk_in = rotation_tolerance(rho_k) * (1 + u_dt) + u_dt * np.abs(k_rot)
    krep = lambda a: np.repeat(a, p.group, axis=1)  # noqa: E731
    aq, ak = np.abs(q_rot), krep(np.abs(k_rot))
    dkr = krep(dk_in)
    e = p.scale * float((dq_in @ ak.swapaxes(-1, -2) + aq @ dkr.swapaxes(-1, -2)
                         + dq_in @ dkr.swapaxes(-1, -2)).max(initial=0.0))
    eta = math.expm1(2 * e)

    out_tol = output_tolerance(p32, qr, kr, v, mask, stored=p.dtype) + eta * output_scale(qr, kr, v, p32, mask)
    lse_tol = lse_tolerance(qr, kr, p.scale, mask) + e
    g_q, g_k, g_v, _ = gradient_tolerances(p32, qr, kr, v, dout, mask, stored=p.dtype)
    s_q, s_k, s_v, _ = backward_scales(qr, kr, v, dout, p32, mask)

    prob = _probabilities(qr, kr, p32, mask)
    av, ado = krep(np.abs(v.astype(np.float64))), np.abs(dout.astype(np.float64))
    a_wide = prob * (ado @ av.swapaxes(-1, -2) + (ado * (prob @ av)).sum(-1, keepdims=True))
    w = eta * (2 + eta)
    t_q = p.scale * float((a_wide @ (w * (ak + dkr) + dkr)).max(initial=0.0))
    per_group = (p.batch, p.heads_kv, p.group, p.len_k, p.dim_k)
    q_side = w * (aq + dq_in) + dq_in
    t_k = p.scale * float((a_wide.swapaxes(-1, -2) @ q_side).reshape(per_group).sum(2).max(initial=0.0))
    root2 = math.sqrt(2.0)
    return {"out": out_tol, "lse": lse_tol, "dq": root2 * (g_q + t_q) + 4 * U32 * s_q,
            "dk": root2 * (g_k + t_k) + 4 * U32 * s_k, "dv": g_v + eta * s_v}


def positions(p: Problem, q_offset: int, per_batch: bool, shuffle: bool, seed: int) -> Tuple[torch.Tensor, ...]:
    """int64 ``(q_pos [B, Lq], k_pos [B, Lk])``: a decode-like ``q_offset + arange(Lq)`` and
    ``arange(Lk)``, shifted by ``7 b`` per batch with ``per_batch``; with ``shuffle``, arbitrary
    positions (a random draw with repeats)."""
    g = torch.Generator().manual_seed(seed + 1)
    shift = 7 * torch.arange(p.batch)[:, None] if per_batch else torch.zeros(p.batch, 1, dtype=torch.int64)
    q_pos = q_offset + torch.arange(p.len_q)[None] + shift
    k_pos = torch.arange(p.len_k)[None] + shift
    if shuffle:
        q_pos = torch.randint(0, 3 * (p.len_q + p.len_k), q_pos.shape, generator=g)
        k_pos = torch.randint(0, 3 * (p.len_q + p.len_k), k_pos.shape, generator=g)
    return q_pos, k_pos


def run(p: Problem, *, rotated: Optional[int] = None, start: int = 0, interleaved: bool = False, q_offset: int = 5,
        per_batch: bool = False, shuffle: bool = False, seed: int = 0, backend: TritonBackend = TINY,
        public: bool = False) -> Dict[str, float]:
    """Forward and backward with the rotation fused, checked against float64; returns the errors.
    ``public`` runs :func:`rotary_attention` (autograd, the default tiles) instead of ``backend``."""
    rotated = p.dim_k if rotated is None else rotated
    x = make_inputs(p, seed)
    q_pos, k_pos = positions(p, q_offset, per_batch, shuffle, seed)
    cos, sin = tables(int(max(q_pos.max(), k_pos.max())) + 1, rotated)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's NumPy on -inf lanes
        if public:
            q, k, v = (x[n].clone().requires_grad_() for n in ("q", "k", "v"))
            mask = None if x["mask"] is None else x["mask"][0, 0]  # a 2-D mask: broadcast by the call
            out, lse = rotary_attention(q, k, v, cos=cos, sin=sin, q_positions=q_pos, k_positions=k_pos,
                                        interleaved=interleaved, rotary_start=start, causal=p.right == 0,
                                        attn_mask=mask)
            out.backward(x["dout"])
            dq, dk, dv = q.grad, k.grad, v.grad
        else:
            rot = check_rotary(p, torch.device("cpu"), cos, sin, q_pos, k_pos, interleaved, start)
            out, lse = backend.forward(p, x["q"], x["k"], x["v"], x["mask"], rotary=rot)
            dq, dk, dv, _ = backend.backward(p, x["q"], x["k"], x["v"], out, x["dout"], lse, x["mask"], rotary=rot)

    q64, k64, v64 = (x[n].double().requires_grad_() for n in ("q", "k", "v"))
    qr, kr = rotate64(q64, cos, sin, q_pos, interleaved, start), rotate64(k64, cos, sin, k_pos, interleaved, start)
    mask64 = None if x["mask"] is None else x["mask"].double()
    ref, ref_lse = attend64(p, qr, kr, v64, mask64)
    ref.backward(x["dout"].double())

    half = rotated // 2
    tol = rotary_tolerances(p, x, qr.detach().numpy(), kr.detach().numpy(), pair_magnitude(x["q"], half, interleaved,
                            start), pair_magnitude(x["k"], half, interleaved, start))
    assert out.dtype == x["q"].dtype and out.shape == ref.shape and lse.dtype == torch.float32
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    errors = {"out": (out.double() - ref).abs().max().item(),
              "lse": (lse.double() - ref_lse)[finite].abs().max().item() if finite.any() else 0.0,
              "dq": (dq.double() - q64.grad).abs().max().item(), "dk": (dk.double() - k64.grad).abs().max().item(),
              "dv": (dv.double() - v64.grad).abs().max().item()}
    for grad, like in ((dq, x["q"]), (dk, x["k"]), (dv, x["v"])):
        assert grad.shape == like.shape and grad.dtype == like.dtype
    for name, err in errors.items():
        assert err <= tol[name], f"{name}: {err:.3e} > {tol[name]:.3e}"
    return errors


CASES = {
    "half-gqa-causal-cache": (dict(hq=4, hkv=2, lq=24, lk=40, causal=True), dict(q_offset=16)),
    "interleaved-causal": (dict(lq=33, lk=33, causal=True), dict(interleaved=True)),
    "half-partial-per-batch": (dict(b=2, dk=32, dv=24), dict(rotated=16, per_batch=True)),
    "interleaved-rope-last-dv>dk": (dict(dk=48, dv=64, lq=20, lk=37, causal=True),
                                    dict(rotated=16, start=32, interleaved=True)),
    "half-odd-start-interleaved": (dict(dk=40, lq=17, lk=30), dict(rotated=6, start=3, interleaved=True)),
    "decode-gqa-packed-split": (dict(hq=8, hkv=2, lq=1, lk=100), dict(q_offset=99)),
    "mqa-dkdv-group-split": (dict(hq=4, hkv=1, lq=20, lk=16, causal=True), dict(q_offset=0)),  # fp32 partials
    "shuffled-positions-mqa": (dict(b=2, hq=4, hkv=1, lq=20, lk=36, causal=True), dict(shuffle=True)),
    "mask-window": (dict(mask_shape=(1, 1, 24, 40), window=(6, 3)), dict(interleaved=True, rotated=16)),
    "lq>lk-hidden-rows": (dict(lq=40, lk=24, causal=True), dict(per_batch=True)),
    "fp16-half-gqa-causal": (dict(dtype="float16", hq=4, hkv=2, causal=True), dict(q_offset=3)),
    "bf16-interleaved-partial": (dict(dtype="bfloat16", dk=32, lq=20, lk=28), dict(rotated=16, interleaved=True)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_against_float64(name: str) -> None:
    shape, rope = CASES[name]
    run(make_problem(**shape), **rope)


def test_public_function_autograd() -> None:
    """:func:`rotary_attention` with autograd on the default tiles: positions ``[L]`` after a cache,
    GQA, causal, a 2-D float mask broadcast by the call."""
    p = make_problem(hq=4, hkv=2, lq=20, lk=70, dk=32, causal=True, mask_shape=(1, 1, 20, 70))
    run(p, interleaved=False, q_offset=50, public=True)


def test_public_function_matches_the_layers_rotation() -> None:
    """Tables from the layers' :class:`RotaryEmbedding` (Llama 3 scaling, both layouts): the fused call
    equals the layers' torch rotation followed by :func:`aule_kp.flash_attention` on Triton."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(s, generator=g) for s in ((1, 4, 12, 32), (1, 2, 30, 32), (1, 2, 30, 16)))
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    p = make_problem(hq=4, hkv=2, lq=12, lk=30, dk=32, dv=16, causal=True)
    for interleaved in (False, True):
        rope = RotaryEmbedding(32, 500000.0, interleaved, scaling)
        cos, sin = rope.cos_sin(torch.arange(30), torch.float32)
        q_pos, k_pos = torch.arange(18, 30), torch.arange(30)
        fused, _ = rotary_attention(q, k, v, cos=cos, sin=sin, q_positions=q_pos, k_positions=k_pos,
                                    interleaved=interleaved, causal=True)
        unfused = aule_kp.flash_attention(rope(q, q_pos), rope(k, k_pos), v, causal=True, backend="triton")
        # each within the output model of the exact result; the layers' float32 rotation rounds as the kernel's
        atol = 2 * output_tolerance(p, q.numpy(), k.numpy(), v.numpy())
        np.testing.assert_allclose(fused.numpy(), unfused.numpy(), atol=atol, rtol=0)


@settings(max_examples=6, deadline=None, derandomize=True, database=None)
@given(b=st.integers(1, 2), group=st.sampled_from([1, 2, 4]), lq=st.integers(1, 40), lk=st.integers(1, 40),
       dk=st.sampled_from([16, 32, 40]), dv=st.sampled_from([16, 24]), causal=st.booleans(),
       interleaved=st.booleans(), dtype=st.sampled_from(["float32", "float32", "float16"]),
       rot_frac=st.floats(0.0, 1.0), start_frac=st.floats(0.0, 1.0), q_offset=st.integers(0, 30),
       per_batch=st.booleans(), shuffle=st.booleans(), seed=st.integers(0, 2**16))
def test_random_problems(b, group, lq, lk, dk, dv, causal, interleaved, dtype, rot_frac, start_frac, q_offset,
                         per_batch, shuffle, seed) -> None:
    rotated = 2 * max(1, round(rot_frac * dk / 2))
    start = round(start_frac * (dk - rotated))
    p = make_problem(b=b, hq=2 * group, hkv=2, lq=lq, lk=lk, dk=dk, dv=dv, dtype=dtype, causal=causal)
    run(p, rotated=rotated, start=start, interleaved=interleaved, q_offset=q_offset, per_batch=per_batch,
        shuffle=shuffle, seed=seed)


def test_rotate64_is_flash_attn_rotary() -> None:
    """The float64 reference rotation is the NumPy one of ``flash_attention_with_kvcache``
    (``aule_kp.rotary.rotate_host``, flash-attn's ``apply_rotary_emb``), both layouts, R < D."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 7, 24, generator=g)  # [B, H, L, D]
    cos, sin = tables(20, 16)
    pos = torch.randint(0, 20, (2, 7), generator=g)
    for interleaved in (False, True):
        want = rotate_host(x.numpy(), cos.numpy(), sin.numpy(), pos.numpy(), interleaved).transpose(0, 2, 1, 3)
        got = rotate64(x.double(), cos, sin, pos, interleaved).transpose(1, 2).numpy()
        # rotate_host rotates in float32: within the rotation model of the float64 one
        np.testing.assert_allclose(got, want, rtol=0, atol=rotation_tolerance(2 * float(x.abs().max())))


def test_tolerance_sees_a_wrong_rotation() -> None:
    """At fp16 (the loosest rotation term here: a worst case, all roundings aligned) the tolerances
    still reject the results of a wrong rotation: keys one position off, the other layout, and
    gradients left in the rotated frame (``R^T`` not applied)."""
    p = make_problem(dtype="float16", hq=4, hkv=2, lq=24, lk=40, causal=True)
    x = make_inputs(p)
    q_pos, k_pos = positions(p, 16, False, False, 0)
    cos, sin = tables(64, p.dim_k)
    rot = check_rotary(p, torch.device("cpu"), cos, sin, q_pos, k_pos, False, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out, lse = TINY.forward(p, x["q"], x["k"], x["v"], None, rotary=rot)
        dq, dk, _, _ = TINY.backward(p, x["q"], x["k"], x["v"], out, x["dout"], lse, None, rotary=rot)
    q64, k64, v64 = (x[n].double() for n in ("q", "k", "v"))
    half = p.dim_k // 2
    for k_shift, interleaved in ((0, False), (1, False), (0, True)):
        qr, kr = rotate64(q64, cos, sin, q_pos, interleaved), rotate64(k64, cos, sin, k_pos + k_shift, interleaved)
        qr.requires_grad_()
        kr.requires_grad_()
        ref, _ = attend64(p, qr, kr, v64, None)
        ref.backward(x["dout"].double())
        rho_q, rho_k = (pair_magnitude(x[n], half, interleaved, 0) for n in ("q", "k"))
        tol = rotary_tolerances(p, x, qr.detach().numpy(), kr.detach().numpy(), rho_q, rho_k)
        if k_shift or interleaved:
            assert (out.double() - ref).abs().max().item() > tol["out"]
        else:  # the right rotation, gradients of the rotated q and k: not those asked for
            assert (dq.double() - qr.grad).abs().max().item() > tol["dq"]
            assert (dk.double() - kr.grad).abs().max().item() > tol["dk"]


def _args(**change):
    g = torch.Generator().manual_seed(0)
    args = dict(q=torch.randn(1, 2, 8, 16, generator=g), k=torch.randn(1, 1, 8, 16, generator=g),
                v=torch.randn(1, 1, 8, 16, generator=g))
    cos, sin = tables(8, 16)
    options = dict(cos=cos, sin=sin, q_positions=torch.arange(8), k_positions=torch.arange(8))
    options.update(change)
    return args, options


@pytest.mark.parametrize("change,error,match", [
    (dict(cos=np.zeros((8, 8), np.float32)), TypeError, "cos must be a torch.Tensor"),
    (dict(sin=torch.zeros(8, 8, dtype=torch.int32)), TypeError, "sin must be a floating-point"),
    (dict(cos=torch.zeros(8)), ValueError, "cos must be 2-D"),
    (dict(sin=torch.zeros(8, 4)), ValueError, "cos and sin must have one shape"),
    (dict(cos=torch.zeros(8, 12), sin=torch.zeros(8, 12)), ValueError, "must fit q/k's head dim 16"),
    (dict(rotary_start=2), ValueError, r"\[2, 18\) must fit"),
    (dict(rotary_start=-1), ValueError, "rotary_start must be an int >= 0"),
    (dict(interleaved=1), TypeError, "interleaved must be a bool"),
    (dict(top_left="no"), TypeError, "top_left must be a bool"),
    (dict(q_positions=torch.arange(8.0)), TypeError, "q_positions must hold integers"),
    (dict(k_positions=[0, 1]), TypeError, "k_positions must be a torch.Tensor"),
    (dict(q_positions=torch.arange(7)), ValueError, r"q_positions must be \[8\] or \[1, 8\]"),
    (dict(k_positions=torch.zeros(3, 8, dtype=torch.int64)), ValueError, "k_positions must be"),
    (dict(k_positions=torch.arange(1, 9)), ValueError, "k_positions must index the 8 rows"),
    (dict(q_positions=torch.arange(8) - 1), ValueError, r"values -1 \.\. 6"),
    (dict(cos=torch.zeros(8, 8, requires_grad=True)), ValueError, "no gradient for cos"),
    (dict(attn_mask=torch.zeros(8, 8, requires_grad=True)), ValueError, "no gradient for attn_mask"),
    (dict(causal=1), TypeError, "causal must be a bool"),
])
def test_bad_arguments_are_named(change, error, match) -> None:
    args, options = _args(**change)
    with pytest.raises(error, match=match):
        rotary_attention(**args, **options)


def test_given_positions_are_checked_made_ones_are_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """:func:`rotary_attention` reads back the range of the positions it is given (q's and k's: the
    sync) and names the one out of range; ``positions_in_range=True`` (the layers' call through
    :func:`attend_rotary`, positions they made) reads none back, takes float32 contiguous tables
    without a copy, and gives the same result bit for bit."""
    checks = []
    real = triton_rotary._check_range
    monkeypatch.setattr(triton_rotary, "_check_range", lambda *a: checks.append(a[0]) or real(*a))
    args, options = _args()
    want, want_lse = rotary_attention(**args, **options)
    assert checks == ["q_positions", "k_positions"]
    with pytest.raises(ValueError, match="k_positions must index the 8 rows"):
        rotary_attention(**args, **{**options, "k_positions": torch.arange(1, 9)})
    checks.clear()
    got, got_lse = attend_rotary(**args, **options, positions_in_range=True)
    assert checks == [] and torch.equal(got, want) and torch.equal(got_lse, want_lse)
    p = make_problem(hq=2, hkv=1, lq=8, lk=8, dk=16, dv=16)
    rot = check_rotary(p, torch.device("cpu"), options["cos"], options["sin"], options["q_positions"],
                       options["k_positions"], False, 0, positions_in_range=True)
    assert checks == [] and all(getattr(rot, n).data_ptr() == options[n].data_ptr() for n in ("cos", "sin"))
    with pytest.raises(TypeError, match="positions_in_range must be a bool"):
        attend_rotary(**args, **options, positions_in_range=1)


def test_bad_tensors_are_named() -> None:
    args, options = _args()
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        rotary_attention(args["q"].numpy(), args["k"], args["v"], **options)
    with pytest.raises(ValueError, match="q's heads"):
        rotary_attention(args["q"][:, :1].expand(1, 3, 8, 16), args["k"].expand(1, 2, 8, 16),
                         args["v"].expand(1, 2, 8, 16), **options)


def test_no_queries_gives_empty_output_and_zero_gradients() -> None:
    q = torch.zeros(1, 2, 0, 16, requires_grad=True)
    k = torch.randn(1, 1, 8, 16, requires_grad=True)
    v = torch.randn(1, 1, 8, 16, requires_grad=True)
    cos, sin = tables(8, 16)
    out, lse = rotary_attention(q, k, v, cos=cos, sin=sin, q_positions=torch.arange(0),
                                k_positions=torch.arange(8), causal=True)
    assert out.shape == (1, 2, 0, 16) and lse.shape == (1, 2, 0)
    out.sum().backward()
    assert not k.grad.any() and not v.grad.any()


def test_int8_refuses_rotary() -> None:
    p = replace(make_problem(), precision="int8")
    cos, sin = tables(64, 16)
    rot = check_rotary(p, torch.device("cpu"), cos, sin, torch.arange(24), torch.arange(40), False, 0)
    with pytest.raises(ValueError, match="int8"):
        TINY.forward(p, torch.zeros(1, 2, 24, 32), torch.zeros(1, 2, 40, 32), torch.zeros(1, 2, 40, 32), None,
                     rotary=rot)


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    args, options = _args()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(aule_kp.BackendUnavailable, match="CPU"):
        rotary_attention(**args, **options)
