"""``torch.nn.functional.scaled_dot_product_attention``, exactly, on the aule-kp engine.

A call the engine can take runs through :class:`~aule_kp.torch.ops.FlashAttentionFunction`. Every
other call goes to the original torch function with the same arguments, so its result *and its
errors* are torch's own: the checks below only decide whether a call is surely valid and within the
engine's reach, never what torch would answer otherwise. The reason is logged at debug level.
(The arguments after ``value`` reach torch as keywords, so an error about one of them does not
carry torch's "(position N)" even when the caller passed it by position.)

What goes to torch: dtypes other than float32/float16/bfloat16 (float64 included), head dims that
are not a multiple of 8 in [8, 256], ``dropout_p > 0`` (one :class:`aule_kp.AuleFallbackWarning`:
in-kernel dropout is not implemented), ``is_causal`` together with ``attn_mask`` (torch's kernels
disagree on it: the CPU flash kernel applies both, the math kernel raises), batch dims that
broadcast between q, k and v, empty dims, ``enable_gqa`` with 2-D inputs, calls inside
``torch.func.vmap``, tensor subclasses (nested, fake, ...), meta tensors, and
problems the chosen backend reports it cannot run (one :class:`aule_kp.AuleFallbackWarning` per
backend, unless it is ``"auto"``: that one falls back to torch only where no backend can).

Routing: CPU tensors to the ``"auto"`` backend, CUDA/ROCm tensors to ``"triton"``, other devices
(MPS, XPU, DirectML, ...) through host memory to ``"vulkan"``; ``install(backend=...)`` or
``enabled(backend=...)`` overrides that for every device.

A row that sees no key (every key masked out) gives 0 with zero gradients, as torch 2.13 does
(torch's math kernel uses a "safe" softmax for such rows since 2.5; it returned NaN before).

Under ``torch.compile`` the backend's own ability to run a problem is not asked at trace time (it
touches devices, which dynamo cannot trace): a backend that cannot run a traced call raises
:class:`aule_kp.BackendUnavailable` when the compiled code runs, instead of handing the call to
torch. The default backends (CPU ``"auto"``) take every call that passes the checks above.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import NamedTuple, Optional, Tuple, Union

import torch

from .. import dispatch
from ..call import attention_forward
from ..errors import BackendUnavailable, warn_once
from ..problem import MAX_HEAD_DIM, Problem, band
from .ops import FlashAttentionFunction

log = logging.getLogger("aule_kp")

_ENGINE_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
#: Tensor types taken as they are; subclasses (nested, fake, DTensor, ...) keep torch's own handling.
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
#: Backend for each device type when none is configured; other device types go to "vulkan".
_DEVICE_BACKENDS = {"cpu": "auto", "cuda": "triton"}


class _State:
    """What the installed patch shares: the function calls fall back to (the one that was in
    ``torch.nn.functional`` before the patch) and the configured backend (None: by device).

    ``backend``/``precision``: the process-wide setting (install()'s, or the latest enabled() block
    of any thread); ``local.setting``: the innermost enabled() block of this thread, which decides
    this thread's calls (:meth:`setting`)."""

    def __init__(self) -> None:
        self.original = torch.nn.functional.scaled_dot_product_attention
        self.backend: Optional[str] = None
        self.precision = "fp"  # install(precision=...): "int8" runs aule_kp.quant's scheme
        self.local = threading.local()  # torch.compile traces (and guards) its attributes per thread

    def setting(self) -> Tuple[Optional[str], str]:
        """``(backend, precision)`` of this thread's calls: its own innermost enabled() block, else the
        process-wide setting."""
        mine = getattr(self.local, "setting", None)
        return mine if mine is not None else (self.backend, self.precision)


state = _State()


def backend_for(device_type: str, backend: Optional[str] = None) -> str:
    """The backend SDPA calls on tensors of ``device_type`` take: ``backend``, else the innermost
    ``enabled()``/``install()`` choice, else the per-device default."""
    return backend or state.setting()[0] or _DEVICE_BACKENDS.get(device_type, "vulkan")


class _Call(NamedTuple):
    """A call the engine takes, in the forward op's form."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: Optional[torch.Tensor]
    scale: float
    backend: str
    out_shape: Tuple[int, ...]


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Drop-in for :func:`torch.nn.functional.scaled_dot_product_attention` (same signature,
    results and errors), computed by the aule-kp engine where it can take the call.

    Args:
        query: ``[..., Hq, L, E]`` (at least 2-D); key ``[..., Hkv, S, E]``; value ``[..., Hkv, S, Ev]``.
        attn_mask: bool (True = attend) or float (added to the scores), broadcastable to
            ``[..., Hq, L, S]``.
        dropout_p: dropout probability; above 0 the call goes to torch (logged once).
        is_causal: causal mask aligned top-left (query ``i`` sees keys ``j <= i``), as torch's.
        scale: score scale, default ``1/sqrt(E)``.
        enable_gqa: let ``Hq`` be a multiple of ``Hkv`` (grouped-query attention).

    Returns:
        ``[..., Hq, L, Ev]`` with query's dtype and device, contiguous (torch's CPU kernel may
        instead return a view in the memory order of a transposed query); differentiable in query,
        key, value and a float ``attn_mask`` (once: differentiating the gradients raises). A row
        that sees no key is 0. Non-finite inputs follow :mod:`aule_kp.nonfinite`: a hidden key's
        NaN value is never read, where torch's kernels give NaN rows.
    """
    backend, precision = state.setting()
    if precision != "fp" and torch.is_grad_enabled() and any(
            getattr(t, "requires_grad", False) for t in (query, key, value, attn_mask)):
        if not torch.compiler.is_compiling():
            warn_once("sdpa-int8-grad", f"aule_kp: precision={precision!r} is forward-only; "
                      "scaled_dot_product_attention calls that need gradients run precision='fp'")
        precision = "fp"
    call = _route(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend, precision)
    if isinstance(call, str):
        if not torch.compiler.is_compiling():  # a logging call would break the traced graph
            log.debug("aule_kp: scaled_dot_product_attention goes to torch: %s", call)
        return state.original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                              scale=scale, enable_gqa=enable_gqa)
    if precision != "fp":
        out, _, _ = attention_forward(call.q, call.k, call.v, causal=is_causal, scale=call.scale, attn_mask=call.mask,
                                      backend=call.backend, top_left=True, precision=precision)
    else:
        out, _ = FlashAttentionFunction.apply(call.q, call.k, call.v, call.mask, is_causal, call.scale,
                                              call.backend, -1, -1, True)
    return out.reshape(call.out_shape)


def _route(
    query: object,
    key: object,
    value: object,
    attn_mask: object,
    dropout_p: object,
    is_causal: object,
    scale: object,
    enable_gqa: object,
    backend: Optional[str],
    precision: str = "fp",
) -> Union[str, _Call]:
    """The engine's form of a call, or why the call goes to torch."""
    for name, x in zip(("query", "key", "value"), (query, key, value)):
        if type(x) not in _PLAIN_TENSORS:
            return f"{name} is a {type(x).__name__}, not a plain torch.Tensor"
    if attn_mask is not None and type(attn_mask) not in _PLAIN_TENSORS:
        return f"attn_mask is a {type(attn_mask).__name__}, not a plain torch.Tensor"
    assert isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor) and isinstance(value, torch.Tensor)
    tensors = (query, key, value) if attn_mask is None else (query, key, value, attn_mask)
    if any(t.is_nested or t.layout != torch.strided for t in tensors):
        return "nested or sparse tensors"
    if type(is_causal) is not bool or type(enable_gqa) is not bool:
        return "is_causal and enable_gqa must be bools"
    if not torch.compiler.is_compiling() and _vmapped():
        return "inside torch.func.vmap (the engine's Function has no vmap rule)"
    if type(dropout_p) not in (int, float):
        return f"dropout_p is a {type(dropout_p).__name__}"
    if dropout_p != 0:
        if dropout_p > 0 and not torch.compiler.is_compiling():
            warn_once("dropout", "aule_kp: dropout_p > 0 goes to torch's own scaled_dot_product_attention "
                      "(in-kernel dropout is not implemented)")
        return f"dropout_p={dropout_p}"
    if scale is not None and (type(scale) not in (int, float) or not math.isfinite(scale)):
        return f"scale={scale!r} is not a finite Python number"
    if is_causal and attn_mask is not None:
        return "is_causal with attn_mask"
    device = query.device
    if device.type == "meta" or any(t.device != device for t in tensors):
        return "meta tensors or tensors on different devices"
    if torch.is_autocast_enabled(device.type):
        # Autocast lowers SDPA's floating-point arguments before torch's kernel sees them; do as it does.
        low = torch.get_autocast_dtype(device.type)
        query, key, value = (t.to(low) if t.dtype in _ENGINE_DTYPES else t for t in (query, key, value))
        if attn_mask is not None and attn_mask.dtype in _ENGINE_DTYPES:
            attn_mask = attn_mask.to(low)
    dtype = _ENGINE_DTYPES.get(query.dtype)
    if dtype is None or key.dtype != query.dtype or value.dtype != query.dtype:
        return f"dtypes {query.dtype}, {key.dtype}, {value.dtype} (the engine takes one of float32, float16, bfloat16)"

    ndim = query.dim()
    if ndim < 2 or key.dim() != ndim or value.dim() != ndim:
        return f"{ndim}-D query with {key.dim()}-D key and {value.dim()}-D value"
    if enable_gqa and ndim < 3:  # torch reads the heads at dim -3 (an IndexError on 2-D inputs)
        return "enable_gqa with 2-D inputs (no heads dim)"
    lead = tuple(query.shape[:-3])
    if tuple(key.shape[:-3]) != lead or tuple(value.shape[:-3]) != lead:
        return "batch dims that differ (torch would broadcast them)"
    batch = 1
    for size in lead:
        batch *= size
    hq, hk, hv = (x.shape[-3] if ndim > 2 else 1 for x in (query, key, value))
    lq, dk = query.shape[-2:]
    lk, dk2 = key.shape[-2:]
    lv, dv = value.shape[-2:]
    if 0 in (batch, hq, hk, hv, lq, lk, lv, dk, dk2, dv):
        return "an empty dim"
    if dk2 != dk or lv != lk or hv != hk:
        return "query, key and value shapes do not fit together"
    if hq != hk and not (hk == 1 or (enable_gqa and hq % hk == 0)):
        return f"{hq} query heads with {hk} key/value heads (enable_gqa={enable_gqa})"
    for what, d in (("query/key", dk), ("value", dv)):
        if d % 8 or d > MAX_HEAD_DIM:
            return f"{what} head dim {d} (the engine takes multiples of 8 up to {MAX_HEAD_DIM})"

    mask = None
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and attn_mask.dtype not in (query.dtype, torch.float32):
            return f"attn_mask dtype {attn_mask.dtype} with {query.dtype} query"
        mask = _mask_4d(attn_mask, (*query.shape[:-1], lk), batch)
        if isinstance(mask, str):
            return mask

    scale = 1.0 / math.sqrt(dk) if scale is None else float(scale)
    name = backend_for(device.type, backend)
    if not torch.compiler.is_compiling():
        diag, left, right = band(lq, lk, causal=is_causal, window=None, top_left=True)
        mask_shape = None if mask is None else tuple(mask.shape)
        problem = Problem(batch, hq, hk, lq, lk, dk, dv, dtype, scale, diag, left, right, mask_shape,
                          device=device.type, precision=precision)
        try:
            dispatch.select(problem, name)
        except BackendUnavailable as exc:
            if name != "auto":  # a named backend (configured or by device) cannot take it: say so once
                warn_once(f"sdpa-refused:{name}", f"aule_kp: {exc}; scaled_dot_product_attention runs torch's own "
                          "kernel for such calls")
            return str(exc)
    # Contiguous before the Function, so that it saves (and its backward re-reads) one copy at most.
    q4, k4, v4 = (x.reshape(batch, h, length, d).contiguous()
                  for x, h, length, d in ((query, hq, lq, dk), (key, hk, lk, dk), (value, hk, lk, dv)))
    return _Call(q4, k4, v4, mask, scale, name, (*query.shape[:-1], dv))


def _vmapped() -> bool:
    """Whether a ``torch.func.vmap`` is active: its batched tensors look like plain ones here, and
    :class:`FlashAttentionFunction` has no vmap rule (its kernels take whole 4-D problems)."""
    if torch._C._functorch.peek_interpreter_stack() is None:  # no torch.func transform at all
        return False
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    vmap = torch._C._functorch.TransformType.Vmap
    return any(i.key() == vmap for i in retrieve_all_functorch_interpreters())


def _mask_4d(mask: torch.Tensor, target: Tuple[int, ...], batch: int) -> Union[str, torch.Tensor]:
    """``mask`` broadcastable to ``target = (*lead, Hq, L, S)`` as a 4-D mask broadcastable to
    ``[batch, Hq, L, S]`` (lead dims flattened into ``batch``), or why it is not taken. Reshapes
    and expands are torch ops, so autograd carries a float mask's gradient back through them."""
    if mask.dim() < 2 or mask.dim() > len(target):
        return f"a {mask.dim()}-D attn_mask for {len(target)}-D scores"
    shape = (1,) * (len(target) - mask.dim()) + tuple(mask.shape)
    if any(m != 1 and m != t for m, t in zip(shape, target)):
        return f"attn_mask of shape {tuple(mask.shape)} does not broadcast to {target}"
    if len(shape) == 2:
        return mask.reshape(1, 1, *shape)
    lead, tail = shape[:-3], shape[-3:]
    if all(m == 1 for m in lead):
        return mask.reshape(1, *tail)
    if lead == target[:-3]:
        return mask.reshape(batch, *tail)
    return mask.expand(*target[:-3], *tail).reshape(batch, *tail)
