// FlashAttention-2's forward pass on the CPU: the aule-kp CPU backend's native kernel.
//
// Built with fa2_backward.cpp into one library per vector width (fa2_common.h); aule_kp/cpu/native.py loads
// the widest build the CPU runs and calls `aule_fa2_forward` through ctypes (which releases the GIL for the
// whole call).
//
// A task is one block of query rows of one (batch, query head). K and V of each (batch, kv head) are packed once
// for all its tasks (K transposed in panels of NC keys, V in rows padded to whole vectors, both float32) into a
// few slots reused in turn. A task walks the key blocks its rows see and takes its rows MR at a time through
// three steps while their scores sit in L1: the score micro-kernel (MR rows x NC keys in registers), the online
// softmax (mask, band, row max, rescale, exp2, row sum) and the P.V micro-kernel (MR rows x up to NVV vectors
// of Dv). Each MR-row panel only computes the key panels its own rows see, so a causal diagonal costs a
// staircase of panels. With few query rows per kv head (decode) a task instead takes all the kv head's query
// heads and reads K and V rows as they are (`direct`): packing would cost more than the product. Threads
// (pthreads) take tasks from an atomic counter, by kv head and longest first. Scratch is per thread and the
// slots hold a few heads' K and V: extra memory O(Lk), never Lq x Lk.
//
// Non-finite scores follow aule_kp/nonfinite.py: the row max skips NaN (it reaches the row through the
// exponential and its sum), +inf becomes NaN against any shift, -inf gives a weight of 0; a row that sees
// no key gets out 0 and lse -inf. Hence no -ffast-math: only contraction (FMA) is allowed.

#include "fa2_common.h"

// ---- the call ---------------------------------------------------------------------------------------------

// Mirrors aule_kp/cpu/native.py's ctypes Structure field by field.
struct Args {
    const void *q, *k, *v;
    const float* mask;   // NULL: none
    const float* sinks;  // NULL, or one logit per query head: a key every row sees, with no value (gpt-oss)
    const float* alibi;  // NULL, or ALiBi slopes [1 or B, Hq] (alibi_batch: their batch stride, 0 or Hq)
    float* out;         // [B, Hq, Lq, Dv] float32, contiguous
    float* lse;         // [B, Hq, Lq]
    int64_t q_stride[3], k_stride[3], v_stride[3];  // elements per batch, head, position (last dim contiguous)
    int64_t mask_stride[4];                         // elements per batch, head, row, key; 0 broadcasts
    int64_t batch, heads_q, heads_kv, len_q, len_k, dim_k, dim_v;
    int64_t diag, left, right;  // row i sees keys [i + diag - left, i + diag + right]; left/right < 0: unbounded
    int64_t block_q, block_k, workers;
    // 1: a task takes all query heads of its kv head (rows head-major) and reads K and V rows as they are (few
    // rows per kv head: packing costs more than it saves); 0: a task takes one query head, K and V packed
    int64_t direct;
    int64_t computed;  // out: scores computed, padding included (tests check that hidden panels are skipped)
    int64_t slot_bytes;  // budget of the packed K/V slots
    int64_t alibi_batch;
    int32_t dtype;
    float scale;
    float softcap;  // 0: off
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

struct Scratch {
    float *q, *o, *m, *l, *s;
    float *k, *v;  // direct mode: a key block's K and V rows, converted and zero-padded
};

// Direct mode: rows [c0, c0 + width) of one head's K or V as float32 rows of whole vectors: in place where
// they already are (`in_place`; `*stride` their row stride), else converted into `buf` (stride `padded`).
template <int DT>
static const float* direct_rows(const char* base, int64_t row_stride, int64_t c0, int64_t width, int64_t n,
                                int64_t padded, bool in_place, float* buf, int64_t* stride) {
    if (in_place) {
        *stride = row_stride;
        return (const float*)base + c0 * row_stride;
    }
    const int64_t esz = DT == F32 ? 4 : 2;
    for (int64_t j = 0; j < width; j++) convert_row<DT>(buf + j * padded, base + esz * (c0 + j) * row_stride, n, padded);
    *stride = padded;
    return buf;
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
            convert_row<DT>(sc->q + r * dkp, src, dk, dkp);
            for (int64_t d = 0; d < dk; d++) sc->q[r * dkp + d] *= a->scale;
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
            kb = direct_rows<DT>(kbase, a->k_stride[2], c0, width, dk, dkp, k_in_place, sc->k, &kb_stride);
            vb = direct_rows<DT>(vbase, a->v_stride[2], c0, width, dv, dvp, v_in_place, sc->v, &vb_stride);
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
            if (a->direct)  // columns past the block keep stale scores: -inf below, as every key outside a row's range
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
                const float slope = a->alibi ? a->alibi[t->b * a->alibi_batch + head[r]] : 0.0f;
                modify_scores(row, j0, j1, a->softcap, NULL, lo, hi, slope, c0, pos[r] + a->diag);
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
                pv_panel(s, bk, 1, vb + d0, vb_stride, dvp, j0, j1 < width ? j1 : width, sc->o + r0 * dvp + d0, nv);
            }
        }
    }

    const float ln2 = 0.6931471805599453f;
    for (int64_t r = 0; r < rows; r++) {
        const int64_t row = (t->b * a->heads_q + t->h0 + r / npos) * a->len_q + t->i0 + r % npos;
        float* dst = a->out + row * dv;
        float* lse = a->lse + row;
        float total = sc->l[r], m = sc->m[r], factor = 1.0f;
        if (a->sinks) {  // the sink's term joins the row's sum; a row that saw no key gets 0 and lse = sink
            const float sink = a->sinks[t->h0 + r / npos], m_new = gt(m, sink);
            factor = exp2s((m - m_new) * log2e);  // m = -inf: 0
            total = total * factor + exp2s((sink - m_new) * log2e);
            m = m_new;
        }
        if (total == 0.0f) {
            for (int64_t d = 0; d < dv; d++) dst[d] = 0.0f;
            *lse = -INFINITY;
            continue;
        }
        const float inv = factor / total;
        for (int64_t d = 0; d < dv; d++) dst[d] = sc->o[r * dvp + d] * inv;
        *lse = m + log2f(total) * ln2;
    }
    return computed;
}

template <int DT>
static void pack_group(const Args* a, int64_t g, const Packed* pk) {
    const int64_t dk = a->dim_k, dv = a->dim_v, dvp = round_up(dv > 0 ? dv : 1, W), esz = DT == F32 ? 4 : 2;
    const int64_t b = g / a->heads_kv, h = g % a->heads_kv, lk = a->len_k;
    const char* kbase = (const char*)a->k + esz * (b * a->k_stride[0] + h * a->k_stride[1]);
    const char* vbase = (const char*)a->v + esz * (b * a->v_stride[0] + h * a->v_stride[1]);
    pack_transposed<DT>(pk->kt, kbase, a->k_stride[2], 0, lk, dk);
    for (int64_t j = 0; j < lk; j++) {
        const char* src = vbase + esz * j * a->v_stride[2];
        float* row = pk->v + j * dvp;
        convert_row<DT>(row, src, dv, dvp);
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
    const int64_t rows_p = round_up(a->block_q * (a->direct ? a->heads_q / a->heads_kv : 1), MR);
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
    const int64_t group = a->heads_q / a->heads_kv, nh = a->direct ? group : 1;
    const int64_t n = a->batch * (a->heads_q / nh) * blocks;
    if (n == 0) return 0;
    const int64_t workers = a->workers < n ? a->workers : n;
    // Slots for the packed K/V of the groups in flight: one per thread and one being packed ahead, as far as
    // slot_bytes allows (at least one: threads then wait for each other's groups, never for a later one).
    const int64_t dvp = round_up(a->dim_v > 0 ? a->dim_v : 1, W), lkp = round_up(a->len_k, NC);
    const int64_t slot_floats = round_up(lkp * a->dim_k, 16) + round_up(a->len_k * dvp, 16);
    int64_t n_slots = groups < workers + 1 ? groups : workers + 1;
    const int64_t affordable = a->slot_bytes / (int64_t)sizeof(float) / (slot_floats > 0 ? slot_floats : 1);
    n_slots = a->direct ? 0 : (n_slots < affordable ? n_slots : (affordable > 1 ? affordable : 1));
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
        run_threads(workers, worker, &sh);
        rc = sh.finished == n ? 0 : -1;
    }
    free(tasks);
    free(counters);
    free(slots);
    free(slot_mem);
    return rc;
}

EXPORT int aule_fa2_vector_width(void) { return W; }

// The argument structs' sizes: native.py refuses a build whose structs differ from its own (a stale library
// would read its fields at the wrong offsets).
EXPORT int64_t aule_fa2_forward_args_size(void) { return (int64_t)sizeof(Args); }

// The kernel's exponential on `n` floats (tests hold it to its error bound).
EXPORT void aule_fa2_exp2(const float* x, float* y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = exp2s(x[i]);
}
