"""The CPU backend's native kernels (aule_kp/cpu/csrc/: forward and backward) at every vector width this CPU
runs, against the float64 reference; their exponential, 16-bit conversions, tile skipping, strided inputs,
the backward's deterministic key ranges, and the NumPy fallback when no build is installed.

tests/test_cpu_backend.py runs every feature through the backend, which takes the widest build; here a grid
and random problems run through each build, since a CI machine without AVX-512 still runs the narrower
ones. Tolerances come from the suite's error model (tests/cpu_cases.py, ``conftest.tolerance``).
"""

from __future__ import annotations

import ctypes
import warnings
from dataclasses import replace
from typing import List, Optional, Tuple

import numpy as np
import pytest
from conftest import UNIT_ROUNDOFF, gradient_tolerances, lse_tolerance, output_tolerance
from cpu_cases import bool_mask, check, check_backward, float_mask, make_inputs, make_mask, make_problem, run_backward
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from reference import reference_attention, reference_backward

from aule_kp import errors
from aule_kp.cpu import backend as cpu_backend
from aule_kp.cpu import native
from aule_kp.cpu.backend import CpuBackend
from aule_kp.dtypes import to_f32
from aule_kp.errors import AuleFallbackWarning
from aule_kp.problem import Problem

U32 = UNIT_ROUNDOFF["float32"]


@pytest.fixture(params=sorted(native.WIDTH_FEATURES, reverse=True), ids=lambda w: f"w{w}")
def kernel(request: pytest.FixtureRequest) -> native.Kernel:
    width = request.param
    if width not in native.supported_widths():
        pytest.skip(f"this CPU cannot run the {width}-float build")
    kern = native.load(width)
    if kern is None:
        pytest.skip("the native CPU kernel is not installed")
    assert kern.width == width
    return kern


#: The kernel's two ways to read K and V: packed (K transposed for the micro-kernels) or direct (rows as they
#: are, all query heads of a kv head in one task); each call takes one by its shape, tests force each.
MODES = {"packed": 0, "direct": 10**9}


@pytest.fixture(params=sorted(MODES))
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    force(monkeypatch, request.param)
    return request.param


def force(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    monkeypatch.setattr(native, "_DIRECT_POSITIONS", MODES[mode])
    monkeypatch.setattr(native, "_DIRECT_ROWS", MODES[mode])


def backend_of(kern: native.Kernel, monkeypatch: pytest.MonkeyPatch, **sizes: int) -> CpuBackend:
    """A CpuBackend that runs ``kern`` (the backend itself always takes the widest build)."""
    monkeypatch.setattr(CpuBackend, "native", lambda self: kern)
    return CpuBackend(**sizes)


#: Relative error of the kernel's exp2 polynomial (float32 coefficients, exact arithmetic) and of its
#: Horner evaluation in float32: the same coefficients and bounds as the numba kernels'
#: (tests/test_cpu_compiled.py derives both: below u/2, and 2u for Horner without FMA; FMA only drops
#: the products' share).
EXP2_BOUND = U32 / 2 + 2.0 * U32


def test_exp2_against_float64(kernel: native.Kernel) -> None:
    # Over the range a softmax weight takes (x <= 0) down to float32's smallest normal, 2**-126.
    x = np.concatenate([np.linspace(-126.0, 0.0, 40001), -np.logspace(-8, 0, 2000)]).astype(np.float32)
    want = np.exp2(x.astype(np.float64))
    got = kernel.exp2(x).astype(np.float64)
    assert np.all(np.abs(got - want) <= EXP2_BOUND * want)


def test_exp2_special_values(kernel: native.Kernel) -> None:
    got = kernel.exp2(np.array([-np.inf, -200.0, np.nan, np.inf, 0.0], dtype=np.float32))
    assert got[0] == 0.0 and got[1] == 0.0  # a hidden key's weight; below float32's range
    assert np.isnan(got[2]) and np.isnan(got[3])  # NaN poisons its row; +inf - shift makes NaN rows
    assert got[4] == 1.0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_conversion_is_exact(kernel: native.Kernel, dtype: str) -> None:
    # With one key its weight is exactly 1 (exp2(0) = 1, sum 1), so the output is V's conversion itself:
    # every 16-bit pattern (normals, subnormals, zeros, inf, NaN) in the head dim.
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).reshape(1, 256, 1, 256)
    v = bits.view(np.float16) if dtype == "float16" else bits
    p = Problem(1, 256, 256, 1, 1, 4, 256, dtype, 0.5)
    q = k = np.zeros((1, 256, 1, 4), dtype=v.dtype)
    out, _ = kernel.forward(p, q, k, v, None, block_q=16, block_k=16, workers=1)
    # The output is rounded back to 16 bits: compare through float32 of both, exactly.
    want = bits.view(np.float16).astype(np.float32) if dtype == "float16" else (bits.astype(np.uint32) << 16).view(
        np.float32)
    got = out.astype(np.float32) if dtype == "float16" else (out.astype(np.uint32) << 16).view(np.float32)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    # Values, not bits: the weighted sum starts at +0, so -0.0 comes out +0.0, as from any sum.
    np.testing.assert_array_equal(got[~nan], want[~nan])


def test_float16_subnormals_survive_flushing_denormals(kernel: native.Kernel) -> None:
    # torch.set_flush_denormal(True) (or any library built with -ffast-math) sets the CPU's denormals-are-zero
    # mode, which the kernel's threads inherit. float16 subnormals are float32 normals: their conversion must
    # not pass through a float32 subnormal. Dv 15: 8 lanes by F16C where the build has it, 7 by the software
    # conversion; every subnormal pattern of either sign, with one key (weight 1: the output is V itself).
    torch = pytest.importorskip("torch")
    bits = np.concatenate([np.arange(1, 1 << 10), np.arange(1, 1 << 10) | 0x8000]).astype(np.uint16)
    v = np.resize(bits, (1, 137, 1, 15)).view(np.float16)
    p = Problem(1, 137, 137, 1, 1, 4, 15, "float16", 0.5)
    q = k = np.zeros((1, 137, 1, 4), dtype=np.float16)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no denormals-are-zero mode")
    try:
        out, _ = kernel.forward(p, q, k, v, None, block_q=16, block_k=16, workers=1)
    finally:
        torch.set_flush_denormal(False)
    np.testing.assert_array_equal(out.astype(np.float32), v.astype(np.float32))


GRID = [
    {},
    {"causal": True},
    {"causal": True, "top_left": True, "lq": 61, "lk": 40},
    {"window": (7, 3)},
    {"window": (5, 0), "causal": True, "lq": 30, "lk": 70},
    {"hq": 6, "hkv": 2, "dk": 40, "dv": 24},
    {"hq": 4, "hkv": 1, "lq": 1, "lk": 300, "dk": 128, "dv": 72},
    {"dk": 1, "dv": 7},
    {"dk": 96, "dv": 100, "causal": True},
    {"lq": 0},
    {"lk": 0},
]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", GRID, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_grid(kernel: native.Kernel, mode: str, monkeypatch: pytest.MonkeyPatch, dtype: str, case: dict) -> None:
    p = make_problem(dtype=dtype, **case)
    check(p, *make_inputs(p), backend=backend_of(kernel, monkeypatch, block_q=16, block_k=24, workers=2))


@pytest.mark.parametrize("shape", [(2, 3, 37, 53), (1, 3, 1, 53), (2, 1, 37, 1), (1, 1, 1, 53)])
def test_masks(kernel: native.Kernel, mode: str, monkeypatch: pytest.MonkeyPatch, shape: Tuple[int, ...]) -> None:
    p = make_problem(b=2, hq=3, hkv=3, causal=True, mask_shape=shape)
    threaded(monkeypatch)  # packed: 6 kv heads through 3 slots on 2 threads, each slot refilled in turn
    backend = backend_of(kernel, monkeypatch, block_q=16, block_k=24, workers=2)
    for mask in (float_mask(shape), bool_mask(shape)):
        check(p, *make_inputs(p), mask=mask, backend=backend)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sinks(kernel: native.Kernel, mode: str, dtype: str, rng: np.random.Generator) -> None:
    # gpt-oss's per-head sink logits: one more term in each row's sum, none in its output; a row that sees no
    # key (bottom-right causal, Lq > Lk hides the first rows) is 0 with lse = sink.
    p = replace(make_problem(hq=4, hkv=2, lq=30, lk=20, causal=True, dtype=dtype), sinks=True)
    q, k, v = make_inputs(p)
    sinks = rng.normal(0.0, 2.0, p.heads_q).astype(np.float32)
    out, lse = kernel.forward(p, q, k, v, None, block_q=8, block_k=16, workers=2, sinks=sinks)
    ref_out, ref_lse = reference_attention(q, k, v, p, sinks=sinks)
    np.testing.assert_allclose(to_f32(out, dtype), ref_out, rtol=0, atol=output_tolerance(p, q, k, v, sinks=sinks))
    qf, kf = to_f32(q, dtype), to_f32(k, dtype)
    np.testing.assert_allclose(lse, ref_lse, rtol=0, atol=lse_tolerance(qf, kf, p.scale))
    assert not to_f32(out, dtype)[:, :, :10].any() and np.array_equal(lse[0, :, 0], sinks)


def test_backward_masked_key_with_nan_v(kernel: native.Kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    # aule_kp.nonfinite: a key a row does not see (-inf mask) never enters it, NaN v included. Its weight is 0
    # and its dP NaN: the gradients are those of the same problem with that v zeroed, and finite.
    monkeypatch.setattr(cpu_backend, "_NATIVE_BACKWARD_BLOCKS", SMALL_BACKWARD)
    p = make_problem(hq=2, hkv=1, lq=20, lk=30, mask_shape=(1, 1, 20, 30))
    q, k, v = make_inputs(p)
    dout = make_inputs(p, seed=3)[0]
    mask = np.zeros(p.mask_shape, dtype=np.float32)
    mask[..., 7] = -np.inf
    poisoned = v.copy()
    poisoned[0, 0, 7] = np.nan
    zeroed = v.copy()
    zeroed[0, 0, 7] = 0.0
    backend = backend_of(kernel, monkeypatch, workers=2)
    got = backend.backward(p, q, k, poisoned, *backend.forward(p, q, k, zeroed, mask)[:1], dout,
                           backend.forward(p, q, k, zeroed, mask)[1], mask)
    want = reference_backward(q, k, zeroed, dout, p, mask)
    for g, w, tol in zip(got[:3], want[:3], gradient_tolerances(p, q, k, zeroed, dout, mask)[:3]):
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g, w, rtol=0, atol=tol)


@pytest.mark.parametrize("alibi_batch", [False, True])
def test_softcap_and_alibi(kernel: native.Kernel, mode: str, monkeypatch: pytest.MonkeyPatch, alibi_batch: bool,
                           rng: np.random.Generator) -> None:
    # Gemma's soft-cap and ALiBi slopes ([Hq] or [B, Hq]) with a mask, forward and backward (the cap's
    # derivative, the mask's gradient taken before it) against float64; tests/test_scoremods.py covers the
    # rest of their grid on the widest build.
    monkeypatch.setattr(cpu_backend, "_NATIVE_BACKWARD_BLOCKS", SMALL_BACKWARD)
    p = replace(make_problem(b=2, hq=4, hkv=2, lq=29, lk=41, causal=True, mask_shape=(2, 4, 29, 41)),
                softcap=3.0, alibi_rows=2 if alibi_batch else 1)
    alibi = rng.uniform(0.0, 0.5, (p.alibi_rows, p.heads_q)).astype(np.float32)
    q, k, v = make_inputs(p)
    mask = make_mask(p)
    backend = backend_of(kernel, monkeypatch, block_q=8, block_k=16, workers=2)
    out, lse = backend.forward(p, q, k, v, mask, alibi=alibi)
    ref_out, _ = reference_attention(q, k, v, p, mask, alibi)
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=output_tolerance(p, q, k, v, mask, alibi=alibi))
    dout = make_inputs(p, seed=5)[0][..., : p.dim_v]
    grads = backend.backward(p, q, k, v, out, dout, lse, mask, True, alibi=alibi)
    want = reference_backward(q, k, v, dout, p, mask, alibi)
    for got, ref, tol in zip(grads, want, gradient_tolerances(p, q, k, v, dout, mask, alibi=alibi)):
        np.testing.assert_allclose(got, ref, rtol=0, atol=tol)


@pytest.mark.parametrize("causal", [False, True])
def test_threads_and_default_blocks(kernel: native.Kernel, monkeypatch: pytest.MonkeyPatch, causal: bool) -> None:
    # Large enough that the kernel starts its threads, and longer than one default block each way.
    p = make_problem(b=1, hq=4, hkv=2, lq=700, lk=900, dk=64, causal=causal)
    check(p, *make_inputs(p), backend=backend_of(kernel, monkeypatch, workers=2))
    assert native._threads(p, 2) == 2


def test_one_packed_slot_for_many_threads(kernel: native.Kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    # Packed K/V slots past their byte budget: one slot, reused by group after group while 3 threads wait for
    # each other (the order they take groups in keeps that free of deadlock); the result is unchanged.
    force(monkeypatch, "packed")
    monkeypatch.setattr(native, "_SLOT_BYTES", 1)
    p = make_problem(b=2, hq=6, hkv=3, lq=700, lk=300, dk=32, causal=True)
    assert native._threads(p, 3) == 3
    check(p, *make_inputs(p), backend=backend_of(kernel, monkeypatch, block_q=64, block_k=64, workers=3))


def test_strided_inputs_are_read_in_place(kernel: native.Kernel, mode: str) -> None:
    # q, k, v as [B, H, L, D] views of [B, L, H, D] storage (what torch's layout gives): the same result as
    # contiguous copies, bit for bit (the same operations in the same order).
    p = make_problem(b=2, hq=4, hkv=2, lq=33, lk=45, dk=16 * (kernel.width // 4), causal=True)
    q, k, v = make_inputs(p)
    views = [np.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3) for x in (q, k, v)]
    assert not views[0].flags.c_contiguous
    want = kernel.forward(p, q, k, v, None, block_q=8, block_k=16, workers=1)
    got = kernel.forward(p, *views, None, block_q=8, block_k=16, workers=1)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize(
    ("kwargs", "most"),
    [
        # Visible: half, plus each 6-row panel's staircase step (a few key panels along the diagonal).
        ({"causal": True}, 0.52),
        # Visible 256 / 4096 = 0.0625, plus a panel of keys either side per row panel.
        ({"causal": True, "window": (255, 0)}, 0.09),
        # Visible 201 / 4096 = 0.049.
        ({"window": (100, 100)}, 0.075),
    ],
)
def test_hidden_tiles_are_skipped(kernel: native.Kernel, kwargs: dict, most: float) -> None:
    n = 4096
    p = make_problem(hq=1, hkv=1, lq=n, lk=n, dk=8, **kwargs)
    kernel.forward(p, *make_inputs(p), None, block_q=512, block_k=256, workers=1)
    assert p.visible_fraction() * n * n <= kernel.last_computed <= most * n * n


def test_inputs_of_odd_strides_are_copied(kernel: native.Kernel) -> None:
    # A mask or q whose strides are no whole number of floats (fields of a structured array) or whose data is
    # not aligned: the kernel indexes in elements, so native.py hands it a copy; the same result bit for bit.
    p = make_problem(b=1, hq=2, hkv=2, lq=5, lk=7, dk=8, mask_shape=(1, 2, 5, 7))
    q, k, v = make_inputs(p)
    mask = float_mask(p.mask_shape)
    record = np.zeros(p.mask_shape, dtype=[("mask", "<f4"), ("pad", "u1")])
    record["mask"] = mask
    raw = np.zeros(q.nbytes + 1, dtype=np.uint8)
    unaligned = raw[1:].view(np.float32).reshape(q.shape)
    unaligned[...] = q
    assert record["mask"].strides[-1] == 5 and not unaligned.flags.aligned
    want = kernel.forward(p, q, k, v, mask, block_q=4, block_k=4, workers=1)
    got = kernel.forward(p, unaligned, k, v, record["mask"], block_q=4, block_k=4, workers=1)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@st.composite
def problems(draw: st.DrawFn) -> Tuple[Problem, Optional[np.ndarray], dict, str]:
    hkv = draw(st.integers(1, 3))
    b, hq = draw(st.integers(1, 2)), hkv * draw(st.integers(1, 3))
    lq, lk = draw(st.integers(0, 50)), draw(st.integers(0, 50))
    mask_shape = draw(st.none() | st.tuples(*(st.sampled_from([1, n]) for n in (b, hq, lq, lk))))
    p = make_problem(b=b, hq=hq, hkv=hkv, lq=lq, lk=lk, dk=draw(st.integers(0, 70)), dv=draw(st.integers(1, 70)),
                     dtype=draw(st.sampled_from(["float32", "float16", "bfloat16"])), causal=draw(st.booleans()),
                     window=draw(st.none() | st.tuples(st.integers(-1, 12), st.integers(-1, 12))),
                     top_left=draw(st.booleans()), mask_shape=mask_shape)
    mask = None
    if mask_shape is not None:
        mask = draw(st.sampled_from([float_mask, bool_mask]))(mask_shape, seed=draw(st.integers(0, 9)))
    sizes = {"block_q": draw(st.integers(1, 40)), "block_k": draw(st.integers(1, 80))}
    return p, mask, sizes, draw(st.sampled_from(sorted(MODES)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(problems(), st.integers(0, 2**16))
def test_random_problems(kernel: native.Kernel, monkeypatch: pytest.MonkeyPatch,
                         case: Tuple[Problem, Optional[np.ndarray], dict, str], seed: int) -> None:
    p, mask, sizes, mode = case
    force(monkeypatch, mode)
    check(p, *make_inputs(p, seed), mask=mask, backend=backend_of(kernel, monkeypatch, **sizes))


#: Backward blocks small enough that a few dozen rows and keys cross many of them (the default is 64 x 128).
SMALL_BACKWARD = (16, 8)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", GRID[:9], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_backward_grid(kernel: native.Kernel, monkeypatch: pytest.MonkeyPatch, dtype: str, case: dict) -> None:
    monkeypatch.setattr(cpu_backend, "_NATIVE_BACKWARD_BLOCKS", SMALL_BACKWARD)
    p = make_problem(dtype=dtype, **case)
    assert not native.backward_reasons(p, False)
    check_backward(p, backend=backend_of(kernel, monkeypatch, workers=2))


def threaded(monkeypatch: pytest.MonkeyPatch) -> List[int]:
    """Small problems on the threads asked for (native._threads keeps them on one, where key ranges and their
    dQ partials never run); returns the list that records each backward call's key ranges."""
    monkeypatch.setattr(native, "_THREAD_MIN_WORK", 0)
    used: List[int] = []
    ranges = native._key_ranges
    monkeypatch.setattr(native, "_key_ranges", lambda *args: used.append(ranges(*args)) or used[-1])
    return used


@pytest.mark.parametrize("shape", [(2, 3, 37, 53), (2, 3, 1, 53), (1, 1, 37, 53)])
@pytest.mark.parametrize("mask_grad", [False, True])
def test_backward_masks(kernel: native.Kernel, monkeypatch: pytest.MonkeyPatch, shape: Tuple[int, ...],
                        mask_grad: bool) -> None:
    # The native kernel takes a mask's gradient where one task owns each entry (rows may be shared: a task
    # sums its own); a mask shared by batches and heads goes to the numba path, which sums it in order.
    monkeypatch.setattr(cpu_backend, "_NATIVE_BACKWARD_BLOCKS", SMALL_BACKWARD)
    p = make_problem(b=2, hq=3, hkv=3, causal=True, mask_shape=shape)
    assert bool(native.backward_reasons(p, mask_grad)) == (mask_grad and shape[0] == 1)
    used = threaded(monkeypatch)  # two threads, two key ranges per kv head: a mask gradient's keys split
    check_backward(p, make_mask(p), mask_grad, backend_of(kernel, monkeypatch, workers=2))
    assert used == ([] if native.backward_reasons(p, mask_grad) else [2])


@pytest.mark.parametrize("workers", [1, 3])
def test_backward_key_ranges_are_deterministic(kernel: native.Kernel, monkeypatch: pytest.MonkeyPatch,
                                               workers: int) -> None:
    # One kv head over several threads: key ranges with dQ partials summed in order, bit for bit every call.
    monkeypatch.setattr(cpu_backend, "_NATIVE_BACKWARD_BLOCKS", SMALL_BACKWARD)
    used = threaded(monkeypatch)
    backend = backend_of(kernel, monkeypatch, workers=workers)
    p = make_problem(hq=3, hkv=1, lq=45, lk=170, causal=True, top_left=True)
    first = check_backward(p, backend=backend)
    again, _, _ = run_backward(p, backend=backend)
    for a, b in zip(first[:3], again[:3]):
        assert np.array_equal(a, b)
    assert used == [1 if workers == 1 else 12] * 2  # both calls took the ranges asked for


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(problems(), st.integers(0, 2**16), st.sampled_from([1, 2]))
def test_backward_random_problems(kernel: native.Kernel, monkeypatch: pytest.MonkeyPatch,
                                  case: Tuple[Problem, Optional[np.ndarray], dict, str], seed: int,
                                  workers: int) -> None:
    p, mask, sizes, _ = case
    assume(p.len_q and p.len_k)  # the float64 reference's gradients need a row and a key
    monkeypatch.setattr(cpu_backend, "_NATIVE_BACKWARD_BLOCKS", (sizes["block_q"], sizes["block_k"]))
    mask_grad = mask is not None and not native.backward_reasons(p, True)
    check_backward(p, mask, mask_grad, backend_of(kernel, monkeypatch, workers=workers))


def test_without_a_build_numpy_runs_and_says_why_once(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(native, "LIB_DIR", tmp_path)  # an install without the libraries
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_why", {})
    monkeypatch.setattr(errors, "_warned", set())
    p = make_problem(causal=True)
    q, k, v = make_inputs(p)
    with pytest.warns(AuleFallbackWarning, match="native kernel is unavailable.*not installed.*NumPy path"):
        check(p, q, k, v, backend=CpuBackend())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CpuBackend().forward(p, q, k, v, None)
    assert CpuBackend().native() is None


def test_a_stale_build_is_refused(kernel: native.Kernel, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    # A library built from other sources than this aule_kp's (its argument structs differ) would read its
    # fields at the wrong offsets: it is refused with a reason, and the NumPy path runs.
    class Wider(ctypes.Structure):
        _fields_ = [*native._Args._fields_, ("extra", ctypes.c_int64)]

    monkeypatch.setattr(native, "_Args", Wider)
    with pytest.raises(OSError, match="stale build: its forward arguments take"):
        native.Kernel(kernel.path)
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_why", {})
    monkeypatch.setattr(errors, "_warned", set())
    with pytest.warns(AuleFallbackWarning, match="stale build"):
        assert native.load() is None


def test_bad_worker_count_is_refused() -> None:
    with pytest.raises(ValueError, match="workers must be a positive int"):
        CpuBackend(workers=0)
