"""``precision="int8"`` in Triton (the scheme is aule_kp/quant.py): device code and its launches.

Two kernels per call: ``_quant_k_kernel`` quantizes K (its per-channel mean, one torch reduction,
subtracted first) per block of ``BLOCK_K`` keys into int8 and a float32 scale per block;
``_int8_fwd_kernel`` quantizes its block of ``BLOCK_Q`` query rows as it loads them (one program
= one Q block, so the block's scale is the program's own max) and runs Q·Kᵀ as an int8 ``tl.dot``
into int32, the softmax in fp32 with exp2, and P·V with P in the 16-bit type of V (fp16; bf16 for
bf16 inputs) and fp32 accumulation. Masks and the band as the fp kernels (``aule_kp.triton.kernels``).
Under ``TRITON_INTERPRET=1`` the int8 dot runs on float32 copies of the integers (``DOT=2``; exact:
every partial sum stays below 2**24), since the interpreter's int8 product is not widened.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..problem import Problem
from ..quant import BLOCK_K, BLOCK_Q, check_values, pv_dtype
from . import kernels as kern
from .interpreter import interpreting
from .kernels import _LN2
from .ops import _bcast_strides, _mask_log2, _p2


@triton.jit
def _quantize(x, amax):
    """int8 values of float32 ``x`` for a block whose largest magnitude is ``amax`` (round half away)."""
    inv = tl.where(amax > 0, 127.0 / amax, 0.0)
    y = x * inv
    r = (y + tl.where(y < 0, -0.5, 0.5)).to(tl.int32)  # float -> int truncates toward zero
    return tl.minimum(tl.maximum(r, -127), 127).to(tl.int8)


@triton.jit
def _quant_k_kernel(K, Mean, K8, KS, len_k, n_blocks, s_kb, s_kh, s_kn, heads_kv,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr):
    blk = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)  # g * len_k * D passes 2**31 on large caches
    rows = blk * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_D)
    ok = (rows[:, None] < len_k) & (cols[None, :] < D)
    base = K + (g // heads_kv) * s_kb + (g % heads_kv) * s_kh
    x = tl.load(base + rows[:, None] * s_kn + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    mean = tl.load(Mean + g * D + cols, mask=cols < D, other=0.0)
    x = tl.where(ok, x - mean[None, :], 0.0)
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    tl.store(K8 + g * len_k * D + rows[:, None] * D + cols[None, :], _quantize(x, amax), mask=ok)
    tl.store(KS + g * n_blocks + blk, amax / 127.0)


@triton.jit
def _int8_fwd_kernel(Q, K8, KS, V, Mask, Out, Lse,
                     s_qb, s_qh, s_qm, s_vb, s_vh, s_vn, s_mb, s_mh, s_mm, s_mk, s_ob, s_oh, s_om,
                     qk_scale, heads_q, heads_kv, len_q, len_k, n_kblocks, diag, left, right,
                     DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr,
                     HAS_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, KBLOCK: tl.constexpr, PV_BF16: tl.constexpr,
                     DOT: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # b * s_qb, g * len_k * DK: beyond int32 for tensors over 2**31 elements
    b = bh // heads_q
    h = bh % heads_q
    g = b * heads_kv + h // (heads_q // heads_kv)
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = rows < len_q

    q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_qm + offs_dk[None, :],
                mask=row_ok[:, None] & (offs_dk[None, :] < DK), other=0.0).to(tl.float32) * qk_scale
    q_amax = tl.max(tl.max(tl.abs(q), axis=1), axis=0)
    q8 = _quantize(q, q_amax)
    q_scale = q_amax / 127.0

    lo = 0
    hi = len_k
    i_min = start_m * BLOCK_M
    i_max = tl.minimum(i_min + BLOCK_M, len_q) - 1
    if HAS_LEFT:
        lo = tl.maximum(i_min + diag - left, 0)
    if HAS_RIGHT:
        hi = tl.maximum(tl.minimum(i_max + diag + right + 1, len_k), lo)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    mask_rows = Mask + b * s_mb + h * s_mh + rows * s_mm
    v_base = V + b * s_vb + (h // (heads_q // heads_kv)) * s_vh
    for start_n in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        cols = start_n + offs_n
        k8 = tl.load(K8 + g * len_k * DK + cols[:, None] * DK + offs_dk[None, :],
                     mask=(cols[:, None] < len_k) & (offs_dk[None, :] < DK), other=0)
        if DOT == 2:
            s_int = tl.dot(q8.to(tl.float32), tl.trans(k8.to(tl.float32)))
        else:
            s_int = tl.dot(q8, tl.trans(k8)).to(tl.float32)
        k_scale = tl.load(KS + g * n_kblocks + cols // KBLOCK, mask=cols < len_k, other=0.0)
        s = s_int * (q_scale * k_scale)[None, :]
        if HAS_MASK:
            s += tl.load(mask_rows[:, None] + cols[None, :] * s_mk, mask=row_ok[:, None] & (cols[None, :] < len_k),
                         other=0.0)
        s = tl.where(kern._band_ok(rows[:, None], cols[None, :], len_k, diag, left, right, HAS_LEFT, HAS_RIGHT),
                     s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols[:, None] * s_vn + offs_dv[None, :],
                    mask=(cols[:, None] < len_k) & (offs_dv[None, :] < DV), other=0.0)
        if PV_BF16:
            p16 = p.to(tl.bfloat16)
            v16 = v
        else:
            p16 = p.to(tl.float16)
            v16 = v.to(tl.float16)
        if DOT == 2:
            pv = tl.dot(p16.to(tl.float32), v16.to(tl.float32))
        else:
            pv = tl.dot(p16, v16)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    tl.store(Out + b * s_ob + h * s_oh + rows[:, None] * s_om + offs_dv[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * _LN2, float("-inf"))
    tl.store(Lse + bh * len_q + rows, lse, mask=row_ok)


def check_tensor_values(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtype: str) -> None:
    """``aule_kp.quant.check_values`` on device tensors (one host sync)."""
    finite = torch.stack([torch.isfinite(x).all() for x in (q, k, v)]).all()
    v_max = v.abs().amax() if v.numel() else torch.zeros((), device=v.device)
    finite_host, v_max_host = (x.item() for x in (finite, v_max.float()))
    check_values(v_max_host, bool(finite_host), dtype)


def forward(problem: Problem, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            mask: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, Hq, Lq, Dv] in q's dtype, lse float32 [B, Hq, Lq])`` of the INT8 scheme on q's device."""
    p = problem
    check_tensor_values(q, k, v, p.dtype)
    # int8 tensor-core products take K (here the head dim) in steps of 32.
    bdk, bdv = max(32, _p2(p.dim_k)), max(16, _p2(p.dim_v))
    n_groups = p.batch * p.heads_kv
    n_kblocks = triton.cdiv(p.len_k, BLOCK_K)
    mean = k.float().mean(dim=2).contiguous()
    k8 = torch.empty((n_groups, p.len_k, p.dim_k), dtype=torch.int8, device=q.device)
    ks = torch.empty((n_groups, n_kblocks), dtype=torch.float32, device=q.device)
    _quant_k_kernel[(n_kblocks, n_groups)](k, mean, k8, ks, p.len_k, n_kblocks, k.stride(0), k.stride(1),
                                            k.stride(2), p.heads_kv, D=p.dim_k, BLOCK_D=bdk, BLOCK=BLOCK_K)
    out = torch.empty((p.batch, p.heads_q, p.len_q, p.dim_v), dtype=q.dtype, device=q.device)
    lse = torch.empty((p.batch, p.heads_q, p.len_q), dtype=torch.float32, device=q.device)
    has_mask = mask is not None
    mask_t = _mask_log2(mask) if has_mask else q  # without a mask, q stands in as a pointer never read
    mstrides = _bcast_strides(mask_t, p) if has_mask else (0, 0, 0, 0)
    diag, left, right = p.diag, p.left or 0, p.right or 0
    grid = (triton.cdiv(p.len_q, BLOCK_Q), p.batch * p.heads_q)
    _int8_fwd_kernel[grid](
        q, k8, ks, v, mask_t, out, lse, q.stride(0), q.stride(1), q.stride(2), v.stride(0), v.stride(1), v.stride(2),
        *mstrides, out.stride(0), out.stride(1), out.stride(2), p.scale * kern.LOG2E, p.heads_q, p.heads_kv,
        p.len_q, p.len_k, n_kblocks, diag, left, right, DK=p.dim_k, DV=p.dim_v, BLOCK_DK=bdk, BLOCK_DV=bdv,
        BLOCK_M=BLOCK_Q, BLOCK_N=64 if max(bdk, bdv) <= 128 else 32, HAS_LEFT=p.left is not None,
        HAS_RIGHT=p.right is not None, HAS_MASK=has_mask, KBLOCK=BLOCK_K, PV_BF16=pv_dtype(p.dtype) == "bfloat16",
        DOT=2 if interpreting() else 0,
        num_warps=4 if max(bdk, bdv) <= 64 else 8, num_stages=2)
    # The kernel's lse is that of the smoothed scores: add the smoothing shift scale * q.mean back.
    g = p.group
    shift = torch.einsum("bhgld,bhd->bhgl", q.float().reshape(p.batch, p.heads_kv, g, p.len_q, p.dim_k), mean)
    return out, lse + p.scale * shift.reshape(lse.shape)
