"""Text metrics of story evaluation: the same code scores model completions and real held-out stories.

Each metric is defined once, in its function's docstring (docs/evaluation.md quotes them):
`lang_of`, `units`, `rep4`, `distinct2`, `has_bad_utf8`, `CopyIndex.longest_copy` (copies of the
train split) and `entity_consistency` (do the named characters stay who they are?). evaluate.py
aggregates them over completions; nothing here imports torch.

    python -c "import metrics; print(metrics.rep4('从前有一只小猫。' * 2, 'zh'))"
    python metrics.py --text="从前，有一只小乌龟。小鸭子有一身软软的尾巴。有一天，球球在游乐场里散步。"
    python metrics.py --bench_index=60000 --out=out/copy_index_60k   # build time, peak RSS, disk size
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

import fileio
from options import OptionError, cli, opt, parse_options, render_help

# --------------------------------------------------------------------------- language and units

# CJK ideographs: the unified block, extension A and the compatibility block (extension B and
# later lie outside the BMP and are rare in children's stories; they count too).
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]")
_EN_WORD = re.compile(r"(?:[^\W_]|['’])+")
LANGS = ("zh", "en")


def _check_lang(lang: str) -> None:
    if lang not in LANGS:
        raise ValueError(f"lang must be 'zh' or 'en', got {lang!r}")


def lang_of(text: str) -> str:
    """"zh" when CJK ideographs make up at least 20% of the text's letters (characters for which
    str.isalpha() is true, ideographs included), else "en". One Chinese character carries about as
    much as a 4-5 letter English word, so 20% is where the two languages hold an equal share of the
    words. A text without letters is "en"."""
    letters = sum(1 for ch in text if ch.isalpha())
    if letters == 0:
        return "en"
    return "zh" if len(_CJK.findall(text)) >= 0.2 * letters else "en"


def units(text: str, lang: str) -> list[str]:
    """The units that n-gram metrics count. zh: every character, punctuation included, whitespace
    dropped. en: lowercase words, i.e. maximal runs of letters, digits and apostrophes (' or ’),
    with apostrophes at either end stripped (so quoting does not make new words)."""
    _check_lang(lang)
    if lang == "zh":
        return [ch for ch in text if not ch.isspace()]
    out = []
    for w in _EN_WORD.findall(text.lower()):
        w = w.strip("'’")
        if w:
            out.append(w)
    return out


def _ngrams(u: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(u[i:i + n]) for i in range(len(u) - n + 1)]


def rep4(text: str, lang: str) -> float:
    """Share of repeated 4-grams inside one text: 1 - distinct 4-grams / all 4-grams, over
    `units(text, lang)`; 0.0 when the text has fewer than 4 units. A text that never repeats a
    4-gram scores 0; a story written out twice scores close to 0.5; a loop of one phrase close to 1."""
    grams = _ngrams(units(text, lang), 4)
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def distinct2(texts: Iterable[str], lang: str) -> float:
    """Distinct 2-grams across a set of texts: the number of different 2-grams of units over all
    texts together, divided by the number of 2-grams in all texts (2-grams never cross from one
    text to the next); 0.0 when there is none. The same text repeated N times scores 1/N of one
    copy's value; varied texts score higher."""
    seen: set[tuple[str, ...]] = set()
    total = 0
    for t in texts:
        grams = _ngrams(units(t, lang), 2)
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def has_bad_utf8(text_or_bytes: str | bytes | bytearray) -> bool:
    """True when the output is not clean UTF-8: bytes that do not decode as UTF-8, or text holding
    U+FFFD (the replacement character a lenient decoder leaves behind) or a lone surrogate
    (what errors="surrogateescape" leaves)."""
    if isinstance(text_or_bytes, (bytes, bytearray)):
        try:
            text = bytes(text_or_bytes).decode("utf-8")
        except UnicodeDecodeError:
            return True
    else:
        text = text_or_bytes
    if "\ufffd" in text:
        return True
    return any("\ud800" <= ch <= "\udfff" for ch in text)


# --------------------------------------------------------------------------- copies of the train split
#
# CopyIndex answers "what is the longest substring of this text that occurs verbatim in some train
# story?" for a train split of ~1G characters, in memory that does not grow with the corpus.
#
# Layout of an index folder (all little-endian; meta.json gives each file's dtype and length, and
# open() checks every file's size against it):
#   text.u16      the train texts as UTF-16 code units, each text preceded and followed by 0xFFFF
#                 (a noncharacter; U+FFFF inside a text is stored, and compared, as U+FFFD)
#   group_fp.u64  fingerprint hash of each group, ascending
#   group_start.i64  where each group's positions start in pos.i64 (one more entry: the total)
#   pos.i64       positions in text.u16 of the selected q-grams, grouped by (fingerprint, context)
#   meta.json     format, version, k, q, w, lang, corpus signature, counts, build time
#
# Fingerprints are winnowed q-gram hashes (Schleimer, Wilkerson and Aiken 2003): hash every q-gram,
# and in every window of w = k - q + 1 consecutive q-gram hashes select the positions holding the
# window's minimum. The selection depends only on the window's text, so two copies of the same
# k-unit span select the same q-gram at the same offset: every shared span of >= k units shares a
# fingerprint, and about 2/(w+1) of all positions are stored. Occurrences of a fingerprint whose
# surrounding q + 2(w-1) units (the "context": every k-span that contains the q-gram lies inside
# it) are identical form one group; a query verifies one representative per group against the
# memory-mapped text, which filters hash collisions and, because the context is identical, is exact
# for every k-span. Only when a representative's match runs to the edge of its context can another
# member of the group match further; those groups are enumerated, longest possible first, until no
# candidate can beat the best span found. The answer is therefore exact: the longest copy, verified.
#
# The build streams the texts in chunks of CHUNK_UNITS, hashes each chunk with numpy, and appends
# its (fingerprint, context, position) records to 256 bucket files by the fingerprint's top 8 bits;
# then each bucket (1/256 of the records: ~3 MB per 1G train characters at the zh defaults) is sorted and
# appended to the output. Peak memory is one chunk's arrays plus one bucket.

SEP = 0xFFFF
INDEX_FORMAT = "tinystories-zh copy index"
INDEX_VERSION = 1
# Default copy threshold k and q-gram length q per language, in characters (UTF-16 code units).
# See CopyIndex.build for why these values.
DEFAULT_K = {"zh": 64, "en": 192}
DEFAULT_Q = {"zh": 16, "en": 32}
CHUNK_UNITS = 1 << 21
N_BUCKETS = 256
_HASH_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd, so multiplication is invertible mod 2**64
_CTX_BASE = np.uint64(0xC2B2AE3D27D4EB4F)
_U64_MAX = np.uint64(0xFFFFFFFFFFFFFFFF)
_REC = np.dtype([("fp", "<u8"), ("ctx", "<u8"), ("pos", "<i8")])


def _encode(text: str) -> np.ndarray:
    """UTF-16 code units of a text (lone surrogates kept), U+FFFF replaced by U+FFFD."""
    b = text.replace("\uffff", "\ufffd").encode("utf-16-le", "surrogatepass")
    return np.frombuffer(b, dtype="<u2")


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: spreads every input bit over the whole word (in place)."""
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return h


def _qgram_hashes(x: np.ndarray, q: int) -> np.ndarray:
    """(len(x) - q + 1,) uint64: a polynomial hash of each q-gram of code units, mixed."""
    n = len(x) - q + 1
    if n <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = np.zeros(n, dtype=np.uint64)
    for t in range(q):
        h *= _HASH_BASE
        h += x[t:t + n].astype(np.uint64)
    return _mix(h)


def _sliding(a: np.ndarray, w: int, op) -> np.ndarray:
    """op (np.minimum / np.maximum) over every window of w consecutive items: (len(a) - w + 1,).
    Doubling, O(n log w): m holds op over a[i:i+span]."""
    m, span = a, 1
    while span * 2 <= w:
        m = op(m[:-span], m[span:])
        span *= 2
    n, r = len(a) - w + 1, w - span
    return op(m[:n], m[r:r + n])


def _winnow(h: np.ndarray, w: int) -> np.ndarray:
    """Indices into h selected by winnowing: every position that holds the minimum of some window
    of w consecutive hashes (all tied minima, so the choice depends on the window's content only).
    Windows holding a _U64_MAX (a q-gram across a text boundary) select nothing, so what a text
    contributes depends on that text alone."""
    if len(h) < w:
        return np.zeros(0, dtype=np.int64)
    mins = _sliding(h, w, np.minimum)  # (len(h) - w + 1,)
    valid = _sliding(h, w, np.maximum) != _U64_MAX
    mins[~valid] = 0
    pad = np.zeros(w - 1, dtype=np.uint64)  # below every window minimum it sits beside
    # For position j, the largest minimum among the valid windows that contain j equals h[j]
    # exactly when j is the minimum of one of them.
    best = _sliding(np.concatenate([pad, mins, pad]), w, np.maximum)  # (len(h),)
    vpad = np.zeros(w - 1, dtype=bool)
    inside = _sliding(np.concatenate([vpad, valid, vpad]), w, np.maximum)  # j lies in a valid window
    return np.flatnonzero((best == h) & inside)


def _context_hashes(x: np.ndarray, sel: np.ndarray, q: int, w: int) -> np.ndarray:
    """Hash of x[j - (w-1) : j + q + (w-1)] for each selected j (the caller pads x), with every
    unit beyond a text boundary read as SEP: the context is the text's own, whatever its
    neighbours, so the index does not depend on how the corpus was cut into chunks."""
    ctx = x[sel[:, None] + np.arange(-(w - 1), q + w - 1)]  # (n_sel, q + 2w - 2)
    is_sep = ctx == SEP
    left = np.flip(np.logical_or.accumulate(np.flip(is_sep[:, :w - 1], axis=1), axis=1), axis=1)
    right = np.logical_or.accumulate(is_sep[:, w - 1 + q:], axis=1)
    ctx[:, :w - 1][left] = SEP
    ctx[:, w - 1 + q:][right] = SEP
    h = np.zeros(len(sel), dtype=np.uint64)
    for t in range(ctx.shape[1]):
        h *= _CTX_BASE
        h += ctx[:, t].astype(np.uint64)
    return _mix(h)


def _chunk_records(x: np.ndarray, pad: int, base: int, q: int, w: int) -> np.ndarray:
    """Records for one chunk: x is [SEP]*pad + texts each followed by SEP + [SEP]*pad, and x[pad]
    is unit `base` of text.u16."""
    h = _qgram_hashes(x, q)
    is_sep = np.concatenate([[0], np.cumsum(x == SEP)])
    h[(is_sep[q:q + len(h)] - is_sep[:len(h)]) > 0] = _U64_MAX  # q-grams that cross a text boundary
    sel = _winnow(h, w)
    rec = np.empty(len(sel), dtype=_REC)
    rec["fp"] = h[sel]
    rec["ctx"] = _context_hashes(x, sel, q, w)
    rec["pos"] = base + (sel - pad)
    return rec


def _match_len(T: np.ndarray, Q: np.ndarray, tpos: np.ndarray, qpos: np.ndarray, step: int) -> np.ndarray:
    """Number of equal units walking from T[tpos] and Q[qpos] by step (+1 right, -1 left), for each
    pair. Q is int32 with a -1 at both ends (never equal to a code unit), T starts and ends with SEP
    (never equal to a query unit), so every walk stops inside both arrays."""
    out = np.zeros(len(tpos), dtype=np.int64)
    active = np.arange(len(tpos))
    blk = 32
    offs = np.arange(blk, dtype=np.int64) * step
    while active.size:
        base = out[active] * step
        ti = np.clip((tpos[active] + base)[:, None] + offs, 0, len(T) - 1)
        qi = np.clip((qpos[active] + base)[:, None] + offs, 0, len(Q) - 1)
        eq = np.asarray(T[ti]).astype(np.int32) == Q[qi]  # (n_active, blk)
        first = np.where(eq.all(axis=1), blk, np.argmin(eq, axis=1))
        out[active] += first
        active = active[first == blk]
    return out


def _trim_surrogates(Q: np.ndarray, a: int, b: int) -> tuple[int, int]:
    """Do not start a span on the second half of a surrogate pair or end it on the first half."""
    if a < b and 0xDC00 <= Q[a] <= 0xDFFF:
        a += 1
    if a < b and 0xD800 <= Q[b - 1] <= 0xDBFF:
        b -= 1
    return a, b


def corpus_signature(texts: Iterable[str]) -> dict:
    """What identifies a corpus: number of texts, total characters, and a BLAKE2b digest of the texts
    in order. CopyIndex stores it so a reader can check that an index matches its train split."""
    d = hashlib.blake2b(digest_size=16)
    n = chars = 0
    for t in texts:
        d.update(_encode(t).tobytes())
        d.update(b"\xff\xff")
        n += 1
        chars += len(t)
    return {"n_texts": n, "n_chars": chars, "digest": d.hexdigest()}


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


class CopyIndex:
    """Index of a train split for finding verbatim copies in completions (layout and method above).

    CopyIndex.build(texts, path) writes the index folder and returns it opened; CopyIndex.open(path)
    opens an existing one; idx.longest_copy(text) gives the longest copy. A copy counts when its
    length is >= idx.k. Arrays are memory-mapped, so opening costs nothing and queries touch only
    the pages they read (those pages count in the process's RSS, but the kernel can drop them)."""

    FILES = {"text": ("text.u16", "<u2"), "group_fp": ("group_fp.u64", "<u8"),
             "group_start": ("group_start.i64", "<i8"), "pos": ("pos.i64", "<i8")}

    def __init__(self, path: Path, meta: dict):
        self.path = Path(path)
        self.meta = meta
        self.k, self.q, self.w = int(meta["k"]), int(meta["q"]), int(meta["w"])
        self.lang = meta["lang"]
        arrays = {}
        for key, (name, dtype) in self.FILES.items():
            count = int(meta["files"][name]["count"])
            f = self.path / name
            want = count * np.dtype(dtype).itemsize
            if not f.is_file() or f.stat().st_size != want:
                got = f.stat().st_size if f.is_file() else "missing"
                raise ValueError(f"{f}: expected {want} bytes, got {got}; rebuild the index")
            arrays[key] = np.memmap(f, dtype=dtype, mode="r", shape=(count,)) if count else np.zeros(0, dtype)
        self.text, self.group_fp = arrays["text"], arrays["group_fp"]
        self.group_start, self.pos = arrays["group_start"], arrays["pos"]

    # ---------------------------------------------------------------- build

    @classmethod
    def build(cls, texts: Iterable[str], path, *, k: int | None = None, q: int | None = None,
              lang: str | None = None) -> "CopyIndex":
        """Index the train texts under the folder `path` (replaced if it exists) and open it.

        k: copies of >= k characters are guaranteed to be found (and a copy counts when it is
        >= k). q: q-gram length of the fingerprints (q <= k); w = k - q + 1. lang picks the
        defaults when k or q is not given; None: lang_of the first 100 texts together.

        Why the defaults. zh k=64: storygen builds its stories from templates, so a real held-out
        story shares long phrases with train stories; k must be long enough that real held-out
        stories do not all count as copies, or the metric cannot tell a model that memorizes
        from one that writes like the corpus, nor both from one that writes nonsense. Share of
        500 held-out storygen stories (seed 0, tinystories.is_val_story at 0.01) holding a copy
        of >= k characters from the train split of the same stories:
            k           16     24     32     40     48     64     96    128
            60k train   1.000  1.000  0.994  0.894  0.784  0.444  0.120  0.024
            990k train  -      -      1.000  -      0.978  0.798  0.462  0.134
        (longest copy: median 60 / max 186 characters with 60k train stories, 93 / 294 with 990k).
        At k=64 the demo corpus's reference sits near the middle (0.44), so both memorizing
        (towards 1) and drifting from the corpus (towards 0) show; at k <= 32 every real story
        counts as a copy. q=16: long enough that a fingerprint has few groups (queries take ~1 ms
        against 60k stories, ~20 ms against 1M), short enough that w = 49 keeps ~4% of positions.
        en k=192, q=32: English spends about 3 characters (half a word) where Chinese spends one
        on the same story, so 192 characters (~35 words) is the span of 64 Chinese characters."""
        path = Path(path)
        texts = iter(texts)
        head = []
        if k is None or q is None or lang is None:
            for t in texts:
                head.append(t)
                if len(head) == 100:
                    break
            if lang is None:
                lang = lang_of("".join(head))
        _check_lang(lang)
        k = DEFAULT_K[lang] if k is None else int(k)
        q = min(DEFAULT_Q[lang], k) if q is None else int(q)
        if not 1 <= q <= k:
            raise ValueError(f"need 1 <= q <= k, got q={q}, k={k}")
        w = k - q + 1
        pad = q + w  # every context of a selected q-gram stays inside the padded chunk

        t0 = time.time()
        digest = hashlib.blake2b(digest_size=16)
        n_texts = n_chars = 0
        n_units = 1
        sep = np.array([SEP], dtype="<u2")
        fileio.sweep_stale(path.parent)  # what a killed build left
        # Built in fileio's temporary folder and swapped in whole: a kill or a full disk leaves the
        # old index (or none), never half of one.
        with fileio.atomic_dir(path) as tmp:
            (tmp / "buckets").mkdir()
            with open(tmp / "text.u16", "wb") as ft:
                ft.write(sep.tobytes())
                chunk: list[np.ndarray] = []
                chunk_units, chunk_base = 0, 1

                def flush():
                    if not chunk:
                        return
                    x = np.concatenate([np.full(pad, SEP, "<u2"), *chunk, np.full(pad, SEP, "<u2")])
                    rec = _chunk_records(x, pad, chunk_base, q, w)
                    bucket = (rec["fp"] >> np.uint64(56)).astype(np.int64)
                    order = np.argsort(bucket, kind="stable")
                    rec, bucket = rec[order], bucket[order]
                    edges = np.searchsorted(bucket, np.arange(N_BUCKETS + 1))
                    for b in np.flatnonzero(np.diff(edges)):
                        with open(tmp / "buckets" / f"{b:03d}", "ab") as fb:
                            fb.write(rec[edges[b]:edges[b + 1]].tobytes())

                for t in _chain(head, texts):
                    u = _encode(t)
                    ft.write(u.tobytes())
                    ft.write(sep.tobytes())
                    digest.update(u.tobytes())
                    digest.update(b"\xff\xff")
                    n_texts += 1
                    n_chars += len(t)
                    chunk.append(u)
                    chunk.append(sep)
                    chunk_units += len(u) + 1
                    n_units += len(u) + 1
                    if chunk_units >= CHUNK_UNITS:
                        flush()
                        chunk, chunk_base, chunk_units = [], n_units, 0
                flush()
            n_fp, n_groups = cls._sort_buckets(tmp)
            meta = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "k": k, "q": q, "w": w, "lang": lang,
                    "signature": {"n_texts": n_texts, "n_chars": n_chars, "digest": digest.hexdigest()},
                    "n_units": n_units, "n_fingerprints": n_fp, "n_groups": n_groups,
                    "hash": {"q_base": int(_HASH_BASE), "ctx_base": int(_CTX_BASE), "mix": "splitmix64"},
                    "files": {"text.u16": {"dtype": "<u2", "count": n_units},
                              "group_fp.u64": {"dtype": "<u8", "count": n_groups},
                              "group_start.i64": {"dtype": "<i8", "count": n_groups + 1},
                              "pos.i64": {"dtype": "<i8", "count": n_fp}},
                    "build_seconds": round(time.time() - t0, 3)}
            (tmp / "buckets").rmdir()
            with open(tmp / "meta.json", "w") as f:
                json.dump(meta, f, indent=1)
        return cls.open(path)

    @staticmethod
    def _sort_buckets(tmp: Path) -> tuple[int, int]:
        """Sort each bucket by (fingerprint, context, position) and append it to the output files."""
        n_fp = n_groups = 0
        with open(tmp / "pos.i64", "wb") as fp_pos, open(tmp / "group_fp.u64", "wb") as fp_g, \
                open(tmp / "group_start.i64", "wb") as fp_s:
            for b in range(N_BUCKETS):
                f = tmp / "buckets" / f"{b:03d}"
                if not f.exists():
                    continue
                rec = np.fromfile(f, dtype=_REC)
                f.unlink()
                rec = rec[np.lexsort((rec["pos"], rec["ctx"], rec["fp"]))]
                new = np.ones(len(rec), dtype=bool)
                new[1:] = (rec["fp"][1:] != rec["fp"][:-1]) | (rec["ctx"][1:] != rec["ctx"][:-1])
                starts = np.flatnonzero(new)
                fp_pos.write(rec["pos"].astype("<i8").tobytes())
                fp_g.write(rec["fp"][starts].astype("<u8").tobytes())
                fp_s.write((starts + n_fp).astype("<i8").tobytes())
                n_fp += len(rec)
                n_groups += len(starts)
            fp_s.write(np.array([n_fp], dtype="<i8").tobytes())
        return n_fp, n_groups

    @classmethod
    def open(cls, path) -> "CopyIndex":
        """Open an index folder written by build (ValueError if it is incomplete or of another version)."""
        path = Path(path)
        try:
            with open(path / "meta.json") as f:
                meta = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a copy index ({e}); build it with CopyIndex.build") from None
        if meta.get("format") != INDEX_FORMAT or meta.get("version") != INDEX_VERSION:
            raise ValueError(f"{path}: copy index format {meta.get('format')!r} version "
                             f"{meta.get('version')!r}, expected version {INDEX_VERSION}; rebuild it")
        return cls(path, meta)

    @property
    def signature(self) -> dict:
        """corpus_signature() of the texts the index was built from."""
        return dict(self.meta["signature"])

    def matches(self, texts: Iterable[str]) -> bool:
        """Whether the index was built from exactly these texts (same count, length and digest)."""
        return corpus_signature(texts) == self.signature

    # ---------------------------------------------------------------- query

    def longest_copy(self, text: str) -> tuple[int, str]:
        """The longest substring of `text` that occurs verbatim inside one train text, as
        (length in characters, the substring); (0, "") when there is none of at least k characters.
        Exact: every copy of >= k characters is found, and the span returned is verified against
        the stored train text (hash collisions cannot produce it)."""
        Q = _encode(text)
        n, k, q, w = len(Q), self.k, self.q, self.w
        if n < k or len(self.group_fp) == 0:
            return 0, ""
        Qp = np.full(n + 2, -1, dtype=np.int32)  # -1 on both ends: a walk stops there
        Qp[1:-1] = Q
        T = self.text
        h = _qgram_hashes(Q, q)
        sel = _winnow(h, w)
        lo = np.searchsorted(self.group_fp, h[sel], side="left")
        hi = np.searchsorted(self.group_fp, h[sel], side="right")
        counts = hi - lo
        if counts.sum() == 0:
            return 0, ""
        # One (query position, group) pair per group of each selected query fingerprint.
        qi = np.repeat(sel, counts)
        g = np.repeat(lo - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts) + np.arange(counts.sum())
        rep = np.asarray(self.pos[np.asarray(self.group_start[g])])
        right = _match_len(T, Qp, rep, qi + 1, +1)
        ok = right >= q  # a hash collision fails here
        qi, g, rep, right = qi[ok], g[ok], rep[ok], right[ok]
        if not len(qi):
            return 0, ""
        left = _match_len(T, Qp, rep - 1, qi, -1)
        a, b = qi - left, qi + right
        best = int(np.argmax(b - a))
        best_a, best_b = int(a[best]), int(b[best])
        # Query windows (k-unit spans) that occur in train: exactly those inside a span found here.
        long_ = (b - a) >= k
        if not long_.any():
            return 0, ""
        diff = np.zeros(n - k + 2, dtype=np.int64)
        np.add.at(diff, a[long_], 1)
        np.add.at(diff, b[long_] - k + 1, -1)
        covered = np.cumsum(diff[:-1]) > 0  # (n - k + 1,) window starts
        # reach[s]: end of the run of covered windows through s, as the longest span starting at s.
        idx = np.arange(n - k + 1)
        run_end = np.minimum.accumulate(np.where(covered, n - k + 1, idx)[::-1])[::-1] - 1
        reach = np.where(covered, run_end + k - idx, 0)
        if reach.max() > best_b - best_a:
            # A member of a group may match further than its representative only where the
            # representative's match reached the edge of the shared context.
            edge = (left >= w - 1) | (right >= q + w - 1)
            padded = np.concatenate([np.zeros(w - 1, dtype=np.int64), reach, np.zeros(w, dtype=np.int64)])
            bound_all = _sliding(padded, w, np.maximum)  # bound_all[i] = max(reach[i-w+1 .. i])
            cand = np.flatnonzero(edge)
            bound = bound_all[qi[cand]]
            for c in cand[np.argsort(-bound, kind="stable")]:
                if bound_all[qi[c]] <= best_b - best_a:
                    break
                s0, s1 = int(self.group_start[g[c]]), int(self.group_start[g[c] + 1])
                for lo_m in range(s0 + 1, s1, 1 << 20):
                    members = np.asarray(self.pos[lo_m:min(s1, lo_m + (1 << 20))])
                    qv = np.full(len(members), qi[c])
                    r = _match_len(T, Qp, members, qv + 1, +1)
                    l_ = _match_len(T, Qp, members - 1, qv, -1)
                    j = int(np.argmax(l_ + r))
                    if l_[j] + r[j] > best_b - best_a:
                        best_a, best_b = int(qi[c] - l_[j]), int(qi[c] + r[j])
        best_a, best_b = _trim_surrogates(Q, best_a, best_b)
        span = Q[best_a:best_b].tobytes().decode("utf-16-le", "surrogatepass")
        if len(span) < k:
            return 0, ""
        return len(span), span


def _chain(head: list, rest):
    yield from head
    yield from rest



# --------------------------------------------------------------------------- entity consistency

# Words that contain a character name but are not one (点点头 = to nod; 亮晶晶 = sparkling), masked
# before names are looked for. Reduplicated names followed by 的/地/得 are read as adjectives or
# adverbs (白白的云) unless the name was introduced before.
ZH_NOT_NAMES = ("点点头", "一点点", "有点点", "亮晶晶", "胖嘟嘟", "团团转", "闪闪发光", "闪闪发亮", "亮闪闪",
                "蹦蹦跳跳", "一朵朵", "小飞机", "小山坡", "小馒头", "下起了小雨", "一场小雨", "毛毛虫",
                "毛毛雨", "天天都", "天天给", "说说笑笑", "安安静静", "平平安安", "欢欢喜喜", "甜甜蜜蜜",
                "花花绿绿", "圆滚滚", "小花园", "小红花", "小白兔", "小黑板", "今天天气", "每天天", "天天向上",
                "小东西", "小海豚", "小海龟", "小海星", "小海鸥", "小龙虾", "小云朵", "小月亮", "小雪花", "小雪人",
                "小玉米", "小美人鱼", "小红帽", "小花猫", "小花狗", "小花朵", "小白鼠", "小白鹅", "小白花",
                "小宇宙", "白白胖胖", "团团围住", "奇奇怪怪", "快快乐乐", "明明白白",
                "浩浩荡荡", "小飞侠", "小飞虫", "小本本", "健健康康")
ZH_MEASURE_WORDS = ("只", "个", "头", "匹", "条", "位", "名")
ZH_PRONOUNS = ("他", "她", "它")
# Common reduplicated words that are never names, for Lexicon.from_corpus.
ZH_REDUP_WORDS = set("妈妈 爸爸 奶奶 爷爷 哥哥 姐姐 弟弟 妹妹 宝宝 叔叔 伯伯 婆婆 公公 舅舅 姑姑 太太 星星 谢谢 "
                     "看看 试试 想想 走走 等等 渐渐 悄悄 轻轻 静静 好好 紧紧 深深 久久 默默 偷偷 常常 往往 人人 "
                     "个个 家家 处处 样样 哈哈 嘻嘻 呵呵 慢慢 刚刚 高高 大大 小小 天天 点点 多多 早早 快快 "
                     "乖乖 甜甜 圆圆 亮亮 白白 黑黑 红红 绿绿 软软 暖暖 香香 长长 细细 满满 开开 玩玩 聊聊 "
                     "说说 笑笑 跳跳 飞飞 转转 摸摸 拍拍 抱抱 亲亲 尝尝 听听 闻闻 找找 问问 帮帮 学学 唱唱 "
                     "画画 写写 读读 数数 猜猜 比比 拉拉 推推 拿拿 洗洗 擦擦 吹吹 摇摇 晃晃 咚咚 哗哗 沙沙 "
                     "嗡嗡 汪汪 喵喵 叽叽 嘎嘎 呱呱 咩咩 哼哼 吱吱 嘀嗒 滴滴 一一 连连 纷纷 频频 匆匆 "
                     "冷冷 热热 凉凉 淡淡 浅浅 弯弯 尖尖 方方 扁扁 胖胖 瘦瘦 厚厚 薄薄 重重 脆脆 酸酸".split())
EN_KINDS = ("girl", "boy", "cat", "kitten", "dog", "puppy", "bird", "bear", "bunny", "rabbit", "fox", "mouse",
            "duck", "pig", "frog", "owl", "lion", "tiger", "elephant", "monkey", "horse", "cow", "sheep", "lamb",
            "squirrel", "turtle", "fish", "butterfly", "bee", "ant", "dragon", "robot", "princess", "prince",
            "king", "queen", "man", "woman", "lady", "baby", "kid", "child", "chicken", "hen", "penguin",
            "deer", "wolf", "snake", "giraffe", "zebra", "panda", "koala", "hedgehog", "spider", "bug")
EN_ROLES = ("mom", "mommy", "mum", "mother", "dad", "daddy", "father", "grandma", "grandpa", "granny",
            "grandmother", "grandfather", "teacher", "friend", "friends", "sister", "brother", "aunt", "uncle",
            "neighbor", "parents", "family", "everyone", "mama", "papa", "doctor", "farmer", "people")
EN_NOT_NAMES = {"I", "Once", "One", "The", "A", "An", "And", "But", "So", "Then", "When", "He", "She", "It", "They",
                "We", "You", "His", "Her", "Their", "My", "Our", "Your", "This", "That", "There", "Mom", "Dad",
                "Mommy", "Daddy", "Mama", "Papa", "Grandma", "Grandpa", "Granny", "Mr", "Mrs", "Miss", "Ms",
                "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "Christmas",
                "God", "OK", "Okay", "Yes", "No", "Oh", "Wow", "Hello", "Hi", "Goodbye", "Bye", "Please",
                "Thank", "Thanks", "Sorry", "What", "Why", "How", "Where", "Who", "Let", "Look", "Come", "Can",
                "Do", "Don't", "Are", "Is", "If", "In", "On", "At", "After", "Before", "As", "All", "Every",
                "Now", "Today", "Tomorrow", "Yesterday", "Suddenly", "Finally", "Soon", "Later", "Sir"}
EN_PRONOUNS = {"he": "he", "him": "he", "his": "he", "himself": "he",
               "she": "she", "her": "she", "hers": "she", "herself": "she"}


@dataclass(frozen=True)
class Lexicon:
    """Who can be a character, for entity_consistency. names: character names; kinds: what a
    character is (小猫 / cat); measure_words: classifiers of an introduction (一只小猫); roles:
    characters known by their role (妈妈, 猫妈妈, 老师 / mom), never flagged as unintroduced;
    stock_phrases: phrases where a name or kind word is not a character (学小猫叫, 三只小熊的故事),
    masked before the check; kind_pronouns: the pronoun a kind fixes (小女孩 -> 她); shorts: the
    short form of a kind in a possessive introduction (他的狗旺旺: 狗 -> 小狗)."""
    lang: str
    names: tuple[str, ...]
    kinds: tuple[str, ...]
    measure_words: tuple[str, ...] = ZH_MEASURE_WORDS
    roles: tuple[str, ...] = ()
    stock_phrases: tuple[str, ...] = ()
    kind_pronouns: tuple[tuple[str, str], ...] = ()
    shorts: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        _check_lang(self.lang)
        object.__setattr__(self, "_compiled", _compile_lexicon(self))

    @classmethod
    def storygen(cls) -> "Lexicon":
        """The built-in corpus's own tables: its names, kinds, parents, teachers, the creatures a
        hero helps, and every table phrase that mentions a name or kind without it being a
        character (activities like 学小猫叫, bedtime tales, dreams, chores, scenery)."""
        import storygen as sg

        names = tuple(dict.fromkeys(sg.BOY_NAMES + sg.GIRL_NAMES + sg.ANIMAL_NAMES + sg.PET_DOG_NAMES))
        kinds = tuple([sg.BOY.word, sg.GIRL.word] + [k.word for k in sg.ANIMAL_KINDS])
        roles = [r for r, _ in sg.PARENTS] + [t for t, _ in sg.TEACHERS]
        roles += [k.short + r for k in sg.ANIMAL_KINDS for r, _ in sg.PARENTS]
        roles += [h[0] for h in sg.HELP_NEEDS if h[0] not in kinds]
        roles += ["鸭妈妈", "大人", "大狗", "小瓢虫", "虫子", "医生阿姨", "阿姨", "邻居", "小朋友们", "小朋友"]
        words = names + kinds
        stock = set()

        def scan(obj):
            if isinstance(obj, str):
                if any(w in obj for w in words) and obj not in words:
                    stock.add(obj)
            elif isinstance(obj, (list, tuple)):
                for x in obj:
                    scan(x)

        for table in (sg.ACTIVITIES, sg.OBJECTS, sg.FOODS, sg.PLACES, sg.SKILLS, sg.FEARS, sg.GIFTS, sg.TREATS,
                      sg.CHORES, sg.COOKED, sg.PLANTS, sg.GROW_WEATHER, sg.WEATHER, sg.WEATHER_DAYS, sg.INDOOR_PLAY,
                      sg.TALES, sg.DREAMS, sg.ROUTINE, sg.LOOKS, sg.FACE, sg.EYES, sg.HAIR, sg.OUT_PLANS,
                      [o[3].split("/") for o in sg.OUTINGS], [(k.move, k.happy, k.feature) for k in sg.ANIMAL_KINDS]):
            scan(table)
        for noun, _, _, doing in sg.NATURE:  # 小鸟在树枝上唱歌
            scan(noun + doing)
        for o in sg.OUTINGS:
            for _, _, noun, does in o[2]:  # 小鸡在找虫子吃
                scan(noun + does)
        return cls(lang="zh", names=names, kinds=kinds, measure_words=ZH_MEASURE_WORDS,
                   roles=tuple(r for r in dict.fromkeys(roles) if r not in names),
                   stock_phrases=tuple(sorted(stock | set(ZH_NOT_NAMES), key=len, reverse=True)),
                   kind_pronouns=((sg.BOY.word, "他"), (sg.GIRL.word, "她")),
                   shorts=tuple((k.short, k.word) for k in sg.ANIMAL_KINDS))


    @classmethod
    def from_corpus(cls, texts: Iterable[str], lang: str, *, n_names: int = 300, min_count: int = 3) -> "Lexicon":
        """A lexicon guessed from a corpus (a heuristic, for corpora other than storygen's):
        zh: names are the 2-3 character words after 叫 / 名叫 / 叫做 (followed by punctuation or 的),
        plus 2-character reduplicated words (贝贝) seen at least min_count times that are not common
        words (妈妈, 慢慢 ...) and are followed by 的/地 less than a third of the time (白白的 is an
        adjective); kinds are storygen's plus the words between 一只/一个 ... and 叫. en: names are
        capitalised words after "named"/"called", plus capitalised words seen at least min_count
        times inside sentences (not sentence-initial) and capitalised at least 3 times as often
        as not; kinds are a built-in list plus the word before "named". The n_names most frequent
        names are kept; roles are the family words (妈妈 / mom, dad ...). A sample of ~10,000
        stories is plenty; add the prompts' own names with add_names."""
        _check_lang(lang)
        names: Counter = Counter()
        kinds: Counter = Counter()
        if lang == "zh":
            redup: Counter = Counter()
            adj: Counter = Counter()
            prev: dict[str, Counter] = {}
            nxt: dict[str, Counter] = {}
            for t in texts:
                for x in re.finditer(r"(?:名叫|叫做|叫)([\u4e00-\u9fff]{2,3}?)(?=[的，。！？、“”：\s]|$)", t):
                    names[x.group(1)] += 1
                for x in re.finditer(r"一[只个头匹条]([\u4e00-\u9fff]{1,3}?)[，]?(?:名叫|叫)", t):
                    kinds[x.group(1)] += 1
                for x in re.finditer(r"([\u4e00-\u9fff])\1", t):
                    w = x.group()
                    redup[w] += 1
                    adj[w] += t[x.end():x.end() + 1] in ("的", "地")
                    prev.setdefault(w, Counter())[t[x.start() - 1:x.start()]] += 1
                    nxt.setdefault(w, Counter())[t[x.end():x.end() + 1]] += 1
            for w, n in redup.items():
                # A name is said in many contexts; a piece of a word (滑滑梯, 布娃娃, 一颗颗, 认认真真)
                # mostly sits beside the same character.
                glued = max(prev[w].most_common(1)[0][1], nxt[w].most_common(1)[0][1]) > n / 2
                if n >= min_count and w not in ZH_REDUP_WORDS and adj[w] < n / 3 and not glued:
                    names[w] += n
            import storygen as sg
            base = [sg.BOY.word, sg.GIRL.word, "男孩", "女孩"] + [k.word for k in sg.ANIMAL_KINDS]
            bad = set("他她它我你们这那了着过声")
            extra = [w for w, n in kinds.most_common(50) if n >= min_count and not (set(w) & bad) and "的" not in w]
            all_kinds = tuple(dict.fromkeys(base + extra))
            roles = ("妈妈", "爸爸", "奶奶", "爷爷", "外婆", "外公", "老师", "哥哥", "姐姐", "弟弟", "妹妹",
                     "阿姨", "叔叔", "大家", "小朋友们", "小朋友", "大人", "邻居")
            names = Counter({w: n for w, n in names.items() if n >= min_count and not (set(w) & bad)
                             and w not in all_kinds and w not in roles})
            return cls(lang="zh", names=tuple(w for w, _ in names.most_common(n_names)), kinds=all_kinds,
                       measure_words=ZH_MEASURE_WORDS, roles=roles, stock_phrases=ZH_NOT_NAMES,
                       kind_pronouns=(("小男孩", "他"), ("男孩", "他"), ("小女孩", "她"), ("女孩", "她")),
                       shorts=tuple((k[1:], k) for k in all_kinds if k.startswith("小") and len(k) >= 3))
        caps: Counter = Counter()
        lower: Counter = Counter()
        for t in texts:
            for x in re.finditer(r"\b(?:named|called)\s+([A-Z][a-z]+)", t):
                names[x.group(1)] += min_count  # one introduction is enough evidence
            for x in re.finditer(r"\b(?:a|an)\s+(?:little\s+|small\s+|big\s+|young\s+|old\s+)?([a-z]+)\s+named\b", t):
                kinds[x.group(1)] += 1
            for x in re.finditer(r"[A-Za-z]+", t):
                w = x.group()
                if w[0].isupper():
                    prev = t[:x.start()].rstrip()[-1:]
                    if prev and prev not in '.!?"“”\'‘’:' and w not in EN_NOT_NAMES:
                        caps[w] += 1
                else:
                    lower[w.capitalize()] += 1
        for w, n in caps.items():
            if n >= min_count and n >= 3 * lower[w]:
                names[w] += n
        names = Counter({w: n for w, n in names.items() if w not in EN_NOT_NAMES and w.lower() not in EN_KINDS})
        extra = [w for w, n in kinds.most_common(50) if n >= min_count]
        all_kinds = tuple(dict.fromkeys(EN_KINDS + tuple(extra)))
        return cls(lang="en", names=tuple(w for w, _ in names.most_common(n_names)), kinds=all_kinds,
                   measure_words=(), roles=EN_ROLES, stock_phrases=(),
                   kind_pronouns=(("girl", "she"), ("boy", "he"), ("woman", "she"), ("lady", "she"),
                                  ("princess", "she"), ("queen", "she"), ("man", "he"), ("prince", "he"),
                                  ("king", "he")))

    def add_names(self, names: Iterable[str]) -> "Lexicon":
        """This lexicon with more names (e.g. the names in one's prompts)."""
        import dataclasses
        return dataclasses.replace(self, names=tuple(dict.fromkeys(self.names + tuple(names))))




def _en_norm(word: str) -> str:
    """Kinds and roles compare lowercase and singular; names as written."""
    if word[:1].isupper() and word.lower() not in EN_PRONOUNS and not word.isupper():
        lw = word.lower()
        if lw not in EN_KINDS and lw not in EN_ROLES and lw.rstrip("s") not in EN_KINDS:
            return word
    w = word.lower()
    for suffix in ("es", "s"):
        if w.endswith(suffix) and w[:-len(suffix)] in EN_KINDS + EN_ROLES:
            return w[:-len(suffix)]
    return w


def _en_mentions(m: str, lex: "Lexicon", c: dict) -> list[_Mention]:
    out = []
    kinds = {k.lower() for k in lex.kinds}
    if c["name_re"] is not None:
        out += [_Mention(x.start(), x.end(), x.group(), "name") for x in c["name_re"].finditer(m)]
    taken = {i for x in out for i in range(x.start, x.end)}
    for x in c["word_re"].finditer(m):
        if x.start() in taken:
            continue
        base = x.group(1).lower()
        men = _Mention(x.start(), x.end(), x.group(1), "kind" if base in kinds else "role")
        men.ignore = bool(x.group(2)) and men.typ == "kind"  # cats, bunnies: a group, not a character
        out.append(men)
    out.sort(key=lambda x: x.start)
    by_end = {x.end: x for x in out}
    by_start = {x.start: x for x in out}
    for x in out:
        if x.typ == "kind":
            if not x.ignore and c["intro_before"].search(m[max(0, x.start - 40):x.start]):
                x.intro = True
            elif not x.ignore and not re.search(r"\bthe\s+(?:[a-z]+\s+){0,2}$", m[max(0, x.start - 30):x.start], re.I):
                x.ignore = True  # English: only "the cat" refers to one character who must be known
            continue
        if x.typ != "name":
            continue
        before = m[max(0, x.start - 20):x.start]
        if c["name_intro"].search(before):
            x.intro = True
            g = re.search(r"\s+(?:named|called)\s+$", before)
            if g:
                k = by_end.get(x.start - len(g.group()))
                if k is not None and k.typ == "kind":  # a little girl named Lily
                    x.kind, k.used = _en_norm(k.word), True
        prev = by_end.get(x.start - 1)
        if prev is not None and prev.typ == "kind" and m[x.start - 1] == " ":  # her dog Max
            x.kind, x.intro, prev.used = _en_norm(prev.word), True, True
        for pat in (c["assert_after"], c["the_after"]):  # Lily was a little girl / Max the dog
            a = pat.match(m, x.end)
            if a:
                k = by_start.get(a.end())
                if k is not None and k.typ == "kind":
                    x.kind, x.intro, k.used = _en_norm(k.word), True, True
    return out


@dataclass
class EntityResult:
    """ok: no problem found; hero: the protagonist as the text names it ("" when the text has no
    character); problems: one human-readable line per inconsistency."""
    ok: bool
    hero: str
    problems: list[str] = field(default_factory=list)


@dataclass
class _Mention:
    start: int
    end: int
    word: str
    typ: str  # "name", "kind" or "role"
    sent: int = 0
    quoted: bool = False
    intro: bool = False  # introduced right here (叫X, 一只小猫, a girl named X ...)
    kind: str = ""  # for a name: the kind this mention asserts (小猫咪咪, 咪咪是一只小猫)
    used: bool = False  # a kind word consumed by a name's introduction or assertion
    ignore: bool = False  # not a single character (三只小熊, 小鸟们, 白白的云)


def _alternation(words) -> str:
    return "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True) if w)


def _compile_lexicon(lex: "Lexicon") -> dict:
    c = {}
    if lex.lang == "zh":
        c["words"] = re.compile(_alternation(lex.names + lex.kinds + lex.roles))
        clf = "[" + "".join(re.escape(m) for m in lex.measure_words) + "]"
        c["intro_before"] = re.compile("一" + clf + "(?:[^，。！？“”\n]{0,10}?的)?$")
        c["assert_after"] = re.compile("(?:是|就是|变成了)一" + clf + "(?:[^，。！？“”\n]{0,10}?的)?")
    else:
        c["name_re"] = re.compile(r"\b(?:" + _alternation(lex.names) + r")\b") if lex.names else None
        c["word_re"] = re.compile(r"\b(" + _alternation(lex.kinds + lex.roles) + r")(s|es)?\b", re.I)
        c["intro_before"] = re.compile(r"\b(?:a|an|one)\s+(?:[a-z]+\s+){0,3}$", re.I)
        c["assert_after"] = re.compile(r"\s+(?:was|is|became)\s+(?:a|an)\s+(?:[a-z]+\s+){0,3}", re.I)
        c["the_after"] = re.compile(r",?\s+the\s+(?:[a-z]+\s+){0,2}", re.I)
        c["name_intro"] = re.compile(r"\b(?:named|called|name is|name was|I am|I'm|friend|friends with)\s+$", re.I)
    c["names"], c["kinds"], c["roles"] = set(lex.names), set(lex.kinds), set(lex.roles)
    c["kind_pron"], c["shorts"] = dict(lex.kind_pronouns), dict(lex.shorts)
    return c


def _sentence_spans(text: str, lang: str) -> list[tuple[int, int]]:
    """Sentences as (start, end): split at sentence-final punctuation outside quotes, and at every
    line break. A quoted line stays inside the sentence that carries it (他说：“……！”)."""
    enders = "。！？!?…\n" if lang == "zh" else ".!?\n"
    spans, start, depth = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "“「『":
            depth += 1
        elif ch in "”」』":
            depth = max(0, depth - 1)
        elif ch == '"':
            depth = 0 if depth else 1
        if ch == "\n" or (ch in enders and depth == 0):
            if text[start:i + 1].strip():
                spans.append((start, i + 1))
            start = i + 1
            if ch == "\n":
                depth = 0
    if text[start:].strip():
        spans.append((start, len(text)))
    return spans


def _quoted_mask(text: str) -> np.ndarray:
    """(len(text),) bool: inside a quotation (the quote marks included)."""
    out = np.zeros(len(text), dtype=bool)
    depth = 0
    for i, ch in enumerate(text):
        if ch in "“「『":
            depth += 1
        elif ch == '"':
            depth = 0 if depth else 1
            out[i] = True
        elif ch == "\n":
            depth = 0
        out[i] |= depth > 0
        if ch in "”」』":
            out[i] = True
            depth = max(0, depth - 1)
    return out


def _mask(text: str, phrases: tuple[str, ...], lang: str) -> str:
    """Replace every occurrence of every stock phrase with U+25A1, overlaps included (安安静静 and
    静静地听小鸟唱歌 both go in 安安静静地听小鸟唱歌). English phrases match whole words, any case."""
    if not phrases:
        return text
    hide = np.zeros(len(text), dtype=bool)
    if lang == "zh":
        for ph in phrases:
            i = text.find(ph)
            while i >= 0:
                hide[i:i + len(ph)] = True
                i = text.find(ph, i + 1)
    else:
        for ph in phrases:
            for m in re.finditer(r"\b" + re.escape(ph) + r"\b", text, re.I):
                hide[m.start():m.end()] = True
    if not hide.any():
        return text
    return "".join("\u25a1" if h else ch for ch, h in zip(text, hide))


def _zh_mentions(m: str, lex: "Lexicon", c: dict) -> list[_Mention]:
    out = [_Mention(x.start(), x.end(), x.group(),
                    "name" if x.group() in c["names"] else "kind" if x.group() in c["kinds"] else "role")
           for x in c["words"].finditer(m)]
    by_end = {x.end: x for x in out}
    by_start = {x.start: x for x in out}
    for x in out:
        if x.typ == "kind":
            before = m[max(0, x.start - 3):x.start]
            if before[-1:] == "群" or re.search("[两三四五六七八九十几][只个头匹条]$", before) or m[x.end:x.end + 1] == "们":
                x.ignore = True
            elif c["intro_before"].search(m[max(0, x.start - 14):x.start]):
                x.intro = True
            continue
        if x.typ != "name":
            continue
        prev = by_end.get(x.start)
        if prev is not None and prev.typ == "kind":  # 小猫咪咪
            x.kind, x.intro, prev.used = prev.word, True, True
        before = m[max(0, x.start - 4):x.start]
        if before.endswith("叫") or before.endswith("我是") or before.endswith("朋友"):
            x.intro = True
            nxt = by_start.get(x.end + 1)
            if m[x.end:x.end + 1] == "的" and nxt is not None and nxt.typ == "kind":  # 一只叫咪咪的小猫
                x.kind, nxt.used = nxt.word, True
            for gap in ("叫", "名叫", "，名叫", "，叫"):  # 一只小狗，名叫旺旺
                k = by_end.get(x.start - len(gap))
                if m[x.start - len(gap):x.start] == gap and k is not None and k.typ == "kind":
                    x.kind, k.used = k.word, True
        for short, kind in c["shorts"].items():
            if before.endswith("的" + short):  # 他的狗旺旺
                x.kind, x.intro = kind, True
        a = c["assert_after"].match(m, x.end)
        if a:
            k = by_start.get(a.end())
            if k is not None and k.typ == "kind":  # 咪咪是一只可爱的小猫
                x.kind, x.intro, k.used = k.word, True, True
        if re.search("[一两三几每][个只块盘碗根串]$|吃了?$", before):
            x.ignore = True  # 吃了一个馒头: food, not the dog 馒头
            continue
        if len(x.word) == 2 and x.word[0] == x.word[1] and m[x.end:x.end + 1] in ("的", "地") and not x.intro:
            x.ignore = True  # 白白的云: an adjective, unless the name was introduced (checked later)
    return out



def entity_consistency(text: str, lexicon: "Lexicon") -> EntityResult:
    """Do the named characters stay who they are? Reads the story as a sequence of sentences and
    the character mentions in them: names and kinds from the lexicon (小猫, 小女孩 / cat, girl) and
    roles (妈妈 / mom), with stock phrases where such a word is not a character masked first.

    The hero is the first character of the first sentence that has one: its first name, or else a
    kind introduced with a measure word (从前，有一只小乌龟 -> the nameless hero 小乌龟), or else a bare
    kind. A text with no character at all gives ok=True, hero="" (evaluate.py reports the share of
    texts with a hero beside this metric). Problems found:
      - a name that appears without being introduced: its first mention is neither in an
        introduction (叫X, 名叫X, 我叫X, 朋友X, 他的狗X, 小猫X, X是一只小猫 / named X, X was a girl,
        X the cat) nor in a sentence that also mentions the hero (小明和杰克在公园里玩);
      - the same for a nameless character: a bare kind word that is neither the hero's kind nor
        introduced (一只小猫) nor beside the hero; for a nameless hero this reads as the hero
        turning into another animal (the nameless hero 小乌龟 becomes a 小鸭子);
      - a named character, hero or not, whose kind changes (the hero 咪咪 is a 小猫 here and a
        小狗 later);
      - the hero's pronoun changing: in a narration sentence (quotes removed) that mentions the
        hero and no other character, every 他/她/它 (he/she, him/her, his/hers in English) is taken
        to mean the hero, and the first one fixes it (a 小女孩 is 她 from the start). storygen
        writes its stories so that this holds exactly.
    Roles (parents, teachers) are never flagged. ok is True when there is no problem. Give it the
    whole story, prompt included: the opening is where the hero is introduced."""
    c = lexicon._compiled
    lang = lexicon.lang
    masked = _mask(text, lexicon.stock_phrases, lang)
    spans = _sentence_spans(masked, lang)
    quoted = _quoted_mask(masked)
    mentions = _zh_mentions(masked, lexicon, c) if lang == "zh" else _en_mentions(masked, lexicon, c)
    sent_of = np.zeros(len(masked) + 1, dtype=np.int64)
    for i, (a, b) in enumerate(spans):
        sent_of[a:b] = i
    for x in mentions:
        x.sent = int(sent_of[x.start])
        x.quoted = bool(quoted[x.start])
    norm = (lambda w: w) if lang == "zh" else _en_norm
    live = [x for x in mentions if not x.used]

    # The hero: the first sentence with a character decides.
    hero, hero_named, hero_kind = "", False, ""
    # A reduplicated name read as an adjective (晶晶的心情) still counts here if the text also uses
    # it as a name elsewhere.
    strong = {x.word for x in live if x.typ == "name" and not x.ignore}
    chars = [x for x in live if x.typ != "role" and (not x.ignore or (x.typ == "name" and x.word in strong))]
    if chars:
        first = [x for x in chars if x.sent == chars[0].sent]
        pick = next((x for x in first if x.typ == "name" or x.intro), first[0])
        hero, hero_named = norm(pick.word), pick.typ == "name"
        hero_kind = norm(pick.kind) if hero_named else norm(pick.word)
    if not hero:
        return EntityResult(ok=True, hero="", problems=[])

    problems: list[str] = []
    seen_problem = set()

    def problem(key, msg):
        if key not in seen_problem:
            seen_problem.add(key)
            problems.append(msg)

    known: dict[str, str] = {}  # name -> kind ("" unknown)
    kinds_present = {hero_kind} if hero_kind else set()
    if hero_named:
        known[hero] = hero_kind

    def is_hero(x) -> bool:
        if x.typ == "name":
            return norm(x.word) == hero
        return not hero_named and x.typ == "kind" and norm(x.word) == hero

    hero_sents = {x.sent for x in live if is_hero(x)}
    for x in live:
        w = norm(x.word)
        if x.typ == "role":
            continue
        if x.typ == "name":
            if x.ignore and w not in known:
                continue
            k = norm(x.kind)
            if w in known:
                if k and known[w] and k != known[w]:
                    who = "the hero " + w if w == hero else w
                    problem(("kind", w), f"{who} is a {known[w]} here and a {k} later")
                elif k and not known[w]:
                    known[w] = k
            else:
                if not (x.intro or x.sent in hero_sents):
                    problem(("intro", w), f"name {w} appears without being introduced")
                known[w] = k
            if k:
                kinds_present.add(k)
            continue
        if x.ignore:  # a kind word
            continue
        if x.intro or w in kinds_present or x.sent in hero_sents:
            kinds_present.add(w)
            continue
        others = [y for y in live if y.sent == x.sent and y is not x and not y.ignore]
        if not hero_named and not others:
            problem(("kind", w), f"the nameless hero {hero} becomes a {w}")
        else:
            problem(("intro", w), f"{w} appears without being introduced")
        kinds_present.add(w)

    # The hero's pronoun, from narration sentences about the hero alone, and from a sentence that
    # names nobody right after one about the hero alone (从前，有一个小女孩叫莉莉。她是……).
    hero_pron = dict(c["kind_pron"]).get(hero_kind, "")
    fixed_by_kind = bool(hero_pron)
    prev_alone = False
    for i, (a, b) in enumerate(spans):
        ms = [x for x in live if x.sent == i and not x.quoted and not (x.ignore and x.typ == "kind")]
        alone = bool(ms) and all(is_hero(x) or (x.typ == "kind" and norm(x.word) == hero_kind) for x in ms) \
            and any(is_hero(x) for x in ms)
        nobody = not any(x.sent == i for x in mentions)
        follows, prev_alone = prev_alone and nobody, alone
        if not (alone or follows):
            continue
        narration = "".join(ch for ch, q in zip(masked[a:b], quoted[a:b]) if not q)
        for p in _pronouns(narration, lang):
            if not hero_pron:
                hero_pron = p
            elif p != hero_pron:
                if fixed_by_kind:
                    problem(("pron",), f"the hero {hero} is a {hero_kind} but is called {p}")
                else:
                    problem(("pron",), f"the hero {hero} is {hero_pron} here and {p} later")
    return EntityResult(ok=not problems, hero=hero, problems=problems)


def _pronouns(narration: str, lang: str) -> list[str]:
    if lang == "zh":
        bare = re.sub("[他她它]们|其他|其它", "", narration)
        return [ch for ch in bare if ch in ZH_PRONOUNS]
    return [EN_PRONOUNS[w] for w in re.findall(r"[a-z]+", narration.lower()) if w in EN_PRONOUNS]


# --------------------------------------------------------------------------- command line


@dataclass
class MetricsConfig:
    text: str = opt("", "print every metric of this text (entity consistency with the storygen lexicon for zh)")
    bench_index: int = opt(0, "build a CopyIndex over the train split of this many storygen stories")
    seed: int = opt(0, "storygen seed for --bench_index")
    k: int = opt(0, "copy threshold for --bench_index; 0 = the language default")
    reference: int = opt(500, "held-out stories of the same corpus whose copy rate --bench_index reports")
    out: str = opt("out/copy_index", "index folder for --bench_index")


def _peak_rss_mib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _bench_index(cfg: MetricsConfig) -> None:
    import storygen
    from tinystories import is_val_story

    t0 = time.time()
    for _ in storygen.generate_stories(cfg.bench_index, seed=cfg.seed):
        pass
    gen_s = time.time() - t0
    print(f"generate {cfg.bench_index} stories (seed {cfg.seed}): {gen_s:.1f}s", flush=True)
    train = (s for s in storygen.generate_stories(cfg.bench_index, seed=cfg.seed) if not is_val_story(s, 0.01))
    t0 = time.time()
    idx = CopyIndex.build(train, cfg.out, k=cfg.k or None, lang="zh")
    total_s = time.time() - t0
    m = idx.meta
    print(f"index {cfg.out}: {m['signature']['n_texts']} train stories, {m['signature']['n_chars']:,} chars, "
          f"k={idx.k} q={idx.q} w={idx.w}, {m['n_fingerprints']:,} fingerprints in {m['n_groups']:,} groups")
    print(f"build {total_s - gen_s:.1f}s (+{gen_s:.1f}s generating the stories it reads), "
          f"peak RSS {_peak_rss_mib():.0f} MiB, {_dir_bytes(Path(cfg.out)) / 2**20:.0f} MiB on disk", flush=True)
    if cfg.reference > 0:
        val = []
        for s in storygen.generate_stories(cfg.bench_index, seed=cfg.seed):
            if is_val_story(s, 0.01):
                val.append(s)
                if len(val) == cfg.reference:
                    break
        t0 = time.time()
        lengths = sorted(idx.longest_copy(s)[0] for s in val)
        ms = (time.time() - t0) / max(1, len(val)) * 1000
        rate = sum(x >= idx.k for x in lengths) / max(1, len(val))
        print(f"reference copy rate (>= {idx.k} chars) of {len(val)} held-out stories: {rate:.3f}; "
              f"longest copy median {lengths[len(lengths) // 2]}, max {lengths[-1]}; {ms:.1f} ms per story")


def _print_text_metrics(text: str) -> None:
    lang = lang_of(text)
    print(f"lang {lang}, {len(units(text, lang))} units, rep4 {rep4(text, lang):.3f}, "
          f"distinct2 {distinct2([text], lang):.3f}, bad utf8 {has_bad_utf8(text)}")
    lex = Lexicon.storygen() if lang == "zh" else Lexicon.from_corpus([text], "en", min_count=1)
    r = entity_consistency(text, lex)
    print(f"entity consistency: ok={r.ok} hero={r.hero!r}")
    for p in r.problems:
        print(f"  - {p}")


def usage() -> str:
    """metrics.py --help."""
    return render_help(MetricsConfig, "python metrics.py --text=TEXT | --bench_index=N [--key=value ...]", __doc__)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2  # no arguments: nothing to measure
    return cli("metrics.py", lambda: _main(argv))


def _main(argv: list[str]) -> int:
    cfg = MetricsConfig(**parse_options(MetricsConfig, argv))
    if cfg.bench_index < 0 or cfg.k < 0:
        raise OptionError("--bench_index and --k must be >= 0")
    if cfg.text:
        _print_text_metrics(cfg.text)
    if cfg.bench_index:
        _bench_index(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
