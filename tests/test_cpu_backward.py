"""CpuBackend.backward against the float64 reference gradients, over every feature of a Problem.

Most cases use tiny blocks (``SMALL``) so that a few dozen rows and keys cross many query blocks,
key tiles, band edges and (with several workers) key-range splits.

Tolerances: max abs error per gradient from the suite's error model (``conftest.gradient_tolerances``:
float32 compute, dtype epsilon, the lengths of the sums, and the sum of absolute terms behind each
gradient, so a gradient that is 0 in exact arithmetic, such as a mask's constant along the keys, is
held to the rounding of the terms that cancel).
"""

from __future__ import annotations

import tracemalloc
from dataclasses import replace
from typing import Tuple

import numpy as np
import pytest
from cpu_cases import SMALL, make_mask, make_problem
from cpu_cases import check_backward as check
from cpu_cases import run_backward as run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aule_kp.cpu.backend import CpuBackend

#: Every test here runs on the compiled path and on the NumPy path (conftest.cpu_path).
pytestmark = pytest.mark.usefixtures("cpu_path")


@pytest.mark.parametrize("lq,lk", [(37, 53), (53, 37), (1, 40), (40, 1), (33, 33)])
@pytest.mark.parametrize("causal,top_left", [(False, False), (True, False), (True, True)])
def test_causal_alignment(lq: int, lk: int, causal: bool, top_left: bool) -> None:
    check(make_problem(lq=lq, lk=lk, causal=causal, top_left=top_left))


@pytest.mark.parametrize("window", [(4, 0), (0, 3), (8, 8), (-1, 2), (5, -1), (0, 0)])
@pytest.mark.parametrize("causal", [False, True])
def test_windows(window: Tuple[int, int], causal: bool) -> None:
    check(make_problem(lq=30, lk=45, window=window, causal=causal))


@pytest.mark.parametrize("b,hq,hkv", [(2, 4, 4), (2, 6, 2), (1, 4, 1), (3, 2, 1), (1, 8, 2)])
def test_gqa_sums_over_shared_heads(b: int, hq: int, hkv: int) -> None:
    check(make_problem(b=b, hq=hq, hkv=hkv, lq=21, lk=34, causal=True))


@pytest.mark.parametrize("dk,dv", [(8, 8), (64, 32), (32, 96), (256, 256)])
def test_head_dims(dk: int, dv: int) -> None:
    check(make_problem(dk=dk, dv=dv, lq=19, lk=27))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
def test_16bit(dtype: str, causal: bool) -> None:
    check(make_problem(dtype=dtype, causal=causal, hq=4, hkv=2))


@pytest.mark.parametrize("mask_shape", [(2, 4, 37, 53), (1, 1, 37, 53), (1, 4, 1, 53), (2, 1, 37, 1),
                                        (1, 1, 1, 1), (2, 1, 1, 53)])
@pytest.mark.parametrize("mask_grad", [False, True])
def test_mask_and_its_gradient(mask_shape: Tuple[int, int, int, int], mask_grad: bool) -> None:
    p = make_problem(b=2, hq=4, hkv=2, mask_shape=mask_shape, causal=mask_shape[0] == 1, top_left=True)
    check(p, make_mask(p), mask_grad)


def test_hidden_rows_get_zero_gradients() -> None:
    """Rows that see no key (bottom-right causal with Lq > Lk hides the first Lq - Lk; the mask
    hides row 3 of head 1) have lse -inf, output 0 and contribute nothing; their dq is 0."""
    p = make_problem(lq=40, lk=24, causal=True, mask_shape=(1, 2, 40, 24))
    mask = make_mask(p, hide=0.0)
    mask[0, 1, 30] = -np.inf
    grads = check(p, mask, mask_grad=True)
    dq = grads[0]
    assert not dq[:, :, :16].any() and not dq[0, 1, 30].any()
    assert not grads[3][0, :, :16].any() and not grads[3][0, 1, 30].any()


def test_nan_propagates() -> None:
    p = make_problem(lq=8, lk=8)
    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((1, 2, 8, 32), dtype=np.float32) for _ in range(4))
    q[0, 0, 2, 5] = np.nan
    out, lse = SMALL.forward(p, q, k, v, None)
    dq, dk, dv, _ = SMALL.backward(p, q, k, v, out, dout, lse, None)
    assert np.isnan(dq[0, 0, 2]).all() and np.isnan(dk[0, 0]).all() and not np.isnan(dq[0, 1]).any()


@pytest.mark.parametrize("causal", [False, True])
def test_default_blocks_across_tiles(causal: bool) -> None:
    """The default sizes, on a problem that spans several 256-row blocks and 256-key tiles."""
    check(make_problem(hq=2, hkv=1, lq=600, lk=1100, dk=64, causal=causal), backend=CpuBackend(workers=2))


@pytest.mark.parametrize("workers", [1, 3])
def test_key_range_splits_and_determinism(workers: int) -> None:
    """One (batch, kv head) on several workers is split over key ranges (dQ partials); the result
    matches the reference and repeats bit for bit, as gradcheck's reentrancy test needs."""
    backend = CpuBackend(block_q=16, block_k=8, step=4, workers=workers)
    p = make_problem(hq=3, hkv=1, lq=45, lk=70, causal=True, top_left=True)
    first = check(p, backend=backend)
    again, _, _ = run(p, backend=backend)
    for a, b in zip(first[:3], again[:3]):
        assert np.array_equal(a, b)


def test_mask_gradient_broadcast_over_batch_with_workers() -> None:
    """A mask shared by every batch and head gets each task's sum in a fixed order (tasks walk the
    batches and heads it is shared by), so its gradient is exact and deterministic too."""
    backend = CpuBackend(block_q=16, block_k=8, step=4, workers=4)
    p = make_problem(b=3, hq=4, hkv=2, lq=20, lk=30, mask_shape=(1, 1, 20, 30))
    mask = make_mask(p)
    first = check(p, mask, True, backend)
    again, _, _ = run(p, mask, True, backend)
    assert np.array_equal(first[3], again[3])


def test_never_materialises_scores() -> None:
    """Peak scratch of a long backward stays a few tiles, far below one Lq x Lk float32 matrix."""
    p = make_problem(hq=1, hkv=1, lq=2048, lk=2048, dk=64)
    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((1, 1, 2048, 64), dtype=np.float32) for _ in range(4))
    backend = CpuBackend(workers=1)
    out, lse = backend.forward(p, q, k, v, None)
    tracemalloc.start()
    try:
        backend.backward(p, q, k, v, out, dout, lse, None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2048 * 2048 * 4 / 4, peak


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 2), hkv=st.integers(1, 2), group=st.integers(1, 3), lq=st.integers(1, 40),
    lk=st.integers(1, 40), dk=st.sampled_from([8, 16]), dv=st.sampled_from([8, 24]),
    causal=st.booleans(), top_left=st.booleans(),
    window=st.one_of(st.none(), st.tuples(st.integers(-1, 6), st.integers(-1, 6))),
    mask_dims=st.one_of(st.none(), st.tuples(*[st.booleans()] * 4)),
)
def test_random_problems(b, hkv, group, lq, lk, dk, dv, causal, top_left, window, mask_dims) -> None:
    p = make_problem(b=b, hq=hkv * group, hkv=hkv, lq=lq, lk=lk, dk=dk, dv=dv, causal=causal, window=window,
                     top_left=top_left)
    mask = None
    if mask_dims is not None:
        full = (p.batch, p.heads_q, p.len_q, p.len_k)
        p = replace(p, mask_shape=tuple(n if keep else 1 for n, keep in zip(full, mask_dims)))
        mask = make_mask(p)
    check(p, mask, mask_grad=mask is not None, backend=CpuBackend(block_q=8, block_k=8, step=2, workers=2))
