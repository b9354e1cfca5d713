/* Checks run.c's fast kernels against their plain-C references on odd sizes, and times them.

     engine_kernels check          fp32 matmul within a rounding bound of matmul_f32_ref, int8
                                   matmul and the activation quantizer bit-identical to their
                                   references, attention within 1e-5, over many odd shapes; exp,
                                   softmax, SwiGLU and RMSNorm within a few ulp; fp16 conversions,
                                   argmax and the top-p shortcut exactly;
                                   prints one line per failure and exits 1 if there is any
     engine_kernels time D M N     ms per call and GB/s of weights for (D, M) matrices, N tokens
     engine_kernels sample T K P DRAWS L0 L1 ...
                                   draws DRAWS tokens from logits L0 L1 ... with temperature T,
                                   top-k K, top-p P (the CLI's sampler, seed 1); prints the count
                                   of each token
   tests/test_engine.py builds it with the plain, sanitizer and native (-march=native -fopenmp)
   flags: make runomp BIN=tests/engine_kernels SRC=tests/engine_kernels.c */
#define TESTING
#pragma GCC diagnostic ignored "-Wunused-function" /* main()'s helpers are not all used */
#include "../run.c"

static uint64_t rng = 88172645463325252ull;

static float frand(void) { /* uniform in [-1, 1) */
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((rng >> 40) & 0xffffff) / 8388608.0f - 1.0f;
}

static void fill(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] = frand();
}

/* Quantizes a (d, m) matrix the way export.py does. */
static void quantize_matrix(int8_t *q, float *s, const float *w, int d, int m, int gs) {
    int32_t *sums = xmalloc((size_t)d * (m / gs) * sizeof(int32_t));
    quantize_rows(q, s, sums, w, d, m, gs);
    free(sums);
}

/* |a - b| within ulps units in the last place of b (both NaN, or equal, also pass). */
static int close_ulps(float a, float b, float ulps) {
    if (isnan(a) || isnan(b)) return isnan(a) && isnan(b);
    if (a == b) return 1;
    if (isinf(a) || isinf(b)) return 0;
    float ulp = fabsf(nextafterf(b, INFINITY) - b);
    if (ulp < 1.4e-45f) ulp = 1.4e-45f;
    return fabsf(a - b) <= ulps * ulp;
}

/* The KV cache's fp16 conversions: f32_to_f16 against the CPU's conversion instruction for every
   float bit pattern and f16_to_f32 for every half (AVX-512 builds), and everywhere: round trips of
   every half, rounding to even at ties, overflow to infinity and subnormals. */
static int check_f16(void) {
    int failures = 0;
    for (uint32_t h = 0; h < 65536; h++) { /* every half survives a round trip (NaNs stay NaN) */
        float f = f16_to_f32((uint16_t)h);
        uint16_t back = f32_to_f16(f);
        int nan = (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu);
        if (nan ? !isnan(f) || back != (h | 0x200u) : back != h) { /* NaNs come back quiet */
            if (failures++ < 5) printf("f16 round trip: %04x -> %.9g -> %04x\n", (unsigned)h, f, (unsigned)back);
        }
    }
    const struct { float f; uint16_t h; } known[] = {
        {1.0f, 0x3c00}, {-2.0f, 0xc000}, {65504.0f, 0x7bff}, {65519.99f, 0x7bff}, {65520.0f, 0x7c00},
        {1e9f, 0x7c00}, {1.0f + 0x1p-11f, 0x3c00}, {1.0f + 3 * 0x1p-11f, 0x3c02}, {0x1p-24f, 0x0001},
        {0x1p-25f, 0x0000}, {0x1.8p-25f, 0x0001}, {0x1.8p-24f, 0x0002}, {0x1p-14f, 0x0400}, {-0.0f, 0x8000},
        {INFINITY, 0x7c00}, {-INFINITY, 0xfc00}};
    for (size_t i = 0; i < sizeof known / sizeof *known; i++)
        if (f32_to_f16(known[i].f) != known[i].h) {
            printf("f32_to_f16(%a) = %04x, want %04x\n", known[i].f, (unsigned)f32_to_f16(known[i].f), (unsigned)known[i].h);
            failures++;
        }
#if HAVE_AVX512
    enum { N = 1 << 16 };
    static float in[N];
    static uint16_t hw[N];
    /* all 2^32 floats, N at a time (5 s); the sanitizer build, 20x slower and there to catch
       memory errors, takes every 61st pattern (61 is odd and prime to the mantissa's fields) */
#if defined(__SANITIZE_ADDRESS__)
    const uint32_t step = 61;
#else
    const uint32_t step = 1;
#endif
    for (uint64_t base = 0; base < (1ull << 32); base += (uint64_t)N * step) {
        for (uint32_t i = 0; i < N; i++) {
            uint32_t x = (uint32_t)(base + (uint64_t)i * step);
            memcpy(&in[i], &x, sizeof x);
        }
        for (uint32_t i = 0; i < N; i += 16) /* the instruction */
            _mm256_storeu_si256((__m256i *)(void *)(hw + i),
                                _mm512_cvtps_ph(_mm512_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        for (uint32_t i = 0; i < N; i++)
            if (f32_to_f16(in[i]) != hw[i] && failures++ < 10)
                printf("f32_to_f16(%08x) = %04x, the CPU gives %04x\n", (unsigned)(base + (uint64_t)i * step),
                       (unsigned)f32_to_f16(in[i]), (unsigned)hw[i]);
    }
    for (uint32_t h = 0; h < 65536; h += 16) {
        uint16_t hv[16];
        float want[16];
        for (int j = 0; j < 16; j++) hv[j] = (uint16_t)(h + (uint32_t)j);
        _mm512_storeu_ps(want, kv_load16(hv, 0, 1));
        for (int j = 0; j < 16; j++) {
            float got = f16_to_f32(hv[j]);
            if (memcmp(&got, &want[j], sizeof got) != 0 && failures++ < 10)
                printf("f16_to_f32(%04x) = %a, the CPU gives %a\n", (unsigned)hv[j], got, want[j]);
        }
    }
#endif
    return failures;
}

/* argmax against argmax_ref: random lengths, ties (the first index must win), +0 and -0,
   infinities and NaNs anywhere, including first. */
static int check_argmax(void) {
    int failures = 0;
    float x[300];
    for (int trial = 0; trial < 4000; trial++) {
        int n = 1 + (int)((frand() + 1.0f) * 149.5f); /* 1 .. 300 */
        for (int i = 0; i < n; i++) x[i] = (float)(int)(frand() * 4.0f); /* few values: many ties */
        int specials = trial % 5;
        for (int k = 0; k < specials; k++) {
            const float sp[5] = {NAN, INFINITY, -INFINITY, 0.0f, -0.0f};
            x[(int)((frand() + 1.0f) * 0.5f * (n - 1))] = sp[(trial / 5 + k) % 5];
        }
        if (trial % 97 == 0) x[0] = NAN;
        int fast = argmax(x, n), ref = argmax_ref(x, n);
        if (fast != ref && failures++ < 5) printf("argmax n=%d: fast %d ref %d\n", n, fast, ref);
    }
    return failures;
}

/* The sampler's top-p shortcut (sort only the most likely candidates) against sorting all of
   them: the same token for the same random state, over vocabularies of 100-3000 whose nucleus
   ranges from one token to most of them. */
static int check_top_p(void) {
    int failures = 0;
    enum { VMAX = 3000 };
    static float logits[VMAX], a[VMAX], b[VMAX];
    const float top_ps[4] = {0.3f, 0.9f, 0.99f, 0.999f};
    for (int trial = 0; trial < 600; trial++) {
        int n = 100 + (int)((frand() + 1.0f) * 0.5f * (VMAX - 100));
        float spread = 0.25f + 4.0f * (frand() + 1.0f); /* flat to sharply peaked */
        for (int i = 0; i < n; i++) logits[i] = spread * frand() * fabsf(frand());
        Sampler fast, ref;
        sampler_init(&fast, n, 1.0f, top_ps[trial % 4], 0, 1000 + (uint64_t)trial);
        sampler_init(&ref, n, 1.0f, top_ps[trial % 4], 0, 1000 + (uint64_t)trial);
        ref.sort_all = 1;
        for (int draw = 0; draw < 5; draw++) {
            memcpy(a, logits, (size_t)n * sizeof(float));
            memcpy(b, logits, (size_t)n * sizeof(float));
            int x = sampler_sample(&fast, a), y = sampler_sample(&ref, b);
            if (x != y && failures++ < 5)
                printf("top-p %g n=%d spread %g: shortcut %d, full sort %d\n", top_ps[trial % 4], n, spread, x, y);
        }
        sampler_free(&fast);
        sampler_free(&ref);
    }
    return failures;
}

/* The element-wise kernels beside their plain forms: exp (AVX-512 builds), softmax, SwiGLU's
   gate and RMSNorm, on odd lengths and extreme values. */
static int check_elementwise(void) {
    int failures = 0;
#if HAVE_AVX512
    {   /* exp16_ps within 2 ulp of expf from far underflow to overflow, and at the special values */
        enum { N = 4096 };
        float x[N + 16], fast[N + 16];
        for (int i = 0; i < N; i++) x[i] = -110.0f + 200.0f * (float)i / N + 1e-3f * frand();
        const float special[16] = {0.0f, -0.0f, INFINITY, -INFINITY, NAN, 88.7f, 88.73f, -87.3f,
                                   -103.9f, -104.5f, 1e-8f, -1e-8f, 0.6931472f, -0.3465736f, 0.3465736f, 1.0f};
        memcpy(x + N, special, sizeof special);
        for (int i = 0; i < N + 16; i += 16) _mm512_storeu_ps(fast + i, exp16_ps(_mm512_loadu_ps(x + i)));
        for (int i = 0; i < N + 16; i++)
            if (!close_ulps(fast[i], expf(x[i]), 2.0f)) {
                printf("exp16_ps(%.9g) = %.9g, expf %.9g\n", x[i], fast[i], expf(x[i]));
                failures++;
                break;
            }
    }
    {   /* softmax16 against softmax, lengths with and without a tail, a wide range of scores */
        const int lens[] = {1, 2, 15, 16, 17, 100, 1000};
        for (size_t a = 0; a < sizeof lens / sizeof *lens; a++) {
            int n = lens[a];
            float *fast = xmalloc((size_t)n * sizeof(float)), *ref = xmalloc((size_t)n * sizeof(float));
            for (int i = 0; i < n; i++) fast[i] = ref[i] = 30.0f * frand();
            softmax16(fast, n);
            softmax(ref, n);
            for (int i = 0; i < n; i++)
                if (!(fabsf(fast[i] - ref[i]) <= 1e-6f * ref[i] + 1e-30f)) {
                    printf("softmax n=%d: [%d] fast %.9g ref %.9g\n", n, i, fast[i], ref[i]);
                    failures++;
                    break;
                }
            free(ref);
            free(fast);
        }
    }
#endif
    {   /* swiglu and rmsnorm against their formulas in double */
        enum { N = 301 };
        float g[N], u[N], out[N], gain[N];
        for (int i = 0; i < N; i++) {
            g[i] = 12.0f * frand();
            u[i] = frand();
            gain[i] = 1.0f + frand();
        }
        g[0] = -100.0f, g[1] = 100.0f, g[2] = 0.0f;
        memcpy(out, g, sizeof g);
        swiglu(out, u, N);
        for (int i = 0; i < N; i++) {
            double want = (double)g[i] / (1.0 + exp(-(double)g[i])) * u[i];
            if (!(fabs(out[i] - want) <= 1e-6 * fabs(want) + 1e-30)) {
                printf("swiglu: [%d] g %.9g u %.9g: %.9g, want %.9g\n", i, g[i], u[i], out[i], want);
                failures++;
                break;
            }
        }
        for (int n = 1; n <= N; n += 20) {
            rmsnorm(out, g, gain, n, 1e-5f);
            double ss = 0.0;
            for (int i = 0; i < n; i++) ss += (double)g[i] * g[i];
            double inv = 1.0 / sqrt(ss / n + 1e-5);
            for (int i = 0; i < n; i++)
                if (!(fabs(out[i] - g[i] * inv * gain[i]) <= 1e-6 * fabs(g[i] * inv * gain[i]) + 1e-30)) {
                    printf("rmsnorm n=%d: [%d] %.9g, want %.9g\n", n, i, out[i], g[i] * inv * gain[i]);
                    failures++;
                    break;
                }
        }
    }
    return failures;
}

/* Activations that overflowed or underflowed (docs/fuzzing.md, finding 2): NaN, +-inf, huge and
   subnormal values quantize to the same bytes, scales and sums on both paths, every q stays in
   [-127, 127], and the int8 product over them runs without overflow (the sanitizer builds check). */
static int check_quantize_hostile(void) {
    const float odd[] = {NAN, INFINITY, -INFINITY, 3.0e38f, -3.0e38f, 1e-40f, -1e-44f, 0.0f, -0.0f, 1.0f};
    int failures = 0, n = 3, m = 64, d = 33, gs = 32, groups = m / gs;
    float *x = xmalloc((size_t)n * m * sizeof(float)), *w = xmalloc((size_t)d * m * sizeof(float));
    float *xs = xmalloc((size_t)n * groups * sizeof(float)), *rs = xmalloc((size_t)n * groups * sizeof(float));
    float *ws = xmalloc((size_t)d * groups * sizeof(float)), *out = xmalloc((size_t)n * d * sizeof(float));
    int8_t *xq = xmalloc((size_t)n * m), *rq = xmalloc((size_t)n * m), *wq = xmalloc((size_t)d * m);
    int32_t *xsum = xmalloc((size_t)n * groups * sizeof(int32_t)), *rsum = xmalloc((size_t)n * groups * sizeof(int32_t));
    fill(w, (size_t)d * m);
    quantize_matrix(wq, ws, w, d, m, gs);
    for (size_t k = 0; k < sizeof odd / sizeof *odd; k++) {
        fill(x, (size_t)n * m);
        for (int i = 0; i < n * m; i += 3 + (int)k) x[i] = odd[(i + k) % (sizeof odd / sizeof *odd)];
        if (k % 2) for (int i = 0; i < m; i++) x[i] = 1e-42f * (float)(i % 7); /* a subnormal group */
        quantize_rows(xq, xs, xsum, x, n, m, gs);
        quantize_rows_ref(rq, rs, rsum, x, n, m, gs);
        int bad = memcmp(rq, xq, (size_t)n * m) || memcmp(rs, xs, (size_t)n * groups * sizeof(float)) ||
                  memcmp(rsum, xsum, (size_t)n * groups * sizeof(int32_t));
        for (int i = 0; i < n * m; i++) bad |= xq[i] < -127;
        for (int g = 0; g < n * groups; g++) bad |= xsum[g] < -127 * gs || xsum[g] > 127 * gs;
        if (bad && failures++ < 5) printf("quantize of non-finite/subnormal input %zu: paths differ or q out of range\n", k);
        matmul_q8(out, xq, xs, xsum, wq, ws, n, d, m, gs);
    }
    free(rsum); free(xsum); free(wq); free(rq); free(xq); free(out); free(ws); free(rs); free(xs); free(w); free(x);
    return failures;
}

/* bf16 products: the widening kernel (decode, and prefill without AVX512-BF16) against
   matmul_bf16_ref within fp32's FMA bound; with AVX512-BF16, the vdpbf16ps prefill kernel within
   that bound plus the activations' rounding (each |x| <= 1 rounds by at most 2^-9 of itself, and
   |w| <= 1, so a sum of m terms moves by at most m * 2^-9). fast and ref are n * d scratch. */
static int check_bf16_product(const float *w, const float *x, float *fast, float *ref, int n, int d, int m) {
    int failures = 0;
    uint16_t *wb = xmalloc((size_t)d * m * sizeof(uint16_t));
    uint16_t *xb = xmalloc((size_t)n * m * sizeof(uint16_t));
    for (size_t i = 0; i < (size_t)d * m; i++) wb[i] = f32_to_bf16(w[i]);
    matmul_bf16_ref(ref, x, wb, n, d, m);
    float tol = 4.0f * (float)m * (float)m * 5.97e-8f + 1e-7f;
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1) {
#if HAVE_AVX512BF16
            round_rows_bf16(xb, x, n, m);
            tol += (float)m * 0x1p-9f;
#else
            break;
#endif
        }
        matmul_bf16(fast, x, pass ? xb : NULL, wb, n, d, m);
        for (int i = 0; i < n * d; i++)
            if (!(fabsf(fast[i] - ref[i]) <= tol)) {
                printf("bf16 %s d=%d m=%d n=%d: out[%d] fast %.9g ref %.9g\n", pass ? "vdpbf16ps" : "widened", d, m,
                       n, i, fast[i], ref[i]);
                failures++;
                break;
            }
    }
    free(xb);
    free(wb);
    return failures;
}

/* f32_to_bf16 rounds to nearest even: known values everywhere, and with AVX512-BF16 the CPU's
   conversion instruction for a sweep of float patterns (the instruction flushes subnormal inputs
   to zero, so those are left out; activations that small change nothing). */
static int check_bf16_conversion(void) {
    int failures = 0;
    const struct { float f; uint16_t b; } known[] = {
        {1.0f, 0x3f80}, {-2.0f, 0xc000}, {1.0f + 0x1p-8f, 0x3f80}, {1.0f + 0x1p-7f, 0x3f81},
        {1.0f + 0x1.8p-7f, 0x3f82}, {1.0f + 0x1.8p-8f, 0x3f81}, {3.4028235e38f, 0x7f80}, {INFINITY, 0x7f80},
        {-INFINITY, 0xff80}, {0x1p-133f, 0x0001}, {0x1p-134f, 0x0000}, {0x1.8p-133f, 0x0002}, {-0.0f, 0x8000}};
    for (size_t i = 0; i < sizeof known / sizeof *known; i++)
        if (f32_to_bf16(known[i].f) != known[i].b) {
            printf("f32_to_bf16(%a) = %04x, want %04x\n", known[i].f, (unsigned)f32_to_bf16(known[i].f),
                   (unsigned)known[i].b);
            failures++;
        }
    if (!isnan(bf16_to_f32(f32_to_bf16(NAN)))) {
        printf("f32_to_bf16(NaN) is not a NaN\n");
        failures++;
    }
#if HAVE_AVX512BF16
    enum { N = 1 << 12 };
    float in[N];
    uint16_t hw[N];
    const uint32_t step = 4099; /* odd, so every mantissa pattern's low bits come round */
    for (uint64_t base = 0; base < (1ull << 32); base += (uint64_t)N * step) {
        int k = 0;
        for (uint32_t i = 0; i < N; i++) {
            uint32_t u = (uint32_t)(base + (uint64_t)i * step), e = u & 0x7f800000u;
            if (e == 0 || e == 0x7f800000u) continue; /* subnormals, infinities and NaNs: above */
            memcpy(&in[k++], &u, sizeof u);
        }
        for (; k % 16; k++) in[k] = 0.0f;
        for (int i = 0; i < k; i += 16)
            _mm256_storeu_si256((__m256i *)(void *)(hw + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(in + i)));
        for (int i = 0; i < k; i++)
            if (f32_to_bf16(in[i]) != hw[i] && failures++ < 10)
                printf("f32_to_bf16(%a) = %04x, the CPU gives %04x\n", in[i], (unsigned)f32_to_bf16(in[i]),
                       (unsigned)hw[i]);
    }
#endif
    return failures;
}

static int check(void) {
    int failures = check_elementwise();
    const int ds[] = {1, 3, 4, 5, 17, 64, 301};
    const int ms[] = {1, 2, 15, 16, 17, 36, 96, 100, 192, 256, 301};
    const int ns[] = {1, 2, 3, 4, 5, 9, 64};
    for (size_t a = 0; a < sizeof ds / sizeof *ds; a++)
        for (size_t b = 0; b < sizeof ms / sizeof *ms; b++)
            for (size_t c = 0; c < sizeof ns / sizeof *ns; c++) {
                int d = ds[a], m = ms[b], n = ns[c];
                float *w = xmalloc((size_t)d * m * sizeof(float));
                float *x = xmalloc((size_t)n * m * sizeof(float));
                float *fast = xmalloc((size_t)n * d * sizeof(float));
                float *ref = xmalloc((size_t)n * d * sizeof(float));
                fill(w, (size_t)d * m);
                fill(x, (size_t)n * m);
                matmul_f32(fast, x, w, n, d, m);
                matmul_f32_ref(ref, x, w, n, d, m);
                for (int i = 0; i < n * d; i++) {
                    /* FMA vs separate multiply-add: each of m terms (|term| <= 1) may round
                       differently, by at most 2^-24 of the running sum's magnitude (<= m). */
                    float tol = 4.0f * (float)m * (float)m * 5.97e-8f + 1e-7f;
                    if (!(fabsf(fast[i] - ref[i]) <= tol)) {
                        printf("fp32 d=%d m=%d n=%d: out[%d] fast %.9g ref %.9g\n", d, m, n, i, fast[i], ref[i]);
                        failures++;
                        break;
                    }
                }
                failures += check_bf16_product(w, x, fast, ref, n, d, m);
                /* int8: every group size that divides m (the file format's constraint) */
                for (int gs = 1; gs <= m; gs++) {
                    if (m % gs || (gs & (gs - 1) && gs % 16)) continue; /* powers of two and x16 */
                    int groups = m / gs;
                    int8_t *wq = xmalloc((size_t)d * m), *xq = xmalloc((size_t)n * m);
                    float *ws = xmalloc((size_t)d * groups * sizeof(float));
                    float *xs = xmalloc((size_t)n * groups * sizeof(float));
                    int32_t *xsum = xmalloc((size_t)n * groups * sizeof(int32_t));
                    quantize_matrix(wq, ws, w, d, m, gs);
                    quantize_rows(xq, xs, xsum, x, n, m, gs);
                    {   /* the fast quantizer gives the reference's bytes, scales and sums */
                        int8_t *rq = xmalloc((size_t)n * m);
                        float *rs = xmalloc((size_t)n * groups * sizeof(float));
                        int32_t *rsum = xmalloc((size_t)n * groups * sizeof(int32_t));
                        quantize_rows_ref(rq, rs, rsum, x, n, m, gs);
                        if (memcmp(rq, xq, (size_t)n * m) || memcmp(rs, xs, (size_t)n * groups * sizeof(float)) ||
                            memcmp(rsum, xsum, (size_t)n * groups * sizeof(int32_t))) {
                            printf("quantize n=%d m=%d gs=%d: fast and reference differ\n", n, m, gs);
                            failures++;
                        }
                        free(rsum);
                        free(rs);
                        free(rq);
                    }
                    matmul_q8(fast, xq, xs, xsum, wq, ws, n, d, m, gs);
                    matmul_q8_ref(ref, xq, xs, wq, ws, n, d, m, gs);
                    if (memcmp(fast, ref, (size_t)n * d * sizeof(float)) != 0) {
                        printf("int8 d=%d m=%d n=%d gs=%d: fast and reference differ\n", d, m, n, gs);
                        failures++;
                    }
                    free(xsum);
                    free(xs);
                    free(ws);
                    free(xq);
                    free(wq);
                }
                free(ref);
                free(fast);
                free(x);
                free(w);
            }
    /* attention: head sizes with and without a SIMD path, cached keys/values strided as in the
       KV cache (several heads per row), in fp32 and fp16 caches */
    const int hss[] = {2, 6, 16, 32, 48, 64, 128};
    const int lens[] = {1, 2, 5, 37, 200};
    for (int half = 0; half < 2; half++)
        for (size_t a = 0; a < sizeof hss / sizeof *hss; a++)
            for (size_t b = 0; b < sizeof lens / sizeof *lens; b++) {
                int hs = hss[a], len = lens[b], stride = 3 * hs;
                size_t n = (size_t)len * stride;
                float *q = xmalloc((size_t)hs * sizeof(float));
                float *k = xmalloc(n * sizeof(float)), *v = xmalloc(n * sizeof(float));
                uint16_t *k16 = xmalloc(n * sizeof(uint16_t)), *v16 = xmalloc(n * sizeof(uint16_t));
                float *att = xmalloc((size_t)len * sizeof(float));
                float *fast = xmalloc((size_t)hs * sizeof(float)), *ref = xmalloc((size_t)hs * sizeof(float));
                fill(q, (size_t)hs);
                fill(k, n);
                fill(v, n);
                kv_store_f16(k16, k, n);
                kv_store_f16(v16, v, n);
                const void *kk = half ? (const void *)(k16 + hs) : (const void *)(k + hs);
                const void *vv = half ? (const void *)(v16 + hs) : (const void *)(v + hs);
                float scale = 1.0f / sqrtf((float)hs);
                attention_head(fast, q, kk, vv, half, att, len, stride, hs, scale);
                attention_head_ref(ref, q, kk, vv, half, att, len, stride, hs, scale);
                for (int j = 0; j < hs; j++) {
                    /* |v| <= 1 and the weights sum to 1: FMA rounding differences stay ~1e-6 */
                    if (!(fabsf(fast[j] - ref[j]) <= 1e-5f)) {
                        printf("attention %s hs=%d len=%d: out[%d] fast %.9g ref %.9g\n", half ? "f16" : "f32", hs,
                               len, j, fast[j], ref[j]);
                        failures++;
                        break;
                    }
                }
                free(ref); free(fast); free(att); free(v16); free(k16); free(v); free(k); free(q);
            }
    failures += check_f16();
    failures += check_bf16_conversion();
    failures += check_quantize_hostile();
    failures += check_argmax();
    failures += check_top_p();
    printf("%s: %d failure(s)\n", failures ? "FAIL" : "ok", failures);
    return failures ? 1 : 0;
}

static void time_kernels(int d, int m, int n) {
    int gs = m % 64 == 0 ? 64 : 32;
    float *w = xmalloc_aligned((size_t)d * m * sizeof(float));
    float *x = xmalloc_aligned((size_t)n * m * sizeof(float));
    float *out = xmalloc_aligned((size_t)n * d * sizeof(float));
    int8_t *wq = xmalloc_aligned((size_t)d * m), *xq = xmalloc_aligned((size_t)n * m);
    float *ws = xmalloc_aligned((size_t)d * (m / gs) * sizeof(float));
    float *xs = xmalloc_aligned((size_t)n * (m / gs) * sizeof(float));
    int32_t *xsum = xmalloc_aligned((size_t)n * (m / gs) * sizeof(int32_t));
    fill(w, (size_t)d * m);
    fill(x, (size_t)n * m);
    quantize_matrix(wq, ws, w, d, m, gs);
    quantize_rows(xq, xs, xsum, x, n, m, gs);
    /* the engine packs int8 matrices once at load: time the product on a packed copy, not the
       packing that matmul_q8 does on every call */
    Matrix wm = {.q = wq, .s = ws};
    void *packed = q8_packable(gs) ? xmalloc_aligned(q8_packed_bytes(d, m, gs)) : NULL;
    if (packed) q8_pack(&wm, packed, d, m, gs);
    int rows = q8_block_rows(&wm), blocks = (d + rows - 1) / rows;
    for (int k = 0; k < 4; k++) {
        const char *name[4] = {"f32", "f32_ref", "q8", "q8_ref"};
        int reps = 0;
        double t0 = time_now_s(), t1;
        do {
            if (k == 0) matmul_f32(out, x, w, n, d, m);
            if (k == 1) matmul_f32_ref(out, x, w, n, d, m);
            if (k == 2) {
                int b;
                OMP_PARALLEL_FOR
                for (b = 0; b < blocks; b++) block_q8(out, xq, xs, xsum, &wm, n, d, m, gs, rows * b);
            }
            if (k == 3) matmul_q8_ref(out, xq, xs, wq, ws, n, d, m, gs);
            reps++;
            t1 = time_now_s();
        } while (t1 - t0 < 0.3);
        double ms = (t1 - t0) / reps * 1e3;
        double bytes = k < 2 ? 4.0 * d * m : (double)d * m * (1.0 + 4.0 / gs);
        printf("%-8s d=%d m=%d n=%d: %8.3f ms  %6.1f GB/s  %6.1f GFLOP/s\n", name[k], d, m, n, ms,
               bytes / ms * 1e-6, 2.0 * d * m * n / ms * 1e-6);
    }
    free(packed); free(xsum); free(xs); free(ws); free(xq); free(wq); free(out); free(x); free(w);
}

int main(int argc, char **argv) {
    if (argc == 2 && strcmp(argv[1], "check") == 0) return check();
    if (argc >= 7 && strcmp(argv[1], "sample") == 0) {
        int n = argc - 6, draws = atoi(argv[5]);
        float *logits = xmalloc((size_t)n * sizeof(float)), *scratch = xmalloc((size_t)n * sizeof(float));
        int *counts = xcalloc((size_t)n, sizeof(int));
        for (int i = 0; i < n; i++) logits[i] = strtof(argv[6 + i], NULL);
        Sampler sampler;
        sampler_init(&sampler, n, strtof(argv[2], NULL), strtof(argv[4], NULL), atoi(argv[3]), 1);
        for (int r = 0; r < draws; r++) {
            memcpy(scratch, logits, (size_t)n * sizeof(float));
            counts[sampler_sample(&sampler, scratch)]++;
        }
        for (int i = 0; i < n; i++) printf(i ? " %d" : "%d", counts[i]);
        printf("\n");
        sampler_free(&sampler);
        free(counts);
        free(scratch);
        free(logits);
        return 0;
    }
    if (argc == 5 && strcmp(argv[1], "time") == 0) {
        time_kernels(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]));
        return 0;
    }
    fprintf(stderr, "usage: engine_kernels check | time D M N | sample T K P DRAWS LOGITS...\n");
    return 2;
}
