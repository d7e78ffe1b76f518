"""``LatentAttention``: DeepSeek-V2/V3 multi-head latent attention (MLA) with Hugging Face
``DeepseekV3Attention``'s parameter names.

Training (no cache) attends over the full keys ``[nope | rope]`` and values decompressed from the
latent by ``kv_b_proj``. Decoding (a :class:`KVCache`) caches only the normalised latent and the
rotated rope key, ``kv_lora_rank + qk_rope_head_dim`` numbers per position, and absorbs ``kv_b_proj``
into the query and the output (DeepSeek-V2 §2.1.2): every head attends with one shared key/value
head (multi-query) where keys are ``[latent | rope key]`` and values the latent, so Dk != Dv.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from .attend import attend, check_layer_backend
from .cache import KVCache, appending
from .devicecache import DeviceLayerCache
from .heads import AnyCache, _positions, _positive
from .positions import RotaryEmbedding


class RMSNorm(torch.nn.Module):
    """Root-mean-square norm as DeepSeek's and Llama's: statistics in float32 (or wider), ``weight`` after."""

    def __init__(self, dim: int, eps: float = 1e-6, device: Any = None, dtype: Any = None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        wide = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * wide.to(x.dtype)


class LatentAttention(torch.nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3) on ``[B, L, hidden_size]`` inputs.

    Parameters as Hugging Face's ``DeepseekV3Attention``: ``q_a_proj``, ``q_a_layernorm``,
    ``q_b_proj`` (or ``q_proj`` when ``q_lora_rank`` is None), ``kv_a_proj_with_mqa``,
    ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``; its state_dict loads as it is.

    Args:
        hidden_size, num_heads, q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim,
            v_head_dim: DeepSeek's sizes (V3: 7168, 128, 1536, 512, 128, 64, 128).
        attention_bias: biases on ``q_a_proj``, ``kv_a_proj_with_mqa`` and ``o_proj``.
        rope_theta, rope_interleave: RoPE of the rope part (``rope_interleave``: DeepSeek's pairs).
        rope_scaling: None or a "llama3" dict; YaRN (DeepSeek-V3's long-context config) is not
            implemented and raises ValueError.
        rms_norm_eps: of the two latent norms. causal: bottom-right aligned causal mask.
        backend: ``"auto" | "vulkan" | "triton" | "cpu" | "torch"``.
    """

    def __init__(self, hidden_size: int, num_heads: int, q_lora_rank: Optional[int], kv_lora_rank: int,
                 qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int, *, attention_bias: bool = False,
                 rope_theta: float = 10000.0, rope_interleave: bool = True,
                 rope_scaling: Optional[Mapping[str, Any]] = None, rms_norm_eps: float = 1e-6, causal: bool = True,
                 backend: str = "auto", device: Any = None, dtype: Any = None):
        super().__init__()
        for name, n in (("hidden_size", hidden_size), ("num_heads", num_heads), ("kv_lora_rank", kv_lora_rank),
                        ("qk_nope_head_dim", qk_nope_head_dim), ("qk_rope_head_dim", qk_rope_head_dim),
                        ("v_head_dim", v_head_dim)):
            _positive(name, n)
        self.num_heads = num_heads
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.scaling = self.qk_head_dim ** -0.5
        self.causal = bool(causal)
        self.backend = check_layer_backend(backend)
        self.rotary = RotaryEmbedding(qk_rope_head_dim, rope_theta, rope_interleave, rope_scaling)
        kw = dict(device=device, dtype=dtype)
        if q_lora_rank is None:
            self.q_proj = torch.nn.Linear(hidden_size, num_heads * self.qk_head_dim, bias=False, **kw)
        else:
            self.q_a_proj = torch.nn.Linear(hidden_size, _positive("q_lora_rank", q_lora_rank), bias=attention_bias,
                                            **kw)
            self.q_a_layernorm = RMSNorm(q_lora_rank, rms_norm_eps, **kw)
            self.q_b_proj = torch.nn.Linear(q_lora_rank, num_heads * self.qk_head_dim, bias=False, **kw)
        self.q_lora_rank = q_lora_rank
        self.kv_a_proj_with_mqa = torch.nn.Linear(hidden_size, kv_lora_rank + qk_rope_head_dim, bias=attention_bias,
                                                  **kw)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, rms_norm_eps, **kw)
        self.kv_b_proj = torch.nn.Linear(kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim), bias=False, **kw)
        self.o_proj = torch.nn.Linear(num_heads * v_head_dim, hidden_size, bias=attention_bias, **kw)

    @classmethod
    def from_config(cls, config: Any, **options: Any) -> LatentAttention:
        """The layer of a Hugging Face ``DeepseekV3Config``-like config; ``options`` override (``backend``, ...)."""
        kwargs = dict(hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
                      q_lora_rank=config.q_lora_rank, kv_lora_rank=config.kv_lora_rank,
                      qk_nope_head_dim=config.qk_nope_head_dim, qk_rope_head_dim=config.qk_rope_head_dim,
                      v_head_dim=config.v_head_dim, attention_bias=bool(config.attention_bias),
                      rope_theta=float(config.rope_theta),
                      rope_interleave=bool(getattr(config, "rope_interleave", True)),
                      rope_scaling=getattr(config, "rope_scaling", None), rms_norm_eps=float(config.rms_norm_eps))
        kwargs.update(options)
        return cls(**kwargs)

    def new_cache(self, batch: int, max_len: int, dtype: Optional[torch.dtype] = None,
                  device: Optional[torch.device] = None, on_device: Optional[bool] = None) -> AnyCache:
        """An empty cache of ``max_len`` positions holding ``[latent | rope key]`` per position (one
        head; the values are the latent part), in the parameters' dtype unless given: on the Vulkan
        device where ``on_device`` (default: the backend is "vulkan"; :class:`DeviceLayerCache`,
        which stores the latent a second time as the values), else a :class:`KVCache` (on the
        parameters' device unless given)."""
        p = self.kv_b_proj.weight
        dims = (batch, 1, max_len, self.kv_lora_rank + self.qk_rope_head_dim, self.kv_lora_rank)
        if self.backend == "vulkan" if on_device is None else on_device:
            return DeviceLayerCache(*dims, dtype=dtype or p.dtype, value_in_key=True)
        return KVCache(*dims, dtype=dtype or p.dtype, device=device or p.device, value_in_key=True)

    def forward(self, hidden_states: torch.Tensor, *, positions: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None, cache: Optional[AnyCache] = None) -> torch.Tensor:
        """``hidden_states [B, L, hidden_size]`` -> ``[B, L, hidden_size]``; ``positions``,
        ``attn_mask`` and ``cache`` as :meth:`GroupedQueryAttention.forward`'s (the cache from
        :meth:`new_cache`; with it the absorbed decoding path runs)."""
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden_states must be [B, L, hidden_size], got shape {tuple(hidden_states.shape)}")
        batch, length = hidden_states.shape[:2]
        heads, nope, rope = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim
        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        q_pass, q_rot = q.reshape(batch, length, heads, self.qk_head_dim).transpose(1, 2).split([nope, rope], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(hidden_states).split([self.kv_lora_rank, rope], dim=-1)
        latent = self.kv_a_layernorm(latent)
        start = cache.length if cache is not None else 0
        pos = _positions(positions, start, length, q.device, "positions")
        largest = start + length - 1 if positions is None else None  # made here: no range check (a device read)
        k_rot = k_rot[:, None]
        options = dict(scale=self.scaling, causal=self.causal, attn_mask=attn_mask, backend=self.backend)
        if cache is None:
            kv = self.kv_b_proj(latent).reshape(batch, length, heads, nope + self.v_head_dim).transpose(1, 2)
            k_pass, v = kv.split([nope, self.v_head_dim], dim=-1)
            k = torch.cat((k_pass, k_rot.expand(-1, heads, -1, -1)), dim=-1)
            # q and k unrotated: attend rotates their last `rope` channels (on the device on Vulkan).
            out = attend(torch.cat((q_pass, q_rot), dim=-1), k, v,
                         rotary=self.rotary.spec(pos, pos, batch, nope, largest=largest), **options)
        else:
            # Absorbed: q_nope·k_nope = (q_nope W_uk)·latent and P·(latent W_uvᵀ) = (P·latent) W_uvᵀ.
            w = self.kv_b_proj.weight.reshape(heads, nope + self.v_head_dim, self.kv_lora_rank)
            q_absorbed = torch.cat((torch.einsum("bhld,hdc->bhlc", q_pass, w[:, :nope]), q_rot), dim=-1)
            if isinstance(cache, DeviceLayerCache):
                if attn_mask is not None:
                    raise ValueError("attn_mask: a DeviceLayerCache takes none (new_cache(..., on_device=False) "
                                     "gives a torch KVCache that does)")
                # q and the new rope key are rotated on the device (the cache holds rotated keys).
                out_latent = cache.attend(q_absorbed, torch.cat((latent[:, None], k_rot), dim=-1), None,
                                          scale=self.scaling, causal=self.causal,
                                          rotary=self.rotary.spec(pos, pos, batch, self.kv_lora_rank, largest=largest))
            else:
                # The cache holds the rotated rope key: the new one is rotated here, in torch; the
                # query's rope part is rotated by attend.
                with appending(cache):  # a failed call leaves the cache's length
                    keys, values = cache.append(torch.cat((latent[:, None], self.rotary(k_rot, pos)), dim=-1))
                    out_latent = attend(q_absorbed, keys, values,
                                        rotary=self.rotary.spec(pos, None, batch, self.kv_lora_rank, largest=largest),
                                        **options)
            out = torch.einsum("bhlc,hvc->bhlv", out_latent, w[:, nope:])
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, heads * self.v_head_dim))
