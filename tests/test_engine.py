"""Tests for the C engine (run.c): logits parity with model.py, greedy generation, the CLI, and
one-line errors on bad files. Every test runs against four builds: the plain -O3 build, the
address+undefined sanitizer build (leak detection on; any sanitizer report fails the test), the
native build users run (`make runomp`: -march=native, OpenMP, the AVX-512/VNNI kernels where
the CPU has them), and the sanitizers on the native kernels. tests/engine_kernels.c checks those fast kernels against their plain-C
references on odd sizes.

    .venv/bin/python -m pytest tests/test_engine.py -q
    .venv/bin/python -m pytest tests/test_engine.py -q -k plain      # only the plain build

The C side of the parity tests is tests/engine_logits.c, which #includes run.c and writes the
logits of every position (token-by-token decode path and block prefill path) to a file.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from bench import has_avx512_bf16
from export import load_model_bin, pick_group_size, write_model_bin
from model import Attention, ModelArgs, Transformer
from tokenizer import Tokenizer, export_tokenizer

ROOT = Path(__file__).resolve().parent.parent

# fp32: both sides do the same float32 arithmetic in different orders; differences are a few ulps
# of the largest intermediate values (logits here are O(1..10)).
FP32_ATOL = 1e-4
# int8, C against a float64 emulation of exactly its arithmetic (dequantized weights, activations
# fake-quantized per group with the same round-half-even): the two differ only by float32
# rounding, except where an activation lands within a rounding error of a .5 boundary and the two
# sides round it to neighbouring integers. Such a flip in a cached key or value shifts every later
# position a little (sharply peaked random attention can make that a few percent), so the tight
# tolerance must hold at most positions, not all (INT8_EMULATION_MIN_CLOSE), and a bug fails
# everywhere. That check runs with an fp32 KV cache (run.c's -c f32). int8 models cache keys and
# values in fp16 by default; the emulation can round them the same way (to float32, then to fp16),
# but then a flip needs only a key a few float32 ulps off an fp16 rounding boundary (about one
# element in 4,000), and one such flip in these peaked models moves later logits by up to a third
# of the whole fp16 effect. So with the fp16 cache the first position must agree tightly and the
# C logits must be closer to the fp16-rounding emulation than to the unrounded one (they would
# not be if the cache kept more precision or rounded differently, e.g. truncated or to bf16);
# tests/engine_kernels.c checks the conversions bit for bit.
INT8_EMULATION_RTOL = 1e-4
INT8_EMULATION_MIN_CLOSE = 0.75

VERSIONS = [(0, "fp32"), (1, "fp32"), (3, "fp32"), (2, "int8"), (3, "int8"), (3, "bf16")]
SANFLAGS = "-g -O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined"
# name: make target and variable overrides. "nativesan" puts the sanitizers on the SIMD kernels.
BUILDS = {"plain": ("run", []), "san": ("runsan", []), "native": ("runomp", []),
          "nativesan": ("runsan", [f"SANFLAGS={SANFLAGS} -march=native"])}
SAN_ENV = {"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:exitcode=99",
           "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1:exitcode=98"}
SAN_MARKERS = ("Sanitizer", "runtime error", "Segmentation", "core dumped", "AddressSanitizer")

STORIES = [
    "从前有一只小猫，它很喜欢在花园里玩。有一天，小猫看见了一只蝴蝶。",
    "小兔子和小熊是好朋友。他们每天一起去河边钓鱼，一起唱歌。",
    "Once upon a time, there was a little girl named Lily. She loved to play in the park.",
    "One day, Tom found a big red ball. He was very happy and shared it with his friends.",
    "妈妈说：“天黑了，我们回家吧。”小明点点头，拉着妈妈的手回家了。",
    "The sun was warm and the birds sang. Ben and Mia ran to the tree to see the nest.",
]


# ----------------------------------------------------------------------------------------------
# builds

class Engine:
    def __init__(self, name: str, run: Path, harness: Path):
        self.name, self.run_path, self.harness_path = name, run, harness
        self.env = dict(os.environ, **(SAN_ENV if name.endswith("san") else {}))
        # Two threads exercise the OpenMP split; a passive wait policy keeps a busy CI box from
        # turning every barrier into a spin against a descheduled thread.
        self.env.update(OMP_NUM_THREADS="2", OMP_WAIT_POLICY="passive")

    def _call(self, argv, *, stdin=None, timeout=60) -> subprocess.CompletedProcess:
        p = subprocess.run([str(a) for a in argv], input=stdin, capture_output=True, env=self.env,
                           timeout=timeout)
        err = p.stderr.decode("utf-8", "replace")
        for marker in SAN_MARKERS:
            assert marker not in err, f"{self.name} build reported a problem:\n{err}"
        return p

    def run(self, *args, stdin=None, timeout=60) -> subprocess.CompletedProcess:
        return self._call([self.run_path, *args], stdin=stdin, timeout=timeout)

    def harness(self, *args) -> subprocess.CompletedProcess:
        p = self._call([self.harness_path, *args])
        assert p.returncode == 0, p.stderr.decode("utf-8", "replace")
        return p


@pytest.fixture(scope="session", params=list(BUILDS))
def engine(request, tmp_path_factory) -> Engine:
    out = tmp_path_factory.mktemp(f"build_{request.param}")
    target, overrides = BUILDS[request.param]
    for binary, src in ((out / "run", "run.c"), (out / "engine_logits", "tests/engine_logits.c"),
                        (out / "engine_kernels", "tests/engine_kernels.c")):
        p = subprocess.run(["make", "-s", target, f"BIN={binary}", f"SRC={src}", *overrides], cwd=ROOT,
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "warning" not in p.stderr, p.stderr
    engine = Engine(request.param, out / "run", out / "engine_logits")
    engine.kernels_path = out / "engine_kernels"
    return engine


# ----------------------------------------------------------------------------------------------
# models and tokenizers

def spread_weights(model: Transformer, seed: int) -> Transformer:
    """Re-draw the weights at a scale where attention is far from uniform and logits are O(1..10),
    so that parity tests see real arithmetic rather than values near zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                std = 1.0 if "tok_embeddings" in name else 1.5 / p.shape[1] ** 0.5
                p.copy_(torch.randn(p.shape, generator=g) * std)
            else:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model.eval()


SHAPES = {
    # GQA, separate classifier, nothing a multiple of 8 or 16 (group size becomes 4)
    "odd_gqa": dict(dim=36, hidden_dim=100, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=301,
                    max_seq_len=80, tie_embeddings=False),
    # plain multi-head attention, shared classifier, group size 64
    "tied_mha": dict(dim=64, hidden_dim=192, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=320,
                     max_seq_len=96, tie_embeddings=True),
    # one kv head for all query heads, three layers
    "mqa": dict(dim=48, hidden_dim=128, n_layers=3, n_heads=4, n_kv_heads=1, vocab_size=257,
                max_seq_len=72, tie_embeddings=False),
}
# Version 3 records norm_eps and rope_theta; this shape checks that run.c uses them.
V3_EXTRA = dict(norm_eps=1e-3, rope_theta=500.0)


def bin_path(folder: Path, shape: str, version: int, dtype: str) -> Path:
    return folder / f"{shape}_v{version}_{dtype}.bin"


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """shape -> {(version, dtype): path}, plus the seed of each random model."""
    folder = tmp_path_factory.mktemp("models")
    files = {}
    for k, (shape, kw) in enumerate(SHAPES.items()):
        torch.manual_seed(k)
        files[shape] = {}
        for version, dtype in VERSIONS:
            extra = V3_EXTRA if (version == 3 and shape == "odd_gqa") else {}
            model = spread_weights(Transformer(ModelArgs(**kw, **extra)), seed=100 + k)
            path = bin_path(folder, shape, version, dtype)
            write_model_bin(model, path, version=version, dtype=dtype)
            files[shape][(version, dtype)] = path
    return files


@pytest.fixture(scope="session")
def tok_files(tmp_path_factory):
    """A byte-fallback BPE sentencepiece model, exported in our format and the legacy one."""
    folder = tmp_path_factory.mktemp("tok")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(STORIES * 30), model_prefix=str(folder / "tok"), vocab_size=400,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, minloglevel=2)
    model = str(folder / "tok.model")
    ours = export_tokenizer(model, str(folder / "tok.bin"))
    legacy = export_tokenizer(model, str(folder / "tok_legacy.bin"), legacy=True)
    return {"model": model, "bin": Path(ours), "legacy": Path(legacy)}


def train_briefly(model: Transformer, tok: Tokenizer, stories: list[str], steps: int, T: int = 48) -> float:
    """AdamW (lr 1e-2) on random T-token windows of the stories, each between BOS and EOS, so a
    tiny model's greedy text has structure; leaves the model in eval mode and returns the last
    step's loss."""
    ids = []
    for s in stories:
        ids += tok.encode(s, bos=True, eos=True)
    data = torch.tensor(ids)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add waiting, worst on a busy box
    for _ in range(steps):
        starts = torch.randint(0, len(data) - T - 1, (8,), generator=g)
        x = torch.stack([data[s:s + T] for s in starts])
        y = torch.stack([data[s + 1:s + T + 1] for s in starts])
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    model.eval()
    return loss.item()


@pytest.fixture(scope="session")
def story_model(tmp_path_factory, tok_files):
    """A GQA model briefly trained on STORIES with the test tokenizer (so its greedy text has
    structure), exported as version 3 fp32 with the tokenizer hash, and as version 2 int8."""
    tok = Tokenizer(tok_files["model"])
    torch.manual_seed(7)
    args = ModelArgs(dim=48, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2,
                     vocab_size=tok.vocab_size, max_seq_len=64)
    model = Transformer(args)
    loss = train_briefly(model, tok, STORIES, steps=60)
    folder = tmp_path_factory.mktemp("story")
    fp32 = folder / "story.bin"
    write_model_bin(model, fp32, version=3, tokenizer_hash=tok.hash())
    int8 = folder / "story_q8.bin"
    write_model_bin(model, int8, version=2)
    return {"model": model, "fp32": fp32, "int8": int8, "tok": tok, "loss": loss}


# ----------------------------------------------------------------------------------------------
# int8 reference

def emulate_kv(model: Transformer, kv: str) -> None:
    """Keys and values rounded as run.c's fp16 cache stores them (kv="f16"), or not at all ("f32")."""
    for m in model.modules():
        if isinstance(m, Attention):
            m.kv_round = (lambda t: t.float().half().to(t.dtype)) if kv == "f16" else None


def emulate_int8(model: Transformer, group_size: int, kv: str = "f16"):
    """Forward hooks that make every nn.Linear see its input the way run.c's int8 path does:
    quantized per group of group_size (scale = max|x| / 127, round half to even), then dequantized.
    The model must already hold the dequantized weights (load_model_bin does that). With kv="f16"
    (run.c's default for int8 models) keys and values are rounded as its fp16 cache stores them:
    to float32, the precision run.c computes them in, then to fp16."""
    emulate_kv(model, kv)

    def hook(_module, inputs):
        (x,) = inputs
        g = x.double().reshape(*x.shape[:-1], -1, group_size)
        scale = g.abs().amax(-1, keepdim=True) / 127.0
        scale = scale.float().double()  # run.c stores the scale as float32
        q = torch.where(scale > 0, torch.round(g / torch.where(scale > 0, scale, 1.0)), 0.0)
        return ((q * scale).reshape(x.shape).to(x.dtype),)

    hooks = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    # removed like the hooks: the same model then runs without KV rounding
    return hooks + [types.SimpleNamespace(remove=lambda: emulate_kv(model, "f32"))]


def torch_logits(model: Transformer, ids: list[int], *, double: bool = False) -> np.ndarray:
    with torch.no_grad():
        m = model.double() if double else model
        out = m(torch.tensor([ids]))[0][0].float().numpy()
        if double:
            model.float()
    return out


def c_logits(engine: Engine, path: Path, ids: list[int], mode: str, tmp_path: Path, kv: str = "") -> np.ndarray:
    """Every position's logits; kv "f32" or "f16" sets the KV cache, "" leaves run.c's default."""
    out = tmp_path / f"logits_{mode}_{kv}.f32"
    engine.harness(mode, path, " ".join(map(str, ids)), out, *([kv] if kv else []))
    return np.fromfile(out, dtype=np.float32).reshape(len(ids), -1)


def cut_at_stop(ids: list[int]) -> list[int]:
    """ids up to and including the first EOS (2) or BOS (1): run.c stops there, model.generate
    does not."""
    for i, t in enumerate(ids):
        if t in (1, 2):
            return ids[:i + 1]
    return ids


def describe_diff(got: np.ndarray, want: np.ndarray) -> str:
    d = np.abs(got - want)
    pos, tok = np.unravel_index(int(np.argmax(d)), d.shape)
    return f"max |diff| {d.max():.3g} at position {pos}, token {tok} (C {got[pos, tok]:.6g}, torch {want[pos, tok]:.6g})"


# ----------------------------------------------------------------------------------------------
# kernels and logits parity

def test_fast_kernels_match_reference(engine):
    # fp32 within an FMA-rounding bound, int8 bit for bit, on odd sizes and group sizes (in the
    # plain and sanitizer builds the "fast" kernels are the references themselves).
    p = engine._call([engine.kernels_path, "check"], timeout=120)
    assert p.returncode == 0, p.stdout.decode() + p.stderr.decode()
    assert b"ok: 0 failure(s)" in p.stdout


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("version,dtype", VERSIONS, ids=[f"v{v}-{d}" for v, d in VERSIONS])
def test_logits_match_pytorch(engine, models, shape, version, dtype, tmp_path):
    path = models[shape][(version, dtype)]
    ref = load_model_bin(path)  # the file's weights (dequantized for int8), eps and theta
    p = ref.params
    g = torch.Generator().manual_seed(3)
    n = min(p.max_seq_len, 70)  # three prefill blocks in the harness (32 tokens each)
    ids = [1] + torch.randint(0, p.vocab_size, (n - 1,), generator=g).tolist()
    step = c_logits(engine, path, ids, "step", tmp_path)
    block = c_logits(engine, path, ids, "block", tmp_path)
    assert np.isfinite(step).all()
    if dtype == "bf16":
        check_bf16_logits(engine, ref, ids, step, block)
        return
    # Prefill and token-by-token decoding share every dot product's summation order.
    assert np.array_equal(step, block), "block prefill differs from step decode: " + describe_diff(block, step)
    if dtype == "fp32":
        want = torch_logits(ref, ids)
        assert np.abs(step - want).max() <= FP32_ATOL, describe_diff(step, want)
        assert (step.argmax(-1) == want.argmax(-1)).all()
        return
    gs = pick_group_size(p.dim, p.hidden_dim)
    # Tight: the exact arithmetic of run.c's int8 path, in float64, with an fp32 KV cache; then the
    # default fp16 cache against the same emulation with and without fp16 rounding.
    step32 = c_logits(engine, path, ids, "step", tmp_path, kv="f32")
    assert np.array_equal(step32, c_logits(engine, path, ids, "block", tmp_path, kv="f32"))
    emulated = {}
    for kv in ("f32", "f16"):
        hooks = emulate_int8(ref, gs, kv)
        emulated[kv] = torch_logits(ref, ids, double=True)
        for h in hooks:
            h.remove()
    scale = np.abs(emulated["f32"]).max()
    close = np.abs(step32 - emulated["f32"]).max(-1) <= INT8_EMULATION_RTOL * scale  # (positions,)
    assert close[0], describe_diff(step32[:1], emulated["f32"][:1])
    assert close.mean() >= INT8_EMULATION_MIN_CLOSE, describe_diff(step32, emulated["f32"])
    assert np.abs(step[0] - emulated["f16"][0]).max() <= INT8_EMULATION_RTOL * scale, \
        "fp16 cache: " + describe_diff(step[:1], emulated["f16"][:1])
    rms = lambda a: float(np.sqrt(np.mean(a.astype(np.float64) ** 2)))  # noqa: E731
    assert rms(step - emulated["f16"]) < rms(step - emulated["f32"]), "fp16 cache does not round like fp16"
    # Loose: against PyTorch on the same (dequantized) weights with fp32 activations. The int8
    # path rounds each group of gs activations to q * s with s = max|x_g| / 127; the rounding
    # error is uniform in [-s/2, s/2], rms s / sqrt(12). Since max|x_g| <= sqrt(gs) * rms(x_g),
    # one quantized input has a relative rms error of at most e = sqrt(gs) / (127 * sqrt(12)), and
    # a linear map passes that on to its output's rms. A logit's computation quantizes
    # 4 * n_layers + 1 inputs (attention's q/k/v input, wo's, w1/w3's, w2's per layer, and the
    # classifier's). Adding those relative errors linearly (fully correlated, the worst case) while
    # RMSNorm keeps the residual stream's scale gives rms(C - torch) <= (4 L + 1) * e * rms(torch).
    exact = torch_logits(ref, ids)
    e = gs ** 0.5 / (127 * 12 ** 0.5)
    bound = (4 * p.n_layers + 1) * e
    rel = np.sqrt(np.mean((step - exact) ** 2)) / np.sqrt(np.mean(exact ** 2))
    assert rel <= bound, f"relative rms error {rel:.3g} > bound {bound:.3g}; " + describe_diff(step, exact)
    assert (step.argmax(-1) == exact.argmax(-1)).mean() >= 0.8


def check_bf16_logits(engine, ref: Transformer, ids: list[int], step: np.ndarray, block: np.ndarray) -> None:
    """bf16 weights: decoding widens each weight to fp32, so it is the fp32 computation on the
    rounded weights (ref holds them) and meets the fp32 tolerance. Prefill blocks of 8 tokens or
    more on a CPU with AVX512-BF16 (the native builds) also round the activations to bf16 for
    vdpbf16ps: a relative error of at most 2^-9 per input, passed on through 4 L + 1 products
    (as for int8 below), so rms(C - torch) <= (4 L + 1) * 2^-9 * rms(torch); elsewhere prefill
    is the decode arithmetic, bit for bit."""
    want = torch_logits(ref, ids)
    assert np.abs(step - want).max() <= FP32_ATOL, describe_diff(step, want)
    assert (step.argmax(-1) == want.argmax(-1)).all()
    if engine.name.startswith("native") and has_avx512_bf16():
        assert not np.array_equal(step, block), "the vdpbf16ps prefill did not run"
        bound = (4 * ref.params.n_layers + 1) * 2.0 ** -9
        rel = np.sqrt(np.mean((block - want) ** 2)) / np.sqrt(np.mean(want ** 2))
        assert rel <= bound, f"relative rms error {rel:.3g} > bound {bound:.3g}; " + describe_diff(block, want)
        assert (block.argmax(-1) == want.argmax(-1)).mean() >= 0.9
    else:
        assert np.array_equal(step, block), "block prefill differs from step decode: " + describe_diff(block, step)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("version,dtype", [(1, "fp32"), (3, "int8"), (3, "bf16")], ids=["v1-fp32", "v3-int8", "v3-bf16"])
def test_logits_do_not_depend_on_thread_count(engine, models, shape, version, dtype, tmp_path):
    # Decoding runs in one parallel region whose threads each norm and quantize their own copy of
    # the inputs; prefill splits rows among threads differently. Any thread count must give the
    # same bits (only the OpenMP build has threads).
    if engine.name != "native":
        pytest.skip("threads only in the OpenMP build")
    path = models[shape][(version, dtype)]
    ids = " ".join(map(str, [1] + list(range(3, 70))))
    outs = []
    for threads, mode in (("1", "step"), ("3", "step"), ("2", "block"), ("3", "block")):
        out = tmp_path / f"logits_{mode}_{threads}.f32"
        env = dict(engine.env, OMP_NUM_THREADS=threads)
        p = subprocess.run([str(engine.harness_path), mode, str(path), ids, str(out)], env=env, capture_output=True)
        assert p.returncode == 0, p.stderr.decode()
        outs.append(out.read_bytes())
    if dtype == "bf16":  # prefill may round activations for vdpbf16ps: each path against itself
        assert outs[0] == outs[1] and outs[2] == outs[3]
    else:
        assert all(o == outs[0] for o in outs[1:])


@pytest.mark.parametrize("shape", ["odd_gqa", "mqa"])
@pytest.mark.parametrize("version,dtype", [(1, "fp32"), (3, "int8"), (3, "bf16")],
                         ids=["v1-fp32", "v3-int8", "v3-bf16"])
def test_greedy_matches_pytorch(engine, models, shape, version, dtype):
    path = models[shape][(version, dtype)]
    ref = load_model_bin(path)
    p = ref.params
    hooks = emulate_int8(ref, pick_group_size(p.dim, p.hidden_dim)) if dtype == "int8" else []
    prompt = [1, 5, 17, 42]
    n_new = 40
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt]), n_new, temperature=0.0)[0, len(prompt):].tolist()
    for h in hooks:
        h.remove()
    want = cut_at_stop(want)
    got = engine.harness("greedy", path, " ".join(map(str, prompt)), n_new).stdout.decode().split()
    assert [int(t) for t in got] == want


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 4, 1.0),
                                                     (1.3, 0, 0.8), (1.0, 6, 0.7), (2.0, 0, 0.3)])
def test_sampler_distribution(engine, temperature, top_k, top_p):
    """run.c's sampler draws from the distribution model.sample_next defines (chi-square test)."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(12, generator=g) * 1.5
    logits[3] = logits[7]  # a tie: both keep equal shares
    draws = 20000 if engine.name.endswith("san") else 40000
    p = engine._call([engine.kernels_path, "sample", temperature, top_k, top_p, draws,
                      *[f"{v:.9g}" for v in logits.tolist()]])
    counts = np.array([int(c) for c in p.stdout.split()])
    # The exact distribution: sample_next's masking, as probabilities.
    scaled = logits / temperature
    if top_k:
        kth = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, -1)
    if top_p < 1.0:
        sp, order = torch.sort(probs, descending=True)
        sp = sp.masked_fill(torch.cumsum(sp, -1) - sp >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sp)
        probs = probs / probs.sum()
    expected = probs.double().numpy() * draws
    assert (counts[expected == 0] == 0).all(), (counts, expected)
    seen = expected > 0
    chi2 = (((counts[seen] - expected[seen]) ** 2) / expected[seen]).sum()
    # 11 degrees of freedom at most: chi2 > 40 has probability < 1e-4 under the null.
    assert chi2 < 40, (chi2, counts, expected.round(1))


# ----------------------------------------------------------------------------------------------
# generation through the CLI

def is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def greedy_text(story_model, prompt: str, n_new: int, *, hooks_gs: int = 0, model=None) -> str:
    """What ./run -t 0 should print after the prompt: sentencepiece's decoding of PyTorch's greedy
    continuation (stopped at EOS/BOS), taken as the difference of two decodes so that spaces at the
    seam come out as sentencepiece prints them."""
    tok = story_model["tok"]
    model = model or story_model["model"]
    ids = tok.encode(prompt, bos=True)
    n_new = min(n_new, model.params.max_seq_len - len(ids) + 1)  # the last token is never fed back
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), n_new, temperature=0.0)[0, len(ids):].tolist()
    for i, t in enumerate(out):
        if t in (tok.eos_id, tok.bos_id):
            out = out[:i]
            break
    if not prompt:
        return tok.decode(out)
    head = tok.decode(ids[1:])
    full = tok.decode(ids[1:] + out)
    assert full.startswith(head), (head, full)
    return full[len(head):]


@pytest.mark.parametrize("prompt", ["从前", "Once upon a time", "", "小猫 and Tom 🙂 说："])
def test_cli_greedy_text(engine, story_model, tok_files, prompt):
    p = engine.run(story_model["fp32"], "-z", tok_files["bin"], "-t", "0", "-n", "30", "-i", prompt)
    assert p.returncode == 0, p.stderr.decode()
    out = p.stdout
    assert is_utf8(out)
    assert out.startswith(prompt.encode()), out  # echoed byte for byte
    assert out.endswith(b"\n")
    want = greedy_text(story_model, prompt, 30)
    assert out[len(prompt.encode()):-1].decode() == want
    assert b"tok/s" in p.stderr and b"tok/s" not in out


def test_cli_legacy_tokenizer_and_int8(engine, story_model, tok_files):
    # The legacy tokenizer format prints the same text for the same ids (no normalizer here).
    a = engine.run(story_model["fp32"], "-z", tok_files["bin"], "-t", "0", "-n", "20", "-i", "小兔子")
    b = engine.run(story_model["fp32"], "-z", tok_files["legacy"], "-t", "0", "-n", "20", "-i", "小兔子")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout
    q = engine.run(story_model["int8"], "-z", tok_files["bin"], "-t", "0", "-n", "20", "-i", "小兔子")
    assert q.returncode == 0, q.stderr.decode()
    assert q.stdout.startswith("小兔子".encode()) and is_utf8(q.stdout)
    # Either KV cache precision for either weight type; on this trained model fp16 rounding of
    # keys and values does not change the greedy story.
    for model, story in ((story_model["int8"], q.stdout), (story_model["fp32"], a.stdout)):
        for kv in ("f16", "f32"):
            r = engine.run(model, "-z", tok_files["bin"], "-t", "0", "-n", "20", "-i", "小兔子", "-c", kv)
            assert r.returncode == 0, r.stderr.decode()
            assert r.stdout == story, (model, kv)


def test_cli_text_does_not_depend_on_threads(engine, story_model, tok_files):
    # On a model this small the decoder times one thread against all of them and may switch to
    # one mid-story (decode_tuner); the sampled text must not change, greedy or not.
    if engine.name != "native":
        pytest.skip("threads only in the OpenMP build")
    for dtype in ("fp32", "int8"):
        outs = []
        for threads in ("1", "2", "3"):
            env = dict(engine.env, OMP_NUM_THREADS=threads)
            p = subprocess.run([str(engine.run_path), str(story_model[dtype]), "-z", str(tok_files["bin"]),
                                "-t", "0.8", "-s", "5", "-n", "120", "-i", "小兔子"], env=env, capture_output=True)
            assert p.returncode == 0, p.stderr.decode()
            outs.append(p.stdout)
        assert outs[0] == outs[1] == outs[2], dtype


def test_cli_sampling_options(engine, story_model, tok_files):
    base = [story_model["fp32"], "-z", tok_files["bin"], "-n", "25", "-i", "Once"]
    greedy = engine.run(*base, "-t", "0").stdout
    # top-k 1 and a tiny top-p both leave only the most likely token.
    assert engine.run(*base, "-t", "1.0", "-k", "1", "-s", "5").stdout == greedy
    assert engine.run(*base, "-t", "1.0", "-p", "1e-6", "-s", "5").stdout == greedy
    # Same seed, same text; sampling at high temperature with other seeds gives other text.
    hot = [*base, "-t", "2.0", "-p", "1.0"]
    s1 = engine.run(*hot, "-s", "11").stdout
    assert engine.run(*hot, "-s", "11").stdout == s1
    others = {engine.run(*hot, "-s", str(s)).stdout for s in (12, 13, 14)}
    assert others - {s1}, "different seeds all produced the same sample"
    for out in others | {s1}:
        assert out.startswith(b"Once") and is_utf8(out)
    # top-k and top-p together and apart: valid text, the same for the same seed.
    for flags in (["-k", "3"], ["-p", "0.5"], ["-k", "20", "-p", "0.8"]):
        runs = [engine.run(*base, "-t", "1.5", *flags, "-s", "9").stdout for _ in range(2)]
        assert runs[0] == runs[1] and runs[0].startswith(b"Once") and is_utf8(runs[0])


def test_cli_stops_at_steps_and_max_seq_len(engine, story_model, tok_files):
    base = [story_model["fp32"], "-z", tok_files["bin"], "-t", "0", "-i", "从前"]
    five = engine.run(*base, "-n", "5")
    assert five.returncode == 0
    assert five.stdout[len("从前".encode()):-1].decode() == greedy_text(story_model, "从前", 5)
    # -n 0 and a huge -n both run to max_seq_len (64) at the latest, without error.
    full = engine.run(*base, "-n", "0")
    assert full.returncode == 0
    assert full.stdout[len("从前".encode()):-1].decode() == greedy_text(story_model, "从前", 64)
    assert engine.run(*base, "-n", "100000").stdout == full.stdout


def test_cli_stops_at_eos(engine, tmp_path, tok_files):
    """A model whose classifier always prefers EOS prints the prompt and nothing else."""
    tok = Tokenizer(tok_files["model"])
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, hidden_dim=64, n_layers=1, n_heads=2, vocab_size=tok.vocab_size,
                                  max_seq_len=32, tie_embeddings=False)).eval()
    with torch.no_grad():
        model.tok_embeddings.weight[:, 0] = 5.0  # residual dim 0 stays large and positive
        model.output.weight.zero_()
        model.output.weight[tok.eos_id, 0] = 10.0
    path = tmp_path / "eos.bin"
    write_model_bin(model, path, version=1)
    p = engine.run(path, "-z", tok_files["bin"], "-t", "0", "-i", "小猫")
    assert p.returncode == 0
    assert p.stdout == "小猫\n".encode()
    assert engine.harness("greedy", path, "1 5 6", 10).stdout.split() == [b"2"]


def test_default_tokenizer_lookup(engine, story_model, tok_files, tmp_path):
    vocab = story_model["tok"].vocab_size
    want = engine.run(story_model["fp32"], "-z", tok_files["bin"], "-t", "0", "-n", "8", "-i", "从前").stdout
    for name in (f"tok{vocab}.bin", "tokenizer.bin"):
        d = tmp_path / name.replace(".", "_")
        d.mkdir()
        shutil.copy(story_model["fp32"], d / "m.bin")
        shutil.copy(tok_files["bin"], d / name)
        p = engine.run(d / "m.bin", "-t", "0", "-n", "8", "-i", "从前")
        assert p.returncode == 0, p.stderr.decode()
        assert p.stdout == want
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(story_model["fp32"], lonely / "m.bin")
    p = engine.run(lonely / "m.bin", "-n", "4")
    assert p.returncode != 0
    err = p.stderr.decode().strip()
    assert "\n" not in err and "m.bin" in err and f"tok{vocab}.bin" in err and "-z" in err


@pytest.mark.parametrize("text", ["从前", "Once upon a time, Lily 说：“你好！”", "", "  两个  空格 🙂"])
def test_encode_mode_matches_sentencepiece(engine, tok_files, text):
    sp = spm.SentencePieceProcessor(model_file=tok_files["model"])
    p = engine.run("-m", "encode", "-z", tok_files["bin"], "-i", text)
    assert p.returncode == 0, p.stderr.decode()
    assert [int(t) for t in p.stdout.split()] == sp.encode(text)


def test_chat_mode_ends_at_eof(engine, story_model, tok_files):
    p = engine.run(story_model["fp32"], "-z", tok_files["bin"], "-m", "chat", "-t", "0", "-n", "8",
                   stdin="讲故事\n小猫\n".encode(), timeout=30)
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout.count(b"Assistant: ") == 2 and is_utf8(p.stdout)
    # A system prompt that does not fit the 64-token context ends the chat with a message.
    p = engine.run(story_model["fp32"], "-z", tok_files["bin"], "-m", "chat", "-t", "0",
                   "-y", "你是一个讲故事的人。" * 5, stdin="讲故事\n".encode(), timeout=30)
    assert p.returncode == 0 and b"context full" in p.stderr
    p = engine.run(story_model["fp32"], "-z", tok_files["bin"], "-m", "chat", stdin=b"", timeout=30)
    assert p.returncode == 0 and p.stdout == b""


# ----------------------------------------------------------------------------------------------
# errors

@pytest.mark.parametrize("args", [
    [], ["-t", "-1"], ["-t", "abc"], ["-p", "0"], ["-p", "1.5"], ["-k", "-1"], ["-n", "-3"],
    ["-s", "-2"], ["-m", "train"], ["-x", "1"], ["-t"], ["--temperature", "1"], ["-n", "1e3"],
    ["-c", "f8"], ["-c", "bf16"],
])
def test_cli_rejects_bad_arguments(engine, story_model, args):
    argv = [story_model["fp32"], *args] if args else []
    p = engine.run(*argv)
    assert p.returncode != 0
    assert b"usage" in p.stderr and p.stdout == b""


def assert_one_line_error(p: subprocess.CompletedProcess, path: Path, *words: str) -> None:
    assert p.returncode != 0
    assert p.stdout == b""
    err = p.stderr.decode("utf-8", "replace").strip()
    assert err and "\n" not in err, err
    assert str(path) in err, err
    for w in words:
        assert w in err, err


def corrupt(src: Path, dst: Path, edit) -> Path:
    data = bytearray(src.read_bytes())
    dst.write_bytes(bytes(edit(data)))
    return dst


def put_i32(off: int, value: int):
    def edit(d: bytearray) -> bytearray:
        d[off:off + 4] = struct.pack("<i", value)
        return d
    return edit


BAD_FILES = {
    # name: (source version, edit, words the message must contain)
    "truncated_by_one": (3, lambda d: d[:-1], ["truncated", "export.py"]),
    "truncated_half": (1, lambda d: d[:len(d) // 2], ["truncated"]),
    "truncated_header": (3, lambda d: d[:100], ["header"]),
    "zero_length": (1, lambda d: b"", ["empty"]),
    "tiny": (0, lambda d: d[:10], ["short"]),
    "padded": (3, lambda d: d + b"\0" * 4, ["trailing"]),
    "legacy_padded": (0, lambda d: d + b"\0" * 8, ["trailing"]),
    "wrong_magic": (1, lambda d: b"XXXX" + d[4:], ["magic"]),
    "wrong_version": (3, put_i32(4, 7), ["version 7"]),
    "zero_heads": (1, put_i32(20, 0), ["n_heads"]),
    "kv_not_dividing": (1, put_i32(24, 5), ["n_kv_heads"]),
    "odd_head_size": (1, put_i32(20, 12), ["odd"]),  # head size 36 / 12 = 3
    "negative_dim": (1, put_i32(8, -36), ["dim"]),
    "huge_vocab": (1, put_i32(28, 2_000_000_000), ["vocab_size"]),
    "bad_group_size": (2, put_i32(37, 7), ["group_size"]),
    "zero_group_size": (3, put_i32(40, 0), ["group_size"]),
    "bad_weight_type": (3, lambda d: d[:37] + b"\x05" + d[38:], ["weight_type"]),
    "bf16_weight_type_3": (3, lambda d: d[:37] + b"\x03" + d[38:], ["weight_type 3", "bf16"]),
    "bf16_truncated": (3, lambda d: d[:-2], ["truncated"]),
    "bf16_group_size": (3, put_i32(40, 64), ["group_size=64", "bf16"]),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_model_file(engine, models, tok_files, tmp_path, name):
    version, edit, words = BAD_FILES[name]
    dtype = ("int8" if name in ("bad_group_size", "zero_group_size")
             else "bf16" if name.startswith("bf16") else "fp32")
    if name == "zero_group_size" or name == "bad_weight_type":
        version = 3
    src = models["odd_gqa"][(version, dtype)]
    bad = corrupt(src, tmp_path / f"{name}.bin", edit)
    p = engine.run(bad, "-z", tok_files["bin"], "-n", "3")
    assert_one_line_error(p, bad, *words)


def test_missing_model_file(engine, tmp_path):
    missing = tmp_path / "nope.bin"
    assert_one_line_error(engine.run(missing, "-n", "2"), missing, "cannot open")


def test_mismatched_tokenizer(engine, models, story_model, tok_files, tmp_path):
    # Model vocab 301, tokenizer vocab 400: refused for both tokenizer formats.
    model = models["odd_gqa"][(1, "fp32")]
    for tok in (tok_files["bin"], tok_files["legacy"]):
        p = engine.run(model, "-z", tok, "-n", "2")
        assert_one_line_error(p, tok)
    # Same vocab size, different pieces: the version 3 header's hash gives it away.
    other = tmp_path / "other"
    other.mkdir()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(STORIES[::-1] * 10 + ["完全不同的文本，用来训练另一个词表。"] * 50),
        model_prefix=str(other / "tok"), vocab_size=400, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    other_bin = Path(export_tokenizer(str(other / "tok.model")))
    assert Tokenizer(str(other / "tok.model")).hash() != story_model["tok"].hash()
    p = engine.run(story_model["fp32"], "-z", other_bin, "-n", "2")
    assert_one_line_error(p, other_bin, "does not match")


def test_story_model_trained(story_model):
    # The fixture's model must have learned something, or the greedy-text tests compare noise.
    assert story_model["loss"] < 3.0


@pytest.mark.skipif(shutil.which("clang") is None, reason="clang not installed (CI needs only cc)")
def test_clang_build_agrees(models, tmp_path):
    """run.c is plain C99: clang builds it without warnings and computes the same logits."""
    path = models["odd_gqa"][(3, "int8")]
    ids = [1, 7, 99, 300, 5, 42]
    outs = []
    for cc, target in (("cc", "run"), ("clang", "run"), ("clang", "runomp")):
        binary = tmp_path / f"el_{cc}_{target}"
        p = subprocess.run(["make", "-s", target, f"CC={cc}", f"BIN={binary}", "SRC=tests/engine_logits.c"],
                           cwd=ROOT, capture_output=True, text=True)
        assert p.returncode == 0 and "warning" not in p.stderr, p.stderr
        out = tmp_path / f"{cc}_{target}.f32"
        subprocess.run([binary, "step", path, " ".join(map(str, ids)), out], check=True)
        outs.append(np.fromfile(out, dtype=np.float32))
    for o in outs[1:]:
        assert np.abs(o - outs[0]).max() <= 1e-4
