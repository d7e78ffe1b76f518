"""Position encodings of the attention layers: rotary (RoPE, half and interleaved layouts, Llama-3
frequency scaling), ALiBi (a float bias through ``attn_mask``), or none.

The rotation runs in torch on the tensors' own device, vectorised over batch, heads and positions,
before the attention call. Angles are computed in float64 from float32 inverse frequencies (the
models' own definition: Meta's and Hugging Face's ``inv_freq`` are float32), so the only roundings
are the final cos/sin and the rotation itself.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

#: ``position=`` values of the layers.
POSITIONS = ("rope", "alibi", "none")
#: RoPE layouts: "half" rotates channel i with i + D/2 (Llama, GPT-NeoX); "interleaved" rotates the
#: pairs (2i, 2i+1) (GPT-J, Meta's original Llama code, DeepSeek's ``rope_interleave``).
LAYOUTS = ("half", "interleaved")


def check_position(position: Any) -> str:
    """``position`` when it is one of :data:`POSITIONS`; ValueError naming it otherwise."""
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {', '.join(map(repr, POSITIONS))}, got {position!r}")
    return position


def rope_inv_freq(dim: int, theta: float = 10000.0, scaling: Optional[Mapping[str, Any]] = None) -> torch.Tensor:
    """float32 inverse frequencies ``[dim // 2]`` of RoPE over ``dim`` channels, computed as Hugging
    Face computes them; ``scaling`` is a ``rope_scaling`` dict of ``rope_type`` "default" or "llama3"
    (``factor``, ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``)."""
    if not isinstance(dim, int) or dim <= 0 or dim % 2:
        raise ValueError(f"the rotary dim must be a positive even int, got {dim!r}")
    if not theta > 0:
        raise ValueError(f"rope_theta must be > 0, got {theta!r}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return inv_freq
    if kind != "llama3":
        raise ValueError(f"rope_scaling type {kind!r} is not supported (default or llama3)")
    try:
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
    except KeyError as exc:
        raise ValueError(f"rope_scaling of type llama3 needs {exc.args[0]!r}") from None
    # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend between.
    wavelen = 2 * math.pi / inv_freq
    slowed = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * slowed / factor + smooth * slowed
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, blended, slowed)


class RotaryEmbedding(torch.nn.Module):
    """RoPE over the last axis of ``[B, H, L, dim]`` tensors at given positions.

    Args:
        dim: channels rotated (the head dim, or DeepSeek's ``qk_rope_head_dim``).
        theta: base of the frequencies (``rope_theta``).
        interleaved: rotate pairs (2i, 2i+1) instead of (i, i + dim/2).
        scaling: a Hugging Face ``rope_scaling`` dict ("llama3"), or None.
    """

    def __init__(self, dim: int, theta: float = 10000.0, interleaved: bool = False,
                 scaling: Optional[Mapping[str, Any]] = None):
        super().__init__()
        self.dim = dim
        self.interleaved = bool(interleaved)
        # Not a buffer: module.half() must not round the frequencies (nor state_dicts carry them).
        self.inv_freq = rope_inv_freq(dim, theta, scaling)
        self._wide: Dict[torch.device, torch.Tensor] = {}  # float64 copies per device

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of shape ``positions.shape + [dim // 2]`` in ``dtype`` (angles in float64)."""
        where = positions.device if positions.device.type != "mps" else torch.device("cpu")  # MPS has no float64
        wide = self._wide.get(where)
        if wide is None:
            wide = self._wide[where] = self.inv_freq.to(where, torch.float64)
        angles = positions.to(where, torch.float64)[..., None] * wide
        return angles.cos().to(positions.device, dtype), angles.sin().to(positions.device, dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``x [B, H, L, dim]`` rotated at ``positions`` (``[L]`` or ``[B, L]`` integers)."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"RotaryEmbedding over {self.dim} channels got a last axis of {x.shape[-1]}")
        cos, sin = self.cos_sin(positions, x.dtype)
        if cos.dim() == 3:  # [B, L, D/2] -> broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
        if self.interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        half = self.dim // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, interleaved={self.interleaved}"


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al. 2022; the geometric sequence ``2^(-8 i / n)``, with the
    paper's interleaved extension when ``num_heads`` is not a power of two), float32 ``[num_heads]``."""
    if not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")

    def powers(n: int) -> list:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    low = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = powers(low)
    if low < num_heads:
        slopes += powers(2 * low)[0::2][: num_heads - low]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, len_q: int, len_k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The additive ALiBi bias ``[1, H, Lq, Lk]``: ``-slope·|i + Lk - Lq - j|`` (flash-attn's
    ``alibi_slopes`` convention; the queries are the last ``Lq`` positions of the keys' sequence)."""
    i = torch.arange(len_q, device=slopes.device, dtype=torch.float64)[:, None] + (len_k - len_q)
    j = torch.arange(len_k, device=slopes.device, dtype=torch.float64)[None, :]
    return (-slopes.to(torch.float64)[:, None, None] * (i - j).abs()).to(dtype)[None]
