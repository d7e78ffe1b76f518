// What the CPU kernels (fa2_forward.cpp, fa2_backward.cpp) share: the vector width's configuration, vector
// helpers, the exponential, storage conversions, the band, and the register-blocked micro-kernels.
//
// Built once per vector width (AULE_W floats: 16 for AVX-512, 8 for AVX2+FMA, 4 for SSE2 or NEON) by
// scripts/cpu_build.py. GCC/Clang vector extensions rather than intrinsics: the same code is every width's.
// No -ffast-math: the kernels' NaN and infinity handling needs IEEE comparisons; only contraction (FMA).

#pragma once

#include <math.h>
#if defined(__F16C__)
#include <immintrin.h>
#endif
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

static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

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

// tanh(x) as (1 - e) / (1 + e), e = 2**(-2|x| log2 e): within a few ulp of 1, absolutely (tests/conftest.py's
// TANH_ROUNDING); NaN stays NaN, +-inf gives +-1.
static inline vf tanhv(vf x) {
    const vf ax = x < 0.0f ? -x : x;
    const vf e = exp2v(ax * splat(-2.8853900817779268f));
    const vf t = (1.0f - e) / (1.0f + e);
    return x < 0.0f ? -t : t;
}

// The score modifiers of aule_kp/scoremods.py on one row of scores, in place: softcap * tanh(s / softcap)
// over columns [v0, v1) (whole vectors; 0: off), tanh itself into `t` when not NULL (the backward's
// derivative 1 - t^2), then minus `slope` * |key - (row + diag)| over the row's keys [lo, hi) (ALiBi;
// `key0`: column 0's key, `anchor`: row + diag).
static inline void modify_scores(float* row, int64_t v0, int64_t v1, float softcap, float* t, int64_t lo,
                                 int64_t hi, float slope, int64_t key0, int64_t anchor) {
    if (softcap != 0.0f) {
        const vf c = splat(softcap);
        for (int64_t j = v0; j < v1; j += W) {
            const vf th = tanhv(load(row + j) / c);
            if (t) store(t + j, th);
            store(row + j, th * c);
        }
    }
    if (slope != 0.0f)
        for (int64_t j = lo; j < hi; j++) {
            const int64_t d = key0 + j - anchor;
            row[j] -= slope * (float)(d < 0 ? -d : d);
        }
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

// Exact, and in integer arithmetic up to float32 normals: a subnormal half (mantissa m, value m * 2**-24) is the
// integer m converted and scaled, a normal one its fields moved into float32's with the exponent rebased by
// 127 - 15; inf and NaN keep their mantissa under an all-ones exponent. Scaling the fields as a float32
// subnormal instead would read 0 under the denormals-are-zero mode that torch.set_flush_denormal(True) sets
// and the kernel's threads inherit. Branch-free, so that conversion loops vectorise.
static inline float half_to_f32(uint16_t h) {
    const uint32_t fields = (uint32_t)(h & 0x7FFF) << 13, exponent = h & 0x7C00;
    const uint32_t normal_bits = fields + (112u << 23), special_bits = fields | 0x7F800000u;
    float normal, special;
    memcpy(&normal, &normal_bits, 4);
    memcpy(&special, &special_bits, 4);
    const float subnormal = (float)(int32_t)(h & 0x3FF) * 0x1p-24f;
    const float f = exponent == 0 ? subnormal : (exponent == 0x7C00 ? special : normal);
    uint32_t out;
    memcpy(&out, &f, 4);
    out |= (uint32_t)(h & 0x8000) << 16;
    float r;
    memcpy(&r, &out, 4);
    return r;
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

// `n` elements of storage type DT at `src` as float32 into `dst`, then zeros up to `padded`.
// With F16C (every AVX2 CPU has it) halves convert in hardware, exactly as above: 8 at a time, then one by one.
template <int DT>
static inline void convert_row(float* dst, const char* src, int64_t n, int64_t padded) {
    int64_t d = 0;
#if defined(__F16C__)
    if (DT == F16) {
        for (; d + 8 <= n; d += 8)
            _mm256_storeu_ps(dst + d, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(src + 2 * d))));
        for (; d < n; d++) dst[d] = _cvtsh_ss(((const uint16_t*)src)[d]);
    }
#endif
    for (; d < n; d++) dst[d] = element<DT>(src, d);
    for (d = n; d < padded; d++) dst[d] = 0.0f;
}

// Rows [c0, c0 + width) of one head (rows of `dim` elements, `row_stride` elements apart) as NC-row panels of
// their transpose, dst[panel][d][NC], rows past `width` up to the panel's end zero.
template <int DT>
static void pack_transposed(float* dst, const char* base, int64_t row_stride, int64_t c0, int64_t width,
                            int64_t dim) {
    const int64_t esz = DT == F32 ? 4 : 2, chunk = 64;
    float row[chunk];
    for (int64_t j = 0; j < round_up(width, NC); j++) {
        float* col = dst + (j / NC) * dim * NC + (j % NC);
        const char* src = base + esz * (c0 + j) * row_stride;
        for (int64_t d0 = 0; d0 < dim; d0 += chunk) {
            const int64_t n = dim - d0 < chunk ? dim - d0 : chunk;
            if (j < width)
                convert_row<DT>(row, src + esz * d0, n, n);
            else
                memset(row, 0, sizeof(float) * n);
            for (int64_t d = 0; d < n; d++) col[(d0 + d) * NC] = row[d];
        }
    }
}


// Keys [lo, hi) that query row i sees (the band clipped to the keys); `a` holds diag, left, right, len_k.
template <class A>
static inline void row_range(const A* a, int64_t i, int64_t* lo, int64_t* hi) {
    int64_t l = a->left < 0 ? 0 : i + a->diag - a->left;
    int64_t h = a->right < 0 ? a->len_k : i + a->diag + a->right + 1;
    *lo = l < 0 ? 0 : (l > a->len_k ? a->len_k : l);
    *hi = h < *lo ? *lo : (h > a->len_k ? a->len_k : h);
}

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

// o[MR rows][nv <= NVV vectors] += sum over k in [k0, k1) of a(row, k) * b[k][vectors], with a(row, k) at
// a[row * a_row + k * a_k] (so a transposed operand is a matter of strides), b rows of stride b_row and o rows
// of stride o_row. The forward's P.V and every product of the backward but the two score-like ones.
static inline void pv_panel(const float* a, int64_t a_row, int64_t a_k, const float* b, int64_t b_row,
                            int64_t o_row, int64_t k0, int64_t k1, float* o, int nv) {
    vf acc[MR][NVV];
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < NVV; c++) acc[r][c] = c < nv ? load(o + r * o_row + c * W) : splat(0.0f);
    if (nv == NVV) {
        for (int64_t k = k0; k < k1; k++) {
            vf vv[NVV];
            for (int c = 0; c < NVV; c++) vv[c] = load(b + k * b_row + c * W);
            for (int r = 0; r < MR; r++) {
                vf pb = splat(a[r * a_row + k * a_k]);
                for (int c = 0; c < NVV; c++) acc[r][c] += pb * vv[c];
            }
        }
    } else {
        for (int64_t k = k0; k < k1; k++) {
            for (int c = 0; c < nv; c++) {
                vf vv = load(b + k * b_row + c * W);
                for (int r = 0; r < MR; r++) acc[r][c] += splat(a[r * a_row + k * a_k]) * vv;
            }
        }
    }
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < nv; c++) store(o + r * o_row + c * W, acc[r][c]);
}

// Runs `work(arg)` on `workers` threads, this one included (pthreads; fewer if creating one fails).
static inline void run_threads(int64_t workers, void* (*work)(void*), void* arg) {
    pthread_t threads[256];
    int64_t started = 0;
    for (; started + 1 < workers && started < 256; started++)
        if (pthread_create(&threads[started], NULL, work, arg) != 0) break;
    work(arg);
    for (int64_t i = 0; i < started; i++) pthread_join(threads[i], NULL);
}
