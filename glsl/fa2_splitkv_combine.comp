#version 450
// Split-KV forward, pass 2 of 2: merges the partial results of fa2_splitkv.comp into O and LSE,
// written exactly as the forward kernels write them (O in DTYPE [q heads, len_q, DV], LSE fp32
// natural log), so backward and autograd use them unchanged.
//
// Interface: fa2_common.glsl with FA2_SPLIT_KV (push constants n_split, split_len) and the
// scratch bindings of fa2_splitkv.comp (6 partial O, 7 partial (m, l)); it reads nothing else.
// Spec constants used: DV, DTYPE, WG (= local_size_x). Host constraint: DV / 4 <= WG.
//
// Grid: x = query index (len_q), y = query head in the chunk: one output row per workgroup.
// Invocation t owns the 4 O columns [4 * (t % DV4), +4) of the splits s = t / DV4 (mod NSL), and
// merges them online (exp2 domain): M = max m_s, L = sum l_s exp2(m_s - M),
// O = sum o_s exp2(m_s - M). The NSL partial merges are combined once through shared memory (one
// barrier). Splits are read 4 at a time so several loads are in flight (they were just written:
// on a GPU they sit in L2).
// l == 0 over every split (no visible key: band, mask, or empty splits, whose m is the finite
// NEG_BIG so no (-inf) - (-inf) arises) gives O = 0 and LSE = -inf, as the forward does.
#extension GL_GOOGLE_include_directive : require
#define FA2_SPLIT_KV
#include "fa2_common.glsl"

const uint DV4 = DV / 4u;
const uint NSL = WG / DV4;   // invocations per output column block (split lanes)
const uint UNROLL = 4u;

layout(std430, binding = 6) readonly buffer PartO { vec4 part_o[]; };
layout(std430, binding = 7) readonly buffer PartML { vec2 part_ml[]; };

shared vec4 red_o[WG];
shared float red_m[WG];
shared float red_l[WG];

void main() {
    const uint t = gl_LocalInvocationID.x;
    const uint col = t % DV4;
    const uint sl = t / DV4;
    const uint row = gl_WorkGroupID.y * pc.len_q + gl_WorkGroupID.x;
    const uint n = pc.n_split;

    float mx = NEG_BIG;
    float lx = 0.0;
    vec4 ox = vec4(0.0);
    if (sl < NSL) {
        for (uint s0 = sl; s0 < n; s0 += NSL * UNROLL) {
            vec2 ml[UNROLL];
            vec4 ov[UNROLL];
            [[unroll]] for (uint u = 0u; u < UNROLL; ++u) {
                // Past the last split: a valid split's data with weight l = 0 and o = 0.
                const uint s = min(s0 + u * NSL, n - 1u);
                ml[u] = s0 + u * NSL < n ? part_ml[row * n + s] : vec2(NEG_BIG, 0.0);
                ov[u] = s0 + u * NSL < n ? part_o[(row * n + s) * DV4 + col] : vec4(0.0);
            }
            [[unroll]] for (uint u = 0u; u < UNROLL; ++u) {
                const float m_new = max(mx, ml[u].x);
                const float a = exp2(mx - m_new);
                const float b = exp2(ml[u].x - m_new);
                lx = lx * a + ml[u].y * b;
                ox = ox * a + ov[u] * b;
                mx = m_new;
            }
        }
    }
    red_m[t] = mx;
    red_l[t] = lx;
    red_o[t] = ox;
    barrier();
    if (sl == 0u) {
        float m_all = NEG_BIG;
        [[unroll]] for (uint g = 0u; g < NSL; ++g) m_all = max(m_all, red_m[g * DV4 + col]);
        float l_all = 0.0;
        vec4 o_all = vec4(0.0);
        [[unroll]] for (uint g = 0u; g < NSL; ++g) {
            const float w = exp2(red_m[g * DV4 + col] - m_all);
            l_all += red_l[g * DV4 + col] * w;
            o_all += red_o[g * DV4 + col] * w;
        }
        const float inv_l = l_all > 0.0 ? 1.0 / l_all : 0.0;
        const uint e = row * DV + 4u * col;
        store_pair(e, o_all.xy * inv_l);
        store_pair(e + 2u, o_all.zw * inv_l);
        if (col == 0u) lse_data[row] = l_all > 0.0 ? (m_all + log2(l_all)) * LN2 : -1.0 / 0.0;
    }
}
