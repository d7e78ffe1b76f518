"""Shared fixtures: seeded inputs in engine storage, and the per-dtype tolerances."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from aule_kp.dtypes import from_f32  # noqa: E402

# Max abs error vs the float64 reference on standard-normal inputs. Outputs are convex combinations
# of v rows (|o| <~ 3); the kernels accumulate in fp32, so fp32 results sit within ~1e-6 relative
# of exact (2e-5 leaves room for long rows). 16-bit outputs are rounded once to their storage type:
# half an ulp at |o| ~ 3 is 1e-3 for fp16 and 8e-3 for bf16; scores from 16-bit inputs are exact
# in fp32, so the rounding of the output dominates.
ATOL = {"float32": 2e-5, "float16": 2.5e-3, "bfloat16": 1.6e-2}


def make_inputs(rng: np.random.Generator, shape_q, shape_k, shape_v, dtype: str):
    """q, k, v in the host storage of ``dtype`` (bf16 as uint16 bits)."""
    return tuple(from_f32(rng.standard_normal(s).astype(np.float32), dtype) for s in (shape_q, shape_k, shape_v))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
