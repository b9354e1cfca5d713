/* fuzz_tokenizer.c: libFuzzer harness for both tokenizer loaders in run_tok.c.

   Each input is a whole tokenizer file: ours (magic "aktk", tokenizer.py's .bin) or, without that
   magic, llama2.c's legacy tokenizer.bin; tokenizer_init picks the loader by the magic, as ./run
   does. An input the loader refuses must end in tok_fail() (caught, see fuzz_hooks.c). One it
   accepts is used the way ./run uses it: a fixed text through the normalizer (the file's own
   precompiled charsmap, fuzzed too) and the BPE encoder, whose ids must lie in the vocabulary,
   and every id through the decoder (encoding may still refuse the file, through tok_fail, when
   the text reaches a charsmap entry whose replacement offset is out of range). Then the file is loaded a second time with the loaded
   vocab_size as the model's (the check ./run makes against a model), and freed; the engine must
   release everything it held. The seed corpus is tokenizer.py's output for small sentencepiece
   models (tests/test_fuzz.py seeds).

   Build and run: make fuzz (or see docs/fuzzing.md). */
#include "fuzz_hooks.c"
#include "../../run_tok.c"

static Tokenizer tok;

/* Text with what normalizers rewrite: full-width letters, a circled digit, NBSP and runs of
   spaces, a combining accent, CJK, an emoji, and bytes that are not UTF-8. */
static const char sample_text[] =
    "  Once upon\ta time,  ＡＢＣ ①２ caf\xc3\xa9 e\xcc\x81 \xc2\xa0 从前有一只小猫。 \xf0\x9f\x90\xb1 \xff\xfe <s> ab";

static void exercise(Tokenizer *t) {
    int n_ids = 0;
    int *ids = tokenizer_encode(t, sample_text, 1, 1, &n_ids);
    for (int i = 0; i < n_ids; i++) {
        if (ids[i] < 0 || ids[i] >= t->vocab_size) {
            fprintf(stderr, "fuzz_tokenizer: encode gave id %d outside the vocabulary of %d\n", ids[i], t->vocab_size);
            abort();
        }
    }
    free(ids);
    TokenPrinter p;
    token_printer_init(&p, t);
    size_t len;
    int n = t->vocab_size < 4096 ? t->vocab_size : 4096;
    for (int id = -1; id <= n; id++) token_printer_put(&p, id, &len);
    token_printer_flush(&p, &len);
    token_printer_free(&p);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *path = fz_write_file(data, size);
    int ok;
    FZ_GUARD(ok, tokenizer_init(&tok, path, -1));
    if (!ok) {
        memset(&tok, 0, sizeof tok);
        return 0;
    }
    /* a charsmap replacement offset is checked when a text reaches it, so encoding may fail too */
    FZ_GUARD(ok, exercise(&tok));
    if (!ok) {
        memset(&tok, 0, sizeof tok);
        return 0;
    }
    int vocab = tok.vocab_size;
    tokenizer_free(&tok);
    fz_expect_nothing_held("tokenizer_init + tokenizer_free");
    /* as ./run loads it next to a model of that vocab_size: must load again, to the same size */
    FZ_GUARD(ok, tokenizer_init(&tok, path, vocab));
    if (!ok) {
        fprintf(stderr, "fuzz_tokenizer: loads alone but not with the model's vocab_size %d\n", vocab);
        abort();
    }
    if (tok.vocab_size != vocab) {
        fprintf(stderr, "fuzz_tokenizer: vocab_size %d alone, %d with a model\n", vocab, tok.vocab_size);
        abort();
    }
    tokenizer_free(&tok);
    fz_expect_nothing_held("tokenizer_init + tokenizer_free");
    return 0;
}
