"""Shared fixtures: seeded inputs in engine storage, and the error model behind every tolerance."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Tuple

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

from reference import backward_scales, output_scale, reference_attention  # noqa: E402

from aule_kp.cpu import native as _native  # noqa: E402
from aule_kp.dtypes import from_f32, to_f32  # noqa: E402
from aule_kp.problem import Problem, band  # noqa: E402

# scripts/cpu_sanitize.sh (`make sanitize`): the CPU kernels' tests run against AddressSanitizer builds.
if os.environ.get("CPU_SANITIZED_LIBS"):
    _native.LIB_DIR = Path(os.environ["CPU_SANITIZED_LIBS"])

#: Unit roundoff (half an ulp of 1.0) of each storage type. Every backend computes in float32.
UNIT_ROUNDOFF = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}

#: λ of the probabilistic rounding bound below: a sum's error stays within λ·sqrt(n)·u of its largest
#: partial sum with probability >= 1 - 2·exp(-λ²/2) (1e-14 for λ = 8), per sum.
LAMBDA = 8.0

#: ``exponent_range`` of a problem with unit-normal q, k, the default scale and no mask, at every
#: size used here: the sum of |scale·q_d·k_d| over D stays below ~6 (the score), and the row's shift
#: (its largest score) is as large again.
UNIT_EXPONENT = 12.0


def _dtype_name(dtype: Any) -> str:
    """``"float32"`` for ``"float32"``, ``np.float32`` or ``torch.float32``."""
    name = str(dtype).replace("torch.", "")
    return name if name in UNIT_ROUNDOFF else np.dtype(dtype).name


def tolerance(dtype: Any, reduction_len: int, value_scale: float = 1.0, exponent_range: float = UNIT_EXPONENT,
              roundings: int = 2) -> float:
    """Largest absolute error a correct backend makes against the float64 reference, for a result
    stored in ``dtype`` and computed by float32 sums of ``reduction_len`` softmax-weighted terms.

    The error model behind every tolerance of the suite:

    * Inputs are exact: 16-bit storage widens to float32 exactly and the reference widens the same
      values, so all error comes from the computation and the final rounding.
    * A score ``scale·q·k + mask - shift`` is a float32 sum whose rounding is relative to its largest
      terms, so it is off by about ``u32·exponent_range`` (``exponent_range``: the magnitude of those
      terms, see :func:`exponent_range`), and each weight ``exp(s - lse)`` carries that as a relative
      error into every term it weighs.
    * A float32 sum of ``n`` terms accumulates rounding like a random walk: about ``u32·sqrt(n)`` of
      its largest partial sum, within λ times that with overwhelming probability (Higham & Mary,
      "A new approach to probabilistic rounding error analysis", SIAM J. Sci. Comput. 41(5), 2019).
      Blocked sums (BLAS, online-softmax tiles) do better. The worst-case bound ``n·u32`` is never
      approached by random data and would hide a dropped key at the longest rows tested.
    * ``value_scale`` bounds the partial sums: the sum of absolute terms behind an entry, at most
      ``max |v|`` for an attention output (a convex combination of rows of v;
      :func:`reference.output_scale`), :func:`reference.backward_scales` for a gradient, 1 for a
      log-sum-exp (its error is the relative error of its sum, plus the score error).
    * A 16-bit result is rounded once to storage (``u_dtype`` relative), and kernels may round the
      terms to the input type on the way: ``roundings`` of ``u_dtype`` each. An output: 2 (P before
      the second GEMM, then the result). A gradient: 4 (P, dS, the stored 16-bit O inside
      ``D = rowsum(dO∘O)``, then the result); a one-row problem (decode) cannot average them away.

    So ``atol = (λ·u32·(sqrt(n) + exponent_range) + roundings·u_dtype)·value_scale`` (no storage term
    for float32: its final rounding is one more ``u32``, inside the first term).
    ``test_error_model.py`` checks that a dropped key or a wrong scale (1% in float32) exceeds it
    at the sizes the suite uses, and says what 16-bit precision cannot resolve.
    """
    name = _dtype_name(dtype)
    u32 = UNIT_ROUNDOFF["float32"]
    storage = 0.0 if name == "float32" else roundings * UNIT_ROUNDOFF[name]
    return (LAMBDA * u32 * (math.sqrt(max(reduction_len, 1)) + exponent_range) + storage) * value_scale


def exponent_range(q: np.ndarray, k: np.ndarray, scale: float, mask: Optional[np.ndarray] = None) -> float:
    """``exponent_range`` of :func:`tolerance` for float inputs ``q [..., Lq, D]``, ``k [..., Lk, D]``:
    twice (the score and the row's shift) the largest ``|scale|·sum_d |q_d k_d|`` (what a dot
    product's rounding scales with) plus the largest finite |mask| entry. Mask entries of magnitude
    beyond 2**53 times the scores are left out: float64 rounds the score away there too, so the
    reference and float32 agree exactly (Hugging Face's ``finfo.min`` padding)."""
    qa = np.abs(np.asarray(q, dtype=np.float64))
    ka = np.abs(np.asarray(k, dtype=np.float64))
    if qa.size == 0 or ka.size == 0:
        return UNIT_EXPONENT
    lead = qa.shape[0] if qa.ndim > 2 and qa.shape[0] == ka.shape[0] else 1
    qa, ka = qa.reshape(lead, -1, qa.shape[-1]), ka.reshape(lead, -1, ka.shape[-1])
    scores = abs(scale) * max(float((qa[b] @ ka[b].T).max(initial=0.0)) for b in range(lead))
    top = 0.0
    if mask is not None:
        m = np.abs(np.asarray(mask, dtype=np.float64))
        m = m[np.isfinite(m) & (m < 2.0**53 * max(scores, 1.0))]
        top = float(m.max(initial=0.0))
    return max(2.0 * (scores + top), 1.0)


#: Rounding of a soft-capped score beyond the dot product's, in units of ``u32·softcap``: tanh itself
#: (NumPy's, or ``(1 - e)/(1 + e)`` with ``e = exp2(-2|x| log2 e)`` in the kernels: Vulkan's exp2 is
#: good to ``3 + 2|y|`` ulp of ``e``, which ``e``'s own size damps to a few ulp of the result) and the
#: divide and multiply by ``softcap`` around it. The dot product's error passes through tanh damped
#: (its slope is at most 1), so ``exponent_range`` still bounds that part.
TANH_ROUNDING = 6.0


def score_mods_range(p: Problem, alibi: Optional[np.ndarray] = None) -> float:
    """What the score modifiers (:mod:`aule_kp.scoremods`) add to ``exponent_range``: the soft-cap's
    rounding (``TANH_ROUNDING``) and, like a mask's, twice the largest ALiBi bias a row sees (the
    score and the row's shift; the bias is one float32 product, rounded relative to itself)."""
    extra = TANH_ROUNDING * p.softcap
    if alibi is not None and p.len_q and p.len_k:
        dist = np.abs(np.arange(p.len_k)[None, :] - np.arange(p.len_q)[:, None] - p.diag)
        seen = p.visible(np.arange(p.len_q), np.arange(p.len_k))
        extra += 2.0 * float(np.abs(alibi).max()) * float(np.where(seen, dist, 0).max())
    return extra


def output_tolerance(p: Problem, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                     mask: Optional[np.ndarray] = None, stored: Optional[str] = None,
                     alibi: Optional[np.ndarray] = None, sinks: Optional[np.ndarray] = None) -> float:
    """:func:`tolerance` of an attention output for storage-dtype inputs: sums over the keys (and the
    head dim), scaled by the largest ``P|V|`` (:func:`reference.output_scale`). ``stored``: the dtype
    the result is stored in when the inputs are given widened to ``p.dtype`` (default ``p.dtype``).
    Score modifiers widen the exponent range (``score_mods_range``); a sink is one more term of the
    row's sum (inside the model's reduction)."""
    qf, kf = to_f32(q, p.dtype), to_f32(k, p.dtype)
    return tolerance(stored or p.dtype, p.len_k + p.dim_k, output_scale(q, k, v, p, mask, alibi, sinks),
                     exponent_range(qf, kf, p.scale, mask) + score_mods_range(p, alibi))


def lse_tolerance(q: np.ndarray, k: np.ndarray, scale: float, mask: Optional[np.ndarray] = None,
                  p: Optional[Problem] = None, alibi: Optional[np.ndarray] = None) -> float:
    """:func:`tolerance` of a float32 row log-sum-exp (whatever the input dtype); ``p`` (and
    ``alibi``) add the score modifiers' range."""
    extra = 0.0 if p is None else score_mods_range(p, alibi)
    return tolerance("float32", np.shape(k)[-2] + np.shape(q)[-1], 1.0, exponent_range(q, k, scale, mask) + extra)


def float64_tolerance(bound32: Any, computations: int = 2) -> Any:
    """The bound between ``computations`` float64 computations of a result (a float64 reference against
    another, e.g. torch autograd or a Hugging Face module cast to float64), from ``bound32``, the model's
    bound (scalar or elementwise) of one float32 computation of it.

    Every term of the float32 model (:func:`tolerance`, :func:`rotation_tolerance`, tests/layer_error.py)
    is a count of roundings times ``u32`` with exact inputs; the same operations in float64 round at
    ``u64 = 2**-53``, so each float64 computation is within ``bound32·u64/u32`` (``2**-29`` of it) of the
    exact result, and two of them within ``computations`` times that of each other. Valid only for
    float32 inputs (widened exactly) and float32 bounds without a 16-bit storage term."""
    return computations * 2.0**-29 * bound32


def _gamma(k: int, u: float) -> float:
    """Higham's ``γ_k = k·u / (1 - k·u)``: ``k`` roundings of relative size ``u``, higher orders included."""
    return k * u / (1.0 - k * u)


def rotation_tolerance(pair_sum: Any, dtype: Any = "float32", rounded_tables: bool = False) -> Any:
    """Largest error of one channel of a RoPE rotation ``y = x1·c - x2·s`` (or ``x2·c + x1·s``) computed
    in float32 against the float64 rotation of the same ``x``, given ``pair_sum = |x1| + |x2|`` of its
    pair (elementwise, or a scalar bound such as ``2·max|x|``).

    * The two products and the difference round once each: ``u32·(|x1 c| + |x2 s|) + u32·|y|``, and
      ``|x1 c| + |x2 s|`` and ``|y|`` are at most ``pair_sum`` (``|c|, |s| <= 1``): 2 roundings of it.
      A fused multiply-add only drops one.
    * ``rounded_tables``: cos and sin rounded from float64 angles to float32 (aule_kp.nn's
      RotaryEmbedding; a serving call's tables are inputs, exact): one more ``u32`` in each product, 3.
    * The float64 reference rounds as often at ``u64`` (the same count, 2**-29 of it).
    * A 16-bit ``dtype``: the result is stored in ``dtype`` and the reference rounds its float64 rotation
      to ``dtype`` as well; the two roundings are ``u_dtype·|y|`` each, ``2·u_dtype·pair_sum`` apart at
      most (one storage ulp), beside the float32 term.

    With ``pair_sum = 2·max|x|`` and tables as inputs this is ``4·u_dtype·max|x|`` (plus
    ``4·u32·max|x|`` for 16-bit storage), the bound the tests used to write without its derivation."""
    name = _dtype_name(dtype)
    k = 3 if rounded_tables else 2
    storage = 0.0 if name == "float32" else 2 * UNIT_ROUNDOFF[name]
    return (_gamma(k, UNIT_ROUNDOFF["float32"]) + _gamma(k, 2.0**-53) + storage) * pair_sum


def q8_error(x: np.ndarray) -> np.ndarray:
    """Per-value bound of ``|dequantize(quantize(x)) - x|`` for q8_0 (aule_kp.q8: blocks of 32 along the
    last axis, step ``d = max|block| / 127`` stored in float16): rounding to the nearest step is half a
    step off; the float16 step is within ``max(u16·d, 2**-25)`` of float32's (absolute below float16's
    normal range), which moves a value of at most 127 steps 127 times that; float32's rounding of the
    step and of ``x / d`` adds ``127·3·u32·d``, bounded here by another ``127·u16·d``."""
    x = np.abs(np.asarray(x, dtype=np.float64))
    u16 = UNIT_ROUNDOFF["float16"]
    step = x.reshape(*x.shape[:-1], -1, 32).max(-1) / 127
    return np.repeat(step * (0.5 + 127 * u16) + 127 * np.maximum(u16 * step, 2.0**-25), 32, axis=-1)


def make_inputs(rng: np.random.Generator, shape_q, shape_k, shape_v, dtype: str):
    """q, k, v in the host storage of ``dtype`` (bf16 as uint16 bits)."""
    return tuple(from_f32(rng.standard_normal(s).astype(np.float32), dtype) for s in (shape_q, shape_k, shape_v))


def problem_inputs(p: Problem, rng: np.random.Generator):
    """q, k, v of ``p``'s shapes and dtype (``make_inputs``)."""
    return make_inputs(rng, (p.batch, p.heads_q, p.len_q, p.dim_k), (p.batch, p.heads_kv, p.len_k, p.dim_k),
                       (p.batch, p.heads_kv, p.len_k, p.dim_v), p.dtype)


RNG_SEED = 1234


@pytest.fixture(params=["compiled", "numpy"])
def cpu_path(request: Any, monkeypatch: Any) -> str:
    """Runs a test once on each path of the CPU backend: compiled (the native forward kernel, the
    backward's numba kernels) and NumPy (the fallback without them), which it takes here with both
    hidden."""
    from aule_kp.cpu import compiled, native
    from aule_kp.cpu.backend import CpuBackend

    if request.param == "numpy":
        monkeypatch.setattr(CpuBackend, "kernels", lambda self: None)
        monkeypatch.setattr(CpuBackend, "native", lambda self: None)
    elif native.load() is None or compiled.load() is None:
        pytest.skip("the native CPU kernel or numba is missing: no compiled CPU path")
    return request.param


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(RNG_SEED)


def gradient_tolerances(p: Problem, q: np.ndarray, k: np.ndarray, v: np.ndarray, dout: np.ndarray,
                        mask: Optional[np.ndarray] = None, stored: Optional[str] = None,
                        alibi: Optional[np.ndarray] = None, sinks: Optional[np.ndarray] = None
                        ) -> Tuple[float, float, float, float]:
    """:func:`tolerance` of ``(dq, dk, dv, dmask)`` for storage-dtype inputs: each gradient's partial
    sums are bounded by :func:`reference.backward_scales`, its rounding runs through a sum over the
    query rows of a group, one over the keys and one over the head dim (dP and D), and a 16-bit
    gradient goes through four roundings to the input type. Score modifiers widen the exponent range
    as for the output."""
    n = p.len_q * p.group + p.len_k + max(p.dim_k, p.dim_v)
    qf, kf = to_f32(q, p.dtype), to_f32(k, p.dtype)
    e = exponent_range(qf, kf, p.scale, mask) + score_mods_range(p, alibi)
    return tuple(tolerance(stored or p.dtype, n, scale, e, roundings=4)
                 for scale in backward_scales(q, k, v, dout, p, mask, alibi, sinks))


def problem(b=1, hq=2, hkv=1, lq=24, lk=40, dk=32, dv=32, dtype="float32", causal=False, window=None,
            top_left=False, mask_shape=None, scale=None, softcap=0.0, alibi_rows=0) -> Problem:
    diag, left, right = band(lq, lk, causal=causal, window=window, top_left=top_left)
    return Problem(b, hq, hkv, lq, lk, dk, dv, dtype, scale or 1 / math.sqrt(dk), diag, left, right, mask_shape,
                   softcap=softcap, alibi_rows=alibi_rows)


def check(p: Problem, rng, mask=None, backend=None, config=None, lse_rounding: float = 0.0):
    """``backend``'s forward of ``p`` on random inputs against float64; ``lse_rounding``: a kernel's own
    addition to the LSE's error model (the kernel's test derives it)."""
    q, k, v = problem_inputs(p, rng)
    out, lse = (backend or _vulkan()).forward(p, q, k, v, mask, config)
    ref_out, ref_lse = reference_attention(q, k, v, p, mask)
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert not np.isnan(to_f32(out, p.dtype)).any()
    np.testing.assert_allclose(to_f32(out, p.dtype), ref_out, atol=output_tolerance(p, q, k, v, mask), rtol=0)
    finite = np.isfinite(ref_lse)
    np.testing.assert_array_equal(np.isfinite(lse), finite)
    qf, kf = to_f32(q, p.dtype), to_f32(k, p.dtype)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], atol=lse_tolerance(qf, kf, p.scale, mask) + lse_rounding,
                               rtol=0)
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
