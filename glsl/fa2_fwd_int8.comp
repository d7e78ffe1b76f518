#version 450
// FA2 forward, precision="int8" (fa2_int8.glsl), scalar/subgroup variant on packed 4 x int8 dot
// products (GL_EXT_integer_dot_product: glslang >= 15.2, so its SPIR-V ships prebuilt in
// glsl/prebuilt/). The layout of fa2_fwd.comp: TPR invocations share RPT query rows, each owning a
// DK/TPR slice of q (packed int8, DK/TPR a multiple of 4) and a DV/TPR slice of o. Q is scaled by
// scale * log2(e) and quantized as it is loaded, with one scale for the workgroup's BR = BLOCK_Q
// rows; K comes smoothed and quantized from fa2_int8_quant.comp. A row's q.k is summed in int32,
// across its TPR lanes exactly in float32 (|sum| <= 127 * 127 * DK < 2**24), then scaled by the two
// blocks' scales. P.V: P and V rounded to 16 bits, float32 accumulation. K/V from global memory
// (STAGE 0).
#extension GL_GOOGLE_include_directive : require
#extension GL_KHR_shader_subgroup_shuffle : enable
#extension GL_EXT_integer_dot_product : require
#include "fa2_common.glsl"
#include "fa2_int8.glsl"

const uint QPT = DK / TPR;  // q elements per invocation and row
const uint QW = QPT / 4u;   // ... as packed int8 words
const uint OPT = DV / TPR;  // o elements per invocation and row
const uint ROW_STRIDE = BR / RPT;
const uint KW = DK / 4u;    // packed words per key

shared float red[WG];

float reduce_row(float x) {
    // A fixed trip count (see fa2_fwd.comp: lavapipe's loop limit counts rolled loops).
    [[unroll]] for (uint b = 0u; b < 3u; ++b) {
        if ((1u << b) < TPR) x += subgroupShuffleXor(x, 1u << b);
    }
    return x;
}

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
    const uint lane = t % TPR;
    const uint qhead = query_head();
    const uint kvg = qhead / pc.group;
    const uint gkv = pc.group0 + kvg;
    const uint batch = gkv / pc.heads_kv;
    const uint hq = (gkv % pc.heads_kv) * pc.group + qhead % pc.group;
    const int row0 = int(query_tile() * BR);
    const int first = row0 + int(t / TPR);

    float qf[RPT * QPT];
    float amax = 0.0;
    uint mbase[RPT];
    [[unroll]] for (uint r = 0u; r < RPT; ++r) {
        // Rows past len_q repeat the last row (same block: BR = BLOCK_Q) and never store.
        const uint ic = uint(min(first + int(r * ROW_STRIDE), int(pc.len_q) - 1));
        const uint qbase = (qhead * pc.len_q + ic) * DK + lane * QPT;
        [[unroll]] for (uint d = 0u; d < QPT; d += 2u) {
            const vec2 x = LOAD_PAIR(q_data, qbase + d) * pc.scale_log2;
            qf[r * QPT + d] = x.x;
            qf[r * QPT + d + 1u] = x.y;
            amax = max(amax, max(abs(x.x), abs(x.y)));
        }
        mbase[r] = batch * pc.mask_sb + hq * pc.mask_sh + ic * pc.mask_si;
    }
    amax = workgroup_max(t, amax);
    const float q_scale = amax / INT8_MAX;
    const float inv = quant_inv(amax);
    int q8[RPT * QW];  // packed int8, as int: dotPacked4x8EXT(int, int) is the signed product
    float o[RPT * OPT];
    float m[RPT];
    float l[RPT];
    [[unroll]] for (uint r = 0u; r < RPT; ++r) {
        [[unroll]] for (uint w = 0u; w < QW; ++w) {
            const uint e = r * QPT + w * 4u;
            q8[r * QW + w] = int(quant_pack4(vec4(qf[e], qf[e + 1u], qf[e + 2u], qf[e + 3u]), inv));
        }
        [[unroll]] for (uint d = 0u; d < OPT; ++d) o[r * OPT + d] = 0.0;
        m[r] = NEG_BIG;
        l[r] = 0.0;
    }

    const uint kbase = kvg * pc.len_k * KW + lane * QW;
    const uint sbase = kvg * k_blocks();
    const uint vbase = kvg * pc.len_k * DV;
    const ivec2 keys = key_range(row0, min(row0 + int(BR), int(pc.len_q)));

    for (int j0 = keys.x; j0 < keys.y; j0 += int(BC)) {
        float s[RPT * BC];
        [[unroll]] for (uint jj = 0u; jj < BC; ++jj) {
            const int j = j0 + int(jj);
            const uint jc = uint(min(j, int(pc.len_k) - 1));
            int acc[RPT];
            [[unroll]] for (uint r = 0u; r < RPT; ++r) acc[r] = 0;
            [[unroll]] for (uint w = 0u; w < QW; ++w) {
                const int kx = int(k8_data[kbase + jc * KW + w]);
                [[unroll]] for (uint r = 0u; r < RPT; ++r) acc[r] += dotPacked4x8EXT(q8[r * QW + w], kx);
            }
            const float scale = q_scale * ks_data[sbase + jc / BLOCK_K];
            [[unroll]] for (uint r = 0u; r < RPT; ++r) {
                const int i = first + int(r * ROW_STRIDE);
                float sc = reduce_row(float(acc[r])) * scale;
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
            [[unroll]] for (uint jj = 0u; jj < BC; jj += 2u) {
                // The row sum takes P as computed; P.V takes it rounded to 16 bits.
                const vec2 p = exp2(vec2(s[r * BC + jj], s[r * BC + jj + 1u]) - m_new);
                l[r] += p.x + p.y;
                const vec2 p16 = round16(p);
                s[r * BC + jj] = p16.x;
                s[r * BC + jj + 1u] = p16.y;
            }
        }
        [[unroll]] for (uint jj = 0u; jj < BC; ++jj) {
            const uint jc = uint(min(j0 + int(jj), int(pc.len_k) - 1));
            [[unroll]] for (uint d = 0u; d < OPT; d += 2u) {
                const vec2 vx = round16(LOAD_PAIR(v_data, vbase + jc * DV + lane * OPT + d));
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
        const float inv_l = l[r] > 0.0 ? 1.0 / l[r] : 0.0;
        const uint obase = (qhead * pc.len_q + uint(i)) * DV + lane * OPT;
        [[unroll]] for (uint d = 0u; d < OPT; d += 2u) {
            store_pair(obase + d, vec2(o[r * OPT + d], o[r * OPT + d + 1u]) * inv_l);
        }
        if (lane == 0u) {
            lse_data[qhead * pc.len_q + uint(i)] = l[r] > 0.0 ? (m[r] + log2(l[r])) * LN2 : -1.0 / 0.0;
        }
    }
}
