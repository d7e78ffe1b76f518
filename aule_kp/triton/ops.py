"""Host side of the Triton backend: tile choice, autotuning, buffers and launches.

Large fp16/bf16 problems (``Lq >= 128``, ``Lq * Lk >= 2**20``, head dims <= 128) run through ``triton.autotune``
over a few configs per head-dim class, keyed by power-of-2 buckets of the lengths (a new sequence
length does not re-tune). Everything else (decode, short rows, fp32, head dim 256, the interpreter)
takes a tile heuristic; decode-like problems pack the query heads of a GQA group into one block and
split the keys ("flash-decoding") when the grid would not fill the GPU.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import triton

from ..problem import Problem
from . import kernels as kern
from .interpreter import interpreting

log = logging.getLogger("aule_kp")

#: Lq * Lk from which fp16/bf16 problems are autotuned: below it a launch lasts tens of µs and a
#: heuristic tile is as good as a tuned one.
TUNE_MIN_SCORES = 1 << 20
#: Rows of one packed block (query heads of a GQA group x positions) for decoding.
PACK_MAX_ROWS = 64
#: Most key splits of one row block; the combine kernel walks them in a loop.
MAX_SPLITS = 128
#: Multiprocessor count assumed under the interpreter, small so that tests exercise split-KV.
INTERPRETER_SMS = 4
#: Shared memory a heuristic tile may use: well under every CUDA/ROCm GPU's per-block limit.
SMEM_BUDGET = 96 * 1024
#: Largest finite float32: where the float mask saturates (``_mask_log2``).
FLT_MAX = float(torch.finfo(torch.float32).max)


def _p2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def _cfg(bm: int, bn: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# Small on purpose: each config costs a compile per (dtype, head dims, band/mask flags). Chosen from
# Triton 3.6's sm_90 SASS (cuobjdump): every config here pipelines its K/V loads (LDGSTS) and spills
# nothing or next to nothing; D128 needs 8 warps for 128-row blocks (with 4, ~100 registers spill),
# and the dK/dV kernel, which holds K, V and two fp32 accumulators per key block, 8 warps throughout.
_FWD_CONFIGS: Dict[int, List[triton.Config]] = {
    64: [_cfg(128, 64, 4, 3), _cfg(128, 128, 8, 3), _cfg(128, 64, 4, 4), _cfg(64, 64, 4, 3)],
    128: [_cfg(128, 64, 8, 3), _cfg(128, 64, 8, 4), _cfg(128, 128, 8, 2), _cfg(64, 64, 4, 3)],
}
# Backward: BLOCK_M = query rows per inner tile, BLOCK_N = keys per program (dK/dV); the reverse
# roles for dQ (BLOCK_M rows per program, BLOCK_N keys per inner tile).
_DKDV_CONFIGS: Dict[int, List[triton.Config]] = {
    64: [_cfg(64, 128, 8, 2), _cfg(32, 128, 8, 3), _cfg(32, 64, 8, 3)],
    128: [_cfg(32, 64, 8, 3), _cfg(16, 128, 8, 3), _cfg(32, 128, 8, 2)],
}
_DQ_CONFIGS: List[triton.Config] = [_cfg(128, 64, 8, 2), _cfg(128, 32, 8, 3), _cfg(64, 64, 4, 3)]
_ROT_FLAGS = ["ROTARY", "ROT_HALF", "ROT_START"]
_FLAGS = ["DK", "DV", "HAS_LEFT", "HAS_RIGHT", "HAS_MASK", "DOT", "SOFTCAP", "ALIBI", "SINKS", *_ROT_FLAGS]
_BWD_FLAGS = ["DK_", "DV_", "HAS_LEFT", "HAS_RIGHT", "HAS_MASK", "DOT", "SOFTCAP", "ALIBI", *_ROT_FLAGS]

_fwd_tuned = {d: triton.autotune(configs=c, key=["tune_bucket", *_FLAGS])(kern._fwd_kernel)
              for d, c in _FWD_CONFIGS.items()}
_dkdv_tuned = {d: triton.autotune(configs=c, key=["tune_bucket", "EVEN_M", *_BWD_FLAGS])(kern._bwd_dkdv_kernel)
               for d, c in _DKDV_CONFIGS.items()}
# Autotuning runs the kernel several times; the mask gradient accumulates, so it is re-zeroed.
_dq_tuned = triton.autotune(configs=_DQ_CONFIGS, key=["tune_bucket", "MASK_GRAD", *_BWD_FLAGS],
                            reset_to_zero=["DMask"])(kern._bwd_dq_kernel)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Multiprocessors of ``device`` (a fixed small number under the interpreter)."""
    if interpreting() or device.type != "cuda":
        return INTERPRETER_SMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _dot_mode(problem: Problem) -> int:
    """``DOT`` constexpr of the kernels (see ``kernels``' docstring)."""
    if problem.dtype == "float32":
        return 1
    return 2 if problem.dtype == "bfloat16" and interpreting() else 0


def _tune_bucket(problem: Problem) -> int:
    return (problem.len_q.bit_length() << 8) | problem.len_k.bit_length()


def _tuned(problem: Problem, override: bool) -> bool:
    return (not override and not interpreting() and problem.dtype != "float32"
            and max(_p2(problem.dim_k), _p2(problem.dim_v)) <= 128
            and problem.len_q * problem.len_k >= TUNE_MIN_SCORES and problem.len_q >= 128)


def _fit(bm: int, bn: int, smem: Callable[[int, int], int], keep_m: bool = False) -> Tuple[int, int]:
    """Halve the larger tile side (never below 16; never ``bm`` when ``keep_m``) until ``smem(bm, bn)``
    bytes fit ``SMEM_BUDGET``."""
    while smem(bm, bn) > SMEM_BUDGET:
        if bm >= bn and bm > 16 and not keep_m:
            bm //= 2
        elif bn > 16:
            bn //= 2
        else:
            break
    return bm, bn


def _warps(rows: int, width: int) -> int:
    """Warps so that fp32 ``rows x width`` accumulators take at most ~64 registers a thread."""
    return 8 if rows * width > 64 * 32 * 4 else 4


def _mask_log2(mask: torch.Tensor) -> torch.Tensor:
    """The float mask in the kernels' log2 units. Finite values saturate at float32's largest
    magnitude instead of overflowing to ``-inf``/``+inf`` when scaled (as the Vulkan kernels'
    ``mask_term``): HF-style ``finfo.min`` masks stay finite (rows of them uniform, as in float64),
    and a value above ``FLT_MAX / log2(e)`` (2.4e38) is the row's largest score, not a NaN row.
    Infinite and NaN entries stay as they are (``-inf`` hides a key; ``+inf``, NaN: a NaN row)."""
    return torch.where(torch.isinf(mask), mask, (mask * kern.LOG2E).clamp(-FLT_MAX, FLT_MAX)).contiguous()


def _bcast_strides(t: torch.Tensor, problem: Problem) -> Tuple[int, ...]:
    """Strides of ``t`` (``mask_shape``) viewed as ``[B, Hq, Lq, Lk]``: 0 on broadcast dims."""
    p = problem
    return tuple(t.expand(p.batch, p.heads_q, p.len_q, p.len_k).stride())


def _band_args(problem: Problem) -> Tuple[int, int, int]:
    """``(diag, left, right)`` as ints for the kernels (0 for an unbounded side: unused there)."""
    return problem.diag, problem.left or 0, problem.right or 0


def _mods_args(problem: Problem, alibi: Optional[torch.Tensor], stand_in: torch.Tensor
               ) -> Tuple[torch.Tensor, float, int, Dict[str, bool]]:
    """``(Alibi, softcap_log2, stride_ab, flags)`` of the score modifiers for the kernels: the
    slopes in log2 units (``stand_in``, never read, without them) and the SOFTCAP/ALIBI constexprs."""
    p = problem
    table = stand_in if alibi is None else (alibi.float() * kern.LOG2E).contiguous()
    stride = p.heads_q if alibi is not None and p.alibi_rows > 1 else 0
    flags = dict(SOFTCAP=p.softcap != 0.0, ALIBI=alibi is not None)
    return table, p.softcap * kern.LOG2E, stride, flags


class Rotary(NamedTuple):
    """Rotary embedding applied inside the kernels' loads (``kernels._load_rope``), on q's device:
    float32 contiguous tables ``cos``/``sin`` ``[P, R/2]``, int32 positions ``q_pos [B or 1, Lq]`` and
    ``k_pos [B or 1, Lk]`` (contiguous rows; a leading 1 is shared by the batch), the layout
    (``interleaved``: pairs (2i, 2i+1), else (i, i + R/2)) and the first rotated channel ``start``
    (channels ``[start, start + R)`` are rotated, the rest pass unchanged). Checked by the caller
    (``aule_kp.triton.rotary``)."""

    cos: torch.Tensor
    sin: torch.Tensor
    q_pos: torch.Tensor
    k_pos: torch.Tensor
    interleaved: bool
    start: int = 0


def _rotary_args(rotary: Optional[Rotary], stand_in: torch.Tensor) -> Tuple[tuple, Dict[str, int]]:
    """``((Cos, Sin, QPos, KPos, stride_qpb, stride_kpb), flags)`` of the kernels (``stand_in``, never
    read, for the pointers without rotary)."""
    if rotary is None:
        return (stand_in, stand_in, stand_in, stand_in, 0, 0), dict(ROTARY=0, ROT_HALF=1, ROT_START=0)
    r = rotary
    strides = tuple(0 if pos.shape[0] == 1 else pos.stride(0) for pos in (r.q_pos, r.k_pos))
    flags = dict(ROTARY=2 if r.interleaved else 1, ROT_HALF=int(r.cos.shape[1]), ROT_START=int(r.start))
    return (r.cos, r.sin, r.q_pos, r.k_pos, *strides), flags


def forward(problem: Problem, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
            block_m: Optional[int] = None, block_n: Optional[int] = None,
            alibi: Optional[torch.Tensor] = None, sinks: Optional[torch.Tensor] = None,
            rotary: Optional[Rotary] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, Hq, Lq, Dv] in q's dtype, lse float32 [B, Hq, Lq])`` on q's device.

    ``block_m``/``block_n`` pin the tile (tests use tiny ones to cross many tiles); else tuned or
    heuristic as the module docstring says. ``alibi``: float32 slopes ``[problem.alibi_rows, Hq]``;
    ``sinks``: float32 ``[Hq]`` (the lse includes them); ``rotary``: q and k come unrotated and are
    rotated as the kernel loads them.
    """
    p = problem
    g = p.group
    out = torch.empty((p.batch, p.heads_q, p.len_q, p.dim_v), dtype=q.dtype, device=q.device)
    lse = torch.empty((p.batch, p.heads_q, p.len_q), dtype=torch.float32, device=q.device)
    bdk, bdv = max(16, _p2(p.dim_k)), max(16, _p2(p.dim_v))
    diag, left, right = _band_args(p)
    has_mask = mask is not None
    mask_t = _mask_log2(mask) if has_mask else q  # without a mask, q stands in as a pointer never read
    mstrides = _bcast_strides(mask_t, p) if has_mask else (0, 0, 0, 0)
    alibi_t, softcap_log2, stride_ab, mod_flags = _mods_args(p, alibi, q)
    sinks_t = q if sinks is None else sinks.float().contiguous()  # q: a stand-in pointer, never read
    rot_t, rot_flags = _rotary_args(rotary, q)
    flags = dict(DK=p.dim_k, DV=p.dim_v, BLOCK_DK=bdk, BLOCK_DV=bdv, HAS_LEFT=p.left is not None,
                 HAS_RIGHT=p.right is not None, HAS_MASK=has_mask, DOT=_dot_mode(p), **mod_flags, **rot_flags)
    scalars = (p.scale * kern.LOG2E, p.heads_q, p.heads_kv, p.len_q, p.len_k, diag, left, right)
    common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2), *mstrides)

    if _tuned(p, block_m is not None or block_n is not None):
        log.debug("triton forward %s: autotuned", p)
        tuned = _fwd_tuned[max(64, bdk, bdv)]
        tuned[lambda meta: (triton.cdiv(p.len_q, meta["BLOCK_M"]), p.batch * p.heads_q, 1)](
            q, k, v, mask_t, out, lse, alibi_t, sinks_t, *common, out.stride(0), out.stride(1), out.stride(2), 0, 0,
            *scalars, 1, _tune_bucket(p), softcap_log2, stride_ab, *rot_t, PACK_GQA=False, SINKS=sinks is not None,
            **flags)
        return out, lse

    es = q.element_size()
    pack = g > 1 and g * p.len_q <= PACK_MAX_ROWS and (block_m is None or block_m >= g * p.len_q)
    bm = max(16, _p2(g * p.len_q)) if pack else block_m or min(64, max(16, _p2(p.len_q)))
    bn = block_n or (64 if max(bdk, bdv) <= 128 else 32)
    if block_n is None:  # pinned tiles are taken as given; heuristic ones shrink to the smem budget
        bm, bn = _fit(bm, bn, lambda m, n: (m * bdk + 2 * n * (bdk + bdv)) * es, keep_m=pack or block_m is not None)
    blocks, heads = (1, p.batch * p.heads_kv) if pack else (triton.cdiv(p.len_q, bm), p.batch * p.heads_q)
    lo, hi = p.key_range(0, p.len_q)
    key_tiles = triton.cdiv(hi - lo, bn)
    programs = blocks * heads
    splits = 1
    if programs < sm_count(q.device) and key_tiles >= 4:
        # Flash-decoding: enough splits to fill the GPU, each at least two key tiles long.
        splits = min(triton.cdiv(sm_count(q.device), programs), key_tiles // 2, MAX_SPLITS)
    log.debug("triton forward %s: block %dx%d, pack=%s, splits=%d", p, bm, bn, pack, splits)
    grid = (blocks, heads, splits)
    launch = dict(PACK_GQA=pack, BLOCK_M=bm, BLOCK_N=bn, num_warps=_warps(bm, bdv), num_stages=2, **flags)
    tail = (*scalars, splits, _tune_bucket(p), softcap_log2, stride_ab, *rot_t)
    if splits == 1:
        kern._fwd_kernel[grid](q, k, v, mask_t, out, lse, alibi_t, sinks_t, *common, out.stride(0), out.stride(1),
                               out.stride(2), 0, 0, *tail, SINKS=sinks is not None, **launch)
        return out, lse
    part_o = torch.empty((splits, *out.shape), dtype=torch.float32, device=q.device)
    part_l = torch.empty((splits, *lse.shape), dtype=torch.float32, device=q.device)
    kern._fwd_kernel[grid](q, k, v, mask_t, part_o, part_l, alibi_t, sinks_t, *common, part_o.stride(1),
                           part_o.stride(2), part_o.stride(3), part_o.stride(0), part_l.stride(0), *tail, **launch)
    rows = lse.numel()
    kern._combine_kernel[(rows,)](part_o, part_l, out, lse, sinks_t, rows, splits, p.heads_q, p.len_q, DV=p.dim_v,
                                  BLOCK_DV=bdv, BLOCK_S=_p2(splits), SINKS=sinks is not None, num_warps=4)
    return out, lse


def backward(problem: Problem, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             dout: torch.Tensor, lse: torch.Tensor, mask: Optional[torch.Tensor], mask_grad: bool = False,
             block_m: Optional[int] = None, block_n: Optional[int] = None, alibi: Optional[torch.Tensor] = None,
             rotary: Optional[Rotary] = None, sinks: Optional[torch.Tensor] = None
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(dq, dk, dv, dmask)`` per :meth:`aule_kp.backend.Backend.backward`, as torch tensors
    (``alibi``, ``sinks`` and ``rotary`` as ``forward`` takes them; with ``rotary``, dq and dk are the
    gradients of the unrotated q and k; ``lse`` carries the sinks, which only rows whose statistics are
    recomputed read).

    ``block_m``/``block_n`` pin both kernels' tiles (dK/dV: ``block_m`` query rows per inner tile,
    ``block_n`` keys per program; dQ: ``block_m`` rows per program, ``block_n`` keys per tile).
    """
    p = problem
    dev = q.device
    dout = dout.contiguous()
    bdk, bdv = max(16, _p2(p.dim_k)), max(16, _p2(p.dim_v))
    diag, left, right = _band_args(p)

    rows = p.batch * p.heads_q * p.len_q
    delta = torch.empty((p.batch, p.heads_q, p.len_q), dtype=torch.float32, device=dev)
    lse2, ll = torch.empty_like(delta), torch.empty_like(delta)
    block_r = max(1, min(128, 8192 // bdv))
    kern._bwd_preprocess_kernel[(triton.cdiv(rows, block_r),)](
        out.contiguous(), dout, lse.contiguous(), delta, lse2, ll, rows, DV=p.dim_v, BLOCK_R=block_r, BLOCK_DV=bdv)

    has_mask = mask is not None
    mask_t = _mask_log2(mask) if has_mask else q  # without a mask, q stands in as a pointer never read
    mstrides = _bcast_strides(mask_t, p) if has_mask else (0, 0, 0, 0)
    want_dmask = has_mask and mask_grad
    dmask = torch.zeros(p.mask_shape, dtype=torch.float32, device=dev) if want_dmask else None
    # Never written without MASK_GRAD, but a real tensor: the dQ autotuner zeroes it between trials.
    dmask_t = dmask if dmask is not None else torch.zeros(1, dtype=torch.float32, device=dev)
    gstrides = _bcast_strides(dmask, p) if dmask is not None else (0, 0, 0, 0)
    alibi_t, softcap_log2, stride_ab, mod_flags = _mods_args(p, alibi, q)
    rot_t, rot_flags = _rotary_args(rotary, q)
    qk_flags = dict(DK_=p.dim_k, BLOCK_DK=bdk, HAS_LEFT=p.left is not None, HAS_RIGHT=p.right is not None,
                    HAS_MASK=has_mask, DOT=_dot_mode(p), **mod_flags, **rot_flags)  # what scoring q.k takes
    flags = dict(qk_flags, DV_=p.dim_v, BLOCK_DV=bdv)
    scalars = (p.scale, p.scale * kern.LOG2E, p.heads_q, p.heads_kv, p.len_q, p.len_k, diag, left, right)
    inputs = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2), *mstrides)
    tuned = _tuned(p, block_m is not None or block_n is not None)
    es = q.element_size()
    bucket = _tune_bucket(p)
    small = max(bdk, bdv) > 128 or es == 4  # smaller tiles for head dim 256 and fp32 operands

    # Rows whose LSE cannot carry log2(l) (kernels.RECOMPUTE_ABOVE): their max and sum, rescored.
    bm, bn = _fit(block_m or min(32 if small else 64, max(16, _p2(p.len_q))), block_n or (32 if small else 64),
                  lambda m, n: (m + n) * bdk * es)
    kern._bwd_row_stats_kernel[(triton.cdiv(p.len_q, bm), p.batch * p.heads_q)](
        q, k, mask_t, lse2, ll, alibi_t, q if sinks is None else sinks.float().contiguous(),
        *inputs[:6], *mstrides, *scalars[1:], softcap_log2, stride_ab, *rot_t, BLOCK_M=bm, BLOCK_N=bn,
        SINKS=sinks is not None, **qk_flags, num_warps=4, num_stages=2)

    # dK, dV. The group split is decided for 128-key programs, the largest any config uses.
    bm, bn = _fit(block_m or (16 if small else 32), block_n or (32 if small else 64),
                  lambda m, n: (n + 2 * m) * (bdk + bdv) * es)
    programs = triton.cdiv(p.len_k, 128 if tuned else bn) * p.batch * p.heads_kv
    gsplits = min(p.group, triton.cdiv(sm_count(dev), programs)) if p.group > 1 else 1
    if gsplits == 1:
        dk_t, dv_t = torch.empty_like(k), torch.empty_like(v)
    else:
        dk_t = torch.empty((gsplits, *k.shape), dtype=torch.float32, device=dev)
        dv_t = torch.empty((gsplits, *v.shape), dtype=torch.float32, device=dev)
    dkdv_args = (q, k, v, dout, lse2, ll, delta, mask_t, dk_t, dv_t, alibi_t, *inputs,
                 dk_t.stride(-4), dk_t.stride(-3), dk_t.stride(-2), dv_t.stride(-4), dv_t.stride(-3),
                 dv_t.stride(-2), dk_t.stride(0) if gsplits > 1 else 0, dv_t.stride(0) if gsplits > 1 else 0,
                 *scalars, gsplits, bucket, softcap_log2, stride_ab, *rot_t)
    if tuned:
        # Every config's BLOCK_M divides 128, so this is exact for each of them.
        tuner = _dkdv_tuned[max(64, bdk, bdv)]
        tuner[lambda meta: (triton.cdiv(p.len_k, meta["BLOCK_N"]), p.batch * p.heads_kv, gsplits)](
            *dkdv_args, EVEN_M=p.len_q % 128 == 0, **flags)
    else:
        kern._bwd_dkdv_kernel[(triton.cdiv(p.len_k, bn), p.batch * p.heads_kv, gsplits)](
            *dkdv_args, EVEN_M=p.len_q % bm == 0, BLOCK_M=bm, BLOCK_N=bn, num_warps=_warps(bn, bdk + bdv),
            num_stages=2, **flags)
    dk, dv = (dk_t.sum(0).to(q.dtype), dv_t.sum(0).to(q.dtype)) if gsplits > 1 else (dk_t, dv_t)

    # dQ (and dMask).
    dq = torch.empty_like(q)
    dq_args = (q, k, v, dout, lse2, ll, delta, mask_t, dq, dmask_t, alibi_t, *inputs, *gstrides,
               dq.stride(0), dq.stride(1), dq.stride(2), *scalars, bucket, softcap_log2, stride_ab, *rot_t)
    gflags = dict(MASK_GRAD=want_dmask, GRAD_ROWS_BCAST=want_dmask and p.mask_shape[2] == 1,
                  GRAD_COLS_BCAST=want_dmask and p.mask_shape[3] == 1)
    if tuned:
        _dq_tuned[lambda meta: (triton.cdiv(p.len_q, meta["BLOCK_M"]), p.batch * p.heads_q)](
            *dq_args, **gflags, **flags)
    else:
        bm, bn = _fit(block_m or min(32 if small else 64, max(16, _p2(p.len_q))), block_n or (32 if small else 64),
                      lambda m, n: (m + 2 * n) * (bdk + bdv) * es)
        kern._bwd_dq_kernel[(triton.cdiv(p.len_q, bm), p.batch * p.heads_q)](
            *dq_args, BLOCK_M=bm, BLOCK_N=bn, num_warps=_warps(bm, bdk), num_stages=2, **gflags, **flags)
    return dq, dk, dv, dmask
