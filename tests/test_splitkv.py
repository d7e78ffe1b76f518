"""Split-KV decoding (glsl/fa2_splitkv.comp; its choice in aule_kp/vulkan/choice.py) on lavapipe against the
float64 reference, and the automatic choice on a GPU-like device description.

Split counts are forced with ``AULE_KP_SPLIT_KV`` so tiny shapes exercise many splits, splits that
see no key, and key counts that are not a multiple of the split length. The last workgroup of each
row block merges the splits, found with a counter the plan keeps across calls: repeated calls check
that it is put back to zero. Head dims stay at 32 except where a test is about them: every new
specialisation costs lavapipe compile time.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from conftest import check, check_plan_reuse, make_inputs, output_tolerance, problem
from reference import reference_attention

from aule_kp.dtypes import to_f32
from aule_kp.vulkan import device as devmod
from aule_kp.vulkan import plan as planmod
from aule_kp.vulkan.backend import VulkanBackend
from aule_kp.vulkan.choice import MIN_SPLIT_KEYS, choose_forward, split_kv_config
from aule_kp.vulkan.configs import KernelConfig, SplitKVConfig, merge_lanes

pytestmark = pytest.mark.skipif(devmod.vulkan_unavailable() is not None, reason="no Vulkan device")


@pytest.fixture
def splits(monkeypatch):
    """Forces N splits: ``splits(N)``."""
    def force(n: int) -> None:
        monkeypatch.setenv("AULE_KP_SPLIT_KV", str(n))
    return force


def check_split(p, rng, mask=None, n_split=None):
    """``check`` after asserting that the backend really runs split-KV (with ``n_split`` splits)."""
    cfg = VulkanBackend().config(p)
    assert isinstance(cfg, SplitKVConfig), cfg
    if n_split is not None:
        assert cfg.n_split == n_split
    return check(p, rng, mask)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("lq", [1, 3, 16])
def test_dtypes_query_lengths_gqa(dtype, lq, splits, rng):
    splits(3)
    p = problem(b=2, hq=4, hkv=2, lq=lq, lk=75, dtype=dtype)
    cfg = VulkanBackend().config(p)
    assert 75 % cfg.split_len != 0
    check_split(p, rng, n_split=3)


@pytest.mark.parametrize("n", [1, 2, 5, 64])
def test_forced_split_counts(n, splits, rng):
    splits(n)  # 64 splits of at least one key step each: most of them see no key
    check_split(problem(b=1, hq=4, hkv=2, lq=3, lk=77), rng, n_split=n)


@pytest.mark.parametrize("b,hq,hkv", [(1, 4, 1), (2, 6, 2), (1, 3, 3)])
def test_gqa_mqa(b, hq, hkv, splits, rng):
    splits(4)
    check_split(problem(b=b, hq=hq, hkv=hkv, lq=2, lk=61, causal=True), rng)


@pytest.mark.parametrize("top_left", [False, True])
@pytest.mark.parametrize("lq,lk", [(1, 50), (5, 47), (16, 40), (16, 9)])
def test_causal_alignments(lq, lk, top_left, splits, rng):
    splits(6)
    out, lse = check_split(problem(hq=2, hkv=1, lq=lq, lk=lk, causal=True, top_left=top_left), rng)
    if lq > lk and not top_left:  # bottom-right: the first lq - lk rows see no key
        assert np.all(out[:, :, : lq - lk] == 0) and np.all(np.isneginf(lse[:, :, : lq - lk]))


@pytest.mark.parametrize("window", [(4, 0), (0, 3), (8, 8), (-1, 2), (5, -1)])
@pytest.mark.parametrize("causal", [False, True])
def test_windows(window, causal, splits, rng):
    # 7 splits over the band of 16 rows: a row sees a few of them, and some no split at all.
    splits(7)
    check_split(problem(lq=16, lk=90, window=window, causal=causal), rng)


@pytest.mark.parametrize("mask_shape", [(2, 4, 3, 70), (1, 1, 1, 70), (2, 1, 3, 1), (1, 4, 1, 70)])
@pytest.mark.parametrize("kind", ["float", "bool"])
def test_masks(mask_shape, kind, splits, rng):
    splits(4)
    p = problem(b=2, hq=4, hkv=2, lq=3, lk=70, mask_shape=mask_shape)
    if kind == "float":
        mask = rng.standard_normal(mask_shape).astype(np.float32)
    else:
        mask = np.where(rng.random(mask_shape) > 0.3, 0.0, -np.inf).astype(np.float32)
    check_split(p, rng, mask)


def test_fully_masked_rows_are_zero(splits, rng):
    splits(5)
    shape = (1, 2, 3, 70)
    mask = np.zeros(shape, np.float32)
    mask[:, :, 1] = -np.inf  # row 1 sees nothing
    mask[:, 1, 2, :35] = -np.inf  # row 2 of head 1 sees only the later splits
    out, lse = check_split(problem(lq=3, lk=70, mask_shape=shape), rng, mask)
    assert np.all(out[:, :, 1] == 0) and np.all(np.isneginf(lse[:, :, 1]))


@pytest.mark.parametrize("dk,dv,dtype", [(32, 64, "float32"), (64, 32, "float16"), (256, 256, "float16"),
                                         (128, 96, "float32")])
def test_head_dims(dk, dv, dtype, splits, rng):
    splits(3)
    check_split(problem(hq=2, hkv=1, lq=2, lk=53, dk=dk, dv=dv, dtype=dtype, causal=True), rng)


@pytest.mark.parametrize("stage", [0, 2])
def test_gpu_style_tiles(stage, rng):
    # GPU-sized workgroups (16 key groups of 8 lanes, 4 keys each per step), as far as lavapipe's
    # 8-wide subgroups allow, given to the backend directly: 64 merge units, 2 lanes each; with
    # STAGE 2 each step's loads are issued a step ahead.
    p = problem(b=1, hq=8, hkv=2, lq=1, lk=300, dk=64, dv=64, dtype="float16", causal=True)
    kernel = KernelConfig("splitkv", "fa2_splitkv", 64, 64, br=4, bc=4, tpr=8, dtype=1, wg=128, stage=stage)
    assert merge_lanes(kernel.br, kernel.dv, kernel.wg) == 2
    step = kernel.wg // kernel.tpr * kernel.bc
    cfg = SplitKVConfig(kernel, n_split=3, split_len=step * math.ceil(300 / (3 * step)))
    check(p, rng, config=cfg)


def counters_of(plan):
    """The split-KV counters of every chunk of ``plan``, read back from the device."""
    dev = devmod.get_device()
    tensors = [c.tensors["counters"] for c in plan.chunks]
    seq = dev.manager.sequence().record(dev.kp.OpTensorSyncLocal(tensors))
    seq.eval()
    seq.destroy()
    return np.concatenate([t.data() for t in tensors])


@pytest.mark.parametrize("shape", [
    dict(b=2, hq=8, hkv=2, lq=3),  # 12 rows per kv group: two row blocks, one a part
    dict(b=1, hq=2, hkv=2, lq=1),  # one row per block: split lanes share the merge
])
def test_many_splits(shape, splits, rng):
    # 64 workgroups per row block count themselves done on one counter; all splits see keys (the
    # keys a workgroup takes per step depend on the device's tiling: 8 on lavapipe, 64 on an H200).
    splits(64)
    kernel = VulkanBackend().config(problem(**shape, lk=4096)).kernel
    step = kernel.wg // kernel.tpr * kernel.bc
    p = problem(**shape, lk=64 * step - step // 2)
    cfg = VulkanBackend().config(p)
    assert cfg.n_split * cfg.split_len >= p.len_k > (cfg.n_split - 1) * cfg.split_len
    if shape["hkv"] == shape["hq"]:
        assert merge_lanes(cfg.kernel.br, cfg.kernel.dv, cfg.kernel.wg) > 1
    check_split(p, rng, n_split=64)
    assert not counters_of(VulkanBackend().plan(p)).any()


@pytest.mark.parametrize("n,dtype,causal", [(7, "float32", False), (64, "float16", True)])
def test_repeated_calls(n, dtype, causal, splits):
    # The same plan, new inputs each call: a counter left non-zero would make the wrong workgroup
    # merge (or none) on the next call.
    splits(n)
    p = problem(b=2, hq=4, hkv=2, lq=2, lk=300, dtype=dtype, causal=causal)
    rng = np.random.default_rng(99)
    made = dict(planmod.stats)
    for _ in range(4):
        check_split(p, rng, n_split=n)
    assert planmod.stats["plans"] - made["plans"] <= 1
    assert not counters_of(VulkanBackend().plan(p)).any()


def test_chunked_bindings(splits, monkeypatch, rng):
    splits(3)
    p = problem(b=3, hq=4, hkv=2, lq=2, lk=30, causal=True)
    cfg = VulkanBackend().config(p)
    per_group = max({**planmod.group_bytes(p), **cfg.group_bytes(p)}.values())
    monkeypatch.setenv("AULE_KP_MAX_BINDING_BYTES", str(2 * per_group))  # 6 groups -> 3 dispatches each pass
    plan = VulkanBackend().plan(p)
    assert [(c.g0, c.g1) for c in plan.chunks] == [(0, 2), (2, 4), (4, 6)]
    # One forward dispatch per chunk (and the output check's where it runs on the device).
    assert all(len(c.algorithms) == 1 + plan.device_check and set(planmod.SPLITKV_SCRATCH) <= c.tensors.keys()
               for c in plan.chunks)
    check_split(p, rng)
    check_split(p, rng)  # each chunk's counters were put back to zero
    assert not counters_of(plan).any()


def test_plan_reuse(splits, rng):
    splits(4)
    p = problem(lq=2, lk=66)
    check_plan_reuse(p, check_split(p, rng)[0])


def test_long_keys_automatic(rng, monkeypatch):
    # Chosen without forcing on this CPU device (a decode shape: the forward's grid is 2 workgroups),
    # and thousands of keys per invocation stay under lavapipe's loop limit.
    monkeypatch.delenv("AULE_KP_SPLIT_KV", raising=False)
    p = problem(lq=1, lk=6000, dtype="float16")
    cfg = VulkanBackend().config(p)
    assert isinstance(cfg, SplitKVConfig) and cfg.n_split >= 2 and cfg.split_len >= MIN_SPLIT_KEYS
    check(p, rng)


def test_never_and_not_for_long_queries(splits):
    splits(0)
    assert isinstance(VulkanBackend().config(problem(lq=1, lk=6000)), KernelConfig)
    splits(8)
    assert isinstance(VulkanBackend().config(problem(lq=17, lk=6000)), KernelConfig)


def test_bad_env(monkeypatch):
    monkeypatch.setenv("AULE_KP_SPLIT_KV", "lots")
    with pytest.raises(ValueError, match="AULE_KP_SPLIT_KV"):
        split_kv_config(devmod.get_device().caps, problem(lq=1, lk=600))


def _discrete_gpu():
    """A description of a discrete GPU (NVIDIA-like limits), for the automatic choice only."""
    return replace(devmod.get_device().caps, type="discrete", subgroup_size=32, min_subgroup_size=32,
                   max_subgroup_size=32, subgroup_shuffle=True, shared_memory=48 << 10,
                   max_workgroup_invocations=1024, max_workgroup_count=(2**31 - 1, 65535, 65535),
                   max_storage_buffer_range=2**32 - 1, coopmat=False, coopmat_shapes=())


def test_automatic_choice_on_a_discrete_gpu(monkeypatch):
    monkeypatch.delenv("AULE_KP_SPLIT_KV", raising=False)
    monkeypatch.delenv("AULE_KP_FORCE_VARIANT", raising=False)
    caps = _discrete_gpu()
    decode = problem(b=1, hq=32, hkv=8, lq=1, lk=32768, dk=128, dv=128, dtype="float16")
    cfg = choose_forward(caps, decode)[0]
    assert isinstance(cfg, SplitKVConfig)
    blocks = math.ceil(decode.group * decode.len_q / cfg.kernel.br)
    grid = cfg.n_split * decode.batch * decode.heads_kv * blocks
    assert 256 <= grid <= 4096 and cfg.split_len >= MIN_SPLIT_KEYS
    assert cfg.n_split * cfg.split_len >= decode.len_k > (cfg.n_split - 1) * cfg.split_len
    # The packed rows (4 query heads x 1 row) share each K/V load.
    assert cfg.kernel.br == 4 and cfg.shared_bytes() <= caps.shared_memory
    # Speculative decoding (Lq 16), GQA 8: still split.
    assert isinstance(choose_forward(caps, problem(hq=64, hkv=8, lq=16, lk=8192, dk=128, dv=128))[0], SplitKVConfig)
    # Not for a long query block, a large batch (the forward's grid fills the GPU) or short keys.
    assert isinstance(choose_forward(caps, problem(hq=32, hkv=8, lq=4096, lk=4096, dk=128, dv=128))[0], KernelConfig)
    assert isinstance(choose_forward(caps, problem(b=64, hq=32, hkv=8, lq=1, lk=32768, dk=128, dv=128))[0],
                      KernelConfig)
    assert isinstance(choose_forward(caps, problem(hq=32, hkv=8, lq=1, lk=300, dk=128, dv=128))[0], KernelConfig)
    # A pinned variant keeps its kernel unless splits are forced.
    assert isinstance(choose_forward(caps, decode, variant="scalar")[0], KernelConfig)
    assert isinstance(choose_forward(caps, decode, num_splits=0)[0], KernelConfig)
    assert isinstance(choose_forward(caps, decode, variant="scalar", num_splits=3)[0], SplitKVConfig)


def test_automatic_choice_on_a_cpu_driver(monkeypatch):
    # CPU drivers take split-KV for decode shapes even when the forward's grid is full (see
    # split_kv_config), but not for short keys or long query blocks.
    monkeypatch.delenv("AULE_KP_SPLIT_KV", raising=False)
    monkeypatch.delenv("AULE_KP_FORCE_VARIANT", raising=False)
    caps = replace(devmod.get_device().caps, type="cpu")
    assert isinstance(choose_forward(caps, problem(b=16, hq=8, hkv=2, lq=1, lk=1024, dk=64, dv=64))[0], SplitKVConfig)
    assert isinstance(choose_forward(caps, problem(b=16, hq=8, hkv=2, lq=1, lk=300, dk=64, dv=64))[0], KernelConfig)
    assert isinstance(choose_forward(caps, problem(b=1, hq=8, hkv=2, lq=64, lk=1024, dk=64, dv=64))[0], KernelConfig)


def test_gpu_tensor_path(splits):
    import aule_kp

    splits(3)
    rng = np.random.default_rng(7)
    p = problem(b=1, hq=4, hkv=2, lq=2, lk=50, dtype="float16", causal=True)
    q, k, v = make_inputs(rng, (1, 4, 2, 32), (1, 2, 50, 32), (1, 2, 50, 32), "float16")
    with aule_kp.Context() as ctx:
        tq, tk, tv = (ctx.tensor(x.shape, np.float16).upload(x) for x in (q, k, v))
        out = ctx.attention(tq, tk, tv, causal=True).download()
        keys = list(ctx.device.plans._plans)
        assert any(key[0] == "io" and isinstance(key[2], SplitKVConfig) for key in keys)
    ref, _ = reference_attention(q, k, v, p)
    atol = output_tolerance(p, q, k, v)
    np.testing.assert_allclose(to_f32(out, "float16"), ref, atol=atol, rtol=0)
