"""Export a trained model to the llama2.c-family .bin formats, Hugging Face or GGUF, and read .bin files back.

    python export.py out/model.bin --checkpoint=out/ckpt.pt                   # version 3, fp32 (default)
    python export.py out/model_q8.bin --version=3 --dtype=int8 --checkpoint=out/ckpt.pt
    python export.py out/legacy.bin --version 0 --checkpoint out/ckpt.pt      # what old llama2.c runs read
    python export.py ./hf_export/my_model --version -1 --dtype fp16 --checkpoint ./out/ckpt.pt
    python export.py out/copy.bin --version=3 --checkpoint=stories15M.bin     # convert a published .bin
    python export.py out/model.gguf --version=gguf --dtype=q8_0 --checkpoint=out/ckpt.pt --tokenizer=data/tok5000.model

Versions (byte layouts in README.md, "Binary formats"):
  0   legacy llama2.c: 28-byte header of 7 int32, fp32 weights grouped by kind, RoPE tables.
  1   256-byte header with magic, fp32 weights.
  2   256-byte header, int8 "Q8_0" weights (symmetric, one fp32 scale per group_size values).
  3   ours: version 1/2 bodies behind a header that also records norm_eps, rope_theta, the weight
      type (fp32 or int8) and the tokenizer's hash.
  -1  Hugging Face LlamaForCausalLM directory: config.json, model.safetensors, tokenizer files.
  gguf  llama.cpp's GGUF (llama architecture, f32, f16 or q8_0, with the sentencepiece vocabulary),
      and an ollama Modelfile in the same folder (`ollama create NAME -f out/Modelfile`).

Options take `--key=value` or `--key value`; run `python export.py --help` for the list.

From Python:

    from export import write_model_bin, load_model_bin, export_hf, write_gguf
    write_model_bin(model, "out/model.bin", version=3, dtype="int8", tokenizer_hash=tok.hash())
    model = load_model_bin("stories15M.bin")    # any version 0..3; int8 weights are dequantized

Exporters never modify the model they are given, and every output is written to a temporary file
(or directory) that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import struct
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

import checkpoint
import fileio
from model import ModelArgs, Transformer, non_finite_weight
from options import OptionError, UserError, apply_options, cli, opt, os_error_text, render_help

MAGIC = 0x616B3432  # "ak42" read as a little-endian uint32
HEADER_SIZE = 256  # versions 1, 2 and 3
LEGACY_HEADER_SIZE = 28  # version 0: 7 int32
WEIGHT_FP32, WEIGHT_INT8, WEIGHT_BF16 = 0, 1, 2  # version 3 weight_type byte
WEIGHT_NAMES = {WEIGHT_FP32: "fp32", WEIGHT_INT8: "int8", WEIGHT_BF16: "bf16"}
V3_DTYPES = tuple(WEIGHT_NAMES.values())
# Version 3 prompt_format (the uint16 at offset 38): how the model expects its prompt.
PROMPT_PLAIN, PROMPT_INSTRUCT_ZH, PROMPT_INSTRUCT_EN = 0, 1, 2
PROMPT_LANGS = {PROMPT_INSTRUCT_ZH: "zh", PROMPT_INSTRUCT_EN: "en"}  # instruct.TEMPLATES' languages
DEFAULT_GROUP_SIZE = 64
BIN_VERSIONS = (0, 1, 2, 3)


class ExportError(UserError):
    """A bad model file, tokenizer or export request: one line `export.py: error: ...`, exit 1."""


# ----------------------------------------------------------------------------------------------
# weights in file order

def _shared_classifier(model: Transformer) -> bool:
    # Identity, not equality: an untied model whose two matrices happen to be equal still has two.
    return model.output.weight is model.tok_embeddings.weight


def _f32(t: torch.Tensor) -> np.ndarray:
    """A read-only fp32 numpy view (or copy) of a parameter; the model's tensor is never written."""
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()


def _norms(model: Transformer) -> list[np.ndarray]:
    """All attention norms, all FFN norms, the final norm (the order of versions 1, 2 and 3)."""
    layers = model.layers
    return ([_f32(l.attention_norm.weight) for l in layers] + [_f32(l.ffn_norm.weight) for l in layers]
            + [_f32(model.norm.weight)])


def _matrices(model: Transformer) -> list[np.ndarray]:
    """Token embedding, then per kind all layers' wq, wk, wv, wo, w1, w2, w3, then the classifier if
    it is not shared: the matrix order of versions 1, 2 and 3. Each layer's matrix is its own entry."""
    layers = model.layers
    out = [_f32(model.tok_embeddings.weight)]
    for name in ("wq", "wk", "wv", "wo"):
        out += [_f32(getattr(l.attention, name).weight) for l in layers]
    for name in ("w1", "w2", "w3"):
        out += [_f32(getattr(l.feed_forward, name).weight) for l in layers]
    if not _shared_classifier(model):
        out.append(_f32(model.output.weight))
    return out


def _legacy_tensors(model: Transformer) -> list[np.ndarray]:
    """Version 0's order: embedding, norms and matrices grouped by kind, final norm, RoPE tables, classifier."""
    p = model.params
    layers = model.layers
    out = [_f32(model.tok_embeddings.weight)]
    out += [_f32(l.attention_norm.weight) for l in layers]
    for name in ("wq", "wk", "wv", "wo"):
        out += [_f32(getattr(l.attention, name).weight) for l in layers]
    out += [_f32(l.ffn_norm.weight) for l in layers]
    for name in ("w1", "w2", "w3"):
        out += [_f32(getattr(l.feed_forward, name).weight) for l in layers]
    out.append(_f32(model.norm.weight))
    # Readers skip these two tables (max_seq_len x head_size/2 each, cos then sin); write the real
    # values so that old readers which do use them still work.
    hs = p.dim // p.n_heads
    inv_freq = 1.0 / (p.rope_theta ** (np.arange(0, hs, 2, dtype=np.float64) / hs))
    angles = np.outer(np.arange(p.max_seq_len, dtype=np.float64), inv_freq)
    out += [np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)]
    if not _shared_classifier(model):
        out.append(_f32(model.output.weight))
    return out


# ----------------------------------------------------------------------------------------------
# int8 quantization (Q8_0)

def pick_group_size(dim: int, hidden_dim: int, group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """Halve group_size until it divides both dim and hidden_dim (so every row splits into whole groups)."""
    if group_size < 1:
        raise ExportError(f"group_size={group_size} must be >= 1")
    while dim % group_size or hidden_dim % group_size:
        group_size //= 2
    return group_size


def quantize_q80(w: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per group of group_size consecutive values (row-major order).

    Returns (q int8 with w's number of values, scales fp32 of length size/group_size) with
    w ~= q * scale, q in [-127, 127], scale = max|w| / 127 of the group (0 for an all-zero group).
    """
    flat = np.ascontiguousarray(w, dtype=np.float32).reshape(-1)
    if flat.size % group_size:
        raise ExportError(f"tensor of {flat.size} values does not split into groups of {group_size}")
    groups = torch.from_numpy(flat.copy()).view(-1, group_size)  # (n_groups, group_size)
    wmax = groups.abs().amax(dim=1)  # (n_groups,)
    scale = wmax / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group quantizes to 0
    q = torch.round(groups / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(-1).numpy(), scale.to(torch.float32).numpy()


def dequantize_q80(q: np.ndarray, scales: np.ndarray, group_size: int) -> np.ndarray:
    """Inverse of quantize_q80: flat fp32 values q * scale."""
    return (q.astype(np.float32).reshape(-1, group_size) * scales.astype(np.float32)[:, None]).reshape(-1)


def to_bf16(a: np.ndarray) -> np.ndarray:
    """fp32 values as bf16 bits (uint16), rounded to nearest even exactly as torch's .to(bfloat16)."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(torch.bfloat16).view(torch.int16) \
        .numpy().view(np.uint16)


def from_bf16(bits: np.ndarray) -> np.ndarray:
    """bf16 bits (uint16) -> fp32 values (exact: bf16 is fp32's top half)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def bf16_roundtrip(model: Transformer) -> Transformer:
    """A copy of model whose matrices are rounded to bf16: what a bf16 .bin holds (norms stay fp32)."""
    out = Transformer(model.params)
    out.load_state_dict(model.state_dict())
    with torch.no_grad():
        for _, param in out.named_parameters():  # a tied matrix is listed (and rounded) once
            if param.dim() == 2:
                param.copy_(param.to(torch.bfloat16).to(torch.float32))
    return out.eval()


def quantize_roundtrip(model: Transformer, group_size: int = DEFAULT_GROUP_SIZE) -> Transformer:
    """A copy of model whose matrices went through quantize_q80 and back: what an int8 .bin holds.

    Norms stay fp32, as in the files. group_size is adjusted with pick_group_size.
    """
    p = model.params
    gs = pick_group_size(p.dim, p.hidden_dim, group_size)
    out = Transformer(p)
    out.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, param in out.named_parameters():  # a tied matrix is listed (and rounded) once
            if param.dim() == 2:
                q, s = quantize_q80(_f32(param), gs)
                param.copy_(torch.from_numpy(dequantize_q80(q, s, gs)).view_as(param))
    return out.eval()


# ----------------------------------------------------------------------------------------------
# writing .bin

def _config_ints(p: ModelArgs, *, negative_vocab: bool = False) -> tuple:
    vocab = -p.vocab_size if negative_vocab else p.vocab_size
    return (p.dim, p.hidden_dim, p.n_layers, p.n_heads, p.n_kv_heads, vocab, p.max_seq_len)


def _header(model: Transformer, *, version: int, weight_type: int, group_size: int,
            tokenizer_hash: int, prompt_format: int = PROMPT_PLAIN) -> bytes:
    p = model.params
    shared = _shared_classifier(model)
    if version == 0:
        # The legacy format's only flag: a negative vocab_size means "classifier stored at the end".
        return struct.pack("<7i", *_config_ints(p, negative_vocab=not shared))
    head = struct.pack("<Ii7i", MAGIC, version, *_config_ints(p)) + struct.pack("<B", int(shared))
    if version == 2:
        head += struct.pack("<i", group_size)  # at offset 37, unaligned, as the reference writes it
    elif version == 3:
        head += struct.pack("<BHiffI", weight_type, prompt_format, group_size, p.norm_eps, p.rope_theta,
                            tokenizer_hash)
    assert len(head) <= HEADER_SIZE, f"header of {len(head)} bytes"
    return head + b"\0" * (HEADER_SIZE - len(head))


# Before fileio, exports wrote mkstemp temporaries `NAME.XXXXXXXX.tmp` (a file, or a folder for
# Hugging Face) that a killed run left behind for good.
_LEGACY_TEMP = re.compile(r"^(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp$")


def sweep_before_writing(path: str) -> None:
    """Remove what killed exports left beside path: fileio's dead temporaries, and this output's
    own temporaries of the older naming (no pid in those; only path's name, so nothing else's)."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    fileio.sweep_stale(folder)
    try:
        entries = os.listdir(folder)
    except OSError:
        return
    for entry in entries:
        m = _LEGACY_TEMP.match(entry)
        if m and m.group("name") == name:
            target = os.path.join(folder, entry)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target, ignore_errors=True)
            elif os.path.lexists(target):
                os.remove(target)


def write_model_bin(model: Transformer, path: str, *, version: int, dtype: Optional[str] = None,
                    group_size: int = DEFAULT_GROUP_SIZE, tokenizer_hash: int = 0,
                    prompt_format: int = PROMPT_PLAIN) -> dict:
    """Write model as a llama2.c-family .bin file.

    version: 0, 1, 2 or 3. dtype: the weight storage, "fp32", "int8" or "bf16"; None picks the
    version's only one (0 and 1: fp32, 2: int8) and fp32 for version 3; version 3 takes any of them.
    group_size: int8 group size, halved until it divides dim and hidden_dim (versions 2 and 3-int8).
    tokenizer_hash: uint32 recorded in version 3 headers (0 = unknown), see tokenizer.Tokenizer.hash().
    prompt_format: recorded in version 3 headers, PROMPT_PLAIN or an instruct language (PROMPT_LANGS);
    versions 0-2 have no field for it.
    Returns a small summary dict (version, dtype, group_size, bytes).
    """
    if version not in BIN_VERSIONS:
        raise ExportError(f"unknown version {version}; choose from 0, 1, 2, 3 (or -1 for Hugging Face)")
    natural = "int8" if version == 2 else "fp32"
    dtype = natural if dtype is None else dtype
    allowed = V3_DTYPES if version == 3 else (natural,)
    if dtype not in allowed:
        raise ExportError(f"version {version} stores {' or '.join(allowed)} weights, not dtype={dtype!r}")
    if not 0 <= int(tokenizer_hash) < 2**32:
        raise ExportError(f"tokenizer_hash={tokenizer_hash} is not a uint32")
    if prompt_format != PROMPT_PLAIN and prompt_format not in PROMPT_LANGS:
        raise ExportError(f"prompt_format={prompt_format}; choose 0 (plain), 1 (instruct zh) or 2 (instruct en)")
    p = model.params
    quantized = dtype == "int8"
    gs = pick_group_size(p.dim, p.hidden_dim, group_size) if quantized else 0
    weight_type = {name: code for code, name in WEIGHT_NAMES.items()}[dtype]
    header = _header(model, version=version, weight_type=weight_type,
                     group_size=gs, tokenizer_hash=int(tokenizer_hash), prompt_format=prompt_format)

    def body(f):
        f.write(header)
        if version == 0:
            for t in _legacy_tensors(model):
                f.write(t.tobytes())
            return
        if dtype == "fp32":
            for t in _norms(model) + _matrices(model):
                f.write(t.tobytes())
            return
        if dtype == "bf16":  # norms stay fp32: a few kB, and exact (docs/formats.md)
            for t in _norms(model):
                f.write(t.tobytes())
            for t in _matrices(model):
                f.write(to_bf16(t).tobytes())
            return
        for t in _norms(model):
            f.write(t.tobytes())
        for t in _matrices(model):
            q, s = quantize_q80(t, gs)
            f.write(q.tobytes())
            f.write(s.tobytes())

    sweep_before_writing(path)
    fileio.atomic_write(path, body)
    return {"version": version, "dtype": dtype, "group_size": gs, "bytes": os.path.getsize(path)}


# ----------------------------------------------------------------------------------------------
# reading .bin

@dataclass
class BinHeader:
    """What a .bin file's header says. Fields a version does not record hold the llama2.c defaults."""
    version: int
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    max_seq_len: int
    shared_classifier: bool
    dtype: str  # "fp32", "int8" or "bf16"
    group_size: int  # 0 for fp32
    norm_eps: float = 1e-5  # versions 0-2 do not record it; llama2.c uses 1e-5
    rope_theta: float = 10000.0
    tokenizer_hash: int = 0  # 0 = not recorded
    prompt_format: int = PROMPT_PLAIN  # version 3 only: PROMPT_PLAIN or a PROMPT_LANGS key
    header_size: int = HEADER_SIZE

    def model_args(self) -> ModelArgs:
        return ModelArgs(dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
                         n_kv_heads=self.n_kv_heads, vocab_size=self.vocab_size,
                         hidden_dim=self.hidden_dim, norm_eps=self.norm_eps,
                         max_seq_len=self.max_seq_len, rope_theta=self.rope_theta,
                         tie_embeddings=self.shared_classifier)

    def expected_size(self) -> int:
        """The exact file size these fields imply, in bytes."""
        d, h, L, V = self.dim, self.hidden_dim, self.n_layers, self.vocab_size
        kv = self.n_kv_heads * (d // self.n_heads)
        n_norms = 2 * L * d + d
        mats = [V * d] + [d * d] * L + [kv * d] * L * 2 + [d * d] * L + [h * d] * L * 3
        if not self.shared_classifier:
            mats.append(V * d)
        n_mat = sum(mats)
        if self.version == 0:
            rope = 2 * self.max_seq_len * (d // self.n_heads) // 2
            return self.header_size + 4 * (n_norms + n_mat + rope)
        if self.dtype == "fp32":
            return self.header_size + 4 * (n_norms + n_mat)
        if self.dtype == "bf16":
            return self.header_size + 4 * n_norms + 2 * n_mat
        return self.header_size + 4 * n_norms + n_mat + 4 * (n_mat // self.group_size)


def require_regular_file(path: str, what: str = "model file") -> None:
    """ExportError unless path is a regular file: checked before any open, since opening a FIFO
    blocks until a writer comes (forever, for a typo), and a device never ends."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ExportError(f"{path}: {'no such file' if isinstance(e, FileNotFoundError) else e.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise ExportError(f"{path}: is {kind}, not a {what}")


def read_bin_header(path: str) -> BinHeader:
    """Parse and sanity-check a .bin header (any version); raises ExportError naming the file."""
    path = os.fspath(path)
    require_regular_file(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_SIZE)
        size = os.path.getsize(path)
    except OSError as e:
        raise ExportError(f"{path}: cannot read ({e.strerror})") from None
    if len(raw) < LEGACY_HEADER_SIZE:
        raise ExportError(f"{path}: only {len(raw)} bytes, too short for a model header")
    (magic,) = struct.unpack_from("<I", raw, 0)
    if magic != MAGIC:
        # No magic: the legacy version 0 layout, 7 int32 and a negative vocab_size for an unshared classifier.
        cfg = struct.unpack_from("<7i", raw, 0)
        vocab = cfg[5]
        hdr = BinHeader(0, cfg[0], cfg[1], cfg[2], cfg[3], cfg[4], abs(vocab), cfg[6],
                        shared_classifier=vocab > 0, dtype="fp32", group_size=0,
                        header_size=LEGACY_HEADER_SIZE)
    else:
        if len(raw) < HEADER_SIZE:
            raise ExportError(f"{path}: header truncated ({len(raw)} of {HEADER_SIZE} bytes)")
        (version,) = struct.unpack_from("<i", raw, 4)
        cfg = struct.unpack_from("<7i", raw, 8)
        shared = raw[36]
        if version == 1:
            hdr = BinHeader(1, *cfg, shared_classifier=bool(shared), dtype="fp32", group_size=0)
        elif version == 2:
            (gs,) = struct.unpack_from("<i", raw, 37)
            hdr = BinHeader(2, *cfg, shared_classifier=bool(shared), dtype="int8", group_size=gs)
        elif version == 3:
            wtype, pfmt, gs, eps, theta, tok_hash = struct.unpack_from("<BHiffI", raw, 37)
            if wtype not in WEIGHT_NAMES:
                raise ExportError(f"{path}: unknown weight_type {wtype} in version 3 header "
                                  f"(0 = fp32, 1 = int8, 2 = bf16)")
            if pfmt != PROMPT_PLAIN and pfmt not in PROMPT_LANGS:
                raise ExportError(f"{path}: unknown prompt_format {pfmt} in version 3 header "
                                  f"(0 = plain, 1 = instruct zh, 2 = instruct en); re-run export.py")
            hdr = BinHeader(3, *cfg, shared_classifier=bool(shared),
                            dtype=WEIGHT_NAMES[wtype],
                            group_size=gs if wtype == WEIGHT_INT8 else 0,
                            norm_eps=eps, rope_theta=theta, tokenizer_hash=tok_hash, prompt_format=pfmt)
        else:
            raise ExportError(f"{path}: unsupported model version {version} (this reads 0, 1, 2, 3)")
        if shared not in (0, 1):
            raise ExportError(f"{path}: shared_classifier byte is {shared}, expected 0 or 1")
    _check_header(path, hdr)
    want = hdr.expected_size()
    if size != want:
        raise ExportError(f"{path}: file is {size} bytes but its header implies {want} "
                          f"({'truncated' if size < want else 'trailing data'}); re-run export.py")
    return hdr


def _shape_problems(c, *, largest: int) -> list[str]:
    """What is wrong with the sizes of c (a BinHeader or ModelArgs): each size in 1..largest,
    then whole, even-sized heads and kv heads that divide the heads."""
    problems = [f"{name}={getattr(c, name)}" for name in
                ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len")
                if not 1 <= getattr(c, name) <= largest]
    if not problems:
        if c.dim % c.n_heads or (c.dim // c.n_heads) % 2:
            problems.append(f"dim={c.dim} does not split into n_heads={c.n_heads} even-sized heads")
        if c.n_heads % c.n_kv_heads:
            problems.append(f"n_heads={c.n_heads} is not a multiple of n_kv_heads={c.n_kv_heads}")
    return problems


def _check_header(path: str, h: BinHeader) -> None:
    problems = _shape_problems(h, largest=1 << 20)
    if not problems:
        if h.dtype == "int8" and (h.group_size < 1 or h.dim % h.group_size or h.hidden_dim % h.group_size):
            problems.append(f"group_size={h.group_size} does not divide dim={h.dim} and hidden_dim={h.hidden_dim}")
    if h.version == 3 and not (h.norm_eps > 0 and h.rope_theta > 0):
        problems.append(f"norm_eps={h.norm_eps}, rope_theta={h.rope_theta} must be positive")
    if problems:
        if h.version == 0:
            raise ExportError(f"{path}: not a model file (no version 1-3 magic, and as a legacy "
                              f"version 0 header it has {', '.join(problems)})")
        raise ExportError(f"{path}: bad version {h.version} header: {', '.join(problems)}")


def load_model_bin(path: str) -> Transformer:
    """Read a .bin file of version 0, 1, 2 or 3 into a new Transformer (int8 and bf16 weights widened to fp32).

    Version 0-2 files do not record norm_eps and rope_theta: llama2.c's 1e-5 and 10000 are used.
    The tokenizer hash, if any, is in read_bin_header(path).tokenizer_hash.
    """
    path = os.fspath(path)
    h = read_bin_header(path)
    with open(path, "rb") as f:
        f.seek(h.header_size)
        data = f.read()
    args = h.model_args()
    d = h.dim
    try:
        model = Transformer(args)  # random init, overwritten below; keeps the tie and the RoPE buffers
    except ValueError as e:
        raise ExportError(f"{path}: {e}") from None
    p = model.params
    kv = p.n_kv_heads * p.head_size
    pos = 0

    def take_f32(n: int) -> np.ndarray:
        nonlocal pos
        a = np.frombuffer(data, dtype="<f4", count=n, offset=pos)
        pos += 4 * n
        return a

    def take_bf16(n: int) -> np.ndarray:
        nonlocal pos
        a = np.frombuffer(data, dtype="<u2", count=n, offset=pos)
        pos += 2 * n
        return from_bf16(a)

    def take_q80(n: int) -> np.ndarray:
        nonlocal pos
        q = np.frombuffer(data, dtype=np.int8, count=n, offset=pos)
        pos += n
        s = np.frombuffer(data, dtype="<f4", count=n // h.group_size, offset=pos)
        pos += 4 * (n // h.group_size)
        return dequantize_q80(q, s, h.group_size)

    layers = model.layers
    sizes = {"wq": d * d, "wk": kv * d, "wv": kv * d, "wo": d * d,
             "w1": p.hidden_dim * d, "w2": d * p.hidden_dim, "w3": p.hidden_dim * d}

    def mod(layer, name):
        return getattr(layer.attention if name in ("wq", "wk", "wv", "wo") else layer.feed_forward, name)

    def put(param: torch.Tensor, values: np.ndarray) -> None:
        param.data.copy_(torch.from_numpy(values.copy()).view(param.shape))

    with torch.no_grad():
        if h.version == 0:
            put(model.tok_embeddings.weight, take_f32(h.vocab_size * d))
            for l in layers:
                put(l.attention_norm.weight, take_f32(d))
            for name in ("wq", "wk", "wv", "wo"):
                for l in layers:
                    put(mod(l, name).weight, take_f32(sizes[name]))
            for l in layers:
                put(l.ffn_norm.weight, take_f32(d))
            for name in ("w1", "w2", "w3"):
                for l in layers:
                    put(mod(l, name).weight, take_f32(sizes[name]))
            put(model.norm.weight, take_f32(d))
            take_f32(h.max_seq_len * p.head_size)  # the two legacy RoPE tables, recomputed by the model
        else:
            take = {"int8": take_q80, "bf16": take_bf16}.get(h.dtype, take_f32)
            for l in layers:
                put(l.attention_norm.weight, take_f32(d))
            for l in layers:
                put(l.ffn_norm.weight, take_f32(d))
            put(model.norm.weight, take_f32(d))
            put(model.tok_embeddings.weight, take(h.vocab_size * d))
            for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
                for l in layers:
                    put(mod(l, name).weight, take(sizes[name]))
        if not h.shared_classifier:
            take = {"int8": take_q80, "bf16": take_bf16}.get(h.dtype, take_f32)
            put(model.output.weight, take(h.vocab_size * d))
    assert pos == len(data), f"read {pos} of {len(data)} body bytes"
    _refuse_non_finite(model, path)
    return model.eval()


def _refuse_non_finite(model: Transformer, path: str) -> None:
    bad = non_finite_weight(model)
    if bad:
        raise ExportError(f"{path}: weight {bad}; the file is damaged or the run diverged")


# ----------------------------------------------------------------------------------------------
# Hugging Face export

HF_DTYPES = {"fp32": (torch.float32, "float32"), "fp16": (torch.float16, "float16"),
             "bf16": (torch.bfloat16, "bfloat16")}


def _hf_rotary_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of wq or wk (n_heads * head_size, dim) for Hugging Face's rotary convention.

    Ours rotates consecutive pairs (2i, 2i+1) of each head; Hugging Face's Llama rotates (i, i + hs/2)
    ("rotate_half"), both with frequency i. So within each head, new row i takes old row 2i and new
    row hs/2 + i takes old row 2i + 1: the same attention scores, with q and k permuted alike.
    """
    rows, cols = w.shape
    hs = rows // n_heads
    return w.view(n_heads, hs // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_state_dict(model: Transformer, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Our weights under LlamaForCausalLM's names (new contiguous tensors; the model is untouched).

    A shared classifier is left out (config.json says tie_word_embeddings=true instead).
    """
    p = model.params

    def t(x: torch.Tensor) -> torch.Tensor:
        return x.detach().to(device="cpu", dtype=dtype).contiguous().clone()

    sd = {"model.embed_tokens.weight": t(model.tok_embeddings.weight)}
    for i, l in enumerate(model.layers):
        pre = f"model.layers.{i}."
        a, f = l.attention, l.feed_forward
        sd[pre + "self_attn.q_proj.weight"] = t(_hf_rotary_rows(a.wq.weight, p.n_heads))
        sd[pre + "self_attn.k_proj.weight"] = t(_hf_rotary_rows(a.wk.weight, p.n_kv_heads))
        sd[pre + "self_attn.v_proj.weight"] = t(a.wv.weight)
        sd[pre + "self_attn.o_proj.weight"] = t(a.wo.weight)
        sd[pre + "mlp.gate_proj.weight"] = t(f.w1.weight)
        sd[pre + "mlp.down_proj.weight"] = t(f.w2.weight)
        sd[pre + "mlp.up_proj.weight"] = t(f.w3.weight)
        sd[pre + "input_layernorm.weight"] = t(l.attention_norm.weight)
        sd[pre + "post_attention_layernorm.weight"] = t(l.ffn_norm.weight)
    sd["model.norm.weight"] = t(model.norm.weight)
    if not _shared_classifier(model):
        sd["lm_head.weight"] = t(model.output.weight)
    return sd


def hf_config(model: Transformer, *, dtype: str = "fp32", bos_id: int = 1, eos_id: int = 2) -> dict:
    """config.json contents for LlamaForCausalLM. Both the transformers 4 spellings (rope_theta,
    torch_dtype) and the transformers 5 ones (rope_parameters, dtype) are written."""
    p = model.params
    name = HF_DTYPES[dtype][1]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": p.dim,
        "intermediate_size": p.hidden_dim,
        "num_attention_heads": p.n_heads,
        "num_key_value_heads": p.n_kv_heads,
        "num_hidden_layers": p.n_layers,
        "head_dim": p.dim // p.n_heads,
        "hidden_act": "silu",
        "rms_norm_eps": p.norm_eps,
        "rope_theta": p.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": p.rope_theta},
        "max_position_embeddings": p.max_seq_len,
        "vocab_size": p.vocab_size,
        "tie_word_embeddings": _shared_classifier(model),
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": name,
        "dtype": name,
        "use_cache": True,
    }


def sentencepiece_flags(sp) -> dict:
    """The few sentencepiece ModelProto settings the HF conversion needs (model_type,
    add_dummy_prefix, remove_extra_whitespaces, normalizer name), read by tokenizer.py's proto
    reader, so the protobuf package is not required."""
    from tokenizer import MODEL_TYPES, parse_model_proto

    spec = parse_model_proto(sp.serialized_model_proto())
    return {
        "model_type": MODEL_TYPES.get(spec.model_type, "unknown"),
        "normalizer": spec.normalizer_name or "nmt_nfkc",
        "add_dummy_prefix": spec.add_dummy_prefix,
        "remove_extra_whitespaces": spec.remove_extra_whitespaces,
    }


def _bpe_merges(sp) -> list[tuple[str, str]]:
    """BPE merges for Hugging Face's tokenizers, from a sentencepiece BPE vocab.

    sentencepiece BPE merges the adjacent pair whose joined piece scores highest; a ranked merge
    list gets the same effect by listing, for each piece from the best score down, every split of
    it into two pieces that are both in the vocab.
    """
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    normal = [i for i in range(n)
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))]
    merges = []
    for i in sorted(normal, key=lambda i: (-sp.get_score(i), i)):
        piece = sp.id_to_piece(i)
        splits = [(vocab[piece[:k]], vocab[piece[k:]]) for k in range(1, len(piece))
                  if piece[:k] in vocab and piece[k:] in vocab]
        merges += [(sp.id_to_piece(a), sp.id_to_piece(b)) for a, b in sorted(splits)]
    return merges


def _write_hf_tokenizer(tokenizer_model: str, folder: str, *, max_seq_len: int) -> list[str]:
    """Copy tokenizer.model and write tokenizer.json + tokenizer_config.json for LlamaTokenizer.

    Returns notes for the user (what the Hugging Face tokenizer cannot reproduce).
    """
    import sentencepiece as spm
    try:
        sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
    except (OSError, RuntimeError) as e:
        raise ExportError(f"{tokenizer_model}: not a sentencepiece model ({e})") from None
    shutil.copyfile(tokenizer_model, os.path.join(folder, "tokenizer.model"))
    flags = sentencepiece_flags(sp)
    notes = []
    special = {"unk_token": sp.id_to_piece(sp.unk_id()),
               "bos_token": sp.id_to_piece(sp.bos_id()) if sp.bos_id() >= 0 else None,
               "eos_token": sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None}
    if flags["model_type"] != "bpe":
        # LlamaTokenizer is a BPE tokenizer; a unigram vocab cannot be expressed as merges.
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                  "model_max_length": max_seq_len, **special}
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        notes.append(f"{tokenizer_model} is a {flags['model_type']} model: only tokenizer.model is "
                     f"exported (transformers needs the protobuf package to convert it)")
        return notes
    from transformers import LlamaTokenizer
    n = sp.get_piece_size()
    tok = LlamaTokenizer(vocab={sp.id_to_piece(i): i for i in range(n)}, merges=_bpe_merges(sp),
                         add_prefix_space=flags["add_dummy_prefix"], legacy=False,
                         add_bos_token=True, add_eos_token=False, model_max_length=max_seq_len,
                         **{k: v for k, v in special.items() if v is not None})
    tok.save_pretrained(folder)
    if flags["remove_extra_whitespaces"] or "nfkc" in flags["normalizer"]:
        notes.append("LlamaTokenizer has no normalizer: runs of spaces"
                     + (" and NFKC-normalized characters" if "nfkc" in flags["normalizer"] else "")
                     + " tokenize differently from sentencepiece (tokenizer.model is included)")
    return notes


def export_hf(model: Transformer, out_dir: str, *, dtype: str = "fp32",
              tokenizer_model: Optional[str] = None) -> list[str]:
    """Write a Hugging Face LlamaForCausalLM folder: config.json, model.safetensors, and with a
    tokenizer, tokenizer.model + tokenizer.json + tokenizer_config.json (LlamaTokenizer).

    Built in fileio's hidden temporary folder beside out_dir, then moved into place (files in an
    existing out_dir are replaced one by one, other files there are kept). Returns notes for the user.
    """
    from safetensors.torch import save as safetensors_bytes
    if dtype not in HF_DTYPES:
        raise ExportError(f"dtype={dtype!r} for Hugging Face export; choose from {', '.join(HF_DTYPES)}")
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ExportError(f"{out_dir}: exists and is not a folder")
    fileio.make_parent(out_dir)
    sweep_before_writing(out_dir)
    fileio.sweep_stale(out_dir)
    staging = str(fileio.temp_path(out_dir))
    shutil.rmtree(staging, ignore_errors=True)
    notes = []
    try:
        os.mkdir(staging)
        bos_id, eos_id = 1, 2
        if tokenizer_model:
            import sentencepiece as spm
            try:
                sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
            except (OSError, RuntimeError) as e:
                raise ExportError(f"{tokenizer_model}: not a sentencepiece model ({e})") from None
            if sp.get_piece_size() != model.params.vocab_size:
                raise ExportError(f"{tokenizer_model}: {sp.get_piece_size()} pieces but the model's "
                                  f"vocab_size is {model.params.vocab_size}")
            bos_id, eos_id = sp.bos_id(), sp.eos_id()
            notes += _write_hf_tokenizer(tokenizer_model, staging, max_seq_len=model.params.max_seq_len)
        else:
            notes.append("no tokenizer given: exported the model only (pass --tokenizer=data/tokN.model)")
        config = json.dumps(hf_config(model, dtype=dtype, bos_id=bos_id, eos_id=eos_id), indent=2) + "\n"
        _write_staged(staging, out_dir, "config.json", config.encode("utf-8"))
        # Serialized in memory and written by us, so that a full disk is an OSError we can name
        # (safetensors' own save_file reports it as a SafetensorError).
        weights = safetensors_bytes(hf_state_dict(model, HF_DTYPES[dtype][0]), metadata={"format": "pt"})
        _write_staged(staging, out_dir, "model.safetensors", weights)
        if not os.path.exists(out_dir):
            os.replace(staging, out_dir)
        else:
            for name in sorted(os.listdir(staging)):
                os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
            os.rmdir(staging)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        text = os_error_text(e, out_dir) if isinstance(e, Exception) and not isinstance(e, UserError) else None
        if text is not None:
            raise UserError(text) from None
        raise
    return notes


def _write_staged(staging: str, out_dir: str, name: str, data: bytes) -> None:
    """staging/name holding data; a failed write names out_dir/name, the file the user asked for."""
    try:
        with open(os.path.join(staging, name), "wb") as f:
            f.write(data)
    except OSError as e:
        raise UserError(os_error_text(OSError(e.errno, e.strerror), os.path.join(out_dir, name))) from None


# ----------------------------------------------------------------------------------------------
# GGUF export (llama.cpp, ollama)
#
# llama.cpp's "llama" architecture. Its rotary embedding for this architecture rotates consecutive
# pairs (x[2i], x[2i+1]) of each head, as model.py does, so wq and wk are written as they are (the
# row permutation in _hf_rotary_rows is for Hugging Face's rotate_half only; tests/test_gguf.py
# checks the logits). The tokenizer becomes llama.cpp's "llama" vocabulary: the sentencepiece
# pieces with their scores and types, which llama.cpp encodes by merging the best-scoring pair of
# neighbours, as sentencepiece's BPE does. The gguf package (llama.cpp's gguf-py) writes the file.

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
GGUF_BLOCK = 32  # GGUF's Q8_0: blocks of 32 consecutive values of a row, each with one fp16 scale


def _gguf_module():
    try:
        import gguf
    except ImportError as e:
        raise ExportError(f"GGUF export needs the gguf package; run `make venv` ({e})") from None
    return gguf


@dataclass
class GGUFVocab:
    """A sentencepiece model as GGUF's tokenizer.ggml.* keys hold it."""
    pieces: list[str]  # as in the .model, "▁" included
    scores: list[float]
    types: list[int]  # sentencepiece's piece types, numbered as GGUF's token types (1 normal ... 6 byte)
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int  # -1: none
    add_space_prefix: bool  # the normalizer's add_dummy_prefix
    hash: int  # tokenizer.Tokenizer.hash()


def gguf_vocab(tokenizer_model: str, *, vocab_size: int, recorded_hash: int = 0,
               strict: bool = True) -> GGUFVocab:
    """The tokenizer as llama.cpp will read it, after checking that llama.cpp encodes text with it
    exactly as sentencepiece does (strict=False skips those checks, for tests that measure what
    goes wrong). vocab_size and a nonzero recorded_hash (from a version 3 header or a checkpoint)
    must match the tokenizer. Raises ExportError naming the file."""
    import tokenizer as tokenizer_mod  # lazily, like tokenizer_hash()

    path = os.fspath(tokenizer_model)
    try:
        spec = tokenizer_mod.load_model_spec(path)
        tok = tokenizer_mod.Tokenizer(path)
    except tokenizer_mod.TokenizerError as e:
        raise ExportError(str(e)) from None
    if tok.vocab_size != vocab_size:
        raise ExportError(f"{path}: {tok.vocab_size} tokens but the model's vocab_size is {vocab_size}")
    if len(spec.pieces) != tok.vocab_size or any(tok.id_to_piece(i) != p for i, (p, _, _) in enumerate(spec.pieces)):
        raise ExportError(f"{path}: pieces read from the file differ from sentencepiece's")
    if recorded_hash and tok.hash() != recorded_hash:
        raise ExportError(f"{path}: tokenizer hash {tok.hash():#010x}, but the model was trained with "
                          f"{recorded_hash:#010x}; pass the tokenizer it was trained with")
    if tok.bos_id < 0 or tok.eos_id < 0:
        raise ExportError(f"{path}: needs BOS and EOS pieces (bos_id={tok.bos_id}, eos_id={tok.eos_id})")
    if strict:
        _check_gguf_tokenizer(spec, path)
    return GGUFVocab(pieces=[p for p, _, _ in spec.pieces], scores=[s for _, s, _ in spec.pieces],
                     types=[t for _, _, t in spec.pieces], bos_id=tok.bos_id, eos_id=tok.eos_id,
                     unk_id=tok.unk_id, pad_id=tok.pad_id, add_space_prefix=spec.add_dummy_prefix,
                     hash=tok.hash())


def _check_gguf_tokenizer(spec, path: str) -> None:
    """Refuse what llama.cpp's sentencepiece encoder does differently (tests/test_gguf.py measures
    each of these against the real llama.cpp). It has no normalizer: it only turns spaces into "▁"
    and adds the dummy prefix."""
    from tokenizer import MODEL_TYPES, USER_DEFINED

    kind = MODEL_TYPES.get(spec.model_type, str(spec.model_type))
    if kind != "bpe":
        raise ExportError(f"{path}: a {kind} tokenizer; llama.cpp encodes a sentencepiece vocabulary "
                          "by BPE merges, which segments differently (retrain with model_type=bpe)")
    if spec.remove_extra_whitespaces:
        raise ExportError(f"{path}: trained with remove_extra_whitespaces=true, which llama.cpp ignores, "
                          "so runs of spaces tokenize differently (retrain with it off, as tinystories.py does)")
    if spec.precompiled_charsmap:
        raise ExportError(f"{path}: normalizes text ({spec.normalizer_name or 'nmt_nfkc'}), which llama.cpp "
                          "does not (retrain with normalization_rule_name=identity, as tinystories.py does)")
    if not spec.escape_whitespaces or spec.treat_whitespace_as_suffix or spec.denormalizer_charsmap:
        raise ExportError(f"{path}: whitespace handling llama.cpp does not have (escape_whitespaces off, "
                          "treat_whitespace_as_suffix or a denormalizer)")
    if not spec.byte_fallback:
        raise ExportError(f"{path}: trained without byte_fallback; llama.cpp has no <unk> fallback and "
                          "fails on characters outside the vocabulary (retrain with byte_fallback=true)")
    if spec.add_dummy_prefix and any(t == USER_DEFINED for _, _, t in spec.pieces):
        raise ExportError(f"{path}: user-defined pieces with add_dummy_prefix; llama.cpp adds the "
                          "prefix after each of them, so text around them tokenizes differently")


def _check_gguf_shape(p: ModelArgs, path: str) -> None:
    """What llama.cpp's llama architecture needs: whole, even-sized heads, kv heads dividing the
    heads, sizes that fit its int32 fields, and norm_eps and rope_theta positive as float32."""
    problems = _shape_problems(p, largest=2**31 - 1)
    for name in ("norm_eps", "rope_theta"):
        v = float(np.float32(getattr(p, name)))
        if not (np.isfinite(v) and v > 0):
            problems.append(f"{name}={getattr(p, name)} is not a positive float32")
    if problems:
        raise ExportError(f"{path}: GGUF's llama architecture cannot hold this model: {', '.join(problems)}")


def _gguf_tensors(model: Transformer) -> list[tuple[str, np.ndarray]]:
    """(llama.cpp name, fp32 array) in llama.cpp's order. A numpy (rows, cols) array is a GGUF tensor
    of ne = [cols, rows], which is how llama.cpp wants an nn.Linear weight (out, in). A shared
    classifier is left out: llama.cpp then uses token_embd for the output."""
    out = [("token_embd.weight", _f32(model.tok_embeddings.weight))]
    for i, l in enumerate(model.layers):
        a, f = l.attention, l.feed_forward
        out += [(f"blk.{i}.attn_norm.weight", _f32(l.attention_norm.weight)),
                (f"blk.{i}.attn_q.weight", _f32(a.wq.weight)),
                (f"blk.{i}.attn_k.weight", _f32(a.wk.weight)),
                (f"blk.{i}.attn_v.weight", _f32(a.wv.weight)),
                (f"blk.{i}.attn_output.weight", _f32(a.wo.weight)),
                (f"blk.{i}.ffn_norm.weight", _f32(l.ffn_norm.weight)),
                (f"blk.{i}.ffn_gate.weight", _f32(f.w1.weight)),
                (f"blk.{i}.ffn_down.weight", _f32(f.w2.weight)),
                (f"blk.{i}.ffn_up.weight", _f32(f.w3.weight))]
    out.append(("output_norm.weight", _f32(model.norm.weight)))
    if not _shared_classifier(model):
        out.append(("output.weight", _f32(model.output.weight)))
    return out


def write_gguf(model: Transformer, path: str, *, dtype: str = "f32", tokenizer_model: str,
               tokenizer_hash: int = 0, strict_tokenizer: bool = True) -> dict:
    """Write model and its sentencepiece tokenizer as a GGUF file for llama.cpp and ollama.

    dtype: "f32", "f16", "bf16" or "q8_0" for the matrices; norms stay f32, and with q8_0 a matrix whose
    rows are not a multiple of 32 values is stored f16. tokenizer_hash: the hash the model was
    trained with (0 = unknown), checked against the tokenizer. The folder must exist. Returns a
    summary: dtype, bytes, and the number of tensors per stored type.
    """
    gguf = _gguf_module()
    if dtype not in GGUF_DTYPES:
        raise ExportError(f"dtype={dtype!r} for GGUF; choose from {', '.join(GGUF_DTYPES)}")
    path = os.fspath(path)
    _require_folder(path)
    p = model.params
    _check_gguf_shape(p, path)
    vocab = gguf_vocab(tokenizer_model, vocab_size=p.vocab_size, recorded_hash=tokenizer_hash,
                       strict=strict_tokenizer)
    q8 = gguf.GGMLQuantizationType.Q8_0
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]

    w = gguf.GGUFWriter(None, "llama")  # no path: it writes to our temporary file below
    w.add_name(os.path.splitext(os.path.basename(path))[0])
    w.add_file_type(int(file_type))
    if dtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(p.vocab_size)
    w.add_context_length(p.max_seq_len)
    w.add_embedding_length(p.dim)
    w.add_feed_forward_length(p.hidden_dim)
    w.add_block_count(p.n_layers)
    w.add_head_count(p.n_heads)
    w.add_head_count_kv(p.n_kv_heads)
    w.add_layer_norm_rms_eps(p.norm_eps)
    w.add_rope_freq_base(p.rope_theta)
    w.add_rope_dimension_count(p.head_size)

    w.add_tokenizer_model("llama")  # llama.cpp's sentencepiece vocabulary
    w.add_token_list(vocab.pieces)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)
    w.add_unk_token_id(vocab.unk_id)
    if vocab.pad_id >= 0:
        w.add_pad_token_id(vocab.pad_id)
    w.add_add_bos_token(True)  # our models always start from BOS (run.c, train.py's shards)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(vocab.add_space_prefix)

    stored = {}
    for name, t in _gguf_tensors(model):
        if t.ndim == 1 or dtype == "f32":
            data, raw, kind = t, None, "f32"
        elif dtype == "bf16":  # the same rounding as our bf16 .bin (gguf-py's matches torch's)
            bf = gguf.GGMLQuantizationType.BF16
            data, raw, kind = gguf.quants.quantize(t, bf), bf, "bf16"
        elif dtype == "q8_0" and t.shape[-1] % GGUF_BLOCK == 0:
            data, raw, kind = gguf.quants.quantize(t, q8), q8, "q8_0"  # from fp32, rounded as ggml does
        else:
            data, raw, kind = t.astype(np.float16), None, "f16"
        w.add_tensor(name, data, raw_dtype=raw)
        stored[kind] = stored.get(kind, 0) + 1

    def body(f):
        # The writer's own state for "output file open", reached here with our file object.
        w.fout, w.state = [f], gguf.WriterState.EMPTY
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.fout = None  # fileio.atomic_write closes f

    sweep_before_writing(path)
    fileio.atomic_write(path, body)
    return {"dtype": dtype, "bytes": os.path.getsize(path), "stored": stored}


def _require_folder(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ExportError(f"{path}: folder {folder} does not exist (create it first)")


# run.c's sampling defaults (-t 1.0, -p 0.9, -k 0 = off, -n 256) and no repeat penalty, which
# ollama would otherwise apply (1.1).
MODELFILE = """# ollama: `ollama create NAME -f {modelfile}`, then `ollama run NAME 从前` (written by export.py)
FROM ./{gguf}
# Our models continue text: the prompt goes in unchanged (the GGUF's tokenizer adds BOS).
TEMPLATE "{{{{ .Prompt }}}}"
PARAMETER stop "</s>"
# The C engine's defaults: ./run -t 1.0 -p 0.9 -k 0 -n 256
PARAMETER temperature 1.0
PARAMETER top_p 0.9
PARAMETER top_k 0
PARAMETER num_predict 256
PARAMETER repeat_penalty 1.0
PARAMETER num_ctx {num_ctx}
"""


def write_modelfile(gguf_path: str, *, max_seq_len: int) -> str:
    """An ollama Modelfile named Modelfile next to gguf_path, pointing at it; returns its path."""
    gguf_path = os.fspath(gguf_path)
    out = os.path.join(os.path.dirname(os.path.abspath(gguf_path)), "Modelfile")
    name = os.path.basename(gguf_path)
    if any(c.isspace() or c in "\"'" for c in name):
        raise ExportError(f"{gguf_path}: a Modelfile's FROM cannot name a file with spaces or quotes")
    text = MODELFILE.format(modelfile="Modelfile", gguf=name, num_ctx=max_seq_len)
    fileio.write_text(out, text)
    return out


# ----------------------------------------------------------------------------------------------
# checkpoints and the command line

def load_checkpoint(path: str) -> tuple[Transformer, dict]:
    """A model from train.py's checkpoint (.pt) or from any .bin; returns (model in eval mode, info).

    info holds 'config' (the training config dict, {} for a .bin), 'tokenizer_hash' (from a
    version 3 .bin header or the checkpoint's data record, else 0 = not recorded) and
    'prompt_format' (likewise; PROMPT_PLAIN when nothing says the model was trained on instructions).
    """
    path = os.fspath(path)
    require_regular_file(path, "checkpoint or model file")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ExportError(f"{path}: cannot read ({e.strerror})") from None
    if head[:2] != b"PK":  # torch.save writes a zip archive; anything else must be a model .bin
        h = read_bin_header(path)
        return load_model_bin(path), {"config": {}, "tokenizer_hash": h.tokenizer_hash,
                                      "prompt_format": h.prompt_format}
    model, ckpt = checkpoint.model_from_checkpoint(path)  # format, version, fit and finite checked there
    return model, {"config": dict(ckpt.get("config") or {}), "tokenizer_hash": checkpoint.tokenizer_hash(ckpt),
                   "prompt_format": prompt_format_of(ckpt)}


def prompt_format_of(ckpt: dict) -> int:
    """The prompt format a checkpoint's data record states: an instruct language when train.py
    recorded one (data.instruct.lang, "zh" or "en"), else PROMPT_PLAIN."""
    data = ckpt.get("data") if isinstance(ckpt.get("data"), dict) else {}
    rec = data.get("instruct")
    lang = rec.get("lang") if isinstance(rec, dict) else None
    by_lang = {v: k for k, v in PROMPT_LANGS.items()}
    return by_lang.get(lang, PROMPT_PLAIN)


def default_tokenizer(config: dict, vocab_size: int) -> Optional[str]:
    """The tokenizer a checkpoint was trained with: the config's `tokenizer`, else `<data_dir>.model`
    (train.py's default), else data/tok<vocab_size>.model; the first that exists, or None."""
    candidates = [config.get("tokenizer")]
    data_dir = config.get("data_dir")
    if isinstance(data_dir, str) and data_dir:
        candidates.append(data_dir.rstrip("/\\") + ".model")  # train.py's default: <data_dir>.model
    candidates.append(os.path.join("data", f"tok{vocab_size}.model"))
    for path in candidates:
        if isinstance(path, str) and path and os.path.isfile(path):
            return path
    return None


def check_tokenizer_identity(*, model_path: str, recorded: int, tokenizer_path: str, actual: int) -> None:
    """The one-line refusal of a tokenizer whose hash is not the one the model file records
    (recorded 0 = nothing recorded, anything goes). Shared by export.py and sample.py, hence UserError."""
    if recorded and actual != recorded:
        raise UserError(f"{tokenizer_path}: tokenizer hash {actual:#010x} differs from the {recorded:#010x} "
                          f"that {model_path} records; pass the tokenizer the model was trained with")


def pick_tokenizer_hash(*, model_path: str, recorded: int, tokenizer_path: Optional[str],
                        vocab_size: int, retokenized: bool = False) -> int:
    """The tokenizer hash an export stamps: the recorded one, checked against tokenizer_path if
    one is given; another tokenizer's only with retokenized=True (the user says the weights were
    retrained for it). Without a recorded hash, tokenizer_path's (0 if none)."""
    if retokenized and not tokenizer_path:
        raise ExportError("--retokenized=true needs --tokenizer=PATH, the tokenizer to record instead")
    if not tokenizer_path:
        return recorded
    actual = tokenizer_hash(tokenizer_path, vocab_size=vocab_size)
    if not retokenized:
        check_tokenizer_identity(model_path=model_path, recorded=recorded, tokenizer_path=tokenizer_path,
                                 actual=actual)
    return actual


def tokenizer_hash(tokenizer_model: str, *, vocab_size: Optional[int] = None) -> int:
    """tokenizer.Tokenizer(path).hash(): what a version 3 header records (tokenizer.py is imported
    lazily). With vocab_size, a tokenizer of another size is an error."""
    try:
        import tokenizer as tokenizer_mod
    except ImportError as e:
        raise ExportError(f"cannot hash {tokenizer_model}: tokenizer.py is not importable ({e})") from None
    try:
        tok = tokenizer_mod.Tokenizer(tokenizer_model)
    except (OSError, RuntimeError, ValueError, tokenizer_mod.TokenizerError) as e:
        raise ExportError(str(e) if tokenizer_model in str(e) else f"{tokenizer_model}: {e}") from None
    if vocab_size is not None and tok.vocab_size != vocab_size:
        raise ExportError(f"{tokenizer_model}: {tok.vocab_size} tokens but the model's vocab_size is {vocab_size}")
    return int(tok.hash())


@dataclass
class ExportConfig:
    out: str = opt("", "output .bin or .gguf file, or folder for --version=-1 (the positional OUT)")
    checkpoint: str = opt("out/ckpt.pt", "train.py checkpoint (.pt) or any model .bin")
    version: str = opt("3", "3 (ours), 0 (legacy llama2.c), 1 (fp32), 2 (int8), -1 (Hugging Face folder), "
                            "gguf (llama.cpp / ollama file, plus a Modelfile beside it)")
    dtype: str = opt("", "weight storage; \"\" = the version's own. 3: fp32|int8|bf16; -1: fp32|fp16|bf16; "
                         "gguf: f32|f16|bf16|q8_0; 0/1: fp32; 2: int8")
    group_size: int = opt(DEFAULT_GROUP_SIZE, "int8 group size, halved until it divides dim and hidden_dim")
    tokenizer: str = opt("", "sentencepiece .model: hashed into version 3 headers, exported for Hugging Face "
                             "and GGUF; \"\" = the checkpoint's, else data/tok<vocab_size>.model")
    retokenized: bool = opt(False, "true: record --tokenizer's hash although the checkpoint records another "
                                   "(only when the weights really were retrained for that tokenizer); without "
                                   "it such a tokenizer is refused, and a .bin -> .bin conversion keeps the "
                                   "recorded hash")


def usage() -> str:
    """export.py --help."""
    return render_help(ExportConfig, "python export.py OUT [--key=value ...]", __doc__, positional="out")


def _parse_version(text: str):
    """--version's value: an int of BIN_VERSIONS or -1, or "gguf"."""
    word = text.strip().lower()
    if word == "gguf":
        return word
    try:
        version = int(word)
    except ValueError:
        version = None
    if version not in BIN_VERSIONS + (-1,):
        raise OptionError(f"unknown version {text}; choose from 0, 1, 2, 3, -1 for Hugging Face, or gguf")
    return version


def _main_gguf(cfg: ExportConfig) -> int:
    """export.py OUT --version=gguf: the .gguf and a Modelfile beside it."""
    dtype = cfg.dtype or "f32"
    if dtype not in GGUF_DTYPES:
        raise OptionError(f"--dtype={cfg.dtype} for GGUF; choose from {', '.join(GGUF_DTYPES)}")
    _require_folder(cfg.out)  # before the (possibly slow) checkpoint load
    if any(c.isspace() or c in "\"'" for c in os.path.basename(cfg.out)):
        raise ExportError(f"{cfg.out}: the Modelfile's FROM cannot name a file with spaces or quotes")
    if cfg.tokenizer and not os.path.isfile(cfg.tokenizer):
        raise ExportError(f"{cfg.tokenizer}: no such tokenizer file")
    model, info = load_checkpoint(cfg.checkpoint)
    tok = cfg.tokenizer or default_tokenizer(info["config"], model.params.vocab_size)
    if not tok:
        raise ExportError(f"{cfg.out}: GGUF needs the model's tokenizer; pass --tokenizer=data/tok"
                          f"{model.params.vocab_size}.model")
    summary = write_gguf(model, cfg.out, dtype=dtype, tokenizer_model=tok,
                         tokenizer_hash=info["tokenizer_hash"])
    modelfile = write_modelfile(cfg.out, max_seq_len=model.params.max_seq_len)
    stored = ", ".join(f"{n} {k}" for k, n in sorted(summary["stored"].items()))
    print(f"wrote {cfg.out} (GGUF llama, {dtype}: tensors {stored}; tokenizer {tok}, "
          f"{summary['bytes']} bytes)")
    print(f"wrote {modelfile} (ollama create NAME -f {modelfile})")
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2  # no arguments is a usage error: nothing to export
    return cli("export.py", lambda: _main(argv))


def _main(argv: list[str]) -> int:
    cfg = apply_options(ExportConfig(), argv, positional="out")
    if not cfg.out:
        raise OptionError("no output path given (python export.py OUT ...)")
    if cfg.group_size < 1:
        raise OptionError(f"--group_size={cfg.group_size} must be >= 1")
    version = _parse_version(cfg.version)
    if version == "gguf":
        return _main_gguf(cfg)
    # Check the dtype before the (possibly slow) checkpoint load.
    dtype = cfg.dtype or None
    if version == -1 and (dtype or "fp32") not in HF_DTYPES:
        raise OptionError(f"--dtype={cfg.dtype} for Hugging Face export; choose from {', '.join(HF_DTYPES)}")
    if version in BIN_VERSIONS and dtype is not None:
        allowed = V3_DTYPES if version == 3 else (("int8",) if version == 2 else ("fp32",))
        if dtype not in allowed:
            raise OptionError(f"version {version} stores {' or '.join(allowed)} weights, not --dtype={dtype}")
    if cfg.retokenized and not cfg.tokenizer:
        raise OptionError("--retokenized=true needs --tokenizer=PATH, the tokenizer to record instead")
    if cfg.tokenizer and not os.path.isfile(cfg.tokenizer):
        raise ExportError(f"{cfg.tokenizer}: no such tokenizer file")
    model, info = load_checkpoint(cfg.checkpoint)
    recorded = info["tokenizer_hash"]
    tok = cfg.tokenizer or default_tokenizer(info["config"], model.params.vocab_size)
    # An explicit --tokenizer is always checked against the recorded hash, and so is the one a
    # Hugging Face folder will hold; a .bin whose input records a hash keeps it whatever
    # tokenizer of that size happens to lie in data/.
    checked = tok if cfg.tokenizer or (tok and (version == -1 or (version == 3 and not recorded))) else None
    tok_hash = pick_tokenizer_hash(model_path=cfg.checkpoint, recorded=recorded, tokenizer_path=checked,
                                   vocab_size=model.params.vocab_size, retokenized=cfg.retokenized)
    if version == -1:
        notes = export_hf(model, cfg.out, dtype=dtype or "fp32", tokenizer_model=tok)
        for note in notes:
            print(f"export.py: note: {note}", file=sys.stderr)
        print(f"wrote {cfg.out} (Hugging Face LlamaForCausalLM, {dtype or 'fp32'}"
              f"{', tokenizer ' + tok if tok else ''})")
        return 0
    pfmt = info["prompt_format"]
    if pfmt != PROMPT_PLAIN and version != 3:
        print(f"export.py: note: version {version} has no prompt_format field; this instruct model "
              f"will look plain to ./run (use --version=3)", file=sys.stderr)
    summary = write_model_bin(model, cfg.out, version=version, dtype=dtype, group_size=cfg.group_size,
                              tokenizer_hash=tok_hash, prompt_format=pfmt if version == 3 else PROMPT_PLAIN)
    extra = f", group_size {summary['group_size']}" if summary["dtype"] == "int8" else ""
    extra += f", tokenizer hash {tok_hash:#010x}" if version == 3 and tok_hash else ""
    extra += f", instruct prompts ({PROMPT_LANGS[pfmt]})" if version == 3 and pfmt in PROMPT_LANGS else ""
    print(f"wrote {cfg.out} (version {version}, {summary['dtype']}{extra}, {summary['bytes']} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
