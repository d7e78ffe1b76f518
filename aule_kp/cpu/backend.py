"""CPU backend: FlashAttention-2 on the host's cores.

Both passes run the native kernels (:mod:`.native`, C++ built per vector width) where they are
installed. Otherwise (and for a mask gradient shared across batches, heads or keys) the forward runs
this module's NumPy path and the backward :mod:`.backward`, with numba tile kernels where numba is.

The NumPy path: a block of query rows of one key/value head walks the key tiles the band lets it see
(``Problem.key_range``; hidden tiles are never computed) with an online softmax in float32, so
scratch memory is one ``block_q x block_k`` score tile per worker, never ``Lq x Lk``. Per tile: one
BLAS GEMM for the scores (the row's running shift rides along as an extra column), ``np.exp`` in
place, one GEMM against ``[V | 1]`` (the extra column sums the weights); the max pass runs only
until every row has a shift. Tasks run on a thread pool (BLAS and NumPy ufunc loops release the GIL)
with NumPy's OpenBLAS held to one thread meanwhile.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from ..backend import Backend
from ..dtypes import STORAGE, from_f32, to_f32
from ..nonfinite import enforce
from ..problem import Problem
from ..scoremods import alibi_distance, cap, fold_sinks
from . import compiled, int8, native, saturated
from .backward import attention_backward
from .pool import BLAS, TASKS_PER_WORKER, split_range, worker_count

#: One block of query rows: batch ``b``, query heads ``[h0, h1)`` of one KV group, positions
#: ``[i0, i1)``. Either ``h1 - h0 == 1`` or the positions are all of ``[0, Lq)``, so the block's
#: slice of q is contiguous.
_Block = Tuple[int, int, int, int, int]

#: A fast-path tile (shift kept from earlier tiles, no max pass) is accepted while each row's sum of
#: ``exp`` over the tile stays below this; a larger sum means scores outgrew the shift, and the tile
#: is redone with an exact one. 2**32 keeps sums and ``sum * |v|`` far from float32 overflow.
_SUM_LIMIT = np.float32(2.0**32)

#: Keys a block's first tile samples for its rows' first shift (see ``_Forward._probe``).
_PROBE_KEYS = 8

#: Below this many scores (a few ms of work) a thread pool's start-up costs more than it saves.
_POOL_MIN_WORK = 1 << 20

#: Largest backward tile: query rows (of all heads of a kv group together) and keys. A backward
#: tile holds four score-sized arrays (S/P, dP/dS and two GEMM results) where the forward holds one;
#: 256 x 256 was the fastest of 128..1024 on 2 cores (B1 H8 L1024-2048 D64, H32/8 D128).
_BACKWARD_BLOCK = 256

#: Band tiles kept per call. The distinct ones number about ``block_q / step`` per edge for causal
#: and windowed problems; the cap only bounds memory for odd shapes, whose extra tiles are rebuilt.
_BIAS_CACHE_ENTRIES = 64

#: ``(block_q, block_k, step)`` defaults of each path: query rows per block, keys per tile, rows
#: per stair of a band edge (the NumPy path's; the native kernel steps by its own few rows).
#: NumPy: 1024/512/128 were the fastest on 2 cores (B1 H16 S2048 D64). Native: 1024/512, 4-8%
#: ahead of 512/512 and level with 2048/512 and 1024/1024 on the same shape, 2 threads; the kernel
#: takes fewer rows where that would leave threads idle (BENCHMARKS.md, issue 20). The backward
#: pass takes at most ``_BACKWARD_BLOCK`` of each.
NUMPY_BLOCKS = (1024, 512, 128)
COMPILED_BLOCKS = (1024, 512, 64)

#: The native backward's ``(query rows, keys)`` per block: 256 x 256 was the fastest of 32-256 x 128-512 on
#: 2 cores, B1 H16 S2048 D64 fp32 (181.6 ms; 64 x 128 201.2, 32 x 128 234.5; BENCHMARKS.md, issue 20).
_NATIVE_BACKWARD_BLOCKS = (256, 256)

#: One task: batch ``b``, key/value head ``kv`` and the row blocks of its query heads to compute.
_Chunk = Tuple[int, int, List[_Block]]

#: One GEMM-sized piece of a block: block rows ``[r0, r1)`` (query positions ``[a, e)``) x keys
#: ``[c0, c1)``.
_Tile = Tuple[int, int, int, int, int, int]


class _Forward:
    """One forward call's arrays; ``run_chunk`` computes one task into ``out``/``lse``."""

    def __init__(
        self,
        problem: Problem,
        q: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
        mask: Optional[np.ndarray],
        block_q: int,
        block_k: int,
        step: int,
        alibi: Optional[np.ndarray] = None,
        sinks: Optional[np.ndarray] = None,
    ) -> None:
        p = problem
        self.p = p
        self.q, self.k, self.v, self.mask = q, k, v, mask
        self.alibi, self.sinks = alibi, sinks
        self.block_k = block_k
        self.step = step
        self.tile_elems = block_q * block_k
        self.scale = np.float32(p.scale)
        self.out = np.empty((p.batch, p.heads_q, p.len_q, p.dim_v), dtype=STORAGE[p.dtype])
        self.lse = np.empty((p.batch, p.heads_q, p.len_q), dtype=np.float32)
        self._bias: Dict[Tuple[int, int, int], np.ndarray] = {}  # band tiles: True = hidden

    def run_chunk(self, chunk: _Chunk) -> None:
        b, kv, blocks = chunk
        ranges = [self.p.key_range(i0, i1) for _, _, _, i0, i1 in blocks]
        lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
        with np.errstate(all="ignore"):  # errstate is per thread; -inf/NaN handling below is deliberate
            k = self._ones_column(self.k[b, kv, lo:hi])
            v = self._ones_column(self.v[b, kv, lo:hi])
            # One score buffer per task: fresh multi-MiB allocations come back from the OS and fault
            # in page by page.
            rows = max((h1 - h0) * (i1 - i0) for _, h0, h1, i0, i1 in blocks)
            scratch = np.empty(min(self.tile_elems, rows * (hi - lo)), dtype=np.float32)
            for block in blocks:
                self._block(block, k, v, lo, scratch)

    def _ones_column(self, x: np.ndarray) -> np.ndarray:
        """float32 ``[x | 1]``: against K the ones column subtracts each row's shift inside the score
        GEMM, against V it sums the row's weights, saving two passes over every score tile."""
        n, d = x.shape
        out = np.empty((n, d + 1), dtype=np.float32)
        out[:, :d] = to_f32(x, self.p.dtype)
        out[:, d] = 1.0
        return out

    def _tiles(self, block: _Block) -> Iterator[_Tile]:
        """The block's tiles: full-height tiles over the keys every row sees, then the band's edges
        in steps of ``step`` rows, each step only as wide as its own rows see (a staircase along a
        causal diagonal instead of a half-hidden square). Packed-head blocks take the edges whole."""
        p, bk = self.p, self.block_k
        _, h0, h1, i0, i1 = block
        rows = (h1 - h0) * (i1 - i0)
        lo, hi = p.key_range(i0, i1)
        core_lo = lo if p.left is None else max(lo, i1 - 1 + p.diag - p.left)
        core_hi = hi if p.right is None else min(hi, i0 + p.diag + p.right + 1)
        if core_lo < core_hi:
            for c0, c1 in split_range(core_lo, core_hi, bk):
                yield 0, rows, i0, i1, c0, c1
        else:
            core_lo = core_hi = hi  # no common keys: the edges below cover each step's whole range
        step = self.step if h1 - h0 == 1 else i1 - i0
        for a in range(i0, i1, step):
            e = min(a + step, i1)
            r0, r1 = (a - i0, e - i0) if h1 - h0 == 1 else (0, rows)
            s_lo, s_hi = p.key_range(a, e)
            # A stair has fewer rows than a block: give it as many keys per GEMM as a block tile has
            # scores, so that a staircase is a few wide GEMMs rather than many narrow ones.
            width = max(bk, self.tile_elems // (r1 - r0))
            for x0, x1 in ((s_lo, min(s_hi, core_lo)), (max(s_lo, core_hi), s_hi)):
                for c0, c1 in split_range(x0, x1, width):
                    yield r0, r1, a, e, c0, c1

    def _inside_band(self, a: int, e: int, c0: int, c1: int) -> bool:
        """Whether query positions ``[a, e)`` all see keys ``[c0, c1)`` (the band alone)."""
        p = self.p
        if p.left is not None and c0 < e - 1 + p.diag - p.left:
            return False
        return p.right is None or c1 - 1 <= a + p.diag + p.right

    def _probe(self, qa: np.ndarray, m: np.ndarray, kt: np.ndarray, tile: _Tile) -> bool:
        """Give rows without a shift the max of a few of their scores in this tile, when every row
        sees every key of it; returns whether it did.

        A seen score is a lower bound of the row's max, so its own term keeps the row's sum >= 1; a
        max far above it shows up as a sum over ``_SUM_LIMIT`` and the tile is redone exactly. It
        spares a block's first tile the max and subtract passes.
        """
        _, _, a, e, c0, c1 = tile
        # A soft-capped or biased score is below the plain one the sample sees: no shift from it.
        if self.mask is not None or self.p.has_score_mods or not self._inside_band(a, e, c0, c1):
            return False
        # Rows without a shift have 0 in qa's shift column, so these are plain scores.
        est = (qa @ kt[:: max(1, (c1 - c0) // _PROBE_KEYS)].T).max(axis=1)
        if not np.isfinite(est).all():
            return False  # NaN or overflowing rows: let the exact path handle them
        unseen = m == -np.inf
        m[unseen] = est[unseen]
        qa[unseen, self.p.dim_k] = -est[unseen]
        return True

    def _band_hidden(self, rows: int, offset: int, width: int) -> np.ndarray:
        """True where the band hides a key, for ``rows`` query rows x ``width`` keys starting
        ``offset`` keys right of the first row; it depends only on these three, so tiles of every
        head share it."""
        key = (rows, offset, width)
        hidden = self._bias.get(key)
        if hidden is None:
            hidden = ~self.p.visible(np.arange(rows), np.arange(offset, offset + width))
            if len(self._bias) < _BIAS_CACHE_ENTRIES:
                self._bias[key] = hidden  # a racing worker computes the same array; either copy will do
        return hidden

    def _scores(self, s: np.ndarray, qa: np.ndarray, kt: np.ndarray, block: _Block, tile: _Tile) -> None:
        """``s = cap(scale * q.k) + alibi - shift`` over the tile, mask added, band applied."""
        p = self.p
        b, h0, h1, _, _ = block
        _, _, a, e, c0, c1 = tile
        s3 = s.reshape(h1 - h0, e - a, c1 - c0)
        if p.has_score_mods:
            # The shift cannot ride in the GEMM: it comes after the cap.
            dk = p.dim_k
            np.matmul(qa[:, :dk], kt[:, :dk].T, out=s)
            cap(s, p.softcap)
            if self.alibi is not None:
                slopes = self.alibi[b if self.alibi.shape[0] > 1 else 0, h0:h1]
                s3 -= slopes[:, None, None] * alibi_distance(p.diag, np.arange(a, e), np.arange(c0, c1))[None]
            s += qa[:, dk:]
        else:
            np.matmul(qa, kt.T, out=s)
        if self.mask is not None:
            mb, mh, mq, mk = self.mask.shape
            s3 += self.mask[
                b if mb > 1 else 0,
                slice(h0, h1) if mh > 1 else slice(0, 1),
                slice(a, e) if mq > 1 else slice(0, 1),
                slice(c0, c1) if mk > 1 else slice(0, 1),
            ]
        # Only keys left of the band edge of the last row, or right of the edge of the first row,
        # are hidden from some row. The band overwrites their scores (after the mask) instead of
        # adding -inf, so that a NaN in k or the mask of a key outside the band never reaches the row.
        spans = []
        if p.left is not None:
            spans.append((c0, min(c1, e - 1 + p.diag - p.left)))
        if p.right is not None:
            spans.append((max(c0, a + p.diag + p.right + 1), c1))
        for x0, x1 in spans:
            if x0 < x1:
                hidden = self._band_hidden(e - a, x0 - a, x1 - x0)
                np.copyto(s3[:, :, x0 - c0 : x1 - c0], np.float32(-np.inf), where=hidden)

    def _block(self, block: _Block, k: np.ndarray, v: np.ndarray, k_lo: int, scratch: np.ndarray) -> None:
        """Online softmax of one block of query rows over its tiles, into ``out`` and ``lse``.

        ``m`` is each row's shift (natural-log units), -inf until the row sees a key; ``acc`` holds
        ``sum exp(s - m) * [v | 1]``. A shift is only ever set to a score the row sees (a tile's
        max, or a probed one), whose term ``exp(0) = 1`` is in the sum, so a row's sum stays >= 1
        and terms that underflow are negligible against it. Tiles whose rows all have a shift skip
        the max pass and keep the shift while scores stay within ``_SUM_LIMIT`` of it.
        """
        p = self.p
        b, h0, h1, i0, i1 = block
        rows = (h1 - h0) * (i1 - i0)
        dk, dv = p.dim_k, p.dim_v
        qa = np.empty((rows, dk + 1), dtype=np.float32)
        np.multiply(to_f32(self.q[b, h0:h1, i0:i1].reshape(rows, dk), p.dtype), self.scale, out=qa[:, :dk])
        qa[:, dk] = 0.0  # minus the shift, against K's ones column
        m = np.full(rows, -np.inf, dtype=np.float32)
        acc = np.zeros((rows, dv + 1), dtype=np.float32)
        part_rows = np.empty_like(acc)
        for tile in self._tiles(block):
            r0, r1, _, _, c0, c1 = tile
            kt, vt = k[c0 - k_lo : c1 - k_lo], v[c0 - k_lo : c1 - k_lo]
            s = scratch[: (r1 - r0) * (c1 - c0)].reshape(r1 - r0, c1 - c0)
            part = part_rows[: r1 - r0]
            mt, at, qt = m[r0:r1], acc[r0:r1], qa[r0:r1]
            if np.isfinite(mt).all() or self._probe(qt, mt, kt, tile):
                self._scores(s, qt, kt, block, tile)
                np.exp(s, out=s)
                np.matmul(s, vt, out=part)
                if not (part[:, dv] > _SUM_LIMIT).any():
                    at += part
                    continue
            # Absolute scores: relative to a shift far from them (a row masked with float32's minimum
            # until one key is lifted out of it) the score itself would round away against the shift.
            qt[:, dk] = 0.0
            self._scores(s, qt, kt, block, tile)
            top = s.max(axis=1)
            # NaN rows never get a shift, so their NaN reaches the output instead of being hidden.
            grow = np.isfinite(top) & ((mt == -np.inf) | (top > mt))
            m_new = np.where(grow, top, mt)
            s -= np.where(np.isfinite(m_new), m_new, np.float32(0))[:, None]
            at *= np.where(grow, np.exp(mt - m_new), np.float32(1))[:, None]
            mt[:] = m_new
            qt[:, dk] = np.where(np.isfinite(m_new), -m_new, np.float32(0))
            np.exp(s, out=s)
            np.matmul(s, vt, out=part)
            at += part
        total = acc[:, dv]
        if self.sinks is not None:
            acc[:, :dv] *= fold_sinks(m, total, np.repeat(self.sinks[h0:h1], i1 - i0))[:, None]
        seen = total != 0  # NaN compares unequal, so NaN rows stay NaN instead of becoming hidden rows
        o = np.where(seen[:, None], acc[:, :dv] / total[:, None], np.float32(0))
        self.out[b, h0:h1, i0:i1] = from_f32(o, p.dtype).reshape(h1 - h0, i1 - i0, dv)
        self.lse[b, h0:h1, i0:i1] = np.where(seen, m + np.log(total), -np.inf).reshape(h1 - h0, i1 - i0)


def _head_blocks(p: Problem, block_q: int, b: int, kv: int) -> List[_Block]:
    """Row blocks of the query heads of one KV head; the heads are packed together when Lq is short."""
    g = p.group
    if p.len_q >= block_q:
        n = math.ceil(p.len_q / block_q)
        size = math.ceil(p.len_q / n)  # even sizes: 300 rows split 150 + 150, not 256 + 44
        return [
            (b, h, h + 1, i0, min(i0 + size, p.len_q))
            for h in range(kv * g, (kv + 1) * g)
            for i0 in range(0, p.len_q, size)
        ]
    per = max(1, block_q // p.len_q)
    return [(b, kv * g + g0, kv * g + min(g0 + per, g), 0, p.len_q) for g0 in range(0, g, per)]


def _chunks(p: Problem, block_q: int, workers: int) -> List[_Chunk]:
    """Tasks: runs of consecutive row blocks of one KV head (K and V are converted once per task)."""
    per_head = 1 if workers == 1 else math.ceil(TASKS_PER_WORKER * workers / (p.batch * p.heads_kv))
    out: List[_Chunk] = []
    for b in range(p.batch):
        for kv in range(p.heads_kv):
            blocks = _head_blocks(p, block_q, b, kv)
            n = min(per_head, len(blocks))
            size = math.ceil(len(blocks) / n)
            out += [(b, kv, blocks[j : j + size]) for j in range(0, len(blocks), size)]
    return out


def _work(p: Problem, chunk: _Chunk) -> int:
    """Score elements a task computes (its cost, up to a constant)."""
    total = 0
    for _, h0, h1, i0, i1 in chunk[2]:
        lo, hi = p.key_range(i0, i1)
        total += (h1 - h0) * (i1 - i0) * (hi - lo)
    return total


class CpuBackend(Backend):
    """Exact attention on the host: float32 compute for float32/float16/bfloat16 storage."""

    name = "cpu"

    def __init__(self, block_q: Optional[int] = None, block_k: Optional[int] = None, step: Optional[int] = None,
                 workers: Optional[int] = None, use_compiled: bool = True) -> None:
        """``block_q`` query rows per block, ``block_k`` keys per tile, ``step`` rows per stair of a
        band edge (None: each path's measured default, ``NUMPY_BLOCKS`` / ``COMPILED_BLOCKS``);
        ``workers`` threads (default: the CPUs this process may use); ``use_compiled=False`` keeps
        to the NumPy paths even where the native kernel and numba are available."""
        sizes = {"block_q": block_q, "block_k": block_k, "step": step}
        for name, size in sizes.items():
            if size is not None and (not isinstance(size, int) or size < 1):
                raise ValueError(f"{name} must be a positive int or None, got {size!r}")
        if workers is not None and (not isinstance(workers, int) or workers < 1):
            raise ValueError(f"workers must be a positive int or None, got {workers!r}")
        self.sizes = sizes
        self.workers = workers
        self.use_compiled = use_compiled

    def native(self) -> Optional[native.Kernel]:
        """The native kernels this backend runs (:func:`aule_kp.cpu.native.load`), or None for the NumPy
        path."""
        return native.load() if self.use_compiled else None

    def kernels(self) -> Optional[ModuleType]:
        """The backward pass's compiled tile kernels (:func:`aule_kp.cpu.compiled.load`), or None for
        its NumPy path."""
        return compiled.load() if self.use_compiled else None

    def blocks(self, compiled_path: bool) -> Tuple[int, int, int]:
        """``(block_q, block_k, step)`` of one path: the given sizes, else the path's defaults."""
        defaults = COMPILED_BLOCKS if compiled_path else NUMPY_BLOCKS
        given = (self.sizes["block_q"], self.sizes["block_k"], self.sizes["step"])
        return tuple(d if g is None else g for g, d in zip(given, defaults))  # type: ignore[return-value]

    def forward(
        self, problem: Problem, q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: Optional[np.ndarray], *,
        alibi: Optional[np.ndarray] = None, sinks: Optional[np.ndarray] = None,
    ) -> Tuple[np.ndarray, np.ndarray]:
        """See :class:`aule_kp.backend.Backend`: ``(out [B, Hq, Lq, Dv] in q's storage, lse float32)``."""
        p = problem
        if mask is not None:
            mask = np.asarray(mask, dtype=np.float32)
        if p.precision == "int8":
            out, lse = int8.forward(p, q, k, v, mask)
            enforce(p, q, k, v, mask, out, lse)  # a NaN or +inf mask entry in a row's band: a NaN row
            return out, lse
        kern = self.native()
        if kern is not None:
            block_q, block_k, _ = self.blocks(True)
            out, lse = kern.forward(p, q, k, v, mask, block_q=block_q, block_k=block_k,
                                    workers=self.workers or worker_count(), alibi=alibi, sinks=sinks)
            enforce(p, q, k, v, mask, out, lse, alibi=alibi, sinks=sinks)
            return out, lse
        block_q, block_k, step = self.blocks(False)
        job = _Forward(p, q, k, v, mask, block_q, block_k, step, alibi, sinks)
        if job.lse.size == 0:  # no query rows (Dv = 0 alone still has row statistics to compute)
            return job.out, job.lse
        workers = self.workers or worker_count()
        if workers > 1 and not BLAS.controllable():
            workers = 1  # BLAS threads each matmul itself instead; two pools would fight over the cores
        chunks = _chunks(p, block_q, workers)
        # Longest first, so the pool does not end on one long task.
        chunks.sort(key=lambda c: _work(p, c), reverse=True)
        workers = min(workers, len(chunks))
        if workers == 1 or sum(_work(p, c) for c in chunks) < _POOL_MIN_WORK:
            for chunk in chunks:
                job.run_chunk(chunk)
        else:
            with BLAS.single(), ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(job.run_chunk, chunks))
        enforce(p, q, k, v, mask, job.out, job.lse, alibi=alibi, sinks=sinks)  # non-finite inputs (aule_kp.nonfinite)
        return job.out, job.lse

    def backward(
        self,
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
        alibi: Optional[np.ndarray] = None,
        sinks: Optional[np.ndarray] = None,
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """See :class:`aule_kp.backend.Backend`; FA2's backward from the saved lse alone (``sinks`` are in it):
        the native kernel where it takes the problem (:func:`aule_kp.cpu.native.backward_reasons`), else
        :mod:`aule_kp.cpu.backward` (numba tile kernels between BLAS products, or NumPy). Rows whose lse
        cannot carry log(l) go through :mod:`aule_kp.cpu.saturated` instead."""
        tiers_lse, rows = saturated.split(np.asarray(lse, dtype=np.float32))
        grads = self._tiers_backward(problem, q, k, v, out, dout, tiers_lse, mask, mask_grad, alibi)
        if len(rows) == 0:
            return grads
        dq, dk, dv = (to_f32(g, problem.dtype) for g in grads[:3])  # the tiers' own arrays
        saturated.add_gradients(problem, rows, q, k, v, dout, mask, alibi, sinks, (dq, dk, dv), grads[3])
        return from_f32(dq, problem.dtype), from_f32(dk, problem.dtype), from_f32(dv, problem.dtype), grads[3]

    def _tiers_backward(self, problem: Problem, q: np.ndarray, k: np.ndarray, v: np.ndarray, out: np.ndarray,
                        dout: np.ndarray, lse: np.ndarray, mask: Optional[np.ndarray], mask_grad: bool,
                        alibi: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """The first tier that takes the problem: native, numba, NumPy."""
        fast = self.native()
        if fast is not None and not native.backward_reasons(problem, mask_grad):
            block_q, block_k = _NATIVE_BACKWARD_BLOCKS
            return fast.backward(problem, q, k, v, out, dout, lse, mask, mask_grad, block_q=block_q,
                                 block_k=block_k, workers=self.workers or worker_count(), alibi=alibi)
        kern = self.kernels()
        if kern is not None:
            try:
                return self._backward(problem, q, k, v, out, dout, lse, mask, mask_grad, alibi, kern)
            except kern.CompileError as exc:
                compiled.disable(exc)
        return self._backward(problem, q, k, v, out, dout, lse, mask, mask_grad, alibi, None)

    def _backward(self, problem: Problem, q: np.ndarray, k: np.ndarray, v: np.ndarray, out: np.ndarray,
                  dout: np.ndarray, lse: np.ndarray, mask: Optional[np.ndarray], mask_grad: bool,
                  alibi: Optional[np.ndarray], kern: Optional[ModuleType],
                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
        block_q, block_k, _ = self.blocks(kern is not None)
        return attention_backward(problem, q, k, v, out, dout, lse, mask, mask_grad, alibi=alibi,
                                  block_q=min(block_q, _BACKWARD_BLOCK), block_k=min(block_k, _BACKWARD_BLOCK),
                                  workers=self.workers, kern=kern)
