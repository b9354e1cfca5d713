/* fuzz_hooks.c: what lets a libFuzzer harness call run.c's loaders in one process, many times.

   The engine reports every bad input through fatal() / tok_fail(), which print one line and call
   exit(): right for ./run, fatal for a fuzzer, which would stop at the first rejected input. So a
   harness #includes this file first, then run.c, and this file turns the engine's calls of exit,
   malloc and friends, open/close, fopen/fclose and mmap/munmap into macros for wrappers that
   (1) longjmp back to the harness instead of exiting, and (2) remember what the engine allocated,
   opened and mapped, so that after such a jump the harness frees exactly that (no leak reports for
   the error path) and after a successful load can check that the engine's own *_free released
   everything. The macros only rename calls inside run.c / run_tok.c text: the system headers are
   all included above them, and run.c itself is not changed.

   Not a harness on its own; see fuzz_model.c, fuzz_tokenizer.c, fuzz_encode.c. */

#define _DEFAULT_SOURCE
#define _GNU_SOURCE
/* every header run.c and run_tok.c include, before the macros below exist */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <sched.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
/* glibc's features.h defined it as 1; run.c defines it again, empty */
#undef _DEFAULT_SOURCE

/* Not every harness reaches every wrapper. */
#define FZ_UNUSED __attribute__((unused))

/* One tracked resource: a heap block, an fd, a FILE or a mapping. */
enum { FZ_HEAP, FZ_FD, FZ_FILE, FZ_MAP };
typedef struct {
    int kind;
    void *p;     /* block, FILE * or mapping address */
    int fd;
    size_t len;  /* mapping length */
} FuzzRes;

#define FZ_MAX_RES 4096
static FuzzRes fz_res[FZ_MAX_RES];
static int fz_n_res;
static jmp_buf fz_jmp;
static int fz_armed;    /* 1 while a guarded call runs: exit() jumps back instead */
static int fz_exit_code;

FZ_UNUSED static void fz_add(int kind, void *p, int fd, size_t len) {
    if (fz_n_res == FZ_MAX_RES) {
        fprintf(stderr, "fuzz_hooks: more than %d live resources; raise FZ_MAX_RES\n", FZ_MAX_RES);
        abort();
    }
    fz_res[fz_n_res++] = (FuzzRes){kind, p, fd, len};
}

/* Forgets a resource; aborts (a finding) when the engine releases something it never acquired. */
FZ_UNUSED static void fz_remove(int kind, void *p, int fd) {
    for (int i = fz_n_res - 1; i >= 0; i--) {
        if (fz_res[i].kind == kind && fz_res[i].p == p && fz_res[i].fd == fd) {
            fz_res[i] = fz_res[--fz_n_res];
            return;
        }
    }
    fprintf(stderr, "fuzz_hooks: engine released a resource it does not hold (kind %d, %p, fd %d)\n",
            kind, p, fd);
    abort();
}

FZ_UNUSED static void *fz_malloc(size_t n) {
    void *p = malloc(n);
    if (p) fz_add(FZ_HEAP, p, -1, 0);
    return p;
}

FZ_UNUSED static void *fz_calloc(size_t a, size_t b) {
    void *p = calloc(a, b);
    if (p) fz_add(FZ_HEAP, p, -1, 0);
    return p;
}

FZ_UNUSED static void *fz_realloc(void *old, size_t n) {
    void *p = realloc(old, n);
    if (p || n == 0) {
        if (old) fz_remove(FZ_HEAP, old, -1);
        if (p) fz_add(FZ_HEAP, p, -1, 0);
    }
    return p;
}

FZ_UNUSED static int fz_posix_memalign(void **out, size_t align, size_t n) {
    int r = posix_memalign(out, align, n);
    if (r == 0) fz_add(FZ_HEAP, *out, -1, 0);
    return r;
}

FZ_UNUSED static void fz_free(void *p) {
    if (!p) return;
    fz_remove(FZ_HEAP, p, -1);
    free(p);
}

FZ_UNUSED static int fz_open(const char *path, int flags, ...) {
    int fd = open(path, flags);
    if (fd >= 0) fz_add(FZ_FD, NULL, fd, 0);
    return fd;
}

FZ_UNUSED static int fz_close(int fd) {
    fz_remove(FZ_FD, NULL, fd);
    return close(fd);
}

FZ_UNUSED static FILE *fz_fopen(const char *path, const char *mode) {
    FILE *f = fopen(path, mode);
    if (f) fz_add(FZ_FILE, f, -1, 0);
    return f;
}

FZ_UNUSED static int fz_fclose(FILE *f) {
    fz_remove(FZ_FILE, f, -1);
    return fclose(f);
}

FZ_UNUSED static void *fz_mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
    void *p = mmap(addr, len, prot, flags, fd, off);
    if (p != MAP_FAILED) fz_add(FZ_MAP, p, -1, len);
    return p;
}

FZ_UNUSED static int fz_munmap(void *p, size_t len) {
    fz_remove(FZ_MAP, p, -1);
    return munmap(p, len);
}

FZ_UNUSED static void fz_exit(int code) {
    if (!fz_armed) exit(code);
    fz_exit_code = code;
    fz_armed = 0;
    longjmp(fz_jmp, 1);
}

/* Releases everything the engine still holds (after a jump out of fatal()). */
FZ_UNUSED static void fz_release_all(void) {
    while (fz_n_res > 0) {
        FuzzRes r = fz_res[--fz_n_res];
        if (r.kind == FZ_HEAP) free(r.p);
        else if (r.kind == FZ_FD) close(r.fd);
        else if (r.kind == FZ_FILE) fclose((FILE *)r.p);
        else munmap(r.p, r.len);
    }
}

/* After a successful load and the engine's own free: nothing may be left. */
FZ_UNUSED static void fz_expect_nothing_held(const char *what) {
    if (fz_n_res == 0) return;
    fprintf(stderr, "fuzz_hooks: %s left %d resources held (first: kind %d)\n", what, fz_n_res,
            fz_res[0].kind);
    abort();
}

/* FZ_GUARD(ok, stmt): runs stmt with exit() armed and sets ok to 1 when it returned normally, to
   0 when the engine called exit (then every resource it held has been released). The line the
   engine printed stays on stderr: libFuzzer's -close_fd_mask=2 silences it during a campaign. */
#define FZ_GUARD(ok, stmt)                 \
    do {                                   \
        if (setjmp(fz_jmp) == 0) {         \
            fz_armed = 1;                  \
            stmt;                          \
            fz_armed = 0;                  \
            (ok) = 1;                      \
        } else {                           \
            fz_release_all();              \
            (ok) = 0;                      \
        }                                  \
    } while (0)

/* An in-memory file with a path the engine can open(): /proc/self/fd/N of a memfd. */
static int fz_memfd = -1;
static char fz_memfd_path[64];

FZ_UNUSED static const char *fz_write_file(const uint8_t *data, size_t size) {
    if (fz_memfd < 0) {
        fz_memfd = memfd_create("fuzz_input", 0);
        if (fz_memfd < 0) { perror("memfd_create"); abort(); }
        snprintf(fz_memfd_path, sizeof fz_memfd_path, "/proc/self/fd/%d", fz_memfd);
    }
    if (ftruncate(fz_memfd, 0) != 0) { perror("ftruncate"); abort(); }
    size_t done = 0;
    while (done < size) {
        ssize_t w = pwrite(fz_memfd, data + done, size - done, (off_t)done);
        if (w <= 0) { perror("pwrite"); abort(); }
        done += (size_t)w;
    }
    return fz_memfd_path;
}

/* From here on, the engine's calls go through the wrappers. */
#define exit(code) fz_exit(code)
#define malloc(n) fz_malloc(n)
#define calloc(a, b) fz_calloc(a, b)
#define realloc(p, n) fz_realloc(p, n)
#define posix_memalign(out, align, n) fz_posix_memalign(out, align, n)
#define free(p) fz_free(p)
#define open(...) fz_open(__VA_ARGS__)
#define close(fd) fz_close(fd)
#define fopen(path, mode) fz_fopen(path, mode)
#define fclose(f) fz_fclose(f)
#define mmap(a, l, p, f, fd, o) fz_mmap(a, l, p, f, fd, o)
#define munmap(p, l) fz_munmap(p, l)
