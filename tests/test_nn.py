"""aule_kp.nn: the layers against torch's and Hugging Face's own modules (same weights), in float64
as the reference, with tolerances from the layer error model (tests/layer_error.py, built on
conftest's); decoding with a KV cache against the full recompute; RoPE and ALiBi."""

from __future__ import annotations

import os

# Triton's CPU interpreter decides at decoration time: set before anything imports triton (as test_triton).
os.environ["TRITON_INTERPRET"] = "1"

import copy  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import zlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import UNIT_ROUNDOFF, float64_tolerance, gradient_tolerances  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from layer_error import Bounded, Projections, additive, attention, plus, projected_layer  # noqa: E402

from aule_kp import AuleFallbackWarning  # noqa: E402
from aule_kp.nn import (  # noqa: E402
    GroupedQueryAttention,
    KVCache,
    LatentAttention,
    MultiHeadAttention,
    MultiQueryAttention,
    RotaryEmbedding,
    RotarySpec,
    SelfAttention,
    alibi_bias,
    alibi_slopes,
    rope_inv_freq,
)
from aule_kp.nn.mha import merge_masks  # noqa: E402

BACKENDS = ("cpu", "vulkan")
U32 = UNIT_ROUNDOFF["float32"]


def _close(got: torch.Tensor, want: torch.Tensor, atol: float, what: str) -> None:
    err = float((got.detach().to(torch.float64) - want.detach()).abs().max())
    print(f"{what}: {err:.2e} / {atol:.2e}")
    assert err <= atol, f"{what}: max error {err:.3e} over the model's {atol:.3e}"


def _close_float64(trace: Bounded, want: torch.Tensor, what: str) -> None:
    """A float64 trace of the layer error model (``trace.value``) against the reference module run in
    float64: two float64 computations, within the trace's float32 bounds at float64's unit roundoff."""
    _close_bounded(trace.value, want, float64_tolerance(trace.err), what)


def _close_bounded(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """Every entry within its own bound."""
    err = (got.detach().to(torch.float64) - want.detach()).abs()
    ratio = float((err / bound).max())
    print(f"{what}: max error {float(err.max()):.2e}, bound {float(bound.max()):.2e}, fraction {ratio:.4f}")
    assert ratio <= 1, f"{what}: an error {ratio:.2f} times its bound (max error {float(err.max()):.3e})"


# ---------------------------------------------------------------- MultiHeadAttention

E, H = 32, 4
LQ, LK, B = 6, 9, 2


def _mha_inputs(case: str, gen: torch.Generator):
    """(kwargs of MultiheadAttention, query, key, value [B, L, E] batch-first, forward kwargs)."""
    x = torch.randn(B, LQ, E, generator=gen)
    if case in ("self", "causal", "attn_mask_bool", "attn_mask_float"):
        kw, key = {}, x
        value = x
    else:  # cross: another sequence, of other widths when "kdim"
        kdim = 24 if case == "kdim" else E
        vdim = 20 if case == "kdim" else E
        kw = {"kdim": kdim, "vdim": vdim} if case == "kdim" else {}
        key = torch.randn(B, LK, kdim, generator=gen)
        value = torch.randn(B, LK, vdim, generator=gen)
    fwd = {}
    lk = key.shape[1]
    if case == "key_padding":
        kpm = torch.zeros(B, lk, dtype=torch.bool)
        kpm[0, -3:] = True
        kpm[1, :2] = True
        fwd["key_padding_mask"] = kpm
    elif case == "causal":
        fwd["is_causal"] = True
    elif case == "attn_mask_bool":
        fwd["attn_mask"] = torch.rand(LQ, lk, generator=gen) < 0.3
        fwd["attn_mask"].fill_diagonal_(False)  # every row sees a key
    elif case == "attn_mask_float":
        fwd["attn_mask"] = torch.randn(B * H, LQ, lk, generator=gen)
    return kw, x, key, value, fwd


def _torch_forward_kwargs(fwd: dict, lq: int) -> dict:
    """torch wants the causal mask itself beside its ``is_causal`` hint."""
    if fwd.get("is_causal"):
        return {"attn_mask": torch.ones(lq, lq, dtype=torch.bool).triu(1), "is_causal": True}
    return fwd


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("case", ["self", "cross", "kdim", "key_padding", "causal", "attn_mask_bool",
                                  "attn_mask_float"])
def test_mha_matches_torch(backend: str, batch_first: bool, case: str) -> None:
    """Outputs and input gradients of MultiHeadAttention with a torch.nn.MultiheadAttention's
    state_dict, against that module in float64 (and its float32 self, within both bounds)."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{case}{batch_first}".encode()))
    kw, query, key, value, fwd = _mha_inputs(case, gen)
    ref = torch.nn.MultiheadAttention(E, H, batch_first=batch_first, **kw)
    with torch.no_grad():
        if ref.in_proj_bias is not None:  # torch initialises biases to 0: give them values to check
            ref.in_proj_bias.normal_(generator=gen)
            ref.out_proj.bias.normal_(generator=gen)
    ours = MultiHeadAttention(E, H, batch_first=batch_first, backend=backend, **kw)
    ours.load_state_dict(ref.state_dict())
    assert set(ours.state_dict()) == set(ref.state_dict())
    ref64 = copy.deepcopy(ref).double()
    layout = (lambda t: t) if batch_first else (lambda t: t.transpose(0, 1))
    self_attn = key is query
    inputs = [layout(t).clone().requires_grad_() for t in ((query,) if self_attn else (query, key, value))]
    q_in, k_in, v_in = (inputs * 3) if self_attn else inputs
    out, weights = ours(q_in, k_in, v_in, need_weights=False, **fwd)
    assert weights is None
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    q64, k64, v64 = (inputs64 * 3) if self_attn else inputs64
    fwd64 = {n: (m.double() if m.is_floating_point() else m) for n, m in _torch_forward_kwargs(fwd, LQ).items()
             if isinstance(m, torch.Tensor)}
    fwd64.update({n: m for n, m in _torch_forward_kwargs(fwd, LQ).items() if not isinstance(m, torch.Tensor)})
    want, _ = ref64(q64, k64, v64, need_weights=False, **fwd64)
    dy = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (out.double() * dy).sum().backward()
    (want * dy).sum().backward()

    mask = merge_masks(fwd.get("attn_mask"), fwd.get("key_padding_mask"), B, H, LQ, key.shape[1], torch.float64)
    w = Projections(*ours._projection(0), *ours._projection(1), *ours._projection(2), ours.out_proj.weight,
                    ours.out_proj.bias)
    traced, grads = projected_layer(query, key, value, w, H, H, E // H, 1 / math.sqrt(E // H),
                                    causal=bool(fwd.get("is_causal")), top_left=True, mask=additive(mask),
                                    dy=dy if batch_first else dy.transpose(0, 1))
    _close_float64(Bounded(layout(traced.value), layout(traced.err)), want, "the model's float64 trace")
    _close_bounded(out, want, layout(traced.err), "output")
    if self_attn:  # key and value are the query tensor, projected apart: the three gradients add up
        grads = (plus(*grads),)
    for x, x64, g, name in zip(inputs, inputs64, grads, ("d query", "d key", "d value")):
        _close_bounded(x.grad, x64.grad, layout(g.err), name)
    with torch.no_grad():
        got32, _ = ref(*(t.detach() for t in (q_in, k_in, v_in)), need_weights=False, **_torch_forward_kwargs(fwd, LQ))
    _close_bounded(out, got32.double(), 2 * layout(traced.err), "against torch's float32")


# ---------------------------------------------------------------- GroupedQueryAttention vs Llama

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, L = 64, 4, 2, 16, 10


def _llama(bias: bool = False, rope_scaling=None):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    cfg = LlamaConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                      attention_bias=bias, rope_theta=10000.0, rope_scaling=rope_scaling, max_position_embeddings=64)
    cfg._attn_implementation = "sdpa"  # eager runs its softmax in float32 even on float64 tensors
    torch.manual_seed(7)
    return cfg, LlamaAttention(cfg, layer_idx=0)


def _cos_sin64(rotary: RotaryEmbedding, positions: torch.Tensor):
    """Hugging Face's ``position_embeddings`` (``[1, L, D]``, halves repeated) in float64."""
    cos, sin = rotary.cos_sin(positions, torch.float64)
    return torch.cat((cos, cos), -1)[None], torch.cat((sin, sin), -1)[None]


def _gqa_weights(m: GroupedQueryAttention) -> Projections:
    return Projections(m.q_proj.weight, m.q_proj.bias, m.k_proj.weight, m.k_proj.bias, m.v_proj.weight,
                       m.v_proj.bias, m.o_proj.weight, m.o_proj.bias)


def _causal_additive(lq: int, lk: int) -> torch.Tensor:
    return torch.zeros(lq, lk, dtype=torch.float64).masked_fill(
        ~torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq), float("-inf"))[None, None]


@pytest.mark.parametrize("backend,bias", [("cpu", False), ("cpu", True), ("vulkan", False), ("torch", False)])
def test_gqa_matches_llama(backend: str, bias: bool) -> None:
    """GroupedQueryAttention with a transformers LlamaAttention's state_dict (RoPE theta 10000,
    causal, positions 0..L-1) against that module in float64, output and input gradient."""
    cfg, hf = _llama(bias)
    if bias:
        with torch.no_grad():
            for proj in (hf.q_proj, hf.k_proj, hf.v_proj, hf.o_proj):
                proj.bias.normal_()
    ours = GroupedQueryAttention(HIDDEN, HEADS, KV_HEADS, bias=bias, rope_theta=10000.0, causal=True,
                                 backend=backend, head_dim=HEAD_DIM)
    ours.load_state_dict(hf.state_dict())
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(B, L, HIDDEN, generator=gen, requires_grad=True)
    out = ours(x)
    x64 = x.detach().double().requires_grad_()
    pos = torch.arange(L)
    want, _ = copy.deepcopy(hf).double()(x64, _cos_sin64(ours.rotary, pos), _causal_additive(L, L))
    dy = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (out.double() * dy).sum().backward()
    (want * dy).sum().backward()
    traced, grads = projected_layer(x, x, x, _gqa_weights(ours), HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM ** -0.5,
                                    causal=True, rotary=ours.rotary, q_pos=pos, k_pos=pos, dy=dy)
    _close_float64(traced, want, "the model's float64 trace")
    _close_bounded(out, want, traced.err, "output")
    _close_bounded(x.grad, x64.grad, plus(*grads).err, "d hidden_states")


def test_gqa_from_config_and_float32_llama() -> None:
    """``from_config`` builds the layer of a LlamaConfig; against Hugging Face's own float32 module and
    rotary embedding (float32 angles: their error, |angle|·u32 per position, is part of the bound)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg, hf = _llama()
    ours = GroupedQueryAttention.from_config(cfg, backend="cpu")
    ours.load_state_dict(hf.state_dict())
    rotary = LlamaRotaryEmbedding(cfg)
    assert torch.equal(rotary.inv_freq, ours.rotary.inv_freq)
    x = torch.randn(B, L, HIDDEN, generator=torch.Generator().manual_seed(3))
    pos = torch.arange(L)
    cos, sin = rotary(x, pos[None])
    want64 = _cos_sin64(ours.rotary, pos)
    angle_err = 2 * U32 * (pos.double()[:, None] * ours.rotary.inv_freq.double()).repeat(1, 2) + 2 * U32
    assert float(((cos.double() - want64[0]).abs() - angle_err).max()) <= 0
    assert float(((sin.double() - want64[1]).abs() - angle_err).max()) <= 0
    with torch.no_grad():
        got = ours(x)
        want, _ = hf(x, (cos, sin), _causal_additive(L, L).float())
        traced, _ = projected_layer(x, x, x, _gqa_weights(ours), HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM ** -0.5,
                                    causal=True, rotary=ours.rotary, q_pos=pos, k_pos=pos)
    # Hugging Face's float32 run: its own rounding (the same model) plus its angles' error (2·angle_err·|q|, |k|).
    _close_bounded(got, want.double(), 4 * traced.err, "against transformers' float32")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["gqa", "mqa"])
def test_cross_attention_inputs(backend: str, kind: str) -> None:
    """GQA and MQA on cross-attention inputs (a context of another length and width), non-causal,
    against the float64 trace of the same weights (the seed's layers failed here with a shape error)."""
    lk, ctx_dim = 7, 40
    if kind == "gqa":
        m = GroupedQueryAttention(HIDDEN, HEADS, KV_HEADS, causal=False, backend=backend, context_dim=ctx_dim)
    else:
        m = MultiQueryAttention(HIDDEN, HEADS, causal=False, backend=backend, context_dim=ctx_dim)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(B, L, HIDDEN, generator=gen, requires_grad=True)
    ctx = torch.randn(B, lk, ctx_dim, generator=gen, requires_grad=True)
    out = m(x, ctx)
    dy = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (out.double() * dy).sum().backward()
    traced, grads = projected_layer(x, ctx, ctx, _gqa_weights(m), HEADS, m.num_kv_heads, HEAD_DIM, HEAD_DIM ** -0.5,
                                    rotary=m.rotary, q_pos=torch.arange(L), k_pos=torch.arange(lk), dy=dy)
    _close_bounded(out, traced.value, traced.err, "output")
    _close_bounded(x.grad, grads[0].value, grads[0].err, "d hidden_states")
    _close_bounded(ctx.grad, plus(grads[1], grads[2]).value, plus(grads[1], grads[2]).err, "d context")


# ---------------------------------------------------------------- decoding with a KV cache

def _decode(m, x: torch.Tensor, prefill: int) -> torch.Tensor:
    """``x`` through ``m`` with a cache: ``prefill`` positions at once, then one position per step."""
    cache = m.new_cache(x.shape[0], x.shape[1] + 2)
    with torch.no_grad():
        steps = [m(x[:, :prefill], cache=cache)]
        steps += [m(x[:, i:i + 1], cache=cache) for i in range(prefill, x.shape[1])]
    assert cache.length == x.shape[1]
    return torch.cat(steps, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("position", ["rope", "alibi", "none"])
def test_decode_equals_full_recompute(backend: str, position: str) -> None:
    """A prefill and Lq=1 steps through a KVCache give the full causal recompute: both within the
    float64 trace's bound (ALiBi enters as its float bias, the mask of the trace)."""
    m = GroupedQueryAttention(HIDDEN, HEADS, KV_HEADS, backend=backend, position=position)
    x = torch.randn(1, L, HIDDEN, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        full = m(x)
    steps = _decode(m, x, prefill=4)
    pos = torch.arange(L)
    mask = None if position != "alibi" else alibi_bias(m.alibi_slopes, L, L, torch.float64).numpy()
    traced, _ = projected_layer(x, x, x, _gqa_weights(m), HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM ** -0.5, causal=True,
                                mask=mask, rotary=m.rotary, q_pos=pos, k_pos=pos)
    _close_bounded(full, traced.value, traced.err, "full recompute")
    _close_bounded(steps, traced.value, traced.err, "decode steps")


def test_kv_cache_bounds() -> None:
    cache = KVCache(1, 2, 4, 8, 8)
    cache.append(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8))
    with pytest.raises(ValueError, match="exceed max_len"):
        cache.append(torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 2, 8))
    with pytest.raises(ValueError, match="k must be"):
        cache.append(torch.zeros(1, 3, 1, 8), torch.zeros(1, 3, 1, 8))
    with pytest.raises(ValueError, match="pass v"):
        cache.append(torch.zeros(1, 2, 1, 8))
    assert cache.length == 3
    cache.reset()
    keys, values = cache.append(torch.ones(1, 2, 1, 8), torch.full((1, 2, 1, 8), 2.0))
    assert keys.shape == (1, 2, 1, 8) and float(values.min()) == 2.0


@pytest.mark.parametrize("make,on_device", [
    (lambda: GroupedQueryAttention(HIDDEN, HEADS, KV_HEADS, backend="cpu"), False),
    (lambda: LatentAttention(64, 4, None, 32, 16, 8, 16, backend="cpu"), False),
    (lambda: GroupedQueryAttention(HIDDEN, HEADS, KV_HEADS, backend="vulkan"), True),
], ids=["gqa", "latent", "gqa-device-cache"])
def test_failed_step_appends_nothing(make, on_device: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode step that raises after its keys were appended (a bad attn_mask; on a device cache, a
    failing kernel call) left them counted in the cache's length, so every later step attended to a
    phantom position and sat one position off in RoPE. The length is kept, and the steps after the
    failure give exactly what they give without it (same weights, same inputs)."""
    if on_device:
        from aule_kp.vulkan import device as devmod

        if devmod.vulkan_unavailable() is not None:
            pytest.skip("no Vulkan device")
    torch.manual_seed(3)
    m = make()
    x = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        clean = _decode(m, x, prefill=3)
        cache = m.new_cache(1, 8)
        steps = [m(x[:, :3], cache=cache)]
        if on_device:
            from aule_kp.serving import ragged

            with monkeypatch.context() as patch:
                patch.setattr(ragged, "run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("kernel failed")))
                with pytest.raises(RuntimeError, match="kernel failed"):
                    m(x[:, 3:4], cache=cache)
        else:
            with pytest.raises(ValueError, match="attn_mask"):
                m(x[:, 3:4], cache=cache, attn_mask=torch.ones(3, 7, dtype=torch.bool))
        assert cache.length == 3
        steps += [m(x[:, i:i + 1], cache=cache) for i in range(3, 6)]
    torch.testing.assert_close(torch.cat(steps, 1), clean, rtol=0, atol=0)


# ---------------------------------------------------------------- SelfAttention, positions

@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_self_attention_fused_projection(backend: str) -> None:
    """SelfAttention's fused qkv_proj equals three projections of its rows; RoPE interleaved."""
    m = SelfAttention(HIDDEN, HEADS, causal=True, position="rope", rope_interleaved=True, backend=backend)
    x = torch.randn(B, L, HIDDEN, generator=torch.Generator().manual_seed(2), requires_grad=True)
    out = m(x)
    dy = torch.randn(out.shape, dtype=torch.float64)
    (out.double() * dy).sum().backward()
    wq, wk, wv = m.qkv_proj.weight.chunk(3)
    bq, bk, bv = m.qkv_proj.bias.chunk(3)
    pos = torch.arange(L)
    w = Projections(wq, bq, wk, bk, wv, bv, m.out_proj.weight, m.out_proj.bias)
    traced, grads = projected_layer(x, x, x, w, HEADS, HEADS, HEAD_DIM, HEAD_DIM ** -0.5, causal=True,
                                    rotary=m.rotary, q_pos=pos, k_pos=pos, dy=dy)
    _close_bounded(out, traced.value, traced.err, "output")
    g = plus(*grads)
    _close_bounded(x.grad, g.value, g.err, "d x")


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_is_a_rotation_of_pairs(interleaved: bool) -> None:
    """RoPE rotates each pair by position·inv_freq: q·k after rotation depends on the position
    difference only, and the pairs are the layout's.

    Error model (float64, u = 2^-53): each rotated channel is within 3u·(|x_a| + |x_b|) of exact
    (cos/sin rounded once, two products and a sum: conftest.rotation_tolerance's count), and
    |x'_d| <= |x_a| + |x_b|; summed over the 8 channels (each pair counted twice) the dot's error is
    at most (3·2 + 3·2 + 8·2)·u·Σ|q|·Σ|k| = 28u·Σ|q|·Σ|k|, so two dots differ by at most twice that.
    At angle 1 (inv_freq[0] = 1 exactly) cos and sin lie in [0.5, 1), where a double's spacing is
    2u: libm's and torch's within 1 ulp each, 2 ulps = 4u apart."""
    u = 2.0**-53
    rot = RotaryEmbedding(8, theta=100.0, interleaved=interleaved)
    q, k = torch.randn(2, 1, 1, 8, dtype=torch.float64).unbind(0)
    dots = [float((rot(q[None], torch.tensor([p + 3])) * rot(k[None], torch.tensor([p]))).sum()) for p in (0, 5, 11)]
    assert max(dots) - min(dots) <= 2 * 28 * u * float(q.abs().sum() * k.abs().sum())
    x = torch.zeros(1, 1, 1, 8, dtype=torch.float64)
    x[..., 0] = 1.0
    y = rot(x, torch.tensor([1]))
    partner = 1 if interleaved else 4
    assert abs(float(y[..., partner]) - math.sin(1.0)) <= 4 * u and abs(float(y[..., 0]) - math.cos(1.0)) <= 4 * u


def test_spec_positions_in_range_and_float32_tables_kept() -> None:
    """``RotaryEmbedding.spec`` marks the positions it made or checked (``in_range``: no kernel reads
    them back) and keeps the float32 copies of its tables with them, made once: the float64 tables
    rounded once, the numbers a per-call conversion gave; a spec made or changed by hand gets neither."""
    rot = RotaryEmbedding(8)
    pos, cpu = torch.arange(5), torch.device("cpu")
    made, checked = rot.spec(pos, pos, 2, largest=4), rot.spec(pos + 3, pos, 2)
    assert made.in_range and checked.in_range
    with pytest.raises(ValueError, match=">= 0"):
        rot.spec(pos - 1, pos, 2)
    cos, sin = made.kernel_tables(cpu)
    assert cos.dtype == sin.dtype == torch.float32 and cos.is_contiguous()
    assert torch.equal(cos, made.cos.float()) and torch.equal(sin, made.sin.float())
    again = checked.kernel_tables(cpu)
    assert again[0] is cos and again[1] is sin
    host = checked.tables()
    assert host.cos.dtype == np.float32 and np.array_equal(host.cos, made.cos.numpy().astype(np.float32))
    grown = rot.spec(torch.arange(100), None, 1, largest=99)
    assert grown.kernel_tables(cpu)[0].shape[0] >= 100 and made.kernel_tables(cpu)[0] is cos
    by_hand = RotarySpec(made.cos, made.sin, made.q_positions, made.k_positions, False)
    assert not by_hand.in_range and torch.equal(by_hand.kernel_tables(cpu)[0], cos)
    halved = dataclasses.replace(made, cos=made.cos / 2)  # not the embedding's tables: not its copies
    assert torch.equal(halved.kernel_tables(cpu)[0], (made.cos / 2).float())


def test_llama3_scaling_matches_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    cfg = LlamaConfig(hidden_size=256, num_attention_heads=2, rope_theta=500000.0, rope_scaling=scaling)
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    got = rope_inv_freq(128, 500000.0, scaling)
    assert torch.equal(got, want)
    assert not torch.equal(got, rope_inv_freq(128, 500000.0))
    with pytest.raises(ValueError, match="yarn"):
        rope_inv_freq(128, 10000.0, {"rope_type": "yarn", "factor": 4.0})


def test_alibi_slopes() -> None:
    """The paper's slopes: 2^(-8i/n) for n a power of two, and the interleaved extension."""
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** (-i) for i in range(1, 9)]))
    s12 = alibi_slopes(12)
    assert torch.allclose(s12[:8], alibi_slopes(8)) and torch.allclose(s12[8:], alibi_slopes(16)[0::2][:4])
    bias = alibi_bias(alibi_slopes(2), 2, 4)
    assert bias.shape == (1, 2, 2, 4) and float(bias[0, 0, 1, 3]) == 0.0 and float(bias[0, 0, 0, 0]) == -2 * 0.0625


# ---------------------------------------------------------------- LatentAttention vs DeepseekV3

def _deepseek(interleave: bool, q_lora: bool = True):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    cfg = DeepseekV3Config(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                           q_lora_rank=24 if q_lora else None, kv_lora_rank=16, qk_nope_head_dim=16,
                           qk_rope_head_dim=8, v_head_dim=8, rope_interleave=interleave, attention_bias=False,
                           max_position_embeddings=64, rope_scaling=None)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(13)
    hf = DeepseekV3Attention(cfg, layer_idx=0)
    with torch.no_grad():  # the norms start at 1: give them values to check
        for name, p in hf.named_parameters():
            if "layernorm" in name:
                p.uniform_(0.5, 1.5)
    return cfg, hf


def _float64(hf: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of ``hf`` whose RMS norms compute in float64 (Hugging Face's round to float32
    by design, whatever the input)."""
    wide = copy.deepcopy(hf).double()
    for module in wide.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = lambda x, m=module: m.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)
                                                                            + m.variance_epsilon)
    return wide


def _mla_trace(m: LatentAttention, x: torch.Tensor, absorbed: bool):
    """LatentAttention in float64 with its float32 error bounds, by either path."""
    from layer_error import cat, exact, expand, heads, linear, merged, per_head, rms_norm, rope, split

    b, length = x.shape[:2]
    h, nope, r, c, vd = m.num_heads, m.qk_nope_head_dim, m.qk_rope_head_dim, m.kv_lora_rank, m.v_head_dim
    pos = torch.arange(length)
    if m.q_lora_rank is None:
        q = linear(exact(x), m.q_proj.weight)
    else:
        q = linear(rms_norm(linear(exact(x), m.q_a_proj.weight), m.q_a_layernorm.weight, m.q_a_layernorm.eps),
                   m.q_b_proj.weight)
    q_pass, q_rot = split(heads(q, h, nope + r), [nope, r])
    q_rot = rope(q_rot, m.rotary, pos)
    latent, k_rot = split(linear(exact(x), m.kv_a_proj_with_mqa.weight), [c, r])
    latent = rms_norm(latent, m.kv_a_layernorm.weight, m.kv_a_layernorm.eps)
    k_rot = rope(heads(k_rot, 1, r), m.rotary, pos)
    w = m.kv_b_proj.weight.reshape(h, nope + vd, c)
    if not absorbed:
        k_pass, v = split(heads(linear(latent, m.kv_b_proj.weight), h, nope + vd), [nope, vd])
        k = cat([k_pass, expand(k_rot, b, h, length, r)])
        out, _ = attention(cat([q_pass, q_rot]), k, v, m.scaling, causal=True)
    else:
        q_lat = per_head(q_pass, w[:, :nope])
        lat = heads(latent, 1, c)
        out_lat, _ = attention(cat([q_lat, q_rot]), cat([lat, k_rot]), lat, m.scaling, causal=True)
        out = per_head(out_lat, w[:, nope:].transpose(1, 2))
    return linear(merged(out), m.o_proj.weight)


@pytest.mark.parametrize("backend,interleave,q_lora", [("cpu", True, True), ("cpu", False, False),
                                                        ("vulkan", True, True)])
def test_latent_attention_matches_deepseek_v3(backend: str, interleave: bool, q_lora: bool) -> None:
    """LatentAttention with a transformers DeepseekV3Attention's state_dict against that module in
    float64 (training path, with the input gradient), and the absorbed decoding path (latent cache,
    Dk != Dv) against the same reference within its own trace's bound."""
    cfg, hf = _deepseek(interleave, q_lora)
    ours = LatentAttention.from_config(cfg, backend=backend)
    ours.load_state_dict(hf.state_dict())
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(B, L, HIDDEN, generator=gen, requires_grad=True)
    out = ours(x)
    x64 = x.detach().double().requires_grad_()
    pos = torch.arange(L)
    want, _ = _float64(hf)(x64, _cos_sin64(ours.rotary, pos), _causal_additive(L, L))
    traced = _mla_trace(ours, x, absorbed=False)
    _close_float64(traced, want, "the model's float64 trace")
    _close_bounded(out, want, traced.err, "output")
    absorbed = _mla_trace(ours, x, absorbed=True)
    _close_float64(absorbed, want, "the absorbed float64 trace")
    _close_bounded(_decode(ours, x, prefill=3), want, absorbed.err, "decode steps")


@pytest.mark.parametrize("backend", BACKENDS)
def test_latent_attention_gradients(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The training path's attention call (Dk = nope + rope != Dv, one rope key shared by the heads)
    differentiates right: its q, k, v gradients against float64 for the inputs and output gradient
    it saw (conftest.gradient_tolerances); the rest of the chain is torch's autograd."""
    from reference import reference_backward

    import aule_kp.nn.latent as latent
    from aule_kp.problem import Problem, band

    seen = {}
    original = latent.attend

    def recording(q, k, v, rotary=None, **options):
        # The layer hands q and k unrotated with their rotation: rotate here to see what is attended.
        if rotary is not None:
            q, k = rotary.apply(q, k)
        for t in (q, k, v):
            t.retain_grad()
        out = original(q, k, v, **options)
        out.retain_grad()
        seen.update(q=q, k=k, v=v, out=out, scale=options["scale"])
        return out

    cfg, hf = _deepseek(True)
    ours = LatentAttention.from_config(cfg, backend=backend)
    monkeypatch.setattr(latent, "attend", recording)
    x = torch.randn(B, L, HIDDEN, generator=torch.Generator().manual_seed(19), requires_grad=True)
    ours(x).pow(2).sum().backward()
    q, k, v = (seen[n].detach().numpy() for n in ("q", "k", "v"))
    dout = seen["out"].grad.numpy()
    diag, left, right = band(L, L, causal=True, window=None, top_left=False)
    p = Problem(B, HEADS, HEADS, L, L, q.shape[-1], v.shape[-1], "float32", seen["scale"], diag, left, right)
    assert p.dim_k != p.dim_v
    want = reference_backward(q, k, v, dout, p)
    for got, ref, tol, name in zip((seen["q"].grad, seen["k"].grad, seen["v"].grad), want,
                                   gradient_tolerances(p, q, k, v, dout), ("dq", "dk", "dv")):
        err = float(np.abs(got.numpy() - ref).max())
        assert err <= tol, f"{name}: {err:.3e} over {tol:.3e}"
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


# ---------------------------------------------------------------- the layers benchmark

def test_bench_layers_preset(capsys: pytest.CaptureFixture) -> None:
    """``aule-kp bench --preset layers --scale F`` prints every model x layer with torch eager and the
    aule-kp backends asked for (nothing failed)."""
    from aule_kp import bench_layers
    from aule_kp.cli import main

    assert [m.hidden for m in bench_layers.MODELS] == [7168, 8192, 16384]
    small = bench_layers.scaled(bench_layers.MODELS[2], 64)
    assert (small.heads, small.kv_heads, small.head_dim, small.seq) == (2, 1, 128, 32)
    assert main(["bench", "--preset", "layers", "--scale", "128", "--repeat", "1", "--backends", "cpu"]) == 0
    table = capsys.readouterr().out
    for layer in bench_layers.LAYERS:
        for model in ("DeepSeek-V3", "Llama-3-70B", "Llama-3-405B"):
            assert sum(f"| {layer} | " in ln and model in ln for ln in table.splitlines()) == 2, (layer, model)
    assert "failed" not in table and "aule-kp vulkan" not in table


# ---------------------------------------------------------------- other backends, torch hand-offs, errors

def test_layers_on_triton() -> None:
    """The Triton backend (its interpreter on CPU tensors here) under MultiHeadAttention and
    GroupedQueryAttention, forward and backward, as the cpu and vulkan rows above."""
    pytest.importorskip("triton")
    test_mha_matches_torch("triton", False, "key_padding")
    test_gqa_matches_llama("triton", False)


def test_triton_layers_rotate_in_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """On Triton a layer hands RoPE to the kernels' loads (``aule_kp.triton.rotary.attend_rotary``),
    training calls included, with the positions it made (not read back: no range check) and the
    float32 copies of its tables; test_gqa_matches_llama's float64 checks hold through it."""
    pytest.importorskip("triton")
    from aule_kp.triton import rotary as triton_rotary

    calls, checks = [], []
    real = triton_rotary.attend_rotary
    monkeypatch.setattr(triton_rotary, "attend_rotary", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    monkeypatch.setattr(triton_rotary, "_check_range", lambda *a: checks.append(a[0]))
    test_gqa_matches_llama("triton", False)
    assert [(kw["interleaved"], kw["positions_in_range"]) for kw in calls] == [(False, True)]
    assert checks == []
    assert calls[0]["cos"].dtype == torch.float32 and calls[0]["cos"].is_contiguous()


def test_need_weights_is_torchs_answer() -> None:
    """need_weights=True (torch's default) hands the call to torch's implementation with one notice:
    the same output and weights as torch.nn.MultiheadAttention, is_causal honoured without a mask."""
    ref = torch.nn.MultiheadAttention(E, H, batch_first=True)
    ours = MultiHeadAttention(E, H, batch_first=True, backend="cpu")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(B, LQ, E)
    with pytest.warns(AuleFallbackWarning, match="need_weights=True runs torch"):
        out, weights = ours(x, x, x, is_causal=True)
    causal = torch.ones(LQ, LQ, dtype=torch.bool).triu(1)
    want, want_w = ref(x, x, x, attn_mask=causal, is_causal=True)
    assert torch.equal(out, want) and torch.equal(weights, want_w)
    assert float(weights[0, 0, 1:].detach().abs().max()) == 0.0  # averaged over heads: row 0 sees key 0 only


def test_dropout_in_training_runs_torch() -> None:
    """Attention dropout exists only in torch's SDPA: a training call with dropout > 0 warns once and
    runs there (rows of the output are then no longer the plain attention); eval mode runs aule-kp."""
    m = MultiHeadAttention(E, H, dropout=0.5, batch_first=True, backend="cpu")
    x = torch.randn(B, LQ, E)
    with pytest.warns(AuleFallbackWarning, match="dropout"):
        m.train()(x, x, x, need_weights=False)
    m.eval()
    with torch.no_grad():
        out, _ = m(x, x, x, need_weights=False)
    traced = _mha_trace(m, x)
    _close_bounded(out, traced.value, traced.err, "eval mode")


@pytest.mark.parametrize("make,match", [
    (lambda: MultiHeadAttention(E, H, backend="cuda"), "backend must be one of"),
    (lambda: GroupedQueryAttention(64, 4, 3), "multiple of num_kv_heads"),
    (lambda: GroupedQueryAttention(64, 4, 2, position="sinusoidal"), "position must be one of"),
    (lambda: SelfAttention(30, 4), "multiple of num_heads"),
    (lambda: LatentAttention(64, 4, 16, 16, 8, 8, 8, rope_scaling={"rope_type": "yarn", "factor": 40.0}), "yarn"),
])
def test_bad_arguments(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_inputs() -> None:
    m = MultiHeadAttention(E, H, batch_first=True, backend="cpu")
    x = torch.randn(B, LQ, E)
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        m(x, x, x, need_weights=False, key_padding_mask=torch.zeros(B, LQ + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        m(x, x, x, need_weights=False, attn_mask=torch.zeros(LQ, LQ + 1))
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        m(x, x, x, need_weights=False, attn_mask=torch.zeros(LQ, LQ, dtype=torch.int64))
    g = GroupedQueryAttention(64, 4, 2, backend="cpu")
    with pytest.raises(ValueError, match="context or cache"):
        g(torch.randn(1, 3, 64), torch.randn(1, 5, 64), cache=g.new_cache(1, 8))
    with pytest.raises(ValueError, match="positions must be integers"):
        g(torch.randn(1, 3, 64), positions=torch.arange(4))


def test_unbatched_mha() -> None:
    """2-D (unbatched) inputs as torch takes them."""
    ref = torch.nn.MultiheadAttention(E, H)
    ours = MultiHeadAttention(E, H, backend="cpu")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(LQ, E)
    with torch.no_grad():
        got, _ = ours(x, x, x, need_weights=False)
    assert got.shape == (LQ, E)
    traced = _mha_trace(ours, x[None])
    _close_bounded(got, traced.value[0], traced.err[0], "unbatched")


def _mha_trace(m: MultiHeadAttention, x: torch.Tensor):
    """The float64 trace of MultiHeadAttention self-attention on batch-first ``x``, no mask."""
    w = Projections(*m._projection(0), *m._projection(1), *m._projection(2), m.out_proj.weight, m.out_proj.bias)
    traced, _ = projected_layer(x, x, x, w, m.num_heads, m.num_heads, m.head_dim, m.head_dim ** -0.5)
    return traced


# ---------------------------------------------------------------- random layers

@settings(max_examples=12, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(kv_heads=st.sampled_from([1, 2, 4]), group=st.sampled_from([1, 2, 3]), head_dim=st.sampled_from([8, 16]),
       len_q=st.integers(1, 12), len_k=st.integers(1, 12), cross=st.booleans(), causal=st.booleans(),
       position=st.sampled_from(["rope", "alibi", "none"]), interleaved=st.booleans(), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_random_gqa_layers(kv_heads: int, group: int, head_dim: int, len_q: int, len_k: int, cross: bool,
                           causal: bool, position: str, interleaved: bool, bias: bool, seed: int) -> None:
    """Random GroupedQueryAttention layers (heads, group, head dim, lengths, self or cross inputs,
    causal, positions, biases) on the cpu backend against the float64 trace, output and gradients."""
    heads = kv_heads * group
    embed = 24
    m = GroupedQueryAttention(embed, heads, kv_heads, bias=bias, causal=causal, backend="cpu", head_dim=head_dim,
                              position=position, rope_interleaved=interleaved, context_dim=20 if cross else None)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, len_q, embed, generator=gen, requires_grad=True)
    ctx = torch.randn(B, len_k, 20, generator=gen, requires_grad=True) if cross else None
    len_k = len_k if cross else len_q
    out = m(x, ctx)
    dy = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (out.double() * dy).sum().backward()
    mask = None if position != "alibi" else alibi_bias(m.alibi_slopes, len_q, len_k, torch.float64).numpy()
    source = ctx if cross else x
    traced, grads = projected_layer(x, source, source, _gqa_weights(m), heads, kv_heads, head_dim, head_dim ** -0.5,
                                    causal=causal, mask=mask, rotary=m.rotary, q_pos=torch.arange(len_q),
                                    k_pos=torch.arange(len_k), dy=dy)
    _close_bounded(out, traced.value, traced.err, "output")
    if cross:
        _close_bounded(x.grad, grads[0].value, grads[0].err, "d x")
        kv = plus(grads[1], grads[2])
        _close_bounded(ctx.grad, kv.value, kv.err, "d context")
    else:
        g = plus(*grads)
        _close_bounded(x.grad, g.value, g.err, "d x")


def test_layer_error_model_sees_real_mistakes() -> None:
    """The layer bounds are not vacuous: a 1% wrong softmax scale, a dropped key, or RoPE's halves
    taken for pairs move the float64 output beyond them at these sizes."""
    m = GroupedQueryAttention(HIDDEN, HEADS, KV_HEADS, backend="cpu")
    x = torch.randn(B, L, HIDDEN, generator=torch.Generator().manual_seed(23))
    pos = torch.arange(L)
    w = _gqa_weights(m)

    def run(scale: float = HEAD_DIM ** -0.5, mask=None, rotary=m.rotary):
        out, _ = projected_layer(x, x, x, w, HEADS, KV_HEADS, HEAD_DIM, scale, causal=True, mask=mask,
                                 rotary=rotary, q_pos=pos, k_pos=pos)
        return out

    right = run()
    dropped = np.zeros((1, 1, L, L))
    dropped[..., 0] = -np.inf
    dropped[..., 0, 0] = 0.0  # row 0 sees only key 0: keep it
    wrong = (run(scale=1.01 * HEAD_DIM ** -0.5), run(mask=dropped),
             run(rotary=RotaryEmbedding(HEAD_DIM, interleaved=True)))
    for bad, what in zip(wrong, ("1% scale", "dropped key", "rope layout")):
        assert bool(((bad.value - right.value).abs() > right.err).any()), what


def test_mha_positional_contract():
    """DESIGN.md's positional order (code outside the repo calls it): embed_dim, num_heads, dropout,
    bias, kdim, vdim, batch_first, backend."""
    m = MultiHeadAttention(8, 2, 0.0, False, 6, 4, True, "cpu")
    assert (m.kdim, m.vdim, m.batch_first, m.backend, m.in_proj_bias) == (6, 4, True, "cpu", None)
