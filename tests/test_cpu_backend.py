"""CpuBackend against the float64 reference, over every feature of a Problem.

Most cases use tiny blocks (``SMALL``) so that a few dozen rows and keys already cross many query
blocks, key tiles and band staircase steps; a few use the default blocks at sizes that span them.

Tolerances: max abs error from the suite's error model (``conftest.tolerance``: float32 compute,
dtype epsilon, reduction length, score and value range), computed from each test's own inputs.
"""

from __future__ import annotations

import tracemalloc
from typing import Optional, Tuple

import numpy as np
import pytest
from conftest import lse_tolerance, output_tolerance
from cpu_cases import SMALL, bool_mask, check, float_mask, make_inputs, make_problem
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import reference_attention

from aule_kp.cpu.backend import CpuBackend, _Forward, _head_blocks
from aule_kp.problem import Problem

DEFAULT = CpuBackend()

#: Every test here runs on the compiled path and on the NumPy path (conftest.cpu_path).
pytestmark = pytest.mark.usefixtures("cpu_path")


@pytest.mark.parametrize("dim", [32, 64, 80, 96, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims(dim: int, causal: bool) -> None:
    p = make_problem(hq=2, lq=41, lk=67, dk=dim, causal=causal)
    check(p, *make_inputs(p))


@pytest.mark.parametrize(("dk", "dv"), [(64, 32), (32, 128), (192, 128), (16, 80), (1, 7)])
def test_dv_differs_from_dk(dk: int, dv: int) -> None:
    p = make_problem(lq=29, lk=45, dk=dk, dv=dv, causal=True)
    check(p, *make_inputs(p))


@pytest.mark.parametrize(("lq", "lk"), [(40, 40), (25, 70), (70, 25), (1, 50), (50, 1)])
@pytest.mark.parametrize("top_left", [False, True])
def test_causal_alignments(lq: int, lk: int, top_left: bool) -> None:
    p = make_problem(lq=lq, lk=lk, causal=True, top_left=top_left)
    out, lse = check(p, *make_inputs(p))
    if not top_left and lq > lk:
        # bottom-right: query i sees keys j <= i + lk - lq, so the first lq - lk rows see none
        assert np.all(np.isneginf(lse[:, :, : lq - lk])) and np.all(out[:, :, : lq - lk] == 0)


@pytest.mark.parametrize("window", [(8, 0), (5, 3), (0, 0), (-1, 4), (16, -1), (3, 30), (50, 50)])
@pytest.mark.parametrize(("lq", "lk"), [(45, 45), (30, 61), (61, 30)])
def test_windows(window: Tuple[int, int], lq: int, lk: int) -> None:
    p = make_problem(lq=lq, lk=lk, window=window)
    check(p, *make_inputs(p))


@pytest.mark.parametrize("top_left", [False, True])
def test_window_with_causal(top_left: bool) -> None:
    p = make_problem(lq=50, lk=64, window=(7, 5), causal=True, top_left=top_left)
    check(p, *make_inputs(p))


@pytest.mark.parametrize(("hq", "hkv"), [(8, 2), (6, 1), (4, 4), (12, 3)])
@pytest.mark.parametrize("lq", [1, 3, 40])
def test_gqa_mqa(hq: int, hkv: int, lq: int) -> None:
    # lq < block_q packs the query heads of a group into one block; lq = 40 splits rows per head
    p = make_problem(b=2, hq=hq, hkv=hkv, lq=lq, lk=57, causal=lq > 1)
    check(p, *make_inputs(p))


def test_decode_long_cache() -> None:
    p = make_problem(hq=8, hkv=2, lq=1, lk=2000, dk=64, causal=True)
    check(p, *make_inputs(p), backend=DEFAULT)


@pytest.mark.parametrize(
    "shape",
    [(2, 4, 33, 47), (1, 1, 33, 47), (2, 1, 1, 47), (1, 4, 1, 1), (2, 4, 33, 1), (1, 1, 1, 47)],
)
def test_float_masks(shape: Tuple[int, int, int, int]) -> None:
    p = make_problem(b=2, hq=4, hkv=2, lq=33, lk=47, mask_shape=shape)
    check(p, *make_inputs(p), mask=float_mask(shape))


@pytest.mark.parametrize("shape", [(2, 4, 33, 47), (2, 1, 1, 47), (1, 1, 33, 47)])
@pytest.mark.parametrize("causal", [False, True])
def test_bool_derived_masks(shape: Tuple[int, int, int, int], causal: bool) -> None:
    p = make_problem(b=2, hq=4, hkv=1, lq=33, lk=47, causal=causal, mask_shape=shape)
    check(p, *make_inputs(p), mask=bool_mask(shape))


def test_packed_heads_with_per_head_mask() -> None:
    # decode-shaped GQA block (heads packed) with a mask that differs per query head
    shape = (1, 6, 2, 40)
    p = make_problem(hq=6, hkv=2, lq=2, lk=40, mask_shape=shape)
    check(p, *make_inputs(p), mask=bool_mask(shape, keep=0.3))


def test_fully_hidden_rows_by_mask() -> None:
    shape = (1, 2, 30, 50)
    p = make_problem(lq=30, lk=50, causal=True, mask_shape=shape)
    mask = float_mask(shape)
    mask[0, 0, 3] = -np.inf
    mask[0, 1, 10:20] = -np.inf
    mask[0, :, 25, :5] = -np.inf  # row 25 still sees keys 5..45
    out, lse = check(p, *make_inputs(p), mask=mask)
    assert np.isneginf(lse[0, 0, 3]) and np.all(out[0, 0, 3] == 0)
    assert np.all(np.isneginf(lse[0, 1, 10:20])) and np.all(out[0, 1, 10:20] == 0)
    assert np.all(np.isfinite(lse[0, :, 25]))


def test_every_row_hidden() -> None:
    shape = (1, 1, 1, 1)
    p = make_problem(mask_shape=shape)
    out, lse = SMALL.forward(p, *make_inputs(p), np.full(shape, -np.inf, dtype=np.float32))
    assert np.all(out == 0) and np.all(np.isneginf(lse))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"causal": True},
        {"causal": True, "top_left": True, "lq": 60, "lk": 31},
        {"window": (6, 2), "hq": 4, "hkv": 1},
        {"hq": 6, "hkv": 2, "lq": 2, "dk": 96, "dv": 48},
        {"b": 2, "hq": 4, "hkv": 2, "causal": True, "mask_shape": (2, 1, 1, 53)},
    ],
)
def test_dtypes(dtype: str, kwargs: dict) -> None:
    p = make_problem(dtype=dtype, **kwargs)
    mask = None if p.mask_shape is None else bool_mask(p.mask_shape)
    check(p, *make_inputs(p), mask=mask)


@pytest.mark.parametrize("causal", [False, True])
def test_default_blocks_long(causal: bool) -> None:
    # spans two default query blocks (1024 rows) and three key tiles per block
    p = make_problem(hq=2, hkv=1, lq=1100, lk=1300, dk=64, causal=causal)
    check(p, *make_inputs(p), backend=DEFAULT)


@pytest.mark.parametrize("window", [None, (100, 0)])
def test_many_blocks_and_tiles(window: Optional[Tuple[int, int]]) -> None:
    p = make_problem(b=2, hq=3, hkv=3, lq=500, lk=700, dk=64, dv=40, window=window)
    check(p, *make_inputs(p), backend=CpuBackend(block_q=96, block_k=128, step=32))


def test_scores_growing_along_keys() -> None:
    # Scores rise steeply from tile to tile, so kept shifts overflow the sum limit and tiles are redone
    # with a fresh max; later keys dominate the softmax completely.
    p = make_problem(hq=1, hkv=1, lq=20, lk=300, dk=8)
    rng = np.random.default_rng(5)
    u = rng.standard_normal(8).astype(np.float32)
    q = np.broadcast_to(25 * u, (1, 1, 20, 8)).copy()
    k = (np.linspace(0.0, 3.0, 300, dtype=np.float32)[:, None] * u)[None, None].copy()
    v = rng.standard_normal((1, 1, 300, 8)).astype(np.float32)
    check(p, q, k, v)


@pytest.mark.parametrize("backend", [SMALL, DEFAULT], ids=["small", "default"])
def test_score_spike_between_probed_keys(backend: CpuBackend) -> None:
    # A block's first tile takes its shift from a few sampled keys; key 1 is not among them and
    # scores ~150 above them, so exp overflows and the tile must be redone with its true max.
    p = make_problem(hq=1, hkv=1, lq=20, lk=100, dk=8)
    q, k, v = make_inputs(p)
    k[0, 0, 1] = 150.0 * np.sqrt(8) * q[0, 0].mean(axis=0) / np.square(q[0, 0].mean(axis=0)).sum()
    q[0, 0] = q[0, 0].mean(axis=0)  # every row the same, so every row scores key 1 at ~150
    out, lse = check(p, q, k, v, backend=backend)
    assert np.all(lse > 140)


def test_large_negative_scores() -> None:
    # Every score is about -300: exp of unshifted scores would underflow to 0 everywhere.
    shape = (1, 1, 1, 1)
    p = make_problem(lq=30, lk=80, mask_shape=shape)
    out, lse = check(p, *make_inputs(p), mask=np.full(shape, -300.0, dtype=np.float32))
    assert np.all(lse < -290)


def test_lowest_float_mask_pushes_keys_down_without_hiding_them() -> None:
    # Hugging Face's additive mask uses float32's most negative value: a row masked whole still sees
    # every key equally (the mean of v); in a row masked in part those keys weigh exp(-3.4e38) = 0,
    # as -inf would give. (Scaled to base 2 by log2(e), the value itself would overflow to -inf.)
    p = make_problem(hq=2, hkv=1, lq=30, lk=45, mask_shape=(1, 1, 30, 45))
    q, k, v = make_inputs(p)
    mask = np.zeros(p.mask_shape, dtype=np.float32)
    mask[..., 3, :] = np.finfo(np.float32).min
    mask[..., 5, 10:] = np.finfo(np.float32).min
    out, _ = SMALL.forward(p, q, k, v, mask)
    atol = output_tolerance(p, q, k, v)
    np.testing.assert_allclose(out[0, :, 3], np.broadcast_to(v[0, 0].mean(axis=0), (2, p.dim_v)), rtol=0, atol=atol)
    hidden = np.where(mask == np.finfo(np.float32).min, -np.inf, mask).astype(np.float32)
    ref, _ = reference_attention(q, k, v, p, hidden)
    np.testing.assert_allclose(out[0, :, 5], ref[0, :, 5], rtol=0, atol=atol)


def test_nan_in_a_query_row_stays_in_that_row() -> None:
    p = make_problem(hq=2, hkv=1, lq=30, lk=40, causal=True)
    q, k, v = make_inputs(p)
    q[0, 1, 7, 3] = np.nan
    out, lse = SMALL.forward(p, q, k, v, None)
    assert np.all(np.isnan(out[0, 1, 7])) and np.isnan(lse[0, 1, 7])
    keep = np.ones(lse.shape, dtype=bool)
    keep[0, 1, 7] = False
    ref_out, ref_lse = reference_attention(q, k, v, p)
    clean = np.nan_to_num(q)
    np.testing.assert_allclose(out[keep], ref_out[keep], rtol=0, atol=output_tolerance(p, clean, k, v))
    np.testing.assert_allclose(lse[keep], ref_lse[keep], rtol=0, atol=lse_tolerance(clean, k, p.scale))


@pytest.mark.parametrize(
    "kwargs",
    [{"lq": 0}, {"lk": 0}, {"b": 0}, {"dv": 0}, {"lk": 0, "causal": True}, {"lq": 0, "lk": 0}],
)
def test_empty(kwargs: dict) -> None:
    p = make_problem(**kwargs)
    out, lse = check(p, *make_inputs(p))
    assert np.all(out == 0) and (p.len_k > 0 or np.all(np.isneginf(lse)))


def test_zero_key_dim() -> None:
    # No features: every visible key scores 0, the output is the mean of the visible values.
    p = make_problem(dk=0, dv=8, lq=10, lk=20, causal=True)
    check(p, *make_inputs(p))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_thread_pool(dtype: str) -> None:
    # Big enough (> _POOL_MIN_WORK scores) for the pool to run, with several tasks per KV head.
    p = make_problem(b=2, hq=4, hkv=2, lq=600, lk=800, dk=64, causal=True, dtype=dtype)
    check(p, *make_inputs(p), backend=CpuBackend(block_q=64, block_k=96, step=16, workers=2))


def test_extra_memory_is_linear_in_length() -> None:
    s = 8192
    p = make_problem(hq=1, hkv=1, lq=s, lk=s, dk=64)
    q, k, v = make_inputs(p)
    tracemalloc.start()
    try:
        DEFAULT.forward(p, q, k, v, None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Lq x Lk float32 scores would be 256 MiB; output, per-task [K|1], [V|1] and one score tile per
    # worker come to about 20 MiB.
    assert peak < 48 << 20, f"peak {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize(
    ("kwargs", "most"),
    [
        # Visible: half, plus the 128-row staircase steps along the diagonal (half a step each).
        ({"causal": True}, 0.54),
        # Visible 256 / 4096 = 0.0625; a 128-row step spans 256 + 127 keys.
        ({"causal": True, "window": (255, 0)}, 0.095),
        # Visible 201 / 4096 = 0.049; a step spans 201 + 127 keys.
        ({"window": (100, 100)}, 0.08),
    ],
)
def test_hidden_tiles_are_skipped(kwargs: dict, most: float) -> None:
    n = 4096
    p = make_problem(hq=1, hkv=1, lq=n, lk=n, dk=8, **kwargs)
    job = _Forward(p, *make_inputs(p), None, block_q=1024, block_k=512, step=128)
    area = sum(
        (r1 - r0) * (c1 - c0) for block in _head_blocks(p, 1024, 0, 0) for r0, r1, _, _, c0, c1 in job._tiles(block)
    )
    assert p.visible_fraction() * n * n <= area <= most * n * n


def test_name_and_reasons() -> None:
    p = make_problem()
    assert DEFAULT.name == "cpu" and DEFAULT.unavailable_reasons() == [] and DEFAULT.problem_reasons(p) == []


@st.composite
def problems(draw: st.DrawFn) -> Tuple[Problem, Optional[np.ndarray], CpuBackend]:
    hkv = draw(st.integers(1, 3))
    lq, lk = draw(st.integers(0, 40)), draw(st.integers(0, 40))
    window = draw(st.none() | st.tuples(st.integers(-1, 12), st.integers(-1, 12)))
    b, hq = draw(st.integers(1, 2)), hkv * draw(st.integers(1, 3))
    mask_shape = draw(st.none() | st.tuples(*(st.sampled_from([1, n]) for n in (b, hq, lq, lk))))
    p = make_problem(
        b=b,
        hq=hq,
        hkv=hkv,
        lq=lq,
        lk=lk,
        dk=draw(st.integers(0, 40)),
        dv=draw(st.integers(1, 40)),
        dtype=draw(st.sampled_from(["float32", "float16", "bfloat16"])),
        causal=draw(st.booleans()),
        window=window,
        top_left=draw(st.booleans()),
        mask_shape=mask_shape,
    )
    mask = None
    if mask_shape is not None:
        mask = draw(st.sampled_from([float_mask, bool_mask]))(mask_shape, seed=draw(st.integers(0, 9)))
    backend = CpuBackend(
        block_q=draw(st.integers(1, 24)),
        block_k=draw(st.integers(1, 24)),
        step=draw(st.integers(1, 8)),
        workers=draw(st.sampled_from([1, 2])),
    )
    return p, mask, backend


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.integers(0, 2**16))
def test_random_problems(case: Tuple[Problem, Optional[np.ndarray], CpuBackend], seed: int) -> None:
    p, mask, backend = case
    check(p, *make_inputs(p, seed), mask=mask, backend=backend)
