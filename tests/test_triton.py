"""Triton backend through Triton's CPU interpreter, against float64 (forward and gradients).

``TRITON_INTERPRET=1`` is set before anything imports triton: ``triton.jit`` decides at decoration
time whether a kernel is compiled or interpreted, and in this mode the backend takes CPU tensors.
The interpreter runs every tile op in NumPy, so shapes are tiny and most cases pin 16 x 16 tiles:
a few dozen rows and keys then cross several row blocks, key tiles, band edges and splits.

Tolerances: max abs errors from the suite's error model (``conftest.tolerance``) for outputs, LSE and
gradients (``conftest.gradient_tolerances``); fp16/bf16 kernels round P and dS to the input type before
the second GEMMs, which the model's 16-bit term covers.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import dataclasses  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import warnings  # noqa: E402
from typing import Dict, Optional, Tuple  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from conftest import gradient_tolerances, lse_tolerance, output_tolerance, tolerance  # noqa: E402
from test_nonfinite import CASES as NONFINITE_CASES  # noqa: E402
from test_nonfinite import LK, LQ, check_semantics, planted_inputs  # noqa: E402

import aule_kp  # noqa: E402
from aule_kp import dispatch  # noqa: E402
from aule_kp.dtypes import from_f32  # noqa: E402
from aule_kp.errors import BackendUnavailable  # noqa: E402
from aule_kp.problem import Problem, band  # noqa: E402
from aule_kp.triton.backend import TritonBackend  # noqa: E402

TINY = TritonBackend(block_m=16, block_n=16)


def make_problem(b: int = 1, hq: int = 2, hkv: int = 2, lq: int = 24, lk: int = 40, dk: int = 32,
                 dv: Optional[int] = None, dtype: str = "float32", causal: bool = False,
                 window: Optional[Tuple[int, int]] = None, top_left: bool = False,
                 mask_shape: Optional[Tuple[int, int, int, int]] = None) -> Problem:
    """A Problem the way the API builds it for CPU torch tensors."""
    diag, left, right = band(lq, lk, causal=causal, window=window, top_left=top_left)
    dv = dk if dv is None else dv
    return Problem(b, hq, hkv, lq, lk, dk, dv, dtype, 1 / math.sqrt(dk), diag, left, right, mask_shape, "cpu")


def make_inputs(p: Problem, seed: int = 0, mask_fill: bool = True) -> Dict[str, Optional[torch.Tensor]]:
    """Seeded q, k, v, dout in the problem's dtype; a float mask with some ``-inf`` (a fully hidden
    row where the mask has rows, a hidden key span where it has keys)."""
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, p.dtype)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dt)

    x: Dict[str, Optional[torch.Tensor]] = {
        "q": rand(p.batch, p.heads_q, p.len_q, p.dim_k),
        "k": rand(p.batch, p.heads_kv, p.len_k, p.dim_k),
        "v": rand(p.batch, p.heads_kv, p.len_k, p.dim_v),
        "dout": rand(p.batch, p.heads_q, p.len_q, p.dim_v),
        "mask": None,
    }
    if p.mask_shape is not None:
        mask = torch.randn(p.mask_shape, generator=g)
        if mask_fill and p.mask_shape[2] > 3:
            mask[..., 3, :] = -math.inf
        if mask_fill and p.mask_shape[3] > 9:
            mask[..., 5:9] = -math.inf
        x["mask"] = mask
    return x


def attend64(p: Problem, q, k, v, m):
    """float64 ``(out, lse)`` of naive attention (hidden rows: 0), differentiable in q, k, v and m."""
    s = q @ k.repeat_interleave(p.group, 1).transpose(-1, -2) * p.scale
    visible = torch.from_numpy(p.visible(np.arange(p.len_q), np.arange(p.len_k)))
    s = s.masked_fill(~visible, -math.inf)
    if m is not None:
        s = s + m
    top = s.amax(-1, keepdim=True).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.exp(s - top)
    total = e.sum(-1, keepdim=True)
    out = (e @ v.repeat_interleave(p.group, 1)) / torch.where(total == 0, torch.ones_like(total), total)
    lse = torch.where(total[..., 0] == 0, -math.inf, (top + torch.log(total))[..., 0])
    return out, lse


def reference(p: Problem, q, k, v, mask, dout):
    """float64 ``(out, lse, dq, dk, dv, dmask)`` by autograd over naive attention (hidden rows: 0)."""
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    m = None if mask is None else mask.double().requires_grad_()
    out, lse = attend64(p, q, k, v, m)
    out.backward(dout.double())
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad, None if m is None else m.grad


def check(p: Problem, backend: TritonBackend = TINY, seed: int = 0, grads: bool = True, mask_fill: bool = True):
    """Forward (and backward) of ``backend`` against the float64 reference."""
    x = make_inputs(p, seed, mask_fill)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's NumPy on -inf lanes
        out, lse = backend.forward(p, x["q"], x["k"], x["v"], x["mask"])
        got = backend.backward(p, x["q"], x["k"], x["v"], out, x["dout"], lse, x["mask"], mask_grad=True) \
            if grads else None
    ref = reference(p, x["q"], x["k"], x["v"], x["mask"], x["dout"])
    assert out.dtype == x["q"].dtype and out.shape == ref[0].shape and lse.dtype == torch.float32
    assert not torch.isnan(out).any()
    qf, kf = (x[n].float().numpy() for n in ("q", "k"))
    mask = None if x["mask"] is None else x["mask"].numpy()
    storage = [from_f32(x[n].float().numpy(), p.dtype) for n in ("q", "k", "v", "dout")]
    atol = output_tolerance(p, *storage[:3], mask)
    np.testing.assert_allclose(out.double().numpy(), ref[0].numpy(), atol=atol, rtol=0)
    np.testing.assert_array_equal(torch.isfinite(lse).numpy(), torch.isfinite(ref[1]).numpy())
    finite = torch.isfinite(ref[1])
    np.testing.assert_allclose(lse[finite].double().numpy(), ref[1][finite].numpy(), rtol=0,
                               atol=lse_tolerance(qf, kf, p.scale, mask))
    if got is None:
        return out, lse, None
    tols = gradient_tolerances(p, *storage, mask)
    for name, g, r, like, tol in zip(("dq", "dk", "dv"), got[:3], ref[2:5], (x["q"], x["k"], x["v"]), tols):
        assert g.shape == like.shape and g.dtype == like.dtype, name
        assert not torch.isnan(g).any(), name
        err = (g.double() - r).abs().max().item()
        assert err <= tol, f"{name}: {err:.2e} vs {tol:.2e}"
    dmask = got[3]
    if x["mask"] is None:
        assert dmask is None
    else:
        assert dmask.shape == x["mask"].shape and dmask.dtype == torch.float32
        err = (dmask.double() - ref[5]).abs().max().item()
        assert err <= tols[3], f"dmask: {err:.2e} vs {tols[3]:.2e}"
    return out, lse, got


CASES = {
    "plain": dict(b=2),
    "causal-bottom-right": dict(causal=True),
    "causal-top-left": dict(causal=True, top_left=True),
    "causal-bottom-right-lq>lk": dict(lq=40, lk=24, causal=True),  # first rows see no key
    "causal-top-left-lq>lk": dict(lq=40, lk=24, causal=True, top_left=True),
    "window": dict(window=(5, 3)),
    "window-left-only": dict(window=(8, -1)),
    "window-right-only": dict(window=(-1, 4), top_left=True),
    "window-causal": dict(window=(6, -1), causal=True, lq=37, lk=37),
    "gqa-causal": dict(hq=4, hkv=2, lq=33, lk=47, causal=True),
    "mqa-window": dict(hq=4, hkv=1, window=(10, 2)),
    "decode-gqa-packed": dict(hq=8, hkv=2, lq=1, lk=100),  # packed heads + split-KV
    "decode-mha-split": dict(hq=2, hkv=2, lq=1, lk=100, causal=True),
    "decode-gqa-causal-lq3": dict(hq=8, hkv=2, lq=3, lk=77, causal=True),
    "dv<dk": dict(dk=40, dv=24),
    "dv>dk": dict(dk=24, dv=72, causal=True),
    "head-dim-256": dict(hq=1, hkv=1, lq=20, lk=33, dk=256, dv=256, causal=True),
    "even-tiles": dict(lq=32, lk=64, causal=True),
    "mask-full": dict(b=2, mask_shape=(2, 2, 24, 40)),
    "mask-bcast-batch-head": dict(b=2, mask_shape=(1, 1, 24, 40), causal=True),
    "mask-key-padding": dict(b=2, hq=4, hkv=2, mask_shape=(2, 1, 1, 40)),
    "mask-bcast-keys": dict(mask_shape=(1, 2, 24, 1), window=(7, 7)),
    "mask-scalar": dict(mask_shape=(1, 1, 1, 1)),
    "mask-decode-gqa": dict(hq=4, hkv=1, lq=2, lk=90, mask_shape=(1, 4, 2, 90)),
    "fp16-causal": dict(dtype="float16", causal=True),
    "fp16-decode-gqa": dict(dtype="float16", hq=8, hkv=2, lq=1, lk=100),
    "fp16-mask-window": dict(dtype="float16", window=(4, 4), mask_shape=(1, 1, 24, 40)),
    "bf16-causal-gqa": dict(dtype="bfloat16", hq=4, hkv=2, causal=True),
    "bf16-dv>dk-mask": dict(dtype="bfloat16", dk=16, dv=48, mask_shape=(1, 2, 24, 40)),
    "bf16-decode": dict(dtype="bfloat16", hq=2, hkv=1, lq=1, lk=70),
}


@pytest.mark.parametrize("name", list(CASES))
def test_against_float64(name: str) -> None:
    check(make_problem(**CASES[name]))


def test_default_tiles() -> None:
    """The heuristic tiles (64-row blocks) on a problem that spans several of them."""
    check(make_problem(hq=2, hkv=1, lq=100, lk=130, dk=64, causal=True), TritonBackend())


def test_decode_takes_split_kv_and_packing(caplog: pytest.LogCaptureFixture) -> None:
    p = make_problem(hq=8, hkv=2, lq=1, lk=100)
    with caplog.at_level(logging.DEBUG, logger="aule_kp"):
        check(p, grads=False)
    found = re.search(r"pack=(\w+), splits=(\d+)", caplog.text)
    assert found and found.group(1) == "True" and int(found.group(2)) > 1


def test_fully_hidden_rows_are_zero_with_zero_gradients() -> None:
    """Rows that see no key: output 0, LSE -inf, no gradient, never NaN (band and mask both)."""
    p = make_problem(lq=40, lk=24, causal=True, mask_shape=(1, 2, 40, 24))  # rows 0..15 hidden by the band
    out, lse, got = check(p)
    hidden = [*range(16), 3]
    assert (out[:, :, hidden] == 0).all() and torch.isneginf(lse[:, :, hidden]).all()
    dq, _, _, dmask = got
    assert (dq[:, :, hidden] == 0).all() and (dmask[:, :, hidden] == 0).all()


@pytest.mark.parametrize("name", ["plain", "gqa-causal", "causal-top-left", "decode-gqa-packed"])
def test_negative_scale(name: str) -> None:
    """A negative scale (torch's SDPA takes any float) on tiles with no band edge and no mask: the
    row max of the scaled scores is the scale times the row *minimum* of q·k. Taking the maximum there
    (the unscaled form's shortcut) left exp2 arguments of |scale|·(max - min)·log2(e) ≈ 250 at
    scale -4: inf, then NaN rows. Tolerances as ``check``'s (the error model holds for any sign)."""
    check(dataclasses.replace(make_problem(**CASES[name]), scale=-4.0))


def test_finfo_min_mask_rows_average_like_float64() -> None:
    """HF-style masks: ``finfo.min`` saturates instead of overflowing to -inf when scaled by log2(e),
    so a row of them averages v uniformly and a partly-min row ignores those keys, as in float64."""
    p = make_problem(mask_shape=(1, 1, 24, 40))
    mask = torch.zeros(p.mask_shape)
    mask[..., 0, :] = torch.finfo(torch.float32).min
    mask[..., 1, 10:] = torch.finfo(torch.float32).min
    x = make_inputs(p)
    out, lse = TINY.forward(p, x["q"], x["k"], x["v"], mask)
    ref = reference(p, x["q"], x["k"], x["v"], mask, x["dout"])
    atol = output_tolerance(p, x["q"].numpy(), x["k"].numpy(), x["v"].numpy(), mask.numpy())
    np.testing.assert_allclose(out.double().numpy(), ref[0].numpy(), atol=atol, rtol=0)
    np.testing.assert_allclose(out[0, :, 0].double().numpy(), x["v"][0].double().mean(1).numpy(), atol=atol, rtol=0)


def test_public_api_runs_triton_on_cpu_tensors() -> None:
    """``backend="triton"`` works through the interpreter; the result matches the CPU backend."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 20, 32, generator=g)
    k = torch.randn(1, 2, 36, 32, generator=g)
    v = torch.randn(1, 2, 36, 32, generator=g)
    mask = torch.rand(20, 36, generator=g) > 0.2
    got = aule_kp.flash_attention(q, k, v, causal=True, attn_mask=mask, backend="triton")
    want = aule_kp.flash_attention(q, k, v, causal=True, attn_mask=mask, backend="cpu")
    assert isinstance(got, torch.Tensor) and got.dtype == q.dtype and got.device == q.device
    # each within its own tolerance of the exact result
    p = make_problem(hq=4, lq=20, lk=36, causal=True, mask_shape=(1, 1, 20, 36))
    atol = 2 * output_tolerance(p, q.numpy(), k.numpy(), v.numpy(), np.where(mask.numpy(), 0, -np.inf))
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=atol, rtol=0)


def test_auto_prefers_cpu_backend_for_cpu_tensors() -> None:
    p = make_problem()
    assert not dispatch.get("triton").problem_reasons(p)
    assert dispatch.select(p, "auto").name != "triton"


def test_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = dispatch.get("triton")
    numpy_problem = Problem(1, 1, 1, 8, 8, 16, 16, "float32", 0.25)
    assert any("NumPy" in r for r in backend.problem_reasons(numpy_problem))
    with pytest.raises(BackendUnavailable, match="NumPy"):
        aule_kp.flash_attention(np.zeros((1, 1, 8, 16), np.float32), np.zeros((1, 1, 8, 16), np.float32),
                                np.zeros((1, 1, 8, 16), np.float32), backend="triton")
    cpu = make_problem()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert any("CPU" in r for r in backend.problem_reasons(cpu))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not backend.problem_reasons(cpu)
    assert dispatch.select(cpu, "auto").name == "cpu"  # the interpreter comes after the CPU backend
    mps = Problem(1, 1, 1, 8, 8, 16, 16, "float32", 0.25, device="mps")
    assert any("'mps'" in r for r in backend.problem_reasons(mps))
    cuda = Problem(1, 1, 1, 8, 8, 16, 16, "float16", 0.25, device="cuda")
    assert not backend.problem_reasons(cuda) and dispatch.select(cuda, "auto").name == "triton"


def test_tile_override_is_validated() -> None:
    with pytest.raises(ValueError, match="power of two"):
        TritonBackend(block_m=24)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", [c for c in NONFINITE_CASES if c != "v-nan-late-key"])
def test_nonfinite_inputs(case: str, causal: bool) -> None:
    """The README's non-finite semantics (test_nonfinite.py), except a non-finite v of a key hidden
    from a row, which this GPU path does not check on the host."""
    p = make_problem(b=2, hq=4, hkv=2, lq=LQ, lk=LK, causal=causal, mask_shape=(2, 4, LQ, LK))
    q, k, v, mask = planted_inputs(p, *NONFINITE_CASES[case])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's NumPy on NaN lanes
        out, lse = TINY.forward(p, *(torch.from_numpy(x) for x in (q, k, v, mask)))
    check_semantics(p, q, k, v, mask, out.numpy(), lse.numpy())


def _huge_masks() -> Dict[str, torch.Tensor]:
    """Masks ``[Lq, Lk]`` whose entries lie beyond float32 / log2(e) or beyond float32: key 3 of every
    row lifted far above the rest, or rows 1 and 4 (and key 6 everywhere) at the dtype's minimum."""
    cases = {}
    for dtype, value in ((torch.float32, 3e38), (torch.float64, 1e39), (torch.float64, torch.finfo(torch.float64).max)):
        m = torch.zeros(8, 20, dtype=dtype)
        m[:, 3] = value
        cases[f"{dtype} {value:g} on key 3"] = m
    for dtype in (torch.float32, torch.float64):
        m = torch.zeros(8, 20, dtype=dtype)
        m[[1, 4]] = torch.finfo(dtype).min
        m[:, 6] = torch.finfo(dtype).min
        cases[f"rows at {dtype}'s minimum"] = m
    return cases


@pytest.mark.parametrize("what", list(_huge_masks()))
def test_huge_float_mask_values_saturate(what: str) -> None:
    """A float mask entry above FLT_MAX / log2(e) (2.4e38) overflowed to +inf when ``_mask_log2``
    scaled it to the kernels' log2 units: a NaN row where float64, the CPU and the Vulkan backends
    give that key the whole weight. It saturates at FLT_MAX now, as the Vulkan kernels' mask term
    does. Against float64 (error-model tolerance; the model leaves out mask entries that float64
    rounds the scores away beside, as here)."""
    mask = _huge_masks()[what]
    p = make_problem(b=1, hq=2, hkv=1, lq=8, lk=20, dk=16, mask_shape=(1, 1, 8, 20))
    x = make_inputs(p, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's NumPy on -inf lanes
        out = aule_kp.flash_attention(x["q"], x["k"], x["v"], attn_mask=mask, backend="triton")
    # finite entries beyond float32 first saturate at its largest magnitude
    # (aule_kp.inputs.mask_to_additive), where float64 gives the same result
    m64 = mask.double().clamp(-torch.finfo(torch.float32).max, torch.finfo(torch.float32).max)
    atol = output_tolerance(p, x["q"].numpy(), x["k"].numpy(), x["v"].numpy(), m64.float().numpy())
    want = reference(p, x["q"], x["k"], x["v"], m64, x["dout"])[0]
    np.testing.assert_allclose(out.double().numpy(), want.numpy(), atol=atol, rtol=0, err_msg=what)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("lk", [48, 80])  # 80: split-KV, one split sees only the overflowing keys
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_scores_overflowing_to_minus_inf_hide_their_keys(dtype: str, lk: int, sign: float) -> None:
    """A scale near the accepted bound (1e38) makes some scores overflow float32 to -inf. Such a key is
    hidden (aule_kp.nonfinite), as the CPU backend and float64 (weight exp(-1e39) = 0) have it. The
    forward's unmasked fast path subtracted a row max still at -inf from itself when a whole key
    tile overflowed: -inf - -inf = NaN, and the row was NaN. Here the first 32 keys score -1.5e39
    (q·k = -1024 in fp16/fp32, exact) and the others 0: the result is the mean of their v."""
    p = dataclasses.replace(make_problem(hq=1, hkv=1, lq=2, lk=lk, dk=16, dtype=dtype), scale=sign * 1e36)
    dt = getattr(torch, dtype)
    q = torch.full((1, 1, 2, 16), 8.0 * sign, dtype=dt)
    k = torch.zeros((1, 1, lk, 16), dtype=dt)
    k[:, :, :32] = -8.0
    v = torch.randn(1, 1, lk, 16, generator=torch.Generator().manual_seed(1)).to(dt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out, lse = TINY.forward(p, q, k, v, None)
    want = v[0, 0, 32:].double().mean(0)
    # The seen keys' scores are equal (exact products): equal weights, so only the float32 sum over the
    # keys and the 16-bit roundings err (the error model with no score range to carry).
    atol = tolerance(dtype, lk + 16, float(v.abs().max()), exponent_range=1.0)
    np.testing.assert_allclose(out[0, 0].double().numpy(), want.expand(2, 16).numpy(), atol=atol, rtol=0)
    assert torch.isfinite(lse).all()


@pytest.mark.parametrize("what", list(_huge_masks()))
@pytest.mark.parametrize("mods", ["none", "sinks-alibi-softcap"])
def test_gradients_of_saturated_rows(what: str, mods: str) -> None:
    """Rows whose scores sit near float32's largest magnitude (a mask saturated there: Hugging Face's
    ``finfo.min`` padding rows, or one key lifted beyond it) have an LSE of ~2.4e38, which cannot
    carry ``log2(l)``: the backward's ``P = exp2(s - lse * log2(e))`` was 0 (padding rows: no
    gradient where float64 has the uniform row's) or inf (the lifted key: NaN gradients). Their max
    and sum are recomputed now (``_bwd_row_stats_kernel``, as the Vulkan backward does). Gradients
    of q, k, v (and the sinks) against float64 autograd, error-model tolerances."""
    mask = _huge_masks()[what]
    m64 = mask.double().clamp(-torch.finfo(torch.float32).max, torch.finfo(torch.float32).max)
    p = make_problem(b=1, hq=2, hkv=1, lq=8, lk=20, dk=16, mask_shape=(1, 1, 8, 20))
    x = make_inputs(p, seed=5)
    sinks = alibi = None
    softcap = 0.0
    if mods != "none":
        sinks, alibi, softcap = torch.tensor([0.5, -1.0]), torch.tensor([0.25, 0.5]), 3.0
        p = dataclasses.replace(p, softcap=softcap, alibi_rows=1, sinks=True)
    leaves = [x[n].clone().requires_grad_() for n in ("q", "k", "v")] + ([sinks.requires_grad_()] if sinks is not None
                                                                         else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's NumPy on -inf lanes
        out = aule_kp.flash_attention(*leaves[:3], attn_mask=mask, softcap=softcap, alibi_slopes=alibi,
                                      sinks=sinks, backend="triton")
        got = torch.autograd.grad(out, leaves, x["dout"])
    ref = [t.detach().double().requires_grad_() for t in leaves]
    s = ref[0] @ ref[1].repeat_interleave(2, 1).transpose(-1, -2) * p.scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if alibi is not None:
        s = s - alibi.double()[:, None, None] * (torch.arange(20)[None, :] - torch.arange(8)[:, None] - 12).abs()
    s = s + m64
    if sinks is not None:
        s = torch.cat([s, ref[3].reshape(1, 2, 1, 1).expand(1, 2, 8, 1)], dim=-1)
    want = (torch.softmax(s, -1)[..., :20] @ ref[2].repeat_interleave(2, 1))
    grads = torch.autograd.grad(want, ref, x["dout"].double())
    m32 = m64.float().numpy()
    host = [t.detach().numpy() for t in leaves[:3]]
    al = None if alibi is None else alibi[None].numpy()
    sk = None if sinks is None else sinks.detach().numpy()
    np.testing.assert_allclose(out.detach().double().numpy(), want.detach().numpy(), rtol=0,
                               atol=output_tolerance(p, *host, m32, alibi=al, sinks=sk), err_msg=what)
    tols = gradient_tolerances(p, *host, x["dout"].numpy(), m32, alibi=al, sinks=sk)
    for name, g, r, tol in zip(("dq", "dk", "dv"), got, grads, tols):
        np.testing.assert_allclose(g.double().numpy(), r.numpy(), atol=tol, rtol=0, err_msg=f"{what}: {name}")
    if sinks is not None:  # a float32 sum over rows of terms each at most max|dO| max|O| Dv (test_triton_scoremods)
        bound = float(x["dout"].abs().max() * out.detach().abs().max() * p.dim_v)
        np.testing.assert_allclose(got[3].double().numpy(), grads[3].numpy(), rtol=0,
                                   atol=tolerance("float32", p.len_q + p.dim_v, bound, roundings=4))
