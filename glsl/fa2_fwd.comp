#version 450
// FA2 forward, scalar/subgroup variant. TPR invocations share RPT query rows: each owns a
// contiguous DK/TPR slice of q and DV/TPR slice of o for each of its rows, so every K/V element it
// loads feeds RPT rows (register blocking). The q.k dot product is summed across the TPR lanes
// with subgroupShuffleXor, correct for any subgroup size >= TPR (TPR = 1 uses no subgroup op).
// Wave64 is this source specialised for 64-wide subgroups. K/V tiles are staged in shared memory
// (STAGE=1) or read from global memory (STAGE=0: CPU drivers such as lavapipe, where barriers are
// expensive and caches do the staging). Loops carry [[unroll]]: arrays indexed by a loop variable
// would otherwise be lowered to select ladders, which compile slowly and run slowly.
#extension GL_GOOGLE_include_directive : require
#extension GL_KHR_shader_subgroup_shuffle : enable
#include "fa2_common.glsl"

const uint QPT = DK / TPR;  // q elements per invocation and row
const uint OPT = DV / TPR;  // o elements per invocation and row
const uint ROW_STRIDE = BR / RPT;  // an invocation's rows are ROW_STRIDE apart

shared float k_tile[STAGE * BC * DK + 1];
shared float v_tile[STAGE * BC * DV + 1];

float reduce_row(float x) {
    // A fixed trip count so the loop really unrolls: lavapipe stops an invocation's loops after
    // 65535 iterations in all, and a rolled loop here counted toward that (Lk >= ~4096 truncated).
    [[unroll]] for (uint b = 0u; b < 3u; ++b) {
        if ((1u << b) < TPR) x += subgroupShuffleXor(x, 1u << b);
    }
    return x;
}

void main() {
    const uint t = gl_LocalInvocationID.x;
    const uint lane = t % TPR;
    const uint qhead = query_head();           // query head within the chunk
    const uint kvg = qhead / pc.group;             // kv group within the chunk
    const uint gkv = pc.group0 + kvg;              // global (batch, kv head)
    const uint batch = gkv / pc.heads_kv;
    const uint hq = (gkv % pc.heads_kv) * pc.group + qhead % pc.group;
    const int row0 = int(query_tile() * BR);
    const int first = row0 + int(t / TPR);
    const float slope = alibi_slope(batch, hq);

    float q[RPT * QPT];
    float o[RPT * OPT];
    float m[RPT];
    float l[RPT];
    uint mbase[RPT];
    [[unroll]] for (uint r = 0u; r < RPT; ++r) {
        // Rows past len_q compute on a valid row and never store.
        const uint ic = uint(min(first + int(r * ROW_STRIDE), int(pc.len_q) - 1));
        const uint qbase = (qhead * pc.len_q + ic) * DK + lane * QPT;
        [[unroll]] for (uint d = 0u; d < QPT; d += 2u) {
            vec2 x = LOAD_PAIR(q_data, qbase + d);
            q[r * QPT + d] = x.x;
            q[r * QPT + d + 1u] = x.y;
        }
        [[unroll]] for (uint d = 0u; d < OPT; ++d) o[r * OPT + d] = 0.0;
        m[r] = NEG_BIG;
        l[r] = 0.0;
        mbase[r] = batch * pc.mask_sb + hq * pc.mask_sh + ic * pc.mask_si;
    }

    const uint kbase = kvg * pc.len_k * DK;
    const uint vbase = kvg * pc.len_k * DV;
    const ivec2 keys = key_range(row0, min(row0 + int(BR), int(pc.len_q)));

    for (int j0 = keys.x; j0 < keys.y; j0 += int(BC)) {
        if (STAGE == 1u) {
            barrier();
            for (uint e = t * 2u; e < BC * DK; e += WG * 2u) {
                uint j = uint(j0) + e / DK;
                vec2 x = j < pc.len_k ? LOAD_PAIR(k_data, kbase + uint(j0) * DK + e) : vec2(0.0);
                k_tile[e] = x.x;
                k_tile[e + 1u] = x.y;
            }
            for (uint e = t * 2u; e < BC * DV; e += WG * 2u) {
                uint j = uint(j0) + e / DV;
                vec2 x = j < pc.len_k ? LOAD_PAIR(v_data, vbase + uint(j0) * DV + e) : vec2(0.0);
                v_tile[e] = x.x;
                v_tile[e + 1u] = x.y;
            }
            barrier();
        }

        float s[RPT * BC];
        [[unroll]] for (uint jj = 0u; jj < BC; ++jj) {
            const int j = j0 + int(jj);
            const uint jc = uint(min(j, int(pc.len_k) - 1));
            float acc[RPT];
            [[unroll]] for (uint r = 0u; r < RPT; ++r) acc[r] = 0.0;
            [[unroll]] for (uint d = 0u; d < QPT; d += 2u) {
                const vec2 kx = STAGE == 1u
                    ? vec2(k_tile[jj * DK + lane * QPT + d], k_tile[jj * DK + lane * QPT + d + 1u])
                    : LOAD_PAIR(k_data, kbase + jc * DK + lane * QPT + d);
                [[unroll]] for (uint r = 0u; r < RPT; ++r) {
                    acc[r] += q[r * QPT + d] * kx.x + q[r * QPT + d + 1u] * kx.y;
                }
            }
            [[unroll]] for (uint r = 0u; r < RPT; ++r) {
                const int i = first + int(r * ROW_STRIDE);
                float sc = scaled_score(reduce_row(acc[r])) + alibi_term(slope, i, j);
                if (!key_visible(i, j)) {
                    sc = -1.0 / 0.0;
                } else if (pc.has_mask != 0u) {
                    sc += mask_term(mask_data[mbase[r] + uint(j) * pc.mask_sj]);
                }
                s[r * BC + jj] = sc;
            }
        }

        [[unroll]] for (uint r = 0u; r < RPT; ++r) {
            float m_new = m[r];
            [[unroll]] for (uint jj = 0u; jj < BC; ++jj) m_new = max(m_new, s[r * BC + jj]);
            const float alpha = exp2(m[r] - m_new);
            m[r] = m_new;
            l[r] *= alpha;
            [[unroll]] for (uint d = 0u; d < OPT; ++d) o[r * OPT + d] *= alpha;
            [[unroll]] for (uint jj = 0u; jj < BC; ++jj) {
                s[r * BC + jj] = exp2(s[r * BC + jj] - m_new);
                l[r] += s[r * BC + jj];
            }
        }
        [[unroll]] for (uint jj = 0u; jj < BC; ++jj) {
            const uint jc = uint(min(j0 + int(jj), int(pc.len_k) - 1));
            [[unroll]] for (uint d = 0u; d < OPT; d += 2u) {
                const vec2 vx = STAGE == 1u
                    ? vec2(v_tile[jj * DV + lane * OPT + d], v_tile[jj * DV + lane * OPT + d + 1u])
                    : LOAD_PAIR(v_data, vbase + jc * DV + lane * OPT + d);
                [[unroll]] for (uint r = 0u; r < RPT; ++r) {
                    o[r * OPT + d] += s[r * BC + jj] * vx.x;
                    o[r * OPT + d + 1u] += s[r * BC + jj] * vx.y;
                }
            }
        }
    }

    [[unroll]] for (uint r = 0u; r < RPT; ++r) {
        const int i = first + int(r * ROW_STRIDE);
        if (i >= int(pc.len_q)) continue;
        const float f = fold_sink(m[r], l[r], hq);
        // l == 0: every key hidden; the row is 0 with lse -inf, as flash-attn and torch return.
        const float inv_l = l[r] > 0.0 ? f / l[r] : 0.0;
        const uint obase = (qhead * pc.len_q + uint(i)) * DV + lane * OPT;
        [[unroll]] for (uint d = 0u; d < OPT; d += 2u) {
            store_pair(obase + d, vec2(o[r * OPT + d], o[r * OPT + d + 1u]) * inv_l);
        }
        if (lane == 0u) {
            lse_data[qhead * pc.len_q + uint(i)] = l[r] > 0.0 ? (m[r] + log2(l[r])) * LN2 : -1.0 / 0.0;
        }
    }
}
