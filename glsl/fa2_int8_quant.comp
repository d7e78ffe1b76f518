#version 450
// precision="int8": K smoothed and quantized per block of keys (fa2_int8.glsl says where to). One
// workgroup per (batch, kv-head) group of the chunk: the channel means (WG / (DK/2) stripes of keys
// per channel pair, summed in shared memory), then block by block the largest |k - mean| (a tree in
// shared memory) and the packed int8 values. Spec constants as fa2_common.glsl's; only DK, DTYPE and
// WG (a power of two, a multiple of DK/2) are read.
#extension GL_GOOGLE_include_directive : require
#include "fa2_common.glsl"
#include "fa2_int8.glsl"

const uint PAIRS = DK / 2u;
const uint STRIPES = WG / PAIRS;
const uint WORDS = DK / 4u;

shared vec2 part[WG];
shared float mean[DK];
shared float red[WG];

float workgroup_max(uint t, float x) {
    red[t] = x;
    barrier();
    for (uint s = WG / 2u; s > 0u; s >>= 1u) {
        if (t < s) red[t] = max(red[t], red[t + s]);
        barrier();
    }
    const float r = red[0];
    barrier();  // red is written again by the next block
    return r;
}

vec4 smoothed(uint kbase, uint w) {
    const uint e = kbase + w * 4u;
    const uint c = (w % WORDS) * 4u;
    return vec4(LOAD_PAIR(k_data, e), LOAD_PAIR(k_data, e + 2u)) - vec4(mean[c], mean[c + 1u], mean[c + 2u], mean[c + 3u]);
}

void main() {
    const uint t = gl_LocalInvocationID.x;
    const uint g = gl_WorkGroupID.x;
    const uint kbase = g * pc.len_k * DK;

    vec2 sum = vec2(0.0);
    const uint c2 = t % PAIRS;
    for (uint j = t / PAIRS; j < pc.len_k; j += STRIPES) sum += LOAD_PAIR(k_data, kbase + j * DK + c2 * 2u);
    part[t] = sum;
    barrier();
    if (t < PAIRS) {
        vec2 total = vec2(0.0);
        for (uint s = 0u; s < STRIPES; ++s) total += part[s * PAIRS + t];
        total /= float(max(pc.len_k, 1u));
        mean[2u * t] = total.x;
        mean[2u * t + 1u] = total.y;
    }
    barrier();

    const uint nb = k_blocks();
    for (uint kb = 0u; kb < nb; ++kb) {
        const uint w0 = kb * BLOCK_K * WORDS;
        const uint w1 = min(pc.len_k, (kb + 1u) * BLOCK_K) * WORDS;
        float amax = 0.0;
        for (uint w = w0 + t; w < w1; w += WG) {
            const vec4 x = abs(smoothed(kbase, w));
            amax = max(amax, max(max(x.x, x.y), max(x.z, x.w)));
        }
        amax = workgroup_max(t, amax);
        const float inv = quant_inv(amax);
        for (uint w = w0 + t; w < w1; w += WG) k8_data[g * pc.len_k * WORDS + w] = quant_pack4(smoothed(kbase, w), inv);
        if (t == 0u) ks_data[g * nb + kb] = amax / INT8_MAX;
    }
}
