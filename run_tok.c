/* ----------------------------------------------------------------------------
 * Tokenizer: loads tokenizer.py's .bin (our versioned format) or a llama2.c
 * tokenizer.bin, encodes text exactly as sentencepiece's BPE encoder does
 * (normalizer with precompiled charsmap, user-defined pieces, score-ordered
 * merges, byte fallback / unknown handling) and decodes ids to always-valid
 * UTF-8 the way sentencepiece's decoder does.
 *
 * It does not do unigram models (tokenizer.py refuses to export them), BPE
 * dropout, or treat_whitespace_as_suffix.
 *
 * run.c #includes this file at its tokenizer section; a test harness can
 * include it on its own (tests/tok_harness.c). C99, no dependencies.
 *
 * File layouts (ours, version 1, and llama2.c's): docs/formats.md, "Tokenizer
 * files" and "llama2.c tokenizer files"; tok_load_ours and tok_load_legacy check
 * every field they read against the bytes left.
 * ------------------------------------------------------------------------- */

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define TOK_MAGIC 0x6b746b61u
#define TOK_VERSION 1
#define TOK_HEADER_SIZE 64

/* sentencepiece's ModelProto.SentencePiece.Type values. */
enum { TOK_NORMAL = 1, TOK_UNKNOWN = 2, TOK_CONTROL = 3, TOK_USER_DEFINED = 4, TOK_UNUSED = 5, TOK_BYTE = 6 };

typedef struct {
    char *path;              /* for error messages */
    int vocab_size;
    int max_token_length;    /* bytes */
    char **vocab;            /* [vocab_size] NUL-terminated pieces (U+2581 for spaces) */
    int *vocab_len;          /* [vocab_size] bytes */
    float *scores;           /* [vocab_size] merge priority: larger merges first */
    unsigned char *types;    /* [vocab_size] TOK_* */
    int unk_id, bos_id, eos_id, pad_id;   /* -1 = none */
    uint32_t hash;           /* 0 for legacy files */
    int legacy;
    int add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces, byte_fallback;
    /* precompiled charsmap: darts-clone double array + NUL-separated replacements */
    uint32_t *trie;          /* [n_trie] units, NULL = no normalization rules */
    size_t n_trie;
    char *norm_strings;      /* replacement strings, NUL-terminated */
    size_t norm_strings_len;
    char *unk_surface;
    int byte_ids[256];       /* id of piece <0xXX>, or unk_id when absent */
    /* open-addressing hash table piece -> id over all pieces */
    int *table;              /* [table_size] id or -1 */
    size_t table_size;       /* power of two */
    /* user-defined pieces bucketed by first byte, for the longest-prefix match */
    int *user_ids;           /* ids sorted by first byte */
    int user_start[257];     /* bucket b is user_ids[user_start[b] .. user_start[b+1]) */
    int has_unused;
    char *blob;              /* storage for vocab strings */
} Tokenizer;

static void tok_fail(const char *path, const char *msg) {
    fprintf(stderr, "run: %s: %s\n", path, msg); /* run.c's fatal() format: one line naming the file */
    exit(1);
}

static void *tok_malloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) { fprintf(stderr, "run: out of memory allocating %zu bytes for the tokenizer\n", n); exit(1); }
    return p;
}

static void *tok_realloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) { fprintf(stderr, "run: out of memory allocating %zu bytes for the tokenizer\n", n); exit(1); }
    return q;
}

static uint32_t tok_u32(const unsigned char *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static int32_t tok_i32(const unsigned char *p) {
    uint32_t u = tok_u32(p);
    int32_t v;
    memcpy(&v, &u, 4);
    return v;
}

static float tok_f32(const unsigned char *p) {
    uint32_t u = tok_u32(p);
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static uint32_t tok_fnv1a(uint32_t h, const char *s, size_t n) {
    for (size_t i = 0; i < n; i++) { h ^= (unsigned char)s[i]; h *= 16777619u; }
    return h;
}

/* The tokenizer hash of the contract: FNV-1a over each piece's bytes and a 0
 * byte, in id order; 0 is reserved for "not recorded". */
static uint32_t tokenizer_hash_pieces(const Tokenizer *t) {
    uint32_t h = 2166136261u;
    for (int i = 0; i < t->vocab_size; i++) {
        h = tok_fnv1a(h, t->vocab[i], (size_t)t->vocab_len[i]);
        h = tok_fnv1a(h, "", 1);
    }
    return h ? h : 1;
}

static size_t tok_table_slot(const Tokenizer *t, const char *s, size_t n) {
    return (size_t)tok_fnv1a(2166136261u, s, n) & (t->table_size - 1);
}

/* Id of the piece spelled s[0..n), or -1. */
static int tok_lookup(const Tokenizer *t, const char *s, size_t n) {
    size_t i = tok_table_slot(t, s, n);
    for (;;) {
        int id = t->table[i];
        if (id < 0) return -1;
        if ((size_t)t->vocab_len[id] == n && memcmp(t->vocab[id], s, n) == 0) return id;
        i = (i + 1) & (t->table_size - 1);
    }
}

/* Byte value of a "<0xAB>" piece, or -1. */
static int tok_parse_byte_piece(const char *s, int n) {
    if (n != 6 || s[0] != '<' || s[1] != '0' || s[2] != 'x' || s[5] != '>') return -1;
    int v = 0;
    for (int k = 3; k < 5; k++) {
        char c = s[k];
        int d = (c >= '0' && c <= '9') ? c - '0' : (c >= 'A' && c <= 'F') ? c - 'A' + 10 : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    return v;
}

/* Builds the lookup structures once pieces and types are in place. */
static void tok_build_index(Tokenizer *t) {
    t->table_size = 16;
    while (t->table_size < 2 * (size_t)t->vocab_size) t->table_size *= 2;
    t->table = tok_malloc(t->table_size * sizeof(int));
    for (size_t i = 0; i < t->table_size; i++) t->table[i] = -1;
    for (int id = 0; id < t->vocab_size; id++) {
        if (t->types[id] < TOK_NORMAL || t->types[id] > TOK_BYTE) tok_fail(t->path, "bad piece type; re-run tokenizer.py");
        size_t i = tok_table_slot(t, t->vocab[id], (size_t)t->vocab_len[id]);
        while (t->table[i] >= 0) {
            int o = t->table[i];
            if (t->vocab_len[o] == t->vocab_len[id] && memcmp(t->vocab[o], t->vocab[id], (size_t)t->vocab_len[id]) == 0)
                tok_fail(t->path, "a piece occurs twice in the vocabulary");
            i = (i + 1) & (t->table_size - 1);
        }
        t->table[i] = id;
    }
    for (int b = 0; b < 256; b++) t->byte_ids[b] = t->unk_id;
    int counts[256] = {0};
    int n_user = 0;
    t->has_unused = 0;
    for (int id = 0; id < t->vocab_size; id++) {
        if (t->types[id] == TOK_BYTE) {
            int b = tok_parse_byte_piece(t->vocab[id], t->vocab_len[id]);
            if (b < 0) tok_fail(t->path, "a byte piece is not spelled <0xXX>");
            t->byte_ids[b] = id;
        } else if (t->types[id] == TOK_USER_DEFINED) {
            if (t->vocab_len[id] == 0) tok_fail(t->path, "empty user-defined piece");
            counts[(unsigned char)t->vocab[id][0]]++;
            n_user++;
        } else if (t->types[id] == TOK_UNUSED) {
            t->has_unused = 1;
        }
    }
    t->user_ids = tok_malloc((size_t)n_user * sizeof(int));
    t->user_start[0] = 0;
    for (int b = 0; b < 256; b++) t->user_start[b + 1] = t->user_start[b] + counts[b];
    int fill[256];
    for (int b = 0; b < 256; b++) fill[b] = t->user_start[b];
    for (int id = 0; id < t->vocab_size; id++)
        if (t->types[id] == TOK_USER_DEFINED) t->user_ids[fill[(unsigned char)t->vocab[id][0]]++] = id;
}

static void tok_check_special(Tokenizer *t, int id, const char *what) {
    if (id < -1 || id >= t->vocab_size) {
        char msg[128];
        snprintf(msg, sizeof msg, "%s id %d is outside the vocabulary of %d; re-run tokenizer.py", what, id, t->vocab_size);
        tok_fail(t->path, msg);
    }
}

/* Our versioned format (docs/formats.md, "Tokenizer files"). */
static void tok_load_ours(Tokenizer *t, const unsigned char *d, size_t size, int model_vocab) {
    char msg[256];
    if (size < TOK_HEADER_SIZE) tok_fail(t->path, "file too short for its 64-byte header (truncated?)");
    int32_t version = tok_i32(d + 4);
    if (version != TOK_VERSION) {
        snprintf(msg, sizeof msg, "format version %d, this build reads version %d; re-run tokenizer.py", (int)version, TOK_VERSION);
        tok_fail(t->path, msg);
    }
    t->vocab_size = tok_i32(d + 8);
    t->max_token_length = tok_i32(d + 12);
    int32_t model_type = tok_i32(d + 16);
    t->add_dummy_prefix = d[20];
    t->remove_extra_whitespaces = d[21];
    t->escape_whitespaces = d[22];
    t->byte_fallback = d[23];
    t->unk_id = tok_i32(d + 24);
    t->bos_id = tok_i32(d + 28);
    t->eos_id = tok_i32(d + 32);
    t->pad_id = tok_i32(d + 36);
    t->hash = tok_u32(d + 40);
    uint32_t charsmap_len = tok_u32(d + 44);
    uint32_t unk_surface_len = tok_u32(d + 48);
    if (t->vocab_size < 1 || t->vocab_size > (1 << 24)) tok_fail(t->path, "vocab_size out of range (1..16777216)");
    if (model_vocab > 0 && model_vocab != t->vocab_size) {
        snprintf(msg, sizeof msg, "vocab_size %d but the model's is %d: tokenizer and model do not match", t->vocab_size, model_vocab);
        tok_fail(t->path, msg);
    }
    if (model_type != 2) tok_fail(t->path, "not a BPE tokenizer (model_type != 2)");
    for (size_t i = 52; i < TOK_HEADER_SIZE; i++) {
        if (d[i]) {
            snprintf(msg, sizeof msg, "header padding byte %zu is not zero; re-run tokenizer.py", i);
            tok_fail(t->path, msg);
        }
    }
    if (t->max_token_length < 0 || t->max_token_length > (1 << 20)) tok_fail(t->path, "max_piece_len out of range");
    if (d[20] > 1 || d[21] > 1 || d[22] > 1 || d[23] > 1) tok_fail(t->path, "flag byte is not 0 or 1; re-run tokenizer.py");
    tok_check_special(t, t->unk_id, "unk");
    tok_check_special(t, t->bos_id, "bos");
    tok_check_special(t, t->eos_id, "eos");
    tok_check_special(t, t->pad_id, "pad");
    if (t->unk_id < 0) tok_fail(t->path, "no unknown piece");
    size_t pos = TOK_HEADER_SIZE;
    if (charsmap_len > size - pos) tok_fail(t->path, "charsmap runs past the end of the file (truncated?)");
    if (charsmap_len > 0) {
        if (charsmap_len <= 4) tok_fail(t->path, "charsmap too short");
        uint32_t trie_bytes = tok_u32(d + pos);
        if (trie_bytes >= charsmap_len - 4 + 1 || trie_bytes % 4 != 0 || trie_bytes == 0)
            tok_fail(t->path, "charsmap trie size is inconsistent");
        t->n_trie = trie_bytes / 4;
        t->trie = tok_malloc(t->n_trie * sizeof(uint32_t));
        for (size_t i = 0; i < t->n_trie; i++) t->trie[i] = tok_u32(d + pos + 4 + 4 * i);
        t->norm_strings_len = charsmap_len - 4 - trie_bytes;
        t->norm_strings = tok_malloc(t->norm_strings_len + 1);
        memcpy(t->norm_strings, d + pos + 4 + trie_bytes, t->norm_strings_len);
        t->norm_strings[t->norm_strings_len] = 0;
        pos += charsmap_len;
    }
    if (unk_surface_len > size - pos || unk_surface_len > 1024) tok_fail(t->path, "unk surface runs past the end of the file (truncated?)");
    t->unk_surface = tok_malloc(unk_surface_len + 1);
    memcpy(t->unk_surface, d + pos, unk_surface_len);
    t->unk_surface[unk_surface_len] = 0;
    pos += unk_surface_len;

    t->vocab = tok_malloc((size_t)t->vocab_size * sizeof(char *));
    t->vocab_len = tok_malloc((size_t)t->vocab_size * sizeof(int));
    t->scores = tok_malloc((size_t)t->vocab_size * sizeof(float));
    t->types = tok_malloc((size_t)t->vocab_size);
    /* pieces are at most as long as the rest of the file, plus a NUL each */
    t->blob = tok_malloc(size - pos + (size_t)t->vocab_size);
    size_t blob_pos = 0;
    for (int i = 0; i < t->vocab_size; i++) {
        if (size - pos < 9) {
            snprintf(msg, sizeof msg, "truncated: piece %d of %d is missing", i, t->vocab_size);
            tok_fail(t->path, msg);
        }
        t->scores[i] = tok_f32(d + pos);
        t->types[i] = d[pos + 4];
        uint32_t len = tok_u32(d + pos + 5);
        pos += 9;
        if (len > size - pos) {
            snprintf(msg, sizeof msg, "piece %d has length %u, more than the %zu bytes left (truncated?)", i, (unsigned)len, size - pos);
            tok_fail(t->path, msg);
        }
        if ((int64_t)len > t->max_token_length) {
            snprintf(msg, sizeof msg, "piece %d is longer (%u) than max_piece_len %d", i, (unsigned)len, t->max_token_length);
            tok_fail(t->path, msg);
        }
        t->vocab[i] = t->blob + blob_pos;
        memcpy(t->blob + blob_pos, d + pos, len);
        t->blob[blob_pos + len] = 0;
        t->vocab_len[i] = (int)len;
        blob_pos += len + 1;
        pos += len;
    }
    if (pos != size) {
        snprintf(msg, sizeof msg, "%zu unexpected bytes after the last piece", size - pos);
        tok_fail(t->path, msg);
    }
    if (t->types[t->unk_id] != TOK_UNKNOWN) tok_fail(t->path, "unk_id does not name the unknown piece");
    if (tokenizer_hash_pieces(t) != t->hash) tok_fail(t->path, "tokenizer hash does not match its pieces (corrupt file); re-run tokenizer.py");
}

/* llama2.c format: uint32 max_token_length, then per piece float32 score,
 * int32 length, bytes. vocab_size comes from the model (or, with -1, as many
 * entries as the file holds). */
static void tok_load_legacy(Tokenizer *t, const unsigned char *d, size_t size, int model_vocab) {
    char msg[256];
    if (size < 4) tok_fail(t->path, "file too short (truncated?)");
    t->legacy = 1;
    t->max_token_length = (int)tok_u32(d);
    if (t->max_token_length < 1 || t->max_token_length > (1 << 20)) tok_fail(t->path, "max_token_length out of range; not a tokenizer file?");
    /* count entries first so arrays can be sized */
    size_t pos = 4;
    int n = 0;
    while (pos < size && (model_vocab <= 0 || n < model_vocab)) {
        if (size - pos < 8) {
            snprintf(msg, sizeof msg, "truncated in the header of entry %d", n);
            tok_fail(t->path, msg);
        }
        uint32_t len = tok_u32(d + pos + 4);
        if (len > (uint32_t)t->max_token_length) {
            snprintf(msg, sizeof msg, "entry %d has length %u, more than max_token_length %d (not a tokenizer file?)", n, (unsigned)len, t->max_token_length);
            tok_fail(t->path, msg);
        }
        if (len > size - pos - 8) {
            snprintf(msg, sizeof msg, "entry %d has length %u, more than the %zu bytes left (truncated?)", n, (unsigned)len, size - pos - 8);
            tok_fail(t->path, msg);
        }
        pos += 8 + len;
        n++;
        if (n > (1 << 24)) tok_fail(t->path, "too many entries");
    }
    if (model_vocab > 0 && n < model_vocab) {
        snprintf(msg, sizeof msg, "holds %d entries but the model's vocab_size is %d (truncated, or tokenizer and model do not match)", n, model_vocab);
        tok_fail(t->path, msg);
    }
    if (pos != size) {
        snprintf(msg, sizeof msg, "has entries beyond the model's vocab_size %d (tokenizer and model do not match)", model_vocab);
        tok_fail(t->path, msg);
    }
    if (n < 3) tok_fail(t->path, "fewer than 3 entries (needs <unk>, <s>, </s>)");
    t->vocab_size = n;
    t->unk_id = 0;
    t->bos_id = 1;
    t->eos_id = 2;
    t->pad_id = -1;
    t->hash = 0;
    /* what llama2.c-family tokenizers were trained with */
    t->add_dummy_prefix = 1;
    t->remove_extra_whitespaces = 0;
    t->escape_whitespaces = 1;
    t->byte_fallback = 0;
    t->unk_surface = tok_malloc(6);
    memcpy(t->unk_surface, " \xe2\x81\x87 ", 6);
    t->vocab = tok_malloc((size_t)n * sizeof(char *));
    t->vocab_len = tok_malloc((size_t)n * sizeof(int));
    t->scores = tok_malloc((size_t)n * sizeof(float));
    t->types = tok_malloc((size_t)n);
    /* a space becomes U+2581 (3 bytes): at most 3x the bytes, plus NULs */
    t->blob = tok_malloc(3 * size + (size_t)n);
    size_t blob_pos = 0;
    pos = 4;
    int max_len = 0;
    for (int i = 0; i < n; i++) {
        t->scores[i] = tok_f32(d + pos);
        uint32_t len = tok_u32(d + pos + 4);
        const char *s = (const char *)d + pos + 8;
        pos += 8 + len;
        char *out = t->blob + blob_pos;
        int k = 0;
        unsigned char type = TOK_NORMAL;
        if (i == 1 && len == 5 && memcmp(s, "\n<s>\n", 5) == 0) { memcpy(out, "<s>", 3); k = 3; type = TOK_CONTROL; }
        else if (i == 2 && len == 6 && memcmp(s, "\n</s>\n", 6) == 0) { memcpy(out, "</s>", 4); k = 4; type = TOK_CONTROL; }
        else if (i <= 2) {
            memcpy(out, s, len); k = (int)len;
            type = i == 0 ? TOK_UNKNOWN : TOK_CONTROL;
        } else if (tok_parse_byte_piece(s, (int)len) >= 0) {
            memcpy(out, s, len); k = (int)len; type = TOK_BYTE;
            t->byte_fallback = 1;
        } else {
            for (uint32_t j = 0; j < len; j++) {
                if (s[j] == ' ') { memcpy(out + k, "\xe2\x96\x81", 3); k += 3; }
                else out[k++] = s[j];
            }
        }
        out[k] = 0;
        t->vocab[i] = out;
        t->vocab_len[i] = k;
        t->types[i] = type;
        if (k > max_len) max_len = k;
        blob_pos += (size_t)k + 1;
    }
    t->max_token_length = max_len;
}

/* vocab_size: the model's, or -1 when no model is loaded. Exits with a
 * one-line error naming the file on any problem. */
void tokenizer_init(Tokenizer *t, const char *path, int vocab_size) {
    memset(t, 0, sizeof *t);
    t->path = tok_malloc(strlen(path) + 1);
    strcpy(t->path, path);
    /* O_NONBLOCK: opening a FIFO without a writer would otherwise wait forever; fstat then refuses
       anything but a regular file before a single byte is read (a regular file ignores the flag) */
    int fd = open(path, O_RDONLY | O_NONBLOCK);
    if (fd < 0) {
        char msg[256];
        snprintf(msg, sizeof msg, "cannot open (%s; does the file exist? make one with tokenizer.py)", strerror(errno));
        tok_fail(path, msg);
    }
    struct stat st;
    if (fstat(fd, &st) != 0) tok_fail(path, "cannot stat the file");
    if (!S_ISREG(st.st_mode))
        tok_fail(path, S_ISDIR(st.st_mode) ? "is a directory, not a tokenizer file"
                                           : "is not a regular file (a FIFO, socket or device?); pass a tokenizer .bin file");
    if ((uint64_t)st.st_size > ((uint64_t)1 << 30)) tok_fail(path, "larger than 1 GiB; not a tokenizer file");
    size_t want = (size_t)st.st_size, size = 0;
    unsigned char *d = tok_malloc(want);
    while (size < want) {
        ssize_t r = read(fd, d + size, want - size);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) tok_fail(path, "read error");
        if (r == 0) tok_fail(path, "the file shrank while it was read");
        size += (size_t)r;
    }
    close(fd);
    if (size >= 4 && tok_u32(d) == TOK_MAGIC) tok_load_ours(t, d, size, vocab_size);
    else tok_load_legacy(t, d, size, vocab_size);
    free(d);
    tok_build_index(t);
}

void tokenizer_free(Tokenizer *t) {
    free(t->path);
    free(t->vocab);
    free(t->vocab_len);
    free(t->scores);
    free(t->types);
    free(t->trie);
    free(t->norm_strings);
    free(t->unk_surface);
    free(t->table);
    free(t->user_ids);
    free(t->blob);
    memset(t, 0, sizeof *t);
}

/* ---- normalization ---- */

/* sentencepiece's UTF-8 decoder: length of the valid character at s (n bytes
 * available), or 0 when malformed (truncated, bad continuation, overlong,
 * surrogate, > U+10FFFF). */
static int tok_utf8_valid_len(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    if (c < 0x80) return 1;
    if (n >= 2 && (c & 0xE0) == 0xC0) {
        uint32_t cp = ((c & 0x1Fu) << 6) | (s[1] & 0x3Fu);
        if ((s[1] & 0xC0) == 0x80 && cp >= 0x80) return 2;
    } else if (n >= 3 && (c & 0xF0) == 0xE0) {
        uint32_t cp = ((c & 0x0Fu) << 12) | ((s[1] & 0x3Fu) << 6) | (s[2] & 0x3Fu);
        if ((s[1] & 0xC0) == 0x80 && (s[2] & 0xC0) == 0x80 && cp >= 0x800 && (cp < 0xD800 || cp >= 0xE000)) return 3;
    } else if (n >= 4 && (c & 0xF8) == 0xF0) {
        uint32_t cp = ((c & 0x07u) << 18) | ((s[1] & 0x3Fu) << 12) | ((s[2] & 0x3Fu) << 6) | (s[3] & 0x3Fu);
        if ((s[1] & 0xC0) == 0x80 && (s[2] & 0xC0) == 0x80 && (s[3] & 0xC0) == 0x80 && cp >= 0x10000 && cp <= 0x10FFFF)
            return 4;
    }
    return 0;
}

/* Longest user-defined piece that prefixes s[0..n); its length, or 0. */
static int tok_match_user(const Tokenizer *t, const char *s, size_t n) {
    int b = (unsigned char)s[0], best = 0;
    for (int k = t->user_start[b]; k < t->user_start[b + 1]; k++) {
        int id = t->user_ids[k];
        int len = t->vocab_len[id];
        if ((size_t)len <= n && len > best && memcmp(t->vocab[id], s, (size_t)len) == 0) best = len;
    }
    return best;
}

/* Common-prefix search in the darts-clone double array: the longest key that
 * prefixes s[0..n) sets *value (offset into norm_strings); returns its length
 * or 0. A unit packs: bits 0-7 label (bit 31 too: set on value units), bit 8
 * has_leaf, bit 9 offset scale (<<8 when set), bits 10-31 offset; a value
 * unit holds its value in bits 0-30. */
static size_t tok_trie_longest(const Tokenizer *t, const unsigned char *s, size_t n, uint32_t *value) {
    size_t best = 0;
    size_t pos = 0;
    uint32_t unit = t->trie[0];
    pos ^= (size_t)((unit >> 10) << ((unit & (1u << 9)) >> 6));
    for (size_t i = 0; i < n; i++) {
        pos ^= s[i];
        if (pos >= t->n_trie) break;
        unit = t->trie[pos];
        if ((unit & ((1u << 31) | 0xFFu)) != s[i]) break;
        pos ^= (size_t)((unit >> 10) << ((unit & (1u << 9)) >> 6));
        if ((unit >> 8) & 1u) {
            if (pos >= t->n_trie) break;
            *value = t->trie[pos] & 0x7FFFFFFFu;
            best = i + 1;
        }
    }
    return best;
}

typedef struct { char *p; size_t n, cap; } TokBuf;

static void tokbuf_put(TokBuf *b, const char *s, size_t n) {
    if (b->n + n + 1 > b->cap) {
        while (b->n + n + 1 > b->cap) b->cap = b->cap ? 2 * b->cap : 256;
        b->p = tok_realloc(b->p, b->cap);
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}

/* One normalization step at s (n > 0 bytes left): out and out_len get the
 * replacement, the return value is the number of input bytes consumed. */
static size_t tok_normalize_prefix(const Tokenizer *t, const char *s, size_t n, const char **out, size_t *out_len) {
    int u = tok_match_user(t, s, n);
    if (u > 0) { *out = s; *out_len = (size_t)u; return (size_t)u; }
    if (t->trie) {
        uint32_t value = 0;
        size_t len = tok_trie_longest(t, (const unsigned char *)s, n, &value);
        if (len > 0) {
            if (value >= t->norm_strings_len) tok_fail(t->path, "charsmap replacement offset out of range (corrupt file)");
            *out = t->norm_strings + value;
            *out_len = strlen(*out);  /* norm_strings is NUL-terminated at its end */
            return len;
        }
    }
    int len = tok_utf8_valid_len((const unsigned char *)s, n);
    if (len == 0) { *out = "\xef\xbf\xbd"; *out_len = 3; return 1; }
    *out = s; *out_len = (size_t)len;
    return (size_t)len;
}

/* sentencepiece's Normalizer::Normalize for add_dummy_prefix as a prefix. */
static void tok_normalize(const Tokenizer *t, const char *text, TokBuf *out) {
    static const char space_symbol[] = "\xe2\x96\x81";
    const char *ws = t->escape_whitespaces ? space_symbol : " ";
    size_t ws_len = t->escape_whitespaces ? 3 : 1;
    size_t n = strlen(text);
    const char *r;
    size_t r_len;
    out->n = 0;
    tokbuf_put(out, "", 0);
    if (t->remove_extra_whitespaces) {
        while (n > 0) {
            size_t c = tok_normalize_prefix(t, text, n, &r, &r_len);
            if (!(r_len == 1 && r[0] == ' ')) break;
            text += c; n -= c;
        }
    }
    if (n == 0) return;
    if (t->add_dummy_prefix) tokbuf_put(out, ws, ws_len);
    int prev_space = t->remove_extra_whitespaces;
    while (n > 0) {
        size_t c = tok_normalize_prefix(t, text, n, &r, &r_len);
        if (prev_space) while (r_len > 0 && r[0] == ' ') { r++; r_len--; }
        if (r_len > 0) {
            for (size_t k = 0; k < r_len; k++) {
                if (r[k] == ' ' && t->escape_whitespaces) tokbuf_put(out, space_symbol, 3);
                else tokbuf_put(out, r + k, 1);
            }
            prev_space = r[r_len - 1] == ' ';
        }
        text += c; n -= c;
        if (!t->remove_extra_whitespaces) prev_space = 0;
    }
    if (t->remove_extra_whitespaces)
        while (out->n >= ws_len && memcmp(out->p + out->n - ws_len, ws, ws_len) == 0) out->n -= ws_len;
    out->p[out->n] = 0;
}

/* ---- BPE ---- */

typedef struct { int start, len, prev, next, freeze; } TokSymbol;   /* byte span in the normalized text */
typedef struct { float score; int left, right, size; } TokPair;

/* max-heap order: higher score first, then the leftmost pair */
static int tok_pair_before(const TokPair *a, const TokPair *b) {
    return a->score > b->score || (a->score == b->score && a->left < b->left);
}

typedef struct { TokPair *a; size_t n, cap; } TokHeap;

static void tokheap_push(TokHeap *h, TokPair p) {
    if (h->n == h->cap) { h->cap = h->cap ? 2 * h->cap : 64; h->a = tok_realloc(h->a, h->cap * sizeof(TokPair)); }
    size_t i = h->n++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!tok_pair_before(&p, &h->a[parent])) break;
        h->a[i] = h->a[parent];
        i = parent;
    }
    h->a[i] = p;
}

static TokPair tokheap_pop(TokHeap *h) {
    TokPair top = h->a[0], last = h->a[--h->n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= h->n) break;
        if (c + 1 < h->n && tok_pair_before(&h->a[c + 1], &h->a[c])) c++;
        if (!tok_pair_before(&h->a[c], &last)) break;
        h->a[i] = h->a[c];
        i = c;
    }
    if (h->n > 0) h->a[i] = last;
    return top;
}

typedef struct { int left_start, left_len, right_start, right_len; } TokRevMerge;

typedef struct {
    const Tokenizer *t;
    const char *text;        /* normalized */
    TokSymbol *sym;
    TokHeap heap;
    TokRevMerge *rev;        /* [vocab_size] split of unused pieces, when the vocab has any */
} TokBpe;

static int tok_mergeable(unsigned char type) {
    return type == TOK_NORMAL || type == TOK_USER_DEFINED || type == TOK_UNUSED;
}

static void tok_maybe_add_pair(TokBpe *b, int left, int right) {
    if (left < 0 || right < 0 || b->sym[left].freeze || b->sym[right].freeze) return;
    int size = b->sym[left].len + b->sym[right].len;
    int id = tok_lookup(b->t, b->text + b->sym[left].start, (size_t)size);
    if (id < 0 || !tok_mergeable(b->t->types[id])) return;
    TokPair p = { b->t->scores[id], left, right, size };
    tokheap_push(&b->heap, p);
    if (b->t->types[id] == TOK_UNUSED) {
        TokRevMerge r = { b->sym[left].start, b->sym[left].len, b->sym[right].start, b->sym[right].len };
        b->rev[id] = r;
    }
}

typedef struct { int *ids; size_t n, cap; int prev_unk; } TokIds;

static void tokids_push(TokIds *o, int id) {
    if (o->n == o->cap) { o->cap = o->cap ? 2 * o->cap : 64; o->ids = tok_realloc(o->ids, o->cap * sizeof(int)); }
    o->ids[o->n++] = id;
}

/* Emits the final piece text[start..start+len): unused pieces split back into
 * what they were merged from, unknown ones into bytes (byte fallback) or a
 * single unk id per run of unknown pieces. */
static void tok_emit(TokBpe *b, TokIds *o, int start, int len, int depth) {
    const Tokenizer *t = b->t;
    int id = tok_lookup(t, b->text + start, (size_t)len);
    if (id >= 0 && t->types[id] == TOK_UNUSED && b->rev && depth < 1000) {
        TokRevMerge r = b->rev[id];
        if (r.left_len + r.right_len == len) {
            tok_emit(b, o, r.left_start, r.left_len, depth + 1);
            tok_emit(b, o, r.right_start, r.right_len, depth + 1);
            return;
        }
    }
    if (id < 0) id = t->unk_id;
    int is_unk = t->types[id] == TOK_UNKNOWN;
    if (is_unk && t->byte_fallback) {
        for (int k = 0; k < len; k++) tokids_push(o, t->byte_ids[(unsigned char)b->text[start + k]]);
    } else if (!(is_unk && o->prev_unk)) {
        tokids_push(o, id);
    }
    o->prev_unk = is_unk;
}

/* Encodes text (NUL-terminated UTF-8; invalid bytes become U+FFFD as in
 * sentencepiece) into malloc'd ids; *n_out gets their count. */
int *tokenizer_encode(Tokenizer *t, const char *text, int bos, int eos, int *n_out) {
    TokBuf norm = {0};
    tok_normalize(t, text, &norm);
    TokIds o = {0};
    if (bos && t->bos_id >= 0) tokids_push(&o, t->bos_id);
    size_t n = norm.n;
    if (n > 0x3FFFFFFF) tok_fail(t->path, "text to encode is too long");
    TokBpe b = { t, norm.p, NULL, {0}, NULL };
    if (n > 0) {
        b.sym = tok_malloc(n * sizeof(TokSymbol));
        if (t->has_unused) {
            b.rev = tok_malloc((size_t)t->vocab_size * sizeof(TokRevMerge));
            memset(b.rev, 0, (size_t)t->vocab_size * sizeof(TokRevMerge));
        }
        int n_sym = 0;
        size_t pos = 0;
        while (pos < n) {
            int len = tok_match_user(t, norm.p + pos, n - pos);
            int freeze = len > 0;
            if (!freeze) {
                unsigned c = (unsigned char)norm.p[pos];
                len = c < 0xC0 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
                if ((size_t)len > n - pos) len = (int)(n - pos);
            }
            TokSymbol s = { (int)pos, len, n_sym - 1, -1, freeze };
            b.sym[n_sym] = s;
            if (n_sym > 0) b.sym[n_sym - 1].next = n_sym;
            n_sym++;
            pos += (size_t)len;
        }
        for (int i = 1; i < n_sym; i++) tok_maybe_add_pair(&b, i - 1, i);
        while (b.heap.n > 0) {
            TokPair top = tokheap_pop(&b.heap);
            TokSymbol *l = &b.sym[top.left], *r = &b.sym[top.right];
            if (l->len == 0 || r->len == 0 || l->len + r->len != top.size) continue;   /* stale */
            l->len += r->len;
            l->next = r->next;
            if (r->next >= 0) b.sym[r->next].prev = top.left;
            r->len = 0;
            tok_maybe_add_pair(&b, l->prev, top.left);
            tok_maybe_add_pair(&b, top.left, l->next);
        }
        for (int i = 0; i != -1; i = b.sym[i].next) tok_emit(&b, &o, b.sym[i].start, b.sym[i].len, 0);
    }
    if (eos && t->eos_id >= 0) tokids_push(&o, t->eos_id);
    free(b.sym);
    free(b.heap.a);
    free(b.rev);
    free(norm.p);
    *n_out = (int)o.n;
    if (!o.ids) o.ids = tok_malloc(sizeof(int));
    return o.ids;
}

/* ---- decoding ---- */

/* Streaming decoder that prints what sentencepiece's decode prints for the
 * same ids: U+2581 -> ' ', control pieces print nothing, the first piece of a
 * text loses its leading space (the dummy prefix; BOS starts a new text),
 * byte pieces are collected until they complete a character, malformed or
 * unfinished byte sequences print one U+FFFD per byte. Output is always
 * valid UTF-8. */
typedef struct {
    const Tokenizer *t;
    unsigned char pend[4];   /* byte-fallback bytes of an unfinished character */
    int n_pend;
    int text_empty;          /* nothing printed since the start of the text */
    int is_bos_ws, bos_ws_seen;
    TokBuf out;              /* what the last call produced */
} TokenPrinter;

void token_printer_init(TokenPrinter *p, const Tokenizer *t) {
    memset(p, 0, sizeof *p);
    p->t = t;
    p->text_empty = 1;
    p->is_bos_ws = 1;
    tokbuf_put(&p->out, "", 0);
}

void token_printer_free(TokenPrinter *p) {
    free(p->out.p);
    memset(p, 0, sizeof *p);
}

static void tok_printer_emit(TokenPrinter *p, const char *s, size_t n) {
    if (n > 0) p->text_empty = 0;
    tokbuf_put(&p->out, s, n);
}

/* Prints complete characters from the pending bytes; with final, the rest
 * too (as U+FFFD each, since no more bytes can complete them). */
static void tok_printer_drain(TokenPrinter *p, int final) {
    while (p->n_pend > 0) {
        unsigned c = p->pend[0];
        int need = c < 0x80 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 1;
        int ok_so_far = 1;
        for (int k = 1; k < p->n_pend && k < need; k++) if ((p->pend[k] & 0xC0) != 0x80) ok_so_far = 0;
        if (ok_so_far && p->n_pend < need && !final) return;   /* wait for more bytes */
        int len = tok_utf8_valid_len(p->pend, (size_t)p->n_pend);
        if (len == 0) { tok_printer_emit(p, "\xef\xbf\xbd", 3); len = 1; }
        else tok_printer_emit(p, (const char *)p->pend, (size_t)len);
        memmove(p->pend, p->pend + len, (size_t)(p->n_pend - len));
        p->n_pend -= len;
    }
}

/* Decodes one more id; returns the bytes to print (valid until the next
 * call) and their count in *len. Ids outside the vocabulary print nothing. */
const char *token_printer_put(TokenPrinter *p, int id, size_t *len) {
    const Tokenizer *t = p->t;
    p->out.n = 0;
    p->out.p[0] = 0;
    if (id < 0 || id >= t->vocab_size) { *len = 0; return p->out.p; }
    int type = t->types[id];
    if (type == TOK_BYTE) {
        int b = tok_parse_byte_piece(t->vocab[id], t->vocab_len[id]);
        p->pend[p->n_pend++] = (unsigned char)b;
        tok_printer_drain(p, 0);
    } else {
        tok_printer_drain(p, 1);
        if (id == t->bos_id) {   /* a new text starts: its dummy-prefix space is dropped again */
            p->text_empty = 1; p->is_bos_ws = 1; p->bos_ws_seen = 0;
            *len = p->out.n;
            return p->out.p;
        }
        if (p->bos_ws_seen || !p->text_empty) p->is_bos_ws = 0;
        p->bos_ws_seen = 0;
        if (type == TOK_CONTROL) {
            /* prints nothing */
        } else if (type == TOK_UNKNOWN) {
            tok_printer_emit(p, t->unk_surface, strlen(t->unk_surface));
        } else {
            const char *s = t->vocab[id];
            size_t n = (size_t)t->vocab_len[id];
            if (p->is_bos_ws && (t->add_dummy_prefix || t->remove_extra_whitespaces) && n >= 3 && memcmp(s, "\xe2\x96\x81", 3) == 0) {
                s += 3; n -= 3;
                p->bos_ws_seen = !t->remove_extra_whitespaces;
            }
            for (size_t k = 0; k < n; k++) {
                if (k + 3 <= n && memcmp(s + k, "\xe2\x96\x81", 3) == 0) { tok_printer_emit(p, " ", 1); k += 2; }
                else tok_printer_emit(p, s + k, 1);
            }
        }
    }
    *len = p->out.n;
    return p->out.p;
}

/* End of the text: prints what is left of an unfinished character. */
const char *token_printer_flush(TokenPrinter *p, size_t *len) {
    p->out.n = 0;
    p->out.p[0] = 0;
    tok_printer_drain(p, 1);
    *len = p->out.n;
    return p->out.p;
}

/* Convenience for the CLI: decode id and write it to f. */
void token_printer_print(TokenPrinter *p, int id, FILE *f) {
    size_t n;
    const char *s = token_printer_put(p, id, &n);
    if (n) fwrite(s, 1, n, f);
}

void token_printer_finish(TokenPrinter *p, FILE *f) {
    size_t n;
    const char *s = token_printer_flush(p, &n);
    if (n) fwrite(s, 1, n, f);
}
