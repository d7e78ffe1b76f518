"""Decoder-style attention layers on ``[B, L, E]`` inputs: ``SelfAttention`` (one fused QKV
projection), ``GroupedQueryAttention`` and ``MultiQueryAttention`` (Llama's ``q_proj/k_proj/v_proj/
o_proj``), with RoPE, ALiBi or no positions, self- or cross-attention inputs, and a KV cache."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple, Union

import torch

from .attend import attend, check_layer_backend
from .cache import KVCache, appending
from .devicecache import DeviceLayerCache
from .positions import RotaryEmbedding, alibi_bias, alibi_slopes, check_position

#: What ``new_cache`` gives and ``forward(cache=)`` takes.
AnyCache = Union[KVCache, DeviceLayerCache]


def _positive(name: str, n: Any) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"{name} must be a positive int, got {n!r}")
    return n


def _positions(given: Optional[torch.Tensor], start: int, length: int, device: torch.device,
               name: str) -> torch.Tensor:
    """``given`` (``[L]`` or ``[B, L]`` ints) checked against ``length``, or ``start .. start + length - 1``."""
    if given is None:
        return torch.arange(start, start + length, device=device)
    if given.dim() not in (1, 2) or given.shape[-1] != length or given.is_floating_point():
        raise ValueError(f"{name} must be integers of shape [{length}] or [B, {length}], got "
                         f"{given.dtype} {tuple(given.shape)}")
    return given.to(device)


class _HeadsAttention(torch.nn.Module):
    """What the layers share: positions, the cache, the attention call and the output projection.
    Subclasses define ``_project(x, context) -> (q, k, v)``, each ``[B, L, heads·head_dim]``, and
    ``_output`` (the output projection)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, causal: bool, position: str,
                 rope_theta: float, rope_interleaved: bool, rope_scaling: Optional[Mapping[str, Any]],
                 backend: str):
        super().__init__()
        self.num_heads = _positive("num_heads", num_heads)
        self.num_kv_heads = _positive("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.head_dim = _positive("head_dim", head_dim)
        self.scaling = head_dim ** -0.5
        self.causal = bool(causal)
        self.position = check_position(position)
        self.backend = check_layer_backend(backend)
        self.rotary = RotaryEmbedding(head_dim, rope_theta, rope_interleaved, rope_scaling) \
            if position == "rope" else None
        if position == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(num_heads), persistent=False)

    def _project(self, x: torch.Tensor, context: Optional[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def _output(self, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def new_cache(self, batch: int, max_len: int, dtype: Optional[torch.dtype] = None,
                  device: Optional[torch.device] = None, on_device: Optional[bool] = None) -> AnyCache:
        """An empty cache for this layer (rotated keys and values of ``max_len`` positions), in the
        dtype of the layer's parameters unless given: a :class:`DeviceLayerCache` on the Vulkan
        device where ``on_device`` (default: the layer's backend is "vulkan"), else a
        :class:`KVCache` of torch tensors (on the parameters' device unless given)."""
        p = next(self.parameters())
        if self.backend == "vulkan" if on_device is None else on_device:
            return DeviceLayerCache(batch, self.num_kv_heads, max_len, self.head_dim, self.head_dim,
                                    dtype=dtype or p.dtype)
        return KVCache(batch, self.num_kv_heads, max_len, self.head_dim, self.head_dim,
                       dtype=dtype or p.dtype, device=device or p.device)

    def forward(self, hidden_states: torch.Tensor, context: Optional[torch.Tensor] = None, *,
                positions: Optional[torch.Tensor] = None, key_positions: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None, cache: Optional[AnyCache] = None) -> torch.Tensor:
        """Attention of ``hidden_states [B, Lq, E]`` over itself, or over ``context [B, Lk, E_ctx]``
        (cross-attention); returns ``[B, Lq, E]``.

        Args:
            positions: query positions (``[Lq]`` or ``[B, Lq]``) for RoPE; default ``0 .. Lq-1``,
                after the cache's length when a cache is given.
            key_positions: key positions of ``context`` (default ``0 .. Lk-1``); self-attention
                keys take the query positions.
            attn_mask: bool (True = attend) or float (added), broadcastable to ``[B, H, Lq, Lk]``
                (Lk: every key attended, the cached ones included).
            cache: a :class:`KVCache` or :class:`DeviceLayerCache` (``new_cache``) that the new keys
                and values are appended to; the queries attend to everything cached. Self-attention
                only; not differentiable. A device cache takes no ``attn_mask``.

        ``causal`` is aligned bottom-right (flash-attn's): the queries are the last Lq positions
        of the keys' sequence, as in decoding with a cache.
        """
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden_states must be [B, L, E], got shape {tuple(hidden_states.shape)}")
        if context is not None and cache is not None:
            raise ValueError("cache holds self-attention keys: pass either context or cache, not both")
        batch, len_q = hidden_states.shape[:2]
        q, k, v = self._project(hidden_states, context)
        len_k = k.shape[1]
        q = q.reshape(batch, len_q, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(batch, len_k, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(batch, len_k, self.num_kv_heads, self.head_dim).transpose(1, 2)
        past = cache.length if cache is not None else 0
        rotary = None
        on_device = isinstance(cache, DeviceLayerCache)
        if on_device and attn_mask is not None:
            raise ValueError("attn_mask: a DeviceLayerCache takes none (new_cache(..., on_device=False) gives a "
                             "torch KVCache that does)")
        if self.rotary is not None:
            q_pos = _positions(positions, past, len_q, q.device, "positions")
            k_pos = q_pos if context is None else _positions(key_positions, 0, len_k, k.device, "key_positions")
            # Positions made here need no range check (a device read per layer and step).
            q_top = past + len_q - 1 if positions is None else None
            k_top = q_top if context is None else (len_k - 1 if key_positions is None else None)
            if cache is not None and not on_device:
                # The cache holds rotated keys: the new ones are rotated here, in torch.
                k, k_pos, k_top = self.rotary(k, k_pos), None, -1
            largest = None if q_top is None or k_top is None else max(q_top, k_top)
            rotary = self.rotary.spec(q_pos, k_pos, batch, largest=largest)
        if on_device:
            slopes = self.alibi_slopes if self.position == "alibi" else None
            out = cache.attend(q, k, v, scale=self.scaling, causal=self.causal, rotary=rotary, alibi_slopes=slopes)
            return self._output(out.transpose(1, 2).reshape(batch, len_q, self.num_heads * self.head_dim))
        with appending(cache):  # a call that fails (a bad attn_mask, ...) leaves the cache's length
            if cache is not None:
                k, v = cache.append(k, v)
            mask = attn_mask
            if self.position == "alibi":
                bias = alibi_bias(self.alibi_slopes, len_q, k.shape[2], q.dtype)
                mask = bias if mask is None else (bias.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                                                  else mask + bias)
            out = attend(q, k, v, scale=self.scaling, causal=self.causal, attn_mask=mask, backend=self.backend,
                         rotary=rotary)
        return self._output(out.transpose(1, 2).reshape(batch, len_q, self.num_heads * self.head_dim))


class SelfAttention(_HeadsAttention):
    """Multi-head self-attention with one fused projection ``qkv_proj`` (``[3E, E]``: q, k, v rows in
    that order) and ``out_proj``; ``[B, L, E]`` in and out. No positions by default (``position=
    "rope"`` or ``"alibi"`` add them); ``causal=False`` by default (an encoder's); ``backend`` as
    :class:`MultiHeadAttention`'s."""

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True, causal: bool = False, *,
                 position: str = "none", rope_theta: float = 10000.0, rope_interleaved: bool = False,
                 rope_scaling: Optional[Mapping[str, Any]] = None, backend: str = "auto", device: Any = None,
                 dtype: Any = None):
        _positive("embed_dim", embed_dim)
        if embed_dim % _positive("num_heads", num_heads):
            raise ValueError(f"embed_dim ({embed_dim}) must be a multiple of num_heads ({num_heads})")
        super().__init__(num_heads, num_heads, embed_dim // num_heads, causal, position, rope_theta,
                         rope_interleaved, rope_scaling, backend)
        self.embed_dim = embed_dim
        self.qkv_proj = torch.nn.Linear(embed_dim, 3 * embed_dim, bias=bias, device=device, dtype=dtype)
        self.out_proj = torch.nn.Linear(embed_dim, embed_dim, bias=bias, device=device, dtype=dtype)

    def _project(self, x: torch.Tensor, context: Optional[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        if context is not None:
            raise ValueError("SelfAttention takes no context (use GroupedQueryAttention for cross-attention)")
        return self.qkv_proj(x).chunk(3, dim=-1)

    def _output(self, out: torch.Tensor) -> torch.Tensor:
        return self.out_proj(out)


class GroupedQueryAttention(_HeadsAttention):
    """Grouped-query attention with Llama's parameter names (``q_proj``, ``k_proj``, ``v_proj``,
    ``o_proj``), so a Hugging Face ``LlamaAttention``'s state_dict loads as it is.

    Args:
        embed_dim: model width E; num_heads, num_kv_heads: query and key/value heads.
        bias: biases on the projections (Llama's ``attention_bias``).
        rope_theta: RoPE base; causal: causal mask (bottom-right aligned).
        backend: ``"auto" | "vulkan" | "triton" | "cpu" | "torch"``.
        head_dim: default ``E // num_heads``.
        position: ``"rope"`` (default), ``"alibi"`` or ``"none"``.
        rope_interleaved: rotate pairs (2i, 2i+1) instead of Llama's halves.
        rope_scaling: a Hugging Face ``rope_scaling`` dict (``rope_type`` "llama3"), or None.
        context_dim: width of cross-attention ``context`` inputs (default E).
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 rope_theta: float = 10000.0, causal: bool = True, backend: str = "auto", *,
                 head_dim: Optional[int] = None, position: str = "rope", rope_interleaved: bool = False,
                 rope_scaling: Optional[Mapping[str, Any]] = None, context_dim: Optional[int] = None,
                 device: Any = None, dtype: Any = None):
        _positive("embed_dim", embed_dim)
        if head_dim is None:
            if embed_dim % _positive("num_heads", num_heads):
                raise ValueError(f"embed_dim ({embed_dim}) must be a multiple of num_heads ({num_heads}) "
                                 "unless head_dim is given")
            head_dim = embed_dim // num_heads
        super().__init__(num_heads, num_kv_heads, head_dim, causal, position, rope_theta, rope_interleaved,
                         rope_scaling, backend)
        self.embed_dim = embed_dim
        kv_in = _positive("context_dim", context_dim) if context_dim is not None else embed_dim
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.q_proj = torch.nn.Linear(embed_dim, num_heads * head_dim, **kw)
        self.k_proj = torch.nn.Linear(kv_in, num_kv_heads * head_dim, **kw)
        self.v_proj = torch.nn.Linear(kv_in, num_kv_heads * head_dim, **kw)
        self.o_proj = torch.nn.Linear(num_heads * head_dim, embed_dim, **kw)

    @classmethod
    def from_config(cls, config: Any, **options: Any) -> GroupedQueryAttention:
        """The layer of a Hugging Face ``LlamaConfig``-like config (``hidden_size``,
        ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ``attention_bias``,
        ``rope_theta``, ``rope_scaling``); ``options`` override the rest (``backend``, ...)."""
        heads = config.num_attention_heads
        kwargs = dict(embed_dim=config.hidden_size, num_heads=heads,
                      num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                      bias=bool(getattr(config, "attention_bias", False)),
                      rope_theta=float(getattr(config, "rope_theta", 10000.0)),
                      head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                      rope_scaling=getattr(config, "rope_scaling", None))
        kwargs.update(options)
        return cls(**kwargs)

    def _project(self, x: torch.Tensor, context: Optional[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        source = x if context is None else context
        if source.dim() != 3 or source.shape[0] != x.shape[0]:
            raise ValueError(f"context must be [B={x.shape[0]}, Lk, E_ctx], got shape {tuple(source.shape)}")
        return self.q_proj(x), self.k_proj(source), self.v_proj(source)

    def _output(self, out: torch.Tensor) -> torch.Tensor:
        return self.o_proj(out)


class MultiQueryAttention(GroupedQueryAttention):
    """Multi-query attention: :class:`GroupedQueryAttention` with one key/value head (``k_proj`` and
    ``v_proj`` of ``head_dim`` outputs); the same arguments less ``num_kv_heads``."""

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = False, rope_theta: float = 10000.0,
                 causal: bool = True, backend: str = "auto", **options: Any):
        super().__init__(embed_dim, num_heads, 1, bias, rope_theta, causal, backend, **options)
