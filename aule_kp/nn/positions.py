"""Position encodings of the attention layers: rotary (RoPE, half and interleaved layouts, Llama-3
frequency scaling), ALiBi (a float bias through ``attn_mask``), or none.

The layers hand the rotation to the attention call as a :class:`RotarySpec` (unrotated q and k,
float32 cos/sin tables, positions, layout): on Vulkan it runs on the device in the attention's own
recorded sequence; elsewhere (and for calls that need gradients) it runs in torch on the tensors'
own device, vectorised over batch, heads and positions, before the attention. Angles are computed
in float64 from float32 inverse frequencies (the models' own definition: Meta's and Hugging Face's
``inv_freq`` are float32) and rounded once to the float32 tables; the torch rotation rounds the
table values to the tensors' dtype and computes in it, as the layers did before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from ..rotary import RotaryTables

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
        self._tables: Dict[torch.device, CosSinTables] = {}  # cos/sin tables per device

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
        return _rotate(x, cos, sin, self.interleaved, 0)

    def tables(self, length: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` ``[P, dim // 2]`` of positions ``0 .. P-1``, ``P >= length``, in float64
        (float32 on MPS, which has no float64), so that a rotation in torch rounds them once, to its
        own dtype; fused kernels take them in float32 (:meth:`RotarySpec.kernel_tables`). Kept per
        device and grown by doubling: a decode loop computes them a few times, not per step."""
        held = self._held(length, device)
        return held.cos, held.sin

    def _held(self, length: int, device: torch.device) -> CosSinTables:
        held = self._tables.get(device)
        if held is None or held.cos.shape[0] < length:
            rows = max(64, 1 << max(0, length - 1).bit_length())
            wide = torch.float32 if device.type == "mps" else torch.float64
            held = self._tables[device] = CosSinTables(*self.cos_sin(torch.arange(rows, device=device), wide))
        return held

    def spec(self, q_positions: torch.Tensor, k_positions: Optional[torch.Tensor], batch: int,
             offset: int = 0, *, largest: Optional[int] = None) -> RotarySpec:
        """The :class:`RotarySpec` rotating q at ``q_positions`` and k at ``k_positions`` (``[L]``
        or ``[B, L]`` integers; None: k is not rotated) over channels ``[offset, offset + dim)``.
        ``largest``: the largest position, where the caller made them (``0 <= p <= largest``); else
        they are checked here, which reads two numbers back from their device (a sync on CUDA).
        Either way the spec says its positions are in range (``in_range``): no kernel checks them again."""
        q_pos = q_positions.expand(batch, -1) if q_positions.dim() == 1 else q_positions
        k_pos = None if k_positions is None else (
            k_positions.expand(batch, -1) if k_positions.dim() == 1 else k_positions)
        if largest is None:
            used = [p for p in (q_pos, k_pos) if p is not None and p.numel()]
            if any(int(p.min()) < 0 for p in used):
                raise ValueError("RoPE positions must be >= 0")
            largest = max((int(p.max()) for p in used), default=0)
        held = self._held(largest + 1, q_pos.device)
        return RotarySpec(held.cos, held.sin, q_pos, k_pos, self.interleaved, offset, in_range=True, source=held)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, interleaved={self.interleaved}"


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, offset: int) -> torch.Tensor:
    """``x [B, H, L, D]`` rotated over channels ``[offset, offset + 2 R/2)`` by ``cos``/``sin``
    ``[L, R/2]`` or ``[B, L, R/2]`` (in x's dtype); the other channels unchanged."""
    if cos.dim() == 3:  # [B, L, R/2] -> broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    end = offset + 2 * cos.shape[-1]
    part = x[..., offset:end]
    if interleaved:
        x1, x2 = part[..., 0::2], part[..., 1::2]
        turned = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = part.chunk(2, dim=-1)
        turned = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    if offset == 0 and end == x.shape[-1]:
        return turned
    return torch.cat((x[..., :offset], turned, x[..., end:]), dim=-1)


@dataclass(eq=False)
class CosSinTables:
    """One device's RoPE tables ``cos``/``sin`` ``[P, R/2]`` (:meth:`RotaryEmbedding.tables`) and
    their copies on other devices or in other dtypes, each made once: the float32 tables that fused
    kernels take would otherwise be converted from the float64 ones on every call."""

    cos: torch.Tensor
    sin: torch.Tensor
    copies: Dict[Tuple[torch.device, torch.dtype], Tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False)

    def to(self, device: torch.device, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` contiguous on ``device`` in ``dtype``, made on the first call."""
        key = (torch.device(device), dtype)
        held = self.copies.get(key)
        if held is None:
            held = self.copies[key] = tuple(t.to(key[0], dtype).contiguous() for t in (self.cos, self.sin))
        return held


@dataclass
class RotarySpec:
    """RoPE handed to :func:`aule_kp.nn.attend.attend` with unrotated q and k (flash-attn's
    ``apply_rotary`` semantics over channels ``[offset, offset + R)``, the rest unrotated).

    ``cos``/``sin``: ``[P, R/2]`` of float64 angles, float64 (float32 on MPS; fused kernels take
    them in float32); ``q_positions [B, Lq]`` and
    ``k_positions [B, Lk]`` index their rows (``k_positions`` None: k is not rotated, e.g. keys
    read from a cache that holds them rotated); ``interleaved``: pairs (2i, 2i+1), else (i, i+R/2).

    ``in_range``: the positions are known to index rows of the tables (:meth:`RotaryEmbedding.spec`
    made or checked them), so a fused kernel does not read their range back from the device; False
    (the default, e.g. a spec made or changed by hand): they are checked where a kernel indexes the
    tables. ``source``: the embedding's tables that ``cos``/``sin`` are, which keep their float32
    copies (:meth:`kernel_tables`); None: the copies are made per call.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    q_positions: torch.Tensor
    k_positions: Optional[torch.Tensor]
    interleaved: bool
    offset: int = 0
    in_range: bool = False
    source: Optional[CosSinTables] = field(default=None, repr=False, compare=False)

    def kernel_tables(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` float32 contiguous on ``device``, as fused kernels take them: made once per
        tables where ``cos``/``sin`` are their ``source``'s, else now."""
        source = self.source
        if source is None or source.cos is not self.cos or source.sin is not self.sin:
            source = CosSinTables(self.cos, self.sin)
        return source.to(device, torch.float32)

    def apply(self, q: torch.Tensor, k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(q, k)`` rotated in torch (k as it is when ``k_positions`` is None)."""

        def turn(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            at = positions.to(self.cos.device)
            cos, sin = (t[at].to(x.device, x.dtype) for t in (self.cos, self.sin))
            return _rotate(x, cos, sin, self.interleaved, self.offset)

        return turn(q, self.q_positions), (k if self.k_positions is None else turn(k, self.k_positions))

    def tables(self) -> RotaryTables:
        """The same rotation as host arrays (what a fused backend takes; cos/sin are the float32
        copies kept with the tables, shared between calls: read, never written)."""

        def host(t: Optional[torch.Tensor]) -> Any:
            return None if t is None else t.detach().cpu().numpy()

        cos, sin = self.kernel_tables(torch.device("cpu"))
        return RotaryTables(host(cos), host(sin), host(self.q_positions), host(self.k_positions),
                            bool(self.interleaved), int(self.offset))


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
