#version 450
// FlashAttention-2 forward, cooperative-matrix variant (GL_KHR_cooperative_matrix, subgroup scope,
// 16x16x16 shapes: fp16 A/B operands, fp32 accumulators). Interface: fa2_common.glsl (bindings, push
// constants, spec constants, packing, band helpers); fragment types and fp16 input loads:
// fa2_coopmat.glsl. Compile:
//   glslangValidator -V --target-env vulkan1.3 -Iglsl glsl/fa2_fwd_coopmat.comp -o x.spv
// (glslang 13.1.1 wants -Iglsl with no space). Device features it needs: cooperativeMatrix (a
// 16x16x16 f16 x f16 + f32 subgroup shape), shaderFloat16, vulkanMemoryModel (glslang always
// emits the Vulkan memory model for KHR coopmat), subgroup basic/vote/shuffle in compute.
//
// DTYPE: written for 1 (float16, two halves per uint). 0 (float32) and 2 (bfloat16) are accepted
// too: Q/K/V are converted to fp16 when they are staged in shared memory, so values beyond fp16's
// range (|x| > 65504) become inf and small ones lose precision. O is written in DTYPE (store_pair),
// LSE in fp32. Scores, softmax statistics and O accumulate in fp32 whatever DTYPE is.
//
// Spec constants used: DK, DV, BR, BC, DTYPE, WG (= local_size_x), STAGE. TPR and RPT are ignored.
// STAGE: 1 = K and V of a tile share one staging buffer (four workgroup barriers per key tile);
// 2 = separate K and V buffers, so V(t) is staged while S(t) is computed and K(t+1) while P(t) V(t)
// is: two barriers per tile (the host takes it at D <= 64 where it measured faster on an H200;
// at D = 128 it was 1-2% slower). Host constraints:
//   * DK % 16 == 0, DV % 16 == 0, BR % 16 == 0, BC % 16 == 0 (16 = the coopmat M = N = K).
//   * WG a multiple of the device's subgroup size (a partial subgroup cannot run coopmat ops).
//   * Efficiency (not correctness): WG / 32 should divide BR / 16. Each subgroup owns RPS = (BR/16) /
//     (WG/32) blocks of 16 query rows (RPS = 1 when WG/32 does not divide BR/16). If the device's
//     subgroups are not 32 wide, the row blocks are processed in several passes (wider subgroups)
//     or some subgroups only help with loads (narrower ones): still correct.
//   * Registers (32-wide subgroups): Q fragments RPS*DK/16*4, O accumulators RPS*DV/16*8, K/V
//     prefetch BC*(DK+DV)/(2*WG) per invocation. Keep DV * RPS <= 256; at D=256 use WG=256.
//   * Shared memory, bytes (must be <= maxComputeSharedMemorySize, 48 KiB on NVIDIA):
//       2 * BC * (max(DK, DV) + 8)     Q/K/V staging, fp16, one buffer (Q passes through it BC rows at a time);
//                                      STAGE 2: 2 * BC * (DK + 8) + 2 * BC * (DV + 8), K and V apart
//     + 4 * BR * (BC + 4)              S scores fp32 (also alpha broadcast and the O epilogue)
//     + 2 * BR * (BC + 8)              P fp16
//     + 8 * BR                         running max m and sum l per row
//     e.g. BR=64, BC=32, D=128: 8704 + 9216 + 5120 + 512 = 23552; BR=64, BC=64, D=128: 44544;
//          BR=128, BC=32, D=256: 46592; BR=64, BC=64, D=64: 36352.
//     The NVIDIA driver reported exactly this, except: +1 KiB at BR=128 BC=32 D=256 (47616) and
//     48640 at BR=64 BC=32 D=256 (255 registers: it spills). So the formula is necessary, not
//     sufficient: pipeline creation is the final check.
//
// Speed: the tile shapes and each optimisation below were measured on an H200 (BENCHMARKS.md,
// "Notes moved from the sources"), against the best fp16 matmul its driver runs through KHR coopmat
// (~180 TFLOPS, benchmarks/coopmat_gemm_gpu.py), which bounds this kernel.
//
// Index math (fa2_common.glsl layout, one dispatch = one chunk of (batch, kv-head) groups):
//   y = query_head() (query head in the chunk), t = query_tile() (fa2_common.glsl: longest tiles
//   first, in sections of heads), kv group in the chunk = y / group,
//   query rows [t*BR, t*BR + BR) of Q[y], keys of K[y / group], V[y / group].
//   The mask is the whole [B, Hq, Lq, Lk] (broadcast strides): global query head gq = group0*group + y,
//   batch = gq / heads_q, head = gq % heads_q, element = b*mask_sb + h*mask_sh + i*mask_si + j*mask_sj.
//
// Algorithm, per workgroup (BR query rows of one head):
//   Q tile -> shared (fp16) -> each subgroup keeps its rows' Q as A fragments in registers.
//   For each key tile of BC keys inside key_range() (causal/window tile skipping):
//     K tile -> shared; S = Q K^T (coopMatMulAdd, fp32, kept in registers). Interior tiles whose
//     scores stay within TAU of each row's reference max: P = exp2(S * scale - m) element by
//     element in registers (softmax_in_registers), row sums kept as a matrix. Other tiles (the
//     first ones, a new max, band edges, masks): S -> shared, and each subgroup runs the online
//     softmax on its own rows there (softmax_rows: exp2 domain, scale applied in fp32, mask added,
//     band applied). Either way P (fp16) goes to shared; V tile -> shared; O = alpha * O + P V with
//     O in coopmat accumulators (registers) for the whole key loop.
//   O / l and LSE are written by the subgroup that owns the rows.
//
// Why O stays in registers, and how it is rescaled: a KHR coopmat gives no portable way to know
// which row an accumulator element belongs to, but component-wise arithmetic between two
// coopmats of the same type is defined element by element. So the per-row factor alpha is written
// into a 16x16 fp32 block in shared memory, replicated across the 16 columns of each row, loaded
// as an accumulator-type coopmat A (A[r][c] = alpha[r]) and applied as O = O * A. No layout
// assumption, no fp32 -> fp16 round trip of O (a diag(alpha) x O matmul would need O as an fp16 B
// operand), and no BR x DV fp32 O tile in shared memory (32 KiB at D=128).
// To make this rare, the running max is updated lazily (as in FlashAttention-4): a row keeps its
// reference max m until a new score exceeds m + TAU (log2 domain). Then P = exp2(s - m) <= 2^TAU
// = 256 fits fp16 easily, and O/l is unchanged mathematically (both use the same m). A subgroup
// skips the O rescale entirely when none of its rows moved m in this tile (subgroupAny).
//
// Fully masked rows: m starts at NEG_BIG (finite), hidden scores are -inf, so p = exp2(-inf) = 0
// and l stays 0 -> O = 0 and LSE = -inf. Keys >= len_k are zero-filled in shared memory (no
// NaN from garbage in P*V) and their scores are hidden by key_visible(). Query rows >= len_q are
// zero-filled, never read the mask, and are not written.
// Interior tiles (every key of the tile exists and lies in every row's band, and no mask) take a
// fast path without the per-element band / mask checks: that alone took D=128 from 64 to 118 TFLOPS.
// Not done: skipping key tiles that a float/bool mask hides entirely (the band is skipped).
// Tried and reverted, slower on an H200 (figures in BENCHMARKS.md, "Notes moved from the sources"):
// subgroups skipping the key tiles their own rows cannot see, and a band table added to the scores
// so that the causal diagonal's tiles take the register softmax (one extra accumulator load and
// add per score block doubled the time, cause not found).

#extension GL_EXT_control_flow_attributes : enable
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_vote : require
#extension GL_KHR_shader_subgroup_shuffle : require
#extension GL_GOOGLE_include_directive : require

#include "fa2_common.glsl"
#include "fa2_coopmat.glsl"

// Work split. NSG: subgroups per workgroup on a 32-wide device (the design target); it only sizes
// register arrays. The real gl_NumSubgroups may differ: see the pass loop in main().
const uint NSG = (WG / 32u) > 0u ? (WG / 32u) : 1u;
const uint NRB = BR / CM;                                            // 16-row blocks per tile
const uint RPS = (NRB % NSG == 0u && NRB >= NSG) ? (NRB / NSG) : 1u; // row blocks per subgroup
const uint NVB = NRB / RPS;                                          // "virtual subgroups"
const uint NROWS = RPS * CM;                                         // query rows per subgroup
const uint NDK = DK / CM;
const uint NDV = DV / CM;
const uint NBC = BC / CM;
const uint NSB = RPS * NBC;                                         // S blocks per subgroup

// Lazy-rescale threshold (log2 domain): P <= 2^TAU.
const float TAU = 8.0;
#define NEG_INF uintBitsToFloat(0xFF800000u)

// Shared memory. Strides are in units of the array element (f16vec4 = 4 halves, vec4 = 4 floats).
// Row strides are padded by 16 bytes (keeps coopMatLoad/Store's 16-byte stride alignment and
// spreads consecutive rows over the banks).
const uint DMAX = DK > DV ? DK : DV;
const uint KSTR = DK / 4u + 2u;   // K and Q rows, f16vec4
const uint VSTR = DV / 4u + 2u;   // V rows, f16vec4
const uint KSZ = BC * KSTR;                                   // STAGE 2: V starts here
const uint KVSZ = STAGE == 2u ? KSZ + BC * VSTR : BC * (DMAX / 4u + 2u);
const uint VOFF = STAGE == 2u ? KSZ : 0u;
const uint SSTR = BC / 4u + 1u;   // S rows, vec4 ((BC+4) floats: odd vec4 stride, conflict-free rows)
const uint PSTR = BC / 4u + 2u;   // P rows, f16vec4 ((BC+8) halves: 16-byte multiple for coopMatLoad)

shared f16vec4 kv_sh[KVSZ];       // Q (BC rows per pass), then K, then V (at VOFF) of the current key tile
shared vec4 s_sh[BR * SSTR];      // raw scores S; then alpha / the O epilogue, per subgroup rows
shared f16vec4 p_sh[BR * PSTR];   // probabilities P (fp16)
shared float m_sh[BR];            // reference max per row (log2 domain)
shared float l_sh[BR];            // running sum of P per row

// Units of 4 elements each invocation moves per K / V tile.
const uint NKU = (BC * DK / 4u + WG - 1u) / WG;
const uint NVU = (BC * DV / 4u + WG - 1u) / WG;

// ---- per-invocation state shared by the helpers --------------------------------------------------

uint g_tid;        // gl_LocalInvocationIndex
uint g_q0;         // first query row of this workgroup
uint g_qbase;      // element offset of Q[y][0][0]
uint g_obase;      // element offset of O[y][0][0]
uint g_kbase;      // element offset of K[y / group][0][0]
uint g_vbase;
uint g_mbase;      // mask element offset of (batch, head) of this workgroup's query head
float g_slope;     // ALiBi slope (exp2 domain) of this workgroup's query head (ALIBI only)
uint g_hq;         // this workgroup's query head within its batch (its sink, SINKS only)

// Score of query row i (global) against key j, in the exp2 domain; -inf when hidden.
float score(float raw, int i, int j) {
    if (i >= int(pc.len_q) || !key_visible(i, j)) return NEG_INF;
    float s = scaled_score(raw) + alibi_term(g_slope, i, j);
    if (pc.has_mask != 0u) {
        s += mask_term(mask_data[g_mbase + uint(i) * pc.mask_si + uint(j) * pc.mask_sj]);
    }
    return s;
}

// ---- K / V tile staging (all invocations) --------------------------------------------------------

// Global -> registers, keys [kb, kb + BC); keys >= len_k read as zero.
void fetch_k(int kb, out uvec2 r[NKU]) {
    [[unroll]] for (uint it = 0u; it < NKU; ++it) {
        uint u = it * WG + g_tid;
        uint c = u / (DK / 4u), d4 = u % (DK / 4u);
        uint j = uint(kb) + c;
        r[it] = uvec2(0u);
        if (u < BC * DK / 4u && j < pc.len_k) r[it] = load_k4(g_kbase + j * DK + d4 * 4u);
    }
}
void fetch_v(int kb, out uvec2 r[NVU]) {
    [[unroll]] for (uint it = 0u; it < NVU; ++it) {
        uint u = it * WG + g_tid;
        uint c = u / (DV / 4u), d4 = u % (DV / 4u);
        uint j = uint(kb) + c;
        r[it] = uvec2(0u);
        if (u < BC * DV / 4u && j < pc.len_k) r[it] = load_v4(g_vbase + j * DV + d4 * 4u);
    }
}
// Registers -> shared (row-major, KSTR / VSTR). Caller provides the barriers.
void put_k(uvec2 r[NKU]) {
    [[unroll]] for (uint it = 0u; it < NKU; ++it) {
        uint u = it * WG + g_tid;
        if (u < BC * DK / 4u) kv_sh[(u / (DK / 4u)) * KSTR + u % (DK / 4u)] = h4(r[it]);
    }
}
void put_v(uvec2 r[NVU]) {
    [[unroll]] for (uint it = 0u; it < NVU; ++it) {
        uint u = it * WG + g_tid;
        if (u < BC * DV / 4u) kv_sh[VOFF + (u / (DV / 4u)) * VSTR + u % (DV / 4u)] = h4(r[it]);
    }
}

// ---- online softmax of one subgroup's rows (subgroup-local, no workgroup barrier) ----------------
//
// Rows [row0, row0 + NROWS) of the tile (local indices); S is in s_sh. Lane mapping: LPR lanes per
// row (a power of two, from the real subgroup size), row-fastest so that the 8 lanes of a 128-bit
// shared access hit 8 different rows (odd vec4 row stride: no bank conflicts). Row reductions use
// shuffle-xor over the LPR lanes of a row. If the subgroup has fewer lanes than rows, lanes take
// several rows in turn (steps). Writes P to p_sh, m / l to m_sh / l_sh, and alpha replicated over
// columns 0..15 of each row of s_sh. Returns (subgroup-uniform) whether any row's alpha != 1.
// full: (workgroup-uniform) every key of the tile is visible to every row and there is no mask, so
// the per-element band / mask work is skipped (rows >= len_q then get finite garbage: never written).
bool softmax_rows(uint row0, int kb, bool full) {
    const uint sgs = gl_SubgroupSize;
    const uint lane = gl_SubgroupInvocationID;
    uint lpr = sgs / NROWS;
    lpr = lpr == 0u ? 1u : (1u << findMSB(lpr));
    const uint rstep = sgs / lpr;            // rows handled at once
    const uint steps = (NROWS + rstep - 1u) / rstep;
    const uint lr = lane % rstep;
    const uint part = lane / rstep;          // which of the row's lanes
    bool resc_any = false;

    for (uint st = 0u; st < steps; ++st) {   // uniform loop: shuffles / barriers inside are safe
        const uint rl = st * rstep + lr;
        const bool valid = rl < NROWS;
        const uint row = row0 + (valid ? rl : 0u);
        const int i = int(g_q0 + row);

        // Pass 1: row max of the visible scores. Interior tiles (every score visible, no mask) keep
        // their scores in registers for pass 2: a literal trip count (lanes past their share are
        // predicated off) so that sv stays in registers, and S is read from shared memory once.
        float mx = NEG_INF;
        vec4 sv[BC / 4u];
        if (valid && full) {
            [[unroll]] for (uint i = 0u; i < BC / 4u; ++i) {
                const uint c4 = part + i * lpr;
                if (c4 < BC / 4u) {
                    sv[i] = s_sh[row * SSTR + c4] * pc.scale_log2;
                    mx = max(mx, max(max(sv[i].x, sv[i].y), max(sv[i].z, sv[i].w)));
                }
            }
        } else if (valid) {
            for (uint c4 = part; c4 < BC / 4u; c4 += lpr) {
                vec4 raw = s_sh[row * SSTR + c4];
                int j = kb + int(c4 * 4u);
                mx = max(mx, max(max(score(raw.x, i, j), score(raw.y, i, j + 1)),
                                 max(score(raw.z, i, j + 2), score(raw.w, i, j + 3))));
            }
        }
        for (uint off = rstep; off < sgs; off <<= 1u) mx = max(mx, subgroupShuffleXor(mx, off));

        // Lazy max update: keep the reference max unless a score exceeds it by more than TAU.
        const float m_old = valid ? m_sh[row] : NEG_BIG;
        const bool resc = valid && mx > m_old + TAU;
        const float m_use = resc ? mx : m_old;
        const float alpha = resc ? exp2(m_old - m_use) : 1.0;
        resc_any = resc_any || resc;

        // Pass 2: P = exp2(s - m) in fp16; the row sum adds the *rounded* values so that l
        // normalises exactly what P*V accumulates.
        float sum = 0.0;
        if (valid && full) {
            [[unroll]] for (uint i = 0u; i < BC / 4u; ++i) {
                const uint c4 = part + i * lpr;
                if (c4 < BC / 4u) {
                    f16vec4 p = f16vec4(exp2(sv[i] - m_use));
                    sum += dot(vec4(p), vec4(1.0));
                    p_sh[row * PSTR + c4] = p;
                }
            }
        } else if (valid) {
            for (uint c4 = part; c4 < BC / 4u; c4 += lpr) {
                vec4 raw = s_sh[row * SSTR + c4];
                int j = kb + int(c4 * 4u);
                vec4 s = vec4(score(raw.x, i, j), score(raw.y, i, j + 1),
                              score(raw.z, i, j + 2), score(raw.w, i, j + 3));
                f16vec4 p = f16vec4(exp2(s - m_use));
                sum += dot(vec4(p), vec4(1.0));
                p_sh[row * PSTR + c4] = p;
            }
        }
        for (uint off = rstep; off < sgs; off <<= 1u) sum += subgroupShuffleXor(sum, off);

        // All lanes of the row are done reading S: replace its first 16 columns by alpha.
        subgroupMemoryBarrierShared();
        subgroupBarrier();
        if (valid) {
            if (part == 0u) {
                l_sh[row] = l_sh[row] * alpha + sum;
                m_sh[row] = m_use;
            }
            for (uint c4 = part; c4 < CM / 4u; c4 += lpr) s_sh[row * SSTR + c4] = vec4(alpha);
        }
    }
    bool any_resc = subgroupAny(resc_any);
    subgroupMemoryBarrierShared();
    subgroupBarrier();
    return any_resc;
}

// ---- softmax in registers (interior tiles) ----------------------------------------------------
//
// Outside the key tile's softmax, columns 0..15 of each row of s_sh hold the row's reference max
// m (replicated: the same broadcast trick as alpha, see the header), so a subgroup can load m as
// an accumulator-type block and work on S element by element in registers without knowing
// which row an element belongs to. put_m_block() restores that after softmax_rows() used s_sh.
void put_m_block(uint row0) {
    subgroupMemoryBarrierShared();
    subgroupBarrier();                         // every lane is done with the alpha / S of these rows
    for (uint idx = gl_SubgroupInvocationID; idx < NROWS * (CM / 4u); idx += gl_SubgroupSize) {
        const uint row = row0 + idx / (CM / 4u);
        s_sh[row * SSTR + idx % (CM / 4u)] = vec4(m_sh[row]);
    }
    subgroupMemoryBarrierShared();
    subgroupBarrier();
}

// Interior tile whose scores all stay within TAU of their row's reference max (the common case
// once the first tiles have set m): P = exp2(S * scale - m) on the accumulator elements, P to
// p_sh in fp16, and the rounded P summed into lacc (a matrix; its rows are summed once in the
// epilogue). No S round trip through shared memory and no cross-lane reductions. Returns false
// (nothing written) when some score exceeds m + TAU: softmax_rows() must move the max.
bool softmax_in_registers(uint row0, MAT_C sacc[NSB], inout MAT_C lacc[RPS]) {
    MAT_C mb[RPS];
    bool over = false;
    [[unroll]] for (uint r = 0u; r < RPS; ++r) {
        coopMatLoad(mb[r], s_sh, (row0 + r * CM) * SSTR, SSTR, gl_CooperativeMatrixLayoutRowMajor);
        [[unroll]] for (uint c = 0u; c < NBC; ++c) {
            [[unroll]] for (uint e = 0u; e < sacc[r * NBC + c].length(); ++e)
                over = over || sacc[r * NBC + c][e] * pc.scale_log2 - mb[r][e] > TAU;
        }
    }
    if (subgroupAny(over)) return false;
    [[unroll]] for (uint r = 0u; r < RPS; ++r) {
        [[unroll]] for (uint c = 0u; c < NBC; ++c) {
            MAT_C t = sacc[r * NBC + c] * pc.scale_log2 - mb[r];
            [[unroll]] for (uint e = 0u; e < t.length(); ++e) t[e] = exp2(t[e]);
            MAT_H ph = MAT_H(t);
            lacc[r] += MAT_C(ph);
            coopMatStore(ph, p_sh, (row0 + r * CM) * PSTR + c * (CM / 4u), PSTR,
                         gl_CooperativeMatrixLayoutRowMajor);
        }
    }
    return true;
}

void main() {
    g_tid = gl_LocalInvocationIndex;
    const uint y = query_head();
    g_q0 = query_tile() * BR;
    if (g_q0 >= pc.len_q) return;                      // whole workgroup: uniform
    const uint qhi = min(g_q0 + BR, pc.len_q);
    const uint kvg = y / pc.group;
    g_qbase = y * pc.len_q * DK;
    g_obase = y * pc.len_q * DV;
    g_kbase = kvg * pc.len_k * DK;
    g_vbase = kvg * pc.len_k * DV;
    {
        const uint gq = pc.group0 * pc.group + y;      // global query head: batch * heads_q + head
        g_mbase = (gq / pc.heads_q) * pc.mask_sb + (gq % pc.heads_q) * pc.mask_sh;
        g_slope = alibi_slope(gq / pc.heads_q, gq % pc.heads_q);
        g_hq = gq % pc.heads_q;
    }

    // Keys any row of this tile may see; tiles outside are skipped (causal / sliding window).
    const ivec2 kr = key_range(int(g_q0), int(qhi));
    const uint ntiles = (uint(kr.y - kr.x) + BC - 1u) / BC;

    const uint sg = gl_SubgroupID;
    const uint nsg = gl_NumSubgroups;
    const uint passes = (NVB + nsg - 1u) / nsg;       // 1 when subgroups are 32 wide

    for (uint pass = 0u; pass < passes; ++pass) {      // uniform over the workgroup
        const uint vsg = pass * nsg + sg;
        const bool working = vsg < NVB;                // subgroup-uniform: guards coopmat ops
        const uint row0 = vsg * NROWS;                 // first tile row of this subgroup

        MAT_C lacc[RPS];                               // row sums of the register-softmax tiles
        [[unroll]] for (uint r = 0u; r < RPS; ++r) lacc[r] = MAT_C(0.0);
        if (working) {
            for (uint r = gl_SubgroupInvocationID; r < NROWS; r += gl_SubgroupSize) {
                m_sh[row0 + r] = NEG_BIG;
                l_sh[row0 + r] = 0.0;
            }
            put_m_block(row0);
        }

        // Q tile -> shared, BC rows per round (kv_sh holds BC rows) -> A fragments in registers.
        MAT_A qf[RPS * NDK];
        for (uint qp = 0u; qp < (BR + BC - 1u) / BC; ++qp) {
            barrier();                                 // kv_sh is free
            [[unroll]] for (uint it = 0u; it < NKU; ++it) {
                uint u = it * WG + g_tid;
                uint rr = u / (DK / 4u), d4 = u % (DK / 4u);
                uint qrow = g_q0 + qp * BC + rr;
                uvec2 val = uvec2(0u);
                if (u < BC * DK / 4u && qp * BC + rr < BR && qrow < pc.len_q)
                    val = load_q4(g_qbase + qrow * DK + d4 * 4u);
                if (u < BC * DK / 4u) kv_sh[rr * KSTR + d4] = h4(val);
            }
            barrier();
            if (working) {
                [[unroll]] for (uint r = 0u; r < RPS; ++r) {
                    const uint rb = row0 + r * CM;     // tile row of this 16-row block
                    if (rb >= qp * BC && rb < qp * BC + BC) {
                        [[unroll]] for (uint k = 0u; k < NDK; ++k)
                            coopMatLoad(qf[r * NDK + k], kv_sh, (rb - qp * BC) * KSTR + k * (CM / 4u), KSTR,
                                        gl_CooperativeMatrixLayoutRowMajor);
                    }
                }
            }
        }

        MAT_C o_acc[RPS * NDV];
        [[unroll]] for (uint t = 0u; t < RPS * NDV; ++t) o_acc[t] = MAT_C(0.0);

        // Global loads run ahead of their use (software pipelining across the barriers): the next
        // K tile and the current V tile sit in registers while the subgroups compute (loading
        // between the barriers instead measured 7-10% slower at D=128 on an H200).
        uvec2 kreg[NKU];
        uvec2 vreg[NVU];
        if (ntiles > 0u) fetch_k(kr.x, kreg);
        if (STAGE == 2u && ntiles > 0u) {
            barrier();                                 // every subgroup has its Q fragments
            put_k(kreg);
        }

        for (uint tile = 0u; tile < ntiles; ++tile) {
            const int kb = kr.x + int(tile * BC);
            const bool more = tile + 1u < ntiles;

            // STAGE 1: everyone is done with the previous V (or Q). STAGE 2: K(t) is staged, and
            // everyone is done with V(t-1), so V(t) may be staged during S.
            barrier();
            if (STAGE == 2u) {
                fetch_v(kb, vreg);                     // in flight during S
            } else {
                put_k(kreg);
                barrier();
            }

            // Interior tile: all BC keys exist and lie inside every row's band, no mask. This is
            // keys_visible_to_all() (fa2_common.glsl) written out: calling the helper instead made this
            // kernel 7-17% slower on an H200 (one-process A/B, fifth session), as the index order
            // computed by integer division did: the codegen here moves with small changes.
            const int kl = kb + int(BC) - 1;
            // Soft-capped or biased scores take the per-score path (score()) too.
            const bool full = SOFTCAP == 0u && ALIBI == 0u && pc.has_mask == 0u && kl < int(pc.len_k)
                && (pc.left < 0 || kb >= int(g_q0 + BR) - 1 + pc.diag - pc.left)
                && (pc.right < 0 || kl <= int(g_q0) + pc.diag + pc.right);

            // S = Q K^T for this subgroup's rows, kept in registers (fp32).
            MAT_C sacc[NSB];
            if (working) {
                [[unroll]] for (uint c = 0u; c < NBC; ++c) {
                    [[unroll]] for (uint r = 0u; r < RPS; ++r) sacc[r * NBC + c] = MAT_C(0.0);
                    [[unroll]] for (uint k = 0u; k < NDK; ++k) {
                        MAT_B kt;   // K^T block: (d, key) = K[key][d], i.e. K rows read column-major
                        coopMatLoad(kt, kv_sh, c * CM * KSTR + k * (CM / 4u), KSTR,
                                    gl_CooperativeMatrixLayoutColumnMajor);
                        [[unroll]] for (uint r = 0u; r < RPS; ++r)
                            sacc[r * NBC + c] = coopMatMulAdd(qf[r * NDK + k], kt, sacc[r * NBC + c]);
                    }
                }
            }

            if (STAGE == 2u) {
                put_v(vreg);                           // V's own buffer: no one reads it until P V
                if (more) fetch_k(kb + int(BC), kreg); // in flight during the softmax and P V
            } else {
                fetch_v(kb, vreg);                     // in flight during the softmax
            }

            // Softmax: in registers when it can (see softmax_in_registers), else through shared
            // memory: S -> s_sh, softmax_rows() (new maxima, band, mask), O and lacc rescaled by
            // alpha when a row's max moved, and the m block restored.
            if (working && !(full && softmax_in_registers(row0, sacc, lacc))) {
                [[unroll]] for (uint r = 0u; r < RPS; ++r) {
                    [[unroll]] for (uint c = 0u; c < NBC; ++c)
                        coopMatStore(sacc[r * NBC + c], s_sh, (row0 + r * CM) * SSTR + c * (CM / 4u), SSTR,
                                     gl_CooperativeMatrixLayoutRowMajor);
                }
                subgroupMemoryBarrierShared();
                subgroupBarrier();
                if (softmax_rows(row0, kb, full)) {
                    [[unroll]] for (uint r = 0u; r < RPS; ++r) {
                        MAT_C am;
                        coopMatLoad(am, s_sh, (row0 + r * CM) * SSTR, SSTR, gl_CooperativeMatrixLayoutRowMajor);
                        [[unroll]] for (uint d = 0u; d < NDV; ++d) o_acc[r * NDV + d] = o_acc[r * NDV + d] * am;
                        lacc[r] = lacc[r] * am;
                    }
                }
                put_m_block(row0);
            }

            barrier();                                 // all subgroups are done reading K(t); STAGE 2: V(t) staged
            if (STAGE == 2u) {
                if (more) put_k(kreg);                 // K's own buffer: read again after the next barrier
            } else {
                put_v(vreg);
                if (more) fetch_k(kb + int(BC), kreg); // in flight during P V
                barrier();
            }

            if (working) {
                // O += P V.
                [[unroll]] for (uint c = 0u; c < NBC; ++c) {
                    MAT_A pa[RPS];
                    [[unroll]] for (uint r = 0u; r < RPS; ++r)
                        coopMatLoad(pa[r], p_sh, (row0 + r * CM) * PSTR + c * (CM / 4u), PSTR,
                                    gl_CooperativeMatrixLayoutRowMajor);
                    [[unroll]] for (uint d = 0u; d < NDV; ++d) {
                        MAT_B vb;
                        coopMatLoad(vb, kv_sh, VOFF + c * CM * VSTR + d * (CM / 4u), VSTR,
                                    gl_CooperativeMatrixLayoutRowMajor);
                        [[unroll]] for (uint r = 0u; r < RPS; ++r)
                            o_acc[r * NDV + d] = coopMatMulAdd(pa[r], vb, o_acc[r * NDV + d]);
                    }
                }
            }
        }

        // Epilogue: O / l through this subgroup's rows of s_sh, BC columns at a time (rows are
        // known there, so no broadcast trick is needed), then LSE.
        if (working) {
            const uint lane = gl_SubgroupInvocationID;
            const uint sgs = gl_SubgroupSize;
            // l = l_sh (tiles through softmax_rows) + the row sums of lacc (tiles in registers).
            subgroupMemoryBarrierShared();
            subgroupBarrier();
            [[unroll]] for (uint r = 0u; r < RPS; ++r)
                coopMatStore(lacc[r], s_sh, (row0 + r * CM) * SSTR, SSTR, gl_CooperativeMatrixLayoutRowMajor);
            subgroupMemoryBarrierShared();
            subgroupBarrier();
            for (uint rl = lane; rl < NROWS; rl += sgs) {
                float sum = 0.0;
                [[unroll]] for (uint c4 = 0u; c4 < CM / 4u; ++c4) sum += dot(s_sh[(row0 + rl) * SSTR + c4], vec4(1.0));
                l_sh[row0 + rl] += sum;
            }
            [[unroll]] for (uint ch = 0u; ch < (DV + BC - 1u) / BC; ++ch) {
                const uint w = min(BC, DV - ch * BC);  // columns in this chunk (multiple of 16)
                subgroupMemoryBarrierShared();
                subgroupBarrier();                     // previous chunk fully read
                [[unroll]] for (uint d = 0u; d < NDV; ++d) {
                    if (d / NBC == ch) {
                        [[unroll]] for (uint r = 0u; r < RPS; ++r)
                            coopMatStore(o_acc[r * NDV + d], s_sh, (row0 + r * CM) * SSTR + (d % NBC) * (CM / 4u),
                                         SSTR, gl_CooperativeMatrixLayoutRowMajor);
                    }
                }
                subgroupMemoryBarrierShared();
                subgroupBarrier();
                // Consecutive lanes write consecutive pairs of one row (coalesced).
                for (uint idx = lane; idx < NROWS * (w / 2u); idx += sgs) {
                    const uint row = row0 + idx / (w / 2u);
                    const uint cp = idx % (w / 2u);
                    const uint i = g_q0 + row;
                    if (i < pc.len_q) {
                        float m = m_sh[row];
                        float l = l_sh[row];
                        const float f = fold_sink(m, l, g_hq);
                        const float inv = l > 0.0 ? f / l : 0.0;
                        const vec4 v4 = s_sh[row * SSTR + cp / 2u];
                        const vec2 v = (cp & 1u) == 0u ? v4.xy : v4.zw;
                        store_pair(g_obase + i * DV + ch * BC + 2u * cp, v * inv);
                    }
                }
            }
            for (uint rl = lane; rl < NROWS; rl += sgs) {
                const uint i = g_q0 + row0 + rl;
                if (i < pc.len_q) {
                    float m = m_sh[row0 + rl];
                    float l = l_sh[row0 + rl];
                    fold_sink(m, l, g_hq);
                    lse_data[y * pc.len_q + i] = l > 0.0 ? (m + log2(l)) * LN2 : NEG_INF;
                }
            }
        }
    }
}
