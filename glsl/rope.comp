#version 450
#extension GL_GOOGLE_include_directive : require
// Rotary position embedding of q and k, recorded before the attention in the forward's sequence
// (aule_kp/vulkan/plan.py, aule_kp/rotary.py) and before the ragged kernel (aule_kp/vulkan/ragged.py):
// flash-attn's apply_rotary over channels [offset, offset + 2 half) of each row, "half" layout
// (channel i with i + half) or interleaved (2i with 2i + 1), the other channels copied. Rotated in
// fp32 and rounded once to the storage type.
//
// Out of place (q_in -> q_out, k_in -> k_out): the inputs were just written by a transfer, and an
// in-place shader write after it would need a transfer -> shader-write barrier kp does not record.
// One invocation per two adjacent channels (a packed 16-bit word holds two), which it alone writes,
// reading its partners from the read-only input (the host sends only even offsets, dims and, for
// the half layout, halves). cos/sin come gathered per row from the host: q rows' at q_cos/q_sin,
// k rows' at k_cos/k_sin, row b * len + position-in-sequence, `half` floats each.
layout(local_size_x = 64, local_size_y = 1, local_size_z = 1) in;

layout(constant_id = 0) const uint DTYPE = 0;  // 0 float32, 1 float16, 2 bfloat16
layout(constant_id = 1) const uint TEST_CORRUPT = 0;  // fa2_dtype.glsl's test switch; 0 in use

layout(std430, binding = 0) readonly buffer QIn { uint q_in[]; };
layout(std430, binding = 1) readonly buffer KIn { uint k_in[]; };
layout(std430, binding = 2) readonly buffer Tables { float tab[]; };
layout(std430, binding = 3) writeonly buffer QOut { uint q_out[]; };
layout(std430, binding = 4) writeonly buffer KOut { uint k_out[]; };

#include "fa2_dtype.glsl"

layout(push_constant) uniform Push {
    uint q_rows;     // rows of q in this dispatch's buffer (query heads x len_q)
    uint k_rows;     // rows of k (kv heads x len_k)
    uint len_q;
    uint len_k;
    uint heads_q;
    uint heads_kv;
    uint q_head0;    // global index (batch * heads + head) of the buffer's first q head
    uint k_head0;
    uint dim;        // head dim of q and k (even)
    uint half_r;     // rotation pairs R/2
    uint offset;     // first rotated channel (even)
    uint interleaved;
    uint q_cos;
    uint q_sin;
    uint k_cos;
    uint k_sin;
    uint k_rotate;   // 0: k is copied unrotated (its keys came rotated, e.g. from a cache)
} pc;

// Channels (c, c+1), c = 2u, of the row at element `base` of src, rotated, into dst.
#define ROTATE(src, dst, base, trow, cos_at, sin_at, rot) { \
    const uint c = 2u * u; \
    const uint e = (base) + c; \
    const vec2 x = LOAD_PAIR(src, e); \
    if (!(rot) || c < pc.offset || c >= pc.offset + 2u * pc.half_r) { \
        STORE_PAIR(dst, e, x) \
    } else if (pc.interleaved != 0u) { \
        const uint t = (trow) * pc.half_r + (c - pc.offset) / 2u; \
        const float cs = tab[(cos_at) + t]; \
        const float sn = tab[(sin_at) + t]; \
        STORE_PAIR(dst, e, vec2(x.x * cs - x.y * sn, x.y * cs + x.x * sn)) \
    } else { \
        const bool first = c - pc.offset < pc.half_r; \
        const uint t = (trow) * pc.half_r + (first ? c - pc.offset : c - pc.offset - pc.half_r); \
        const vec2 cs = vec2(tab[(cos_at) + t], tab[(cos_at) + t + 1u]); \
        const vec2 sn = vec2(tab[(sin_at) + t], tab[(sin_at) + t + 1u]); \
        const vec2 y = LOAD_PAIR(src, first ? e + pc.half_r : e - pc.half_r); \
        STORE_PAIR(dst, e, first ? x * cs - y * sn : x * cs + y * sn) \
    } }

void main() {
    const uint units = pc.dim / 2u;
    const uint id = (gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x) * 64u + gl_LocalInvocationID.x;
    uint row = id / units;
    const uint u = id % units;
    if (row < pc.q_rows) {
        const uint head = pc.q_head0 + row / pc.len_q;
        const uint trow = (head / pc.heads_q) * pc.len_q + row % pc.len_q;
        ROTATE(q_in, q_out, row * pc.dim, trow, pc.q_cos, pc.q_sin, true)
        return;
    }
    row -= pc.q_rows;
    if (row >= pc.k_rows) return;
    const uint head = pc.k_head0 + row / pc.len_k;
    const uint trow = (head / pc.heads_kv) * pc.len_k + row % pc.len_k;
    ROTATE(k_in, k_out, row * pc.dim, trow, pc.k_cos, pc.k_sin, pc.k_rotate != 0u)
}
