"""A Hugging Face transformers model on aule_kp attention: ``attn_implementation="aule_kp"``.

Builds a tiny Llama-style model with grouped-query attention (random weights, no download), checks its
logits against transformers' own ``"sdpa"`` implementation, then greedy-generates with a KV cache on
both and compares the tokens. Run: ``python examples/transformers_patch.py [--backend cpu|vulkan]``;
prints ``transformers_patch: OK`` on success. Needs ``transformers``.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from aule_kp.integrations import transformers as aule_transformers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None, help="None (by device), auto, vulkan, triton or cpu")
    args = parser.parse_args()
    name = aule_transformers.register(backend=args.backend)  # once per process

    def build(attn: str) -> LlamaForCausalLM:
        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        torch.manual_seed(0)  # same weights for both
        return LlamaForCausalLM._from_config(config, attn_implementation=attn).eval()

    ours, ref = build(name), build("sdpa")
    print(f"model: Llama, 2 layers, 4 query heads / 2 KV heads, attention {ours.config._attn_implementation!r}")
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in the second prompt

    with torch.no_grad():
        err = (ours(ids, attention_mask=mask).logits - ref(ids, attention_mask=mask).logits)[mask.bool()].abs().max()
        print(f"prefill logits: max |aule_kp - sdpa| = {err.item():.1e}")
        kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
        t0 = time.perf_counter()
        got = ours.generate(ids, **kw)
        secs = time.perf_counter() - t0
        want = ref.generate(ids, **kw)
    same = torch.equal(got, want)
    print(f"greedy generate with KV cache: {kw['max_new_tokens']} tokens x 2 sequences in {secs:.2f} s; "
          f"tokens {'identical to' if same else 'DIFFER from'} sdpa")
    print(f"  generated: {got[0, ids.shape[1]:].tolist()}")
    ok = err.item() <= 2e-5 and same
    print("transformers_patch: OK" if ok else "transformers_patch: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
