"""transformers / diffusers integrations: tiny random-weight models against their own sdpa paths."""

from __future__ import annotations

import copy
from typing import Any, Dict, List

import pytest

torch = pytest.importorskip("torch")

import numpy as np  # noqa: E402
from conftest import gradient_tolerances, output_tolerance, tolerance  # noqa: E402

from aule_kp.problem import Problem  # noqa: E402
from aule_kp.vulkan import device as devmod  # noqa: E402

needs_vulkan = pytest.mark.skipif(devmod.vulkan_unavailable() is not None, reason="no Vulkan device")



def model_tol(want: torch.Tensor, reduction_len: int) -> float:
    """fp32 models whose attention is exact either way: both runs are within one float32 tolerance
    (``conftest.tolerance``) of exact, relative to the largest |value| compared, for a path through
    sums of ``reduction_len`` terms in all (tokens, head dim, hidden and MLP widths)."""
    return 2 * tolerance("float32", reduction_len, want.abs().max().item())


@pytest.fixture
def torch_fallbacks(monkeypatch: pytest.MonkeyPatch) -> List[int]:
    """Counts the calls aule_kp's SDPA hands to torch (so tests can assert the engine ran)."""
    from aule_kp.torch import sdpa as sdpa_mod

    calls = [0]
    real = sdpa_mod.state.original

    def counting(*args: Any, **kwargs: Any):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(sdpa_mod.state, "original", counting)
    return calls


# ------------------------------------------------------------------------------------ transformers

def _count_calls() -> List[int]:
    """Registers "aule_kp" through a wrapper that counts calls (proves the model really uses it)."""
    from transformers import AttentionInterface

    from aule_kp.integrations import transformers as aule_tf

    calls = [0]
    real = aule_tf.aule_attention_forward

    def counting(*args: Any, **kwargs: Any):
        calls[0] += 1
        return real(*args, **kwargs)

    AttentionInterface.register(aule_tf.NAME, counting)
    return calls


@pytest.fixture
def tf_registered():
    pytest.importorskip("transformers")
    from aule_kp.integrations import transformers as aule_tf

    assert aule_tf.register(backend="cpu") == "aule_kp"
    calls = _count_calls()
    yield calls
    aule_tf.register()  # back to the default backend for later tests


def _llama_pair(**overrides: Any):
    """The same tiny GQA Llama twice: once on "sdpa", once on "aule_kp"."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs: Dict[str, Any] = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    kwargs.update(overrides)
    cfg = LlamaConfig(**kwargs)
    torch.manual_seed(0)
    ref = LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval()
    ours = LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="aule_kp").eval()
    ours.load_state_dict(ref.state_dict())
    assert ours.config._attn_implementation == "aule_kp" and ref.config._attn_implementation == "sdpa"
    return ref, ours


def test_register_rejects_unknown_backend():
    pytest.importorskip("transformers")
    from aule_kp.integrations import transformers as aule_tf

    with pytest.raises(ValueError):
        aule_tf.register(backend="nope")


def test_llama_gqa_logits_match_sdpa(tf_registered, torch_fallbacks):
    ref, ours = _llama_pair()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    padded = torch.ones(2, 12, dtype=torch.long)
    padded[1, :4] = 0  # left padding: the mask function builds a boolean mask
    with torch.no_grad():
        for mask in (None, padded):  # None: purely causal, the mask function hands over is_causal
            a = ours(ids, attention_mask=mask).logits
            b = ref(ids, attention_mask=mask).logits
            keep = slice(None) if mask is None else mask.bool()  # padded query rows are garbage either way
            torch.testing.assert_close(a[keep], b[keep], atol=model_tol(b, 12 + 16 + 64 + 128), rtol=0)
    assert tf_registered[0] == 4  # 2 layers x 2 forwards
    assert torch_fallbacks[0] == 0


def test_llama_generate_matches_sdpa(tf_registered, torch_fallbacks):
    ref, ours = _llama_pair()
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, use_cache=True)
    with torch.no_grad():
        got = ours.generate(ids, **kw)
        want = ref.generate(ids, **kw)
    assert torch.equal(got, want)
    assert tf_registered[0] >= 2 * 8  # prefill + decode steps, every layer through aule_kp
    assert torch_fallbacks[0] == 0


def test_llama_training_dropout_goes_to_torch(tf_registered):
    """Dropout (training only) runs, and gradients flow through the aule_kp path."""
    _, ours = _llama_pair(attention_dropout=0.1)
    ours.train()
    ids = torch.randint(0, 128, (1, 8))
    out = ours(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert ours.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_vit_encoder_matches_sdpa(tf_registered, torch_fallbacks):
    """An encoder (not causal, no mask): ViT, whose attention goes through AttentionInterface.
    (BERT in transformers 4.57 still picks its own attention classes and rejects custom names.)"""
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                    image_size=32, patch_size=8)
    torch.manual_seed(0)
    ref = ViTModel._from_config(copy.deepcopy(cfg), attn_implementation="sdpa", add_pooling_layer=False).eval()
    ours = ViTModel._from_config(copy.deepcopy(cfg), attn_implementation="aule_kp", add_pooling_layer=False).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(x).last_hidden_state  # 17 tokens, head dim 16, widths 64 and 128
        torch.testing.assert_close(ours(x).last_hidden_state, want, atol=model_tol(want, 17 + 16 + 64 + 128), rtol=0)
    assert tf_registered[0] == 2
    assert torch_fallbacks[0] == 0


def _eager_reference(q, k, v, mask, scale, softcap, sinks):
    """float64 attention from the definitions eager uses (Gemma-2's soft-cap, gpt-oss's sinks):
    ``[B, Lq, Hq, D]``. ``mask``: bool ``[Lq, Lk]`` or ``[B, 1, Lq, Lk]`` (True = attend)."""
    groups = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(groups, dim=1) for x in (k, v))
    s = q.double() @ k.transpose(-1, -2) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.double().reshape(1, -1, 1, 1).expand(*s.shape[:-1], 1)], dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num()[..., : k.shape[-2]]  # a row that sees nothing: 0
    return (p @ v).transpose(1, 2)


@pytest.mark.parametrize("mods", ["softcap", "sinks", "both"])
@pytest.mark.parametrize("pattern", ["causal", "causal_lq_lt_lk", "padding"])
def test_score_mods_match_eager_definition(mods, pattern):
    """Gemma-2's ``softcap`` and gpt-oss's ``s_aux`` reach the function as keywords that transformers'
    sdpa drops; eager applies them, and so must aule_kp (they were ignored: a soft-capped model was
    off by 6% in its logits, and the sinks got no gradient). Outputs and the gradients of q, k, v and
    the sinks against float64, GQA 4/2 heads, head dim 16; top-left causal when Lq < Lk (is_causal
    as torch's), left and right padding in a boolean mask (a fully padded row is 0 either way)."""
    pytest.importorskip("transformers")
    from aule_kp.integrations import transformers as aule_tf

    g = torch.Generator().manual_seed(7)
    b, hq, hkv, lk, d = 2, 4, 2, 11, 16
    lq = 5 if pattern == "causal_lq_lt_lk" else lk
    q, k, v = (3 * torch.randn(b, h, n, d, generator=g) for h, n in ((hq, lq), (hkv, lk), (hkv, lk)))
    sinks = torch.randn(hq, generator=g) if mods != "softcap" else None
    softcap = 1.5 if mods != "sinks" else None
    mask, is_causal = None, None  # is_causal derived: a decoder module, no mask
    want_mask = torch.ones(lq, lk, dtype=torch.bool).tril()
    if pattern == "padding":
        keys = torch.ones(b, lk, dtype=torch.bool)
        keys[0, :3] = False  # left padding
        keys[1, -4:] = False  # right padding
        mask = want_mask = want_mask & keys[:, None, None, :]
    leaves = [t.requires_grad_() for t in (q, k, v) + ((sinks,) if sinks is not None else ())]
    scale = d ** -0.5
    module = torch.nn.Module()
    got, weights = aule_tf.aule_attention_forward(module, q, k, v, mask, scaling=scale, is_causal=is_causal,
                                                  softcap=softcap, s_aux=sinks)
    assert weights is None and got.shape == (b, lq, hq, d)
    want = _eager_reference(q, k, v, want_mask, scale, softcap, sinks)
    dout = torch.randn(got.shape, generator=g)
    grads = torch.autograd.grad(got, leaves, dout)
    want_grads = torch.autograd.grad(want, leaves, dout.double())
    # The suite's error model (conftest): the band rides in the mask, the modifiers widen the exponent
    # range; the sinks' gradient is a float32 sum over batches x rows of terms at most |dO||O| over Dv.
    p = Problem(b, hq, hkv, lq, lk, d, d, "float32", scale, 0, None, None, (b if mask is not None else 1, 1, lq, lk),
                softcap=softcap or 0.0, sinks=sinks is not None)
    qn, kn, vn = (x.detach().numpy() for x in (q, k, v))
    don = dout.transpose(1, 2).numpy()
    mask_add = np.where(want_mask.expand(*p.mask_shape).numpy(), 0.0, -np.inf).astype(np.float32)
    sk = None if sinks is None else sinks.detach().numpy()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=output_tolerance(p, qn, kn, vn, mask_add, sinks=sk))
    tols = list(gradient_tolerances(p, qn, kn, vn, don, mask_add, sinks=sk)[:3])
    tols.append(tolerance("float32", b * lq + d, float(np.abs(don).max() * want.abs().max().item()) * d, roundings=4))
    for name, a, w, tol in zip(("q", "k", "v", "sinks"), grads, want_grads, tols):
        torch.testing.assert_close(a, w, atol=tol, rtol=0, msg=lambda m, name=name: f"d{name}: {m}")


def test_score_mods_and_head_mask_raise():
    """What aule_kp cannot compute raises rather than being dropped: head_mask, dropout with a
    soft-cap or sinks (eager applies both), is_causal with a mask, float64 with score modifiers."""
    pytest.importorskip("transformers")
    from aule_kp.integrations import transformers as aule_tf

    q = torch.randn(1, 2, 4, 8)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="head_mask"):
        aule_tf.aule_attention_forward(module, q, q, q, None, head_mask=torch.ones(2))
    with pytest.raises(ValueError, match="dropout"):
        aule_tf.aule_attention_forward(module, q, q, q, None, dropout=0.1, softcap=2.0)
    with pytest.raises(ValueError, match="is_causal"):
        aule_tf.aule_attention_forward(module, q, q, q, mask, is_causal=True, s_aux=torch.zeros(2))
    with pytest.raises(TypeError, match="float64"):
        aule_tf.aule_attention_forward(module, q.double(), q.double(), q.double(), None, softcap=2.0)


def _eager_pair(cls, cfg):
    """The same tiny model twice: on "eager" (which applies soft-cap and sinks) and on "aule_kp"."""
    out = []
    for impl in ("eager", "aule_kp"):
        torch.manual_seed(0)
        out.append(cls._from_config(copy.deepcopy(cfg), attn_implementation=impl).train())
    out[1].load_state_dict(out[0].state_dict())
    return out


@pytest.mark.parametrize("arch", ["gemma2", "gpt_oss", "mistral"])
def test_model_training_step_matches_eager(arch, tf_registered, torch_fallbacks):
    """Logits and every parameter's gradient of a training step (dropout 0) against "eager", with
    left and right padding: Gemma-2 (soft-cap 2 on the scores, sliding window 4 of 12 tokens),
    gpt-oss (sinks, sliding window) and Mistral (sliding window through the sdpa path). Weights at
    std 0.3 so that scores reach the soft-cap's curve (at the default 0.02 tanh(s/2)*2 ~ s)."""
    transformers = pytest.importorskip("transformers")
    base = dict(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=64, initializer_range=0.3,
                sliding_window=4, attention_dropout=0.0)
    if arch == "gemma2":
        cls, cfg = transformers.Gemma2ForCausalLM, transformers.Gemma2Config(
            **base, attn_logit_softcapping=2.0, final_logit_softcapping=None)
    elif arch == "gpt_oss":
        cls, cfg = transformers.GptOssForCausalLM, transformers.GptOssConfig(
            **{**base, "intermediate_size": 32}, num_local_experts=4, num_experts_per_tok=2)
    else:
        cls, cfg = transformers.MistralForCausalLM, transformers.MistralConfig(**base)
    ref, ours = _eager_pair(cls, cfg)
    ids = torch.randint(3, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, -3:] = 0  # right padding
    keep = mask.bool()
    w = torch.randn(3, 12, 64, generator=torch.Generator().manual_seed(2))
    results = []
    for model in (ref, ours):
        logits = model(ids, attention_mask=mask).logits
        (logits * w)[keep].sum().backward()
        results.append((logits.detach()[keep], {n: p.grad for n, p in model.named_parameters()}))
    (want, want_grads), (got, got_grads) = results
    n = 12 + 16 + 64 + 64  # tokens, head dim, widths
    torch.testing.assert_close(got, want, atol=model_tol(want, n), rtol=0)
    assert set(got_grads) == set(want_grads)
    for name, g in want_grads.items():
        assert (g is None) == (got_grads[name] is None), name
        if g is not None:  # weight gradients also sum over the 3 x 12 tokens
            torch.testing.assert_close(got_grads[name], g, atol=model_tol(g, n + 36), rtol=0,
                                       msg=lambda m, name=name: f"{name}: {m}")
    assert tf_registered[0] == 2  # one forward of 2 layers through aule_kp
    assert torch_fallbacks[0] == 0


@needs_vulkan
def test_llama_on_vulkan_matches_sdpa(torch_fallbacks):
    """One tiny forward on the Vulkan engine (lavapipe in CI, so kept small)."""
    pytest.importorskip("transformers")
    from aule_kp.integrations import transformers as aule_tf

    aule_tf.register(backend="vulkan")
    try:
        ref, ours = _llama_pair(num_hidden_layers=1)
        ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            want = ref(ids).logits
            torch.testing.assert_close(ours(ids).logits, want, atol=model_tol(want, 8 + 16 + 64 + 128), rtol=0)
        assert torch_fallbacks[0] == 0  # the Vulkan backend took every call
    finally:
        aule_tf.register()


# ---------------------------------------------------------------------------------------- diffusers

def _tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    # attention_head_dim is the head *count* in this class: 32 and 64 channels -> head dims 16 and 32,
    # multiples of 8 as the engine takes.
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8,
    ).eval()


def test_unet_matches_default_processor(torch_fallbacks):
    pytest.importorskip("diffusers")
    from aule_kp.integrations.diffusers import AuleAttnProcessor, set_aule_attention

    unet = _tiny_unet()
    g = torch.Generator().manual_seed(5)
    x, t, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500]), torch.randn(2, 7, 32, generator=g)
    ctx_mask = torch.ones(2, 7)
    ctx_mask[1, 5:] = 0  # padded text tokens: diffusers turns this into an additive bias
    with torch.no_grad():
        want = unet(x, t, ctx).sample
        want_masked = unet(x, t, ctx, encoder_attention_mask=ctx_mask).sample
    assert set_aule_attention(unet, backend="cpu") == len(unet.attn_processors) == 8  # self + cross, 4 blocks
    assert all(isinstance(p, AuleAttnProcessor) for p in unet.attn_processors.values())
    with torch.no_grad():
        got = unet(x, t, ctx).sample
        got_masked = unet(x, t, ctx, encoder_attention_mask=ctx_mask).sample
    n = 256 + 7 + 32 + 64 * 9  # tokens, text tokens, head dim, 3x3 convolutions over 64 channels
    torch.testing.assert_close(got, want, atol=model_tol(want, n), rtol=0)
    torch.testing.assert_close(got_masked, want_masked, atol=model_tol(want_masked, n), rtol=0)
    assert torch_fallbacks[0] == 0  # every attention call ran on the engine


def test_dit_transformer_matches_default_processor(torch_fallbacks):
    """A diffusion transformer (DiT): patch tokens with adaptive-norm blocks, self-attention only."""
    pytest.importorskip("diffusers")
    from diffusers import DiTTransformer2DModel

    from aule_kp.integrations.diffusers import set_aule_attention

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                  num_layers=2, sample_size=8, patch_size=2, norm_num_groups=8).eval()
    g = torch.Generator().manual_seed(6)
    x, t, labels = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 600]), torch.tensor([1, 5])
    with torch.no_grad():
        want = model(x, timestep=t, class_labels=labels).sample
        assert set_aule_attention(model, backend="cpu") == 2
        got = model(x, timestep=t, class_labels=labels).sample
    torch.testing.assert_close(got, want, atol=model_tol(want, 16 + 16 + 32 + 128), rtol=0)  # tokens, D, widths
    assert torch_fallbacks[0] == 0


def test_scale_qk_false_matches_default_processor(torch_fallbacks):
    """T5-FiLM (spectrogram diffusion) builds its attention with ``scale_qk=False``: a score scale of
    1, so diffusers gives those modules the classic ``AttnProcessor`` (``AttnProcessor2_0`` ignores
    ``attn.scale``). AuleAttnProcessor took 1/sqrt(head_dim) there: 14% off the model's output."""
    pytest.importorskip("diffusers")
    from diffusers import T5FilmDecoder
    from diffusers.models.attention_processor import AttnProcessor

    from aule_kp.integrations.diffusers import set_aule_attention

    torch.manual_seed(0)
    model = T5FilmDecoder(input_dims=8, targets_length=8, d_model=32, num_layers=1, num_heads=2, d_kv=16, d_ff=32,
                          dropout_rate=0.0).eval()
    g = torch.Generator().manual_seed(1)
    enc, tokens, t = torch.randn(2, 6, 32, generator=g), torch.randn(2, 8, 8, generator=g), torch.tensor([0.3, 0.7])
    enc_mask = torch.ones(2, 6, dtype=torch.bool)
    enc_mask[1, 4:] = False
    attns = [m for m in model.modules() if type(m).__name__ == "Attention"]
    assert len(attns) == 2 and all(type(m.processor) is AttnProcessor and m.scale == 1.0 for m in attns)
    with torch.no_grad():
        want = model([(enc, enc_mask)], tokens, t)
        assert set_aule_attention(model, backend="cpu") == 2
        got = model([(enc, enc_mask)], tokens, t)
    # 8 + 6 tokens (self, cross), head dim 16, widths 32 and 32
    torch.testing.assert_close(got, want, atol=model_tol(want, 14 + 16 + 32 + 32), rtol=0)
    assert torch_fallbacks[0] == 0


def test_specialised_processors_are_kept():
    """A module with a processor other than diffusers' default keeps it (it may add projections)."""
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import AttnProcessor2_0

    from aule_kp.integrations.diffusers import AuleAttnProcessor, set_aule_attention

    class Custom(AttnProcessor2_0):
        pass

    unet = _tiny_unet()
    first = next(iter(unet.attn_processors))
    unet.set_attn_processor({name: Custom() if name == first else AttnProcessor2_0()
                             for name in unet.attn_processors})
    assert set_aule_attention(unet) == len(unet.attn_processors) - 1
    kinds = {name: type(p) for name, p in unet.attn_processors.items()}
    assert kinds.pop(first) is Custom and set(kinds.values()) == {AuleAttnProcessor}


def test_processor_rejects_unknown_backend():
    pytest.importorskip("diffusers")
    from aule_kp.integrations.diffusers import AuleAttnProcessor

    with pytest.raises(ValueError):
        AuleAttnProcessor(backend="nope")
