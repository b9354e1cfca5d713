/* run_f16.h: the two half precisions, #included by run.c's plain ops: IEEE fp16 for the fp16 KV
   cache and bf16 for bf16 weights. Plain C; run_kernels.h's kv_store_f16 uses the CPU's
   conversion instructions where it has them, which give the same bits. */

/* IEEE fp16 for the KV cache, round to nearest even: the same bits as the F16C/AVX-512
   conversion instructions for every float (tests/engine_kernels.c checks all 2^32 of them where
   the CPU has them), so every build caches the same values. NaNs come back quiet. */
static uint16_t f32_to_f16(float f) {
    uint32_t x, sign, ax;
    memcpy(&x, &f, sizeof x);
    sign = (x >> 16) & 0x8000u;
    ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((ax >> 13) & 0x3ffu)); /* NaN */
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* >= 65520 rounds to infinity */
    if (ax < 0x33000000u) return (uint16_t)sign;               /* <= 2^-25 / 2 rounds to zero */
    uint32_t r, rem, halfway;
    if (ax < 0x38800000u) { /* below 2^-14: a subnormal half, in units of 2^-24 */
        uint32_t m = (ax & 0x7fffffu) | 0x800000u, shift = 126u - (ax >> 23); /* 14 .. 24 */
        r = m >> shift;
        rem = m & ((1u << shift) - 1u);
        halfway = 1u << (shift - 1u);
    } else {                /* a normal half: rebias the exponent, keep 10 mantissa bits */
        r = (ax >> 13) - (112u << 10);
        rem = ax & 0x1fffu;
        halfway = 0x1000u;
    }
    if (rem > halfway || (rem == halfway && (r & 1u))) r++; /* a carry into the exponent is right */
    return (uint16_t)(sign | r);
}

static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, x;
    if (e == 0x1f) x = sign | 0x7f800000u | (m << 13) | (m ? 0x400000u : 0u); /* inf, quiet NaN */
    else if (e) x = sign | ((e + 112u) << 23) | (m << 13);
    else {
        float f = (float)m * 0x1p-24f; /* zero or subnormal: exact */
        return sign ? -f : f;
    }
    float f;
    memcpy(&f, &x, sizeof f);
    return f;
}

/* bf16 bits -> float: bf16 is the top half of an fp32 value, so this is exact. */
static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* float -> bf16 bits, rounded to nearest even like PyTorch's .to(torch.bfloat16) and the
   AVX512-BF16 conversion instruction; a NaN stays a (quiet) NaN. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
