"""train.py's checkpoints: the one module that writes, reads and checks them, for train, export,
sample, evaluate and demo. docs/formats.md lists the entries (format, version, model, model_args,
config, iter_num, optimizer, rng, data, ...).

Everything in a checkpoint loads with torch.load(weights_only=True): tensors and plain values, so
reading one never runs code. save() goes through fileio.atomic_write, so a kill (even SIGKILL, even
mid-save) leaves the old file or the new one, and a full disk is one line `PATH: no space left on
device`. Every problem reading one is a CheckpointError naming the file.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Union

import torch

import fileio
from model import ModelArgs, Transformer, non_finite_weight
from options import UserError

CKPT_FORMAT = "tinystories-zh-train-checkpoint"
CKPT_VERSION = 1
REQUIRED_KEYS = ("model", "model_args", "config", "iter_num", "optimizer")

PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(UserError):
    """A checkpoint that is missing, not a regular file, damaged or of another format: one line."""


def save(path: PathLike, ckpt: dict) -> None:
    """Write ckpt to path atomically (temp file beside it, fsync, rename)."""
    fileio.atomic_write(path, lambda f: torch.save(ckpt, f))


def load(path: PathLike) -> dict:
    """The checkpoint dict at path after checking its format, version and entries."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found (train first, or check --out_dir)") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):  # a FIFO would block the open below until a writer comes
        raise CheckpointError(f"{path}: not a regular file, not a checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a damaged zip/pickle
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: corrupt or unreadable checkpoint ({first[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path}: not a train.py checkpoint")
    if ckpt.get("version") != CKPT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {ckpt.get('version')} not supported "
                              f"(expected {CKPT_VERSION})")
    for key in REQUIRED_KEYS:
        if key not in ckpt:
            raise CheckpointError(f"{path}: checkpoint has no {key!r} entry")
    return ckpt


def model_from_checkpoint(path: PathLike) -> tuple[Transformer, dict]:
    """The trained model (eval mode, CPU, fp32) and the checkpoint dict, e.g. for export/sampling."""
    ckpt = load(path)
    try:
        model = Transformer(ModelArgs(**ckpt["model_args"]))
        # Checkpoints of older runs saved the torch.compile wrapper's names.
        state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
        model.load_state_dict(state, strict=True)
    except (TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"{path}: checkpoint does not fit the model "
                              f"({str(e).strip().splitlines()[0][:200]})") from None
    bad = non_finite_weight(model)
    if bad:
        raise CheckpointError(f"{path}: weight {bad}; the run diverged or the file is damaged")
    return model.eval(), ckpt


def tokenizer_hash(ckpt: dict) -> int:
    """The shards' tokenizer hash a checkpoint's data record holds; 0 when not recorded."""
    data = ckpt.get("data") if isinstance(ckpt.get("data"), dict) else {}
    h = data.get("tokenizer_hash")
    return h if isinstance(h, int) and 0 < h < 2**32 else 0


def sweep_temps(out_dir: PathLike) -> None:
    """Remove the temporaries killed saves left in out_dir (the real checkpoints are untouched).

    Before fileio, saves used mkstemp names `.ckpt.pt.XXXX.tmp`; an out_dir of such a run may still
    hold one. Only one run holds an out_dir (its .lock), so any of those is stale."""
    fileio.sweep_stale(out_dir)
    for p in Path(out_dir).glob(".*.pt.*.tmp"):
        try:
            p.unlink()
        except OSError:
            pass
