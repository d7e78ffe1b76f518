"""flash_attention_with_kvcache over sequences of operations: prefills, decode steps and frees of a
paged cache whose pages are handed out, freed and handed out again (holding stale rows), against a
float64 model that keeps every sequence's keys and values as a plain list (no pages): the reference
attention (serving_reference.attend, flash-attn's documented semantics) never sees the block table.

After every call the test checks the output, that each live position's slot holds its (rotated) key
and value, and that no other slot of the cache changed. Also: bad input and a call that fails after
the append leave the cache as it was.

Tolerances (conftest's error model): outputs ``tolerance("float32", keys + D, max|v|, exponent_range)``
of the float64 reference's rotated q and keys (the float32 rotation's error is ``rotation_tolerance``
relative to the pair's magnitude, inside the model's ``u32·exponent_range`` score term); cached rotated
keys within ``rotation_tolerance(2·max|k|)`` of the float64 rotation, values exact; q8_0 rows within
``conftest.q8_error``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import pytest
import serving_reference as ref
from conftest import exponent_range, q8_error, rotation_tolerance, tolerance
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aule_kp
from aule_kp.vulkan import device as devmod

VULKAN_ONLY = pytest.mark.skipif(devmod.vulkan_unavailable() is not None, reason="no Vulkan device")


def _tables(length: int, rot_dim: int):
    inv = 1.0 / 10000 ** (np.arange(0, rot_dim, 2) / rot_dim)
    ang = np.arange(length)[:, None] * inv[None]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def _local(window, capacity: int) -> bool:
    """flash-attn's "local": a window side in [0, capacity), the cache's seqlen_k (then q rows rotate at their
    own positions; a side of -1 or at least the capacity is unbounded)."""
    return window is not None and any(0 <= w < capacity for w in window)


@dataclass
class Model:
    """The float64 model of a paged cache's sequences, and the library's cache beside it."""

    batch: int
    page: int
    max_blocks: int
    hq: int
    hkv: int
    dim: int
    causal: bool
    window: Optional[tuple]
    rotary: Optional[tuple]  # (rot_dim, interleaved)
    q8: bool = False
    backend: str = "cpu"
    device_cache: bool = False
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))

    def __post_init__(self):
        self.num_blocks = self.batch * self.max_blocks + 2
        shape = (self.num_blocks, self.page, self.hkv, self.dim)
        # Stale rows everywhere: a slot read before it is written shows in the output.
        k0, v0 = (self.rng.standard_normal(shape).astype(np.float32) * 3 for _ in range(2))
        if self.device_cache:
            self.ctx = aule_kp.Context()
            self.kc, self.vc = (self.ctx.kv_cache(shape, np.float32, self.q8) for _ in range(2))
            # The device cache starts at zeros: the model's "stale rows" are zeros too.
            k0, v0 = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        elif self.q8:
            self.kc, self.vc = aule_kp.Q8Cache.from_float(k0), aule_kp.Q8Cache.from_float(v0)
        else:
            self.kc, self.vc = k0, v0
        self.free = list(self.rng.permutation(self.num_blocks))
        self.blocks: List[List[int]] = [[] for _ in range(self.batch)]
        self.keys: List[List[np.ndarray]] = [[] for _ in range(self.batch)]
        self.values: List[List[np.ndarray]] = [[] for _ in range(self.batch)]
        self.cos = self.sin = None
        if self.rotary:
            self.cos, self.sin = _tables(self.page * self.max_blocks + 8, self.rotary[0])

    def cache_values(self):
        """(k, v) float32 of what the library's caches hold now."""
        if self.device_cache:
            return self.kc.download().astype(np.float32), self.vc.download().astype(np.float32)
        if self.q8:
            return self.kc.dequantize(), self.vc.dequantize()
        return self.kc.copy(), self.vc.copy()

    def lengths(self) -> np.ndarray:
        return np.array([len(k) for k in self.keys], np.int32)

    def table(self, junk: int) -> np.ndarray:
        """The block table; entries past a sequence's blocks are ``junk`` (never read)."""
        t = np.full((self.batch, self.max_blocks), junk, np.int32)
        for s, blocks in enumerate(self.blocks):
            t[s, : len(blocks)] = blocks
        return t

    def release(self, s: int) -> None:
        """Sequence ``s`` ends: its pages go back (holding its rows) and a new one starts there."""
        self.free.extend(self.blocks[s])
        self.blocks[s], self.keys[s], self.values[s] = [], [], []

    def step(self, lq: int, new: int, junk: int, pick: List[int]) -> None:
        """One call: ``lq`` queries per sequence and ``new`` appended rows; pages for the new rows
        taken from the free list at positions ``pick`` (recycled pages included)."""
        lens = self.lengths()
        for s in range(self.batch):
            while len(self.blocks[s]) * self.page < lens[s] + new:
                self.blocks[s].append(self.free.pop(pick.pop() % len(self.free) if pick else 0))
        rng = self.rng
        q = rng.standard_normal((self.batch, lq, self.hq, self.dim)).astype(np.float32)
        kn = rng.standard_normal((self.batch, new, self.hkv, self.dim)).astype(np.float32) if new else None
        vn = rng.standard_normal((self.batch, new, self.hkv, self.dim)).astype(np.float32) if new else None
        before = self.cache_values()
        table = self.table(junk)
        out = aule_kp.flash_attention_with_kvcache(
            q, self.kc, self.vc, kn, vn, cache_seqlens=lens, block_table=table, causal=self.causal,
            window=self.window, rotary_cos=self.cos, rotary_sin=self.sin,
            rotary_interleaved=bool(self.rotary and self.rotary[1]), backend=self.backend)
        scale = 1 / math.sqrt(self.dim)
        for s in range(self.batch):
            n = int(lens[s])
            qs = q[s].astype(np.float64)
            for i in range(new):
                k = kn[s, i : i + 1].astype(np.float64)
                if self.rotary:
                    k = ref.rotary(k, self.cos, self.sin, np.array([n + i]), self.rotary[1])
                self.keys[s].append(k[0])
                self.values[s].append(vn[s, i].astype(np.float64))
            if self.rotary:
                local = self.causal or _local(self.window, self.max_blocks * self.page)
                pos = n + (np.arange(lq) if local else np.zeros(lq, int))
                qs = ref.rotary(qs, self.cos, self.sin, pos, self.rotary[1])
            total = n + new
            ks = np.array(self.keys[s]).reshape(total, self.hkv, self.dim)
            vs = np.array(self.values[s]).reshape(total, self.hkv, self.dim)
            if self.q8:  # the attention reads what the cache holds (its error checked below)
                kq, vq = self.cache_values()
                ks, vs = (np.stack([c[self.blocks[s][p // self.page], p % self.page] for p in range(total)])
                          if total else ks for c in (kq, vq))
            want = ref.attend(qs, ks, vs, scale, self.causal, self.window)
            e = exponent_range(qs.reshape(-1, self.dim), ks.reshape(-1, self.dim), scale)
            tol = tolerance("float32", total + self.dim, float(np.abs(vs).max(initial=1.0)), e)
            np.testing.assert_allclose(out[s], want, atol=tol, rtol=0, err_msg=f"sequence {s} of {lens}+{new}")
        self.check_cache(before)

    def check_cache(self, before) -> None:
        """Every live position's slot holds the model's row; every other slot is as it was."""
        kc, vc = self.cache_values()
        live = np.zeros(kc.shape[:2], bool)
        for s in range(self.batch):
            for p, (k, v) in enumerate(zip(self.keys[s], self.values[s])):
                at = (self.blocks[s][p // self.page], p % self.page)
                live[at] = True
                if self.q8:
                    for got, want in ((kc[at], k), (vc[at], v)):
                        assert (np.abs(got - want) <= q8_error(want) + rotation_tolerance(2 * np.abs(k).max())).all()
                else:
                    np.testing.assert_allclose(kc[at], k, atol=rotation_tolerance(2 * float(np.abs(k).max())), rtol=0)
                    np.testing.assert_array_equal(vc[at], v)
        np.testing.assert_array_equal(kc[~live], before[0][~live])
        np.testing.assert_array_equal(vc[~live], before[1][~live])


WINDOWS = st.sampled_from([None, (-1, -1), (2, -1), (3, 0), (1, 2), (0, 0)])
ROTARY = st.sampled_from([None, (16, False), (8, True), (16, True)])


def _run_ops(model: Model, data, max_ops: int) -> None:
    for _ in range(data.draw(st.integers(1, max_ops), label="ops")):
        if data.draw(st.integers(0, 4), label="free?") == 0:
            model.release(data.draw(st.integers(0, model.batch - 1), label="free"))
            continue
        room = int(model.page * model.max_blocks - model.lengths().max())
        new = data.draw(st.integers(0, min(room, 2 * model.page + 1)), label="new")
        lq = data.draw(st.integers(1, max(1, new)), label="lq")
        junk = data.draw(st.sampled_from([-1, 0, model.num_blocks + 7, 2**31 - 1]), label="junk")
        pick = data.draw(st.lists(st.integers(0, 1000), max_size=model.batch * model.max_blocks), label="pick")
        model.step(lq, new, junk, pick)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data(), st.sampled_from([1, 2, 3, 4, 8]), st.integers(1, 3), st.sampled_from([(1, 1), (2, 1), (4, 2)]),
       st.booleans(), WINDOWS, ROTARY, st.integers(0, 2**16))
def test_paged_sequences_cpu(data, page, batch, heads, causal, window, rotary, seed):
    model = Model(batch, page, max(2, 12 // page), heads[0], heads[1], 16, causal, window, rotary,
                  rng=np.random.default_rng(seed))
    _run_ops(model, data, 6)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data(), st.sampled_from([1, 4, 16]), st.integers(1, 3), st.booleans(), WINDOWS, st.integers(0, 2**16))
def test_paged_sequences_q8_cpu(data, page, batch, causal, window, seed):
    model = Model(batch, page, max(2, 24 // page), 2, 1, 32, causal, window, None, q8=True,
                  rng=np.random.default_rng(seed))
    _run_ops(model, data, 5)


@VULKAN_ONLY
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data(), st.sampled_from([1, 4]), st.sampled_from([None, (3, 0)]), st.booleans(), st.integers(0, 2**16))
def test_paged_sequences_vulkan(data, page, window, resident, seed):
    """The ragged Vulkan kernel (lavapipe; one pipeline: fixed heads and head dim), host caches and
    caches resident on the device."""
    model = Model(2, page, 16 // page, 2, 1, 32, True, window, None, backend="vulkan", device_cache=resident,
                  rng=np.random.default_rng(seed))
    try:
        _run_ops(model, data, 4)
    finally:
        if resident:
            model.ctx.close()


def test_rotary_unbounded_window_is_not_local(rng):
    """flash-attn rotates every q row at ``cache_seqlens`` unless causal or local, and local means a
    window side in [0, seqlen_k), seqlen_k being the cache's capacity (a side of at least that becomes
    -1): ``window=(-1, -1)`` (flash-attn's default, as ported code passes it) or a side as long as the
    cache rotates as ``window=None`` does. (-1, -1) rotated each row at its own position, silently."""
    cos, sin = _tables(32, 16)
    q, kc, vc, kn, vn = (rng.standard_normal(s).astype(np.float32) for s in
                         ((1, 3, 2, 16), (1, 20, 1, 16), (1, 20, 1, 16), (1, 3, 1, 16), (1, 3, 1, 16)))

    def call(w):
        return aule_kp.flash_attention_with_kvcache(q, kc.copy(), vc.copy(), kn, vn, cache_seqlens=5, rotary_cos=cos,
                                                    rotary_sin=sin, rotary_interleaved=False, window=w, backend="cpu")

    outs = [call(w) for w in (None, (-1, -1), (20, -1), (-1, 20), (20, 100))]
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])
    assert not np.array_equal(call((19, -1)), outs[0])  # a window inside the capacity is local: rows at their own
    want, kw, vw, qw = ref.kvcache(q, kc, vc, kn, vn, np.array([5]), cos=cos, sin=sin, interleaved=False,
                                   window=(-1, -1))
    tol = tolerance("float32", 8 + 16, float(np.abs(vw[0, :8]).max()), exponent_range(qw[0], kw[0, :8], 0.25))
    np.testing.assert_allclose(outs[1], want, atol=tol, rtol=0)


def _paged(rng, page=4, blocks=6, hkv=1, d=32):
    kc, vc = (rng.standard_normal((blocks, page, hkv, d)).astype(np.float32) for _ in range(2))
    return kc, vc


CLASHES = [  # (block_table, cache_seqlens) with page 4 and one appended row per sequence
    ([[0, 1], [1, 2]], [4, 0]),  # both sequences append to block 1, slot 0
    ([[0, 1], [1, 2]], [5, 0]),  # sequence 1 appends where sequence 0 keeps its position 4
    ([[0, 0], [2, 3]], [4, 1]),  # sequence 0's position 4 is its own position 0's slot
]


@pytest.mark.parametrize("table,lens", CLASHES)
def test_block_table_clash_raises(table, lens, rng):
    """An append into a slot that another position of the call holds silently replaced that key (the
    attention then read the new row twice, or another sequence's): ValueError naming block_table, and
    the cache untouched."""
    kc, vc = _paged(rng)
    k0, v0 = kc.copy(), vc.copy()
    q, kn, vn = (rng.standard_normal(s).astype(np.float32) for s in ((2, 1, 2, 32), (2, 1, 1, 32), (2, 1, 1, 32)))
    with pytest.raises(ValueError, match="block_table"):
        aule_kp.flash_attention_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=np.array(lens, np.int32),
                                             block_table=np.array(table, np.int32), backend="cpu")
    np.testing.assert_array_equal(kc, k0)
    np.testing.assert_array_equal(vc, v0)


def test_shared_prefix_blocks(rng):
    """Blocks shared read-only (a common prompt) with appends into each sequence's own block: allowed,
    and each sequence attends to the shared prefix and its own rows."""
    kc, vc = _paged(rng)
    table = np.array([[0, 1], [0, 2]], np.int32)
    q, kn, vn = (rng.standard_normal(s).astype(np.float32) for s in ((2, 2, 2, 32), (2, 2, 1, 32), (2, 2, 1, 32)))
    lens = np.array([4, 4], np.int32)
    want, kw, vw, _ = ref.kvcache(q, kc, vc, kn, vn, lens, table, causal=True)
    out = aule_kp.flash_attention_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens, block_table=table, causal=True,
                                               backend="cpu")
    np.testing.assert_array_equal(kc, kw)
    tol = tolerance("float32", 6 + 32, float(np.abs(vw).max()), exponent_range(q.reshape(-1, 32), kw.reshape(-1, 32),
                                                                              32 ** -0.5))
    np.testing.assert_allclose(out, want, atol=tol, rtol=0)


def _caches(kind, kc, vc):
    if kind == "q8":
        return aule_kp.Q8Cache.from_float(kc), aule_kp.Q8Cache.from_float(vc)
    if kind == "torch":
        torch = pytest.importorskip("torch")
        return torch.from_numpy(kc.copy()), torch.from_numpy(vc.copy())
    return kc.copy(), vc.copy()


def _snapshot(c):
    if isinstance(c, aule_kp.Q8Cache):
        return c.qs.copy(), c.scales.copy()
    return (np.array(c, copy=True),)


@pytest.mark.parametrize("kind,failure", [("numpy", "backend"), ("q8", "backend"), ("numpy", "kernel"),
                                          ("torch", "kernel"), ("q8", "kernel")])
def test_failed_call_leaves_cache(kind, failure, rng, monkeypatch):
    """A call that failed after its rows were appended (a named backend that cannot take the sequences:
    Triton takes no NumPy arrays; or the attention itself failing) left them in the cache, so that a
    retry appended them a second time; now the overwritten rows are put back, in every kind of host
    cache."""
    kc, vc = _caches(kind, *_paged(rng))
    before = [_snapshot(c) for c in (kc, vc)]
    q, kn, vn = (rng.standard_normal(s).astype(np.float32) for s in ((2, 1, 2, 32), (2, 3, 1, 32), (2, 3, 1, 32)))
    if kind == "torch":
        import torch

        q, kn, vn = (torch.from_numpy(x) for x in (q, kn, vn))
    if failure == "kernel":
        from aule_kp.serving import ragged

        def fail(*args, **kwargs):
            raise RuntimeError("the attention failed")

        monkeypatch.setattr(ragged, "run", fail)
    with pytest.raises(RuntimeError, match="triton" if failure == "backend" else "attention failed"):
        aule_kp.flash_attention_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=np.array([2, 3], np.int32),
                                             block_table=np.array([[0, 1], [2, 3]], np.int32),
                                             backend="triton" if failure == "backend" else "cpu")
    for c, old in zip((kc, vc), before):
        for got, want in zip(_snapshot(c), old):
            np.testing.assert_array_equal(got, want)


def test_failed_write_leaves_cache(rng):
    """v_cache cannot be written (read-only): k_cache keeps its rows."""
    kc, vc = _paged(rng)
    k0 = kc.copy()
    vc.setflags(write=False)
    q, kn, vn = (rng.standard_normal(s).astype(np.float32) for s in ((1, 1, 2, 32), (1, 2, 1, 32), (1, 2, 1, 32)))
    with pytest.raises(ValueError, match="read-only"):
        aule_kp.flash_attention_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=np.array([3], np.int32),
                                             block_table=np.array([[4, 5]], np.int32), backend="cpu")
    np.testing.assert_array_equal(kc, k0)


@pytest.mark.parametrize("which", ["k", "v"])
def test_q8_out_of_range_raises(which, rng):
    """A q8_0 block's step max|x| / 127 is stored as float16: from |x| = 127 * 65520 on it became inf and
    the block read back as inf and NaN (finite input, NaN attention). ValueError naming the argument,
    and neither cache written."""
    kc, vc = _caches("q8", *_paged(rng))
    before = [_snapshot(c) for c in (kc, vc)]
    q, kn, vn = (rng.standard_normal(s).astype(np.float32) for s in ((1, 1, 2, 32), (1, 1, 1, 32), (1, 1, 1, 32)))
    (kn if which == "k" else vn)[0, 0, 0, 5] = 127 * 65520.0
    with pytest.raises(ValueError, match=f"^{which} holds values"):
        aule_kp.flash_attention_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=np.array([1], np.int32),
                                             block_table=np.array([[0, 1]], np.int32), backend="cpu")
    for c, old in zip((kc, vc), before):
        for got, want in zip(_snapshot(c), old):
            np.testing.assert_array_equal(got, want)
    # The largest value whose step still rounds to a finite float16 is taken, and reads back within q8_error.
    big = np.zeros((1, 32), np.float32)
    big[0, 3] = 127 * 65504.0
    back = aule_kp.Q8Cache.from_float(big.reshape(1, 1, 1, 32)).dequantize().reshape(1, 32)
    assert np.isfinite(back).all() and (np.abs(back - big) <= q8_error(big)).all()
    with pytest.raises(ValueError, match="^x holds values"):
        aule_kp.Q8Cache.from_float(np.full((1, 1, 1, 32), 1e9, np.float32))


@VULKAN_ONLY
def test_device_cache_refuses_triton_before_append(rng):
    """backend="triton" cannot read a device cache: it raised only after the new rows were written to
    it; now before, and the cache holds what it held."""
    with aule_kp.Context() as ctx:
        kc, vc = (ctx.kv_cache((4, 4, 1, 32), np.float32) for _ in range(2))
        q, kn, vn = (rng.standard_normal(s).astype(np.float32) for s in ((1, 1, 2, 32), (1, 2, 1, 32), (1, 2, 1, 32)))
        with pytest.raises(aule_kp.BackendUnavailable, match="DeviceKVCache"):
            aule_kp.flash_attention_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=np.array([1], np.int32),
                                                 block_table=np.array([[2, 0]], np.int32), backend="triton")
        assert not kc.download().any() and not vc.download().any()


def test_q8_cache_of_rows_names_the_argument():
    """A Q8Cache may hold 3-D rows (the serving code's view); as a cache it failed to unpack its shape,
    a ValueError that named nothing."""
    rows = aule_kp.Q8Cache(np.zeros((10, 1, 32), np.int8), np.zeros((10, 1, 1), np.float16))
    cache = aule_kp.Q8Cache.zeros((1, 10, 1, 32))
    q = np.zeros((1, 1, 1, 32), np.float32)
    for k_cache, v_cache, name in ((rows, cache, "k_cache"), (cache, rows, "v_cache")):
        with pytest.raises(ValueError, match=f"{name} must be a 4-D Q8Cache"):
            aule_kp.flash_attention_with_kvcache(q, k_cache, v_cache, backend="cpu")
