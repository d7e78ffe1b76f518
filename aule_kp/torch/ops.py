"""The engine as ``torch.library`` custom ops, and the autograd Function over them.

One path for eager and compiled code, as flash-attn does it: public function ->
:class:`FlashAttentionFunction` -> ``torch.ops.aule_kp.flash_attention_forward`` /
``flash_attention_backward`` -> the backend. The ops have fake (meta) implementations, so
``torch.compile`` traces through them as single opaque nodes; the forward op also carries the
Function's backward (``register_autograd``), so the op alone is differentiable too.

The ops take 4-D ``[B, H, L, D]`` tensors, an optional 4-D mask broadcastable to
``[B, Hq, Lq, Lk]`` (bool, True = attend, or float, added), ``causal``, a resolved ``scale``, a
backend name and the sliding window ``(window_left, window_right)`` (-1 = unbounded); the band is
aligned **top-left** (torch's SDPA) unless ``top_left=False`` (flash-attn's bottom-right, what
:func:`aule_kp.flash_attention` passes). The backward op selects the backend again from the same
arguments (selection is a function of the problem), so a named backend runs both passes.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from .. import dispatch
from ..backend import Backend
from ..call import Prepared, check_call, prepare
from ..errors import warn_once
from ..inputs import (
    from_host,
    mask_to_additive,
    mask_view,
    to_host,
)
from ..scoremods import check as check_score_mods
from ..scoremods import sinks_grad


def _prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor], causal: bool,
             scale: float, backend: str, window_left: int, window_right: int, top_left: bool,
             broadcasts_in_place: bool = True, softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
             sinks: Optional[torch.Tensor] = None) -> Prepared:
    return prepare(q, k, v, causal=causal, scale=scale, window=(int(window_left), int(window_right)),
                   attn_mask=attn_mask, backend=backend, top_left=top_left, broadcasts_in_place=broadcasts_in_place,
                   softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)


@torch.library.custom_op("aule_kp::flash_attention_forward", mutates_args=())
def flash_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    causal: bool,
    scale: float,
    backend: str,
    window_left: int = -1,
    window_right: int = -1,
    top_left: bool = True,
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    sinks: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, Hq, Lq, Dv] like q, lse float32 [B, Hq, Lq])``; the causal/window band is aligned
    top-left (torch's) or, with ``top_left=False``, bottom-right (flash-attn's). ``softcap``,
    ``alibi_slopes`` and ``sinks`` as :func:`aule_kp.flash_attention` takes them (lse includes the sinks)."""
    call = _prepare(q, k, v, attn_mask, causal, scale, backend, window_left, window_right, top_left,
                    softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)
    out, lse = call.forward()
    if isinstance(lse, np.ndarray):
        lse = torch.from_numpy(lse).to(q.device)
    return out.contiguous(), lse.contiguous()


@flash_attention_forward.register_fake
def _forward_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor], causal: bool,
                  scale: float, backend: str, window_left: int = -1, window_right: int = -1,
                  top_left: bool = True, softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
                  sinks: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("aule_kp::flash_attention_backward", mutates_args=())
def flash_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    causal: bool,
    scale: float,
    backend: str,
    mask_grad: bool,
    window_left: int = -1,
    window_right: int = -1,
    top_left: bool = True,
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    sinks: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, dmask, dsinks)`` of :func:`flash_attention_forward` for the output gradient ``dout``
    (``out`` and ``lse`` as it returned them: with the sinks).

    ``dmask`` has the mask's shape and dtype when ``mask_grad`` (a float mask), else it is empty;
    ``dsinks`` (float32 ``[Hq]``, computed from out, dout and lse on their device) is empty without sinks.
    A backend without a backward pass (``NotImplementedError``) hands the call to the CPU backend,
    with one :class:`aule_kp.AuleFallbackWarning`. Broadcast k/v and masks are read as given (each
    broadcast element gets its own gradient, as autograd expects of a view).
    """
    call = _prepare(q, k, v, attn_mask, causal, scale, backend, window_left, window_right, top_left,
                    broadcasts_in_place=False, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)
    p = call.problem
    mask_grad = mask_grad and attn_mask is not None
    dsinks = q.new_empty(0, dtype=torch.float32) if sinks is None else sinks_grad(out, dout, lse, sinks).to(sinks.dtype)
    if call.backend is None:  # no query or no key: nothing depends on the inputs
        dmask = attn_mask.new_zeros(attn_mask.shape) if mask_grad else q.new_empty(0)
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape), dmask, dsinks
    why = call.backend.backward_reasons(p, mask_grad)
    try:
        if why:
            raise NotImplementedError(f"the {call.backend.name} backward cannot take this problem: {'; '.join(why)}")
        grads = _backend_backward(call.backend, call, out, dout, lse, mask_grad)
    except NotImplementedError as exc:
        warn_once(f"backward:{call.backend.name}", f"aule_kp: {exc}; computing gradients on the CPU backend")
        grads = _backend_backward(dispatch.get("cpu"), call, out, dout, lse, mask_grad)
    dq, dk, dv, dmask = grads
    if mask_grad:
        assert attn_mask is not None and dmask is not None
        dmask = torch.as_tensor(dmask).to(device=attn_mask.device, dtype=attn_mask.dtype).reshape(attn_mask.shape)
    else:
        dmask = q.new_empty(0)
    if isinstance(dq, np.ndarray):  # a host backend's (or the CPU fallback's) storage arrays
        dq, dk, dv = (from_host(np.ascontiguousarray(g), like, p.dtype) for g, like in ((dq, q), (dk, k), (dv, v)))
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dmask.contiguous(), dsinks


def _backend_backward(backend: Backend, call: Prepared, out: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor,
                      mask_grad: bool) -> Tuple[Any, Any, Any, Any]:
    """``backend.backward`` on the call's inputs, in host storage unless the backend takes torch."""
    p = call.problem
    options = {name: x for name, x in (("alibi", call.alibi), ("sinks", call.sinks)) if x is not None}
    if backend.native_torch:  # then it is the call's own backend, and the inputs are its tensors
        return backend.backward(p, call.q, call.k, call.v, out.contiguous(), dout.contiguous(), lse.contiguous(),
                                call.mask, mask_grad, **options)

    def host(x: Any) -> np.ndarray:
        return x if isinstance(x, np.ndarray) else to_host(x, p.dtype)

    mask = call.mask
    if isinstance(mask, torch.Tensor):  # prepared for a native-torch backend: float32 on its device
        mask = mask.cpu().numpy()
    options = {name: x.cpu().numpy() if isinstance(x, torch.Tensor) else x for name, x in options.items()}
    return backend.backward(p, host(call.q), host(call.k), host(call.v), host(out), host(dout),
                            lse.detach().cpu().numpy(), mask, mask_grad, **options)


@flash_attention_backward.register_fake
def _backward_fake(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, attn_mask: Optional[torch.Tensor], causal: bool, scale: float, backend: str,
                   mask_grad: bool, window_left: int = -1, window_right: int = -1,
                   top_left: bool = True, softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
                   sinks: Optional[torch.Tensor] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dmask = attn_mask.new_empty(attn_mask.shape) if mask_grad and attn_mask is not None else q.new_empty(0)
    dsinks = q.new_empty(0, dtype=torch.float32) if sinks is None else sinks.new_empty(sinks.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask, dsinks


class FlashAttentionFunction(torch.autograd.Function):
    """Differentiable attention over the custom ops; inputs and outputs as the forward op's (all
    arguments are positional: ``apply(q, k, v, attn_mask, causal, scale, backend, window_left,
    window_right, top_left[, softcap, alibi_slopes, sinks])``).

    Saves q, k, v, out, lse, the mask and the score modifiers; the backward runs the backward op on
    the same backend. The row log-sum-exp output is not differentiable, and neither is the backward
    (no double backward: asking for one raises). ``sinks`` get a gradient, ``alibi_slopes`` none.
    """

    @staticmethod
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor], causal: bool,
                scale: float, backend: str, window_left: int, window_right: int,
                top_left: bool, softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
                sinks: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.aule_kp.flash_attention_forward(q, k, v, attn_mask, causal, scale, backend, window_left,
                                                         window_right, top_left, softcap, alibi_slopes, sinks)

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[torch.Tensor, torch.Tensor]) -> None:
        q, k, v, attn_mask, causal, scale, backend, window_left, window_right, top_left, *mods = inputs
        softcap, alibi_slopes, sinks = [*mods, *[0.0, None, None][len(mods):]]  # sdpa passes none of them
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, attn_mask, alibi_slopes, sinks)
        ctx.options = (causal, scale, backend, window_left, window_right, top_left, softcap)
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor, _dlse: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        return _backward(ctx, dout, *ctx.saved_tensors)


@once_differentiable
def _backward(ctx: Any, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor, attn_mask: Optional[torch.Tensor], alibi_slopes: Optional[torch.Tensor],
              sinks: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
    """:meth:`FlashAttentionFunction.backward`. The saved tensors are arguments because
    ``once_differentiable`` decides from its arguments whether the gradients are marked as not
    differentiable (differentiating them raises) under ``create_graph=True``: with ``dout`` alone, a
    constant ``dout`` (a penalty on the gradient of ``out.sum()``) left them plain tensors, and the
    second-order terms through q, k, v and the mask were dropped without a word."""
    mask_grad = attn_mask is not None and ctx.needs_input_grad[3]
    want_dsinks = sinks is not None and len(ctx.needs_input_grad) > 12 and ctx.needs_input_grad[12]
    causal, scale, backend, window_left, window_right, top_left, softcap = ctx.options
    dq, dk, dv, dmask, dsinks = torch.ops.aule_kp.flash_attention_backward(
        dout.contiguous(), q, k, v, out, lse, attn_mask, causal, scale, backend, mask_grad, window_left,
        window_right, top_left, softcap, alibi_slopes, sinks
    )
    return (dq, dk, dv, (dmask if mask_grad else None), None, None, None, None, None, None, None, None,
            (dsinks if want_dsinks else None))


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: Optional[float],
                    window: Optional[Tuple[int, int]], attn_mask: Any, backend: str, softcap: float = 0.0,
                    alibi_slopes: Any = None, sinks: Any = None) -> torch.Tensor:
    """:func:`aule_kp.flash_attention` on torch tensors through :class:`FlashAttentionFunction`,
    differentiable in q, k, v, a float ``attn_mask`` (its gradient in the shape given, summed
    over broadcast dims) and torch ``sinks``. Arguments are checked here as ``aule_kp.flash_attention``
    checks them."""
    _, (b, hq, _, lq, lk, _, _), scale = check_call(q, k, v, causal, scale, window, backend)
    mask = None
    if isinstance(attn_mask, np.ndarray):  # no gradient: taken as the engine's additive mask
        mask = torch.from_numpy(mask_to_additive(*mask_view(attn_mask, (b, hq, lq, lk))))
    elif attn_mask is not None:  # 4-D through a reshape, so that autograd carries its gradient back
        mask, _ = mask_view(attn_mask, (b, hq, lq, lk), collapse=False)
    softcap, _, _ = check_score_mods(softcap, alibi_slopes, sinks, b, hq)  # for their errors
    if alibi_slopes is not None:  # the op takes a tensor beside q
        alibi_slopes = torch.as_tensor(alibi_slopes).detach().to(device=q.device, dtype=torch.float32)
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor):
            sinks = torch.from_numpy(np.asarray(sinks, np.float32))
        sinks = sinks.to(q.device)
    left, right = (-1, -1) if window is None else window
    out, _ = FlashAttentionFunction.apply(q, k, v, mask, bool(causal), scale, backend, int(left), int(right), False,
                                          softcap, alibi_slopes, sinks)
    return out


torch.library.register_autograd(
    "aule_kp::flash_attention_forward",
    FlashAttentionFunction.backward,
    setup_context=FlashAttentionFunction.setup_context,
)
