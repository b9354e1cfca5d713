"""export.py: .bin versions 0-3 byte by byte and round trip, int8 quantization, the Hugging Face
export (loaded by transformers, offline), and the CLI's error handling.

The file layouts are checked with a reader written here from docs/formats.md and the version 3 contract,
independent of export.py's own reader.
"""

import dataclasses
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # transformers must never try the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np
import pytest
import sentencepiece as spm
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import export  # noqa: E402
import checkpoint  # noqa: E402
from export import ExportError, load_model_bin, quantize_roundtrip, write_model_bin  # noqa: E402
from model import ModelArgs, Transformer, model_args_from_preset  # noqa: E402

MAGIC = 0x616B3432
VOCAB = 400  # the test tokenizer's size, so models and tokenizer fit together
FP32_TOL = 1e-6  # fp32 file round trip: the same floats, so the same logits up to summation order
HF_TOL = 1e-4  # transformers computes the same network with its own kernels and rotary tables

STORIES = [
    "从前有一个小女孩，她喜欢在花园里玩。她看见一只小猫。",
    "小狗和小猫是好朋友，它们每天一起玩。",
    "Once upon a time there was a little girl named Lily. She liked to play in the park.",
    "The cat was happy and they played all day. One day, Tom found a big red ball.",
    "妈妈说：“你要小心！”小明点点头，慢慢地走过小桥。",
]


# ----------------------------------------------------------------------------------------------
# fixtures

def make_model(kind: str, seed: int = 0, **overrides) -> Transformer:
    """Tiny random models: tied (GQA 4:2), untied (plain MHA), gqa (4 heads share 1 kv head)."""
    torch.manual_seed(seed)
    shapes = {"tied": dict(tie_embeddings=True, n_kv_heads=2),
              "untied": dict(tie_embeddings=False, n_kv_heads=4),
              "gqa": dict(tie_embeddings=False, n_kv_heads=1)}[kind]
    model = Transformer(model_args_from_preset("micro", **{"vocab_size": VOCAB, **shapes, **overrides}))
    # Norm gains away from 1 so that a misplaced norm cannot pass unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (2, 24), generator=g)


@pytest.fixture(scope="module")
def tok_model(tmp_path_factory) -> str:
    """A small byte-fallback BPE sentencepiece model with tinystories.py's settings."""
    return train_tokenizer(tmp_path_factory.mktemp("tok") / "tok", normalization_rule_name="identity",
                           remove_extra_whitespaces=False, add_dummy_prefix=True)


def train_tokenizer(prefix: Path, **flags) -> str:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(STORIES * 40), model_prefix=str(prefix), vocab_size=VOCAB,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, minloglevel=2, **flags)
    return str(prefix) + ".model"


def logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)[0]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    d = (a - b).abs()
    return f"max |diff| {d.max().item():.3g} at {np.unravel_index(int(d.argmax()), tuple(d.shape))}"


# ----------------------------------------------------------------------------------------------
# an independent reader of the documented layouts

def f32(model_tensor: torch.Tensor) -> np.ndarray:
    return model_tensor.detach().float().numpy().reshape(-1)


def expected_fp32_order(model: Transformer, version: int) -> list[tuple[str, np.ndarray]]:
    """The tensors of a version 0 or 1/3-fp32 body, in file order, as docs/formats.md lists them."""
    L = model.layers
    tied = model.output.weight is model.tok_embeddings.weight
    per = lambda name, get: [(f"{name}{i}", f32(get(l))) for i, l in enumerate(L)]  # noqa: E731
    attn = lambda n: per(n, lambda l: getattr(l.attention, n).weight)  # noqa: E731
    ffn = lambda n: per(n, lambda l: getattr(l.feed_forward, n).weight)  # noqa: E731
    if version == 0:
        p = model.params
        hs = p.dim // p.n_heads
        freqs = 1.0 / (p.rope_theta ** (np.arange(0, hs, 2) / hs))
        ang = np.outer(np.arange(p.max_seq_len), freqs)
        out = ([("tok", f32(model.tok_embeddings.weight))] + per("attn_norm", lambda l: l.attention_norm.weight)
               + attn("wq") + attn("wk") + attn("wv") + attn("wo") + per("ffn_norm", lambda l: l.ffn_norm.weight)
               + ffn("w1") + ffn("w2") + ffn("w3") + [("norm", f32(model.norm.weight))]
               + [("rope_cos", np.cos(ang).reshape(-1)), ("rope_sin", np.sin(ang).reshape(-1))])
    else:
        out = (per("attn_norm", lambda l: l.attention_norm.weight) + per("ffn_norm", lambda l: l.ffn_norm.weight)
               + [("norm", f32(model.norm.weight)), ("tok", f32(model.tok_embeddings.weight))]
               + attn("wq") + attn("wk") + attn("wv") + attn("wo") + ffn("w1") + ffn("w2") + ffn("w3"))
    if not tied:
        out.append(("output", f32(model.output.weight)))
    return out


def expected_int8_order(model: Transformer) -> tuple[list, list]:
    """(fp32 norms, quantized matrices) of a version 2 / 3-int8 body, in file order."""
    L = model.layers
    norms = ([f32(l.attention_norm.weight) for l in L] + [f32(l.ffn_norm.weight) for l in L]
             + [f32(model.norm.weight)])
    mats = [("tok", f32(model.tok_embeddings.weight))]
    for n in ("wq", "wk", "wv", "wo"):
        mats += [(f"{n}{i}", f32(getattr(l.attention, n).weight)) for i, l in enumerate(L)]
    for n in ("w1", "w2", "w3"):
        mats += [(f"{n}{i}", f32(getattr(l.feed_forward, n).weight)) for i, l in enumerate(L)]
    if model.output.weight is not model.tok_embeddings.weight:
        mats.append(("output", f32(model.output.weight)))
    return norms, mats


def check_fp32_body(data: bytes, offset: int, model: Transformer, version: int) -> None:
    pos = offset
    for name, want in expected_fp32_order(model, version):
        got = np.frombuffer(data, dtype="<f4", count=want.size, offset=pos)
        if name.startswith("rope"):
            np.testing.assert_allclose(got, want, atol=1e-6, err_msg=name)
        else:
            assert np.array_equal(got, want), f"tensor {name} at byte {pos} differs"
        pos += 4 * want.size
    assert pos == len(data), f"body ends at {pos}, file has {len(data)} bytes"


def check_int8_body(data: bytes, offset: int, model: Transformer, group_size: int) -> None:
    """Norms exact; each matrix: int8 values then one fp32 scale per group, scale = max|w|/127,
    |q * scale - w| <= scale/2, and the largest |q| of a nonzero group is 127."""
    norms, mats = expected_int8_order(model)
    pos = offset
    for want in norms:
        assert np.array_equal(np.frombuffer(data, dtype="<f4", count=want.size, offset=pos), want)
        pos += 4 * want.size
    for name, w in mats:
        q = np.frombuffer(data, dtype=np.int8, count=w.size, offset=pos).astype(np.float32)
        pos += w.size
        s = np.frombuffer(data, dtype="<f4", count=w.size // group_size, offset=pos)
        pos += 4 * (w.size // group_size)
        groups = w.reshape(-1, group_size)
        np.testing.assert_allclose(s, np.abs(groups).max(axis=1) / 127.0, rtol=1e-6, err_msg=name)
        err = np.abs(q.reshape(-1, group_size) * s[:, None] - groups)
        assert (err <= s[:, None] * 0.5 * (1 + 1e-5) + 1e-12).all(), f"{name}: error above half a step"
        assert (np.abs(q.reshape(-1, group_size)).max(axis=1) == 127).all(), f"{name}: groups not full-range"
    assert pos == len(data), f"body ends at {pos}, file has {len(data)} bytes"


def header_ints(data: bytes, offset: int) -> tuple:
    return struct.unpack_from("<7i", data, offset)


# ----------------------------------------------------------------------------------------------
# .bin: bytes and round trips

@pytest.mark.parametrize("kind", ["tied", "untied", "gqa"])
def test_version0_layout_and_roundtrip(tmp_path, tokens, kind):
    model = make_model(kind)
    path = tmp_path / "m.bin"
    write_model_bin(model, path, version=0)
    data = path.read_bytes()
    p = model.params
    tied = kind == "tied"
    # The legacy header: 7 int32, the classifier flag is the sign of vocab_size.
    assert header_ints(data, 0) == (p.dim, p.hidden_dim, p.n_layers, p.n_heads, p.n_kv_heads,
                                    VOCAB if tied else -VOCAB, p.max_seq_len)
    check_fp32_body(data, 28, model, version=0)
    back = load_model_bin(path)
    assert (back.output.weight is back.tok_embeddings.weight) == tied
    a, b = logits(model, tokens), logits(back, tokens)
    assert torch.allclose(a, b, rtol=0, atol=FP32_TOL), max_diff(a, b)


@pytest.mark.parametrize("kind", ["tied", "untied", "gqa"])
@pytest.mark.parametrize("version", [1, 3])
def test_fp32_layout_and_roundtrip(tmp_path, tokens, kind, version):
    # Version 3 records norm_eps and rope_theta, so give it non-default ones; 1 cannot.
    extra = dict(norm_eps=1e-6, rope_theta=500.0) if version == 3 else {}
    model = make_model(kind, **extra)
    path = tmp_path / "m.bin"
    write_model_bin(model, path, version=version, tokenizer_hash=0xDEADBEEF if version == 3 else 0)
    data = path.read_bytes()
    p = model.params
    tied = kind == "tied"
    magic, ver = struct.unpack_from("<Ii", data, 0)
    assert (magic, ver) == (MAGIC, version)
    assert data[:4] == b"24ka"  # "ak42" as a little-endian uint32
    assert header_ints(data, 8) == (p.dim, p.hidden_dim, p.n_layers, p.n_heads, p.n_kv_heads, VOCAB, p.max_seq_len)
    assert data[36] == int(tied)
    if version == 1:
        assert data[37:256] == bytes(219)
    else:
        wtype, reserved, gs, eps, theta, h = struct.unpack_from("<BHiffI", data, 37)
        assert (wtype, reserved, gs, h) == (0, 0, 0, 0xDEADBEEF)
        assert eps == pytest.approx(1e-6, rel=1e-6) and theta == 500.0
        assert data[56:256] == bytes(200)
    check_fp32_body(data, 256, model, version=version)
    back = load_model_bin(path)
    assert (back.output.weight is back.tok_embeddings.weight) == tied
    assert back.params.norm_eps == pytest.approx(p.norm_eps, rel=1e-6) and back.params.rope_theta == p.rope_theta
    a, b = logits(model, tokens), logits(back, tokens)
    assert torch.allclose(a, b, rtol=0, atol=FP32_TOL), max_diff(a, b)


@pytest.mark.parametrize("kind", ["tied", "gqa"])
@pytest.mark.parametrize("version", [2, 3])
def test_int8_layout_and_roundtrip(tmp_path, tokens, kind, version):
    model = make_model(kind)
    path = tmp_path / "m.bin"
    info = write_model_bin(model, path, version=version, dtype="int8")
    data = path.read_bytes()
    p = model.params
    # micro: dim 32, hidden_dim 96, so the default 64 is halved once.
    assert (p.dim, p.hidden_dim) == (32, 96) and info["group_size"] == 32
    assert struct.unpack_from("<Ii", data, 0) == (MAGIC, version)
    assert header_ints(data, 8) == (p.dim, p.hidden_dim, p.n_layers, p.n_heads, p.n_kv_heads, VOCAB, p.max_seq_len)
    assert data[36] == int(kind == "tied")
    if version == 2:
        assert struct.unpack_from("<i", data, 37) == (32,)  # unaligned, right after the flag byte
        assert data[41:256] == bytes(215)
    else:
        wtype, reserved, gs = struct.unpack_from("<BHi", data, 37)
        assert (wtype, reserved, gs) == (1, 0, 32)
    check_int8_body(data, 256, model, group_size=32)

    back = load_model_bin(path)
    ref = quantize_roundtrip(model)  # the model with the file's dequantized weights
    a, b = logits(ref, tokens), logits(back, tokens)
    assert torch.allclose(a, b, rtol=0, atol=FP32_TOL), max_diff(a, b)
    # And the quantized model is close to the original: weight errors are at most half a step
    # (checked above); on these logits (|logit| ~ 1) that stays well under 5%.
    orig = logits(model, tokens)
    rel = ((b - orig).abs().max() / orig.abs().max()).item()
    assert 0 < rel < 0.05, f"int8 logits relative error {rel:.3g}"


def test_group_size_halves_until_it_divides_dim_and_hidden(tmp_path):
    model = make_model("tied", dim=48, n_heads=4, hidden_dim=40, n_kv_heads=2)
    path = tmp_path / "m.bin"
    info = write_model_bin(model, path, version=3, dtype="int8")
    assert info["group_size"] == 8  # 64 -> 32 -> 16 (divides 48 but not 40) -> 8
    assert struct.unpack_from("<i", path.read_bytes(), 40) == (8,)
    check_int8_body(path.read_bytes(), 256, model, group_size=8)


@pytest.mark.parametrize("version,dtype", [(0, None), (1, None), (2, None), (3, "fp32"), (3, "int8")])
def test_file_size_formula(tmp_path, version, dtype):
    model = make_model("untied")
    p = model.params
    path = tmp_path / "m.bin"
    write_model_bin(model, path, version=version, dtype=dtype)
    d, h, L, V, kv = p.dim, p.hidden_dim, p.n_layers, VOCAB, p.n_kv_heads * p.head_size
    n_norm = (2 * L + 1) * d
    n_mat = 2 * V * d + L * (2 * d * d + 2 * kv * d + 3 * h * d)
    if version == 0:
        want = 28 + 4 * (n_norm + n_mat + p.max_seq_len * p.head_size)
    elif version == 2 or dtype == "int8":
        want = 256 + 4 * n_norm + n_mat + 4 * n_mat // 32
    else:
        want = 256 + 4 * (n_norm + n_mat)
    assert path.stat().st_size == want


def test_exporters_do_not_touch_the_model(tmp_path, tok_model):
    model = make_model("tied")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for version, dtype in [(0, None), (1, None), (2, None), (3, "fp32"), (3, "int8")]:
        write_model_bin(model, tmp_path / f"m{version}{dtype}.bin", version=version, dtype=dtype)
    export.export_hf(model, tmp_path / "hf", dtype="fp16", tokenizer_model=tok_model)
    quantize_roundtrip(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.output.weight is model.tok_embeddings.weight
    assert model.tok_embeddings.weight.dtype == torch.float32


def test_bad_versions_and_dtypes_are_refused(tmp_path):
    model = make_model("tied")
    for kwargs in [dict(version=4), dict(version=-1), dict(version=1, dtype="int8"),
                   dict(version=2, dtype="fp32"), dict(version=3, dtype="fp16")]:
        path = tmp_path / "m.bin"
        with pytest.raises(ExportError):
            write_model_bin(model, path, **kwargs)
        assert not path.exists()


@pytest.mark.parametrize("version,dtype", [(0, None), (1, None), (3, "int8")])
def test_damaged_files_are_refused_with_the_path(tmp_path, version, dtype):
    model = make_model("untied")
    good = tmp_path / "good.bin"
    write_model_bin(model, good, version=version, dtype=dtype)
    data = good.read_bytes()
    cases = {"truncated": data[:-5], "padded": data + b"\0" * 4, "header only": data[:20]}
    if version:
        cases["bad version"] = data[:4] + struct.pack("<i", 9) + data[8:]
        cases["bad shape"] = data[:8] + struct.pack("<i", 30) + data[12:]  # dim 30 not divisible by 4 heads
    for what, blob in cases.items():
        bad = tmp_path / "bad.bin"
        bad.write_bytes(blob)
        with pytest.raises(ExportError) as e:
            load_model_bin(bad)
        assert str(bad) in str(e.value), what
        assert "\n" not in str(e.value)


def test_reads_a_version0_file_written_by_hand(tmp_path, tokens):
    """A legacy file built here with numpy (no export.py writer): the loader must place each tensor."""
    model = make_model("tied")
    p = model.params
    parts = [np.array([p.dim, p.hidden_dim, p.n_layers, p.n_heads, p.n_kv_heads, VOCAB, p.max_seq_len], "<i4")]
    # The RoPE tables are skipped by readers: fill them with junk to prove it.
    parts += [t.astype("<f4") if not n.startswith("rope") else np.full(t.size, 7.0, "<f4")
              for n, t in expected_fp32_order(model, 0)]
    path = tmp_path / "hand.bin"
    path.write_bytes(b"".join(a.tobytes() for a in parts))
    a, b = logits(model, tokens), logits(load_model_bin(path), tokens)
    assert torch.allclose(a, b, rtol=0, atol=FP32_TOL), max_diff(a, b)


# ----------------------------------------------------------------------------------------------
# Hugging Face

@pytest.mark.parametrize("kind", ["tied", "untied", "gqa"])
def test_hf_export_loads_in_transformers_with_our_logits(tmp_path, tokens, tok_model, kind):
    transformers = pytest.importorskip("transformers")
    model = make_model(kind, norm_eps=1e-6, rope_theta=500.0)
    out = tmp_path / "hf"
    export.export_hf(model, out, dtype="fp32", tokenizer_model=tok_model)
    cfg = json.loads((out / "config.json").read_text())
    p = model.params
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["num_hidden_layers"], cfg["vocab_size"], cfg["max_position_embeddings"]) == \
        (p.dim, p.hidden_dim, p.n_heads, p.n_kv_heads, p.n_layers, VOCAB, p.max_seq_len)
    assert cfg["tie_word_embeddings"] == (kind == "tied")
    assert (cfg["rms_norm_eps"], cfg["rope_theta"], cfg["bos_token_id"], cfg["eos_token_id"]) == (1e-6, 500.0, 1, 2)
    hf = transformers.LlamaForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert hf.config.tie_word_embeddings == (kind == "tied")
    with torch.no_grad():
        b = hf(tokens).logits
    a = logits(model, tokens)
    assert torch.allclose(a, b, rtol=0, atol=HF_TOL), max_diff(a, b)
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_hf_export_fp16(tmp_path, tokens):
    transformers = pytest.importorskip("transformers")
    from safetensors import safe_open
    model = make_model("gqa")
    out = tmp_path / "hf16"
    export.export_hf(model, out, dtype="fp16")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
        assert "lm_head.weight" in f.keys()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    hf = transformers.LlamaForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        b = hf(tokens).logits
    a = logits(model, tokens)
    # fp16 weights: about 3 significant digits per weight.
    assert torch.allclose(a, b, rtol=0, atol=1e-2), max_diff(a, b)


def test_hf_tokenizer_matches_sentencepiece(tmp_path, tok_model):
    transformers = pytest.importorskip("transformers")
    model = make_model("tied")
    out = tmp_path / "hf"
    notes = export.export_hf(model, out, tokenizer_model=tok_model)
    assert (out / "tokenizer.model").read_bytes() == Path(tok_model).read_bytes()
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tcfg["tokenizer_class"] == "LlamaTokenizer"
    assert (tcfg["bos_token"], tcfg["eos_token"], tcfg["unk_token"]) == ("<s>", "</s>", "<unk>")
    assert notes == []  # identity normalization: nothing LlamaTokenizer cannot do
    tok = transformers.LlamaTokenizer.from_pretrained(out)
    sp = spm.SentencePieceProcessor(model_file=tok_model)
    texts = STORIES + ["小猫看见了Lily。", "Tom found 12 red balls!", "emoji 🙂 and 龘 fall back to bytes", "a",
                       "two  spaces, then a tab\tand\na newline ", "全角（括号）"]
    # Not tested: text that starts with a space. sentencepiece's dummy prefix adds a "▁" before
    # it anyway; Hugging Face's Metaspace does not (README, "Hugging Face export").
    for text in texts:
        want = [sp.bos_id()] + sp.encode(text)
        got = tok(text)["input_ids"]
        assert got == want, text
        assert tok.decode(got, skip_special_tokens=True) == sp.decode(want)
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)

    # sentencepiece's default normalizer (NFKC, collapsing spaces) has no LlamaTokenizer
    # equivalent: the export says so instead of pretending.
    nfkc = train_tokenizer(tmp_path / "nfkc")
    notes = export.export_hf(model, tmp_path / "hf_nfkc", tokenizer_model=nfkc)
    assert any("spaces" in n and "NFKC" in n for n in notes), notes


def test_hf_export_refuses_a_tokenizer_of_another_size(tmp_path, tok_model):
    model = make_model("tied", vocab_size=300)
    out = tmp_path / "hf"
    with pytest.raises(ExportError, match="vocab_size"):
        export.export_hf(model, out, tokenizer_model=tok_model)
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# the command line

def save_checkpoint(model: Transformer, path: Path, **config) -> None:
    """A checkpoint in train.py's format (weights, model args, config, step), without its optimizer."""
    checkpoint.save(path, {"format": checkpoint.CKPT_FORMAT, "version": checkpoint.CKPT_VERSION,
                           "model": model.state_dict(), "model_args": dataclasses.asdict(model.params),
                           "config": config, "iter_num": 10, "optimizer": {}, "best_val_loss": 1.5})


def run_export(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "export.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_cli_writes_version3_with_the_tokenizer_hash(tmp_path, tokens, tok_model):
    tokenizer = pytest.importorskip("tokenizer")
    model = make_model("untied")
    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint(model, ckpt, tokenizer=tok_model)  # the tokenizer comes from the checkpoint's config
    out = tmp_path / "out" / "model.bin"
    r = run_export(out, "--checkpoint", ckpt)
    assert r.returncode == 0, r.stderr
    h = struct.unpack_from("<I", out.read_bytes(), 52)[0]
    assert h == tokenizer.Tokenizer(tok_model).hash() != 0
    assert torch.allclose(logits(load_model_bin(out), tokens), logits(model, tokens), rtol=0, atol=FP32_TOL)
    # --key=value spelling, int8, and a .bin as the source (its header's hash is carried over).
    out8 = tmp_path / "model_q8.bin"
    assert export.main([str(out8), "--version=3", "--dtype=int8", f"--checkpoint={out}"]) == 0
    data = out8.read_bytes()
    assert data[37] == 1 and struct.unpack_from("<I", data, 52)[0] == h


def test_cli_hf_export(tmp_path, tok_model):
    pytest.importorskip("transformers")
    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint(make_model("gqa"), ckpt)
    out = tmp_path / "hf_export" / "my_model"
    assert export.main([str(out), "--version", "-1", "--dtype", "fp16", "--checkpoint", str(ckpt),
                        "--tokenizer", tok_model]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer.json",
            "tokenizer_config.json"} <= set(os.listdir(out))


def test_cli_errors_are_one_line_and_leave_no_file(tmp_path, capsys):
    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint(make_model("tied"), ckpt)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(ckpt.read_bytes()[:2000])
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    out = tmp_path / "m.bin"
    cases = [  # (argv, text the line names, exit status: 2 for a bad command line, else 1)
        ([str(out), "--checkpoint", str(tmp_path / "missing.pt")], "missing.pt", 1),
        ([str(out), "--checkpoint", str(corrupt)], "corrupt.pt", 1),
        ([str(out), "--version", "7", "--checkpoint", str(ckpt)], "version 7", 2),
        ([str(out), "--version=1", "--dtype=int8", "--checkpoint", str(ckpt)], "int8", 2),
        ([str(blocker / "m.bin"), "--checkpoint", str(ckpt)], "afile", 1),  # parent is a file
        ([str(out), "--verison=1"], "--verison", 2),
        ([str(out), "--group_size=0", "--checkpoint", str(ckpt)], "--group_size=0", 2),
        ([str(out), "--checkpoint", str(ckpt), "--tokenizer", str(tmp_path / "no.model")], "no.model", 1),
    ]
    for argv, needle, status in cases:
        assert export.main(argv) == status, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err and err.startswith("export.py: error: "), err
        assert "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["afile", "ckpt.pt", "corrupt.pt"]  # no output, no temp files
    # And as a real process: exit status 1, one line on stderr.
    r = run_export(out, "--checkpoint", corrupt)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "corrupt.pt" in r.stderr, r.stderr
    assert not out.exists()


def test_help_comes_from_the_config_and_no_arguments_is_a_usage_error(capsys):
    assert export.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python export.py OUT [--key=value ...]")
    for f in dataclasses.fields(export.ExportConfig):
        if f.name != "out":
            assert f"--{f.name}=" in out and f.metadata["help"][:30] in out, f.name
    assert export.main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("usage: python export.py")


def test_an_export_sweeps_what_killed_exports_left(tmp_path):
    """Defect (issue 14): a killed export's `model.bin.XXXX.tmp` stayed forever. Dead fileio
    temporaries and this output's old-style ones go; a live process's and other names stay."""
    out = tmp_path / "model.bin"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    left = [tmp_path / f".model.bin.tmp-{dead}", tmp_path / "model.bin.k2j_x9ab.tmp", tmp_path / "hf.abcd1234.tmp"]
    kept = [tmp_path / f".model.bin.tmp-{os.getppid()}", tmp_path / "other.bin.k2j_x9ab.tmp", tmp_path / "notes.tmp"]
    for p in left + kept:
        p.write_bytes(b"x")
    (tmp_path / "hf").mkdir()
    write_model_bin(make_model("tied"), out, version=3)
    export.sweep_before_writing(tmp_path / "hf")
    assert sorted(os.listdir(tmp_path)) == sorted(["hf", "model.bin"] + [p.name for p in kept])


def test_bf16_only_where_the_format_holds_it(tmp_path):
    """bf16 is a version 3 weight type: older versions refuse it in one line, exit 2; a bf16 file
    reads back as exactly the bf16-rounded model."""
    import subprocess
    import sys

    import export
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=64, max_seq_len=16))
    for version in (0, 1, 2):
        with pytest.raises(export.ExportError, match=f"version {version} stores .* not dtype='bf16'"):
            export.write_model_bin(model, tmp_path / "x.bin", version=version, dtype="bf16")
    src = tmp_path / "m.bin"
    export.write_model_bin(model, src, version=1)
    p = subprocess.run([sys.executable, "export.py", str(tmp_path / "y.bin"), "--version=2", "--dtype=bf16",
                        f"--checkpoint={src}"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "export.py: error:" in p.stderr, p.stderr
    out = tmp_path / "b.bin"
    export.write_model_bin(model, out, version=3, dtype="bf16")
    assert export.read_bin_header(out).dtype == "bf16"
    back, want = export.load_model_bin(out), export.bf16_roundtrip(model)
    for (name, a), b in zip(back.state_dict().items(), want.state_dict().values()):
        assert torch.equal(a, b), name
    bits = export.to_bf16(np.array([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -3.0e38], dtype=np.float32))
    assert bits.tolist() == [0x3F80, 0x3F80, 0x3F82, 0xFF62]  # ties to even, like torch
