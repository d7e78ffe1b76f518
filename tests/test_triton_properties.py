"""Hypothesis-drawn calls of the Triton backend (through ``TRITON_INTERPRET=1``) against a float64
reference written from the definitions alone: no aule_kp band, Problem or scoremods code.

``flash_attention(..., backend="triton")`` on CPU tensors, the registered backend pinned to 16 x 16
tiles so that a few dozen rows and keys cross row blocks, key tiles, band edges and split-KV. Drawn:
batch, GQA group 1..8, lengths around the tile size (1, 15, 16, 17, ...) with Lq > Lk and Lq < Lk,
Dk != Dv, fp32/fp16/bf16, causal (bottom-right), windows (some wider than the sequence), scales of
either sign and 0, bool/float masks of every broadcast shape with hidden rows (-inf, or float32's
minimum as Hugging Face pads), softcap, ALiBi, sinks; forward output and the gradients of q, k, v,
a float mask and the sinks.

Tolerances: ``conftest.output_tolerance`` / ``gradient_tolerances`` (the suite's error model: dtype
eps, reduction length, value range); the reference's own scale and bands come from here.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402
import warnings  # noqa: E402
from typing import Optional, Tuple  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
from conftest import gradient_tolerances, output_tolerance, tolerance  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import aule_kp  # noqa: E402
from aule_kp import dispatch  # noqa: E402
from aule_kp.problem import Problem  # noqa: E402

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.fixture(autouse=True)
def tiny_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """The registered Triton backend on 16 x 16 tiles (the public API's calls go through it)."""
    backend = dispatch.get("triton")
    monkeypatch.setattr(backend, "block_m", 16)
    monkeypatch.setattr(backend, "block_n", 16)


def visible_by_definition(lq: int, lk: int, causal: bool, window: Optional[Tuple[int, int]]) -> torch.Tensor:
    """bool ``[Lq, Lk]``: flash-attn's bottom-right alignment written out: query ``i`` sees key ``j``
    when ``j <= i + Lk - Lq`` (causal) and ``i + Lk - Lq - left <= j <= i + Lk - Lq + right``
    (window; -1 unbounded)."""
    i = torch.arange(lq)[:, None]
    j = torch.arange(lk)[None, :]
    rel = j - (i + lk - lq)
    ok = torch.ones(lq, lk, dtype=torch.bool)
    if causal:
        ok &= rel <= 0
    if window is not None:
        if window[0] >= 0:
            ok &= rel >= -window[0]
        if window[1] >= 0:
            ok &= rel <= window[1]
    return ok


def attention64(q, k, v, *, scale, causal, window, mask, softcap, alibi, sinks):
    """float64 attention from the definition, differentiable in q, k, v, a float mask and sinks.
    A key is seen when the band lets it through and its score is not -inf; a row that sees no key
    is 0; sinks join each row's denominator."""
    group = q.shape[1] // k.shape[1]
    lq, lk = q.shape[2], k.shape[2]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if alibi is not None:
        dist = (torch.arange(lk)[None, :] - (torch.arange(lq)[:, None] + lk - lq)).abs().double()
        slopes = alibi.double().reshape(alibi.shape[0] if alibi.dim() == 2 else 1, -1, 1, 1)
        s = s - slopes * dist
    if mask is not None:
        m = mask
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=torch.float64).masked_fill(~m, -math.inf)
        s = s + m
    seen = visible_by_definition(lq, lk, causal, window) & (s > -math.inf)
    top = torch.where(seen, s, torch.full_like(s, -math.inf)).amax(-1, keepdim=True).detach()
    if sinks is not None:
        top = torch.maximum(top, sinks.detach().double().reshape(1, -1, 1, 1))
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.where(seen, torch.exp(torch.where(seen, s, torch.zeros_like(s)) - top), torch.zeros_like(s))
    total = e.sum(-1, keepdim=True)
    if sinks is not None:
        total = total + torch.exp(sinks.double().reshape(1, -1, 1, 1) - top)
    return (e @ v) / torch.where(total == 0, torch.ones_like(total), total)


LENGTHS = st.sampled_from([1, 2, 15, 16, 17, 31, 33])


@st.composite
def calls(draw, grads: bool):
    dtype = draw(st.sampled_from(list(TORCH_DTYPES)))
    group = draw(st.integers(1, 8))
    hkv = draw(st.integers(1, 2)) if group <= 4 else 1
    b = draw(st.integers(1, 2))
    lq, lk = draw(LENGTHS), draw(LENGTHS)
    dk = draw(st.sampled_from([8, 16, 24, 32]))
    dv = draw(st.sampled_from([dk, 8, 40]))
    causal = draw(st.booleans())
    window = draw(st.one_of(st.none(), st.tuples(st.integers(-1, 40), st.integers(-1, 40))))
    scale = draw(st.one_of(st.none(), st.sampled_from([0.0, -0.3, 0.7, -2.0])))
    mask_kind = draw(st.sampled_from(["none", "bool", "float", "float-min"]))
    mask_shape = None
    if mask_kind != "none":
        mask_shape = (draw(st.sampled_from([1, b])), draw(st.sampled_from([1, group * hkv])),
                      draw(st.sampled_from([1, lq])), draw(st.sampled_from([1, lk])))
    mods = draw(st.sampled_from(["none", "softcap", "alibi", "sinks", "all"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(dtype=dtype, b=b, hq=group * hkv, hkv=hkv, lq=lq, lk=lk, dk=dk, dv=dv, causal=causal,
                window=window, scale=scale, mask_kind=mask_kind, mask_shape=mask_shape, mods=mods, seed=seed,
                grads=grads)


def make(c):
    g = torch.Generator().manual_seed(c["seed"])
    dt = TORCH_DTYPES[c["dtype"]]
    q = torch.randn(c["b"], c["hq"], c["lq"], c["dk"], generator=g).to(dt)
    k = torch.randn(c["b"], c["hkv"], c["lk"], c["dk"], generator=g).to(dt)
    v = torch.randn(c["b"], c["hkv"], c["lk"], c["dv"], generator=g).to(dt)
    mask = None
    if c["mask_kind"] == "bool":
        mask = torch.rand(c["mask_shape"], generator=g) > 0.3
        if mask.shape[2] > 1:
            mask[..., 0, :] = False  # a row hidden by the mask
    elif c["mask_kind"] != "none":  # float: hidden keys and row 0 at -inf, or at float32's minimum (HF)
        hide = -math.inf if c["mask_kind"] == "float" else torch.finfo(torch.float32).min
        mask = torch.randn(c["mask_shape"], generator=g)
        mask = mask.masked_fill(torch.rand(c["mask_shape"], generator=g) < 0.2, hide)
        if mask.shape[2] > 1:
            mask[..., 0, :] = hide
    mods = c["mods"]
    softcap = 5.0 if mods in ("softcap", "all") else 0.0
    alibi = torch.rand(c["hq"], generator=g) * 0.5 if mods in ("alibi", "all") else None
    sinks = torch.randn(c["hq"], generator=g) if mods in ("sinks", "all") else None
    return q, k, v, mask, softcap, alibi, sinks


def tolerances(c, q, k, v, mask, softcap, alibi, sinks, dout=None):
    """The error model's bounds for the call (``conftest``); the Problem only carries the sizes."""
    scale = 1 / math.sqrt(c["dk"]) if c["scale"] is None else c["scale"]
    diag = c["lk"] - c["lq"]
    band = visible_by_definition(c["lq"], c["lk"], c["causal"], c["window"])
    left = None if c["window"] is None or c["window"][0] < 0 else c["window"][0]
    right = None if c["window"] is None or c["window"][1] < 0 else c["window"][1]
    right = 0 if c["causal"] and right is None else (min(right, 0) if c["causal"] else right)
    p = Problem(c["b"], c["hq"], c["hkv"], c["lq"], c["lk"], c["dk"], c["dv"], "float32", scale, diag, left, right,
                None if mask is None else tuple(mask.shape), softcap=softcap, alibi_rows=0 if alibi is None else 1)
    # the band the tolerance's scale uses is this file's own
    assert (torch.from_numpy(p.visible(np.arange(c["lq"]), np.arange(c["lk"]))) == band).all()
    m = None
    if mask is not None:
        m = mask.double().numpy() if mask.dtype != torch.bool else np.where(mask.numpy(), 0.0, -np.inf)
    host = [x.float().numpy() for x in (q, k, v)]
    al = None if alibi is None else alibi[None].numpy()
    sk = None if sinks is None else sinks.numpy()
    out_tol = output_tolerance(p, *host, m, stored=c["dtype"], alibi=al, sinks=sk)
    if dout is None:
        return out_tol, None
    grad_tols = gradient_tolerances(p, *host, dout.float().numpy(), m, stored=c["dtype"], alibi=al, sinks=sk)
    return out_tol, grad_tols


def run_and_check(c) -> None:
    q, k, v, mask, softcap, alibi, sinks = make(c)
    scale = 1 / math.sqrt(c["dk"]) if c["scale"] is None else c["scale"]
    float_mask = mask is not None and mask.dtype != torch.bool
    leaves = [q, k, v] + ([mask] if float_mask else []) + ([sinks] if sinks is not None else [])
    if c["grads"]:
        for x in leaves:
            x.requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's NumPy on -inf lanes
        out = aule_kp.flash_attention(q, k, v, causal=c["causal"], scale=c["scale"], window=c["window"],
                                      attn_mask=mask, softcap=softcap, alibi_slopes=alibi, sinks=sinks,
                                      backend="triton")
    ref64 = [x.detach().double().requires_grad_() for x in leaves]
    r = dict(zip(["q", "k", "v"], ref64[:3]))
    rm = ref64[3] if float_mask else mask
    rs = ref64[-1] if sinks is not None else None
    ref = attention64(r["q"], r["k"], r["v"], scale=scale, causal=c["causal"], window=c["window"], mask=rm,
                      softcap=softcap, alibi=alibi, sinks=rs)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(c["seed"] + 1)).to(q.dtype)
    out_tol, grad_tols = tolerances(c, q.detach(), k.detach(), v.detach(), None if mask is None else mask.detach(),
                                    softcap, alibi, None if sinks is None else sinks.detach(),
                                    dout if c["grads"] else None)
    assert out.dtype == q.dtype and out.shape == ref.shape
    err = (out.detach().double() - ref.detach()).abs().max().item() if out.numel() else 0.0
    assert err <= out_tol, f"out: {err:.3e} > {out_tol:.3e}"
    if not c["grads"]:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = torch.autograd.grad(out, leaves, dout, allow_unused=True)
    want = torch.autograd.grad(ref, ref64, dout.double(), allow_unused=True)
    names = ["dq", "dk", "dv"] + (["dmask"] if float_mask else []) + (["dsinks"] if sinks is not None else [])
    tols = list(grad_tols[:3]) + ([grad_tols[3]] if float_mask else [])
    for i, name in enumerate(names):
        g, w = got[i], want[i]
        w = torch.zeros_like(leaves[i], dtype=torch.float64) if w is None else w
        assert g is not None and g.shape == leaves[i].shape, name
        err = (g.double() - w).abs().max().item() if g.numel() else 0.0
        if i < len(tols):
            tol = tols[i]
        else:  # dsinks: a float32 sum over batches x rows of terms P_sink·rowsum(dO∘O), each <= max|dO| max|O| Dv;
            # each term carries its 16-bit O's roundings, which add like a random walk over the rows.
            rows = c["b"] * c["lq"]
            bound = dout.abs().max().item() * out.detach().abs().max().item() * c["dv"]
            tol = tolerance(c["dtype"], rows + c["dv"], bound * math.sqrt(rows), roundings=4)
        assert err <= tol, f"{name}: {err:.3e} > {tol:.3e}"


SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)


@settings(max_examples=25, **SETTINGS)
@given(calls(grads=False))
def test_forward_matches_definition(c) -> None:
    run_and_check(c)


@settings(max_examples=12, **SETTINGS)
@given(calls(grads=True))
def test_gradients_match_definition(c) -> None:
    run_and_check(c)
