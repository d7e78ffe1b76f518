"""A greedy decode of a tiny random Hugging Face Llama through aule-kp's paged KV cache equals its
own ``generate()`` (issue 19, part 5): the prompt is prefilled into the cache and every new token
appended to it by ``flash_attention_with_kvcache`` (NeoX rotary applied by the call, pages shuffled),
while the model's own norms, projections and MLPs do the rest."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import aule_kp  # noqa: E402
from aule_kp.vulkan import device as devmod  # noqa: E402

PAGE = 16


def _model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rope_theta=10000.0, attn_implementation="eager")
    return transformers.LlamaForCausalLM(cfg).eval()


def _greedy(model, prompt: torch.Tensor, new_tokens: int, backend: str) -> torch.Tensor:
    cfg = model.config
    b, hkv = prompt.shape[0], cfg.num_key_value_heads
    d = cfg.hidden_size // cfg.num_attention_heads
    per_seq = -(-(prompt.shape[1] + new_tokens) // PAGE)
    blocks = b * per_seq + 2
    table = torch.from_numpy(np.random.default_rng(0).permutation(blocks)[: b * per_seq].reshape(b, per_seq)
                             .astype(np.int32))
    caches = [(torch.zeros(blocks, PAGE, hkv, d), torch.zeros(blocks, PAGE, hkv, d)) for _ in model.model.layers]
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(cfg.max_position_embeddings, dtype=torch.float64)[:, None] * inv_freq[None]
    cos, sin = angles.cos().float(), angles.sin().float()
    seqlens = torch.zeros(b, dtype=torch.int32)
    tokens, step = prompt, prompt
    for _ in range(new_tokens):
        x = model.model.embed_tokens(step)
        for layer, (kc, vc) in zip(model.model.layers, caches):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            shape = (b, h.shape[1], -1, d)
            q, k, v = a.q_proj(h).view(shape), a.k_proj(h).view(shape), a.v_proj(h).view(shape)
            o = aule_kp.flash_attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens, block_table=table,
                                                     rotary_cos=cos, rotary_sin=sin, rotary_interleaved=False,
                                                     causal=True, backend=backend)
            x = x + a.o_proj(o.reshape(b, h.shape[1], -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        seqlens = seqlens + step.shape[1]
        nxt = model.lm_head(model.model.norm(x[:, -1])).argmax(-1, keepdim=True)
        tokens, step = torch.cat([tokens, nxt], dim=1), nxt
    return tokens


@pytest.mark.parametrize("backend", ["cpu", pytest.param("vulkan", marks=pytest.mark.skipif(
    devmod.vulkan_unavailable() is not None, reason="no Vulkan device"))])
def test_llama_greedy_paged(backend):
    model = _model()
    prompt = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
        got = _greedy(model, prompt, 10, backend)
    assert torch.equal(got, want)
