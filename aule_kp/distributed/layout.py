"""How a sequence lies over the ranks, and which (query rows, key rows) of a rank's chunk meet in each
ring step.

``contiguous``: rank ``r`` of ``W`` holds positions ``[r·n, (r+1)·n)`` of a sequence of ``W·n``.
``zigzag``: the sequence is cut into ``2W`` equal chunks and rank ``r`` holds chunks ``r`` and
``2W-1-r``, concatenated. Under a causal mask contiguous chunks leave the last rank with ``W`` blocks
of work and the first with one; zigzag gives every rank the same work at every ring step (a full
causal block at step 0, then one half-size block per step): the load-balanced layout of the Llama 3
report's context parallelism and the zigzag of ring-flash-attention.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Optional

import torch

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: Any) -> None:
    """ValueError naming ``layout`` unless it is one of ``LAYOUTS``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


@dataclass(frozen=True)
class Block:
    """The part of a ring step's work that any query sees: query rows ``rows`` of this rank's chunk
    against key rows ``cols`` of the visiting chunk; ``causal``: the block is a diagonal one, where
    local query ``i`` sees local key ``j <= i``."""

    rows: slice
    cols: slice
    causal: bool


def block(rank: int, source: int, len_q: int, len_k: int, causal: bool, layout: str) -> Optional[Block]:
    """The block of queries held by ``rank`` and keys held by ``source``, or None when no query sees
    any of those keys (then the ring step computes nothing)."""
    whole = slice(0, None)
    if not causal:
        return Block(whole, whole, False)
    if source == rank:
        return Block(whole, whole, True)
    if layout == "contiguous":
        return Block(whole, whole, False) if source < rank else None
    # zigzag, chunks (rank, 2W-1-rank) against (source, 2W-1-source): an earlier source's first chunk
    # is seen whole by both query chunks and its second by neither; a later source's two chunks are
    # both seen whole by the second query chunk alone.
    if source < rank:
        return Block(whole, slice(0, len_k // 2), False)
    return Block(slice(len_q // 2, None), whole, False)


def shard(x: torch.Tensor, rank: int, world: int, layout: str = "contiguous", dim: int = 2) -> torch.Tensor:
    """The part of the whole sequence ``x`` (along ``dim``, default the L of ``[B, H, L, D]``) that
    rank ``rank`` of ``world`` holds under ``layout``: what each rank passes to the attention
    functions. The length must divide evenly (by ``world``; by ``2·world`` for zigzag)."""
    check_layout(layout)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    for name, value in (("world", world), ("rank", rank)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise TypeError(f"{name} must be an integer, got {value!r}")
    if world < 1:
        raise ValueError(f"world must be an integer >= 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    _check_dim(x, dim, "x")
    parts = world if layout == "contiguous" else 2 * world
    if x.shape[dim] % parts:
        raise ValueError(f"x: length {x.shape[dim]} along dim {dim} must be a multiple of {parts} "
                         f"({layout} layout over {world} ranks)")
    chunks = x.chunk(parts, dim)
    if layout == "contiguous":
        return chunks[rank]
    return torch.cat([chunks[rank], chunks[parts - 1 - rank]], dim)


def unshard(parts: list[torch.Tensor], layout: str = "contiguous", dim: int = 2) -> torch.Tensor:
    """The whole sequence from every rank's part (``parts[r]``: rank ``r``'s), inverse of :func:`shard`:
    parts of one length along ``dim`` (even for zigzag, two chunks each), else a ValueError naming them."""
    check_layout(layout)
    if not isinstance(parts, (list, tuple)) or not parts:
        raise ValueError(f"parts: expected a non-empty list of every rank's part, got {parts!r}")
    if not all(isinstance(p, torch.Tensor) for p in parts):
        raise TypeError(f"parts must be torch.Tensors, got {', '.join(type(p).__name__ for p in parts)}")
    _check_dim(parts[0], dim, "parts")
    lengths = [p.shape[dim] if p.dim() == parts[0].dim() else None for p in parts]
    if len(set(lengths)) != 1:
        raise ValueError(f"parts: every rank's part must have the same length along dim {dim} (shard cuts equal "
                         f"parts), got {lengths}")
    if layout == "zigzag" and lengths[0] % 2:
        raise ValueError(f"parts: zigzag parts hold two equal chunks, so their length along dim {dim} must be even, "
                         f"got {lengths[0]}")
    if layout == "contiguous":
        return torch.cat(parts, dim)
    halves = [p.chunk(2, dim) for p in parts]
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim)


def _check_dim(x: torch.Tensor, dim: int, name: str) -> None:
    """ValueError naming ``dim`` (and ``name``'s shape) unless it indexes a dim of ``x``."""
    if not isinstance(dim, numbers.Integral) or isinstance(dim, bool) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim {dim} is out of range for {name} of shape {tuple(x.shape)}")


def natural_order(len_local: int, world: int, layout: str, device: torch.device) -> Optional[torch.Tensor]:
    """For the concatenation of every rank's part in rank order, the index of each position of the
    whole sequence (None for contiguous, where the concatenation is the sequence)."""
    if layout == "contiguous":
        return None
    half = len_local // 2
    chunk_at = [0] * (2 * world)  # chunk c of the sequence -> its offset in the concatenation
    for r in range(world):
        chunk_at[r] = r * len_local
        chunk_at[2 * world - 1 - r] = r * len_local + half
    return torch.cat([torch.arange(off, off + half, device=device) for off in chunk_at])
