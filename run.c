/* run.c: inference for small Llama models in the llama2.c family, in one C99 file.

   What it does: loads a model file (llama2.c legacy version 0, versions 1 and 2, and our version 3
   which holds fp32 or int8 weights; docs/formats.md has every layout) through mmap after checking
   every header field and the exact file size, runs the transformer (RMSNorm, rotary embeddings,
   grouped-query attention with a KV cache, SwiGLU; the prompt in blocks of up to BLOCK_MAX = 256
   tokens as matrix-matrix products, then one token at a time), samples (greedy, temperature,
   top-k, top-p) and streams UTF-8 text. llama2.c's own version 2 files whose int8 groups run
   across the row ends of w2 (its 42M shape) are regrouped exactly at load time
   (weights_regroup_w2); every file is refused, naming the tensor, if a weight is NaN or infinite.
   What it does not do: training, batching several prompts, GPUs, or any format conversion
   (export.py writes every format this reads).

   This file reads top to bottom as the model, with plain loops; the AVX-512 / AVX512-VNNI kernels
   and load-time repacking (run_kernels.h), the IEEE fp16 conversions (run_f16.h), the thread
   choices (run_threads.h) and the tokenizer (run_tok.c) are #included where the model needs them,
   so the build is still one command.

   Build:  cc -O3 -o run run.c -lm   (what `make run` does: portable, plain loops, one thread)
           make runomp     (OpenMP threads and -march=native: the fast build)
           make runfast    (-march=native, one thread)   make runsan   (address + UB sanitizers)
   tests/test_engine.py runs four builds against model.py: plain, sanitizers, native, and the
   sanitizers on the native kernels.
   Use:    ./run out/model.bin -i "从前" -n 200 -t 0.8
           ./run -m encode -z data/tok5000.bin -i "从前"      (token ids, no model needed)
   A test harness can `#define TESTING` and `#include "run.c"` to reach everything but main(). */

#define _DEFAULT_SOURCE /* mmap, fstat, clock_gettime under -std=c99 */
#define _GNU_SOURCE     /* sched_setaffinity and the CPU_* macros (pin_threads) */
#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#define OMP_PARALLEL_FOR _Pragma("omp parallel for schedule(static)")
#else
#define OMP_PARALLEL_FOR /* single-threaded build */
#endif

/* ----------------------------------------------------------------------------------------------
   utilities */

/* One "run: ..." line on stderr; fatal and usage_error share it. */
static void report_line(const char *fmt, va_list ap) {
    fputs("run: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
}

/* Prints one line to stderr and exits: every user-facing error goes through here. */
static void fatal(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    report_line(fmt, ap);
    va_end(ap);
    fflush(stdout);
    exit(EXIT_FAILURE);
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) fatal("out of memory allocating %zu bytes", n);
    return p;
}

static void *xcalloc(size_t count, size_t size) {
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p) fatal("out of memory allocating %zu x %zu bytes", count, size);
    return p;
}

/* Allocation aligned to 64 bytes (a cache line, an AVX-512 register), freed with free(). */
static void *xmalloc_aligned(size_t n) {
    void *p = NULL;
    n = (n + 63) & ~(size_t)63;
    if (posix_memalign(&p, 64, n ? n : 64) != 0) fatal("out of memory allocating %zu bytes", n);
    return p;
}

static double time_now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ----------------------------------------------------------------------------------------------
   config and weights */

#define MODEL_MAGIC 0x616b3432u /* "ak42" read as a little-endian uint32 */
#define MODEL_HEADER_SIZE 256   /* versions 1, 2, 3 */
#define LEGACY_HEADER_SIZE 28   /* version 0: 7 int32 */
#define PROMPT_PLAIN 0       /* version 3 prompt_format: a story start (-i) */
#define PROMPT_INSTRUCT_ZH 1 /* stories on request, instruct.py's Chinese template (-m instruct) */
#define PROMPT_INSTRUCT_EN 2 /* ... its English one */
#define MAX_DIM (1 << 20)       /* sanity bound on any config int, so size products fit int64 */
/* A header may imply a full-context KV cache (2 x n_layers x max_seq_len x kv_dim floats) of at most
   KV_CACHE_PER_FILE_BYTE times the file's size plus KV_CACHE_SLACK: real models' caches are a
   fraction of their weights (Llama 3 8B at 128k tokens: about equal), so a larger claim is a
   damaged header, and a 10 kB file could otherwise make chat mode allocate gigabytes. */
#define KV_CACHE_PER_FILE_BYTE 16
#define KV_CACHE_SLACK ((int64_t)64 << 20)

typedef struct {
    int dim;          /* residual stream width */
    int hidden_dim;   /* FFN width (rows of w1, w3) */
    int n_layers;
    int n_heads;      /* query heads */
    int n_kv_heads;   /* key/value heads; n_heads / n_kv_heads query heads share one */
    int vocab_size;
    int max_seq_len;
    int head_size;    /* dim / n_heads */
    int kv_dim;       /* n_kv_heads * head_size */
    int shared_classifier; /* 1: the classifier is the token embedding */
    int quantized;    /* 1: matrices are int8 Q8_0 */
    int bf16;         /* 1: matrices are bf16 (version 3 weight_type 2; norms stay fp32) */
    int group_size;   /* int8 values per fp32 scale (0 when fp32) */
    int w2_group_size; /* group_size of w2's rows after loading: group_size, or for a version 2 file
                          whose groups run across w2's row ends gcd(group_size, hidden_dim) (see
                          weights_regroup_w2); w2's input activations are quantized in groups of it */
    float norm_eps;   /* RMSNorm epsilon (1e-5 for versions 0-2) */
    float rope_theta; /* rotary base (10000 for versions 0-2) */
    uint32_t tokenizer_hash; /* version 3 only; 0 = not recorded */
    int prompt_format; /* version 3 only: 0 plain, 1 instruct zh, 2 instruct en (PROMPT_*) */
    int version;      /* file format version 0..3 */
} Config;

/* One weight matrix (rows, cols), row-major like PyTorch's nn.Linear: fp32 in w, bf16 in b, or
   int8 values in q with one fp32 scale per group of consecutive values of a row in s
   (q8_group_size). */
typedef struct {
    const float *w;    /* (rows, cols) fp32, or NULL */
    const uint16_t *b; /* (rows, cols) bf16, or NULL */
    const int8_t *q;   /* (rows, cols) int8, or NULL */
    const float *s;    /* (rows * cols / group_size) scales, or NULL */
    const int32_t *pw; /* int8 matrices on VNNI CPUs: q repacked at load time (q8_pack), else NULL */
    const float *ps;   /* the scales repacked alongside pw */
} Matrix;

typedef struct {
    const float *rms_att; /* (dim) attention RMSNorm gain */
    const float *rms_ffn; /* (dim) FFN RMSNorm gain */
    Matrix wq;            /* (dim, dim) */
    Matrix wk;            /* (kv_dim, dim) */
    Matrix wv;            /* (kv_dim, dim) */
    Matrix wo;            /* (dim, dim) */
    Matrix w1;            /* (hidden_dim, dim) gate */
    Matrix w2;            /* (dim, hidden_dim) down */
    Matrix w3;            /* (hidden_dim, dim) up */
} LayerWeights;

typedef struct {
    Matrix token_embedding; /* (vocab_size, dim) */
    LayerWeights *layers;   /* (n_layers) */
    const float *rms_final; /* (dim) */
    Matrix wcls;            /* (vocab_size, dim); the token embedding when shared */
} Weights;

/* Largest number of tokens one forward call processes together (prompt prefill blocks; fewer
   when the context is shorter). Each block streams every weight matrix once, so larger blocks
   read the weights fewer times, for a few MB of activations. */
#define BLOCK_MAX 256

/* Activations for up to `block` tokens at once, row t belonging to the block's token t. */
typedef struct {
    float *x;          /* (block, dim) residual stream */
    float *xb;         /* (block, dim) normed input / attention output */
    float *xb2;        /* (block, dim) sublayer output */
    float *hb;         /* (block, hidden_dim) gate */
    float *hb2;        /* (block, hidden_dim) up */
    float *q;          /* (block, dim) queries */
    float *att;        /* (slots, att_stride) attention weights, one row per thread */
    int att_stride;    /* n_ctx rounded up to 16 floats, so that no two threads' rows share a cache line */
    float *logits;     /* (vocab_size) of the last token of the last call */
    int8_t *xq;        /* (block, max(dim, hidden_dim)) int8 activations (quantized models) */
    float *xs;         /* (block, max(dim, hidden_dim) / group_size) their scales */
    int32_t *xsum;     /* (block, max(dim, hidden_dim) / group_size) sums of each group's int8 */
    uint16_t *xh;      /* (block, max(dim, hidden_dim)) activations rounded to bf16 for the prefill
                          kernel (bf16 models on AVX512-BF16 CPUs; see matmul_jobs), else NULL */
    void *key_cache;   /* (n_layers, n_ctx, kv_dim), float or fp16 (kv_half) */
    void *value_cache; /* (n_layers, n_ctx, kv_dim), float or fp16 (kv_half) */
    int kv_half;       /* 1: the caches hold IEEE fp16 (uint16_t), 0: float */
    float *kbuf;       /* (block, kv_dim) keys before rounding to fp16 (kv_half only) */
    float *vbuf;       /* (block, kv_dim) values before rounding to fp16 (kv_half only) */
    int n_ctx;         /* positions the cache holds: the ones this run can use, <= max_seq_len */
    int block;         /* tokens per forward call at most: min(BLOCK_MAX, n_ctx) */
    int slots;         /* threads that can share the work: each has row `thread` of att, dn, xq, xs, xsum */
    int decode_team;   /* threads transformer_decode uses at most; 0: all it may (DecodeTuner, run_threads.h) */
    float *dn;         /* (slots, dim) each decoding thread's own copy of the normed input */
    float *rope_cos;   /* (n_ctx, head_size / 2) */
    float *rope_sin;   /* (n_ctx, head_size / 2) */
} RunState;

typedef struct {
    Config config;
    Weights weights;
    RunState state;
    const char *path;
    void *data;          /* the mmap'd file */
    size_t file_size;
    float *owned;        /* scales copied out of the mapping when misaligned (else NULL) */
    float *regrouped;    /* w2's scales regrouped per row (weights_regroup_w2), else NULL */
    void *packed;        /* the int8 matrices repacked for the VNNI kernels (else NULL) */
    int kv_half;         /* the KV cache precision transformer_context gives the state: 1 fp16, 0 fp32 */
} Transformer;

/* ----------------------------------------------------------------------------------------------
   file loading */

static int32_t read_i32(const unsigned char *p) {
    uint32_t v = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
    int32_t out;
    memcpy(&out, &v, 4);
    return out;
}

static uint32_t read_u32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static float read_f32(const unsigned char *p) {
    uint32_t v = read_u32(p);
    float f;
    memcpy(&f, &v, 4);
    return f;
}

/* Checks the config's ranges and divisibility; returns NULL when fine, else a static message. */
static const char *config_problem(const Config *c, char *buf, size_t n) {
    const char *names[7] = {"dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                            "max_seq_len"};
    int vals[7] = {c->dim, c->hidden_dim, c->n_layers, c->n_heads, c->n_kv_heads, c->vocab_size,
                   c->max_seq_len};
    for (int i = 0; i < 7; i++) {
        if (vals[i] < 1 || vals[i] > MAX_DIM) {
            snprintf(buf, n, "%s=%d is out of range [1, %d]", names[i], vals[i], MAX_DIM);
            return buf;
        }
    }
    if (c->dim % c->n_heads) {
        snprintf(buf, n, "dim=%d is not divisible by n_heads=%d", c->dim, c->n_heads);
        return buf;
    }
    if ((c->dim / c->n_heads) % 2) {
        snprintf(buf, n, "head size dim/n_heads=%d is odd (rotary embeddings need pairs)",
                 c->dim / c->n_heads);
        return buf;
    }
    if (c->n_heads % c->n_kv_heads) {
        snprintf(buf, n, "n_heads=%d is not divisible by n_kv_heads=%d", c->n_heads, c->n_kv_heads);
        return buf;
    }
    if (c->quantized) {
        /* Version 2 is llama2.c's Q8_0, whose exporter picks the group size for dim alone and
           groups each tensor's flattened values: dim % group_size == 0 makes every tensor split
           into whole groups, and w2 (rows of hidden_dim) is regrouped at load time when its
           groups cross row ends. Our version 3 exporter always picks one dividing both. */
        int ffn_ok = c->version == 2 || (c->group_size > 0 && c->hidden_dim % c->group_size == 0);
        if (c->group_size < 1 || c->dim % c->group_size || !ffn_ok) {
            snprintf(buf, n, "group_size=%d does not divide dim=%d and hidden_dim=%d", c->group_size,
                     c->dim, c->hidden_dim);
            return buf;
        }
    }
    if (!(c->norm_eps > 0.0f && c->norm_eps < 1.0f)) {
        snprintf(buf, n, "norm_eps=%g is not in (0, 1)", (double)c->norm_eps);
        return buf;
    }
    if (!(c->rope_theta > 1.0f && isfinite(c->rope_theta))) {
        snprintf(buf, n, "rope_theta=%g is not a finite value > 1", (double)c->rope_theta);
        return buf;
    }
    return NULL;
}

/* Bytes one matrix of `numel` values takes in the file. */
static int64_t matrix_bytes(const Config *c, int64_t numel) {
    return c->quantized ? numel + 4 * (numel / c->group_size) : c->bf16 ? 2 * numel : 4 * numel;
}

/* The exact file size the config implies, in bytes. */
static int64_t config_file_size(const Config *c) {
    int64_t d = c->dim, h = c->hidden_dim, L = c->n_layers, V = c->vocab_size, kv = c->kv_dim;
    int64_t norms = 4 * (2 * L * d + d);
    int64_t mats = matrix_bytes(c, V * d);
    for (int64_t l = 0; l < L; l++) {
        mats += 2 * matrix_bytes(c, d * d) + 2 * matrix_bytes(c, kv * d) + 3 * matrix_bytes(c, h * d);
    }
    if (!c->shared_classifier) mats += matrix_bytes(c, V * d);
    if (c->version == 0) {
        int64_t rope = 4 * 2 * ((int64_t)c->max_seq_len * c->head_size / 2);
        return LEGACY_HEADER_SIZE + norms + mats + rope;
    }
    return MODEL_HEADER_SIZE + norms + mats;
}

/* Parses the header of a file of `size` bytes whose first min(size, 256) bytes are in `h`
   (the layouts of versions 0-3: docs/formats.md). */
static void config_read(Config *c, const char *path, const unsigned char *h, size_t size) {
    char buf[256];
    memset(c, 0, sizeof *c);
    if (size == 0) fatal("%s: file is empty (0 bytes), not a model; re-run export.py", path);
    if (size < LEGACY_HEADER_SIZE)
        fatal("%s: only %zu bytes, too short for a model header; re-run export.py", path, size);
    c->norm_eps = 1e-5f;
    c->rope_theta = 10000.0f;
    int is_legacy = read_u32(h) != MODEL_MAGIC;
    const unsigned char *cfg = is_legacy ? h : h + 8;
    c->dim = read_i32(cfg);
    c->hidden_dim = read_i32(cfg + 4);
    c->n_layers = read_i32(cfg + 8);
    c->n_heads = read_i32(cfg + 12);
    c->n_kv_heads = read_i32(cfg + 16);
    c->vocab_size = read_i32(cfg + 20);
    c->max_seq_len = read_i32(cfg + 24);
    if (is_legacy) {
        /* No magic: the legacy layout, whose only flag is a negative vocab_size (= unshared). */
        c->version = 0;
        c->shared_classifier = c->vocab_size > 0;
        if (c->vocab_size < 0 && c->vocab_size != INT_MIN) c->vocab_size = -c->vocab_size;
    } else {
        if (size < MODEL_HEADER_SIZE)
            fatal("%s: header truncated (%zu of %d bytes); re-run export.py", path, size,
                  MODEL_HEADER_SIZE);
        c->version = read_i32(h + 4);
        if (c->version < 1 || c->version > 3)
            fatal("%s: unsupported model version %d (this run.c reads 0, 1, 2, 3); re-run export.py",
                  path, c->version);
        int shared = h[36];
        if (shared > 1) fatal("%s: shared_classifier byte is %d, expected 0 or 1", path, shared);
        c->shared_classifier = shared;
        size_t zero_from = 37;
        if (c->version == 2) {
            c->quantized = 1;
            c->group_size = read_i32(h + 37);
            zero_from = 41;
        } else if (c->version == 3) {
            int weight_type = h[37];
            if (weight_type > 2)
                fatal("%s: unknown weight_type %d in version 3 header (0 = fp32, 1 = int8, 2 = bf16)",
                      path, weight_type);
            c->prompt_format = h[38] | h[39] << 8; /* uint16 */
            if (c->prompt_format > PROMPT_INSTRUCT_EN)
                fatal("%s: unknown prompt_format %d in version 3 header (0 = plain, 1 = instruct zh, "
                      "2 = instruct en); re-run export.py", path, c->prompt_format);
            c->quantized = weight_type == 1;
            c->bf16 = weight_type == 2;
            c->group_size = read_i32(h + 40);
            if (!c->quantized && c->group_size != 0)
                fatal("%s: group_size=%d in an %s file (must be 0)", path, c->group_size,
                      c->bf16 ? "bf16" : "fp32");
            c->norm_eps = read_f32(h + 44);
            c->rope_theta = read_f32(h + 48);
            c->tokenizer_hash = read_u32(h + 52);
            zero_from = 56;
        }
        for (size_t i = zero_from; i < MODEL_HEADER_SIZE; i++)
            if (h[i]) fatal("%s: header padding byte %zu is not zero; re-run export.py", path, i);
    }
    const char *problem = config_problem(c, buf, sizeof buf);
    if (problem) {
        if (is_legacy)
            fatal("%s: not a model file (no magic, and as a legacy version 0 header: %s)", path,
                  problem);
        fatal("%s: bad version %d header: %s; re-run export.py", path, c->version, problem);
    }
    c->head_size = c->dim / c->n_heads;
    c->kv_dim = c->n_kv_heads * c->head_size;
    int64_t want = config_file_size(c);
    if ((int64_t)size != want)
        fatal("%s: file is %zu bytes but its version %d header implies %lld (%s); re-run export.py",
              path, size, c->version, (long long)want, (int64_t)size < want ? "truncated" : "trailing data");
    int64_t cache = 2 * 4 * (int64_t)c->n_layers * c->max_seq_len * c->kv_dim;
    if (cache > KV_CACHE_PER_FILE_BYTE * (int64_t)size + KV_CACHE_SLACK)
        fatal("%s: max_seq_len=%d with %d layers needs %.1f MB of KV cache, more than a %zu-byte model "
              "can (%dx its size + 64 MiB); the header is damaged, re-run export.py", path, c->max_seq_len,
              c->n_layers, (double)cache / 1e6, size, KV_CACHE_PER_FILE_BYTE);
}

/* Hands out consecutive pieces of the mapped body. */
typedef struct {
    const unsigned char *p;
    Transformer *t;
    size_t owned_used;
} Cursor;

static const float *take_f32(Cursor *cur, int64_t n) {
    const float *out = (const float *)(const void *)cur->p;
    cur->p += 4 * n;
    return out;
}

/* Scales sit right after int8 values, so they are misaligned when a tensor's size is not a
   multiple of 4; such scales are copied into t->owned (sized at load time) to keep loads aligned. */
static const float *take_scales(Cursor *cur, int64_t n) {
    const unsigned char *src = cur->p;
    cur->p += 4 * n;
    if (((uintptr_t)src & 3) == 0) return (const float *)(const void *)src;
    float *dst = cur->t->owned + cur->owned_used;
    memcpy(dst, src, (size_t)(4 * n));
    cur->owned_used += (size_t)n;
    return dst;
}

static Matrix take_matrix(Cursor *cur, const Config *c, int64_t rows, int64_t cols) {
    Matrix m = {0};
    if (c->bf16) {
        /* 2-byte aligned: the body starts at 256 and every tensor before it is a whole number of
           2- or 4-byte values. */
        m.b = (const uint16_t *)(const void *)cur->p;
        cur->p += 2 * rows * cols;
    } else if (!c->quantized) {
        m.w = take_f32(cur, rows * cols);
    } else {
        m.q = (const int8_t *)cur->p;
        cur->p += rows * cols;
        m.s = take_scales(cur, rows * cols / c->group_size);
    }
    return m;
}

/* The int8 group size of a matrix whose rows (its input) are m wide: w2's (m = hidden_dim) may be
   regrouped at load time (weights_regroup_w2); every other matrix takes inputs of width dim (and
   where hidden_dim equals dim, w2 is never regrouped, so the two agree). */
static int q8_group_size(const Config *c, int m) { return m == c->hidden_dim ? c->w2_group_size : c->group_size; }

static int gcd_int(int a, int b) {
    while (b) {
        int r = a % b;
        a = b;
        b = r;
    }
    return a;
}

/* A version 2 file whose hidden_dim is not a multiple of group_size (llama2.c's 42M shape: dim 512,
   hidden_dim 1376, group_size 64) has w2's groups (its rows are hidden_dim long) running across
   row ends, which the row-wise kernels cannot take. Regrouped exactly: with g = gcd(group_size,
   hidden_dim), every run of g values within a row lies inside one of the file's groups (g divides
   group_size, and each row starts at a multiple of g), so w2 becomes per-row groups of g whose
   scale is their file group's: the int8 values stay where they are, the same weights to the bit.
   Only w2's input (SwiGLU's output) is then quantized in groups of g instead of group_size, a
   finer rounding than the file's own groups would give. The regrouped scales take
   dim x hidden_dim / g floats per layer; a g that is not a multiple of 16 leaves w2 on the
   plain-C kernel. */
static void weights_regroup_w2(Transformer *t) {
    Config *c = &t->config;
    c->w2_group_size = c->group_size;
    if (!c->quantized || c->hidden_dim % c->group_size == 0) return;
    int gs = c->group_size, g = gcd_int(gs, c->hidden_dim);
    int64_t d = c->dim, h = c->hidden_dim, per_row = h / g;
    t->regrouped = xmalloc((size_t)(c->n_layers * d * per_row) * sizeof(float));
    for (int l = 0; l < c->n_layers; l++) {
        Matrix *w2 = &t->weights.layers[l].w2;
        float *dst = t->regrouped + (size_t)(l * d * per_row);
        for (int64_t r = 0; r < d; r++)
            for (int64_t j = 0; j < per_row; j++) dst[r * per_row + j] = w2->s[(r * h + j * g) / gs];
        w2->s = dst;
    }
    c->w2_group_size = g;
}

/* 1 when no bf16 value of b[0..n) is NaN or +-Inf (all exponent bits set). */
static int bf16_all_finite(const uint16_t *b, int64_t n) {
    uint16_t bad = 0;
    for (int64_t i = 0; i < n; i++) bad |= (uint16_t)((b[i] & 0x7f80u) == 0x7f80u);
    return !bad;
}

/* 1 when every |x[i]| of x[0..n) is at most `limit` (so NaN and +-Inf fail). Integer compares on
   the bit patterns (magnitudes order like their bits), so that the compiler vectorizes it without
   -ffast-math: one streaming pass at memory speed. */
static int floats_within(const float *x, int64_t n, float limit) {
    uint32_t worst = 0, most;
    memcpy(&most, &limit, sizeof most);
    for (int64_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, x + i, sizeof u);
        u &= 0x7fffffffu;
        worst = u > worst ? u : worst;
    }
    return worst <= most;
}

/* Refuses a model whose fp32 values (norm gains, fp32 matrices, int8 matrices' scales) hold a
   NaN or an infinity, naming the tensor: such a file is damaged (a bad copy, a diverged training
   run), and would otherwise print one token forever. One streaming pass at load (a small part of
   the load time; int8 files scan only their scales). An int8 scale must also stay within
   FLT_MAX / 127, or its weights (q * scale) are infinite. */
static void weights_check_finite(const Transformer *t) {
    const Config *c = &t->config;
    const Weights *w = &t->weights;
    int64_t d = c->dim, h = c->hidden_dim, kv = c->kv_dim, V = c->vocab_size;
    const char *kinds[7] = {"wq", "wk", "wv", "wo", "w1", "w2", "w3"};
    int64_t numel[7] = {d * d, kv * d, kv * d, d * d, h * d, d * h, h * d};
    char name[64];
#define CHECK_VALUES(ptr, n, ...)                                                                  \
    do {                                                                                           \
        if (!floats_within((ptr), (n), FLT_MAX)) {                                                 \
            snprintf(name, sizeof name, __VA_ARGS__);                                              \
            fatal("%s: %s holds NaN/Inf; the file is damaged, re-export it", t->path, name);      \
        }                                                                                          \
    } while (0)
#define CHECK_MATRIX(m, n, ...)                                                                    \
    do {                                                                                           \
        if ((m)->w) {                                                                              \
            CHECK_VALUES((m)->w, (n), __VA_ARGS__);                                                \
        } else if ((m)->b) {                                                                       \
            if (!bf16_all_finite((m)->b, (n))) {                                                   \
                snprintf(name, sizeof name, __VA_ARGS__);                                          \
                fatal("%s: %s holds NaN/Inf; the file is damaged, re-export it", t->path, name);  \
            }                                                                                      \
        } else {                                                                                   \
            CHECK_VALUES((m)->s, (n) / c->group_size, __VA_ARGS__);                                \
            if (!floats_within((m)->s, (n) / c->group_size, FLT_MAX / 127.0f)) {                   \
                snprintf(name, sizeof name, __VA_ARGS__);                                          \
                fatal("%s: %s has an int8 scale above FLT_MAX/127 (its weights would be infinite); " \
                      "the file is damaged, re-export it", t->path, name);                         \
            }                                                                                      \
        }                                                                                          \
    } while (0)
    for (int l = 0; l < c->n_layers; l++) {
        const LayerWeights *lw = &w->layers[l];
        const Matrix *mats[7] = {&lw->wq, &lw->wk, &lw->wv, &lw->wo, &lw->w1, &lw->w2, &lw->w3};
        CHECK_VALUES(lw->rms_att, d, "layer %d attention norm", l);
        CHECK_VALUES(lw->rms_ffn, d, "layer %d ffn norm", l);
        for (int k = 0; k < 7; k++) CHECK_MATRIX(mats[k], numel[k], "layer %d %s", l, kinds[k]);
    }
    CHECK_VALUES(w->rms_final, d, "the final norm");
    CHECK_MATRIX(&w->token_embedding, V * d, "the token embedding");
    if (!c->shared_classifier) CHECK_MATRIX(&w->wcls, V * d, "the classifier");
#undef CHECK_MATRIX
#undef CHECK_VALUES
}

static void weights_map(Transformer *t) {
    const Config *c = &t->config;
    Weights *w = &t->weights;
    int L = c->n_layers;
    int64_t d = c->dim, h = c->hidden_dim, kv = c->kv_dim, V = c->vocab_size;
    w->layers = xcalloc((size_t)L, sizeof(LayerWeights));
    if (c->quantized) {
        /* Worst case every scale array needs a copy. */
        int64_t n_scales = (2 * V * d + L * (2 * d * d + 2 * kv * d + 3 * h * d)) / c->group_size;
        t->owned = xmalloc((size_t)n_scales * sizeof(float));
    }
    Cursor cur = {(const unsigned char *)t->data, t, 0};
    if (c->version == 0) {
        /* Legacy order: embedding, then each kind over all layers, final norm, RoPE tables. */
        cur.p += LEGACY_HEADER_SIZE;
        w->token_embedding = take_matrix(&cur, c, V, d);
        for (int l = 0; l < L; l++) w->layers[l].rms_att = take_f32(&cur, d);
        for (int l = 0; l < L; l++) w->layers[l].wq = take_matrix(&cur, c, d, d);
        for (int l = 0; l < L; l++) w->layers[l].wk = take_matrix(&cur, c, kv, d);
        for (int l = 0; l < L; l++) w->layers[l].wv = take_matrix(&cur, c, kv, d);
        for (int l = 0; l < L; l++) w->layers[l].wo = take_matrix(&cur, c, d, d);
        for (int l = 0; l < L; l++) w->layers[l].rms_ffn = take_f32(&cur, d);
        for (int l = 0; l < L; l++) w->layers[l].w1 = take_matrix(&cur, c, h, d);
        for (int l = 0; l < L; l++) w->layers[l].w2 = take_matrix(&cur, c, d, h);
        for (int l = 0; l < L; l++) w->layers[l].w3 = take_matrix(&cur, c, h, d);
        w->rms_final = take_f32(&cur, d);
        take_f32(&cur, 2 * ((int64_t)c->max_seq_len * c->head_size / 2)); /* unused RoPE tables */
    } else {
        /* Versions 1-3: norms first, then the matrices (fp32, or int8 values + scales each). */
        cur.p += MODEL_HEADER_SIZE;
        for (int l = 0; l < L; l++) w->layers[l].rms_att = take_f32(&cur, d);
        for (int l = 0; l < L; l++) w->layers[l].rms_ffn = take_f32(&cur, d);
        w->rms_final = take_f32(&cur, d);
        w->token_embedding = take_matrix(&cur, c, V, d);
        for (int l = 0; l < L; l++) w->layers[l].wq = take_matrix(&cur, c, d, d);
        for (int l = 0; l < L; l++) w->layers[l].wk = take_matrix(&cur, c, kv, d);
        for (int l = 0; l < L; l++) w->layers[l].wv = take_matrix(&cur, c, kv, d);
        for (int l = 0; l < L; l++) w->layers[l].wo = take_matrix(&cur, c, d, d);
        for (int l = 0; l < L; l++) w->layers[l].w1 = take_matrix(&cur, c, h, d);
        for (int l = 0; l < L; l++) w->layers[l].w2 = take_matrix(&cur, c, d, h);
        for (int l = 0; l < L; l++) w->layers[l].w3 = take_matrix(&cur, c, h, d);
    }
    w->wcls = c->shared_classifier ? w->token_embedding : take_matrix(&cur, c, V, d);
    /* config_read checked the file size against exactly this walk. */
    if ((size_t)(cur.p - (const unsigned char *)t->data) != t->file_size)
        fatal("%s: internal error: weights end at byte %td of %zu", t->path,
              cur.p - (const unsigned char *)t->data, t->file_size);
}

/* Activations, KV cache and RoPE tables for positions [0, n_ctx) (1 <= n_ctx <= max_seq_len). */
static void run_state_init(RunState *s, const Config *c, int kv_half, int n_ctx) {
    size_t B = (size_t)(n_ctx < BLOCK_MAX ? n_ctx : BLOCK_MAX);
    size_t d = (size_t)c->dim, h = (size_t)c->hidden_dim;
    size_t wide = d > h ? d : h;
    size_t cache = (size_t)c->n_layers * (size_t)n_ctx * (size_t)c->kv_dim;
    size_t esize = kv_half ? sizeof(uint16_t) : sizeof(float);
    s->x = xmalloc_aligned(B * d * sizeof(float));
    s->xb = xmalloc_aligned(B * d * sizeof(float));
    s->xb2 = xmalloc_aligned(B * d * sizeof(float));
    s->hb = xmalloc_aligned(B * h * sizeof(float));
    s->hb2 = xmalloc_aligned(B * h * sizeof(float));
    s->q = xmalloc_aligned(B * d * sizeof(float));
    s->logits = xmalloc_aligned((size_t)c->vocab_size * sizeof(float));
    s->xq = xmalloc_aligned(B * wide);
    size_t n_groups = B * (c->quantized ? wide / (size_t)c->w2_group_size : 1); /* the smaller size */
    s->xs = xmalloc_aligned(n_groups * sizeof(float));
    s->xsum = xmalloc_aligned(n_groups * sizeof(int32_t));
    s->xh = c->bf16 ? xmalloc_aligned(B * wide * sizeof(uint16_t)) : NULL;
    s->kv_half = kv_half;
    s->key_cache = xmalloc_aligned(cache * esize);
    s->value_cache = xmalloc_aligned(cache * esize);
    s->kbuf = kv_half ? xmalloc_aligned(B * (size_t)c->kv_dim * sizeof(float)) : NULL;
    s->vbuf = kv_half ? xmalloc_aligned(B * (size_t)c->kv_dim * sizeof(float)) : NULL;
    s->n_ctx = n_ctx;
    s->block = (int)B;
    s->slots = 1;
#ifdef _OPENMP
    s->slots = omp_get_max_threads() < (int)B ? omp_get_max_threads() : (int)B;
#endif
    s->att_stride = (n_ctx + 15) / 16 * 16;
    s->att = xmalloc_aligned((size_t)s->slots * (size_t)s->att_stride * sizeof(float));
    s->dn = xmalloc_aligned((size_t)s->slots * d * sizeof(float));
    memset(s->key_cache, 0, cache * esize);
    memset(s->value_cache, 0, cache * esize);
    /* Rotation of pair i at position p by p * theta^(-2i/head_size), computed in float32 as
       model.py's rope_tables does, so both sides rotate by the same angles. */
    int half = c->head_size / 2;
    s->rope_cos = xmalloc((size_t)n_ctx * (size_t)half * sizeof(float));
    s->rope_sin = xmalloc((size_t)n_ctx * (size_t)half * sizeof(float));
    for (int i = 0; i < half; i++) {
        float exponent = (float)(2 * i) / (float)c->head_size;
        float inv_freq = 1.0f / powf(c->rope_theta, exponent);
        for (int p = 0; p < n_ctx; p++) {
            float angle = (float)p * inv_freq;
            s->rope_cos[(size_t)p * half + i] = cosf(angle);
            s->rope_sin[(size_t)p * half + i] = sinf(angle);
        }
    }
}

static void run_state_free(RunState *s) {
    free(s->rope_sin);
    free(s->rope_cos);
    free(s->dn);
    free(s->vbuf);
    free(s->kbuf);
    free(s->value_cache);
    free(s->key_cache);
    free(s->xsum);
    free(s->xh);
    free(s->xs);
    free(s->xq);
    free(s->logits);
    free(s->att);
    free(s->q);
    free(s->hb2);
    free(s->hb);
    free(s->xb2);
    free(s->xb);
    free(s->x);
}

static int q8_packable(int gs);     /* run_kernels.h: whether int8 matrices are repacked at load */
static void weights_pack(Transformer *t); /* run_kernels.h: the repacking */

/* KV cache precision (-c): fp16 halves the bytes attention streams per token and the cache's
   memory. The default keeps fp32 models exact (fp32 cache) and gives int8 models, which already
   round every activation to 8 bits, the fp16 cache: its rounding (relative 2^-11) is about a
   hundredth of the int8 activation error (tests/test_engine.py bounds both). */
enum { KV_DEFAULT = -1, KV_F32 = 0, KV_F16 = 1 };

/* Opens, validates and maps a model file; exits with a one-line error on any problem. kv is
   KV_DEFAULT, KV_F32 or KV_F16. The activations and KV cache come after, from transformer_context,
   once the caller knows how many positions it will use. */
static void transformer_init(Transformer *t, const char *path, int kv) {
    memset(t, 0, sizeof *t);
    t->path = path;
    /* O_NONBLOCK: opening a FIFO that has no writer would wait forever; fstat refuses it (and any
       other non-regular file) before a byte is read. Reads of a regular file ignore the flag. */
    int fd = open(path, O_RDONLY | O_NONBLOCK);
    if (fd < 0) fatal("%s: cannot open model file (%s)", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) fatal("%s: cannot stat model file (%s)", path, strerror(errno));
    if (!S_ISREG(st.st_mode))
        fatal("%s: %s, not a model file; pass the .bin that export.py wrote", path,
              S_ISDIR(st.st_mode) ? "is a directory" : "is not a regular file (a FIFO, socket or device?)");
    t->file_size = (size_t)st.st_size;
    unsigned char header[MODEL_HEADER_SIZE];
    size_t want = t->file_size < MODEL_HEADER_SIZE ? t->file_size : MODEL_HEADER_SIZE;
    size_t got = 0;
    while (got < want) {
        ssize_t r = read(fd, header + got, want - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) fatal("%s: read failed (%s)", path, r < 0 ? strerror(errno) : "unexpected end");
        got += (size_t)r;
    }
    config_read(&t->config, path, header, t->file_size);
    int flags = MAP_PRIVATE;
#ifdef MAP_POPULATE
    /* fault the pages in now rather than during the first forward pass; int8 matrices that are
       repacked (weights_pack) are read once at load and released instead */
    if (!(t->config.quantized && q8_packable(t->config.group_size))) flags |= MAP_POPULATE;
#endif
    t->data = mmap(NULL, t->file_size, PROT_READ, flags, fd, 0);
    if (t->data == MAP_FAILED) fatal("%s: mmap failed (%s)", path, strerror(errno));
    close(fd);
    weights_map(t);
    weights_check_finite(t);
    weights_regroup_w2(t);
    weights_pack(t);
    t->kv_half = kv == KV_DEFAULT ? t->config.quantized : kv == KV_F16;
}

/* Sizes the run state (KV cache, RoPE tables, activations) for positions [0, n_ctx), rounded up to
   whole blocks of BLOCK_MAX (a cache cut to the exact length made 2-thread int8 prefill slower)
   and capped at max_seq_len: a 200-token story needs 256 positions of cache, not a context of
   2^20. Call it once, before the first forward pass. */
static void transformer_context(Transformer *t, int n_ctx) {
    if (n_ctx >= 1 && n_ctx < t->config.max_seq_len) n_ctx = (n_ctx + BLOCK_MAX - 1) / BLOCK_MAX * BLOCK_MAX;
    if (n_ctx < 1 || n_ctx > t->config.max_seq_len) n_ctx = t->config.max_seq_len;
    run_state_free(&t->state);
    memset(&t->state, 0, sizeof t->state);
    run_state_init(&t->state, &t->config, t->kv_half, n_ctx);
}

static void transformer_free(Transformer *t) {
    run_state_free(&t->state);
    free(t->packed);
    free(t->regrouped);
    free(t->owned);
    free(t->weights.layers);
    if (t->data && t->data != MAP_FAILED) munmap(t->data, t->file_size);
    memset(t, 0, sizeof *t);
}

/* ----------------------------------------------------------------------------------------------
   the plain ops

   Each op is a plain loop the compiler may vectorize. Where a benchmark showed that intrinsics
   pay, run_kernels.h (included after this section) holds the fast version, which falls back to
   the loop here elsewhere and which tests/engine_kernels.c compares with it on odd sizes (the
   *_ref functions): the int8 fast path gives bit-identical results, the fp32 one differs only
   by FMA rounding. Every fp32 dot product sums in 16 interleaved partial sums (element i goes to
   sum i % 16) combined in a fixed tree at the end, so the result does not depend on how rows and
   tokens are split across threads or tiles: within one build, prompt prefill of a block and
   token-by-token decoding give bit-identical logits. */

#include "run_f16.h" /* defines: f32_to_f16, f16_to_f32 (the fp16 KV cache), bf16_to_f32, f32_to_bf16 */

static float dot_f32_ref(const float *a, const float *b, int n) {
    float acc[16] = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int k = 0; k < 16; k++) acc[k] += a[i + k] * b[i + k];
    for (int k = 0; i < n; i++, k++) acc[k] += a[i] * b[i];
    for (int w = 8; w >= 1; w /= 2)
        for (int k = 0; k < w; k++) acc[k] += acc[k + w];
    return acc[0];
}

/* out (n, d) = x (n, m) @ W^T, W (d, m) fp32: the plain reference. */
void matmul_f32_ref(float *out, const float *x, const float *w, int n, int d, int m) {
    int i;
    OMP_PARALLEL_FOR
    for (i = 0; i < d; i++) {
        const float *row = w + (size_t)i * m;
        for (int t = 0; t < n; t++) out[(size_t)t * d + i] = dot_f32_ref(x + (size_t)t * m, row, m);
    }
}

/* Q8_0 activations: each group of gs values becomes int8 q with x ~= q * scale, scale = max|x|/127
   (the weights' scheme), rounded half to even. x (n, m) -> xq (n, m), xs (n, m / gs), and
   xsum (n, m / gs) the sum of each group's q (the VNNI kernel needs it). The plain reference.
   Activations that overflowed (inf, NaN) or are subnormal must not leave [-127, 127]: NaNs are left
   out of the maximum and quantize to 0, and every quotient is clamped, so both quantizers agree
   and xsum stays small enough for the VNNI kernel's -128 * xsum correction. */
void quantize_rows_ref(int8_t *xq, float *xs, int32_t *xsum, const float *x, int n, int m, int gs) {
    int64_t groups = (int64_t)n * (m / gs);
    for (int64_t g = 0; g < groups; g++) {
        const float *v = x + g * gs;
        int8_t *q = xq + g * gs;
        float amax = 0.0f;
        for (int i = 0; i < gs; i++) amax = fmaxf(amax, fabsf(v[i])); /* fmaxf skips a NaN */
        float scale = amax / 127.0f;
        xs[g] = scale;
        int32_t sum = 0;
        if (scale == 0.0f) {
            memset(q, 0, (size_t)gs);
        } else {
            for (int i = 0; i < gs; i++) {
                float r = v[i] / scale;
                r = r != r ? 0.0f : fminf(127.0f, fmaxf(-127.0f, r)); /* NaN -> 0, then clamp */
                q[i] = (int8_t)lrintf(r);
                sum += q[i];
            }
        }
        xsum[g] = sum;
    }
}

/* Integer dot product of one group, exact in int32 (|sum| <= 127 * 127 * gs). */
static int32_t dot_i8(const int8_t *a, const int8_t *b, int n) {
    int32_t sum = 0;
    for (int i = 0; i < n; i++) sum += (int32_t)a[i] * (int32_t)b[i];
    return sum;
}

/* Row i of out (n, d) = dequant(xq) (n, m) @ dequant(W)^T: int8 x int8 -> int32 per group, then
   scaled and summed over groups in order in fp32. */
static void row_q8_ref(float *out, const int8_t *xq, const float *xs, const int8_t *wq, const float *ws,
                       int n, int d, int m, int gs, int i) {
    int groups = m / gs;
    const int8_t *wr = wq + (size_t)i * m;
    const float *sr = ws + (size_t)i * groups;
    for (int t = 0; t < n; t++) {
        const int8_t *aq = xq + (size_t)t * m;
        const float *as = xs + (size_t)t * groups;
        float acc = 0.0f;
        for (int g = 0; g < groups; g++) {
            /* separate statements: no compiler may fuse these into an FMA (clang would within
               one expression), so the VNNI path's separate multiplies match bit for bit */
            float v = (float)dot_i8(aq + (size_t)g * gs, wr + (size_t)g * gs, gs) * sr[g];
            v = v * as[g];
            acc = acc + v;
        }
        out[(size_t)t * d + i] = acc;
    }
}

/* The whole product with the plain kernel: the reference the fast path is tested against. */
void matmul_q8_ref(float *out, const int8_t *xq, const float *xs, const int8_t *wq, const float *ws,
                   int n, int d, int m, int gs) {
    int i;
    OMP_PARALLEL_FOR
    for (i = 0; i < d; i++) row_q8_ref(out, xq, xs, wq, ws, n, d, m, gs, i);
}

/* out = x * gain / sqrt(ss / n + eps): RMSNorm's last step, given ss, the sum of squares of x (n). */
static void rmsnorm_scale(float *out, const float *x, const float *gain, int n, float eps, double ss) {
    float inv = 1.0f / sqrtf((float)(ss / n) + eps);
    for (int i = 0; i < n; i++) out[i] = (x[i] * inv) * gain[i];
}

/* out = x / sqrt(mean(x^2) + eps) * gain, the sum of squares in double. Not static (nor are the
   other *_ref that a fast kernel replaces): builds that use rmsnorm's AVX-512 form keep it. */
void rmsnorm_ref(float *out, const float *x, const float *gain, int n, float eps) {
    double ss = 0.0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    rmsnorm_scale(out, x, gain, n, eps, ss);
}

/* In place: x = softmax(x). The plain version the references use. */
static void softmax(float *x, int n) {
    float mx = x[0];
    for (int i = 1; i < n; i++) mx = fmaxf(mx, x[i]);
    float sum = 0.0f;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - mx);
        sum += x[i];
    }
    float inv = 1.0f / sum;
    for (int i = 0; i < n; i++) x[i] *= inv;
}

/* SwiGLU's gate in place: g = silu(g) * u = g / (1 + e^-g) * u over n values. */
void swiglu_ref(float *g, const float *u, size_t n) {
    for (size_t i = 0; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* Rotates consecutive pairs (v[2i], v[2i+1]) of each of n_heads heads by the angles of one position. */
static void rope_rotate(float *v, int n_heads, int head_size, const float *cosp, const float *sinp) {
    int half = head_size / 2;
    for (int h = 0; h < n_heads; h++) {
        float *hv = v + (size_t)h * head_size;
        for (int i = 0; i < half; i++) {
            float a = hv[2 * i], b = hv[2 * i + 1];
            hv[2 * i] = a * cosp[i] - b * sinp[i];
            hv[2 * i + 1] = a * sinp[i] + b * cosp[i];
        }
    }
}

/* rope_rotate on elements [i0, i1) of v only (i0 and i1 even): the same arithmetic pair by pair, so
   a vector rotated in pieces equals one rotated whole. */
static void rope_rows(float *v, int i0, int i1, int head_size, const float *cosp, const float *sinp) {
    for (int r = i0; r < i1; r += 2) {
        int i = (r % head_size) / 2;
        float a = v[r], b = v[r + 1];
        v[r] = a * cosp[i] - b * sinp[i];
        v[r + 1] = a * sinp[i] + b * cosp[i];
    }
}

/* Copies row `token` of the embedding into x (dim), widening bf16 and dequantizing int8 rows. */
static void embedding_lookup(const Transformer *t, float *x, int token) {
    const Config *c = &t->config;
    const Matrix *e = &t->weights.token_embedding;
    size_t off = (size_t)token * c->dim;
    if (e->w) {
        memcpy(x, e->w + off, (size_t)c->dim * sizeof(float));
    } else if (e->b) {
        for (int i = 0; i < c->dim; i++) x[i] = bf16_to_f32(e->b[off + i]);
    } else {
        for (int i = 0; i < c->dim; i++) x[i] = (float)e->q[off + i] * e->s[(off + i) / c->group_size];
    }
}

/* The address of element e of a cache array. */
static inline const void *kv_at(const void *base, size_t e, int half) {
    return (const char *)base + e * (half ? sizeof(uint16_t) : sizeof(float));
}

/* Row p (hs elements from element p * stride) of a cache array as floats: in place for a float
   cache, converted into row (hs) for an fp16 one. */
static const float *kv_row(const void *base, int p, int stride, int hs, int half, float *row) {
    const void *r = kv_at(base, (size_t)p * stride, half);
    if (!half) return r;
    for (int j = 0; j < hs; j++) row[j] = f16_to_f32(((const uint16_t *)r)[j]);
    return row;
}

/* One head of one token: out (hs) = softmax(q . k_p * scale over p < len) weighted sum of v_p, where
   key/value p of this head start at element p * stride of k, v (fp16 when half, else float).
   att (len) is scratch. The plain reference (not static: tests/engine_kernels.c compares
   attention_head with it). */
void attention_head_ref(float *out, const float *q, const void *k, const void *v, int half, float *att,
                        int len, int stride, int hs, float scale) {
    float row[hs];
    for (int p = 0; p < len; p++) att[p] = dot_f32_ref(q, kv_row(k, p, stride, hs, half, row), hs) * scale;
    softmax(att, len);
    for (int j = 0; j < hs; j++) out[j] = 0.0f;
    for (int p = 0; p < len; p++) {
        const float *vp = kv_row(v, p, stride, hs, half, row);
        float a = att[p];
        for (int j = 0; j < hs; j++) out[j] += a * vp[j];
    }
}

/* The index of the largest x[i], the first one among equals; NaNs never win (unless x[0] is one).
   The plain reference; not static: tests/engine_kernels.c compares argmax with it. */
int argmax_ref(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

/* defines: matmul_jobs, matmul (the products the forward pass runs, threads splitting the rows),
   quantize_rows, rmsnorm, swiglu, softmax_fast, attention_head, kv_store_f16, argmax (the ops above
   on AVX-512 / AVX512-VNNI where the CPU has them, else these loops), and weights_pack (int8
   matrices repacked at load for the VNNI kernels, their mapped pages released) */
#include "run_kernels.h"

/* ----------------------------------------------------------------------------------------------
   forward pass

   Two functions run the same transformer: transformer_forward_block for a block of prompt tokens
   (each weight matrix streamed once per block, every op a parallel loop of its own) and
   transformer_decode for one token (one parallel region per token, each thread norming and
   quantizing its own copy of the input and finishing the rows it computed, so a layer costs 5
   barriers instead of 5 thread-team starts with serial steps between). One function for both
   would either give decoding prefill's fork/join per op or give prefill decoding's per-thread
   copies of a whole block, and each is slower at the other's job. They do the same arithmetic in
   the same order, row for row, and tests/test_engine.py checks that their logits are
   bit-identical. */

/* Prefill's element-wise steps run one token per job, so that a second thread does not wait
   through them; each row's arithmetic is the same as alone. */

/* Rows [first, n): x += add (when add is not NULL), then out = RMSNorm(x) * gain and, for int8
   weights, its quantized form in rows [0, n - first) of s->xq / xs / xsum (the rows the next
   product takes). */
static void prefill_norm(Transformer *t, float *x, const float *add, float *out, const float *gain, int first,
                         int n) {
    const Config *c = &t->config;
    RunState *s = &t->state;
    int d = c->dim, groups = c->quantized ? d / c->group_size : 0, i;
    OMP_PARALLEL_FOR
    for (i = first; i < n; i++) {
        float *xi = x + (size_t)i * d;
        size_t r = (size_t)(i - first);
        if (add)
            for (int j = 0; j < d; j++) xi[j] += add[(size_t)i * d + j];
        rmsnorm(out + (size_t)i * d, xi, gain, d, c->norm_eps);
        if (c->quantized)
            quantize_rows(s->xq + r * d, s->xs + r * groups, s->xsum + r * groups, out + (size_t)i * d, 1, d,
                          c->group_size);
    }
}

/* Rows [0, n) of x (n, m): SwiGLU's gate first when up is not NULL (x = silu(x) * up), then the
   quantized form in groups of gs for int8 weights. */
static void prefill_quantize(Transformer *t, float *x, const float *up, int n, int m, int gs) {
    const Config *c = &t->config;
    RunState *s = &t->state;
    int groups = c->quantized ? m / gs : 0, i;
    if (!up && !c->quantized) return;
    OMP_PARALLEL_FOR
    for (i = 0; i < n; i++) {
        if (up) swiglu(x + (size_t)i * m, up + (size_t)i * m, (size_t)m);
        if (c->quantized)
            quantize_rows(s->xq + (size_t)i * m, s->xs + (size_t)i * groups, s->xsum + (size_t)i * groups,
                          x + (size_t)i * m, 1, m, gs);
    }
}

/* Runs n (<= s->block) tokens at positions pos .. pos+n-1 through the model, filling the KV cache.
   Writes the last token's logits to t->state.logits, and when all_logits is not NULL every token's
   logits to all_logits (n, vocab_size). The caller guarantees pos + n <= n_ctx. */
static void transformer_forward_block(Transformer *t, const int *tokens, int n, int pos,
                                      float *all_logits) {
    const Config *c = &t->config;
    const Weights *w = &t->weights;
    RunState *s = &t->state;
    int d = c->dim, hd = c->hidden_dim, kv = c->kv_dim, hs = c->head_size, half = hs / 2;
    int rep = c->n_heads / c->n_kv_heads;
    float att_scale = 1.0f / sqrtf((float)hs);

    for (int i = 0; i < n; i++) embedding_lookup(t, s->x + (size_t)i * d, tokens[i]);

    int kv16 = s->kv_half;
    for (int l = 0; l < c->n_layers; l++) {
        const LayerWeights *lw = &w->layers[l];
        size_t layer_off = (size_t)l * s->n_ctx * kv;
        void *kc = (void *)kv_at(s->key_cache, layer_off, kv16);   /* (n_ctx, kv_dim) */
        void *vc = (void *)kv_at(s->value_cache, layer_off, kv16); /* (n_ctx, kv_dim) */

        /* attention: q, k, v of the block; k and v go straight into the cache rows of an fp32
           cache, else through kbuf / vbuf and then rounded into it */
        prefill_norm(t, s->x, l ? s->xb2 : NULL, s->xb, lw->rms_att, 0, n); /* the last layer's w2 output joins x */
        float *kb = kv16 ? s->kbuf : (float *)kc + (size_t)pos * kv;
        float *vb = kv16 ? s->vbuf : (float *)vc + (size_t)pos * kv;
        MatJob qkv[3] = {{s->q, &lw->wq, d}, {kb, &lw->wk, kv}, {vb, &lw->wv, kv}};
        matmul_jobs(t, qkv, 3, s->xb, n, d);
        int i;
OMP_PARALLEL_FOR
        for (i = 0; i < n; i++) {
            const float *cs = s->rope_cos + (size_t)(pos + i) * half;
            const float *sn = s->rope_sin + (size_t)(pos + i) * half;
            rope_rotate(s->q + (size_t)i * d, c->n_heads, hs, cs, sn);
            rope_rotate(kb + (size_t)i * kv, c->n_kv_heads, hs, cs, sn);
            if (kv16) {
                kv_store_f16((uint16_t *)kc + (size_t)(pos + i) * kv, kb + (size_t)i * kv, (size_t)kv);
                kv_store_f16((uint16_t *)vc + (size_t)(pos + i) * kv, vb + (size_t)i * kv, (size_t)kv);
            }
        }

        /* causal attention: token i sees cached positions 0 .. pos+i. Head-major, so a thread's
           jobs share one head's keys and values; each thread uses its own row of s->att as scratch
           (no more threads than rows). */
        int work = n * c->n_heads, job;
#ifdef _OPENMP
        int team = omp_get_max_threads() < s->slots ? omp_get_max_threads() : s->slots;
#pragma omp parallel for schedule(static) num_threads(team)
#endif
        for (job = 0; job < work; job++) {
            int h = job / n, i = job % n;
            int len = pos + i + 1, slot = 0;
#ifdef _OPENMP
            slot = omp_get_thread_num();
#endif
            const float *qh = s->q + (size_t)i * d + (size_t)h * hs;
            float *att = s->att + (size_t)slot * s->att_stride;
            float *out = s->xb + (size_t)i * d + (size_t)h * hs;
            size_t kv_off = (size_t)(h / rep) * hs; /* query head h reads kv head h / rep */
            attention_head(out, qh, kv_at(kc, kv_off, kv16), kv_at(vc, kv_off, kv16), kv16, att, len, kv, hs,
                           att_scale);
        }
        prefill_quantize(t, s->xb, NULL, n, d, c->group_size);
        matmul(t, s->xb2, s->xb, &lw->wo, n, d, d);

        /* SwiGLU feed-forward: w2(silu(w1 x) * w3 x), after wo's output joins x */
        prefill_norm(t, s->x, s->xb2, s->xb, lw->rms_ffn, 0, n);
        MatJob up[2] = {{s->hb, &lw->w1, hd}, {s->hb2, &lw->w3, hd}};
        matmul_jobs(t, up, 2, s->xb, n, d);
        prefill_quantize(t, s->hb, s->hb2, n, hd, c->w2_group_size);
        matmul(t, s->xb2, s->hb, &lw->w2, n, d, hd);
    }

    /* final norm and classifier: every token's row when asked, else only the last one */
    int first = all_logits ? 0 : n - 1, rows = n - first;
    prefill_norm(t, s->x, s->xb2, s->xb, w->rms_final, first, n);
    const float *xin = s->xb + (size_t)first * d;
    float *dst = all_logits ? all_logits : s->logits;
    matmul(t, dst, xin, &w->wcls, rows, c->vocab_size, d);
    if (all_logits)
        memcpy(s->logits, all_logits + (size_t)(n - 1) * c->vocab_size, (size_t)c->vocab_size * sizeof(float));
}

/* Decoding, inside the parallel region: x (dim) += W in, each thread adding the rows it computed
   (into out, dim scratch); the loop's barrier ends it. */
static void decode_residual(const Transformer *t, float *x, float *out, const Matrix *w, const float *in,
                            const int8_t *xq, const float *xs, const int32_t *xsum, int m) {
    int d = t->config.dim, rows = matrix_rows(w), blocks = (d + rows - 1) / rows, b;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (b = 0; b < blocks; b++) {
        int i0 = rows * b, i1 = i0 + rows < d ? i0 + rows : d;
        matrix_block(t, out, w, in, xq, xs, xsum, 1, d, m, i0);
        for (int i = i0; i < i1; i++) x[i] += out[i];
    }
}

/* One token at position pos: transformer_forward_block's arithmetic, row for row and in the same
   order, in a single parallel region (see the section's head); each thread finishes the rows it
   computed itself (RoPE, the residual add, SwiGLU). */
static void transformer_decode(Transformer *t, int token, int pos) {
    const Config *c = &t->config;
    const Weights *w = &t->weights;
    RunState *s = &t->state;
    int d = c->dim, hd = c->hidden_dim, kv = c->kv_dim, hs = c->head_size, gs = c->group_size;
    int rep = c->n_heads / c->n_kv_heads, q8 = c->quantized, kv16 = s->kv_half;
    float att_scale = 1.0f / sqrtf((float)hs);
    const float *cs = s->rope_cos + (size_t)pos * (hs / 2), *sn = s->rope_sin + (size_t)pos * (hs / 2);
    size_t wide = (size_t)(d > hd ? d : hd), gwide = q8 ? wide / (size_t)c->w2_group_size : 1; /* as run_state_init */
    embedding_lookup(t, s->x, token);
#ifdef _OPENMP
    int team = omp_get_max_threads() < s->slots ? omp_get_max_threads() : s->slots;
    if (s->decode_team > 0 && s->decode_team < team) team = s->decode_team;
#pragma omp parallel num_threads(team)
#endif
    {
        int me = 0;
#ifdef _OPENMP
        me = omp_get_thread_num();
#endif
        /* this thread's input vector: normed fp32, and quantized for int8 weights */
        float *xn = s->dn + (size_t)me * d;
        int8_t *xq = s->xq + (size_t)me * wide;
        float *xs = s->xs + (size_t)me * gwide;
        int32_t *xsum = s->xsum + (size_t)me * gwide;
        int b;
        for (int l = 0; l < c->n_layers; l++) {
            const LayerWeights *lw = &w->layers[l];
            size_t layer_off = (size_t)l * s->n_ctx * kv;
            const void *kc = kv_at(s->key_cache, layer_off, kv16), *vc = kv_at(s->value_cache, layer_off, kv16);
            void *krow = (void *)kv_at(kc, (size_t)pos * kv, kv16), *vrow = (void *)kv_at(vc, (size_t)pos * kv, kv16);

            /* q, k, v: the rows of all three in one loop; q and k rows rotated by their thread,
               k and v written straight into an fp32 cache row, else computed in kbuf / vbuf and
               rounded into it by the same thread */
            rmsnorm(xn, s->x, lw->rms_att, d, c->norm_eps);
            if (q8) quantize_rows(xq, xs, xsum, xn, 1, d, gs);
            const Matrix *mats[3] = {&lw->wq, &lw->wk, &lw->wv};
            float *outs[3] = {s->q, kv16 ? s->kbuf : krow, kv16 ? s->vbuf : vrow};
            void *cached[3] = {NULL, krow, vrow};
            int dims[3] = {d, kv, kv}, first[4] = {0, 0, 0, 0};
            for (int j = 0; j < 3; j++) first[j + 1] = first[j] + (dims[j] + matrix_rows(mats[j]) - 1) / matrix_rows(mats[j]);
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
            for (b = 0; b < first[3]; b++) {
                int j = b < first[1] ? 0 : b < first[2] ? 1 : 2, rows = matrix_rows(mats[j]);
                int i0 = rows * (b - first[j]), i1 = i0 + rows < dims[j] ? i0 + rows : dims[j];
                matrix_block(t, outs[j], mats[j], xn, xq, xs, xsum, 1, dims[j], d, i0);
                if (j < 2) rope_rows(outs[j], i0, i1, hs, cs, sn); /* q and k */
                if (j > 0 && kv16) kv_store_f16((uint16_t *)cached[j] + i0, outs[j] + i0, (size_t)(i1 - i0));
            }
            /* attention, one query head per job (s->att row `me` as scratch) */
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
            for (b = 0; b < c->n_heads; b++) {
                size_t kv_off = (size_t)(b / rep) * hs;
                attention_head(s->xb + (size_t)b * hs, s->q + (size_t)b * hs, kv_at(kc, kv_off, kv16),
                               kv_at(vc, kv_off, kv16), kv16, s->att + (size_t)me * s->att_stride, pos + 1, kv, hs,
                               att_scale);
            }
            /* wo, each thread adding its rows into the residual stream */
            if (q8) quantize_rows(xq, xs, xsum, s->xb, 1, d, gs);
            decode_residual(t, s->x, s->xb2, &lw->wo, s->xb, xq, xs, xsum, d);
            /* w1 and w3 block by block, each thread gating the rows it computed (SwiGLU) */
            rmsnorm(xn, s->x, lw->rms_ffn, d, c->norm_eps);
            if (q8) quantize_rows(xq, xs, xsum, xn, 1, d, gs);
            int rh = matrix_rows(&lw->w1), nh = (hd + rh - 1) / rh; /* w1 and w3: same shape and kind */
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
            for (b = 0; b < nh; b++) {
                int i0 = rh * b, i1 = i0 + rh < hd ? i0 + rh : hd;
                matrix_block(t, s->hb, &lw->w1, xn, xq, xs, xsum, 1, hd, d, i0);
                matrix_block(t, s->hb2, &lw->w3, xn, xq, xs, xsum, 1, hd, d, i0);
                swiglu(s->hb + i0, s->hb2 + i0, (size_t)(i1 - i0));
            }
            if (q8) quantize_rows(xq, xs, xsum, s->hb, 1, hd, c->w2_group_size);
            decode_residual(t, s->x, s->xb2, &lw->w2, s->hb, xq, xs, xsum, hd);
        }
        rmsnorm(xn, s->x, w->rms_final, d, c->norm_eps);
        if (q8) quantize_rows(xq, xs, xsum, xn, 1, d, gs);
        int nc = (c->vocab_size + matrix_rows(&w->wcls) - 1) / matrix_rows(&w->wcls);
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (b = 0; b < nc; b++)
            matrix_block(t, s->logits, &w->wcls, xn, xq, xs, xsum, 1, c->vocab_size, d, matrix_rows(&w->wcls) * b);
    }
}

/* Processes n tokens starting at position pos (in blocks of s->block); returns the logits of the
   last one. all_logits, when not NULL, receives (n, vocab_size). */
static float *transformer_forward(Transformer *t, const int *tokens, int n, int pos, float *all_logits) {
    if (pos < 0 || n < 1 || pos + n > t->state.n_ctx)
        fatal("internal error: positions %d..%d are outside the %d the run state holds (transformer_context)",
              pos, pos + n - 1, t->state.n_ctx);
    if (n == 1 && !all_logits) {
        transformer_decode(t, tokens[0], pos);
        return t->state.logits;
    }
    for (int done = 0; done < n;) {
        int b = n - done < t->state.block ? n - done : t->state.block;
        transformer_forward_block(t, tokens + done, b, pos + done,
                                  all_logits ? all_logits + (size_t)done * t->config.vocab_size : NULL);
        done += b;
    }
    return t->state.logits;
}

/* ----------------------------------------------------------------------------------------------
   tokenizer (developed in run_tok.c) */

#include "run_tok.c"

/* ----------------------------------------------------------------------------------------------
   sampler */

typedef struct {
    float prob;
    int index;
} ProbIndex;

typedef struct {
    int vocab_size;
    float temperature; /* 0: greedy */
    float top_p;       /* nucleus mass in (0, 1]; 1: off */
    int top_k;         /* keep the k most likely tokens; 0: off */
    uint64_t rng_state;
    ProbIndex *candidates; /* (vocab_size) scratch */
    int sort_all;      /* 1: top-p sorts every candidate (the plain form tests compare with) */
} Sampler;

static void sampler_init(Sampler *s, int vocab_size, float temperature, float top_p, int top_k,
                         uint64_t seed) {
    s->vocab_size = vocab_size;
    s->temperature = temperature;
    s->top_p = top_p;
    s->top_k = top_k;
    /* splitmix64 of the seed, so that nearby seeds (and 0) give unrelated non-zero xorshift states */
    uint64_t z = seed + 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    s->rng_state = (z ^ (z >> 31)) | 1;
    s->candidates = xmalloc((size_t)vocab_size * sizeof(ProbIndex));
    s->sort_all = 0;
}

static void sampler_free(Sampler *s) { free(s->candidates); }

/* xorshift64*: a uniform float in [0, 1) with 24 random bits. */
static float sampler_random(Sampler *s) {
    s->rng_state ^= s->rng_state >> 12;
    s->rng_state ^= s->rng_state << 25;
    s->rng_state ^= s->rng_state >> 27;
    uint64_t r = s->rng_state * 0x2545f4914f6cdd1dull;
    return (float)(r >> 40) / 16777216.0f;
}

static int prob_desc(const void *a, const void *b) {
    float pa = ((const ProbIndex *)a)->prob, pb = ((const ProbIndex *)b)->prob;
    if (pa > pb) return -1;
    if (pa < pb) return 1;
    return ((const ProbIndex *)a)->index - ((const ProbIndex *)b)->index;
}

/* Moves the k most likely candidates (in prob_desc order) to c[0..k), in no particular order:
   quickselect, O(n) on average. */
static void select_top(ProbIndex *c, int n, int k) {
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        ProbIndex pivot = c[lo + (hi - lo) / 2];
        int i = lo, j = hi;
        while (i <= j) {
            while (prob_desc(&c[i], &pivot) < 0) i++;
            while (prob_desc(&c[j], &pivot) > 0) j--;
            if (i <= j) {
                ProbIndex tmp = c[i];
                c[i] = c[j];
                c[j] = tmp;
                i++;
                j--;
            }
        }
        /* now c[lo..j] <= pivot <= c[i..hi] in prob_desc order, with j < i */
        if (k - 1 <= j) hi = j;
        else if (k - 1 >= i) lo = i;
        else break;
    }
}

/* Picks the next token from logits (vocab_size); overwrites logits. */
static int sampler_sample(Sampler *s, float *logits) {
    int n = s->vocab_size;
    if (s->temperature == 0.0f) return argmax(logits, n);
    /* A temperature so small that the largest logit divided by it overflows (main refuses only
       subnormal ones) is greedy in its limit, and without this every probability would be
       inf - inf = NaN. */
    int best = argmax(logits, n);
    if (!isfinite(logits[best] / s->temperature)) return best;
    for (int i = 0; i < n; i++) logits[i] /= s->temperature;
    int k = (s->top_k > 0 && s->top_k < n) ? s->top_k : n;
    if (k == n && s->top_p >= 1.0f) {
        softmax_fast(logits, n);
        float coin = sampler_random(s), cdf = 0.0f;
        for (int i = 0; i < n; i++) {
            cdf += logits[i];
            if (coin < cdf) return i;
        }
        return n - 1; /* rounding: the mass summed to slightly under coin */
    }
    /* top-k and/or top-p: order candidates by probability, keep the k best, renormalize, then
       keep the smallest prefix whose mass reaches top_p (always at least one token). Only the
       candidates that can matter get sorted: the k best (selected first), or for top-p alone
       those with probability >= (1 - top_p) / (n - 1): a token below that cannot be in the
       nucleus, since it and all less likely tokens (at most n - 1 of them) hold less than
       1 - top_p together, so the more likely tokens before it already reach top_p. */
    softmax_fast(logits, n);
    ProbIndex *c = s->candidates;
    int n_cand = 0, sorted = 0;
    if (k < n) {
        for (int i = 0; i < n; i++) {
            c[i].prob = logits[i];
            c[i].index = i;
        }
        select_top(c, n, k);
        n_cand = k;
    } else {
        float cutoff = n > 1 ? (1.0f - s->top_p) / (float)(n - 1) : 0.0f;
        for (int i = 0; i < n; i++) {
            if (logits[i] >= cutoff) {
                c[n_cand].prob = logits[i];
                c[n_cand].index = i;
                n_cand++;
            }
        }
        if (n_cand == 0) return argmax(logits, n); /* only if rounding left nothing */
        /* A trained model's nucleus is usually a few dozen tokens of thousands of candidates:
           select the 64 most likely and sort only those; if they do not reach top_p, try as many
           again as their mass suggests are needed (at least 8 times as many), and sort all once
           that is half of them or more. The most likely m in prob_desc's total order are the
           first m of the full sort, and the sum below is the one the nucleus loop makes, so the
           result is the same as sorting everything. */
        for (int m = 64; m < n_cand / 2 && !sorted && !s->sort_all;) {
            select_top(c, n_cand, m);
            qsort(c, (size_t)m, sizeof(ProbIndex), prob_desc);
            float cum = 0.0f;
            for (int i = 0; i < m && !sorted; i++) {
                cum += c[i].prob / 1.0f;
                if (cum >= s->top_p) sorted = 1;
            }
            double want = cum > 0.0f ? 2.0 * m * s->top_p / cum : (double)n_cand;
            m = want > 8.0 * m ? (want < n_cand ? (int)want : n_cand) : 8 * m;
        }
    }
    if (!sorted) qsort(c, (size_t)n_cand, sizeof(ProbIndex), prob_desc);
    float mass = 1.0f; /* top-p alone: the nucleus is a share of all the probability */
    if (k < n) {
        mass = 0.0f;
        for (int i = 0; i < n_cand; i++) mass += c[i].prob;
    }
    int keep = n_cand;
    if (s->top_p < 1.0f) {
        float cum = 0.0f;
        for (int i = 0; i < n_cand; i++) {
            cum += c[i].prob / mass;
            if (cum >= s->top_p) {
                keep = i + 1;
                break;
            }
        }
    }
    float kept = 0.0f;
    for (int i = 0; i < keep; i++) kept += s->candidates[i].prob;
    float coin = sampler_random(s) * kept, cdf = 0.0f;
    for (int i = 0; i < keep; i++) {
        cdf += s->candidates[i].prob;
        if (coin < cdf) return s->candidates[i].index;
    }
    return s->candidates[keep - 1].index;
}

/* ----------------------------------------------------------------------------------------------
   generation */

typedef struct {
    int n_prompt;      /* prompt tokens, BOS included */
    int n_generated;   /* tokens sampled (the stopping EOS/BOS included) */
    double prefill_s;  /* seconds spent on the prompt */
    double decode_s;   /* seconds from the first sampled token to the end */
    int decode_team;   /* threads decoding settled on (0: all of them) */
    int ended;         /* 1: the model ended the story (EOS or BOS); 0: the step limit did */
} GenStats;

/* defines: DecodeTuner (whether decoding runs on one thread or all, by timing the first steps),
   default_threads and pin_threads (how many threads, and where, for main) */
#include "run_threads.h"

static GenStats generate_ids(Transformer *t, Sampler *sampler, const int *ids, int n_prompt, int limit,
                             int eos_id, int bos_id, TokenPrinter *printer, FILE *out, int *out_ids) {
    GenStats st = {n_prompt, 0, 0.0, 0.0, 0, 0};
    DecodeTuner tuner = {0.0, 0.0, 0};
    int tune = 0;
#ifdef _OPENMP
    tune = omp_get_max_threads() > 1;
#endif
    t->state.decode_team = 0;
    double t0 = time_now_s();
    float *logits = transformer_forward(t, ids, n_prompt, 0, NULL);
    double t1 = time_now_s();
    st.prefill_s = t1 - t0;
    int pos = n_prompt;
    for (int i = 0; i < limit; i++) {
        int next = sampler_sample(sampler, logits);
        if (out_ids) out_ids[st.n_generated] = next;
        st.n_generated++;
        if (next == eos_id || next == bos_id) {
            st.ended = 1;
            break;
        }
        if (printer) {
            token_printer_print(printer, next, out);
            fflush(out);
        }
        if (i + 1 == limit) break;
        if (tune) tuner_before(&tuner, t, i);
        double a = time_now_s();
        logits = transformer_forward(t, &next, 1, pos, NULL);
        if (tune) tuner_after(&tuner, t, i, time_now_s() - a);
        pos++;
    }
    st.decode_s = time_now_s() - t1;
    st.decode_team = t->state.decode_team;
    t->state.decode_team = 0;
    return st;
}

static GenStats generate(Transformer *t, Tokenizer *tok, Sampler *sampler, const char *prompt, int steps,
                         FILE *out) {
    const Config *c = &t->config;
    int n_prompt = 0;
    int *ids = tokenizer_encode(tok, prompt, 1, 0, &n_prompt);
    if (n_prompt < 1) fatal("internal error: encoding gave no tokens (not even BOS)");
    if (n_prompt > c->max_seq_len)
        fatal("the prompt is %d tokens (BOS included), more than the model's max_seq_len=%d; shorten it",
              n_prompt, c->max_seq_len);
    /* Token k after the prompt is sampled from the logits of position n_prompt - 1 + k, and the
       last one sampled is never fed back: so max_seq_len - n_prompt + 1 tokens fit, the last
       from the logits of the context's last position (a prompt that fills the context still
       gets one). */
    int room = c->max_seq_len - n_prompt + 1;
    int limit = (steps == 0 || steps > room) ? room : steps;
    transformer_context(t, n_prompt + limit - 1); /* the last token sampled is never fed back */
    fputs(prompt, out);
    fflush(out);
    /* Running the prompt's ids through the printer without printing them tells it whether the
       first generated piece's leading space belongs to the text (it does after a prompt). */
    TokenPrinter printer;
    token_printer_init(&printer, tok);
    size_t unused_len;
    for (int i = 0; i < n_prompt; i++) token_printer_put(&printer, ids[i], &unused_len);
    token_printer_flush(&printer, &unused_len);
    GenStats st = generate_ids(t, sampler, ids, n_prompt, limit, tok->eos_id, tok->bos_id, &printer, out, NULL);
    token_printer_finish(&printer, out);
    token_printer_free(&printer);
    fflush(out);
    free(ids);
    return st;
}

/* ----------------------------------------------------------------------------------------------
   instructions: the prompt of a story on request, byte for byte as instruct.py's render_prompt
   writes it (and pretokenize --instruct=true trained on): one line per field given, in the order
   words, features, summary, sentence, then the story's label. */

typedef struct {
    const char *words;    /* -w: words the story must use, separated by , ， or 、 (NULL: none) */
    const char *features; /* -f: feature names, separated likewise */
    const char *summary;  /* -u */
    const char *sentence; /* -x */
} InstructRequest;

enum { LABEL_WORDS, LABEL_FEATURES, LABEL_SUMMARY, LABEL_SENTENCE, LABEL_STORY, LABEL_SEP };
/* instruct.TEMPLATES: [language][label]; language 0 = zh, 1 = en */
static const char *const INSTRUCT_LABELS[2][6] = {
    {"词语：", "特点：", "摘要：", "句子：", "故事：", "，"},
    {"Words: ", "Features: ", "Summary: ", "Sentence: ", "Story:", ", "},
};
/* instruct.FEATURES: id, Chinese name, English name; any of the three is accepted (ASCII case aside) */
#define N_FEATURES 6
static const char *const INSTRUCT_FEATURES[N_FEATURES][3] = {
    {"dialogue", "对话", "Dialogue"},   {"moral", "寓意", "MoralValue"},      {"twist", "转折", "Twist"},
    {"bad_ending", "坏结局", "BadEnding"}, {"conflict", "冲突", "Conflict"}, {"foreshadowing", "伏笔", "Foreshadowing"},
};

/* Bytes of the whitespace character (Python's str.isspace) at s, or 0: ASCII whitespace, U+0085,
   U+00A0, U+1680, U+2000-U+200A, U+2028, U+2029, U+202F, U+205F, U+3000. */
static size_t utf8_space(const unsigned char *s, const unsigned char *end) {
    size_t n = (size_t)(end - s);
    if (n >= 1 && ((s[0] >= 0x09 && s[0] <= 0x0d) || (s[0] >= 0x1c && s[0] <= 0x20))) return 1;
    if (n >= 2 && s[0] == 0xc2 && (s[1] == 0x85 || s[1] == 0xa0)) return 2;
    if (n >= 3) {
        if (s[0] == 0xe1 && s[1] == 0x9a && s[2] == 0x80) return 3;
        if (s[0] == 0xe2 && s[1] == 0x80 && (s[2] <= 0x8a || s[2] == 0xa8 || s[2] == 0xa9 || s[2] == 0xaf)) return 3;
        if (s[0] == 0xe2 && s[1] == 0x81 && s[2] == 0x9f) return 3;
        if (s[0] == 0xe3 && s[1] == 0x80 && s[2] == 0x80) return 3;
    }
    return 0;
}

/* [*start, *end) trimmed of whitespace on both sides (str.strip). */
static void text_strip(const char **start, const char **end) {
    const unsigned char *a = (const unsigned char *)*start, *e = (const unsigned char *)*end;
    size_t sp;
    while (a < e && (sp = utf8_space(a, e)) > 0) a += sp;
    const unsigned char *last = a; /* end of the last character that is not whitespace */
    for (const unsigned char *q = a; q < e;) {
        if ((sp = utf8_space(q, e)) > 0) {
            q += sp;
            continue;
        }
        q++;
        while (q < e && (*q & 0xc0) == 0x80) q++;
        last = q;
    }
    *start = (const char *)a;
    *end = (const char *)last;
}

/* Bytes of the list separator at s (, ， 、), or 0. */
static size_t list_separator(const char *s) {
    if (*s == ',') return 1;
    if (strncmp(s, "，", 3) == 0 || strncmp(s, "、", 3) == 0) return 3;
    return 0;
}

/* The next non-empty, trimmed item of a list (instruct.split_list) from *cursor, advancing it;
   0 when none is left. */
static int list_next(const char **cursor, const char **item, size_t *len) {
    while (**cursor) {
        const char *a = *cursor, *e = a;
        while (*e && !list_separator(e)) e++;
        *cursor = *e ? e + list_separator(e) : e;
        text_strip(&a, &e);
        if (e > a) {
            *item = a;
            *len = (size_t)(e - a);
            return 1;
        }
    }
    return 0;
}

/* The feature a name (id, Chinese or English, instruct.feature_id) stands for, or -1. */
static int feature_find(const char *name, size_t len) {
    for (int f = 0; f < N_FEATURES; f++)
        for (int k = 0; k < 3; k++) {
            const char *n = INSTRUCT_FEATURES[f][k];
            if (strlen(n) != len) continue;
            size_t i = 0;
            while (i < len && (unsigned char)(name[i] | (name[i] >= 'A' && name[i] <= 'Z' ? 0x20 : 0)) ==
                                  (unsigned char)(n[i] | (n[i] >= 'A' && n[i] <= 'Z' ? 0x20 : 0)))
                i++;
            if (i == len) return f;
        }
    return -1;
}

/* One clear line for a request that cannot work (instruct.make_instruction's checks), before
   any model is loaded. */
static void instruct_check(const InstructRequest *r) {
    const char *cur, *item;
    size_t len;
    int n_words = 0, n_features = 0, any = 0;
    if (r->words) {
        for (cur = r->words; list_next(&cur, &item, &len); n_words++)
            if (memchr(item, '\n', len)) fatal("-w: the word '%.*s' holds a line break", (int)len, item);
        if (!n_words) fatal("-w '%s' names no word; give words separated by commas (-w 苹果,跑)", r->words);
    }
    if (r->features)
        for (cur = r->features; list_next(&cur, &item, &len); n_features++)
            if (feature_find(item, len) < 0)
                fatal("-f: unknown feature '%.*s'; features: 对话 (Dialogue), 寓意 (MoralValue), 转折 (Twist), "
                      "坏结局 (BadEnding), 冲突 (Conflict), 伏笔 (Foreshadowing)", (int)len, item);
    const char *lines[2] = {r->summary, r->sentence};
    for (int i = 0; i < 2; i++) {
        if (!lines[i]) continue;
        const char *a = lines[i], *e = a + strlen(a);
        text_strip(&a, &e);
        if (memchr(a, '\n', (size_t)(e - a))) fatal("%s must be one line", i ? "-x" : "-u");
        any |= e > a;
    }
    if (!(n_words || n_features || any))
        fatal("-m instruct needs a request: words (-w), features (-f), a summary (-u) or a sentence (-x)");
}

static void text_add(char **buf, size_t *len, size_t *cap, const char *s, size_t n) {
    if (*len + n + 1 > *cap) {
        size_t want = (*len + n + 1) * 2;
        char *p = realloc(*buf, want);
        if (!p) fatal("out of memory (%zu bytes)", want);
        *buf = p;
        *cap = want;
    }
    memcpy(*buf + *len, s, n);
    *len += n;
    (*buf)[*len] = '\0';
}

/* The prompt text for a checked request in prompt_format fmt (PROMPT_INSTRUCT_*); malloc'd. */
static char *instruct_prompt(const InstructRequest *r, int fmt) {
    const char *const *t = INSTRUCT_LABELS[fmt == PROMPT_INSTRUCT_EN];
    char *buf = NULL;
    size_t len = 0, cap = 0, n;
    const char *cur, *item;
    for (int field = LABEL_WORDS; field <= LABEL_SENTENCE; field++) {
        int first = 1;
        if (field == LABEL_WORDS || field == LABEL_FEATURES) {
            cur = field == LABEL_WORDS ? r->words : r->features;
            while (cur && list_next(&cur, &item, &n)) {
                text_add(&buf, &len, &cap, first ? t[field] : t[LABEL_SEP], strlen(first ? t[field] : t[LABEL_SEP]));
                if (field == LABEL_FEATURES) {
                    item = INSTRUCT_FEATURES[feature_find(item, n)][fmt == PROMPT_INSTRUCT_EN ? 2 : 1];
                    n = strlen(item);
                }
                text_add(&buf, &len, &cap, item, n);
                first = 0;
            }
        } else {
            const char *a = field == LABEL_SUMMARY ? r->summary : r->sentence, *e;
            if (!a) continue;
            e = a + strlen(a);
            text_strip(&a, &e);
            if (e == a) continue;
            text_add(&buf, &len, &cap, t[field], strlen(t[field]));
            text_add(&buf, &len, &cap, a, (size_t)(e - a));
            first = 0;
        }
        if (!first) text_add(&buf, &len, &cap, "\n", 1);
    }
    text_add(&buf, &len, &cap, t[LABEL_STORY], strlen(t[LABEL_STORY]));
    return buf;
}

#ifndef TESTING
/* ----------------------------------------------------------------------------------------------
   CLI */

static void usage(FILE *f) {
    fputs("usage: run model.bin [options]\n"
          "       run -m encode -z tokenizer.bin -i text\n"
          "       run model.bin -m instruct -w 苹果,跑 -f 对话 [-u summary] [-x sentence]\n"
          "  -t <float>  temperature: 0 = greedy, else a normal float >= 1.18e-38 (default 1.0)\n"
          "  -p <float>  top-p (nucleus) mass in (0, 1]; 1 = off (default 0.9)\n"
          "  -k <int>    top-k, >= 0; 0 = off (default 0)\n"
          "  -s <int>    random seed, >= 0; 0 = from the clock (default 0)\n"
          "  -n <int>    tokens to generate, >= 0; 0 = up to max_seq_len (default 256)\n"
          "  -i <string> prompt (default empty)\n"
          "  -z <path>   tokenizer .bin (default: tok<vocab>.bin, then tokenizer.bin,\n"
          "              next to the model file)\n"
          "  -m <mode>   generate | chat | encode | instruct (default generate); instruct: a story\n"
          "              on request, for a model trained with instructions (encode with -w/-f/-u/-x\n"
          "              and a model prints the request's prompt ids)\n"
          "  -w <list>   instruct: words the story must use, separated by , or ，\n"
          "  -f <list>   instruct: features it must have: 对话 寓意 转折 坏结局 冲突 伏笔 or Dialogue\n"
          "              MoralValue Twist BadEnding Conflict Foreshadowing\n"
          "  -u <string> instruct: a one-line summary of the story\n"
          "  -x <string> instruct: a sentence it must contain\n"
          "  -y <string> system prompt for chat mode\n"
          "  -c <type>   KV cache precision: f32 | f16 (default f16 for int8 models, f32 for\n"
          "              fp32 ones: half the attention memory traffic, a small rounding error)\n"
          "Generated text goes to stdout, statistics and errors to stderr.\n", f);
}

static void usage_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    report_line(fmt, ap);
    va_end(ap);
    usage(stderr);
    exit(EXIT_FAILURE);
}

static float parse_float(const char *flag, const char *s) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || *end || errno || !isfinite(v)) usage_error("%s expects a number, got '%s'", flag, s);
    return (float)v;
}

static long parse_int(const char *flag, const char *s) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (end == s || *end || errno || v > INT_MAX || v < INT_MIN)
        usage_error("%s expects an integer, got '%s'", flag, s);
    return v;
}

/* Default tokenizer: tok<vocab>.bin, then tokenizer.bin, in the model's folder. Returns a malloc'd
   path, or NULL when neither exists (the names tried are written to `tried`). */
static char *default_tokenizer_path(const char *model_path, int vocab_size, char *tried, size_t n_tried) {
    const char *slash = strrchr(model_path, '/');
    size_t dir_len = slash ? (size_t)(slash - model_path + 1) : 0;
    char name[64];
    snprintf(name, sizeof name, "tok%d.bin", vocab_size);
    const char *names[2] = {name, "tokenizer.bin"};
    tried[0] = '\0';
    for (int i = 0; i < 2; i++) {
        size_t len = dir_len + strlen(names[i]) + 1;
        char *p = xmalloc(len);
        memcpy(p, model_path, dir_len);
        strcpy(p + dir_len, names[i]);
        if (access(p, R_OK) == 0) return p;
        if (strlen(tried) + len + 8 < n_tried) {
            if (i) strcat(tried, " or ");
            strcat(tried, p);
        }
        free(p);
    }
    return NULL;
}

/* llama-2-chat style loop: one user line per turn from stdin ([INST] template), the reply streamed
   to stdout; ends cleanly at EOF or when the context is full. */
static void chat(Transformer *t, Tokenizer *tok, Sampler *sampler, const char *first_user,
                 const char *system_prompt, int steps) {
    const Config *c = &t->config;
    char line[4096];
    int pos = 0, turn = 0;
    float *logits = NULL;
    transformer_context(t, c->max_seq_len); /* a chat may fill the whole context */
    for (;;) {
        const char *user = NULL;
        if (turn == 0 && first_user && first_user[0]) {
            user = first_user;
        } else {
            fputs("User: ", stderr);
            fflush(stderr);
            if (!fgets(line, sizeof line, stdin)) break; /* EOF ends the chat */
            line[strcspn(line, "\r\n")] = '\0';
            user = line;
        }
        size_t need = strlen(user) + (system_prompt ? strlen(system_prompt) : 0) + 64;
        char *text = xmalloc(need);
        if (turn == 0 && system_prompt && system_prompt[0])
            snprintf(text, need, "[INST] <<SYS>>\n%s\n<</SYS>>\n\n%s [/INST]", system_prompt, user);
        else
            snprintf(text, need, "[INST] %s [/INST]", user);
        int n_ids = 0;
        int *ids = tokenizer_encode(tok, text, 1, 0, &n_ids);
        free(text);
        if (pos + n_ids >= c->max_seq_len) {
            free(ids);
            fprintf(stderr, "run: context full (max_seq_len=%d); ending the chat\n", c->max_seq_len);
            break;
        }
        logits = transformer_forward(t, ids, n_ids, pos, NULL);
        pos += n_ids;
        free(ids);
        fputs("Assistant: ", stdout);
        TokenPrinter printer; /* a fresh text: the reply's leading space is dropped */
        token_printer_init(&printer, tok);
        for (int i = 0; (steps == 0 || i < steps) && pos < c->max_seq_len; i++) {
            int next = sampler_sample(sampler, logits);
            if (next == tok->eos_id || next == tok->bos_id) break;
            token_printer_print(&printer, next, stdout);
            fflush(stdout);
            logits = transformer_forward(t, &next, 1, pos, NULL);
            pos++;
        }
        token_printer_finish(&printer, stdout);
        token_printer_free(&printer);
        fputc('\n', stdout);
        fflush(stdout);
        turn++;
        if (pos >= c->max_seq_len) {
            fprintf(stderr, "run: context full (max_seq_len=%d); ending the chat\n", c->max_seq_len);
            break;
        }
    }
}

int main(int argc, char **argv) {
    const char *model_path = NULL, *tokenizer_path = NULL, *prompt = "", *mode = "generate";
    const char *system_prompt = NULL;
    InstructRequest request = {NULL, NULL, NULL, NULL};
    float temperature = 1.0f, top_p = 0.9f;
    long top_k = 0, seed = 0, steps = 256;
    int kv = KV_DEFAULT;
    if (argc < 2) {
        usage(stderr);
        return EXIT_FAILURE;
    }
    int a = 1;
    if (argv[1][0] != '-') model_path = argv[a++];
    for (; a < argc; a += 2) {
        const char *flag = argv[a];
        if (strcmp(flag, "-h") == 0 || strcmp(flag, "--help") == 0) {
            usage(stdout);
            return EXIT_SUCCESS;
        }
        if (flag[0] != '-' || strlen(flag) != 2) usage_error("unknown argument '%s'", flag);
        if (a + 1 >= argc) usage_error("%s needs a value", flag);
        const char *val = argv[a + 1];
        switch (flag[1]) {
        case 't':
            temperature = parse_float(flag, val);
            if (temperature < 0.0f || strtod(val, NULL) < 0.0) usage_error("-t must be >= 0, got %s", val);
            /* a positive value that rounds to 0 or to a subnormal float: 1/t overflows, and
               taking it as 0 (greedy) would be a silent change */
            if (strtod(val, NULL) > 0.0 && !(temperature >= FLT_MIN))
                usage_error("-t %s is too small (a positive temperature must be >= %g; 0 is greedy)", val,
                            (double)FLT_MIN);
            break;
        case 'p':
            top_p = parse_float(flag, val);
            if (!(top_p > 0.0f && top_p <= 1.0f)) usage_error("-p must be in (0, 1], got %s", val);
            break;
        case 'k':
            top_k = parse_int(flag, val);
            if (top_k < 0) usage_error("-k must be >= 0, got %s", val);
            break;
        case 's':
            seed = parse_int(flag, val);
            if (seed < 0) usage_error("-s must be >= 0, got %s", val);
            break;
        case 'n':
            steps = parse_int(flag, val);
            if (steps < 0) usage_error("-n must be >= 0, got %s", val);
            break;
        case 'i': prompt = val; break;
        case 'z': tokenizer_path = val; break;
        case 'y': system_prompt = val; break;
        case 'w': request.words = val; break;
        case 'f': request.features = val; break;
        case 'u': request.summary = val; break;
        case 'x': request.sentence = val; break;
        case 'c':
            if (strcmp(val, "f32") == 0) kv = KV_F32;
            else if (strcmp(val, "f16") == 0) kv = KV_F16;
            else usage_error("-c must be f32 or f16, got '%s'", val);
            break;
        case 'm':
            mode = val;
            if (strcmp(mode, "generate") && strcmp(mode, "chat") && strcmp(mode, "encode") && strcmp(mode, "instruct"))
                usage_error("-m must be generate, chat, encode or instruct, got '%s'", val);
            break;
        default: usage_error("unknown flag '%s'", flag);
        }
    }
    int encode_only = strcmp(mode, "encode") == 0;
    int asked = request.words || request.features || request.summary || request.sentence;
    int instruct_mode = strcmp(mode, "instruct") == 0;
    if (asked && !instruct_mode && !encode_only)
        usage_error("-w, -f, -u and -x ask for a story on request: add -m instruct");
    if (instruct_mode && prompt[0]) fatal("-i and -m instruct do not mix: the story starts after the request");
    if (instruct_mode || asked) instruct_check(&request);
    if (asked && !model_path)
        fatal("-m encode with -w/-f/-u/-x needs the model file (its header says the prompt's language)");
    if (!model_path && !(encode_only && tokenizer_path))
        usage_error(encode_only ? "-m encode needs -z tokenizer.bin (or a model path)" : "no model file given");

    Transformer transformer;
    int have_model = model_path != NULL;
    if (have_model) transformer_init(&transformer, model_path, kv);
    char *default_tok = NULL;
    if (!tokenizer_path) {
        char tried[1024];
        default_tok = default_tokenizer_path(model_path, transformer.config.vocab_size, tried, sizeof tried);
        if (!default_tok)
            fatal("%s: no tokenizer found next to the model (tried %s); pass one with -z", model_path, tried);
        tokenizer_path = default_tok;
    }
    Tokenizer tokenizer;
    tokenizer_init(&tokenizer, tokenizer_path, have_model ? transformer.config.vocab_size : -1);
    if (have_model && transformer.config.tokenizer_hash && tokenizer.hash &&
        transformer.config.tokenizer_hash != tokenizer.hash)
        fatal("%s: tokenizer does not match model %s (hash %08x, the model was exported with %08x); "
              "pass the tokenizer it was trained with (-z)", tokenizer_path, model_path,
              (unsigned)tokenizer.hash, (unsigned)transformer.config.tokenizer_hash);

    char *asked_prompt = NULL;
    if (instruct_mode || asked) {
        if (transformer.config.prompt_format == PROMPT_PLAIN)
            fatal("%s: trained without instructions (prompt_format 0 in its header), so it cannot take "
                  "-m instruct; train on pretokenize --instruct=true data and export version 3", model_path);
        asked_prompt = instruct_prompt(&request, transformer.config.prompt_format);
        prompt = asked_prompt;
        if (instruct_mode) {
            int n = 0;
            int *ids = tokenizer_encode(&tokenizer, prompt, 1, 0, &n);
            free(ids);
            if (n >= transformer.config.max_seq_len)
                fatal("the request is %d tokens (BOS included), leaving no room for a story in the model's "
                      "max_seq_len=%d; ask for less", n, transformer.config.max_seq_len);
        }
    }
    if (encode_only) {
        int n = 0;
        int *ids = tokenizer_encode(&tokenizer, prompt, 0, 0, &n);
        for (int i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
        printf("\n");
        free(ids);
    } else {
#ifdef _OPENMP
        if (!getenv("OMP_NUM_THREADS")) omp_set_num_threads(default_threads());
        int n_threads = omp_get_max_threads();
        pin_threads(n_threads);
#else
        int n_threads = 1;
#endif
        uint64_t rng_seed = seed > 0 ? (uint64_t)seed : (uint64_t)time(NULL);
        Sampler sampler;
        sampler_init(&sampler, transformer.config.vocab_size, temperature, top_p, (int)top_k, rng_seed);
        if (strcmp(mode, "chat") == 0) {
            chat(&transformer, &tokenizer, &sampler, prompt, system_prompt, (int)steps);
        } else {
            GenStats st = generate(&transformer, &tokenizer, &sampler, prompt, (int)steps, stdout);
            fputc('\n', stdout);
            fflush(stdout);
            int decoded = st.n_generated > 0 ? st.n_generated - 1 : 0; /* forward passes after prefill */
            fprintf(stderr, "prefill: %d tokens in %.1f ms (%.1f tok/s); decode: %d tokens in %.1f ms (%.1f tok/s); "
                    "%d thread%s%s; %s\n", st.n_prompt, st.prefill_s * 1e3, st.prefill_s > 0 ? st.n_prompt / st.prefill_s : 0.0,
                    decoded, st.decode_s * 1e3, st.decode_s > 0 ? decoded / st.decode_s : 0.0, n_threads,
                    n_threads == 1 ? "" : "s", st.decode_team == 1 && n_threads > 1 ? " (decoding on 1: faster for this model)" : "",
                    st.ended ? "ended by the model (EOS)" : "ended at the step limit");
        }
        sampler_free(&sampler);
    }
    free(asked_prompt);
    tokenizer_free(&tokenizer);
    free(default_tok);
    if (have_model) transformer_free(&transformer);
    return EXIT_SUCCESS;
}
#endif /* TESTING */
