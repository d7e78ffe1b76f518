#version 450
// FA2 backward, dK and dV, scalar/subgroup variant (the forward's fa2_fwd.comp turned around).
// A workgroup owns BR keys of one kv group; a row group of TPR lanes shares RPT keys, each lane
// a DK/TPR slice of k and dK and a DV/TPR slice of v and dV, so each q / dO element it loads
// feeds RPT keys. The workgroup walks the query rows that may see its keys (query_range: causal /
// window tile skipping) of every query head of the group, so GQA gradients are summed in
// registers, without atomics. Per (query row i, key j), with the row statistics of fa2_bwd_pre:
//   P = exp2(s2 - m - ll), dV += P dO[i], dP = dO[i] . v, dS = P (dP - D[i]), dK += dS q[i];
// dK is scaled by the softmax scale once at the end. STAGE 1 stages BC rows of q and dO in
// shared memory (GPUs); STAGE 0 reads them from global memory (CPU drivers). Loops that index
// local arrays carry [[unroll]] (fa2_fwd.comp says why; fa2_bwd_common.glsl for the rest).
// Grid: x = ceil(len_k / BR), y = kv group within the chunk. Iterations of the row loop per
// invocation: group * ceil(rows / BC) (the host keeps it under lavapipe's 65535).
#extension GL_GOOGLE_include_directive : require
#include "fa2_bwd_common.glsl"

const uint QPT = DK / TPR;         // q / k / dK elements per lane and key
const uint OPT = DV / TPR;         // dO / v / dV elements per lane and key
const uint KEY_STRIDE = BR / RPT;  // a row group's keys are KEY_STRIDE apart

shared float q_tile[STAGE * BC * DK + 1];
shared float do_tile[STAGE * BC * DV + 1];

void main() {
    const uint t = gl_LocalInvocationID.x;
    const uint lane = t % TPR;
    const uint lane0 = gl_SubgroupInvocationID - lane;
    const uint kvg = gl_WorkGroupID.y;
    const int key0 = int(gl_WorkGroupID.x * BR);
    const int first = key0 + int(t / TPR);
    const uint kbase = kvg * pc.len_k * DK;
    const uint vbase = kvg * pc.len_k * DV;

    float k[RPT * QPT];
    float v[RPT * OPT];
    float dk[RPT * QPT];
    float dv[RPT * OPT];
    [[unroll]] for (uint r = 0u; r < RPT; ++r) {
        // Keys past len_k compute on a valid key (their P is 0) and never store.
        const uint jc = uint(min(first + int(r * KEY_STRIDE), int(pc.len_k) - 1));
        [[unroll]] for (uint d = 0u; d < QPT; d += 2u) {
            const vec2 x = LOAD_PAIR(k_data, kbase + jc * DK + lane * QPT + d);
            k[r * QPT + d] = x.x;
            k[r * QPT + d + 1u] = x.y;
            dk[r * QPT + d] = 0.0;
            dk[r * QPT + d + 1u] = 0.0;
        }
        [[unroll]] for (uint d = 0u; d < OPT; d += 2u) {
            const vec2 x = LOAD_PAIR(v_data, vbase + jc * DV + lane * OPT + d);
            v[r * OPT + d] = x.x;
            v[r * OPT + d + 1u] = x.y;
            dv[r * OPT + d] = 0.0;
            dv[r * OPT + d + 1u] = 0.0;
        }
    }

    const ivec2 rows = query_range(key0, min(key0 + int(BR), int(pc.len_k)));

    for (uint hh = 0u; hh < pc.group; ++hh) {
        const uint qhead = kvg * pc.group + hh;
        const uint mbase = mask_head_base(qhead);
        const float slope = head_slope(qhead);
        const uint qrow0 = qhead * pc.len_q;
        for (int i0 = rows.x; i0 < rows.y; i0 += int(BC)) {
            if (STAGE == 1u) {
                barrier();
                for (uint e = t * 2u; e < BC * DK; e += WG * 2u) {
                    const uint i = uint(i0) + e / DK;
                    const vec2 x = i < pc.len_q ? LOAD_PAIR(q_data, (qrow0 + uint(i0)) * DK + e) : vec2(0.0);
                    q_tile[e] = x.x;
                    q_tile[e + 1u] = x.y;
                }
                for (uint e = t * 2u; e < BC * DV; e += WG * 2u) {
                    const uint i = uint(i0) + e / DV;
                    const vec2 x = i < pc.len_q ? LOAD_PAIR(do_data, (qrow0 + uint(i0)) * DV + e) : vec2(0.0);
                    do_tile[e] = x.x;
                    do_tile[e + 1u] = x.y;
                }
                barrier();
            }
            [[unroll]] for (uint ii = 0u; ii < BC; ++ii) {
                const int i = i0 + int(ii);
                const uint ic = uint(min(i, int(pc.len_q) - 1));
                const vec3 st = load_stats(qrow0 + ic, lane, lane0);
                float mv[PPL];
                if (HAS_MASK == 1u) load_mask(mv, mbase + ic * pc.mask_si, first, KEY_STRIDE, int(pc.len_k),
                                              pc.mask_sj, lane);
                float qv[QPT];
                float dov[OPT];
                float sacc[RPT];
                float pacc[RPT];
                [[unroll]] for (uint r = 0u; r < RPT; ++r) {
                    sacc[r] = 0.0;
                    pacc[r] = 0.0;
                }
                [[unroll]] for (uint d = 0u; d < QPT; d += 2u) {
                    const vec2 x = STAGE == 1u
                        ? vec2(q_tile[ii * DK + lane * QPT + d], q_tile[ii * DK + lane * QPT + d + 1u])
                        : LOAD_PAIR(q_data, (qrow0 + ic) * DK + lane * QPT + d);
                    qv[d] = x.x;
                    qv[d + 1u] = x.y;
                    [[unroll]] for (uint r = 0u; r < RPT; ++r) {
                        sacc[r] += x.x * k[r * QPT + d] + x.y * k[r * QPT + d + 1u];
                    }
                }
                [[unroll]] for (uint d = 0u; d < OPT; d += 2u) {
                    const vec2 x = STAGE == 1u
                        ? vec2(do_tile[ii * DV + lane * OPT + d], do_tile[ii * DV + lane * OPT + d + 1u])
                        : LOAD_PAIR(do_data, (qrow0 + ic) * DV + lane * OPT + d);
                    dov[d] = x.x;
                    dov[d + 1u] = x.y;
                    [[unroll]] for (uint r = 0u; r < RPT; ++r) {
                        pacc[r] += x.x * v[r * OPT + d] + x.y * v[r * OPT + d + 1u];
                    }
                }
                float dsv[RPT];
                [[unroll]] for (uint r = 0u; r < RPT; ++r) {
                    const int j = first + int(r * KEY_STRIDE);
                    const float mt = (HAS_MASK == 1u ? pick(mv, r, lane0) : 0.0) + alibi_term(slope, i, j);
                    const float qk = reduce_row(sacc[r]);
                    const float p = prob(qk, i, j, mt, st);
                    const float ds = p * (reduce_row(pacc[r]) - st.z);
                    dsv[r] = ds;
                    const float dsc = ds * cap_slope(qk);
                    [[unroll]] for (uint d = 0u; d < OPT; ++d) dv[r * OPT + d] += p * dov[d];
                    [[unroll]] for (uint d = 0u; d < QPT; ++d) dk[r * QPT + d] += dsc * qv[d];
                }
                if (WRITE_DS == 1u) {
                    // Lane l stores keys l, l + TPR, ... of its group (every lane holds every dS).
                    [[unroll]] for (uint c = 0u; c < PPL; ++c) {
                        float val = 0.0;
                        [[unroll]] for (uint r = 0u; r < RPT; ++r) {
                            if (r / TPR == c) val = r % TPR == lane ? dsv[r] : val;
                        }
                        const int j = first + int((c * TPR + lane) * KEY_STRIDE);
                        if (c * TPR + lane < RPT && i < int(pc.len_q) && j < int(pc.len_k)) {
                            ds_data[(qrow0 + uint(i)) * pc.len_k + uint(j)] = val;
                        }
                    }
                }
            }
        }
    }

    const float scale = pc.scale_log2 * LN2;
    [[unroll]] for (uint r = 0u; r < RPT; ++r) {
        const int j = first + int(r * KEY_STRIDE);
        if (j >= int(pc.len_k)) continue;
        [[unroll]] for (uint d = 0u; d < QPT; d += 2u) {
            STORE_PAIR(dk_data, kbase + uint(j) * DK + lane * QPT + d,
                       vec2(dk[r * QPT + d], dk[r * QPT + d + 1u]) * scale);
        }
        [[unroll]] for (uint d = 0u; d < OPT; d += 2u) {
            STORE_PAIR(dv_data, vbase + uint(j) * DV + lane * OPT + d, vec2(dv[r * OPT + d], dv[r * OPT + d + 1u]));
        }
    }
}
