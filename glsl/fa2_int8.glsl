// precision="int8" (SageAttention-style; the scheme is aule_kp/quant.py): what the INT8 kernels share
// beside fa2_common.glsl. fa2_int8_quant.comp smooths K (its mean over the keys subtracted per
// channel) and quantizes it per block of BLOCK_K keys into
//   K8 [n_groups_in_chunk, len_k, DK/4]: int8, four channels per uint (channel c in byte c % 4, low first)
//   KS [n_groups_in_chunk, ceil(len_k / BLOCK_K)]: float32 scales (max |k| / 127 of the block)
// and the forward kernels read them there. Q is quantized where it is loaded: a workgroup's BR
// query rows are one block of BLOCK_Q rows (the host sets BR = BLOCK_Q).

layout(std430, binding = 6) buffer K8Buf { uint k8_data[]; };
layout(std430, binding = 7) buffer KSBuf { float ks_data[]; };

const uint BLOCK_Q = 64u;
const uint BLOCK_K = 64u;
const float INT8_MAX = 127.0;

uint k_blocks() {
    return (pc.len_k + BLOCK_K - 1u) / BLOCK_K;
}

// 127 / amax, 0 for an all-zero block (then every value quantizes to 0).
float quant_inv(float amax) {
    return amax > 0.0 ? INT8_MAX / amax : 0.0;
}

// x * inv rounded half away from zero, clamped to [-127, 127], as the low byte of a uint.
uint quant_byte(float x, float inv) {
    const float y = x * inv;
    return uint(int(clamp(trunc(y + (y < 0.0 ? -0.5 : 0.5)), -INT8_MAX, INT8_MAX))) & 0xFFu;
}

uint quant_pack4(vec4 x, float inv) {
    return quant_byte(x.x, inv) | (quant_byte(x.y, inv) << 8u) | (quant_byte(x.z, inv) << 16u)
        | (quant_byte(x.w, inv) << 24u);
}

// A pair of float32 values rounded to the 16-bit type P.V runs in (bf16 for bf16 data, else fp16).
vec2 round16(vec2 x) {
    if (DTYPE == 2u) {
        const uint b = bf16_bits(x.x) | (bf16_bits(x.y) << 16u);
        return vec2(uintBitsToFloat(b << 16u), uintBitsToFloat(b & 0xFFFF0000u));
    }
    return unpackHalf2x16(packHalf2x16(x));
}
