#version 450
#extension GL_GOOGLE_include_directive : require
// Rotary position embedding of q and k in their device buffers, recorded before the attention in
// the forward's sequence (aule_kp/vulkan/plan.py, aule_kp/rotary.py): flash-attn's apply_rotary over
// channels [offset, offset + 2 half) of each row, "half" layout (channel i with i + half) or
// interleaved (2i with 2i + 1). Rotated in fp32 and rounded once to the storage type.
//
// One invocation per two adjacent channels it alone writes (a packed 16-bit word holds two), so
// no two invocations touch one word: interleaved, the pair (2u, 2u+1); half layout, channels 2u,
// 2u+1 and their partners 2u+half, 2u+1+half (the host sends only even offsets, halves and dims).
// cos/sin come gathered per row from the host: q rows' at q_cos/q_sin, k rows' at k_cos/k_sin,
// row b * len + position-in-sequence, `half` floats each.
layout(local_size_x = 64, local_size_y = 1, local_size_z = 1) in;

layout(constant_id = 0) const uint DTYPE = 0;  // 0 float32, 1 float16, 2 bfloat16
layout(constant_id = 1) const uint TEST_CORRUPT = 0;  // fa2_dtype.glsl's test switch; 0 in use

layout(std430, binding = 0) buffer Q { uint q[]; };
layout(std430, binding = 1) buffer K { uint k[]; };
layout(std430, binding = 2) readonly buffer Tables { float tab[]; };

#include "fa2_dtype.glsl"

layout(push_constant) uniform Push {
    uint q_rows;     // rows of q in this dispatch's buffer (query heads x len_q)
    uint k_rows;     // rows of k (kv heads x len_k); 0 when k is not rotated
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
} pc;

#define ROTATE(buf, base, trow, cos_at, sin_at) { \
    if (pc.interleaved != 0u) { \
        const uint e = (base) + pc.offset + 2u * u; \
        const vec2 x = LOAD_PAIR(buf, e); \
        const float c = tab[(cos_at) + (trow) * pc.half_r + u]; \
        const float s = tab[(sin_at) + (trow) * pc.half_r + u]; \
        STORE_PAIR(buf, e, vec2(x.x * c - x.y * s, x.y * c + x.x * s)) \
    } else { \
        const uint e1 = (base) + pc.offset + 2u * u; \
        const uint e2 = e1 + pc.half_r; \
        const vec2 a = LOAD_PAIR(buf, e1); \
        const vec2 b = LOAD_PAIR(buf, e2); \
        const uint t = (trow) * pc.half_r + 2u * u; \
        const vec2 c = vec2(tab[(cos_at) + t], tab[(cos_at) + t + 1u]); \
        const vec2 s = vec2(tab[(sin_at) + t], tab[(sin_at) + t + 1u]); \
        STORE_PAIR(buf, e1, a * c - b * s) \
        STORE_PAIR(buf, e2, b * c + a * s) \
    } }

void main() {
    const uint units = pc.interleaved != 0u ? pc.half_r : pc.half_r / 2u;
    const uint id = (gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x) * 64u + gl_LocalInvocationID.x;
    uint row = id / units;
    const uint u = id % units;
    if (row < pc.q_rows) {
        const uint head = pc.q_head0 + row / pc.len_q;
        const uint trow = (head / pc.heads_q) * pc.len_q + row % pc.len_q;
        ROTATE(q, row * pc.dim, trow, pc.q_cos, pc.q_sin)
        return;
    }
    row -= pc.q_rows;
    if (row >= pc.k_rows) return;
    const uint head = pc.k_head0 + row / pc.len_k;
    const uint trow = (head / pc.heads_kv) * pc.len_k + row % pc.len_k;
    ROTATE(k, row * pc.dim, trow, pc.k_cos, pc.k_sin)
}
