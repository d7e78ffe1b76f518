"""The Problem: everything a backend needs to know about one attention call, and nothing else.

Shapes (as ``flash_attention`` takes them): q ``[B, Hq, Lq, Dk]``, k ``[B, Hkv, Lk, Dk]``, v ``[B, Hkv, Lk, Dv]``.
Causal masking and sliding windows are folded into one *visibility band*: query ``i`` sees key
``j`` when ``i + diag - left <= j <= i + diag + right`` (``left``/``right`` of ``None`` mean
unbounded). ``diag = Lk - Lq`` is flash-attn's bottom-right alignment, ``diag = 0`` torch's top-left.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

import numpy as np

from .rotary import RotaryLayout

#: Names of the element types the engine computes on (float64 only in references).
DTYPES = ("float32", "float16", "bfloat16")
MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class Problem:
    """Shapes, dtype and masking of one attention call (hashable: plans are keyed by it)."""

    batch: int
    heads_q: int
    heads_kv: int
    len_q: int
    len_k: int
    dim_k: int
    dim_v: int
    dtype: str  # one of DTYPES
    scale: float
    diag: int = 0  # query i's diagonal is key i + diag
    left: Optional[int] = None  # keys visible left of the diagonal; None = unbounded
    right: Optional[int] = None  # keys visible right of the diagonal; None = unbounded
    mask_shape: Optional[Tuple[int, int, int, int]] = None  # broadcastable to [B, Hq, Lq, Lk]
    # Where the inputs live: a torch device type ("cuda", "cpu", ...), None for NumPy arrays. Lets
    # backends such as Triton say whether they can take the tensors; not part of equality or hash,
    # since it does not change the math (plans keyed by Problem are shared).
    device: Optional[str] = field(default=None, compare=False)
    # Score modifiers (aule_kp.scoremods): the score of a key the band lets through is
    # ``cap(scale q.k) + alibi + mask`` with ``cap(s) = softcap * tanh(s / softcap)`` (0.0: off) and
    # ``alibi = -slope * |j - (i + diag)|``; ``alibi_rows`` slopes of ``heads_q`` each (0: no ALiBi, 1:
    # one per head for every batch, ``batch``: per batch and head); ``sinks``: one logit per query
    # head joins each row's softmax denominator. The slopes' and sinks' values are data, passed
    # beside the inputs.
    softcap: float = 0.0
    alibi_rows: int = 0
    sinks: bool = False
    # "fp": exact attention; "int8": SageAttention's INT8 Q·Kᵀ (aule_kp.quant), a different result.
    precision: str = "fp"
    # q and k arrive unrotated and the backend rotates them in its own sequence (``Backend.bind_rotary``).
    rotary: Optional[RotaryLayout] = None

    @property
    def group(self) -> int:
        """Query heads per key/value head (GQA/MQA)."""
        return self.heads_q // self.heads_kv

    @property
    def banded(self) -> bool:
        return self.left is not None or self.right is not None

    @property
    def has_mask(self) -> bool:
        return self.mask_shape is not None

    @property
    def has_score_mods(self) -> bool:
        """Whether the scores are soft-capped or ALiBi-biased (kernels compile that code in)."""
        return self.softcap != 0.0 or self.alibi_rows != 0

    @property
    def empty(self) -> bool:
        return 0 in (self.batch, self.heads_q, self.len_q, self.dim_v)

    def key_range(self, row_lo: int, row_hi: int) -> Tuple[int, int]:
        """Keys ``[lo, hi)`` that any query row in ``[row_lo, row_hi)`` may see (tile skipping)."""
        lo = 0 if self.left is None else max(0, row_lo + self.diag - self.left)
        hi = self.len_k if self.right is None else min(self.len_k, row_hi - 1 + self.diag + self.right + 1)
        return lo, max(lo, hi)

    def visible(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Boolean ``[len(rows), len(cols)]``: which (query, key) pairs the band lets through."""
        rel = cols[None, :] - (rows[:, None] + self.diag)
        ok = np.ones(rel.shape, dtype=bool)
        if self.left is not None:
            ok &= rel >= -self.left
        if self.right is not None:
            ok &= rel <= self.right
        return ok

    def flops(self) -> float:
        """Multiply-adds x2 of the two matmuls over the visible (query, key) pairs (dense count
        ``2*B*Hq*Lq*Lk*(Dk+Dv)``, scaled by the visible fraction for causal/windowed problems)."""
        dense = 2.0 * self.batch * self.heads_q * self.len_q * self.len_k * (self.dim_k + self.dim_v)
        return dense * self.visible_fraction()

    def visible_fraction(self) -> float:
        if not self.banded or self.len_q == 0 or self.len_k == 0:
            return 1.0
        rows = np.arange(self.len_q)
        lo = np.zeros_like(rows) if self.left is None else np.clip(rows + self.diag - self.left, 0, None)
        hi = np.full_like(rows, self.len_k - 1) if self.right is None else rows + self.diag + self.right
        hi = np.minimum(hi, self.len_k - 1)
        return float(np.clip(hi - lo + 1, 0, None).sum()) / (self.len_q * self.len_k)

    def bytes_io(self, itemsize: int) -> int:
        """Bytes of q, k, v and o at ``itemsize`` bytes per element."""
        b, hq, hk = self.batch, self.heads_q, self.heads_kv
        return itemsize * (
            b * hq * self.len_q * (self.dim_k + self.dim_v) + b * hk * self.len_k * (self.dim_k + self.dim_v)
        )


def default_scale(dim_k: int) -> float:
    return 1.0 / math.sqrt(dim_k) if dim_k else 1.0


def band(
    len_q: int,
    len_k: int,
    *,
    causal: bool,
    window: Optional[Tuple[int, int]],
    top_left: bool,
) -> Tuple[int, Optional[int], Optional[int]]:
    """Fold ``causal`` and ``window=(left, right)`` (-1 = unbounded) into ``(diag, left, right)``."""
    diag = 0 if top_left else len_k - len_q
    left = right = None
    if window is not None:
        wl, wr = window
        left = None if wl < 0 else int(wl)
        right = None if wr < 0 else int(wr)
    if causal:
        right = 0 if right is None else min(right, 0)
    return diag, left, right
