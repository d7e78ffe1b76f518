"""Serving calls with flash-attn's names and layouts: packed variable-length batches and a KV cache
(contiguous or paged, float or q8_0) that grows in place."""

from ..q8 import Q8Cache
from .kvcache import flash_attention_with_kvcache
from .varlen import flash_attention_varlen

__all__ = ["flash_attention_varlen", "flash_attention_with_kvcache", "Q8Cache"]
