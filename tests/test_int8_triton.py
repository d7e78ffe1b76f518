"""``precision="int8"`` on the Triton backend, through Triton's CPU interpreter (``TRITON_INTERPRET=1``,
set before triton is imported, as tests/test_triton.py does).

Bounds as tests/test_int8.py: the issue's bar against float64 (cosine >= 0.999, relative L1 <= 3%,
and measurably less exact than precision="fp"), and the CPU reference of the same scheme within the
float32 model plus twice ``u16·max|v|`` (each implementation rounds P to 16 bits relative to its own
running maximum); bf16 results add their own storage rounding on both sides.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from test_int8 import (  # noqa: E402
    COSINE_MIN,
    LESS_EXACT,
    REL_L1_MAX,
    check_nonfinite_mask_rows,
    nonfinite_mask_case,
    offset_inputs,
    reference,
    sage_metrics,
    scheme_tolerance,
)

import aule_kp  # noqa: E402
from aule_kp.problem import Problem, band  # noqa: E402


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
def test_triton_int8_bar_and_cpu_scheme(rng, dtype, causal):
    q, k, v = (torch.from_numpy(x).to(getattr(torch, dtype)) for x in offset_inputs(rng, np.float32, 64, lq=70))
    ref = reference(*(x.float().numpy() for x in (q, k, v)), causal=causal)
    out, exact = (aule_kp.flash_attention(q, k, v, causal=causal, backend="triton", precision=precision)
                  for precision in ("int8", "fp"))
    cos, l1, _ = sage_metrics(out.float().numpy(), ref)
    _, l1_fp, _ = sage_metrics(exact.float().numpy(), ref)
    # bf16's own storage rounding (relative L1 ~5e-3) is of the order of int8's error: only "above".
    factor = 1.0 if dtype == "bfloat16" else LESS_EXACT
    assert cos >= COSINE_MIN and l1 <= REL_L1_MAX and l1 > factor * l1_fp, (cos, l1, l1_fp)
    cpu = aule_kp.flash_attention(q, k, v, causal=causal, backend="cpu", precision="int8")
    diag, left, right = band(q.shape[2], k.shape[2], causal=causal, window=None, top_left=False)
    # bf16 inputs are given to the model widened to float32, with the result stored in bf16.
    widened = "float32" if dtype == "bfloat16" else dtype
    p = Problem(1, 4, 2, q.shape[2], k.shape[2], 64, 64, widened, 1 / math.sqrt(64), diag, left, right)
    host = [x.float().numpy() if dtype == "bfloat16" else x.numpy() for x in (q, k, v)]
    np.testing.assert_allclose(out.float().numpy(), cpu.float().numpy(), atol=scheme_tolerance(p, *host, stored=dtype),
                               rtol=0)


def test_triton_int8_mask_and_window(rng):
    q, k, v = (torch.from_numpy(x) for x in offset_inputs(rng, np.float32, 32, hq=2, hkv=1, lq=40, lk=90))
    mask = torch.randn(1, 1, 40, 90) * 2
    ref = reference(q.numpy(), k.numpy(), v.numpy(), window=(30, 0), mask=mask.numpy())
    out = aule_kp.flash_attention(q, k, v, window=(30, 0), attn_mask=mask, backend="triton", precision="int8")
    cos, l1, _ = sage_metrics(out.numpy(), ref)
    assert cos >= COSINE_MIN and l1 <= REL_L1_MAX


def test_triton_int8_nonfinite_and_huge_mask_entries(rng):
    """A mask entry above FLT_MAX / log2(e) overflowed to +inf in the kernels' log2 units: a NaN row
    where that key takes the whole weight (NaN and +inf entries: NaN rows, as aule_kp.nonfinite says)."""
    q, k, v, mask = nonfinite_mask_case(rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's NumPy on NaN and -inf lanes
        out = aule_kp.flash_attention(*(torch.from_numpy(x) for x in (q, k, v)), causal=True,
                                      attn_mask=torch.from_numpy(mask), backend="triton", precision="int8")
    check_nonfinite_mask_rows(q, k, v, mask, out.numpy())
