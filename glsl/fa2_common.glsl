// Shared interface of every FA2 forward kernel (scalar/subgroup, Wave64, coopmat).
// The host (aule_kp/vulkan/configs.py, plan.py) fills the same bindings, push constants and spec
// constants for all of them, so variants differ only in the source file and the specialization.
//
// Layout: a dispatch covers one *chunk* of key/value groups (a group = one (batch, kv-head) pair and
// its `group` query heads). Buffers hold only that chunk, contiguous:
//   Q [n_q_heads_in_chunk, len_q, DK]   K [n_groups_in_chunk, len_k, DK]   V [.., len_k, DV]
//   O [n_q_heads_in_chunk, len_q, DV]   LSE [n_q_heads_in_chunk, len_q] (natural log, fp32)
// Workgroup grid: query tiles (BR rows) by query heads within the chunk, see query_head().
// 16-bit data is packed two per uint (element e in word e>>1, low half first), fp32 as float bits.
// Visibility: query i sees key j when i + diag - left <= j <= i + diag + right (left/right < 0:
// unbounded), and, with a mask, the mask value (x log2(e)) is added to the score; -inf hides the key.
// Score modifiers (aule_kp/scoremods.py), compiled in by spec constants SOFTCAP, ALIBI and SINKS (0:
// the code is folded away, the kernels are the plain ones): the scaled score is soft-capped,
// softcap * tanh(s / softcap), then the ALiBi bias -slope * |j - (i + diag)| and the mask are added;
// a sink (one logit per query head) joins each row's softmax sum once its keys are done
// (fold_sink), so O and LSE are the softmax's with the sink column. The slopes and the sinks sit in
// the mask buffer after the mask (pc.alibi_base, pc.alibi_sb per batch; pc.sink_base).

#extension GL_EXT_control_flow_attributes : enable

layout(constant_id = 0) const uint DK = 64;      // head dim of q and k
layout(constant_id = 1) const uint DV = 64;      // head dim of v and o
layout(constant_id = 2) const uint BR = 64;      // query rows per workgroup
layout(constant_id = 3) const uint BC = 32;      // keys per tile
layout(constant_id = 4) const uint TPR = 1;      // invocations per query row (scalar variant)
layout(constant_id = 5) const uint DTYPE = 0;    // 0 float32, 1 float16, 2 bfloat16
layout(constant_id = 6) const uint WG = 64;      // invocations per workgroup
layout(constant_id = 7) const uint STAGE = 1;    // 1: stage K/V tiles in shared memory
layout(constant_id = 8) const uint RPT = 1;      // query rows per invocation group (scalar variant)
// TEST ONLY (ids 9 and 10 are the backward's): 1 adds 1.0 to every output value stored, a wrong
// kernel for the self-check's tests (configs.py TEST_CORRUPT_ID, knob AULE_KP_TEST_CORRUPT). Always
// 0 otherwise, and a specialization constant, so drivers fold the check away.
layout(constant_id = 11) const uint TEST_CORRUPT = 0;
layout(constant_id = 12) const uint SOFTCAP = 0;  // 1: soft-cap the scores (pc.softcap_log2)
layout(constant_id = 13) const uint ALIBI = 0;    // 1: add the ALiBi bias (slopes in mask_data)
layout(constant_id = 14) const uint SINKS = 0;    // 1: fold the sinks (in mask_data) into the row sums

layout(local_size_x_id = 6, local_size_y = 1, local_size_z = 1) in;

layout(std430, binding = 0) readonly buffer QBuf { uint q_data[]; };
layout(std430, binding = 1) readonly buffer KBuf { uint k_data[]; };
layout(std430, binding = 2) readonly buffer VBuf { uint v_data[]; };
layout(std430, binding = 3) writeonly buffer OBuf { uint o_data[]; };
layout(std430, binding = 4) writeonly buffer LBuf { float lse_data[]; };
layout(std430, binding = 5) readonly buffer MBuf { float mask_data[]; };

layout(push_constant) uniform Push {
    uint len_q;
    uint len_k;
    uint group;       // query heads per kv head
    uint heads_kv;
    uint group0;      // global index of the chunk's first (batch, kv-head) group
    float scale_log2; // softmax scale * log2(e): scores live in the exp2 domain
    int diag;
    int left;         // < 0: unbounded
    int right;        // < 0: unbounded
    uint has_mask;    // 1: add mask_data[...] * log2(e) to the score
    uint mask_sb;     // mask element strides for batch, query head, query row, key (0 = broadcast)
    uint mask_sh;
    uint mask_si;
    uint mask_sj;
    uint heads_q;
    float softcap_log2; // softcap * log2(e) (read with SOFTCAP = 1 only)
    uint alibi_base;    // element of mask_data holding the slope of batch 0, head 0 (ALIBI = 1 only)
    uint alibi_sb;      // slope stride per batch: heads_q, or 0 for slopes shared by every batch
    uint sink_base;     // element of mask_data holding the sink of head 0 (SINKS = 1 only)
#ifdef FA2_SPLIT_KV
    // Split-KV kernels only (fa2_splitkv*.comp define FA2_SPLIT_KV; the host pushes these two
    // after the fields above to them alone): split s covers the keys
    // [lo + s * split_len, lo + (s + 1) * split_len) of the band key_range(0, len_q) = [lo, hi).
    uint n_split;
    uint split_len;
#endif
} pc;

const float LOG2E = 1.4426950408889634;
const float LN2 = 0.6931471805599453;
const float FLT_MAX = 3.4028234663852886e38;
// Running max starts finite so a row whose keys are all hidden never computes (-inf) - (-inf).
// It is the lowest finite score, so a row whose scores all saturate there (below) is still uniform.
const float NEG_BIG = -FLT_MAX;

// Mask value in the exp2 domain. -inf hides the key; finite values saturate at -FLT_MAX instead of
// overflowing to -inf, so a row masked with float32's minimum (as Hugging Face does) stays a
// uniform average, as in torch, rather than becoming hidden; and at FLT_MAX instead of +inf, so a
// value above FLT_MAX / log2(e) (2.4e38) is the row's largest score, not a NaN row (+inf and NaN
// entries make the row NaN on the host: aule_kp.nonfinite).
float mask_term(float mv) {
    return isinf(mv) && mv < 0.0 ? mv : clamp(mv * LOG2E, -FLT_MAX, FLT_MAX);
}

// tanh of a score (exp2 domain) over the cap: (1 - e) / (1 + e) with e = exp(-2|x|) <= 1, finite
// for every finite x (GLSL's tanh may be inf / inf for large |x|), a few ulp off in absolute terms.
float tanh_score(float x) {
    const float e = exp2(-2.0 * LOG2E * abs(x));
    return sign(x) * ((1.0 - e) / (1.0 + e));
}

// A scaled score (exp2 domain) soft-capped with SOFTCAP; unchanged without.
float capped(float s) {
    return SOFTCAP == 1u ? pc.softcap_log2 * tanh_score(s / pc.softcap_log2) : s;
}

// The score (exp2 domain) of a raw dot product q.k: scaled, then soft-capped with SOFTCAP.
float scaled_score(float qk) {
    return capped(qk * pc.scale_log2);
}

// d(capped score) / d(scaled score) for a raw dot product: 1 - tanh^2 with SOFTCAP, else 1.
float cap_slope(float qk) {
    if (SOFTCAP == 0u) return 1.0;
    const float t = tanh_score(qk * pc.scale_log2 / pc.softcap_log2);
    return 1.0 - t * t;
}

// ALiBi slope (exp2 domain) of global batch `batch`, query head `hq`; 0 without ALIBI.
float alibi_slope(uint batch, uint hq) {
    return ALIBI == 1u ? mask_data[pc.alibi_base + batch * pc.alibi_sb + hq] * LOG2E : 0.0;
}

// ALiBi bias (exp2 domain) of query row i and key j for a row's slope: -slope * |j - (i + diag)|.
float alibi_term(float slope, int i, int j) {
    return ALIBI == 1u ? -slope * float(abs(j - i - pc.diag)) : 0.0;
}

// Folds the sink of query head hq (global index within a batch) into a row whose keys are done: its
// running max m and sum l (exp2 domain) become those of the softmax with the sink column. Returns
// the factor the row's weighted sum of v must be multiplied by; 1 (m, l unchanged) without SINKS.
float fold_sink(inout float m, inout float l, uint hq) {
    if (SINKS == 0u) return 1.0;
    const float s = mask_data[pc.sink_base + hq] * LOG2E;
    const float m_new = max(m, s);
    const float f = exp2(m - m_new);
    l = l * f + exp2(s - m_new);
    m = m_new;
    return f;
}

#include "fa2_dtype.glsl"
void store_pair(uint e, vec2 val) { STORE_PAIR_VAR(o_data, e, val) }

// The (query tile, query head) of this workgroup. The grid is x = head within a section of heads, y
// = query tile, z = section (plan.query_grid; the host sizes a section so that its heads' K and V
// stay within a fixed budget meant for the L2 cache, kernels.SECTION_BYTES). Workgroups start
// roughly in linear ID order (x fastest), so a section's heads run their last query tiles first,
// then the tiles before them, and sections follow one another: with a causal band the last rows see
// the most keys, so the longest workgroups start first and the short ones fill the end (longest-
// processing-time-first in L2-sized sections, as FlashAttention-3 schedules causal tiles). Taken
// from the builtins as they are: the same order computed from a linear index (integer division by a
// runtime value) made the coopmat forward 10-17% slower on an H200 whatever the order.
uint query_tile() {
    return gl_NumWorkGroups.y - 1u - gl_WorkGroupID.y;
}
uint query_head() {
    return gl_WorkGroupID.z * gl_NumWorkGroups.x + gl_WorkGroupID.x;
}

// Keys [lo, hi) any row in [row_lo, row_hi) may see: tiles outside are skipped.
ivec2 key_range(int row_lo, int row_hi) {
    int lo = pc.left < 0 ? 0 : max(0, row_lo + pc.diag - pc.left);
    int hi = pc.right < 0 ? int(pc.len_k) : min(int(pc.len_k), row_hi - 1 + pc.diag + pc.right + 1);
    return ivec2(lo, max(lo, hi));
}

// Whether every key in [key_lo, key_hi) is visible to every row in [row_lo, row_hi) (band only).
bool keys_visible_to_all(int row_lo, int row_hi, int key_lo, int key_hi) {
    return key_hi <= int(pc.len_k)
        && (pc.left < 0 || key_lo >= row_hi - 1 + pc.diag - pc.left)
        && (pc.right < 0 || key_hi - 1 <= row_lo + pc.diag + pc.right);
}

bool key_visible(int i, int j) {
    int rel = j - (i + pc.diag);
    return j < int(pc.len_k) && (pc.left < 0 || rel >= -pc.left) && (pc.right < 0 || rel <= pc.right);
}
