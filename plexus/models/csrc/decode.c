/* One decoder layer's step for one new token, on the CPU: Plexus's fused decode kernel.
 *
 * Eager torch spends ~25 small ops per layer around the four matrix-vector products, each
 * dispatched cold after the weight stream has evicted the caches (docs/benchmarks.md). Here a
 * half-layer is one call: one OpenMP team streams the weights (a row at a time, in blocks of
 * rows the team's threads take as they come) and does the small work between the products in place.
 *
 * The arithmetic is the model's (plexus/model.py): RMSNorm, rotate-half RoPE from the model's
 * cos / signed-sin tables, grouped-query attention over the KV cache, SwiGLU. Built once a dtype by
 * plexus/kernels.py, which keeps the layout of the structs below in step with ctypes: for
 * float32 models, with PLEXUS_BF16 for bfloat16 ones and with PLEXUS_F16 for float16 ones, whose
 * weights and KV cache are stored (and streamed) as 16 bits and widened to float32 as they are
 * read; everything in between (the hidden state, activations, sums) is float32 in every build.
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime, sched_yield under -std=c11 */
#include <errno.h>
#include <math.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <omp.h>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

/* wt: how the model stores a number (weights, KV cache); wf widens one to float32, fw rounds a
 * float32 to it (to nearest, ties to even, as torch does) */
#if defined(PLEXUS_BF16)
typedef uint16_t wt; /* bfloat16: the top half of a float32 */
static inline float wf(wt v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline wt fw(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (wt)((u >> 16) | 0x40); /* NaN stays NaN */
    return (wt)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
#elif defined(PLEXUS_F16) && defined(__F16C__)
typedef uint16_t wt; /* float16, converted by the CPU (F16C) */
static inline float wf(wt v) { return _cvtsh_ss(v); }
static inline wt fw(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }
#elif defined(PLEXUS_F16)
typedef _Float16 wt; /* float16, converted by the compiler (GCC 12+, Clang) */
static inline float wf(wt v) { return (float)v; }
static inline wt fw(float f) { return (wt)f; }
#else
typedef float wt;
static inline float wf(wt v) { return v; }
static inline wt fw(float f) { return f; }
#endif

/* the 256-bit loops below: AVX2 and FMA, and for float16 the F16C conversion */
#if defined(__AVX2__) && defined(__FMA__) && (!defined(PLEXUS_F16) || defined(__F16C__))
#define VECTOR 1
#endif

/* Ranks of one node summing their partial outputs through a shared memory segment (made by
 * plexus/kernels.py): the allreduce after each half-layer without leaving the C call. The
 * segment holds one cache line per rank (its count of meetings reached, then its process id),
 * then two alternating sets of slots of n floats per rank: a rank can be at most one
 * reduction ahead of any other, so the set it writes was read by every rank before. Then the
 * logits of the whole vocabulary, where each rank writes its rows for rank 0 to take.
 *
 * Taking rows. Ranks stream at rates that wander (a core's neighbours, the memory controller),
 * so at each meeting the faster rank would wait for the slower one. Instead, a rank that has
 * finished its own rows takes the last rows of the next rank's row-parallel product (o_proj,
 * down_proj, LM head), from a copy of them it holds (Layer.o_tail, ...), and writes them into
 * that rank's slot. The rows are claimed in blocks of ROWS through a counter of the owner's
 * (its "claim" line), so each block is done once, by whoever gets to it first. The owner
 * publishes the input those rows need (its attention output or SwiGLU activation, in its "act"
 * area) and then the meeting number on its "ready" line; the taker reads neither before. */
typedef struct {
    char *base;
    long ranks, rank, n, stride; /* stride: floats per slot, a multiple of 16 */
    long seq;                    /* meetings (sums, gathers) this rank has reached */
    double timeout_s;            /* give up waiting for another rank after this long */
    int failed;                  /* 1: a rank stopped answering for timeout_s; 2: a rank's process is gone */
    float *logits;               /* in the segment: vocab floats */
    long vocab;
    char *lines;                 /* per rank: a "ready" line, then a "claim" line */
    float *act;                  /* per rank: act_stride floats */
    long act_stride;
    long taken;                  /* blocks of ROWS this rank has taken from the next (a count to show) */
    int leave_own_tail;          /* 1: leave this rank's own last rows to the previous rank (tests use it
                                  * to take rows whatever the ranks' speeds) */
} Group;

/* (Layer and Ends follow the dot product: their matrices are Mats, csrc/qdot.h) */

#define LINE 64
#if defined(__x86_64__) || defined(__i386__)
#define PAUSE() __builtin_ia32_pause() /* a spinning core leaves its resources to others */
#else
#define PAUSE() ((void)0)
#endif

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Wait until rank r's flag reaches value. Non-zero: rank r failed (and Group.failed says how). */
static int wait_for(Group *g, long r, _Atomic long *flag, long value) {
    double deadline = 0.0;
    for (long spins = 0; atomic_load_explicit(flag, memory_order_acquire) < value; spins++) {
        if (spins < 4096) {
            PAUSE();
            continue;
        }
        sched_yield(); /* ranks sharing cores (oversubscribed) let the others run */
        if ((spins & 1023) == 0) {
            double t = now_s();
            pid_t pid = (pid_t)((long *)(g->base + r * LINE))[1];
            if (pid > 0 && kill(pid, 0) != 0 && errno == ESRCH) return g->failed = 2;
            if (deadline == 0.0) deadline = t + g->timeout_s;
            else if (t > deadline) return g->failed = 1;
        }
    }
    return 0;
}

/* Say this rank has reached meeting number ++seq (what it wrote before is then visible to the
 * others), and wait until every rank has. Non-zero: a rank failed (Group.failed). */
static int meet(Group *g) {
    long seq = ++g->seq;
    atomic_store_explicit((_Atomic long *)(g->base + g->rank * LINE), seq, memory_order_release);
    for (long r = 0; r < g->ranks; r++)
        if (wait_for(g, r, (_Atomic long *)(g->base + r * LINE), seq)) return g->failed;
    return 0;
}

/* this rank's slot for the coming meeting: the set that meeting uses (alternating) */
static float *slot(const Group *g, long r) {
    return (float *)(g->base + g->ranks * LINE) + ((g->seq + 1) & 1) * g->ranks * g->stride + r * g->stride;
}

static _Atomic long *ready_line(const Group *g, long r) { return (_Atomic long *)(g->lines + 2 * r * LINE); }
static _Atomic long *claim_line(const Group *g, long r) { return (_Atomic long *)(g->lines + (2 * r + 1) * LINE); }

/* out = the sum of every rank's slot, in rank order (so every rank gets the same bits), once
 * every rank has met */
static int sum_slots(Group *g, float *out) {
    float *slots = slot(g, 0);
    if (meet(g)) return g->failed;
    for (long i = 0; i < g->n; i++) {
        float acc = slots[i];
        for (long r = 1; r < g->ranks; r++) acc += slots[r * g->stride + i];
        out[i] = acc;
    }
    return 0;
}

/* out = the sum of every rank's out */
static int group_allreduce(Group *g, float *out) {
    memcpy(slot(g, g->rank), out, g->n * sizeof(float));
    return sum_slots(g, out);
}

#define ROWS 8 /* rows per block: the unit a thread team splits and a node group's ranks claim */

/* w . x over k floats, one row streamed front to back. A row at a time in 256-bit steps with
 * four sums streams faster here than passes over 8 rows at once (8 streams per core) with
 * 512-bit loads: a whole decode step 1.22x as fast on one thread, 1.14x on two (AMD EPYC,
 * AVX-512; benchmarks/kernel_ab.py), most of it on the short rows of o_proj and down_proj. */
#if defined(VECTOR)
#if defined(PLEXUS_BF16) /* 8 weights at p as float32: bfloat16 widened by a 16-bit shift */
#define LOAD8(p) \
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
#elif defined(PLEXUS_F16)
#define LOAD8(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#else
#define LOAD8(p) _mm256_loadu_ps(p)
#endif

/* the sum of a's eight lanes */
static inline float sum8(__m256 a) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
#endif

static inline float dot(const wt *w, const float *x, long k) {
    long j = 0;
    float s = 0.0f;
#if defined(VECTOR)
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; j + 32 <= k; j += 32) {
        a0 = _mm256_fmadd_ps(LOAD8(w + j), _mm256_loadu_ps(x + j), a0);
        a1 = _mm256_fmadd_ps(LOAD8(w + j + 8), _mm256_loadu_ps(x + j + 8), a1);
        a2 = _mm256_fmadd_ps(LOAD8(w + j + 16), _mm256_loadu_ps(x + j + 16), a2);
        a3 = _mm256_fmadd_ps(LOAD8(w + j + 24), _mm256_loadu_ps(x + j + 24), a3);
    }
    for (; j + 8 <= k; j += 8) a0 = _mm256_fmadd_ps(LOAD8(w + j), _mm256_loadu_ps(x + j), a0);
    s = sum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#else
    float acc[8] = {0}; /* eight independent sums the compiler can keep in one vector */
    for (; j + 8 <= k; j += 8)
        for (int i = 0; i < 8; i++) acc[i] += wf(w[j + i]) * x[j + i];
    for (int i = 0; i < 8; i++) s += acc[i];
#endif
    for (; j < k; j++) s += wf(w[j]) * x[j];
    return s;
}

#include "qdot.h"

typedef struct {
    const wt *input_norm, *qkv_bias, *post_norm; /* qkv_bias may be NULL */
    Mat qkv, o, gate_up, down;  /* dense or quantized (csrc/qdot.h) */
    wt *k_cache, *v_cache;     /* this rank's KV heads' pools: (kv heads, kv_blocks, KV_BLOCK, head_dim) */
    const long *kv_of_q;       /* the local KV head each local query head reads */
    long num_heads, num_kv_heads, head_dim, hidden, intermediate, max_context, window; /* window 0: none */
    long kv_blocks;            /* blocks in each pool */
    float eps;
    /* Rows a waiting rank may take from the next rank of its node group (see Group): the last
     * tail_rows rows of that rank's o_proj and down_proj shards, copied here, and their widths
     * (that rank's attention width and intermediate share). tail_rows 0: nothing to take. */
    Mat o_tail, down_tail;
    long tail_rows, o_tail_cols, down_tail_cols;
} Layer;

/* The model's two ends, this rank's share: its vocabulary rows [first, first + rows) of the
 * embedding and of the LM head (the same memory when they are tied; either may be quantized),
 * and the final norm */
typedef struct {
    Mat embed;
    const wt *norm;
    Mat head;
    long first, rows, hidden;
    float eps;
    long own_tail;         /* this rank's last own_tail rows may be taken by the previous rank */
    Mat head_tail;          /* the next rank's last tail_rows LM-head rows, vocabulary rows from tail_first */
    long tail_first, tail_rows;
} Ends;

typedef struct {
    float *normed;   /* hidden */
    float *qkv;      /* (num_heads + 2 num_kv_heads) head_dim */
    float *attn;     /* num_heads head_dim */
    float *scores;   /* num_heads max_context */
    float *gate_up;  /* 2 intermediate */
} Scratch;


/* floats prep_row needs for an input of k to W */
static long prep_floats(const Mat *W, long k) {
    long G = W->bits ? mat_groups(W, k) : 0, ks = mat_k(W, k);
    return G + (W->perm ? ks : 0) + (mat_a8(W, k) ? 2 * G + (ks + 3) / 4 : 0);
}

/* What PREPARE_X makes of x, in ``mem``: the input to multiply by (x permuted for act-order),
 * its group sums, its 8-bit form */
static const float *prep_row(const Mat *W, const float *x, long k, float *mem, XPrep *P) {
    long G = W->bits ? mat_groups(W, k) : 0, ks = mat_k(W, k);
    int a8 = mat_a8(W, k);
    float *xs = mem;
    mem += G;
    if (W->perm) {
        for (long j = 0; j < ks; j++) mem[j] = W->perm[j] < 0 ? 0.0f : x[W->perm[j]];
        x = mem;
        mem += ks;
    }
    group_sums(W, x, xs, ks);
    P->xs = xs;
    P->x8 = NULL;
    P->dx = P->xc = NULL;
    if (a8) {
        float *dx = mem, *xc = mem + G;
        int8_t *x8 = (int8_t *)(mem + 2 * G);
        quantize_x(x, x8, dx, xc, ks, W->group);
        P->x8 = x8;
        P->dx = dx;
        P->xc = xc;
    }
    return x;
}

/* What every product over x with a matrix W needs first, made by each thread in its own stack
 * (k additions and roundings, against n * k multiply-adds): x permuted to W's stored column
 * order (act-order; a stored column with perm < 0 is padding and reads 0), x's group sums, and
 * for --int8-activations x in 8 bits. Declares ``XPrep P`` (and the arrays it points into) in the
 * caller's scope; may repoint x, and sets k to the stored columns. */
#define PREPARE_X(W, x, k, P)                                                                   \
    float prep_[prep_floats(W, k) + 1];                                                        \
    XPrep P;                                                                                   \
    (x) = prep_row(W, x, k, prep_, &P);                                                        \
    (k) = mat_k(W, k)

/* y[r] = W[r] . x (+ b[r]) for rows r in [r, end); xs: x's group sums (quantized W) */
static void matvec_rows(const Mat *W, const wt *b, const float *x, const XPrep *xs, float *y, long r, long end,
                        long k) {
    for (; r < end; r++) y[r] = mat_dot(W, r, x, xs, k) + (b ? wf(b[r]) : 0.0f);
}

/* the same for block c of ROWS rows, the last block of n rows cut short */
static void matvec_block(const Mat *W, const wt *b, const float *x, const XPrep *xs, float *y, long c, long n,
                         long k) {
    long end = (c + 1) * ROWS;
    matvec_rows(W, b, x, xs, y, c * ROWS, end > n ? n : end, k);
}

/* the same for this thread's share of rows [0, n), in blocks of ROWS handed out as the team's
 * threads come for them (guided: large blocks first), so a thread that streams faster does
 * more rather than waiting at the next barrier: 1.02-1.03x a step at world size 1 against an
 * even split (benchmarks/kernel_ab.py). No wait at the end: callers pass a barrier before
 * reading y. */
static void matvec_part(const Mat *W, const wt *b, const float *x, float *y, long n, long k) {
    PREPARE_X(W, x, k, P);
    if (omp_get_num_threads() == 1) {
        matvec_rows(W, b, x, &P, y, 0, n, k);
        return;
    }
    long blocks = (n + ROWS - 1) / ROWS;
#pragma omp for schedule(guided) nowait
    for (long c = 0; c < blocks; c++) matvec_block(W, b, x, &P, y, c, n, k);
}

/* y = W x for n rows in blocks of ROWS claimed from *claim, which others may be claiming from
 * too: each block is done once, by whoever claims it */
static long matvec_claimed(_Atomic long *claim, const Mat *W, const float *x, float *y, long n, long k) {
    long blocks = (n + ROWS - 1) / ROWS, done = 0;
    PREPARE_X(W, x, k, P);
    for (long b; (b = atomic_fetch_add_explicit(claim, 1, memory_order_relaxed)) < blocks; done++)
        matvec_block(W, NULL, x, &P, y, b, n, k);
    return done;
}

/* The row-parallel product of a half (o_proj, down_proj) or the LM head, in a node group that
 * takes rows: y = W x into this rank's part of the segment, the last ``own_tail`` rows claimed
 * against the previous rank; then the next rank's last rows (``tail``, ``tail_rows`` of them with
 * ``tail_cols`` columns; its input at ``tail_x``, NULL: the same x as ours) into ``tail_y``.
 * Called by every thread of the team; ``x`` already published (see Group). */
static void matvec_shared(Group *g, const Mat *W, const float *x, float *y, long n, long k, long own_tail,
                          const Mat *tail, const float *tail_x, float *tail_y, long tail_rows, long tail_cols) {
    long next = (g->rank + 1) % g->ranks;
    matvec_part(W, NULL, x, y, n - own_tail, k);
    if (own_tail && !g->leave_own_tail) {
        Mat rest = mat_from(W, n - own_tail, k);
        matvec_claimed(claim_line(g, g->rank), &rest, x, y + n - own_tail, own_tail, k);
    }
    if (!tail_rows) return;
#pragma omp single
    wait_for(g, next, ready_line(g, next), g->seq + 1); /* its input and claim counter are set */
    if (g->failed) return;
    long done = matvec_claimed(claim_line(g, next), tail, tail_x ? tail_x : x, tail_y, tail_rows, tail_cols);
    if (done) __atomic_fetch_add(&g->taken, done, __ATOMIC_RELAXED);
}

/* Before a product others may take rows of: restart this rank's claim counter, then say its
 * input is in place (the team has passed a barrier since writing it) */
static void publish(Group *g) {
    atomic_store_explicit(claim_line(g, g->rank), 0, memory_order_relaxed);
    atomic_store_explicit(ready_line(g, g->rank), g->seq + 1, memory_order_release);
}

static void add_into(float *x, const float *y, long n) {
#pragma omp simd
    for (long i = 0; i < n; i++) x[i] += y[i];
}

static void rms_norm(const float *x, const wt *w, float *out, long n, float eps) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (long i = 0; i < n; i++) ss += x[i] * x[i];
    float inv = 1.0f / sqrtf(ss / (float)n + eps);
#pragma omp simd
    for (long i = 0; i < n; i++) out[i] = wf(w[i]) * (x[i] * inv);
}

/* x*cos + rotate_half(x)*sin, in place, for one head; sin carries rotate-half's sign */
static void rope(float *x, const float *cos, const float *sin, long d) {
    long h = d / 2;
    for (long i = 0; i < h; i++) {
        float a = x[i], b = x[i + h];
        x[i] = a * cos[i] + b * sin[i];
        x[i + h] = b * cos[i + h] + a * sin[i + h];
    }
}

/* The KV cache is paged: a layer's K (and V) pool is (kv heads, nb blocks, KV_BLOCK, head_dim), and a
 * sequence's block table lists the blocks that hold its positions, KV_BLOCK at a time (position p
 * is row p % KV_BLOCK of block table[p / KV_BLOCK]). Any block may serve any sequence, so the
 * cache is counted in tokens, not in sequences times their longest context. */
#define KV_BLOCK 16
long plexus_kv_block(void) { return KV_BLOCK; }

/* the rows of KV head kv in the block holding a sequence's positions b KV_BLOCK .. (nb: blocks in
 * the pool) */
static inline const wt *kv_block(const wt *pool, const long *table, long b, long kv, long nb, long d) {
    return pool + (kv * nb + table[b]) * KV_BLOCK * d;
}

/* How far ahead (in positions) the attention loops ask for the KV cache rows they will read: they
 * come from memory (the weights streamed since evicted them), and with the hardware's prefetch
 * alone the attention phase took 5-10% longer (timed inside the call; 8 and 32 no better). One
 * block: the row AHEAD positions on is the same row of the next block. */
#define AHEAD KV_BLOCK

/* out[0, d) = scale * sum over positions p in lo..pos of w[p] * V[p], V head kv's rows through the
 * block table: in 64-float strips down all the rows (then 8-float ones), the sums held in
 * registers: eight independent chains of multiply-adds, enough to keep both FMA units busy (four
 * left half their time idle, and the plain loop kept the sums in memory, each position waiting on
 * the last one's stores). Each sum runs through the positions in order, block after block: the
 * same bits wherever the blocks lie. */
static void weighted_rows(const wt *pool, const long *table, long kv, long nb, const float *w, float *out, long lo,
                          long pos, long d, float scale) {
    long j = 0, first = lo / KV_BLOCK, last = pos / KV_BLOCK;
#if defined(VECTOR)
    __m256 sc = _mm256_set1_ps(scale);
    for (; j + 64 <= d; j += 64) {
        __m256 a[8];
        for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
        for (long b = first; b <= last; b++) {
            const wt *V = kv_block(pool, table, b, kv, nb, d), *next = b < last ? kv_block(pool, table, b + 1, kv, nb, d) : NULL;
            long p0 = b * KV_BLOCK, from = lo > p0 ? lo - p0 : 0, to = pos - p0 < KV_BLOCK ? pos - p0 + 1 : KV_BLOCK;
            for (long p = from; p < to; p++) {
                __m256 wp = _mm256_set1_ps(w[p0 + p]);
                const wt *v = V + p * d + j;
                if (next && p0 + KV_BLOCK + p <= pos)
                    for (long c = 0; c < 64 * (long)sizeof(wt); c += 64)
                        _mm_prefetch((const char *)(next + p * d + j) + c, _MM_HINT_T0);
                for (int i = 0; i < 8; i++) a[i] = _mm256_fmadd_ps(wp, LOAD8(v + 8 * i), a[i]);
            }
        }
        for (int i = 0; i < 8; i++) _mm256_storeu_ps(out + j + 8 * i, _mm256_mul_ps(a[i], sc));
    }
    for (; j + 8 <= d; j += 8) {
        __m256 a = _mm256_setzero_ps();
        for (long p = lo; p <= pos; p++) {
            const wt *V = kv_block(pool, table, p / KV_BLOCK, kv, nb, d);
            a = _mm256_fmadd_ps(_mm256_set1_ps(w[p]), LOAD8(V + (p % KV_BLOCK) * d + j), a);
        }
        _mm256_storeu_ps(out + j, _mm256_mul_ps(a, sc));
    }
#endif
    if (j == d) return;
    for (long i = j; i < d; i++) out[i] = 0.0f;
    for (long p = lo; p <= pos; p++) {
        const wt *V = kv_block(pool, table, p / KV_BLOCK, kv, nb, d) + (p % KV_BLOCK) * d;
        for (long i = j; i < d; i++) out[i] += w[p] * wf(V[i]);
    }
    for (long i = j; i < d; i++) out[i] *= scale;
}

#if defined(VECTOR)
/* e^x in eight lanes: x = n ln2 + r with |r| <= ln2/2, e^r by Cephes' expf polynomial, times 2^n
 * built in the exponent bits: within 1.5 ulp of e^x over [-87, 88]. Below -87.7 it gives 0,
 * above 88.37 e^88.37 (expf: denormals, inf); NaN stays NaN. Against expf one value at a time,
 * 8-13% of the attention phase (timed inside the call). */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), _mm256_max_ps(_mm256_set1_ps(-88.3762626647949f), x));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x); /* ln2 in two parts: n*hi is exact */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

/* s[i] = e^(s[i] - mx) for i in [lo, hi); returns their sum */
static float exp_shifted(float *s, long lo, long hi, float mx) {
    long p = lo;
    float sum = 0.0f;
#if defined(VECTOR)
    __m256 acc = _mm256_setzero_ps(), m = _mm256_set1_ps(mx);
    for (; p + 8 <= hi; p += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + p), m));
        _mm256_storeu_ps(s + p, e);
        acc = _mm256_add_ps(acc, e);
    }
    sum = sum8(acc);
#endif
    for (; p < hi; p++) {
        s[p] = expf(s[p] - mx);
        sum += s[p];
    }
    return sum;
}

/* act[i] = silu(gate[i]) * up[i] for i in [lo, hi) */
static void swiglu(const float *gate, const float *up, float *act, long lo, long hi) {
    long i = lo;
#if defined(VECTOR)
    for (; i + 8 <= hi; i += 8) {
        __m256 g = _mm256_loadu_ps(gate + i);
        __m256 sig = _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g)));
        _mm256_storeu_ps(act + i, _mm256_mul_ps(_mm256_div_ps(g, sig), _mm256_loadu_ps(up + i)));
    }
#endif
    for (; i < hi; i++) act[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

#if defined(VECTOR)
/* lane i: the sum of a[i]'s eight lanes */
static inline __m256 sum_lanes8(const __m256 *a) {
    __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    /* u0's lanes i and i + 4 (i < 4): the sums of a[i]'s low and high halves; u1's: of a[4 + i]'s */
    __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#endif

/* s[p] = scale * K[p] . q for the rows p in [lo, hi) of one block (K its row 0); returns their
 * maximum. next: the next block's rows (NULL: none), asked for AHEAD positions early. Eight positions at
 * a time where d is a multiple of 8: one sum per position down the row, the eight summed across
 * together at the end, rather than four per position summed across on its own */
static float scores(const wt *K, const wt *next, const float *q, float *s, long lo, long hi, long d, float scale) {
    long p = lo;
    float mx = -INFINITY;
#if defined(VECTOR)
    if (d % 8 == 0) {
        __m256 sc = _mm256_set1_ps(scale), m = _mm256_set1_ps(-INFINITY);
        for (; p + 8 <= hi; p += 8) {
            if (next) { /* the rows AHEAD positions on, on their way while these are summed */
                const char *f = (const char *)(next + p * d);
                for (long b = 0; b < 8 * d * (long)sizeof(wt); b += 64) _mm_prefetch(f + b, _MM_HINT_T0);
            }
            __m256 a[8];
            for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
            for (long j = 0; j < d; j += 8) {
                __m256 qj = _mm256_loadu_ps(q + j);
                for (int i = 0; i < 8; i++) a[i] = _mm256_fmadd_ps(LOAD8(K + (p + i) * d + j), qj, a[i]);
            }
            __m256 v = _mm256_mul_ps(sum_lanes8(a), sc);
            _mm256_storeu_ps(s + p, v);
            m = _mm256_max_ps(m, v);
        }
        float lanes[8];
        _mm256_storeu_ps(lanes, m);
        for (int i = 0; i < 8; i++) mx = lanes[i] > mx ? lanes[i] : mx;
    }
#endif
    for (; p < hi; p++) {
        s[p] = dot(K + p * d, q, d) * scale;
        if (s[p] > mx) mx = s[p];
    }
    return mx;
}

/* softmax(q K^T / sqrt(d)) V over cached positions lo..pos, for one query head reading KV head kv
 * through the sequence's block table (nb: blocks in the pools) */
static void attend(const float *q, const wt *K, const wt *V, const long *table, long kv, long nb, float *s,
                   float *out, long lo, long pos, long d) {
    float mx = -INFINITY, scale = 1.0f / sqrtf((float)d);
    for (long b = lo / KV_BLOCK, last = pos / KV_BLOCK; b <= last; b++) {
        long p0 = b * KV_BLOCK, from = lo > p0 ? lo - p0 : 0, to = pos - p0 < KV_BLOCK ? pos - p0 + 1 : KV_BLOCK;
        const wt *next = b < last ? kv_block(K, table, b + 1, kv, nb, d) : NULL; /* a prefetch never faults */
        float m = scores(kv_block(K, table, b, kv, nb, d), next, q, s + p0, from, to, d, scale);
        mx = m > mx ? m : mx;
    }
    float sum = exp_shifted(s, lo, pos + 1, mx);
    weighted_rows(V, table, kv, nb, s, out, lo, pos, d, 1.0f / sum);
}

/* where position pos of KV head kv goes in a layer's K (or V) pool */
static inline wt *kv_slot(wt *pool, const long *table, long pos, long kv, long nb, long d) {
    return pool + ((kv * nb + table[pos / KV_BLOCK]) * KV_BLOCK + pos % KV_BLOCK) * d;
}

/* The two ends of a half-layer, called by every thread of its team (orphaned OpenMP directives).
 * First, on one thread: x += out (the previous half's summed output) when ``before``, then the
 * half's RMSNorm of x into S->normed; the team waits for it */
static void start_half(const Layer *L, const wt *norm, const Scratch *S, float *x, const float *out,
                       int before) {
#pragma omp single
    {
        if (before) add_into(x, out, L->hidden);
        rms_norm(x, norm, S->normed, L->hidden, L->eps);
    }
}

/* last, without a group: x += out */
static void finish_half(float *x, const float *out, long n) {
#pragma omp for
    for (long i = 0; i < n; i++) x[i] += out[i];
}

/* last, in a node group: out = the sum of the ranks' slots, then x += out */
static void finish_shared(Group *g, float *x, float *out, long n) {
#pragma omp barrier
#pragma omp single
    if (!g->failed) sum_slots(g, out);
    if (!g->failed) finish_half(x, out, n);
}

/* x += out first when ``before`` (the previous half's allreduced output); then
 * out = o_proj(attention(input_norm(x))), this rank's partial sum; when ``after``, out is summed
 * over the node group's ranks (if there is a group: then ``after`` is 1) and added to x */
void plexus_attention(const Layer *L, const Scratch *S, float *x, float *out, long pos, const long *table,
                      const float *cos, const float *sin, int before, int after, Group *g, int threads) {
    long d = L->head_dim, nq = L->num_heads, nk = L->num_kv_heads, T = L->max_context;
    long lo = L->window > 0 && pos + 1 > L->window ? pos + 1 - L->window : 0;
    long next = g ? (g->rank + 1) % g->ranks : 0;
    float *attn = g ? g->act + g->rank * g->act_stride : S->attn; /* in the segment for a taker */
#pragma omp parallel num_threads(threads)
    {
        start_half(L, L->input_norm, S, x, out, before);
        matvec_part(&L->qkv, L->qkv_bias, S->normed, S->qkv, (nq + 2 * nk) * d, L->hidden);
#pragma omp barrier
#pragma omp for
        for (long h = 0; h < nq + nk; h++) {
            float *head = S->qkv + h * d;
            rope(head, cos, sin, d);
            if (h >= nq) { /* a KV head: store its k and v at pos */
                long kv = h - nq;
                wt *kc = kv_slot(L->k_cache, table, pos, kv, L->kv_blocks, d);
                wt *vc = kv_slot(L->v_cache, table, pos, kv, L->kv_blocks, d);
                const float *v = S->qkv + (nq + nk + kv) * d;
                for (long i = 0; i < d; i++) {
                    kc[i] = fw(head[i]);
                    vc[i] = fw(v[i]);
                }
            }
        }
#pragma omp for
        for (long h = 0; h < nq; h++) {
            long kv = L->kv_of_q[h];
            attend(S->qkv + h * d, L->k_cache, L->v_cache, table, kv, L->kv_blocks, S->scores + h * T, attn + h * d, lo,
                   pos, d);
        }
        if (g) {
#pragma omp single nowait
            publish(g);
            matvec_shared(g, &L->o, attn, slot(g, g->rank), L->hidden, nq * d, L->tail_rows, &L->o_tail,
                          g->act + next * g->act_stride, slot(g, next) + L->hidden - L->tail_rows, L->tail_rows,
                          L->o_tail_cols);
            finish_shared(g, x, out, L->hidden);
        } else {
            matvec_part(&L->o, NULL, attn, out, L->hidden, nq * d);
            if (after) {
#pragma omp barrier
                finish_half(x, out, L->hidden);
            }
        }
    }
}

/* the same for the MLP: out = down(silu(gate(n)) * up(n)) with n = post_norm(x) */
void plexus_mlp(const Layer *L, const Scratch *S, float *x, float *out, int before, int after, Group *g,
                int threads) {
    long m = L->intermediate, next = g ? (g->rank + 1) % g->ranks : 0;
    float *act = g ? g->act + g->rank * g->act_stride : S->gate_up; /* in the segment for a taker */
#pragma omp parallel num_threads(threads)
    {
        start_half(L, L->post_norm, S, x, out, before);
        matvec_part(&L->gate_up, NULL, S->normed, S->gate_up, 2 * m, L->hidden);
#pragma omp barrier
#pragma omp for
        for (long c = 0; c < (m + 63) / 64; c++) /* 64 at a time: whole vectors but the last */
            swiglu(S->gate_up, S->gate_up + m, act, c * 64, (c + 1) * 64 < m ? (c + 1) * 64 : m);
        if (g) {
#pragma omp single nowait
            publish(g);
            matvec_shared(g, &L->down, act, slot(g, g->rank), L->hidden, m, L->tail_rows, &L->down_tail,
                          g->act + next * g->act_stride, slot(g, next) + L->hidden - L->tail_rows, L->tail_rows,
                          L->down_tail_cols);
            finish_shared(g, x, out, L->hidden);
        } else {
            matvec_part(&L->down, NULL, act, out, L->hidden, m);
            if (after) {
#pragma omp barrier
                finish_half(x, out, L->hidden);
            }
        }
    }
}

/* Every layer, both halves, residuals added, x updated in place: a world of one rank (g NULL)
 * or the ranks of one node (g their group). Non-zero: the group failed (Group.failed). */
static int layers_step(const Layer *layers, long n, const Scratch *S, float *x, float *out, long pos,
                       const long *table, const float *cos, const float *sin, Group *g, int threads) {
    for (long i = 0; i < n; i++) {
        plexus_attention(layers + i, S, x, out, pos, table, cos, sin, 0, 1, g, threads);
        if (g && g->failed) return g->failed;
        plexus_mlp(layers + i, S, x, out, 0, 1, g, threads);
        if (g && g->failed) return g->failed;
    }
    return 0;
}

/* logits = this rank's rows of the LM head times the final norm of x */
void plexus_head(const Ends *E, const Scratch *S, const float *x, float *logits, int threads) {
#pragma omp parallel num_threads(threads)
    {
#pragma omp single
        rms_norm(x, E->norm, S->normed, E->hidden, E->eps);
        matvec_part(&E->head, NULL, S->normed, logits, E->rows, E->hidden);
    }
}

/* the same in a node group, into the segment's logits, rows taken as in the halves */
static void head_shared(const Ends *E, const Scratch *S, const float *x, Group *g, int threads) {
#pragma omp parallel num_threads(threads)
    {
#pragma omp single
        {
            rms_norm(x, E->norm, S->normed, E->hidden, E->eps); /* the same bits on every rank */
            publish(g);
        }
        matvec_shared(g, &E->head, S->normed, g->logits + E->first, E->rows, E->hidden, E->own_tail, &E->head_tail,
                      NULL, g->logits + E->tail_first, E->tail_rows, E->hidden);
    }
}

/* A whole decode step for one token, for a world of one rank (g NULL) or the ranks of one node:
 * its embedding (this rank's row of it or zeros, summed over the group), every layer, then the
 * logits, which every rank of a group writes into the segment for rank 0 to copy into
 * ``logits`` (NULL on the other ranks). x: the hidden state (scratch). Non-zero: the group
 * failed (Group.failed). */
int plexus_step(const Layer *layers, long n, const Ends *E, const Scratch *S, long token, float *x, float *out,
                float *logits, long pos, const long *table, const float *cos, const float *sin, Group *g, int threads) {
    long row = token - E->first;
    if (row >= 0 && row < E->rows) mat_row(&E->embed, row, E->hidden, x);
    else memset(x, 0, E->hidden * sizeof(float));
    if (g && group_allreduce(g, x)) return g->failed;
    int failed = layers_step(layers, n, S, x, out, pos, table, cos, sin, g, threads);
    if (failed) return failed;
    if (!g) {
        plexus_head(E, S, x, logits, threads);
        return 0;
    }
    head_shared(E, S, x, g, threads);
    if (g->failed || meet(g)) return g->failed; /* every rank's rows are in; a rank writes the next step's only
                                      after rank 0 has met it at that step's embedding sum */
    if (logits) memcpy(logits, g->logits, g->vocab * sizeof(float));
    return 0;
}

/* y = W x, for the bandwidth probe: the same streaming loop the layers use */
void plexus_matvec(const wt *W, const float *x, float *y, long n, long k, int threads) {
    Mat M = dense(W);
#pragma omp parallel num_threads(threads)
    matvec_part(&M, NULL, x, y, n, k);
}

/* out (n, k) = a quantized W's rows, dequantized to the build's dtype (w = scale * code + min in
 * float32, then rounded once): the torch path's prefill multiplies by it, one layer at a time */
void plexus_dequant(const uint8_t *q, const float *s, const float *m, long bits, long group, wt *out, long n,
                    long k, int threads) {
    Mat M = {NULL, q, s, m, bits, group, NULL, 0, 0}; /* act-order weights are dequantized by torch */
    long G = mat_groups(&M, k), rb = mat_row_bytes(&M, k);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < n; r++) {
        const uint8_t *qr = q + r * rb;
        const float *sr = s + r * G, *mr = m + r * G;
        wt *o = out + r * k;
        for (long g = 0; g < G; g++) {
            long a = g * group, b = a + group < k ? a + group : k;
            float sc = sr[g], mn = mr[g];
#if defined(VECTOR)
            __m256 vs = _mm256_set1_ps(sc), vm = _mm256_set1_ps(mn);
            if (bits == 8)
                for (; a + 8 <= b; a += 8)
                    store8(o + a, _mm256_fmadd_ps(vs, CVT8(_mm_loadl_epi64((const __m128i *)(qr + a))), vm));
            else
                for (; a + 32 <= b; a += 32) {
                    __m128i c = _mm_loadu_si128((const __m128i *)(qr + a / 2)), low = _mm_set1_epi8(0x0f);
                    __m128i lo = _mm_and_si128(c, low), hi = _mm_and_si128(_mm_srli_epi16(c, 4), low);
                    store8(o + a, _mm256_fmadd_ps(vs, CVT8(lo), vm));
                    store8(o + a + 8, _mm256_fmadd_ps(vs, CVT8(_mm_srli_si128(lo, 8)), vm));
                    store8(o + a + 16, _mm256_fmadd_ps(vs, CVT8(hi), vm));
                    store8(o + a + 24, _mm256_fmadd_ps(vs, CVT8(_mm_srli_si128(hi, 8)), vm));
                }
#endif
            if (bits == 8)
                for (long j = a; j < b; j++) o[j] = fw(sc * (float)qr[j] + mn);
            else
                for (long j = a; j < b; j++) o[j] = fw(sc * (float)code4(qr, j) + mn);
        }
    }
}

/* y = W x for a quantized W (codes, scales, mins as in csrc/qdot.h), for the probe and tests */
void plexus_qmatvec(const uint8_t *q, const float *s, const float *m, long bits, long group, const int64_t *perm,
                    long ks, long act8, const float *x, float *y, long n, long k, int threads) {
    Mat M = {NULL, q, s, m, bits, group, perm, ks, act8};
#pragma omp parallel num_threads(threads)
    matvec_part(&M, NULL, x, y, n, k);
}

#include "rows.h" /* several sequences' decode steps over one weight stream */
