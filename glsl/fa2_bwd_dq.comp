#version 450
// FA2 backward, dQ, scalar/subgroup variant: the forward's work split (fa2_fwd.comp). A row
// group of TPR lanes shares RPT query rows, each lane a DK/TPR slice of q and dQ and a DV/TPR
// slice of dO; the workgroup walks the key tiles its rows may see (key_range). Per key j:
//   P = exp2(s2 - m - ll), dS = P (dO . v - D), dQ += dS k;  dQ is scaled once at the end.
// STAGE 1 stages BC keys of K and V in shared memory (GPUs), STAGE 0 reads global memory.
// Grid: x = ceil(len_q / BR), y = query head within the chunk. Iterations of the key loop per
// invocation: ceil(keys / BC) (the host keeps it under lavapipe's 65535).
#extension GL_GOOGLE_include_directive : require
#include "fa2_bwd_common.glsl"

const uint QPT = DK / TPR;
const uint OPT = DV / TPR;
const uint ROW_STRIDE = BR / RPT;

shared float k_tile[STAGE * BC * DK + 1];
shared float v_tile[STAGE * BC * DV + 1];

void main() {
    const uint t = gl_LocalInvocationID.x;
    const uint lane = t % TPR;
    const uint lane0 = gl_SubgroupInvocationID - lane;
    const uint qhead = query_head();
    const uint kvg = qhead / pc.group;
    const uint mbase = mask_head_base(qhead);
    const float slope = head_slope(qhead);
    const int row0 = int(query_tile() * BR);
    const int first = row0 + int(t / TPR);
    const uint kbase = kvg * pc.len_k * DK;
    const uint vbase = kvg * pc.len_k * DV;

    float q[RPT * QPT];
    float dov[RPT * OPT];
    float dq[RPT * QPT];
    vec3 st[RPT];
    [[unroll]] for (uint r = 0u; r < RPT; ++r) {
        // Rows past len_q compute on a valid row (their P is 0) and never store.
        const uint ic = qhead * pc.len_q + uint(min(first + int(r * ROW_STRIDE), int(pc.len_q) - 1));
        [[unroll]] for (uint d = 0u; d < QPT; d += 2u) {
            const vec2 x = LOAD_PAIR(q_data, ic * DK + lane * QPT + d);
            q[r * QPT + d] = x.x;
            q[r * QPT + d + 1u] = x.y;
            dq[r * QPT + d] = 0.0;
            dq[r * QPT + d + 1u] = 0.0;
        }
        [[unroll]] for (uint d = 0u; d < OPT; d += 2u) {
            const vec2 x = LOAD_PAIR(do_data, ic * DV + lane * OPT + d);
            dov[r * OPT + d] = x.x;
            dov[r * OPT + d + 1u] = x.y;
        }
        st[r] = load_stats(ic, lane, lane0);
    }

    const ivec2 keys = key_range(row0, min(row0 + int(BR), int(pc.len_q)));

    for (int j0 = keys.x; j0 < keys.y; j0 += int(BC)) {
        if (STAGE == 1u) {
            barrier();
            for (uint e = t * 2u; e < BC * DK; e += WG * 2u) {
                const uint j = uint(j0) + e / DK;
                const vec2 x = j < pc.len_k ? LOAD_PAIR(k_data, kbase + uint(j0) * DK + e) : vec2(0.0);
                k_tile[e] = x.x;
                k_tile[e + 1u] = x.y;
            }
            for (uint e = t * 2u; e < BC * DV; e += WG * 2u) {
                const uint j = uint(j0) + e / DV;
                const vec2 x = j < pc.len_k ? LOAD_PAIR(v_data, vbase + uint(j0) * DV + e) : vec2(0.0);
                v_tile[e] = x.x;
                v_tile[e + 1u] = x.y;
            }
            barrier();
        }
        [[unroll]] for (uint jj = 0u; jj < BC; ++jj) {
            const int j = j0 + int(jj);
            const uint jc = uint(min(j, int(pc.len_k) - 1));
            float mv[PPL];
            if (HAS_MASK == 1u) load_mask(mv, mbase + jc * pc.mask_sj, first, ROW_STRIDE, int(pc.len_q), pc.mask_si,
                                          lane);
            float kv[QPT];
            float sacc[RPT];
            float pacc[RPT];
            [[unroll]] for (uint r = 0u; r < RPT; ++r) {
                sacc[r] = 0.0;
                pacc[r] = 0.0;
            }
            [[unroll]] for (uint d = 0u; d < QPT; d += 2u) {
                const vec2 x = STAGE == 1u
                    ? vec2(k_tile[jj * DK + lane * QPT + d], k_tile[jj * DK + lane * QPT + d + 1u])
                    : LOAD_PAIR(k_data, kbase + jc * DK + lane * QPT + d);
                kv[d] = x.x;
                kv[d + 1u] = x.y;
                [[unroll]] for (uint r = 0u; r < RPT; ++r) {
                    sacc[r] += q[r * QPT + d] * x.x + q[r * QPT + d + 1u] * x.y;
                }
            }
            [[unroll]] for (uint d = 0u; d < OPT; d += 2u) {
                const vec2 x = STAGE == 1u
                    ? vec2(v_tile[jj * DV + lane * OPT + d], v_tile[jj * DV + lane * OPT + d + 1u])
                    : LOAD_PAIR(v_data, vbase + jc * DV + lane * OPT + d);
                [[unroll]] for (uint r = 0u; r < RPT; ++r) {
                    pacc[r] += dov[r * OPT + d] * x.x + dov[r * OPT + d + 1u] * x.y;
                }
            }
            [[unroll]] for (uint r = 0u; r < RPT; ++r) {
                const int i = first + int(r * ROW_STRIDE);
                const float mt = (HAS_MASK == 1u ? pick(mv, r, lane0) : 0.0) + alibi_term(slope, i, j);
                const float qk = reduce_row(sacc[r]);
                const float p = prob(qk, i, j, mt, st[r]);
                const float ds = p * (reduce_row(pacc[r]) - st[r].z) * cap_slope(qk);
                [[unroll]] for (uint d = 0u; d < QPT; ++d) dq[r * QPT + d] += ds * kv[d];
            }
        }
    }

    const float scale = pc.scale_log2 * LN2;
    [[unroll]] for (uint r = 0u; r < RPT; ++r) {
        const int i = first + int(r * ROW_STRIDE);
        if (i >= int(pc.len_q)) continue;
        const uint obase = (qhead * pc.len_q + uint(i)) * DK + lane * QPT;
        [[unroll]] for (uint d = 0u; d < QPT; d += 2u) {
            STORE_PAIR(dq_data, obase + d, vec2(dq[r * QPT + d], dq[r * QPT + d + 1u]) * scale);
        }
    }
}
