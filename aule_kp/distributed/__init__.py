"""Sequence parallelism over ``torch.distributed``: attention over a sequence split across ranks.

:func:`ring_attention` passes K/V chunks round a ring of point-to-point transfers, overlapped with
the local blocks; :func:`ulysses_attention` re-splits sequence chunks into head groups with two
all-to-alls. Both are differentiable, take GQA, a causal mask and a contiguous or zigzag layout
(:func:`shard` / :func:`unshard` cut and rejoin a sequence), and run the local work through the
normal backend dispatch. gloo carries CPU tensors (what the Vulkan and CPU backends take), NCCL
CUDA tensors.
"""

from __future__ import annotations

from .comm import PeerFailure
from .layout import LAYOUTS, shard, unshard
from .ring import ring_attention
from .ulysses import ulysses_attention

__all__ = ["LAYOUTS", "PeerFailure", "ring_attention", "shard", "ulysses_attention", "unshard"]
