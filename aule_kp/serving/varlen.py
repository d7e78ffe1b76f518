"""``flash_attention_varlen``: flash-attn's ``flash_attn_varlen_func`` over packed sequences."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

from .. import inputs, scoremods
from ..api import needs_grad
from ..backend import check_backend_name
from . import checks, ragged


def flash_attention_varlen(
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    window: Optional[Tuple[int, int]] = None,
    softcap: float = 0.0,
    alibi_slopes: Any = None,
    sinks: Any = None,
    backend: str = "auto",
) -> Any:
    """Attention over a batch of variable-length sequences packed without padding (flash-attn's
    ``flash_attn_varlen_func`` layout and semantics).

    Args:
        q: ``[total_q, Hq, Dk]``; k: ``[total_k, Hkv, Dk]``; v: ``[total_k, Hkv, Dv]``; ``Hq % Hkv == 0``.
            NumPy (float32/float16) or torch (float32/float16/bfloat16), one type and dtype.
        cu_seqlens_q, cu_seqlens_k: ``[B + 1]`` int32 (any integer dtype is taken) cumulative
            lengths: sequence ``b`` is rows ``[cu[b], cu[b+1])``; ``cu[0] = 0``, ``cu[B] = total``.
        max_seqlen_q, max_seqlen_k: at least the longest sequence (a smaller value is an error).
        causal: per sequence, aligned bottom-right (query ``i`` sees keys ``j <= i + Lk - Lq``).
        scale: default ``1/sqrt(Dk)``. window: ``(left, right)``, ``-1`` unbounded, bottom-right aligned.
        softcap: tanh soft-capping of the scores (0.0: off); alibi_slopes: ``[Hq]`` or ``[B, Hq]``
            (bias ``-slope * |i + Lk - Lq - j|`` per sequence); sinks: ``[Hq]`` attention-sink logits
            (see :func:`aule_kp.flash_attention`).
        backend: ``"auto" | "vulkan" | "triton" | "cpu"``.

    Returns:
        ``[total_q, Hq, Dv]`` in q's type, dtype and device; a row that sees no key is 0. On torch
        tensors that require grad the result is differentiable (per sequence, through
        :func:`aule_kp.flash_attention`).
    """
    check_backend_name(backend)
    inputs.check_causal(causal)
    dtype = inputs.check_types(q, k, v)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if len(x.shape) != 3:
            want = {"q": "[total_q, Hq, Dk]", "k": "[total_k, Hkv, Dk]", "v": "[total_k, Hkv, Dv]"}[name]
            raise ValueError(f"{name} must be 3-D {want}, got shape {tuple(x.shape)}")
    total_q, hq, dk = (int(s) for s in q.shape)
    total_k, hkv, dk2 = (int(s) for s in k.shape)
    if dk2 != dk:
        raise ValueError(f"k's head dim ({dk2}) must equal q's ({dk})")
    if tuple(v.shape[:2]) != (total_k, hkv):
        raise ValueError(f"v must be [total_k, Hkv, Dv] = [{total_k}, {hkv}, Dv], got {tuple(v.shape)}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q's heads ({hq}) must be a multiple of k/v's heads ({hkv})")
    checks.head_dim("Dk (q/k head dim)", dk)
    checks.head_dim("Dv (v head dim)", int(v.shape[2]))
    scale = inputs.check_scale_window(scale, window, dk)
    cu_q = _cu_seqlens("cu_seqlens_q", cu_seqlens_q, total_q, max_seqlen_q, "max_seqlen_q")
    cu_k = _cu_seqlens("cu_seqlens_k", cu_seqlens_k, total_k, max_seqlen_k, "max_seqlen_k")
    if len(cu_q) != len(cu_k):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both have B + 1 entries, got {len(cu_q)} and {len(cu_k)}")
    softcap, slopes, sink_logits = scoremods.check(softcap, alibi_slopes, sinks, len(cu_q) - 1, hq)
    if needs_grad(q, k, v, None, sinks) or _stays_on_torch(q, backend):
        return _torch_sequences(q, k, v, cu_q, cu_k, backend, causal=causal, scale=scale, window=window,
                                softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)
    seqs = np.stack([cu_q[:-1], np.diff(cu_q), cu_k[:-1], np.diff(cu_k)], axis=1).astype(np.int32)
    call = ragged.Ragged(inputs.to_host(q, dtype), inputs.to_host(k, dtype), inputs.to_host(v, dtype), seqs,
                         dtype, scale, bool(causal), None if window is None else tuple(window), softcap=softcap,
                         alibi=slopes, sinks=sink_logits)
    return inputs.from_host(ragged.run(call, backend, q), q, dtype)


def _cu_seqlens(name: str, cu: Any, total: int, max_len: Any, max_name: str) -> np.ndarray:
    c = checks.int_array(name, cu, 1, "[B + 1] of cumulative sequence lengths")
    if len(c) < 1 or c[0] != 0 or (np.diff(c) < 0).any() or c[-1] != total:
        raise ValueError(f"{name} must start at 0, never decrease and end at the packed length {total}, got "
                         f"{c.tolist() if len(c) <= 16 else str(c[:8].tolist()) + '...'}")
    if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)):
        raise TypeError(f"{max_name} must be an int, got {type(max_len).__name__}")
    longest = int(np.diff(c).max(initial=0))
    if max_len < longest:
        raise ValueError(f"{max_name} ({max_len}) is shorter than the longest sequence in {name} ({longest})")
    return c


def _stays_on_torch(q: Any, backend: str) -> bool:
    """Whether the call runs on Triton, which takes torch tensors where they live: named, or
    ``auto`` on device tensors (the dispatcher's first choice there). Those calls run per sequence on
    the tensors themselves instead of through host copies (one 8192-token prefill took 254 ms on an
    H200 through the host, BENCHMARKS.md 2026-12-05 third session)."""
    if not inputs.is_torch(q) or backend not in ("auto", "triton"):
        return False
    return backend == "triton" or q.device.type != "cpu"


def _torch_sequences(q: Any, k: Any, v: Any, cu_q: np.ndarray, cu_k: np.ndarray, backend: str,
                     alibi_slopes: Any, **options: Any) -> Any:
    """Per sequence through ``flash_attention`` on the torch tensors where they are (differentiable;
    autograd joins the pieces)."""
    import torch

    from ..api import flash_attention

    pieces = []
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        qs = q[q0:q1].transpose(0, 1)[None]
        ks, vs = k[k0:k1].transpose(0, 1)[None], v[k0:k1].transpose(0, 1)[None]
        slopes = alibi_slopes[b] if alibi_slopes is not None and len(alibi_slopes.shape) == 2 else alibi_slopes
        o = flash_attention(qs, ks, vs, alibi_slopes=slopes, backend=backend, **options)
        pieces.append(o[0].transpose(0, 1))
    if not pieces:
        return q.new_zeros((0, q.shape[1], v.shape[2]))
    return torch.cat(pieces, dim=0)
