"""Triton device code: FlashAttention-2 forward (with split-KV partials), combine, and backward.

Conventions shared by every kernel here:

* Scores are kept in log2 units: ``s = (q . k) * scale * log2(e) + mask * log2(e)`` so that the
  softmax uses ``exp2`` (one MUFU instruction) and the scale costs one multiply per score; the
  host multiplies the float mask by ``log2(e)`` once.
* The band (causal / sliding window) says query ``i`` sees key ``j`` when
  ``i + diag - left <= j <= i + diag + right``; ``HAS_LEFT`` / ``HAS_RIGHT`` are False for an
  unbounded side. Key tiles are walked in three runs: tiles that some row cannot fully see (band
  edges, the key-length tail) are masked, the tiles every row sees in full are not, and tiles no
  row sees are never visited.
* Head dims are padded to powers of two (``BLOCK_DK``/``BLOCK_DV``) with masked loads/stores;
  ``tl.dot`` needs every dimension >= 16.
* Statistics and accumulators are fp32. A row that sees no key has ``l == 0``: its output is 0 and
  its log-sum-exp ``-inf``; the running max starts at ``-inf`` and is replaced by 0 wherever it is
  still ``-inf`` before it is subtracted, so hidden scores give ``exp2(-inf) = 0``, never NaN.
* Score modifiers (``aule_kp.scoremods``), constexpr-gated (off: the plain kernels): ``SOFTCAP``
  soft-caps the scaled score, ``softcap_log2 * tanh(s / softcap_log2)``, and ``ALIBI`` adds
  ``-slope * |j - (i + diag)|`` (slopes in log2 units, from the ``Alibi`` ``[rows, Hq]`` table),
  both before the mask. Through the cap, dS reaches dQ and dK times ``1 - tanh²``. ``SINKS`` folds
  one logit per query head (``Sinks``) into each row's (max, sum) once its keys are done (in the
  combine kernel for split-KV partials): the output and LSE are the softmax's with the sink column.
* Rotary embedding (``aule_kp.triton.rotary``), constexpr-gated by ``ROTARY`` (0 off, 1 halves,
  2 interleaved pairs): q and k arrive unrotated and every q block and k tile is rotated as it is
  loaded (``_load_rope``: each lane's pair partner loaded beside it, the pair rotated in fp32 at the
  row's position, rounded back to the input type for the dot). The backward kernels do the same and
  turn dQ/dK of the rotated rows into those of the unrotated ones (``_unrotate``: ``R^T``, partners
  gathered in registers) before they store them. dV needs no change.
* ``DOT`` picks the matrix-multiply flavour: 0 the native fp16/bf16 tensor-core dot; 1 exact fp32
  (``"ieee"``: the tf32 default would miss float32's tolerance by ~100x); 2 operands upcast to fp32
  first, for bf16 under ``TRITON_INTERPRET=1`` (Triton 3.9's interpreter multiplies bf16 bit
  patterns as integers in ``tl.dot``; the products of bf16 values are exact in fp32, so the result
  matches the tensor-core dot up to summation order).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # host side: scales and masks are multiplied by it before launch
# Device-side copies: jitted code reads only constexpr globals.
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)
_MINUS_2LOG2E = tl.constexpr(-2.0 * LOG2E)


@triton.jit
def _mma(a, b, acc, DOT: tl.constexpr):
    """``acc + a @ b`` (``acc`` may be None) in the flavour ``DOT`` (see the module docstring)."""
    if DOT == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif DOT == 1:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _load_tile(ptrs, rows, n_rows, cols, n_cols, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load a 2-D tile, zero-filling rows ``>= n_rows`` / cols ``>= n_cols`` only where asked:
    unmasked loads vectorise and skip the predicate on the hot path."""
    if CHECK_ROWS and CHECK_COLS:
        return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
    elif CHECK_ROWS:
        return tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    elif CHECK_COLS:
        return tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _rope_positions(pos_base, idx, ok, ROTARY: tl.constexpr):
    """The rotary positions of rows ``idx`` (``pos_base``: the batch's row of positions; 0 where
    not ``ok``, and everywhere without ``ROTARY``: then nothing is read)."""
    if ROTARY:
        return tl.load(pos_base + idx, mask=ok, other=0)
    else:
        return tl.zeros(idx.shape, tl.int32)


@triton.jit
def _rope_coeffs(Cos, Sin, pos, ok, offs_d, INVERSE: tl.constexpr, ROTARY: tl.constexpr,
                 ROT_HALF: tl.constexpr, ROT_START: tl.constexpr):
    """``(partner, c, s, m)`` such that ``y = x * c + x[:, partner] * s`` rotates the rows of a
    ``[rows, BLOCK_D]`` tile at positions ``pos`` (``R^T``, the inverse, with ``INVERSE``). ``m``
    marks the rotated lanes of the rows that are ``ok``; elsewhere ``c = 1``, ``s = 0`` and
    ``partner`` is the lane itself."""
    d = offs_d - ROT_START
    lane = (d >= 0) & (d < 2 * ROT_HALF)
    if ROTARY == 2:  # interleaved: pairs (2i, 2i+1)
        first = d % 2 == 0
        partner = tl.where(first, offs_d + 1, offs_d - 1)
        freq = d // 2
    else:  # halves: pairs (i, i + R/2)
        first = d < ROT_HALF
        partner = tl.where(first, offs_d + ROT_HALF, offs_d - ROT_HALF)
        freq = tl.where(first, d, d - ROT_HALF)
    partner = tl.where(lane, partner, offs_d)
    # y1 = x1 c - x2 s, y2 = x2 c + x1 s; the inverse flips the sign of s.
    sign = tl.where(first, -1.0, 1.0)
    if INVERSE:
        sign = -sign
    m = ok[:, None] & lane[None, :]
    at = pos[:, None] * ROT_HALF + freq[None, :]
    c = tl.load(Cos + at, mask=m, other=1.0)
    s = tl.load(Sin + at, mask=m, other=0.0) * sign[None, :]
    return partner, c, s, m


@triton.jit
def _load_rope(row_ptrs, rows, n_rows, offs_d, n_cols, pos, Cos, Sin, CHECK_ROWS: tl.constexpr,
               CHECK_COLS: tl.constexpr, ROTARY: tl.constexpr, ROT_HALF: tl.constexpr, ROT_START: tl.constexpr):
    """``_load_tile`` of the rows ``row_ptrs`` (one pointer per row, unit stride along the head dim),
    rotated at ``pos`` with ``ROTARY`` (1 halves, 2 interleaved): each lane's partner is loaded
    beside it and the pair is rotated in fp32, then rounded back to the input type (what a rotation
    stored before an unfused kernel would hold) for the dot."""
    x = _load_tile(row_ptrs[:, None] + offs_d[None, :], rows, n_rows, offs_d, n_cols, CHECK_ROWS, CHECK_COLS)
    if ROTARY:
        partner, c, s, m = _rope_coeffs(Cos, Sin, pos, rows < n_rows, offs_d, False, ROTARY, ROT_HALF, ROT_START)
        xp = tl.load(row_ptrs[:, None] + partner[None, :], mask=m, other=0.0)
        return (x.to(tl.float32) * c + xp.to(tl.float32) * s).to(x.dtype)
    else:
        return x


@triton.jit
def _unrotate(g, pos, ok, offs_d, Cos, Sin, ROTARY: tl.constexpr, ROT_HALF: tl.constexpr, ROT_START: tl.constexpr):
    """fp32 gradient tile ``g`` of rotated rows turned into the gradient of the unrotated ones:
    ``R(pos)^T g`` (the rotation is linear, its adjoint its inverse), partners gathered in registers."""
    if ROTARY:
        partner, c, s, _ = _rope_coeffs(Cos, Sin, pos, ok, offs_d, True, ROTARY, ROT_HALF, ROT_START)
        gp = tl.gather(g, tl.broadcast_to(partner[None, :], g.shape), axis=1)
        return g * c + gp * s
    else:
        return g


@triton.jit
def _band_ok(rows, cols, len_k, diag, left, right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Booleans broadcast from ``rows`` and ``cols`` (one a column, the other a row vector): the key
    exists and the band lets the query see it."""
    ok = cols < len_k
    rel = cols - (rows + diag)
    if HAS_LEFT:
        ok = ok & (rel >= -left)
    if HAS_RIGHT:
        ok = ok & (rel <= right)
    return ok


@triton.jit
def _tanh(x):
    """tanh that stays finite for every finite x: ``(1 - e) / (1 + e)``, ``e = exp(-2|x|)``."""
    e = tl.math.exp2(tl.abs(x) * _MINUS_2LOG2E)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _scores(a, b, qk_scale, mask_r, r_ok, c, stride_mk, len_k, r_pos, slope_r, softcap_log2, diag,
            HAS_MASK: tl.constexpr, DOT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """``(s, dcap)``: one tile of scores in log2 units, ``(a . b^T) * qk_scale``, soft-capped with
    ``SOFTCAP``, plus with ``ALIBI`` the bias ``-slope_r * |c - r_pos - diag|`` and with ``HAS_MASK``
    the float mask read at ``mask_r + c * stride_mk`` where ``r_ok & (c < len_k)`` (0 elsewhere);
    ``dcap`` is the cap's derivative ``1 - tanh²`` (1.0 without). ``c`` (key indices) and
    ``mask_r``/``r_ok``/``r_pos``/``slope_r`` (per query row; ``slope_r`` may be one scalar) are one a
    row, the other a column vector: ``[queries, keys]`` tiles have ``a = q``, ``b = k``; the dK/dV
    kernel's ``[keys, queries]`` tiles ``a = k``, ``b = q``. Band and key-length masking
    (``_band_ok``) is left to the caller: the forward applies it to the scores, the backward to
    ``exp2(s - lse)``."""
    s = _mma(a, tl.trans(b), None, DOT) * qk_scale
    dcap = 1.0
    if SOFTCAP:
        t = _tanh(s / softcap_log2)
        s = softcap_log2 * t
        dcap = 1.0 - t * t
    if ALIBI:
        s -= slope_r * tl.abs(c - r_pos - diag).to(tl.float32)
    if HAS_MASK:
        s += tl.load(mask_r + c * stride_mk, mask=r_ok & (c < len_k), other=0.0)
    return s, dcap


@triton.jit
def _tile_runs(lo, hi, c_lo, c_hi, BLOCK: tl.constexpr):
    """Split the tiles of width ``BLOCK`` that cover ``[lo, hi)`` into three runs
    ``[t_lo, f_lo) [f_lo, f_hi) [f_hi, t_hi)``: the middle run holds the tiles inside ``[c_lo, c_hi)``
    (needing no mask), the outer runs the rest. All inputs are >= 0."""
    t_lo = lo // BLOCK
    t_hi = (hi + BLOCK - 1) // BLOCK
    f_lo = tl.minimum(tl.maximum((c_lo + BLOCK - 1) // BLOCK, t_lo), t_hi)
    f_hi = tl.minimum(tl.maximum(c_hi // BLOCK, f_lo), t_hi)
    return t_lo, f_lo, f_hi, t_hi


@triton.jit
def _query_head(pid_h, heads_q, heads_kv):
    """``(b64, head, kv head, b64 * heads_q + head)`` of program axis ``pid_h`` over ``B * Hq``; the
    batch in int64, so that offsets past 2**31 elements stay exact."""
    head = pid_h % heads_q
    b64 = (pid_h // heads_q).to(tl.int64)
    return b64, head, head // (heads_q // heads_kv), b64 * heads_q + head


@triton.jit
def _row_block_tiles(i_min, i_max, len_k, diag, left, right, BLOCK_N: tl.constexpr,
                     HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Tile runs (see ``_tile_runs``) for query rows ``[i_min, i_max]``: keys any of them may see,
    ``[lo, hi)``, and keys every one of them sees, ``[c_lo, c_hi)``, under the band."""
    lo = 0
    hi = len_k
    c_lo = 0
    c_hi = len_k
    if HAS_LEFT:
        lo = tl.maximum(i_min + diag - left, 0)
        c_lo = tl.maximum(i_max + diag - left, 0)
    if HAS_RIGHT:
        hi = tl.maximum(tl.minimum(i_max + diag + right + 1, len_k), lo)
        c_hi = tl.maximum(tl.minimum(i_min + diag + right + 1, len_k), 0)
    return _tile_runs(lo, hi, c_lo, c_hi, BLOCK_N)


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _fwd_run(acc, l_i, m_i, q, k_base, v_base, mask_rows, t_start, t_end,
             stride_kn, stride_vn, stride_mk, qk_scale, pos, row_ok, len_k, diag, left, right, slope, softcap_log2,
             kpos_base, Cos, Sin,
             BLOCK_N: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
             BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
             MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
             HAS_MASK: tl.constexpr, DOT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
             ROTARY: tl.constexpr, ROT_HALF: tl.constexpr, ROT_START: tl.constexpr):
    """Online softmax of one block of query rows over key tiles ``[t_start, t_end)``.

    ``MASKED`` tiles apply the band and the key-length bound; the others are fully visible.
    ``mask_rows`` holds each row's pointer into the float mask (only read when ``HAS_MASK``);
    ``row_ok`` is False for the block's padding rows. With ``ROTARY`` each key tile is rotated at
    its positions (``kpos_base``) as it is loaded (``q`` comes rotated).
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    for t in range(t_start, t_end):
        cols = t * BLOCK_N + offs_n
        kpos = _rope_positions(kpos_base, cols, cols < len_k, ROTARY)
        k = _load_rope(k_base + cols * stride_kn, cols, len_k, offs_dk, DK, kpos, Cos, Sin,
                       MASKED, BLOCK_DK != DK, ROTARY, ROT_HALF, ROT_START)
        if MASKED or HAS_MASK or SOFTCAP or ALIBI:
            s, _ = _scores(q, k, qk_scale, mask_rows[:, None], row_ok[:, None], cols[None, :], stride_mk, len_k,
                           pos[:, None], slope[:, None], softcap_log2, diag, HAS_MASK, DOT, SOFTCAP, ALIBI)
            if MASKED:
                ok = _band_ok(pos[:, None], cols[None, :], len_k, diag, left, right, HAS_LEFT, HAS_RIGHT)
                s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_use[:, None])
        else:
            # No band, mask or modifier here: the tutorial's fused form (the scale applied to the
            # row's extreme, and folded into exp2's argument). A negative scale turns the smallest
            # product into the largest score. Scores that overflow to -inf (a huge scale) hide their
            # keys as elsewhere: a row still at -inf takes 0, not -inf - -inf = NaN.
            qk = _mma(q, tl.trans(k), None, DOT)
            if qk_scale >= 0:
                extreme = tl.max(qk, 1)
            else:
                extreme = tl.min(qk, 1)
            m_new = tl.maximum(m_i, extreme * qk_scale)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk * qk_scale - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base + cols[:, None] * stride_vn + offs_dv[None, :], cols, len_k, offs_dv, DV,
                       MASKED, BLOCK_DV != DV)
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], DOT)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["tune_bucket"])
def _fwd_kernel(Q, K, V, Mask, Out, LSE, Alibi, Sinks,
                stride_qb, stride_qh, stride_qm,
                stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn,
                stride_mb, stride_mh, stride_mq, stride_mk,
                stride_ob, stride_oh, stride_om, stride_os, stride_ls,
                qk_scale, heads_q, heads_kv, len_q, len_k, diag, left, right, num_splits, tune_bucket,
                softcap_log2, stride_ab, Cos, Sin, QPos, KPos, stride_qpb, stride_kpb,
                DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                PACK_GQA: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                HAS_MASK: tl.constexpr, DOT: tl.constexpr, SOFTCAP: tl.constexpr = False,
                ALIBI: tl.constexpr = False, SINKS: tl.constexpr = False, ROTARY: tl.constexpr = 0,
                ROT_HALF: tl.constexpr = 1, ROT_START: tl.constexpr = 0):
    """One program: one block of query rows x one split of its keys.

    Grid ``(row blocks, B * heads, splits)``. Without ``PACK_GQA`` a block is ``BLOCK_M`` positions of
    one query head (grid axis 1 = ``B * Hq``, heaviest causal blocks first). With ``PACK_GQA`` the
    block holds every (query head of one kv head, position) pair, ``group * Lq <= BLOCK_M`` rows, so
    decoding reads each K/V tile once for the whole group (axis 1 = ``B * Hkv``, one block).
    ``Out``/``LSE`` are the final outputs when ``num_splits == 1``, else fp32 per-split partials
    (normalised output and natural-log LSE, ``stride_os``/``stride_ls`` apart) for the combine kernel.
    ``tune_bucket`` only keys the autotuner (power-of-2 buckets of the lengths). ``Alibi``: slopes in
    log2 units, ``stride_ab`` apart per batch (0: shared), read with ``ALIBI`` only; ``Sinks``: one
    logit per query head (natural units), folded in with ``SINKS`` (never with split partials).
    ``ROTARY`` (1 halves, 2 interleaved) rotates q and k as they are loaded (``_load_rope``): lanes
    ``[ROT_START, ROT_START + 2 ROT_HALF)`` at the positions ``QPos``/``KPos`` (int ``[B, L]``,
    ``stride_qpb``/``stride_kpb`` apart, 0: shared) of the float32 tables ``Cos``/``Sin``
    ``[P, ROT_HALF]``.
    """
    group = heads_q // heads_kv
    pid_h = tl.program_id(1)
    split = tl.program_id(2)
    offs = tl.arange(0, BLOCK_M)
    if PACK_GQA:
        b = pid_h // heads_kv
        kvh = pid_h % heads_kv
        head = kvh * group + offs // len_q
        pos = offs % len_q
        row, rows = offs, group * len_q  # block row and the rows that exist
        i_min = 0
        i_max = len_q - 1
    else:
        # Reversed: under causal masking the last blocks see the most keys; start them first.
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        b = pid_h // heads_q
        head = pid_h % heads_q
        kvh = head // group
        pos = pid_m * BLOCK_M + offs
        row, rows = pos, len_q
        i_min = pid_m * BLOCK_M
        i_max = tl.minimum(i_min + BLOCK_M, len_q) - 1
    row_ok = row < rows
    b64 = b.to(tl.int64)
    offs_dk = tl.arange(0, BLOCK_DK)
    q_rows = Q + b64 * stride_qb + head.to(tl.int64) * stride_qh + pos * stride_qm
    qpos = _rope_positions(QPos + b64 * stride_qpb, pos, row_ok, ROTARY)
    q = _load_rope(q_rows, row, rows, offs_dk, DK, qpos, Cos, Sin, True, BLOCK_DK != DK, ROTARY, ROT_HALF,
                   ROT_START)
    kpos_base = KPos + b64 * stride_kpb
    k_base = K + b64 * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + kvh.to(tl.int64) * stride_vh
    mask_rows = Mask + b64 * stride_mb + head * stride_mh + pos * stride_mq
    slope = tl.zeros([BLOCK_M], tl.float32)
    if ALIBI:
        slope = tl.load(Alibi + b64 * stride_ab + head + tl.zeros([BLOCK_M], tl.int32), mask=row_ok, other=0.0)

    t_lo, f_lo, f_hi, t_hi = _row_block_tiles(i_min, i_max, len_k, diag, left, right, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    per = (t_hi - t_lo + num_splits - 1) // num_splits
    s_lo = t_lo + split * per
    s_hi = tl.minimum(s_lo + per, t_hi)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    acc, l_i, m_i = _fwd_run(acc, l_i, m_i, q, k_base, v_base, mask_rows,
                             tl.maximum(t_lo, s_lo), tl.minimum(f_lo, s_hi),
                             stride_kn, stride_vn, stride_mk, qk_scale, pos, row_ok, len_k, diag, left, right,
                             slope, softcap_log2, kpos_base, Cos, Sin, BLOCK_N, DK, DV, BLOCK_DK, BLOCK_DV, True,
                             HAS_LEFT, HAS_RIGHT, HAS_MASK, DOT, SOFTCAP, ALIBI, ROTARY, ROT_HALF, ROT_START)
    acc, l_i, m_i = _fwd_run(acc, l_i, m_i, q, k_base, v_base, mask_rows,
                             tl.maximum(f_lo, s_lo), tl.minimum(f_hi, s_hi),
                             stride_kn, stride_vn, stride_mk, qk_scale, pos, row_ok, len_k, diag, left, right,
                             slope, softcap_log2, kpos_base, Cos, Sin, BLOCK_N, DK, DV, BLOCK_DK, BLOCK_DV, False,
                             HAS_LEFT, HAS_RIGHT, HAS_MASK, DOT, SOFTCAP, ALIBI, ROTARY, ROT_HALF, ROT_START)
    acc, l_i, m_i = _fwd_run(acc, l_i, m_i, q, k_base, v_base, mask_rows,
                             tl.maximum(f_hi, s_lo), tl.minimum(t_hi, s_hi),
                             stride_kn, stride_vn, stride_mk, qk_scale, pos, row_ok, len_k, diag, left, right,
                             slope, softcap_log2, kpos_base, Cos, Sin, BLOCK_N, DK, DV, BLOCK_DK, BLOCK_DV, True,
                             HAS_LEFT, HAS_RIGHT, HAS_MASK, DOT, SOFTCAP, ALIBI, ROTARY, ROT_HALF, ROT_START)

    if SINKS:
        sink = tl.load(Sinks + head + tl.zeros([BLOCK_M], tl.int32), mask=row_ok, other=0.0) * _LOG2E
        m_new = tl.maximum(m_i, sink)
        f = tl.math.exp2(m_i - m_new)
        l_i = l_i * f + tl.math.exp2(sink - m_new)
        acc = acc * f[:, None]
        m_i = m_new
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_i)) * _LN2, float("-inf"))
    offs_dv = tl.arange(0, BLOCK_DV)
    o_rows = Out + split.to(tl.int64) * stride_os + b64 * stride_ob + head * stride_oh + pos * stride_om
    tl.store(o_rows[:, None] + offs_dv[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + split.to(tl.int64) * stride_ls + (b64 * heads_q + head) * len_q + pos, lse, mask=row_ok)


@triton.jit
def _combine_kernel(OPart, LPart, Out, LSE, Sinks, rows, num_splits, heads_q, len_q,
                    DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr, SINKS: tl.constexpr = False):
    """Merge split-KV partials of one query row: ``lse = logsumexp_s(lse_s)``,
    ``out = sum_s exp(lse_s - lse) * out_s``. Partials are ``[splits, rows, DV]`` / ``[splits, rows]``
    (rows ``[B, Hq, Lq]`` in order). With ``SINKS`` the row's head's sink joins the sum as one more
    split whose output is 0."""
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    lse_s = tl.load(LPart + offs_s * rows + row, mask=offs_s < num_splits, other=float("-inf"))
    m = tl.max(lse_s, 0)
    if SINKS:
        sink = tl.load(Sinks + (row // len_q) % heads_q)
        m = tl.maximum(m, sink)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.exp(lse_s - m_use), 0)
    if SINKS:
        total += tl.exp(sink - m_use)
    lse = tl.where(total > 0.0, m_use + tl.log(total), float("-inf"))
    offs_d = tl.arange(0, BLOCK_DV)
    acc = tl.zeros([BLOCK_DV], tl.float32)
    if total > 0.0:
        for s in range(num_splits):
            w = tl.exp(tl.load(LPart + s * rows + row) - lse)
            acc += w * tl.load(OPart + (s * rows + row) * DV + offs_d, mask=offs_d < DV, other=0.0)
    tl.store(Out + row * DV + offs_d, acc.to(Out.dtype.element_ty), mask=offs_d < DV)
    tl.store(LSE + row, lse)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _bwd_preprocess_kernel(Out, DO, LSE, Delta, LSE2, LL, rows,
                           DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr):
    """``Delta = rowsum(dO * O)`` and the row statistics ``(LSE2, LL)`` with which the backward
    kernels take ``P = exp2((s - LSE2) - LL)``: the LSE in log2 units and 0, ``+inf`` for rows that
    saw no key so that every P of such a row is 0 (``Out`` and ``DO`` are ``[rows, DV]``). Rows whose
    LSE is too large to carry ``log2(l)`` get both recomputed (``_bwd_row_stats_kernel``)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_DV)
    r64 = r.to(tl.int64)
    o = _load_tile(Out + r64[:, None] * DV + d[None, :], r, rows, d, DV, True, BLOCK_DV != DV).to(tl.float32)
    do = _load_tile(DO + r64[:, None] * DV + d[None, :], r, rows, d, DV, True, BLOCK_DV != DV).to(tl.float32)
    tl.store(Delta + r, tl.sum(o * do, 1), mask=r < rows)
    lse = tl.load(LSE + r, mask=r < rows, other=0.0)
    tl.store(LSE2 + r, tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E), mask=r < rows)
    tl.store(LL + r, tl.zeros([BLOCK_R], tl.float32), mask=r < rows)


#: |LSE| in log2 units above which the backward recomputes a row's statistics (as the Vulkan
#: backward's fa2_bwd_pre.comp): below it a float32 ulp is at most 2^-13, so ``lse * log2(e)``
#: rounded twice is within ~2.5e-4 of the forward's ``m + log2(l)``; far above it ``log2(l)`` is
#: lost entirely (rows of a mask saturated at float32's largest magnitude: P was 0 or inf there).
RECOMPUTE_ABOVE = tl.constexpr(1024.0)


@triton.jit
def _bwd_row_stats_kernel(Q, K, Mask, LSE2, LL, Alibi, Sinks,
                          stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                          stride_mb, stride_mh, stride_mq, stride_mk,
                          qk_scale, heads_q, heads_kv, len_q, len_k, diag, left, right,
                          softcap_log2, stride_ab, Cos, Sin, QPos, KPos, stride_qpb, stride_kpb,
                          DK_: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, DOT: tl.constexpr,
                          SOFTCAP: tl.constexpr = False, ALIBI: tl.constexpr = False, SINKS: tl.constexpr = False,
                          ROTARY: tl.constexpr = 0, ROT_HALF: tl.constexpr = 1, ROT_START: tl.constexpr = 0):
    """The forward's row max ``m`` and ``log2(l)`` (log2 units, sinks folded in) into ``LSE2``/``LL``
    for the rows of one block of ``BLOCK_M`` query rows of one head whose ``|LSE2|`` is above
    ``RECOMPUTE_ABOVE``, scoring them as the forward does; a block without such a row reads nothing
    more. Grid ``(row blocks, B * Hq)``."""
    pid_m = tl.program_id(0)
    b64, head, kvh, bh = _query_head(tl.program_id(1), heads_q, heads_kv)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < len_q
    lse2 = tl.load(LSE2 + bh * len_q + rows, mask=row_ok, other=0.0)
    need = row_ok & (tl.abs(lse2) > RECOMPUTE_ABOVE) & (lse2 < float("inf"))
    if tl.max(need.to(tl.int32), 0) > 0:
        offs_dk = tl.arange(0, BLOCK_DK)
        offs_n = tl.arange(0, BLOCK_N)
        qpos = _rope_positions(QPos + b64 * stride_qpb, rows, row_ok, ROTARY)
        q = _load_rope(Q + b64 * stride_qb + head * stride_qh + rows * stride_qm, rows, len_q, offs_dk, DK_, qpos,
                       Cos, Sin, True, BLOCK_DK != DK_, ROTARY, ROT_HALF, ROT_START)
        k_base = K + b64 * stride_kb + kvh.to(tl.int64) * stride_kh
        kpos_base = KPos + b64 * stride_kpb
        mask_rows = Mask + b64 * stride_mb + head * stride_mh + rows * stride_mq
        slope = 0.0
        if ALIBI:
            slope = tl.load(Alibi + b64 * stride_ab + head)
        i_min = pid_m * BLOCK_M
        i_max = tl.minimum(i_min + BLOCK_M, len_q) - 1
        t_lo, _, _, t_hi = _row_block_tiles(i_min, i_max, len_k, diag, left, right, BLOCK_N, HAS_LEFT, HAS_RIGHT)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        for t in range(t_lo, t_hi):
            cols = t * BLOCK_N + offs_n
            kpos = _rope_positions(kpos_base, cols, cols < len_k, ROTARY)
            k = _load_rope(k_base + cols * stride_kn, cols, len_k, offs_dk, DK_, kpos, Cos, Sin,
                           True, BLOCK_DK != DK_, ROTARY, ROT_HALF, ROT_START)
            s, _ = _scores(q, k, qk_scale, mask_rows[:, None], row_ok[:, None], cols[None, :], stride_mk, len_k,
                           rows[:, None], slope, softcap_log2, diag, HAS_MASK, DOT, SOFTCAP, ALIBI)
            ok = _band_ok(rows[:, None], cols[None, :], len_k, diag, left, right, HAS_LEFT, HAS_RIGHT)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.math.exp2(m_i - m_use) + tl.sum(tl.math.exp2(s - m_use[:, None]), 1)
            m_i = m_new
        if SINKS:
            sink = tl.load(Sinks + head) * _LOG2E
            m_new = tl.maximum(m_i, sink)
            l_i = l_i * tl.math.exp2(m_i - m_new) + tl.math.exp2(sink - m_new)
            m_i = m_new
        tl.store(LSE2 + bh * len_q + rows, m_i, mask=need)
        tl.store(LL + bh * len_q + rows, tl.math.log2(tl.where(need, l_i, 1.0)), mask=need)


@triton.jit
def _dkdv_run(dk, dv, k, v, q_base, do_base, lse_base, ll_base, delta_base, mask_base, t_start, t_end,
              stride_qm, stride_dom, stride_mq, stride_mk, qk_scale, cols, len_q, len_k, diag, left, right,
              slope, softcap_log2, qpos_base, Cos, Sin,
              BLOCK_M: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
              BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
              MASKED: tl.constexpr, EVEN_M: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
              HAS_MASK: tl.constexpr, DOT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
              ROTARY: tl.constexpr, ROT_HALF: tl.constexpr, ROT_START: tl.constexpr):
    """Accumulate one key block's ``dK`` (unscaled, of the rotated keys under ``ROTARY``) and ``dV``
    over query tiles ``[t_start, t_end)`` of one query head, in transposed form (``[keys, queries]``
    score tiles); query tiles are rotated as they are loaded."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    for t in range(t_start, t_end):
        rows = t * BLOCK_M + offs_m
        qpos = _rope_positions(qpos_base, rows, rows < len_q, ROTARY)
        q = _load_rope(q_base + rows * stride_qm, rows, len_q, offs_dk, DK, qpos, Cos, Sin,
                       not EVEN_M, BLOCK_DK != DK, ROTARY, ROT_HALF, ROT_START)
        lse2 = tl.load(lse_base + rows, mask=rows < len_q, other=float("inf"))
        ll = tl.load(ll_base + rows, mask=rows < len_q, other=0.0)
        s_t, dcap = _scores(k, q, qk_scale, mask_base + rows[None, :] * stride_mq, rows[None, :] < len_q,
                            cols[:, None], stride_mk, len_k, rows[None, :], slope, softcap_log2, diag,
                            HAS_MASK, DOT, SOFTCAP, ALIBI)
        p_t = tl.math.exp2((s_t - lse2[None, :]) - ll[None, :])
        if MASKED:
            ok = _band_ok(rows[None, :], cols[:, None], len_k, diag, left, right, HAS_LEFT, HAS_RIGHT)
            p_t = tl.where(ok, p_t, 0.0)
        do = _load_tile(do_base + rows[:, None] * stride_dom + offs_dv[None, :], rows, len_q, offs_dv, DV,
                        not EVEN_M, BLOCK_DV != DV)
        dv = _mma(p_t.to(do.dtype), do, dv, DOT)
        delta = tl.load(delta_base + rows, mask=rows < len_q, other=0.0)
        dp_t = _mma(v, tl.trans(do), None, DOT)
        ds_t = p_t * (dp_t - delta[None, :])
        if SOFTCAP:
            ds_t = ds_t * dcap
        dk = _mma(ds_t.to(q.dtype), q, dk, DOT)
    return dk, dv


@triton.jit(do_not_specialize=["tune_bucket"])
def _bwd_dkdv_kernel(Q, K, V, DO, LSE2, LL, Delta, Mask, DK, DV, Alibi,
                     stride_qb, stride_qh, stride_qm,
                     stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn,
                     stride_dob, stride_doh, stride_dom,
                     stride_mb, stride_mh, stride_mq, stride_mk,
                     stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn, stride_dks, stride_dvs,
                     sm_scale, qk_scale, heads_q, heads_kv, len_q, len_k, diag, left, right, group_splits, tune_bucket,
                     softcap_log2, stride_ab, Cos, Sin, QPos, KPos, stride_qpb, stride_kpb,
                     DK_: tl.constexpr, DV_: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr,
                     HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, DOT: tl.constexpr,
                     SOFTCAP: tl.constexpr = False, ALIBI: tl.constexpr = False, ROTARY: tl.constexpr = 0,
                     ROT_HALF: tl.constexpr = 1, ROT_START: tl.constexpr = 0):
    """``dK``, ``dV`` of one block of ``BLOCK_N`` keys of one kv head, summed over the query heads
    that share it (GQA) in registers. Grid ``(key blocks, B * Hkv, group splits)``: with
    ``group_splits > 1`` each program sums a slice of the group into fp32 partials
    (``stride_dks``/``stride_dvs`` apart), which the host adds (used when ``B * Hkv`` key blocks
    would not fill the GPU). With ``ROTARY`` (see ``_fwd_kernel``) q and k are rotated as they are
    loaded and ``dK`` of the rotated keys is rotated back (``_unrotate``) before it is stored.
    ``tune_bucket`` only keys the autotuner."""
    pid_n = tl.program_id(0)
    pid_h = tl.program_id(1)
    gsplit = tl.program_id(2)
    b = pid_h // heads_kv
    kvh = pid_h % heads_kv
    group = heads_q // heads_kv
    b64 = b.to(tl.int64)
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    kpos = _rope_positions(KPos + b64 * stride_kpb, cols, cols < len_k, ROTARY)
    k = _load_rope(K + b64 * stride_kb + kvh.to(tl.int64) * stride_kh + cols * stride_kn, cols, len_k, offs_dk, DK_,
                   kpos, Cos, Sin, True, BLOCK_DK != DK_, ROTARY, ROT_HALF, ROT_START)
    qpos_base = QPos + b64 * stride_qpb
    v = _load_tile(V + b64 * stride_vb + kvh.to(tl.int64) * stride_vh + cols[:, None] * stride_vn + offs_dv[None, :],
                   cols, len_k, offs_dv, DV_, True, BLOCK_DV != DV_)

    # Query rows that may see a key of the block: [lo, hi); rows that see all of them: [c_lo, c_hi).
    n_last = tl.minimum(n0 + BLOCK_N, len_k) - 1
    lo = 0
    hi = len_q
    c_lo = 0
    c_hi = len_q
    if HAS_RIGHT:
        lo = tl.minimum(tl.maximum(n0 - diag - right, 0), len_q)
        c_lo = tl.maximum(n_last - diag - right, 0)
    if HAS_LEFT:
        hi = tl.maximum(tl.minimum(n_last - diag + left + 1, len_q), lo)
        c_hi = tl.maximum(tl.minimum(n0 - diag + left + 1, len_q), 0)
    if n0 + BLOCK_N > len_k:
        c_hi = 0  # the block runs past the last key: every tile needs the key-length mask
    t_lo, f_lo, f_hi, t_hi = _tile_runs(lo, hi, c_lo, c_hi, BLOCK_M)

    dk = tl.zeros([BLOCK_N, BLOCK_DK], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    per = (group + group_splits - 1) // group_splits
    for g in range(gsplit * per, tl.minimum(gsplit * per + per, group)):
        h = kvh * group + g
        bh = b64 * heads_q + h
        q_base = Q + b64 * stride_qb + h * stride_qh
        do_base = DO + b64 * stride_dob + h * stride_doh
        mask_base = Mask + b64 * stride_mb + h * stride_mh
        slope = 0.0
        if ALIBI:
            slope = tl.load(Alibi + b64 * stride_ab + h)
        dk, dv = _dkdv_run(dk, dv, k, v, q_base, do_base, LSE2 + bh * len_q, LL + bh * len_q, Delta + bh * len_q,
                           mask_base,
                           t_lo, f_lo, stride_qm, stride_dom, stride_mq, stride_mk, qk_scale, cols,
                           len_q, len_k, diag, left, right, slope, softcap_log2, qpos_base, Cos, Sin, BLOCK_M, DK_,
                           DV_, BLOCK_DK, BLOCK_DV, True, EVEN_M, HAS_LEFT, HAS_RIGHT, HAS_MASK, DOT, SOFTCAP, ALIBI,
                           ROTARY, ROT_HALF, ROT_START)
        dk, dv = _dkdv_run(dk, dv, k, v, q_base, do_base, LSE2 + bh * len_q, LL + bh * len_q, Delta + bh * len_q,
                           mask_base,
                           f_lo, f_hi, stride_qm, stride_dom, stride_mq, stride_mk, qk_scale, cols,
                           len_q, len_k, diag, left, right, slope, softcap_log2, qpos_base, Cos, Sin, BLOCK_M, DK_,
                           DV_, BLOCK_DK, BLOCK_DV, False, EVEN_M, HAS_LEFT, HAS_RIGHT, HAS_MASK, DOT, SOFTCAP, ALIBI,
                           ROTARY, ROT_HALF, ROT_START)
        dk, dv = _dkdv_run(dk, dv, k, v, q_base, do_base, LSE2 + bh * len_q, LL + bh * len_q, Delta + bh * len_q,
                           mask_base,
                           f_hi, t_hi, stride_qm, stride_dom, stride_mq, stride_mk, qk_scale, cols,
                           len_q, len_k, diag, left, right, slope, softcap_log2, qpos_base, Cos, Sin, BLOCK_M, DK_,
                           DV_, BLOCK_DK, BLOCK_DV, True, EVEN_M, HAS_LEFT, HAS_RIGHT, HAS_MASK, DOT, SOFTCAP, ALIBI,
                           ROTARY, ROT_HALF, ROT_START)
    dk = _unrotate(dk * sm_scale, kpos, cols < len_k, offs_dk, Cos, Sin, ROTARY, ROT_HALF, ROT_START)
    split = gsplit.to(tl.int64)
    tl.store(DK + split * stride_dks + b64 * stride_dkb + kvh * stride_dkh
             + cols[:, None] * stride_dkn + offs_dk[None, :],
             dk.to(DK.dtype.element_ty), mask=(cols[:, None] < len_k) & (offs_dk[None, :] < DK_))
    tl.store(DV + split * stride_dvs + b64 * stride_dvb + kvh * stride_dvh
             + cols[:, None] * stride_dvn + offs_dv[None, :],
             dv.to(DV.dtype.element_ty), mask=(cols[:, None] < len_k) & (offs_dv[None, :] < DV_))


@triton.jit
def _dq_run(dq, q, do, lse2, ll, delta, k_base, v_base, mask_rows, dmask_rows, t_start, t_end,
            stride_kn, stride_vn, stride_mk, stride_gk, qk_scale, rows, row_ok, len_k, diag, left, right,
            slope, softcap_log2, kpos_base, Cos, Sin,
            BLOCK_N: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
            BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
            MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
            HAS_MASK: tl.constexpr, MASK_GRAD: tl.constexpr, GRAD_ROWS_BCAST: tl.constexpr,
            GRAD_COLS_BCAST: tl.constexpr, DOT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
            ROTARY: tl.constexpr, ROT_HALF: tl.constexpr, ROT_START: tl.constexpr):
    """Accumulate one query block's ``dQ`` (unscaled; of the rotated queries under ``ROTARY``, key
    tiles then rotated as they are loaded) over key tiles ``[t_start, t_end)``; with ``MASK_GRAD``
    also add ``dS`` into the mask gradient (atomics: broadcast dims share cells)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    for t in range(t_start, t_end):
        cols = t * BLOCK_N + offs_n
        kpos = _rope_positions(kpos_base, cols, cols < len_k, ROTARY)
        k = _load_rope(k_base + cols * stride_kn, cols, len_k, offs_dk, DK, kpos, Cos, Sin,
                       MASKED, BLOCK_DK != DK, ROTARY, ROT_HALF, ROT_START)
        v = _load_tile(v_base + cols[:, None] * stride_vn + offs_dv[None, :], cols, len_k, offs_dv, DV,
                       MASKED, BLOCK_DV != DV)
        s, dcap = _scores(q, k, qk_scale, mask_rows[:, None], row_ok[:, None], cols[None, :], stride_mk, len_k,
                          rows[:, None], slope, softcap_log2, diag, HAS_MASK, DOT, SOFTCAP, ALIBI)
        p = tl.math.exp2((s - lse2[:, None]) - ll[:, None])
        if MASKED:
            ok = _band_ok(rows[:, None], cols[None, :], len_k, diag, left, right, HAS_LEFT, HAS_RIGHT)
            p = tl.where(ok, p, 0.0)
        dp = _mma(do, tl.trans(v), None, DOT)
        ds = p * (dp - delta[:, None])
        dsc = ds
        if SOFTCAP:
            dsc = ds * dcap
        dq = _mma(dsc.to(k.dtype), k, dq, DOT)
        if MASK_GRAD:
            # dS is the gradient of the (natural-unit) scores, hence of an additive mask. Reduce the
            # tile over broadcast dims first: fewer atomics on the same cell.
            if GRAD_ROWS_BCAST and GRAD_COLS_BCAST:
                tl.atomic_add(dmask_rows, tl.sum(tl.sum(ds, 1), 0))
            elif GRAD_ROWS_BCAST:
                tl.atomic_add(dmask_rows + cols * stride_gk, tl.sum(ds, 0), mask=cols < len_k)
            elif GRAD_COLS_BCAST:
                tl.atomic_add(dmask_rows, tl.sum(ds, 1), mask=row_ok)
            else:
                tl.atomic_add(dmask_rows[:, None] + cols[None, :] * stride_gk, ds,
                              mask=row_ok[:, None] & (cols[None, :] < len_k))
    return dq


@triton.jit(do_not_specialize=["tune_bucket"])
def _bwd_dq_kernel(Q, K, V, DO, LSE2, LL, Delta, Mask, DQ, DMask, Alibi,
                   stride_qb, stride_qh, stride_qm,
                   stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn,
                   stride_dob, stride_doh, stride_dom,
                   stride_mb, stride_mh, stride_mq, stride_mk,
                   stride_gb, stride_gh, stride_gq, stride_gk,
                   stride_dqb, stride_dqh, stride_dqm,
                   sm_scale, qk_scale, heads_q, heads_kv, len_q, len_k, diag, left, right, tune_bucket,
                   softcap_log2, stride_ab, Cos, Sin, QPos, KPos, stride_qpb, stride_kpb,
                   DK_: tl.constexpr, DV_: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr,
                   MASK_GRAD: tl.constexpr, GRAD_ROWS_BCAST: tl.constexpr, GRAD_COLS_BCAST: tl.constexpr,
                   DOT: tl.constexpr, SOFTCAP: tl.constexpr = False, ALIBI: tl.constexpr = False,
                   ROTARY: tl.constexpr = 0, ROT_HALF: tl.constexpr = 1, ROT_START: tl.constexpr = 0):
    """``dQ`` of one block of ``BLOCK_M`` query rows of one head (and ``dMask`` when asked); grid
    ``(row blocks, B * Hq)``. ``DMask`` strides are 0 on the mask's broadcast dims; ``tune_bucket``
    only keys the autotuner. ``ROTARY`` as in the dK/dV kernel: ``dQ`` is rotated back before it is
    stored."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    b64, h, kvh, bh = _query_head(tl.program_id(1), heads_q, heads_kv)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < len_q
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    qpos = _rope_positions(QPos + b64 * stride_qpb, rows, row_ok, ROTARY)
    q = _load_rope(Q + b64 * stride_qb + h * stride_qh + rows * stride_qm, rows, len_q, offs_dk, DK_, qpos, Cos, Sin,
                   True, BLOCK_DK != DK_, ROTARY, ROT_HALF, ROT_START)
    kpos_base = KPos + b64 * stride_kpb
    do = _load_tile(DO + b64 * stride_dob + h * stride_doh + rows[:, None] * stride_dom + offs_dv[None, :],
                    rows, len_q, offs_dv, DV_, True, BLOCK_DV != DV_)
    lse2 = tl.load(LSE2 + bh * len_q + rows, mask=row_ok, other=float("inf"))
    ll = tl.load(LL + bh * len_q + rows, mask=row_ok, other=0.0)
    delta = tl.load(Delta + bh * len_q + rows, mask=row_ok, other=0.0)
    k_base = K + b64 * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + kvh.to(tl.int64) * stride_vh
    mask_rows = Mask + b64 * stride_mb + h * stride_mh + rows * stride_mq
    slope = 0.0
    if ALIBI:
        slope = tl.load(Alibi + b64 * stride_ab + h)
    if GRAD_ROWS_BCAST:
        dmask_rows = DMask + b64 * stride_gb + h * stride_gh
    else:
        dmask_rows = DMask + b64 * stride_gb + h * stride_gh + rows * stride_gq

    i_min = pid_m * BLOCK_M
    i_max = tl.minimum(i_min + BLOCK_M, len_q) - 1
    t_lo, f_lo, f_hi, t_hi = _row_block_tiles(i_min, i_max, len_k, diag, left, right, BLOCK_N, HAS_LEFT, HAS_RIGHT)

    dq = tl.zeros([BLOCK_M, BLOCK_DK], tl.float32)
    dq = _dq_run(dq, q, do, lse2, ll, delta, k_base, v_base, mask_rows, dmask_rows, t_lo, f_lo,
                 stride_kn, stride_vn, stride_mk, stride_gk, qk_scale, rows, row_ok, len_k, diag, left, right,
                 slope, softcap_log2, kpos_base, Cos, Sin, BLOCK_N, DK_, DV_, BLOCK_DK, BLOCK_DV, True, HAS_LEFT,
                 HAS_RIGHT, HAS_MASK, MASK_GRAD, GRAD_ROWS_BCAST, GRAD_COLS_BCAST, DOT, SOFTCAP, ALIBI, ROTARY,
                 ROT_HALF, ROT_START)
    dq = _dq_run(dq, q, do, lse2, ll, delta, k_base, v_base, mask_rows, dmask_rows, f_lo, f_hi,
                 stride_kn, stride_vn, stride_mk, stride_gk, qk_scale, rows, row_ok, len_k, diag, left, right,
                 slope, softcap_log2, kpos_base, Cos, Sin, BLOCK_N, DK_, DV_, BLOCK_DK, BLOCK_DV, False, HAS_LEFT,
                 HAS_RIGHT, HAS_MASK, MASK_GRAD, GRAD_ROWS_BCAST, GRAD_COLS_BCAST, DOT, SOFTCAP, ALIBI, ROTARY,
                 ROT_HALF, ROT_START)
    dq = _dq_run(dq, q, do, lse2, ll, delta, k_base, v_base, mask_rows, dmask_rows, f_hi, t_hi,
                 stride_kn, stride_vn, stride_mk, stride_gk, qk_scale, rows, row_ok, len_k, diag, left, right,
                 slope, softcap_log2, kpos_base, Cos, Sin, BLOCK_N, DK_, DV_, BLOCK_DK, BLOCK_DV, True, HAS_LEFT,
                 HAS_RIGHT, HAS_MASK, MASK_GRAD, GRAD_ROWS_BCAST, GRAD_COLS_BCAST, DOT, SOFTCAP, ALIBI, ROTARY,
                 ROT_HALF, ROT_START)
    dq = _unrotate(dq * sm_scale, qpos, row_ok, offs_dk, Cos, Sin, ROTARY, ROT_HALF, ROT_START)
    tl.store(DQ + b64 * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqm + offs_dk[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_dk[None, :] < DK_))
