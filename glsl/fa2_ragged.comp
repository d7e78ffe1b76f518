#version 450
// FA2 forward over packed variable-length sequences and KV caches (aule_kp/vulkan/ragged.py): the
// serving calls flash_attention_varlen and flash_attention_with_kvcache, in flash-attn's layouts.
//
// Buffers (16-bit data packed two per uint as in fa2_dtype.glsl):
//   0 Q  [total_q, Hq, DK]          3 O [total_q, Hq, DV]
//   1 K  rows [R, Hkv, DK]          2 V rows [R, Hkv, DV]   (KV_Q8 = 1: int8, four per uint)
//   4 seqs  [B][4] uint: q_start, len_q, k_start, len_k
//   5 tiles [n_tiles][2] uint: sequence, first packed row
//   6 table [B][max_blocks] uint: a paged cache's block table (push page > 0)
//   7, 8 K and V scales (KV_Q8): fp16 per 32 values, two per uint, [R, Hkv, D / 32]
//   9 partials (n_split > 1): [total_q * Hq][n_split][DV + 2] fp32: unnormalised O, m, l
// Sequence s's key j is row k_start + j, or with a paged cache
// table[s][j / page] * page + j % page. A workgroup is one tile of one sequence and one kv head
// (grid x = tile, y = kv head, z = split), so tiles never cross a sequence and nothing is padded
// to the longest. Its rows are *packed rows* of the sequence: packed row r is query row r / group
// of query head kv_head * group + r % group, so the query heads that share a kv head read each K
// and V row together (GQA decode: group rows from one query).
// Invocation t takes packed row t % BR and every KG-th key (key group t / BR) of the row's band:
// query i sees keys i + diag - left <= j <= i + diag + right (diag = len_k - len_q, bottom-right as
// flash-attn; left/right < 0: unbounded) within the split's keys [z * split_len, (z+1) * split_len).
// Online softmax in the exp2 domain (q pre-scaled by scale * log2(e)), fp32, BC keys per step; the
// key groups merge in shared memory at the end (KG - 1 rounds). With one split the rows are
// normalised and stored in O (a row with no key is 0); with n_split > 1 they go to the partials and
// a second dispatch of this shader (push mode 1, one invocation per (row, head)) merges them.
// Shared memory: 4 * (BR * DV + 2 * BR + 1) bytes when KG > 1, else 12.
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_control_flow_attributes : enable

layout(constant_id = 0) const uint DK = 64;
layout(constant_id = 1) const uint DV = 64;
layout(constant_id = 2) const uint BR = 64;     // packed rows per workgroup
layout(constant_id = 3) const uint KG = 1;      // key groups per row
layout(constant_id = 4) const uint BC = 8;      // keys per step (unrolled: CPU drivers compile fewer faster)
layout(constant_id = 5) const uint DTYPE = 0;   // of q, o and a float cache
layout(constant_id = 6) const uint WG = 64;     // = BR * KG
layout(constant_id = 7) const uint KV_Q8 = 0;   // 1: K and V are q8_0 blocks
layout(constant_id = 11) const uint TEST_CORRUPT = 0;

layout(local_size_x_id = 6, local_size_y = 1, local_size_z = 1) in;

layout(std430, binding = 0) readonly buffer QBuf { uint q_data[]; };
layout(std430, binding = 1) readonly buffer KBuf { uint k_data[]; };
layout(std430, binding = 2) readonly buffer VBuf { uint v_data[]; };
layout(std430, binding = 3) writeonly buffer OBuf { uint o_data[]; };
layout(std430, binding = 4) readonly buffer SeqBuf { uint seqs[]; };
layout(std430, binding = 5) readonly buffer TileBuf { uint tiles[]; };
layout(std430, binding = 6) readonly buffer TableBuf { uint table[]; };
layout(std430, binding = 7) readonly buffer KScaleBuf { uint k_scales[]; };
layout(std430, binding = 8) readonly buffer VScaleBuf { uint v_scales[]; };
layout(std430, binding = 9) buffer PartBuf { float partials[]; };

layout(push_constant) uniform Push {
    uint heads_q;
    uint heads_kv;
    uint group;       // query heads per kv head
    float scale_log2; // softmax scale * log2(e)
    int left;         // < 0: unbounded
    int right;        // < 0: unbounded (causal: 0)
    uint page;        // 0: contiguous rows; else a paged cache's page size
    uint max_blocks;  // the block table's row length
    uint n_split;
    uint split_len;   // keys per split
    uint mode;        // 0: attention; 1: merge the splits' partials into O
    uint rows;        // total_q * Hq (mode 1)
} pc;

#include "fa2_dtype.glsl"

const float NEG_BIG = -3.4028234663852886e38;
const uint PSTRIDE = DV + 2u;

shared float sh_o[(KG > 1u ? BR * DV : 0u) + 1u];
shared float sh_m[BR];
shared float sh_l[BR];

// Four elements from d (a multiple of 4) of K or V row `row`, kv head hk: packed floats, or q8_0.
vec4 load4(uint which, uint row, uint hk, uint d) {
    const uint dim = which == 0u ? DK : DV;
    const uint e = (row * pc.heads_kv + hk) * dim + d;
    if (KV_Q8 == 1u) {
        const uint w = which == 0u ? k_data[e >> 2u] : v_data[e >> 2u];
        const uint si = e / 32u;
        const uint sw = which == 0u ? k_scales[si >> 1u] : v_scales[si >> 1u];
        const float sc = unpackHalf2x16(sw >> ((si & 1u) * 16u)).x;
        return vec4(int(w << 24u) >> 24, int(w << 16u) >> 24, int(w << 8u) >> 24, int(w) >> 24) * sc;
    }
    return which == 0u ? vec4(LOAD_PAIR(k_data, e), LOAD_PAIR(k_data, e + 2u))
                       : vec4(LOAD_PAIR(v_data, e), LOAD_PAIR(v_data, e + 2u));
}

uint key_row(uint s, uint k_start, uint j) {
    return pc.page == 0u ? k_start + j : table[s * pc.max_blocks + j / pc.page] * pc.page + j % pc.page;
}

// O's row `out_row` = the local array o times inv_l.
#define STORE_ROW(out_row, o, inv_l) { \
    [[unroll]] for (uint d_ = 0u; d_ < DV; d_ += 2u) { \
        STORE_PAIR(o_data, (out_row) * DV + d_, vec2(o[d_], o[d_ + 1u]) * (inv_l)) } }

void merge_splits() {
    const uint row = gl_GlobalInvocationID.x;  // (query row, head) of O
    if (row >= pc.rows) return;
    const uint base = row * pc.n_split * PSTRIDE;
    float m = NEG_BIG;
    for (uint s = 0u; s < pc.n_split; ++s) m = max(m, partials[base + s * PSTRIDE + DV]);
    float l = 0.0;
    float o[DV];
    [[unroll]] for (uint d = 0u; d < DV; ++d) o[d] = 0.0;
    for (uint s = 0u; s < pc.n_split; ++s) {
        const uint p = base + s * PSTRIDE;
        const float w = exp2(partials[p + DV] - m);
        l += partials[p + DV + 1u] * w;
        [[unroll]] for (uint d = 0u; d < DV; ++d) o[d] += partials[p + d] * w;
    }
    STORE_ROW(row, o, l > 0.0 ? 1.0 / l : 0.0)
}

void main() {
    if (pc.mode == 1u) {
        merge_splits();
        return;
    }
    const uint t = gl_LocalInvocationID.x;
    const uint kg = t / BR;
    const uint s = tiles[2u * gl_WorkGroupID.x];
    const uint pr = tiles[2u * gl_WorkGroupID.x + 1u] + t % BR;
    const uint hk = gl_WorkGroupID.y;
    const uint q_start = seqs[4u * s], len_q = seqs[4u * s + 1u], k_start = seqs[4u * s + 2u];
    const uint len_k = seqs[4u * s + 3u];
    const bool valid = pr < len_q * pc.group;
    const uint prc = min(pr, len_q * pc.group - 1u);  // rows past the tile compute on a valid row, never store
    const uint i = prc / pc.group;
    const uint h = hk * pc.group + prc % pc.group;
    const uint qrow = (q_start + i) * pc.heads_q + h;

    float q[DK];
    [[unroll]] for (uint d = 0u; d < DK; d += 2u) {
        const vec2 x = LOAD_PAIR(q_data, qrow * DK + d) * pc.scale_log2;
        q[d] = x.x;
        q[d + 1u] = x.y;
    }
    float o[DV];
    [[unroll]] for (uint d = 0u; d < DV; ++d) o[d] = 0.0;
    float m = NEG_BIG;
    float l = 0.0;

    const int diag = int(len_k) - int(len_q);
    int lo = pc.left < 0 ? 0 : max(0, int(i) + diag - pc.left);
    int hi = pc.right < 0 ? int(len_k) : min(int(len_k), int(i) + diag + pc.right + 1);
    lo = max(lo, int(gl_WorkGroupID.z * pc.split_len));
    hi = min(hi, int((gl_WorkGroupID.z + 1u) * pc.split_len));

    for (int j0 = lo + int(kg); j0 < hi; j0 += int(BC * KG)) {
        float sc[BC];
        uint rows[BC];
        [[unroll]] for (uint c = 0u; c < BC; ++c) {
            const int j = j0 + int(c * KG);
            rows[c] = key_row(s, k_start, uint(min(j, hi - 1)));
            float acc = 0.0;
            [[unroll]] for (uint d = 0u; d < DK; d += 4u) {
                const vec4 kx = load4(0u, rows[c], hk, d);
                acc += q[d] * kx.x + q[d + 1u] * kx.y + q[d + 2u] * kx.z + q[d + 3u] * kx.w;
            }
            sc[c] = j < hi ? acc : -1.0 / 0.0;
        }
        float m_new = m;
        [[unroll]] for (uint c = 0u; c < BC; ++c) m_new = max(m_new, sc[c]);
        const float alpha = exp2(m - m_new);
        m = m_new;
        l *= alpha;
        [[unroll]] for (uint d = 0u; d < DV; ++d) o[d] *= alpha;
        [[unroll]] for (uint c = 0u; c < BC; ++c) {
            const float p = exp2(sc[c] - m);
            l += p;
            [[unroll]] for (uint d = 0u; d < DV; d += 4u) {
                const vec4 vx = load4(1u, rows[c], hk, d);
                o[d] += p * vx.x;
                o[d + 1u] += p * vx.y;
                o[d + 2u] += p * vx.z;
                o[d + 3u] += p * vx.w;
            }
        }
    }

    // Key groups 1.. hand their (m, l, o) to group 0, one after another.
    const uint row = t % BR;
    // Rolled: each barrier in the code is a suspend point that CPU drivers (lavapipe) compile slowly.
    [[dont_unroll]] for (uint g = 1u; g < KG; ++g) {
        barrier();
        if (kg == g) {
            sh_m[row] = m;
            sh_l[row] = l;
            [[unroll]] for (uint d = 0u; d < DV; ++d) sh_o[row * DV + d] = o[d];
        }
        barrier();
        if (kg == 0u) {
            const float m2 = max(m, sh_m[row]);
            const float a = exp2(m - m2), b = exp2(sh_m[row] - m2);
            m = m2;
            l = l * a + sh_l[row] * b;
            [[unroll]] for (uint d = 0u; d < DV; ++d) o[d] = o[d] * a + sh_o[row * DV + d] * b;
        }
    }
    if (kg != 0u || !valid) return;
    if (pc.n_split == 1u) {
        // l == 0: every key hidden; the row is 0, as flash-attn returns.
        STORE_ROW(qrow, o, l > 0.0 ? 1.0 / l : 0.0)
    } else {
        const uint p = (qrow * pc.n_split + gl_WorkGroupID.z) * PSTRIDE;
        [[unroll]] for (uint d = 0u; d < DV; ++d) partials[p + d] = o[d];
        partials[p + DV] = m;
        partials[p + DV + 1u] = l;
    }
}
