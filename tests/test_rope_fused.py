"""RoPE fused into the Vulkan forward (glsl/rope.comp, aule_kp/vulkan/rope.py; issue 18 part 2):
q and k rotated on the device in the attention's recorded sequence, against float64.

Error model of the rotation (beside conftest's of the attention): the tables are float32 by
definition (aule_kp.rotary: float64 angles rounded once), so the reference rotates the stored
inputs with those table values in float64. The kernel computes ``x_a c - x_b s`` in float32: two
products and a difference, each rounded (``u32`` relative; a fused multiply-add rounds less), so at
most ``3 u32 (|x_a| + |x_b|)``, then one rounding to storage (``u_dtype`` of a result no larger
than ``|x_a| + |x_b|``, since ``c² + s² = 1`` up to the table's rounding). Channels outside the
rotated range are copied bit for bit. The attention is then checked on exactly what the rotation
left in the device buffers (the plan syncs them back to its staging memory), with conftest's
``output_tolerance``: together, the output is the float64 attention of the rotated inputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys

import numpy as np
import pytest
import torch
from conftest import UNIT_ROUNDOFF, output_tolerance, problem, problem_inputs
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_attention

from aule_kp.dtypes import to_f32
from aule_kp.rotary import RotaryTables

ROTATION_ROUNDINGS = 3  # float32 roundings of one rotated channel (two products, one difference)


def _vulkan():
    from aule_kp.vulkan.device import usable_device

    dev, why = usable_device()
    if dev is None:
        pytest.skip(why)
    return dev


def _tables(rng: np.random.Generator, p, half: int, interleaved: bool, offset: int, first: int,
            rotate_k: bool = True) -> RotaryTables:
    """float32 tables of positions ``0 .. P-1`` (float64 angles, as positions.py) and random
    positions in ``[first, P)`` (offsets past 0 as a decode step's)."""
    rows = first + max(p.len_q, p.len_k) + 8
    inv = 1.0 / (10000.0 ** (np.arange(half, dtype=np.float64) / half))
    angles = np.arange(rows, dtype=np.float64)[:, None] * inv[None]
    qpos = rng.integers(first, rows, (p.batch, p.len_q))
    kpos = rng.integers(first, rows, (p.batch, p.len_k)) if rotate_k else None
    return RotaryTables(np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32), qpos, kpos,
                        interleaved, offset)


def _pairs(t: RotaryTables):
    half = t.cos.shape[1]
    if t.interleaved:
        return np.arange(t.offset, t.offset + 2 * half, 2), np.arange(t.offset + 1, t.offset + 2 * half, 2)
    return np.arange(t.offset, t.offset + half), np.arange(t.offset + half, t.offset + 2 * half)


def _reference_rotation(x: np.ndarray, positions: np.ndarray, t: RotaryTables, dtype: str):
    """float64 rotation of the stored ``x`` and the error bound of each channel (module docstring)."""
    wide = to_f32(x, dtype).astype(np.float64)
    a, b = _pairs(t)
    c = t.cos.astype(np.float64)[positions][:, None]
    s = t.sin.astype(np.float64)[positions][:, None]
    out = wide.copy()
    out[..., a] = wide[..., a] * c - wide[..., b] * s
    out[..., b] = wide[..., b] * c + wide[..., a] * s
    bound = np.zeros_like(wide)
    size = np.abs(wide[..., a]) + np.abs(wide[..., b])
    unit = ROTATION_ROUNDINGS * UNIT_ROUNDOFF["float32"] + (0.0 if dtype == "float32" else UNIT_ROUNDOFF[dtype])
    bound[..., a] = bound[..., b] = unit * size * (1 + 4 * UNIT_ROUNDOFF["float32"])  # |c|,|s| <= 1 + u32
    return out, bound


@contextlib.contextmanager
def _without_compute_barrier(dev):
    """The device as with a kp before patch 5: the rotated q and k are device tensors that the plan
    syncs back to their staging between the passes, where the host can read what the pass wrote
    (with patch 5 they are device-only). Plans are dropped before and after (their key does not
    hold the patch level, which never changes in a process otherwise)."""
    from aule_kp.vulkan.plan import COMPUTE_BARRIER_PATCH

    kind = type(dev)
    held = kind.__dict__["kp_patch"]
    with dev.lock:
        dev.plans.clear()
    kind.kp_patch = property(lambda self: min(held.fget(self), COMPUTE_BARRIER_PATCH - 1))
    try:
        yield
    finally:
        kind.kp_patch = held
        with dev.lock:
            dev.plans.clear()


def run_fused(p, q, k, v, t: RotaryTables, readable: bool = False):
    """``out`` of the fused plan for ``p``; with ``readable`` (``_without_compute_barrier``),
    ``(out, q, k as the rotary pass wrote them)``."""
    from aule_kp.vulkan.backend import VulkanBackend
    from aule_kp.vulkan.plan import forward_plan, mapped_memory

    dev = _vulkan()
    backend = VulkanBackend()
    assert backend.bind_rotary(p, t.layout) is not None
    rp = dataclasses.replace(p, rotary=t.layout)
    with dev.lock:
        plan = forward_plan(dev, rp, backend.config(p))
        out, _ = plan.run(q, k, v, None, rotary=t)
        run_fused.chunks, run_fused.staged = len(plan.chunks), plan.rotary_staged
        # k stored rotated already (k_positions None): the attention binds k itself, no copy of it.
        assert all(("k_rot" in c.tensors) == t.layout.rotate_k for c in plan.chunks)
        if not readable:
            return out
        assert plan.rotary_staged
        k_name = "k_rot" if t.layout.rotate_k else "k"
        rotated = [np.concatenate([mapped_memory(c.tensors[name]).view(np.uint8)[: c.views[src].nbytes]
                                   for c in plan.chunks]) for src, name in (("q", "q_rot"), ("k", k_name))]
    dt = q.dtype
    return out, rotated[0].view(dt).reshape(q.shape), rotated[1].view(dt).reshape(k.shape)


def check_fused(p, rng, half: int, interleaved: bool, offset: int, first: int, rotate_k: bool = True):
    """The rotary pass's q and k (read back where the plan syncs them: ``_without_compute_barrier``)
    against float64 rotation, the attention of what it wrote against float64; then, with kp's
    compute barrier (the rotated buffers device-only), the same output bit for bit (same kernels,
    same data)."""
    from aule_kp.vulkan.plan import COMPUTE_BARRIER_PATCH

    dev = _vulkan()
    q, k, v = problem_inputs(p, rng)
    t = _tables(rng, p, half, interleaved, offset, first, rotate_k)
    with _without_compute_barrier(dev):
        out, q_dev, k_dev = run_fused(p, q, k, v, t, readable=True)
    for name, x, got, pos in (("q", q, q_dev, t.q_positions), ("k", k, k_dev, t.k_positions)):
        if pos is None:
            np.testing.assert_array_equal(got, x, err_msg=f"{name} is not rotated")
            continue
        want, bound = _reference_rotation(x, pos, t, p.dtype)
        err = np.abs(to_f32(got, p.dtype) - want)
        assert (err <= bound).all(), f"{name}: rotation error {err.max():.3e} over its bound"
        a, b = _pairs(t)
        rest = np.setdiff1d(np.arange(p.dim_k), np.concatenate([a, b]))
        np.testing.assert_array_equal(got[..., rest], x[..., rest], err_msg=f"{name}'s unrotated channels")
    ref, _ = reference_attention(q_dev, k_dev, v, p)
    np.testing.assert_allclose(to_f32(out, p.dtype), ref, atol=output_tolerance(p, q_dev, k_dev, v), rtol=0)
    if dev.kp_patch >= COMPUTE_BARRIER_PATCH:
        np.testing.assert_array_equal(run_fused(p, q, k, v, t), out)
        assert not run_fused.staged
    return out


GRID = [
    # (dtype, interleaved, half, offset, hq, hkv, causal, first position)
    ("float32", False, 8, 0, 2, 2, False, 0),
    ("float32", True, 8, 0, 4, 2, True, 0),
    ("float16", False, 4, 0, 4, 1, True, 100),  # partial R (8 of 16), GQA, decode-like offsets
    ("float16", True, 3, 4, 2, 1, False, 37),  # offset rotated channels (latent attention's)
    ("bfloat16", False, 4, 8, 2, 2, True, 5),
]


@pytest.mark.parametrize("dtype,interleaved,half,offset,hq,hkv,causal,first", GRID)
def test_fused_rope_forward(dtype, interleaved, half, offset, hq, hkv, causal, first, rng) -> None:
    p = problem(b=2, hq=hq, hkv=hkv, lq=5, lk=9, dk=16, dv=16, dtype=dtype, causal=causal)
    check_fused(p, rng, half, interleaved, offset, first)


def test_fused_rope_q_only(rng) -> None:
    """Keys from a cache are stored rotated: only q turns (k_positions None)."""
    p = problem(b=1, hq=4, hkv=1, lq=1, lk=12, dk=16, dv=16, dtype="float16", causal=True)
    check_fused(p, rng, 8, False, 0, 11, rotate_k=False)


def test_q_only_and_qk_plans_are_apart(rng) -> None:
    """The same shapes rotating q alone, then q and k, then q alone: each call gets a plan that binds
    what it rotates (run_fused checks the plan's buffers; check_fused the results)."""
    p = problem(b=1, hq=2, hkv=1, lq=3, lk=9, dk=16, dv=16, dtype="float32", causal=True)
    q, k, v = problem_inputs(p, rng)
    dev = _vulkan()
    for rotate_k in (False, True, False):  # each call finds the other kind's plan cached
        t = _tables(rng, p, 8, False, 0, 6, rotate_k)
        out = run_fused(p, q, k, v, t)
        with dev.lock:
            dev.plans.clear()
        np.testing.assert_array_equal(run_fused(p, q, k, v, t), out)  # the bits of a fresh plan


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31), dtype=st.sampled_from(["float32", "float16"]), interleaved=st.booleans(),
       pairs=st.integers(1, 4), lq=st.integers(1, 6), lk=st.integers(1, 10), group=st.sampled_from([1, 2]),
       causal=st.booleans())
def test_fused_rope_random(seed, dtype, interleaved, pairs, lq, lk, group, causal) -> None:
    rng = np.random.default_rng(seed)
    half = 2 * pairs if not interleaved else pairs
    dk = 2 * half + 2 * int(rng.integers(0, 3))
    offset = 2 * int(rng.integers(0, (dk - 2 * half) // 2 + 1))
    p = problem(b=int(rng.integers(1, 3)), hq=2 * group, hkv=2, lq=lq, lk=lk, dk=dk, dv=8, dtype=dtype,
                causal=causal)
    check_fused(p, rng, half, interleaved, offset, int(rng.integers(0, 50)))


def test_chunked_and_pipelined_plans(rng, monkeypatch) -> None:
    """Plans split over several bindings, and pipelined chunk by chunk, rotate each chunk's groups
    at their own positions (the push constants' group offsets)."""
    p = problem(b=2, hq=4, hkv=2, lq=3, lk=6, dk=16, dv=16, dtype="float32", causal=True)
    for name, value in (("AULE_KP_MAX_BINDING_BYTES", "1024"), ("AULE_KP_PIPELINE_CHUNKS", "2")):
        with monkeypatch.context() as m:
            m.setenv(name, value)
            check_fused(p, np.random.default_rng(7), 4, False, 0, 3)
            assert run_fused.chunks > 1, name


def test_rotary_plans_are_not_shared(rng) -> None:
    """A rotary plan and a plain one of the same problem are different plans: the plain call after
    a rotary one attends unrotated inputs, and a rotary call after a plain one rotates."""
    from aule_kp.call import attention_forward
    from aule_kp.vulkan import plan as planmod

    dev = _vulkan()
    p = problem(b=1, hq=2, hkv=1, lq=4, lk=6, dk=16, dv=16, dtype="float32", causal=True)
    q, k, v = problem_inputs(p, rng)
    t = _tables(rng, p, 8, False, 0, 3)
    plain_ref, _ = reference_attention(q, k, v, p)
    tol = output_tolerance(p, q, k, v)
    for _ in range(2):
        fused, _, _ = attention_forward(q, k, v, causal=True, backend="vulkan", rotary=t)
        plain, _, _ = attention_forward(q, k, v, causal=True, backend="vulkan")
        np.testing.assert_allclose(plain, plain_ref, atol=tol, rtol=0)
        assert np.abs(fused - plain_ref).max() > 10 * tol  # the rotation happened
    # New positions: the same plan and pipelines, new data; a fresh plan gives the same bits.
    made = dict(planmod.stats)
    t2 = _tables(rng, p, 8, False, 0, 40)
    again, _, _ = attention_forward(q, k, v, causal=True, backend="vulkan", rotary=t2)
    assert (planmod.stats["plans"], planmod.stats["algorithms"]) == (made["plans"], made["algorithms"])
    assert not np.array_equal(again, fused)
    with dev.lock:
        dev.plans.clear()
    fresh, _, _ = attention_forward(q, k, v, causal=True, backend="vulkan", rotary=t2)
    np.testing.assert_array_equal(again, fresh)


def test_unfused_layouts_fall_back(rng) -> None:
    """An odd first channel has no fused kernel: the call says so (None) before copying anything."""
    from aule_kp.call import prepare

    _vulkan()
    p = problem(b=1, hq=2, hkv=1, lq=2, lk=3, dk=16, dv=16)
    q, k, v = problem_inputs(p, rng)
    t = _tables(rng, p, 4, True, 1, 0)
    assert prepare(q, k, v, backend="vulkan", rotary=t) is None
    with pytest.raises(ValueError, match="q_positions"):
        bad = dataclasses.replace(_tables(rng, p, 4, False, 0, 0), q_positions=np.zeros((1, 5), np.int64))
        prepare(q, k, v, backend="vulkan", rotary=bad)


# --- the layers -------------------------------------------------------------------------------


def _rotation_bound(q, k, v, spec, scale, dtype) -> float:
    """What two correct rotations of the same q, k (each within ``(4 u_dtype + 3 u32)(|x_a|+|x_b|)``
    per channel: the torch path also rounds cos/sin to the dtype) can move an attention output:
    a score moves by at most ``δ = scale Σ_d (e_q|k| + |q|e_k + e_q e_k)``, the softmax weights by
    ``e^{2δ} - 1`` in l1, the output by that times ``max|v|``; twice (one per path). ``|q|``, ``|k|``
    of a rotated channel pair are bounded by ``(|x_a| + |x_b|)(1 + 4 u32)`` each (|cos|, |sin| <= 1
    after their float32 rounding, and the rotation's own roundings)."""
    t = spec.tables()
    unit = 4 * UNIT_ROUNDOFF[dtype] + 3 * UNIT_ROUNDOFF["float32"]
    qf, kf = (x.detach().double().numpy() for x in (q, k))
    a, b = _pairs(t)

    def size(x, rotated):
        m = np.abs(x)
        if rotated:
            m[..., a] = m[..., b] = (np.abs(x[..., a]) + np.abs(x[..., b])) * (1 + 4 * UNIT_ROUNDOFF["float32"])
        return m

    def err(x, rotated):
        e = np.zeros_like(x)
        if rotated:
            e[..., a] = e[..., b] = unit * (np.abs(x[..., a]) + np.abs(x[..., b]))
        return e

    rotate_k = t.k_positions is not None
    qa, eq = size(qf, True), err(qf, True)
    group = qf.shape[1] // kf.shape[1]
    ka, ek = (np.repeat(x, group, 1) for x in (size(kf, rotate_k), err(kf, rotate_k)))
    delta = scale * float((eq @ (ka + ek).swapaxes(-1, -2) + qa @ ek.swapaxes(-1, -2)).max())
    return 2 * math.expm1(2 * delta) * float(np.abs(v.detach().double().numpy()).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["gqa", "latent"])
def test_layer_fused_equals_torch_rotation(kind, dtype, monkeypatch) -> None:
    """A layer on backend="vulkan" (rotation on the device) against the same layer with the
    rotation in torch: the attention outputs within both attentions' tolerances plus what the two
    rotations' roundings can move them (``_rotation_bound``), and the fused path really ran."""
    from aule_kp.nn import GroupedQueryAttention, LatentAttention
    from aule_kp.problem import Problem, band
    from aule_kp.vulkan.backend import VulkanBackend

    _vulkan()
    torch.manual_seed(3)
    if kind == "gqa":
        layer = GroupedQueryAttention(64, 4, 2, backend="vulkan", dtype=dtype)
        import aule_kp.nn.heads as holder
    else:
        layer = LatentAttention(64, 2, None, 16, 8, 8, 8, backend="vulkan", dtype=dtype)
        import aule_kp.nn.latent as holder
    x = torch.randn(2, 6, 64, dtype=dtype)
    fused_calls = []
    bind = VulkanBackend.bind_rotary

    def spy(self, problem, layout):
        run = bind(self, problem, layout)
        fused_calls.append(run is not None)
        return run

    seen = []
    original = holder.attend

    def recording(q, k, v, **options):
        out = original(q, k, v, **options)
        seen.append((q, k, v, options, out))
        return out

    monkeypatch.setattr(VulkanBackend, "bind_rotary", spy)
    monkeypatch.setattr(holder, "attend", recording)
    with torch.no_grad():
        fused = layer(x)
        monkeypatch.setattr(sys.modules["aule_kp.nn.attend"], "FUSED_ROTARY_BACKENDS", ())
        rotated = layer(x)
    assert fused_calls == [True]
    (q, k, v, options, out_fused), (_, _, _, _, out_torch) = seen
    spec = options["rotary"]
    lq, lk = q.shape[2], k.shape[2]
    diag, left, right = band(lq, lk, causal=True, window=None, top_left=False)
    name = str(dtype).split(".")[1]
    p = Problem(q.shape[0], q.shape[1], k.shape[1], lq, lk, q.shape[3], v.shape[3], name, options["scale"], diag,
                left, right)
    qr, kr = (t.detach().float().numpy() for t in spec.apply(q.float(), k.float()))
    tol = 2 * output_tolerance(p, qr, kr, v.float().numpy(), stored=name) + _rotation_bound(q, k, v, spec,
                                                                                         options["scale"], name)
    err = float((out_fused.double() - out_torch.double()).abs().max())
    assert err <= tol, f"attention outputs differ by {err:.3e} over {tol:.3e}"
    assert torch.isfinite(fused).all() and fused.shape == rotated.shape


# --- decoding with the layers' device cache (issue 18 part 3) --------------------------------


@pytest.mark.parametrize("kind", ["gqa", "latent"])
def test_layer_decode_on_device(kind, monkeypatch) -> None:
    """``new_cache`` on a vulkan layer keeps keys and values on the device: the new keys are rotated
    by glsl/kv_append.comp as they are written, the queries by glsl/rope.comp before the ragged
    kernel, and a prefill plus Lq = 1 steps equal the full recompute, within the bounds of test_nn's
    float64 traces (whose tests run here with these spies on)."""
    import test_nn

    from aule_kp.nn import DeviceLayerCache
    from aule_kp.vulkan import kvcache, ragged

    _vulkan()
    seen = {"keys": 0, "queries": 0, "caches": 0}
    write, forward, init = kvcache.DeviceKVCache.write, ragged.forward, DeviceLayerCache.__init__

    def spy_write(self, rows, values, scales, rotary=None):
        seen["keys"] += rotary is not None
        return write(self, rows, values, scales, rotary)

    def spy_forward(*args, **kwargs):
        seen["queries"] += (args[9] if len(args) > 9 else kwargs.get("q_rotary")) is not None
        return forward(*args, **kwargs)

    def spy_init(self, *args, **kwargs):
        seen["caches"] += 1
        init(self, *args, **kwargs)

    monkeypatch.setattr(kvcache.DeviceKVCache, "write", spy_write)
    monkeypatch.setattr(ragged, "forward", spy_forward)
    monkeypatch.setattr(DeviceLayerCache, "__init__", spy_init)
    if kind == "gqa":
        test_nn.test_decode_equals_full_recompute("vulkan", "rope")
    else:
        test_nn.test_latent_attention_matches_deepseek_v3("vulkan", True, True)
    steps = test_nn.L - (4 if kind == "gqa" else 3) + 1
    assert seen == {"keys": steps, "queries": steps, "caches": 1}, seen


def test_device_cache_surface() -> None:
    """DeviceLayerCache's KVCache-like surface: length, max_len, reset, bounds, no attn_mask."""
    from aule_kp.nn import DeviceLayerCache, GroupedQueryAttention

    _vulkan()
    layer = GroupedQueryAttention(32, 4, 2, backend="vulkan")
    cache = layer.new_cache(1, 4)
    assert isinstance(cache, DeviceLayerCache) and cache.max_len == 4 and cache.length == 0
    assert not isinstance(layer.new_cache(1, 4, on_device=False), DeviceLayerCache)
    x = torch.randn(1, 3, 32)
    with torch.no_grad():
        layer(x, cache=cache)
        assert cache.length == 3
        with pytest.raises(ValueError, match="exceed max_len"):
            layer(x[:, :2], cache=cache)
        with pytest.raises(ValueError, match="attn_mask"):
            layer(x[:, :1], cache=cache, attn_mask=torch.ones(1, 1, dtype=torch.bool))
        cache.reset()
        assert cache.length == 0
        layer(x, cache=cache)
    cache.free()
