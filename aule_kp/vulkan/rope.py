"""The forward plan's rotary pass (glsl/rope.comp): q and k rotated on the device from their input
buffers into the buffers the attention reads, dispatched in the forward's recorded sequence before
it (see ``plan.Plan.record``).

The plan holds one host-written buffer of float32 cos/sin rows gathered at the call's positions
(q rows' cos, q rows' sin, then k rows' cos and sin when k is rotated), ``rotary_bytes(p)`` bytes:
sized by the Problem alone, so reusable plans are bound to it like the other buffers.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Tuple

import numpy as np

from ..problem import Problem
from ..rotary import RotaryTables, rotate_stored
from .configs import DTYPE_CODE, MAX_GRID

KERNEL = "rope"
WORKGROUP = 64


def layout_reasons(dim_k: int, layout: Any) -> List[str]:
    """Why glsl/rope.comp cannot rotate rows of head dim ``dim_k`` with ``layout`` (a RotaryLayout or
    a RowRotation: ``half``, ``offset``, ``interleaved``; empty: it can). Each invocation writes one
    whole pair of channels: the head dim, the offset and (half layout) R/2 even."""
    why = []
    if dim_k % 2:
        why.append(f"the fused rotary needs an even head dim, got {dim_k}")
    if layout.offset % 2:
        why.append(f"the fused rotary needs an even first rotated channel, got {layout.offset}")
    if not layout.interleaved and layout.half % 2:
        why.append(f"the fused rotary's half layout needs R/2 even, got {layout.half}")
    return why


def _offsets(p: Problem) -> Tuple[int, int, int, int]:
    """Float offsets of q's cos, q's sin, k's cos, k's sin in the plan's rotary buffer."""
    rq, rk = p.batch * p.len_q * p.rotary.half, p.batch * p.len_k * p.rotary.half
    return 0, rq, 2 * rq, 2 * rq + rk


def rotary_bytes(p: Problem) -> int:
    """Bytes of the rotary buffer's data for ``p`` (0 without rotary)."""
    if p.rotary is None:
        return 0
    rows = p.batch * (p.len_q + (p.len_k if p.rotary.rotate_k else 0))
    return 4 * 2 * rows * p.rotary.half


def write_payload(view: np.ndarray, p: Problem, tables: RotaryTables) -> None:
    """The gathered cos/sin rows of ``tables`` into the rotary buffer's mapped float32 ``view``."""
    layout = tables.layout
    if layout != p.rotary:
        raise ValueError(f"rotary tables of layout {layout} given to a plan for {p.rotary}")
    oq_cos, oq_sin, ok_cos, ok_sin = _offsets(p)
    qpos = tables.q_positions.reshape(-1)
    n = qpos.size * layout.half
    view[oq_cos:oq_cos + n].reshape(-1, layout.half)[:] = tables.cos[qpos]
    view[oq_sin:oq_sin + n].reshape(-1, layout.half)[:] = tables.sin[qpos]
    if layout.rotate_k:
        kpos = tables.k_positions.reshape(-1)
        n = kpos.size * layout.half
        view[ok_cos:ok_cos + n].reshape(-1, layout.half)[:] = tables.cos[kpos]
        view[ok_sin:ok_sin + n].reshape(-1, layout.half)[:] = tables.sin[kpos]


def _grid(rows: int, dim: int) -> Tuple[int, int, int]:
    """Workgroups over ``rows`` rows of ``dim / 2`` channel pairs (x first, spilling into y past
    ``MAX_GRID``)."""
    groups = max(1, math.ceil(rows * (dim // 2) / WORKGROUP))
    x = min(groups, MAX_GRID)
    return x, math.ceil(groups / x), 1


def dispatch(p: Problem, g0: int, n_groups: int) -> Tuple[Tuple[int, int, int], np.ndarray]:
    """``(grid, push constants)`` of the rotary pass over groups ``[g0, g0 + n_groups)``."""
    r = p.rotary
    q_rows = n_groups * p.group * p.len_q
    k_rows = n_groups * p.len_k if r.rotate_k else 0  # unrotated k: the attention reads k itself
    push = np.array([q_rows, k_rows, p.len_q, p.len_k, p.heads_q, p.heads_kv, g0 * p.group, g0, p.dim_k, r.half,
                     r.offset, int(r.interleaved), *_offsets(p), int(r.rotate_k)], np.uint32)
    return _grid(q_rows + k_rows, p.dim_k), push


def token_dispatch(tokens: int, heads: int, dim: int, half: int, interleaved: bool,
                   offset: int) -> Tuple[Tuple[int, int, int], np.ndarray]:
    """``(grid, push constants)`` rotating packed query rows ``[tokens, heads, dim]`` into the pass's
    output buffer (no k),
    token t with cos/sin row t (cos rows, then sin rows, from float 0): each token is its own
    "sequence" of one row, which is what glsl/rope.comp's indexing gives with len_q = 1."""
    push = np.array([tokens * heads, 0, 1, 1, heads, 1, 0, 0, dim, half, offset, int(interleaved), 0,
                     tokens * half, 0, 0, 0], np.uint32)
    return _grid(tokens * heads, dim), push


def spec(dtype: str) -> np.ndarray:
    """glsl/rope.comp's spec constants (DTYPE, TEST_CORRUPT) for ``dtype`` storage."""
    return np.array([DTYPE_CODE[dtype], 0], np.uint32)


def host_rotated(p: Problem, q: np.ndarray, k: np.ndarray,
                   tables: RotaryTables) -> Tuple[np.ndarray, np.ndarray]:
    """Host copies of what the rotary pass leaves in the buffers (fp32 rotation, one rounding to the
    storage type): for the non-finite repairs (``aule_kp.nonfinite.enforce``), which read q and k."""

    def rotate(x: np.ndarray, positions: Optional[np.ndarray]) -> np.ndarray:
        if positions is None:
            return x
        return rotate_stored(x, p.dtype, tables.cos, tables.sin, positions, tables.interleaved, tables.offset)

    return rotate(q, tables.q_positions), rotate(k, tables.k_positions)
