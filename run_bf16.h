/* bf16 weights: conversions, the plain reference products and their AVX-512 kernels.
   #included by run_kernels.h after its fp32 kernels (it uses hsum16_ps from there, dot_f32_ref's
   order, and the conversions in run_f16.h).

   A bf16 value is the top half of an fp32 one (docs/formats.md, weight type bf16), so widening is
   a 16-bit shift. Two products, chosen by what bounds them:
   - one token (decode) is bound by memory: each weight is widened to fp32 in registers and the sum
     runs in dot_f32_ref's order, so the result is exactly the fp32 product on the rounded weights,
     from half the bytes;
   - a block of tokens (prefill) is bound by arithmetic: with AVX512-BF16 the activations are
     rounded to bf16 as well and vdpbf16ps does two products per lane per instruction, twice the
     fp32 FMA rate, at the cost of the activations' rounding (the test states its tolerance).
     Everywhere else prefill widens the weights like decode and gives the exact fp32 result. */

/* x . w with w in bf16, in dot_f32_ref's order: the plain reference of the decode kernel. */
static float dot_bf16_ref(const float *x, const uint16_t *w, int m) {
    float acc[16] = {0};
    int i = 0;
    for (; i + 16 <= m; i += 16)
        for (int k = 0; k < 16; k++) acc[k] += x[i + k] * bf16_to_f32(w[i + k]);
    for (int k = 0; i < m; i++, k++) acc[k] += x[i] * bf16_to_f32(w[i]);
    for (int s = 8; s >= 1; s /= 2)
        for (int k = 0; k < s; k++) acc[k] += acc[k + s];
    return acc[0];
}

/* out (n, d) = x (n, m) @ W^T, W (d, m) bf16: the plain reference (not static: tests call it). */
void matmul_bf16_ref(float *out, const float *x, const uint16_t *w, int n, int d, int m) {
    int i;
    OMP_PARALLEL_FOR
    for (i = 0; i < d; i++)
        for (int t = 0; t < n; t++) out[(size_t)t * d + i] = dot_bf16_ref(x + (size_t)t * m, w + (size_t)i * m, m);
}


#if HAVE_AVX512
/* 16 bf16 weights widened to fp32. */
static inline __attribute__((always_inline)) __m512 load16_bf16(const uint16_t *p) {
    __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __attribute__((always_inline)) __m512 maskz_load16_bf16(__mmask16 k, const uint16_t *p) {
    __m256i h = _mm256_maskz_loadu_epi16(k, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* tile_f32 with widened bf16 weights: R rows x T tokens (R, T <= 4), the same order of sums. */
static inline __attribute__((always_inline)) void tile_bf16(float *out, const float *x, const uint16_t *w,
                                                            int d, int m, int R, int T) {
    TILE_BODY(load16_bf16, maskz_load16_bf16);
}

#if defined(__AVX512BF16__)
#define HAVE_AVX512BF16 1
/* R rows x T tokens with both sides in bf16: each vdpbf16ps adds 32 products into 16 lanes. */
static inline __attribute__((always_inline)) void tile_bf16_dp(float *out, const uint16_t *xb, const uint16_t *w,
                                                               int d, int m, int R, int T) {
    __m512 acc[4][4];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_ps();
    int i = 0;
    for (; i + 32 <= m; i += 32) {
        __m512bh wv[4], xv[4];
        for (int r = 0; r < R; r++) wv[r] = (__m512bh)_mm512_loadu_si512(w + (size_t)r * m + i);
        for (int t = 0; t < T; t++) xv[t] = (__m512bh)_mm512_loadu_si512(xb + (size_t)t * m + i);
        for (int r = 0; r < R; r++)
            for (int t = 0; t < T; t++) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv[r], xv[t]);
    }
    if (i < m) { /* zeros past the end add nothing */
        __mmask32 k = (__mmask32)((1ull << (m - i)) - 1);
        __m512bh wv[4], xv[4];
        for (int r = 0; r < R; r++) wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(k, w + (size_t)r * m + i);
        for (int t = 0; t < T; t++) xv[t] = (__m512bh)_mm512_maskz_loadu_epi16(k, xb + (size_t)t * m + i);
        for (int r = 0; r < R; r++)
            for (int t = 0; t < T; t++) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv[r], xv[t]);
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) out[(size_t)t * d + r] = _mm512_reduce_add_ps(acc[r][t]);
}
#endif
#endif

/* x (n, m) rounded to bf16 into xb for the vdpbf16ps prefill, a row per thread; a no-op where the
   CPU has no AVX512-BF16 (block_bf16 then widens the weights instead). */
static void round_rows_bf16(uint16_t *xb, const float *x, int n, int m) {
#if HAVE_AVX512BF16
    int t;
    OMP_PARALLEL_FOR
    for (t = 0; t < n; t++) {
        const float *src = x + (size_t)t * m;
        uint16_t *dst = xb + (size_t)t * m;
        int i = 0;
        for (; i + 16 <= m; i += 16)
            _mm256_storeu_si256((__m256i *)(dst + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
        for (; i < m; i++) dst[i] = f32_to_bf16(src[i]);
    }
#else
    (void)xb, (void)x, (void)n, (void)m;
#endif
}

/* Tokens below this many use the widening kernel even where vdpbf16ps exists: a block this
   small is still bound by reading the weights, and widening keeps it exact. */
#define BF16_DP_MIN_TOKENS 8

/* Rows [i0, i0+4) (fewer at the end) of out (n, d) = x (n, m) @ W^T, W (d, m) bf16: the unit of
   work threads share, like block_f32. xb is x rounded to bf16 (round_rows_bf16), read only when the
   vdpbf16ps path runs (n >= BF16_DP_MIN_TOKENS on a CPU with AVX512-BF16); it may be NULL below. */
static void block_bf16(float *out, const float *x, const uint16_t *xb, const uint16_t *w, int n, int d, int m,
                       int i0) {
    const uint16_t *wr = w + (size_t)i0 * m;
    float *o = out + i0;
    int R = d - i0 < 4 ? d - i0 : 4;
#if HAVE_AVX512BF16
    if (xb && n >= BF16_DP_MIN_TOKENS) {
        TILE_ROWS(tile_bf16_dp, o, xb, wr, n, d, m, R);
        return;
    }
#else
    (void)xb;
#endif
#if HAVE_AVX512
    TILE_ROWS(tile_bf16, o, x, wr, n, d, m, R);
#else
    for (int r = 0; r < R; r++)
        for (int t = 0; t < n; t++) o[(size_t)t * d + r] = dot_bf16_ref(x + (size_t)t * m, wr + (size_t)r * m, m);
#endif
}

/* out (n, d) = x @ W^T for bf16 W through block_bf16, threads splitting the rows in blocks of 4:
   the whole-matrix form tests/engine_kernels.c compares with matmul_bf16_ref. */
void matmul_bf16(float *out, const float *x, const uint16_t *xb, const uint16_t *w, int n, int d, int m) {
    int blocks = (d + 3) / 4, b;
    OMP_PARALLEL_FOR
    for (b = 0; b < blocks; b++) block_bf16(out, x, xb, w, n, d, m, 4 * b);
}
