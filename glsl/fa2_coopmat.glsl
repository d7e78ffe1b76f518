// Shared by the cooperative-matrix kernels (fa2_fwd_coopmat.comp and, through fa2_bwd_cm.glsl, the
// coopmat backward): the fragment types (GL_KHR_cooperative_matrix at subgroup scope, M = N = K =
// 16, fp16 A/B operands, fp32 accumulators), vector views of the packed Q / K / V inputs, and
// loads of 4 of their elements as fp16. Include it after fa2_common.glsl (bindings, DTYPE).

#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
#extension GL_KHR_memory_scope_semantics : require
#extension GL_KHR_cooperative_matrix : require

const uint CM = 16u;
#define MAT_A coopmat<float16_t, gl_ScopeSubgroup, 16, 16, gl_MatrixUseA>
#define MAT_B coopmat<float16_t, gl_ScopeSubgroup, 16, 16, gl_MatrixUseB>
#define MAT_C coopmat<float, gl_ScopeSubgroup, 16, 16, gl_MatrixUseAccumulator>
#define MAT_H coopmat<float16_t, gl_ScopeSubgroup, 16, 16, gl_MatrixUseAccumulator>

// Vector views of the packed inputs (aliases of fa2_common.glsl's uint views): 4 elements per
// uvec2 (16-bit data) or uvec4 (fp32). Row starts are multiples of 16 elements (DK, DV % 16 == 0),
// so these are always aligned.
layout(std430, binding = 0) readonly buffer QBuf2 { uvec2 q_data2[]; };
layout(std430, binding = 0) readonly buffer QBuf4 { uvec4 q_data4[]; };
layout(std430, binding = 1) readonly buffer KBuf2 { uvec2 k_data2[]; };
layout(std430, binding = 1) readonly buffer KBuf4 { uvec4 k_data4[]; };
layout(std430, binding = 2) readonly buffer VBuf2 { uvec2 v_data2[]; };
layout(std430, binding = 2) readonly buffer VBuf4 { uvec4 v_data4[]; };

// 4 elements as 4 packed halves.
uvec2 f32x4_to_h4(uvec4 u) {
    return uvec2(packHalf2x16(uintBitsToFloat(u.xy)), packHalf2x16(uintBitsToFloat(u.zw)));
}

uvec2 bf16x4_to_h4(uvec2 u) {
    vec2 a = vec2(uintBitsToFloat(u.x << 16u), uintBitsToFloat(u.x & 0xFFFF0000u));
    vec2 b = vec2(uintBitsToFloat(u.y << 16u), uintBitsToFloat(u.y & 0xFFFF0000u));
    return uvec2(packHalf2x16(a), packHalf2x16(b));
}

f16vec4 h4(uvec2 u) {
    return f16vec4(unpackFloat2x16(u.x), unpackFloat2x16(u.y));
}

// Elements e..e+3 (e % 4 == 0) of a packed input as 4 packed halves. if/else on the spec constant
// (folded at pipeline creation), not ?:, so that no compiler evaluates the other dtype's load (the
// uvec4 view would read past the end of the buffer).
#define DEFINE_LOAD_H4(name, view2, view4) \
    uvec2 name(uint e) { \
        if (DTYPE == 0u) return f32x4_to_h4(view4[e >> 2u]); \
        if (DTYPE == 2u) return bf16x4_to_h4(view2[e >> 2u]); \
        return view2[e >> 2u]; }
DEFINE_LOAD_H4(load_q4, q_data2, q_data4)
DEFINE_LOAD_H4(load_k4, k_data2, k_data4)
DEFINE_LOAD_H4(load_v4, v_data2, v_data4)
