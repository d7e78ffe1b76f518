"""The attention override that routes ComfyUI's attention through aule-kp.

ComfyUI wraps every attention function with ``wrap_attn``: when the caller passed
``transformer_options`` holding ``"optimized_attention_override"``, the wrapper calls
``override(func, *args, **kwargs)`` instead, where ``func`` is the function that was about to run.
:class:`AuleAttentionOverride` is such an override: it runs what aule-kp can take and hands the rest
back to ``func`` (ComfyUI's own attention): one ``aule_kp.AuleFallbackWarning`` per kind of call
it hands back (the dtype, the layout, the head dim, or the error aule-kp raised), every such call
logged with its reason at debug level.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Tuple

import torch

import aule_kp
from aule_kp.errors import warn_once

log = logging.getLogger("aule_kp")

#: Backend names the node offers, in menu order ("auto" first: it is the default).
BACKENDS: Tuple[str, ...] = ("auto", "vulkan", "cpu", "triton")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256


class AuleAttentionOverride:
    """Callable stored in ``model_options["transformer_options"]["optimized_attention_override"]``.

    It holds only a backend name, so ``ModelPatcher.clone()`` (which deep-copies ``model_options``)
    copies it cheaply and ``pickle`` round-trips it by reference to this class.
    """

    def __init__(self, backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend

    def __repr__(self) -> str:
        return f"AuleAttentionOverride(backend={self.backend!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AuleAttentionOverride) and other.backend == self.backend

    def __hash__(self) -> int:
        return hash((AuleAttentionOverride, self.backend))

    def __call__(
        self,
        func: Callable[..., torch.Tensor],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        heads: int,
        mask: Optional[torch.Tensor] = None,
        attn_precision: Optional[torch.dtype] = None,
        skip_reshape: bool = False,
        skip_output_reshape: bool = False,
        **kwargs: Any,
    ) -> torch.Tensor:
        """ComfyUI's attention signature; ``func`` is ComfyUI's function, used as the fallback.

        ``attn_precision`` needs no handling: aule-kp always accumulates scores and softmax in fp32,
        which is what ComfyUI's ``attn_precision=torch.float32`` upcast is for.
        """
        refusal = _unsupported(q, k, v, heads, skip_reshape)
        if refusal is None:
            try:
                return _run(q, k, v, heads, mask, skip_reshape, skip_output_reshape, self.backend)
            except (aule_kp.BackendUnavailable, ValueError, TypeError) as exc:
                # A problem the engine refuses (mask shape, backend limits, ...): ComfyUI's own
                # function still gives the right answer, so the user's workflow keeps running.
                refusal = (type(exc).__name__, f"{type(exc).__name__}: {exc}")
        kind, reason = refusal
        warn_once(f"comfyui-fallback-{kind}",
                  f"aule-kp's ComfyUI override hands calls it cannot take to ComfyUI's own attention ({reason}); "
                  "said once per kind of call, each call logged at DEBUG on logger aule_kp")
        log.debug("aule-kp ComfyUI override: using ComfyUI's %s (%s)", getattr(func, "__name__", func), reason)
        return func(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                    skip_output_reshape=skip_output_reshape, **kwargs)


def _unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, skip_reshape: bool
                 ) -> Optional[Tuple[str, str]]:
    """``(kind, reason)`` aule-kp should not take this call for, or None; cheap checks made before any work."""
    tensors = (q, k, v)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return "type", "q, k and v are not all torch tensors"
    if any(t.dtype != q.dtype for t in tensors) or q.dtype not in _DTYPES:
        return "dtype", f"dtypes {q.dtype}/{k.dtype}/{v.dtype} (aule-kp takes one of float32, float16, bfloat16)"
    if skip_reshape:
        if any(t.ndim != 4 for t in tensors):
            return "layout", f"skip_reshape inputs of ranks {q.ndim}/{k.ndim}/{v.ndim}, expected 4"
        dims = (q.shape[-1], v.shape[-1])
    else:
        if any(t.ndim != 3 for t in tensors) or heads <= 0 or any(t.shape[-1] % heads for t in tensors):
            shapes = f"{tuple(q.shape)}/{tuple(k.shape)}/{tuple(v.shape)}"
            return "layout", f"inputs {shapes} do not split into {heads} heads"
        dims = (q.shape[-1] // heads, v.shape[-1] // heads)
    for d in dims:
        if d % 8 or not 0 < d <= _MAX_HEAD_DIM:
            return "head-dim", f"head dim {d} (aule-kp takes multiples of 8 up to {_MAX_HEAD_DIM})"
    return None


def _to_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, N, H*D)`` -> ``(B, H, N, D)``."""
    b, n, hd = t.shape
    return t.view(b, n, heads, hd // heads).transpose(1, 2)


def _mask_4d(mask: torch.Tensor) -> torch.Tensor:
    """ComfyUI's mask ranks as ``attention_pytorch`` reads them: 2-D ``[Lq, Lk]``, 3-D ``[B, Lq, Lk]``,
    4-D ``[B, H, Lq, Lk]``; aule-kp broadcasts size-1 dims to ``[B, H, Lq, Lk]`` itself."""
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    return mask


def _run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: Optional[torch.Tensor],
         skip_reshape: bool, skip_output_reshape: bool, backend: str) -> torch.Tensor:
    """One attention call through aule-kp, in ComfyUI's layouts."""
    if not skip_reshape:
        q, k, v = (_to_heads(t, heads) for t in (q, k, v))
    if mask is not None:
        mask = _mask_4d(mask)
    # Looked up on the module at call time (not imported by name) so tests can count the calls. Inputs
    # that require grad (training nodes) get a differentiable result, its backward on the same backend;
    # the default scale is ComfyUI's dim_head ** -0.5.
    out = aule_kp.flash_attention(q, k, v, attn_mask=mask, backend=backend)
    if skip_output_reshape:
        return out
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)
