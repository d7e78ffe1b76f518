"""A diffusers UNet on aule_kp attention: ``set_aule_attention(unet)``.

Builds a tiny ``UNet2DConditionModel`` (random weights, no download), runs a few denoising steps of a
DDIM scheduler with diffusers' default attention processor and with ``AuleAttnProcessor``, and
compares the latents. Run: ``python examples/diffusers_unet.py [--backend cpu|vulkan]``; prints
``diffusers_unet: OK`` on success. Needs ``diffusers``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from aule_kp.integrations.diffusers import set_aule_attention


def denoise(unet: UNet2DConditionModel, text: torch.Tensor, steps: int = 4) -> torch.Tensor:
    """A few DDIM steps from fixed noise (text conditioning through cross-attention)."""
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for t in scheduler.timesteps:
            noise = unet(latents, t, encoder_hidden_states=text).sample
            latents = scheduler.step(noise, t, latents).prev_sample
    return latents


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None, help="None (by device), auto, vulkan, triton or cpu")
    args = parser.parse_args()
    backend: Optional[str] = args.backend
    torch.manual_seed(0)
    # attention_head_dim is the number of heads in this class: head dims 16 and 32 here.
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8,
    ).eval()
    text = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(2))  # stand-in text embeddings

    t0 = time.perf_counter()
    want = denoise(unet, text)
    t_default = time.perf_counter() - t0
    n = set_aule_attention(unet, backend=backend)
    print(f"AuleAttnProcessor set on {n} attention modules "
          f"({sorted({type(p).__name__ for p in unet.attn_processors.values()})})")
    t0 = time.perf_counter()
    got = denoise(unet, text)
    t_aule = time.perf_counter() - t0
    err = (got - want).abs().max().item()
    print(f"4 DDIM steps: default processor {t_default:.2f} s, aule_kp {t_aule:.2f} s; "
          f"max |latent diff| {err:.1e}")
    ok = n > 0 and err <= 1e-4
    print("diffusers_unet: OK" if ok else "diffusers_unet: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
