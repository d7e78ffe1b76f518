"""A preallocated key/value cache for one attention layer's decoding."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional, Tuple

import torch


class KVCache:
    """Keys ``[B, H, max_len, Dk]`` and values ``[B, H, max_len, Dv]`` allocated once; each step
    writes its new keys and values in place after the ``length`` already held.

    ``value_in_key=True`` stores no values: they are the first ``Dv`` channels of the keys
    (DeepSeek's latent attention caches one latent that serves as both, plus the rope key).

    Args:
        batch, heads, max_len, dim_k, dim_v: sizes (``heads``: the layer's key/value heads).
        dtype, device: of the storage (torch's defaults when None).
        value_in_key: values are ``keys[..., :dim_v]``, not stored apart.
    """

    def __init__(self, batch: int, heads: int, max_len: int, dim_k: int, dim_v: int, *,
                 dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None,
                 value_in_key: bool = False):
        for name, n in (("batch", batch), ("heads", heads), ("max_len", max_len), ("dim_k", dim_k), ("dim_v", dim_v)):
            if not isinstance(n, int) or n <= 0:
                raise ValueError(f"KVCache: {name} must be a positive int, got {n!r}")
        if value_in_key and dim_v > dim_k:
            raise ValueError(f"KVCache: value_in_key needs dim_v <= dim_k, got {dim_v} > {dim_k}")
        self.keys = torch.zeros(batch, heads, max_len, dim_k, dtype=dtype, device=device)
        self.values = None if value_in_key else torch.zeros(batch, heads, max_len, dim_v, dtype=dtype, device=device)
        self.dim_v = dim_v
        self.length = 0

    @property
    def max_len(self) -> int:
        return int(self.keys.shape[2])

    def reset(self) -> None:
        """Forget every cached position (the storage is kept)."""
        self.length = 0

    def append(self, k: torch.Tensor, v: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Write ``k [B, H, n, Dk]`` (and ``v [B, H, n, Dv]`` unless values are in the keys) at
        positions ``length .. length + n - 1``; returns every cached ``(keys, values)`` so far.

        The write is not recorded by autograd (decoding is inference): use the layers without a
        cache for training."""
        n = int(k.shape[2])
        if tuple(k.shape[:2]) != tuple(self.keys.shape[:2]) or k.shape[3] != self.keys.shape[3]:
            raise ValueError(f"KVCache.append: k must be [B={self.keys.shape[0]}, H={self.keys.shape[1]}, n, "
                             f"Dk={self.keys.shape[3]}], got {tuple(k.shape)}")
        if self.length + n > self.max_len:
            raise ValueError(f"KVCache.append: {self.length} cached + {n} new positions exceed max_len={self.max_len}")
        if (v is None) != (self.values is None):
            raise ValueError("KVCache.append: pass v exactly when the cache stores values apart (value_in_key=False)")
        if v is not None and (v.shape[:3] != k.shape[:3] or v.shape[3] != self.values.shape[3]):
            raise ValueError(f"KVCache.append: v must be [B, H, n, Dv={self.values.shape[3]}] like k, "
                             f"got {tuple(v.shape)}")
        end = self.length + n
        with torch.no_grad():
            self.keys[:, :, self.length:end] = k
            if v is not None:
                self.values[:, :, self.length:end] = v
        self.length = end
        keys = self.keys[:, :, :end]
        values = keys[..., :self.dim_v] if self.values is None else self.values[:, :, :end]
        return keys, values

    def __repr__(self) -> str:
        b, h, m, dk = self.keys.shape
        return f"KVCache(batch={b}, heads={h}, length={self.length}/{m}, dim_k={dk}, dim_v={self.dim_v})"


@contextmanager
def appending(cache: Any) -> Iterator[None]:
    """A layer call's appends to ``cache`` (a :class:`KVCache`, a ``DeviceLayerCache`` or None): when
    the call raises, the cache's ``length`` goes back to where it was, so a failed call appends
    nothing (rows written past ``length`` are never read, and the next append overwrites them)."""
    length = None if cache is None else cache.length
    try:
        yield
    except BaseException:
        if cache is not None:
            cache.length = length
        raise
