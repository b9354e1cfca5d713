"""Train a small Llama on pretokenized stories, on one CPU/GPU or many GPUs (DDP), and resume exactly.

    python train.py --preset=tiny --max_seconds=300                  # the demo: 2 CPU cores, ~5 minutes
    python train.py --preset=micro --data_dir=data/tok512 --max_iters=200
    python train.py --init_from=resume --out_dir=out                 # continue out/ckpt.pt exactly
    python train.py --init_from=resume --max_iters=4000              # ... and train for longer
    python train.py plot out                                         # out/log.jsonl -> out/loss.png
    torchrun --standalone --nproc_per_node=4 train.py --vocab_source=custom --vocab_size=5000 \\
        --batch_size=128 --n_layers=6 --n_heads=6 --n_kv_heads=6 --max_seq_len=256 \\
        --gradient_accumulation_steps=4 --max_iters=100000

Options are `--key=value`, parsed by the type of the field in TrainConfig (`python train.py --help`
lists them). `--preset=NAME` first applies a model shape from model.PRESETS and this file's training
defaults for it; explicit options override the preset. llama2.c's option names keep their meaning;
`gradient_accumulation_steps` is the total over all processes, as in llama2.c, so the tokens per
optimizer step are batch_size * max_seq_len * gradient_accumulation_steps whatever the world size.

Data: `--vocab_source=custom --vocab_size=N` reads data/tokN/ (what `tinystories.py pretokenize
--vocab_size=N` writes); `--data_dir=DIR` reads any folder of shards.

Outputs in out_dir: ckpt.pt (latest), best.pt (lowest val loss), ckpt_<iter>.pt with
--keep_every=N (one kept every N steps, for `evaluate.py --checkpoint='out/ckpt_*.pt'`), log.jsonl (one JSON object per
log line: {"type": "train", "iter", "tokens", "loss", "lr", "ms", "tok_per_s", "mfu"} and
{"type": "eval", "iter", "tokens", "train_loss", "val_loss", "lr"}), and .lock while a run is on: one
run per out_dir, a second one is refused naming the first one's pid (a killed run's lock is free).

Ctrl-C or SIGTERM: a last evaluation, ckpt.pt saved, then exit status 130 or 143 (not 0), so that
`python train.py && python export.py ...` stops there. A resume reads shards of the tokenizer the
checkpoint was trained on (the hash it records), unless --retokenized=true says otherwise.

Exact resume: the data order is a pure function of (seed, step, micro-batch, rank), and a
checkpoint holds the weights, optimizer, grad scaler, every rank's RNG states and the step, so a
run killed at any moment (even with SIGKILL, even during a save) and resumed from its ckpt.pt ends
with the same weights as one that was never interrupted (bit for bit on CPU).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
import typing
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import checkpoint
import fileio
import tinystories
import tokenizer
from model import PRESETS, ModelArgs, Transformer, pick_device
from options import OptionError, UserError, cli, opt, os_error_text, parse_options, render_help


class TrainError(UserError):
    """A problem with the data, the out_dir or the run (bad options are OptionError, exit 2)."""


# ----------------------------------------------------------------------------------------------
# configuration

@dataclass
class TrainConfig:
    # I/O
    out_dir: str = opt("out", "folder for ckpt.pt, best.pt, log.jsonl (one run at a time)")
    eval_interval: int = opt(2000, "steps between evaluations (and checkpoints)")
    log_interval: int = opt(1, "steps between log lines")
    eval_iters: int = opt(100, "batches per split in each evaluation")
    eval_only: bool = opt(False, "evaluate once (e.g. a resumed checkpoint) and exit")
    always_save_checkpoint: bool = opt(True, "false: at eval intervals write ckpt.pt only if val loss improved")
    keep_every: int = opt(0, "also keep ckpt_<iter>.pt every this many steps (for evaluate.py's series); 0: off")
    init_from: str = opt("scratch", "scratch | resume (from out_dir/ckpt.pt)")
    max_seconds: float = opt(0.0, "stop after this many seconds of this process, saving a checkpoint; 0: no limit")
    preset: str = opt("", "a model.PRESETS name (see below); applied before the other options")
    # wandb (imported only when wandb_log is true)
    wandb_log: bool = opt(False, "log to Weights & Biases (needs pip install wandb)")
    wandb_project: str = opt("tinystories-zh", "wandb project")
    wandb_run_name: str = opt("run", "wandb run name")
    # data
    batch_size: int = opt(128, "sequences per micro-batch per process")
    vocab_source: str = opt("custom", "custom: our own sentencepiece vocab, shards in data/tok<vocab_size>/")
    data_dir: str = opt("", "folder of pretokenized shards; overrides vocab_source")
    tokenizer: str = opt("", "sentencepiece .model to check the shards against; default: <data_dir>.model if it exists")
    retokenized: bool = opt(False, "resume only: true lets the run continue on shards of another tokenizer than "
                                   "the checkpoint's (same vocab size, other pieces: the embeddings then mean "
                                   "other strings); never kept in the checkpoint, so each resume says it again")
    seed: int = opt(1337, "model init, data order and dropout all follow from it")
    # model (the fields of model.ModelArgs; 0 means "derive it" where noted)
    dim: int = opt(288, "model width")
    n_layers: int = opt(6, "transformer blocks")
    n_heads: int = opt(6, "attention (query) heads")
    n_kv_heads: int = opt(6, "key/value heads (grouped-query attention); 0: same as n_heads")
    vocab_size: int = opt(5000, "tokens in the vocabulary; must match the shards")
    hidden_dim: int = opt(0, "FFN width; 0: Llama's rule from dim and multiple_of")
    multiple_of: int = opt(32, "hidden_dim is rounded up to a multiple of this")
    norm_eps: float = opt(1e-5, "RMSNorm epsilon")
    max_seq_len: int = opt(256, "context length in tokens")
    dropout: float = opt(0.0, "dropout rate while training")
    rope_theta: float = opt(10000.0, "rotary embedding base")
    tie_embeddings: bool = opt(True, "the classifier shares the token embedding matrix")
    # optimizer: AdamW, weight decay on matrices only
    gradient_accumulation_steps: int = opt(4, "micro-batches per optimizer step, total over all processes")
    learning_rate: float = opt(5e-4, "peak learning rate")
    max_iters: int = opt(100000, "optimizer steps")
    weight_decay: float = opt(1e-1, "AdamW weight decay (matrices only)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    grad_clip: float = opt(1.0, "max global gradient norm; 0: no clipping")
    # learning rate schedule: linear warmup, then cosine down to min_lr at lr_decay_iters
    decay_lr: bool = opt(True, "false: constant learning_rate, no warmup")
    warmup_iters: int = opt(1000, "steps of linear warmup")
    lr_decay_iters: int = opt(0, "step where the cosine reaches min_lr; 0: max_iters")
    min_lr: float = opt(0.0, "learning rate after the decay")
    # system
    device: str = opt("auto", "auto (cuda if present, else cpu) | cpu | cuda | cuda:N | mps")
    dtype: str = opt("auto", "auto (bfloat16 if the GPU has it, else float16; float32 on CPU) | float32 | "
                             "bfloat16 | float16")
    compile: bool = opt(False, "torch.compile the model (pays off on GPUs for long runs)")


# Fields that define the network's shape: fixed by the checkpoint on resume.
ARCH_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "multiple_of",
               "norm_eps", "max_seq_len", "rope_theta", "tie_embeddings")
# Every ModelArgs field is a TrainConfig field of the same name (dropout is one, but not ARCH).
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelArgs))

# Training defaults that go with each model preset. The big ones follow the published
# tinyllamas runs (4 GPUs); "tiny" and "micro" fit a 2-core CPU (the demo and the tests).
TRAIN_PRESETS: dict[str, dict] = {
    "stories260K": dict(batch_size=128, gradient_accumulation_steps=1, learning_rate=5e-4,
                        max_iters=100000, warmup_iters=1000, eval_interval=2000),
    "stories15M": dict(batch_size=128, gradient_accumulation_steps=4, learning_rate=5e-4,
                       max_iters=100000, warmup_iters=1000, eval_interval=2000),
    "stories42M": dict(batch_size=128, gradient_accumulation_steps=4, learning_rate=5e-4,
                       max_iters=20000, warmup_iters=1000, eval_interval=2000),
    "stories110M": dict(batch_size=128, gradient_accumulation_steps=4, learning_rate=5e-4,
                        max_iters=20000, warmup_iters=1000, eval_interval=2000),
    "gqa": dict(batch_size=64, gradient_accumulation_steps=4, learning_rate=5e-4,
                max_iters=20000, warmup_iters=1000, eval_interval=2000),
    # ~1M parameters; on 2 CPU cores a step of 16 x 256 tokens takes a fraction of a second.
    "tiny": dict(batch_size=16, gradient_accumulation_steps=1, learning_rate=2e-3, max_iters=2000,
                 warmup_iters=100, lr_decay_iters=2000, min_lr=2e-4, eval_interval=250, eval_iters=20,
                 weight_decay=0.1, device="cpu"),
    "micro": dict(batch_size=8, gradient_accumulation_steps=1, learning_rate=3e-3, max_iters=300,
                  warmup_iters=20, min_lr=3e-4, eval_interval=100, eval_iters=5, device="cpu"),
}

def config_types() -> dict[str, type]:
    return typing.get_type_hints(TrainConfig)


def parse_overrides(argv: list[str]) -> dict:
    """`--key=value` arguments -> {key: typed value}, in order (options.py's parser)."""
    return parse_options(TrainConfig, argv)


def preset_overrides(name: str) -> dict:
    """The model shape and training defaults a preset stands for, as config field values."""
    if name not in PRESETS:
        raise OptionError(f"unknown preset {name!r}; choose from: {', '.join(PRESETS)}")
    out = {}
    for key, value in PRESETS[name].items():
        if key in ("n_kv_heads", "hidden_dim") and value is None:
            value = 0
        out[key] = value
    if "n_kv_heads" not in out:
        out["n_kv_heads"] = 0  # a preset without it means plain multi-head attention
    out.update(TRAIN_PRESETS.get(name, {}))
    return out


def build_config(overrides: dict, base: Optional[TrainConfig] = None) -> TrainConfig:
    """base (default: TrainConfig()) <- preset (if named) <- explicit overrides."""
    cfg = base if base is not None else TrainConfig()
    values = {}
    if overrides.get("preset"):
        values.update(preset_overrides(overrides["preset"]))
    values.update(overrides)
    return dataclasses.replace(cfg, **values)


def model_args_of(cfg: TrainConfig) -> ModelArgs:
    values = {name: getattr(cfg, name) for name in MODEL_FIELDS}
    for name in ("n_kv_heads", "hidden_dim"):
        if values[name] == 0:
            values[name] = None
    return ModelArgs(**values)


def check_config(cfg: TrainConfig) -> None:
    problems = []
    for name in ("batch_size", "max_seq_len", "gradient_accumulation_steps", "eval_interval",
                 "log_interval", "eval_iters"):
        if getattr(cfg, name) < 1:
            problems.append(f"{name}={getattr(cfg, name)} must be >= 1")
    for name in ("max_iters", "warmup_iters", "lr_decay_iters", "keep_every"):
        if getattr(cfg, name) < 0:
            problems.append(f"{name}={getattr(cfg, name)} must be >= 0")
    if cfg.learning_rate <= 0 or cfg.min_lr < 0:
        problems.append("learning_rate must be > 0 and min_lr >= 0")
    if cfg.init_from not in ("scratch", "resume"):
        problems.append(f"init_from={cfg.init_from!r} must be scratch or resume")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        problems.append(f"dtype={cfg.dtype!r} must be auto, float32, bfloat16 or float16")
    if problems:
        raise OptionError("bad config: " + "; ".join(problems))
    try:
        model_args_of(cfg).resolved()
    except ValueError as e:
        raise OptionError(str(e)) from None


def resolve_data_dir(cfg: TrainConfig) -> Path:
    if cfg.data_dir:
        return Path(cfg.data_dir)
    if cfg.vocab_source == "llama2":
        raise OptionError("--vocab_source=llama2 is not supported: this project trains its own vocab "
                         "(python tinystories.py train_vocab), use --vocab_source=custom")
    if cfg.vocab_source != "custom":
        raise OptionError(f"--vocab_source={cfg.vocab_source}: must be custom (or give --data_dir)")
    return tinystories.DEFAULT_DATA_ROOT / f"tok{cfg.vocab_size}"


def lr_at(it: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `it` (0-based): linear warmup, cosine decay, then min_lr."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / cfg.warmup_iters
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it >= decay_iters:
        return cfg.min_lr
    frac = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * frac)) * (cfg.learning_rate - cfg.min_lr)


# ----------------------------------------------------------------------------------------------
# RNG states (a checkpoint holds every rank's; checkpoint.py reads and writes the file)

def rng_state() -> dict:
    """This process's RNG states, as tensors and plain values (loadable with weights_only=True)."""
    py_version, py_internal, py_gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": py_gauss},
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss_next"]))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# logging and plots

class RunLog:
    """Console lines and out_dir/log.jsonl records (rank 0 only; other ranks get enabled=False)."""

    def __init__(self, out_dir: Path, *, enabled: bool, wandb_run=None):
        self.enabled = enabled
        self.path = out_dir / "log.jsonl"
        self.wandb_run = wandb_run
        if enabled and self.path.is_file() and self.path.stat().st_size:
            # A run killed mid-write leaves a torn last line; start ours on a fresh one.
            with open(self.path, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")

    def record(self, rec: dict, line: str) -> None:
        if not self.enabled:
            return
        print(line, flush=True)
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
        except OSError as e:  # a write() error names no file: say which one
            raise TrainError(os_error_text(e, self.path)) from None
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in rec.items() if k != "type"}, step=rec["iter"])

    def note(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True)


def read_log(path: Path) -> list[dict]:
    """log.jsonl records; for an iteration logged twice (a killed run, then its resume) the later wins."""
    by_key = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                # A run killed mid-write can leave one torn last line; anything else is damage.
                continue
            if isinstance(rec, dict) and "iter" in rec and "type" in rec:
                by_key[(rec["type"], rec["iter"])] = rec
    return sorted(by_key.values(), key=lambda r: (r["iter"], r["type"]))


def plot(out_dir: Path) -> Path:
    """Draw out_dir/log.jsonl (losses against tokens seen, lr on a second axis) to out_dir/loss.png."""
    out_dir = Path(out_dir)
    log_path = out_dir / "log.jsonl"
    if not log_path.is_file():
        raise TrainError(f"{log_path}: no training log (train with --out_dir={out_dir} first)")
    recs = read_log(log_path)
    train = [r for r in recs if r["type"] == "train"]
    evals = [r for r in recs if r["type"] == "eval"]
    if not train and not evals:
        raise TrainError(f"{log_path}: no train or eval records to plot")
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5), dpi=100)
    if train:
        ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], lw=0.8, alpha=0.7,
                label="train loss (step)")
    if evals:
        ax.plot([r["tokens"] for r in evals], [r["train_loss"] for r in evals], "o-", ms=3,
                label="train loss (eval)")
        ax.plot([r["tokens"] for r in evals], [r["val_loss"] for r in evals], "s-", ms=3,
                label="val loss")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    lr_recs = train or evals
    ax2.plot([r["tokens"] for r in lr_recs], [r["lr"] for r in lr_recs], color="gray", ls="--", lw=0.8,
             label="learning rate")
    ax2.set_ylabel("learning rate")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right")
    ax.set_title(f"{out_dir}")
    fig.tight_layout()
    png = out_dir / "loss.png"
    try:
        fileio.atomic_write(png, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)
    return png


# ----------------------------------------------------------------------------------------------
# training

@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def distributed_local_rank() -> Optional[int]:
    """This process's GPU index under torchrun with more than one process, else None."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return int(os.environ.get("LOCAL_RANK", "0"))


def setup_distributed(device: str) -> Dist:
    """Join the torchrun process group if launched by torchrun (RANK in the environment)."""
    local_rank = distributed_local_rank()
    if local_rank is None:
        return Dist()
    import torch.distributed as dist

    d = Dist(rank=int(os.environ["RANK"]), local_rank=local_rank, world_size=int(os.environ["WORLD_SIZE"]))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(d.local_rank)
    dist.init_process_group(backend=backend)
    return d


def pick_dtype(cfg: TrainConfig, device_type: str) -> str:
    if device_type == "cuda":
        if cfg.dtype == "auto":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return cfg.dtype
    if cfg.dtype in ("auto", "float32"):
        return "float32"
    if cfg.dtype == "bfloat16" and device_type == "cpu":
        return "bfloat16"
    raise OptionError(f"--dtype={cfg.dtype} is not supported on {device_type} (use float32)")


def check_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = fileio.temp_path(out_dir / "write-test")  # swept like any temporary if we die here
        probe.touch()
        probe.unlink(missing_ok=True)
    except OSError as e:
        raise TrainError(f"out_dir {out_dir} is not writable ({e.strerror or e})") from None


def open_data(cfg: TrainConfig, d: Dist, grad_accum: int):
    """Train/val loaders (and the eval ones) after checking vocab sizes and data length."""
    data_dir = resolve_data_dir(cfg)
    if not data_dir.is_dir():
        raise TrainError(f"{data_dir}: data folder not found; run `python tinystories.py pretokenize "
                         f"--vocab_size={cfg.vocab_size}` or give --data_dir")
    try:
        train = tinystories.TokenBatches(data_dir, "train", cfg.batch_size, cfg.max_seq_len, seed=cfg.seed,
                                         rank=d.rank, world_size=d.world_size, grad_accum=grad_accum)
        # Evaluation batches come from their own seeds, the same in every evaluation and for any
        # world size (ranks split batches 0..eval_iters-1 between them).
        eval_train = tinystories.TokenBatches(data_dir, "train", cfg.batch_size, cfg.max_seq_len,
                                              seed=cfg.seed + 1)
        eval_val = tinystories.TokenBatches(data_dir, "val", cfg.batch_size, cfg.max_seq_len,
                                            seed=cfg.seed + 2)
    except tinystories.DataError as e:
        raise TrainError(str(e)) from None
    if train.vocab_size != cfg.vocab_size:
        raise TrainError(f"{data_dir}: shards have vocab_size {train.vocab_size} but the model has "
                         f"vocab_size {cfg.vocab_size}; pass --vocab_size={train.vocab_size} or "
                         "pretokenize with the matching tokenizer")
    if eval_val.vocab_size != train.vocab_size or eval_val.tokenizer_hash != train.tokenizer_hash:
        raise TrainError(f"{data_dir}: val.bin was made with a different tokenizer than the train shards "
                         f"(vocab {eval_val.vocab_size} vs {train.vocab_size}); re-run pretokenize")
    # (val may be shorter: an evaluation batch may then hold a window twice, which only costs time.)
    if train.n_windows < cfg.batch_size:
        raise TrainError(f"{data_dir}: train data has {train.n_tokens} tokens, {train.n_windows} windows of "
                         f"max_seq_len + 1 = {cfg.max_seq_len + 1}, fewer than one batch of "
                         f"batch_size={cfg.batch_size}; use more data or a smaller batch_size/max_seq_len")
    check_tokenizer(cfg, data_dir, train)
    return data_dir, train, eval_train, eval_val


def check_tokenizer(cfg: TrainConfig, data_dir: Path, train) -> None:
    """The tokenizer (if we can find it) must be the one the shards were made with."""
    path = Path(cfg.tokenizer) if cfg.tokenizer else Path(str(data_dir).rstrip("/\\") + ".model")
    if not path.is_file():
        if cfg.tokenizer:
            raise TrainError(f"{path}: tokenizer not found")
        return
    tok = tokenizer.Tokenizer(str(path))  # TokenizerError naming the file if it is not one
    if tok.vocab_size != train.vocab_size:
        raise TrainError(f"{path}: tokenizer has vocab_size {tok.vocab_size} but the shards in {data_dir} "
                         f"have {train.vocab_size}; re-run pretokenize with this tokenizer")
    if train.tokenizer_hash and tok.hash() != train.tokenizer_hash:  # 0: not recorded
        raise TrainError(f"{path}: tokenizer hash {tok.hash():#010x} differs from the shards' "
                         f"{train.tokenizer_hash:#010x} ({data_dir}); re-run pretokenize")


def check_resume_tokenizer(cfg: TrainConfig, ckpt: dict, ckpt_path: Path, data_dir: Path, train) -> None:
    """A resumed run must read shards of the tokenizer its checkpoint was trained on (the hash the
    checkpoint's data record holds), unless --retokenized=true says the switch is meant."""
    data = ckpt.get("data") if isinstance(ckpt.get("data"), dict) else {}
    recorded = checkpoint.tokenizer_hash(ckpt)
    if not recorded or not train.tokenizer_hash or recorded == train.tokenizer_hash or cfg.retokenized:
        return  # 0: not recorded, nothing to compare
    shard = tinystories.shard_paths(data_dir, "train")[0]
    raise TrainError(f"{shard}: shards of tokenizer hash {train.tokenizer_hash:#010x}, but {ckpt_path} "
                     f"was trained on tokenizer hash {recorded:#010x} ({data.get('data_dir', '?')}); resume "
                     "with that data, or pass --retokenized=true to continue on the new tokenizer on purpose")


def resume_config(cfg_cli: TrainConfig, overrides: dict) -> tuple[TrainConfig, dict]:
    """The checkpoint's config with the command line's non-architecture overrides applied."""
    out_dir = Path(cfg_cli.out_dir)
    ckpt = checkpoint.load(out_dir / "ckpt.pt")
    types = config_types()
    saved = {k: v for k, v in ckpt["config"].items() if k in types and k != "retokenized"}
    base = TrainConfig(**saved)
    given = dict(overrides)
    # A preset on resume only states the shape it expects; its training defaults are not applied
    # over the checkpoint's own settings.
    expected = {k: v for k, v in preset_overrides(given["preset"]).items() if k in ARCH_FIELDS} \
        if given.get("preset") else {}
    expected.update({k: v for k, v in given.items() if k in ARCH_FIELDS})
    for key, value in expected.items():
        if value != getattr(base, key):
            raise OptionError(f"--{key}={value}: cannot change the architecture on resume "
                             f"(checkpoint {out_dir / 'ckpt.pt'} has {key}={getattr(base, key)})")
    given.pop("preset", None)
    cfg = dataclasses.replace(base, **given)
    cfg = dataclasses.replace(cfg, init_from="resume", out_dir=str(out_dir))
    if dataclasses.asdict(ModelArgs(**ckpt["model_args"]).resolved()) != \
            dataclasses.asdict(model_args_of(cfg).resolved()):
        raise TrainError(f"{out_dir / 'ckpt.pt'}: model_args and config disagree; checkpoint is damaged")
    return cfg, ckpt


def lock_out_dir(out_dir: Path) -> tinystories.FolderLock:
    """One run per out_dir: an exclusive lock on out_dir/.lock, which holds the pid (see FolderLock)."""
    check_out_dir(out_dir)
    try:
        lock = tinystories.FolderLock(out_dir / ".lock", what=f"out_dir {out_dir}")
    except tinystories.DataError as e:
        raise TrainError(str(e)) from None
    except OSError as e:
        raise TrainError(f"out_dir {out_dir} is not writable ({e.strerror or e})") from None
    if lock.stale_pid:
        print(f"{out_dir / '.lock'}: taking over the lock of pid {lock.stale_pid}, which has ended", flush=True)
    return lock


def train(cfg: TrainConfig, overrides: dict) -> int:
    """One training run: set up, then the loop; returns the exit status (128 + signal if stopped by one)."""
    d = Dist()
    lock = None
    try:
        d = setup_distributed(pick_device(cfg.device, distributed_local_rank()))
        if d.master:
            # Rank 0 alone: all ranks share out_dir, and only rank 0 writes there. A refused rank 0
            # exits, and torchrun then stops the other ranks.
            lock = lock_out_dir(Path(cfg.out_dir))
        run = start_run(cfg, overrides, d)
        try:
            return training_loop(run)
        finally:
            if run.wandb_run is not None:
                run.wandb_run.finish()
    finally:
        if lock is not None:
            lock.release()
        if d.enabled:
            import torch.distributed as dist

            dist.destroy_process_group()


@dataclass
class Run:
    """What the training loop works on: the config, the data, the model and the position."""
    cfg: TrainConfig
    d: Dist
    device: str
    device_type: str  # cuda | cpu | mps
    dtype: str
    grad_accum: int  # micro-batches per optimizer step on this process
    tokens_per_iter: int
    out_dir: Path
    data_dir: Path
    train_batches: tinystories.TokenBatches
    eval_batches: tuple  # (train, val) loaders with their own fixed seeds
    args: ModelArgs
    raw_model: Transformer  # what is saved: unwrapped and uncompiled
    model: torch.nn.Module  # what is trained: compiled and DDP-wrapped when asked
    eval_model: torch.nn.Module  # compiled if asked, never DDP-wrapped: evaluation needs no gradient sync
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    log: RunLog
    wandb_run: object = None
    iter_num: int = 0
    start_iter: int = 0
    best_val: float = math.inf
    stop_signal: Optional[int] = None

    def autocast(self):
        if self.dtype == "float32":
            return nullcontext()
        return torch.autocast(device_type=self.device_type,
                              dtype=torch.bfloat16 if self.dtype == "bfloat16" else torch.float16)

    def on_signal(self, signum, frame) -> None:
        self.stop_signal = signum
        signal.signal(signum, signal.SIG_DFL)  # a second one stops at once


def start_run(cfg: TrainConfig, overrides: dict, d: Dist) -> Run:
    """Check the config, open the data, build the model and optimizer, and restore a checkpoint."""
    out_dir = Path(cfg.out_dir)
    ckpt = None
    if cfg.init_from == "resume":
        cfg, ckpt = resume_config(cfg, overrides)
    check_config(cfg)
    if cfg.gradient_accumulation_steps % d.world_size:
        raise OptionError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} is not divisible "
                          f"by the world size {d.world_size} (it is the total over all processes)")
    grad_accum = cfg.gradient_accumulation_steps // d.world_size
    if cfg.wandb_log:  # checked early and on every rank, so a missing wandb stops all of them
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise TrainError("--wandb_log=true but wandb is not installed (pip install wandb)") from None
    device = pick_device(cfg.device, d.local_rank if d.enabled else None)
    device_type = "cuda" if device.startswith("cuda") else device
    dtype = pick_dtype(cfg, device_type)
    check_out_dir(out_dir)  # on every rank: an error on rank 0 alone would leave the others waiting
    if d.master:
        checkpoint.sweep_temps(out_dir)
    data_dir, train_batches, eval_train, eval_val = open_data(cfg, d, grad_accum)
    if ckpt is not None:
        check_resume_tokenizer(cfg, ckpt, out_dir / "ckpt.pt", data_dir, train_batches)

    args = model_args_of(cfg).resolved()
    raw_model, optimizer, scaler = make_model_and_optimizer(cfg, args, device, device_type, dtype)
    iter_num, best_val = 0, math.inf
    if ckpt is not None:
        iter_num, best_val = restore(ckpt, out_dir / "ckpt.pt", raw_model, optimizer, scaler, cfg, d)
        ckpt = None  # free the memory
    else:
        torch.manual_seed(cfg.seed + d.rank)  # dropout differs per rank, reproducibly
    model = eval_model = torch.compile(raw_model) if cfg.compile else raw_model
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # The only buffers are the constant RoPE tables: nothing to broadcast each forward.
        model = DDP(model, device_ids=[d.local_rank] if device_type == "cuda" else None,
                    broadcast_buffers=False)

    wandb_run = None
    if cfg.wandb_log and d.master:
        import wandb

        wandb_run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=dataclasses.asdict(cfg))
    run = Run(cfg=cfg, d=d, device=device, device_type=device_type, dtype=dtype, grad_accum=grad_accum,
              tokens_per_iter=cfg.gradient_accumulation_steps * cfg.batch_size * cfg.max_seq_len,
              out_dir=out_dir, data_dir=data_dir, train_batches=train_batches, eval_batches=(eval_train, eval_val),
              args=args, raw_model=raw_model, model=model, eval_model=eval_model, optimizer=optimizer,
              scaler=scaler, log=RunLog(out_dir, enabled=d.master, wandb_run=wandb_run), wandb_run=wandb_run,
              iter_num=iter_num, start_iter=iter_num, best_val=best_val)
    run.log.note(f"{'resuming at iter ' + str(iter_num) if iter_num else 'training from scratch'}: "
                 f"{raw_model.num_params() / 1e6:.2f}M params, data {data_dir} ({train_batches.n_tokens} train "
                 f"tokens), {run.tokens_per_iter} tokens/iter, device {device}, dtype {dtype}, world size "
                 f"{d.world_size}, grad accum {grad_accum}/process")
    ins = instruct_record(train_batches)
    if ins:
        run.log.note(f"instruct data: {ins['lang']} template, share {ins['share']}, instruction tokens "
                     f"{'in' if ins['loss_on_instruction'] else 'left out of'} the loss")
    return run


def instruct_record(batches) -> Optional[dict]:
    """The checkpoint's data.instruct: how the shards were made (pretokenize --instruct=true's
    meta.json record: lang, share, loss_on_instruction), None for plain data. export.py reads
    its lang to mark the model as answering instructions."""
    rec = batches.instruct
    if not rec:
        return None
    return {"lang": rec.get("lang"), "share": rec.get("share"),
            "loss_on_instruction": bool(rec.get("loss_on_instruction", False)),
            "max_tokens": rec.get("max_tokens")}


def make_model_and_optimizer(cfg: TrainConfig, args: ModelArgs, device: str, device_type: str, dtype: str):
    """The model (same initial weights on every rank), AdamW and the float16 grad scaler."""
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # Same seed on every rank for the initial weights (DDP would broadcast rank 0's anyway).
    torch.manual_seed(cfg.seed)
    model = Transformer(args)
    model.to(device)
    optimizer = model.configure_optimizers(weight_decay=cfg.weight_decay, learning_rate=cfg.learning_rate,
                                           betas=(cfg.beta1, cfg.beta2), device_type=device_type)
    scaler = torch.amp.GradScaler(device_type if device_type == "cuda" else "cpu", enabled=(dtype == "float16"))
    return model, optimizer, scaler


def restore(ckpt: dict, path: Path, model, optimizer, scaler, cfg: TrainConfig, d: Dist) -> tuple[int, float]:
    """Load a checkpoint's weights, optimizer, scaler and this rank's RNG; returns (iter_num, best_val)."""
    try:
        model.load_state_dict(ckpt["model"], strict=True)
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise TrainError(f"{path}: does not fit the model ({str(e).splitlines()[0][:200]})") from None
    iter_num = int(ckpt["iter_num"])
    rngs = ckpt.get("rng") or []
    if len(rngs) == d.world_size:
        set_rng_state(rngs[d.rank])
    else:
        # Another world size: the data order is still exact, dropout masks cannot be.
        torch.manual_seed(cfg.seed + 1000 * iter_num + d.rank)
    return iter_num, float(ckpt.get("best_val_loss", math.inf))


def reduce_sum(run: Run, t: torch.Tensor) -> torch.Tensor:
    """t summed over all ranks (in place)."""
    if run.d.enabled:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def reduce_mean(run: Run, values: list[float]) -> list[float]:
    """values averaged over all ranks."""
    if not run.d.enabled:
        return values
    t = reduce_sum(run, torch.tensor(values, dtype=torch.float64, device=run.device))
    return (t / run.d.world_size).tolist()


@torch.no_grad()
def estimate_loss(run: Run) -> tuple[float, float]:
    """Mean loss over eval_iters fixed batches of train and of val (the ranks split the batches)."""
    cfg, d, model = run.cfg, run.d, run.eval_model
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=run.device)
    for i, loader in enumerate(run.eval_batches):
        for k in range(d.rank, cfg.eval_iters, d.world_size):
            x, y = loader.get(k)
            x, y = x.to(run.device), y.to(run.device)
            with run.autocast():
                _, loss = model(x, y)
            totals[i] += loss.double()
    model.train()
    train_loss, val_loss = (reduce_sum(run, totals) / cfg.eval_iters).tolist()
    return train_loss, val_loss


def save_checkpoint(run: Run, names: list[str]) -> None:
    """Write the run's whole state to out_dir/NAME for each name (rank 0; every rank takes part)."""
    d = run.d
    # Every rank's RNG state, so a resumed DDP run draws the same dropout masks everywhere.
    states = [rng_state()]
    if d.enabled:
        import torch.distributed as dist

        states = [None] * d.world_size
        dist.all_gather_object(states, rng_state())
    if not d.master:
        return
    cfg = run.cfg
    obj = {
        "format": checkpoint.CKPT_FORMAT, "version": checkpoint.CKPT_VERSION,
        "model": run.raw_model.state_dict(),
        "model_args": dataclasses.asdict(run.args),
        "config": dataclasses.asdict(cfg),
        "iter_num": run.iter_num, "best_val_loss": run.best_val,
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
        "rng": states,
        # The loader is a pure function of these, so this is the whole data position.
        "data": {"data_dir": str(run.data_dir), "seed": cfg.seed, "step": run.iter_num,
                 "tokens_seen": run.iter_num * run.tokens_per_iter, "world_size": d.world_size,
                 "vocab_size": run.train_batches.vocab_size, "tokenizer_hash": run.train_batches.tokenizer_hash,
                 "instruct": instruct_record(run.train_batches)},
    }
    for name in names:
        checkpoint.save(run.out_dir / name, obj)
    run.log.note(f"saved {', '.join(str(run.out_dir / n) for n in names)} at iter {run.iter_num}")


def should_stop(run: Run, t_start: float) -> bool:
    """Done, or (agreed by all ranks) out of time or asked to stop by a signal."""
    cfg = run.cfg
    if run.iter_num >= cfg.max_iters or cfg.eval_only:
        return True
    if run.iter_num == run.start_iter:
        return False  # at least one step, so the checkpoint saved on stopping is new
    timed_out = cfg.max_seconds > 0 and time.time() - t_start >= cfg.max_seconds
    return reduce_mean(run, [1.0 if (timed_out or run.stop_signal) else 0.0])[0] > 0


def evaluate_and_save(run: Run, lr: float, *, stopping: bool) -> None:
    """Log both losses; save ckpt.pt (and best.pt when val loss improved) unless nothing was trained."""
    cfg = run.cfg
    train_loss, val_loss = estimate_loss(run)
    run.log.record({"type": "eval", "iter": run.iter_num, "tokens": run.iter_num * run.tokens_per_iter,
                    "train_loss": train_loss, "val_loss": val_loss, "lr": lr},
                   f"eval {run.iter_num}: train loss {train_loss:.4f}, val loss {val_loss:.4f}")
    if cfg.eval_only:
        return
    improved = val_loss < run.best_val
    run.best_val = min(run.best_val, val_loss)
    if run.iter_num > run.start_iter:
        names = ["ckpt.pt"] if (cfg.always_save_checkpoint or improved or stopping) else []
        names += ["best.pt"] if improved else []
        if names:
            save_checkpoint(run, names)


def train_step(run: Run, lr: float) -> torch.Tensor:
    """One optimizer step over grad_accum micro-batches; returns the summed micro-batch losses."""
    cfg, model, optimizer, scaler = run.cfg, run.model, run.optimizer, run.scaler
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), dtype=torch.float32, device=run.device)
    for micro in range(run.grad_accum):
        x, y = run.train_batches.get(run.iter_num, micro)
        if run.device_type == "cuda":
            x, y = x.pin_memory().to(run.device, non_blocking=True), y.pin_memory().to(run.device, non_blocking=True)
        else:
            x, y = x.to(run.device), y.to(run.device)
        # Only the last micro-batch all-reduces gradients across ranks.
        sync = model.no_sync() if run.d.enabled and micro < run.grad_accum - 1 else nullcontext()
        with sync:
            with run.autocast():
                _, loss = model(x, y)
            scaler.scale(loss / run.grad_accum).backward()
        loss_sum += loss.detach().float()
    if cfg.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum


def log_step(run: Run, step: int, lr: float, loss_sum: torch.Tensor, t0: float) -> None:
    """One train log line; the loss is the mean over all micro-batches of all ranks (the whole batch)."""
    loss_val = reduce_mean(run, [loss_sum.item() / run.grad_accum])[0]
    dt = time.time() - t0  # after .item(), which waits for the GPU
    tok_s = run.tokens_per_iter / dt if dt > 0 else 0.0
    rec = {"type": "train", "iter": step, "tokens": (step + 1) * run.tokens_per_iter, "loss": loss_val,
           "lr": lr, "ms": dt * 1000, "tok_per_s": tok_s}
    line = f"iter {step} | loss {loss_val:.4f} | lr {lr:.3e} | {dt * 1000:.1f} ms | {tok_s:.0f} tok/s"
    if run.device_type == "cuda":
        mfu = run.raw_model.estimate_mfu(run.cfg.batch_size * run.grad_accum, dt)  # per GPU
        rec["mfu"] = mfu
        line += f" | mfu {mfu * 100:.1f}%"
    if not math.isfinite(loss_val):
        raise TrainError(f"loss is {loss_val} at iter {step}; lower --learning_rate or check the data")
    run.log.record(rec, line)


@contextmanager
def stop_on_signals(run: Run):
    """Ctrl-C and SIGTERM set run.stop_signal: the loop then evaluates, saves and stops."""
    old = {}
    if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
        old = {s: signal.signal(s, run.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def training_loop(run: Run) -> int:
    cfg = run.cfg
    with stop_on_signals(run):
        t_start = time.time()
        while True:
            stopping = should_stop(run, t_start)
            lr = lr_at(run.iter_num, cfg)
            # evaluate the loss on train/val, and write checkpoints
            due = run.iter_num % cfg.eval_interval == 0 and (run.iter_num > run.start_iter or run.start_iter == 0)
            if stopping or due:
                evaluate_and_save(run, lr, stopping=stopping)
            if cfg.keep_every > 0 and run.iter_num % cfg.keep_every == 0 and run.iter_num > run.start_iter \
                    and not cfg.eval_only:
                save_checkpoint(run, [f"ckpt_{run.iter_num}.pt"])
            if stopping:
                if run.stop_signal:
                    run.log.note(f"stopped by signal {run.stop_signal} at iter {run.iter_num}")
                elif run.iter_num < cfg.max_iters and not cfg.eval_only:
                    run.log.note(f"stopped after max_seconds={cfg.max_seconds} at iter {run.iter_num}")
                break
            # forward, backward and update, then log
            t0 = time.time()
            loss_sum = train_step(run, lr)
            step = run.iter_num
            run.iter_num += 1
            if step % cfg.log_interval == 0:
                log_step(run, step, lr, loss_sum, t0)
    # Stopped by Ctrl-C or SIGTERM: the checkpoint is saved, but the run did not finish, so the
    # shell's convention (128 + signal) keeps `train.py && export.py` from going on.
    return 128 + run.stop_signal if run.stop_signal else 0


# ----------------------------------------------------------------------------------------------
# CLI

def usage() -> str:
    """train.py --help."""
    return render_help(TrainConfig, "python train.py [--key=value ...] | python train.py plot OUT_DIR", __doc__,
                       epilog=f"presets: {', '.join(PRESETS)}")


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    # Under torchrun every rank fails alike; rank 0 alone says why.
    return cli("train.py", lambda: _main(argv), quiet=os.environ.get("RANK", "0") != "0")


def _main(argv: list[str]) -> int:
    if argv and argv[0] == "plot":
        if len(argv) != 2:
            raise OptionError("usage: python train.py plot OUT_DIR")
        print(f"wrote {plot(Path(argv[1]))}")
        return 0
    overrides = parse_overrides(argv)
    cfg = build_config(overrides)
    if cfg.init_from != "resume":
        check_config(cfg)
    return train(cfg, overrides)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
