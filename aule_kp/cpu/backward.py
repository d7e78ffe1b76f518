"""CPU backend: FlashAttention-2's backward pass in NumPy, from the forward's saved log-sum-exp.

For one block of query rows against one tile of keys the scores ``S`` are recomputed and normalised
with the saved row log-sum-exp (``P = exp(S - lse)``, no online rescaling), then

    dV += Pᵀ dO      dP = dO Vᵀ      dS = P ∘ (dP - D),  D = rowsum(dO ∘ O)
    dQ += scale · dS' K      dK += scale · dS'ᵀ Q      dmask += dS

(``dS' = dS ∘ (1 - tanh²)`` through a soft-cap, else ``dS``; ALiBi is a constant bias),

all in float32, so scratch is a few ``block_q x block_k`` tiles per worker, never ``Lq x Lk``.
Tiles the band hides are never computed. With the compiled kernels (:mod:`.kernels`), the mask,
band and exponential of ``P`` and the ``dS`` product are each one pass per tile instead of several.
The query heads that share a key/value head are stacked
into one block, so the ``dSᵀ Q`` and ``Pᵀ dO`` GEMMs sum their dK/dV contributions (GQA) for free.

Tasks own disjoint key ranges of one (batch, kv head) and write dK/dV there alone; when a (batch,
kv head) is split over several key ranges (to feed the thread pool), each range writes its own dQ
partial and the partials are added in range order. Every sum therefore has a fixed order whatever
the thread timing: two calls give bit-identical gradients (``torch.autograd.gradcheck`` checks that).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..dtypes import from_f32, to_f32
from ..problem import Problem
from ..scoremods import alibi_distance
from .compiled import to_f32 as compiled_f32
from .pool import BLAS, TASKS_PER_WORKER, split_range, worker_count

#: Bytes the dQ partials of split key ranges may take; past it, (batch, kv head) pairs are split less.
_PARTIAL_BUDGET = 256 << 20

#: Below this many scores (a few ms of work) a thread pool's start-up costs more than it saves.
_POOL_MIN_WORK = 1 << 18

#: Band offset standing for "unbounded" (the compiled kernels take ints).
_FAR = 1 << 40


class _Task:
    """Batches x kv heads x one key range ``[k0, k1)``; ``part`` indexes its dQ partial."""

    def __init__(self, batches: Sequence[int], heads: Sequence[int], k0: int, k1: int, part: int) -> None:
        self.batches, self.heads, self.k0, self.k1, self.part = batches, heads, k0, k1, part


class _Backward:
    """One backward call's arrays and float32 accumulators; ``run`` computes one task."""

    def __init__(
        self,
        problem: Problem,
        q: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
        out: np.ndarray,
        dout: np.ndarray,
        lse: np.ndarray,
        mask: Optional[np.ndarray],
        mask_grad: bool,
        block_q: int,
        block_k: int,
        parts: int,
        alibi: Optional[np.ndarray] = None,
        kern: Optional[ModuleType] = None,
    ) -> None:
        p = problem
        self.p = p
        self.kern = kern
        self.no_mask = np.zeros((1, 1, 1), dtype=np.float32)
        self.lo_off = -_FAR if p.left is None else p.diag - p.left
        self.hi_off = _FAR if p.right is None else p.diag + p.right + 1
        self.q, self.k, self.v, self.out, self.dout, self.mask = q, k, v, out, dout, mask
        self.alibi = alibi
        # A row that sees no key has lse -inf; +inf makes its P = exp(S - inf) = 0 on every tile.
        self.lse = np.where(np.isneginf(lse), np.float32(np.inf), lse).astype(np.float32, copy=False)
        self.block_k = block_k
        self.rows = max(1, block_q // p.group)  # query positions per block: group x rows GEMM rows
        self.scale = np.float32(p.scale)
        self.dq = np.zeros((parts, p.batch, p.heads_q, p.len_q, p.dim_k), dtype=np.float32)
        self.dk = np.zeros((p.batch, p.heads_kv, p.len_k, p.dim_k), dtype=np.float32)
        self.dv = np.zeros((p.batch, p.heads_kv, p.len_k, p.dim_v), dtype=np.float32)
        self.dmask = np.zeros(p.mask_shape, dtype=np.float32) if mask_grad and mask is not None else None

    def run(self, task: _Task) -> None:
        with np.errstate(all="ignore"):  # -inf scores and hidden rows are handled deliberately
            for b in task.batches:
                for kv in task.heads:
                    self._head(task, b, kv)

    def _head(self, task: _Task, b: int, kv: int) -> None:
        """dK/dV of keys ``[k0, k1)`` of one (batch, kv head) and their share of its heads' dQ."""
        p = self.p
        g, dk, dv = p.group, p.dim_k, p.dim_v
        h0, h1 = kv * g, (kv + 1) * g
        kf = self._f32(self.k[b, kv, task.k0 : task.k1])
        vf = self._f32(self.v[b, kv, task.k0 : task.k1])
        dk_acc = self.dk[b, kv, task.k0 : task.k1]
        dv_acc = self.dv[b, kv, task.k0 : task.k1]
        for i0 in range(0, p.len_q, self.rows):
            i1 = min(i0 + self.rows, p.len_q)
            lo, hi = p.key_range(i0, i1)
            lo, hi = max(lo, task.k0), min(hi, task.k1)
            if lo >= hi:
                continue
            n = g * (i1 - i0)
            qs = self._f32(self.q[b, h0:h1, i0:i1]).reshape(n, dk) * self.scale
            do = self._f32(self.dout[b, h0:h1, i0:i1]).reshape(n, dv)
            o = self._f32(self.out[b, h0:h1, i0:i1]).reshape(n, dv)
            delta = np.einsum("nd,nd->n", do, o)
            dq = np.zeros((n, dk), dtype=np.float32)
            for c0, c1 in split_range(lo, hi, self.block_k):
                kt, vt = kf[c0 - task.k0 : c1 - task.k0], vf[c0 - task.k0 : c1 - task.k0]
                s = qs @ kt.T
                dcap = self._modify(s.reshape(g, i1 - i0, c1 - c0), b, h0, h1, i0, i1, c0, c1)
                prob = self._probs(s, b, h0, h1, i0, i1, c0, c1)
                dv_acc[c0 - task.k0 : c1 - task.k0] += prob.T @ do
                ds = do @ vt.T
                if self.kern is not None:
                    self.kern.dscores_tile(ds, prob, delta)
                else:
                    ds -= delta[:, None]
                    ds *= prob
                if self.dmask is not None:
                    self._mask_grad(ds.reshape(g, i1 - i0, c1 - c0), b, h0, h1, i0, i1, c0, c1)
                if dcap is not None:
                    ds *= dcap
                dq += ds @ kt
                dk_acc[c0 - task.k0 : c1 - task.k0] += ds.T @ qs  # qs carries the scale already
            self.dq[task.part, b, h0:h1, i0:i1] = (dq * self.scale).reshape(g, i1 - i0, dk)

    def _f32(self, a: np.ndarray) -> np.ndarray:
        return to_f32(a, self.p.dtype) if self.kern is None else compiled_f32(self.kern, a, self.p.dtype)

    def _probs(self, s: np.ndarray, b: int, h0: int, h1: int, i0: int, i1: int, c0: int, c1: int) -> np.ndarray:
        """``P`` of scores ``s`` [heads x rows, keys] (natural units), in place: mask, band, then
        ``exp(s - lse)``."""
        s3 = s.reshape(h1 - h0, i1 - i0, c1 - c0)
        if self.kern is None:
            self._hide(s3, b, h0, h1, i0, i1, c0, c1)
            s3 -= self.lse[b, h0:h1, i0:i1, None]
            return np.exp(s, out=s)
        for h in range(h0, h1):  # the band is linear in the row index within one head
            mask = self.no_mask
            if self.mask is not None:
                mask = self.mask[_mask_index(self.mask.shape, b, h, h + 1, i0, i1, c0, c1)]
            self.kern.probs_tile(s3[h - h0], self.lse[b, h, i0:i1], i0 + self.lo_off - c0, i0 + self.hi_off - c0,
                                 mask, self.mask is not None)
        return s

    def _modify(self, s: np.ndarray, b: int, h0: int, h1: int, i0: int, i1: int, c0: int,
                c1: int) -> Optional[np.ndarray]:
        """Soft-caps and ALiBi-biases scaled scores ``[heads, rows, keys]`` in place; returns the
        cap's derivative ``1 - tanh²`` (what dS is multiplied by before dQ/dK), None without a cap."""
        p = self.p
        dcap = None
        if p.softcap:
            c = np.float32(p.softcap)
            np.divide(s, c, out=s)
            np.tanh(s, out=s)
            dcap = np.float32(1) - s * s
            np.multiply(s, c, out=s)
        if self.alibi is not None:
            slopes = self.alibi[b if self.alibi.shape[0] > 1 else 0, h0:h1]
            s -= slopes[:, None, None] * alibi_distance(p.diag, np.arange(i0, i1), np.arange(c0, c1))[None]
        return None if dcap is None else dcap.reshape(-1, c1 - c0)

    def _hide(self, s: np.ndarray, b: int, h0: int, h1: int, i0: int, i1: int, c0: int, c1: int) -> None:
        """Adds the additive mask to scores ``[heads, rows, keys]``, then sets them to ``-inf``
        outside the band (overwritten, not added: keys outside the band never enter, NaN or not)."""
        p = self.p
        if self.mask is not None:
            s += self.mask[_mask_index(self.mask.shape, b, h0, h1, i0, i1, c0, c1)]
        inside = (p.left is None or c0 >= i1 - 1 + p.diag - p.left) and (
            p.right is None or c1 - 1 <= i0 + p.diag + p.right
        )
        if not inside:
            np.copyto(s, np.float32(-np.inf), where=~p.visible(np.arange(i0, i1), np.arange(c0, c1)))

    def _mask_grad(self, ds: np.ndarray, b: int, h0: int, h1: int, i0: int, i1: int, c0: int, c1: int) -> None:
        """Adds ``dS [heads, rows, keys]`` into dmask, summed over the mask's broadcast dims."""
        assert self.dmask is not None
        shape = self.dmask.shape
        axes = tuple(axis for axis, size in enumerate(shape[1:]) if size == 1 and ds.shape[axis] > 1)
        self.dmask[_mask_index(shape, b, h0, h1, i0, i1, c0, c1)] += ds.sum(axis=axes, keepdims=True)


def _mask_index(shape: Tuple[int, ...], b: int, h0: int, h1: int, i0: int, i1: int, c0: int, c1: int) -> tuple:
    """Index of a ``[B, Hq, Lq, Lk]``-broadcastable mask for batch ``b``, heads, rows and keys: a
    broadcast dim is indexed by its single entry (kept, so that the slice broadcasts)."""
    mb, mh, mq, mk = shape
    return (
        b if mb > 1 else 0,
        slice(h0, h1) if mh > 1 else slice(0, 1),
        slice(i0, i1) if mq > 1 else slice(0, 1),
        slice(c0, c1) if mk > 1 else slice(0, 1),
    )


def _tasks(p: Problem, mask_shape: Optional[Tuple[int, ...]], block_k: int, workers: int) -> Tuple[List[_Task], int]:
    """The tasks, and how many dQ partials they write.

    With a mask gradient, tasks must not share dmask entries: a mask broadcast over batches (or
    heads) makes one task walk all batches (heads), and one broadcast over keys keeps keys whole.
    """
    batches: List[Sequence[int]] = [[b] for b in range(p.batch)]
    heads: List[Sequence[int]] = [[h] for h in range(p.heads_kv)]
    max_parts = math.ceil(p.len_k / block_k)
    if mask_shape is not None:
        if mask_shape[0] == 1:
            batches = [range(p.batch)]
        if mask_shape[1] == 1:
            heads = [range(p.heads_kv)]
        if mask_shape[3] == 1:
            max_parts = 1
    units = len(batches) * len(heads)
    dq_bytes = 4 * p.batch * p.heads_q * p.len_q * p.dim_k
    parts = 1 if workers == 1 else math.ceil(TASKS_PER_WORKER * workers / units)
    parts = max(1, min(parts, max_parts, _PARTIAL_BUDGET // max(1, dq_bytes)))
    ranges = split_range(0, p.len_k, math.ceil(p.len_k / parts))
    tasks = [_Task(bs, hs, k0, k1, j) for bs in batches for hs in heads for j, (k0, k1) in enumerate(ranges)]
    return tasks, len(ranges)


def attention_backward(
    problem: Problem,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    out: np.ndarray,
    dout: np.ndarray,
    lse: np.ndarray,
    mask: Optional[np.ndarray],
    mask_grad: bool = False,
    *,
    block_q: int = 256,
    block_k: int = 256,
    workers: Optional[int] = None,
    alibi: Optional[np.ndarray] = None,
    kern: Optional[ModuleType] = None,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """``(dq, dk, dv, dmask)`` as :meth:`aule_kp.backend.Backend.backward` specifies.

    ``block_q`` query rows (all heads of a kv group together) by ``block_k`` keys per tile;
    ``workers`` threads (default: the CPUs this process may use); ``kern`` the compiled kernels
    (:func:`aule_kp.cpu.compiled.load`), None for NumPy alone.
    """
    p = problem
    if mask is not None:
        mask = np.asarray(mask, dtype=np.float32)
    workers = workers or worker_count()
    if workers > 1 and not BLAS.controllable():
        workers = 1  # BLAS threads each GEMM itself instead; two pools would fight over the cores
    grad_shape = p.mask_shape if mask_grad and mask is not None else None
    tasks, parts = _tasks(p, grad_shape, block_k, workers)
    job = _Backward(p, q, k, v, out, dout, lse, mask, mask_grad, block_q, block_k, parts, alibi, kern)
    work = p.batch * p.heads_q * p.len_q * p.len_k * p.visible_fraction()
    workers = min(workers, len(tasks))
    if workers <= 1 or work < _POOL_MIN_WORK:
        for task in tasks:
            job.run(task)
    else:
        with BLAS.single(), ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(job.run, tasks))
    dq = job.dq[0] if parts == 1 else job.dq.sum(axis=0)
    return (
        from_f32(dq, p.dtype),
        from_f32(job.dk, p.dtype),
        from_f32(job.dv, p.dtype),
        job.dmask,
    )
