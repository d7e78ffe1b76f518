"""The serving calls on the Triton backend through Triton's CPU interpreter (see test_triton.py for
why ``TRITON_INTERPRET=1`` comes first). Triton runs every sequence as its own problem (the keys of
a paged cache gathered first), against the float64 references of serving_reference.py."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import serving_reference as ref  # noqa: E402
from conftest import rotation_tolerance  # noqa: E402
from test_serving import _cache_case, _rotary_tables, _tol, _varlen_case  # noqa: E402

import aule_kp  # noqa: E402


def test_varlen_triton(rng, monkeypatch):
    """Triton takes the sequences as torch tensors where they are, with no host copy of q, k, v."""
    from aule_kp import inputs

    q, k, v, cu_q, cu_k = _varlen_case(rng, [5, 0, 12], [9, 3, 12], 4, 2, 16, 16)
    t = [torch.from_numpy(x) for x in (q, k, v, cu_q, cu_k)]
    hosted = []
    real = inputs.to_host
    monkeypatch.setattr(inputs, "to_host", lambda x, *a: hosted.append(x) or real(x, *a))
    out = aule_kp.flash_attention_varlen(*t, 12, 12, causal=True, backend="triton")
    assert not any(x is y for x in hosted for y in t[:3])
    want = ref.varlen(q, k, v, cu_q, cu_k, 0.25, True)
    np.testing.assert_allclose(out.numpy(), want, atol=_tol("float32", q, k, v, 0.25, 12), rtol=0)


def test_kvcache_triton(rng):
    q, kc, vc, kn, vn, seqlens, table = _cache_case(rng, 2, 2, 2, 1, 16, 2, [7, 20], 16)
    cos, sin = _rotary_tables(32, 16)
    t = {name: torch.from_numpy(x) for name, x in dict(q=q, kc=kc, vc=vc, kn=kn, vn=vn).items()}
    out = aule_kp.flash_attention_with_kvcache(t["q"], t["kc"], t["vc"], t["kn"], t["vn"], cache_seqlens=seqlens,
                                               block_table=table, rotary_cos=cos, rotary_sin=sin,
                                               rotary_interleaved=False, causal=True, backend="triton")
    want, kw, vw, qw = ref.kvcache(q, kc.copy(), vc.copy(), kn, vn, seqlens, table, cos, sin, False, True)
    # The appended keys: a float32 rotation of the new k (tables given: exact) against float64.
    rot_tol = rotation_tolerance(2 * float(np.abs(kn).max()))
    np.testing.assert_allclose(t["kc"].numpy(), kw, atol=rot_tol, rtol=0)
    np.testing.assert_allclose(out.numpy(), want, atol=_tol("float32", qw, kw, vw, 1 / math.sqrt(16), 22), rtol=0)
