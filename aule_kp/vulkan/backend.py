"""The Vulkan backend: FA2 kernels through kp on the selected device."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from .. import knobs
from ..backend import Backend, Runner
from ..problem import Problem
from ..rotary import RotaryLayout
from . import device as devmod
from . import int8, rope, tuning_cache
from .backward import BackwardPlan, backward_plan, reduce_to_mask
from .choice import BackwardChoice, Choice, backward_limits, choose_backward, choose_forward
from .configs import BackwardConfig, ForwardConfig
from .int8 import Int8Config
from .plan import Plan, forward_plan, run_forward

#: A forward pass's pipelines: fp (a forward kernel or split-KV) or precision="int8".
AnyForward = Union[ForwardConfig, Int8Config]


class VulkanBackend(Backend):
    """FA2 on a Vulkan device. ``variant`` pins a forward kernel variant (else the device's best),
    ``num_splits`` the split-KV count (0: never split) and ``coopmat_convert`` lets fp32/bf16 data
    run the fp16 cooperative-matrix kernels; each overrides its ``AULE_KP_*`` knob."""

    name = "vulkan"

    def __init__(self, variant: Optional[str] = None, *, num_splits: Optional[int] = None,
                 coopmat_convert: Optional[bool] = None):
        self.variant = variant
        self.num_splits = num_splits
        self.coopmat_convert = coopmat_convert
        self._choices: Dict[Any, Choice] = {}

    def knobs(self) -> knobs.Snapshot:
        """The knobs this backend chooses with: the environment's, with its keyword arguments set."""
        return knobs.current().override(force_variant=self.variant, split_kv=self.num_splits,
                                        coopmat_convert=self.coopmat_convert)

    def unavailable_reasons(self) -> List[str]:
        why = devmod.unavailable()
        return [why] if why else []

    def config(self, problem: Problem) -> AnyForward:
        """The kernel specialisation for ``problem``: a forward KernelConfig, or a SplitKVConfig for
        short query blocks over long keys, or for precision="int8" an Int8Config (ValueError when
        no variant can take it)."""
        cfg, reasons = self._choice(problem)
        if cfg is None:
            raise ValueError("; ".join(reasons))
        return cfg

    def _choice(self, problem: Problem, dev: Optional[devmod.Device] = None) -> Choice:
        # Memoised: every call asks (bind). The choice depends on the problem, the knobs
        # (the device index among them) and the tuning cache and verdict files, whose generation
        # changes when one is written. ``dev``: the selected device where the caller has it.
        snap = self.knobs()
        key = (problem, snap, tuning_cache.generation(), tuning_cache.bypassed())
        hit = self._choices.get(key)
        if hit is None:
            caps = (dev or devmod.get_device()).caps
            choose = int8.choose if problem.precision == "int8" else choose_forward
            hit = self._choices[key] = choose(caps, problem, snap)
            if len(self._choices) > 4096:
                self._choices.clear()
        return hit

    def problem_reasons(self, problem: Problem) -> List[str]:
        return self.bind(problem)[1]

    def bind(self, problem: Problem) -> Tuple[Optional[Runner], List[str]]:
        """The device's availability, the kernel choice and the device in one pass: the runner is
        ``plan.run_forward`` bound to the device, ``problem`` and its config (see ``Backend.bind``)."""
        dev, why = devmod.usable_device()
        if dev is None:
            return None, [why]
        cfg, reasons = self._choice(problem, dev)
        if cfg is None:
            return None, list(reasons)
        run = int8.run_forward if problem.precision == "int8" else run_forward
        return functools.partial(run, dev, problem, cfg), []

    def bind_rotary(self, problem: Problem, layout: RotaryLayout) -> Optional[Runner]:
        """``bind``'s runner for ``problem`` with q and k rotated by glsl/rope.comp in the forward's
        own sequence (``rotary=`` tables per call); None where that kernel cannot (``rope.layout_reasons``)
        or the precision is int8 (its plan has no rotary pass)."""
        if rope.layout_reasons(problem.dim_k, layout) or problem.precision != "fp":
            return None
        dev, _ = devmod.usable_device()
        if dev is None:
            return None
        cfg, _ = self._choice(problem, dev)
        if cfg is None:
            return None
        return functools.partial(run_forward, dev, dataclasses.replace(problem, rotary=layout), cfg)

    def plan(self, problem: Problem, config: Optional[ForwardConfig] = None) -> Plan:
        """The device's plan for ``problem``, bound to it (see ``plan.forward_plan``): valid until the
        next call binds it to another problem."""
        dev = devmod.get_device()
        cfg = config or self.config(problem)
        with dev.lock:
            return forward_plan(dev, problem, cfg)

    def forward(self, problem: Problem, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                mask: Optional[np.ndarray], config: Optional[AnyForward] = None, *,
                alibi: Optional[np.ndarray] = None,
                sinks: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        run = int8.run_forward if problem.precision == "int8" else run_forward
        return run(devmod.get_device(), problem, config or self.config(problem), q, k, v, mask, alibi=alibi,
                   sinks=sinks)

    def backward_plan(self, problem: Problem, config: BackwardConfig) -> BackwardPlan:
        """The device's backward plan for ``problem``, bound to it (see ``backward.backward_plan``)."""
        dev = devmod.get_device()
        with dev.lock:
            return backward_plan(dev, problem, config)

    def _backward_choice(self, problem: Problem, mask_grad: bool) -> BackwardChoice:
        return choose_backward(devmod.get_device().caps, problem, self.knobs(),
                               write_ds=mask_grad and problem.has_mask)

    def backward_reasons(self, problem: Problem, mask_grad: bool = False) -> List[str]:
        """Why ``backward`` cannot take ``problem`` here (empty: it can), for callers that fall back."""
        why = self.unavailable_reasons()
        if why or problem.empty or problem.len_k == 0:
            return why
        return list(self._backward_choice(problem, mask_grad)[1])

    def backward_config(self, problem: Problem, mask_grad: bool = False) -> BackwardConfig:
        """The backward pipelines for ``problem`` (ValueError when the device cannot take it)."""
        cfg, reasons = self._backward_choice(problem, mask_grad)
        if cfg is None:
            raise ValueError(f"the Vulkan backward cannot run this problem: {'; '.join(reasons)}")
        return cfg

    def backward(self, problem: Problem, q: np.ndarray, k: np.ndarray, v: np.ndarray, out: np.ndarray,
                 dout: np.ndarray, lse: np.ndarray, mask: Optional[np.ndarray], mask_grad: bool = False,
                 config: Optional[BackwardConfig] = None, *, alibi: Optional[np.ndarray] = None,
                 sinks: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """FA2 backward on the device (see ``Backend.backward``); ``config`` pins the pipelines.
        ValueError when the device cannot take the problem (``backward_reasons`` says why)."""
        p = problem
        write_ds = mask_grad and mask is not None
        if p.empty or p.len_k == 0:
            zeros = [np.zeros(s, q.dtype) for s in (q.shape, k.shape, v.shape)]
            return (*zeros, np.zeros(p.mask_shape, np.float32) if write_ds else None)
        dev = devmod.get_device()
        if config is None:
            cfg = self.backward_config(p, write_ds)
        else:
            cfg = config
            why = backward_limits(cfg, dev.caps, p, self.knobs())
            if why:
                raise ValueError(f"the Vulkan backward cannot run this problem: {'; '.join(why)}")
        with dev.lock:
            dq, dk, dv, ds = self.backward_plan(p, cfg).run(q, k, v, out, dout, lse, mask, alibi, sinks)
        return dq, dk, dv, None if ds is None else reduce_to_mask(ds, p.mask_shape)
