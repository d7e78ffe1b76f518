"""NaN and inf inputs follow the documented semantics (README, ``flash_attention``; aule_kp.nonfinite)
on every host-array backend, checked against our own float64 reference (``reference_attention``),
never against another library's NaN positions (torch's CPU kernel places them differently by CPU).

Each case plants one non-finite value in q, k, v or a float mask, inside a row's causal band or
outside it; the result must have exactly the reference's NaN and non-finite entries (and lse), and
every finite entry must be within the error model's tolerance.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import pytest
from conftest import output_tolerance, problem
from reference import reference_attention

import aule_kp.vulkan.device as devmod
from aule_kp import nonfinite
from aule_kp.cpu.backend import CpuBackend
from aule_kp.dtypes import from_f32, to_f32
from aule_kp.nonfinite import all_finite, enforce, poisoned_by_mask
from aule_kp.problem import Problem

needs_vulkan = pytest.mark.skipif(devmod.vulkan_unavailable() is not None, reason="no Vulkan device")


def _vulkan():
    from aule_kp.vulkan.backend import VulkanBackend

    return VulkanBackend()


BACKENDS: Dict[str, Callable[[], object]] = {
    "cpu": lambda: CpuBackend(block_q=8, block_k=8, step=2, workers=2),  # tiles that a row sees partly
    "vulkan": _vulkan,
}
#: (Lq, Lk): causal rows 0..3 of (8, 12) see keys 0..4+i, so key 11 is outside the band of rows < 7.
LQ, LK = 8, 12
NAN, INF = np.float32(np.nan), np.float32(np.inf)

# name -> (what, index, value): q/k/v index (b, h, row, dim), mask index (b, h, row, key)
CASES: Dict[str, Tuple[str, Tuple[int, int, int, int], float]] = {
    "q-nan": ("q", (1, 3, 5, 7), NAN),  # one row NaN
    "k-nan-late-key": ("k", (0, 1, 11, 3), NAN),  # causal: only the last row sees key 11
    "k-nan-early-key": ("k", (1, 0, 2, 0), NAN),  # every row of that head group sees key 2
    "v-nan-late-key": ("v", (0, 1, 11, 3), NAN),  # causal: column 3 of the last row only
    "v-inf": ("v", (1, 0, 2, 5), INF),  # column 5 of every row of the group: inf
    "v-ninf": ("v", (1, 0, 2, 5), -INF),
    "mask-nan-seen": ("mask", (0, 2, 4, 1), NAN),
    "mask-nan-late-key": ("mask", (0, 2, 4, 11), NAN),  # causal: outside row 4's band, no effect
    "mask-inf-seen": ("mask", (1, 1, 6, 3), INF),
    "mask-inf-late-key": ("mask", (1, 1, 6, 11), INF),
    "mask-ninf": ("mask", (1, 1, 6, 3), -INF),  # hides the key
}


def planted_inputs(p: Problem, what: str, index: Tuple[int, int, int, int], value: float):
    rng = np.random.default_rng(3)
    q = rng.standard_normal((p.batch, p.heads_q, p.len_q, p.dim_k)).astype(np.float32)
    k = rng.standard_normal((p.batch, p.heads_kv, p.len_k, p.dim_k)).astype(np.float32)
    v = rng.standard_normal((p.batch, p.heads_kv, p.len_k, p.dim_v)).astype(np.float32)
    mask = rng.standard_normal(p.mask_shape).astype(np.float32)
    {"q": q, "k": k, "v": v, "mask": mask}[what][index] = value
    return q, k, v, mask


def check_semantics(p: Problem, q, k, v, mask: Optional[np.ndarray], out: np.ndarray, lse: np.ndarray) -> None:
    """``(out, lse)`` has the reference's NaN / non-finite pattern and its finite values."""
    ref_out, ref_lse = reference_attention(q, k, v, p, mask)
    got = to_f32(out, p.dtype).astype(np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref_out))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(ref_out))
    np.testing.assert_array_equal(np.isnan(lse), np.isnan(ref_lse))
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    finite = np.isfinite(ref_out)
    clean = [from_f32(np.where(np.isfinite(f), f, 0).astype(np.float32), p.dtype)
             for f in (to_f32(x, p.dtype) for x in (q, k, v))]
    atol = output_tolerance(p, *clean, None if mask is None else np.where(np.isfinite(mask), mask, 0))
    np.testing.assert_allclose(got[finite], ref_out[finite], rtol=0, atol=atol)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("vulkan", marks=needs_vulkan)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_nonfinite_inputs(backend: str, causal: bool, case: str) -> None:
    p = problem(b=2, hq=4, hkv=2, lq=LQ, lk=LK, causal=causal, mask_shape=(2, 4, LQ, LK))
    q, k, v, mask = planted_inputs(p, *CASES[case])
    out, lse = BACKENDS[backend]().forward(p, q, k, v, mask)
    check_semantics(p, q, k, v, mask, out, lse)
    if case.startswith("mask") and case.endswith("late-key") and causal:
        assert np.isfinite(out).all(), "a mask entry outside the causal band reached a row"
    if case in ("k-nan-late-key", "v-nan-late-key") and causal:  # only the last row sees key 11
        assert np.isfinite(out[:, :, :-1]).all() and not np.isfinite(out[0, 2:4, -1]).all()


@pytest.mark.parametrize("backend", ["cpu", pytest.param("vulkan", marks=needs_vulkan)])
def test_masked_key_with_nan_value_never_contributes(backend: str) -> None:
    """Padding: keys hidden by -inf (a False bool entry) hold NaN in v, as uninitialised cache slots
    may; every row that does not see them stays finite, also where a tile mixes seen and hidden keys."""
    p = problem(b=1, hq=2, hkv=1, lq=LQ, lk=LK, mask_shape=(1, 1, 1, LK))
    q, k, v, _ = planted_inputs(p, "v", (0, 0, 9, 0), NAN)
    v[0, 0, 10:] = np.nan
    k[0, 0, 10:] = 1.0  # finite keys: their scores are finite, then hidden by the mask
    mask = np.zeros(p.mask_shape, np.float32)
    mask[..., 9:] = -np.inf
    out, lse = BACKENDS[backend]().forward(p, q, k, v, mask)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    check_semantics(p, q, k, v, mask, out, lse)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("vulkan", marks=needs_vulkan)])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16bit_nonfinite(backend: str, dtype: str) -> None:
    p = problem(b=2, hq=4, hkv=2, lq=LQ, lk=LK, causal=True, dtype=dtype, mask_shape=(2, 4, LQ, LK))
    q, k, v, mask = planted_inputs(p, "v", (0, 1, 11, 3), NAN)
    q[1, 3, 5, 7] = np.nan
    mask[0, 2, 4, 1] = np.nan
    q, k, v = (from_f32(x, dtype) for x in (q, k, v))
    out, lse = BACKENDS[backend]().forward(p, q, k, v, mask)
    check_semantics(p, q, k, v, mask, out, lse)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("vulkan", marks=needs_vulkan)])
def test_decode_row_with_nan_value(backend: str) -> None:
    """Lq = 1 (split-KV decoding where the device takes it): a NaN in v of a key the row does not
    see (a sliding window) leaves the row finite, one it sees makes that column NaN."""
    p = problem(b=1, hq=4, hkv=1, lq=1, lk=300, window=(63, 0))
    q, k, v, _ = planted_inputs(replace(p, mask_shape=(1, 1, 1, 1)), "v", (0, 0, 10, 2), NAN)
    out, lse = BACKENDS[backend]().forward(p, q, k, v, None)
    assert np.isfinite(out).all()
    v[0, 0, 290, 4] = np.nan
    out, lse = BACKENDS[backend]().forward(p, q, k, v, None)
    check_semantics(p, q, k, v, None, out, lse)
    assert np.isnan(out[..., 4]).all() and np.isfinite(np.delete(out, 4, axis=-1)).all()


def test_enforce_is_a_no_op_on_finite_results() -> None:
    p = problem(b=1, hq=2, hkv=1, lq=LQ, lk=LK, mask_shape=(1, 1, LQ, LK))
    q, k, v, mask = planted_inputs(p, "q", (0, 0, 0, 0), 0.5)
    out, lse = CpuBackend().forward(p, q, k, v, mask)
    before = out.copy(), lse.copy()
    enforce(p, q, k, v, mask, out, lse)
    np.testing.assert_array_equal(out, before[0])
    np.testing.assert_array_equal(lse, before[1])
    assert poisoned_by_mask(p, mask) is None and poisoned_by_mask(p, None) is None


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [0, 500, -1])
def test_all_finite(dtype: str, value: float, where: int) -> None:
    # Longer than one block of the check (nonfinite._BLOCK), so the last element sits in a partial block.
    a = from_f32(np.linspace(-60000, 60000, nonfinite._BLOCK_BYTES + 7, dtype=np.float32), dtype)
    assert all_finite(a, dtype) and all_finite(a[:0], dtype)
    assert all_finite(a.view(np.uint8), dtype)  # the copy threads check raw bytes
    a[where] = from_f32(np.array([value], np.float32), dtype)[0]
    assert not all_finite(a, dtype) and not all_finite(a.view(np.uint8), dtype)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("vulkan", marks=needs_vulkan)])
@pytest.mark.parametrize("what", ["k", "v", "mask"])
def test_backward_ignores_keys_outside_the_band(backend: str, what: str) -> None:
    """Keys 0 and 1 are outside every row's window (rows see keys i + 2 .. i + 4): a NaN there, in
    k or the mask, reaches neither the forward nor any gradient, and their dk, dv are 0. A NaN v
    may still make that key's own dk and mask gradient NaN (the Vulkan kernel forms its dS as
    0 * NaN), nothing else. (Within a row's band, gradients through a non-finite value are NaN
    where they touch it.)"""
    p = problem(b=1, hq=2, hkv=1, lq=LQ, lk=LK, window=(2, 0), mask_shape=(1, 1, LQ, LK))
    q, k, v, mask = planted_inputs(p, "q", (0, 0, 0, 0), 0.5)
    {"k": k, "v": v, "mask": mask}[what][0, 0, 1 if what == "mask" else 0, 0] = np.nan
    dout = np.random.default_rng(4).standard_normal((1, 2, LQ, p.dim_v)).astype(np.float32)
    be = BACKENDS[backend]()
    out, lse = be.forward(p, q, k, v, mask)
    check_semantics(p, q, k, v, mask, out, lse)
    dq, dk, dv, dmask = be.backward(p, q, k, v, out, dout, lse, mask, True)
    if what == "v":
        dk, dmask = dk[:, :, 1:], dmask[..., 1:]  # the NaN value's own key
    assert all(np.isfinite(g).all() for g in (dq, dk, dv, dmask))
    assert not dv[0, 0, :2].any() and not dk[0, 0, : 1 if what == "v" else 2].any()


@needs_vulkan
@pytest.mark.parametrize("where", ["device", "host"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_output_check_where_it_runs(where: str, dtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host call's output check runs on the device (kp patch 5: glsl/nonfinite_count.comp behind a
    compute barrier) or, with an older kp, in the copy threads: both see a NaN row and, on the next
    call, a clean output again."""
    from aule_kp.vulkan import plan as planmod
    from aule_kp.vulkan.backend import VulkanBackend

    dev = devmod.get_device()
    if where == "device" and dev.kp_patch < planmod.COMPUTE_BARRIER_PATCH:
        pytest.skip("this kp has no compute barrier (patch 5)")
    if where == "host":
        monkeypatch.setattr(planmod, "COMPUTE_BARRIER_PATCH", 1 << 30)
    p = problem(b=2, hq=2, hkv=1, lq=5, lk=9, dk=16, dv=16, dtype=dtype)
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((2, 2, 5, 16), (2, 1, 9, 16), (2, 1, 9, 16)))
    plan = planmod.Plan(dev, p, VulkanBackend().config(p))
    try:
        assert plan.device_check == (where == "device")
        runs = []
        for poison in (False, True, False):
            qq = q.copy()
            if poison:
                qq[1, 0, 3, 2] = np.nan  # one row's scores NaN: that output row is NaN
            out, _, finite = plan.run_checked(*(from_f32(x, dtype) for x in (qq, k, v)), None)
            runs.append((finite, bool(np.isfinite(to_f32(out, dtype)).all())))
        assert runs == [(True, True), (False, False), (True, True)]
    finally:
        plan.destroy()
