#version 450
// Split-KV forward ("flash-decoding") in one dispatch: each workgroup computes partial attention
// of a few query rows over one split of the keys, and the last workgroup of each row block to
// finish merges all splits into O and LSE. For short query blocks (Lq <= 16) over long key
// sequences, where the forward's grid (query tiles x query heads) is far too small to fill a GPU
// and the work is bound by reading K and V once. One dispatch rather than a partial pass and a
// combine pass: the second dispatch, the barrier between them and the combine's own latency cost
// ~27 us per call on an H200 (Hq32 Hkv8 Lq1 D128 fp16: a third of the 0.082 ms at 32K keys).
//
// Interface: fa2_common.glsl (bindings 0-5, Push, spec constants, band helpers), with
// FA2_SPLIT_KV defined, which adds two push constants after the common ones:
//   n_split    number of splits (= the grid's x)
//   split_len  keys per split: split s covers [lo + s*split_len, lo + (s+1)*split_len) of the
//              band key_range(0, len_q) = [lo, hi) (keys outside the band are never read)
// and three scratch bindings, the plan's, reused by every call:
//   6 partial O  [chunk row][split][DV] fp32  unnormalised: sum_j exp2(s_j - m) v_j
//   7 partial ml [chunk row][split] vec2      (m, l): running max (exp2 domain), sum of exp2(s_j - m)
//   8 counters   [kv group in the chunk][row block] uint: workgroups of the block done; zero
//                before the first call (the host fills it once) and put back to zero by the merge
// A chunk row is q head in the chunk * len_q + query index: O's row order. O (DTYPE) and LSE (fp32,
// natural log) are written exactly as the forward kernels write them, so backward and autograd use
// them unchanged.
//
// Spec constants, read as:
//   DK, DV, DTYPE, WG as in fa2_common.glsl (local_size_x = WG)
//   BR   query rows per workgroup (RB below): all rows are held by every invocation (register
//        blocking), so each K/V element loaded from memory feeds BR rows
//   BC   keys per key group per step (loads of BC keys are issued before any math: memory-level
//        parallelism)
//   TPR  invocations per key (a "key group"), a power of two <= the subgroup size: each loads a
//        16-byte slice of the key's K and V rows (uvec4: 8 16-bit or 4 fp32 elements)
//   STAGE 2: the next step's K/V loads are issued before this step's math (register double
//        buffer: twice the load registers, loads in flight during the math); otherwise each
//        step loads, then computes
//   RPT: unused
//
// Grid: x = split, y = kv group within the chunk, z = block of BR rows within the kv group's
// group * len_q rows (all query heads that share the kv head, times the query rows, packed: each
// K/V element is read from memory once per kv head and row block, not once per query head).
//
// Work per workgroup: WG / TPR key groups stream the split's keys; at each step key group g takes
// keys j0 + c * NKG + g (c < BC), so the workgroup reads NKG consecutive K (and V) rows per c, as
// whole 16-byte vectors: coalesced. Each key group keeps its own online softmax (exp2 domain,
// fp32, q pre-scaled by scale * log2(e)); q.k is summed across the TPR lanes with
// subgroupShuffleXor. No shared memory or barrier in the key loop. Steps whose keys all exist and
// are visible to every row, with no mask, skip the per-score band and mask checks. At the end the
// key groups' (m, l, O) are merged in shared memory (a tree: log2(NKG) rounds of two barriers,
// once per workgroup) and written to the scratch buffers.
//
// Merge, by the last workgroup ("last block does the reduction", as CUDA's threadFenceReduction):
// having written its partials, a workgroup counts itself done on its block's counter; the one that
// sees n_split - 1 (every other split written) merges its block's rows over all splits and puts the
// counter back to 0. No workgroup waits for another, so no forward-progress guarantee is needed.
// Unit = (row, 4 columns), NE = RB * DV / 4 of them; with fewer units than invocations, SL
// invocations share a unit's splits (s = sl mod SL) and meet in shared memory. Each merges online
// (exp2 domain): M = max m_s, L = sum l_s exp2(m_s - M), O = sum o_s exp2(m_s - M), reading
// MERGE_UNROLL splits at a time so several loads are in flight (just written: on a GPU, in L2).
//
// Memory model (SPIR-V with the GLSL450 memory model, read through the Vulkan memory model
// appendix; the VulkanMemoryModel capability would need a device feature that unpatched kp does
// not enable). The partial buffers are `coherent`: each store is made available, and each load
// made visible, at Device scope, so no non-coherent cache (L1) serves stale data. A workgroup's
// stores are ordered before its counter increment by a control barrier with Device memory scope
// and acquire-release semantics on buffer memory (each invocation's release synchronizes-with
// invocation 0's acquire); the increment is an acquire-release atomic at Device scope. Increments
// are read-modify-writes, so the last one reads from the release sequence headed by every earlier
// one and synchronizes-with each. A second such control barrier carries that on to all the last
// workgroup's invocations before they load. The counter reset is an atomic store: nothing else touches
// the counter in this dispatch, and the next call is a later queue submission (fence signal, then
// vkQueueSubmit's visibility operation).
//
// Shared memory: 4 * (BR * DV * max(SL, NKG / 2) + 2 * max(NKG, SL) * BR + 1) bytes (SL = 1 when
// NE >= WG, else WG / NE).
// Per-invocation registers ~ BR * (DK + DV) / TPR floats (q and O) + STAGE' * BC * (DK + DV) /
// (4 * TPR) uvec4 loads in flight (STAGE' = 2 with STAGE 2, else 1; for 16-bit data, twice that
// for fp32): the host keeps BR * (DK + DV) / TPR small.
//
// Fully hidden rows and empty splits: m starts at NEG_BIG (finite), hidden scores are -inf, so
// p = 0 and l stays 0 (and no (-inf) - (-inf) arises in the merge); l == 0 over all splits gives
// O = 0 and LSE = -inf, as the forward does. Loads past the split's end use a clamped (valid) key
// index and their scores are hidden.
// lavapipe ends an invocation's loops after 65535 iterations in total: every loop but the key
// loop, the partial store loop and the merge's loops has a literal trip count ([[unroll]]), and the
// host keeps their sum (SplitKVConfig.loops) under it.
#extension GL_GOOGLE_include_directive : require
#extension GL_KHR_shader_subgroup_shuffle : enable
#extension GL_KHR_memory_scope_semantics : require
#define FA2_SPLIT_KV
#include "fa2_common.glsl"

const uint RB = BR;
const uint VEC = DTYPE == 0u ? 4u : 8u;   // elements per uvec4
const uint PPV = VEC / 2u;                // element pairs per uvec4
const uint NVK = DK / VEC;                // uvec4 per K row
const uint NVV = DV / VEC;                // uvec4 per V row
const uint NKL = (NVK + TPR - 1u) / TPR;  // K uvec4 per lane
const uint NVL = (NVV + TPR - 1u) / TPR;  // V uvec4 per lane
const uint QPL = NKL * VEC;               // q elements per lane and row
const uint OPL = NVL * VEC;               // O elements per lane and row
const uint NO = RB * OPL;                 // O elements per lane
const uint NKG = WG / TPR;                // key groups per workgroup (a power of two: WG and TPR are)
const uint DV4 = DV / 4u;
const uint NE = RB * DV4;                      // merge units: (row, 4 columns) of the block
const uint SL = NE >= WG ? 1u : WG / NE;       // invocations sharing a unit's splits in the merge
const uint NRED = (NKG > SL ? NKG : SL) * RB;  // red_m / red_l: key-group merge, then split lanes'
const uint NSLOT = NKG / 2u > SL ? NKG / 2u : SL;  // red_o blocks: key-group tree, then split lanes'
const uint MERGE_UNROLL = 8u;                  // splits read at once by the merge
const uint STEP = NKG * BC;                    // keys a workgroup takes per step
const uint NKR = BC * NKL;                     // K uvec4 registers per step
const uint NVR = BC * NVL;

// Vector views of Q/K/V (rows start at multiples of 16 bytes: head dims are multiples of 8).
layout(std430, binding = 0) readonly buffer QBuf4 { uvec4 q_data4[]; };
layout(std430, binding = 1) readonly buffer KBuf4 { uvec4 k_data4[]; };
layout(std430, binding = 2) readonly buffer VBuf4 { uvec4 v_data4[]; };
// Written by every workgroup, read by the last one of the block (see the header on `coherent`).
layout(std430, binding = 6) coherent buffer PartO { vec4 part_o[]; };
layout(std430, binding = 7) coherent buffer PartML { vec2 part_ml[]; };
layout(std430, binding = 8) buffer Counters { uint counters[]; };

shared vec4 red_o[NE * NSLOT];
shared float red_m[NRED];
shared float red_l[NRED];
shared uint last_wg;

// Elements 2c, 2c+1 of a uvec4 of packed DTYPE data (c < PPV; c is a constant after unrolling).
vec2 pair_of(uvec4 u, uint c) {
    if (DTYPE == 0u) return uintBitsToFloat(uvec2(u[2u * c], u[2u * c + 1u]));
    if (DTYPE == 1u) return unpackHalf2x16(u[c]);
    return vec2(uintBitsToFloat(u[c] << 16u), uintBitsToFloat(u[c] & 0xFFFF0000u));
}

// Normalised O (4 columns at col) and, once per row, LSE of chunk row `row` from its merged (m, l, O).
// l == 0 over every split (no visible key: band, mask, or empty splits) gives O = 0, LSE = -inf.
void store_out(uint row, uint col, float m, float l, vec4 o) {
    const float f = fold_sink(m, l, (pc.group0 * pc.group + row / pc.len_q) % pc.heads_q);
    const float inv_l = l > 0.0 ? f / l : 0.0;
    const uint e = row * DV + 4u * col;
    store_pair(e, o.xy * inv_l);
    store_pair(e + 2u, o.zw * inv_l);
    if (col == 0u) lse_data[row] = l > 0.0 ? (m + log2(l)) * LN2 : -1.0 / 0.0;
}

float reduce_key(float x) {
    // Literal trip count (unrolled; see the header on lavapipe's loop limit); TPR <= 32.
    [[unroll]] for (uint b = 0u; b < 5u; ++b) {
        if ((1u << b) < TPR) x += subgroupShuffleXor(x, 1u << b);
    }
    return x;
}

// A key group's O (this lane's columns of every row) into block `slot` of red_o.
void put_o(uint slot, uint lane, float o[NO]) {
    [[unroll]] for (uint r = 0u; r < RB; ++r) {
        [[unroll]] for (uint it = 0u; it < NVL; ++it) {
            const uint vi = lane + it * TPR;
            [[unroll]] for (uint x = 0u; x < VEC / 4u; ++x) {
                const uint e = r * OPL + it * VEC + 4u * x;
                if (vi < NVV) red_o[slot * NE + r * DV4 + vi * (VEC / 4u) + x] = vec4(o[e], o[e + 1u], o[e + 2u], o[e + 3u]);
            }
        }
    }
}

// K and V of the step starting at key j0: key group kg takes keys j0 + c * NKG + kg (c < BC), each
// lane its 16-byte slices. Keys past kb read key kb - 1 (a valid address; their scores are hidden).
void load_step(int j0, int kb, uint kbase, uint kg, uint lane, out uvec4 kr[NKR], out uvec4 vr[NVR]) {
    [[unroll]] for (uint c = 0u; c < BC; ++c) {
        const uint jc = kbase + uint(min(j0 + int(c * NKG + kg), kb - 1));
        [[unroll]] for (uint it = 0u; it < NKL; ++it) kr[c * NKL + it] = k_data4[jc * NVK + min(lane + it * TPR, NVK - 1u)];
        [[unroll]] for (uint it = 0u; it < NVL; ++it) vr[c * NVL + it] = v_data4[jc * NVV + min(lane + it * TPR, NVV - 1u)];
    }
}

void main() {
    const uint t = gl_LocalInvocationID.x;
    const uint lane = t % TPR;
    const uint kg = t / TPR;
    const uint split = gl_WorkGroupID.x;
    const uint kvg = gl_WorkGroupID.y;             // kv group within the chunk
    const uint rows = pc.group * pc.len_q;         // query rows sharing this kv head
    const uint r0 = gl_WorkGroupID.z * RB;         // first row of this block
    const uint gkv = pc.group0 + kvg;              // global (batch, kv head)
    const uint batch = gkv / pc.heads_kv;
    const uint head0 = (gkv % pc.heads_kv) * pc.group;

    const ivec2 band = key_range(0, int(pc.len_q));
    const int ka = band.x + int(min(split * pc.split_len, uint(band.y - band.x)));
    const int kb = min(band.y, ka + int(pc.split_len));
    // Every key of the split visible to every query row (any row of the block may be any query
    // index), and no mask or ALiBi bias: whole steps skip the per-score checks.
    const bool open_split = ALIBI == 0u && pc.has_mask == 0u && keys_visible_to_all(0, int(pc.len_q), ka, kb);

    float q[RB * QPL];
    float o[NO];
    float m[RB];
    float l[RB];
    [[unroll]] for (uint r = 0u; r < RB; ++r) {
        // Rows past the kv group's last compute on that row and are never stored.
        const uint row = kvg * rows + min(r0 + r, rows - 1u);   // chunk row
        [[unroll]] for (uint it = 0u; it < NKL; ++it) {
            const uint vi = lane + it * TPR;
            const uvec4 u = q_data4[row * NVK + min(vi, NVK - 1u)];
            [[unroll]] for (uint c = 0u; c < PPV; ++c) {
                // q carries the softmax scale and log2(e); lanes past the row hold zeros.
                const vec2 x = vi < NVK ? pair_of(u, c) * pc.scale_log2 : vec2(0.0);
                q[r * QPL + it * VEC + 2u * c] = x.x;
                q[r * QPL + it * VEC + 2u * c + 1u] = x.y;
            }
        }
        [[unroll]] for (uint d = 0u; d < OPL; ++d) o[r * OPL + d] = 0.0;
        m[r] = NEG_BIG;
        l[r] = 0.0;
    }

    const uint kbase = kvg * pc.len_k;
    uvec4 kr[NKR];
    uvec4 vr[NVR];
    if (ka < kb) load_step(ka, kb, kbase, kg, lane, kr, vr);
    for (int j0 = ka; j0 < kb; j0 += int(STEP)) {
        const bool more = j0 + int(STEP) < kb;
        uvec4 kn[NKR];
        uvec4 vn[NVR];
        if (STAGE == 2u && more) load_step(j0 + int(STEP), kb, kbase, kg, lane, kn, vn);

        float s[RB * BC];
        [[unroll]] for (uint c = 0u; c < BC; ++c) {
            float acc[RB];
            [[unroll]] for (uint r = 0u; r < RB; ++r) acc[r] = 0.0;
            [[unroll]] for (uint it = 0u; it < NKL; ++it) {
                [[unroll]] for (uint cc = 0u; cc < PPV; ++cc) {
                    const vec2 kx = pair_of(kr[c * NKL + it], cc);
                    [[unroll]] for (uint r = 0u; r < RB; ++r) {
                        const uint e = r * QPL + it * VEC + 2u * cc;
                        acc[r] += q[e] * kx.x + q[e + 1u] * kx.y;
                    }
                }
            }
            [[unroll]] for (uint r = 0u; r < RB; ++r) s[r * BC + c] = capped(reduce_key(acc[r]));
        }
        if (!(open_split && j0 + int(STEP) <= kb)) {
            // Keys past the split, outside a row's band, or masked (rare: split edges, windows).
            [[unroll]] for (uint r = 0u; r < RB; ++r) {
                const uint rr = min(r0 + r, rows - 1u);
                const int qi = int(rr % pc.len_q);
                const uint mrow = batch * pc.mask_sb + (head0 + rr / pc.len_q) * pc.mask_sh + uint(qi) * pc.mask_si;
                const float slope = alibi_slope(batch, head0 + rr / pc.len_q);
                [[unroll]] for (uint c = 0u; c < BC; ++c) {
                    const int j = j0 + int(c * NKG + kg);
                    s[r * BC + c] += alibi_term(slope, qi, j);
                    if (j >= kb || !key_visible(qi, j)) {
                        s[r * BC + c] = -1.0 / 0.0;
                    } else if (pc.has_mask != 0u) {
                        s[r * BC + c] += mask_term(mask_data[mrow + uint(j) * pc.mask_sj]);
                    }
                }
            }
        }

        [[unroll]] for (uint r = 0u; r < RB; ++r) {
            float m_new = m[r];
            [[unroll]] for (uint c = 0u; c < BC; ++c) m_new = max(m_new, s[r * BC + c]);
            const float alpha = exp2(m[r] - m_new);
            m[r] = m_new;
            l[r] *= alpha;
            [[unroll]] for (uint d = 0u; d < OPL; ++d) o[r * OPL + d] *= alpha;
            [[unroll]] for (uint c = 0u; c < BC; ++c) {
                s[r * BC + c] = exp2(s[r * BC + c] - m_new);
                l[r] += s[r * BC + c];
            }
        }
        [[unroll]] for (uint c = 0u; c < BC; ++c) {
            [[unroll]] for (uint it = 0u; it < NVL; ++it) {
                [[unroll]] for (uint cc = 0u; cc < PPV; ++cc) {
                    const vec2 vx = pair_of(vr[c * NVL + it], cc);
                    [[unroll]] for (uint r = 0u; r < RB; ++r) {
                        const uint e = r * OPL + it * VEC + 2u * cc;
                        o[e] += s[r * BC + c] * vx.x;
                        o[e + 1u] += s[r * BC + c] * vx.y;
                    }
                }
            }
        }
        if (more) {
            if (STAGE == 2u) {
                [[unroll]] for (uint i = 0u; i < NKR; ++i) kr[i] = kn[i];
                [[unroll]] for (uint i = 0u; i < NVR; ++i) vr[i] = vn[i];
            } else {
                load_step(j0 + int(STEP), kb, kbase, kg, lane, kr, vr);
            }
        }
    }

    // Merge the key groups: common max per row, O scaled to it, then summed over a tree in shared
    // memory (round h: groups [h, 2h) hand their O to groups [0, h)).
    if (lane == 0u) {
        [[unroll]] for (uint r = 0u; r < RB; ++r) {
            red_m[kg * RB + r] = m[r];
            red_l[kg * RB + r] = l[r];
        }
    }
    barrier();
    [[unroll]] for (uint r = 0u; r < RB; ++r) {
        float mx = NEG_BIG;
        [[unroll]] for (uint g = 0u; g < NKG; ++g) mx = max(mx, red_m[g * RB + r]);
        const float w = exp2(m[r] - mx);
        [[unroll]] for (uint d = 0u; d < OPL; ++d) o[r * OPL + d] *= w;
    }
    [[unroll]] for (uint h = NKG / 2u; h >= 1u; h /= 2u) {
        if (kg >= h && kg < 2u * h) put_o(kg - h, lane, o);
        barrier();
        if (kg < h) {
            [[unroll]] for (uint r = 0u; r < RB; ++r) {
                [[unroll]] for (uint it = 0u; it < NVL; ++it) {
                    const uint vi = lane + it * TPR;
                    [[unroll]] for (uint x = 0u; x < VEC / 4u; ++x) {
                        const uint e = r * OPL + it * VEC + 4u * x;
                        const vec4 y = vi < NVV ? red_o[kg * NE + r * DV4 + vi * (VEC / 4u) + x] : vec4(0.0);
                        o[e] += y.x;
                        o[e + 1u] += y.y;
                        o[e + 2u] += y.z;
                        o[e + 3u] += y.w;
                    }
                }
            }
        }
        barrier();
    }
    // Key group 0 holds the workgroup's O: to red_o for the coalesced store below.
    if (kg == 0u) put_o(0u, lane, o);
    barrier();

    const uint n_split = pc.n_split;
    for (uint e = t; e < RB * DV4; e += WG) {
        const uint r = e / DV4;
        if (r0 + r < rows) part_o[((kvg * rows + r0 + r) * n_split + split) * DV4 + e % DV4] = red_o[e];
    }
    if (t < RB && r0 + t < rows) {
        float mx = NEG_BIG;
        [[unroll]] for (uint g = 0u; g < NKG; ++g) mx = max(mx, red_m[g * RB + t]);
        float lx = 0.0;
        [[unroll]] for (uint g = 0u; g < NKG; ++g) lx += red_l[g * RB + t] * exp2(red_m[g * RB + t] - mx);
        part_ml[(kvg * rows + r0 + t) * n_split + split] = vec2(mx, lx);
    }

    // Count this workgroup done; the last of the block merges (see the header on the memory model).
    // The barriers' Shared semantics also order the reads of red_* above before the merge's writes.
    controlBarrier(gl_ScopeWorkgroup, gl_ScopeDevice, gl_StorageSemanticsBuffer | gl_StorageSemanticsShared,
                   gl_SemanticsAcquireRelease);
    if (t == 0u) {
        const uint counter = kvg * gl_NumWorkGroups.z + gl_WorkGroupID.z;
        const uint done = atomicAdd(counters[counter], 1u, gl_ScopeDevice, gl_StorageSemanticsBuffer,
                                    gl_SemanticsAcquireRelease);
        last_wg = done == n_split - 1u ? 1u : 0u;
        if (done == n_split - 1u) {
            atomicStore(counters[counter], 0u, gl_ScopeDevice, gl_StorageSemanticsBuffer, gl_SemanticsRelaxed);
        }
    }
    controlBarrier(gl_ScopeWorkgroup, gl_ScopeDevice, gl_StorageSemanticsBuffer | gl_StorageSemanticsShared,
                   gl_SemanticsAcquireRelease);
    if (last_wg == 0u) return;

    // Merge: invocation t takes unit e % NE (row r, columns [4 col, +4)) over the splits
    // s = e / NE (mod SL); with SL == 1 it stores, else the SL lanes of a unit meet in shared memory.
    for (uint e = t; e < NE * SL; e += WG) {
        const uint u = e % NE;
        const uint sl = e / NE;
        const uint r = u / DV4;
        const uint col = u % DV4;
        // Rows past the kv group's last merge that row's splits and are never stored.
        const uint row = kvg * rows + min(r0 + r, rows - 1u);
        float mx = NEG_BIG;
        float lx = 0.0;
        vec4 ox = vec4(0.0);
        for (uint s0 = sl; s0 < n_split; s0 += SL * MERGE_UNROLL) {
            vec2 ml[MERGE_UNROLL];
            vec4 ov[MERGE_UNROLL];
            [[unroll]] for (uint k = 0u; k < MERGE_UNROLL; ++k) {
                // Past the last split: a valid split's address, weight l = 0 and o = 0.
                const uint s = s0 + k * SL;
                const uint at = row * n_split + min(s, n_split - 1u);
                ml[k] = s < n_split ? part_ml[at] : vec2(NEG_BIG, 0.0);
                ov[k] = s < n_split ? part_o[at * DV4 + col] : vec4(0.0);
            }
            [[unroll]] for (uint k = 0u; k < MERGE_UNROLL; ++k) {
                const float m_new = max(mx, ml[k].x);
                const float a = exp2(mx - m_new);
                const float b = exp2(ml[k].x - m_new);
                lx = lx * a + ml[k].y * b;
                ox = ox * a + ov[k] * b;
                mx = m_new;
            }
        }
        if (SL == 1u) {
            if (r0 + r < rows) store_out(row, col, mx, lx, ox);
        } else {
            red_o[e] = ox;
            if (col == 0u) {
                red_m[sl * RB + r] = mx;
                red_l[sl * RB + r] = lx;
            }
        }
    }
    if (SL > 1u) {
        barrier();
        // NE * SL <= WG: one unit per invocation.
        const uint r = t / DV4;
        if (t < NE && r0 + r < rows) {
            float m_all = NEG_BIG;
            [[unroll]] for (uint g = 0u; g < SL; ++g) m_all = max(m_all, red_m[g * RB + r]);
            float l_all = 0.0;
            vec4 o_all = vec4(0.0);
            [[unroll]] for (uint g = 0u; g < SL; ++g) {
                const float w = exp2(red_m[g * RB + r] - m_all);
                l_all += red_l[g * RB + r] * w;
                o_all += red_o[g * NE + t] * w;
            }
            store_out(kvg * rows + r0 + r, t % DV4, m_all, l_all, o_all);
        }
    }
}
