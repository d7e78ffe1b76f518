"""The forward's kernel choice and the device limits it must respect: one decision for every
Vulkan entry point (``VulkanBackend`` for host arrays, ``Context.attention`` for GpuTensors), so
that no problem is dispatched past a limit (storage binding range, grid size, CPU drivers' loop
limit). Each limit that a problem passes comes back as a reason naming it.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from ..problem import Problem
from .kernels import CPU_LOOP_LIMIT, KernelConfig
from .plan import MAX_GRID_Y, binding_limit, group_bytes, groups_per_chunk, query_tiles_reason
from .probe import DeviceCaps
from .splitkv import ForwardConfig, SplitKVConfig, choose_forward

Choice = Tuple[Optional[ForwardConfig], Tuple[str, ...]]


def forward_choice(caps: DeviceCaps, problem: Problem, variant: Optional[str] = None, *,
                   whole: bool = False) -> Choice:
    """``(config, ())`` with the forward pipelines for ``problem`` on a device with ``caps``, or
    ``(None, reasons)`` listing every limit it passes.

    ``whole``: one dispatch binds all (batch, kv-head) groups, as on the GpuTensor path, whose
    tensors are the caller's and cannot be cut into chunks. Otherwise the groups are split into
    chunks of whole groups that each fit one storage binding (the host-array path).
    """
    p = problem
    reasons: List[str] = []
    cfg: Optional[ForwardConfig] = None
    limit = binding_limit(caps.max_storage_buffer_range)
    n_groups = p.batch * p.heads_kv
    try:
        cfg = choose_forward(caps, p, variant, n_groups if whole else groups_per_chunk(p, limit))
    except ValueError as exc:
        reasons.append(str(exc))
    if cfg is not None and caps.type == "cpu":
        loops = cfg.loops() if isinstance(cfg, SplitKVConfig) else -(-p.len_k // cfg.bc)
        if loops > CPU_LOOP_LIMIT:
            reasons.append(f"{loops} loop iterations per invocation; CPU drivers (lavapipe) stop loops at "
                           f"{CPU_LOOP_LIMIT}")
    if isinstance(cfg, KernelConfig):
        too_tall = query_tiles_reason(p, cfg.br, caps.max_workgroup_count[1])
        reasons += [too_tall] if too_tall else []
    fit = groups_per_chunk(p, limit, cfg)
    if fit < 1:
        reasons.append(f"one (batch, kv-head) slice is over the {limit} B storage binding limit")
    elif whole:
        if p.group * n_groups > MAX_GRID_Y:
            reasons.append(f"{p.group * n_groups} query heads x batch in one dispatch: over the {MAX_GRID_Y} "
                           "workgroups a grid dimension is guaranteed to take (GpuTensors are not split)")
        sizes = dict(group_bytes(p), **(cfg.group_bytes(p) if isinstance(cfg, SplitKVConfig) else {}))
        reasons += [f"its {name} buffer needs {size * n_groups} B in one binding: over the {limit} B storage "
                    "binding limit (GpuTensors are not split)" for name, size in sizes.items()
                    if size * n_groups > limit]
    if p.mask_shape is not None and 4 * int(np.prod(p.mask_shape)) > limit:
        reasons.append(f"the mask is over the {limit} B storage binding limit")
    return (None if reasons else cfg), tuple(reasons)
