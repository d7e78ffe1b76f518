"""The Vulkan backend: FA2 kernels through kp on the selected device."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..backend import Backend
from ..nonfinite import enforce
from ..problem import Problem
from . import device as devmod
from .backward import BackwardPlan, backward_groups_per_chunk, backward_plan, reduce_to_mask
from .choice import forward_choice
from .kernels import COOPMAT_CONVERT_ENV, BackwardConfig, backward_config, backward_config_reasons
from .plan import Plan, binding_limit, forward_plan, query_tiles_reason
from .splitkv import ForwardConfig


class VulkanBackend(Backend):
    """FA2 forward on a Vulkan device. ``variant`` pins a kernel variant (else the device's best)."""

    name = "vulkan"

    def __init__(self, variant: Optional[str] = None):
        self.variant = variant
        self._choices: Dict[Any, Tuple[Optional[ForwardConfig], Tuple[str, ...]]] = {}

    def unavailable_reasons(self) -> List[str]:
        why = devmod.vulkan_unavailable() or devmod.selected_device_error()
        return [why] if why else []

    def config(self, problem: Problem) -> ForwardConfig:
        """The kernel specialisation for ``problem``: a forward KernelConfig, or a SplitKVConfig for
        short query blocks over long keys (ValueError when no variant can take it)."""
        cfg, reasons = self._choice(problem)
        if cfg is None:
            raise ValueError("; ".join(reasons))
        return cfg

    def _choice(self, problem: Problem) -> Tuple[Optional[ForwardConfig], Tuple[str, ...]]:
        # Memoised: the choice depends only on these, and the hot path asks twice per call.
        key = (problem, devmod.selected_index(), os.environ.get("AULE_KP_FORCE_VARIANT"),
               os.environ.get("AULE_KP_MAX_BINDING_BYTES"), os.environ.get(COOPMAT_CONVERT_ENV),
               os.environ.get("AULE_KP_SPLIT_KV"))
        hit = self._choices.get(key)
        if hit is None:
            hit = self._choices[key] = self._decide(problem)
            if len(self._choices) > 4096:
                self._choices.clear()
        return hit

    def _decide(self, problem: Problem) -> Tuple[Optional[ForwardConfig], Tuple[str, ...]]:
        return forward_choice(devmod.get_device().caps, problem, self.variant)

    def problem_reasons(self, problem: Problem) -> List[str]:
        why = self.unavailable_reasons()
        return why if why else list(self._choice(problem)[1])

    def plan(self, problem: Problem, config: Optional[ForwardConfig] = None) -> Plan:
        """The device's plan for ``problem``, bound to it (see ``plan.forward_plan``): valid until the
        next call binds it to another problem."""
        dev = devmod.get_device()
        cfg = config or self.config(problem)
        with dev.lock:
            return forward_plan(dev, problem, cfg)

    def forward(self, problem: Problem, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                mask: Optional[np.ndarray], config: Optional[ForwardConfig] = None) -> Tuple[np.ndarray, np.ndarray]:
        dev = devmod.get_device()
        with dev.lock:
            out, lse = self.plan(problem, config).run(q, k, v, mask)
        enforce(problem, q, k, v, mask, out, lse)  # non-finite inputs (aule_kp.nonfinite)
        return out, lse

    def backward_plan(self, problem: Problem, config: BackwardConfig) -> BackwardPlan:
        """The device's backward plan for ``problem``, bound to it (see ``backward.backward_plan``)."""
        dev = devmod.get_device()
        with dev.lock:
            return backward_plan(dev, problem, config)

    def backward_reasons(self, problem: Problem, mask_grad: bool = False) -> List[str]:
        """Why ``backward`` cannot take ``problem`` here (empty: it can), for callers that fall back."""
        why = self.unavailable_reasons()
        if why or problem.empty or problem.len_k == 0:
            return why
        caps = devmod.get_device().caps
        return self._backward_reasons(problem, backward_config(caps, problem, mask_grad and problem.has_mask))

    def _backward_reasons(self, problem: Problem, cfg: BackwardConfig) -> List[str]:
        caps = devmod.get_device().caps
        reasons = backward_config_reasons(cfg, caps, problem)
        too_tall = query_tiles_reason(problem, cfg.dq.br, caps.max_workgroup_count[1])
        reasons += [too_tall] if too_tall else []
        limit = binding_limit(caps.max_storage_buffer_range)
        if backward_groups_per_chunk(problem, limit, cfg.write_ds) < 1:
            what = "with its mask gradient (dS) " if cfg.write_ds else ""
            reasons.append(f"one (batch, kv-head) slice of the backward {what}is over the {limit} B storage "
                           "binding limit")
        if problem.mask_shape is not None and 4 * int(np.prod(problem.mask_shape)) > limit:
            reasons.append(f"the mask is over the {limit} B storage binding limit")
        return reasons

    def backward(self, problem: Problem, q: np.ndarray, k: np.ndarray, v: np.ndarray, out: np.ndarray,
                 dout: np.ndarray, lse: np.ndarray, mask: Optional[np.ndarray], mask_grad: bool = False,
                 config: Optional[BackwardConfig] = None
                 ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """FA2 backward on the device (see ``Backend.backward``); ``config`` pins the pipelines.
        ValueError when the device cannot take the problem (``backward_reasons`` says why)."""
        p = problem
        write_ds = mask_grad and mask is not None
        if p.empty or p.len_k == 0:
            zeros = [np.zeros(s, q.dtype) for s in (q.shape, k.shape, v.shape)]
            return (*zeros, np.zeros(p.mask_shape, np.float32) if write_ds else None)
        dev = devmod.get_device()
        cfg = config or backward_config(dev.caps, p, write_ds)
        why = self._backward_reasons(p, cfg)
        if why:
            raise ValueError(f"the Vulkan backward cannot run this problem: {'; '.join(why)}")
        with dev.lock:
            dq, dk, dv, ds = self.backward_plan(p, cfg).run(q, k, v, out, dout, lse, mask)
        return dq, dk, dv, None if ds is None else reduce_to_mask(ds, p.mask_shape)
