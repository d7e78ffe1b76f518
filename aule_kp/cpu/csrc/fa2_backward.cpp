// FlashAttention-2's backward pass on the CPU: dQ, dK, dV (and a float mask's gradient) from the forward's saved
// log-sum-exp, the aule-kp CPU backend's native kernel for training calls (aule_kp/cpu/native.py).
//
// A task is one key range of one (batch, kv head). Per key block it packs K transposed (panels of NC keys, for
// the scores), K as rows (for dQ) and V transposed (for dP), then walks every query row block of the kv head's
// query heads that sees the block: it packs the rows' scaled q and dO, each row's lse and D = rowsum(dO o O),
// and computes, on the register-blocked micro-kernels of fa2_common.h,
//
//     S = q K^T (+ mask)    P = exp(S - lse), 0 outside the band    dP = dO V^T    dS = P o (dP - D)
//     dV += P^T dO          dK += dS^T q (q scaled)                  dQ += scale dS K
//
// dK and dV of the block stay in the task's accumulators until its last row block; dQ goes to the task's own
// partial (one per key range of a kv head, summed in range order by the caller), so every sum has a fixed
// order whatever the thread timing: two calls give bit-identical gradients. Scratch is per thread and
// independent of the sequence length. Non-finite values propagate as IEEE arithmetic gives (a NaN in a row
// of q makes that row's dQ and every dK row it sees NaN); a row that saw no key (lse -inf) contributes 0.

#include "fa2_common.h"

// Mirrors aule_kp/cpu/native.py's ctypes Structure field by field.
struct BwdArgs {
    const void *q, *k, *v, *out, *dout;
    const float* lse;    // [B, Hq, Lq] float32, contiguous
    const float* mask;   // NULL: none
    const float* alibi;  // NULL, or ALiBi slopes [1 or B, Hq] (alibi_batch: their batch stride, 0 or Hq)
    float* dq_parts;     // [parts, B, Hq, Lq, Dk] float32, zeroed by the caller
    float *dk, *dv;      // [B, Hkv, Lk, Dk] and [B, Hkv, Lk, Dv] float32
    float* dmask;        // NULL, or float32 [B, Hq, Lq or 1, Lk] (summed over the rows when their stride is 0)
    int64_t q_stride[3], k_stride[3], v_stride[3], o_stride[3], do_stride[3];  // elements per batch, head, row
    int64_t mask_stride[4], dmask_stride[4];                                   // 0 broadcasts
    int64_t batch, heads_q, heads_kv, len_q, len_k, dim_k, dim_v;
    int64_t diag, left, right;  // as the forward's
    int64_t block_q, block_k, parts, workers, alibi_batch;
    int32_t dtype;
    float scale;
    float softcap;  // 0: off
};

struct BwdTask {
    int64_t b, kvh, part, k0, k1, work;
};

struct BwdScratch {
    float *kt, *kr, *vt;      // the key block: K transposed in panels, K rows, V transposed in panels
    float *dk, *dv;           // its gradients' accumulators
    float *q, *dout;          // a row block's scaled q and dO rows
    float *lse, *delta;       // per row
    float *p, *ds;            // [rows][ps]: S then P; dP then dS
    float* dq;                // [rows][dkp]: the row block's dQ from this key block
    float* orow;              // one row of O, converted
    float* tanh;              // one row's tanh(s / softcap)
};

struct BwdShared {
    BwdArgs* a;
    BwdTask* tasks;
    int64_t n_tasks, next, finished;  // next, finished: atomic
};

// One key range of one (batch, kv head): its dK and dV rows, and its part of dQ.
template <int DT>
static void run_bwd_task(const BwdArgs* a, const BwdTask* t, BwdScratch* sc) {
    const int64_t dk = a->dim_k, dv = a->dim_v, dkp = round_up(dk > 0 ? dk : 1, W), dvp = round_up(dv > 0 ? dv : 1, W);
    const int64_t esz = DT == F32 ? 4 : 2, group = a->heads_q / a->heads_kv;
    const int64_t bk = round_up(a->block_k, NC), br = a->block_q, brp = round_up(br, MR);
    // P and dS rows hold MR zero columns past the keys: dK and dV take keys MR at a time, past the block's end.
    const int64_t ps = bk + MR;
    const float log2e = 1.4426950408889634f;
    const char* kbase = (const char*)a->k + esz * (t->b * a->k_stride[0] + t->kvh * a->k_stride[1]);
    const char* vbase = (const char*)a->v + esz * (t->b * a->v_stride[0] + t->kvh * a->v_stride[1]);

    for (int64_t c0 = t->k0; c0 < t->k1; c0 += bk) {
        const int64_t c1 = c0 + bk < t->k1 ? c0 + bk : t->k1, width = c1 - c0, wp = round_up(width, NC);
        pack_transposed<DT>(sc->kt, kbase, a->k_stride[2], c0, width, dk);
        pack_transposed<DT>(sc->vt, vbase, a->v_stride[2], c0, width, dv);
        for (int64_t j = 0; j < wp; j++) {
            if (j < width)
                convert_row<DT>(sc->kr + j * dkp, kbase + esz * (c0 + j) * a->k_stride[2], dk, dkp);
            else
                memset(sc->kr + j * dkp, 0, sizeof(float) * dkp);
        }
        memset(sc->dk, 0, sizeof(float) * (wp + MR) * dkp);
        memset(sc->dv, 0, sizeof(float) * (wp + MR) * dvp);

        // The query rows that see a key of the block: both ends of a row's band grow with the row.
        int64_t i_lo = 0, i_hi = a->len_q;
        while (i_lo < i_hi) {
            int64_t lo, hi;
            row_range(a, i_lo, &lo, &hi);
            if (hi > c0 && lo < c1 && lo < hi) break;
            if (lo >= c1) {
                i_lo = i_hi;
                break;
            }
            i_lo++;
        }
        while (i_hi > i_lo) {
            int64_t lo, hi;
            row_range(a, i_hi - 1, &lo, &hi);
            if (lo < c1 && hi > c0 && lo < hi) break;
            i_hi--;
        }
        for (int64_t h = t->kvh * group; h < (t->kvh + 1) * group; h++) {
            const int64_t bh = t->b * a->heads_q + h;
            const char* qbase = (const char*)a->q + esz * (t->b * a->q_stride[0] + h * a->q_stride[1]);
            const char* obase = (const char*)a->out + esz * (t->b * a->o_stride[0] + h * a->o_stride[1]);
            const char* dobase = (const char*)a->dout + esz * (t->b * a->do_stride[0] + h * a->do_stride[1]);
            for (int64_t i0 = i_lo; i0 < i_hi; i0 += br) {
                const int64_t i1 = i0 + br < i_hi ? i0 + br : i_hi, rows = i1 - i0;
                // Rows: scaled q, dO, lse and D (padding rows zero, lse -inf: they weigh nothing).
                memset(sc->q, 0, sizeof(float) * brp * dkp);
                memset(sc->dout, 0, sizeof(float) * brp * dvp);
                for (int64_t r = 0; r < brp; r++) {
                    sc->lse[r] = -INFINITY;
                    sc->delta[r] = 0.0f;
                    if (r >= rows) continue;
                    const int64_t i = i0 + r;
                    const char* qs = qbase + esz * i * a->q_stride[2];
                    convert_row<DT>(sc->q + r * dkp, qs, dk, dkp);
                    for (int64_t d = 0; d < dk; d++) sc->q[r * dkp + d] *= a->scale;
                    convert_row<DT>(sc->dout + r * dvp, dobase + esz * i * a->do_stride[2], dv, dvp);
                    convert_row<DT>(sc->orow, obase + esz * i * a->o_stride[2], dv, dvp);
                    float delta = 0.0f;
                    for (int64_t d = 0; d < dv; d++) delta += sc->dout[r * dvp + d] * sc->orow[d];
                    sc->delta[r] = delta;
                    sc->lse[r] = a->lse[bh * a->len_q + i];
                }
                // S and dP, then P and dS in place.
                for (int64_t r0 = 0; r0 < brp; r0 += MR)
                    for (int64_t j = 0; j < wp; j += NC) {
                        scores_panel(sc->q + r0 * dkp, dkp, dk, sc->kt + j * dk, sc->p + r0 * ps + j, ps);
                        scores_panel(sc->dout + r0 * dvp, dvp, dv, sc->vt + j * dv, sc->ds + r0 * ps + j, ps);
                    }
                const vf l2e = splat(log2e);
                for (int64_t r = 0; r < brp; r++) {
                    float *prow = sc->p + r * ps, *dsrow = sc->ds + r * ps;
                    int64_t lo = 0, hi = 0;
                    const float lse = sc->lse[r];
                    if (r < rows && lse != -INFINITY) {
                        row_range(a, i0 + r, &lo, &hi);
                        lo = (lo > c0 ? lo : c0) - c0;
                        hi = (hi < c1 ? hi : c1) - c0;
                    }
                    memset(prow + wp, 0, sizeof(float) * MR);
                    memset(dsrow + wp, 0, sizeof(float) * MR);
                    if (lo >= hi) {  // a padding row, a row that saw no key, or one that sees none here
                        memset(prow, 0, sizeof(float) * wp);
                        memset(dsrow, 0, sizeof(float) * wp);
                        continue;
                    }
                    const float slope = a->alibi ? a->alibi[t->b * a->alibi_batch + h] : 0.0f;
                    modify_scores(prow, 0, wp, a->softcap, sc->tanh, lo, hi, slope, c0, i0 + r + a->diag);
                    if (a->mask) {
                        const float* mrow = a->mask + t->b * a->mask_stride[0] + h * a->mask_stride[1] +
                                            (i0 + r) * a->mask_stride[2];
                        for (int64_t j = lo; j < hi; j++) prow[j] += mrow[(c0 + j) * a->mask_stride[3]];
                    }
                    for (int64_t j = 0; j < lo; j++) prow[j] = -INFINITY;
                    for (int64_t j = hi; j < wp; j++) prow[j] = -INFINITY;
                    const vf sh = splat(lse), dl = splat(sc->delta[r]);
                    for (int64_t j = 0; j < wp; j += W) {
                        // S - lse is <= 0 but for rounding (exp2v's range); NaN stays NaN.
                        const vf x = (load(prow + j) - sh) * l2e;
                        const vf pj = exp2v(x > 0.0f ? 0.0f : x);
                        store(prow + j, pj);
                        // A key of weight 0 (masked with -inf) has dS 0 even where its v, so its dP, is NaN.
                        store(dsrow + j, pj == 0.0f ? 0.0f : pj * (load(dsrow + j) - dl));
                    }
                    // Keys outside the row's band: dS 0 whatever their dP.
                    for (int64_t j = 0; j < lo; j++) dsrow[j] = 0.0f;
                    for (int64_t j = hi; j < wp; j++) dsrow[j] = 0.0f;
                    if (a->dmask) {
                        float* grow = a->dmask + t->b * a->dmask_stride[0] + h * a->dmask_stride[1] +
                                      (i0 + r) * a->dmask_stride[2];
                        for (int64_t j = lo; j < hi; j++) grow[(c0 + j) * a->dmask_stride[3]] += dsrow[j];
                    }
                    if (a->softcap != 0.0f)  // through the cap: dS (1 - tanh^2), after the mask's gradient
                        for (int64_t j = lo; j < hi; j++) dsrow[j] *= 1.0f - sc->tanh[j] * sc->tanh[j];
                }
                // dV += P^T dO and dK += dS^T q over the block's keys, MR keys at a time.
                for (int64_t j = 0; j < wp; j += MR) {
                    for (int64_t d0 = 0; d0 < dvp; d0 += NVV * W) {
                        const int nv = (int)((dvp - d0) / W < NVV ? (dvp - d0) / W : NVV);
                        pv_panel(sc->p + j, 1, ps, sc->dout + d0, dvp, dvp, 0, brp, sc->dv + j * dvp + d0, nv);
                    }
                    for (int64_t d0 = 0; d0 < dkp; d0 += NVV * W) {
                        const int nv = (int)((dkp - d0) / W < NVV ? (dkp - d0) / W : NVV);
                        pv_panel(sc->ds + j, 1, ps, sc->q + d0, dkp, dkp, 0, brp, sc->dk + j * dkp + d0, nv);
                    }
                }
                // dQ of these rows from this block: dS K, into the task's partial.
                memset(sc->dq, 0, sizeof(float) * brp * dkp);
                for (int64_t r0 = 0; r0 < brp; r0 += MR)
                    for (int64_t d0 = 0; d0 < dkp; d0 += NVV * W) {
                        const int nv = (int)((dkp - d0) / W < NVV ? (dkp - d0) / W : NVV);
                        pv_panel(sc->ds + r0 * ps, ps, 1, sc->kr + d0, dkp, dkp, 0, width, sc->dq + r0 * dkp + d0, nv);
                    }
                float* part = a->dq_parts + ((t->part * a->batch * a->heads_q + bh) * a->len_q + i0) * dk;
                for (int64_t r = 0; r < rows; r++)
                    for (int64_t d = 0; d < dk; d++) part[r * dk + d] += a->scale * sc->dq[r * dkp + d];
            }
        }
        float* dkout = a->dk + ((t->b * a->heads_kv + t->kvh) * a->len_k + c0) * dk;
        float* dvout = a->dv + ((t->b * a->heads_kv + t->kvh) * a->len_k + c0) * dv;
        for (int64_t j = 0; j < width; j++) {
            memcpy(dkout + j * dk, sc->dk + j * dkp, sizeof(float) * dk);
            memcpy(dvout + j * dv, sc->dv + j * dvp, sizeof(float) * dv);
        }
    }
}

static void* bwd_worker(void* arg) {
    BwdShared* sh = (BwdShared*)arg;
    BwdArgs* a = sh->a;
    const int64_t dkp = round_up(a->dim_k > 0 ? a->dim_k : 1, W), dvp = round_up(a->dim_v > 0 ? a->dim_v : 1, W);
    const int64_t bk = round_up(a->block_k, NC), brp = round_up(a->block_q, MR), ps = bk + MR;
    const int64_t sizes[] = {bk * dkp, bk * dkp, bk * dvp, ps * dkp, ps * dvp, brp * dkp, brp * dvp,
                             brp, brp, brp * ps, brp * ps, brp * dkp, dvp, ps};
    int64_t floats = 0;
    for (int64_t n : sizes) floats += round_up(n, 16);
    float* mem = (float*)aligned_alloc(64, sizeof(float) * floats);
    if (!mem) return NULL;  // the other threads take every task; the caller reports a shortfall
    float* p = mem;
    BwdScratch sc;
    float** fields[] = {&sc.kt, &sc.kr, &sc.vt, &sc.dk, &sc.dv, &sc.q, &sc.dout, &sc.lse, &sc.delta, &sc.p, &sc.ds,
                        &sc.dq, &sc.orow, &sc.tanh};
    for (int f = 0; f < 14; f++) {
        *fields[f] = p;
        p += round_up(sizes[f], 16);
    }
    int64_t done = 0;
    for (;;) {
        const int64_t i = __atomic_fetch_add(&sh->next, 1, __ATOMIC_RELAXED);
        if (i >= sh->n_tasks) break;
        if (a->dtype == F16)
            run_bwd_task<F16>(a, &sh->tasks[i], &sc);
        else if (a->dtype == BF16)
            run_bwd_task<BF16>(a, &sh->tasks[i], &sc);
        else
            run_bwd_task<F32>(a, &sh->tasks[i], &sc);
        done++;
    }
    __atomic_fetch_add(&sh->finished, done, __ATOMIC_RELAXED);
    free(mem);
    return NULL;
}

static int by_bwd_work(const void* x, const void* y) {
    int64_t a = ((const BwdTask*)x)->work, b = ((const BwdTask*)y)->work;
    return a < b ? 1 : (a > b ? -1 : 0);
}

// Returns 0, or -1 when memory ran out (the caller raises MemoryError).
EXPORT int aule_fa2_backward(BwdArgs* a) {
    const int64_t parts = a->parts, n = a->batch * a->heads_kv * parts;
    if (n == 0 || a->len_k == 0) return 0;
    BwdTask* tasks = (BwdTask*)malloc(sizeof(BwdTask) * n);
    if (!tasks) return -1;
    // Key ranges of whole NC panels, as even as that allows; work: the (row, key) pairs the band lets through.
    const int64_t panels = (a->len_k + NC - 1) / NC;
    int64_t t = 0;
    for (int64_t b = 0; b < a->batch; b++)
        for (int64_t h = 0; h < a->heads_kv; h++)
            for (int64_t part = 0; part < parts; part++) {
                int64_t k0 = panels * part / parts * NC, k1 = panels * (part + 1) / parts * NC;
                k0 = k0 < a->len_k ? k0 : a->len_k;
                k1 = k1 < a->len_k ? k1 : a->len_k;
                int64_t work = 0;
                for (int64_t i = 0; i < a->len_q; i++) {
                    int64_t lo, hi;
                    row_range(a, i, &lo, &hi);
                    lo = lo > k0 ? lo : k0;
                    hi = hi < k1 ? hi : k1;
                    work += hi > lo ? hi - lo : 0;
                }
                tasks[t++] = BwdTask{b, h, part, k0, k1, work};
            }
    qsort(tasks, n, sizeof(BwdTask), by_bwd_work);
    BwdShared sh = {a, tasks, n, 0, 0};
    run_threads(a->workers < n ? a->workers : n, bwd_worker, &sh);
    free(tasks);
    return sh.finished == n ? 0 : -1;
}

EXPORT int64_t aule_fa2_backward_args_size(void) { return (int64_t)sizeof(BwdArgs); }
