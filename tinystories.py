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

Pretokenized shard file (little-endian), HEADER_BYTES = 256:
    off 0  uint32 magic 0x6e6b6f74 (the bytes "tokn")
    off 4  int32  version = 1
    off 8  int32  vocab_size
    off 12 uint32 tokenizer_hash (Tokenizer.hash() of the tokenizer that made it)
    off 16 uint64 n_tokens
    off 24 uint64 n_stories
    off 32..255 zero
    then n_tokens uint16 token ids; every story is BOS, its tokens, EOS.

Training code reads shards with `TokenBatches` (see its docstring).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import struct
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_DATA_ROOT = REPO_ROOT / "data"

# ----------------------------------------------------------------------------------------------
# errors

class DataError(Exception):
    """A problem with the user's data, files or network: reported as one line, exit status 1."""


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
    """Write a shard atomically (temp file + os.replace), so a crash never leaves half a shard."""
    tokens = np.ascontiguousarray(tokens, dtype="<u2")
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(shard_header(vocab_size=vocab_size, tokenizer_hash=tokenizer_hash,
                                 n_tokens=int(tokens.size), n_stories=n_stories))
            f.write(tokens.tobytes())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_shard_header(path: Path) -> dict:
    """Read and check a shard's header against its file size; DataError naming the file if bad."""
    path = Path(path)
    try:
        size = path.stat().st_size
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
    """Header dict and the tokens as a read-only uint16 memmap (n_tokens,)."""
    head = read_shard_header(path)
    if head["n_tokens"] == 0:
        return head, np.zeros(0, dtype=np.uint16)
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(head["n_tokens"],))
    return head, tokens


def shard_paths(shard_dir: Path, split: str) -> list[Path]:
    shard_dir = Path(shard_dir)
    if split == "train":
        return sorted(shard_dir.glob("train_*.bin"))
    if split == "val":
        return [p for p in [shard_dir / "val.bin"] if p.exists()]
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")


# ----------------------------------------------------------------------------------------------
# training data loader

class TokenBatches:
    """Random windows of max_seq_len + 1 tokens from memory-mapped shards, as (x, y) batches.

    Within an epoch the windows start at `offset + k * max_seq_len` in each shard (consecutive
    windows share one token, so every token is a target once per epoch); the offset (per shard,
    in [0, max_seq_len)) and the order of all windows are drawn fresh each epoch from
    (seed, epoch). Micro-batch number g = (step * grad_accum + micro) * world_size + rank takes
    windows g*B .. g*B+B-1 of that endless sequence, so ranks never overlap, one process with
    grad_accum=2 sees exactly what two ranks with grad_accum=1 see, and a run resumes exactly
    by asking for the same (step, micro) again: there is no hidden iterator state.
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
        vocab = tok_hash = None
        for p in paths:
            head, tokens = read_shard(p)
            if vocab is None:
                vocab, tok_hash = head["vocab_size"], head["tokenizer_hash"]
            elif (head["vocab_size"], head["tokenizer_hash"]) != (vocab, tok_hash):
                raise DataError(f"{p}: made with a different tokenizer than {paths[0]} "
                                f"(vocab {head['vocab_size']} vs {vocab}); re-run pretokenize")
            self.shards.append(tokens)
        self.vocab_size = vocab
        self.tokenizer_hash = tok_hash
        self.n_tokens = sum(int(t.size) for t in self.shards)

        T = max_seq_len
        # Windows per shard, the same every epoch: (n - T) // T of them fit after any offset in
        # [0, T); a shard too short for that but holding one window gets one, with a smaller
        # offset range. o_max[s] is the largest offset shard s allows.
        counts, o_max = [], []
        for t in self.shards:
            n = int(t.size)
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
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(offset per shard, permutation of window ids) for one epoch; the last two are cached."""
        got = self._epochs.get(epoch)
        if got is None:
            rng = np.random.default_rng([self.seed, epoch])
            offsets = (rng.random(len(self.shards)) * (self._o_max + 1)).astype(np.int64)
            perm = rng.permutation(self.n_windows)
            got = (offsets, perm)
            if len(self._epochs) >= 2:
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = got
        return got

    def window(self, j: int) -> np.ndarray:
        """The j-th window (int64, max_seq_len + 1 tokens) of the endless epoch sequence."""
        epoch, i = divmod(j, self.n_windows)
        offsets, perm = self._epoch(epoch)
        w = int(perm[i])
        s = int(np.searchsorted(self._starts, w, side="right") - 1)
        start = int(offsets[s]) + (w - int(self._starts[s])) * self.max_seq_len
        return np.asarray(self.shards[s][start:start + self.max_seq_len + 1], dtype=np.int64)

    def micro_index(self, step: int, micro: int) -> int:
        if not 0 <= micro < self.grad_accum:
            raise ValueError(f"micro {micro} not in [0, grad_accum={self.grad_accum})")
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return (step * self.grad_accum + micro) * self.world_size + self.rank

    def get(self, step: int, micro: int = 0):
        """(x, y) int64 torch tensors of shape (batch_size, max_seq_len); y is x shifted by one."""
        import torch  # lazy: the data stages must not pay for importing torch

        g = self.micro_index(step, micro)
        B = self.batch_size
        rows = np.stack([self.window(g * B + b) for b in range(B)])  # (B, T + 1)
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()
