#version 450
// Appends rows to a KV cache resident on the device (aule_kp/vulkan/kvcache.py): source row r
// (words_per_row uint words: packed 16-bit or fp32 values, int8 q8_0 values, or their fp16 scales)
// is copied to destination row rows[r]. One invocation per word, so a decode step moves only the
// new rows to the device.
layout(local_size_x = 64, local_size_y = 1, local_size_z = 1) in;

layout(std430, binding = 0) writeonly buffer Dst { uint dst[]; };
layout(std430, binding = 1) readonly buffer Src { uint src[]; };
layout(std430, binding = 2) readonly buffer Rows { uint rows[]; };

layout(push_constant) uniform Push {
    uint words_per_row;
    uint n_words;  // source rows * words_per_row
} pc;

void main() {
    const uint w = gl_GlobalInvocationID.x;
    if (w >= pc.n_words) return;
    const uint r = w / pc.words_per_row;
    dst[rows[r] * pc.words_per_row + w % pc.words_per_row] = src[w];
}
