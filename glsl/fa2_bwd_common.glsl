// Shared interface of the FA2 backward kernels (fa2_bwd_pre, fa2_bwd_dkdv, fa2_bwd_dq, and the
// coopmat variant). It includes the forward's fa2_common.glsl, so the spec constants, the push
// constants (Push: same layout and meaning as the forward), packing macros and band helpers are
// the forward's; backward-only bindings and helpers are added here.
//
// Bindings (one layout for every backward kernel; the host binds the same 12 tensors to each):
//   0 Q  1 K  2 V  (read, as in the forward)          3 O   4 LSE (read here: aliases of the
//   forward's write-only views)   5 mask (float32, broadcast strides in Push)
//   6 dO [q heads, len_q, DV]     7 row statistics, vec4 per query row (written by fa2_bwd_pre)
//   8 dQ [q heads, len_q, DK]     9 dK [groups, len_k, DK]     10 dV [groups, len_k, DV]
//   11 dS [q heads, len_q, len_k] float32 (natural units; written only when WRITE_DS == 1)
// Every buffer holds one chunk of (batch, kv-head) groups, as in the forward (fa2_common.glsl).
//
// Written for CPU drivers as much as GPUs. On lavapipe every buffer or shared-memory load costs
// about as much as 100 FMAs (it runs lane by lane), even inside an if whose condition is false,
// while subgroup shuffles are nearly free. So: whatever the lanes of a row group need in common is
// loaded once, spread over the lanes, and broadcast with subgroupShuffle; the mask and dS code is
// compiled out by spec constants rather than skipped by a branch. lavapipe also stops all loops
// of an invocation after 65535 iterations in total, so every loop but the streaming one has a
// literal trip count (unrolled) and the host keeps the streaming loop under that limit.
//
// Row statistics (fa2_bwd_pre), for query row i of the chunk: x = m, y = ll, z = D with
//   P[i, j] = exp2((s2[i, j] - m) - ll),  s2 = the forward's score in the exp2 domain,
//   D[i] = rowsum(dO[i] * O[i]).
// Normally m = lse * log2(e) and ll = 0. A row whose lse is too large in magnitude to carry
// log2(l) (e.g. every key masked with float32's minimum: all scores saturate at -FLT_MAX and the
// forward returns a uniform average) gets its max m and ll = log2(l) recomputed, so its P is the
// forward's. A row that sees no key (lse = -inf) gets m = +inf: every P of it is exp2(-inf) = 0.

#extension GL_KHR_shader_subgroup_shuffle : enable
#include "fa2_common.glsl"

layout(constant_id = 9) const uint WRITE_DS = 0;   // 1: write dS (gradient of a float mask)
layout(constant_id = 10) const uint HAS_MASK = 0;  // 1: add the mask (pc.has_mask's twin, folded)

layout(std430, binding = 3) readonly buffer OIn { uint o_in[]; };
layout(std430, binding = 4) readonly buffer LseIn { float lse_in[]; };
layout(std430, binding = 6) readonly buffer DOBuf { uint do_data[]; };
layout(std430, binding = 7) buffer StatBuf { vec4 row_stats[]; };
layout(std430, binding = 7) readonly buffer StatIn { float row_stats_f[]; };
layout(std430, binding = 8) writeonly buffer DQBuf { uint dq_data[]; };
layout(std430, binding = 9) writeonly buffer DKBuf { uint dk_data[]; };
layout(std430, binding = 10) writeonly buffer DVBuf { uint dv_data[]; };
layout(std430, binding = 11) writeonly buffer DSBuf { float ds_data[]; };

// Query rows [lo, hi) that may see any key in [key_lo, key_hi): the transpose of key_range(),
// for the kernels that loop over queries (dK/dV).
ivec2 query_range(int key_lo, int key_hi) {
    int lo = pc.right < 0 ? 0 : max(0, key_lo - pc.diag - pc.right);
    int hi = pc.left < 0 ? int(pc.len_q) : min(int(pc.len_q), key_hi - 1 - pc.diag + pc.left + 1);
    return ivec2(lo, max(lo, hi));
}

// ALiBi slope (exp2 domain) of query head qhead of the chunk (0 without ALIBI).
float head_slope(uint qhead) {
    const uint gq = pc.group0 * pc.group + qhead;  // global query head: batch * heads_q + head
    return alibi_slope(gq / pc.heads_q, gq % pc.heads_q);
}

// Mask element offset of (batch, head) for query head qhead of the chunk.
uint mask_head_base(uint qhead) {
    const uint gq = pc.group0 * pc.group + qhead;  // global query head: batch * heads_q + head
    return (gq / pc.heads_q) * pc.mask_sb + (gq % pc.heads_q) * pc.mask_sh;
}

// P of query row i and key j from the raw dot product q.k, the terms added after the scale and
// soft-cap mt (mask and ALiBi bias; 0 without them) and the row statistics st. Exactly 0 for hidden
// pairs and rows past len_q (a select, not a branch: see above). Through a soft-cap, dS reaches
// dQ and dK times cap_slope(qk) (fa2_common.glsl).
float prob(float qk, int i, int j, float mt, vec3 st) {
    const float p = exp2(((scaled_score(qk) + mt) - st.x) - st.y);
    return i < int(pc.len_q) && key_visible(i, j) ? p : 0.0;
}

// ---- row groups: TPR lanes of one subgroup that share RPT rows (dQ) or keys (dK/dV) ------------
// A group is TPR consecutive invocations, taken to be consecutive lanes of one subgroup starting at
// lane0 = gl_SubgroupInvocationID - lane (as fa2_fwd.comp's shuffles take them); TPR divides the
// subgroup size.

const uint PPL = (RPT + TPR - 1u) / TPR;  // per-pair values each lane loads for its row group

// Sum over the TPR lanes of a row group (TPR <= 8). The trip count is a literal so that every
// compiler unrolls it (lavapipe's does not unroll shift-induction loops).
float reduce_row(float x) {
    [[unroll]] for (uint b = 0u; b < 3u; ++b) {
        if ((1u << b) < TPR) x += subgroupShuffleXor(x, 1u << b);
    }
    return x;
}

// Value v[r / TPR] of lane (r % TPR) of the row group starting at subgroup lane lane0. With TPR = 1
// the lane's own value: no subgroup operation (drivers where shuffles are broken run TPR = 1).
float pick(float v[PPL], uint r, uint lane0) {
    if (TPR == 1u) return v[r];
    return subgroupShuffle(v[r / TPR], lane0 + r % TPR);
}

// Mask terms of the group's RPT pairs r, at elements base + min(first + r*step, limit-1) * stride:
// lane l loads pairs l, l + TPR, ... (pick() gives pair r to every lane).
void load_mask(out float mv[PPL], uint base, int first, uint step, int limit, uint stride, uint lane) {
    [[unroll]] for (uint c = 0u; c < PPL; ++c) {
        const uint idx = uint(min(first + int((c * TPR + lane) * step), limit - 1));
        mv[c] = mask_term(mask_data[base + idx * stride]);
    }
}

// (m, ll, D) of the statistics row `row`, its three floats loaded across the group's lanes.
vec3 load_stats(uint row, uint lane, uint lane0) {
    const uint rounds = (3u + TPR - 1u) / TPR;
    float part[rounds];
    [[unroll]] for (uint c = 0u; c < rounds; ++c) part[c] = row_stats_f[row * 4u + min(c * TPR + lane, 3u)];
    vec3 st;
    [[unroll]] for (uint k = 0u; k < 3u; ++k) {
        st[k] = TPR == 1u ? part[k] : subgroupShuffle(part[k / TPR], lane0 + k % TPR);
    }
    return st;
}
