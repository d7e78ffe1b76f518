"""Shared fixtures: seeded inputs in engine storage, and the per-dtype tolerances."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
# Tests see the default tiles, never a tuning cache the developer made with `aule-kp tune`
# (subprocesses inherit this too); tests of the cache point it elsewhere themselves.
os.environ["AULE_KP_CACHE_DIR"] = tempfile.mkdtemp(prefix="aule_kp_test_cache_")
# The per-driver self-check (aule_kp/vulkan/selfcheck.py) would compile its canaries' pipelines on
# lavapipe the first time each kernel family is used (seconds each): off here, tested on its own in
# tests/test_selfcheck.py. Set AULE_KP_SELF_CHECK=1 to run the suite with it.
os.environ.setdefault("AULE_KP_SELF_CHECK", "0")

import math  # noqa: E402

from reference import reference_attention  # noqa: E402

from aule_kp.dtypes import from_f32, to_f32  # noqa: E402
from aule_kp.problem import Problem, band  # noqa: E402

# Max abs error vs the float64 reference on standard-normal inputs. Outputs are convex combinations
# of v rows (|o| <~ 3); the kernels accumulate in fp32, so fp32 results sit within ~1e-6 relative
# of exact (2e-5 leaves room for long rows). 16-bit outputs are rounded once to their storage type:
# half an ulp at |o| ~ 3 is 1e-3 for fp16 and 8e-3 for bf16; scores from 16-bit inputs are exact
# in fp32, so the rounding of the output dominates.
ATOL = {"float32": 2e-5, "float16": 2.5e-3, "bfloat16": 1.6e-2}


def make_inputs(rng: np.random.Generator, shape_q, shape_k, shape_v, dtype: str):
    """q, k, v in the host storage of ``dtype`` (bf16 as uint16 bits)."""
    return tuple(from_f32(rng.standard_normal(s).astype(np.float32), dtype) for s in (shape_q, shape_k, shape_v))


def problem_inputs(p: Problem, rng: np.random.Generator):
    """q, k, v of ``p``'s shapes and dtype (``make_inputs``)."""
    return make_inputs(rng, (p.batch, p.heads_q, p.len_q, p.dim_k), (p.batch, p.heads_kv, p.len_k, p.dim_k),
                       (p.batch, p.heads_kv, p.len_k, p.dim_v), p.dtype)


RNG_SEED = 1234


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(RNG_SEED)


def problem(b=1, hq=2, hkv=1, lq=24, lk=40, dk=32, dv=32, dtype="float32", causal=False, window=None,
            top_left=False, mask_shape=None, scale=None) -> Problem:
    diag, left, right = band(lq, lk, causal=causal, window=window, top_left=top_left)
    return Problem(b, hq, hkv, lq, lk, dk, dv, dtype, scale or 1 / math.sqrt(dk), diag, left, right, mask_shape)


def check(p: Problem, rng, mask=None, backend=None, config=None):
    q, k, v = problem_inputs(p, rng)
    out, lse = (backend or _vulkan()).forward(p, q, k, v, mask, config)
    ref_out, ref_lse = reference_attention(q, k, v, p, mask)
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert not np.isnan(to_f32(out, p.dtype)).any()
    np.testing.assert_allclose(to_f32(out, p.dtype), ref_out, atol=ATOL[p.dtype], rtol=0)
    finite = np.isfinite(ref_lse)
    np.testing.assert_array_equal(np.isfinite(lse), finite)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], atol=1e-4, rtol=1e-5)
    return out, lse


def _vulkan():
    from aule_kp.vulkan.backend import VulkanBackend

    return VulkanBackend()


def check_plan_reuse(p: Problem, first: np.ndarray) -> None:
    """The inputs a fresh ``rng`` fixture gave ``check`` for ``p``, run again: the cached plan is
    reused (same output, no new plan or algorithm, one more sequence eval)."""
    from aule_kp.vulkan import plan as planmod

    made = dict(planmod.stats)
    q, k, v = problem_inputs(p, np.random.default_rng(RNG_SEED))
    again, _ = _vulkan().forward(p, q, k, v, None)
    np.testing.assert_array_equal(again, first)
    assert planmod.stats["algorithms"] == made["algorithms"] and planmod.stats["plans"] == made["plans"]
    assert planmod.stats["evals"] == made["evals"] + 1
