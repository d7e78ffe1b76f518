// FlashAttention-2's forward pass on the CPU: the aule-kp CPU backend's native kernel.
//
// One source, built once per vector width (AULE_W floats: 16 for AVX-512, 8 for AVX2+FMA, 4 for SSE2 or
// NEON) by scripts/cpu_build.py; aule_kp/cpu/native.py loads the widest build the CPU runs and calls
// `aule_fa2_forward` through ctypes (which releases the GIL for the whole call). GCC/Clang vector
// extensions rather than intrinsics: the same code is every width's.
//
// A task is one block of query rows of one (batch, query head). It walks key blocks of `block_k` keys; per
// block it packs K transposed (panels of NC keys) and V (rows padded to whole vectors), both converted to
// float32, then takes its rows MR at a time through three steps while their scores sit in L1: the score
// micro-kernel (MR rows x NC keys in registers), the online softmax (mask, band, row max, rescale, exp2,
// row sum) and the P.V micro-kernel (MR rows x up to NVV vectors of Dv in registers). Each MR-row panel
// only computes the key panels its own rows see, so a causal diagonal costs a staircase of panels.
// Threads (pthreads) take tasks from an atomic counter, longest first. Scratch is per thread and
// independent of the sequence length.
//
// Non-finite scores follow aule_kp/nonfinite.py: the row max skips NaN (it reaches the row through the
// exponential and its sum), +inf becomes NaN against any shift, -inf gives a weight of 0; a row that sees
// no key gets out 0 and lse -inf. Hence no -ffast-math: only contraction (FMA) is allowed.

#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef AULE_W
#error "AULE_W (floats per vector) must be defined"
#endif

#define W AULE_W
#if W == 16
#define MR 6   // rows per micro-kernel: 6 x 4 accumulators of 32 registers
#define NRV 4  // score micro-kernel: vectors of keys per panel
#define NVV 4  // P.V micro-kernel: vectors of Dv per pass
#elif W == 8
#define MR 6
#define NRV 2
#define NVV 2
#else
#define MR 6
#define NRV 2
#define NVV 2
#endif
#define NC (NRV * W)  // keys per packed K panel

typedef float vf __attribute__((vector_size(W * 4)));
typedef float vfu __attribute__((vector_size(W * 4), aligned(4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));

#define EXPORT extern "C" __attribute__((visibility("default")))

static inline vf load(const float* p) { return *(const vfu*)p; }
static inline void store(float* p, vf x) { *(vfu*)p = x; }
// `x - 0` rather than `0 + x`: the latter is not x for x = -0.0, so the compiler cannot fold it and spends an
// add on every broadcast (25% of the micro-kernels' time, measured).
static inline vf splat(float x) { return x - (vf){}; }

// 2**x for x <= 0 (relative error < 2e-7): x < -127 gives 0, NaN gives NaN. Round-to-nearest through the
// 1.5 * 2**23 trick (no vector floor in the extensions); the exponent field is built from its low bits.
static inline vf exp2v(vf x) {
    const vf lo = splat(-127.0f);
    x = x < lo ? lo : x;  // NaN compares false: it stays NaN
    const vf magic = splat(12582912.0f);
    vf t = x + magic;
    vf n = t - magic;
    vf f = x - n;  // [-0.5, 0.5]
    vf p = splat(1.5353362e-4f);
    p = p * f + 1.3398874e-3f;
    p = p * f + 9.6180231e-3f;
    p = p * f + 5.5503395e-2f;
    p = p * f + 2.4022652e-1f;
    p = p * f + 6.9314718e-1f;
    p = p * f + 1.0f;
    vi bits = ((vi)t - 0x4B400000 + 127) << 23;  // n + 127 in the exponent field; n = -127 gives 0.0
    return p * (vf)bits;
}

static inline float exp2s(float x) {
    vf v = exp2v(splat(x));
    return v[0];
}

static inline float gt(float x, float y) { return x > y ? x : y; }  // y when x is NaN

// Horizontal max (NaN skipped) and sum of a vector, halving it until 4 lanes remain: a chain of W scalar
// steps per row and key block cost as much as the max pass itself (measured).
template <int N>
struct Lanes {
    typedef float half __attribute__((vector_size(N * 2)));
    template <typename V>
    static float max(V v) {
        half lo, hi;
        memcpy(&lo, &v, sizeof lo);
        memcpy(&hi, (const char*)&v + sizeof lo, sizeof hi);
        return Lanes<N / 2>::max(hi > lo ? hi : lo);
    }
    template <typename V>
    static float sum(V v) {
        half lo, hi;
        memcpy(&lo, &v, sizeof lo);
        memcpy(&hi, (const char*)&v + sizeof lo, sizeof hi);
        return Lanes<N / 2>::sum(lo + hi);
    }
};
template <>
struct Lanes<4> {
    template <typename V>
    static float max(V v) { return gt(gt(v[0], v[1]), gt(v[2], v[3])); }
    template <typename V>
    static float sum(V v) { return (v[0] + v[1]) + (v[2] + v[3]); }
};

// ---- storage conversion --------------------------------------------------------------------------------

enum { F32 = 0, F16 = 1, BF16 = 2 };

// Exact: a half's exponent and mantissa moved into float32's fields and scaled by 2**112 covers normals and
// subnormals alike; inf and NaN keep their mantissa under an all-ones exponent.
static inline float half_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)(h & 0x7FFF) << 13;
    float f;
    if ((h & 0x7C00) == 0x7C00) {
        bits |= 0x7F800000u;
        memcpy(&f, &bits, 4);
    } else {
        memcpy(&f, &bits, 4);
        f *= 0x1p112f;
    }
    uint32_t out;
    memcpy(&out, &f, 4);
    out |= (uint32_t)(h & 0x8000) << 16;
    memcpy(&f, &out, 4);
    return f;
}

// Element `i` of storage type DT at `p`, as float32.
template <int DT>
static inline float element(const void* p, int64_t i) {
    if (DT == F32) return ((const float*)p)[i];
    const uint16_t h = ((const uint16_t*)p)[i];
    if (DT == F16) return half_to_f32(h);
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// ---- the call ---------------------------------------------------------------------------------------------

// Mirrors aule_kp/cpu/native.py's ctypes Structure field by field.
struct Args {
    const void *q, *k, *v;
    const float* mask;  // NULL: none
    float* out;         // [B, Hq, Lq, Dv] float32, contiguous
    float* lse;         // [B, Hq, Lq]
    int64_t q_stride[3], k_stride[3], v_stride[3];  // elements per batch, head, position (last dim contiguous)
    int64_t mask_stride[4];                         // elements per batch, head, row, key; 0 broadcasts
    int64_t batch, heads_q, heads_kv, len_q, len_k, dim_k, dim_v;
    int64_t diag, left, right;  // row i sees keys [i + diag - left, i + diag + right]; left/right < 0: unbounded
    int64_t block_q, block_k, workers;
    int64_t stack;   // 1: a task takes all query heads of its kv head (rows head-major), 0: one query head
    int64_t direct;  // 1: K and V rows read as they are (few rows per kv head: packing costs more than it saves)
    int64_t computed;  // out: scores computed, padding included (tests check that hidden panels are skipped)
    int32_t dtype;
    float scale;
};

// Rows: heads [h0, h0 + nh) x positions [i0, i1), head-major (row r is head h0 + r / n, position i0 + r % n).
struct Task {
    int64_t b, h0, nh, i0, i1, work;
    int64_t group;  // (batch, kv head) index: the packed K/V the task reads
};

// K and V of one (batch, kv head), packed once for every task of its query heads: K transposed in panels of
// NC keys (kt[panel][d][NC], keys past Lk zero) and V in rows padded to whole vectors.
struct Packed {
    float *kt, *v;
};

struct Shared {
    Args* a;
    Task* tasks;  // by group, then longest first
    int64_t n_tasks;
    int64_t next;       // atomic: the next task to take
    int64_t* state;     // per group, atomic: 0 unpacked, 1 being packed, 2 packed
    int64_t* left;      // per group, atomic: its tasks not finished yet
    Packed* slots;      // group g packs into slot g % n_slots, once group g - n_slots has finished
    int64_t n_slots;
    int64_t finished;   // atomic: tasks done
};

static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Keys [lo, hi) that query row i sees (the band clipped to the keys).
static inline void row_range(const Args* a, int64_t i, int64_t* lo, int64_t* hi) {
    int64_t l = a->left < 0 ? 0 : i + a->diag - a->left;
    int64_t h = a->right < 0 ? a->len_k : i + a->diag + a->right + 1;
    *lo = l < 0 ? 0 : (l > a->len_k ? a->len_k : l);
    *hi = h < *lo ? *lo : (h > a->len_k ? a->len_k : h);
}

struct Scratch {
    float *q, *o, *m, *l, *s;
    float *k, *v;  // direct mode: a key block's K and V rows, converted and zero-padded
};

// Scores of MR rows (packed q rows of stride q_stride) against one packed K panel of NC keys.
static inline void scores_panel(const float* q, int64_t q_stride, int64_t dk, const float* kt_panel, float* s,
                                int64_t s_stride) {
    vf acc[MR][NRV];
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < NRV; c++) acc[r][c] = splat(0.0f);
    for (int64_t d = 0; d < dk; d++) {
        vf kv[NRV];
        for (int c = 0; c < NRV; c++) kv[c] = load(kt_panel + d * NC + c * W);
        for (int r = 0; r < MR; r++) {
            vf qb = splat(q[r * q_stride + d]);
            for (int c = 0; c < NRV; c++) acc[r][c] += qb * kv[c];
        }
    }
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < NRV; c++) store(s + r * s_stride + c * W, acc[r][c]);
}

// Scores of MR rows (packed q rows, stride dkp, zero-padded) against keys [j0, j1) given as rows of stride
// k_stride (zero-padded to dkp): dot products reduced across the vector, for the few rows where packing K
// transposed would cost more than the whole product.
static inline void scores_direct(const float* q, int64_t dkp, const float* k, int64_t k_stride, int64_t j0,
                                 int64_t j1, float* s, int64_t s_stride) {
    for (int64_t j = j0; j < j1; j++) {
        const float* kr = k + j * k_stride;
        vf acc[MR];
        for (int r = 0; r < MR; r++) acc[r] = splat(0.0f);
        for (int64_t d = 0; d < dkp; d += W) {
            const vf kv = load(kr + d);
            for (int r = 0; r < MR; r++) acc[r] += load(q + r * dkp + d) * kv;
        }
        for (int r = 0; r < MR; r++) s[r * s_stride + j] = Lanes<W>::sum(acc[r]);
    }
}

// o[MR rows, NVV vectors at column dv0] += p[MR rows, keys [j0, j1)] . v[keys, ...] (v rows of stride
// v_stride, o rows of stride dvp).
static inline void pv_panel(const float* p, int64_t p_stride, const float* v, int64_t v_stride, int64_t dvp,
                            int64_t j0, int64_t j1, float* o, int nv) {
    vf acc[MR][NVV];
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < NVV; c++) acc[r][c] = c < nv ? load(o + r * dvp + c * W) : splat(0.0f);
    if (nv == NVV) {
        for (int64_t j = j0; j < j1; j++) {
            vf vv[NVV];
            for (int c = 0; c < NVV; c++) vv[c] = load(v + j * v_stride + c * W);
            for (int r = 0; r < MR; r++) {
                vf pb = splat(p[r * p_stride + j]);
                for (int c = 0; c < NVV; c++) acc[r][c] += pb * vv[c];
            }
        }
    } else {
        for (int64_t j = j0; j < j1; j++) {
            for (int c = 0; c < nv; c++) {
                vf vv = load(v + j * v_stride + c * W);
                for (int r = 0; r < MR; r++) acc[r][c] += splat(p[r * p_stride + j]) * vv;
            }
        }
    }
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < nv; c++) store(o + r * dvp + c * W, acc[r][c]);
}

// One task's rows over the keys they see, from its group's packed K/V; returns the scores it computed.
template <int DT>
static int64_t run_task(const Args* a, const Task* t, const Packed* pk, Scratch* sc) {
    const int64_t dk = a->dim_k, dkp = round_up(dk > 0 ? dk : 1, W), dv = a->dim_v, dvp = round_up(dv > 0 ? dv : 1, W);
    const int64_t npos = t->i1 - t->i0, rows = t->nh * npos, rows_p = round_up(rows, MR);
    const int64_t bk = round_up(a->block_k, NC);
    const float log2e = 1.4426950408889634f;
    const int64_t esz = DT == F32 ? 4 : 2;
    int64_t head[MR], pos[MR];  // of the current row panel's rows

    // Packed, scaled q rows (padding rows and columns zero), the accumulators, each row's shift and sum.
    memset(sc->q, 0, sizeof(float) * rows_p * dkp);
    for (int64_t r = 0; r < rows_p; r++) {
        if (r < rows) {
            const char* src = (const char*)a->q + esz * (t->b * a->q_stride[0] + (t->h0 + r / npos) * a->q_stride[1] +
                                                          (t->i0 + r % npos) * a->q_stride[2]);
            for (int64_t d = 0; d < dk; d++) sc->q[r * dkp + d] = element<DT>(src, d) * a->scale;
        }
        sc->m[r] = -INFINITY;
        sc->l[r] = 0.0f;
    }
    memset(sc->o, 0, sizeof(float) * rows_p * dvp);

    int64_t computed = 0, lo_all = a->len_k, hi_all = 0;
    for (int64_t i = t->i0; i < t->i1; i++) {
        int64_t lo, hi;
        row_range(a, i, &lo, &hi);
        if (lo < hi) {
            lo_all = lo < lo_all ? lo : lo_all;
            hi_all = hi > hi_all ? hi : hi_all;
        }
    }

    // Key blocks start on panel boundaries: the packed panels are the head's, not the block's.
    const int64_t kvh = t->group % a->heads_kv;
    const char* kbase = (const char*)a->k + esz * (t->b * a->k_stride[0] + kvh * a->k_stride[1]);
    const char* vbase = (const char*)a->v + esz * (t->b * a->v_stride[0] + kvh * a->v_stride[1]);
    // Direct mode reads float32 rows in place when they are whole vectors, else converts the block's rows.
    const bool k_in_place = DT == F32 && dk == dkp, v_in_place = DT == F32 && dv == dvp;
    for (int64_t c0 = lo_all / NC * NC; c0 < hi_all; c0 += bk) {
        const int64_t c1 = c0 + bk < hi_all ? c0 + bk : hi_all, width = c1 - c0;
        const float *kt = NULL, *vb, *kb = NULL;
        int64_t kb_stride = dkp, vb_stride = dvp;
        if (a->direct) {
            if (k_in_place) {
                kb = (const float*)kbase + c0 * a->k_stride[2];
                kb_stride = a->k_stride[2];
            } else {
                for (int64_t j = 0; j < width; j++) {
                    const char* src = kbase + esz * (c0 + j) * a->k_stride[2];
                    for (int64_t d = 0; d < dkp; d++) sc->k[j * dkp + d] = d < dk ? element<DT>(src, d) : 0.0f;
                }
                kb = sc->k;
            }
            if (v_in_place) {
                vb = (const float*)vbase + c0 * a->v_stride[2];
                vb_stride = a->v_stride[2];
            } else {
                for (int64_t j = 0; j < width; j++) {
                    const char* src = vbase + esz * (c0 + j) * a->v_stride[2];
                    for (int64_t d = 0; d < dvp; d++) sc->v[j * dvp + d] = d < dv ? element<DT>(src, d) : 0.0f;
                }
                vb = sc->v;
            }
        } else {
            kt = pk->kt + c0 * dk;  // panel c0 / NC
            vb = pk->v + c0 * dvp;
        }

        for (int64_t r0 = 0; r0 < rows; r0 += MR) {
            const int64_t nr = rows - r0 < MR ? rows - r0 : MR;
            // The keys of this block that some row of the panel sees.
            int64_t plo = c1, phi = c0, rlo[MR], rhi[MR];
            for (int r = 0; r < MR; r++) {
                if (r < nr) {
                    head[r] = t->h0 + (r0 + r) / npos;
                    pos[r] = t->i0 + (r0 + r) % npos;
                    row_range(a, pos[r], &rlo[r], &rhi[r]);
                    rlo[r] = rlo[r] < c0 ? c0 : rlo[r];
                    rhi[r] = rhi[r] > c1 ? c1 : rhi[r];
                    if (rlo[r] < rhi[r]) {
                        plo = rlo[r] < plo ? rlo[r] : plo;
                        phi = rhi[r] > phi ? rhi[r] : phi;
                    }
                } else {
                    rlo[r] = rhi[r] = c0;
                }
            }
            if (plo >= phi) continue;
            const int64_t j0 = (plo - c0) / NC * NC, j1 = round_up(phi - c0, NC);
            computed += MR * (j1 - j0);
            float* s = sc->s;  // [MR][bk]
            if (a->direct)  // keys past the block get 0 here, then -inf as every key outside a row's range
                scores_direct(sc->q + r0 * dkp, dkp, kb, kb_stride, j0, j1 < width ? j1 : width, s, bk);
            else
                for (int64_t j = j0; j < j1; j += NC)
                    scores_panel(sc->q + r0 * dkp, dkp, dk, kt + j * dk, s + j, bk);

            // Online softmax, row by row.
            for (int r = 0; r < MR; r++) {
                float* row = s + r * bk;
                const int64_t lo = rlo[r] - c0, hi = rhi[r] - c0;
                if (lo >= hi) {  // sees nothing here (or a padding row): weights 0
                    for (int64_t j = j0; j < j1; j++) row[j] = 0.0f;
                    continue;
                }
                for (int64_t j = j0; j < lo; j++) row[j] = -INFINITY;
                for (int64_t j = hi; j < j1; j++) row[j] = -INFINITY;
                if (a->mask) {
                    const float* mrow = a->mask + t->b * a->mask_stride[0] + head[r] * a->mask_stride[1] +
                                        pos[r] * a->mask_stride[2];
                    const int64_t ms = a->mask_stride[3];
                    for (int64_t j = lo; j < hi; j++) row[j] += mrow[(c0 + j) * ms];
                }
                // NRV running maxima: one would chain every vector on the max's latency (4x slower, measured).
                vf mx[NRV];
                for (int c = 0; c < NRV; c++) mx[c] = splat(-INFINITY);
                for (int64_t j = j0; j < j1; j += NC)
                    for (int c = 0; c < NRV; c++) {
                        vf x = load(row + j + c * W);
                        mx[c] = x > mx[c] ? x : mx[c];  // NaN skipped
                    }
                for (int c = 1; c < NRV; c++) mx[0] = mx[c] > mx[0] ? mx[c] : mx[0];
                const float tile_max = Lanes<W>::max(mx[0]);
                const float m_old = sc->m[r0 + r];
                const float m_new = gt(tile_max, m_old);
                const float shift = m_new == -INFINITY ? 0.0f : m_new;
                if (m_new != m_old) {
                    const float alpha = exp2s((m_old - m_new) * log2e);  // m_old = -inf: 0
                    sc->m[r0 + r] = m_new;
                    sc->l[r0 + r] *= alpha;
                    float* orow = sc->o + (r0 + r) * dvp;
                    for (int64_t d = 0; d < dvp; d += W) store(orow + d, load(orow + d) * alpha);
                }
                // The difference first, then base 2: a score of float32's most negative value (a Hugging Face
                // mask) times log2(e) would overflow to -inf, and -inf minus such a shift is NaN.
                const vf sh = splat(shift), l2e = splat(log2e);
                vf sum[NRV];
                for (int c = 0; c < NRV; c++) sum[c] = splat(0.0f);
                for (int64_t j = j0; j < j1; j += NC)
                    for (int c = 0; c < NRV; c++) {
                        vf e = exp2v((load(row + j + c * W) - sh) * l2e);
                        store(row + j + c * W, e);
                        sum[c] += e;
                    }
                for (int c = 1; c < NRV; c++) sum[0] += sum[c];
                const float total = Lanes<W>::sum(sum[0]);
                sc->l[r0 + r] += total;
            }
            for (int64_t d0 = 0; d0 < dvp; d0 += NVV * W) {
                const int nv = (int)((dvp - d0) / W < NVV ? (dvp - d0) / W : NVV);
                pv_panel(s, bk, vb + d0, vb_stride, dvp, j0, j1 < width ? j1 : width, sc->o + r0 * dvp + d0, nv);
            }
        }
    }

    const float ln2 = 0.6931471805599453f;
    for (int64_t r = 0; r < rows; r++) {
        const int64_t row = (t->b * a->heads_q + t->h0 + r / npos) * a->len_q + t->i0 + r % npos;
        float* dst = a->out + row * dv;
        float* lse = a->lse + row;
        const float total = sc->l[r];
        if (total == 0.0f) {
            for (int64_t d = 0; d < dv; d++) dst[d] = 0.0f;
            *lse = -INFINITY;
            continue;
        }
        const float inv = 1.0f / total;
        for (int64_t d = 0; d < dv; d++) dst[d] = sc->o[r * dvp + d] * inv;
        *lse = sc->m[r] + log2f(total) * ln2;
    }
    return computed;
}

template <int DT>
static void pack_group(const Args* a, int64_t g, const Packed* pk) {
    const int64_t dk = a->dim_k, dv = a->dim_v, dvp = round_up(dv > 0 ? dv : 1, W), esz = DT == F32 ? 4 : 2;
    const int64_t b = g / a->heads_kv, h = g % a->heads_kv, lk = a->len_k;
    const char* kbase = (const char*)a->k + esz * (b * a->k_stride[0] + h * a->k_stride[1]);
    const char* vbase = (const char*)a->v + esz * (b * a->v_stride[0] + h * a->v_stride[1]);
    for (int64_t j = 0; j < round_up(lk, NC); j++) {
        float* col = pk->kt + (j / NC) * dk * NC + (j % NC);
        const char* src = kbase + esz * j * a->k_stride[2];
        for (int64_t d = 0; d < dk; d++) col[d * NC] = j < lk ? element<DT>(src, d) : 0.0f;
    }
    for (int64_t j = 0; j < lk; j++) {
        const char* src = vbase + esz * j * a->v_stride[2];
        float* row = pk->v + j * dvp;
        for (int64_t d = 0; d < dv; d++) row[d] = element<DT>(src, d);
        for (int64_t d = dv; d < dvp; d++) row[d] = 0.0f;
    }
}

// Group g's packed K/V, packing them if no other thread has started to (a task waits for the thread that
// did; the packer waits until the group that used its slot before has finished). Every wait is on a group
// taken earlier, so none can close a cycle.
static const Packed* packed(Shared* sh, int64_t g) {
    const Packed* pk = &sh->slots[g % sh->n_slots];
    int64_t unpacked = 0;
    if (__atomic_compare_exchange_n(&sh->state[g], &unpacked, 1, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        if (g >= sh->n_slots)
            while (__atomic_load_n(&sh->left[g - sh->n_slots], __ATOMIC_ACQUIRE) > 0) sched_yield();
        const Args* a = sh->a;
        if (a->dtype == F16)
            pack_group<F16>(a, g, pk);
        else if (a->dtype == BF16)
            pack_group<BF16>(a, g, pk);
        else
            pack_group<F32>(a, g, pk);
        __atomic_store_n(&sh->state[g], 2, __ATOMIC_RELEASE);
    } else {
        while (__atomic_load_n(&sh->state[g], __ATOMIC_ACQUIRE) != 2) sched_yield();
    }
    return pk;
}

static void* worker(void* arg) {
    Shared* sh = (Shared*)arg;
    Args* a = sh->a;
    const int64_t dkp = round_up(a->dim_k > 0 ? a->dim_k : 1, W), dvp = round_up(a->dim_v > 0 ? a->dim_v : 1, W);
    const int64_t rows_p = round_up(a->block_q * (a->stack ? a->heads_q / a->heads_kv : 1), MR);
    const int64_t bk = round_up(a->block_k, NC), block = a->direct ? bk : 0;
    const size_t floats = rows_p * dkp + rows_p * dvp + 2 * rows_p + MR * bk + block * (dkp + dvp);
    float* mem = (float*)aligned_alloc(64, round_up(sizeof(float) * (floats + 7 * 16), 64));
    if (!mem) return NULL;  // the other threads take every task; the caller reports the shortfall
    Scratch sc;
    float* p = mem;
    auto take = [&p](int64_t n) {
        float* r = p;
        p += round_up(n, 16);
        return r;
    };
    sc.q = take(rows_p * dkp);
    sc.o = take(rows_p * dvp);
    sc.m = take(rows_p);
    sc.l = take(rows_p);
    sc.s = take(MR * bk);
    sc.k = take(block * dkp);
    sc.v = take(block * dvp);
    int64_t computed = 0, done = 0;
    for (;;) {
        const int64_t i = __atomic_fetch_add(&sh->next, 1, __ATOMIC_RELAXED);
        if (i >= sh->n_tasks) break;
        const Task* t = &sh->tasks[i];
        const Packed* pk = a->direct ? NULL : packed(sh, t->group);
        if (a->dtype == F16)
            computed += run_task<F16>(a, t, pk, &sc);
        else if (a->dtype == BF16)
            computed += run_task<BF16>(a, t, pk, &sc);
        else
            computed += run_task<F32>(a, t, pk, &sc);
        __atomic_fetch_sub(&sh->left[t->group], 1, __ATOMIC_RELEASE);
        done++;
    }
    __atomic_fetch_add(&a->computed, computed, __ATOMIC_RELAXED);
    __atomic_fetch_add(&sh->finished, done, __ATOMIC_RELAXED);
    free(mem);
    return NULL;
}

static int by_group_then_work(const void* x, const void* y) {
    const Task *a = (const Task*)x, *b = (const Task*)y;
    if (a->group != b->group) return a->group < b->group ? -1 : 1;
    return a->work < b->work ? 1 : (a->work > b->work ? -1 : 0);
}

// Returns 0, or -1 when memory ran out (the caller raises MemoryError).
EXPORT int aule_fa2_forward(Args* a) {
    a->computed = 0;
    const int64_t per = a->block_q, blocks = (a->len_q + per - 1) / per, groups = a->batch * a->heads_kv;
    const int64_t group = a->heads_q / a->heads_kv, nh = a->stack ? group : 1;
    const int64_t n = a->batch * (a->heads_q / nh) * blocks;
    if (n == 0) return 0;
    const int64_t workers = a->workers < n ? a->workers : n;
    // Slots for the packed K/V of the groups in flight: one per thread and one being packed ahead.
    const int64_t n_slots = a->direct ? 0 : (groups < workers + 1 ? groups : workers + 1);
    const int64_t dvp = round_up(a->dim_v > 0 ? a->dim_v : 1, W), lkp = round_up(a->len_k, NC);
    const int64_t slot_floats = round_up(lkp * a->dim_k, 16) + round_up(a->len_k * dvp, 16);
    Task* tasks = (Task*)malloc(sizeof(Task) * n);
    int64_t* counters = (int64_t*)calloc(2 * groups, sizeof(int64_t));
    Packed* slots = n_slots ? (Packed*)malloc(sizeof(Packed) * n_slots) : NULL;
    float* slot_mem = (float*)aligned_alloc(64, round_up(sizeof(float) * (slot_floats * n_slots + 16), 64));
    int rc = -1;
    if (tasks && counters && (slots || !n_slots) && slot_mem) {
        int64_t t = 0;
        for (int64_t b = 0; b < a->batch; b++)
            for (int64_t h = 0; h < a->heads_q; h += nh)
                for (int64_t i0 = 0; i0 < a->len_q; i0 += per) {
                    const int64_t i1 = i0 + per < a->len_q ? i0 + per : a->len_q;
                    int64_t work = 0;
                    for (int64_t i = i0; i < i1; i++) {
                        int64_t lo, hi;
                        row_range(a, i, &lo, &hi);
                        work += nh * (hi - lo);
                    }
                    tasks[t++] = Task{b, h, nh, i0, i1, work, b * a->heads_kv + h / group};
                }
        qsort(tasks, n, sizeof(Task), by_group_then_work);
        for (int64_t s = 0; s < n_slots; s++) {
            slots[s].kt = slot_mem + s * slot_floats;
            slots[s].v = slots[s].kt + round_up(lkp * a->dim_k, 16);
        }
        int64_t* left = counters + groups;
        for (int64_t i = 0; i < n; i++) left[tasks[i].group]++;
        Shared sh = {a, tasks, n, 0, counters, left, slots, n_slots, 0};
        pthread_t threads[256];
        int64_t started = 0;
        for (; started + 1 < workers && started < 256; started++)
            if (pthread_create(&threads[started], NULL, worker, &sh) != 0) break;
        worker(&sh);
        for (int64_t i = 0; i < started; i++) pthread_join(threads[i], NULL);
        rc = sh.finished == n ? 0 : -1;
    }
    free(tasks);
    free(counters);
    free(slots);
    free(slot_mem);
    return rc;
}

EXPORT int aule_fa2_vector_width(void) { return W; }

// The kernel's exponential on `n` floats (tests hold it to its error bound).
EXPORT void aule_fa2_exp2(const float* x, float* y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = exp2s(x[i]);
}
