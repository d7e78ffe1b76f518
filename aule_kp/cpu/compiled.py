"""CPU backend: FlashAttention-2's forward pass with compiled per-tile kernels (:mod:`.kernels`).

One task is a block of query positions of the query heads of one (batch, kv head). It walks the
key tiles the band lets it see (hidden tiles are never computed): per tile one BLAS GEMM for the
scores (the scale folded into the query), one compiled pass that adds the mask,
applies the band and turns the scores into weights with the online-softmax bookkeeping
(:func:`.kernels.softmax_tile`), and one GEMM of the weights against V. Scratch is two score tiles
and a ``rows x Dv`` accumulator per task, never ``Lq x Lk``. Tasks run on a thread pool: BLAS and
the kernels (``nogil``) release the GIL, and NumPy's OpenBLAS is held to one thread meanwhile.

:func:`load` imports the kernels, or says once why it cannot (no numba): the backend then runs its
NumPy path (:mod:`.backend`).
"""

from __future__ import annotations

import importlib
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Iterator, List, Optional, Tuple

import numpy as np

from ..dtypes import STORAGE, from_f32
from ..errors import warn_once
from ..problem import Problem
from .pool import BLAS, split_range, worker_count

#: Band offset standing for "unbounded" (a row index plus it never leaves the int64 range).
_FAR = 1 << 40

#: Below this many multiply-adds (about a millisecond of work) a thread pool's start-up costs more
#: than it saves.
_POOL_MIN_WORK = 1 << 26

#: Tasks per worker, enough to even out unequal (causal, windowed) blocks.
_TASKS_PER_WORKER = 4

#: One task: batch, kv head, query positions ``[i0, i1)`` (of all the kv head's query heads).
_Task = Tuple[int, int, int, int]

#: One tile of a task: query rows ``[a, e)`` x keys ``[c0, c1)``.
_Tile = Tuple[int, int, int, int]

_kernels: Optional[ModuleType] = None
_tried = False
_why = ""


def load(quiet: bool = False) -> Optional[ModuleType]:
    """The compiled kernels module, or None when numba cannot be imported: then, unless ``quiet``
    (a question, not a run), one AuleFallbackWarning per process says why."""
    global _kernels, _tried, _why
    if not _tried:
        _tried = True
        try:
            _kernels = importlib.import_module(f"{__package__}.kernels")
        except Exception as exc:  # ImportError, or a numba/llvmlite that does not load on this platform
            _why = f"{type(exc).__name__}: {exc}"
    if _kernels is None and not quiet:
        warn_once("cpu-compiled", f"aule-kp: the CPU backend's compiled kernels are unavailable ({_why}); "
                  "it runs its slower NumPy path (pip install numba)")
    return _kernels


def disable(exc: Exception) -> None:
    """Stop using the kernels after ``exc``, a numba error on first use (a compile that fails on
    this platform): the caller reruns the call on the NumPy path, and this says why, once."""
    global _kernels, _why
    _kernels = None
    _why = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    load()


def to_f32(kern: ModuleType, a: np.ndarray, dtype: str) -> np.ndarray:
    """Host storage of ``dtype`` as float32 (a view when it already is), 16-bit types converted by
    the compiled kernels."""
    if dtype == "float32":
        return np.asarray(a, dtype=np.float32)
    out = np.empty(a.shape, dtype=np.float32)
    if a.size:
        convert = kern.half_to_f32 if dtype == "float16" else kern.bf16_to_f32
        convert(a.view(np.uint16).reshape(-1, a.shape[-1]), out.reshape(-1, a.shape[-1]))
    return out


class _Forward:
    """One forward call's arrays; ``run`` computes one task into ``out``/``lse``."""

    def __init__(self, kern: ModuleType, p: Problem, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                 mask: Optional[np.ndarray], block_k: int, step: int) -> None:
        self.kern, self.p = kern, p
        self.q, self.k, self.v = q, k, v
        self.mask = mask
        self.no_mask = np.zeros((1, 1, 1), dtype=np.float32)
        self.block_k, self.step = block_k, step
        self.scale = np.float32(p.scale)
        self.out = np.empty((p.batch, p.heads_q, p.len_q, p.dim_v), dtype=STORAGE[p.dtype])
        self.lse = np.empty((p.batch, p.heads_q, p.len_q), dtype=np.float32)
        self.lo_off = -_FAR if p.left is None else p.diag - p.left
        self.hi_off = _FAR if p.right is None else p.diag + p.right + 1
        self._local = threading.local()

    def _scratch(self, size: int) -> Tuple[np.ndarray, np.ndarray]:
        """Two score buffers of at least ``size`` floats, kept per worker thread for the call:
        fresh multi-MiB buffers per task come from the OS and fault in page by page (a tenth of
        the time of B1 H4 S2048, measured)."""
        bufs = getattr(self._local, "bufs", None)
        if bufs is None or bufs[0].size < size:
            bufs = self._local.bufs = (np.empty(size, dtype=np.float32), np.empty(size, dtype=np.float32))
        return bufs

    def tiles(self, i0: int, i1: int) -> Iterator[_Tile]:
        """Full-height tiles over the keys every row sees, then the band's edges in steps of
        ``step`` positions, each only as wide as its rows see (a staircase along a causal diagonal)."""
        p = self.p
        lo, hi = p.key_range(i0, i1)
        core_lo = lo if p.left is None else max(lo, i1 - 1 + p.diag - p.left)
        core_hi = hi if p.right is None else min(hi, i0 + p.diag + p.right + 1)
        if core_lo < core_hi:
            for c0, c1 in split_range(core_lo, core_hi, self.block_k):
                yield i0, i1, c0, c1
        else:
            core_lo = core_hi = hi  # no key every row sees: the steps cover each one's whole range
        for a in range(i0, i1, self.step):
            e = min(a + self.step, i1)
            s_lo, s_hi = p.key_range(a, e)
            for x0, x1 in ((s_lo, min(s_hi, core_lo)), (max(s_lo, core_hi), s_hi)):
                for c0, c1 in split_range(x0, x1, self.block_k):
                    yield a, e, c0, c1

    def _mask_tile(self, b: int, h0: int, h1: int, a: int, e: int, c0: int, c1: int) -> np.ndarray:
        """``[heads, positions, keys]`` of the mask (size-1 dims kept, to broadcast)."""
        if self.mask is None:
            return self.no_mask
        mb, mh, mq, mk = self.mask.shape
        return self.mask[b if mb > 1 else 0, slice(h0, h1) if mh > 1 else slice(0, 1),
                         slice(a, e) if mq > 1 else slice(0, 1), slice(c0, c1) if mk > 1 else slice(0, 1)]

    def run(self, task: _Task) -> None:
        """Positions ``[i0, i1)`` of the query heads of one kv head, stacked position-major (row
        ``(i - i0) * group + head``) so that GQA heads share each K/V tile's GEMM and a band step
        is a run of rows."""
        p, kern = self.p, self.kern
        b, kv, i0, i1 = task
        g = p.group
        h0, h1 = kv * g, (kv + 1) * g
        n = i1 - i0
        lo, hi = p.key_range(i0, i1)
        qs = np.empty((n, g, p.dim_k), dtype=np.float32)
        np.multiply(to_f32(kern, self.q[b, h0:h1, i0:i1], p.dtype).transpose(1, 0, 2), self.scale, out=qs)
        qs = qs.reshape(n * g, p.dim_k)
        m = np.full(n * g, -np.inf, dtype=np.float32)
        total = np.zeros(n * g, dtype=np.float32)
        acc = np.zeros((n * g, p.dim_v), dtype=np.float32)
        if lo < hi:
            k = to_f32(kern, self.k[b, kv, lo:hi], p.dtype)
            v = to_f32(kern, self.v[b, kv, lo:hi], p.dtype)
            size = n * g * min(hi - lo, self.block_k)
            s_buf, p_buf = self._scratch(size)
            part = np.empty((n * g, p.dim_v), dtype=np.float32)
            for a, e, c0, c1 in self.tiles(i0, i1):
                r0, r1 = (a - i0) * g, (e - i0) * g
                shape = (r1 - r0, c1 - c0)
                s = s_buf[: shape[0] * shape[1]].reshape(shape)
                w = p_buf[: shape[0] * shape[1]].reshape(shape)
                np.matmul(qs[r0:r1], k[c0 - lo : c1 - lo].T, out=s)
                kern.softmax_tile(s, w, m[r0:r1], total[r0:r1], acc[r0:r1], a + self.lo_off - c0,
                                  a + self.hi_off - c0, g, self._mask_tile(b, h0, h1, a, e, c0, c1),
                                  self.mask is not None)
                pv = part[r0:r1]
                np.matmul(w, v[c0 - lo : c1 - lo], out=pv)
                acc[r0:r1] += pv
        o = np.empty((n * g, p.dim_v), dtype=np.float32)
        lse = np.empty(n * g, dtype=np.float32)
        kern.finish_rows(acc, m, total, o, lse)
        self.out[b, h0:h1, i0:i1] = from_f32(o.reshape(n, g, p.dim_v).transpose(1, 0, 2), p.dtype)
        self.lse[b, h0:h1, i0:i1] = lse.reshape(n, g).T


def _tasks(p: Problem, block_q: int, workers: int) -> List[_Task]:
    """Position blocks of every (batch, kv head), ``group x positions`` rows of at most about
    ``block_q``, in even sizes, and enough of them to give each worker several."""
    per = max(1, block_q // p.group)
    n = math.ceil(p.len_q / per)
    if workers > 1:
        n = max(n, math.ceil(_TASKS_PER_WORKER * workers / (p.batch * p.heads_kv)))
    n = max(1, min(n, p.len_q // max(1, 16 // p.group)))  # blocks of a few rows waste their GEMMs
    size = math.ceil(p.len_q / n)
    return [(b, kv, i0, min(i0 + size, p.len_q))
            for b in range(p.batch) for kv in range(p.heads_kv) for i0 in range(0, p.len_q, size)]


def forward(kern: ModuleType, p: Problem, q: np.ndarray, k: np.ndarray, v: np.ndarray,
            mask: Optional[np.ndarray], *, block_q: int, block_k: int, step: int,
            workers: Optional[int]) -> Tuple[np.ndarray, np.ndarray]:
    """``(out, lse)`` as :meth:`aule_kp.backend.Backend.forward` specifies, before
    :func:`aule_kp.nonfinite.enforce` (the caller's)."""
    job = _Forward(kern, p, q, k, v, mask, block_k, step)
    if job.lse.size == 0:
        return job.out, job.lse
    workers = workers or worker_count()
    if workers > 1 and not BLAS.controllable():
        workers = 1  # BLAS threads each GEMM itself instead; two pools would fight over the cores
    tasks = _tasks(p, block_q, workers)

    def work(task: _Task) -> int:
        """Multiply-adds of the task's two GEMMs, hidden tiles skipped (up to the staircase's edges)."""
        lo, hi = p.key_range(task[2], task[3])
        return (task[3] - task[2]) * p.group * (hi - lo) * (p.dim_k + p.dim_v)

    tasks.sort(key=work, reverse=True)  # longest first, so that the pool does not end on one long task
    if workers == 1 or sum(map(work, tasks)) < _POOL_MIN_WORK:
        for task in tasks:
            job.run(task)
    else:
        with BLAS.single(), ThreadPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
            list(pool.map(job.run, tasks))
    return job.out, job.lse
