"""A full disk (ENOSPC) anywhere a stage writes: one line `PROG: error: PATH: no space left on
device`, exit 1, no temporary left, and every earlier file either as it was or complete.

The first section holds the machinery, for any script with an in-process main() (train.py and
export.py cases reuse it): FullDisk, a builtins.open whose writes fail once a byte budget is
spent; assert_full_disk_error; assert_old_or_new; and a real small tmpfs when the tests run as
root and may mount one. The second section is the data stages of tinystories.py and tokenizer.py.
"""

from __future__ import annotations

import builtins
import errno
import os
import re
import subprocess
import sys
import tarfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest

import fileio
import tinystories as ts
import tokenizer
from test_download import ZH_PATH, hub, zh_archive  # noqa: F401 (hub is a fixture)
from test_kill import snapshot, temporaries

ROOT = Path(__file__).resolve().parent.parent
ENOSPC_TEXT = "no space left on device"


# ----------------------------------------------------------------------------------------------
# 1. machinery

class FullDisk:
    """Writes to files for which which(path) holds fail with ENOSPC once budget bytes have been
    written to them all, as on a full disk (the failing write() names no file). Install it with
    FullDisk(monkeypatch, ...); tarfile's own reference to open is replaced too."""

    def __init__(self, monkeypatch, *, which: Callable[[Path], bool] = lambda p: True, budget: int = 0):
        self.which, self.budget, self.failed = which, budget, 0
        real_open = builtins.open

        def fake_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+") and which(Path(file)):
                return _Limited(f, self)
            return f
        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(tarfile, "bltn_open", fake_open)

    def spend(self, n: int) -> None:
        if n > self.budget:
            self.failed += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget -= n


class _Limited:
    """A file object whose write() draws on a FullDisk's budget."""

    def __init__(self, f, disk: FullDisk):
        self._f, self._disk = f, disk

    def write(self, data):
        self._disk.spend(len(data.encode("utf-8")) if isinstance(data, str) else memoryview(data).nbytes)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __iter__(self):
        return iter(self._f)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def assert_full_disk_error(err: str, prog: str, path_pattern: str) -> None:
    """err is exactly one line `PROG: error: PATH: no space left on device`, PATH matching the
    regular expression path_pattern; the rest can only be progress bars (redrawn after \\r)."""
    lines = [seg for seg in re.split(r"[\r\n]", err) if seg.startswith(f"{prog}:")]
    assert len(lines) == 1 and re.fullmatch(rf"{re.escape(prog)}: error: {path_pattern}: {ENOSPC_TEXT}",
                                            lines[0]), err
    assert all("\r" in line or line.startswith(f"{prog}:") for line in err.split("\n") if line), err


def assert_old_or_new(root: Path, before: dict[str, bytes], after: dict[str, bytes]) -> None:
    """Every file under root is as it was (before) or as a finished run writes it (after), and
    no temporary is left."""
    assert not temporaries(root), temporaries(root)
    for rel, data in snapshot(root).items():
        assert data in (before.get(rel), after.get(rel)), f"{rel}: neither the earlier nor a complete file"
    assert before.keys() <= snapshot(root).keys(), "an earlier file was removed"


@contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """folder as a fresh tmpfs of size bytes (mount's size=); skips unless root may mount one."""
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs root to mount a small tmpfs")
    folder.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


# ----------------------------------------------------------------------------------------------
# 2. the data stages

VOCAB = 300


def synth(root: Path, *args: str) -> int:
    return ts.main(["synth", f"--data_root={root}", *args])


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[Path, Path]:
    """Two different built-in corpora (an earlier run's source and a new one)."""
    root = tmp_path_factory.mktemp("sources")
    out = []
    for seed in (1, 2):
        assert synth(root / str(seed), "--n_stories=600", "--shard_size=200", f"--seed={seed}") == 0
        out.append(root / str(seed) / "synth")
    return out[0], out[1]


def stage_files(tmp: Path, stage: str, source: Path, *extra: str) -> dict[str, bytes]:
    """The files train_vocab (and pretokenize, when stage is that) write for source."""
    root = tmp / f"{stage}-{source.parent.name}"
    args = [f"--data_root={root}", f"--data_dir={source}", f"--vocab_size={VOCAB}", *extra]
    assert ts.main(["train_vocab", *args]) == 0
    if stage == "pretokenize":
        assert ts.main(["pretokenize", *args, "--workers=1"]) == 0
    return snapshot(root)


@pytest.fixture(scope="module")
def earlier_and_new(sources, tmp_path_factory):
    """{stage: (files of a run on the first corpus, files of a run on the second)}."""
    tmp = tmp_path_factory.mktemp("runs")
    return {stage: tuple(stage_files(tmp, stage, s) for s in sources) for stage in ("train_vocab", "pretokenize")}


def start_from(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        fileio.write_bytes(root / rel, data)


def test_synth_output(tmp_path, monkeypatch, capsys):
    root = tmp_path / "data"
    assert synth(root, "--n_stories=300", "--shard_size=100", "--seed=1") == 0
    assert synth(tmp_path / "new", "--n_stories=600", "--shard_size=100", "--seed=2") == 0
    before, after = snapshot(root), snapshot(tmp_path / "new")
    capsys.readouterr()
    disk = FullDisk(monkeypatch, which=lambda p: str(root) in str(p), budget=150_000)
    assert synth(root, "--n_stories=600", "--shard_size=100", "--seed=2") == 1
    assert disk.failed == 1
    assert_full_disk_error(capsys.readouterr().err, "tinystories.py synth", rf"{re.escape(str(root))}/synth/data0\d\.jsonl")
    assert_old_or_new(root, before, after)
    assert snapshot(root) == before  # the folder is replaced as a whole or not at all


def temp_of(name: str) -> Callable[[Path], bool]:
    """FullDisk's which: fileio's temporary of the output called name."""
    return lambda p: p.name.startswith(f".{name}.tmp-")


@pytest.mark.parametrize("name, budget", [("input.txt", 20_000), ("tok300.vocab", 100), ("tok300.model", 100),
                                          ("tok300.bin", 100), ("tok300.meta.json", 10)])
def test_train_vocab_outputs(name, budget, tmp_path, sources, earlier_and_new, monkeypatch, capsys):
    before, after = earlier_and_new["train_vocab"]
    root = tmp_path / "data"
    start_from(root, before)
    # sentencepiece's training text lives in a scratch folder: a full disk there names data/
    which, shown = (lambda p: p.name == name, root) if name == "input.txt" else (temp_of(name), root / name)
    disk = FullDisk(monkeypatch, which=which, budget=budget)
    assert ts.main(["train_vocab", f"--data_root={root}", f"--data_dir={sources[1]}", f"--vocab_size={VOCAB}"]) == 1
    assert disk.failed == 1
    assert_full_disk_error(capsys.readouterr().err, "tinystories.py train_vocab", re.escape(str(shown)))
    assert_old_or_new(root, before, after)
    assert snapshot(root)[f"tok{VOCAB}.meta.json"] == before[f"tok{VOCAB}.meta.json"]  # so a re-run trains again


@pytest.mark.parametrize("name, budget", [("train_001.bin", 1000), ("val.bin", 300), ("meta.json", 10)])
def test_pretokenize_outputs(name, budget, tmp_path, sources, earlier_and_new, monkeypatch, capsys):
    before, after = earlier_and_new["pretokenize"]
    root = tmp_path / "data"
    start_from(root, before)
    tok = {rel: data for rel, data in after.items() if not rel.startswith(f"tok{VOCAB}/")}
    start_from(root, tok)  # the new tokenizer, the earlier shards
    before = snapshot(root)
    disk = FullDisk(monkeypatch, which=temp_of(name), budget=budget)
    argv = ["pretokenize", f"--data_root={root}", f"--data_dir={sources[1]}", f"--vocab_size={VOCAB}", "--workers=1"]
    assert ts.main(argv) == 1
    assert disk.failed == 1
    assert_full_disk_error(capsys.readouterr().err, "tinystories.py pretokenize",
                           re.escape(str(root / f"tok{VOCAB}" / name)))
    assert_old_or_new(root, before, after)
    assert snapshot(root) == before  # the shard folder is replaced as a whole or not at all


def test_tokenizer_py_output(tmp_path, earlier_and_new, monkeypatch, capsys):
    """tokenizer.py's own .bin export."""
    before, _ = earlier_and_new["train_vocab"]
    start_from(tmp_path, before)
    model, out = tmp_path / f"tok{VOCAB}.model", tmp_path / "x.bin"
    out.write_bytes(b"earlier")
    FullDisk(monkeypatch, which=temp_of("x.bin"), budget=100)
    assert tokenizer.main([f"--tokenizer_model={model}", f"--output={out}"]) == 1
    assert_full_disk_error(capsys.readouterr().err, "tokenizer.py", re.escape(str(out)))
    assert out.read_bytes() == b"earlier" and not temporaries(tmp_path)


@pytest.mark.parametrize("name, budget", [("TinyStories_all_data_zh.tar.gz.part", 300), ("data01_zh.jsonl", 100),
                                          (".complete", 5)])
def test_download_outputs(name, budget, hub, tmp_path, monkeypatch, capsys):
    """The download itself (.part, which the next run resumes), the extraction, the marker."""
    hub.files[ZH_PATH] = zh_archive()
    root = tmp_path / "data"
    which = (lambda p: p.name == name) if name.endswith(".part") else (
        lambda p: p.name == name or p.name.startswith(f".{name}.tmp-"))
    FullDisk(monkeypatch, which=which, budget=budget)
    assert ts.main(["download", f"--data_root={root}", "--backoff=0", "--timeout=10"]) == 1
    shown = {".part": root / name, ".jsonl": root / "zh", ".complete": root / "zh" / name}
    assert_full_disk_error(capsys.readouterr().err, "tinystories.py download",
                           re.escape(str(next(v for k, v in shown.items() if name.endswith(k)))))
    assert not temporaries(root)
    if name.endswith(".part"):  # what arrived stays, for the next run to resume from
        assert zh_archive().startswith((root / name).read_bytes())


def test_synth_on_a_real_small_tmpfs(tmp_path):
    """The same on a real full disk: a 1 MiB tmpfs, the built-in corpus run as a script."""
    with tmpfs(tmp_path / "disk", "1m") as disk:
        root = disk / "data"
        assert synth(root, "--n_stories=100", "--seed=1") == 0
        before = snapshot(root)
        r = subprocess.run([sys.executable, str(ROOT / "tinystories.py"), "synth", f"--data_root={root}",
                            "--n_stories=3000", "--shard_size=500", "--seed=2"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1
        assert_full_disk_error(r.stderr, "tinystories.py synth", rf"{re.escape(str(root))}/synth/data0\d\.jsonl")
        assert snapshot(root) == before and not temporaries(root)


# ----------------------------------------------------------------------------------------------
# 3. export.py (.bin, Hugging Face safetensors, GGUF and its Modelfile) and evaluate.py's report

import export  # noqa: E402
from test_export import make_model, save_checkpoint, train_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def export_inputs(tmp_path_factory):
    """A checkpoint naming a GGUF-ready tokenizer, and an earlier export of another model in each format."""
    folder = tmp_path_factory.mktemp("export_inputs")
    tok = train_tokenizer(folder / "tok", normalization_rule_name="identity", remove_extra_whitespaces=False,
                          add_dummy_prefix=True)
    ckpt, earlier_ckpt = folder / "ckpt.pt", folder / "earlier.pt"
    save_checkpoint(make_model("tied", seed=1), ckpt, tokenizer=tok)
    save_checkpoint(make_model("tied", seed=2), earlier_ckpt, tokenizer=tok)
    earlier, after = folder / "earlier", folder / "after"
    for name, options in (("m.bin", []), ("hf", ["--version=-1"]), ("m.gguf", ["--version=gguf"])):
        assert export.main([str(earlier / name), f"--checkpoint={earlier_ckpt}", *options]) == 0
        assert export.main([str(after / name), f"--checkpoint={ckpt}", *options]) == 0
    return {"ckpt": ckpt, "earlier": snapshot(earlier), "after": snapshot(after)}


@pytest.mark.parametrize("name, options, which, failing", [
    ("m.bin", [], lambda p: p.name.startswith(".m.bin.tmp-"), "m.bin"),
    ("hf", ["--version=-1"], lambda p: p.name == "model.safetensors", "hf/model.safetensors"),  # staged
    ("hf", ["--version=-1"], lambda p: p.name == "config.json", "hf/config.json"),
    ("m.gguf", ["--version=gguf"], lambda p: p.name.startswith(".m.gguf.tmp-"), "m.gguf"),
    ("m.gguf", ["--version=gguf"], lambda p: p.name.startswith(".Modelfile.tmp-"), "Modelfile"),
], ids=["bin", "safetensors", "hf-config", "gguf", "modelfile"])
def test_export_outputs(name, options, which, failing, export_inputs, tmp_path, monkeypatch, capsys):
    before = {rel: data for rel, data in export_inputs["earlier"].items() if rel.split("/")[0] in (name, "Modelfile")
              and (name == "m.gguf") == (rel in ("m.gguf", "Modelfile"))}
    start_from(tmp_path, before)
    disk = FullDisk(monkeypatch, which=which, budget=100)
    assert export.main([str(tmp_path / name), f"--checkpoint={export_inputs['ckpt']}", *options]) == 1
    assert disk.failed == 1
    assert_full_disk_error(capsys.readouterr().err, "export.py", re.escape(str(tmp_path / failing)))
    assert_old_or_new(tmp_path, before, export_inputs["after"])
    if name != "m.gguf":  # a .bin, and a Hugging Face folder, are replaced whole or not at all
        assert snapshot(tmp_path) == before


def test_evaluate_report(tmp_path, monkeypatch, capsys):
    """The report files: the one that fails names itself, and an earlier report.json stays."""
    import time

    import evaluate
    report = {"reference": {"val_loss": 1.0}, "models": [{"name": "m", "engine": "pytorch", "verdicts": [],
                                                           "val_loss": 1.5}],
              "n_prompts": 1, "n_reference": 1, "corpus": "c", "prompts": ["从前"],
              "config": {"samples": 1, "temperature": 1.0, "steps": 8}}
    out = tmp_path / "eval"
    out.mkdir()
    (out / "report.json").write_text("{}", encoding="utf-8")
    monkeypatch.setattr(evaluate, "evaluate", lambda cfg, many: evaluate.write_outputs(
        Path(cfg.out), report, [], {}, time.time()))
    disk = FullDisk(monkeypatch, which=lambda p: p.name.startswith(".report.json.tmp-"), budget=10)
    assert evaluate.main(["--checkpoint=unused.pt", f"--out={out}"]) == 1
    assert disk.failed == 1
    assert_full_disk_error(capsys.readouterr().err, "evaluate.py", re.escape(str(out / "report.json")))
    assert (out / "report.json").read_text(encoding="utf-8") == "{}" and not temporaries(out)
    assert {"samples.jsonl", "metrics.png"} <= set(os.listdir(out))  # written, whole, before it


def test_export_on_a_real_small_tmpfs(tmp_path, export_inputs):
    """A real full disk: a 1 MiB tmpfs and a 7 MB model, export.py run as a script."""
    ckpt = tmp_path / "big.pt"
    save_checkpoint(make_model("tied", dim=256, n_layers=2, n_heads=4, n_kv_heads=2), ckpt)
    with tmpfs(tmp_path / "disk", "1m") as disk:
        out = disk / "m.bin"
        out.write_bytes(b"earlier")
        r = subprocess.run([sys.executable, str(ROOT / "export.py"), str(out), f"--checkpoint={ckpt}"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1
        assert_full_disk_error(r.stderr, "export.py", re.escape(str(out)))
        assert out.read_bytes() == b"earlier" and not temporaries(disk)


# ----------------------------------------------------------------------------------------------
# 4. train.py: ckpt.pt, best.pt and log.jsonl; the earlier checkpoints stay whole

import checkpoint  # noqa: E402
import test_train  # noqa: E402
import train  # noqa: E402
from test_train import shards  # noqa: E402,F401 (the fixture)

TRAIN_ARGS = [*test_train.TINY, "--eval_interval=5", "--max_iters=15"]


@pytest.mark.parametrize("name", ["ckpt.pt", "best.pt", "log.jsonl"])
def test_train_outputs(name, shards, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    target = out / name
    # Full from the second evaluation (iter 10) on: the first one's ckpt.pt and best.pt are written.
    if name == "log.jsonl":
        disk = FullDisk(monkeypatch, which=lambda p: p == target and (out / "ckpt.pt").exists())
    else:
        disk = FullDisk(monkeypatch, which=lambda p: p == fileio.temp_path(target) and target.exists())
    assert train.main([*TRAIN_ARGS, f"--data_dir={shards}", f"--out_dir={out}"]) == 1
    assert disk.failed >= 1  # torch.save may try once more as it closes the archive
    assert_full_disk_error(capsys.readouterr().err, "train.py", re.escape(str(target)))
    # best.pt fails after ckpt.pt of the same evaluation was saved.
    assert checkpoint.load(out / "ckpt.pt")["iter_num"] == (10 if name == "best.pt" else 5)
    assert checkpoint.load(out / "best.pt")["iter_num"] == 5
    assert not temporaries(out) and not (out / ".lock").exists()


def test_train_on_a_real_small_tmpfs(shards, tmp_path):
    """A real full disk: room for ckpt.pt and best.pt and half a third one, train.py run as a script."""
    first = tmp_path / "first"
    assert train.main([*TRAIN_ARGS, "--max_iters=5", f"--data_dir={shards}", f"--out_dir={first}"]) == 0
    size = (first / "ckpt.pt").stat().st_size
    with tmpfs(tmp_path / "disk", f"{size * 5 // 2 // 1024 + 1}k") as disk:
        p = test_train.run_train([*TRAIN_ARGS, f"--data_dir={shards}", f"--out_dir={disk}"])
        assert p.returncode == 1
        assert_full_disk_error(p.stderr, "train.py", re.escape(str(disk / "ckpt.pt")))
        assert checkpoint.load(disk / "ckpt.pt")["iter_num"] == checkpoint.load(disk / "best.pt")["iter_num"] == 5
        assert not temporaries(disk)
