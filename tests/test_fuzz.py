"""Smoke test of the libFuzzer harnesses in tests/fuzz/, and the seed corpus they start from.

`make test` runs each harness for a few seconds over seeds made here (tiny random models that
export.py writes in every version, tokenizers that tokenizer.py exports from small sentencepiece
models trained on storygen.py stories, and shards that tinystories.py writes). It needs clang
with libFuzzer and is skipped, saying so, without it. The long campaign is `make fuzz`; see
docs/fuzzing.md.

The seeds also come from here for `make fuzz`:

    python tests/test_fuzz.py seeds out/fuzz/seeds      # writes model/ tokenizer/ encode/ shard/
"""
import io
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FUZZ_DIR = REPO / "tests" / "fuzz"
HARNESSES = ("model", "tokenizer", "encode")   # tests/fuzz/fuzz_<name>.c
FUZZ_FLAGS = ["-g", "-O1", "-fno-omit-frame-pointer", "-fsanitize=fuzzer,address,undefined",
              "-fno-sanitize-recover=undefined", "-Wall", "-Wextra", "-std=c99"]
SMOKE_RUNS = 5000        # per harness: a few seconds each under the sanitizers
CLANG = os.environ.get("FUZZ_CC", "clang")

# Prompts for the encoder harness: the encoder's corner cases as seeds.
PROMPTS = ["", " ", "   ", "\t\n", "从前有一只小猫。", "Once upon a time", "ＡＢＣ①２ café e\u0301",
           "小猫咪（笑）<hi>ab", "a  b   c", "\u00a0\u3000x", "🐱🐶", "<s></s><unk>", "1234567890"]


# ----------------------------------------------------------------------------------------------
# seed corpus

def _tiny_model(*, dim: int, hidden_dim: int, n_layers: int, n_heads: int, n_kv_heads: int,
                vocab_size: int, max_seq_len: int, tie: bool, seed: int):
    import torch
    from model import ModelArgs, Transformer
    torch.manual_seed(seed)
    args = ModelArgs(dim=dim, hidden_dim=hidden_dim, n_layers=n_layers, n_heads=n_heads,
                     n_kv_heads=n_kv_heads, vocab_size=vocab_size, max_seq_len=max_seq_len,
                     tie_embeddings=tie)
    return Transformer(args)


def _model_seeds(out: Path) -> None:
    from export import write_model_bin
    # small enough that a mutation costs microseconds: dim 8 (group size 8), and one model with
    # dim 32 / group size 32 for the int8 paths that need whole 16-value vectors
    small = _tiny_model(dim=8, hidden_dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=16,
                        max_seq_len=8, tie=True, seed=1)
    untied = _tiny_model(dim=8, hidden_dim=16, n_layers=2, n_heads=2, n_kv_heads=2, vocab_size=12,
                         max_seq_len=8, tie=False, seed=2)
    wide = _tiny_model(dim=32, hidden_dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=16,
                       max_seq_len=8, tie=True, seed=3)
    for name, m in (("small", small), ("untied", untied), ("wide", wide)):
        write_model_bin(m, str(out / f"{name}_v0.bin"), version=0)
        write_model_bin(m, str(out / f"{name}_v1.bin"), version=1)
        write_model_bin(m, str(out / f"{name}_v2.bin"), version=2)
        write_model_bin(m, str(out / f"{name}_v3_fp32.bin"), version=3, dtype="fp32",
                        tokenizer_hash=0x12345678)
        write_model_bin(m, str(out / f"{name}_v3_int8.bin"), version=3, dtype="int8")


def _train_spm(lines: list[str], path: Path, **kw) -> None:
    import sentencepiece as spm
    buf = io.BytesIO()
    opts = dict(model_type="bpe", minloglevel=2, num_threads=1, character_coverage=0.9995)
    opts.update(kw)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, **opts)
    path.write_bytes(buf.getvalue())


def _rules_tsv(work: Path) -> Path:
    """sentencepiece's normalization_rule_tsv: source code points, a tab, target code points."""
    rules = {"FF21": "41", "FF22": "42", "FF23": "43", "2460": "31", "FF12": "32", "3000": "20",
             "A0": "20", "65 301": "E9", "FB01": "66 69", "2026": "2E 2E 2E"}
    path = work / "rules.tsv"
    path.write_text("".join(f"{k}\t{v}\n" for k, v in rules.items()))
    return path


def _tokenizer_seeds(tok_dir: Path, enc_dir: Path, work: Path) -> Path:
    """Writes tokenizer seeds to tok_dir and prompt seeds to enc_dir; returns the .bin the
    encoder harness uses (NFKC, byte fallback, user-defined pieces)."""
    import storygen
    from tokenizer import export_tokenizer
    lines = [ln for s in storygen.generate_stories(200, seed=1) for ln in s.split("\n") if ln.strip()]
    lines += ["Once upon a time there was a cat.", "ＡＢＣ①２ café 1234"] * 20
    configs = {
        # the encoder's tokenizer: a normalizing one (precompiled charsmap), byte fallback, users
        "nfkc": dict(vocab_size=1500, normalization_rule_name="nmt_nfkc", byte_fallback=True,
                     user_defined_symbols=["<hi>", "（笑）", "小猫咪", "ab"]),
        # a custom normalization table of a few rules: a small precompiled charsmap, so the
        # loader's mutations of the trie are cheap (NFKC's is 240 kB)
        "rules": dict(vocab_size=450, normalization_rule_tsv=str(_rules_tsv(work)),
                      byte_fallback=True, user_defined_symbols=["<hi>", "ab"], character_coverage=1.0),
        # identity (no charsmap: small, so the loader's mutations are cheap), unk not byte
        # fallback, trained on the 100 most frequent characters only
        "ident": dict(vocab_size=200, normalization_rule_name="identity", byte_fallback=False,
                      remove_extra_whitespaces=False, add_dummy_prefix=False, pad_id=3,
                      character_coverage=1.0),
    }
    keep = {c for c, _ in Counter("".join(lines)).most_common(100)}
    frequent = ["".join(c for c in ln if c in keep) for ln in lines]
    for name, kw in configs.items():
        model = work / f"{name}.model"
        _train_spm(lines if name == "nfkc" else frequent, model, **kw)
        # the NFKC one only as the encoder's tokenizer and in legacy form (no charsmap there)
        export_tokenizer(str(model), str((work if name == "nfkc" else tok_dir) / f"{name}.bin"))
        export_tokenizer(str(model), str(tok_dir / f"{name}.legacy.bin"), legacy=True)
    for i, p in enumerate(PROMPTS + lines[:20]):
        (enc_dir / f"prompt_{i:02d}.txt").write_bytes(p.encode("utf-8"))
    return work / "nfkc.bin"


def _shard_seeds(out: Path) -> None:
    import numpy as np
    import tinystories as ts
    rng = np.random.default_rng(0)
    ts.write_shard(out / "train_000.bin", rng.integers(0, 300, 64).astype(np.uint16), vocab_size=300,
                   tokenizer_hash=0x12345678, n_stories=3)
    ts.write_shard(out / "val.bin", np.zeros(0, dtype=np.uint16), vocab_size=300, tokenizer_hash=1,
                   n_stories=0)


def make_seeds(out: Path) -> Path:
    """The seed corpus under out/{model,tokenizer,encode,shard}; returns the encoder's tokenizer."""
    sys.path.insert(0, str(REPO))
    out = Path(out)
    dirs = {k: out / k for k in ("model", "tokenizer", "encode", "shard", "work")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    _model_seeds(dirs["model"])
    tok = _tokenizer_seeds(dirs["tokenizer"], dirs["encode"], dirs["work"])
    _shard_seeds(dirs["shard"])
    shutil.copy(tok, out / "encode_tokenizer.bin")
    return out / "encode_tokenizer.bin"


# ----------------------------------------------------------------------------------------------
# smoke test

def _have_libfuzzer() -> bool:
    if shutil.which(CLANG) is None:
        return False
    r = subprocess.run([CLANG, "-fsanitize=fuzzer", "-x", "c", "-", "-o", os.devnull],
                       input=b"int LLVMFuzzerTestOneInput(const char *d, long n) { return 0; }\n",
                       capture_output=True)
    return r.returncode == 0


needs_libfuzzer = pytest.mark.skipif(not _have_libfuzzer(),
                                     reason="clang with libFuzzer not found; apt-get install clang")


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuzz_seeds")
    make_seeds(out)
    return out


@pytest.fixture(scope="module")
def harnesses(tmp_path_factory) -> dict[str, Path]:
    """The three C harnesses, compiled side by side (each takes a few seconds)."""
    d = tmp_path_factory.mktemp("fuzz_bin")
    procs = {name: subprocess.Popen([CLANG, *FUZZ_FLAGS, "-o", str(d / f"fuzz_{name}"),
                                     str(FUZZ_DIR / f"fuzz_{name}.c"), "-lm"],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for name in HARNESSES}
    for name, p in procs.items():
        out, _ = p.communicate()
        assert p.returncode == 0, f"fuzz_{name}.c does not build:\n{out.decode()[-4000:]}"
    return {name: d / f"fuzz_{name}" for name in HARNESSES}


@needs_libfuzzer
@pytest.mark.parametrize("name", HARNESSES)
def test_harness_smoke(name, harnesses, seeds, tmp_path):
    exe = harnesses[name]
    corpus = tmp_path / "corpus"      # new inputs land here, never in the seed folder
    corpus.mkdir()
    env = dict(os.environ, FUZZ_TOKENIZER=str(seeds / "encode_tokenizer.bin"))
    r = subprocess.run([str(exe), f"-runs={SMOKE_RUNS}", "-seed=1", "-max_len=65536", "-close_fd_mask=2",
                        f"-artifact_prefix={tmp_path}/", str(corpus), str(seeds / name)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"fuzz_{name} failed (exit {r.returncode}):\n{r.stderr[-4000:]}"
    assert f"Done {SMOKE_RUNS} runs" in r.stderr, r.stderr[-2000:]
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("leak-*"))


def test_shard_reader_smoke(seeds, tmp_path):
    """The atheris harness's target on every seed and a few broken shards: only DataError."""
    sys.path.insert(0, str(FUZZ_DIR))
    import fuzz_shard
    path = tmp_path / "train_000.bin"
    for p in sorted((seeds / "shard").iterdir()):
        fuzz_shard.check_one(p.read_bytes(), path)
    data = (seeds / "shard" / "train_000.bin").read_bytes()
    for broken in (b"", data[:10], data[:255], data[:-1], data + b"\0", b"\xff" * 300,
                   data[:8] + b"\xff\xff\xff\xff" + data[12:]):
        fuzz_shard.check_one(broken, path)


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] != "seeds":
        print("usage: python tests/test_fuzz.py seeds OUT_DIR", file=sys.stderr)
        return 2
    print(make_seeds(Path(argv[2])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
