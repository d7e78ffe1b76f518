"""``flash_attention_with_kvcache``: flash-attn's call of the same name (decode and chunked prefill
over a KV cache that grows in place, contiguous or paged, float or q8_0)."""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

import numpy as np

from .. import inputs, scoremods
from ..backend import check_backend_name
from ..dtypes import to_f32
from ..errors import BackendUnavailable, warn_once
from ..q8 import Q8Cache, quantize
from ..rotary import rotate_stored
from ..vulkan.kvcache import DeviceKVCache
from . import checks, ragged


def flash_attention_with_kvcache(
    q: Any,
    k_cache: Any,
    v_cache: Any,
    k: Any = None,
    v: Any = None,
    *,
    cache_seqlens: Any = None,
    block_table: Any = None,
    rotary_cos: Any = None,
    rotary_sin: Any = None,
    rotary_interleaved: bool = True,
    causal: bool = False,
    scale: Optional[float] = None,
    window: Optional[Tuple[int, int]] = None,
    softcap: float = 0.0,
    alibi_slopes: Any = None,
    sinks: Any = None,
    backend: str = "auto",
) -> Any:
    """Attention of new queries over a KV cache, appending new keys/values to it in place
    (flash-attn's ``flash_attn_with_kvcache``).

    Args:
        q: ``[B, Lq, Hq, Dk]``.
        k_cache, v_cache: ``[B, S, Hkv, Dk]`` / ``[B, S, Hkv, Dv]``, or with ``block_table`` a paged
            cache ``[num_blocks, page_size, Hkv, D]``. Float caches of q's type and dtype, or both
            :class:`aule_kp.Q8Cache` (int8 q8_0 blocks; q NumPy or torch on the CPU), or both
            device caches from ``aule_kp.Context.kv_cache`` (Vulkan; a call moves only q and the new rows).
        k, v: optional new keys/values ``[B, Lnew, Hkv, D]``, written into the caches *in place* at
            positions ``cache_seqlens[b] ...`` (after rotary, for k) and attended to.
        cache_seqlens: int or ``[B]`` int32: tokens already in each sequence's cache (before ``k``).
            None: the whole cache (``S``, or ``max_blocks * page_size``); required with ``k``/``v``.
        block_table: ``[B, max_blocks]`` int32: sequence ``b``'s token ``t`` lives in block
            ``block_table[b, t // page_size]`` at slot ``t % page_size``.
        rotary_cos, rotary_sin: ``[seqlen_ro, R/2]`` (``R <= Dk``): the new k is rotated at positions
            ``cache_seqlens + i``; q too when causal or local (a ``window`` side in ``[0, capacity)``, the
            capacity being ``k_cache.shape[1]``, or ``max_blocks * page_size`` when paged), else every q row
            at ``cache_seqlens``.
            ``rotary_interleaved``: pairs dims ``(2i, 2i+1)`` (GPT-J); False pairs ``(i, i + R/2)`` (GPT-NeoX).
            flash-attn refuses rotary without new k/v; here q alone is then rotated, by the same rule.
        causal: aligned bottom-right: q row ``i`` sees keys ``j <= i + Lk - Lq``, ``Lk = cache_seqlens + Lnew``.
        scale, window, softcap, alibi_slopes (``[Hq]`` or ``[B, Hq]``), sinks (``[Hq]``): as
            :func:`aule_kp.flash_attention` (ALiBi's distance ``|i + Lk - Lq - j|`` per sequence).
        backend: ``"auto" | "vulkan" | "triton" | "cpu"``.

    Returns:
        ``[B, Lq, Hq, Dv]`` in q's type, dtype and device. Forward only. A call that raises leaves
        host caches as they were (the rows it appended are put back); a device cache keeps rows
        appended before its attention failed.
    """
    check_backend_name(backend)
    inputs.check_causal(causal)
    dtype = inputs.dtype_name("q", q)
    if len(q.shape) != 4:
        raise ValueError(f"q must be 4-D [B, Lq, Hq, Dk], got shape {tuple(q.shape)}")
    b, lq, hq, dk = (int(s) for s in q.shape)
    _check_caches(q, k_cache, v_cache, dtype)
    if isinstance(k_cache, DeviceKVCache) and backend == "triton":  # found out only after the append
        raise BackendUnavailable("triton", ["a DeviceKVCache is read by the Vulkan kernels (or on the host by the "
                                            "CPU backend); Triton takes torch tensors on a CUDA/ROCm device"])
    paged = block_table is not None
    n0, n1, hkv, dk2 = (int(s) for s in k_cache.shape)
    dv = int(v_cache.shape[3])
    if dk2 != dk:
        raise ValueError(f"k_cache's head dim ({dk2}) must equal q's ({dk})")
    if tuple(v_cache.shape[:3]) != (n0, n1, hkv):
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must agree on all "
                         "but the head dim")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q's heads ({hq}) must be a multiple of the cache's kv heads ({hkv})")
    checks.head_dim("Dk (q/k head dim)", dk)
    checks.head_dim("Dv (v head dim)", dv)
    scale = inputs.check_scale_window(scale, window, dk)
    softcap, slopes, sink_logits = scoremods.check(softcap, alibi_slopes, sinks, b, hq)
    if paged:
        table = checks.int_array("block_table", block_table, 2, "[B, max_blocks]")
        if table.shape[0] != b:
            raise ValueError(f"block_table must have one row per batch entry of q ({b}), got {table.shape[0]}")
        capacity = table.shape[1] * n1
    else:
        table = None
        if n0 != b:
            raise ValueError(f"a contiguous k_cache/v_cache must have q's batch size {b} first, got {n0} "
                             "(a paged cache needs block_table)")
        capacity = n1
    new = _check_new(k, v, q, b, hkv, dk, dv, dtype)
    seqlens = _seqlens(cache_seqlens, b, capacity, new, k is not None)
    total = seqlens + new
    if table is not None:
        _check_table(table, total, n1, n0)
        if new:
            _check_writes(table, seqlens, new, n1)
    rotary = _rotary(rotary_cos, rotary_sin, dk, rotary_interleaved)
    if inputs.is_torch(q) and q.device.type != "cpu":
        warn_once(f"kvcache-host-{q.device.type}",
                  f"aule-kp: flash_attention_with_kvcache on {q.device.type} tensors runs through host memory (q, "
                  "the new k/v and the cache are copied to the host and back on every call; there is no native "
                  "GPU path for torch tensors yet); Context.kv_cache keeps a cache on a Vulkan device")
    qh = inputs.to_host(q, dtype)
    if rotary is not None:
        # flash-attn: q rows at their own positions when causal or local, all at cache_seqlens otherwise; a
        # window side of -1 or at least the cache's capacity (its seqlen_k) is unbounded (not local).
        local = window is not None and any(0 <= w < capacity for w in window)
        steps = np.arange(lq) if (causal or local) else np.zeros(lq, np.int64)
        qh = _rotate(qh, dtype, rotary, seqlens[:, None] + steps[None], "q")
    undo = _append(k_cache, v_cache, k, v, seqlens, new, table, n1, rotary, dtype) if new else None
    try:
        k_rows, v_rows = (_rows(c, dtype) for c in (k_cache, v_cache))
        starts = np.zeros(b, np.int64) if paged else np.arange(b) * n1
        seqs = np.stack([np.arange(b) * lq, np.full(b, lq), starts, total], axis=1).astype(np.int32)
        call = ragged.Ragged(qh.reshape(b * lq, hq, dk), k_rows, v_rows, seqs, dtype, scale, bool(causal),
                             None if window is None else tuple(window),
                             None if table is None else table.astype(np.int32), n1 if paged else 0, softcap, slopes,
                             sink_logits)
        out = ragged.run(call, backend, q).reshape(b, lq, hq, dv)
    except BaseException:
        if undo is not None:  # a failed call leaves the caches as they were
            undo()
        raise
    return inputs.from_host(out, q, dtype)


def _check_caches(q: Any, k_cache: Any, v_cache: Any, dtype: str) -> None:
    """TypeError/ValueError naming the cache that does not fit."""
    on_device = [isinstance(c, DeviceKVCache) for c in (k_cache, v_cache)]
    if any(on_device):
        if not all(on_device) or k_cache.q8 != v_cache.q8 or k_cache.device is not v_cache.device:
            raise TypeError("k_cache and v_cache must both be DeviceKVCaches of one Context, both q8_0 or both not")
        for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
            c._live()
            if not c.q8 and c.dtype_name != dtype:
                raise TypeError(f"{name} holds {c.dtype_name}; q is {dtype}")
        if inputs.is_torch(q) and q.device.type != "cpu":
            raise TypeError("with a DeviceKVCache, q must be a NumPy array or a CPU torch tensor")
        return
    quant = [isinstance(c, Q8Cache) for c in (k_cache, v_cache)]
    if any(quant):
        if not all(quant):
            raise TypeError("k_cache and v_cache must both be aule_kp.Q8Cache or both float caches")
        if inputs.is_torch(q) and q.device.type != "cpu":
            raise TypeError("a Q8Cache lives on the host: q must be a NumPy array or a CPU torch tensor")
        for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
            if len(c.shape) != 4:
                raise ValueError(f"{name} must be a 4-D Q8Cache [B, S, Hkv, D] or paged [num_blocks, page_size, "
                                 f"Hkv, D], got shape {c.shape}")
        return
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        got = inputs.dtype_name(name, c)
        if got != dtype or inputs.is_torch(c) != inputs.is_torch(q):
            raise TypeError(f"{name} must have q's type and dtype ({dtype}), got {got}"
                            + ("" if inputs.is_torch(c) == inputs.is_torch(q) else " (mixing numpy and torch)"))
        if len(c.shape) != 4:
            raise ValueError(f"{name} must be 4-D [B, S, Hkv, D] or paged [num_blocks, page_size, Hkv, D], got "
                             f"shape {tuple(c.shape)}")
        if inputs.is_torch(c) and c.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {c.device}")


def _check_new(k: Any, v: Any, q: Any, b: int, hkv: int, dk: int, dv: int, dtype: str) -> int:
    """Lnew (0 without new keys); errors name k or v."""
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (new keys and values to append), or neither")
    if k is None:
        return 0
    for name, x, d in (("k", k, dk), ("v", v, dv)):
        got = inputs.dtype_name(name, x)
        if got != dtype or inputs.is_torch(x) != inputs.is_torch(q):
            raise TypeError(f"{name} must have q's type and dtype ({dtype}), got {got}")
        if len(x.shape) != 4 or int(x.shape[0]) != b or int(x.shape[2]) != hkv or int(x.shape[3]) != d:
            raise ValueError(f"{name} must be [B, Lnew, Hkv, D] = [{b}, Lnew, {hkv}, {d}], got {tuple(x.shape)}")
    if int(k.shape[1]) != int(v.shape[1]):
        raise ValueError(f"k and v must have one Lnew, got {int(k.shape[1])} and {int(v.shape[1])}")
    return int(k.shape[1])


def _seqlens(cache_seqlens: Any, b: int, capacity: int, new: int, appending: bool) -> np.ndarray:
    if cache_seqlens is None:
        if appending:
            raise ValueError("cache_seqlens is required with k/v: it says where in the cache to append them")
        return np.full(b, capacity, np.int64)
    if isinstance(cache_seqlens, (int, np.integer)) and not isinstance(cache_seqlens, bool):
        lens = np.full(b, int(cache_seqlens), np.int64)
    else:
        lens = checks.int_array("cache_seqlens", cache_seqlens, 1, "[B]")
        if lens.shape[0] != b:
            raise ValueError(f"cache_seqlens must have one entry per batch entry of q ({b}), got {lens.shape[0]}")
    if (lens < 0).any() or (lens + new > capacity).any():
        raise ValueError(f"cache_seqlens (+ Lnew = {new} appended) must lie in [0, {capacity}] (the cache's "
                         f"capacity per sequence), got {lens.tolist()[:16]}")
    return lens


def _check_table(table: np.ndarray, total: np.ndarray, page: int, num_blocks: int) -> None:
    """Every block a sequence uses (its first ``ceil(total / page)`` entries) must exist."""
    for s, n in enumerate(total):
        used = table[s, : -(-int(n) // page)]
        if ((used < 0) | (used >= num_blocks)).any():
            raise ValueError(f"block_table[{s}] names blocks outside the paged cache's {num_blocks}: {used.tolist()}")


def _check_writes(table: np.ndarray, seqlens: np.ndarray, new: int, page: int) -> None:
    """Every slot the call writes (positions ``seqlens .. seqlens + new - 1``) must be a slot of that
    position alone among all the positions the call reads: else an appended row would replace another,
    or a key that another sequence (or the same one, at another position) attends to in this call.
    Blocks shared read-only (a common prefix) are fine."""
    total = seqlens + new
    pos = seqlens[:, None] + np.arange(new)[None]
    written = (np.take_along_axis(table, pos // page, axis=1).astype(np.int64) * page + pos % page).reshape(-1)
    blocks = np.unique(written // page)
    # Every read slot of the blocks written to: (sequence, block index) pairs in use that name one.
    used = np.arange(table.shape[1])[None, :] < -(-total // page)[:, None]
    seq, j = np.nonzero(used & np.isin(table, blocks))
    offsets = np.arange(page)
    slots = (table[seq, j].astype(np.int64)[:, None] * page + offsets)[offsets < (total[seq] - j * page)[:, None]]
    values, counts = np.unique(slots[np.isin(slots, written)], return_counts=True)
    if (counts > 1).any():
        clash = int(values[counts > 1][0])
        raise ValueError(f"block_table maps an appended row and another position of the call to one cache slot "
                         f"(block {clash // page}, slot {clash % page}): the append would overwrite a row the "
                         "call reads")


def _rotary(cos: Any, sin: Any, dk: int, interleaved: Any) -> Optional[Tuple[np.ndarray, np.ndarray, bool]]:
    if cos is None and sin is None:
        return None
    if cos is None or sin is None:
        raise ValueError("rotary_cos and rotary_sin must be given together, or neither")
    if not isinstance(interleaved, (bool, np.bool_)):
        raise TypeError(f"rotary_interleaved must be a bool, got {type(interleaved).__name__}")
    arrays = []
    for name, x in (("rotary_cos", cos), ("rotary_sin", sin)):
        if inputs.is_torch(x):
            x = x.detach().float().cpu().numpy()
        elif not isinstance(x, np.ndarray) or x.dtype.kind != "f":
            raise TypeError(f"{name} must be a float numpy.ndarray or torch.Tensor [seqlen_ro, R/2]")
        if x.ndim != 2 or not 0 < 2 * x.shape[1] <= dk:
            raise ValueError(f"{name} must be [seqlen_ro, R/2] with R <= Dk = {dk}, got shape {tuple(x.shape)}")
        arrays.append(np.asarray(x, np.float32))
    if arrays[0].shape != arrays[1].shape:
        raise ValueError(f"rotary_cos and rotary_sin must have one shape, got {arrays[0].shape} and {arrays[1].shape}")
    return arrays[0], arrays[1], bool(interleaved)


def _rotate(x: np.ndarray, dtype: str, rotary: Tuple[np.ndarray, np.ndarray, bool], positions: np.ndarray,
            what: str) -> np.ndarray:
    """Storage ``x [B, L, H, D]`` rotated at ``positions`` (float32 math, one rounding to storage)."""
    cos, sin, interleaved = rotary
    if positions.size and positions.max() >= cos.shape[0]:
        raise ValueError(f"rotary_cos/rotary_sin have {cos.shape[0]} positions, but {what} needs position "
                         f"{int(positions.max())}")
    # rotate_stored takes [B, H, L, D] (flash-attn's apply_rotary semantics either way).
    return rotate_stored(x.swapaxes(1, 2), dtype, cos, sin, positions, interleaved).swapaxes(1, 2)


def _append(k_cache: Any, v_cache: Any, k: Any, v: Any, seqlens: np.ndarray, new: int, table: Optional[np.ndarray],
            page: int, rotary: Any, dtype: str) -> Callable[[], None]:
    """Writes the new k (rotated) and v into the caches at ``seqlens[b] + i``, in place, and returns
    what puts back the rows it overwrote (host caches; a device cache keeps the new rows). Nothing is
    written when k or v does not fit a q8_0 cache (ValueError naming it)."""
    b = len(seqlens)
    pos = seqlens[:, None] + np.arange(new)[None]  # [B, Lnew]
    if table is None:
        index = (np.repeat(np.arange(b), new), pos.reshape(-1))
    else:
        index = (np.take_along_axis(table, pos // page, axis=1).reshape(-1), (pos % page).reshape(-1))
    kh, vh = inputs.to_host(k, dtype), inputs.to_host(v, dtype)
    if rotary is not None:
        kh = _rotate(kh, dtype, rotary, pos, "k")
    payloads = []  # (cache, (values, None) or q8_0's (qs, scales)), all made before the first write
    for name, cache, values in (("k", k_cache, kh), ("v", v_cache, vh)):
        rows = values.reshape(b * new, *values.shape[2:])
        q8 = isinstance(cache, Q8Cache) or (isinstance(cache, DeviceKVCache) and cache.q8)
        payloads.append((cache, quantize(to_f32(rows, dtype), name) if q8 else (np.ascontiguousarray(rows), None)))
    restores: List[Optional[Callable[[], None]]] = []

    def undo() -> None:
        for restore in reversed(restores):
            if restore is not None:
                restore()

    try:
        for cache, payload in payloads:
            restores.append(_write(cache, index, payload, dtype))
    except BaseException:
        undo()
        raise
    return undo


def _write(cache: Any, index: Tuple[np.ndarray, np.ndarray], payload: Tuple[np.ndarray, Optional[np.ndarray]],
           dtype: str) -> Optional[Callable[[], None]]:
    """Writes ``payload`` into ``cache`` at ``index``; returns what restores the old rows (None for
    a device cache)."""
    if isinstance(cache, DeviceKVCache):
        cache.write(index[0].astype(np.int64) * cache.shape[1] + index[1], *payload)
        return None
    if isinstance(cache, Q8Cache):
        old = (cache.qs[index].copy(), cache.scales[index].copy())
        cache.write(index, *payload)
        return lambda: cache.write(index, *old)
    if inputs.is_torch(cache):
        import torch

        where = tuple(torch.from_numpy(i).to(cache.device) for i in index)
        saved = cache[where].clone()
        cache[where] = inputs.from_host(payload[0], cache, dtype)
        return lambda: cache.index_put_(where, saved)
    kept = cache[index].copy()
    cache[index] = payload[0]
    return lambda: cache.__setitem__(index, kept)


def _rows(cache: Any, dtype: str) -> ragged.Store:
    """The cache as store rows ``[n0 * n1, Hkv, D]`` (a view where the cache is on the host; a
    device cache stays where it is)."""
    if isinstance(cache, DeviceKVCache):
        return cache
    if isinstance(cache, Q8Cache):
        n0, n1, h, d = cache.shape
        return Q8Cache(cache.qs.reshape(n0 * n1, h, d), cache.scales.reshape(n0 * n1, h, d // 32))
    host = inputs.to_host(cache, dtype)
    return host.reshape(-1, *host.shape[2:])
