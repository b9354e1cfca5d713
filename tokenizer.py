"""Sentencepiece tokenizer wrapper and exporter to the C engine's tokenizer file.

`Tokenizer` wraps a sentencepiece .model (encode with optional BOS/EOS, decode,
special ids, the tokenizer hash recorded in model and shard headers).
Running this file writes the .model's pieces, piece types, special ids and
normalizer (flags and precompiled charsmap) to a .bin that run.c reads, so the
C encoder produces exactly sentencepiece's ids. Only BPE models are exported:
unigram (and word/char) models are refused, because run.c implements only the
BPE encoder.

Examples:
    python tokenizer.py --tokenizer_model=data/tok5000.model           # -> data/tok5000.bin
    python tokenizer.py --tokenizer_model=data/tok5000.model --legacy  # llama2.c format
    python tokenizer.py --tokenizer_model=tok.model --output=/tmp/tok.bin
    python -c "from tokenizer import Tokenizer; t = Tokenizer('data/tok5000.model'); print(t.encode('从前', bos=True))"

File format: a 64-byte header (magic "aktk", version 1, sizes, flags, special ids, the tokenizer
hash), the normalizer's charsmap and unk surface, then each piece's score, type and UTF-8 bytes;
docs/formats.md has it byte by byte, and llama2.c's legacy format.
"""

from __future__ import annotations

import os
import struct
import sys
from dataclasses import dataclass

import sentencepiece as spm

import fileio
from options import OptionError, UserError, apply_options, cli, opt, render_help

MAGIC = 0x6B746B61  # b"aktk" read as a little-endian uint32
VERSION = 1
HEADER_SIZE = 64

# ModelProto.SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# TrainerSpec.ModelType
MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}

SPACE_SYMBOL = "\u2581"


class TokenizerError(UserError):
    """A tokenizer file that cannot be used; the message names the file."""


# ---------------------------------------------------------------------------
# Protobuf wire format: enough to read sentencepiece's ModelProto without the
# protobuf package (sentencepiece ships sentencepiece_model_pb2, but it needs
# protobuf, which is not a dependency of this project).

def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def parse_fields(data: bytes) -> list[tuple[int, int, object]]:
    """Splits one protobuf message into (field number, wire type, value).

    value is an int for varints (wire type 0), bytes for length-delimited
    fields (2), and the raw 4 or 8 bytes for fixed32 (5) / fixed64 (1).
    Raises ValueError on malformed input.
    """
    fields = []
    pos = 0
    n = len(data)
    while pos < n:
        key, pos = _read_varint(data, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise ValueError("field number 0")
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire == 1:
            if pos + 8 > n:
                raise ValueError("truncated fixed64")
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            if pos + length > n:
                raise ValueError("length-delimited field runs past the end")
            value, pos = data[pos:pos + length], pos + length
        elif wire == 5:
            if pos + 4 > n:
                raise ValueError("truncated fixed32")
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        fields.append((field, wire, value))
    return fields


def _signed(v: int) -> int:
    """int32 fields are varint-encoded as 64-bit two's complement."""
    return v - (1 << 64) if v >= (1 << 63) else v


@dataclass
class ModelSpec:
    """What tokenizer export needs from a ModelProto (defaults as in the proto)."""
    pieces: list[tuple[str, float, int]]  # (piece, score, type)
    model_type: int = 1  # UNIGRAM is the proto default
    byte_fallback: bool = False
    treat_whitespace_as_suffix: bool = False
    unk_surface: str = " \u2047 "
    normalizer_name: str = ""
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True
    denormalizer_charsmap: bytes = b""


def _parse_normalizer(data: bytes, spec: ModelSpec, *, denormalizer: bool) -> None:
    for field, wire, value in parse_fields(data):
        if denormalizer:
            if field == 2 and wire == 2:
                spec.denormalizer_charsmap = value
            continue
        if field == 1 and wire == 2:
            spec.normalizer_name = value.decode("utf-8")
        elif field == 2 and wire == 2:
            spec.precompiled_charsmap = value
        elif field == 3 and wire == 0:
            spec.add_dummy_prefix = bool(value)
        elif field == 4 and wire == 0:
            spec.remove_extra_whitespaces = bool(value)
        elif field == 5 and wire == 0:
            spec.escape_whitespaces = bool(value)


def parse_model_proto(data: bytes) -> ModelSpec:
    """Reads pieces, trainer and normalizer settings from a serialized ModelProto."""
    spec = ModelSpec(pieces=[])
    for field, wire, value in parse_fields(data):
        if field == 1 and wire == 2:  # repeated SentencePiece pieces
            piece, score, ptype = "", 0.0, NORMAL
            for f, w, v in parse_fields(value):
                if f == 1 and w == 2:
                    piece = v.decode("utf-8")
                elif f == 2 and w == 5:
                    score = struct.unpack("<f", v)[0]
                elif f == 3 and w == 0:
                    ptype = v
            spec.pieces.append((piece, score, ptype))
        elif field == 2 and wire == 2:  # TrainerSpec
            for f, w, v in parse_fields(value):
                if f == 3 and w == 0:
                    spec.model_type = v
                elif f == 35 and w == 0:
                    spec.byte_fallback = bool(v)
                elif f == 24 and w == 0:
                    spec.treat_whitespace_as_suffix = bool(v)
                elif f == 44 and w == 2:
                    spec.unk_surface = v.decode("utf-8")
        elif field == 3 and wire == 2:
            _parse_normalizer(value, spec, denormalizer=False)
        elif field == 5 and wire == 2:
            _parse_normalizer(value, spec, denormalizer=True)
    return spec


# ---------------------------------------------------------------------------

def fnv1a_pieces(pieces) -> int:
    """The contract's tokenizer hash: FNV-1a (32-bit) over each piece's UTF-8
    bytes followed by a 0 byte, in id order; never 0."""
    h = 0x811C9DC5
    for p in pieces:
        for b in p.encode("utf-8") + b"\0":
            h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h or 1


class Tokenizer:
    """A sentencepiece model: `Tokenizer('data/tok5000.model').encode('从前', bos=True)`."""

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            if os.path.exists(model_path):  # a FIFO, a device, a folder: refused before any open
                raise TokenizerError(f"{model_path}: not a regular file, not a tokenizer model")
            raise TokenizerError(f"{model_path}: no such tokenizer model (train one with tinystories.py)")
        self.model_path = model_path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(model_path)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{model_path}: not a sentencepiece model ({str(e).splitlines()[0]})") from None
        self.vocab_size: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.unk_id: int = self.sp.unk_id()
        self.pad_id: int = self.sp.pad_id()
        self._hash: int | None = None

    def encode(self, s: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(s)
        if bos and self.bos_id >= 0:
            ids = [self.bos_id] + ids
        if eos and self.eos_id >= 0:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def hash(self) -> int:
        """uint32 fingerprint recorded in model and shard headers (never 0)."""
        if self._hash is None:
            self._hash = fnv1a_pieces(self.sp.id_to_piece(i) for i in range(self.vocab_size))
        return self._hash


def load_model_spec(model_path: str) -> ModelSpec:
    try:
        with open(model_path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TokenizerError(f"{model_path}: cannot read ({e.strerror})") from None
    try:
        spec = parse_model_proto(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{model_path}: not a sentencepiece model ({e})") from None
    if not spec.pieces:
        raise TokenizerError(f"{model_path}: not a sentencepiece model (no pieces)")
    return spec


def _check_exportable(spec: ModelSpec, model_path: str) -> None:
    if spec.model_type != 2:
        name = MODEL_TYPES.get(spec.model_type, str(spec.model_type))
        raise TokenizerError(f"{model_path}: a {name} model; run.c encodes only BPE models "
                             "(retrain with model_type=bpe)")
    if spec.treat_whitespace_as_suffix:
        raise TokenizerError(f"{model_path}: treat_whitespace_as_suffix is not supported by run.c")
    if spec.denormalizer_charsmap:
        raise TokenizerError(f"{model_path}: a denormalizer is not supported by run.c")
    types = [t for _, _, t in spec.pieces]
    if types.count(UNKNOWN) != 1:
        raise TokenizerError(f"{model_path}: needs exactly one unknown piece, has {types.count(UNKNOWN)}")
    for i, (piece, _, t) in enumerate(spec.pieces):
        if t not in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE):
            raise TokenizerError(f"{model_path}: piece {i} has unknown type {t}")


def tokenizer_bytes(model_path: str) -> bytes:
    """Our format (see the module docstring)."""
    spec = load_model_spec(model_path)
    _check_exportable(spec, model_path)
    tok = Tokenizer(model_path)
    pieces = [p for p, _, _ in spec.pieces]
    if len(pieces) != tok.vocab_size or any(tok.id_to_piece(i) != p for i, p in enumerate(pieces)):
        raise TokenizerError(f"{model_path}: pieces read from the file differ from sentencepiece's")
    encoded = [p.encode("utf-8") for p in pieces]
    unk_surface = spec.unk_surface.encode("utf-8")
    header = struct.pack(
        "<IiiiiBBBBiiiiIII",
        MAGIC, VERSION, len(pieces), max(len(b) for b in encoded), spec.model_type,
        int(spec.add_dummy_prefix), int(spec.remove_extra_whitespaces),
        int(spec.escape_whitespaces), int(spec.byte_fallback),
        tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id,
        fnv1a_pieces(pieces), len(spec.precompiled_charsmap), len(unk_surface))
    header += b"\0" * (HEADER_SIZE - len(header))
    parts = [header, spec.precompiled_charsmap, unk_surface]
    for b, (_, score, ptype) in zip(encoded, spec.pieces):
        parts.append(struct.pack("<fBI", score, ptype, len(b)))
        parts.append(b)
    return b"".join(parts)


def legacy_tokenizer_bytes(model_path: str) -> bytes:
    """llama2.c's format: uint32 max_token_length, then per piece float32
    score, uint32 length, bytes, with U+2581 as ' ', BOS/EOS as "\\n<s>\\n" /
    "\\n</s>\\n". It loses types, special ids and the normalizer, so readers
    assume unk=0, bos=1, eos=2 and llama2.c's training flags."""
    spec = load_model_spec(model_path)
    _check_exportable(spec, model_path)
    tok = Tokenizer(model_path)
    if (tok.unk_id, tok.bos_id, tok.eos_id) != (0, 1, 2):
        raise TokenizerError(f"{model_path}: the legacy format needs unk=0, bos=1, eos=2, "
                             f"this model has {tok.unk_id}, {tok.bos_id}, {tok.eos_id}")
    entries = []
    for i, (piece, score, _) in enumerate(spec.pieces):
        if i == tok.bos_id:
            b = b"\n<s>\n"
        elif i == tok.eos_id:
            b = b"\n</s>\n"
        else:
            b = piece.replace(SPACE_SYMBOL, " ").encode("utf-8")
        entries.append((score, b))
    out = [struct.pack("<I", max(len(b) for _, b in entries))]
    for score, b in entries:
        out.append(struct.pack("<fI", score, len(b)))
        out.append(b)
    return b"".join(out)


def export_tokenizer(model_path: str, out_path: str | None = None, *, legacy: bool = False) -> str:
    """Writes the .bin for run.c next to the .model (or to out_path); returns its path."""
    if out_path is None:
        out_path = os.path.splitext(model_path)[0] + ".bin"
    data = legacy_tokenizer_bytes(model_path) if legacy else tokenizer_bytes(model_path)
    fileio.write_bytes(out_path, data)
    return out_path


# ---------------------------------------------------------------------------
# CLI

@dataclass
class ExportConfig:
    tokenizer_model: str = opt("", "path of the sentencepiece .model to export (required)")
    output: str = opt("", "where to write the .bin; '' means the .model path with .bin")
    legacy: bool = opt(False, "write llama2.c's tokenizer.bin format instead of ours")


USAGE = "python tokenizer.py --tokenizer_model=PATH.model [--output=PATH.bin] [--legacy]"


def parse_config(argv: list[str]) -> ExportConfig:
    """The exporter's options (options.py's parser); OptionError with a one-line message."""
    cfg = apply_options(ExportConfig(), argv)
    if not cfg.tokenizer_model:
        raise OptionError("--tokenizer_model=path/to/tok.model is required")
    return cfg


def export_main(cfg: ExportConfig) -> None:
    out = export_tokenizer(cfg.tokenizer_model, cfg.output or None, legacy=cfg.legacy)
    tok = Tokenizer(cfg.tokenizer_model)
    print(f"wrote {out} ({'llama2.c legacy' if cfg.legacy else 'v' + str(VERSION)} format, "
          f"vocab {tok.vocab_size}, hash {tok.hash():#010x})")


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(render_help(ExportConfig, USAGE, "Write a sentencepiece .model as the .bin run.c reads."))
        return 0
    return cli("tokenizer.py", lambda: export_main(parse_config(argv)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
