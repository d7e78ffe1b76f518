#version 450
// FA2 backward, dQ, cooperative-matrix variant (fa2_bwd_cm.glsl: interface, work split, shared
// memory). A workgroup owns BR query rows of one query head, a subgroup one block of 16 rows: its
// q and dO rows stay in registers as A fragments, dQ as accumulators. Each step streams BC keys
// (k, v) inside key_range() (causal / window tile skipping); per block:
//   S = Q K^T -> P;  dP = dO V^T -> dS = P (dP - D), overwriting P;  dQ += dS K.
// dQ is scaled by the softmax scale at the end.
// Grid: x = ceil(len_q / BR), y = query head within the chunk.
#extension GL_GOOGLE_include_directive : require
#include "fa2_bwd_cm.glsl"

void main() {
    const uint qhead = query_head();
    const int row0 = int(query_tile() * BR);
    if (row0 >= int(pc.len_q)) return;                     // whole workgroup: uniform
    const uint qrow0 = qhead * pc.len_q;
    const uint kvg = qhead / pc.group;
    const uint kbase = kvg * pc.len_k * DK;
    const uint vbase = kvg * pc.len_k * DV;
    const uint mbase = mask_head_base(qhead);
    const ivec2 keys = key_range(row0, min(row0 + int(BR), int(pc.len_q)));
    const uint lane = gl_SubgroupInvocationID;
    const uint sgs = gl_SubgroupSize;
    const uint nsg = gl_NumSubgroups;

    stage_stats(0u, qrow0, row0, BR);                      // read after the first barrier below

    for (uint pass = 0u; pass < (NRB + nsg - 1u) / nsg; ++pass) {  // uniform over the workgroup
        const uint blk = pass * nsg + gl_SubgroupID;
        const bool working = blk < NRB;                    // subgroup-uniform: guards coopmat ops
        const int ib = row0 + int(blk * CM);               // first query row of this block

        // The block's q and dO rows -> A fragments, staged BC rows at a time.
        MAT_A qa[NDK];
        MAT_A doa[NDV];
        uvec2 areg[NAU];
        uvec2 breg[NBU];
        for (uint rp = 0u; rp < (BR + BC - 1u) / BC; ++rp) {
            const int r0 = row0 + int(rp * BC);
            const int nvalid = min(min(int(BC), int(BR) - int(rp * BC)), int(pc.len_q) - r0);
            FETCH_ROWS(areg, NAU, load_q4, DK, qrow0 * DK, r0, nvalid)
            FETCH_ROWS(breg, NBU, load_do4, DV, qrow0 * DV, r0, nvalid)
            barrier();
            PUT_ROWS(a_sh, KSTR, areg, NAU, DK)
            PUT_ROWS(b_sh, VSTR, breg, NBU, DV)
            barrier();
            if (working && blk * CM >= rp * BC && blk * CM < rp * BC + BC) {
                const uint at = blk * CM - rp * BC;
                [[unroll]] for (uint d = 0u; d < NDK; ++d)
                    coopMatLoad(qa[d], a_sh, at * KSTR + d * (CM / 4u), KSTR, gl_CooperativeMatrixLayoutRowMajor);
                [[unroll]] for (uint d = 0u; d < NDV; ++d)
                    coopMatLoad(doa[d], b_sh, at * VSTR + d * (CM / 4u), VSTR, gl_CooperativeMatrixLayoutRowMajor);
            }
        }

        MAT_C dq_acc[NDK];
        [[unroll]] for (uint d = 0u; d < NDK; ++d) dq_acc[d] = MAT_C(0.0);

        if (keys.x < keys.y) {
            FETCH_ROWS(areg, NAU, load_k4, DK, kbase, keys.x, int(pc.len_k) - keys.x)
            FETCH_ROWS(breg, NBU, load_v4, DV, vbase, keys.x, int(pc.len_k) - keys.x)
        }
        for (int j0 = keys.x; j0 < keys.y; j0 += int(BC)) {
            barrier();                                     // everyone is done with the last step
            PUT_ROWS(a_sh, KSTR, areg, NAU, DK)
            PUT_ROWS(b_sh, VSTR, breg, NBU, DV)
            barrier();
            const int nj0 = j0 + int(BC);
            if (nj0 < keys.y) {                            // in flight during this step
                FETCH_ROWS(areg, NAU, load_k4, DK, kbase, nj0, int(pc.len_k) - nj0)
                FETCH_ROWS(breg, NBU, load_v4, DV, vbase, nj0, int(pc.len_k) - nj0)
            }
            if (!working) continue;

            // S = Q K^T (K^T blocks: staged k rows read column-major).
            [[unroll]] for (uint c = 0u; c < NCB; ++c) {
                MAT_C acc = MAT_C(0.0);
                [[unroll]] for (uint d = 0u; d < NDK; ++d) {
                    MAT_B kt;
                    coopMatLoad(kt, a_sh, c * CM * KSTR + d * (CM / 4u), KSTR, gl_CooperativeMatrixLayoutColumnMajor);
                    acc = coopMatMulAdd(qa[d], kt, acc);
                }
                coopMatStore(acc, s_sh, blk * CM * SSTR + c * (CM / 4u), SSTR, gl_CooperativeMatrixLayoutRowMajor);
            }
            subgroup_sync();
            // P[query r][key c], 4 keys per lane step.
            for (uint u = lane; u < CM * (BC / 4u); u += sgs) {
                const uint r = u / (BC / 4u), c4 = u % (BC / 4u);
                const int i = ib + int(r);
                const vec3 st = st_sh[blk * CM + r].xyz;
                const vec4 raw = s_sh[(blk * CM + r) * SSTR + c4];
                vec4 p;
                [[unroll]] for (uint x = 0u; x < 4u; ++x) {
                    const int j = j0 + int(c4 * 4u + x);
                    p[x] = prob(raw[x], i, j, mask_at(mbase, i, j), st);
                }
                p_sh[(blk * CM + r) * PSTR + c4] = f16vec4(p);
            }
            subgroup_sync();
            // dP = dO V^T.
            [[unroll]] for (uint c = 0u; c < NCB; ++c) {
                MAT_C acc = MAT_C(0.0);
                [[unroll]] for (uint d = 0u; d < NDV; ++d) {
                    MAT_B vt;
                    coopMatLoad(vt, b_sh, c * CM * VSTR + d * (CM / 4u), VSTR, gl_CooperativeMatrixLayoutColumnMajor);
                    acc = coopMatMulAdd(doa[d], vt, acc);
                }
                coopMatStore(acc, s_sh, blk * CM * SSTR + c * (CM / 4u), SSTR, gl_CooperativeMatrixLayoutRowMajor);
            }
            subgroup_sync();
            // dS = P (dP - D), over P in place.
            for (uint u = lane; u < CM * (BC / 4u); u += sgs) {
                const uint r = u / (BC / 4u), c4 = u % (BC / 4u);
                const uint at = (blk * CM + r) * PSTR + c4;
                p_sh[at] = f16vec4(vec4(p_sh[at]) * (s_sh[(blk * CM + r) * SSTR + c4] - st_sh[blk * CM + r].z));
            }
            subgroup_sync();
            // dQ += dS K.
            [[unroll]] for (uint c = 0u; c < NCB; ++c) {
                MAT_A dsa;
                coopMatLoad(dsa, p_sh, blk * CM * PSTR + c * (CM / 4u), PSTR, gl_CooperativeMatrixLayoutRowMajor);
                [[unroll]] for (uint d = 0u; d < NDK; ++d) {
                    MAT_B kb;
                    coopMatLoad(kb, a_sh, c * CM * KSTR + d * (CM / 4u), KSTR, gl_CooperativeMatrixLayoutRowMajor);
                    dq_acc[d] = coopMatMulAdd(dsa, kb, dq_acc[d]);
                }
            }
        }

        if (working) {
            const float scale = pc.scale_log2 * LN2;
            [[unroll]] for (uint d = 0u; d < NDK; ++d)
                STORE_BLOCK(dq_data, dq_acc[d], blk, qrow0 * DK, DK, d * CM, ib, int(pc.len_q), scale)
        }
    }
}
