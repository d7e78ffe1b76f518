#version 450
// FA2 backward, dK and dV, cooperative-matrix variant (fa2_bwd_cm.glsl: interface, work split,
// shared memory). A workgroup owns BR keys of one kv group, a subgroup one block of 16 keys: its
// k and v rows stay in registers as A fragments, dK and dV as accumulators. Each step streams BC
// query rows (q, dO and their statistics) of one query head of the group; per block:
//   S^T = K Q^T -> P^T;  dV += P^T dO;  dP^T = V dO^T -> dS^T = P^T (dP^T - D), overwriting P^T;
//   dK += dS^T Q. dK is scaled by the softmax scale at the end.
// Causal / window: only the query rows of query_range() are streamed.
// Grid: x = ceil(len_k / BR), y = kv group within the chunk.
#extension GL_GOOGLE_include_directive : require
#include "fa2_bwd_cm.glsl"

void main() {
    const uint kvg = gl_WorkGroupID.y;
    const int key0 = int(gl_WorkGroupID.x * BR);
    if (key0 >= int(pc.len_k)) return;                     // whole workgroup: uniform
    const uint kbase = kvg * pc.len_k * DK;
    const uint vbase = kvg * pc.len_k * DV;
    const ivec2 rows = query_range(key0, min(key0 + int(BR), int(pc.len_k)));
    const uint lane = gl_SubgroupInvocationID;
    const uint sgs = gl_SubgroupSize;
    const uint nsg = gl_NumSubgroups;

    for (uint pass = 0u; pass < (NRB + nsg - 1u) / nsg; ++pass) {  // uniform over the workgroup
        const uint blk = pass * nsg + gl_SubgroupID;
        const bool working = blk < NRB;                    // subgroup-uniform: guards coopmat ops
        const int kb = key0 + int(blk * CM);               // first key of this block

        // The block's k and v rows -> A fragments, staged BC keys at a time.
        MAT_A ka[NDK];
        MAT_A va[NDV];
        uvec2 areg[NAU];
        uvec2 breg[NBU];
        for (uint kp = 0u; kp < (BR + BC - 1u) / BC; ++kp) {
            const int r0 = key0 + int(kp * BC);
            const int nvalid = min(min(int(BC), int(BR) - int(kp * BC)), int(pc.len_k) - r0);
            FETCH_ROWS(areg, NAU, load_k4, DK, kbase, r0, nvalid)
            FETCH_ROWS(breg, NBU, load_v4, DV, vbase, r0, nvalid)
            barrier();
            PUT_ROWS(a_sh, KSTR, areg, NAU, DK)
            PUT_ROWS(b_sh, VSTR, breg, NBU, DV)
            barrier();
            if (working && blk * CM >= kp * BC && blk * CM < kp * BC + BC) {
                const uint at = blk * CM - kp * BC;
                [[unroll]] for (uint d = 0u; d < NDK; ++d)
                    coopMatLoad(ka[d], a_sh, at * KSTR + d * (CM / 4u), KSTR, gl_CooperativeMatrixLayoutRowMajor);
                [[unroll]] for (uint d = 0u; d < NDV; ++d)
                    coopMatLoad(va[d], b_sh, at * VSTR + d * (CM / 4u), VSTR, gl_CooperativeMatrixLayoutRowMajor);
            }
        }

        MAT_C dk_acc[NDK];
        MAT_C dv_acc[NDV];
        [[unroll]] for (uint d = 0u; d < NDK; ++d) dk_acc[d] = MAT_C(0.0);
        [[unroll]] for (uint d = 0u; d < NDV; ++d) dv_acc[d] = MAT_C(0.0);

        // Steps: BC query rows of one query head of the group each, heads one after the other.
        const int per_head = (rows.y - rows.x + int(BC) - 1) / int(BC);
        const int steps = int(pc.group) * per_head;
        if (steps > 0) {
            FETCH_ROWS(areg, NAU, load_q4, DK, kvg * pc.group * pc.len_q * DK, rows.x, int(pc.len_q) - rows.x)
            FETCH_ROWS(breg, NBU, load_do4, DV, kvg * pc.group * pc.len_q * DV, rows.x, int(pc.len_q) - rows.x)
        }
        for (int step = 0; step < steps; ++step) {
            const uint qhead = kvg * pc.group + uint(step / per_head);
            const int i0 = rows.x + (step % per_head) * int(BC);
            const uint qrow0 = qhead * pc.len_q;
            const uint mbase = mask_head_base(qhead);
            barrier();                                 // everyone is done with the last step
            PUT_ROWS(a_sh, KSTR, areg, NAU, DK)
            PUT_ROWS(b_sh, VSTR, breg, NBU, DV)
            stage_stats(0u, qrow0, i0, BC);
            barrier();
            if (step + 1 < steps) {                    // in flight during this step
                const uint nrow0 = (kvg * pc.group + uint((step + 1) / per_head)) * pc.len_q;
                const int ni0 = rows.x + ((step + 1) % per_head) * int(BC);
                FETCH_ROWS(areg, NAU, load_q4, DK, nrow0 * DK, ni0, int(pc.len_q) - ni0)
                FETCH_ROWS(breg, NBU, load_do4, DV, nrow0 * DV, ni0, int(pc.len_q) - ni0)
            }
            if (!working) continue;

            // S^T = K Q^T (Q^T blocks: staged q rows read column-major).
            [[unroll]] for (uint c = 0u; c < NCB; ++c) {
                MAT_C acc = MAT_C(0.0);
                [[unroll]] for (uint d = 0u; d < NDK; ++d) {
                    MAT_B qt;
                    coopMatLoad(qt, a_sh, c * CM * KSTR + d * (CM / 4u), KSTR, gl_CooperativeMatrixLayoutColumnMajor);
                    acc = coopMatMulAdd(ka[d], qt, acc);
                }
                coopMatStore(acc, s_sh, blk * CM * SSTR + c * (CM / 4u), SSTR, gl_CooperativeMatrixLayoutRowMajor);
            }
            subgroup_sync();
            // P^T[key r][query c], 4 queries per lane step.
            for (uint u = lane; u < CM * (BC / 4u); u += sgs) {
                const uint r = u / (BC / 4u), c4 = u % (BC / 4u);
                const int j = kb + int(r);
                const vec4 raw = s_sh[(blk * CM + r) * SSTR + c4];
                vec4 p;
                [[unroll]] for (uint x = 0u; x < 4u; ++x) {
                    const int i = i0 + int(c4 * 4u + x);
                    p[x] = prob(raw[x], i, j, mask_at(mbase, i, j), st_sh[c4 * 4u + x].xyz);
                }
                p_sh[(blk * CM + r) * PSTR + c4] = f16vec4(p);
            }
            subgroup_sync();
            // dV += P^T dO.
            [[unroll]] for (uint c = 0u; c < NCB; ++c) {
                MAT_A pa;
                coopMatLoad(pa, p_sh, blk * CM * PSTR + c * (CM / 4u), PSTR, gl_CooperativeMatrixLayoutRowMajor);
                [[unroll]] for (uint d = 0u; d < NDV; ++d) {
                    MAT_B dob;
                    coopMatLoad(dob, b_sh, c * CM * VSTR + d * (CM / 4u), VSTR, gl_CooperativeMatrixLayoutRowMajor);
                    dv_acc[d] = coopMatMulAdd(pa, dob, dv_acc[d]);
                }
            }
            // dP^T = V dO^T.
            [[unroll]] for (uint c = 0u; c < NCB; ++c) {
                MAT_C acc = MAT_C(0.0);
                [[unroll]] for (uint d = 0u; d < NDV; ++d) {
                    MAT_B dot_;
                    coopMatLoad(dot_, b_sh, c * CM * VSTR + d * (CM / 4u), VSTR, gl_CooperativeMatrixLayoutColumnMajor);
                    acc = coopMatMulAdd(va[d], dot_, acc);
                }
                coopMatStore(acc, s_sh, blk * CM * SSTR + c * (CM / 4u), SSTR, gl_CooperativeMatrixLayoutRowMajor);
            }
            subgroup_sync();                           // also: every lane is done reading P for dV
            // dS^T = P^T (dP^T - D) over P^T in place; optionally dS to global (fp32).
            for (uint u = lane; u < CM * (BC / 4u); u += sgs) {
                const uint r = u / (BC / 4u), c4 = u % (BC / 4u);
                const vec4 dp = s_sh[(blk * CM + r) * SSTR + c4];
                const vec4 dsum = vec4(st_sh[c4 * 4u].z, st_sh[c4 * 4u + 1u].z, st_sh[c4 * 4u + 2u].z,
                                       st_sh[c4 * 4u + 3u].z);
                const vec4 ds = vec4(p_sh[(blk * CM + r) * PSTR + c4]) * (dp - dsum);
                p_sh[(blk * CM + r) * PSTR + c4] = f16vec4(ds);
                if (WRITE_DS == 1u) {
                    const int j = kb + int(r);
                    [[unroll]] for (uint x = 0u; x < 4u; ++x) {
                        const int i = i0 + int(c4 * 4u + x);
                        if (i < int(pc.len_q) && j < int(pc.len_k))
                            ds_data[(qrow0 + uint(i)) * pc.len_k + uint(j)] = ds[x];
                    }
                }
            }
            subgroup_sync();
            // dK += dS^T Q.
            [[unroll]] for (uint c = 0u; c < NCB; ++c) {
                MAT_A dsa;
                coopMatLoad(dsa, p_sh, blk * CM * PSTR + c * (CM / 4u), PSTR, gl_CooperativeMatrixLayoutRowMajor);
                [[unroll]] for (uint d = 0u; d < NDK; ++d) {
                    MAT_B qb;
                    coopMatLoad(qb, a_sh, c * CM * KSTR + d * (CM / 4u), KSTR, gl_CooperativeMatrixLayoutRowMajor);
                    dk_acc[d] = coopMatMulAdd(dsa, qb, dk_acc[d]);
                }
            }
        }

        if (working) {
            const float scale = pc.scale_log2 * LN2;
            [[unroll]] for (uint d = 0u; d < NDK; ++d)
                STORE_BLOCK(dk_data, dk_acc[d], blk, kbase, DK, d * CM, kb, int(pc.len_k), scale)
            [[unroll]] for (uint d = 0u; d < NDV; ++d)
                STORE_BLOCK(dv_data, dv_acc[d], blk, vbase, DV, d * CM, kb, int(pc.len_k), 1.0)
        }
    }
}
