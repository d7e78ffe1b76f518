// Packed element access shared by the FA2 kernels: 16-bit data two per uint (element e in word
// e>>1, low half first), fp32 as float bits. The includer declares the spec constants DTYPE (0
// float32, 1 float16, 2 bfloat16) and TEST_CORRUPT (see fa2_common.glsl) before using the macros.

// Element e of a packed buffer, as float.
#define LOAD_ELEM(buf, e) ( \
    DTYPE == 0u ? uintBitsToFloat(buf[(e)]) : \
    DTYPE == 1u ? unpackHalf2x16(buf[(e) >> 1u] >> (((e) & 1u) * 16u)).x : \
                  uintBitsToFloat((buf[(e) >> 1u] << (16u - ((e) & 1u) * 16u)) & 0xFFFF0000u))

// Elements e and e+1 (e even) of a packed buffer.
#define LOAD_PAIR(buf, e) ( \
    DTYPE == 0u ? vec2(uintBitsToFloat(buf[(e)]), uintBitsToFloat(buf[(e) + 1u])) : \
    DTYPE == 1u ? unpackHalf2x16(buf[(e) >> 1u]) : \
                  vec2(uintBitsToFloat(buf[(e) >> 1u] << 16u), uintBitsToFloat(buf[(e) >> 1u] & 0xFFFF0000u)))

uint bf16_bits(float x) {
    uint u = floatBitsToUint(x);
    if (isnan(x)) return (u >> 16u) | 0x40u;
    return (u + 0x7FFFu + ((u >> 16u) & 1u)) >> 16u;
}

// Writes elements e, e+1 (e even) of a packed DTYPE buffer: STORE_PAIR(buf, e, vec2 expression)
// for any output buffer, store_pair(e, val) for O. STORE_PAIR_VAR is their common body (v: a vec2
// variable); it also applies the test-only TEST_CORRUPT switch (0 in normal use: folded away).
#define STORE_PAIR_VAR(buf, e, v) { \
    const vec2 c_ = (v) + vec2(TEST_CORRUPT != 0u ? 1.0 : 0.0); \
    if (DTYPE == 0u) { buf[(e)] = floatBitsToUint(c_.x); buf[(e) + 1u] = floatBitsToUint(c_.y); } \
    else if (DTYPE == 1u) { buf[(e) >> 1u] = packHalf2x16(c_); } \
    else { buf[(e) >> 1u] = bf16_bits(c_.x) | (bf16_bits(c_.y) << 16u); } }
#define STORE_PAIR(buf, e, val) { const vec2 sp_ = (val); STORE_PAIR_VAR(buf, e, sp_) }
