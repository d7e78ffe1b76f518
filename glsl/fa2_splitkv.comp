#version 450
// Split-KV forward ("flash-decoding"), pass 1 of 2: partial attention of a few query rows over
// one split of the keys. For short query blocks (Lq <= 16) over long key sequences, where the
// forward's grid (query tiles x query heads) is far too small to fill a GPU and the work is
// bound by reading K and V once. Pass 2 (fa2_splitkv_combine.comp) merges the splits.
//
// Interface: fa2_common.glsl (bindings 0-5, Push, spec constants, band helpers), with
// FA2_SPLIT_KV defined, which adds two push constants after the common ones:
//   n_split    number of splits (= the grid's x)
//   split_len  keys per split: split s covers [lo + s*split_len, lo + (s+1)*split_len) of the
//              band key_range(0, len_q) = [lo, hi) (keys outside the band are never read)
// and two scratch bindings (fp32, written here, read by the combine pass):
//   6 partial O  [chunk row][split][DV]   unnormalised: sum_j exp2(s_j - m) v_j
//   7 partial ml [chunk row][split] vec2  (m, l): running max (exp2 domain), sum of exp2(s_j - m)
// A chunk row is q head in the chunk * len_q + query index: O's row order.
//
// Spec constants, read as:
//   DK, DV, DTYPE, WG as in fa2_common.glsl (local_size_x = WG)
//   BR   query rows per workgroup (RB below): all rows are held by every invocation (register
//        blocking), so each K/V element loaded from memory feeds BR rows
//   BC   keys per key group per step (loads of BC keys are issued before any math: memory-level
//        parallelism)
//   TPR  invocations per key (a "key group"), a power of two <= the subgroup size: each loads a
//        16-byte slice of the key's K and V rows (uvec4: 8 16-bit or 4 fp32 elements)
//   STAGE, RPT: unused
//
// Grid: x = split, y = kv group within the chunk, z = block of BR rows within the kv group's
// group * len_q rows (all query heads that share the kv head, times the query rows, packed: each
// K/V element is read from memory once per kv head and row block, not once per query head).
//
// Work per workgroup: WG / TPR key groups stream the split's keys; at each step key group g takes
// keys j0 + c * NKG + g (c < BC), so the workgroup reads NKG consecutive K (and V) rows per c, as
// whole 16-byte vectors: coalesced. Each key group keeps its own online softmax (exp2 domain,
// fp32, q pre-scaled by scale * log2(e)); q.k is summed across the TPR lanes with
// subgroupShuffleXor. No shared memory or barrier in the key loop. At the end the key groups'
// (m, l, O) are merged in shared memory (NKG rounds, one barrier each: once per workgroup) and
// written to the scratch buffers.
//
// Shared memory: 4 * (BR * DV + 2 * (WG / TPR) * BR) bytes.
// Per-invocation registers ~ BR * (DK + DV) / TPR floats (q and O) + BC * (DK + DV) / (4 * TPR)
// uvec4 loads in flight (for 16-bit data; twice that for fp32): the host keeps BR * (DK + DV) /
// TPR small.
//
// Fully hidden rows and empty splits: m starts at NEG_BIG (finite), hidden scores are -inf, so
// p = 0 and l stays 0; the combine pass turns l == 0 over all splits into O = 0, LSE = -inf.
// Loads past the split's end use a clamped (valid) key index and their scores are hidden.
// lavapipe ends an invocation's loops after 65535 iterations in total: every loop but the key
// loop has a literal trip count ([[unroll]]), and the host keeps split_len / (NKG * BC) under it.
#extension GL_GOOGLE_include_directive : require
#extension GL_KHR_shader_subgroup_shuffle : enable
#define FA2_SPLIT_KV
#include "fa2_common.glsl"

const uint RB = BR;
const uint VEC = DTYPE == 0u ? 4u : 8u;   // elements per uvec4
const uint PPV = VEC / 2u;                // element pairs per uvec4
const uint NVK = DK / VEC;                // uvec4 per K row
const uint NVV = DV / VEC;                // uvec4 per V row
const uint NKL = (NVK + TPR - 1u) / TPR;  // K uvec4 per lane
const uint NVL = (NVV + TPR - 1u) / TPR;  // V uvec4 per lane
const uint QPL = NKL * VEC;               // q elements per lane and row
const uint OPL = NVL * VEC;               // O elements per lane and row
const uint NKG = WG / TPR;                // key groups per workgroup
const uint DV4 = DV / 4u;

// Vector views of Q/K/V (rows start at multiples of 16 bytes: head dims are multiples of 8).
layout(std430, binding = 0) readonly buffer QBuf4 { uvec4 q_data4[]; };
layout(std430, binding = 1) readonly buffer KBuf4 { uvec4 k_data4[]; };
layout(std430, binding = 2) readonly buffer VBuf4 { uvec4 v_data4[]; };
layout(std430, binding = 6) writeonly buffer PartO { vec4 part_o[]; };
layout(std430, binding = 7) writeonly buffer PartML { vec2 part_ml[]; };

shared vec4 red_o[RB * DV4];
shared float red_m[NKG * RB];
shared float red_l[NKG * RB];

// Elements 2c, 2c+1 of a uvec4 of packed DTYPE data (c < PPV; c is a constant after unrolling).
vec2 pair_of(uvec4 u, uint c) {
    if (DTYPE == 0u) return uintBitsToFloat(uvec2(u[2u * c], u[2u * c + 1u]));
    if (DTYPE == 1u) return unpackHalf2x16(u[c]);
    return vec2(uintBitsToFloat(u[c] << 16u), uintBitsToFloat(u[c] & 0xFFFF0000u));
}

float reduce_key(float x) {
    // Literal trip count (unrolled; see the header on lavapipe's loop limit); TPR <= 32.
    [[unroll]] for (uint b = 0u; b < 5u; ++b) {
        if ((1u << b) < TPR) x += subgroupShuffleXor(x, 1u << b);
    }
    return x;
}

void main() {
    const uint t = gl_LocalInvocationID.x;
    const uint lane = t % TPR;
    const uint kg = t / TPR;
    const uint split = gl_WorkGroupID.x;
    const uint kvg = gl_WorkGroupID.y;             // kv group within the chunk
    const uint rows = pc.group * pc.len_q;         // query rows sharing this kv head
    const uint r0 = gl_WorkGroupID.z * RB;         // first row of this block
    const uint gkv = pc.group0 + kvg;              // global (batch, kv head)
    const uint batch = gkv / pc.heads_kv;
    const uint head0 = (gkv % pc.heads_kv) * pc.group;

    const ivec2 band = key_range(0, int(pc.len_q));
    const int ka = band.x + int(min(split * pc.split_len, uint(band.y - band.x)));
    const int kb = min(band.y, ka + int(pc.split_len));

    float q[RB * QPL];
    float o[RB * OPL];
    float m[RB];
    float l[RB];
    int qi[RB];
    uint mbase[RB];
    [[unroll]] for (uint r = 0u; r < RB; ++r) {
        // Rows past the kv group's last compute on that row and are never stored.
        const uint rr = min(r0 + r, rows - 1u);
        const uint row = kvg * rows + rr;          // chunk row
        qi[r] = int(rr % pc.len_q);
        mbase[r] = batch * pc.mask_sb + (head0 + rr / pc.len_q) * pc.mask_sh + uint(qi[r]) * pc.mask_si;
        [[unroll]] for (uint it = 0u; it < NKL; ++it) {
            const uint vi = lane + it * TPR;
            const uvec4 u = q_data4[row * NVK + min(vi, NVK - 1u)];
            [[unroll]] for (uint c = 0u; c < PPV; ++c) {
                // q carries the softmax scale and log2(e); lanes past the row hold zeros.
                const vec2 x = vi < NVK ? pair_of(u, c) * pc.scale_log2 : vec2(0.0);
                q[r * QPL + it * VEC + 2u * c] = x.x;
                q[r * QPL + it * VEC + 2u * c + 1u] = x.y;
            }
        }
        [[unroll]] for (uint d = 0u; d < OPL; ++d) o[r * OPL + d] = 0.0;
        m[r] = NEG_BIG;
        l[r] = 0.0;
    }

    const uint kbase = kvg * pc.len_k;
    for (int j0 = ka; j0 < kb; j0 += int(NKG * BC)) {
        uvec4 kr[BC * NKL];
        uvec4 vr[BC * NVL];
        [[unroll]] for (uint c = 0u; c < BC; ++c) {
            const uint jc = kbase + uint(min(j0 + int(c * NKG + kg), kb - 1));
            [[unroll]] for (uint it = 0u; it < NKL; ++it) {
                kr[c * NKL + it] = k_data4[jc * NVK + min(lane + it * TPR, NVK - 1u)];
            }
            [[unroll]] for (uint it = 0u; it < NVL; ++it) {
                vr[c * NVL + it] = v_data4[jc * NVV + min(lane + it * TPR, NVV - 1u)];
            }
        }

        float s[RB * BC];
        [[unroll]] for (uint c = 0u; c < BC; ++c) {
            const int j = j0 + int(c * NKG + kg);
            float acc[RB];
            [[unroll]] for (uint r = 0u; r < RB; ++r) acc[r] = 0.0;
            [[unroll]] for (uint it = 0u; it < NKL; ++it) {
                [[unroll]] for (uint cc = 0u; cc < PPV; ++cc) {
                    const vec2 kx = pair_of(kr[c * NKL + it], cc);
                    [[unroll]] for (uint r = 0u; r < RB; ++r) {
                        const uint e = r * QPL + it * VEC + 2u * cc;
                        acc[r] += q[e] * kx.x + q[e + 1u] * kx.y;
                    }
                }
            }
            [[unroll]] for (uint r = 0u; r < RB; ++r) {
                float sc = reduce_key(acc[r]);
                if (j >= kb || !key_visible(qi[r], j)) {
                    sc = -1.0 / 0.0;
                } else if (pc.has_mask != 0u) {
                    sc += mask_term(mask_data[mbase[r] + uint(j) * pc.mask_sj]);
                }
                s[r * BC + c] = sc;
            }
        }

        [[unroll]] for (uint r = 0u; r < RB; ++r) {
            float m_new = m[r];
            [[unroll]] for (uint c = 0u; c < BC; ++c) m_new = max(m_new, s[r * BC + c]);
            const float alpha = exp2(m[r] - m_new);
            m[r] = m_new;
            l[r] *= alpha;
            [[unroll]] for (uint d = 0u; d < OPL; ++d) o[r * OPL + d] *= alpha;
            [[unroll]] for (uint c = 0u; c < BC; ++c) {
                s[r * BC + c] = exp2(s[r * BC + c] - m_new);
                l[r] += s[r * BC + c];
            }
        }
        [[unroll]] for (uint c = 0u; c < BC; ++c) {
            [[unroll]] for (uint it = 0u; it < NVL; ++it) {
                [[unroll]] for (uint cc = 0u; cc < PPV; ++cc) {
                    const vec2 vx = pair_of(vr[c * NVL + it], cc);
                    [[unroll]] for (uint r = 0u; r < RB; ++r) {
                        const uint e = r * OPL + it * VEC + 2u * cc;
                        o[e] += s[r * BC + c] * vx.x;
                        o[e + 1u] += s[r * BC + c] * vx.y;
                    }
                }
            }
        }
    }

    // Merge the key groups: common max per row, then O summed group by group in shared memory.
    if (lane == 0u) {
        [[unroll]] for (uint r = 0u; r < RB; ++r) {
            red_m[kg * RB + r] = m[r];
            red_l[kg * RB + r] = l[r];
        }
    }
    barrier();
    [[unroll]] for (uint r = 0u; r < RB; ++r) {
        float mx = NEG_BIG;
        [[unroll]] for (uint g = 0u; g < NKG; ++g) mx = max(mx, red_m[g * RB + r]);
        const float w = exp2(m[r] - mx);
        [[unroll]] for (uint d = 0u; d < OPL; ++d) o[r * OPL + d] *= w;
    }
    [[unroll]] for (uint g = 0u; g < NKG; ++g) {
        if (kg == g) {
            [[unroll]] for (uint r = 0u; r < RB; ++r) {
                [[unroll]] for (uint it = 0u; it < NVL; ++it) {
                    const uint vi = lane + it * TPR;
                    if (vi < NVV) {
                        [[unroll]] for (uint h = 0u; h < VEC / 4u; ++h) {
                            const uint e = r * OPL + it * VEC + 4u * h;
                            const vec4 x = vec4(o[e], o[e + 1u], o[e + 2u], o[e + 3u]);
                            const uint dst = r * DV4 + vi * (VEC / 4u) + h;
                            red_o[dst] = g == 0u ? x : red_o[dst] + x;
                        }
                    }
                }
            }
        }
        barrier();
    }

    const uint n_split = pc.n_split;
    for (uint e = t; e < RB * DV4; e += WG) {
        const uint r = e / DV4;
        if (r0 + r < rows) part_o[((kvg * rows + r0 + r) * n_split + split) * DV4 + e % DV4] = red_o[e];
    }
    if (t < RB && r0 + t < rows) {
        float mx = NEG_BIG;
        [[unroll]] for (uint g = 0u; g < NKG; ++g) mx = max(mx, red_m[g * RB + t]);
        float lx = 0.0;
        [[unroll]] for (uint g = 0u; g < NKG; ++g) lx += red_l[g * RB + t] * exp2(red_m[g * RB + t] - mx);
        part_ml[(kvg * rows + r0 + t) * n_split + split] = vec2(mx, lx);
    }
}
