"""Tokenizer tests: the C tokenizer (run_tok.c) against the real sentencepiece library.

Several tiny sentencepiece BPE models are trained here (identity and nmt_nfkc normalization,
byte fallback on and off, whitespace handling on and off, user-defined symbols, vocab 300 to
32000), exported with tokenizer.py, and then run_tok.c must give exactly sentencepiece's ids
for thousands of strings and sentencepiece's text for random id sequences. A small C harness
(tests/tok_harness.c) lets one process handle many strings.

    .venv/bin/python -m pytest tests/test_tokenizer.py -q
"""

from __future__ import annotations

import io
import os
import random
import shutil
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import sentencepiece as spm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fileio
import tokenizer
from tokenizer import Tokenizer, TokenizerError

ROOT = Path(__file__).resolve().parent.parent
CC = os.environ.get("CC", "cc")
SPACE = "\u2581"

# ---------------------------------------------------------------------------------------------
# corpus

COMMON_HANZI = ("的一是了我不人在他有这个上们来到时大地为子中你说生国年着就那和要她出也得里后自以会家可"
                "下而过天去能对小多然于心学么之都好看起发当没成只如事把还用第样道想作种开美总从无情己面最女"
                "但现前些所同日手又行意动方期它头经长儿回位分爱老因很给名法间斯知世什两次使身者被高已亲其进"
                "此话常与活正感猫狗兔熊鸟鱼花草树山河海云雨雪风星月太阳妈爸姐哥弟妹朋友玩笑哭跑跳吃喝睡")
RARE = "龘靐齉爨鱻麤𠀀𠮷𪚥𫠠"
EN_WORDS = ["the", "little", "cat", "said", "hello", "story", "rabbit", "happy", "day", "tree",
            "Lily", "Tom", "ball", "park", "mom", "dad", "friend", "play", "red", "big"]
PUNCT = ["，", "。", "！", "？", "、", "：", "；", "“", "”", "（", "）", ",", ".", "!", "?", "(", ")"]
ODD = ["（笑）", "<hi>", "小猫咪", "ＡＢＣ", "１２３", "😀", "👍🏽", "\t", "  ", "   ", "\u3000", "ﬁ", "①"]


def mixed_lines(n: int, seed: int) -> list[str]:
    """Mixed Chinese / English / digits / punctuation lines, some odd characters."""
    r = random.Random(seed)
    lines = []
    for _ in range(n):
        parts = []
        for _ in range(r.randint(1, 8)):
            k = r.random()
            if k < 0.55:
                parts.append("".join(r.choice(COMMON_HANZI) for _ in range(r.randint(1, 12))) + r.choice(PUNCT))
            elif k < 0.8:
                parts.append(" ".join(r.choice(EN_WORDS) for _ in range(r.randint(1, 6))) + r.choice(PUNCT + [" "]))
            elif k < 0.9:
                parts.append(str(r.randint(0, 10 ** r.randint(1, 7))))
            else:
                parts.append(r.choice(ODD))
        if r.random() < 0.02:
            parts.insert(r.randrange(len(parts) + 1), r.choice(RARE))
        lines.append("".join(parts))
    return lines


def wide_lines(n: int, seed: int) -> list[str]:
    """Many distinct 'words' (CJK from a 6000-character range, Latin pseudo-syllables), so that a
    32000-piece vocabulary can be learned in well under a second."""
    r = random.Random(seed)
    cjk = [chr(c) for c in range(0x4E00, 0x4E00 + 6000)]
    syl = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiou"]
    lines = []
    for _ in range(n):
        parts = []
        for _ in range(r.randint(3, 12)):
            if r.random() < 0.5:
                pool = cjk[:r.choice([200, 1000, 6000])]
                parts.append("".join(r.choice(pool) for _ in range(r.randint(1, 4))))
            else:
                parts.append(" " + "".join(r.choice(syl) for _ in range(r.randint(1, 4))))
        lines.append("".join(parts))
    return lines


def story_lines(n: int, seed: int) -> list[str]:
    """Chinese stories from storygen.py when it is there, else our own mixed lines."""
    try:
        import storygen
        stories = list(storygen.generate_stories(n, seed=seed))
    except (ImportError, AttributeError, TypeError):
        return mixed_lines(n, seed + 1)
    return [line for s in stories for line in s.split("\n") if line.strip()]


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return story_lines(300, seed=1) + mixed_lines(3000, seed=2)


# ---------------------------------------------------------------------------------------------
# trained tokenizers

USER_SYMBOLS = ["<hi>", "（笑）", "小猫咪", "小猫", "ab"]

CONFIGS = {
    # llama2.c's train_vocab settings (identity, byte fallback, whitespace kept, digits split,
    # whitespace-only pieces); also exported --legacy
    "id_bf": dict(vocab_size=1000, normalization_rule_name="identity", byte_fallback=True,
                  remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
                  character_coverage=0.99),
    # small vocab, NFKC, no byte fallback: many characters map to <unk>; a pad piece
    "nfkc_unk": dict(vocab_size=300, normalization_rule_name="nmt_nfkc", byte_fallback=False,
                     pad_id=3),
    # NFKC + byte fallback + user-defined symbols, no dummy prefix, unusual special ids
    "nfkc_user": dict(vocab_size=2000, normalization_rule_name="nmt_nfkc", byte_fallback=True,
                      remove_extra_whitespaces=False, add_dummy_prefix=False,
                      user_defined_symbols=USER_SYMBOLS, unk_id=2, bos_id=0, eos_id=1, pad_id=3),
    # identity without byte fallback, whitespace collapsed, pieces may span words (a▁b)
    "id_unk": dict(vocab_size=1500, normalization_rule_name="identity", byte_fallback=False,
                   split_by_whitespace=False, character_coverage=0.99),
    # a big vocabulary
    "big": dict(vocab_size=32000, hard_vocab_limit=False, normalization_rule_name="nmt_nfkc",
                byte_fallback=True, character_coverage=1.0),
}


def frequent_chars_only(lines: list[str], n: int) -> list[str]:
    """The lines with all but the n most frequent characters removed: a small vocabulary must
    cover 98% of the training characters (sentencepiece's lowest character_coverage)."""
    keep = {c for c, _ in Counter("".join(lines)).most_common(n)}
    return ["".join(c for c in line if c in keep) for line in lines]


def train(lines: list[str], path: Path, **kw) -> None:
    buf = io.BytesIO()
    opts = dict(model_type="bpe", minloglevel=2, num_threads=2, character_coverage=0.9995)
    opts.update(kw)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, **opts)
    path.write_bytes(buf.getvalue())


@pytest.fixture(scope="session")
def toks(tmp_path_factory, corpus) -> dict[str, Path]:
    """name -> .model path, each with its .bin exported next to it (and id_bf.legacy.bin)."""
    d = tmp_path_factory.mktemp("toks")
    out = {}
    for name, kw in CONFIGS.items():
        path = d / f"{name}.model"
        lines = corpus
        if name == "big":
            lines = corpus + wide_lines(6000, seed=3)
        elif CONFIGS[name]["vocab_size"] < 500:
            lines = frequent_chars_only(corpus, 200)
        train(lines, path, **kw)
        tokenizer.export_tokenizer(str(path))
        out[name] = path
    tokenizer.export_tokenizer(str(out["id_bf"]), str(d / "id_bf.legacy.bin"), legacy=True)
    return out


def binpath(model: Path) -> Path:
    return model.with_suffix(".bin")


# ---------------------------------------------------------------------------------------------
# C harness

def build(src: Path, out: Path, *flags: str) -> Path:
    cmd = [CC, "-std=c99", "-Wall", "-Wextra", "-Werror", *flags, "-o", str(out), str(src)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stderr}"
    return out


@pytest.fixture(scope="session")
def harness(tmp_path_factory) -> Path:
    return build(ROOT / "tests" / "tok_harness.c", tmp_path_factory.mktemp("bin") / "tok_harness", "-O2")


SAN_FLAGS = ("-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
             "-fno-sanitize-recover=undefined")


@pytest.fixture(scope="session")
def harness_san(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bin")
    probe = subprocess.run([CC, "-fsanitize=address,undefined", "-x", "c", "-", "-o", str(d / "probe")],
                           input="int main(void){return 0;}", capture_output=True, text=True)
    if probe.returncode != 0 or subprocess.run([str(d / "probe")], capture_output=True).returncode != 0:
        pytest.skip("address/undefined sanitizers cannot build or run here")
    return build(ROOT / "tests" / "tok_harness.c", d / "tok_harness_san", *SAN_FLAGS)


def records(strings: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(s)) + s for s in strings)


def c_encode_many(exe: Path, tok_bin: Path, strings: list[bytes], vocab: int = -1) -> list[list[int]]:
    r = subprocess.run([str(exe), "encode", str(tok_bin), str(vocab)], input=records(strings),
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    assert b"Sanitizer" not in r.stderr and b"runtime error" not in r.stderr, r.stderr.decode(errors="replace")
    lines = r.stdout.decode().split("\n")
    assert len(lines) == len(strings) + 1 and lines[-1] == ""
    return [[int(x) for x in line.split()] for line in lines[:-1]]


def c_decode_many(exe: Path, tok_bin: Path, seqs: list[list[int]]) -> list[list[bytes]]:
    """Per sequence, the chunks the streaming printer produced (one per id, then the flush)."""
    inp = b"".join(struct.pack(f"<I{len(q)}i", len(q), *q) for q in seqs)
    r = subprocess.run([str(exe), "decode", str(tok_bin)], input=inp, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    out, pos, result = r.stdout, 0, []
    for q in seqs:
        (n_chunks,) = struct.unpack_from("<I", out, pos)
        pos += 4
        assert n_chunks == len(q) + 1
        chunks = []
        for _ in range(n_chunks):
            (n,) = struct.unpack_from("<I", out, pos)
            chunks.append(out[pos + 4:pos + 4 + n])
            pos += 4 + n
        result.append(chunks)
    assert pos == len(out)
    return result


def c_info(exe: Path, tok_bin: Path, vocab: int = -1) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), "info", str(tok_bin), str(vocab)], capture_output=True, text=True, timeout=60)


class CEncoder:
    """One long-lived harness process, one string at a time (for hypothesis)."""

    def __init__(self, exe: Path, tok_bin: Path, vocab: int = -1):
        self.p = subprocess.Popen([str(exe), "encode", str(tok_bin), str(vocab)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def encode(self, s: bytes) -> list[int]:
        self.p.stdin.write(struct.pack("<I", len(s)) + s)
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        assert line.endswith(b"\n"), f"harness died (exit {self.p.poll()})"
        return [int(x) for x in line.split()]

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(timeout=30)


EDGE_CASES = [
    "", " ", "  ", "\t", "\n", " \n ", "a", " a", "a ", "  a  b  ", "a  b", "a\tb", "a\nb", "a \n b",
    "<s>", "</s>", "<unk>", "<pad>", "<0x41>", "<0xE4><0xB8><0xAD>", "▁", "▁▁x", "x▁", " ▁ ", "<s>从前</s>",
    "从前", "从前，有一只小猫。", "“你好！”小兔子说。", "（笑）", "(笑)", "小猫咪小猫小猫咪咪", "<hi><hi>", "abab",
    "𠮷野家", "😀😀😀", "👍🏽", "e\u0301", "Å", "ﬁ", "①②", "ＡＢＣ１２３", "\u3000从\u3000前\u3000", "\u200b", "\ufeff",
    "\u00a0", "a\u2028b", "\r\n", "0123456789" * 3, "龘靐齉" * 4, "x" * 300, "从" * 500, " " * 50 + "从前" + " " * 50,
]


# ---------------------------------------------------------------------------------------------
# encoding parity

@pytest.mark.parametrize("name", list(CONFIGS))
def test_encode_matches_sentencepiece_on_corpus(name, toks, harness, corpus):
    sp = spm.SentencePieceProcessor(model_file=str(toks[name]))
    r = random.Random(7)
    shuffled = []  # lines with words shuffled and spaces doubled: unseen combinations
    for line in corpus[:1500]:
        chars = list(line)
        r.shuffle(chars)
        shuffled.append("".join(c + (" " if r.random() < 0.1 else "") for c in chars))
    strings = EDGE_CASES + corpus + shuffled + ["\n".join(corpus[i:i + 20]) for i in range(0, 400, 20)]
    got = c_encode_many(harness, binpath(toks[name]), [s.encode() for s in strings])
    bad = [(s, sp.encode(s, out_type=str), g) for s, g in zip(strings, got) if sp.encode(s) != g]
    assert not bad, f"{len(bad)} of {len(strings)} differ; first: {bad[0]!r}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_encode_matches_sentencepiece_on_random_codepoints(name, toks, harness):
    """Random characters from all of Unicode (no NUL, no surrogates), biased to CJK and emoji."""
    sp = spm.SentencePieceProcessor(model_file=str(toks[name]))
    r = random.Random(11)
    ranges = [(0x20, 0x7E), (0x80, 0x2FF), (0x2000, 0x206F), (0x3000, 0x30FF), (0x4E00, 0x9FFF),
              (0xFF00, 0xFFEF), (0x1F300, 0x1FAFF), (0x20000, 0x2FFFF), (0x1, 0xD7FF), (0xE000, 0x10FFFF)]
    strings = []
    for _ in range(2000):
        chars = []
        for _ in range(r.randint(0, 24)):
            lo, hi = r.choice(ranges)
            chars.append(chr(r.randint(lo, hi)) if r.random() < 0.8 else r.choice([" ", "  ", "\t", "▁"]))
        strings.append("".join(chars))
    got = c_encode_many(harness, binpath(toks[name]), [s.encode() for s in strings])
    bad = [(s, sp.encode(s), g) for s, g in zip(strings, got) if sp.encode(s) != g]
    assert not bad, f"{len(bad)} of {len(strings)} differ; first: {bad[0]!r}"


@pytest.mark.parametrize("name", ["id_bf", "nfkc_unk", "nfkc_user"])
def test_encode_invalid_utf8_like_sentencepiece(name, toks, harness):
    """Malformed UTF-8 (stray continuation bytes, truncated, overlong, surrogates, > U+10FFFF)
    becomes U+FFFD one byte at a time, exactly as sentencepiece's normalizer does."""
    sp = spm.SentencePieceProcessor(model_file=str(toks[name]))
    r = random.Random(5)
    pieces = [b"\xff", b"\xfe", b"\x80", b"\xbf", b"\xc0\xaf", b"\xe0\x80\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
              b"\xe4\xb8", b"\xf0\x9f\x98", b"\xc3", "从前".encode(), b"abc", b" ", "😀".encode(), "\ufffd".encode()]
    strings = [b"".join(r.choice(pieces) for _ in range(r.randint(1, 8))) for _ in range(1000)]
    strings += [bytes(r.randint(1, 255) for _ in range(r.randint(1, 12))) for _ in range(1000)]
    got = c_encode_many(harness, binpath(toks[name]), strings)
    bad = [(s, sp.encode(s), g) for s, g in zip(strings, got) if sp.encode(s) != g]
    assert not bad, f"{len(bad)} of {len(strings)} differ; first: {bad[0]!r}"


TEXT_CHUNKS = st.one_of(
    st.sampled_from(EDGE_CASES[:40] + USER_SYMBOLS + PUNCT + ODD + list(RARE)),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="\x00"), max_size=8),
    st.text(st.sampled_from(COMMON_HANZI + " "), max_size=16),
    st.text(st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), max_size=4),
    st.text(st.sampled_from("ab <>/s0x41▁\t\n"), max_size=10),
)
TEXTS = st.lists(TEXT_CHUNKS, max_size=10).map("".join)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_encode_matches_sentencepiece_hypothesis(name, toks, harness):
    sp = spm.SentencePieceProcessor(model_file=str(toks[name]))
    enc = CEncoder(harness, binpath(toks[name]))

    @settings(max_examples=300, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(TEXTS)
    def check(s):
        assert enc.encode(s.encode()) == sp.encode(s), sp.encode(s, out_type=str)

    try:
        check()
    finally:
        enc.close()


def test_consecutive_unknowns_become_one_unk(toks, harness):
    """Without byte fallback sentencepiece merges a run of unknown characters into one <unk>."""
    sp = spm.SentencePieceProcessor(model_file=str(toks["nfkc_unk"]))
    known = next(p for p in map(sp.id_to_piece, range(sp.vocab_size())) if len(p) == 1 and p != SPACE)
    s = f"龘靐齉𪚥𪚥 {known} 龘"
    ids = sp.encode(s)
    assert ids.count(sp.unk_id()) == 2, ids  # the run of five, and the last one
    assert c_encode_many(harness, binpath(toks["nfkc_unk"]), [s.encode()]) == [ids]


def test_byte_fallback_spells_unknown_characters_in_bytes(toks, harness):
    sp = spm.SentencePieceProcessor(model_file=str(toks["id_bf"]))
    s = "𪚥"
    ids = c_encode_many(harness, binpath(toks["id_bf"]), [s.encode()])[0]
    assert ids == sp.encode(s)
    assert [sp.id_to_piece(i) for i in ids][-4:] == ["<0xF0>", "<0xAA>", "<0x9A>", "<0xA5>"]


def test_piece_names_in_text_are_ordinary_characters(toks, harness):
    """Text spelling <s>, </s> or <0x41> never yields the control or byte piece."""
    sp = spm.SentencePieceProcessor(model_file=str(toks["id_bf"]))
    specials = {sp.bos_id(), sp.eos_id(), sp.piece_to_id("<0x41>")}
    strings = ["<s>", "</s>", "<0x41>", "<s></s><0x41>"]
    for ids in c_encode_many(harness, binpath(toks["id_bf"]), [s.encode() for s in strings]):
        assert not specials & set(ids), ids


def test_user_defined_symbols_are_whole_pieces(toks, harness):
    sp = spm.SentencePieceProcessor(model_file=str(toks["nfkc_user"]))
    s = "小猫咪和小猫说（笑）<hi>"
    ids = c_encode_many(harness, binpath(toks["nfkc_user"]), [s.encode()])[0]
    assert ids == sp.encode(s)
    pieces = [sp.id_to_piece(i) for i in ids]
    for sym in ["小猫咪", "小猫", "（笑）", "<hi>"]:
        assert sym in pieces, pieces


# Models sentencepiece's trainer cannot make, made by editing a trained ModelProto: pieces of
# type UNUSED (the encoder merges through them, then splits them back) and
# escape_whitespaces=false (spaces stay ' ' instead of U+2581).

def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _field(number: int, wire: int, value) -> bytes:
    key = _varint(number << 3 | wire)
    if wire == 0:
        return key + _varint(value)
    if wire == 2:
        return key + _varint(len(value)) + value
    return key + value  # fixed32 / fixed64 raw bytes


def edit_model(data: bytes, *, piece_types: dict[int, int] = {}, normalizer: dict[int, int] = {}) -> bytes:
    """Re-serializes a ModelProto with some pieces' types and normalizer varint fields replaced."""
    out, index = [], 0
    for number, wire, value in tokenizer.parse_fields(data):
        if number == 1 and wire == 2:
            if index in piece_types:
                fields = [f for f in tokenizer.parse_fields(value) if f[0] != 3] + [(3, 0, piece_types[index])]
                value = b"".join(_field(*f) for f in fields)
            index += 1
        elif number == 3 and wire == 2 and normalizer:
            fields = [f for f in tokenizer.parse_fields(value) if f[0] not in normalizer]
            value = b"".join(_field(*f) for f in fields + [(k, 0, v) for k, v in normalizer.items()])
        out.append(_field(number, wire, value))
    return b"".join(out)


@pytest.fixture(scope="session")
def edited_toks(toks, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("edited")
    base = toks["nfkc_user"].read_bytes()
    assert edit_model(base) == base  # the writer reproduces sentencepiece's bytes
    sp = spm.SentencePieceProcessor(model_file=str(toks["nfkc_user"]))
    multi = [i for i in range(sp.vocab_size()) if sp.id_to_piece(i) != SPACE and len(sp.id_to_piece(i)) >= 2
             and not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i))]
    r = random.Random(2)
    unused = r.sample(multi, len(multi) // 3)
    out = {
        "unused": edit_model(base, piece_types={i: tokenizer.UNUSED for i in unused}),
        "no_escape": edit_model(toks["nfkc_unk"].read_bytes(), normalizer={5: 0}),
        "no_escape_collapse": edit_model(toks["id_bf"].read_bytes(), normalizer={4: 1, 5: 0}),
    }
    paths = {}
    for name, data in out.items():
        path = d / f"{name}.model"
        path.write_bytes(data)
        spm.SentencePieceProcessor(model_file=str(path))  # loads
        tokenizer.export_tokenizer(str(path))
        paths[name] = path
    return paths


@pytest.mark.parametrize("name", ["unused", "no_escape", "no_escape_collapse"])
def test_edited_models_match_sentencepiece(name, edited_toks, toks, harness, corpus):
    sp = spm.SentencePieceProcessor(model_file=str(edited_toks[name]))
    strings = EDGE_CASES + corpus[:2000]
    if name == "unused":
        assert sum(sp.is_unused(i) for i in range(sp.vocab_size())) > 100
        # unused pieces are merged through and split back: none in the output, and the result
        # differs from the unedited model's for many strings
        original = spm.SentencePieceProcessor(model_file=str(toks["nfkc_user"]))
        assert not any(sp.is_unused(i) for s in strings for i in sp.encode(s))
        assert sum(sp.encode(s) != original.encode(s) for s in strings) > 100
    else:
        assert not any(SPACE in p for p in sp.encode("hello world  ab", out_type=str))
    got = c_encode_many(harness, binpath(edited_toks[name]), [s.encode() for s in strings])
    bad = [(s, sp.encode(s, out_type=str), g) for s, g in zip(strings, got) if sp.encode(s) != g]
    assert not bad, f"{len(bad)} of {len(strings)} differ; first: {bad[0]!r}"
    seqs = random_id_sequences(sp, 500, seed=8)
    for q, chunks in zip(seqs, c_decode_many(harness, binpath(edited_toks[name]), seqs)):
        assert b"".join(chunks).decode("utf-8") == sp.decode(q)


# ---------------------------------------------------------------------------------------------
# decoding

def random_id_sequences(sp, n: int, seed: int) -> list[list[int]]:
    """Random ids of every kind, with BOS (if any) only at the start: sentencepiece decodes a
    sequence as one text, while the C printer treats a later BOS as the start of a new text."""
    r = random.Random(seed)
    v = sp.vocab_size()
    byte_ids = [i for i in range(v) if sp.is_byte(i)]
    seqs = []
    for _ in range(n):
        q = []
        for _ in range(r.randint(0, 16)):
            if byte_ids and r.random() < 0.3:
                q.append(r.choice(byte_ids))
            else:
                i = r.randrange(v)
                if i != sp.bos_id():
                    q.append(i)
        if r.random() < 0.3 and sp.bos_id() >= 0:
            q.insert(0, sp.bos_id())
        seqs.append(q)
    return seqs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_matches_sentencepiece(name, toks, harness):
    sp = spm.SentencePieceProcessor(model_file=str(toks[name]))
    seqs = random_id_sequences(sp, 2000, seed=3)
    # ids of real text too, so that pieces appear in natural order
    seqs += [sp.encode(s) for s in EDGE_CASES] + [[sp.bos_id()] + sp.encode(s) for s in EDGE_CASES]
    for q, chunks in zip(seqs, c_decode_many(harness, binpath(toks[name]), seqs)):
        for c in chunks:
            c.decode("utf-8")  # every chunk on its own is valid UTF-8 (raises otherwise)
        assert b"".join(chunks).decode("utf-8") == sp.decode(q), [sp.id_to_piece(i) for i in q]


def test_decode_prints_split_characters_whole(toks, harness):
    """Byte-fallback pieces of one character print nothing until the character is complete."""
    sp = spm.SentencePieceProcessor(model_file=str(toks["id_bf"]))
    s = "从前𪚥有😀"
    ids = [sp.bos_id()] + sp.encode(s)
    chunks = c_decode_many(harness, binpath(toks["id_bf"]), [ids])[0]
    assert b"".join(chunks).decode() == s  # no leading space after BOS
    pieces = [sp.id_to_piece(i) for i in ids]
    first_byte = pieces.index("<0xF0>")
    assert chunks[first_byte:first_byte + 4] == [b"", b"", b"", "𪚥".encode()]
    assert not any(b"<0x" in c for c in chunks)


def test_decode_bad_bytes_become_replacement_characters(toks, harness):
    sp = spm.SentencePieceProcessor(model_file=str(toks["id_bf"]))
    b = [sp.piece_to_id(f"<0x{x:02X}>") for x in (0xE4, 0xB8, 0x41, 0xFF, 0xF0, 0x9F)]
    seqs = [b, b[:2], b[3:4], b[4:]]
    for q, chunks in zip(seqs, c_decode_many(harness, binpath(toks["id_bf"]), seqs)):
        text = b"".join(chunks).decode("utf-8")
        assert text == sp.decode(q)
    assert b"".join(c_decode_many(harness, binpath(toks["id_bf"]), [b[:2]])[0]).decode() == "\ufffd\ufffd"


def test_decode_bos_starts_a_new_text(toks, harness):
    sp = spm.SentencePieceProcessor(model_file=str(toks["id_bf"]))
    a, b = sp.encode("从前有只猫。"), sp.encode("hello world")
    q = [sp.bos_id()] + a + [sp.eos_id(), sp.bos_id()] + b
    text = b"".join(c_decode_many(harness, binpath(toks["id_bf"]), [q])[0]).decode()
    assert text == sp.decode(a) + sp.decode(b) == "从前有只猫。hello world"


# ---------------------------------------------------------------------------------------------
# legacy llama2.c format

def test_legacy_file_layout(toks):
    """Byte by byte what docs/formats.md describes."""
    sp = spm.SentencePieceProcessor(model_file=str(toks["id_bf"]))
    data = (toks["id_bf"].parent / "id_bf.legacy.bin").read_bytes()
    (max_len,) = struct.unpack_from("<I", data, 0)
    pos, entries = 4, []
    while pos < len(data):
        score, n = struct.unpack_from("<fI", data, pos)
        entries.append((score, data[pos + 8:pos + 8 + n]))
        pos += 8 + n
    assert pos == len(data) and len(entries) == sp.vocab_size()
    assert max_len == max(len(b) for _, b in entries)
    assert entries[1][1] == b"\n<s>\n" and entries[2][1] == b"\n</s>\n" and entries[0][1] == b"<unk>"
    assert entries[3][1] == b"<0x00>" and entries[258][1] == b"<0xFF>"
    for i in range(3, sp.vocab_size()):
        assert entries[i][1].decode() == sp.id_to_piece(i).replace(SPACE, " ")
        assert entries[i][0] == pytest.approx(sp.get_score(i))


@pytest.mark.parametrize("vocab", [-1, 1000])
def test_legacy_encode_and_decode_match_sentencepiece(vocab, toks, harness, corpus):
    sp = spm.SentencePieceProcessor(model_file=str(toks["id_bf"]))
    legacy = toks["id_bf"].parent / "id_bf.legacy.bin"
    info = c_info(harness, legacy, vocab)
    assert info.returncode == 0, info.stderr
    fields = info.stdout.split()
    assert fields[:6] == ["1000", "0", "1", "2", "-1", "0"] and fields[7] == "1", fields  # hash 0, legacy
    strings = EDGE_CASES + corpus[:1500]
    got = c_encode_many(harness, legacy, [s.encode() for s in strings], vocab)
    bad = [(s, sp.encode(s), g) for s, g in zip(strings, got) if sp.encode(s) != g]
    assert not bad, f"{len(bad)} of {len(strings)} differ; first: {bad[0]!r}"
    seqs = random_id_sequences(sp, 500, seed=9)
    for q, chunks in zip(seqs, c_decode_many(harness, legacy, seqs)):
        assert b"".join(chunks).decode("utf-8") == sp.decode(q)


def test_legacy_hypothesis(toks, harness):
    sp = spm.SentencePieceProcessor(model_file=str(toks["id_bf"]))
    enc = CEncoder(harness, toks["id_bf"].parent / "id_bf.legacy.bin", 1000)

    @settings(max_examples=200, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(TEXTS)
    def check(s):
        assert enc.encode(s.encode()) == sp.encode(s)

    try:
        check()
    finally:
        enc.close()


# ---------------------------------------------------------------------------------------------
# Python side: Tokenizer, hash, protobuf reader, export CLI

@pytest.mark.parametrize("name", list(CONFIGS))
def test_python_tokenizer_and_hash(name, toks, harness):
    sp = spm.SentencePieceProcessor(model_file=str(toks[name]))
    t = Tokenizer(str(toks[name]))
    assert (t.vocab_size, t.bos_id, t.eos_id, t.unk_id, t.pad_id) == \
        (sp.vocab_size(), sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id())
    s = "从前，有一只小猫。"
    assert t.encode(s) == sp.encode(s)
    assert t.encode(s, bos=True, eos=True) == [sp.bos_id()] + sp.encode(s) + [sp.eos_id()]
    assert t.decode(t.encode(s, bos=True, eos=True)) == sp.decode(sp.encode(s))
    # hash: the C reader recomputes it from the pieces it loaded and checks the header
    info = c_info(harness, binpath(toks[name]), t.vocab_size)
    assert info.returncode == 0, info.stderr
    vocab, unk, bos, eos, pad, h, max_len, legacy = map(int, info.stdout.split())
    assert (vocab, unk, bos, eos, pad, legacy) == (t.vocab_size, t.unk_id, t.bos_id, t.eos_id, t.pad_id, 0)
    assert h == t.hash() != 0
    assert max_len == max(len(sp.id_to_piece(i).encode()) for i in range(vocab))


def test_hash_definition():
    # FNV-1a 32 of b"a\0b\0", computed step by step from the published constants
    h = 0x811C9DC5
    for byte in b"a\x00b\x00":
        h = ((h ^ byte) * 16777619) % 2**32
    assert tokenizer.fnv1a_pieces(["a", "b"]) == h
    assert tokenizer.fnv1a_pieces(["ab"]) != tokenizer.fnv1a_pieces(["a", "b"])


def test_protobuf_reader_on_hand_made_messages():
    varint = lambda v: bytes([(v >> (7 * i) & 0x7F) | (0x80 if v >> (7 * (i + 1)) else 0)
                              for i in range(max(1, (v.bit_length() + 6) // 7))])
    inner = b"\x0a\x03abc" + b"\x15" + struct.pack("<f", -1.5) + b"\x18\x06"  # piece, score, type=BYTE
    msg = b"\x0a" + varint(len(inner)) + inner
    trainer = b"\x18\x02" + b"\x98\x02\x01" + b"\xc0\x02" + varint(2**64 - 1)  # model_type, byte_fallback(35), unk_id=-1
    norm = b"\x0a\x08nmt_nfkc\x12\x05\x01\x00\x00\x00\x00\x18\x00\x20\x00"
    msg += b"\x12" + varint(len(trainer)) + trainer + b"\x1a" + varint(len(norm)) + norm
    spec = tokenizer.parse_model_proto(msg)
    assert spec.pieces == [("abc", -1.5, tokenizer.BYTE)]
    assert spec.model_type == 2 and spec.byte_fallback
    assert spec.normalizer_name == "nmt_nfkc" and spec.precompiled_charsmap == b"\x01\x00\x00\x00\x00"
    assert not spec.add_dummy_prefix and not spec.remove_extra_whitespaces and spec.escape_whitespaces
    fields = tokenizer.parse_fields(trainer)
    assert tokenizer._signed(fields[2][2]) == -1
    assert varint(300) == b"\xac\x02"
    for broken in [b"\x0a\x05ab", b"\x08", b"\x08\xff", b"\x0d\x00\x00", b"\x0f", b"\x00\x00"]:
        with pytest.raises(ValueError):
            tokenizer.parse_fields(broken)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_protobuf_reader_agrees_with_sentencepiece(name, toks):
    sp = spm.SentencePieceProcessor(model_file=str(toks[name]))
    spec = tokenizer.load_model_spec(str(toks[name]))
    kw = CONFIGS[name]
    assert len(spec.pieces) == sp.vocab_size()
    for i, (piece, score, ptype) in enumerate(spec.pieces):
        assert piece == sp.id_to_piece(i)
        assert score == sp.get_score(i)
        assert (ptype == tokenizer.CONTROL) == sp.is_control(i)
        assert (ptype == tokenizer.UNKNOWN) == sp.is_unknown(i)
        assert (ptype == tokenizer.BYTE) == sp.is_byte(i)
        assert (ptype == tokenizer.USER_DEFINED) == (piece in kw.get("user_defined_symbols", []))
    assert spec.model_type == 2
    assert spec.byte_fallback == kw["byte_fallback"]
    assert spec.normalizer_name == kw["normalization_rule_name"]
    assert bool(spec.precompiled_charsmap) == (kw["normalization_rule_name"] != "identity")
    assert spec.add_dummy_prefix == kw.get("add_dummy_prefix", True)
    assert spec.remove_extra_whitespaces == kw.get("remove_extra_whitespaces", True)


def run_py(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tokenizer.py"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_cli_export(toks, tmp_path):
    model = tmp_path / "tok.model"
    shutil.copy(toks["nfkc_user"], model)
    r = run_py(f"--tokenizer-model={model}")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "tok.bin").read_bytes() == binpath(toks["nfkc_user"]).read_bytes()
    r = run_py(f"--tokenizer_model={model}", f"--output={tmp_path / 'x.bin'}", "--legacy=false")
    assert r.returncode == 0 and (tmp_path / "x.bin").read_bytes() == (tmp_path / "tok.bin").read_bytes()
    shutil.copy(toks["id_bf"], model)
    r = run_py(f"--tokenizer-model={model}", "--legacy")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "tok.bin").read_bytes() == (toks["id_bf"].parent / "id_bf.legacy.bin").read_bytes()
    assert not [p for p in tmp_path.iterdir() if fileio.TEMP_RE.match(p.name)]
    header = (tmp_path / "x.bin").read_bytes()[:64]
    magic, version, vocab = struct.unpack_from("<Iii", header)
    assert (magic, version, vocab) == (tokenizer.MAGIC, 1, 2000) and header[52:] == b"\0" * 12


def test_cli_errors(toks, tmp_path):
    cases = [
        ([], "tokenizer.py: error: --tokenizer_model"),
        (["--nope=1"], "tokenizer.py: error: unknown option --nope; valid: --tokenizer_model"),
        ([f"--tokenizer-model={toks['id_bf']}", "--legacy=maybe"], "true/false"),
        ([f"--tokenizer-model={tmp_path / 'missing.model'}"], "missing.model"),
    ]
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\xff" * 100)
    cases.append(([f"--tokenizer-model={garbage}"], "garbage.model"))
    for args, expect in cases:
        r = run_py(*args)
        assert r.returncode != 0, args
        assert expect in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
        assert "Traceback" not in r.stderr
    # legacy needs unk=0, bos=1, eos=2
    r = run_py(f"--tokenizer-model={toks['nfkc_user']}", f"--output={tmp_path / 'l.bin'}", "--legacy")
    assert r.returncode == 1 and "legacy format needs unk=0" in r.stderr
    assert not (tmp_path / "l.bin").exists()


def test_unigram_models_are_refused(tmp_path, corpus):
    model = tmp_path / "uni.model"
    train(frequent_chars_only(corpus[:500], 150), model, model_type="unigram", vocab_size=400)
    with pytest.raises(TokenizerError, match="unigram model; run.c encodes only BPE"):
        tokenizer.export_tokenizer(str(model))
    r = run_py(f"--tokenizer-model={model}")
    assert r.returncode == 1 and "unigram" in r.stderr and not (tmp_path / "uni.bin").exists()


# ---------------------------------------------------------------------------------------------
# malformed files: one line naming the file, exit 1, no sanitizer report

def corruptions(good: bytes) -> dict[str, bytes]:
    vocab = struct.unpack_from("<i", good, 8)[0]
    charsmap_len = struct.unpack_from("<I", good, 44)[0]
    first_piece = 64 + charsmap_len + struct.unpack_from("<I", good, 48)[0]
    out = {
        "empty": b"",
        "magic only": good[:4],
        "half header": good[:30],
        "header only": good[:64],
        "half charsmap": good[:64 + charsmap_len // 2],
        "one piece short": good[:-3],
        "trailing byte": good + b"\0",
        "version 2": good[:4] + struct.pack("<i", 2) + good[8:],
        "vocab 0": good[:8] + struct.pack("<i", 0) + good[12:],
        "bos out of range": good[:28] + struct.pack("<i", vocab) + good[32:],
        "flag 2": good[:20] + b"\x02" + good[21:],
        "piece type 9": good[:first_piece + 4] + b"\x09" + good[first_piece + 5:],
        "huge piece length": good[:first_piece + 5] + struct.pack("<I", 2**31) + good[first_piece + 9:],
    }
    flipped = bytearray(good)
    flipped[-1] ^= 0x01  # last piece's last byte: the hash no longer matches
    out["hash mismatch"] = bytes(flipped)
    return out


@pytest.mark.parametrize("exe_fixture", ["harness", "harness_san"])
def test_malformed_files_fail_cleanly(exe_fixture, request, toks, tmp_path):
    exe = request.getfixturevalue(exe_fixture)
    good = binpath(toks["nfkc_user"]).read_bytes()
    legacy_good = (toks["id_bf"].parent / "id_bf.legacy.bin").read_bytes()
    cases = {k: (v, -1) for k, v in corruptions(good).items()}
    cases["model vocab mismatch"] = (good, 1999)
    cases["legacy truncated"] = (legacy_good[:len(legacy_good) // 2], -1)
    cases["legacy one byte short"] = (legacy_good[:-1], -1)
    cases["legacy vocab too big"] = (legacy_good, 1001)
    cases["legacy vocab too small"] = (legacy_good, 999)
    cases["legacy max len 0"] = (b"\0\0\0\0" + legacy_good[4:], -1)
    for label, (data, vocab) in cases.items():
        path = tmp_path / f"bad {label}.bin"
        path.write_bytes(data)
        r = c_info(exe, path, vocab)
        assert r.returncode == 1, (label, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and str(path) in lines[0], (label, r.stderr)
    for path in [tmp_path / "does-not-exist.bin", tmp_path]:
        r = c_info(exe, path)
        assert r.returncode == 1 and str(path) in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_corrupt_charsmap_never_crashes(toks, harness_san, tmp_path):
    """Random trie units: lookups stay inside the array (results may change, memory safety may not)."""
    good = bytearray(binpath(toks["nfkc_unk"]).read_bytes())
    charsmap_len = struct.unpack_from("<I", good, 44)[0]
    trie_len = struct.unpack_from("<I", good, 64)[0]
    assert charsmap_len > trie_len > 0
    r = random.Random(1)
    strings = [s.encode() for s in EDGE_CASES]
    for k in range(3):
        bad = bytearray(good)
        for _ in range(2000):
            bad[68 + r.randrange(trie_len)] = r.randrange(256)
        path = tmp_path / f"charsmap{k}.bin"
        path.write_bytes(bytes(bad))
        proc = subprocess.run([str(harness_san), "encode", str(path)], input=records(strings), capture_output=True,
                              timeout=120)
        assert b"Sanitizer" not in proc.stderr and b"runtime error" not in proc.stderr, proc.stderr.decode()
        assert proc.returncode in (0, 1), proc.stderr.decode()


def test_sanitizer_clean_parity(toks, harness_san, corpus):
    """The user-symbol tokenizer under ASan/UBSan: encode and decode a few thousand strings."""
    name = "nfkc_user"
    sp = spm.SentencePieceProcessor(model_file=str(toks[name]))
    strings = EDGE_CASES + corpus[:1000]
    got = c_encode_many(harness_san, binpath(toks[name]), [s.encode() for s in strings])
    assert got == [sp.encode(s) for s in strings]
    seqs = random_id_sequences(sp, 300, seed=4)
    for q, chunks in zip(seqs, c_decode_many(harness_san, binpath(toks[name]), seqs)):
        assert b"".join(chunks).decode() == sp.decode(q)


# ---------------------------------------------------------------------------------------------
# long prompts: the bench mode (what `make bench` times) encodes 40,000 characters like sentencepiece.
# Speed itself is measured by `make bench` into BENCHMARKS.md, never asserted here.

def test_long_prompt_bench_mode_matches_sentencepiece(toks, harness, tmp_path, corpus):
    text = "".join(corpus)
    text = "".join(c for c in text if "\u4e00" <= c <= "\u9fff")[:10000]
    assert len(text) == 10000
    times = {}
    for n in (10000, 40000):
        path = tmp_path / f"prompt{n}.txt"
        path.write_text((text * 4)[:n], encoding="utf-8")
        r = subprocess.run([str(harness), "bench", str(binpath(toks["big"])), str(path), "3"], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        n_ids, ms = r.stdout.split()
        times[n] = float(ms)
    sp = spm.SentencePieceProcessor(model_file=str(toks["big"]))
    assert int(n_ids) == len(sp.encode((text * 4)[:40000])) + 1  # + BOS
    assert all(t >= 0 for t in times.values()), times


# ---------------------------------------------------------------------------------------------
# through the real CLI: ./run -m encode

@pytest.fixture(scope="session")
def run_exe(tmp_path_factory) -> Path:
    src = ROOT / "run.c"
    exe = tmp_path_factory.mktemp("run") / "run"
    r = subprocess.run([CC, "-O2", "-Wall", "-Wextra", "-o", str(exe), str(src), "-lm"], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return exe


@pytest.mark.parametrize("name", ["id_bf", "nfkc_user", "legacy"])
def test_run_encode_cli(name, toks, run_exe):
    """`./run -m encode -z tok.bin -i text` prints sentencepiece's ids without BOS."""
    model = toks["id_bf" if name == "legacy" else name]
    sp = spm.SentencePieceProcessor(model_file=str(model))
    tok_bin = model.parent / "id_bf.legacy.bin" if name == "legacy" else binpath(model)
    for s in ["从前", "从前，有一只小猫。 Hello  world!", "（笑）𪚥😀", "  ", ""]:
        r = subprocess.run([str(run_exe), "-m", "encode", "-z", str(tok_bin), "-i", s],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert [int(x) for x in r.stdout.split()] == sp.encode(s)
    r = subprocess.run([str(run_exe), "-m", "encode", "-z", str(tok_bin.with_name("missing.bin")), "-i", "x"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "missing.bin" in r.stderr
