/* Matrices for the decode kernel: dense (of the build's wt) or quantized to 4 or 8 bits, the
 * layout of plexus/quant/qweight.py: per row and group of ``group`` input columns,
 * w = scale * code + min. Included by decode.c after dot(), sum8() and VECTOR.
 *
 * A quantized dot product never writes a dequantized weight to memory: codes are widened to
 * float32 in registers and multiplied into per-group partial sums; the mins multiply the
 * group's sum of x (``xs``, computed once per matrix-vector product, not per row):
 *     w . x = sum_g scale_g * (codes_g . x_g) + sum_g min_g * sum(x_g)
 */

typedef struct {
    const wt *w;          /* bits 0: dense rows of k */
    const uint8_t *q;     /* bits 8: rows of k codes; bits 4: rows of ceil(k / 32) blocks of 16 bytes */
    const float *s, *m;   /* (rows, groups): scale and min */
    long bits, group;
    const int64_t *perm;  /* act-order: stored column j is input column perm[j] (< 0: reads x as 0); NULL: in order */
    long ks;              /* with perm: the stored columns, k or more (a row-parallel slice pads each group's run) */
    long act8;            /* 1: multiply by x rounded to 8 bits a group (integer dot products, see qdot_a8) */
} Mat;

/* the columns a row of M stores, for an input of k */
static inline long mat_k(const Mat *M, long k) { return M->perm ? M->ks : k; }

static inline long mat_groups(const Mat *M, long k) { return M->bits ? (mat_k(M, k) + M->group - 1) / M->group : 0; }

static inline long mat_row_bytes(const Mat *M, long k) {
    k = mat_k(M, k);
    return M->bits == 8 ? k : (k + 31) / 32 * 16;
}

/* the same matrix from row r on */
static inline Mat mat_from(const Mat *M, long r, long k) {
    Mat o = *M;
    if (!M->bits) {
        o.w = M->w + r * k;
        return o;
    }
    long G = mat_groups(M, k);
    o.q = M->q + r * mat_row_bytes(M, k);
    o.s = M->s + r * G;
    o.m = M->m + r * G;
    return o;
}

static inline Mat dense(const wt *w) {
    Mat o = {w, NULL, NULL, NULL, 0, 0, NULL, 0, 0};
    return o;
}

/* xs[g] = the sum of x over group g (quantized matrices; nothing for dense ones) */
static void group_sums(const Mat *M, const float *x, float *xs, long k) {
    for (long g = 0, G = mat_groups(M, k); g < G; g++) {
        long a = g * M->group, b = a + M->group < k ? a + M->group : k;
        float s = 0.0f;
        for (long j = a; j < b; j++) s += x[j];
        xs[g] = s;
    }
}

/* code i (from 0) of a 4-bit row: block i / 32, byte i % 16 of it, low nibble for i % 32 < 16 */
static inline int code4(const uint8_t *q, long i) {
    uint8_t b = q[(i >> 5) * 16 + (i & 15)];
    return (i & 16) ? b >> 4 : b & 15;
}

/* x = row r of M (k columns, not permuted), each weight in the build's dtype as the torch path
 * has it (a quantized one dequantized in float32, then rounded once): an embedding lookup */
static void mat_row(const Mat *M, long r, long k, float *x) {
    Mat o = mat_from(M, r, k);
    for (long i = 0; i < k; i++) {
        if (!M->bits) {
            x[i] = wf(o.w[i]);
            continue;
        }
        long g = i / M->group;
        x[i] = wf(fw(o.s[g] * (float)(M->bits == 8 ? o.q[i] : code4(o.q, i)) + o.m[g]));
    }
}

/* codes[a, b) . x[a, b) of one row, the scalar way (the tails the vector loops leave) */
static inline float codes_dot_scalar(const uint8_t *q, long bits, const float *x, long a, long b) {
    float s = 0.0f;
    for (long j = a; j < b; j++) s += (float)(bits == 8 ? q[j] : code4(q, j)) * x[j];
    return s;
}

#if defined(VECTOR)
#ifndef QAHEAD
#define QAHEAD 2048 /* bytes of codes asked for ahead of the loads: 1.2-1.3x the GB/s at 2 threads */
#endif
#define CVT8(v) _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))

/* o[0, 8) = v in the build's dtype, rounded to nearest even as fw() does */
static inline void store8(wt *o, __m256 v) {
#if defined(PLEXUS_BF16)
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
    _mm_storeu_si128((__m128i *)o, packed);
#elif defined(PLEXUS_F16)
    _mm_storeu_si128((__m128i *)o, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
#else
    _mm256_storeu_ps(o, v);
#endif
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && !defined(PLEXUS_NO_AVX512)
/* 16 codes (bytes at p) as float32 */
#define CVT16(v) _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v))
static inline float sum16(__m512 a) { return _mm512_reduce_add_ps(a); }

/* codes[a, b) . x[a, b) for 8-bit codes, a group, b - a a multiple of 16 left to the caller */
static inline __m512 group8(const uint8_t *q, const float *x, long a, long b, long *end) {
    __m512 p0 = _mm512_setzero_ps(), p1 = p0, p2 = p0, p3 = p0;
    long j = a;
    for (; j + 64 <= b; j += 64) {
        p0 = _mm512_fmadd_ps(CVT16(_mm_loadu_si128((const __m128i *)(q + j))), _mm512_loadu_ps(x + j), p0);
        p1 = _mm512_fmadd_ps(CVT16(_mm_loadu_si128((const __m128i *)(q + j + 16))), _mm512_loadu_ps(x + j + 16), p1);
        p2 = _mm512_fmadd_ps(CVT16(_mm_loadu_si128((const __m128i *)(q + j + 32))), _mm512_loadu_ps(x + j + 32), p2);
        p3 = _mm512_fmadd_ps(CVT16(_mm_loadu_si128((const __m128i *)(q + j + 48))), _mm512_loadu_ps(x + j + 48), p3);
    }
    for (; j + 16 <= b; j += 16)
        p0 = _mm512_fmadd_ps(CVT16(_mm_loadu_si128((const __m128i *)(q + j))), _mm512_loadu_ps(x + j), p0);
    *end = j;
    return _mm512_add_ps(_mm512_add_ps(p0, p1), _mm512_add_ps(p2, p3));
}

/* the same for 4-bit codes, whole 32-blocks */
static inline __m512 group4(const uint8_t *q, const float *x, long a, long b, long *end) {
    const __m128i low = _mm_set1_epi8(0x0f);
    __m512 p0 = _mm512_setzero_ps(), p1 = p0, p2 = p0, p3 = p0;
    long j = a;
    for (; j + 64 <= b; j += 64) {
        __m128i c0 = _mm_loadu_si128((const __m128i *)(q + j / 2));
        __m128i c1 = _mm_loadu_si128((const __m128i *)(q + j / 2 + 16));
        p0 = _mm512_fmadd_ps(CVT16(_mm_and_si128(c0, low)), _mm512_loadu_ps(x + j), p0);
        p1 = _mm512_fmadd_ps(CVT16(_mm_and_si128(_mm_srli_epi16(c0, 4), low)), _mm512_loadu_ps(x + j + 16), p1);
        p2 = _mm512_fmadd_ps(CVT16(_mm_and_si128(c1, low)), _mm512_loadu_ps(x + j + 32), p2);
        p3 = _mm512_fmadd_ps(CVT16(_mm_and_si128(_mm_srli_epi16(c1, 4), low)), _mm512_loadu_ps(x + j + 48), p3);
    }
    for (; j + 32 <= b; j += 32) {
        __m128i c = _mm_loadu_si128((const __m128i *)(q + j / 2));
        p0 = _mm512_fmadd_ps(CVT16(_mm_and_si128(c, low)), _mm512_loadu_ps(x + j), p0);
        p1 = _mm512_fmadd_ps(CVT16(_mm_and_si128(_mm_srli_epi16(c, 4), low)), _mm512_loadu_ps(x + j + 16), p1);
    }
    *end = j;
    return _mm512_add_ps(_mm512_add_ps(p0, p1), _mm512_add_ps(p2, p3));
}
#define VQ __m512
#define VQ_ZERO _mm512_setzero_ps()
#define VQ_FMA(s, p, acc) _mm512_fmadd_ps(_mm512_set1_ps(s), p, acc)
#define VQ_SUM(a) sum16(a)
#else
static inline __m256 group8(const uint8_t *q, const float *x, long a, long b, long *end) {
    __m256 p0 = _mm256_setzero_ps(), p1 = p0, p2 = p0, p3 = p0;
    long j = a;
    for (; j + 32 <= b; j += 32) {
        __m128i c0 = _mm_loadu_si128((const __m128i *)(q + j)), c1 = _mm_loadu_si128((const __m128i *)(q + j + 16));
        p0 = _mm256_fmadd_ps(CVT8(c0), _mm256_loadu_ps(x + j), p0);
        p1 = _mm256_fmadd_ps(CVT8(_mm_srli_si128(c0, 8)), _mm256_loadu_ps(x + j + 8), p1);
        p2 = _mm256_fmadd_ps(CVT8(c1), _mm256_loadu_ps(x + j + 16), p2);
        p3 = _mm256_fmadd_ps(CVT8(_mm_srli_si128(c1, 8)), _mm256_loadu_ps(x + j + 24), p3);
    }
    for (; j + 16 <= b; j += 16) {
        __m128i c = _mm_loadu_si128((const __m128i *)(q + j));
        p0 = _mm256_fmadd_ps(CVT8(c), _mm256_loadu_ps(x + j), p0);
        p1 = _mm256_fmadd_ps(CVT8(_mm_srli_si128(c, 8)), _mm256_loadu_ps(x + j + 8), p1);
    }
    *end = j;
    return _mm256_add_ps(_mm256_add_ps(p0, p1), _mm256_add_ps(p2, p3));
}

static inline __m256 group4(const uint8_t *q, const float *x, long a, long b, long *end) {
    const __m128i low = _mm_set1_epi8(0x0f);
    __m256 p0 = _mm256_setzero_ps(), p1 = p0, p2 = p0, p3 = p0;
    long j = a;
    for (; j + 32 <= b; j += 32) {
        __m128i c = _mm_loadu_si128((const __m128i *)(q + j / 2));
        __m128i lo = _mm_and_si128(c, low), hi = _mm_and_si128(_mm_srli_epi16(c, 4), low);
        p0 = _mm256_fmadd_ps(CVT8(lo), _mm256_loadu_ps(x + j), p0);
        p1 = _mm256_fmadd_ps(CVT8(_mm_srli_si128(lo, 8)), _mm256_loadu_ps(x + j + 8), p1);
        p2 = _mm256_fmadd_ps(CVT8(hi), _mm256_loadu_ps(x + j + 16), p2);
        p3 = _mm256_fmadd_ps(CVT8(_mm_srli_si128(hi, 8)), _mm256_loadu_ps(x + j + 24), p3);
    }
    *end = j;
    return _mm256_add_ps(_mm256_add_ps(p0, p1), _mm256_add_ps(p2, p3));
}
#define VQ __m256
#define VQ_ZERO _mm256_setzero_ps()
#define VQ_FMA(s, p, acc) _mm256_fmadd_ps(_mm256_set1_ps(s), p, acc)
#define VQ_SUM(a) sum8(a)
#endif
#endif

#if defined(VECTOR) && defined(__AVX512F__) && defined(__AVX512BW__) && !defined(PLEXUS_NO_AVX512)
/* 4-bit codes in groups of 32 (GGUF's Q4_0/Q4_1/Q4_K blocks), k a multiple of 32: one block a
 * group, so no per-group partial sums to reduce: its two halves' products go straight into
 * the scaled sum (1.3x the weights a second of the general loop) */
static inline float qdot4_32(const uint8_t *q, const float *s, const float *m, const float *x, const float *xs,
                             long G) {
    const __m128i low = _mm_set1_epi8(0x0f);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0;
    long i = 0;
    for (; i < G; i++) {
        if (!(i & 3)) _mm_prefetch((const char *)(q + 16 * i) + QAHEAD, _MM_HINT_T0);
        __m128i c = _mm_loadu_si128((const __m128i *)(q + 16 * i));
        __m512 t = _mm512_mul_ps(CVT16(_mm_and_si128(c, low)), _mm512_loadu_ps(x + 32 * i));
        t = _mm512_fmadd_ps(CVT16(_mm_and_si128(_mm_srli_epi16(c, 4), low)), _mm512_loadu_ps(x + 32 * i + 16), t);
        if (i & 1) acc1 = _mm512_fmadd_ps(_mm512_set1_ps(s[i]), t, acc1);
        else acc0 = _mm512_fmadd_ps(_mm512_set1_ps(s[i]), t, acc0);
    }
    float rest = 0.0f;
    for (i = 0; i < G; i++) rest += m[i] * xs[i];
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + rest;
}
#endif

/* row r of a quantized matrix . x, with xs the group sums of x */
static inline float qdot(const Mat *M, long r, const float *x, const float *xs, long k) {
    long G = mat_groups(M, k), g = M->group, bits = M->bits;
    const uint8_t *q = M->q + r * mat_row_bytes(M, k);
    const float *s = M->s + r * G, *m = M->m + r * G;
    float rest = 0.0f;
#if defined(VECTOR) && defined(__AVX512F__) && defined(__AVX512BW__) && !defined(PLEXUS_NO_AVX512)
    if (bits == 4 && g == 32 && k % 32 == 0) return qdot4_32(q, s, m, x, xs, G);
#endif
#if defined(VECTOR)
    VQ acc = VQ_ZERO;
    for (long i = 0; i < G; i++) {
        long a = i * g, b = a + g < k ? a + g : k, j;
        /* the codes QAHEAD bytes on (the next rows' too: rows are contiguous), on their way while
         * these are summed; a group's codes span at least one cache line for groups of 128 */
        const char *ahead = (const char *)q + (bits == 8 ? a : a / 2) + QAHEAD;
        _mm_prefetch(ahead, _MM_HINT_T0);
        if ((bits == 8 ? g : g / 2) > 64) _mm_prefetch(ahead + 64, _MM_HINT_T0);
        VQ p = bits == 8 ? group8(q, x, a, b, &j) : group4(q, x, a, b, &j);
        acc = VQ_FMA(s[i], p, acc);
        rest += m[i] * xs[i];
        if (j < b) rest += s[i] * codes_dot_scalar(q, bits, x, j, b);
    }
    return VQ_SUM(acc) + rest;
#else
    for (long i = 0; i < G; i++) {
        long a = i * g, b = a + g < k ? a + g : k;
        rest += s[i] * codes_dot_scalar(q, bits, x, a, b) + m[i] * xs[i];
    }
    return rest;
#endif
}

/* --int8-activations. With VNNI (vpdpbusd: 32 unsigned-code x signed-byte products summed in
 * one instruction) the float path's widening and FMA per weight -- its ceiling at about 19 G
 * weights/s a core on Zen 4 -- becomes integer work, as in llama.cpp's quantized types: x is
 * rounded to int8 per group (x8 = round(x / dx), dx = max|x_g| / 127), and
 *     w . x ~= sum_g scale_g dx_g (codes_g . x8_g) + sum_g min_g sum(x_g)
 * (the min term still uses the exact float sums). Not the dequantized model exactly: each
 * activation is off by up to dx/2. Groups of whole 32-blocks only; anything else takes the float
 * path. */
#if defined(VECTOR) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define HAVE_A8 1
static inline int mat_a8(const Mat *M, long k) {
    return M->act8 && M->bits && M->group % 32 == 0 && mat_k(M, k) % 32 == 0;
}

/* x8, dx as above; and xc[g] = the rounding error of group g's sum, sum(x8 dx) - sum(x): the
 * codes' middle value times it is taken off again, so what the rounding costs is only
 * sum((code - middle) * error), not sum(code * error) */
static void quantize_x(const float *x, int8_t *x8, float *dx, float *xc, long k, long g) {
    for (long i = 0, G = (k + g - 1) / g; i < G; i++) {
        long a = i * g, b = a + g < k ? a + g : k;
        float mx = 0.0f, err = 0.0f;
        for (long j = a; j < b; j++) mx = fabsf(x[j]) > mx ? fabsf(x[j]) : mx;
        float d = mx / 127.0f, inv = d > 0 ? 1.0f / d : 0.0f;
        dx[i] = d;
        for (long j = a; j < b; j++) {
            x8[j] = (int8_t)lrintf(x[j] * inv);
            err += (float)x8[j] * d - x[j];
        }
        xc[i] = err;
    }
}

static inline float qdot_a8(const Mat *M, long r, const int8_t *x8, const float *dx, const float *xc, const float *xs,
                            long k) {
    const float middle = M->bits == 8 ? 128.0f : 8.0f;
    long G = mat_groups(M, k), g = M->group;
    const uint8_t *q = M->q + r * mat_row_bytes(M, k);
    const float *s = M->s + r * G, *m = M->m + r * G;
    const __m128i low = _mm_set1_epi8(0x0f);
    __m256 facc = _mm256_setzero_ps();
    float rest = 0.0f;
    for (long i = 0; i < G; i++) {
        long a = i * g, b = a + g < k ? a + g : k;
        __m256i acc = _mm256_setzero_si256(), acc1 = acc; /* two chains: vpdpbusd's latency is ~5 cycles */
        _mm_prefetch((const char *)q + (M->bits == 8 ? a : a / 2) + QAHEAD, _MM_HINT_T0);
        long j = a;
        if (M->bits == 4) {
            for (; j + 64 <= b; j += 64) {
                __m128i v = _mm_loadu_si128((const __m128i *)(q + j / 2));
                __m128i u = _mm_loadu_si128((const __m128i *)(q + j / 2 + 16));
                __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), low), _mm_and_si128(v, low));
                __m256i w1 = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(u, 4), low), _mm_and_si128(u, low));
                acc = _mm256_dpbusd_epi32(acc, w, _mm256_loadu_si256((const __m256i *)(x8 + j)));
                acc1 = _mm256_dpbusd_epi32(acc1, w1, _mm256_loadu_si256((const __m256i *)(x8 + j + 32)));
            }
            for (; j < b; j += 32) {
                __m128i v = _mm_loadu_si128((const __m128i *)(q + j / 2));
                __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), low), _mm_and_si128(v, low));
                acc = _mm256_dpbusd_epi32(acc, w, _mm256_loadu_si256((const __m256i *)(x8 + j)));
            }
        } else {
            for (; j + 64 <= b; j += 64) {
                acc = _mm256_dpbusd_epi32(acc, _mm256_loadu_si256((const __m256i *)(q + j)),
                                          _mm256_loadu_si256((const __m256i *)(x8 + j)));
                acc1 = _mm256_dpbusd_epi32(acc1, _mm256_loadu_si256((const __m256i *)(q + j + 32)),
                                           _mm256_loadu_si256((const __m256i *)(x8 + j + 32)));
            }
            for (; j < b; j += 32)
                acc = _mm256_dpbusd_epi32(acc, _mm256_loadu_si256((const __m256i *)(q + j)),
                                          _mm256_loadu_si256((const __m256i *)(x8 + j)));
        }
        acc = _mm256_add_epi32(acc, acc1);
        facc = _mm256_fmadd_ps(_mm256_set1_ps(s[i] * dx[i]), _mm256_cvtepi32_ps(acc), facc);
        rest += m[i] * xs[i] - middle * s[i] * xc[i];
    }
    return sum8(facc) + rest;
}
#else
static inline int mat_a8(const Mat *M, long k) { (void)M; (void)k; return 0; }
static void quantize_x(const float *x, int8_t *x8, float *dx, float *xc, long k, long g) {
    (void)x; (void)x8; (void)dx; (void)xc; (void)k; (void)g;
}
static inline float qdot_a8(const Mat *M, long r, const int8_t *x8, const float *dx, const float *xc, const float *xs,
                            long k) {
    (void)M; (void)r; (void)x8; (void)dx; (void)xc; (void)xs; (void)k;
    return 0.0f;
}
#endif

/* what a product over x needs, made once per matrix-vector product: the group sums, and for
 * --int8-activations x in 8 bits */
typedef struct {
    const float *xs;
    const int8_t *x8;
    const float *dx, *xc;
} XPrep;

static inline float mat_dot(const Mat *M, long r, const float *x, const XPrep *P, long k) {
    if (!M->bits) return dot(M->w + r * k, x, k);
    if (P->x8) return qdot_a8(M, r, P->x8, P->dx, P->xc, P->xs, k);
    return qdot(M, r, x, P->xs, k);
}
