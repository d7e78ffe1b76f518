"""The CPU backend's native kernels: FlashAttention-2's forward and backward in C++ (``csrc/``), called through
ctypes.

scripts/cpu_build.py builds the sources once per vector width into ``lib/libaule_fa2_w<floats>``; :func:`load`
takes the widest one this CPU runs (AVX-512, AVX2+FMA, else the SSE2/NEON baseline), or says once why there is
none, and the backend then runs its NumPy path (numba's for the backward). The kernels keep each few rows'
scores in registers and L1 between their register-blocked tile products and run their own threads with the GIL
released (ctypes drops it for the call). The row max, the exponential and the non-finite handling are
:mod:`aule_kp.nonfinite`'s, as on the other backends.
"""

from __future__ import annotations

import ctypes
import logging
import math
import platform
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..dtypes import STORAGE, from_f32
from ..errors import warn_once
from ..problem import Problem
from .pool import TASKS_PER_WORKER

logger = logging.getLogger("aule_kp")

#: Where cpu_build.py puts the libraries (inside the package: the wheel carries them).
LIB_DIR = Path(__file__).resolve().parent / "lib"

#: Floats per vector -> the CPU features (NumPy's names) its build needs.
WIDTH_FEATURES: Dict[int, Tuple[str, ...]] = {16: ("AVX512F", "AVX2", "FMA3", "F16C"), 8: ("AVX2", "FMA3", "F16C"),
                                               4: ()}

#: Where the kernel reads K and V rows as they are, one task per kv head with all its query heads' rows,
#: instead of packing K transposed for its micro-kernels: fewer than ``_DIRECT_POSITIONS`` query positions
#: and fewer than ``_DIRECT_ROWS`` rows sharing a kv head (positions x the heads of its group). Measured on
#: 2 cores, Lk 4096, fp32 (BENCHMARKS.md, issue 20): decode H32/8 D128 1.3 ms direct vs 26 ms packed;
#: H32/8 24 positions (96 rows) 15.2 vs 16.3 ms, 32 positions (128 rows) 21.5 vs 18.7; MHA H16 D64 16
#: positions 3.5 vs 3.8 ms, 32 positions 7.5 vs 5.8.
_DIRECT_POSITIONS = 32
_DIRECT_ROWS = 128

#: Below this many multiply-adds (a few hundred microseconds) starting threads costs more than it saves.
_THREAD_MIN_WORK = 1 << 24

#: Bytes the forward's packed K/V slots may take: one per thread (and one packed ahead) would hold K and V of
#: 129 heads at once on a 128-core machine (4 GiB at Lk 32768, D 128). At least one slot is always made.
_SLOT_BYTES = 256 << 20

#: Bytes the backward's dQ partials (one per key range of a kv head) may take.
_PARTIAL_BYTES = 256 << 20

_STORAGE_CODE = {"float32": 0, "float16": 1, "bfloat16": 2}
_I64x3 = ctypes.c_int64 * 3
_I64x4 = ctypes.c_int64 * 4


class _Args(ctypes.Structure):
    """``struct Args`` of fa2_forward.cpp, field by field."""

    _fields_ = [
        ("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("mask", ctypes.c_void_p),
        ("sinks", ctypes.c_void_p), ("alibi", ctypes.c_void_p), ("out", ctypes.c_void_p), ("lse", ctypes.c_void_p),
        ("q_stride", _I64x3), ("k_stride", _I64x3), ("v_stride", _I64x3), ("mask_stride", _I64x4),
        ("batch", ctypes.c_int64), ("heads_q", ctypes.c_int64), ("heads_kv", ctypes.c_int64),
        ("len_q", ctypes.c_int64), ("len_k", ctypes.c_int64), ("dim_k", ctypes.c_int64), ("dim_v", ctypes.c_int64),
        ("diag", ctypes.c_int64), ("left", ctypes.c_int64), ("right", ctypes.c_int64),
        ("block_q", ctypes.c_int64), ("block_k", ctypes.c_int64), ("workers", ctypes.c_int64),
        ("direct", ctypes.c_int64), ("computed", ctypes.c_int64),
        ("slot_bytes", ctypes.c_int64), ("alibi_batch", ctypes.c_int64), ("dtype", ctypes.c_int32),
        ("scale", ctypes.c_float), ("softcap", ctypes.c_float),
    ]


class _BwdArgs(ctypes.Structure):
    """``struct BwdArgs`` of fa2_backward.cpp, field by field."""

    _fields_ = [
        ("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("out", ctypes.c_void_p),
        ("dout", ctypes.c_void_p), ("lse", ctypes.c_void_p), ("mask", ctypes.c_void_p), ("alibi", ctypes.c_void_p),
        ("dq_parts", ctypes.c_void_p), ("dk", ctypes.c_void_p), ("dv", ctypes.c_void_p), ("dmask", ctypes.c_void_p),
        ("q_stride", _I64x3), ("k_stride", _I64x3), ("v_stride", _I64x3), ("o_stride", _I64x3),
        ("do_stride", _I64x3), ("mask_stride", _I64x4), ("dmask_stride", _I64x4),
        ("batch", ctypes.c_int64), ("heads_q", ctypes.c_int64), ("heads_kv", ctypes.c_int64),
        ("len_q", ctypes.c_int64), ("len_k", ctypes.c_int64), ("dim_k", ctypes.c_int64), ("dim_v", ctypes.c_int64),
        ("diag", ctypes.c_int64), ("left", ctypes.c_int64), ("right", ctypes.c_int64),
        ("block_q", ctypes.c_int64), ("block_k", ctypes.c_int64), ("parts", ctypes.c_int64),
        ("workers", ctypes.c_int64), ("alibi_batch", ctypes.c_int64), ("dtype", ctypes.c_int32),
        ("scale", ctypes.c_float), ("softcap", ctypes.c_float),
    ]


class Kernel:
    """One loaded build: ``width`` floats per vector."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lib = ctypes.CDLL(str(path))
        self._lib.aule_fa2_forward.argtypes = [ctypes.POINTER(_Args)]
        self._lib.aule_fa2_forward.restype = ctypes.c_int
        self._lib.aule_fa2_backward.argtypes = [ctypes.POINTER(_BwdArgs)]
        self._lib.aule_fa2_backward.restype = ctypes.c_int
        self._lib.aule_fa2_vector_width.restype = ctypes.c_int
        self._lib.aule_fa2_exp2.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        self._lib.aule_fa2_exp2.restype = None
        self.width: int = self._lib.aule_fa2_vector_width()
        for name, struct in (("forward", _Args), ("backward", _BwdArgs)):
            size = getattr(self._lib, f"aule_fa2_{name}_args_size", None)
            if size is None:
                raise OSError(f"{path.name} is a stale build (no {name} argument size): rebuild it")
            size.restype = ctypes.c_int64
            if size() != ctypes.sizeof(struct):
                raise OSError(f"{path.name} is a stale build: its {name} arguments take {size()} bytes, "
                              f"this aule_kp's {ctypes.sizeof(struct)}; rebuild it")
        #: Scores the last call computed, padding included (what tests of tile skipping read).
        self.last_computed = 0

    def exp2(self, x: np.ndarray) -> np.ndarray:
        """The kernel's own ``2**x`` (float32), for tests of its error bound."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = np.empty_like(x)
        self._lib.aule_fa2_exp2(x.ctypes.data, y.ctypes.data, x.size)
        return y

    def forward(self, p: Problem, q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: Optional[np.ndarray], *,
                block_q: int, block_k: int, workers: int, alibi: Optional[np.ndarray] = None,
                sinks: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        """``(out [B, Hq, Lq, Dv] in q's storage, lse float32)`` as :meth:`aule_kp.backend.Backend.forward`
        specifies, before :func:`aule_kp.nonfinite.enforce` (the caller's). ``mask`` is float32 of 4 dims
        broadcasting to ``[B, Hq, Lq, Lk]``; q/k/v may be strided (a view of ``[B, L, H, D]``, say);
        ``alibi``: float32 ALiBi slopes ``[1 or B, Hq]`` and ``sinks`` float32 ``[Hq]`` sink logits
        (:mod:`aule_kp.scoremods`; ``p.softcap`` the soft-cap)."""
        out = np.empty((p.batch, p.heads_q, p.len_q, p.dim_v), dtype=np.float32)
        lse = np.empty((p.batch, p.heads_q, p.len_q), dtype=np.float32)
        if lse.size == 0:
            return from_f32(out, p.dtype), lse
        q, k, v = (_rows(x, p.dtype) for x in (q, k, v))
        a = _Args()
        a.q, a.k, a.v = q.ctypes.data, k.ctypes.data, v.ctypes.data
        a.out, a.lse = out.ctypes.data, lse.ctypes.data
        a.q_stride, a.k_stride, a.v_stride = (_row_strides(x) for x in (q, k, v))
        if mask is not None:
            mask = _whole_elements(np.asarray(mask, dtype=np.float32))
            a.mask = mask.ctypes.data
            a.mask_stride = _strides(mask)
        if sinks is not None:
            sinks = np.ascontiguousarray(sinks, dtype=np.float32)
            a.sinks = sinks.ctypes.data
        alibi = _problem_fields(a, p, alibi)
        workers = _threads(p, workers)
        a.direct = int(p.len_q < _DIRECT_POSITIONS and p.len_q * p.group < _DIRECT_ROWS)
        a.block_q = _block_rows(p, block_q, workers, bool(a.direct))
        a.block_k = block_k
        a.workers = workers
        a.slot_bytes = _SLOT_BYTES
        # q, k, v, mask, sinks and alibi stay referenced here until the call returns.
        if self._lib.aule_fa2_forward(ctypes.byref(a)) != 0:
            raise MemoryError("aule-kp: the CPU kernel could not allocate its per-thread scratch")
        self.last_computed = a.computed
        return from_f32(out, p.dtype), lse

    def backward(self, p: Problem, q: np.ndarray, k: np.ndarray, v: np.ndarray, out: np.ndarray, dout: np.ndarray,
                 lse: np.ndarray, mask: Optional[np.ndarray], mask_grad: bool, *, block_q: int, block_k: int,
                 workers: int, alibi: Optional[np.ndarray] = None
                 ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """``(dq, dk, dv, dmask)`` as :meth:`aule_kp.backend.Backend.backward` specifies, for problems
        :func:`backward_reasons` accepts."""
        dq = np.zeros((p.batch, p.heads_q, p.len_q, p.dim_k), dtype=np.float32)
        dk = np.zeros((p.batch, p.heads_kv, p.len_k, p.dim_k), dtype=np.float32)
        dv = np.zeros((p.batch, p.heads_kv, p.len_k, p.dim_v), dtype=np.float32)
        dmask = np.zeros(p.mask_shape, dtype=np.float32) if mask_grad and mask is not None else None
        if dq.size or dk.size or dv.size or dmask is not None:
            workers = _threads(p, workers)
            parts = _key_ranges(p, block_k, workers)
            dq_parts = dq if parts == 1 else np.zeros((parts,) + dq.shape, dtype=np.float32)
            q, k, v, out, dout = (_rows(x, p.dtype) for x in (q, k, v, out, dout))
            lse = np.ascontiguousarray(lse, dtype=np.float32)
            a = _BwdArgs()
            a.q, a.k, a.v, a.out, a.dout = (x.ctypes.data for x in (q, k, v, out, dout))
            a.lse, a.dq_parts, a.dk, a.dv = lse.ctypes.data, dq_parts.ctypes.data, dk.ctypes.data, dv.ctypes.data
            for name, x in (("q_stride", q), ("k_stride", k), ("v_stride", v), ("o_stride", out), ("do_stride", dout)):
                setattr(a, name, _row_strides(x))
            if mask is not None:
                mask = _whole_elements(np.asarray(mask, dtype=np.float32))
                a.mask, a.mask_stride = mask.ctypes.data, _strides(mask)
            if dmask is not None:
                a.dmask, a.dmask_stride = dmask.ctypes.data, _strides(dmask)
            alibi = _problem_fields(a, p, alibi)
            a.block_q, a.block_k, a.parts, a.workers = block_q, block_k, parts, workers
            if self._lib.aule_fa2_backward(ctypes.byref(a)) != 0:
                raise MemoryError("aule-kp: the CPU kernel could not allocate its per-thread scratch")
            if parts > 1:
                dq = dq_parts.sum(axis=0)  # in key-range order: the same sums every call
        return from_f32(dq, p.dtype), from_f32(dk, p.dtype), from_f32(dv, p.dtype), dmask


def _problem_fields(a: ctypes.Structure, p: Problem, alibi: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """Sets the fields both kernels' arguments take from ``p`` (shapes, band, storage, scale, soft-cap) and the
    ALiBi slopes; returns the slopes' array, which the caller keeps referenced for the call."""
    a.batch, a.heads_q, a.heads_kv = p.batch, p.heads_q, p.heads_kv
    a.len_q, a.len_k, a.dim_k, a.dim_v = p.len_q, p.len_k, p.dim_k, p.dim_v
    a.diag = p.diag
    a.left = -1 if p.left is None else p.left
    a.right = -1 if p.right is None else p.right
    a.dtype = _STORAGE_CODE[p.dtype]
    a.scale = p.scale
    a.softcap = p.softcap
    if alibi is None:
        return None
    alibi = np.ascontiguousarray(alibi, dtype=np.float32).reshape(-1, p.heads_q)
    a.alibi = alibi.ctypes.data
    a.alibi_batch = p.heads_q if alibi.shape[0] > 1 else 0
    return alibi


def backward_reasons(p: Problem, mask_grad: bool) -> List[str]:
    """Why the native backward cannot take ``p`` (empty: it can). A mask's gradient needs every entry written by
    one task: not shared across batches, heads or keys (rows may be: each task sums its own). Sinks need
    nothing: the saved lse holds them."""
    reasons = []
    if mask_grad and p.mask_shape is not None:
        mb, mh, _, mk = p.mask_shape
        if (mb, mh, mk) != (p.batch, p.heads_q, p.len_k):
            reasons.append(f"a mask gradient of shape {p.mask_shape} is shared across batches, heads or keys")
    return reasons


def _row_strides(x: np.ndarray) -> ctypes.Array:
    """Element strides of a ``[B, H, L, D]`` array's batch, head and row (its rows are contiguous)."""
    return _I64x3(*(s // x.itemsize for s in x.strides[:3]))


def _strides(a: np.ndarray) -> ctypes.Array:
    """Element strides of a 4-dimensional float32 array, 0 along its size-1 (broadcast) dims."""
    return _I64x4(*(0 if n == 1 else s // 4 for n, s in zip(a.shape, a.strides)))


def _key_ranges(p: Problem, block_k: int, workers: int) -> int:
    """Key ranges per (batch, kv head) of the backward: one, or enough to give each thread several tasks
    when there are few kv heads, each range costing a float32 dQ partial, within ``_PARTIAL_BYTES``."""
    if workers <= 1:
        return 1
    want = math.ceil(TASKS_PER_WORKER * workers / (p.batch * p.heads_kv))
    most = max(1, _PARTIAL_BYTES // max(1, 4 * p.batch * p.heads_q * p.len_q * p.dim_k))
    return max(1, min(want, most, math.ceil(p.len_k / block_k)))


def _rows(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` as the storage type, each head-dim row contiguous, aligned and every stride a whole element (a copy
    only where that does not hold already)."""
    x = _whole_elements(np.asarray(x, dtype=STORAGE[dtype]))
    return np.ascontiguousarray(x) if x.shape[-1] > 1 and x.strides[-1] != x.itemsize else x


def _whole_elements(x: np.ndarray) -> np.ndarray:
    """``x``, or a contiguous copy where it is not aligned or a stride is not a whole number of elements (a
    field of a structured array, a view of raw bytes): the kernels index in elements."""
    if not x.flags.aligned or any(s % x.itemsize for s in x.strides):
        x = x.copy()  # not ascontiguousarray: that keeps a contiguous array's unaligned data
    return x


def _threads(p: Problem, workers: int) -> int:
    """One thread for small problems (starting threads costs more), else ``workers``."""
    work = p.batch * p.heads_q * p.len_q * p.len_k * (p.dim_k + p.dim_v) * p.visible_fraction()
    return 1 if work < _THREAD_MIN_WORK else max(1, workers)


def _block_rows(p: Problem, block_q: int, workers: int, stacked: bool) -> int:
    """Query positions per task: ``block_q``, or fewer when that would leave threads without several tasks
    each (a task takes one query head, or every head of a kv head's group when ``stacked``)."""
    heads = p.batch * (p.heads_kv if stacked else p.heads_q)
    per_head = math.ceil(TASKS_PER_WORKER * workers / heads) if workers > 1 else 1
    return max(1, min(block_q, math.ceil(p.len_q / per_head)))


def supported_widths() -> List[int]:
    """Vector widths this CPU runs, widest first (x86-64: by NumPy's run-time CPU feature detection, which
    also checks that the OS saves the wide registers)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return [4]
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features  # numpy 2
    except ImportError:
        from numpy.core._multiarray_umath import __cpu_features__ as features  # numpy 1
    return [w for w, need in sorted(WIDTH_FEATURES.items(), reverse=True) if all(features.get(f) for f in need)]


def library_path(width: int) -> Path:
    suffix = ".dylib" if sys.platform == "darwin" else ".so"
    return LIB_DIR / f"libaule_fa2_w{width}{suffix}"


_loaded: Dict[int, Kernel] = {}
_why: Dict[int, str] = {}


def load(width: Optional[int] = None, quiet: bool = False) -> Optional[Kernel]:
    """The kernel of ``width`` floats per vector (None: the widest this CPU runs and this install has), or
    None when it cannot be loaded: then, unless ``quiet`` (a question, not a run), one AuleFallbackWarning
    per process says why."""
    widths = [w for w in supported_widths() if width is None or w == width]
    why = f"this CPU cannot run the {width}-float build" if not widths else ""
    for w in widths:
        if w not in _loaded and w not in _why:
            path = library_path(w)
            try:
                _loaded[w] = Kernel(path)
            except OSError as exc:
                _why[w] = (f"{path.name} is not installed (build it: python scripts/cpu_build.py --into aule_kp)"
                           if not path.exists() else f"{path.name} does not load: {exc}")
                logger.debug("cpu kernel w%d: %s", w, _why[w])
        if w in _loaded:
            return _loaded[w]
        why = _why[w]
    if not quiet:
        warn_once("cpu-native", f"aule-kp: the CPU backend's native kernel is unavailable ({why}); "
                  "its NumPy paths run instead (numba's where it can for the backward)")
    return None
