"""Benchmarks of the C engine (run.c): decode and prefill speed against this machine's limits.

    make bench                                       # everything: ~2 min on an idle 2-core box, <10 busy
    python bench.py --models=zh15M --runs=5 --write=false    # a quick look, tables on stdout only
    python bench.py --help                           # all options

What it does, all inside one temporary folder:
  1. builds ./run with `make runomp` (native instructions + OpenMP) and two probes, tiny C programs
     compiled with the same flags: a memory-bandwidth probe (streaming read of a 1 GiB buffer) and
     an FMA-throughput probe (independent fused multiply-adds on registers);
  2. writes random-weight models of the zh15M (dim 288, 6 layers, 6 heads, seq 256), zh42M
     (512, 8, 8, 1024) and zh110M (768, 12, 12, 1024) shapes, vocab 5000, as version 3 fp32,
     int8 and bf16 files, with a 5000-piece llama2.c-format tokenizer (the BOS/EOS embedding rows are zero,
     so greedy decoding of random weights never stops early);
  3. times `./run model -t 0 -n 256` (decode, empty prompt) and a 200-token prompt (prefill) with
     OMP_NUM_THREADS=1 and 2, several runs each (a model's fp32/int8/bf16 x 1/2-thread configurations
     take turns, so the ratios between them compare runs made side by side), from the engine's own
     stderr timing line; each round also probes the read bandwidth of a buffer of each file's size
     with 1 and 2 threads, so "% bw" and the 2/1 ceiling compare with the machine as it was then;
  3b. unless --llama_cpp=off, does the same beside llama.cpp: builds its llama-bench once (from the
     llama-cpp-python sdist requirements-test.txt pins, cached in ~/.cache/tinystories-zh/; where
     cmake, a C++ compiler or the sdist is missing, one line says so and those rows are skipped),
     writes each model as GGUF with export.py (f32 for our fp32, q8_0 for our int8, bf16 for our bf16) and runs
     `llama-bench -p 200 -n 256 -t THREADS -r 1` right after each of our runs of the same model;
  4. times the tokenizer: encoding a 10,000-character Chinese text (storygen.py's stories) with a
     sentencepiece BPE model trained on the spot, in C (tests/tok_harness.c) and in sentencepiece;
  5. with --quality_checkpoint (by default make demo's out/demo/ckpt.pt, when it exists): the val
     cross-entropy of that trained model through the engine as fp32, int8 (with its default fp16 KV
     cache and with an fp32 one), fp32 with an fp16 KV cache, and bf16, i.e. what int8, the fp16
     cache and bf16 weights cost in quality;
  6. prints the tables and writes them to BENCHMARKS.md between `<!-- bench:begin -->` and
     `<!-- bench:end -->` (the rest of the file is kept; the markers are added if absent).

Numbers depend on what else the machine runs: the load average is recorded next to them.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from options import OptionError, UserError, apply_options, cli, opt, render_help

ROOT = Path(__file__).resolve().parent
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

# name: (dim, n_layers, n_heads, max_seq_len); n_kv_heads = n_heads, hidden_dim from model.py's rule.
SHAPES = {"zh15M": (288, 6, 6, 256), "zh42M": (512, 8, 8, 1024), "zh110M": (768, 12, 12, 1024)}
VOCAB = 5000


@dataclass
class BenchConfig:
    models: str = opt("zh15M,zh42M,zh110M", "comma-separated names from SHAPES; '' skips the engine runs")
    dtypes: str = opt("fp32,int8,bf16", "weights to time, comma-separated")
    threads: str = opt("1,2", "OMP_NUM_THREADS values; 2p = 2 threads with OMP_WAIT_POLICY=passive")
    max_seconds: float = opt(40.0, "per configuration: fewer rounds than --runs once this is spent")
    runs: int = opt(5, "timed runs per configuration (median and min-max reported)")
    decode_tokens: int = opt(256, "tokens decoded per decode run")
    prompt_tokens: int = opt(200, "prefill length, BOS included")
    tokenizer_chars: int = opt(10000, "characters for the tokenizer benchmark; 0 skips it")
    quality_checkpoint: str = opt("auto", "a train.py checkpoint (or .bin) whose val loss through the engine "
                                          "shows what int8 and bf16 cost; auto = make demo's out/demo/ckpt.pt "
                                          "when it exists; '' skips it")
    quality_data: str = opt("", "its shard folder (default: the checkpoint's data_dir, else data/tok<vocab>)")
    quality_windows: int = opt(32, "val windows of min(max_seq_len, 256) tokens")
    llama_cpp: str = opt("auto", "llama.cpp's llama-bench beside ours on GGUF exports of the same weights: auto "
                                 "(built once from the llama-cpp-python sdist requirements-test.txt pins), off, "
                                 "or a llama-bench path")
    output: str = opt("BENCHMARKS.md", "the file whose bench:begin/end block is rewritten")
    write: bool = opt(True, "false: print the tables only")


class BenchError(UserError):
    pass


def parse_config(argv: list[str]) -> BenchConfig:
    """The options, checked; OptionError (exit 2) for any that cannot work."""
    cfg = apply_options(BenchConfig(), argv)
    unknown = [m for m in cfg.models.split(",") if m and m not in SHAPES]
    if unknown:
        raise OptionError(f"unknown model(s) {unknown}; choose from {', '.join(SHAPES)}")
    for t in cfg.threads.split(","):
        try:
            ok = thread_setting(t)[0] >= 1
        except ValueError:
            ok = False
        if not ok:
            raise OptionError(f"--threads: {t!r} is not a thread count (like 1, 2, or 2p for passive waiting)")
    if cfg.runs < 1 or cfg.decode_tokens < 2 or cfg.prompt_tokens < 2:
        raise OptionError("runs must be >= 1, decode_tokens and prompt_tokens >= 2")
    if cfg.quality_windows < 1:
        raise OptionError("quality_windows must be >= 1")
    if cfg.llama_cpp not in ("auto", "off") and not os.access(cfg.llama_cpp, os.X_OK):
        raise OptionError(f"--llama_cpp={cfg.llama_cpp}: not an executable llama-bench (or use auto or off)")
    if cfg.quality_checkpoint == "auto":
        demo = ROOT / "out" / "demo" / "ckpt.pt"
        cfg.quality_checkpoint = str(demo) if demo.exists() else ""
        if not demo.exists():
            print("bench.py: no out/demo/ckpt.pt (make demo writes it), so no quality measurement", flush=True)
    return cfg


# ----------------------------------------------------------------------------------------------
# probes

MEMBW_C = r"""
/* Streaming read bandwidth: sums a float buffer of MB megabytes (64 partial sums per thread, so
   the loop vectorizes into independent chains without -ffast-math, and software prefetch 2 KiB
   ahead as run.c's kernels do); best of 5 passes. usage: membw THREADS MB */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <omp.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
int main(int argc, char **argv) {
    int threads = atoi(argv[1]);
    size_t n = ((size_t)atoi(argv[2]) << 20) / sizeof(float) / 64 * 64;
    float *a = aligned_alloc(64, n * sizeof(float));
    if (!a) return 1;
    omp_set_num_threads(threads);
    #pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) a[i] = (float)(i & 7);
    double best = 1e30, total = 0;
    for (int pass = 0; pass < 5; pass++) {
        double t0 = now();
        #pragma omp parallel reduction(+:total)
        {
            float acc[64] = {0};
            #pragma omp for schedule(static)
            for (size_t i = 0; i < n; i += 64) {
                for (int k = 0; k < 64; k += 16) __builtin_prefetch(a + i + 512 + k);
                for (int k = 0; k < 64; k++) acc[k] += a[i + k];
            }
            for (int k = 0; k < 64; k++) total += acc[k];
        }
        double dt = now() - t0;
        if (dt < best) best = dt;
    }
    printf("%.3f %g\n", n * sizeof(float) / best / 1e9, total);
    return 0;
}
"""

FMA_C = r"""
/* Peak multiply-add throughput: 12 independent accumulator registers per thread (enough to cover
   the latency on two units). usage: fma THREADS [int8]; prints GFLOP/s of fp32 FMAs (an FMA counts
   as 2), or with int8, GOP/s of AVX512-VNNI vpdpbusd (64 multiply-adds each, 2 ops apiece; 0 where
   the CPU has no VNNI). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <omp.h>
#include <immintrin.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
#if defined(__AVX512F__)
typedef __m512 vec;
#define W 16
#define FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define SET1 _mm512_set1_ps
#define STORE _mm512_storeu_ps
#else
typedef __m256 vec;
#define W 8
#define FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define SET1 _mm256_set1_ps
#define STORE _mm256_storeu_ps
#endif
static double int8_peak(int threads, long iters) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    double best = 1e30;
    long sink = 0;
    for (int pass = 0; pass < 3; pass++) {
        double t0 = now();
        #pragma omp parallel num_threads(threads) reduction(+:sink)
        {
            __m512i w = _mm512_set1_epi8(3), x = _mm512_set1_epi8(1);
            __m512i c0 = _mm512_set1_epi32(0), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0;
            __m512i c6 = c0, c7 = c0, c8 = c0, c9 = c0, c10 = c0, c11 = c0;
            /* asm: GCC copies the accumulator around the intrinsic (as run.c notes); separate
               variables, since an array element in an asm operand goes through memory */
#define DP(c) __asm__("vpdpbusd %2, %1, %0" : "+v"(c) : "v"(w), "v"(x))
            for (long i = 0; i < iters; i++) {
                DP(c0); DP(c1); DP(c2); DP(c3); DP(c4); DP(c5);
                DP(c6); DP(c7); DP(c8); DP(c9); DP(c10); DP(c11);
            }
#undef DP
            __m512i s = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(c0, c1), _mm512_add_epi32(c2, c3)),
                                         _mm512_add_epi32(_mm512_add_epi32(c4, c5), _mm512_add_epi32(c6, c7)));
            s = _mm512_add_epi32(s, _mm512_add_epi32(_mm512_add_epi32(c8, c9), _mm512_add_epi32(c10, c11)));
            sink += _mm512_reduce_add_epi32(s);
        }
        double dt = now() - t0;
        if (dt < best) best = dt;
    }
    return (double)iters * 12 * 64 * 2 * threads / best / 1e9 + 0 * (double)sink;
#else
    (void)threads, (void)iters;
    return 0.0;
#endif
}
int main(int argc, char **argv) {
    int threads = atoi(argv[1]);
    long iters = 50000000;
    if (argc > 2 && strcmp(argv[2], "int8") == 0) {
        printf("%.3f\n", int8_peak(threads, iters));
        return 0;
    }
    omp_set_num_threads(threads);
    double best = 1e30, sink = 0;
    for (int pass = 0; pass < 3; pass++) {
        double t0 = now();
        #pragma omp parallel reduction(+:sink)
        {
            vec a = SET1(0.999999f), b = SET1(1e-7f);
            vec c0 = SET1(0), c1 = SET1(1), c2 = SET1(2), c3 = SET1(3), c4 = SET1(4), c5 = SET1(5);
            vec c6 = SET1(6), c7 = SET1(7), c8 = SET1(8), c9 = SET1(9), c10 = SET1(10), c11 = SET1(11);
            for (long i = 0; i < iters; i++) {
                c0 = FMA(c0, a, b); c1 = FMA(c1, a, b); c2 = FMA(c2, a, b); c3 = FMA(c3, a, b);
                c4 = FMA(c4, a, b); c5 = FMA(c5, a, b); c6 = FMA(c6, a, b); c7 = FMA(c7, a, b);
                c8 = FMA(c8, a, b); c9 = FMA(c9, a, b); c10 = FMA(c10, a, b); c11 = FMA(c11, a, b);
            }
            float out[W];
            vec s = c0;
            vec rest[11] = {c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11};
            for (int k = 0; k < 11; k++) s = FMA(s, a, rest[k]);
            STORE(out, s);
            for (int k = 0; k < W; k++) sink += out[k];
        }
        double dt = now() - t0;
        if (dt < best) best = dt;
    }
    printf("%.3f %g\n", (double)iters * 12 * W * 2 * threads / best / 1e9, sink);
    return 0;
}
"""


def sh(argv, *, env=None, cwd=None, timeout=900, discard_stdout=False) -> str:
    p = subprocess.run([str(a) for a in argv], stdout=subprocess.DEVNULL if discard_stdout else subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, env=env, cwd=cwd, timeout=timeout)
    if p.returncode != 0:
        raise BenchError(f"{' '.join(map(str, argv))} failed ({p.returncode}): {p.stderr.strip()[-500:]}")
    return (p.stdout or "") + p.stderr


def build(folder: Path) -> dict:
    """The engine (make runomp), the tokenizer harness and the probes, same compiler and flags."""
    cc = os.environ.get("CC", "cc")
    run = folder / "run"
    sh(["make", "-s", "runomp", f"BIN={run}"], cwd=ROOT)
    flags = ["-O3", "-march=native"]
    tok = folder / "tok_harness"
    sh([cc, *flags, "-o", tok, ROOT / "tests" / "tok_harness.c", "-lm"])
    out = {"run": run, "tok_harness": tok, "cc": sh([cc, "--version"]).splitlines()[0]}
    for name, src in (("membw", MEMBW_C), ("fma", FMA_C)):
        (folder / f"{name}.c").write_text(src)
        sh([cc, *flags, "-fopenmp", "-o", folder / name, folder / f"{name}.c"])
        out[name] = folder / name
    return out


def probe(binary: Path, *args) -> float:
    return float(sh([binary, *args]).split()[0])


# ----------------------------------------------------------------------------------------------
# models

def write_models(folder: Path, names: list[str], dtypes: list[str], *, gguf_tokenizer: str = "") -> dict:
    """Random-weight .bin files of each shape and dtype; with gguf_tokenizer (a sentencepiece
    .model), each with its GGUF twin of the same weights too (export.py's writer), as "gguf"."""
    import torch

    from export import write_gguf, write_model_bin
    from model import ModelArgs, Transformer

    files = {}
    for name in names:
        dim, n_layers, n_heads, seq = SHAPES[name]
        torch.manual_seed(0)
        model = Transformer(ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads,
                                      vocab_size=VOCAB, max_seq_len=seq)).eval()
        with torch.no_grad():
            model.tok_embeddings.weight[1:3] = 0.0  # BOS/EOS logits stay 0 < the best random logit
        n_matrix = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2)
        for dtype in dtypes:
            path = folder / f"{name}_{dtype}.bin"
            write_model_bin(model, path, version=3, dtype=dtype)
            files[(name, dtype)] = {"path": path, "bytes": path.stat().st_size, "n_matrix": n_matrix,
                                    "args": model.params}
            if gguf_tokenizer and dtype in GGUF_OF:
                gguf = folder / f"{name}_{GGUF_OF[dtype]}.gguf"
                try:
                    write_gguf(model, gguf, dtype=GGUF_OF[dtype], tokenizer_model=gguf_tokenizer)
                except UserError as e:
                    raise BenchError(f"GGUF export for llama.cpp (--llama_cpp=off skips it): {e}") from None
                files[(name, dtype)].update(gguf=gguf, gguf_bytes=gguf.stat().st_size)
    return files


def write_legacy_tokenizer(path: Path) -> None:
    """A 5000-piece llama2.c tokenizer: <unk>, BOS, EOS, the 256 byte pieces, a space, then single
    CJK characters (no merges, so n characters encode to n tokens)."""
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [f"<0x{b:02X}>".encode() for b in range(256)] + [b" "]
    c = 0x4E00
    while len(pieces) < VOCAB:
        pieces.append(chr(c).encode())
        c += 1
    out = [struct.pack("<I", max(len(p) for p in pieces))]
    for i, p in enumerate(pieces):
        out.append(struct.pack("<fI", -float(i), len(p)) + p)
    path.write_bytes(b"".join(out))


def prompt_of(run: Path, tok: Path, n_tokens: int) -> str:
    """CJK text that encodes to exactly n_tokens with BOS (checked with ./run -m encode)."""
    text = "".join(chr(0x4E00 + i % 4000) for i in range(n_tokens - 2))  # + dummy-prefix space + BOS
    n = len(sh([run, "-m", "encode", "-z", tok, "-i", text]).split()) + 1
    if n != n_tokens:
        raise BenchError(f"prompt encodes to {n} tokens, expected {n_tokens}")
    return text


TIMING = re.compile(r"prefill: (\d+) tokens in ([\d.]+) ms .*decode: (\d+) tokens in ([\d.]+) ms")


def thread_setting(setting: str) -> tuple[int, dict]:
    """"2" -> (2, {}); "2p" -> (2, {"OMP_WAIT_POLICY": "passive"})."""
    passive = setting.endswith("p")
    n = int(setting[:-1] if passive else setting)
    return n, ({"OMP_WAIT_POLICY": "passive"} if passive else {})


def timed_run(run: Path, model: Path, tok: Path, setting: str, args: list[str]) -> tuple:
    n, extra = thread_setting(setting)
    env = dict(os.environ, OMP_NUM_THREADS=str(n), **extra)
    # The story goes to /dev/null: ./run flushes every token, and reading it through a pipe wakes
    # this process once per token on a core the engine's threads are using (10% off 2-thread zh15M
    # int8 decoding on 2 cores). The timing line is on stderr.
    out = sh([run, model, "-z", tok, "-t", "0", *args], env=env, discard_stdout=True)
    m = TIMING.search(out)
    if not m:
        raise BenchError(f"no timing line in the output of {model}: {out[-300:]}")
    n_pre, ms_pre, n_dec, ms_dec = int(m[1]), float(m[2]), int(m[3]), float(m[4])
    return n_pre / ms_pre * 1e3, (n_dec / ms_dec * 1e3 if n_dec else 0.0)


def stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def peer_stats(ours: dict, peer: dict) -> dict:
    """llama.cpp's tok/s and ours/llama.cpp, each ratio taken within a round (the runs made side
    by side) before the median, so a slow spell of the machine cancels out of it."""
    out = {}
    for k in ("decode", "prefill"):
        out[k] = stats(peer[k])
        out[f"{k}_ratio"] = stats([o / q for o, q in zip(ours[k], peer[k])])
    return out


# ----------------------------------------------------------------------------------------------
# llama.cpp, the engine a user would pick instead of ours: its llama-bench on GGUF exports of the
# same random weights, f32 beside our fp32 and q8_0 beside our int8

GGUF_OF = {"fp32": "f32", "int8": "q8_0", "bf16": "bf16"}  # our .bin dtype -> the GGUF dtype compared with it


def llama_cpp_version() -> str:
    """The llama-cpp-python pin of requirements-test.txt, so the benchmark times the llama.cpp the
    tests check our GGUF against."""
    text = (ROOT / "requirements-test.txt").read_text(encoding="utf-8")
    m = re.search(r"^llama-cpp-python(?:\[[^\]]*\])?==([\w.]+)", text, re.M)
    if not m:
        raise BenchError("requirements-test.txt pins no llama-cpp-python==VERSION")
    return m[1]


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tinystories-zh"


def build_llama_bench(version: str, root: Path) -> Path:
    """llama-bench from the llama.cpp that llama-cpp-python's sdist vendors, built once (about
    5 minutes of 2 cores) into root/llama.cpp-VERSION and reused. Raises BenchError saying why not."""
    home = root / f"llama.cpp-{version}"
    exe = home / "build" / "bin" / "llama-bench"
    if exe.is_file():
        return exe
    for tool in ("cmake", os.environ.get("CXX", "c++")):
        if not shutil.which(tool):
            raise BenchError(f"no {tool} on PATH to build it")
    sdist = root / "sdist" / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        # pip's own cache answers this without the network when `make test` has built the wheel
        print(f"bench.py: fetching the llama-cpp-python {version} sdist with pip", flush=True)
        p = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:",
                            f"llama-cpp-python=={version}", "-d", sdist.parent],
                           capture_output=True, text=True, timeout=600)
        if p.returncode != 0 or not sdist.is_file():
            raise BenchError(f"pip could not fetch its sdist ({(p.stderr.strip().splitlines() or ['?'])[-1]})")
    src = home / "src"
    if not (src / "CMakeLists.txt").is_file():
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        tmp = home / "src.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(sdist) as tar:
            members = []
            for m in tar.getmembers():
                if m.name.startswith(prefix) and len(m.name) > len(prefix):
                    m.name = m.name[len(prefix):]
                    members.append(m)
            if not members:
                raise BenchError(f"{sdist} holds no vendor/llama.cpp")
            tar.extractall(tmp, members=members, filter="data")
        shutil.rmtree(src, ignore_errors=True)
        os.replace(tmp, src)  # a half-extracted tree never passes for a whole one
    print(f"bench.py: building llama.cpp's llama-bench in {home} (once; about 5 minutes on 2 cores)", flush=True)
    # Static, CPU only, this machine's instructions (as our -march=native), and none of the
    # network, server, test or multimodal parts llama-bench does not need.
    sh(["cmake", "-S", src, "-B", home / "build", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
        "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAVA_BUILD=OFF"],
       timeout=600, discard_stdout=True)
    sh(["cmake", "--build", home / "build", "--target", "llama-bench", f"-j{os.cpu_count() or 1}"],
       timeout=3600, discard_stdout=True)
    if not exe.is_file():
        raise BenchError(f"the build wrote no {exe}")
    return exe


def find_llama_bench(setting: str, *, build=build_llama_bench) -> tuple[Path | None, str]:
    """(llama-bench, where it comes from) or (None, the one-line reason its rows are skipped).
    setting: "off", "auto" (the cached build, built on first use) or the path of a llama-bench."""
    if setting == "off":
        return None, "llama.cpp rows skipped: --llama_cpp=off"
    if setting != "auto":
        return Path(setting), f"`{setting}`"
    try:
        version = llama_cpp_version()
        return build(version, cache_root()), (f"llama-cpp-python {version}'s vendored llama.cpp, "
                                             "built static with -DGGML_NATIVE=ON, CPU only")
    except (BenchError, OSError, tarfile.TarError, subprocess.TimeoutExpired) as e:
        return None, f"llama.cpp rows skipped: could not build llama-bench: {e}"


def parse_llama_bench(text: str, *, prompt_tokens: int, decode_tokens: int) -> dict:
    """llama-bench's `-o json` output -> {"prefill": tok/s, "decode": tok/s} from its pp<prompt_tokens>
    and tg<decode_tokens> tests (the mean over its repetitions), plus "build": "commit (number)"
    where it knows its commit."""
    try:
        tests = json.loads(text)
    except json.JSONDecodeError as e:
        raise BenchError(f"llama-bench printed no JSON ({e}): {text[:200]!r}") from None
    out = {}
    for t in tests if isinstance(tests, list) else []:
        if t.get("n_prompt") == prompt_tokens and t.get("n_gen") == 0:
            out["prefill"] = float(t["avg_ts"])
        elif t.get("n_gen") == decode_tokens and t.get("n_prompt") == 0:
            out["decode"] = float(t["avg_ts"])
        # a build from the sdist, which has no .git, says "unknown"
        if t.get("build_commit", "unknown") != "unknown":
            out["build"] = f"{t['build_commit']} ({t.get('build_number', '?')})"
    if "prefill" not in out or "decode" not in out:
        raise BenchError(f"llama-bench's JSON has no pp{prompt_tokens} and tg{decode_tokens} results: {text[:200]!r}")
    return out


def llama_bench_run(exe: Path, gguf: Path, setting: str, cfg: BenchConfig) -> dict:
    """One llama-bench process: a 200-token prefill and a 256-token decode, one repetition each
    (after its own warm-up of each), as parse_llama_bench returns them."""
    argv = [exe, "-m", gguf, "-p", cfg.prompt_tokens, "-n", cfg.decode_tokens, "-t", thread_setting(setting)[0],
            "-r", 1, "-o", "json"]
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise BenchError(f"{' '.join(map(str, argv))} failed ({p.returncode}): {p.stderr.strip()[-300:]}")
    return parse_llama_bench(p.stdout, prompt_tokens=cfg.prompt_tokens, decode_tokens=cfg.decode_tokens)


def train_gguf_tokenizer(folder: Path) -> str:
    """A 5000-piece sentencepiece BPE with tinystories.py's settings, which write_gguf needs to
    embed (llama-bench feeds random ids, so which pieces it holds does not matter)."""
    import storygen

    path = folder / "gguf_tok.model"
    train_bpe(storygen.generate_stories(3000, seed=0), path, vocab_size=VOCAB, normalization_rule_name="identity",
              remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True)
    return str(path)


def train_bpe(stories, path: Path, *, vocab_size: int, **options) -> None:
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(stories), model_prefix=str(path.with_suffix("")), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2, **options)


# ----------------------------------------------------------------------------------------------
# tokenizer benchmark

def tokenizer_bench(folder: Path, bins: dict, n_chars: int) -> dict:
    import sentencepiece as spm

    import storygen
    from tokenizer import export_tokenizer

    train_bpe(storygen.generate_stories(600, seed=0), folder / "zh.model", vocab_size=2000)
    model = str(folder / "zh.model")
    tok_bin = export_tokenizer(model, str(folder / "zh.bin"))
    text = ""
    for s in storygen.generate_stories(10_000, seed=1):
        text += s
        if len(text) >= n_chars:
            break
    text = text[:n_chars]
    (folder / "zh.txt").write_text(text, encoding="utf-8")
    out = sh([bins["tok_harness"], "bench", tok_bin, folder / "zh.txt", 20])  # "n_ids best_ms"
    c_ms = float(out.split()[1])
    sp = spm.SentencePieceProcessor(model_file=model)
    best = 1e30
    for _ in range(20):
        t0 = time.perf_counter()
        ids = sp.encode(text)
        best = min(best, time.perf_counter() - t0)
    return {"chars": len(text), "tokens": len(ids) + 1, "c_ms": c_ms, "sp_ms": best * 1e3}


# ----------------------------------------------------------------------------------------------
# what int8 and bf16 cost in quality

def quality_bench(folder: Path, cfg: BenchConfig) -> dict:
    """Val cross-entropy of one trained model through the C engine's prefill path, as an fp32 file,
    an int8 file (weights and activations quantized, as the engine runs them, with its default fp16
    KV cache and with an fp32 one), the fp32 file with an fp16 KV cache, and a bf16 file (on
    AVX512-BF16 CPUs its prefill also rounds the activations), next to PyTorch's fp32 value."""
    import numpy as np
    import torch

    import tinystories
    from export import load_checkpoint, write_model_bin

    try:
        model, info = load_checkpoint(cfg.quality_checkpoint)
    except UserError as e:
        raise BenchError(str(e)) from None
    p = model.params
    data = Path(cfg.quality_data or info["config"].get("data_dir") or
                tinystories.DEFAULT_DATA_ROOT / f"tok{p.vocab_size}")
    L = min(p.max_seq_len, 256)
    try:
        x, y = tinystories.TokenBatches(data, "val", cfg.quality_windows, L, seed=0).get(0)
    except tinystories.DataError as e:
        raise BenchError(f"--quality_data: {e}") from None
    if int(x.max()) >= p.vocab_size:
        raise BenchError(f"{data}: token ids up to {int(x.max())}, but the model's vocab is {p.vocab_size}")
    # name: (file dtype, KV cache); the engine's defaults are f32 beside fp32 and bf16, f16 beside int8
    runs = {"fp32": ("fp32", "f32"), "int8": ("int8", "f16"), "int8-kv32": ("int8", "f32"),
            "fp32-kv16": ("fp32", "f16"), "bf16": ("bf16", "f32")}
    logits_bin = folder / "engine_logits"
    sh(["make", "-s", "runomp", f"BIN={logits_bin}", "SRC=tests/engine_logits.c"], cwd=ROOT)
    ce = {}
    with torch.no_grad():
        ce["pytorch"] = model(x, y)[1].item()
    for name, (dtype, kv) in runs.items():
        path = folder / f"quality_{dtype}.bin"
        if not path.exists():
            write_model_bin(model, path, version=3, dtype=dtype)
        total, count = 0.0, 0
        for row, target in zip(x.tolist(), y):
            sh([logits_bin, "block", path, " ".join(map(str, row)), folder / "logits.f32", kv])
            logits = np.fromfile(folder / "logits.f32", dtype=np.float32).reshape(L, p.vocab_size)
            total += torch.nn.functional.cross_entropy(torch.from_numpy(logits), target, ignore_index=-1,
                                                       reduction="sum").item()
            count += int((target != -1).sum())
        # Pooled over every target, as PyTorch's loss is: rows of instruct data hold different
        # numbers of masked (instruction) targets, so a mean of row means would differ.
        ce[name] = total / max(count, 1)
    shown = Path(os.path.abspath(cfg.quality_checkpoint))
    if shown.is_relative_to(ROOT):
        shown = shown.relative_to(ROOT)
    return {"checkpoint": str(shown), "windows": cfg.quality_windows, "len": L,
            "params": sum(w.numel() for w in model.parameters()), "ce": ce}


# ----------------------------------------------------------------------------------------------
# report

def fmt(s: dict, digits: int = 1) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def fmt_ratio(s: dict) -> str:
    return f"{s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f})"


def render(cfg: BenchConfig, env: dict, probes: dict, results: dict, files: dict, tok: dict,
           quality: dict) -> str:
    lines = [
        f"Measured {env['date']} on {env['cpu']} ({env['cores']} cores), {env['cc']}, "
        f"`{env['command']}`. Load average before/after: {env['load_before']} / {env['load_after']} "
        "(other work on the machine slows the runs, threaded ones most).",
    ]
    if files:
        lines += speed_tables(cfg, probes, results, files)
        lines += llama_table(cfg, env.get("llama", {}), results, files)
    if tok:
        lines += ["", f"Tokenizer: encoding {tok['chars']} Chinese characters ({tok['tokens']} tokens with BOS, "
                  "storygen.py text, a 2000-piece byte-fallback BPE trained on the spot), best of 20: "
                  f"run.c's encoder {tok['c_ms']:.2f} ms ({tok['chars'] / tok['c_ms'] * 1e3 / 1e6:.2f} M chars/s), "
                  f"sentencepiece {tok['sp_ms']:.2f} ms."]
    if quality:
        ce = quality["ce"]
        rel = {k: 100 * (ce[k] - ce["fp32"]) / ce["fp32"] for k in ce}
        lines += ["", f"Quality: val cross-entropy of `{quality['checkpoint']}` ({quality['params'] / 1e6:.2f}M "
                  f"parameters) on {quality['windows']} windows of {quality['len']} tokens, through the C "
                  f"engine: fp32 {ce['fp32']:.4f}; int8 {ce['int8']:.4f} ({rel['int8']:+.2f}%) with its default fp16 "
                  f"KV cache, {ce['int8-kv32']:.4f} ({rel['int8-kv32']:+.2f}%) with an fp32 one; fp32 weights with "
                  f"an fp16 KV cache {ce['fp32-kv16']:.4f} ({rel['fp32-kv16']:+.2f}%); bf16 "
                  f"{ce['bf16']:.4f} ({rel['bf16']:+.2f}%); PyTorch fp32 {ce['pytorch']:.4f}."]
    return "\n".join(lines)


def has_avx512_bf16() -> bool:
    try:
        return " avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def peak(probes: dict, dtype: str, threads: int) -> float:
    """The arithmetic peak a prefill of these weights is measured against."""
    if dtype == "int8" and probes["int8"][threads]:
        return probes["int8"][threads]
    # bf16 prefill on AVX512-BF16 does two products per lane per instruction: twice the FMA rate
    return probes["fma"][threads] * (2 if dtype == "bf16" and has_avx512_bf16() else 1)


def speed_tables(cfg: BenchConfig, probes: dict, results: dict, files: dict) -> list:
    threads = cfg.threads.split(",")
    counts = sorted({thread_setting(t)[0] for t in threads})
    lines = [
        "",
        "Machine limits from the probes (same compiler flags): "
        + ", ".join(f"{t} thread{'s' if t > 1 else ''}: {probes['bw'][t]:.1f} GB/s read bandwidth from "
                    f"a 1 GiB buffer, {probes['fma'][t]:.0f} GFLOP/s fp32 FMA peak"
                    + (f", {probes['int8'][t]:.0f} GOP/s int8 VNNI peak" if probes["int8"][t] else "")
                    for t in counts) + ".",
        "",
        f"Decode: tok/s of `./run model -t 0 -n {cfg.decode_tokens} > /dev/null` (empty prompt), median (min-max) "
        f"over {cfg.runs} runs, a model's configurations taking turns run by run so that the machine's "
        "slow spells hit them alike (fewer runs where n says so: a model stops after "
        f"{cfg.max_seconds:.0f} s per configuration); threads 2p = 2 threads with OMP_WAIT_POLICY=passive; "
        "load = the 1-minute load average when the model started (above ~0.5 on 2 cores, another process "
        "competes for the second core and 2-thread runs collapse); GB/s = model bytes streamed per token x tok/s; bw = the median of the probe's read "
        "bandwidth for a buffer of the model's size (small models stay in cache), probed once per round beside "
        "the runs, and % of it. "
        f"Prefill: tok/s of a {cfg.prompt_tokens}-token prompt (one forward pass per block of up to 256 tokens); "
        "GOP/s = 2 x matrix parameters x tokens / time (fp32 FLOPs, or int8 multiply-add ops), as % "
        "of the fp32 FMA peak for fp32 weights and of the int8 VNNI peak for int8 weights.",
        "",
        "| model | weights | MB | threads | load | n | decode tok/s | decode GB/s | bw GB/s | % bw | prefill tok/s | prefill GOP/s | % peak |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (name, dtype), f in files.items():
        for t in threads:
            r = results[(name, dtype, t)]
            dec, pre = r["decode"], r["prefill"]
            k = thread_setting(t)[0]
            gbs = f["bytes"] * dec["median"] / 1e9
            gflops = 2 * f["n_matrix"] * pre["median"] / 1e9
            lines.append(f"| {name} | {dtype} | {f['bytes'] / 1e6:.0f} | {t} | {r['load']:.1f} | {dec['n']} | {fmt(dec)} | {gbs:.1f} | "
                         f"{f['bw'][k]:.1f} | {100 * gbs / f['bw'][k]:.0f}% | {fmt(pre)} | {gflops:.1f} | "
                         f"{100 * gflops / peak(probes, dtype, k):.0f}% |")
    have = [d for d in ("fp32", "int8", "bf16") if any(fd == d for _, fd in files)]
    lines += ["", "Ratios of medians. int8/fp32, bf16/fp32: decode tok/s. Prefill speed-up: prefill tok/s over decode tok/s, "
              f"i.e. the time of {cfg.prompt_tokens} decode steps over one {cfg.prompt_tokens}-token prefill. "
              "2t/1t: 2 threads over 1 thread. At peak: the speed-up a prefill running at the probe's arithmetic "
              "peak would give over this decode speed (its upper bound; models whose decode runs from cache "
              "leave it low).", "",
              "| model | threads | " + "".join(f"{d}/fp32 decode | " for d in have if d != "fp32")
              + "".join(f"prefill speed-up {d} | (at peak) | " for d in have).rstrip(" "),
              "|---|---:|" + "---:|" * (len(have) - 1 + 2 * len(have))]
    names = list(dict.fromkeys(n for n, _ in files))

    def med(n, d, t, k):
        r = results.get((n, d, t))
        return r[k]["median"] if r else float("nan")

    for n in names:
        for t in threads:
            k = thread_setting(t)[0]
            cells = []
            for d in have:
                at_peak = (peak(probes, d, k) * 1e9 / (2 * files[(n, d)]["n_matrix"]) / med(n, d, t, "decode")
                           if (n, d) in files else float("nan"))
                cells.append(f"{med(n, d, t, 'prefill') / med(n, d, t, 'decode'):.1f}x | {at_peak:.1f}x")
            speedups = [f"{med(n, d, t, 'decode') / med(n, 'fp32', t, 'decode'):.2f}x" for d in have if d != "fp32"]
            lines.append(f"| {n} | {t} | " + "".join(s + " | " for s in speedups) + " | ".join(cells) + " |")
    multi = [t for t in threads if thread_setting(t)[0] > 1]
    if "1" in threads and multi:
        lines += ["", f"{'/'.join(multi)}/1 bw: the bandwidth probe's own ratio at the model's size, the most a "
                  "decode that streams its weights from memory can gain from more threads.", "",
                  "| model | weights | " + " | ".join(f"{t}/1 decode | {t}/1 prefill | {t}/1 bw" for t in multi) + " |",
                  "|---|---|" + "---:|---:|---:|" * len(multi)]
        for n in names:
            for d in dict.fromkeys(d for _, d in files):
                bwk = files[(n, d)]["bw"]
                cells = [f"{med(n, d, t, 'decode') / med(n, d, '1', 'decode'):.2f}x | "
                         f"{med(n, d, t, 'prefill') / med(n, d, '1', 'prefill'):.2f}x | "
                         f"{bwk[thread_setting(t)[0]] / bwk[1]:.2f}x" for t in multi]
                lines.append(f"| {n} | {d} | " + " | ".join(cells) + " |")
    return lines


def llama_table(cfg: BenchConfig, llama: dict, results: dict, files: dict) -> list:
    """The llama.cpp rows: its tok/s beside ours and the ratio, or the line saying why there are none."""
    if llama.get("note"):
        return ["", f"{llama['note']}."]
    rows = [(key, r) for key, r in results.items() if "llama" in r]
    if not rows:
        return []
    lines = [
        "",
        f"llama.cpp beside the engine: its `llama-bench -p {cfg.prompt_tokens} -n {cfg.decode_tokens} -t THREADS "
        f"-r 1 -o json` ({llama['origin']}{', build ' + llama['build'] if llama['build'] else ''}; "
        "its defaults otherwise: an f16 KV cache (ours: f32 beside fp32 weights, f16 beside int8), flash "
        "attention auto, "
        "one warm-up of each test) on GGUF files of the same random weights written by export.py's write_gguf, "
        "f32 beside our fp32, q8_0 (blocks of 32, fp16 scales) beside our int8 and bf16 beside our bf16. In each round llama-bench "
        "runs right after our decode and prefill of the same model, weights and threads; ours/llama.cpp is "
        "the median (min-max) of the per-round ratios of tok/s, above 1 where ours is faster. llama-bench "
        "feeds random token ids and samples nothing, so it never stops early; our decode also picks each "
        "token (argmax) and our prefill is a cold process (no warm-up).",
        "",
        "| model | weights | GGUF MB | threads | n | decode tok/s ours | llama.cpp | ours/llama.cpp "
        "| prefill tok/s ours | llama.cpp | ours/llama.cpp |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (name, dtype, t), r in rows:
        q = r["llama"]
        lines.append(f"| {name} | {dtype} / {GGUF_OF[dtype]} | {files[(name, dtype)]['gguf_bytes'] / 1e6:.0f} | {t} | "
                     f"{q['decode']['n']} | {fmt(r['decode'])} | {fmt(q['decode'])} | {fmt_ratio(q['decode_ratio'])} | "
                     f"{fmt(r['prefill'])} | {fmt(q['prefill'])} | {fmt_ratio(q['prefill_ratio'])} |")
    return lines


def write_section(path: Path, body: str) -> None:
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n\n"
    section = f"{BEGIN}\n{body}\n{END}"
    if BEGIN in old and END in old and old.index(BEGIN) < old.index(END):
        new = old[:old.index(BEGIN)] + section + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n" + section + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, path)


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(render_help(BenchConfig, "python bench.py [--key=value ...]", __doc__))
        return 0
    cfg = parse_config(argv)
    names = [m for m in cfg.models.split(",") if m]
    dtypes = cfg.dtypes.split(",")
    threads = cfg.threads.split(",")
    counts = sorted({thread_setting(t)[0] for t in threads})
    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "cpu": cpu_name(), "cores": os.cpu_count(), "load_before": "%.2f" % os.getloadavg()[0],
           "command": "make bench" if not argv else "python bench.py " + " ".join(argv)}
    t_start = time.time()
    try:
        with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
            folder = Path(tmp)
            bins = build(folder)
            env["cc"] = bins["cc"]
            probes = {"bw": {t: probe(bins["membw"], t, 1024) for t in counts},
                      "fma": {t: probe(bins["fma"], t) for t in counts},
                      "int8": {t: probe(bins["fma"], t, "int8") for t in counts}} if names else {}
            tok_path = folder / f"tok{VOCAB}.bin"
            write_legacy_tokenizer(tok_path)
            llama, origin = find_llama_bench(cfg.llama_cpp) if names else (None, "")
            env["llama"] = {"origin": origin, "build": ""} if llama else {"note": origin}
            if not llama and origin:
                print(f"bench.py: {origin}", flush=True)
            files = write_models(folder, names, dtypes, gguf_tokenizer=train_gguf_tokenizer(folder) if llama else "")
            if files:
                print("probes:", probes, flush=True)
                prompt = prompt_of(bins["run"], tok_path, cfg.prompt_tokens)
            results = {}
            # One model's configurations (weights x threads) take turns, one run each per round,
            # so a slow spell on the machine hits all of them alike and the ratios between them
            # (int8/fp32, 2 threads/1) stay fair; a model stops after max_seconds per configuration.
            for name in names:
                configs = [(dtype, t) for dtype in dtypes for t in threads]
                runs = {c: {"decode": [], "prefill": [], "load": os.getloadavg()[0]} for c in configs}
                peers = {c: {"decode": [], "prefill": []} for c in configs if "gguf" in files[(name, c[0])]}
                bw = {(dtype, k): [] for dtype in dtypes for k in counts}
                t0 = time.time()
                for r in range(cfg.runs):
                    if r and time.time() - t0 >= cfg.max_seconds * (len(configs) + len(peers)):
                        break
                    # The read bandwidth of a buffer of each file's size (this CPU's caches may hold
                    # a whole model), probed in every round beside the runs it is compared with:
                    # on a VM it moves with where the host puts the vCPUs (2-thread probes on the
                    # benchmark VM swing between about 1.25x and 2.1x the 1-thread figure).
                    for dtype in dtypes:
                        mb = max(1, round(files[(name, dtype)]["bytes"] / 2**20))
                        for k in counts:
                            bw[(dtype, k)].append(probe(bins["membw"], k, mb))
                    for dtype, t in configs:
                        path, got = files[(name, dtype)]["path"], runs[(dtype, t)]
                        got["decode"].append(timed_run(bins["run"], path, tok_path, t, ["-n", str(cfg.decode_tokens)])[1])
                        got["prefill"].append(timed_run(bins["run"], path, tok_path, t, ["-n", "1", "-i", prompt])[0])
                        if (dtype, t) in peers:  # right after ours, so each ratio pairs runs made side by side
                            peer = llama_bench_run(llama, files[(name, dtype)]["gguf"], t, cfg)
                            for k in ("decode", "prefill"):
                                peers[(dtype, t)][k].append(peer[k])
                            env["llama"]["build"] = peer.get("build", "")
                for dtype in dtypes:
                    files[(name, dtype)]["bw"] = {k: statistics.median(bw[(dtype, k)]) for k in counts}
                for (dtype, t), got in runs.items():
                    dec, pre = stats(got["decode"]), stats(got["prefill"])
                    results[(name, dtype, t)] = {"decode": dec, "prefill": pre, "load": got["load"]}
                    print(f"{name} {dtype} threads={t}: decode {fmt(dec)} tok/s, prefill {fmt(pre)} tok/s", flush=True)
                    if (dtype, t) in peers:
                        q = results[(name, dtype, t)]["llama"] = peer_stats(got, peers[(dtype, t)])
                        print(f"  llama.cpp {GGUF_OF[dtype]}: decode {fmt(q['decode'])} tok/s, prefill "
                              f"{fmt(q['prefill'])} tok/s", flush=True)
            tok = tokenizer_bench(folder, bins, cfg.tokenizer_chars) if cfg.tokenizer_chars > 0 else {}
            quality = quality_bench(folder, cfg) if cfg.quality_checkpoint else {}
    except subprocess.TimeoutExpired as e:
        raise BenchError(str(e)) from None
    env["load_after"] = "%.2f" % os.getloadavg()[0]
    body = render(cfg, env, probes, results, files, tok, quality)
    print()
    print(body)
    print(f"\n(bench took {time.time() - t_start:.0f} s)")
    if cfg.write:
        write_section(ROOT / cfg.output, body)
        print(f"wrote {cfg.output}")
    return 0


if __name__ == "__main__":
    sys.exit(cli("bench.py", lambda: main(sys.argv[1:])))
