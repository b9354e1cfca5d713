"""TinyStories data pipeline: download, synthesize, train a tokenizer, pretokenize, load batches.

One subcommand per stage; every stage skips work that is already done and never asks a question.

    python tinystories.py download                      # TinyStoriesChinese -> data/zh/
    python tinystories.py download --dataset=en         # English TinyStories -> data/en/
    python tinystories.py synth --n_stories=100000      # built-in corpus -> data/synth/
    python tinystories.py train_vocab --vocab_size=5000 # -> data/tok5000.model (+ .vocab, .bin)
    python tinystories.py pretokenize --vocab_size=5000 # -> data/tok5000/train_*.bin, val.bin
    python tinystories.py train_vocab --vocab_size=5000 --dataset=synth
    python tinystories.py pretokenize --vocab_size=5000 --data_dir=my_stories/

`--data_root=DIR` moves everything (raw data, tokenizers, shards) from data/ to DIR.
`--data_dir=DIR` reads your own stories: .jsonl (text key auto-detected or --text_key),
.json arrays, or .txt files with stories separated by blank lines.

Pretokenized shards are a 256-byte header, then uint16 token ids (every story is BOS, its
tokens, EOS); docs/formats.md specifies them byte by byte, as it does meta.json and .complete.
`pretokenize --instruct=true` puts an instruction (instruct.py's template, built from the
record's words/features/summary/sentence fields) between BOS and a story, for a share of the
stories (--instruct_share), and writes a .mask beside each shard flagging the instruction's
tokens, which TokenBatches leaves out of the loss unless --instruct_loss=true.

Layout under data/: zh/, en/, synth/ (raw stories), tok<N>.model/.vocab/.bin (tokenizer),
tok<N>/train_000.bin ... (one shard per source file) and tok<N>/val.bin. The val split is
decided per story by a hash of its text (`is_val_story`, 1% by default), so it is fixed, the
same for every vocab size, and never leaks into train. Training code reads the shards with
`TokenBatches` (see its docstring).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import stat
import struct
import sys
import tarfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

import fileio
from options import OptionError, UserError, cli, opt, os_error_text, parse_options, render_help

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_DATA_ROOT = REPO_ROOT / "data"
if str(REPO_ROOT) not in sys.path:  # storygen.py and tokenizer.py, imported lazily by the stages
    sys.path.insert(0, str(REPO_ROOT))

# ----------------------------------------------------------------------------------------------
# errors

class DataError(UserError):
    """A problem with the user's data, files or network: reported as one line, exit status 1."""


# ----------------------------------------------------------------------------------------------
# one run per folder

class FolderLock:
    """An exclusive flock on a lock file (its text: the holder's pid), e.g. out/.lock for train.py
    or data/.tok512.lock for train_vocab and pretokenize of tok512.

    A second process is refused at once (DataError naming the holder's pid). The kernel drops a
    flock when its holder dies, even by SIGKILL, so the file a killed run leaves behind is free:
    the next run takes it over (`stale_pid` says whose it was) and removes it when done.
    """

    def __init__(self, path: Path, *, what: str):
        self.path = Path(path)
        self.fd = None
        self.stale_pid = None
        try:
            import fcntl
        except ImportError:  # no flock (Windows): run unlocked
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._pid_in(fd)
                os.close(fd)
                raise DataError(f"{what} is in use by another run (pid {holder or 'unknown'}, which holds "
                                f"{self.path}); wait for it to end or use another folder") from None
            except BaseException:
                os.close(fd)
                raise
            try:  # the holder before us may have removed the file after we opened it: lock the new one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        old = self._pid_in(fd)
        self.stale_pid = old if old and old != os.getpid() else None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    @staticmethod
    def _pid_in(fd: int):
        try:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still locked, so no one else is holding it
        except OSError:
            pass
        os.close(self.fd)  # drops the lock
        self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def lock_stage_output(root: Path, name: str) -> FolderLock:
    """The lock of one data stage's output (data/<name> and data/<name>.*), beside it in root:
    the output folder itself is replaced by a rename when done, so it cannot hold the lock."""
    root.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(root / f".{name}.lock", what=str(root / name))
    if lock.stale_pid:
        print(f"{root / name}: taking over the lock of pid {lock.stale_pid}, which has ended")
    return lock


# ----------------------------------------------------------------------------------------------
# pretokenized shard format

SHARD_MAGIC = 0x6E6B6F74  # b"tokn" read as a little-endian uint32
SHARD_VERSION = 1
HEADER_BYTES = 256
_HEADER_STRUCT = struct.Struct("<IiiIQQ")  # magic, version, vocab_size, tokenizer_hash, n_tokens, n_stories
MAX_VOCAB = 65535  # ids must fit in uint16 (0..65534)


def shard_header(*, vocab_size: int, tokenizer_hash: int, n_tokens: int, n_stories: int) -> bytes:
    head = _HEADER_STRUCT.pack(SHARD_MAGIC, SHARD_VERSION, vocab_size, tokenizer_hash, n_tokens, n_stories)
    return head + b"\0" * (HEADER_BYTES - len(head))


def write_shard(path: Path, tokens: np.ndarray, *, vocab_size: int, tokenizer_hash: int,
                n_stories: int) -> None:
    """Write a shard atomically (fileio), so a crash never leaves half a shard."""
    tokens = np.ascontiguousarray(tokens, dtype="<u2")
    head = shard_header(vocab_size=vocab_size, tokenizer_hash=tokenizer_hash,
                        n_tokens=int(tokens.size), n_stories=n_stories)
    fileio.write_bytes(path, head + tokens.tobytes())


def read_shard_header(path: Path) -> dict:
    """Read and check a shard's header against its file size; DataError naming the file if bad."""
    path = Path(path)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):  # before open: opening a FIFO blocks until a writer comes
            raise DataError(f"{path}: not a regular file (a FIFO or device?); a shard must be a file")
        size = st.st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise DataError(f"{path}: cannot read shard ({e.strerror})") from None
    if len(raw) < HEADER_BYTES:
        raise DataError(f"{path}: truncated shard header ({len(raw)} of {HEADER_BYTES} bytes); "
                        "re-run `python tinystories.py pretokenize`")
    magic, version, vocab_size, tok_hash, n_tokens, n_stories = _HEADER_STRUCT.unpack_from(raw)
    if magic != SHARD_MAGIC:
        raise DataError(f"{path}: not a pretokenized shard (bad magic 0x{magic:08x})")
    if version != SHARD_VERSION:
        raise DataError(f"{path}: shard version {version} not supported (expected {SHARD_VERSION})")
    if not 1 <= vocab_size <= MAX_VOCAB:
        raise DataError(f"{path}: bad vocab_size {vocab_size} in shard header")
    expected = HEADER_BYTES + 2 * n_tokens
    if size != expected:
        raise DataError(f"{path}: file is {size} bytes but its header promises {expected} "
                        f"({n_tokens} tokens); re-run `python tinystories.py pretokenize`")
    return dict(vocab_size=vocab_size, tokenizer_hash=tok_hash, n_tokens=n_tokens, n_stories=n_stories)


def read_shard(path: Path) -> tuple[dict, np.ndarray]:
    """Header dict and the tokens as a read-only uint16 memmap (n_tokens,).

    Every id is checked against the header's vocab_size here, once (one vectorized pass over the
    file), so a bad shard fails when it is opened, not as an IndexError (or a device assert on a
    GPU) at whichever step first draws the bad window."""
    head = read_shard_header(path)
    if head["n_tokens"] == 0:
        return head, np.zeros(0, dtype=np.uint16)
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(head["n_tokens"],))
    top = int(tokens.max())
    if top >= head["vocab_size"]:
        at = int(np.argmax(tokens >= head["vocab_size"]))
        raise DataError(f"{path}: token id {top} (first bad one at token {at}) is out of range for the "
                        f"header's vocab_size {head['vocab_size']}; the shard is damaged, re-run "
                        "`python tinystories.py pretokenize --force=true`")
    return head, tokens


# Instruction masks: beside an instruct shard X.bin, X.mask holds one byte per token of X.bin (the
# same 256-byte header as the shard, with MASK_MAGIC), bit 0 set on the tokens of an instruction
# (the prompt instruct.render_prompt writes, BOS excluded); the other bits are 0. docs/formats.md.
MASK_MAGIC = 0x6B73616D  # b"mask" read as a little-endian uint32
MASK_VERSION = 1
MASK_INSTRUCTION = 1  # bit 0: this token is part of an instruction


def mask_path(shard: Path) -> Path:
    return Path(shard).with_suffix(".mask")


def mask_header(*, vocab_size: int, tokenizer_hash: int, n_tokens: int, n_stories: int) -> bytes:
    head = _HEADER_STRUCT.pack(MASK_MAGIC, MASK_VERSION, vocab_size, tokenizer_hash, n_tokens, n_stories)
    return head + b"\0" * (HEADER_BYTES - len(head))


def write_mask(path: Path, mask: np.ndarray, *, vocab_size: int, tokenizer_hash: int, n_stories: int) -> None:
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    fileio.write_bytes(path, mask_header(vocab_size=vocab_size, tokenizer_hash=tokenizer_hash,
                                         n_tokens=int(mask.size), n_stories=n_stories) + mask.tobytes())


def read_mask(shard: Path, head: dict) -> np.ndarray | None:
    """The instruction mask beside a shard (uint8 memmap, one flag byte per token), or None when
    the shard has none; DataError when it does not fit the shard whose header is `head`."""
    path = mask_path(shard)
    if not path.exists():
        return None
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise DataError(f"{path}: cannot read instruction mask ({e.strerror})") from None
    if len(raw) < HEADER_BYTES:
        raise DataError(f"{path}: truncated mask header; re-run `python tinystories.py pretokenize --force=true`")
    magic, version, vocab_size, tok_hash, n_tokens, n_stories = _HEADER_STRUCT.unpack_from(raw)
    if magic != MASK_MAGIC or version != MASK_VERSION:
        raise DataError(f"{path}: not an instruction mask of version {MASK_VERSION} "
                        f"(magic 0x{magic:08x}, version {version})")
    if (n_tokens, vocab_size, tok_hash) != (head["n_tokens"], head["vocab_size"], head["tokenizer_hash"]) \
            or size != HEADER_BYTES + n_tokens:
        raise DataError(f"{path}: does not match {shard} ({n_tokens} mask bytes for {head['n_tokens']} "
                        "tokens); re-run `python tinystories.py pretokenize --force=true`")
    if n_tokens == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


def shard_paths(shard_dir: Path, split: str) -> list[Path]:
    shard_dir = Path(shard_dir)
    if split == "train":
        return sorted(shard_dir.glob("train_*.bin"))
    if split == "val":
        return [p for p in [shard_dir / "val.bin"] if p.exists()]
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")


# ----------------------------------------------------------------------------------------------
# training data loader

def story_starts(tokens: np.ndarray, mask: np.ndarray, T: int) -> np.ndarray:
    """Positions of every story's BOS in an instruct shard, with or without an instruction after
    it, from which a whole window of T + 1 tokens fits. The shard's first token is a BOS
    (pretokenize writes BOS + [instruction] + story + EOS), which names the BOS id. read_mask has
    checked that mask is one flag per token."""
    t = np.asarray(tokens)
    n = int(t.size)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(t == t[0])
    # A BOS id inside an instruction cannot start a story; plain stories never hold one.
    starts = starts[(np.asarray(mask)[starts] & MASK_INSTRUCTION) == 0]
    return starts[starts + T + 1 <= n].astype(np.int64)


class TokenBatches:
    """Random windows of max_seq_len + 1 tokens from memory-mapped shards, as (x, y) batches.

    Within an epoch the windows start at `offset + k * max_seq_len` in each shard (consecutive
    windows share one token, so every token is a target once per epoch); the offset (per shard,
    in [0, max_seq_len)) and the order of all windows are drawn fresh each epoch from
    (seed, epoch). Micro-batch number g = (step * grad_accum + micro) * world_size + rank takes
    windows g*B .. g*B+B-1 of that endless sequence, so ranks never overlap, one process with
    grad_accum=2 sees exactly what two ranks with grad_accum=1 see, and a run resumes exactly
    by asking for the same (step, micro) again: there is no hidden iterator state.

    Instruct data (`pretokenize --instruct=true`): shards with a .mask beside them flag their
    instruction tokens, and their windows start a random 0 to max_seq_len // 4 tokens before
    the BOS of each story, with an instruction or plain (each once per epoch), not at multiples
    of max_seq_len; unless the data folder's meta.json says `instruct.loss_on_instruction`,
    those targets become -1 in y, which the model's cross entropy ignores. `instruct` is that
    meta.json record (None for plain data).
    """

    def __init__(self, data_dir, split: str, batch_size: int, max_seq_len: int, *, seed: int,
                 rank: int = 0, world_size: int = 1, grad_accum: int = 1):
        if batch_size < 1 or max_seq_len < 1 or grad_accum < 1 or world_size < 1:
            raise ValueError(f"batch_size={batch_size}, max_seq_len={max_seq_len}, "
                             f"grad_accum={grad_accum}, world_size={world_size} must all be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self.data_dir = Path(data_dir)
        self.split = split
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.grad_accum = grad_accum

        paths = shard_paths(self.data_dir, split)
        if not paths:
            raise DataError(f"{self.data_dir}: no {split} shards "
                            f"({'train_*.bin' if split == 'train' else 'val.bin'}); "
                            "run `python tinystories.py pretokenize` first")
        self.shards = []
        self.masks: list = []
        vocab = tok_hash = None
        for p in paths:
            head, tokens = read_shard(p)
            if vocab is None:
                vocab, tok_hash = head["vocab_size"], head["tokenizer_hash"]
            elif (head["vocab_size"], head["tokenizer_hash"]) != (vocab, tok_hash):
                raise DataError(f"{p}: made with a different tokenizer than {paths[0]} "
                                f"(vocab {head['vocab_size']} vs {vocab}); re-run pretokenize")
            self.shards.append(tokens)
            self.masks.append(read_mask(p, head))
        meta = _read_json(self.data_dir / "meta.json")
        rec = meta.get("instruct") if isinstance(meta, dict) else None
        self.instruct = rec if isinstance(rec, dict) else None
        # Targets on instruction tokens are left out of the loss unless the data says otherwise.
        self.mask_instructions = any(m is not None for m in self.masks) and \
            not (self.instruct or {}).get("loss_on_instruction", False)
        self.vocab_size = vocab
        self.tokenizer_hash = tok_hash
        self.n_tokens = sum(int(t.size) for t in self.shards)

        T = max_seq_len
        # Windows per shard, the same every epoch: (n - T) // T of them fit after any offset in
        # [0, T); a shard too short for that but holding one window gets one, with a smaller
        # offset range. o_max[s] is the largest offset shard s allows.
        # A shard with instructions is cut differently: each window starts a random lead of 0 to
        # max_seq_len / 4 tokens before the BOS of a story. Windows at any offset cut 4 in 10
        # story tokens off from their instruction; this way the row's first whole story always
        # sees its own request, which lifted the rate of asked-for words by half at the demo's
        # step count. The lead keeps rows that begin mid-story, without which plain prompts (BOS
        # and a story's start) came out with more broken characters. Plain stories of a mixed
        # shard start windows too: cut only at requests, BOS + story was never trained, and a
        # model given no request wrote worse stories (BENCHMARKS.md, "Stories on request").
        counts, o_max = [], []
        self._aligned: list = []
        for t, m in zip(self.shards, self.masks):
            n = int(t.size)
            starts = story_starts(t, m, T) if m is not None else None
            if starts is not None and starts.size:
                self._aligned.append(starts)
                counts.append(int(starts.size))
                o_max.append(0)
                continue
            self._aligned.append(None)
            c = max((n - T) // T, 1) if n >= T + 1 else 0
            counts.append(c)
            o_max.append(min(T - 1, n - 1 - c * T) if c else 0)
        self._counts = np.array(counts, dtype=np.int64)
        self._o_max = np.array(o_max, dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(self._counts)])  # first window id per shard
        self.n_windows = int(self._starts[-1])
        if self.n_windows == 0:
            raise DataError(f"{self.data_dir}: {split} data has {self.n_tokens} tokens, fewer than "
                            f"one window of max_seq_len + 1 = {T + 1}; use more data or a smaller "
                            "max_seq_len")
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(offset per shard, permutation of window ids, lead per window id) for one epoch; the
        last two epochs are cached."""
        got = self._epochs.get(epoch)
        if got is None:
            rng = np.random.default_rng([self.seed, epoch])
            offsets = (rng.random(len(self.shards)) * (self._o_max + 1)).astype(np.int64)
            perm = rng.permutation(self.n_windows)
            lead = rng.integers(0, self.max_seq_len // 4 + 1, self.n_windows)
            got = (offsets, perm, lead)
            if len(self._epochs) >= 2:
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = got
        return got

    def _locate(self, j: int) -> tuple[int, int]:
        """(shard, first token) of the j-th window of the endless epoch sequence."""
        epoch, i = divmod(j, self.n_windows)
        offsets, perm, lead = self._epoch(epoch)
        w = int(perm[i])
        s = int(np.searchsorted(self._starts, w, side="right") - 1)
        if self._aligned[s] is not None:
            bos = int(self._aligned[s][w - int(self._starts[s])])
            return s, max(0, bos - int(lead[w]))
        return s, int(offsets[s]) + (w - int(self._starts[s])) * self.max_seq_len

    def window(self, j: int) -> np.ndarray:
        """The j-th window (int64, max_seq_len + 1 tokens) of the endless epoch sequence."""
        s, start = self._locate(j)
        return np.asarray(self.shards[s][start:start + self.max_seq_len + 1], dtype=np.int64)

    def window_mask(self, j: int) -> np.ndarray:
        """The instruction flags (bool, max_seq_len + 1) of window j; all False without a mask."""
        s, start = self._locate(j)
        m = self.masks[s]
        if m is None:
            return np.zeros(self.max_seq_len + 1, dtype=bool)
        return (np.asarray(m[start:start + self.max_seq_len + 1]) & MASK_INSTRUCTION).astype(bool)

    def micro_index(self, step: int, micro: int) -> int:
        if not 0 <= micro < self.grad_accum:
            raise ValueError(f"micro {micro} not in [0, grad_accum={self.grad_accum})")
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return (step * self.grad_accum + micro) * self.world_size + self.rank

    def get(self, step: int, micro: int = 0):
        """(x, y) int64 torch tensors of shape (batch_size, max_seq_len); y is x shifted by one,
        with -1 (ignored by the loss) on instruction targets when mask_instructions."""
        import torch  # lazy: the data stages must not pay for importing torch

        g = self.micro_index(step, micro)
        B = self.batch_size
        rows = np.stack([self.window(g * B + b) for b in range(B)])  # (B, T + 1)
        y = rows[:, 1:].copy()
        if self.mask_instructions:
            flags = np.stack([self.window_mask(g * B + b) for b in range(B)])
            y[flags[:, 1:]] = -1
        return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(y)


# ----------------------------------------------------------------------------------------------
# reading stories: .jsonl, .json arrays, .txt separated by blank lines

TEXT_KEYS = ("story_zh", "text_zh", "story", "text", "content")  # auto-detect order
TEXT_SUFFIXES = (".jsonl", ".json", ".txt")
MAX_SHOWN_PROBLEMS = 20  # malformed lines printed one by one; the rest only counted


def list_text_files(folder: Path) -> list[Path]:
    """Every .jsonl/.json/.txt file under folder (recursively, sorted), hidden ones left out."""
    folder = Path(folder)
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue  # our own markers (.complete) and editor droppings
        if p.suffix.lower() in TEXT_SUFFIXES and p.is_file():
            out.append(p)
    return out


def _story_text(obj, text_key: str, where: str, problems: ProblemLog) -> str:
    """The story in one JSON value (a string, or an object's text key), stripped; "" when there is
    none, after reporting why at `where` when the value is not a story at all."""
    if isinstance(obj, str):
        return obj.strip()
    if not isinstance(obj, dict):
        problems.add(where, f"expected a JSON object, got {type(obj).__name__}")
        return ""
    keys = (text_key,) if text_key else TEXT_KEYS
    for k in keys:
        if k in obj:
            v = obj[k]
            if isinstance(v, str):
                return v.strip()
            problems.add(where, f"key {k!r} holds {type(v).__name__}, not text")
            return ""
    problems.add(where, f"no text key (looked for {', '.join(keys)})")
    return ""


class ProblemLog:
    """Collects 'file:line: problem' reports for malformed input; --strict makes the first fatal."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.items: list[str] = []
        self.count = 0

    def add(self, where: str, problem: str) -> None:
        msg = f"{where}: {problem}"
        if self.strict:
            raise DataError(f"{msg} (--strict)")
        self.count += 1
        if len(self.items) < MAX_SHOWN_PROBLEMS:
            self.items.append(msg)

    def merge(self, items: list[str], count: int) -> None:
        self.count += count
        self.items.extend(items[:MAX_SHOWN_PROBLEMS - len(self.items)])

    def report(self) -> None:
        for m in self.items:
            print(f"warning: {m}", file=sys.stderr)
        if self.count:
            more = f" ({self.count - len(self.items)} not shown)" if self.count > len(self.items) else ""
            print(f"warning: skipped {self.count} malformed line(s){more}; --strict=true makes "
                  "this an error", file=sys.stderr)


def iter_file_stories(path: Path, *, text_key: str = "", problems: ProblemLog) -> Iterator[str]:
    """Stories in one file, stripped of surrounding whitespace; empty ones are dropped."""
    for text, _ in iter_file_records(path, text_key=text_key, problems=problems):
        yield text


def iter_file_records(path: Path, *, text_key: str = "", problems: ProblemLog) -> Iterator[tuple[str, dict | None]]:
    """(story, its JSON object or None) for each story in one file: the object is what a .jsonl
    line or .json array item held (instruct fields live there), None for .txt and plain strings."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            yield from _iter_txt(path)
            return
        with open(path, encoding="utf-8-sig") as f:  # -sig: a leading BOM is not text
            if suffix == ".json":
                # A .json file holds one array of stories; some data sets name jsonl files .json,
                # so anything not starting with '[' is read as one object per line.
                head = f.read(4096).lstrip(" \t\r\n")[:1]
                f.seek(0)
                if head == "[":
                    yield from _iter_json_array(path, f, text_key, problems)
                    return
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    problems.add(f"{path}:{lineno}", f"not valid JSON ({e.msg})")
                    continue
                text = _story_text(obj, text_key, f"{path}:{lineno}", problems)
                if text:
                    yield text, obj if isinstance(obj, dict) else None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _iter_json_array(path: Path, f, text_key: str, problems: ProblemLog) -> Iterator[tuple[str, dict | None]]:
    try:
        data = json.load(f)
    except json.JSONDecodeError as e:
        problems.add(f"{path}:{e.lineno}", f"not valid JSON ({e.msg}); whole file skipped")
        return
    if not isinstance(data, list):
        problems.add(f"{path}:1", "expected a JSON array of stories; whole file skipped")
        return
    for i, obj in enumerate(data):
        text = _story_text(obj, text_key, f"{path}: item {i}", problems)
        if text:
            yield text, obj if isinstance(obj, dict) else None


def _iter_txt(path: Path) -> Iterator[tuple[str, None]]:
    """Stories separated by one or more blank (whitespace-only) lines."""
    buf: list[str] = []
    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            if line.strip():
                buf.append(line)
            elif buf:
                yield "".join(buf).strip(), None
                buf = []
    if buf:
        yield "".join(buf).strip(), None


def is_val_story(text: str, val_fraction: float) -> bool:
    """Held-out split decided by a hash of the story text: stable across runs, shard layouts and
    machines, and a story that appears twice lands on the same side, so val never leaks into
    train (llama2.c holds out its first shard instead, which a one-file custom corpus lacks)."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return h % 1_000_000 < round(val_fraction * 1_000_000)


# ----------------------------------------------------------------------------------------------
# configuration and command line

@dataclass
class DownloadConfig:
    dataset: str = opt("zh", "zh (TinyStoriesChinese, adam89) or en (roneneldan/TinyStories)")
    data_root: str = opt("", "folder for all data; '' means data/ beside tinystories.py")
    max_retries: int = opt(5, "transient failures retried this many times, resuming each time")
    backoff: float = opt(2.0, "seconds before the first retry; doubles each retry, capped at 60")
    timeout: float = opt(60.0, "seconds without data before the connection counts as failed")
    keep_archive: bool = opt(True, "keep the .tar.gz after extracting it")


@dataclass
class SynthConfig:
    data_root: str = opt("", "folder for all data; '' means data/ beside tinystories.py")
    n_stories: int = opt(100_000, "number of stories to generate")
    seed: int = opt(1337, "generator seed; story i depends only on (seed, i)")
    shard_size: int = opt(20_000, "stories per jsonl shard")


@dataclass
class SourceConfig:
    data_root: str = opt("", "folder for all data; '' means data/ beside tinystories.py")
    dataset: str = opt("zh", "which data_root/<dataset> folder to read: zh, en, synth")
    data_dir: str = opt("", "read your own stories from this folder instead of the dataset")
    text_key: str = opt("", "JSON key holding the story; '' tries " + ", ".join(TEXT_KEYS))
    strict: bool = opt(False, "a malformed line is fatal instead of skipped")
    val_fraction: float = opt(0.01, "share of stories held out for validation (by text hash)")
    vocab_size: int = opt(5000, "tokenizer size; output files are named tok<vocab_size>")
    force: bool = opt(False, "redo the stage even if its outputs are up to date")


@dataclass
class TrainVocabConfig(SourceConfig):
    max_stories: int = opt(300_000, "train stories written for sentencepiece (bounds time)")
    input_sentence_size: int = opt(1_000_000, "lines sentencepiece samples from them (shuffled)")
    character_coverage: float = opt(0.0, "sentencepiece character_coverage (0.98..1); 0 = "
                                         "choose the characters from data and vocab_size")


@dataclass
class PretokenizeConfig(SourceConfig):
    workers: int = opt(0, "processes encoding shards in parallel; 0 = one per core")
    instruct: bool = opt(False, "put an instruction (instruct.py's template) before stories whose "
                                "records carry words/features/summary/sentence")
    instruct_share: float = opt(1.0, "share of those stories given an instruction; the rest stay plain")
    instruct_loss: bool = opt(False, "train on the instruction's tokens too (default: left out of the loss)")
    instruct_seed: int = opt(0, "seed of the per-story choice of instruction fields")
    instruct_lang: str = opt("", "template language, zh or en; '' = en for --dataset=en, else zh")
    instruct_max_tokens: int = opt(128, "an instruction longer than this many tokens is left out (the "
                                        "story stays plain); keep it well under train's max_seq_len")


STAGES = {}  # name -> (config class, function, one-line description); filled below


def parse_config(cls, args: list[str]):
    """A stage's config from its `--key=value` options (OptionError, exit 2, if one is bad)."""
    return cls(**parse_options(cls, args))


def usage() -> str:
    lines = ["usage: python tinystories.py <stage> [--key=value ...]", "", "stages:"]
    for name, (_, _, desc) in STAGES.items():
        lines.append(f"  {name:<12} {desc}")
    lines.append("")
    lines.append("`python tinystories.py <stage> --help` lists a stage's options.")
    return "\n".join(lines)


def stage_help(name: str) -> str:
    cls, _, desc = STAGES[name]
    return render_help(cls, f"python tinystories.py {name} [--key=value ...]", desc)


def data_root(cfg) -> Path:
    return Path(cfg.data_root) if cfg.data_root else DEFAULT_DATA_ROOT


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json(path: Path, obj) -> None:
    fileio.write_text(path, json.dumps(obj, indent=1, ensure_ascii=False))


# ----------------------------------------------------------------------------------------------
# download

HF_DATASETS = {  # dataset -> (Hugging Face dataset repo, archive file in it)
    "zh": ("adam89/TinyStoriesChinese", "TinyStories_all_data_zh.tar.gz"),
    "en": ("roneneldan/TinyStories", "TinyStories_all_data.tar.gz"),
}
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
# Bytes per write: a dropped connection loses at most the chunk in flight (requests hands over
# only whole chunks), so resuming restarts at most this far back.
DOWNLOAD_CHUNK = 1 << 16


def hf_url(repo: str, filename: str) -> str:
    """The file's URL; HF_ENDPOINT replaces https://huggingface.co, as huggingface_hub does."""
    base = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    return f"{base.rstrip('/')}/datasets/{repo}/resolve/main/{filename}"


class _Transient(Exception):
    """A failure worth retrying (server 5xx/429, dropped connection)."""


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """'bytes 100-199/1000' -> (100, 1000); 'bytes */1000' -> (None, 1000)."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[6:].partition("/")
    start = span.split("-")[0].strip()
    return _int_or_none(start), _int_or_none(total)


def _int_or_none(value: str | None) -> int | None:
    value = (value or "").strip()
    return int(value) if value.isdigit() else None


def _linked(resp, name: str) -> str | None:
    """A header of the Hugging Face response, which may sit on a redirect before the CDN's."""
    for r in [*resp.history, resp]:
        if name in r.headers:
            return r.headers[name]
    return None


def download_file(url: str, dest: Path, *, max_retries: int = 5, backoff: float = 2.0,
                  timeout: float = 60.0, chunk_bytes: int = DOWNLOAD_CHUNK) -> None:
    """Stream url to dest: resume dest.part with an HTTP Range request, retry transient failures
    with exponential backoff, check the size (and sha256 when the hub announces it), and rename
    to dest only when complete."""
    import requests
    from tqdm import tqdm

    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    expected = sha256 = None
    failures = 0
    with requests.Session() as session:
        while True:
            have = part.stat().st_size if part.exists() else 0
            headers = {"Range": f"bytes={have}-"} if have else {}
            try:
                with session.get(url, headers=headers, stream=True, timeout=timeout) as r:
                    linked_size = _int_or_none(_linked(r, "X-Linked-Size"))
                    etag = (_linked(r, "X-Linked-Etag") or "").strip('"').lower()
                    if len(etag) == 64 and all(c in "0123456789abcdef" for c in etag):
                        sha256 = etag  # LFS files: the hub's etag is the file's sha256
                    if r.status_code == 416:
                        _, total = _content_range(r.headers.get("Content-Range"))
                        if total is not None and total == have:
                            expected = linked_size if linked_size is not None else total
                            break  # the .part already holds the whole file
                        part.unlink()  # .part is longer than the file: it cannot be resumed
                        raise _Transient(f"server refused to resume at byte {have}; starting over")
                    if r.status_code in _RETRY_STATUS:
                        raise _Transient(f"HTTP {r.status_code} {r.reason}")
                    if r.status_code not in (200, 206):
                        raise DataError(f"{url}: HTTP {r.status_code} {r.reason}")
                    if r.status_code == 206:
                        start, total = _content_range(r.headers.get("Content-Range"))
                        if start != have:
                            part.unlink()
                            raise _Transient(f"server resumed at byte {start}, not {have}")
                        mode = "ab"
                    else:  # 200: the whole file (the server ignored or was not sent a Range)
                        total = _int_or_none(r.headers.get("Content-Length"))
                        mode, have = "wb", 0
                    expected = linked_size if linked_size is not None else total
                    with open(part, mode) as f, tqdm(total=expected, initial=have, unit="B",
                                                     unit_scale=True, unit_divisor=1024,
                                                     desc=dest.name, leave=False) as bar:
                        for chunk in r.iter_content(chunk_bytes):
                            f.write(chunk)
                            bar.update(len(chunk))
                break
            except (requests.ConnectionError, requests.Timeout,
                    requests.exceptions.ChunkedEncodingError, _Transient) as e:
                failures += 1
                got = part.stat().st_size if part.exists() else 0
                reason = str(e).split("Caused by ")[-1].strip("()")[:160]  # urllib3's own cause
                if failures > max_retries:
                    kept = (f"{got} bytes kept in {part}, run the same command again to resume"
                            if got else "nothing downloaded yet")
                    raise DataError(f"{url}: download failed after {max_retries} retries "
                                    f"({type(e).__name__}: {reason}); {kept}") from None
                wait = min(backoff * 2 ** (failures - 1), 60.0)
                print(f"download: {type(e).__name__}: {reason}; have {got} bytes, "
                      f"retry {failures}/{max_retries} in {wait:.1f}s", file=sys.stderr)
                time.sleep(wait)
            except requests.RequestException as e:  # a bad URL or the like: retrying cannot help
                raise DataError(f"{url}: {type(e).__name__}: {e}") from None
            except OSError as e:  # a full disk: the .part keeps what it holds, to resume from
                raise DataError(os_error_text(e, part)) from None
    size = part.stat().st_size
    if expected is not None and size != expected:
        if size > expected:
            part.unlink()  # longer than the real file: nothing in it can be trusted
        raise DataError(f"{dest}: got {size} bytes but the server announced {expected}; "
                        "run the same command again to resume")
    if sha256 is not None:
        h = hashlib.sha256()
        with open(part, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        if h.hexdigest() != sha256:
            part.unlink()
            raise DataError(f"{dest}: sha256 {h.hexdigest()} does not match the announced "
                            f"{sha256}; the damaged download was removed, run again")
    os.replace(part, dest)


def _within(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def check_member(m: tarfile.TarInfo, root: Path, archive: Path) -> None:
    """Refuse a member that would write outside root: absolute or ../ paths, links pointing out,
    device files. root must be resolved."""
    def refuse(why: str):
        raise DataError(f"{archive}: refusing member {m.name!r}: {why}; nothing was extracted")

    if os.path.isabs(m.name) or m.name.startswith(("/", "\\")):
        refuse("absolute path")
    target = (root / m.name).resolve()
    if not _within(target, root):
        refuse(f"it would land outside {root}")
    if m.issym():
        if os.path.isabs(m.linkname):
            refuse(f"symlink to absolute path {m.linkname!r}")
        if not _within((target.parent / m.linkname).resolve(), root):
            refuse(f"symlink to {m.linkname!r} points outside {root}")
    elif m.islnk():
        if os.path.isabs(m.linkname) or not _within((root / m.linkname).resolve(), root):
            refuse(f"hard link to {m.linkname!r} points outside {root}")
    elif not (m.isfile() or m.isdir()):
        refuse("not a regular file, folder or link")


def extract_archive(archive: Path, target: Path) -> int:
    """Extract into a temp folder beside target (fileio.atomic_dir), then swap it in; returns the
    member count."""
    archive, target = Path(archive), Path(target)
    n = 0
    # Python's own 'data' filter (3.11.4+) as a second line of defence behind check_member.
    kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    try:
        with fileio.atomic_dir(target) as tmp, tarfile.open(archive, "r:*") as tar:
            root = tmp.resolve()
            for m in tar:
                check_member(m, root, archive)
                tar.extract(m, root, **kw)
                n += 1
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise DataError(f"{archive}: damaged archive ({e}); delete it and download again") from None
    return n


def cmd_download(cfg: DownloadConfig) -> None:
    if cfg.dataset not in HF_DATASETS:
        raise DataError(f"--dataset={cfg.dataset}: choose one of {', '.join(HF_DATASETS)}")
    root = data_root(cfg)
    with lock_stage_output(root, cfg.dataset):
        fileio.sweep_stale(root)
        fileio.sweep_stale(root / cfg.dataset)
        _download(cfg, root)


def _download(cfg: DownloadConfig, root: Path) -> None:
    repo, filename = HF_DATASETS[cfg.dataset]
    archive = root / filename
    target = root / cfg.dataset
    marker = target / ".complete"
    done = _read_json(marker)
    if done and done.get("archive") == filename and list_text_files(target):
        print(f"{target}: already downloaded and extracted ({done.get('files')} files from "
              f"{filename}); nothing to do")
        return
    if done is None and not archive.exists() and target.is_dir() and list_text_files(target):
        # put there by hand (or by an older tool): never overwrite someone's data
        print(f"{target}: already holds {len(list_text_files(target))} data files; nothing to do "
              f"(remove the folder to download {filename} again)")
        return
    if archive.exists():
        print(f"{archive}: already downloaded")
    else:
        url = hf_url(repo, filename)
        print(f"downloading {url} -> {archive}")
        download_file(url, archive, max_retries=cfg.max_retries, backoff=cfg.backoff,
                      timeout=cfg.timeout)
    n = extract_archive(archive, target)
    files = list_text_files(target)
    if not files:
        raise DataError(f"{archive}: holds no .jsonl, .json or .txt files")
    _write_json(marker, {"archive": filename, "bytes": archive.stat().st_size, "files": len(files)})
    if not cfg.keep_archive:
        archive.unlink()
    print(f"{target}: extracted {n} members, {len(files)} data files")


# ----------------------------------------------------------------------------------------------
# synth: the built-in corpus (storygen.py) as jsonl shards

def _jsonl_record(item, key: str) -> dict:
    """{key: story} for a story string; for a storygen record {"story": text, **fields}, the
    story under key followed by its fields (words, features, summary, sentence)."""
    if isinstance(item, str):
        return {key: item}
    return {key: item["story"], **{k: v for k, v in item.items() if k != "story"}}


def write_jsonl_shards(stories: Iterable, out_dir: Path, *, shard_size: int,
                       key: str = "story_zh") -> tuple[int, int]:
    """data00.jsonl, data01.jsonl, ... with one {key: story, ...fields} object per line, as the
    downloaded zh data is laid out, each written atomically. Items are story strings or
    storygen records. Returns (stories, shards)."""
    stories = iter(stories)
    n = shards = 0
    while batch := list(itertools.islice(stories, shard_size)):
        fileio.write_text(out_dir / f"data{shards:02d}.jsonl",
                          "".join(json.dumps(_jsonl_record(s, key), ensure_ascii=False) + "\n"
                                  for s in batch))
        n += len(batch)
        shards += 1
    return n, shards


def cmd_synth(cfg: SynthConfig) -> None:
    if cfg.n_stories < 1 or cfg.shard_size < 1:
        raise DataError(f"--n_stories={cfg.n_stories} and --shard_size={cfg.shard_size} must be >= 1")
    root = data_root(cfg)
    with lock_stage_output(root, "synth"):
        fileio.sweep_stale(root)
        _synth(cfg, root)


def _synth(cfg: SynthConfig, root: Path) -> None:
    out = root / "synth"
    # fields: records carry storygen's instruct fields (words, features, summary, sentence);
    # 2: the words are the first of their kind in the story (older corpora are made again)
    want = {"generator": "storygen", "n_stories": cfg.n_stories, "seed": cfg.seed,
            "shard_size": cfg.shard_size, "fields": 2}
    if _read_json(out / ".complete") == want and list_text_files(out):
        print(f"{out}: already holds {cfg.n_stories} stories (seed {cfg.seed}); nothing to do")
        return
    import storygen  # lazy: only this stage needs it

    t0 = time.time()
    with fileio.atomic_dir(out) as tmp:
        n, shards = write_jsonl_shards(storygen.generate_records(cfg.n_stories, cfg.seed), tmp,
                                       shard_size=cfg.shard_size)
        _write_json(tmp / ".complete", want)
    print(f"{out}: wrote {n} stories in {shards} shards in {time.time() - t0:.1f}s")


# ----------------------------------------------------------------------------------------------
# train_vocab / pretokenize shared helpers

MIN_VOCAB = 260  # 3 special pieces (unk, bos, eos) + 256 byte-fallback pieces + at least 1 more


def check_vocab_size(n: int) -> None:
    if n > MAX_VOCAB:
        raise DataError(f"--vocab_size={n} is too large: at most {MAX_VOCAB}, because "
                        "pretokenized shards store token ids as uint16")
    if n < MIN_VOCAB:
        raise DataError(f"--vocab_size={n} is too small: at least {MIN_VOCAB} (3 special pieces "
                        "+ 256 byte-fallback pieces + 1)")


def source_files(cfg: SourceConfig) -> tuple[Path, list[Path]]:
    """The folder the stories come from and its data files; DataError with a hint if none."""
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise DataError(f"--val_fraction={cfg.val_fraction}: must be in [0, 1)")
    if cfg.data_dir:
        folder, hint = Path(cfg.data_dir), "give --data_dir a folder of .jsonl, .json or .txt files"
    else:
        folder = data_root(cfg) / cfg.dataset
        if cfg.dataset in HF_DATASETS:
            hint = "run `python tinystories.py download" + \
                   ("" if cfg.dataset == "zh" else f" --dataset={cfg.dataset}") + "` first"
        elif cfg.dataset == "synth":
            hint = "run `python tinystories.py synth` first"
        else:
            hint = "--dataset is zh, en or synth; use --data_dir for your own stories"
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; {hint}")
    files = list_text_files(folder)
    if not files:
        raise DataError(f"{folder}: no .jsonl, .json or .txt files; {hint}")
    return folder, files


def _files_signature(folder: Path, files: list[Path]) -> list:
    return [[str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def load_tokenizer(model_path: Path, vocab_size: int):
    """tokenizer.Tokenizer of model_path (its hash is the one shard headers record), checked to
    hold vocab_size pieces."""
    import tokenizer  # lazy: download and synth do not need sentencepiece

    tok = tokenizer.Tokenizer(str(model_path))
    if tok.vocab_size != vocab_size:
        raise DataError(f"{model_path}: has {tok.vocab_size} pieces, not {vocab_size}; "
                        f"re-run train_vocab --vocab_size={vocab_size} --force=true")
    return tok


# ----------------------------------------------------------------------------------------------
# train_vocab

def choose_kept_characters(char_counts: np.ndarray, vocab_size: int,
                           pair_counts: np.ndarray | None = None) -> np.ndarray | None:
    """Code points sentencepiece may make base pieces of, most frequent first; None = all.

    Every character kept as a base piece costs a vocab slot for good; byte fallback encodes any
    other character losslessly as its UTF-8 bytes. English has ~100 characters and they all fit
    (coverage 1.0). Chinese has thousands, most seen a handful of times: keeping all of them
    (character_coverage=1.0) would spend a small vocab on rare characters, and sentencepiece
    refuses a vocab smaller than the characters it keeps. So characters compete with merges for
    the slots left after the 259 special and byte pieces: a kept character of count f saves
    (UTF-8 bytes - 1) * f tokens, a merge saves about its pair count (pair_counts: counts of
    adjacent character pairs, in any order); ASCII characters go first, since only a piece can
    join a merge. The best slots win, and never more characters than cover 99.95% of the text
    (sentencepiece's advice for CJK) when not all fit. sentencepiece will not go below
    character_coverage=0.98 itself, so train_vocab applies this choice to the training text.

    Counting tokens undervalues a character, though: as bytes it is three tokens a model has to
    spell in order, and a small one gets them wrong: the demo's 1M model printed a broken
    character in 1 story in 7 with 199 of the built-in corpus's 1,097 characters in bytes
    (vocab 2000), and in 3 in 100 with 69 (vocab 3000, 0.07% of the text). So when every
    character fits in half the slots, the other half left to merges, all are kept: at vocab 3000
    compression drops 1% and broken characters all but vanish from the demo's stories
    (BENCHMARKS.md).
    """
    # Besides the 3 special and 256 byte pieces, ▁ (the dummy prefix, and every space) is always a
    # piece of its own: the characters compete for what is left. A space is ▁, so it costs nothing.
    nz = np.flatnonzero(char_counts)
    has_space = bool(char_counts[32])
    nz = nz[nz != 32]
    budget = max(0, vocab_size - 3 - 256 - 1)
    if nz.size <= budget // 2:
        return None
    order = nz[np.argsort(-char_counts[nz], kind="stable")]
    counts = char_counts[order]
    utf8_len = np.where(order < 0x80, 1, np.where(order < 0x800, 2, np.where(order < 0x10000, 3, 4)))
    # ASCII first: as a byte it costs one token anyway, but only a kept character joins merges
    char_value = np.where(utf8_len == 1, np.inf, counts * np.maximum(utf8_len - 1, 1))
    pair_value = np.sort(pair_counts)[::-1][:budget] if pair_counts is not None else np.zeros(0)
    values = np.concatenate([char_value, pair_value])
    best = np.argsort(-values, kind="stable")[:budget]
    keep = int((best < char_value.size).sum())
    if nz.size <= keep:
        return None
    cum = np.cumsum(counts) / counts.sum()
    m = int(np.searchsorted(cum, 0.9995 - 1e-12)) + 1  # fewest characters covering 99.95%
    kept = order[:min(m, keep)]
    if has_space:
        kept = np.append(kept, 32)
    return kept[np.argsort(-char_counts[kept], kind="stable")]


def _drop_rare_characters(src: str, dst: str, kept: np.ndarray) -> int:
    """Copy the training text, cutting lines at characters not in kept (a rare character ends
    the sentence, so no merge is learned across it). Returns the lines written."""
    import re
    rare = re.compile("[^" + "".join(re.escape(chr(c)) for c in sorted(kept.tolist())) + "]+"
                      if kept.size else r"[\s\S]+")
    n = 0
    with open(src, encoding="utf-8") as fin, open(dst, "w", encoding="utf-8") as fout:
        while True:
            lines = fin.readlines(1 << 24)
            if not lines:
                break
            parts = [p for p in rare.sub("\n", "".join(lines)).split("\n") if p.strip()]
            fout.write("\n".join(parts) + ("\n" if parts else ""))
            n += len(parts)
        if n == 0:
            # No character kept (the smallest vocab): ▁ is the only piece left to learn, and
            # sentencepiece needs one line to learn it from.
            fout.write(" \n")
            n = 1
    return n


def cmd_train_vocab(cfg: TrainVocabConfig) -> None:
    check_vocab_size(cfg.vocab_size)
    root = data_root(cfg)
    with lock_stage_output(root, f"tok{cfg.vocab_size}"):  # the same lock as pretokenize's
        fileio.sweep_stale(root)
        _train_vocab(cfg, root)


def _train_vocab(cfg: TrainVocabConfig, root: Path) -> None:
    folder, files = source_files(cfg)
    N = cfg.vocab_size
    model_path = root / f"tok{N}.model"
    meta_path = root / f"tok{N}.meta.json"
    sig = {"source": str(folder.resolve()), "files": _files_signature(folder, files),
           "text_key": cfg.text_key, "strict": cfg.strict, "val_fraction": cfg.val_fraction,
           "max_stories": cfg.max_stories,
           "input_sentence_size": cfg.input_sentence_size,
           "character_coverage": cfg.character_coverage,
           "instruction_text": 2}  # records' instructions are read, their words' edges marked (a retrain for older vocabularies)
    if not cfg.force and model_path.exists() and _read_json(meta_path) == sig:
        print(f"{model_path}: already trained on {folder}; nothing to do (--force=true retrains)")
        return
    t0 = time.time()
    # sentencepiece records its input and output names in the .model, so it works under fixed
    # relative names inside a scratch folder: the .model's bytes are then the same on every run.
    with fileio.scratch_dir(root / f"tok{N}.train") as work:
        text = write_training_text(cfg, folder, files, work / "input.txt")
        t_read = time.time() - t0
        coverage, note = choose_characters(cfg, text, work / "input.txt")
        print(f"training a {N}-piece BPE tokenizer on {text.n_stories} stories ({text.n_lines} "
              f"lines, {int((text.char_counts > 0).sum())} distinct characters: {note})")
        t1 = time.time()
        mark_word_edges(work / "input.txt", text.words)
        run_sentencepiece(cfg, work, coverage, folder, text.n_stories, word_edges=bool(text.words))
        t_sp = time.time() - t1
        write_outputs(work, root, N)
    _write_json(meta_path, sig)  # last: without it a re-run trains again
    print(f"{model_path}: done in {time.time() - t0:.1f}s ({t_read:.1f}s reading the stories, "
          f"{t_sp:.1f}s in sentencepiece)")
    report_compression(load_tokenizer(model_path, N), text.val_sample)


@dataclass
class TrainingText:
    """What write_training_text saw of the train split, for choose_characters and the report."""
    n_stories: int = 0
    n_lines: int = 0
    char_counts: np.ndarray = dataclasses.field(  # occurrences per code point
        default_factory=lambda: np.zeros(0x110000, dtype=np.int64))
    pairs: list = dataclasses.field(default_factory=list)  # adjacent code points (a << 21 | b)
    n_pairs: int = 0
    val_sample: list = dataclasses.field(default_factory=list)
    words: set = dataclasses.field(default_factory=set)  # Chinese instruction words the records list

    def add(self, out, lines: list[str]) -> None:
        """Write lines to out and count their characters (and, for a sample, their pairs)."""
        chunk = "\n".join(lines) + "\n"
        out.write(chunk)
        self.n_lines += len(lines)
        cps = np.frombuffer(chunk.encode("utf-32-le"), dtype="<u4").astype(np.int64)
        self.char_counts += np.bincount(cps, minlength=0x110000)
        self.char_counts[10] -= len(lines)  # the newlines we added
        if self.n_pairs < 4_000_000:  # a sample is enough to rank the frequent pairs
            p = (cps[:-1] << 21) | cps[1:]
            p = p[(cps[:-1] != 10) & (cps[1:] != 10)]
            self.pairs.append(p)
            self.n_pairs += p.size


_CJK = re.compile("[\u4e00-\u9fff]")


def write_training_text(cfg: TrainVocabConfig, folder: Path, files: list[Path],
                        text_path: Path) -> TrainingText:
    """The train split, one line per paragraph (sentencepiece reads one sentence per line;
    newlines themselves become the <0x0A> byte piece), with the instruction a record carries.
    Val stories are kept to measure on."""
    import instruct

    problems = ProblemLog(cfg.strict)
    text = TrainingText()
    with open(text_path, "w", encoding="utf-8") as out:
        buf: list[str] = []
        buf_chars = 0
        for path in files:
            for story, obj in iter_file_records(path, text_key=cfg.text_key, problems=problems):
                if is_val_story(story, cfg.val_fraction):
                    if len(text.val_sample) < 5000:
                        text.val_sample.append(story)
                    continue
                if text.n_stories >= cfg.max_stories:
                    continue
                text.n_stories += 1
                lines = [line for line in story.split("\n") if line.strip()]
                # The instruction a record carries is text the model will read too: without it
                # the template's characters (词语, 特点, 故事 ...) are missing from a story-only
                # vocabulary and each becomes three byte pieces. Its words and features, not its
                # summary or sentence: those are story text, and formulaic summaries repeated
                # thousands of times would spend the vocabulary on whole phrases.
                # The template's language follows the story's script: a folder of English
                # stories must not get Chinese labels in a small vocabulary.
                ins = instruct.from_record(obj) if obj is not None else None
                if ins is not None:
                    lines += instruct.template_lines(ins, "zh" if _CJK.search(story) else "en")
                    text.words.update(w for w in ins.words if len(w) >= 2 and _CJK.search(w))
                buf += lines
                buf_chars += sum(map(len, lines))
                if buf_chars > 2_000_000:  # counted in chunks: one bincount per 2M characters
                    text.add(out, buf)
                    buf, buf_chars = [], 0
            if text.n_stories >= cfg.max_stories and len(text.val_sample) >= 2000:
                break  # enough of both; the rest of the corpus is not needed
        if buf:
            text.add(out, buf)
    problems.report()
    if text.n_stories == 0:
        raise DataError(f"{folder}: no usable stories for training"
                        + (f" ({problems.count} malformed lines skipped)" if problems.count else ""))
    return text


def choose_characters(cfg: TrainVocabConfig, text: TrainingText, text_path: Path) -> tuple[float, str]:
    """sentencepiece's character_coverage and a note for the log; with --character_coverage=0,
    rewrite the training text keeping only choose_kept_characters' characters."""
    if cfg.character_coverage:
        if not 0.98 <= cfg.character_coverage <= 1.0:
            raise DataError(f"--character_coverage={cfg.character_coverage}: sentencepiece accepts 0.98 to 1")
        return cfg.character_coverage, f"character_coverage={cfg.character_coverage:g}"
    _, pair_counts = np.unique(np.concatenate(text.pairs), return_counts=True)
    kept = choose_kept_characters(text.char_counts, cfg.vocab_size, pair_counts)
    if kept is None:
        return 1.0, "character_coverage=1"
    filtered = text_path.with_name(text_path.name + ".kept")
    text.n_lines = _drop_rare_characters(str(text_path), str(filtered), kept)
    os.replace(filtered, text_path)
    share = text.char_counts[kept].sum() / text.char_counts.sum()
    return 1.0, (f"{kept.size} most frequent kept as base pieces, {100 * share:.3f}% of the "
                 "text; the rest fall back to bytes")


# Marks the edges of instruction words in sentencepiece's training text (pretokenization_delimiter:
# no piece is learned across it, and it is dropped from the pieces). A private-use character, so it
# never stands for text: the few a corpus might hold are removed from the training text first.
WORD_EDGE = "\ue000"


def mark_word_edges(text_path: Path, words: set) -> None:
    """Rewrite the training text with WORD_EDGE around every occurrence of the instruction words.

    A required word must be the same pieces in the prompt (`词语：公园，面包`) as in the story
    (`在公园里玩`): then writing it is copying tokens the model can see. BPE on plain Chinese text
    learns pieces that run across a word's edge (园里, 开心极了, 把礼物), and with them about 3 in
    10 asked words were other pieces in the story than in the prompt. With the edges marked, 94%
    are the same (docs/data.md), for 1% of compression. Chinese words only: English words are
    already split at spaces. Longest first, so a listed word inside a longer one does not split it."""
    if not words:
        return
    pattern = re.compile("|".join(re.escape(w) for w in sorted(words, key=lambda w: (-len(w), w))))
    marked = text_path.with_name(text_path.name + ".edges")
    with open(text_path, encoding="utf-8") as src, open(marked, "w", encoding="utf-8") as dst:
        for line in src:
            dst.write(pattern.sub(lambda m: WORD_EDGE + m.group(0) + WORD_EDGE, line.replace(WORD_EDGE, "")))
    os.replace(marked, text_path)


def run_sentencepiece(cfg: TrainVocabConfig, work: Path, coverage: float, folder: Path,
                      n_stories: int, *, word_edges: bool = False) -> None:
    """Train work/tok<N>.model and .vocab from work/input.txt (whose instruction words carry
    WORD_EDGE marks when word_edges)."""
    import sentencepiece as spm

    N = cfg.vocab_size
    spm.set_random_generator_seed(0)  # its sample of input_sentence_size lines: the same each run
    cwd = os.getcwd()
    try:
        os.chdir(work)  # for the relative names; restored right after
        spm.SentencePieceTrainer.train(
            input="input.txt", model_prefix=f"tok{N}", model_type="bpe", vocab_size=N,
            byte_fallback=True,  # any character, seen or not, encodes losslessly
            normalization_rule_name="identity",  # text is kept exactly as written
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,  # as llama2.c's tokenizers, so its C encoder convention holds
            split_digits=True, allow_whitespace_only_pieces=True,
            character_coverage=coverage,
            input_sentence_size=cfg.input_sentence_size, shuffle_input_sentence=True,
            max_sentence_length=1 << 16,  # bytes; the default 4192 drops long paragraphs
            num_threads=os.cpu_count() or 1,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            minloglevel=2, self_test_sample_size=0,
            **({"pretokenization_delimiter": WORD_EDGE} if word_edges else {}),
        )
    except (RuntimeError, OSError) as e:
        msg = str(e).strip().splitlines()[-1]
        if "Vocabulary size too high" in msg:  # too little text for that many merges
            msg = (f"the {n_stories} stories support at most {msg.split('<=')[-1].strip(' .')} "
                   "pieces; use a smaller --vocab_size or more data")
        raise DataError(f"sentencepiece could not train a {N}-piece tokenizer on {folder}: "
                        f"{msg}") from None
    finally:
        os.chdir(cwd)


def write_outputs(work: Path, root: Path, N: int) -> None:
    """tok<N>.vocab, tok<N>.model and run.c's tok<N>.bin in root, each atomically."""
    import tokenizer

    for suffix in (".vocab", ".model"):
        fileio.write_bytes(root / f"tok{N}{suffix}", (work / f"tok{N}{suffix}").read_bytes())
    print(f"{tokenizer.export_tokenizer(str(root / f'tok{N}.model'))}: written for run.c")


def report_compression(tok, val_sample: list[str]) -> None:
    if not val_sample:
        print("val compression: no story fell into the val split (corpus too small?)")
        return
    n_tok = sum(len(x) for x in tok.sp.encode(val_sample))
    chars = sum(len(s) for s in val_sample)
    print(f"val compression: {chars / max(n_tok, 1):.3f} characters per token "
          f"({len(val_sample)} val stories, {chars} characters, {n_tok} tokens)")


# ----------------------------------------------------------------------------------------------
# pretokenize

_SP_CACHE: dict = {}


ENCODE_BATCH = 4096  # stories per sentencepiece call: bounds a worker's memory on huge files


def story_prompt(obj: dict | None, ins_cfg: dict, index: int, problems: dict, story: str = "") -> str:
    """The instruction prompt for story number `index` of a file (its JSON record obj), or "" for
    a plain story. Deterministic: the share draw and the field subset come from a Random seeded
    by (instruct seed, file index, story index). Counts records with unusable fields in problems.

    Given the story, only fields it really holds are asked for: words it contains (instruct.has_word)
    and, for the zh template, a summary or sentence written in Chinese; a translated data set whose
    records kept the English instruction thus asks only for its features."""
    import random

    import instruct

    if obj is None:
        return ""
    full = instruct.from_record(obj)
    if full is not None and story:
        lang = ins_cfg["lang"]
        full.words = [w for w in full.words if instruct.has_word(story, w, lang)]
        if lang == "zh":
            def cjk(s):
                return s if any("\u4e00" <= ch <= "\u9fff" for ch in s) else ""
            full.summary, full.sentence = cjk(full.summary), cjk(full.sentence)
        if full.empty():
            return ""  # nothing in the record fits this story: plain, and not malformed
    if full is None:
        if any(k in obj for k in ("words", "features", "instruction")):
            problems["bad_fields"] += 1  # e.g. words that are not a list: the story stays plain
        return ""
    rng = random.Random((ins_cfg["seed"] * 1_000_003 + ins_cfg["file_index"]) * 1_000_003 + index)
    if rng.random() >= ins_cfg["share"]:
        return ""
    ins = instruct.training_instruction(full, rng)
    return "" if ins.empty() else instruct.render_prompt(ins, ins_cfg["lang"])


def _encode_file(job: dict) -> dict:
    """Worker: one source file -> a train shard in job['out'] and the val tokens returned.

    Stories stream through in batches and the shard is written as it grows (header last), so a
    single huge file needs memory for one batch, not for the whole file. With job['instruct'],
    a story whose record carries instruct fields may get a prompt: BOS + prompt + story + EOS,
    the prompt and the story encoded separately, and a .mask beside the shard flags the prompt."""
    import sentencepiece as spm

    key = job["model"]
    sp = _SP_CACHE.get(key)
    if sp is None:
        sp = _SP_CACHE[key] = spm.SentencePieceProcessor(model_file=key)
    problems = ProblemLog(job["strict"])
    ins_cfg = job.get("instruct")
    ins_counts = {"instructed": 0, "too_long": 0, "bad_fields": 0}

    def pack(batch: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
        ids = sp.encode([s for s, _ in batch], num_threads=job["threads"])
        asked = [i for i, (_, p) in enumerate(batch) if p]
        pids: list[list[int]] = [[] for _ in batch]
        for i, x in zip(asked, sp.encode([batch[i][1] for i in asked], num_threads=job["threads"]) if asked else []):
            if len(x) > ins_cfg["max_tokens"]:
                ins_counts["too_long"] += 1  # the story is written plain
            else:
                pids[i] = x
                ins_counts["instructed"] += 1
        out = np.empty(sum(len(x) + len(p) + 2 for x, p in zip(ids, pids)), dtype="<u2")
        mask = np.zeros(out.size, dtype=np.uint8)
        pos = 0
        for x, p in zip(ids, pids):  # BOS, prompt, story, EOS
            out[pos] = job["bos"]
            out[pos + 1:pos + 1 + len(p)] = p
            mask[pos + 1:pos + 1 + len(p)] = MASK_INSTRUCTION
            pos += 1 + len(p)
            out[pos:pos + len(x)] = x
            out[pos + len(x)] = job["eos"]
            pos += len(x) + 1
        return out, mask

    counts = {"train_stories": 0, "train_tokens": 0, "train_chars": 0, "val_stories": 0}
    val_parts: list[np.ndarray] = []
    val_masks: list[np.ndarray] = []
    out_path = Path(job["out"])
    mask_file = open(mask_path(out_path), "wb") if ins_cfg else None  # inside pretokenize's atomic dir

    def add(f, batch: list[tuple[str, str]], split: str) -> None:
        tokens, mask = pack(batch)
        if split == "train":
            f.write(tokens.tobytes())
            if mask_file:
                mask_file.write(mask.tobytes())
            counts["train_tokens"] += tokens.size
            counts["train_chars"] += sum(len(s) for s, _ in batch)
        else:
            val_parts.append(tokens)
            val_masks.append(mask)
        counts[f"{split}_stories"] += len(batch)
        batch.clear()

    def write_body(f) -> None:
        f.write(bytes(HEADER_BYTES))  # the real header once the counts are known
        if mask_file:
            mask_file.write(bytes(HEADER_BYTES))
        batches = {"train": [], "val": []}
        records = iter_file_records(Path(job["path"]), text_key=job["text_key"], problems=problems)
        for k, (story, obj) in enumerate(records):
            split = "val" if is_val_story(story, job["val_fraction"]) else "train"
            batches[split].append((story, story_prompt(obj, ins_cfg, k, ins_counts, story) if ins_cfg else ""))
            if len(batches[split]) >= ENCODE_BATCH:
                add(f, batches[split], split)
        for split, batch in batches.items():
            if batch:
                add(f, batch, split)
        meta = dict(vocab_size=job["vocab_size"], tokenizer_hash=job["hash"],
                    n_tokens=counts["train_tokens"], n_stories=counts["train_stories"])
        f.seek(0)
        f.write(shard_header(**meta))
        if mask_file:
            mask_file.seek(0)
            mask_file.write(mask_header(**meta))

    try:
        fileio.atomic_write(out_path, write_body)
    finally:
        if mask_file:
            mask_file.close()
    if not counts["train_stories"]:
        out_path.unlink()  # a file of val stories only makes no train shard
        if mask_file:
            mask_path(out_path).unlink()
    empty = np.zeros(0, dtype="<u2")
    return {**counts, **ins_counts, "val": np.concatenate(val_parts) if val_parts else empty,
            "val_mask": np.concatenate(val_masks) if val_masks else np.zeros(0, dtype=np.uint8),
            "problems": problems.items, "problem_count": problems.count}


def default_instruct_lang(cfg: SourceConfig) -> str:
    """The instruction template's language when none is given: en for the English TinyStories."""
    return "en" if cfg.dataset == "en" and not cfg.data_dir else "zh"


def instruct_settings(cfg: PretokenizeConfig) -> dict | None:
    """meta.json's `instruct` record for these options (None without --instruct); DataError for a
    bad value."""
    if not cfg.instruct:
        return None
    lang = cfg.instruct_lang or default_instruct_lang(cfg)
    if lang not in ("zh", "en"):
        raise DataError(f"--instruct_lang={cfg.instruct_lang}: choose zh or en")
    if not 0.0 < cfg.instruct_share <= 1.0:
        raise DataError(f"--instruct_share={cfg.instruct_share}: must be in (0, 1]")
    if cfg.instruct_max_tokens < 1:
        raise DataError(f"--instruct_max_tokens={cfg.instruct_max_tokens}: must be >= 1")
    return {"lang": lang, "share": cfg.instruct_share, "loss_on_instruction": cfg.instruct_loss,
            "seed": cfg.instruct_seed, "max_tokens": cfg.instruct_max_tokens, "mask_version": MASK_VERSION}


def cmd_pretokenize(cfg: PretokenizeConfig) -> None:
    check_vocab_size(cfg.vocab_size)
    root = data_root(cfg)
    with lock_stage_output(root, f"tok{cfg.vocab_size}"):  # tok<N>.model must not change meanwhile
        fileio.sweep_stale(root)
        _pretokenize(cfg, root)


def _encode_files(jobs: list[dict], workers: int, bar) -> list[dict]:
    """_encode_file of every job, in order, on `workers` processes."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    import multiprocessing

    results: list = [None] * len(jobs)
    if workers == 1:
        for i, job in enumerate(jobs):
            results[i] = _encode_file(job)
            bar.update(1)
        return results
    # spawn, not fork: the parent may hold threads (tqdm, torch) that fork would copy mid-state
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
        futures = {ex.submit(_encode_file, job): i for i, job in enumerate(jobs)}
        try:
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()  # a worker's exception surfaces here
                bar.update(1)
        except BaseException:
            ex.shutdown(wait=True, cancel_futures=True)
            raise
    return results


def _pretokenize(cfg: PretokenizeConfig, root: Path) -> None:
    from tqdm import tqdm

    N = cfg.vocab_size
    model_path = root / f"tok{N}.model"
    if not model_path.exists():
        raise DataError(f"{model_path}: not found; run `python tinystories.py train_vocab "
                        f"--vocab_size={N}` first")
    ins = instruct_settings(cfg)
    tok = load_tokenizer(model_path, N)
    folder, files = source_files(cfg)
    tok_hash = tok.hash()
    out = root / f"tok{N}"
    sig = {"source": str(folder.resolve()), "files": _files_signature(folder, files),
           "text_key": cfg.text_key, "strict": cfg.strict, "val_fraction": cfg.val_fraction,
           "tokenizer_hash": tok_hash,
           "shard_version": SHARD_VERSION}
    if ins:
        sig["instruct"] = ins  # also what train.py reads: lang, share, loss_on_instruction ...
    if not cfg.force and _read_json(out / "meta.json") == sig:
        print(f"{out}: already pretokenized from {folder} with this tokenizer; nothing to do")
        return

    t0 = time.time()
    cores = os.cpu_count() or 1
    workers = max(1, min(cfg.workers or cores, len(files)))
    bar = tqdm(total=len(files), unit="file", desc=f"pretokenize tok{N}")
    with fileio.atomic_dir(out) as tmp:
        jobs = [{"path": str(p), "model": str(model_path), "out": str(tmp / f"train_{i:03d}.bin"),
                 "text_key": cfg.text_key, "strict": cfg.strict, "val_fraction": cfg.val_fraction,
                 "vocab_size": N, "hash": tok_hash, "bos": tok.bos_id, "eos": tok.eos_id,
                 "threads": max(1, cores // workers),
                 "instruct": {**ins, "file_index": i} if ins else None} for i, p in enumerate(files)]
        try:
            results = _encode_files(jobs, workers, bar)
        finally:
            bar.close()
        problems = ProblemLog(False)
        for r in results:
            problems.merge(r["problems"], r["problem_count"])
        problems.report()
        n_train = sum(r["train_stories"] for r in results)
        n_tokens = sum(r["train_tokens"] for r in results)
        if n_train == 0:
            raise DataError(f"{folder}: no usable stories for training"
                            + (f" ({problems.count} malformed lines skipped)" if problems.count else ""))
        val = np.concatenate([r["val"] for r in results])
        n_val = sum(r["val_stories"] for r in results)
        write_shard(tmp / "val.bin", val, vocab_size=N, tokenizer_hash=tok_hash, n_stories=n_val)
        if ins:
            write_mask(mask_path(tmp / "val.bin"), np.concatenate([r["val_mask"] for r in results]),
                       vocab_size=N, tokenizer_hash=tok_hash, n_stories=n_val)
        _write_json(tmp / "meta.json", sig)
    n_shards = sum(1 for r in results if r["train_tokens"])
    chars = sum(r["train_chars"] for r in results)
    print(f"{out}: {n_train} train stories, {n_tokens} tokens in {n_shards} shards; {n_val} val "
          f"stories, {val.size} tokens; {chars / max(n_tokens, 1):.2f} characters per token "
          f"(BOS/EOS included); {time.time() - t0:.1f}s")
    if ins:
        asked = sum(r["instructed"] for r in results)
        print(f"{out}: {asked} of {n_train + n_val} stories have an instruction ({ins['lang']}, share "
              f"{ins['share']}, instruction tokens {'in' if ins['loss_on_instruction'] else 'left out of'} "
              "the loss)")
        too_long = sum(r["too_long"] for r in results)
        if too_long:
            print(f"note: {too_long} instructions longer than --instruct_max_tokens="
                  f"{cfg.instruct_max_tokens} tokens were left out; those stories are plain", file=sys.stderr)
        bad = sum(r["bad_fields"] for r in results)
        if bad:
            print(f"warning: {bad} records had unusable instruct fields (words or features not a list, "
                  "or nothing usable); those stories are plain", file=sys.stderr)
        if asked == 0:
            print(f"warning: no story in {folder} carries instruct fields (words, features, summary, "
                  "sentence, or TinyStories' instruction); the shards are plain", file=sys.stderr)
    if n_val == 0:
        print(f"warning: {out / 'val.bin'} is empty: no story fell into the val split "
              f"(val_fraction={cfg.val_fraction})", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# main

STAGES.update({
    "download": (DownloadConfig, cmd_download, "fetch and safely extract TinyStories (zh or en)"),
    "synth": (SynthConfig, cmd_synth, "write the built-in story corpus (storygen.py) as jsonl"),
    "train_vocab": (TrainVocabConfig, cmd_train_vocab,
                    "train a sentencepiece BPE tokenizer -> data/tok<N>.model"),
    "pretokenize": (PretokenizeConfig, cmd_pretokenize,
                    "encode stories to uint16 shards -> data/tok<N>/train_*.bin, val.bin"),
})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    stage, args = argv[0], argv[1:]
    if stage in STAGES and any(a in ("-h", "--help") for a in args):
        print(stage_help(stage))
        return 0

    def body():
        if stage not in STAGES:
            raise OptionError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        cls, fn, _ = STAGES[stage]
        fn(parse_config(cls, args))

    return cli("tinystories.py" + (f" {stage}" if stage in STAGES else ""), body)


if __name__ == "__main__":
    sys.exit(main())
