"""The ComfyUI override (comfyui_aule/override.py) against ComfyUI's own ``attention_pytorch`` run on
float64 copies (torch's SDPA in float64), arguments drawn by hypothesis; tests/test_comfyui.py holds the
fixed cases, the ComfyUI snapshot set-up and the fixtures used here.

Drawn: ComfyUI's two layouts (``[B, N, H*D]`` with ``heads``, or ``skip_reshape`` ``[B, H, N, D]``,
where k/v may carry fewer heads: GQA), either output layout, float32/float16/bfloat16, head dims for q/k
and v (Dv may differ where ComfyUI's layouts allow it), query and key lengths from 1, and masks as
ComfyUI's callers pass them: none, or float/bool of 2, 3 or 4 dims with size-1 broadcast dims, float
masks in q's dtype or float32, bool masks that hide whole rows. Every drawn call is one aule-kp takes:
it must not fall back (counted by the ``calls`` fixture) and must match within the error model's
tolerance (conftest.tolerance: a 16-bit result rounds once more; the inputs are exact in both). A row a
mask hides entirely is 0 (README), where SDPA gives NaN.
"""

from __future__ import annotations

from typing import Any, Dict, List

import pytest
import torch
from conftest import exponent_range, tolerance
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_comfyui import _override, calls, comfy  # noqa: F401 (fixtures)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@st.composite
def problems(draw: Any) -> Dict[str, Any]:
    skip_reshape = draw(st.booleans())
    hkv = draw(st.sampled_from([1, 2]))
    heads = hkv * (draw(st.sampled_from([1, 2])) if skip_reshape else 1)
    mask_dims = draw(st.sampled_from([0, 2, 3, 4]))
    skip_output_reshape = draw(st.booleans())
    dk = draw(st.sampled_from([8, 16]))
    # ComfyUI reshapes v and the output with q's head dim: Dv may differ only in [B, H, N, D] in and out.
    dv = draw(st.sampled_from([8, 16])) if skip_reshape and skip_output_reshape else dk
    return dict(skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape,
                dtype=draw(st.sampled_from(list(DTYPES))), b=draw(st.sampled_from([1, 2])), heads=heads, hkv=hkv,
                lq=draw(st.integers(1, 12)), lk=draw(st.integers(1, 12)), dk=dk, dv=dv, mask_dims=mask_dims,
                mask_kind=draw(st.sampled_from(["bool", "float_q", "float32"])),
                # which dims of the mask but the last are broadcast (size 1): a bit per dim, first dim first
                broadcast=draw(st.integers(0, 15)), seed=draw(st.integers(0, 2**16)))


def _mask(p: Dict[str, Any], g: torch.Generator) -> Any:
    if not p["mask_dims"]:
        return None
    full = {2: (p["lq"], p["lk"]), 3: (p["b"], p["lq"], p["lk"]), 4: (p["b"], p["heads"], p["lq"], p["lk"])}
    dims = full[p["mask_dims"]]
    shape = [1 if p["broadcast"] >> i & 1 and i < len(dims) - 1 else s for i, s in enumerate(dims)]
    if p["mask_kind"] == "bool":
        return torch.rand(shape, generator=g) < 0.7
    dtype = DTYPES[p["dtype"]] if p["mask_kind"] == "float_q" else torch.float32
    m = torch.randn(shape, generator=g)
    return torch.where(torch.rand(shape, generator=g) < 0.2, float("-inf"), m).to(dtype)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(p=problems())
def test_override_matches_sdpa_float64(comfy: Any, calls: List[Dict[str, Any]], p: Dict[str, Any]) -> None:  # noqa: F811
    calls.clear()
    g = torch.Generator().manual_seed(p["seed"])
    b, h, hkv, lq, lk, dk, dv = p["b"], p["heads"], p["hkv"], p["lq"], p["lk"], p["dk"], p["dv"]
    dtype = DTYPES[p["dtype"]]
    if p["skip_reshape"]:
        shapes = ((b, h, lq, dk), (b, hkv, lk, dk), (b, hkv, lk, dv))
    else:
        shapes = ((b, lq, h * dk), (b, lk, h * dk), (b, lk, h * dv))
    q, k, v = (torch.randn(s, generator=g).to(dtype) for s in shapes)
    mask = _mask(p, g)
    kw = dict(skip_reshape=p["skip_reshape"], skip_output_reshape=p["skip_output_reshape"])
    options = {"optimized_attention_override": _override(comfy, "cpu")}
    got = comfy.attention.attention_pytorch(q, k, v, h, mask, transformer_options=options, **kw)
    assert len(calls) == 1, "the override fell back to ComfyUI's attention"

    # float64 reference: ComfyUI's attention_pytorch on float64 copies; GQA heads repeated for it.
    q64, k64, v64 = (x.double() for x in (q, k, v))
    if p["skip_reshape"] and hkv != h:
        k64, v64 = (x.repeat_interleave(h // hkv, dim=1) for x in (k64, v64))
    m64 = None if mask is None else (mask if mask.dtype == torch.bool else mask.double())
    want = comfy.attention.attention_pytorch(q64, k64, v64, h, m64, **kw)
    assert got.shape == want.shape and got.dtype == dtype
    want = torch.nan_to_num(want, nan=0.0)  # rows a mask hides entirely: 0 here, NaN from SDPA
    heads_layout = [x if p["skip_reshape"] else x.view(b, -1, h, x.shape[-1] // h).transpose(1, 2) for x in (q64, k64)]
    finite = None
    if mask is not None and mask.dtype != torch.bool:
        m4 = mask.double()[:, None] if mask.ndim == 3 else mask.double().reshape((1,) * (4 - mask.ndim) + mask.shape)
        finite = torch.nan_to_num(m4, neginf=0.0).expand(b, h, lq, lk).numpy()
    e = exponent_range(*(x.numpy() for x in heads_layout), dk**-0.5, finite)
    tol = tolerance(p["dtype"], lk + dk, v.double().abs().max().item(), e)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tol)
