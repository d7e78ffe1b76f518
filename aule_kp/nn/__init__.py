"""Attention layers over aule-kp's kernels (torch modules): ``MultiHeadAttention`` (a drop-in for
``torch.nn.MultiheadAttention``), ``SelfAttention``, ``GroupedQueryAttention``,
``MultiQueryAttention`` and ``LatentAttention`` (DeepSeek's MLA), with RoPE/ALiBi positions, a
preallocated ``KVCache`` for decoding and ``backend=`` per layer (auto, vulkan, triton, cpu, torch)."""

from __future__ import annotations

from .attend import LAYER_BACKENDS, attend
from .cache import KVCache
from .devicecache import DeviceLayerCache
from .heads import GroupedQueryAttention, MultiQueryAttention, SelfAttention
from .latent import LatentAttention, RMSNorm
from .mha import MultiHeadAttention
from .positions import RotaryEmbedding, RotarySpec, alibi_bias, alibi_slopes, rope_inv_freq

__all__ = ["LAYER_BACKENDS", "DeviceLayerCache", "GroupedQueryAttention", "KVCache", "LatentAttention",
           "MultiHeadAttention", "MultiQueryAttention", "RMSNorm", "RotaryEmbedding", "RotarySpec", "SelfAttention",
           "alibi_bias", "alibi_slopes", "attend", "rope_inv_freq"]
