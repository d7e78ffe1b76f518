"""Packed sequences of one serving call, and their per-sequence computation on any backend.

Both serving entry points (``varlen``, ``kvcache``) reduce to a ``Ragged``: query rows packed as
``[total_q, Hq, Dk]`` and keys/values as rows ``[R, Hkv, D]`` of a store (packed sequences, a
contiguous cache seen as rows, or a paged cache whose pages are rows ``page * block + slot``), with
one int32 row per sequence ``(q_start, len_q, k_start, len_k)`` and, for a paged store, the block
table. Sequence ``s``'s key ``j`` is row ``k_start + j``, or ``table[s, j // page] * page + j % page``.

``run`` computes the batch in one dispatch on Vulkan (``aule_kp.vulkan.ragged``), where tiles never
cross a sequence; prefills (``DENSE_QUERY_ROWS``), and every sequence where the ragged kernel does not
apply (other backends, score modifiers, a device limit), run each as its own attention problem
(causal and window aligned bottom-right per sequence, as flash-attn) on the backend the dispatcher
picks for it, its keys gathered from the store first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Optional, Tuple, Union

import numpy as np

from .. import dispatch, inputs
from ..dtypes import STORAGE, from_f32
from ..problem import Problem, band
from ..q8 import Q8Cache
from ..rotary import rotate_stored
from ..vulkan.kvcache import DeviceKVCache, RowRotation

log = logging.getLogger("aule_kp")

#: The rows of a key or value store: host storage ``[R, H, D]``, a q8_0 cache viewed as rows, or a
#: cache resident on a Vulkan device.
Store = Union[np.ndarray, Q8Cache, DeviceKVCache]

#: Query rows from which a sequence whose keys are on the host runs through the dense forward
#: kernels rather than the ragged one: glsl/fa2_ragged.comp is a scalar kernel built for decoding
#: (few query rows per sequence); on an H200 it took 899 ms for one 8192-token prefill (H32/8 D128
#: fp16) whose dense coopmat kernel takes ~4 ms (BENCHMARKS.md, 2026-12-05, third session).
DENSE_QUERY_ROWS = 64


@dataclass
class Ragged:
    """One serving call's sequences (see the module docstring)."""

    q: np.ndarray  # [total_q, Hq, Dk] host storage of ``dtype``
    k: Store  # rows [R, Hkv, Dk]
    v: Store  # rows [R, Hkv, Dv]
    seqs: np.ndarray  # int32 [B, 4]: q_start, len_q, k_start, len_k
    dtype: str
    scale: float
    causal: bool
    window: Optional[Tuple[int, int]]
    table: Optional[np.ndarray] = None  # int32 [B, max_blocks] for a paged store
    page: int = 0
    softcap: float = 0.0
    alibi: Optional[np.ndarray] = None  # float32 slopes [1 or B, Hq]
    sinks: Optional[np.ndarray] = None  # float32 [Hq]
    # q comes unrotated: RoPE with one cos/sin row per query row, applied on the device where the
    # ragged kernel runs on a device cache (vulkan.ragged.rotates_queries), on the host otherwise.
    q_rotary: Optional[RowRotation] = None

    @property
    def modified(self) -> bool:
        """Whether a score modifier (aule_kp.scoremods) is on."""
        return self.softcap != 0.0 or self.alibi is not None or self.sinks is not None

    @property
    def heads_q(self) -> int:
        return int(self.q.shape[1])

    @property
    def heads_kv(self) -> int:
        return int(_shape(self.k)[1])

    @property
    def dim_k(self) -> int:
        return int(self.q.shape[2])

    @property
    def dim_v(self) -> int:
        return int(_shape(self.v)[2])

    def key_rows(self, s: int) -> np.ndarray:
        """Store rows of sequence ``s``'s keys, in order."""
        _, _, k0, lk = (int(x) for x in self.seqs[s])
        j = np.arange(lk)
        if self.table is None:
            return k0 + j
        return self.table[s, j // self.page].astype(np.int64) * self.page + j % self.page

    def problem(self, s: int) -> Problem:
        """Sequence ``s`` as a one-batch Problem (causal/window bottom-right, as flash-attn)."""
        _, lq, _, lk = (int(x) for x in self.seqs[s])
        diag, left, right = band(lq, lk, causal=self.causal, window=self.window, top_left=False)
        return Problem(1, self.heads_q, self.heads_kv, lq, lk, self.dim_k, self.dim_v, self.dtype, self.scale,
                       diag, left, right, softcap=self.softcap, alibi_rows=0 if self.alibi is None else 1,
                       sinks=self.sinks is not None)

    def slopes(self, s: int) -> Optional[np.ndarray]:
        """Sequence ``s``'s ALiBi slopes ``[1, Hq]`` (None without ALiBi)."""
        if self.alibi is None:
            return None
        return self.alibi[s if self.alibi.shape[0] > 1 else 0][None]


def _shape(store: Store) -> Tuple[int, ...]:
    if isinstance(store, DeviceKVCache):
        return (store.shape[0] * store.shape[1], *store.shape[2:])
    return store.shape if isinstance(store, Q8Cache) else tuple(store.shape)


def on_host(store: Store, dtype: str) -> Store:
    """``store`` with a device cache replaced by its host copy (downloaded whole, q8_0 dequantized:
    the slow path that only score modifiers take), once per call for every sequence to gather from."""
    if not isinstance(store, DeviceKVCache):
        return store
    values = store.download().reshape(_shape(store))
    return from_f32(values, dtype) if store.q8 else values


def gather(store: Store, rows: np.ndarray, dtype: str) -> np.ndarray:
    """Host storage ``[len(rows), H, D]`` of the store's ``rows`` (q8_0 dequantized) of a host store
    (:func:`on_host`)."""
    if isinstance(store, Q8Cache):
        return from_f32(store.rows(rows), dtype)
    return store[rows]


def run(call: Ragged, backend: str, like: Any) -> np.ndarray:
    """``[total_q, Hq, Dv]`` host storage: every sequence's attention. ``like`` (the caller's q)
    says where a native-torch backend (Triton) computes.

    On Vulkan the ragged kernel takes the batch in one dispatch, except the sequences of a host-data
    call with ``DENSE_QUERY_ROWS`` query rows or more (prefills), which run one by one through the
    dense forward kernels."""
    if call.q_rotary is not None:
        native = _native_vulkan(call, backend, like) if isinstance(call.k, DeviceKVCache) else None
        if native is not None:
            return native
        call = replace(call, q=_rotated_queries(call), q_rotary=None)
    dense = _prefills(call)
    native = _native_vulkan(_subset(call, ~dense), backend, like) if not dense.all() else None
    if native is None:
        out = np.zeros((call.q.shape[0], call.heads_q, call.dim_v), STORAGE[call.dtype])
        _per_sequence(call, np.arange(call.seqs.shape[0]), out, backend, like)
        return out
    _per_sequence(call, np.flatnonzero(dense), native, backend, like)
    return native


def _rotated_queries(call: Ragged) -> np.ndarray:
    """``call.q`` rotated on the host as the device would (float32 math, one rounding to storage)."""
    r = call.q_rotary
    rows = call.q.transpose(1, 0, 2)[None]  # [1, Hq, T, Dk]: token t at "position" t
    turned = rotate_stored(rows, call.dtype, r.cos, r.sin, np.arange(call.q.shape[0])[None], r.interleaved, r.offset)
    return np.ascontiguousarray(turned[0].transpose(1, 0, 2))


def _prefills(call: Ragged) -> np.ndarray:
    """bool ``[B]``: the sequences that run through the dense kernels even where the ragged kernel
    could take them: ``DENSE_QUERY_ROWS`` query rows or more, keys on the host."""
    if isinstance(call.k, DeviceKVCache):
        return np.zeros(call.seqs.shape[0], bool)  # keys on the device: the ragged kernel reads them there
    return call.seqs[:, 1] >= DENSE_QUERY_ROWS


def _subset(call: Ragged, keep: np.ndarray) -> Ragged:
    """``call`` restricted to the sequences ``keep`` (bool ``[B]``): the same rows, fewer sequences."""
    if keep.all():
        return call
    alibi = call.alibi if call.alibi is None or call.alibi.shape[0] == 1 else call.alibi[keep]
    return replace(call, seqs=call.seqs[keep], table=None if call.table is None else call.table[keep], alibi=alibi)


def _per_sequence(call: Ragged, which: np.ndarray, out: np.ndarray, backend: str, like: Any) -> None:
    """Writes sequences ``which`` of ``call`` into ``out``, each as its own attention problem on the
    backend the dispatcher picks for it."""
    if len(which) == 0:
        return
    k_store, v_store = on_host(call.k, call.dtype), on_host(call.v, call.dtype)
    for s in which:
        q0, lq, _, lk = (int(x) for x in call.seqs[s])
        if lq == 0 or lk == 0:
            out[q0 : q0 + lq] = 0  # no key: the rows are 0 (a sink keeps them 0)
            continue
        rows = call.key_rows(s)
        q = np.ascontiguousarray(call.q[q0 : q0 + lq].transpose(1, 0, 2)[None])
        k = np.ascontiguousarray(gather(k_store, rows, call.dtype).transpose(1, 0, 2)[None])
        v = np.ascontiguousarray(gather(v_store, rows, call.dtype).transpose(1, 0, 2)[None])
        p = call.problem(s)
        chosen, runner = dispatch.select_bound(_with_device(p, like), backend)
        slopes, sinks = call.slopes(s), call.sinks
        if chosen.native_torch:
            import torch

            q, k, v = (inputs.from_host(x, like, call.dtype).contiguous() for x in (q, k, v))
            slopes, sinks = (None if x is None else torch.from_numpy(x).to(like.device) for x in (slopes, sinks))
        options = {name: x for name, x in (("alibi", slopes), ("sinks", sinks)) if x is not None}
        o, _ = runner(q, k, v, None, **options)
        out[q0 : q0 + lq] = (inputs.to_host(o, call.dtype) if chosen.native_torch else o)[0].transpose(1, 0, 2)


def _with_device(p: Problem, like: Any) -> Problem:
    if not inputs.is_torch(like):
        return p
    return replace(p, device=like.device.type)


def _native_vulkan(call: Ragged, backend: str, like: Any) -> Optional[np.ndarray]:
    """The whole call in one Vulkan dispatch when Vulkan is the backend (named, or ``auto``'s choice
    for the call's longest sequences) and its ragged kernel can take it; else None (the call then
    runs per sequence, on the same backend)."""
    # Score modifiers run in the core kernels (per sequence), not in the ragged one.
    if backend not in ("vulkan", "auto") or call.modified or not (call.seqs[:, 1] > 0).any():
        return None
    lq, lk = int(call.seqs[:, 1].max()), int(call.seqs[:, 3].max())
    diag, left, right = band(lq, lk, causal=call.causal, window=call.window, top_left=False)
    whole = Problem(1, call.heads_q, call.heads_kv, lq, max(lk, 1), call.dim_k, call.dim_v, call.dtype, call.scale,
                    diag, left, right)
    resident = isinstance(call.k, DeviceKVCache)  # the data is on the device already: compute there
    if not resident and dispatch.select(_with_device(whole, like), backend).name != "vulkan":
        return None
    from ..vulkan import device as devmod
    from ..vulkan import ragged as vk

    q8 = call.k.q8 if resident else isinstance(call.k, Q8Cache)
    spec = vk.RaggedCall(call.heads_q, call.heads_kv, call.dim_k, call.dim_v, call.dtype, q8, call.scale,
                         -1 if left is None else left, -1 if right is None else right, call.page, lq, lk)
    io = None
    k = v = None
    scales: Tuple[Any, Any] = (None, None)
    if resident:
        kt, vt = call.k.tensors(), call.v.tensors()
        io = ((call.k.serial, call.v.serial),
              {"k": kt["data"], "v": vt["data"], "k_scales": kt["scales"], "v_scales": vt["scales"]})
    else:
        k, v = (x.qs if q8 else x for x in (call.k, call.v))
        scales = (call.k.scales, call.v.scales) if q8 else (None, None)
    try:
        device = call.k.device if resident else devmod.get_device()
        if call.q_rotary is not None and not vk.rotates_queries(device, spec, call.q_rotary):
            return None
        return vk.forward(device, spec, call.q, k, v, call.seqs, call.table, scales, io, call.q_rotary)
    except ValueError as exc:  # over a device limit: per sequence instead, through the forward's choice
        log.debug("ragged Vulkan kernel refused (%s); running per sequence", exc)
        return None
