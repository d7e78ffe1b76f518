#version 450
// Benchmark kernel, not used by the engine: C = A B with GL_NV_cooperative_matrix2's workgroup-scope
// matrices and tensor addressing (the driver stages the tiles), to measure the matmul ceiling of that
// path the way bench_gemm_coopmat.comp measures KHR coopmat's. Needs glslang >= 15.2 (DESIGN.md §7).
// A [M, K] row-major fp16; B [K, N] row-major (BT = 0) or B^T [N, K] (BT = 1); C [M, N] fp32.
// One workgroup computes a BM x BN block of C, stepping through K by BK.
// M % BM == N % BN == K % BK == 0 (the host checks).
#extension GL_EXT_control_flow_attributes : enable
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
#extension GL_EXT_shader_16bit_storage : require
#extension GL_KHR_memory_scope_semantics : require
#extension GL_KHR_cooperative_matrix : require
#extension GL_NV_cooperative_matrix2 : require

layout(constant_id = 0) const uint BM = 128;
layout(constant_id = 1) const uint BN = 128;
layout(constant_id = 2) const uint BK = 32;
layout(constant_id = 5) const uint WG = 256;
layout(constant_id = 6) const uint BT = 0;

layout(local_size_x_id = 5, local_size_y = 1, local_size_z = 1) in;

layout(std430, binding = 0) readonly buffer ABuf { float16_t a_data[]; };
layout(std430, binding = 1) readonly buffer BBuf { float16_t b_data[]; };
layout(std430, binding = 2) writeonly buffer CBuf { float c_data[]; };

layout(push_constant) uniform Push { uint M; uint N; uint K; } pc;

void main() {
    tensorLayoutNV<2> la = createTensorLayoutNV(2);
    tensorLayoutNV<2> lb = createTensorLayoutNV(2);
    tensorLayoutNV<2> lc = createTensorLayoutNV(2);
    la = setTensorLayoutDimensionNV(la, pc.M, pc.K);
    lb = BT == 1u ? setTensorLayoutDimensionNV(lb, pc.N, pc.K) : setTensorLayoutDimensionNV(lb, pc.K, pc.N);
    lc = setTensorLayoutDimensionNV(lc, pc.M, pc.N);
    // Row strides are multiples of 8 elements (the host's sizes are multiples of the tiles): saying so
    // (& ~7) lets the compiler issue 16-byte loads; a runtime stride of unknown alignment does not.
    la = setTensorLayoutStrideNV(la, pc.K & ~7u, 1);
    lb = setTensorLayoutStrideNV(lb, (BT == 1u ? pc.K : pc.N) & ~7u, 1);
    lc = setTensorLayoutStrideNV(lc, pc.N & ~7u, 1);
    tensorViewNV<2, false, 1, 0> transposed = createTensorViewNV(2, false, 1, 0);

    uint m0 = gl_WorkGroupID.y * BM, n0 = gl_WorkGroupID.x * BN;
    coopmat<float, gl_ScopeWorkgroup, BM, BN, gl_MatrixUseAccumulator> acc =
        coopmat<float, gl_ScopeWorkgroup, BM, BN, gl_MatrixUseAccumulator>(0.0);
    [[dont_unroll]] for (uint k0 = 0u; k0 < pc.K; k0 += BK) {
        coopmat<float16_t, gl_ScopeWorkgroup, BM, BK, gl_MatrixUseA> ma;
        coopmat<float16_t, gl_ScopeWorkgroup, BK, BN, gl_MatrixUseB> mb;
        coopMatLoadTensorNV(ma, a_data, 0, sliceTensorLayoutNV(la, m0, BM, k0, BK));
        if (BT == 1u) {
            coopMatLoadTensorNV(mb, b_data, 0, sliceTensorLayoutNV(lb, n0, BN, k0, BK), transposed);
        } else {
            coopMatLoadTensorNV(mb, b_data, 0, sliceTensorLayoutNV(lb, k0, BK, n0, BN));
        }
        acc = coopMatMulAdd(ma, mb, acc);
    }
    coopMatStoreTensorNV(acc, c_data, 0, sliceTensorLayoutNV(lc, m0, BM, n0, BN));
}
