#version 450
#extension GL_GOOGLE_include_directive : require
// Appends rows to a KV cache resident on the device (aule_kp/vulkan/kvcache.py): source row r
// (words_per_row uint words: packed 16-bit or fp32 values, int8 q8_0 values, or their fp16 scales)
// is copied to destination row rows[r]. One invocation per word, so a decode step moves only the
// new rows to the device.
//
// With `rotate` set (float keys of a layer's cache, aule_kp/nn/devicecache.py), each of a row's
// heads of `head_dim` channels is rotated on the way (RoPE as glsl/rope.comp: channels [offset,
// offset + 2 half), "half" or interleaved pairs, fp32 math, one rounding to storage) with the cos/sin
// row r of the gathered tables (cos rows first, sin rows at sin_at). The source is read-only, so an
// invocation reads the partner channels it needs and writes only its own word.
layout(local_size_x = 64, local_size_y = 1, local_size_z = 1) in;

layout(constant_id = 0) const uint DTYPE = 0;  // 0 float32, 1 float16, 2 bfloat16 (rotated rows only)
layout(constant_id = 1) const uint TEST_CORRUPT = 0;  // fa2_dtype.glsl's test switch; 0 in use

layout(std430, binding = 0) writeonly buffer Dst { uint dst[]; };
layout(std430, binding = 1) readonly buffer Src { uint src[]; };
layout(std430, binding = 2) readonly buffer Rows { uint rows[]; };
layout(std430, binding = 3) readonly buffer Tables { float tab[]; };

#include "fa2_dtype.glsl"

layout(push_constant) uniform Push {
    uint words_per_row;
    uint n_words;  // source rows * words_per_row
    uint rotate;
    uint head_dim;
    uint half_r;
    uint offset;
    uint interleaved;
    uint sin_at;
} pc;

// Channel e (of the row starting at element `base`) after the rotation of source row r.
float rotated(uint base, uint e, uint r) {
    const float x = LOAD_ELEM(src, base + e);
    const uint c = e % pc.head_dim;
    if (c < pc.offset || c >= pc.offset + 2u * pc.half_r) return x;
    const uint rel = c - pc.offset;
    uint i, partner;
    bool first;
    if (pc.interleaved != 0u) {
        i = rel >> 1u;
        first = (rel & 1u) == 0u;
        partner = e + (first ? 1u : 0u) - (first ? 0u : 1u);
    } else {
        first = rel < pc.half_r;
        i = first ? rel : rel - pc.half_r;
        partner = first ? e + pc.half_r : e - pc.half_r;
    }
    const float y = LOAD_ELEM(src, base + partner);
    const float cs = tab[r * pc.half_r + i];
    const float sn = tab[pc.sin_at + r * pc.half_r + i];
    return first ? x * cs - y * sn : x * cs + y * sn;
}

void main() {
    const uint w = gl_GlobalInvocationID.x;
    if (w >= pc.n_words) return;
    const uint r = w / pc.words_per_row;
    const uint at = rows[r] * pc.words_per_row + w % pc.words_per_row;
    if (pc.rotate == 0u) {
        dst[at] = src[w];
        return;
    }
    const uint per_word = DTYPE == 0u ? 1u : 2u;
    const uint base = r * pc.words_per_row * per_word;
    const uint e = (w % pc.words_per_row) * per_word;
    if (DTYPE == 0u) {
        dst[at] = floatBitsToUint(rotated(base, e, r));
    } else if (DTYPE == 1u) {
        dst[at] = packHalf2x16(vec2(rotated(base, e, r), rotated(base, e + 1u, r)));
    } else {
        dst[at] = bf16_bits(rotated(base, e, r)) | (bf16_bits(rotated(base, e + 1u, r)) << 16u);
    }
}
