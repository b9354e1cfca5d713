/* Test harness for run_tok.c: one process encodes or decodes many strings.
 *
 *   tok_harness encode TOK.bin [VOCAB] < records   uint32 length + UTF-8 bytes per record;
 *                                                   prints one line of space-separated ids each
 *   tok_harness decode TOK.bin [VOCAB] < records   uint32 count + int32 ids per record; writes
 *                                                   uint32 n_chunks, then per chunk uint32 length +
 *                                                   bytes: what each id printed, then the flush
 *   tok_harness info TOK.bin [VOCAB]                prints vocab_size unk bos eos pad hash max_len legacy
 *   tok_harness bench TOK.bin FILE REPEATS          prints ms per encode of FILE's text
 *
 * VOCAB defaults to -1 (no model: a legacy file is read to its end).
 * Build: cc -O2 -Wall -Wextra -o tok_harness tests/tok_harness.c
 */
#include "../run_tok.c"

#include <time.h>

static int read_u32(FILE *f, uint32_t *v) {
    unsigned char b[4];
    if (fread(b, 1, 4, f) != 4) return 0;
    *v = tok_u32(b);
    return 1;
}

static void put_u32(uint32_t v) {
    unsigned char b[4] = { (unsigned char)v, (unsigned char)(v >> 8), (unsigned char)(v >> 16), (unsigned char)(v >> 24) };
    fwrite(b, 1, 4, stdout);
}

static double now_ms(void) {
    return 1e3 * (double)clock() / CLOCKS_PER_SEC;   /* CPU time: the encoder is single-threaded */
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: tok_harness encode|decode|bench TOK.bin ...\n"); return 2; }
    Tokenizer t;
    if (strcmp(argv[1], "bench") == 0) {
        if (argc != 5) { fprintf(stderr, "usage: tok_harness bench TOK.bin FILE REPEATS\n"); return 2; }
        tokenizer_init(&t, argv[2], -1);
        FILE *f = fopen(argv[3], "rb");
        if (!f) { fprintf(stderr, "cannot open %s\n", argv[3]); return 1; }
        static char text[1 << 22];
        size_t n = fread(text, 1, sizeof text - 1, f);
        text[n] = 0;
        fclose(f);
        int repeats = atoi(argv[4]), n_ids = 0;
        double best = 1e30;
        for (int r = 0; r < repeats; r++) {
            double t0 = now_ms();
            int *ids = tokenizer_encode(&t, text, 1, 0, &n_ids);
            double dt = now_ms() - t0;
            if (dt < best) best = dt;
            free(ids);
        }
        printf("%d %.3f\n", n_ids, best);
        tokenizer_free(&t);
        return 0;
    }
    int vocab = argc > 3 ? atoi(argv[3]) : -1;
    tokenizer_init(&t, argv[2], vocab);
    uint32_t n;
    if (strcmp(argv[1], "encode") == 0) {
        while (read_u32(stdin, &n)) {
            char *s = tok_malloc((size_t)n + 1);
            if (fread(s, 1, n, stdin) != n) { fprintf(stderr, "short record\n"); return 1; }
            s[n] = 0;
            int n_ids;
            int *ids = tokenizer_encode(&t, s, 0, 0, &n_ids);
            for (int i = 0; i < n_ids; i++) printf(i ? " %d" : "%d", ids[i]);
            printf("\n");
            fflush(stdout);   /* a test may talk to this process one string at a time */
            free(ids);
            free(s);
        }
    } else if (strcmp(argv[1], "decode") == 0) {
        TokenPrinter p;
        while (read_u32(stdin, &n)) {
            token_printer_init(&p, &t);
            put_u32(n + 1);
            for (uint32_t i = 0; i < n; i++) {
                uint32_t id;
                if (!read_u32(stdin, &id)) { fprintf(stderr, "short record\n"); return 1; }
                size_t len;
                const char *s = token_printer_put(&p, (int)id, &len);
                put_u32((uint32_t)len);
                fwrite(s, 1, len, stdout);
            }
            size_t len;
            const char *s = token_printer_flush(&p, &len);
            put_u32((uint32_t)len);
            fwrite(s, 1, len, stdout);
            token_printer_free(&p);
        }
    } else if (strcmp(argv[1], "info") == 0) {
        printf("%d %d %d %d %d %u %d %d\n", t.vocab_size, t.unk_id, t.bos_id, t.eos_id, t.pad_id,
               (unsigned)t.hash, t.max_token_length, t.legacy);
    } else {
        fprintf(stderr, "unknown mode %s\n", argv[1]);
        return 2;
    }
    tokenizer_free(&t);
    return 0;
}
