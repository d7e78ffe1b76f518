"""Score modifiers (softcap, ALiBi, sinks) on the Triton backend through Triton's CPU interpreter,
against the float64 reference: forward (16 x 16 tiles, so rows cross several key tiles, band edges
and, for short query blocks, GQA packing) and gradients of q, k, v and the sinks.

``TRITON_INTERPRET=1`` is set before anything imports triton (see tests/test_triton.py).
Tolerances: the suite's error model with the modifiers' terms (see tests/test_scoremods.py).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402
from dataclasses import replace  # noqa: E402
from typing import Optional  # noqa: E402
from unittest import mock  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from conftest import gradient_tolerances, lse_tolerance, output_tolerance, tolerance  # noqa: E402
from reference import reference_attention, reference_backward, reference_sinks_grad  # noqa: E402

import aule_kp  # noqa: E402
from aule_kp.problem import Problem, band  # noqa: E402
from aule_kp.triton.backend import TritonBackend  # noqa: E402

TINY = TritonBackend(block_m=16, block_n=16)


def _case(b: int, hq: int, hkv: int, lq: int, lk: int, d: int, causal: bool, softcap: float,
          alibi: Optional[str], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(s, generator=g) for s in ((b, hq, lq, d), (b, hkv, lk, d), (b, hkv, lk, d)))
    slopes = None
    if alibi == "head":
        slopes = 2.0 ** (-8.0 * torch.arange(1, hq + 1) / hq)
    elif alibi == "batch":
        slopes = torch.rand((b, hq), generator=g) * 0.5
    diag, left, right = band(lq, lk, causal=causal, window=None, top_left=False)
    p = Problem(b, hq, hkv, lq, lk, d, d, "float32", 1 / math.sqrt(d), diag, left, right, None, "cpu",
                softcap=softcap, alibi_rows=0 if slopes is None else slopes.reshape(-1, hq).shape[0])
    return p, q, k, v, slopes


@pytest.mark.parametrize("softcap,alibi,causal", [
    (0.0, "head", True), (3.0, None, False), (2.0, "batch", True), (5.0, "head", False),
])
@pytest.mark.parametrize("lq", [1, 21])
@pytest.mark.parametrize("sinks", [False, True])
def test_forward(softcap, alibi, causal, lq, sinks):
    """The kernels' (out, lse) with 16 x 16 tiles (lq 1: the query heads of a kv head packed)."""
    p, q, k, v, slopes = _case(2, 4, 2, lq, 37, 32, causal, softcap, alibi)
    sink = torch.tensor([0.5, -1.0, 2.0, 0.0]) if sinks else None
    p = replace(p, sinks=sinks)
    table = None if slopes is None else slopes.reshape(-1, p.heads_q).float()
    out, lse = TINY.forward(p, q, k, v, None, alibi=table, sinks=sink)
    qf, kf, vf = (x.numpy() for x in (q, k, v))
    al = None if slopes is None else slopes.numpy()
    sk = None if sink is None else sink.numpy()
    ref, ref_lse = reference_attention(qf, kf, vf, p, None, al, sk)
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=output_tolerance(p, qf, kf, vf, alibi=al, sinks=sk))
    np.testing.assert_allclose(lse.numpy(), ref_lse, rtol=0, atol=lse_tolerance(qf, kf, p.scale, p=p, alibi=al))


def test_split_kv_sinks():
    """Split-KV partials merged by the combine kernel, which folds the sinks in."""
    from aule_kp.triton import ops

    p, q, k, v, slopes = _case(1, 2, 1, 1, 200, 16, True, 2.0, "head")
    p = replace(p, sinks=True)
    sink = torch.tensor([1.5, -0.5])
    with mock.patch.object(ops, "sm_count", lambda device: 64):  # a GPU's worth of programs: splits
        out, lse = TINY.forward(p, q, k, v, None, alibi=slopes.reshape(1, -1), sinks=sink)
    qf, kf, vf = (x.numpy() for x in (q, k, v))
    ref, ref_lse = reference_attention(qf, kf, vf, p, None, slopes.numpy(), sink.numpy())
    np.testing.assert_allclose(out.numpy(), ref, rtol=0,
                               atol=output_tolerance(p, qf, kf, vf, alibi=slopes.numpy(), sinks=sink.numpy()))
    np.testing.assert_allclose(lse.numpy(), ref_lse, rtol=0,
                               atol=lse_tolerance(qf, kf, p.scale, p=p, alibi=slopes.numpy()))


@pytest.mark.parametrize("softcap,alibi", [(0.0, "batch"), (4.0, "head")])
def test_gradients(softcap, alibi):
    """Gradients of q, k, v and the sinks through ``aule_kp.flash_attention(backend="triton")``."""
    p, q, k, v, slopes = _case(1, 4, 2, 19, 29, 16, True, softcap, alibi, seed=1)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    sinks = torch.tensor([0.3, -0.7, 1.1, 0.0], requires_grad=True)
    out = aule_kp.flash_attention(q, k, v, causal=True, softcap=softcap, alibi_slopes=slopes, sinks=sinks,
                                  backend="triton")
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    grads = torch.autograd.grad(out, (q, k, v, sinks), dout)
    qf, kf, vf, df = (x.detach().numpy() for x in (q, k, v, dout))
    al = None if slopes is None else slopes.numpy()
    sk = sinks.detach().numpy()
    ref_out, _ = reference_attention(qf, kf, vf, p, None, al, sk)
    np.testing.assert_allclose(out.detach().numpy(), ref_out, rtol=0,
                               atol=output_tolerance(p, qf, kf, vf, alibi=al, sinks=sk))
    refs = reference_backward(qf, kf, vf, df, p, None, al, sk)[:3]
    for got, want, tol in zip(grads[:3], refs, gradient_tolerances(p, qf, kf, vf, df, alibi=al, sinks=sk)):
        np.testing.assert_allclose(got.numpy(), want, atol=tol, rtol=0)
    # A float32 sum over batches x rows of terms each at most |D| <= max |dO| |O| summed over Dv.
    bound = float(np.abs(df).max() * np.abs(ref_out).max() * p.dim_v)
    np.testing.assert_allclose(grads[3].numpy(), reference_sinks_grad(qf, kf, vf, df, p, sk, None, al), rtol=0,
                               atol=tolerance("float32", p.batch * p.len_q + p.dim_v, bound, roundings=4))
