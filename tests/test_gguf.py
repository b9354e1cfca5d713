"""GGUF export (export.py --version=gguf) against the real llama.cpp and transformers' GGUF loader.

llama.cpp comes from llama-cpp-python, which pip builds from source (`make test` installs it
from requirements-test.txt). For tiny random models, from train.py checkpoints and from llama2.c
.bin files (version 0 tied, version 1 GQA with its own classifier, version 2 int8):

- llama.cpp's tokenizer gives sentencepiece's ids (built-in corpus, edge cases, hypothesis text)
  for tokenizers trained with tinystories.py's settings; the tokenizers export.py refuses are
  measured here to really tokenize differently in llama.cpp (or to crash it);
- llama.cpp's logits at every position are PyTorch's: f32 within 1e-4, f16 and q8_0 within the
  error bounds derived below;
- llama.cpp's greedy text equals the C engine's (./run -t 0);
- transformers loads the same file with the same logits;
- bad input gives one line naming the file, exit status 1, and no file under the final name.

    .venv/bin/python -m pytest tests/test_gguf.py -q
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

llama_cpp = pytest.importorskip("llama_cpp", reason="make test installs llama-cpp-python (requirements-test.txt)")
gguf = pytest.importorskip("gguf", reason="make venv installs gguf (requirements.txt)")

import export  # noqa: E402
from export import load_model_bin, write_gguf, write_model_bin  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from tokenizer import Tokenizer, export_tokenizer  # noqa: E402

# The other test files' fixtures and helpers (pytest puts tests/ on sys.path).
from test_engine import SHAPES, V3_EXTRA, spread_weights, story_model  # noqa: E402,F401 (story_model: a fixture)
from options import UserError  # noqa: E402
from test_export import HF_TOL, VOCAB, make_model, max_diff, run_export, save_checkpoint, train_tokenizer  # noqa: E402
from test_tokenizer import CONFIGS, EDGE_CASES, TEXT_CHUNKS, USER_SYMBOLS, corpus, train  # noqa: E402,F401 (corpus: a fixture)

ROOT = Path(__file__).resolve().parent.parent

# f32: the same float32 arithmetic as PyTorch in another order (logits here are O(1..40)).
F32_ATOL = 1e-4
GGML_F32 = 0  # ggml_type of an f32 KV cache (llama.cpp's default is f16)


# ----------------------------------------------------------------------------------------------
# llama.cpp

def silence_llama_cpp() -> None:
    """llama.cpp logs every load to stderr; the tests read their results, not its log."""
    @llama_cpp.llama_log_callback
    def _quiet(level, text, user_data):
        pass
    llama_cpp.llama_log_set(_quiet, None)
    silence_llama_cpp.callback = _quiet  # keep the ctypes callback alive


silence_llama_cpp()


def plain_cpu_buffers() -> None:
    """Load weights into llama.cpp's plain CPU buffers, not its "extra" repacking ones: on a CPU
    with AMX, the AMX buffer of a q8_0 matrix as small as the test models' (dim 64) crashes
    llama.cpp's decode (seen with llama-cpp-python 0.3.36 on a Sapphire Rapids Xeon). The
    tests check the file against llama.cpp's reference arithmetic, which this keeps."""
    default = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p
    llama_cpp.llama_cpp.llama_model_default_params = params


plain_cpu_buffers()


def llama_vocab(path: Path):
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def llama_logits(path: Path, ids: list[int], n_ctx: int) -> np.ndarray:
    """llama.cpp's logits (len(ids), vocab) for one batch, with an f32 KV cache and no flash
    attention, so that f32 files compute in f32 throughout."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                          n_threads=2, type_k=GGML_F32, type_v=GGML_F32, flash_attn=False, verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], dtype=np.float32)
    finally:
        llm.close()


def torch_logits(model: Transformer, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0].numpy()


def gguf_export(out: Path, source: Path, tok: str, dtype: str = "f32") -> Path:
    """The CLI, in this process: export.py OUT --version=gguf --dtype=D --checkpoint=... --tokenizer=..."""
    argv = [str(out), "--version=gguf", f"--dtype={dtype}", f"--checkpoint={source}", f"--tokenizer={tok}"]
    assert export.main(argv) == 0, argv
    return out


@pytest.fixture(scope="session")
def tok_files(tmp_path_factory) -> dict:
    """test_export's tokenizer (vocab 400, tinystories.py's settings) and its run.c .bin. Named as
    test_engine's fixture so that its story_model trains on this one (test_engine's own tokenizer
    uses sentencepiece's NFKC default, which a GGUF cannot hold)."""
    folder = tmp_path_factory.mktemp("gguf_tok")
    model = train_tokenizer(folder / "tok", normalization_rule_name="identity", remove_extra_whitespaces=False,
                            add_dummy_prefix=True)
    return {"model": model, "bin": Path(export_tokenizer(model, str(folder / "tok.bin")))}


@pytest.fixture(scope="session")
def tok_model(tok_files) -> str:
    return tok_files["model"]


# ----------------------------------------------------------------------------------------------
# (a) the tokenizer

# tinystories.py's sentencepiece settings (CONFIGS["id_bf"] is llama2.c's, the same ones), and
# the same without the dummy prefix (add_space_prefix false in the GGUF).
TOKENIZERS = {"ours": CONFIGS["id_bf"], "no_prefix": dict(CONFIGS["id_bf"], add_dummy_prefix=False)}


@pytest.fixture(scope="module")
def toks(tmp_path_factory, corpus) -> dict[str, tuple[str, Path]]:
    """name -> (sentencepiece .model, a GGUF holding it with a tiny model)."""
    folder = tmp_path_factory.mktemp("gguf_toks")
    out = {}
    for name, kw in TOKENIZERS.items():
        path = folder / f"{name}.model"
        train(corpus, path, **kw)
        model = make_model("tied", vocab_size=spm.SentencePieceProcessor(model_file=str(path)).vocab_size())
        out[name] = (str(path), folder / f"{name}.gguf")
        write_gguf(model, out[name][1], tokenizer_model=str(path))
    return out


def different_ids(sp, llm, strings: list[str]) -> list:
    return [(s, sp.encode(s, out_type=str), llm.tokenize(s.encode(), add_bos=False, special=False))
            for s in strings if sp.encode(s) != llm.tokenize(s.encode(), add_bos=False, special=False)]


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_llama_cpp_tokenizes_like_sentencepiece(name, toks, corpus):
    model, path = toks[name]
    sp = spm.SentencePieceProcessor(model_file=model)
    llm = llama_vocab(path)
    strings = EDGE_CASES + corpus + ["\n".join(corpus[i:i + 20]) for i in range(0, 400, 20)]
    bad = different_ids(sp, llm, strings)
    assert not bad, f"{len(bad)} of {len(strings)} differ; first: {bad[0]!r}"
    # The special ids, and BOS added (EOS not) as our engine feeds the model.
    assert (llm.token_bos(), llm.token_eos()) == (sp.bos_id(), sp.eos_id())
    assert llm.tokenize("从前".encode(), add_bos=True) == [sp.bos_id()] + sp.encode("从前")


# Arbitrary Unicode (test_tokenizer's chunks) plus what the brief names: rare CJK outside the BMP,
# emoji, runs of spaces, digits, newlines.
GGUF_TEXTS = st.lists(st.one_of(
    TEXT_CHUNKS,
    st.text(st.characters(min_codepoint=0x20000, max_codepoint=0x3134F), min_size=1, max_size=4),
    st.text(st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF), min_size=1, max_size=4),
    st.integers(1, 12).map(lambda n: " " * n),
    st.text(st.sampled_from("0123456789"), min_size=1, max_size=12),
    st.integers(1, 4).map(lambda n: "\n" * n),
), max_size=12).map("".join)


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_llama_cpp_tokenizes_like_sentencepiece_hypothesis(name, toks):
    model, path = toks[name]
    sp = spm.SentencePieceProcessor(model_file=model)
    llm = llama_vocab(path)

    @settings(max_examples=300, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(GGUF_TEXTS)
    def check(s):
        assert llm.tokenize(s.encode(), add_bos=False, special=False) == sp.encode(s), sp.encode(s, out_type=str)

    check()


# The tokenizers export.py refuses, each with what it measured in llama.cpp: these tokenize
# differently there (written anyway with strict_tokenizer=False to show it).
REFUSED = {
    "unigram": (dict(model_type="unigram"), "unigram"),
    "collapses_spaces": (dict(remove_extra_whitespaces=True), "remove_extra_whitespaces"),
    "nfkc": (dict(normalization_rule_name="nmt_nfkc"), "normalizes text"),
    "user_symbols": (dict(user_defined_symbols=USER_SYMBOLS), "user-defined"),
    "no_byte_fallback": (dict(byte_fallback=False), "byte_fallback"),
}


@pytest.fixture(scope="module")
def refused_toks(tmp_path_factory, corpus) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("refused")
    out = {}
    for name, (kw, _) in REFUSED.items():
        path = folder / f"{name}.model"
        lines = corpus[:600] if name == "unigram" else corpus  # unigram training is the slow one
        train(lines, path, **{**CONFIGS["id_bf"], **kw})
        out[name] = str(path)
    return out


@pytest.mark.parametrize("name", [n for n in REFUSED if n != "no_byte_fallback"])
def test_refused_tokenizers_do_tokenize_differently_in_llama_cpp(name, refused_toks, corpus, tmp_path):
    path = tmp_path / "t.gguf"
    sp = spm.SentencePieceProcessor(model_file=refused_toks[name])
    write_gguf(make_model("tied", vocab_size=sp.vocab_size()), path, tokenizer_model=refused_toks[name],
               strict_tokenizer=False)
    strings = EDGE_CASES + corpus[:1000]
    bad = different_ids(sp, llama_vocab(path), strings)
    assert len(bad) >= 10, f"only {len(bad)} of {len(strings)} differ: is the refusal still needed?"


def test_a_vocab_without_byte_fallback_crashes_llama_cpp(refused_toks, tmp_path):
    # llama.cpp spells a character outside the vocabulary in <0xXX> pieces; without them it
    # throws std::out_of_range through its C API, which aborts the process (sentencepiece
    # would give <unk>). So this runs in a child process.
    path = tmp_path / "t.gguf"
    tok = refused_toks["no_byte_fallback"]
    write_gguf(make_model("tied", vocab_size=spm.SentencePieceProcessor(model_file=tok).vocab_size()), path,
               tokenizer_model=tok, strict_tokenizer=False)
    code = ("import llama_cpp; llm = llama_cpp.Llama(model_path=%r, vocab_only=True, verbose=False); "
            "llm.tokenize('龘🙂'.encode(), add_bos=False); print('survived')" % str(path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, GGML_NO_BACKTRACE="1"))
    assert r.returncode != 0 and "survived" not in r.stdout, r.stdout + r.stderr[-2000:]


# ----------------------------------------------------------------------------------------------
# models: train.py checkpoints and llama2.c .bin files, each exported as f32, f16 and q8_0

# (shape in test_engine.SHAPES, seed); vocab fits the test tokenizer. mqa (dim 48, hidden 128)
# makes a mixed q8_0 file: rows of 48 values stay f16, w2's rows of 128 are q8_0; odd_gqa (dim 36,
# hidden 100) has no row a multiple of 32, tied_mha (dim 64) all.
SOURCES = {
    "ckpt_odd_gqa": ("odd_gqa", "pt"),  # untied, GQA 6:2, norm_eps 1e-3, rope_theta 500
    "ckpt_tied_mha": ("tied_mha", "pt"),
    "ckpt_mqa": ("mqa", "pt"),
    "v0_tied": ("tied_mha", 0),
    "v1_gqa_untied": ("odd_gqa", 1),
    "v2_int8": ("mqa", 2),
}
DTYPES = ("f32", "f16", "q8_0")


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tok_model) -> dict[str, dict]:
    """name -> {"model": the reference Transformer (for a .bin, what load_model_bin reads back),
    "gguf": {dtype: path}}. Checkpoints record the tokenizer hash as train.py does."""
    folder = tmp_path_factory.mktemp("gguf_models")
    tok = Tokenizer(tok_model)
    out = {}
    for k, (name, (shape, kind)) in enumerate(SOURCES.items()):
        extra = V3_EXTRA if kind == "pt" and shape == "odd_gqa" else {}
        torch.manual_seed(k)
        model = spread_weights(Transformer(ModelArgs(**{**SHAPES[shape], "vocab_size": VOCAB}, **extra)), seed=200 + k)
        if kind == "pt":
            src = folder / f"{name}.pt"
            save_checkpoint(model, src, tokenizer=tok_model)
            ckpt = torch.load(src, weights_only=True)
            ckpt["data"] = {"tokenizer_hash": tok.hash()}
            torch.save(ckpt, src)
        else:
            src = folder / f"{name}.bin"
            write_model_bin(model, src, version=kind)
            model = load_model_bin(src)
        files = {dtype: gguf_export(folder / f"{name}_{dtype}.gguf", src, tok_model, dtype) for dtype in DTYPES}
        out[name] = {"model": model, "gguf": files, "source": src}
    return out


def probe_ids(model: Transformer, seed: int) -> list[int]:
    """BOS, then random ids up to the full context: every position is compared."""
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(0, model.params.vocab_size, (model.params.max_seq_len - 1,), generator=g).tolist()


def test_gguf_metadata_and_tensors(sources, tok_model):
    """The keys llama.cpp reads, tensor names and storage types, and Q8_0 blocks as GGUF defines them."""
    from tokenizer import load_model_spec
    spec = load_model_spec(tok_model)
    for name, src in sources.items():
        p = src["model"].params
        tied = src["model"].output.weight is src["model"].tok_embeddings.weight
        for dtype, path in src["gguf"].items():
            r = gguf.GGUFReader(str(path))
            field = lambda key: r.fields[key].contents()  # noqa: E731
            assert field("general.architecture") == "llama"
            assert (field("llama.context_length"), field("llama.embedding_length"), field("llama.feed_forward_length"),
                    field("llama.block_count"), field("llama.attention.head_count"),
                    field("llama.attention.head_count_kv"), field("llama.rope.dimension_count"),
                    field("llama.vocab_size")) == \
                (p.max_seq_len, p.dim, p.hidden_dim, p.n_layers, p.n_heads, p.n_kv_heads, p.head_size, VOCAB)
            assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(p.norm_eps, rel=1e-6)
            assert field("llama.rope.freq_base") == pytest.approx(p.rope_theta, rel=1e-6)
            assert field("general.file_type") == {"f32": 0, "f16": 1, "q8_0": 7}[dtype]
            assert field("tokenizer.ggml.model") == "llama"
            assert field("tokenizer.ggml.tokens") == [piece for piece, _, _ in spec.pieces]
            assert field("tokenizer.ggml.token_type") == [t for _, _, t in spec.pieces]
            np.testing.assert_array_equal(np.float32(field("tokenizer.ggml.scores")),
                                          np.float32([s for _, s, _ in spec.pieces]))
            assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id"),
                    field("tokenizer.ggml.unknown_token_id")) == (1, 2, 0)
            assert "tokenizer.ggml.padding_token_id" not in r.fields  # pad_id=-1
            assert (field("tokenizer.ggml.add_bos_token"), field("tokenizer.ggml.add_eos_token"),
                    field("tokenizer.ggml.add_space_prefix")) == (True, False, spec.add_dummy_prefix)

            tensors = {t.name: t for t in r.tensors}
            want = {"token_embd.weight", "output_norm.weight"} | {
                f"blk.{i}.{n}.weight" for i in range(p.n_layers) for n in
                ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_down", "ffn_up")}
            assert set(tensors) == want | (set() if tied else {"output.weight"}), name
            for t in tensors.values():
                rows_of_32 = t.shape[0] % 32 == 0  # t.shape is ne: ne[0] is the row length
                expect = ("F32" if len(t.shape) == 1 or dtype == "f32" else
                          "Q8_0" if dtype == "q8_0" and rows_of_32 else "F16")
                assert t.tensor_type.name == expect, (name, dtype, t.name, list(t.shape))
                if t.tensor_type.name == "Q8_0":
                    check_q8_0_blocks(t, reference_tensor(src["model"], t.name))


def reference_tensor(model: Transformer, gguf_name: str) -> np.ndarray:
    parts = gguf_name.split(".")
    if parts[0] == "token_embd":
        return model.tok_embeddings.weight.detach().numpy()
    layer = model.layers[int(parts[1])]
    mod = {"attn_q": layer.attention.wq, "attn_k": layer.attention.wk, "attn_v": layer.attention.wv,
           "attn_output": layer.attention.wo, "ffn_gate": layer.feed_forward.w1, "ffn_down": layer.feed_forward.w2,
           "ffn_up": layer.feed_forward.w3}[parts[2]]
    return mod.weight.detach().numpy()


def check_q8_0_blocks(t, w: np.ndarray) -> None:
    """GGUF's Q8_0, written from the fp32 weights: per 32 values of a row an fp16 scale d then 32
    int8, d = fp16(max|x| / 127), |q * d - x| <= d/2 plus the scale's own rounding (127 * |d - d'|,
    at most 127 * 2^-11 d), and a full-range block (max |q| = 127)."""
    blocks = np.asarray(t.data).reshape(-1, 34)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)[:, 0]
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    x = w.astype(np.float32).reshape(-1, 32)
    assert blocks.shape[0] == x.shape[0], t.name
    np.testing.assert_allclose(d, np.abs(x).max(axis=1) / 127, rtol=2 ** -10, err_msg=t.name)
    err = np.abs(q * d[:, None] - x)
    assert (err <= d[:, None] * (0.5 + 127 * 2 ** -10) + 1e-12).all(), t.name
    assert (np.abs(q).max(axis=1) == 127).all(), t.name


# ----------------------------------------------------------------------------------------------
# (b) logits

# Error bounds for f16 and q8_0 against PyTorch's fp32 logits, as relative rms errors
# rms(llama.cpp - torch) / rms(torch), in the way tests/test_engine.py bounds its int8 path.
# llama.cpp rounds in two places per matrix product: the stored weights, and the product's input,
# which its CPU kernels convert to the weights' type first (f16 for f16 weights; Q8_0 blocks of 32
# for q8_0 weights). Each rounding perturbs a value by a relative error of at most e:
#   f16:  e = 2^-11 (round to nearest with an 11-bit significand);
#   q8_0: a block of 32 values becomes q * d with d = max|x| / 127, an error uniform in [-d/2, d/2]
#         of rms d / sqrt(12); since max|x| <= sqrt(32) rms(x), the relative rms error is at most
#         e = sqrt(32) / (127 sqrt(12)) (the fp16 scale adds 2^-11, negligible).
# A linear map passes a relative rms error in its input or weights on to its output's rms, so one
# product's output carries at most 2e. A logit depends on 4 n_layers + 2 rounded products in a
# chain (the embedding row; per layer the q/k/v products, wo, the w1/w3 products, w2; the
# classifier); adding those relative errors linearly (fully correlated, the worst case) while
# RMSNorm keeps the residual stream's scale gives rms(llama.cpp - torch) <= (4 L + 2) 2e rms(torch).
# With mixed files each stage is charged the coarsest type it holds. Measured: 5x to 7x inside.
ROUNDING = {"F16": 2 ** -11, "Q8_0": 32 ** 0.5 / (127 * 12 ** 0.5), "F32": 0.0}


def error_bound(path: Path, n_layers: int) -> float:
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    e = lambda *names: max(ROUNDING[types[n]] for n in names if n in types)  # noqa: E731
    stages = [e("token_embd.weight"), e("output.weight", "token_embd.weight")]
    for i in range(n_layers):
        b = f"blk.{i}."
        stages += [e(b + "attn_q.weight", b + "attn_k.weight", b + "attn_v.weight"), e(b + "attn_output.weight"),
                   e(b + "ffn_gate.weight", b + "ffn_up.weight"), e(b + "ffn_down.weight")]
    return 2 * sum(stages)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(SOURCES))
def test_llama_cpp_logits_match_pytorch(sources, name, dtype):
    src = sources[name]
    model, path = src["model"], src["gguf"][dtype]
    ids = probe_ids(model, seed=3)
    want = torch_logits(model, ids)
    got = llama_logits(path, ids, n_ctx=model.params.max_seq_len)
    argmax_agree = (got.argmax(-1) == want.argmax(-1)).mean()
    if dtype == "f32":
        assert np.abs(got - want).max() <= F32_ATOL, max_diff(torch.from_numpy(got), torch.from_numpy(want))
        assert argmax_agree == 1.0
        return
    rms = lambda a: float(np.sqrt(np.mean(a.astype(np.float64) ** 2)))  # noqa: E731
    rel = rms(got - want) / rms(want)
    bound = error_bound(path, model.params.n_layers)
    print(f"{name} {dtype}: relative rms error {rel:.3g}, bound {bound:.3g} ({bound / rel:.1f}x)")
    assert 0 < rel <= bound, f"relative rms error {rel:.3g} > bound {bound:.3g}; " + \
        max_diff(torch.from_numpy(got), torch.from_numpy(want))
    assert argmax_agree >= (0.9 if dtype == "f16" else 0.8), argmax_agree


# ----------------------------------------------------------------------------------------------
# (c) greedy text, llama.cpp against ./run

@pytest.fixture(scope="module")
def run_exe(tmp_path_factory) -> Path:
    exe = tmp_path_factory.mktemp("gguf_run") / "run"
    p = subprocess.run(["make", "-s", "run", f"BIN={exe}"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    return exe


def llama_greedy(path: Path, prompt: str, n: int, n_ctx: int) -> str:
    """llama.cpp's greedy continuation of BOS + prompt (its sampler at temperature 0), stopped
    like ./run at EOS or BOS or after n tokens, as text. A character cut off by the n-token limit
    becomes U+FFFD, as ./run prints it."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=2, type_k=GGML_F32, type_v=GGML_F32,
                          flash_attn=False, verbose=False)
    try:
        prompt_ids = llm.tokenize(prompt.encode(), add_bos=True)
        out = []
        for t in llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            if t in (llm.token_eos(), llm.token_bos()) or len(out) == n:
                break
            out.append(t)
        # The text of the whole sequence less the prompt's, so that the dummy-prefix space after
        # BOS is dropped as in the engine (llama-cpp-python drops it only from a text led by BOS).
        head, full = llm.detokenize(prompt_ids), llm.detokenize(prompt_ids + out)
        assert full.startswith(head), (head, full)
        return full[len(head):].decode("utf-8", errors="replace")
    finally:
        llm.close()


@pytest.mark.parametrize("fmt", ["v3", "v0", "v2_int8"])
def test_llama_cpp_greedy_text_equals_the_c_engine(story_model, tok_files, run_exe, fmt, tmp_path):
    """The briefly trained story model as a version 3 file (the checkpoint's export), a version 0
    file and a version 2 int8 file, each exported to an f32 GGUF. ./run reads the fp32 files
    directly; for the int8 one it reads a version 1 copy of the dequantized weights the GGUF holds
    (./run's int8 path would round activations, llama.cpp's f32 one does not)."""
    model = story_model["model"]
    if fmt == "v3":
        source = story_model["fp32"]  # records the tokenizer hash, which the export checks
    elif fmt == "v0":
        source = tmp_path / "story_v0.bin"
        write_model_bin(model, source, version=0)
    else:
        source = story_model["int8"]
    engine_file = source
    if fmt == "v2_int8":
        engine_file = tmp_path / "story_deq.bin"
        write_model_bin(load_model_bin(source), engine_file, version=1)
    path = gguf_export(tmp_path / "story.gguf", source, tok_files["model"])
    n_ctx = model.params.max_seq_len
    for prompt in ["从前", "Once upon a time", "", "小猫 and Tom 说："]:
        r = subprocess.run([str(run_exe), str(engine_file), "-z", str(tok_files["bin"]), "-t", "0", "-n", "30",
                            "-i", prompt], capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr.decode()
        ours = r.stdout.decode()[len(prompt):].removesuffix("\n")
        assert ours, "the engine wrote nothing"
        assert llama_greedy(path, prompt, 30, n_ctx) == ours, prompt


# ----------------------------------------------------------------------------------------------
# (d) transformers reads the same file

@pytest.mark.parametrize("name,dtype", [(n, "f32") for n in SOURCES] + [("ckpt_mqa", "q8_0")])
def test_transformers_loads_the_gguf_with_our_logits(sources, name, dtype):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate (requirements-test.txt)")
    src = sources[name]
    path = src["gguf"][dtype]
    model = src["model"]
    if dtype != "f32":
        model = model_with_gguf_weights(model, path)  # transformers dequantizes the file exactly
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                          dtype=torch.float32).eval()
    ids = probe_ids(model, seed=4)
    with torch.no_grad():
        got = hf(torch.tensor([ids])).logits[0]
    want = torch.from_numpy(torch_logits(model, ids))
    assert torch.allclose(got, want, rtol=0, atol=HF_TOL), max_diff(got, want)


def model_with_gguf_weights(model: Transformer, path: Path) -> Transformer:
    """A copy of model holding the weights the GGUF stores (dequantized with gguf-py)."""
    out = Transformer(model.params)
    out.load_state_dict(model.state_dict())
    with torch.no_grad():
        for t in gguf.GGUFReader(str(path)).tensors:
            if len(t.shape) == 2:
                w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(int(t.shape[1]), int(t.shape[0]))
                target = out.output.weight if t.name == "output.weight" else None
                if target is None:
                    target = torch.from_numpy(reference_tensor(out, t.name))  # shares the parameter's memory
                target.copy_(torch.from_numpy(w.astype(np.float32)))
    return out.eval()


# ----------------------------------------------------------------------------------------------
# the CLI: the Modelfile, and bad input

def test_cli_writes_a_modelfile_next_to_the_gguf(sources, run_exe):
    src = list(sources.values())[-1]
    path = src["gguf"][DTYPES[-1]]  # the folder's last export: its Modelfile names that file
    text = (path.parent / "Modelfile").read_text(encoding="utf-8")
    lines = [l for l in text.splitlines() if l and not l.startswith("#")]
    assert lines[0] == f"FROM ./{path.name}"
    assert 'TEMPLATE "{{ .Prompt }}"' in lines and 'PARAMETER stop "</s>"' in lines
    # The C engine's defaults, as its usage text states them; no repeat penalty; the model's context.
    usage = subprocess.run([str(run_exe)], capture_output=True, text=True).stderr
    default = {flag: re.search(rf"^  -{flag} .*\(default ([0-9.]+)\)", usage, re.M).group(1) for flag in "tpkn"}
    for line in (f"PARAMETER temperature {default['t']}", f"PARAMETER top_p {default['p']}",
                 f"PARAMETER top_k {default['k']}", f"PARAMETER num_predict {default['n']}",
                 "PARAMETER repeat_penalty 1.0", f"PARAMETER num_ctx {src['model'].params.max_seq_len}"):
        assert line in lines, (line, default)


def test_export_does_not_touch_the_model(tok_model, tmp_path):
    model = make_model("tied")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for dtype in DTYPES:
        write_gguf(model, tmp_path / f"m_{dtype}.gguf", dtype=dtype, tokenizer_model=tok_model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.output.weight is model.tok_embeddings.weight


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tok_model, refused_toks) -> dict:
    folder = tmp_path_factory.mktemp("bad")
    ckpt = folder / "ckpt.pt"
    save_checkpoint(make_model("tied"), ckpt)
    tiny_eps = folder / "tiny_eps.pt"  # 1e-50 is 0 as a float32: GGUF's epsilon cannot hold it
    save_checkpoint(make_model("tied", norm_eps=1e-50), tiny_eps)
    small = folder / "vocab300.pt"
    save_checkpoint(make_model("tied", vocab_size=300), small)
    hashed = folder / "other_tok.bin"  # a version 3 file trained with another tokenizer
    write_model_bin(make_model("tied"), hashed, version=3, tokenizer_hash=0xDEADBEEF)
    other_ckpt = folder / "other_tok.pt"
    save_checkpoint(make_model("tied"), other_ckpt)
    c = torch.load(other_ckpt, weights_only=True)
    c["data"] = {"tokenizer_hash": 0x12345678}
    torch.save(c, other_ckpt)
    refused_models = {}
    for name, path in refused_toks.items():
        refused_models[name] = folder / f"model_for_{name}.pt"
        vocab = spm.SentencePieceProcessor(model_file=path).vocab_size()
        save_checkpoint(make_model("tied", vocab_size=vocab), refused_models[name])
    return {"ckpt": ckpt, "tiny_eps": tiny_eps, "small": small, "hashed": hashed, "other_ckpt": other_ckpt,
            "refused_models": refused_models}


def test_cli_bad_input_is_one_line_exit_1_or_2_and_no_file(bad_inputs, tok_model, refused_toks, tmp_path, capsys):
    b = bad_inputs
    out = tmp_path / "m.gguf"
    tok = f"--tokenizer={tok_model}"
    cases = [
        ([str(out), "--version=gguf", f"--checkpoint={b['tiny_eps']}", tok], [str(out), "norm_eps=1e-50"]),
        ([str(out), "--version=gguf", f"--checkpoint={b['small']}", tok], [tok_model, "vocab_size is 300"]),
        ([str(out), "--version=gguf", f"--checkpoint={b['hashed']}", tok], [tok_model, "0xdeadbeef"]),
        ([str(out), "--version=gguf", f"--checkpoint={b['other_ckpt']}", tok], [tok_model, "0x12345678"]),
        ([str(tmp_path / "nowhere" / "m.gguf"), "--version=gguf", f"--checkpoint={b['ckpt']}", tok],
         [str(tmp_path / "nowhere"), "does not exist"]),
        ([str(out), "--version=gguf", "--dtype=int8", f"--checkpoint={b['ckpt']}", tok], ["--dtype=int8", "q8_0"]),
        ([str(out), "--version=gguf", f"--checkpoint={b['ckpt']}"], [str(out), "--tokenizer="]),  # none found
        ([str(out), "--version=ggfu", f"--checkpoint={b['ckpt']}", tok], ["ggfu", "gguf"]),
    ]
    for name, (_, needle) in REFUSED.items():
        cases.append(([str(out), "--version=gguf", f"--checkpoint={b['refused_models'][name]}",
                       f"--tokenizer={refused_toks[name]}"], [refused_toks[name], needle]))
    cwd = os.getcwd()
    os.chdir(tmp_path)  # so that no data/tok<N>.model of the checkout is found as a default
    try:
        for argv, needles in cases:
            usage_error = any(a in ("--dtype=int8", "--version=ggfu") for a in argv)  # exit 2: the command line
            assert export.main(argv) == (2 if usage_error else 1), argv
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and err.startswith("export.py: error: ") and "Traceback" not in err, err
            for needle in needles:
                assert needle in err, (needle, err)
    finally:
        os.chdir(cwd)
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)  # no .gguf, no Modelfile, no temporary file
    # And as a real process: exit status 1, one line on stderr naming the tokenizer.
    r = run_export(out, "--version=gguf", f"--checkpoint={b['refused_models']['unigram']}",
                   f"--tokenizer={refused_toks['unigram']}", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and refused_toks["unigram"] in r.stderr, r.stderr
    assert os.listdir(tmp_path) == []


def test_a_failed_write_leaves_the_old_file(tok_model, tmp_path, monkeypatch):
    """An export that dies halfway (here: the tensor data) leaves neither a partial file under the
    final name nor a temporary one; an existing file there stays as it was."""
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    model = make_model("tied")

    def broken(self, *a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(UserError, match=f"^{out}: no space left on device$"):
        write_gguf(model, out, tokenizer_model=tok_model)
    assert out.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["m.gguf"]
