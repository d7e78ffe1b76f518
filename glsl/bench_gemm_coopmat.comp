#version 450
// Benchmark kernel, not used by the engine: C = A B with GL_KHR_cooperative_matrix (16x16x16, fp16
// operands, fp32 accumulators), to measure how fast a matmul can go through Vulkan on a device. It
// bounds what the attention kernels can reach (they are two or more such matmuls per tile plus the
// softmax). Driven by benchmarks/coopmat_gemm_gpu.py.
//
// A [M, K] row-major fp16; B [K, N] row-major (BT = 0) or B^T [N, K] row-major (BT = 1, the layout
// of K in Q K^T); C [M, N] row-major fp32. M % BM == N % BN == K % BK == 0 (the host checks).
// The coopmat shape is 16 x CN x 16 (CN = 8 or 16: both are reported by NVIDIA's driver).
// A workgroup computes a BM x BN block of C with WG / 32 subgroups arranged (BM / WM) x (BN / WN);
// each subgroup keeps its WM x WN block in (WM/16) x (WN/CN) accumulators, so each A and B fragment
// loaded from shared memory feeds WN/CN (resp. WM/16) matrix multiplies. The K loop is double
// buffered: the next BK slice is loaded from global memory into registers while the current one is
// multiplied, then written to the other shared buffer; one barrier per slice.
// Shared memory: 2 * 2 * (BM * (BK + 8) + BK * (BN + 8)) bytes (rows padded by 16 bytes so that
// eight consecutive rows start in different banks).
#extension GL_EXT_control_flow_attributes : enable
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_memory_scope_semantics : require
#extension GL_KHR_cooperative_matrix : require

layout(constant_id = 0) const uint BM = 128;
layout(constant_id = 1) const uint BN = 128;
layout(constant_id = 2) const uint BK = 32;
layout(constant_id = 3) const uint WM = 64;
layout(constant_id = 4) const uint WN = 64;
layout(constant_id = 5) const uint WG = 128;
layout(constant_id = 6) const uint BT = 0;
layout(constant_id = 7) const uint CN = 16;     // N of the coopmat shape: 16 (16x16x16) or 8 (16x8x16)

layout(local_size_x_id = 5, local_size_y = 1, local_size_z = 1) in;

layout(std430, binding = 0) readonly buffer ABuf { uvec4 a_data[]; };   // 8 halves per uvec4
layout(std430, binding = 1) readonly buffer BBuf { uvec4 b_data[]; };
layout(std430, binding = 2) writeonly buffer CBuf { float c_data[]; };

layout(push_constant) uniform Push { uint M; uint N; uint K; } pc;

#define MAT_A coopmat<float16_t, gl_ScopeSubgroup, 16, 16, gl_MatrixUseA>
#define MAT_B coopmat<float16_t, gl_ScopeSubgroup, 16, CN, gl_MatrixUseB>
#define MAT_C coopmat<float, gl_ScopeSubgroup, 16, CN, gl_MatrixUseAccumulator>

const uint NWM = WM / 16u;
const uint NWN = WN / CN;
const uint SG_COLS = BN / WN;                    // subgroups along N
// Shared tiles in f16vec4 units; rows padded by 2 units (16 bytes).
const uint ASTR = BK / 4u + 2u;                  // A rows (BM of them)
const uint BROWS = BT == 1u ? BN : BK;           // B as stored: [BK][BN] or [BN][BK]
const uint BCOLS = BT == 1u ? BK : BN;
const uint BSTR = BCOLS / 4u + 2u;
const uint ASZ = BM * ASTR;
const uint BSZ = BROWS * BSTR;

shared f16vec4 a_sh[2 * ASZ];
shared f16vec4 b_sh[2 * BSZ];

// uvec4 units (8 halves) each invocation moves per slice.
const uint NAU = (BM * BK / 8u + WG - 1u) / WG;
const uint NBU = (BROWS * BCOLS / 8u + WG - 1u) / WG;

f16vec4 lo4(uvec4 u) { return f16vec4(unpackFloat2x16(u.x), unpackFloat2x16(u.y)); }
f16vec4 hi4(uvec4 u) { return f16vec4(unpackFloat2x16(u.z), unpackFloat2x16(u.w)); }

void main() {
    const uint tid = gl_LocalInvocationIndex;
    const uint m0 = gl_WorkGroupID.y * BM;
    const uint n0 = gl_WorkGroupID.x * BN;
    const uint sg = gl_SubgroupID;
    const uint wm0 = (sg / SG_COLS) * WM;        // subgroup's block inside the workgroup's
    const uint wn0 = (sg % SG_COLS) * WN;
    const uint ktiles = pc.K / BK;

    MAT_C acc[NWM * NWN];
    [[unroll]] for (uint i = 0u; i < NWM * NWN; ++i) acc[i] = MAT_C(0.0);

    uvec4 areg[NAU];
    uvec4 breg[NBU];

    // Global -> registers for slice kt: A rows m0.., columns kt*BK..; B likewise.
    #define FETCH(kt) { \
        [[unroll]] for (uint it = 0u; it < NAU; ++it) { \
            const uint u = it * WG + tid, r = u / (BK / 8u), c8 = u % (BK / 8u); \
            if (u < BM * BK / 8u) areg[it] = a_data[((m0 + r) * pc.K + (kt) * BK) / 8u + c8]; } \
        [[unroll]] for (uint it = 0u; it < NBU; ++it) { \
            const uint u = it * WG + tid, r = u / (BCOLS / 8u), c8 = u % (BCOLS / 8u); \
            if (u < BROWS * BCOLS / 8u) breg[it] = BT == 1u \
                ? b_data[((n0 + r) * pc.K + (kt) * BK) / 8u + c8] \
                : b_data[(((kt) * BK + r) * pc.N + n0) / 8u + c8]; } }
    #define PUT(buf) { \
        [[unroll]] for (uint it = 0u; it < NAU; ++it) { \
            const uint u = it * WG + tid, r = u / (BK / 8u), c8 = u % (BK / 8u); \
            if (u < BM * BK / 8u) { \
                a_sh[(buf) * ASZ + r * ASTR + 2u * c8] = lo4(areg[it]); \
                a_sh[(buf) * ASZ + r * ASTR + 2u * c8 + 1u] = hi4(areg[it]); } } \
        [[unroll]] for (uint it = 0u; it < NBU; ++it) { \
            const uint u = it * WG + tid, r = u / (BCOLS / 8u), c8 = u % (BCOLS / 8u); \
            if (u < BROWS * BCOLS / 8u) { \
                b_sh[(buf) * BSZ + r * BSTR + 2u * c8] = lo4(breg[it]); \
                b_sh[(buf) * BSZ + r * BSTR + 2u * c8 + 1u] = hi4(breg[it]); } } }

    FETCH(0u)
    PUT(0u)
    barrier();
    for (uint kt = 0u; kt < ktiles; ++kt) {
        const uint cur = kt & 1u;
        if (kt + 1u < ktiles) FETCH(kt + 1u)
        [[unroll]] for (uint kk = 0u; kk < BK / 16u; ++kk) {
            MAT_A af[NWM];
            MAT_B bf[NWN];
            [[unroll]] for (uint i = 0u; i < NWM; ++i)
                coopMatLoad(af[i], a_sh, cur * ASZ + (wm0 + i * 16u) * ASTR + kk * 4u, ASTR,
                            gl_CooperativeMatrixLayoutRowMajor);
            [[unroll]] for (uint j = 0u; j < NWN; ++j) {
                if (BT == 1u)
                    coopMatLoad(bf[j], b_sh, cur * BSZ + (wn0 + j * CN) * BSTR + kk * 4u, BSTR,
                                gl_CooperativeMatrixLayoutColumnMajor);
                else
                    coopMatLoad(bf[j], b_sh, cur * BSZ + kk * 16u * BSTR + (wn0 + j * CN) / 4u, BSTR,
                                gl_CooperativeMatrixLayoutRowMajor);
            }
            [[unroll]] for (uint i = 0u; i < NWM; ++i)
                [[unroll]] for (uint j = 0u; j < NWN; ++j)
                    acc[i * NWN + j] = coopMatMulAdd(af[i], bf[j], acc[i * NWN + j]);
        }
        if (kt + 1u < ktiles) PUT(cur ^ 1u)
        barrier();
    }

    [[unroll]] for (uint i = 0u; i < NWM; ++i)
        [[unroll]] for (uint j = 0u; j < NWN; ++j)
            coopMatStore(acc[i * NWN + j], c_data, (m0 + wm0 + i * 16u) * pc.N + n0 + wn0 + j * CN, pc.N,
                         gl_CooperativeMatrixLayoutRowMajor);
}
