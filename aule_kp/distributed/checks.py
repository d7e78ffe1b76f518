"""The checks every sequence-parallel call makes before it communicates: rank-local arguments first
(errors name the argument), then one ``all_gather`` that the ranks agree (errors name the rank)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..call import check_call
from ..inputs import is_torch
from .comm import Group
from .layout import check_layout


@dataclass(frozen=True)
class Call:
    """A checked call: its group, options and the local sizes (``dims`` as ``check_call`` gives them:
    ``(B, Hq, Hkv, Lq, Lk, Dk, Dv)``)."""

    group: Group
    causal: bool
    scale: float
    backend: str
    layout: str
    dims: tuple


def check(op: str, q: Any, k: Any, v: Any, causal: Any, scale: Optional[float], group: Any, backend: Any,
          layout: Any) -> Call:
    """Validates one call of ``op`` on this rank, then checks that every rank of ``group`` made the
    same call (shapes, dtype, causal, layout, scale). Raises before any attention work."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not is_torch(x):
            raise TypeError(f"{name} must be a torch.Tensor (torch.distributed moves the chunks), "
                            f"got {type(x).__name__}")
    dtype, dims, scale = check_call(q, k, v, causal, scale, None, backend)
    check_layout(layout)
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    b, hq, hkv, lq, lk, dk, dv = dims
    if layout == "zigzag" and (lq % 2 or lk % 2):
        raise ValueError(f"q, k: the zigzag layout holds two equal chunks per rank, so the local lengths must be "
                         f"even, got Lq={lq}, Lk={lk}")
    if causal and lq != lk:
        raise ValueError(f"q, k: causal attention over a split sequence needs each rank's query and key chunks "
                         f"to cover the same positions (equal lengths), got Lq={lq}, Lk={lk}")
    g = Group(group, op)
    fields = (("batch", b), ("query heads", hq), ("kv heads", hkv), ("query length", lq), ("key length", lk),
              ("head dim", dk), ("value head dim", dv), ("dtype", dtype), ("causal", bool(causal)),
              ("layout", layout), ("scale", float(scale)))
    g.check_agree(fields, q.device)
    return Call(g, bool(causal), float(scale), backend, layout, dims)
