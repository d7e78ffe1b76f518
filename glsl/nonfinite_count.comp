#version 450
// Counts, on the device, whether a forward output holds NaN or inf (aule_kp/nonfinite.py: a finite
// output proves that no hidden key leaked into a row, and the host repairs nothing). A host call's
// plan records it after the attention, behind a compute -> compute barrier (kp patch 5), when kp has
// that barrier; the host compares the counter with its value before the call. On an H200's host
// the same check in the copy threads cost 13 ms of a 23 ms call (BENCHMARKS.md, 2026-12-05).
// The counter is never reset (no upload per call): it only grows, by one per invocation that saw a
// non-finite value.
layout(local_size_x = 256, local_size_y = 1, local_size_z = 1) in;
layout(constant_id = 0) const uint DTYPE = 1u;  // 0 float32, 1 float16, 2 bfloat16 (DTYPE_CODE)

layout(std430, binding = 0) readonly buffer Data { uint words[]; };
layout(std430, binding = 1) buffer Count { uint count[]; };

layout(push_constant) uniform Push {
    uint n_elems;  // elements of the bound problem's output in this buffer
} pc;

// Exponent bits all ones: inf or NaN.
bool nonfinite16(const uint h) {
    const uint e = DTYPE == 1u ? 0x7C00u : 0x7F80u;
    return (h & e) == e;
}

void main() {
    const uint stride = gl_NumWorkGroups.x * gl_WorkGroupSize.x;
    const uint n_words = DTYPE == 0u ? pc.n_elems : (pc.n_elems + 1u) / 2u;
    bool bad = false;
    for (uint i = gl_GlobalInvocationID.x; i < n_words; i += stride) {
        const uint w = words[i];
        if (DTYPE == 0u) {
            bad = bad || (w & 0x7F800000u) == 0x7F800000u;
        } else {
            // The high half of the last word lies past an odd element count.
            bad = bad || nonfinite16(w & 0xFFFFu) || (2u * i + 1u < pc.n_elems && nonfinite16(w >> 16u));
        }
    }
    if (bad) atomicAdd(count[0], 1u);
}
