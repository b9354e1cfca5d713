/* run_kernels.h: the fast kernels behind run.c's plain ops, #included by run.c after them.

   AVX-512 (HAVE_AVX512) for fp32 products, RMSNorm, exp/softmax/SwiGLU, attention, argmax and fp16
   stores; AVX512-VNNI (HAVE_VNNI) for int8 products on weights repacked at load time (q8_pack,
   weights_pack, drop_pages). Each function falls back to run.c's plain loop where the CPU (or
   the compiler's -march) lacks the instructions, so the file builds everywhere. It also holds the
   split of every product into blocks of rows that threads share (matrix_block, matmul_jobs).
   tests/engine_kernels.c checks each fast form against its reference on odd sizes. */

#if defined(__AVX512F__)
#define HAVE_AVX512 1
#include <immintrin.h>

/* The 16 partial sums combined in dot_f32_ref's tree order: k += k+8, k += k+4, k += k+2, k += k+1. */
static inline float hsum16_ps(__m512 v) {
    __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(v),
                              _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
    return _mm_cvtss_f32(s1);
}

/* The body of a tile of R rows x T tokens (R, T <= 4, compile-time constants after inlining):
   R*T register accumulators, each W and x vector loaded once per 16 columns, summed in
   dot_f32_ref's order. LOADW(p) and MLOADW(k, p) give 16 weights as fp32 (plain loads here;
   run_bf16.h widens bf16 with the same body). Expects out, x, w, d, m, R, T in scope. */
#define TILE_BODY(LOADW, MLOADW)                                                                   \
    __m512 acc[4][4];                                                                              \
    for (int r = 0; r < R; r++)                                                                    \
        for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_ps();                               \
    int i = 0;                                                                                     \
    for (; i + 16 <= m; i += 16) {                                                                 \
        __m512 wv[4], xv[4];                                                                       \
        /* The next block's rows (the next 4 rows; past the end only a harmless hint): the         \
           hardware prefetcher alone does not keep enough lines in flight to stream at bandwidth. */ \
        if (T == 1)                                                                                \
            for (int r = 0; r < 4; r++) _mm_prefetch((const char *)(w + (size_t)(r + 4) * m + i), _MM_HINT_T0); \
        for (int r = 0; r < R; r++) wv[r] = LOADW(w + (size_t)r * m + i);                          \
        for (int t = 0; t < T; t++) xv[t] = _mm512_loadu_ps(x + (size_t)t * m + i);               \
        for (int r = 0; r < R; r++)                                                                \
            for (int t = 0; t < T; t++) acc[r][t] = _mm512_fmadd_ps(wv[r], xv[t], acc[r][t]);     \
    }                                                                                              \
    if (i < m) { /* the last m % 16 columns land in partial sums 0 .. m%16-1, as in the reference */ \
        __mmask16 k = (__mmask16)((1u << (m - i)) - 1);                                            \
        __m512 wv[4], xv[4];                                                                       \
        for (int r = 0; r < R; r++) wv[r] = MLOADW(k, w + (size_t)r * m + i);                      \
        for (int t = 0; t < T; t++) xv[t] = _mm512_maskz_loadu_ps(k, x + (size_t)t * m + i);      \
        for (int r = 0; r < R; r++)                                                                \
            for (int t = 0; t < T; t++) acc[r][t] = _mm512_mask3_fmadd_ps(wv[r], xv[t], acc[r][t], k); \
    }                                                                                              \
    for (int r = 0; r < R; r++)                                                                    \
        for (int t = 0; t < T; t++) out[(size_t)t * d + r] = hsum16_ps(acc[r][t])

static inline __attribute__((always_inline)) void tile_f32(float *out, const float *x, const float *w,
                                                           int d, int m, int R, int T) {
    TILE_BODY(_mm512_loadu_ps, _mm512_maskz_loadu_ps);
}

/* Rows [i0, i0+R) (R = 4, or fewer at the end) against all n tokens, 4 tokens at a time, through
   TILE(out, x, w, d, m, rows, tokens), a tile function that inlines to constant sizes: o is out
   + i0, xs the tokens' rows (m wide), wr the first row of W (m wide). One driver for the fp32
   and both bf16 kernels, so they split the work the same way. */
#define TILE_ROWS(TILE, o, xs, wr, n, d, m, R)                                                     \
    do {                                                                                           \
        int t_ = 0;                                                                                \
        if ((R) == 4) {                                                                            \
            for (; t_ + 4 <= (n); t_ += 4) TILE((o) + (size_t)t_ * (d), (xs) + (size_t)t_ * (m), (wr), d, m, 4, 4); \
            for (; t_ < (n); t_++) TILE((o) + (size_t)t_ * (d), (xs) + (size_t)t_ * (m), (wr), d, m, 4, 1);      \
        } else {                                                                                   \
            for (int r_ = 0; r_ < (R); r_++) {                                                     \
                for (t_ = 0; t_ + 4 <= (n); t_ += 4)                                               \
                    TILE((o) + (size_t)t_ * (d) + r_, (xs) + (size_t)t_ * (m), (wr) + (size_t)r_ * (m), d, m, 1, 4); \
                for (; t_ < (n); t_++)                                                             \
                    TILE((o) + (size_t)t_ * (d) + r_, (xs) + (size_t)t_ * (m), (wr) + (size_t)r_ * (m), d, m, 1, 1); \
            }                                                                                      \
        }                                                                                          \
    } while (0)

/* Rows [i0, i0+4) (or fewer at the end) against all n tokens, 4 tokens at a time. */
static void rows_f32(float *out, const float *x, const float *w, int n, int d, int m, int i0) {
    int R = d - i0 < 4 ? d - i0 : 4;
    TILE_ROWS(tile_f32, out + i0, x, w + (size_t)i0 * m, n, d, m, R);
}
#endif

/* Rows [i0, i0+4) (fewer at the end) of out (n, d) = x (n, m) @ W^T, W (d, m) fp32: the unit
   of work threads share. The n tokens reuse the block of W while it is in cache, so prefill reads
   the weights once per block of tokens and decoding (n = 1) streams them once. */
static void block_f32(float *out, const float *x, const float *w, int n, int d, int m, int i0) {
#if HAVE_AVX512
    rows_f32(out, x, w, n, d, m, i0);
#else
    int i1 = i0 + 4 < d ? i0 + 4 : d;
    for (int i = i0; i < i1; i++)
        for (int t = 0; t < n; t++) out[(size_t)t * d + i] = dot_f32_ref(x + (size_t)t * m, w + (size_t)i * m, m);
#endif
}

/* out (n, d) = x (n, m) @ W^T, W (d, m) fp32, threads splitting the rows in blocks of 4. The engine
   goes through matmul_jobs; this whole-matrix form (not static, so unused builds keep it quietly)
   is what tests/engine_kernels.c compares with matmul_f32_ref. */
void matmul_f32(float *out, const float *x, const float *w, int n, int d, int m) {
    int blocks = (d + 3) / 4, b;
    OMP_PARALLEL_FOR
    for (b = 0; b < blocks; b++) block_f32(out, x, w, n, d, m, 4 * b);
}

/* quantize_rows_ref, 16 values at a time where AVX-512 is available: max is exact (NaNs skipped
   like fmaxf: vmaxps returns its second operand when either is NaN), the division is IEEE, NaN
   becomes 0 and the clamp is the reference's, and the conversion rounds half to even like lrintf,
   so the bytes are identical. */
static void quantize_rows(int8_t *xq, float *xs, int32_t *xsum, const float *x, int n, int m, int gs) {
#if HAVE_AVX512
    if (gs % 16 == 0) {
        int64_t groups = (int64_t)n * (m / gs);
        for (int64_t g = 0; g < groups; g++) {
            const float *v = x + g * gs;
            int8_t *q = xq + g * gs;
            __m512 vmax = _mm512_setzero_ps();
            for (int i = 0; i < gs; i += 16) vmax = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(v + i)), vmax);
            float scale = _mm512_reduce_max_ps(vmax) / 127.0f;
            xs[g] = scale;
            xsum[g] = 0;
            if (scale == 0.0f) {
                memset(q, 0, (size_t)gs);
                continue;
            }
            __m512 vs = _mm512_set1_ps(scale), hi = _mm512_set1_ps(127.0f), lo = _mm512_set1_ps(-127.0f);
            __m512i sum = _mm512_setzero_si512();
            for (int i = 0; i < gs; i += 16) {
                __m512 r = _mm512_div_ps(_mm512_loadu_ps(v + i), vs);
                r = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(r, r, _CMP_ORD_Q), r); /* NaN -> 0 */
                __m512i qi = _mm512_cvtps_epi32(_mm512_min_ps(hi, _mm512_max_ps(lo, r)));
                _mm_storeu_si128((__m128i *)(void *)(q + i), _mm512_cvtepi32_epi8(qi));
                sum = _mm512_add_epi32(sum, qi);
            }
            xsum[g] = _mm512_reduce_add_epi32(sum);
        }
        return;
    }
#endif
    quantize_rows_ref(xq, xs, xsum, x, n, m, gs);
}

#define PACK_ROWS 32 /* rows in one packed int8 block: two vectors of 16 int32 lanes */
#ifndef Q8_PREFETCH
/* How far ahead decoding prefetches a packed block, in int32 lanes (1024 = 4 KiB: shorter trails
   the stream, longer gains nothing; -DQ8_PREFETCH=N overrides it) */
#define Q8_PREFETCH 1024
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define HAVE_VNNI 1
/* The VNNI kernels keep rows in the lanes of a vector, so no group sum ever needs a horizontal
   reduction. At load time (q8_pack) every int8 matrix is repacked in blocks of 32 rows: for each
   4-byte column chunk c, two vectors (rows 0-15, 16-31) that hold each row's bytes [4c, 4c+4) as
   one int32 lane, and for each group the 32 rows' scales as two vectors. vpdpbusd of such a vector
   with one token's 4 bytes broadcast to every lane adds to lane r row r's four products. A block is
   one contiguous stream (32 x cols bytes), which the prefetchers follow at full speed where four
   separate short rows did not.
   vpdpbusd multiplies unsigned by signed bytes, so the weights are stored shifted: (w + 128) is
   w ^ 0x80 as an unsigned byte, and sum (w + 128) x = sum w x + 128 sum x, with sum x precomputed
   per group (xsum). Integer sums are exact, so each group's int32 equals dot_i8's, and the fp32
   part is the reference's expression in the reference's order: bit-identical results. */

/* out[c] = lane c of in[0..16) (a 16 x 16 transpose of int32): unpacks within 128-bit blocks, then
   a 4 x 4 transpose of the blocks, 64 shuffles in all. */
static inline void transpose16_epi32(__m512i *out, const __m512i *in) {
    __m512i a[16], b[16];
    for (int i = 0; i < 16; i += 2) {
        a[i] = _mm512_unpacklo_epi32(in[i], in[i + 1]);     /* per block: r0c0 r1c0 r0c1 r1c1 */
        a[i + 1] = _mm512_unpackhi_epi32(in[i], in[i + 1]); /* per block: r0c2 r1c2 r0c3 r1c3 */
    }
    for (int i = 0; i < 4; i++) { /* b[4i + k]: block L holds rows 4i..4i+3 of column 4L + k */
        b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
        b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
    }
    for (int k = 0; k < 4; k++) {
        __m512i c0 = _mm512_shuffle_i32x4(b[k], b[4 + k], 0x44);
        __m512i c1 = _mm512_shuffle_i32x4(b[k], b[4 + k], 0xee);
        __m512i c2 = _mm512_shuffle_i32x4(b[8 + k], b[12 + k], 0x44);
        __m512i c3 = _mm512_shuffle_i32x4(b[8 + k], b[12 + k], 0xee);
        out[k] = _mm512_shuffle_i32x4(c0, c2, 0x88);
        out[4 + k] = _mm512_shuffle_i32x4(c0, c2, 0xdd);
        out[8 + k] = _mm512_shuffle_i32x4(c1, c3, 0x88);
        out[12 + k] = _mm512_shuffle_i32x4(c1, c3, 0xdd);
    }
}

/* Packs rows [i0, i0+R) (R <= 32) of W into one block: wp (cols/4, 32) int32, sp (groups, 32)
   scales; lanes past R hold zero weights and zero scales. */
static void pack32_q8(int32_t *wp, float *sp, const int8_t *wq, const float *ws, int m, int gs, int i0, int R) {
    int groups = m / gs, chunks = m / 4;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (int h = 0; h < 2; h++) {
        int r = R - 16 * h < 16 ? R - 16 * h : 16; /* rows in this half */
        const int8_t *w0 = wq + (size_t)(i0 + (r > 0 ? 16 * h : 0)) * m;
        const float *s0 = ws + (size_t)(i0 + (r > 0 ? 16 * h : 0)) * groups;
        for (int c = 0; c < chunks; c += 16) { /* 16 chunks (64 bytes) of each row at a time */
            int q = chunks - c < 16 ? chunks - c : 16;
            __mmask16 k = (__mmask16)(q == 16 ? 0xffffu : (1u << q) - 1);
            __m512i in[16], t[16];
            for (int j = 0; j < 16; j++)
                in[j] = j < r ? _mm512_maskz_loadu_epi32(k, w0 + (size_t)j * m + 4 * (size_t)c)
                              : _mm512_set1_epi8((char)0x80); /* 0 once flipped */
            transpose16_epi32(t, in);
            for (int j = 0; j < q; j++)
                _mm512_store_si512((void *)(wp + (size_t)(c + j) * 32 + 16 * h), _mm512_xor_si512(t[j], flip));
        }
        for (int g = 0; g < groups; g += 16) { /* the scales the same way, 16 groups at a time */
            int q = groups - g < 16 ? groups - g : 16;
            __mmask16 k = (__mmask16)(q == 16 ? 0xffffu : (1u << q) - 1);
            __m512i in[16], t[16];
            for (int j = 0; j < 16; j++)
                in[j] = j < r ? _mm512_maskz_loadu_epi32(k, s0 + (size_t)j * groups + g) : _mm512_setzero_si512();
            transpose16_epi32(t, in);
            for (int j = 0; j < q; j++) _mm512_store_si512((void *)(sp + (size_t)(g + j) * 32 + 16 * h), t[j]);
        }
    }
}

/* acc + vpdpbusd(w, b). GCC 12 copies the accumulator to a fresh register and back around every
   vpdpbusd intrinsic in a loop (two extra moves per product), so GCC gets the instruction as
   inline assembly. */
static inline __attribute__((always_inline)) __m512i dpbusd(__m512i acc, __m512i w, __m512i b) {
#if defined(__GNUC__) && !defined(__clang__)
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(b));
    return acc;
#else
    return _mm512_dpbusd_epi32(acc, w, b);
#endif
}

/* One packed block (32 rows from i0) against T <= 6 tokens [t0, t0+T) (T a constant after
   inlining): 2T int32 sums per group, started at -128 * xsum (the shift's correction, exact); then
   lane r adds ((float)isum * w_scale_r) * x_scale: the reference's arithmetic, in group order.
   With T >= 3 there are enough independent chains to keep both vpdpbusd ports busy; decoding
   (T = 1) is bound by memory instead, and prefetches the stream Q8_PREFETCH lanes ahead. */
static inline __attribute__((always_inline)) void tile32_q8_vnni(float *out, const int8_t *xq, const float *xs,
                                                                 const int32_t *xsum, const int32_t *wp,
                                                                 const float *sp, int d, int m, int gs, int i0,
                                                                 int t0, __mmask16 rows0, __mmask16 rows1, int T) {
    int groups = m / gs, chunks = gs / 4;
    const int8_t *x = xq + (size_t)t0 * m;
    const float *as = xs + (size_t)t0 * groups;
    const int32_t *asum = xsum + (size_t)t0 * groups;
    __m512 acc[6][2];
    for (int t = 0; t < T; t++) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m512i v[6][2];
        for (int t = 0; t < T; t++) v[t][0] = v[t][1] = _mm512_set1_epi32(-128 * asum[(size_t)t * groups + g]);
        const int32_t *wg = wp + (size_t)g * chunks * 32;
        const int8_t *xg = x + (size_t)g * gs;
        for (int c = 0; c < chunks; c++) {
            if (T == 1) _mm_prefetch((const char *)(wg + (size_t)c * 32 + Q8_PREFETCH), _MM_HINT_T0);
            __m512i w0 = _mm512_load_si512((const void *)(wg + (size_t)c * 32));
            __m512i w1 = _mm512_load_si512((const void *)(wg + (size_t)c * 32 + 16));
            for (int t = 0; t < T; t++) {
                int32_t b;
                memcpy(&b, xg + (size_t)t * m + 4 * c, 4);
                __m512i bv = _mm512_set1_epi32(b);
                v[t][0] = dpbusd(v[t][0], w0, bv);
                v[t][1] = dpbusd(v[t][1], w1, bv);
            }
        }
        __m512 wsc0 = _mm512_load_ps(sp + (size_t)g * 32), wsc1 = _mm512_load_ps(sp + (size_t)g * 32 + 16);
        for (int t = 0; t < T; t++) {
            __m512 xsc = _mm512_set1_ps(as[(size_t)t * groups + g]);
            __m512 f0 = _mm512_mul_ps(_mm512_cvtepi32_ps(v[t][0]), wsc0);
            __m512 f1 = _mm512_mul_ps(_mm512_cvtepi32_ps(v[t][1]), wsc1);
            acc[t][0] = _mm512_add_ps(acc[t][0], _mm512_mul_ps(f0, xsc));
            acc[t][1] = _mm512_add_ps(acc[t][1], _mm512_mul_ps(f1, xsc));
        }
    }
    for (int t = 0; t < T; t++) {
        float *o = out + (size_t)(t0 + t) * d + i0;
        _mm512_mask_storeu_ps(o, rows0, acc[t][0]);
        if (rows1) _mm512_mask_storeu_ps(o + 16, rows1, acc[t][1]);
    }
}

/* The packed block of rows [i0, i0+32) (fewer at the end) against all n tokens, 6 at a time. */
static void block32_q8_vnni(float *out, const int8_t *xq, const float *xs, const int32_t *xsum,
                            const int32_t *wp, const float *sp, int n, int d, int m, int gs, int i0) {
    int R = d - i0 < PACK_ROWS ? d - i0 : PACK_ROWS;
    __mmask16 rows0 = (__mmask16)(R >= 16 ? 0xffffu : (1u << R) - 1);
    __mmask16 rows1 = (__mmask16)(R >= 32 ? 0xffffu : R > 16 ? (1u << (R - 16)) - 1 : 0u);
    int t = 0;
    /* the common group sizes as constants, so that the chunk loop unrolls */
#define TILE(T)                                                                                          \
    do {                                                                                                 \
        if (gs == 32) tile32_q8_vnni(out, xq, xs, xsum, wp, sp, d, m, 32, i0, t, rows0, rows1, T);        \
        else if (gs == 64) tile32_q8_vnni(out, xq, xs, xsum, wp, sp, d, m, 64, i0, t, rows0, rows1, T);   \
        else tile32_q8_vnni(out, xq, xs, xsum, wp, sp, d, m, gs, i0, t, rows0, rows1, T);                 \
    } while (0)
    for (; t + 6 <= n; t += 6) TILE(6);
    switch (n - t) {
    case 5: TILE(5); break;
    case 4: TILE(4); break;
    case 3: TILE(3); break;
    case 2: TILE(2); break;
    case 1: TILE(1); break;
    default: break;
    }
#undef TILE
}
#endif

/* Whether W (d, m) with group size gs is kept packed for the VNNI kernels: a group size that is a
   multiple of 16 (whole vectors) and small enough that no int32 lane can overflow
   (255 * 127 * 4096 < 2^31). */
static int q8_packable(int gs) {
#if HAVE_VNNI
    return gs % 16 == 0 && gs <= 4096;
#else
    (void)gs;
    return 0;
#endif
}

/* Bytes of the packed form of a (d, m) matrix: PACK_ROWS-row blocks of m/4 int32 chunks and m/gs scales. */
static size_t q8_packed_bytes(int d, int m, int gs) {
    size_t blocks = ((size_t)d + PACK_ROWS - 1) / PACK_ROWS;
    return blocks * PACK_ROWS * ((size_t)m + (size_t)(m / gs) * sizeof(float));
}

/* Fills mat->pw / mat->ps from mat->q / mat->s, in buf (64-byte aligned, q8_packed_bytes long). */
static void q8_pack(Matrix *mat, void *buf, int d, int m, int gs) {
#if HAVE_VNNI
    size_t blocks = ((size_t)d + PACK_ROWS - 1) / PACK_ROWS, wstride = (size_t)m / 4 * PACK_ROWS, sstride = (size_t)(m / gs) * PACK_ROWS;
    int32_t *wp = buf;
    float *sp = (float *)(void *)(wp + blocks * wstride);
    int b, nb = (int)blocks;
    OMP_PARALLEL_FOR
    for (b = 0; b < nb; b++) {
        int i0 = PACK_ROWS * b, R = d - i0 < PACK_ROWS ? d - i0 : PACK_ROWS;
        pack32_q8(wp + (size_t)b * wstride, sp + (size_t)b * sstride, mat->q, mat->s, m, gs, i0, R);
    }
    mat->pw = wp;
    mat->ps = sp;
#else
    (void)mat, (void)buf, (void)d, (void)m, (void)gs;
#endif
}

/* Rows in one unit of work of an int8 product: a packed block, else 4 rows. */
static int q8_block_rows(const Matrix *w) { return w->pw ? PACK_ROWS : 4; }

/* Rows [i0, i0+q8_block_rows) (fewer at the end) of the int8 product out (n, d), with the VNNI
   kernel on packed weights, else the plain loop; both give the same bits. */
static void block_q8(float *out, const int8_t *xq, const float *xs, const int32_t *xsum, const Matrix *w,
                     int n, int d, int m, int gs, int i0) {
#if HAVE_VNNI
    if (w->pw) {
        size_t b = (size_t)i0 / PACK_ROWS;
        block32_q8_vnni(out, xq, xs, xsum, w->pw + b * ((size_t)m / 4 * PACK_ROWS), w->ps + b * ((size_t)(m / gs) * PACK_ROWS),
                        n, d, m, gs, i0);
        return;
    }
#endif
    (void)xsum;
    int i1 = i0 + 4 < d ? i0 + 4 : d;
    for (int i = i0; i < i1; i++) row_q8_ref(out, xq, xs, w->q, w->s, n, d, m, gs, i);
}

/* out (n, d) = int8 product of row-major wq / ws, through the same kernels as the engine (packing
   a copy first where the engine would have packed at load time). Not static: tests/engine_kernels.c
   compares it with matmul_q8_ref. */
void matmul_q8(float *out, const int8_t *xq, const float *xs, const int32_t *xsum, const int8_t *wq,
               const float *ws, int n, int d, int m, int gs) {
    Matrix w = {.q = wq, .s = ws};
    void *buf = NULL;
    if (q8_packable(gs)) {
        buf = xmalloc_aligned(q8_packed_bytes(d, m, gs));
        q8_pack(&w, buf, d, m, gs);
    }
    int rows = q8_block_rows(&w), blocks = (d + rows - 1) / rows, b;
    OMP_PARALLEL_FOR
    for (b = 0; b < blocks; b++) block_q8(out, xq, xs, xsum, &w, n, d, m, gs, rows * b);
    free(buf);
}

/* Releases the mapped pages of a matrix that has been packed: only the packed copy is read from
   then on, so resident memory holds the weights once, not twice, even while loading (the file is
   mapped without MAP_POPULATE in this case). A page shared with a neighbouring tensor just faults
   back in from the page cache if that tensor is read. */
static void drop_pages(Transformer *t, const Matrix *m, int rows, int cols) {
#ifdef MADV_DONTNEED
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t lo = (uintptr_t)m->q & ~(page - 1);
    uintptr_t hi = (uintptr_t)m->q + (uintptr_t)rows * (uintptr_t)cols;
    uintptr_t base = (uintptr_t)t->data;
    uintptr_t sc = (uintptr_t)m->s;
    if (sc >= base && sc < base + t->file_size) /* the scales too, unless copied out (take_scales) */
        hi = sc + (uintptr_t)rows * (uintptr_t)(cols / q8_group_size(&t->config, cols)) * sizeof(float);
    hi = (hi + page - 1) & ~(page - 1);
    if (hi > base + t->file_size) hi = (base + t->file_size + page - 1) & ~(page - 1);
    madvise((void *)lo, hi - lo, MADV_DONTNEED);
#else
    (void)t, (void)m, (void)rows, (void)cols;
#endif
}

/* Repacks every int8 matrix but the embedding (only ever read by row) for the VNNI kernels, in one
   allocation about the size of the int8 weights: decoding then streams each 32-row block as one
   contiguous run, and prefill no longer repacks a block per call. */
static void weights_pack(Transformer *t) {
    const Config *c = &t->config;
    Weights *w = &t->weights;
    if (!c->quantized || !q8_packable(c->group_size)) return;
    int d = c->dim, h = c->hidden_dim, kv = c->kv_dim;
    int rows[7] = {d, kv, kv, d, h, d, h}, cols[7] = {d, d, d, d, d, h, d};
    size_t total = q8_packed_bytes(c->vocab_size, d, c->group_size);
    for (int k = 0; k < 7; k++) {
        int gs = q8_group_size(c, cols[k]);
        if (q8_packable(gs)) total += (size_t)c->n_layers * q8_packed_bytes(rows[k], cols[k], gs);
    }
    unsigned char *buf = t->packed = xmalloc_aligned(total);
    for (int l = 0; l < c->n_layers; l++) {
        LayerWeights *lw = &w->layers[l];
        Matrix *mats[7] = {&lw->wq, &lw->wk, &lw->wv, &lw->wo, &lw->w1, &lw->w2, &lw->w3};
        for (int k = 0; k < 7; k++) {
            int gs = q8_group_size(c, cols[k]);
            if (!q8_packable(gs)) continue; /* a regrouped w2 of a group size the kernel lacks */
            q8_pack(mats[k], buf, rows[k], cols[k], gs);
            drop_pages(t, mats[k], rows[k], cols[k]);
            buf += q8_packed_bytes(rows[k], cols[k], gs);
        }
    }
    q8_pack(&w->wcls, buf, c->vocab_size, d, c->group_size);
    drop_pages(t, &w->wcls, c->vocab_size, d);
}

#include "run_bf16.h" /* defines: matmul_bf16_ref, block_bf16, round_rows_bf16 (bf16 weights) */

/* Rows in one unit of work of a product with W: 4 for fp32 and bf16, a packed block or 4 for int8. */
static int matrix_rows(const Matrix *w) { return w->w || w->b ? 4 : q8_block_rows(w); }

/* Rows [i0, i0 + matrix_rows) of out (n, d) = x (n, m) @ W^T: fp32 and bf16 weights read x (bf16
   prefill blocks its bf16 rounding in t->state.xh, see matmul_jobs), int8 weights its quantized
   form (xq, xs, xsum). */
static void matrix_block(const Transformer *t, float *out, const Matrix *w, const float *x, const int8_t *xq,
                         const float *xs, const int32_t *xsum, int n, int d, int m, int i0) {
    if (w->w) block_f32(out, x, w->w, n, d, m, i0);
    else if (w->b) block_bf16(out, x, n >= BF16_DP_MIN_TOKENS ? t->state.xh : NULL, w->b, n, d, m, i0);
    else block_q8(out, xq, xs, xsum, w, n, d, m, q8_group_size(&t->config, m), i0);
}

/* One product of a group that shares its input: out (n, d) = x @ W^T. */
typedef struct {
    float *out;
    const Matrix *w;
    int d;
} MatJob;

/* Several products of the same input x (n, m) (q, k, v; or w1, w3) in one parallel loop over all
   their blocks of rows (4, or 32 for packed int8): one fork and one barrier instead of one
   per matrix. For int8 weights, x must already be quantized into s->xq / s->xs / s->xsum
   (quantize_rows); for bf16 weights a block of tokens is rounded to bf16 here, once for all the
   rows that read it. */
static void matmul_jobs(Transformer *t, const MatJob *jobs, int n_jobs, const float *x, int n, int m) {
    RunState *s = &t->state;
    if (jobs[0].w->b && s->xh && n >= BF16_DP_MIN_TOKENS) round_rows_bf16(s->xh, x, n, m);
    int start[4] = {0, 0, 0, 0}, rows[3];
    for (int j = 0; j < n_jobs; j++) {
        rows[j] = matrix_rows(jobs[j].w);
        start[j + 1] = start[j] + (jobs[j].d + rows[j] - 1) / rows[j];
    }
    int total = start[n_jobs], b;
    OMP_PARALLEL_FOR
    for (b = 0; b < total; b++) {
        int j = 0;
        while (b >= start[j + 1]) j++;
        matrix_block(t, jobs[j].out, jobs[j].w, x, s->xq, s->xs, s->xsum, n, jobs[j].d, m, rows[j] * (b - start[j]));
    }
}

static void matmul(Transformer *t, float *out, const float *x, const Matrix *w, int n, int d, int m) {
    MatJob job = {out, w, d};
    matmul_jobs(t, &job, 1, x, n, m);
}

/* rmsnorm_ref with the sum of squares 16 floats at a time (two double accumulators). */
static void rmsnorm(float *out, const float *x, const float *gain, int n, float eps) {
#if HAVE_AVX512
    double ss = 0.0;
    int i = 0;
    __m512d acc0 = _mm512_setzero_pd(), acc1 = _mm512_setzero_pd();
    for (; i + 16 <= n; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
        __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
        acc0 = _mm512_fmadd_pd(lo, lo, acc0);
        acc1 = _mm512_fmadd_pd(hi, hi, acc1);
    }
    ss = _mm512_reduce_add_pd(_mm512_add_pd(acc0, acc1));
    for (; i < n; i++) ss += (double)x[i] * x[i];
    rmsnorm_scale(out, x, gain, n, eps, ss);
#else
    rmsnorm_ref(out, x, gain, n, eps);
#endif
}

#if HAVE_AVX512
/* e^x for 16 floats, within 2 ulp of expf: x = k ln2 + r with |r| <= ln2/2 (ln2 split into a short
   high part, so k * high is exact, and the rest), e^r from its Taylor series to r^7 (truncation
   below 1e-8 relative), then times 2^k by vscalefps, which overflows to inf and underflows to 0
   as expf does. The clamp keeps k finite for infinite x; NaN passes through. */
static inline __m512 exp16_ps(__m512 x) {
    x = _mm512_min_ps(_mm512_set1_ps(100.0f), _mm512_max_ps(_mm512_set1_ps(-110.0f), x));
    __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, k);
}

/* softmax with exp16_ps, 16 values at a time (a masked tail). */
static void softmax16(float *x, int n) {
    __m512 mx = _mm512_set1_ps(-INFINITY);
    int i;
    for (i = 0; i + 16 <= n; i += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(x + i));
    __mmask16 tail = (__mmask16)((1u << (n - i)) - 1);
    if (tail) mx = _mm512_mask_max_ps(mx, tail, mx, _mm512_maskz_loadu_ps(tail, x + i));
    __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx)), sum = _mm512_setzero_ps();
    for (i = 0; i + 16 <= n; i += 16) {
        __m512 e = exp16_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), m));
        _mm512_storeu_ps(x + i, e);
        sum = _mm512_add_ps(sum, e);
    }
    if (tail) {
        __m512 e = exp16_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, x + i), m));
        _mm512_mask_storeu_ps(x + i, tail, e);
        sum = _mm512_mask_add_ps(sum, tail, sum, e);
    }
    __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
    for (i = 0; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, _mm512_mul_ps(_mm512_loadu_ps(x + i), inv));
    if (tail) _mm512_mask_storeu_ps(x + i, tail, _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, x + i), inv));
}
#endif

/* softmax with exp16_ps where there is one: the sampler takes a softmax over the whole vocabulary
   per token, where a scalar expf per entry costs as much as a small model's forward pass. */
static void softmax_fast(float *x, int n) {
#if HAVE_AVX512
    softmax16(x, n);
#else
    softmax(x, n);
#endif
}

/* swiglu_ref with exp16_ps: every value goes through it (a masked tail), so a value's result
   does not depend on where the token sits in a block. */
static void swiglu(float *g, const float *u, size_t n) {
#if HAVE_AVX512
    for (size_t i = 0; i < n; i += 16) {
        __mmask16 k = (__mmask16)(n - i >= 16 ? 0xffffu : (1u << (n - i)) - 1);
        __m512 v = _mm512_maskz_loadu_ps(k, g + i);
        __m512 e = exp16_ps(_mm512_sub_ps(_mm512_setzero_ps(), v));
        __m512 silu = _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
        _mm512_mask_storeu_ps(g + i, k, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(k, u + i)));
    }
#else
    swiglu_ref(g, u, n);
#endif
}

/* h[0..n) = src[0..n) rounded to fp16, into an fp16 cache (an fp32 cache takes the products'
   output directly). */
static void kv_store_f16(uint16_t *h, const float *src, size_t n) {
    size_t i = 0;
#if HAVE_AVX512
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(void *)(h + i),
                            _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
    for (; i < n; i++) h[i] = f32_to_f16(src[i]);
}

#if HAVE_AVX512
/* The 16 totals of 16 vectors: lane k of the result is the sum of v[k]'s lanes. Pairs are
   interleaved and added three times (32, 64, then 128-bit pieces), then the four 128-bit blocks
   are transposed and added: 45 operations instead of 16 separate horizontal sums. */
static inline __m512 hsum16x16_ps(const __m512 *v) {
    __m512 a[8], b[4];
    for (int i = 0; i < 8; i++) /* per 128-bit block: v2i and v2i+1 lanes 0+2, 0+2, 1+3, 1+3 */
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) { /* per 128-bit block: the partial totals of v4i .. v4i+3 */
        __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
        b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    /* block j of b[i] holds partial totals of v4i..v4i+3 from block j; sum over j */
    __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], 0x44), _mm512_shuffle_f32x4(b[0], b[1], 0xee));
    __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], 0x44), _mm512_shuffle_f32x4(b[2], b[3], 0xee));
    return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xdd));
}

/* 16 cache elements from element e, as floats (half a constant after inlining). */
static inline __attribute__((always_inline)) __m512 kv_load16(const void *base, size_t e, int half) {
    if (half) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)((const uint16_t *)base + e)));
    return _mm512_loadu_ps((const float *)base + e);
}

/* attention_head_ref for hs = 16 * nv (nv and half constants after inlining): q in registers,
   scores of 16 keys at a time reduced together (hsum16x16_ps), softmax16, and the weighted sum of
   values in two interleaved sets of accumulators (even and odd positions), so it is not bound by
   FMA latency. */
static inline __attribute__((always_inline)) void attention_head_simd(float *out, const float *q, const void *k,
                                                                      const void *v, float *att, int len,
                                                                      int stride, float scale, int nv, int half) {
    int p = 0;
    __m512 qv[8], o0[8], o1[8];
    for (int j = 0; j < nv; j++) qv[j] = _mm512_loadu_ps(q + 16 * j);
    for (; p + 16 <= len; p += 16) {
        __m512 dots[16];
        for (int r = 0; r < 16; r++) {
            size_t e = (size_t)(p + r) * stride;
            __m512 acc = _mm512_mul_ps(qv[0], kv_load16(k, e, half));
            for (int j = 1; j < nv; j++) acc = _mm512_fmadd_ps(qv[j], kv_load16(k, e + 16 * j, half), acc);
            dots[r] = acc;
        }
        _mm512_storeu_ps(att + p, _mm512_mul_ps(hsum16x16_ps(dots), _mm512_set1_ps(scale)));
    }
    for (; p < len; p++) {
        size_t e = (size_t)p * stride;
        __m512 acc = _mm512_mul_ps(qv[0], kv_load16(k, e, half));
        for (int j = 1; j < nv; j++) acc = _mm512_fmadd_ps(qv[j], kv_load16(k, e + 16 * j, half), acc);
        att[p] = _mm512_reduce_add_ps(acc) * scale;
    }
    softmax16(att, len);
    for (int j = 0; j < nv; j++) o0[j] = o1[j] = _mm512_setzero_ps();
    for (p = 0; p + 2 <= len; p += 2) {
        size_t e0 = (size_t)p * stride, e1 = e0 + (size_t)stride;
        __m512 a0 = _mm512_set1_ps(att[p]), a1 = _mm512_set1_ps(att[p + 1]);
        for (int j = 0; j < nv; j++) {
            o0[j] = _mm512_fmadd_ps(a0, kv_load16(v, e0 + 16 * j, half), o0[j]);
            o1[j] = _mm512_fmadd_ps(a1, kv_load16(v, e1 + 16 * j, half), o1[j]);
        }
    }
    if (p < len) {
        size_t e0 = (size_t)p * stride;
        __m512 a0 = _mm512_set1_ps(att[p]);
        for (int j = 0; j < nv; j++) o0[j] = _mm512_fmadd_ps(a0, kv_load16(v, e0 + 16 * j, half), o0[j]);
    }
    for (int j = 0; j < nv; j++) _mm512_storeu_ps(out + 16 * j, _mm512_add_ps(o0[j], o1[j]));
}

/* The SIMD kernel for one cache precision, head sizes 16, 32, ..., 128; 0 if hs has none. */
#define ATTENTION_SIZES(HALF)                                                                    \
    switch (hs) {                                                                                \
    case 16: attention_head_simd(out, q, k, v, att, len, stride, scale, 1, HALF); return 1;      \
    case 32: attention_head_simd(out, q, k, v, att, len, stride, scale, 2, HALF); return 1;      \
    case 48: attention_head_simd(out, q, k, v, att, len, stride, scale, 3, HALF); return 1;      \
    case 64: attention_head_simd(out, q, k, v, att, len, stride, scale, 4, HALF); return 1;      \
    case 80: attention_head_simd(out, q, k, v, att, len, stride, scale, 5, HALF); return 1;      \
    case 96: attention_head_simd(out, q, k, v, att, len, stride, scale, 6, HALF); return 1;      \
    case 112: attention_head_simd(out, q, k, v, att, len, stride, scale, 7, HALF); return 1;     \
    case 128: attention_head_simd(out, q, k, v, att, len, stride, scale, 8, HALF); return 1;     \
    default: return 0;                                                                           \
    }
static int attention_head_f32(float *out, const float *q, const void *k, const void *v, float *att, int len,
                              int stride, int hs, float scale) {
    ATTENTION_SIZES(0)
}
static int attention_head_f16(float *out, const float *q, const void *k, const void *v, float *att, int len,
                              int stride, int hs, float scale) {
    ATTENTION_SIZES(1)
}
#undef ATTENTION_SIZES
#endif

/* attention_head_ref, with the AVX-512 kernels for head sizes 16, 32, ..., 128. */
static void attention_head(float *out, const float *q, const void *k, const void *v, int half, float *att,
                           int len, int stride, int hs, float scale) {
#if HAVE_AVX512
    if (half ? attention_head_f16(out, q, k, v, att, len, stride, hs, scale)
             : attention_head_f32(out, q, k, v, att, len, stride, hs, scale))
        return;
#endif
    attention_head_ref(out, q, k, v, half, att, len, stride, hs, scale);
}

/* argmax_ref, 16 at a time: greedy decoding takes one per token, and the plain loop waits on each
   comparison in turn. The largest value first (NaNs compare false, so they never enter it), then
   the first index holding it. */
static int argmax(const float *x, int n) {
#if HAVE_AVX512
    if (n >= 16 && !isnan(x[0])) {
        __m512 vmax = _mm512_set1_ps(x[0]);
        int i = 0;
        for (; i + 16 <= n; i += 16) {
            __m512 v = _mm512_loadu_ps(x + i);
            vmax = _mm512_mask_mov_ps(vmax, _mm512_cmp_ps_mask(v, vmax, _CMP_GT_OQ), v);
        }
        float m = _mm512_reduce_max_ps(vmax);
        for (; i < n; i++)
            if (x[i] > m) m = x[i];
        __m512 vm = _mm512_set1_ps(m);
        for (i = 0; i + 16 <= n; i += 16) {
            __mmask16 eq = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), vm, _CMP_EQ_OQ);
            if (eq) return i + __builtin_ctz((unsigned)eq);
        }
        for (; i < n; i++)
            if (x[i] == m) return i;
    }
#endif
    return argmax_ref(x, n);
}
