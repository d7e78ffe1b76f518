"""One validated call: inputs checked and normalised into a Problem, its backend picked, and the
inputs put in that backend's form. Below both the public API (``aule_kp.api``) and the autograd
ops (``aule_kp.torch.ops``), which each run calls through it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np

from . import dispatch, inputs, scoremods
from .backend import Backend, Runner, check_backend_name
from .dtypes import ITEMSIZE, STORAGE
from .errors import BackendUnavailable
from .problem import Problem, band
from .quant import check_precision
from .rotary import RotaryTables, check_tables


@dataclass
class Prepared:
    """A validated call: its Problem, the backend that runs it, and inputs in that backend's form.

    ``q``/``k``/``v`` are host arrays in engine storage, or contiguous torch tensors where they live
    for a ``native_torch`` backend; ``mask`` is the float32 additive mask (same form) or None.
    ``backend`` is None when the result is empty or trivially zero (no query, no key); ``run`` is its
    forward pass bound to ``problem`` (``Backend.bind``), None with it. ``alibi``: float32 slopes
    ``[problem.alibi_rows, Hq]`` (host, or a torch tensor beside q for a ``native_torch`` backend) or
    None; ``sinks``: float32 ``[Hq]`` sink logits in the same form (where ``problem.sinks``) or None.
    """

    problem: Problem
    backend: Optional[Backend]
    q: Any
    k: Any
    v: Any
    mask: Any
    like: Any  # the caller's q: the result takes its type, dtype and device
    run: Optional[Runner] = None
    alibi: Any = None
    sinks: Any = None
    rotary: Optional[RotaryTables] = None  # q and k are rotated by ``run`` (``Backend.bind_rotary``)

    def forward(self) -> Tuple[Any, Any]:
        """``(out, lse)``: out in the type/dtype/device of the caller's q; lse float32 [B, Hq, Lq]
        (sinks included)."""
        p = self.problem
        if self.backend is None:
            out = np.zeros((p.batch, p.heads_q, p.len_q, p.dim_v), dtype=STORAGE[p.dtype])
            lse = np.full((p.batch, p.heads_q, p.len_q), -np.inf, np.float32)
            if self.sinks is not None:
                lse = scoremods.sink_lse(lse, self.sinks)  # host sinks: no backend was bound
            return inputs.from_host(out, self.like, p.dtype), lse
        options = {name: x for name, x in (("alibi", self.alibi), ("sinks", self.sinks), ("rotary", self.rotary))
                   if x is not None}
        out, lse = self.run(self.q, self.k, self.v, self.mask, **options)
        return (out if self.backend.native_torch else inputs.from_host(out, self.like, p.dtype)), lse


def check_options(causal: Any, backend: Any) -> None:
    """ValueError/TypeError naming ``backend`` or ``causal`` when either is not one the API takes."""
    check_backend_name(backend)
    inputs.check_causal(causal)


def check_call(q: Any, k: Any, v: Any, causal: Any, scale: Optional[float], window: Any,
               backend: Any) -> Tuple[str, Tuple[int, ...], float]:
    """The checks of every ``flash_attention`` entry, in the order their errors are raised:
    ``(dtype, (B, Hq, Hkv, Lq, Lk, Dk, Dv), scale to use)``."""
    check_options(causal, backend)
    dtype = inputs.check_types(q, k, v)
    dims = inputs.check_shapes(q, k, v)
    return dtype, dims, inputs.check_scale_window(scale, window, dims[5])


def prepare(
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    window: Optional[Tuple[int, int]] = None,
    attn_mask: Any = None,
    backend: str = "auto",
    top_left: bool = False,
    broadcasts_in_place: bool = True,
    precision: Any = "fp",
    softcap: float = 0.0,
    alibi_slopes: Any = None,
    sinks: Any = None,
    rotary: Optional[RotaryTables] = None,
) -> Optional[Prepared]:
    """Validates and normalises one call (errors name the argument), and picks its backend.

    ``softcap``, ``alibi_slopes`` and ``sinks`` are the score modifiers of :mod:`aule_kp.scoremods`.

    With ``broadcasts_in_place``, k/v broadcast over heads (stride 0) become one kv head and a mask's
    broadcast axes size 1, neither copied; a backward pass that must return gradients in the
    caller's shapes turns it off. Sizes are checked before anything is copied. ``precision``: "fp"
    (or None) or "int8" (``aule_kp.quant``).

    ``rotary``: q and k come unrotated, to be rotated by the chosen backend's fused kernel
    (``Backend.bind_rotary``); None is returned, before any input is copied, where that backend has
    none (the caller rotates and calls again without it).
    """
    dtype, (b, hq, hkv, lq, lk, dk, dv), scale = check_call(q, k, v, causal, scale, window, backend)
    precision = check_precision(precision)
    if broadcasts_in_place:
        k, v = inputs.shared_kv_head(k, v)
        hkv = int(k.shape[1])
    diag, left, right = band(lq, lk, causal=bool(causal), window=window, top_left=top_left)
    softcap, alibi, sink_logits = scoremods.check(softcap, alibi_slopes, sinks, b, hq)
    if precision != "fp" and (softcap or alibi is not None or sink_logits is not None):
        raise ValueError(f"precision={precision!r} takes no softcap, alibi_slopes or sinks (its kernels compute "
                         "none of them); use precision='fp' for them")
    mask = mask_shape = None
    if attn_mask is not None:
        mask, is_bool = inputs.mask_view(attn_mask, (b, hq, lq, lk), collapse=broadcasts_in_place)
        mask_shape = tuple(int(s) for s in mask.shape)
    device = q.device.type if inputs.is_torch(q) else None
    problem = Problem(b, hq, hkv, lq, lk, dk, dv, dtype, float(scale), diag, left, right, mask_shape, device,
                      softcap=softcap, alibi_rows=0 if alibi is None else alibi.shape[0],
                      sinks=sink_logits is not None, precision=precision)
    out_bytes = b * hq * lq * dv * ITEMSIZE[dtype]
    if problem.empty or lk == 0:
        # Nothing to compute, but a forced backend that cannot run here at all still says so.
        missing = [] if backend == "auto" else dispatch.get(backend).unavailable_reasons()
        if missing:
            raise BackendUnavailable(backend, missing)
        inputs.check_memory([("the output", 0 if device not in (None, "cpu") else out_bytes)])
        return Prepared(problem, None, None, None, None, None, q, sinks=sink_logits)
    chosen, run = dispatch.select_bound(problem, backend)
    if rotary is not None:
        if precision != "fp":
            return None
        check_tables(rotary, b, lq, lk, dk)
        run = chosen.bind_rotary(problem, rotary.layout)
        if run is None:
            return None
    if not chosen.native_torch:
        mask_bytes = 0 if mask_shape is None else 4 * math.prod(mask_shape)
        inputs.check_memory([("q", inputs.host_copy_bytes(q)), ("k", inputs.host_copy_bytes(k)),
                             ("v", inputs.host_copy_bytes(v)), ("attn_mask", mask_bytes), ("the output", out_bytes)])
    if mask is not None:
        mask = inputs.mask_to_additive(mask, is_bool)
    if chosen.native_torch:
        import torch

        if mask is not None:
            mask = torch.from_numpy(mask).to(q.device)
        alibi, sink_logits = (None if x is None else torch.from_numpy(x).to(q.device) for x in (alibi, sink_logits))
        return Prepared(problem, chosen, q.contiguous(), k.contiguous(), v.contiguous(), mask, q, run, alibi,
                        sink_logits)
    return Prepared(problem, chosen, inputs.to_host(q, dtype), inputs.to_host(k, dtype), inputs.to_host(v, dtype),
                    mask, q, run, alibi, sink_logits, rotary)


def attention_forward(q: Any, k: Any, v: Any, **options: Any) -> Optional[Tuple[Any, Any, Problem]]:
    """Validated forward pass: ``(out, lse, problem)``; options as ``prepare`` (None only where
    ``rotary`` is given and the backend cannot fuse it)."""
    call = prepare(q, k, v, **options)
    if call is None:
        return None
    out, lse = call.forward()
    return out, lse, call.problem
