/* fuzz_model.c: libFuzzer harness for run.c's model loader (transformer_init), every version.

   Each input is a whole model file (legacy version 0, 1, 2, 3 fp32 or int8): it is written to a
   memfd and loaded through its /proc/self/fd path, as ./run loads a file. An input the loader
   refuses must end in fatal() (caught, see fuzz_hooks.c); an input it accepts must map pointers
   that a forward pass can use: the harness runs one decode step over BOS and one two-token
   prefill block, then frees, and checks that the engine released everything it held.
   The seed corpus is export.py's output for tiny random models (tests/test_fuzz.py seeds).

   Build and run: make fuzz (or see docs/fuzzing.md). */
#include "fuzz_hooks.c"
#define TESTING
#pragma GCC diagnostic ignored "-Wunused-function" /* main()'s helpers are not all used */
#include "../../run.c"

/* Loads whose KV cache and activations would exceed this are skipped, not run: max_seq_len is
   not bounded by the file size, so a few-kB file can ask for gigabytes (docs/fuzzing.md,
   findings). The header is parsed by the engine's own config_read first to size it. */
#define FUZZ_MAX_STATE_BYTES ((int64_t)256 << 20)

static Transformer model;

static int64_t state_bytes(const Config *c) {
    int64_t kv = (int64_t)c->n_kv_heads * (c->dim / c->n_heads);
    int64_t cache = 2 * 4 * (int64_t)c->n_layers * c->max_seq_len * kv;
    int64_t rope = 4 * (int64_t)c->max_seq_len * c->dim;
    int64_t acts = 4 * 64 * (6 * (int64_t)c->dim + 2 * (int64_t)c->hidden_dim) + 4 * (int64_t)c->vocab_size;
    int64_t att = 4 * (int64_t)c->max_seq_len * 64;
    return cache + rope + acts + att;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *path = fz_write_file(data, size);
    Config c;
    int ok;
    unsigned char header[MODEL_HEADER_SIZE] = {0};
    memcpy(header, data, size < MODEL_HEADER_SIZE ? size : MODEL_HEADER_SIZE);
    FZ_GUARD(ok, config_read(&c, path, header, size));
    if (!ok) return 0;
    if (state_bytes(&c) > FUZZ_MAX_STATE_BYTES) return 0;
    FZ_GUARD(ok, transformer_init(&model, path, KV_DEFAULT));
    if (!ok) {
        memset(&model, 0, sizeof model);
        return 0;
    }
    int tokens[2] = {1 % model.config.vocab_size, 0};
    transformer_forward(&model, tokens, 1, 0, NULL);
    if (model.config.max_seq_len >= 3) transformer_forward(&model, tokens, 2, 1, NULL);
    transformer_free(&model);
    fz_expect_nothing_held("transformer_init + transformer_free");
    return 0;
}
