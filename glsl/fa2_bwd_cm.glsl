// Shared by the cooperative-matrix backward kernels (fa2_bwd_dkdv_coopmat, fa2_bwd_dq_coopmat):
// GL_KHR_cooperative_matrix at subgroup scope, 16x16x16, fp16 A/B operands, fp32 accumulators,
// on top of fa2_bwd_common.glsl (bindings, push / spec constants, row statistics of fa2_bwd_pre)
// and fa2_coopmat.glsl (fragment types, fp16 input loads, shared with the forward).
// Device features: cooperativeMatrix with that shape, shaderFloat16, vulkanMemoryModel (glslang
// always emits it for KHR coopmat), subgroup basic in compute. It cannot run on lavapipe.
//
// Work split (both kernels): a workgroup owns BR rows (dQ: query rows; dK/dV: keys) in NRB =
// BR / 16 blocks of 16; a subgroup takes one block at a time (passes when the device has fewer
// subgroups than blocks, e.g. 64-wide ones) and keeps that block's operands as A fragments and its
// gradients as accumulators in registers for the whole loop. The loop streams BC columns per step
// (dQ: keys; dK/dV: query rows, of every query head of the kv group) through shared memory. Per
// block and step, in the block's own shared scratch (no workgroup barrier between the steps):
//   S (raw scores) = one matmul -> fp32 scratch -> P = exp2(s2 - m - ll) (fp16, band + mask
//   applied element-wise, where coordinates are known) -> dP = one matmul -> fp32 scratch ->
//   dS = P (dP - D) (fp16, overwriting P once it has been used) -> the gradient matmuls.
// Shared memory, bytes (<= maxComputeSharedMemorySize, 48 KiB on NVIDIA), D* = DK + DV + 16:
//   2 * BC * D*                    streamed rows of two matrices (fp16, rows padded by 8 halves)
//   + 4 * BR * (BC + 4)            fp32 scratch (S, then dP, then the epilogue)
//   + 2 * BR * (BC + 8)            P / dS (fp16)
//   + 16 * max(BR, BC)             row statistics (vec4)
// e.g. BR=128, BC=32, D=128 (the host's first choice): 17408 + 18432 + 10240 + 2048 = 48128.
// Registers grow with DK + DV: head dims up to 128 (the host refuses more).
// DTYPE 1 (float16) is native; float32 / bfloat16 data is rounded to fp16 when staged (the host
// allows it only on request, as for the forward). Accumulation and outputs as in the scalar kernels.

#extension GL_KHR_shader_subgroup_basic : require

#include "fa2_bwd_common.glsl"
#include "fa2_coopmat.glsl"

const uint NRB = BR / CM;          // owned 16-row blocks per workgroup
const uint NCB = BC / CM;          // 16-column blocks per step
const uint NDK = DK / CM;
const uint NDV = DV / CM;
const uint KSTR = DK / 4u + 2u;    // rows of DK halves (f16vec4 units, padded by 16 bytes)
const uint VSTR = DV / 4u + 2u;    // rows of DV halves
const uint SSTR = BC / 4u + 1u;    // fp32 scratch rows (vec4 units, odd: conflict-free)
const uint PSTR = BC / 4u + 2u;    // P / dS rows (f16vec4 units)

shared f16vec4 a_sh[BC * KSTR];       // streamed rows with DK columns (Q or K); also staging
shared f16vec4 b_sh[BC * VSTR];       // streamed rows with DV columns (dO or V); also staging
shared vec4 s_sh[BR * SSTR];          // per block: S, then dP, then the epilogue
shared f16vec4 p_sh[BR * PSTR];       // per block: P, then dS
shared vec4 st_sh[BR > BC ? BR : BC]; // row statistics (m, ll, D, -) of the rows in play

// dO's vector views and loads, as fa2_coopmat.glsl's for Q, K and V.
layout(std430, binding = 6) readonly buffer DOBuf2 { uvec2 do_data2[]; };
layout(std430, binding = 6) readonly buffer DOBuf4 { uvec4 do_data4[]; };

DEFINE_LOAD_H4(load_do4, do_data2, do_data4)

// Staging BC rows of a [rows, D] matrix, as fp16, in two halves so that the next step's global
// loads are in flight while this step computes: FETCH_ROWS loads rows [row0, row0 + nvalid) at
// element `base` into registers (zero beyond), PUT_ROWS writes them to dst (STR f16vec4 per row).
// Whole workgroup; the caller places the barriers around PUT_ROWS.
#define STAGE_UNITS(D) ((BC * ((D) / 4u) + WG - 1u) / WG)
const uint NAU = STAGE_UNITS(DK);  // per invocation, for a_sh
const uint NBU = STAGE_UNITS(DV);  // per invocation, for b_sh
#define FETCH_ROWS(regs, NU, LOAD4, D, base, row0, nvalid) \
    [[unroll]] for (uint it_ = 0u; it_ < (NU); ++it_) { \
        const uint u_ = it_ * WG + gl_LocalInvocationIndex; \
        const uint r_ = u_ / ((D) / 4u), d4_ = u_ % ((D) / 4u); \
        regs[it_] = uvec2(0u); \
        if (u_ < BC * ((D) / 4u) && int(r_) < (nvalid)) regs[it_] = LOAD4((base) + (uint(row0) + r_) * (D) + d4_ * 4u); }
#define PUT_ROWS(dst, STR, regs, NU, D) \
    [[unroll]] for (uint it_ = 0u; it_ < (NU); ++it_) { \
        const uint u_ = it_ * WG + gl_LocalInvocationIndex; \
        if (u_ < BC * ((D) / 4u)) dst[(u_ / ((D) / 4u)) * (STR) + u_ % ((D) / 4u)] = h4(regs[it_]); }

// Row statistics of rows [row0, row0 + n) of the chunk's query head qrow0 / len_q into st_sh[at..];
// rows past len_q get m = +inf (P = 0).
void stage_stats(uint at, uint qrow0, int row0, uint n) {
    for (uint r = gl_LocalInvocationIndex; r < n; r += WG) {
        const int i = row0 + int(r);
        st_sh[at + r] = i < int(pc.len_q) ? row_stats[qrow0 + uint(i)] : vec4(1.0 / 0.0, 0.0, 0.0, 0.0);
    }
}

// Mask term of query row i, key j (0 without a mask; hidden pairs are zeroed by prob() anyway).
float mask_at(uint mbase, int i, int j) {
    float mt = 0.0;
    if (HAS_MASK == 1u) {
        const uint ic = uint(clamp(i, 0, int(pc.len_q) - 1));
        const uint jc = uint(clamp(j, 0, int(pc.len_k) - 1));
        mt = mask_term(mask_data[mbase + ic * pc.mask_si + jc * pc.mask_sj]);
    }
    return mt;
}

void subgroup_sync() {
    subgroupMemoryBarrierShared();
    subgroupBarrier();
}

// Accumulator `acc` (16 x 16 of block blk) times `scale`, through the block's fp32 scratch, into
// columns [col, col + 16) of rows first + 0..15 (< limit) of a packed [*, D] output at `base`.
#define STORE_BLOCK(out, acc, blk, base, D, col, first, limit, scale) { \
    subgroup_sync(); \
    coopMatStore(acc, s_sh, (blk) * CM * SSTR, SSTR, gl_CooperativeMatrixLayoutRowMajor); \
    subgroup_sync(); \
    for (uint x_ = gl_SubgroupInvocationID; x_ < CM * CM / 2u; x_ += gl_SubgroupSize) { \
        const uint r_ = x_ / (CM / 2u), cp_ = x_ % (CM / 2u); \
        const int row_ = (first) + int(r_); \
        if (row_ < (limit)) { \
            const vec4 v4_ = s_sh[((blk) * CM + r_) * SSTR + cp_ / 2u]; \
            STORE_PAIR(out, (base) + uint(row_) * (D) + (col) + 2u * cp_, ((cp_ & 1u) == 0u ? v4_.xy : v4_.zw) * (scale)); \
        } \
    } }
