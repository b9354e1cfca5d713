"""train.py: config parsing, learning, exact resume (also after SIGKILL), DDP parity, errors, plots.

Everything runs on CPU with tiny models (dim 32, seq 64) on real shards that tinystories.py
pretokenizes from a small synthetic jsonl folder with a sentencepiece vocab trained on it.

    .venv/bin/python -m pytest tests/test_train.py -q --durations=10
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoint
import tinystories
import train
from model import ModelArgs, Transformer
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 300

# A tiny model and short runs: one step is a few ms on 2 cores.
TINY = ["--preset=micro", f"--vocab_size={VOCAB}", "--max_seq_len=64", "--batch_size=8",
        "--eval_iters=3", "--log_interval=1", "--warmup_iters=5", "--lr_decay_iters=100",
        "--learning_rate=3e-3", "--min_lr=3e-4"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and a busy 2-core box makes two threads spin-wait."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


ENV1 = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same for the subprocesses


def write_stories(folder: Path, n: int, seed: int) -> None:
    """A jsonl folder of short template stories: enough structure for a tiny model to learn."""
    import random

    r = random.Random(seed)
    names = ["Lily", "Tom", "Ben", "Mia", "Sam", "Anna", "Max", "Sue"]
    animals = ["cat", "dog", "bird", "fish", "frog", "bear", "duck", "fox"]
    things = ["ball", "kite", "box", "hat", "cake", "tree", "boat", "book"]
    moods = ["happy", "sad", "sleepy", "hungry", "brave", "shy"]
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "data00.jsonl", "w", encoding="utf-8") as f:
        for _ in range(n):
            who, a, t, m = r.choice(names), r.choice(animals), r.choice(things), r.choice(moods)
            story = (f"Once upon a time, there was a little {a} named {who}. {who} had a red {t}. "
                     f"One day, {who} felt {m}. The {a} played with the {t} all day. "
                     f"At night, {who} went to sleep next to the {t}. The end.")
            f.write(json.dumps({"text": story}) + "\n")


def make_shards(root: Path, *, n_stories: int, vocab_size: int, seed: int = 0) -> Path:
    """tinystories.py train_vocab + pretokenize into root; returns root/tok<vocab_size>."""
    src = root / "src"
    write_stories(src, n_stories, seed)
    common = [f"--data_root={root}", f"--data_dir={src}", f"--vocab_size={vocab_size}"]
    # character_coverage=1.0: every character of this small alphabet gets a piece.
    assert tinystories.main(["train_vocab", *common, "--character_coverage=1.0"]) == 0
    assert tinystories.main(["pretokenize", *common, "--workers=1", "--val_fraction=0.05"]) == 0
    return root / f"tok{vocab_size}"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    d = make_shards(tmp_path_factory.mktemp("data"), n_stories=1200, vocab_size=VOCAB)
    assert (d / "train_000.bin").is_file() and (d / "val.bin").is_file()
    assert d.with_suffix(".model").is_file()  # train.py checks the shards against it
    return d


def read_log(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def train_losses(out_dir: Path) -> dict[int, float]:
    """Per-step losses; train.read_log skips a torn last line and lets a re-logged step's later record win."""
    return {r["iter"]: r["loss"] for r in train.read_log(out_dir / "log.jsonl") if r["type"] == "train"}


def start_endless_training(data_dir: Path, out_dir: Path, *, min_steps: int, stdout=subprocess.PIPE,
                           poll: float = 0.01) -> subprocess.Popen:
    """train.py in a subprocess that would run for ever, returned once it has logged min_steps
    steps (within 60 s); the caller stops it."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *TINY, f"--data_dir={data_dir}",
                             f"--out_dir={out_dir}", "--max_iters=1000000", "--eval_interval=1000000"],
                            cwd=ROOT, stdout=stdout, stderr=subprocess.PIPE, text=True, env=ENV1)
    deadline = time.time() + 60
    try:
        while not ((out_dir / "log.jsonl").exists() and len(train_losses(out_dir)) >= min_steps):
            assert time.time() < deadline and proc.poll() is None
            time.sleep(poll)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


def run_train(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=ENV1, **kw)


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


# ----------------------------------------------------------------------------------------------
# configuration

def test_seed_command_line_parses_with_llama2c_names():
    argv = ("--vocab_source=custom --vocab_size=5000 --batch_size=128 --n_layers=6 --n_heads=6 "
            "--n_kv_heads=6 --max_seq_len=256 --gradient_accumulation_steps=4 --max_iters=100000").split()
    cfg = train.build_config(train.parse_overrides(argv))
    assert (cfg.vocab_size, cfg.batch_size, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.max_seq_len,
            cfg.gradient_accumulation_steps, cfg.max_iters) == (5000, 128, 6, 6, 6, 256, 4, 100000)
    assert train.resolve_data_dir(cfg) == tinystories.DEFAULT_DATA_ROOT / "tok5000"
    # Every llama2.c option name exists with the same meaning.
    for key in ("batch_size max_iters eval_interval eval_iters log_interval out_dir learning_rate "
                "warmup_iters dim n_layers n_heads n_kv_heads multiple_of dropout max_seq_len vocab_source "
                "vocab_size init_from compile device dtype wandb_log weight_decay beta1 beta2 grad_clip "
                "decay_lr min_lr lr_decay_iters always_save_checkpoint eval_only "
                "gradient_accumulation_steps").split():
        assert key in train.config_types(), key


def test_overrides_are_typed_and_presets_apply_first():
    o = train.parse_overrides(["--dim=64", "--preset=tiny", "--dropout=0.25", "--compile=Yes",
                               "--decay_lr=0", "--out_dir=x=y"])
    assert o == {"dim": 64, "preset": "tiny", "dropout": 0.25, "compile": True, "decay_lr": False,
                 "out_dir": "x=y"}
    cfg = train.build_config(o)
    # The preset's shape and training defaults, except what was given explicitly.
    assert cfg.dim == 64 and cfg.n_layers == 4
    assert cfg.vocab_size == train.PRESETS["tiny"]["vocab_size"] != train.TrainConfig().vocab_size
    assert cfg.batch_size == train.TRAIN_PRESETS["tiny"]["batch_size"]
    for name in train.PRESETS:  # every preset builds a valid config
        train.check_config(train.build_config({"preset": name}))


def test_every_model_field_is_a_config_field():
    types = train.config_types()
    for name in train.MODEL_FIELDS:
        assert name in types, name
    args = train.model_args_of(train.build_config({"preset": "gqa"})).resolved()
    assert args == ModelArgs(**train.PRESETS["gqa"]).resolved()


@pytest.mark.parametrize("argv, message", [
    (["--bogus=1"], "unknown option --bogus; valid: --out_dir,"),
    (["--compile=maybe"], "--compile=maybe: not a valid bool (use true/false"),
    (["--decay_lr="], "not a valid bool"),
    (["--max_iters=1e3x"], "--max_iters=1e3x: not a valid int"),
    (["--learning_rate=fast"], "not a valid float"),
    (["--max_iters"], "--max_iters needs a value"),
    (["max_iters=10"], "options are --key=value"),
    (["--preset=huge"], "unknown preset 'huge'"),
    (["--vocab_source=llama2"], "this project trains its own vocab"),
    (["--dim=30", "--n_heads=4"], "dim=30 is not divisible by n_heads=4"),
    (["--init_from=pretrained"], "init_from='pretrained' must be scratch or resume"),
])
def test_bad_options_give_one_line_errors(argv, message, capsys, tmp_path):
    assert train.main([*argv, f"--out_dir={tmp_path}"]) == 2  # a usage error
    err = capsys.readouterr().err
    assert message in err and err.startswith("train.py: error:") and err.count("\n") == 1, err


def test_cli_error_exit_status_without_traceback():
    p = run_train(["--nope=3"])
    assert p.returncode == 2
    assert "unknown option --nope" in p.stderr and "Traceback" not in p.stderr


def test_lr_schedule_warmup_cosine_floor():
    cfg = train.TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110, max_iters=200)
    assert train.lr_at(0, cfg) == pytest.approx(0.1)
    assert train.lr_at(9, cfg) == pytest.approx(1.0)
    assert train.lr_at(10, cfg) == pytest.approx(1.0)
    assert train.lr_at(60, cfg) == pytest.approx(0.55)  # halfway down the cosine
    assert train.lr_at(110, cfg) == train.lr_at(199, cfg) == pytest.approx(0.1)
    lrs = [train.lr_at(i, cfg) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert train.lr_at(5, train.TrainConfig(decay_lr=False, learning_rate=0.3)) == 0.3


# ----------------------------------------------------------------------------------------------
# learning

def test_small_model_overfits_one_batch():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=32))
    x = torch.randint(0, 64, (4, 33))
    inputs, targets = x[:, :-1], x[:, 1:]
    opt = model.configure_optimizers(weight_decay=0.0, learning_rate=1e-2, betas=(0.9, 0.95), device_type="cpu")
    for _ in range(80):
        _, loss = model(inputs, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, loss.item()  # from ln(64) = 4.16 for random tokens


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    rc = train.main([*TINY, f"--data_dir={shards}", f"--out_dir={out}", "--max_iters=40", "--eval_interval=20"])
    assert rc == 0
    return out


def test_loss_goes_down_on_real_shards(trained):
    evals = [r for r in read_log(trained) if r["type"] == "eval"]
    assert [r["iter"] for r in evals] == [0, 20, 40]
    assert evals[0]["val_loss"] == pytest.approx(torch.log(torch.tensor(float(VOCAB))).item(), abs=0.3)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.5, evals
    losses = train_losses(trained)
    assert sorted(losses) == list(range(40))
    assert sum(losses[i] for i in range(35, 40)) < sum(losses[i] for i in range(5)) - 5 * 1.5
    recs = [r for r in read_log(trained) if r["type"] == "train"]
    assert recs[-1]["tokens"] == 40 * 8 * 64  # steps * batch_size * max_seq_len * gradient_accumulation_steps (1)
    assert all(r["tok_per_s"] > 0 and r["lr"] > 0 for r in recs)


def test_checkpoint_contents(trained, shards):
    for name in ("ckpt.pt", "best.pt"):
        ckpt = checkpoint.load(trained / name)
        assert ckpt["format"] == checkpoint.CKPT_FORMAT and ckpt["version"] == checkpoint.CKPT_VERSION
        assert ckpt["iter_num"] == 40 and ckpt["data"]["step"] == 40
        assert ckpt["data"]["instruct"] is None  # plain data; export.py reads data.instruct.lang
        assert ckpt["config"]["max_iters"] == 40 and ckpt["model_args"]["dim"] == 32
        assert ckpt["best_val_loss"] < 5.0 and ckpt["optimizer"]["state"]
        assert set(ckpt["rng"][0]) == {"python", "numpy", "torch", "cuda"}
        assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    model, ckpt = checkpoint.model_from_checkpoint(trained / "ckpt.pt")
    x, y = tinystories.TokenBatches(shards, "val", 4, 64, seed=5).get(0)
    _, loss = model(x, y)
    assert loss.item() < 5.0
    assert not list(trained.glob(".*.tmp*"))


def test_plot_draws_png_from_real_log(trained, capsys):
    assert train.main(["plot", str(trained)]) == 0
    png = trained / "loss.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    import matplotlib.image

    h, w = matplotlib.image.imread(str(png)).shape[:2]
    assert (w, h) == (900, 500)
    assert train.main(["plot", str(trained / "nothing")]) == 1
    assert "no training log" in capsys.readouterr().err


def test_save_then_resume_reproduces_next_step_loss(shards, tmp_path):
    common = [*TINY, f"--data_dir={shards}", "--dropout=0.1", "--gradient_accumulation_steps=2"]
    assert train.main([*common, f"--out_dir={tmp_path / 'a'}", "--max_iters=8", "--eval_interval=3"]) == 0
    assert train.main([*common, f"--out_dir={tmp_path / 'b'}", "--max_iters=6", "--eval_interval=3"]) == 0
    assert train.main(["--init_from=resume", f"--out_dir={tmp_path / 'b'}", "--max_iters=8"]) == 0
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert b[6] == a[6] and b[7] == a[7]  # exactly: same data, RNG (dropout) and optimizer state
    wa, wb = weights(tmp_path / "a" / "ckpt.pt"), weights(tmp_path / "b" / "ckpt.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ----------------------------------------------------------------------------------------------
# processes: DDP and SIGKILL

def test_ddp_two_processes_match_one_process_with_accumulation(shards, tmp_path):
    common = [*TINY, f"--data_dir={shards}", "--max_iters=6", "--eval_interval=3",
              "--gradient_accumulation_steps=2"]  # 1 process x 2 micro-batches == 2 ranks x 1
    assert train.main([*common, f"--out_dir={tmp_path / 'one'}"]) == 0
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "train.py"), *common, f"--out_dir={tmp_path / 'two'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env=ENV1)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "world size 2, grad accum 1/process" in p.stdout
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(6))
    for i in one:
        assert two[i] == pytest.approx(one[i], rel=1e-5, abs=1e-6), (i, one[i], two[i])
    ev1 = [r for r in read_log(tmp_path / "one") if r["type"] == "eval"]
    ev2 = [r for r in read_log(tmp_path / "two") if r["type"] == "eval"]
    for r1, r2 in zip(ev1, ev2, strict=True):
        assert r2["val_loss"] == pytest.approx(r1["val_loss"], rel=1e-5)
    w1, w2 = weights(tmp_path / "one" / "ckpt.pt"), weights(tmp_path / "two" / "ckpt.pt")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)


def test_ddp_accumulation_must_divide_by_world_size(shards, tmp_path):
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "train.py"), *TINY, f"--data_dir={shards}", "--gradient_accumulation_steps=3",
                        f"--out_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=ENV1)
    assert p.returncode != 0
    assert "gradient_accumulation_steps=3 is not divisible by the world size 2" in p.stderr
    # torchrun prints its own ChildFailedError traceback; none may come from train.py.
    assert 'train.py", line' not in p.stderr


def test_sigkill_then_resume_equals_uninterrupted_run(shards, tmp_path):
    common = [*TINY, f"--data_dir={shards}", "--dropout=0.1", "--eval_interval=5", "--log_interval=1"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *common, f"--out_dir={killed}",
                             "--max_iters=100000"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=ENV1)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            done = train_losses(killed) if (killed / "log.jsonl").exists() else {}
            # A checkpoint exists and training has moved past it (the save at 5 precedes step 5).
            if (killed / "ckpt.pt").exists() and done and max(done) >= 7:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.005)
        else:
            pytest.fail("training never got past its first checkpoint")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    saved_at = checkpoint.load(killed / "ckpt.pt")["iter_num"]
    assert 5 <= saved_at < 30 and saved_at % 5 == 0
    assert max(train_losses(killed)) >= saved_at  # it was killed after moving on

    p = run_train(["--init_from=resume", f"--out_dir={killed}", "--max_iters=30"])
    assert p.returncode == 0, p.stderr
    assert f"resuming at iter {saved_at}" in p.stdout
    p = run_train([*common, f"--out_dir={tmp_path / 'whole'}", "--max_iters=30"])
    assert p.returncode == 0, p.stderr
    wk, ww = weights(killed / "ckpt.pt"), weights(tmp_path / "whole" / "ckpt.pt")
    assert wk.keys() == ww.keys()
    for k in wk:
        assert torch.equal(wk[k], ww[k]), k
    assert train_losses(killed) == train_losses(tmp_path / "whole")  # later records win per iter
    assert not list(killed.glob(".*.tmp*"))  # a temp file left by the kill is cleaned on resume


SAVER = """
import sys, torch, checkpoint
path = sys.argv[1]
i = 1
while True:
    # ~32 MB per save, so a kill often lands while the file is being written
    checkpoint.save(path, {"i": i, "x": torch.full((8_000_000,), float(i))})
    print(i, flush=True)
    i += 1
"""


def test_sigkill_during_save_never_leaves_a_broken_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    for delay in (0.0, 0.03, 0.11):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], cwd=ROOT, stdout=subprocess.PIPE,
                                text=True, env=ENV1)
        try:
            assert proc.stdout.readline().strip() != ""  # at least one save completed
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        obj = torch.load(path, weights_only=True)
        assert obj["x"].numel() == 8_000_000 and bool((obj["x"] == obj["i"]).all())


# ----------------------------------------------------------------------------------------------
# user errors: one line, exit status 1

def test_vocab_size_mismatch_with_data(shards, tmp_path, capsys):
    assert train.main([*TINY, f"--data_dir={shards}", "--vocab_size=512", f"--out_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert f"shards have vocab_size {VOCAB} but the model has vocab_size 512" in err and str(shards) in err


def test_tokenizer_mismatch_with_data(shards, tmp_path, capsys):
    other = make_shards(tmp_path / "other", n_stories=200, vocab_size=320, seed=1)
    args = [*TINY, f"--data_dir={shards}", f"--out_dir={tmp_path / 'out'}"]
    assert train.main([*args, f"--tokenizer={other.with_suffix('.model')}"]) == 1
    assert f"tokenizer has vocab_size 320 but the shards in {shards} have {VOCAB}" in capsys.readouterr().err
    # Same vocab size, different pieces: caught by the tokenizer hash in the shard headers.
    same_size = make_shards(tmp_path / "same", n_stories=300, vocab_size=VOCAB, seed=2)
    h_same, h_ours = (Tokenizer(str(p.with_suffix(".model"))).hash() for p in (same_size, shards))
    assert h_same != h_ours
    assert train.main([*args, f"--tokenizer={same_size.with_suffix('.model')}"]) == 1
    assert "tokenizer hash" in capsys.readouterr().err


def test_data_too_short(shards, tmp_path, capsys):
    assert train.main([*TINY, f"--data_dir={shards}", "--batch_size=100000", f"--out_dir={tmp_path}"]) == 1
    assert "fewer than one batch of batch_size=100000" in capsys.readouterr().err
    assert train.main([*TINY, f"--data_dir={shards}", "--max_seq_len=400000", f"--out_dir={tmp_path}"]) == 1
    assert "fewer than one window" in capsys.readouterr().err
    assert train.main([*TINY, f"--data_dir={tmp_path / 'none'}", f"--out_dir={tmp_path}"]) == 1
    assert "data folder not found" in capsys.readouterr().err


def test_unwritable_out_dir(shards, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert train.main([*TINY, f"--data_dir={shards}", f"--out_dir={blocker / 'out'}"]) == 1
    err = capsys.readouterr().err
    assert f"out_dir {blocker / 'out'} is not writable" in err and err.count("\n") == 1


def test_resume_errors(trained, tmp_path, capsys):
    assert train.main(["--init_from=resume", f"--out_dir={tmp_path / 'empty'}"]) == 1
    assert "ckpt.pt: checkpoint not found" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    data = (trained / "ckpt.pt").read_bytes()
    (broken / "ckpt.pt").write_bytes(data[: len(data) // 2])
    p = run_train(["--init_from=resume", f"--out_dir={broken}"])
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert f"{broken / 'ckpt.pt'}: corrupt or unreadable checkpoint" in p.stderr
    # Architecture comes from the checkpoint; changing it is an error, repeating it is fine.
    assert train.main(["--init_from=resume", f"--out_dir={trained}", "--dim=64"]) == 2
    assert "cannot change the architecture on resume" in capsys.readouterr().err
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "ckpt.pt").write_bytes(data)
    assert train.main(["--init_from=resume", f"--out_dir={copy}", "--dim=32", "--eval_only=true",
                       "--eval_iters=1"]) == 0
    last = read_log(copy)[-1]
    assert last["type"] == "eval" and last["iter"] == 40


# ----------------------------------------------------------------------------------------------
# stopping early: time budget and SIGTERM both save a checkpoint that resumes

def test_max_seconds_stops_and_saves(shards, tmp_path, capsys):
    t0 = time.time()
    assert train.main([*TINY, f"--data_dir={shards}", f"--out_dir={tmp_path}", "--max_iters=1000000",
                       "--eval_interval=1000000", "--max_seconds=1.5"]) == 0
    assert time.time() - t0 < 30
    assert "stopped after max_seconds=1.5" in capsys.readouterr().out
    ckpt = checkpoint.load(tmp_path / "ckpt.pt")
    steps = train_losses(tmp_path)
    assert ckpt["iter_num"] == max(steps) + 1 > 1
    assert read_log(tmp_path)[-1]["type"] == "eval"  # final evaluation before the save
    # The first command line again plus --init_from=resume: the preset only checks the shape
    # (with the explicit --vocab_size winning over micro's 512, as it did then).
    assert train.main([*TINY, f"--data_dir={shards}", f"--out_dir={tmp_path}", "--init_from=resume",
                       "--eval_only=1"]) == 0
    assert train.main(["--init_from=resume", "--preset=tiny", f"--out_dir={tmp_path}"]) == 2
    assert "--dim=128: cannot change the architecture on resume" in capsys.readouterr().err


def test_sigterm_stops_gracefully_with_a_checkpoint(shards, tmp_path):
    proc = start_endless_training(shards, tmp_path, min_steps=3)
    try:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err  # saved, but not finished: `&&` stops
    assert f"stopped by signal {int(signal.SIGTERM)}" in out
    assert checkpoint.load(tmp_path / "ckpt.pt")["iter_num"] == max(train_losses(tmp_path)) + 1


def test_wandb_only_when_asked_and_installed(capsys, tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here; this checks the message for when it is not")
    assert train.main(["--wandb_log=true", f"--out_dir={tmp_path}"]) == 1
    assert "--wandb_log=true but wandb is not installed" in capsys.readouterr().err
    assert "wandb" not in sys.modules  # never imported unless asked


def test_log_survives_a_torn_last_line_and_resumed_steps(tmp_path, capsys):
    rec = {"type": "train", "iter": 0, "tokens": 64, "loss": 5.0, "lr": 1e-3, "ms": 1.0, "tok_per_s": 64.0}
    (tmp_path / "log.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps({**rec, "iter": 1})[:30])
    log = train.RunLog(tmp_path, enabled=True)
    log.record({**rec, "iter": 1, "loss": 4.0}, "iter 1")  # the resumed run logs step 1 again
    log.record({**rec, "iter": 0, "loss": 4.5}, "iter 0")
    assert capsys.readouterr().out == "iter 1\niter 0\n"
    recs = train.read_log(tmp_path / "log.jsonl")
    assert [(r["iter"], r["loss"]) for r in recs] == [(0, 4.5), (1, 4.0)]
    assert train.main(["plot", str(tmp_path)]) == 0
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages for a machine without a GPU")
@pytest.mark.parametrize("argv, message, status", [
    (["--device=cuda"], "--device=cuda: no CUDA GPU is available", 1),
    (["--dtype=float16", "--device=cpu"], "--dtype=float16 is not supported on cpu", 2),
    (["--device=tpu"], "--device=tpu: must be auto, cpu, cuda, cuda:N or mps", 2),
])
def test_device_and_dtype_errors_on_cpu(argv, message, status, shards, tmp_path, capsys):
    assert train.main([*TINY, f"--data_dir={shards}", f"--out_dir={tmp_path}", *argv]) == status
    assert message in capsys.readouterr().err


def test_foreign_checkpoint_is_rejected(tmp_path, capsys):
    torch.save({"model": {}, "model_args": {}, "iter_num": 0}, tmp_path / "ckpt.pt")  # e.g. nanoGPT's layout
    assert train.main(["--init_from=resume", f"--out_dir={tmp_path}"]) == 1
    assert "ckpt.pt: not a train.py checkpoint" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# instruct data: masked instruction targets, the checkpoint's data.instruct record

def test_loss_leaves_out_ignored_targets():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=64, max_seq_len=16))
    x = torch.randint(0, 64, (2, 16))
    y = torch.randint(0, 64, (2, 16))
    logits, full = model(x, y)
    keep = torch.rand(2, 16) < 0.5
    _, part = model(x, torch.where(keep, y, torch.full_like(y, -1)))
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 64)[keep.reshape(-1)], y.reshape(-1)[keep.reshape(-1)])
    assert part.item() == pytest.approx(want.item(), rel=1e-5) and part.item() != pytest.approx(full.item())
    _, none = model(x, torch.full_like(y, -1))
    assert none.item() == 0.0  # not NaN


def test_instruct_shards_train_resume_and_record(tmp_path):
    src = tmp_path / "src"
    write_stories(src, 600, 1)
    lines = (src / "data00.jsonl").read_text().splitlines()
    with open(src / "data00.jsonl", "w") as f:  # give each story instruct fields it really has
        for line in lines:
            text = json.loads(line)["text"]
            words = [w for w in text.replace(".", "").split() if len(w) > 3][:3]
            f.write(json.dumps({"text": text, "words": words, "summary": text.split(". ")[0] + "."}) + "\n")
    common = [f"--data_root={tmp_path}", f"--data_dir={src}", f"--vocab_size={VOCAB}"]
    assert tinystories.main(["train_vocab", *common, "--character_coverage=1.0"]) == 0
    assert tinystories.main(["pretokenize", *common, "--workers=1", "--val_fraction=0.05", "--instruct=true",
                             "--instruct_lang=en", "--instruct_share=0.5"]) == 0
    data = tmp_path / f"tok{VOCAB}"
    tb = tinystories.TokenBatches(data, "train", 8, 64, seed=0)
    assert tb.mask_instructions and int((tb.get(0)[1] == -1).sum()) > 0
    args = [*TINY, f"--data_dir={data}", "--dropout=0.1", "--eval_interval=3"]
    assert train.main([*args, f"--out_dir={tmp_path / 'a'}", "--max_iters=6"]) == 0
    assert train.main([*args, f"--out_dir={tmp_path / 'b'}", "--max_iters=3"]) == 0
    assert train.main(["--init_from=resume", f"--out_dir={tmp_path / 'b'}", "--max_iters=6"]) == 0
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert [b[i] for i in (3, 4, 5)] == [a[i] for i in (3, 4, 5)]  # exact resume on masked data
    ckpt = checkpoint.load(tmp_path / "a" / "ckpt.pt")
    assert ckpt["data"]["instruct"] == {"lang": "en", "share": 0.5, "loss_on_instruction": False,
                                        "max_tokens": 128}
