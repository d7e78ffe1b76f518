"""transformers / diffusers integrations: tiny random-weight models against their own sdpa paths."""

from __future__ import annotations

import copy
from typing import Any, Dict, List

import pytest

torch = pytest.importorskip("torch")

from conftest import tolerance  # noqa: E402

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
