/* fuzz_encode.c: libFuzzer harness for the prompt encoder and the decoder in run_tok.c.

   The tokenizer is fixed and valid: the .bin file named by the FUZZ_TOKENIZER environment
   variable, which make fuzz exports from a small sentencepiece model with NFKC normalization
   (a precompiled charsmap), byte fallback and user-defined pieces, trained on storygen.py
   stories (tests/test_fuzz.py seeds). Each input is prompt text, any bytes (the engine stops at
   the first NUL, as a C string does). Checks: every id lies in the vocabulary, BOS and EOS are
   where asked, and decoding the ids gives valid UTF-8, as run_tok.c promises.

   Build and run: make fuzz (or see docs/fuzzing.md). */
#include "fuzz_hooks.c"
#include "../../run_tok.c"

static Tokenizer tok;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    const char *path = getenv("FUZZ_TOKENIZER");
    if (!path) {
        fprintf(stderr, "fuzz_encode: set FUZZ_TOKENIZER to a tokenizer .bin (make fuzz does)\n");
        exit(1);
    }
    tokenizer_init(&tok, path, -1);
    fz_n_res = 0; /* the tokenizer lives for the whole run; track only what each input allocates */
    return 0;
}

/* 1 when s[0..n) is valid UTF-8 (no overlongs, surrogates or code points above U+10FFFF). */
static int utf8_valid(const unsigned char *s, size_t n) {
    static const uint32_t min_cp[4] = {0, 0x80, 0x800, 0x10000};
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        size_t need;
        uint32_t cp;
        if (c < 0x80) { i++; continue; }
        if ((c & 0xE0) == 0xC0) { need = 1; cp = c & 0x1F; }
        else if ((c & 0xF0) == 0xE0) { need = 2; cp = c & 0x0F; }
        else if ((c & 0xF8) == 0xF0) { need = 3; cp = c & 0x07; }
        else return 0;
        if (n - i <= need) return 0;
        for (size_t k = 1; k <= need; k++) {
            if ((s[i + k] & 0xC0) != 0x80) return 0;
            cp = (cp << 6) | (s[i + k] & 0x3Fu);
        }
        if (cp < min_cp[need] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
        i += need + 1;
    }
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *text = malloc(size + 1);
    memcpy(text, data, size);
    text[size] = 0;
    int n_ids = 0;
    int *ids = tokenizer_encode(&tok, text, 1, 1, &n_ids);
    if (n_ids < 2 || ids[0] != tok.bos_id || ids[n_ids - 1] != tok.eos_id) {
        fprintf(stderr, "fuzz_encode: %d ids, not framed by BOS %d and EOS %d\n", n_ids, tok.bos_id, tok.eos_id);
        abort();
    }
    TokenPrinter p;
    token_printer_init(&p, &tok);
    for (int i = 0; i < n_ids; i++) {
        if (ids[i] < 0 || ids[i] >= tok.vocab_size) {
            fprintf(stderr, "fuzz_encode: id %d outside the vocabulary of %d\n", ids[i], tok.vocab_size);
            abort();
        }
        size_t len;
        const char *s = token_printer_put(&p, ids[i], &len);
        if (!utf8_valid((const unsigned char *)s, len)) {
            fprintf(stderr, "fuzz_encode: decoding id %d printed invalid UTF-8\n", ids[i]);
            abort();
        }
    }
    size_t len;
    const char *s = token_printer_flush(&p, &len);
    if (!utf8_valid((const unsigned char *)s, len)) {
        fprintf(stderr, "fuzz_encode: the decoder's flush printed invalid UTF-8\n");
        abort();
    }
    token_printer_free(&p);
    free(ids);
    free(text);
    fz_expect_nothing_held("tokenizer_encode + token_printer");
    return 0;
}
