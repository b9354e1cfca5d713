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

/* The header's claims are bounded against the file's size (config_read), and the run state is
   sized for the three positions the forward passes below use, so no input needs to be skipped. */
static Transformer model;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *path = fz_write_file(data, size);
    int ok;
    FZ_GUARD(ok, transformer_init(&model, path, KV_DEFAULT));
    if (!ok) {
        memset(&model, 0, sizeof model);
        return 0;
    }
    transformer_context(&model, 3);
    int tokens[2] = {1 % model.config.vocab_size, 0};
    transformer_forward(&model, tokens, 1, 0, NULL);
    if (model.config.max_seq_len >= 3) transformer_forward(&model, tokens, 2, 1, NULL);
    transformer_free(&model);
    fz_expect_nothing_held("transformer_init + transformer_free");
    return 0;
}
