/* Decode steps of several sequences at once (continuous batching), included at the end of
 * decode.c: one row per sequence, each with its own token, position and KV block table, and one
 * stream of the weights for all of them (a weight row, read from memory once, is multiplied into
 * every sequence's input while it is in the cache).
 *
 * Batch invariance: each row's arithmetic is that of plexus_step for its sequence alone -- the
 * same mat_dot per (weight row, sequence), the same preparation of each input (prep_row is
 * PREPARE_X's), the same attend, norms, RoPE and SwiGLU -- so a sequence's logits are bitwise the
 * same whatever else is in the batch, and the same as stepping it alone. On several ranks the
 * caller sums each half's partial outputs between plexus_rows_half calls (in rank order). */

typedef struct {
    long token, pos;
    const long *table; /* the sequence's KV blocks (decode.c, KV_BLOCK) */
} Row;

/* Where the rows' activations live: x, out, normed (rows, hidden); qkv (rows, (nq + 2 nk) d); attn
 * (rows, nq d); gate_up (rows, 2 intermediate); scores (threads, max_context) */
typedef struct {
    float *x, *out, *normed, *qkv, *attn, *gate_up, *scores;
} RowScratch;

#if defined(VECTOR)
/* dot(w, x[t], k) for four inputs at once: each input's four sums, tail and total are dot()'s,
 * in dot()'s order (the same bits); the weights are loaded and widened once for the four, so a
 * dense weight row costs a quarter of the widening and loads per input */
static inline void dot4(const wt *w, const float *const *x, long k, float *out) {
    __m256 a[4][4];
    for (int t = 0; t < 4; t++)
        for (int i = 0; i < 4; i++) a[t][i] = _mm256_setzero_ps();
    long j = 0;
    for (; j + 32 <= k; j += 32) {
        __m256 w0 = LOAD8(w + j), w1 = LOAD8(w + j + 8), w2 = LOAD8(w + j + 16), w3 = LOAD8(w + j + 24);
        for (int t = 0; t < 4; t++) {
            a[t][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x[t] + j), a[t][0]);
            a[t][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x[t] + j + 8), a[t][1]);
            a[t][2] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(x[t] + j + 16), a[t][2]);
            a[t][3] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(x[t] + j + 24), a[t][3]);
        }
    }
    for (; j + 8 <= k; j += 8) {
        __m256 w0 = LOAD8(w + j);
        for (int t = 0; t < 4; t++) a[t][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x[t] + j), a[t][0]);
    }
    for (int t = 0; t < 4; t++) {
        float s = sum8(_mm256_add_ps(_mm256_add_ps(a[t][0], a[t][1]), _mm256_add_ps(a[t][2], a[t][3])));
        for (long i = j; i < k; i++) s += wf(w[i]) * x[t][i];
        out[t] = s;
    }
}
#endif

/* one weight row r into every row's output: dense rows four inputs at a time (dot4) */
static inline void row_into_all(const Mat *W, const wt *b, const float *const *xr, const XPrep *P, float *Y,
                                long ldy, long r, long k, long nrows) {
    float bias = b ? wf(b[r]) : 0.0f;
    long t = 0;
#if defined(VECTOR)
    if (!W->bits)
        for (float d4[4]; t + 4 <= nrows; t += 4) {
            dot4(W->w + r * k, xr + t, k, d4);
            for (int i = 0; i < 4; i++) Y[(t + i) * ldy + r] = d4[i] + bias;
        }
#endif
    for (; t < nrows; t++) Y[t * ldy + r] = mat_dot(W, r, xr[t], &P[t], k) + bias;
}

/* Y[t] = W X[t] (+ b) for rows t < nrows (X[t] at X + t ldx, Y[t] at Y + t ldy), this thread's
 * share of W's n rows in blocks of ROWS, each weight row multiplied into every X[t] in turn.
 * Non-zero where this thread's preparation memory could not be had. */
static int matvec_part_rows(const Mat *W, const wt *b, const float *X, long ldx, float *Y, long ldy, long n,
                            long k, long nrows) {
    long per = prep_floats(W, k), ks = mat_k(W, k);
    float *mem = per ? malloc((size_t)(nrows * per) * sizeof(float)) : NULL;
    int failed = per && !mem;
    const float *xr[nrows];
    XPrep P[nrows];
    for (long t = 0; t < nrows && !failed; t++) xr[t] = prep_row(W, X + t * ldx, k, per ? mem + t * per : NULL, &P[t]);
    long blocks = (n + ROWS - 1) / ROWS;
#pragma omp for schedule(guided) nowait
    for (long c = 0; c < blocks; c++) {
        if (failed) continue;
        long end = (c + 1) * ROWS < n ? (c + 1) * ROWS : n;
        for (long r = c * ROWS; r < end; r++) row_into_all(W, b, xr, P, Y, ldy, r, ks, nrows);
    }
    free(mem);
    return failed;
}

static void norm_rows(const wt *w, const float *X, float *out, long nrows, long n, float eps) {
#pragma omp for
    for (long t = 0; t < nrows; t++) rms_norm(X + t * n, w, out + t * n, n, eps);
}

/* x[t] += out[t] for every row, after the team's barrier */
static void add_rows(float *X, const float *OUT, long n) {
#pragma omp barrier
#pragma omp for
    for (long i = 0; i < n; i++) X[i] += OUT[i];
}

/* attention for every row; this rank's o_proj output in S->out, added to x when ``add`` (one rank) */
static int attention_rows(const Layer *L, const RowScratch *S, const Row *rows, long nrows, const float *cos,
                          const float *sin, long rope_row, int add) {
    long d = L->head_dim, nq = L->num_heads, nk = L->num_kv_heads, T = L->max_context, h = L->hidden;
    long nqkv = (nq + 2 * nk) * d;
    norm_rows(L->input_norm, S->x, S->normed, nrows, h, L->eps);
    int failed = matvec_part_rows(&L->qkv, L->qkv_bias, S->normed, h, S->qkv, nqkv, nqkv, h, nrows);
#pragma omp barrier
#pragma omp for collapse(2)
    for (long t = 0; t < nrows; t++)
        for (long j = 0; j < nq + nk; j++) {
            long pos = rows[t].pos;
            float *head = S->qkv + t * nqkv + j * d;
            rope(head, cos + pos * rope_row, sin + pos * rope_row, d);
            if (j >= nq) { /* a KV head: store its k and v at pos, in the row's blocks */
                long kv = j - nq;
                wt *kc = kv_slot(L->k_cache, rows[t].table, pos, kv, L->kv_blocks, d);
                wt *vc = kv_slot(L->v_cache, rows[t].table, pos, kv, L->kv_blocks, d);
                const float *v = S->qkv + t * nqkv + (nq + nk + kv) * d;
                for (long i = 0; i < d; i++) {
                    kc[i] = fw(head[i]);
                    vc[i] = fw(v[i]);
                }
            }
        }
#pragma omp for collapse(2)
    for (long t = 0; t < nrows; t++)
        for (long j = 0; j < nq; j++) {
            long pos = rows[t].pos, kv = L->kv_of_q[j];
            long lo = L->window > 0 && pos + 1 > L->window ? pos + 1 - L->window : 0;
            attend(S->qkv + t * nqkv + j * d, L->k_cache, L->v_cache, rows[t].table, kv, L->kv_blocks,
                   S->scores + omp_get_thread_num() * T, S->attn + (t * nq + j) * d, lo, pos, d);
        }
    failed |= matvec_part_rows(&L->o, NULL, S->attn, nq * d, S->out, h, h, nq * d, nrows);
    if (add) add_rows(S->x, S->out, nrows * h);
    return failed;
}

/* the MLP for every row, the same way */
static int mlp_rows(const Layer *L, const RowScratch *S, long nrows, int add) {
    long m = L->intermediate, h = L->hidden;
    norm_rows(L->post_norm, S->x, S->normed, nrows, h, L->eps);
    int failed = matvec_part_rows(&L->gate_up, NULL, S->normed, h, S->gate_up, 2 * m, 2 * m, h, nrows);
#pragma omp barrier
    long chunks = (m + 63) / 64;
#pragma omp for collapse(2)
    for (long t = 0; t < nrows; t++)
        for (long c = 0; c < chunks; c++) { /* in place, as plexus_mlp without a group */
            float *gu = S->gate_up + t * 2 * m;
            swiglu(gu, gu + m, gu, c * 64, (c + 1) * 64 < m ? (c + 1) * 64 : m);
        }
    failed |= matvec_part_rows(&L->down, NULL, S->gate_up, 2 * m, S->out, h, h, m, nrows);
    if (add) add_rows(S->x, S->out, nrows * h);
    return failed;
}

/* each row's embedding: this rank's row of the table, or zeros (summed over the ranks) */
static void embed_rows(const Ends *E, const RowScratch *S, const Row *rows, long nrows) {
    long h = E->hidden;
    for (long t = 0; t < nrows; t++) {
        long row = rows[t].token - E->first;
        if (row >= 0 && row < E->rows) mat_row(&E->embed, row, h, S->x + t * h);
        else memset(S->x + t * h, 0, h * sizeof(float));
    }
}

/* One decode step of ``nrows`` sequences (world size 1): logits (nrows, E->rows). cos, sin: the
 * RoPE tables' row 0, rope_row floats a position. Non-zero: memory for the inputs' preparation
 * could not be had (the logits are then not valid). */
int plexus_step_rows(const Layer *layers, long n, const Ends *E, const RowScratch *S, const Row *rows, long nrows,
                     float *logits, const float *cos, const float *sin, long rope_row, int threads) {
    long h = E->hidden;
    int failed = 0;
    embed_rows(E, S, rows, nrows);
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        for (long i = 0; i < n; i++) {
            failed |= attention_rows(layers + i, S, rows, nrows, cos, sin, rope_row, 1);
            failed |= mlp_rows(layers + i, S, nrows, 1);
        }
        norm_rows(E->norm, S->x, S->normed, nrows, h, E->eps);
        failed |= matvec_part_rows(&E->head, NULL, S->normed, h, logits, E->rows, E->rows, h, nrows);
    }
    return failed;
}

/* Several ranks (the caller sums between the pieces, in rank order, so each row's sums are the
 * same whatever the other rows): the rows' embeddings (this rank's share) into S->x ... */
void plexus_rows_embed(const Ends *E, const RowScratch *S, const Row *rows, long nrows) { embed_rows(E, S, rows, nrows); }

/* ... one half of layer L (``mlp``: the MLP, else attention), this rank's partial sum into S->out;
 * ``before``: first x += S->out, the previous half's sum ... */
int plexus_rows_half(const Layer *L, const RowScratch *S, const Row *rows, long nrows, int mlp, int before,
                     const float *cos, const float *sin, long rope_row, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        if (before) add_rows(S->x, S->out, nrows * L->hidden);
        failed = mlp ? mlp_rows(L, S, nrows, 0) : attention_rows(L, S, rows, nrows, cos, sin, rope_row, 0);
    }
    return failed;
}

/* ... and, after x += S->out, this rank's rows of the LM head: logits (nrows, E->rows) */
int plexus_rows_head(const Ends *E, const RowScratch *S, long nrows, float *logits, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        add_rows(S->x, S->out, nrows * E->hidden);
        norm_rows(E->norm, S->x, S->normed, nrows, E->hidden, E->eps);
        failed = matvec_part_rows(&E->head, NULL, S->normed, E->hidden, logits, E->rows, E->rows, E->hidden, nrows);
    }
    return failed;
}

/* A prompt chunk's attention (the torch path runs the rest of the chunk): query rows t < T at
 * positions start + t, each query head over the sequence's cached positions lo..start + t through
 * its block table (the chunk's own keys and values already stored). q, out: (T, num_heads,
 * head_dim) float32; scores: threads x max_context floats. Reading the blocks where they lie,
 * with no gather of the sequence's cache, and each position's arithmetic that of a decode step. */
void plexus_attend_chunk(const Layer *L, const float *q, float *out, const long *table, long start, long T,
                         float *scores, int threads) {
    long d = L->head_dim, nq = L->num_heads;
#pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(threads)
    for (long t = 0; t < T; t++)
        for (long j = 0; j < nq; j++) {
            long pos = start + t, lo = L->window > 0 && pos + 1 > L->window ? pos + 1 - L->window : 0;
            attend(q + (t * nq + j) * d, L->k_cache, L->v_cache, table, L->kv_of_q[j], L->kv_blocks,
                   scores + omp_get_thread_num() * L->max_context, out + (t * nq + j) * d, lo, pos, d);
        }
}
