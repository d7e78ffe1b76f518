#version 450
// FA2 backward, step 1: the row statistics (fa2_bwd_common.glsl) of every query row of the chunk,
// one invocation per row. D = rowsum(dO * O) in fp32. Grid: x = ceil(len_q / WG), y = query head.
// The recompute of m and l (rows whose lse cannot carry log2(l)) scores the row as the forward
// does; such rows are rare (fully padded rows), so it reads straight from global memory.
#extension GL_GOOGLE_include_directive : require
#include "fa2_bwd_common.glsl"

// |lse| * log2(e) above which the statistics are recomputed. Below it an fp32 ulp is at most
// 2^-13, so lse * log2(e), rounded twice, is within ~2.5e-4 of the forward's m + log2(l) (P within
// ~2e-4 relative); far above it, log2(l) is lost entirely (-FLT_MAX-saturated rows).
const float RECOMPUTE_ABOVE = 1024.0;

void main() {
    const uint qhead = gl_WorkGroupID.y;
    const uint i = gl_WorkGroupID.x * WG + gl_LocalInvocationID.x;
    if (i >= pc.len_q) return;
    const uint row = qhead * pc.len_q + i;

    float dsum = 0.0;
    [[unroll]] for (uint d = 0u; d < DV; d += 2u) {
        dsum += dot(LOAD_PAIR(do_data, row * DV + d), LOAD_PAIR(o_in, row * DV + d));
    }

    const float lse = lse_in[row];
    vec2 ml = vec2(lse * LOG2E, 0.0);
    if (isinf(lse) && lse < 0.0) {
        ml = vec2(1.0 / 0.0, 0.0);
        dsum = 0.0;  // O is 0: keep D exact
    } else if (abs(lse) > RECOMPUTE_ABOVE * LN2) {  // also where lse * log2(e) overflows
        const uint kbase = (qhead / pc.group) * pc.len_k * DK;
        const uint mbase = mask_head_base(qhead) + i * pc.mask_si;
        const ivec2 keys = key_range(int(i), int(i) + 1);
        const float slope = head_slope(qhead);
        float m = NEG_BIG;
        float l = 0.0;
        for (int j = keys.x; j < keys.y; ++j) {
            if (!key_visible(int(i), j)) continue;
            float qk = 0.0;
            [[unroll]] for (uint d = 0u; d < DK; d += 2u) {
                qk += dot(LOAD_PAIR(q_data, row * DK + d), LOAD_PAIR(k_data, kbase + uint(j) * DK + d));
            }
            float s = scaled_score(qk) + alibi_term(slope, int(i), j);
            if (HAS_MASK == 1u) s += mask_term(mask_data[mbase + uint(j) * pc.mask_sj]);
            if (s > m) {
                l = l * exp2(m - s) + 1.0;
                m = s;
            } else {
                l += exp2(s - m);
            }
        }
        fold_sink(m, l, (pc.group0 * pc.group + qhead) % pc.heads_q);
        ml = l > 0.0 ? vec2(m, log2(l)) : vec2(1.0 / 0.0, 0.0);
    }
    row_stats[row] = vec4(ml, dsum, 0.0);
}
