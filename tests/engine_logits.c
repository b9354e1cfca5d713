/* Test harness for run.c's forward pass and generation loop (tests/test_engine.py builds and runs it).

     engine_logits step  MODEL "IDS" OUT.f32   one forward call per token (the decode path); writes
                                               every position's logits, (n, vocab) float32
     engine_logits block MODEL "IDS" OUT.f32   the whole list through the prefill path in one call,
                                               same output; blocks of 32 tokens (not the engine's
                                               256) so that tests see blocks that start with
                                               earlier positions cached
     engine_logits greedy MODEL "IDS" N         greedy generation of up to N tokens after IDS (the
                                               same loop as ./run, stopping at ids 1 and 2 as BOS/EOS);
                                               prints the sampled ids, space separated
   IDS: token ids separated by spaces, the first one usually BOS. An optional last argument, f32
   or f16, sets the KV cache precision (run's -c); without it, the engine's default.
   Build: make run BIN=tests/engine_logits SRC=tests/engine_logits.c (or runsan, runomp). */
#define TESTING
#pragma GCC diagnostic ignored "-Wunused-function" /* main()'s helpers are not all used */
#include "../run.c"

static int *parse_ids(const char *s, int vocab_size, int *n_out) {
    int cap = 16, n = 0;
    int *ids = xmalloc((size_t)cap * sizeof(int));
    while (*s) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s) break;
        if (v < 0 || v >= vocab_size) fatal("token id %ld out of range [0, %d)", v, vocab_size);
        if (n == cap) {
            cap *= 2;
            int *grown = realloc(ids, (size_t)cap * sizeof(int));
            if (!grown) fatal("out of memory");
            ids = grown;
        }
        ids[n++] = (int)v;
        s = end;
    }
    *n_out = n;
    return ids;
}

int main(int argc, char **argv) {
    if (argc != 5 && argc != 6) {
        fprintf(stderr, "usage: engine_logits step|block|greedy MODEL \"IDS\" OUT.f32|N [f32|f16]\n");
        return 2;
    }
    const char *mode = argv[1];
    int kv = KV_DEFAULT;
    if (argc == 6) {
        if (strcmp(argv[5], "f32") == 0) kv = KV_F32;
        else if (strcmp(argv[5], "f16") == 0) kv = KV_F16;
        else fatal("KV cache precision must be f32 or f16, got %s", argv[5]);
    }
    Transformer t;
    transformer_init(&t, argv[2], kv);
    transformer_context(&t, t.config.max_seq_len);
    const Config *c = &t.config;
    int n = 0;
    int *ids = parse_ids(argv[3], c->vocab_size, &n);
    if (n < 1 || n > c->max_seq_len) fatal("need 1..%d ids, got %d", c->max_seq_len, n);
    if (strcmp(mode, "greedy") == 0) {
        int steps = atoi(argv[4]);
        int room = c->max_seq_len - n;
        int limit = steps < room ? steps : room;
        int *out = xmalloc((size_t)(limit > 0 ? limit : 1) * sizeof(int));
        Sampler sampler;
        sampler_init(&sampler, c->vocab_size, 0.0f, 1.0f, 0, 1);
        GenStats st = generate_ids(&t, &sampler, ids, n, limit, 2, 1, NULL, stdout, out);
        for (int i = 0; i < st.n_generated; i++) printf(i ? " %d" : "%d", out[i]);
        printf("\n");
        sampler_free(&sampler);
        free(out);
    } else {
        size_t V = (size_t)c->vocab_size;
        float *logits = xmalloc((size_t)n * V * sizeof(float));
        if (strcmp(mode, "step") == 0) {
            for (int i = 0; i < n; i++) {
                const float *l = transformer_forward(&t, ids + i, 1, i, NULL);
                memcpy(logits + (size_t)i * V, l, V * sizeof(float));
            }
        } else if (strcmp(mode, "block") == 0) {
            if (t.state.block > 32) t.state.block = 32;
            transformer_forward(&t, ids, n, 0, logits);
        } else {
            fatal("unknown mode %s", mode);
        }
        FILE *f = fopen(argv[4], "wb");
        if (!f || fwrite(logits, sizeof(float), (size_t)n * V, f) != (size_t)n * V || fclose(f) != 0)
            fatal("%s: cannot write logits", argv[4]);
        free(logits);
    }
    free(ids);
    transformer_free(&t);
    return 0;
}
