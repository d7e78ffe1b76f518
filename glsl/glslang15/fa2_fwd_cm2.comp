#version 450
// FlashAttention-2 forward on GL_NV_cooperative_matrix2: workgroup-scope matrices (the driver splits
// a BR x BC score tile over the whole workgroup), tensor-addressed loads and stores straight from the
// packed buffers (rows past len_q / len_k read as zero and are never stored), row reductions and
// per-element operations on accumulators. Interface: fa2_common.glsl, as every forward variant.
// Needs glslang >= 15.2 (DESIGN.md §7); float16 data only (DTYPE 1). Spec constants used: DK, DV, BR,
// BC, WG; DK, DV, BR, BC multiples of 16.
//
// Per workgroup (BR query rows of one query head), for each BC-key tile of key_range():
//   S = Q K^T (fp32); scores in the exp2 domain: S * scale_log2, plus the band and mask on tiles
//   that need them (per element); M' = max(M, rowmax S), L *= exp2(M - M'), O *= exp2(M - M');
//   P = exp2(S - M) (fp16); L += rowsum P; O += P V. Row-constant values live smeared across their
//   row, so that they combine element by element with the tiles. Finally O / L and LSE =
//   (M + log2 L) ln 2.
// The rescale runs on every tile: the lazy one (rescale only when a row max passes M by a threshold,
// as fa2_fwd_coopmat.comp) measured 4-20% slower here on an H200 (BENCHMARKS.md, 2026-12-05).
// L sums the fp16-rounded P that P V uses, so O's weights sum to 1; the LSE's error model adds
// that rounding (tests/test_coopmat2.py).
// Rows that see no key keep M = NEG_BIG (finite) and L = 0: O = 0, LSE = -inf.
#extension GL_EXT_control_flow_attributes : enable
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
#extension GL_EXT_shader_16bit_storage : require
#extension GL_KHR_memory_scope_semantics : require
#extension GL_KHR_cooperative_matrix : require
#extension GL_NV_cooperative_matrix2 : require
#extension GL_GOOGLE_include_directive : require

#include "fa2_common.glsl"

layout(std430, binding = 0) readonly buffer QH { float16_t q_h[]; };
layout(std430, binding = 1) readonly buffer KH { float16_t k_h[]; };
layout(std430, binding = 2) readonly buffer VH { float16_t v_h[]; };
layout(std430, binding = 3) writeonly buffer OH { float16_t o_h[]; };

#define ACC(R, C) coopmat<float, gl_ScopeWorkgroup, R, C, gl_MatrixUseAccumulator>
#define NEG_INF uintBitsToFloat(0xFF800000u)

// Per-element operations (row, col: of the matrix; extra arguments after the element).
float score_op(const in uint r, const in uint c, const in float s, const in uint q0, const in uint kb,
               const in uint mbase) {
    int i = int(q0 + r), j = int(kb + c);
    if (i >= int(pc.len_q) || !key_visible(i, j)) return NEG_INF;
    float x = s * pc.scale_log2;
    if (pc.has_mask != 0u) x += mask_term(mask_data[mbase + uint(i) * pc.mask_si + uint(j) * pc.mask_sj]);
    return x;
}
float max_op(const in uint r, const in uint c, const in float a, const in float b) { return max(a, b); }
float exp2_op(const in uint r, const in uint c, const in float a) { return exp2(a); }
float inv_op(const in uint r, const in uint c, const in float l) { return l == 0.0 ? 0.0 : 1.0 / l; }
float max_reduce(const in float a, const in float b) { return max(a, b); }
// Column 0 of the (M, L) pair writes the row's LSE.
float lse_op(const in uint r, const in uint c, const in float m, const in float l, const in uint base,
             const in uint rows) {
    if (c == 0u && r < rows) lse_data[base + r] = l > 0.0 ? (m + log2(l)) * LN2 : NEG_INF;
    return m;
}

void main() {
    const uint y = query_head();
    const uint q0 = query_tile() * BR;
    const uint kvh = y / pc.group;
    const uint gq = pc.group0 * pc.group + y;
    const uint mbase = (gq / pc.heads_q) * pc.mask_sb + (gq % pc.heads_q) * pc.mask_sh;

    tensorLayoutNV<2, gl_CooperativeMatrixClampModeConstantNV> lq = createTensorLayoutNV(2, gl_CooperativeMatrixClampModeConstantNV);
    tensorLayoutNV<2, gl_CooperativeMatrixClampModeConstantNV> lk = createTensorLayoutNV(2, gl_CooperativeMatrixClampModeConstantNV);
    tensorLayoutNV<2, gl_CooperativeMatrixClampModeConstantNV> lv = createTensorLayoutNV(2, gl_CooperativeMatrixClampModeConstantNV);
    tensorLayoutNV<2, gl_CooperativeMatrixClampModeConstantNV> lo = createTensorLayoutNV(2, gl_CooperativeMatrixClampModeConstantNV);
    lq = setTensorLayoutDimensionNV(lq, pc.len_q, DK);
    lk = setTensorLayoutDimensionNV(lk, pc.len_k, DK);
    lv = setTensorLayoutDimensionNV(lv, pc.len_k, DV);
    lo = setTensorLayoutDimensionNV(lo, pc.len_q, DV);
    tensorViewNV<2, false, 1, 0> transposed = createTensorViewNV(2, false, 1, 0);

    coopmat<float16_t, gl_ScopeWorkgroup, BR, DK, gl_MatrixUseA> qa;
    coopMatLoadTensorNV(qa, q_h, (y * pc.len_q * DK) & ~7u, sliceTensorLayoutNV(lq, q0, BR, 0, DK));

    ACC(BR, DV) o = ACC(BR, DV)(0.0);
    ACC(BR, BC) m = ACC(BR, BC)(NEG_BIG);
    ACC(BR, BC) l = ACC(BR, BC)(0.0);
    const coopmat<float16_t, gl_ScopeWorkgroup, BC, BC, gl_MatrixUseB> ones =
        coopmat<float16_t, gl_ScopeWorkgroup, BC, BC, gl_MatrixUseB>(1.0);

    ivec2 keys = key_range(int(q0), int(q0 + BR));
    // Element offsets are multiples of 16 (DK, DV are); & ~7u says so to the compiler (16-byte loads).
    const uint kbase = (kvh * pc.len_k * DK) & ~7u, vbase = (kvh * pc.len_k * DV) & ~7u;
    [[dont_unroll]] for (int kb = (keys.x / int(BC)) * int(BC); kb < keys.y; kb += int(BC)) {
        coopmat<float16_t, gl_ScopeWorkgroup, DK, BC, gl_MatrixUseB> kt;
        coopMatLoadTensorNV(kt, k_h, kbase, sliceTensorLayoutNV(lk, uint(kb), BC, 0, DK), transposed);
        ACC(BR, BC) s = coopMatMulAdd(qa, kt, ACC(BR, BC)(0.0));
        if (pc.has_mask == 0u && keys_visible_to_all(int(q0), int(q0 + BR), kb, kb + int(BC))) {
            s *= pc.scale_log2;
        } else {
            coopMatPerElementNV(s, s, score_op, q0, uint(kb), mbase);
        }
        ACC(BR, BC) rowmax, p;
        coopMatReduceNV(rowmax, s, gl_CooperativeMatrixReduceRowNV, max_reduce);
        ACC(BR, BC) m_new, alpha;
        coopMatPerElementNV(m_new, rowmax, max_op, m);
        coopMatPerElementNV(alpha, m - m_new, exp2_op);
        m = m_new;
        l = l * alpha;
        ACC(BR, DV) alpha_o;
        coopMatReduceNV(alpha_o, alpha, gl_CooperativeMatrixReduceRowNV, max_reduce);  // row-constant: smear
        o = o * alpha_o;
        coopMatPerElementNV(p, s - m, exp2_op);
        coopmat<float16_t, gl_ScopeWorkgroup, BR, BC, gl_MatrixUseA> pa =
            coopmat<float16_t, gl_ScopeWorkgroup, BR, BC, gl_MatrixUseA>(p);
        l += coopMatMulAdd(pa, ones, ACC(BR, BC)(0.0));  // row sums of the fp16 P that P V uses
        coopmat<float16_t, gl_ScopeWorkgroup, BC, DV, gl_MatrixUseB> vb;
        coopMatLoadTensorNV(vb, v_h, vbase, sliceTensorLayoutNV(lv, uint(kb), BC, 0, DV));
        o = coopMatMulAdd(pa, vb, o);
    }

    ACC(BR, DV) inv_l;
    coopMatReduceNV(inv_l, l, gl_CooperativeMatrixReduceRowNV, max_reduce);
    coopMatPerElementNV(inv_l, inv_l, inv_op);
    o = o * inv_l + ACC(BR, DV)(TEST_CORRUPT != 0u ? 1.0 : 0.0);
    coopmat<float16_t, gl_ScopeWorkgroup, BR, DV, gl_MatrixUseAccumulator> oh =
        coopmat<float16_t, gl_ScopeWorkgroup, BR, DV, gl_MatrixUseAccumulator>(o);
    coopMatStoreTensorNV(oh, o_h, (y * pc.len_q * DV) & ~7u, sliceTensorLayoutNV(lo, q0, BR, 0, DV));
    uint rows = min(BR, pc.len_q - min(q0, pc.len_q));
    coopMatPerElementNV(m, m, lse_op, l, y * pc.len_q + q0, rows);
}
