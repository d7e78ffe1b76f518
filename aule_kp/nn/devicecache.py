"""A layer's decode cache on the Vulkan device: :class:`KVCache`'s sibling for ``backend="vulkan"``.

Keys and values live in device memory (:class:`aule_kp.vulkan.kvcache.DeviceKVCache`, ``[B, max_len,
H, D]``); a step uploads only the new rows, which glsl/kv_append.comp writes in place, rotating the
keys on the way (RoPE); the queries are rotated on the device too and attend through the ragged
kernel (split-KV over long caches), which reads the cache where it is.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .. import inputs
from ..serving import ragged
from ..vulkan import device as devmod
from ..vulkan.kvcache import DeviceKVCache, RowRotation
from .positions import RotarySpec

_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _rows(spec: RotarySpec, positions: torch.Tensor) -> RowRotation:
    """The rotation of rows in ``positions`` order (``[B, n]`` flattened)."""
    cos, sin = spec.kernel_tables(torch.device("cpu"))  # float32 copies made once per tables
    at = positions.reshape(-1).cpu()
    return RowRotation(cos[at].numpy(), sin[at].numpy(), bool(spec.interleaved), int(spec.offset))


class DeviceLayerCache:
    """Keys ``[B, max_len, H, Dk]`` and values ``[B, max_len, H, Dv]`` on the Vulkan device, for
    one layer's decoding (``layer.new_cache`` on a ``backend="vulkan"`` layer).

    Shares :class:`KVCache`'s ``length``, ``max_len`` and ``reset``; instead of ``append`` returning
    the cached tensors (they stay on the device), :meth:`attend` appends a step's keys and values
    and attends to everything cached. ``value_in_key``: the values are the keys' first ``dim_v``
    channels (latent attention); they are stored apart here, since the kernel reads them as their
    own rows. ``free()`` releases the device memory now (else when the cache is collected).
    """

    def __init__(self, batch: int, heads: int, max_len: int, dim_k: int, dim_v: int, *, dtype: torch.dtype,
                 value_in_key: bool = False):
        for name, n in (("batch", batch), ("heads", heads), ("max_len", max_len), ("dim_k", dim_k), ("dim_v", dim_v)):
            if not isinstance(n, int) or n <= 0:
                raise ValueError(f"DeviceLayerCache: {name} must be a positive int, got {n!r}")
        if dtype not in _DTYPES:
            raise TypeError(f"DeviceLayerCache: dtype must be float32, float16 or bfloat16, got {dtype}")
        if value_in_key and dim_v > dim_k:
            raise ValueError(f"DeviceLayerCache: value_in_key needs dim_v <= dim_k, got {dim_v} > {dim_k}")
        self.dtype = _DTYPES[dtype]
        device = devmod.get_device()
        self.keys = DeviceKVCache(device, (batch, max_len, heads, dim_k), self.dtype, False)
        self.values = DeviceKVCache(device, (batch, max_len, heads, dim_v), self.dtype, False)
        self.value_in_key = bool(value_in_key)
        self.dim_v = dim_v
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.keys.shape[1]

    def reset(self) -> None:
        """Forget every cached position (the storage is kept)."""
        self.length = 0

    def free(self) -> None:
        """Releases the device memory now; idempotent."""
        self.keys.free()
        self.values.free()

    def __del__(self) -> None:
        keys = getattr(self, "keys", None)
        if keys is not None and keys.data is not None:
            self.free()

    def _write(self, store: DeviceKVCache, x: torch.Tensor, rotation: Optional[RowRotation]) -> None:
        b, h, n, d = x.shape
        rows = (np.arange(b)[:, None] * self.max_len + self.length + np.arange(n)[None]).reshape(-1)
        host = inputs.to_host(x.transpose(1, 2).contiguous(), self.dtype).reshape(b * n, h, d)
        store.write(rows, host, None, rotation)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor], *, scale: float, causal: bool,
               rotary: Optional[RotarySpec] = None, alibi_slopes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Appends ``k [B, H, n, Dk]`` (and ``v [B, H, n, Dv]``; with ``value_in_key`` none: the
        values are ``k[..., :Dv]``) after the ``length`` cached positions, then returns the attention
        ``[B, Hq, Lq, Dv]`` of ``q [B, Hq, Lq, Dk]`` over every cached position (causal aligned
        bottom-right). ``rotary``: q and k come unrotated and are rotated on the device at the
        spec's positions (its ``k_positions`` those of the new keys). ``alibi_slopes``: ``[Hq]``."""
        b, hq, lq, dk = q.shape
        n = int(k.shape[2])
        if tuple(k.shape) != (self.keys.shape[0], self.keys.shape[2], n, self.keys.shape[3]):
            raise ValueError(f"DeviceLayerCache: k must be [B={self.keys.shape[0]}, H={self.keys.shape[2]}, n, "
                             f"Dk={self.keys.shape[3]}], got {tuple(k.shape)}")
        if self.length + n > self.max_len:
            raise ValueError(f"DeviceLayerCache: {self.length} cached + {n} new positions exceed "
                             f"max_len={self.max_len}")
        if (v is None) != self.value_in_key:
            raise ValueError("DeviceLayerCache: pass v exactly when the cache stores values apart (value_in_key=False)")
        if rotary is not None and (rotary.k_positions is None or rotary.q_positions.shape != (b, lq)):
            raise ValueError("DeviceLayerCache: the rotary spec must give q positions [B, Lq] and the new keys' "
                             "positions")
        with torch.no_grad():
            self._write(self.keys, k, None if rotary is None else _rows(rotary, rotary.k_positions))
            self._write(self.values, k[..., :self.dim_v] if v is None else v, None)
        total = self.length + n  # the cache's length once the attention ran (a failed call appends nothing)
        seqs = np.stack([np.arange(b) * lq, np.full(b, lq), np.arange(b) * self.max_len, np.full(b, total)],
                        axis=1).astype(np.int32)
        qh = inputs.to_host(q.detach().transpose(1, 2).contiguous(), self.dtype).reshape(b * lq, hq, dk)
        slopes = None if alibi_slopes is None else alibi_slopes.detach().float().cpu().numpy()[None]
        call = ragged.Ragged(qh, self.keys, self.values, seqs, self.dtype, float(scale), bool(causal), None,
                             alibi=slopes, q_rotary=None if rotary is None else _rows(rotary, rotary.q_positions))
        out = ragged.run(call, "vulkan", q).reshape(b, lq, hq, self.dim_v)
        self.length = total
        return inputs.from_host(out, q, self.dtype).transpose(1, 2)

    def __repr__(self) -> str:
        b, m, h, dk = self.keys.shape
        return f"DeviceLayerCache(batch={b}, heads={h}, length={self.length}/{m}, dim_k={dk}, dim_v={self.dim_v})"
