"""Recovery after a kill: SIGKILL a stage while it writes, then check that no file under a final
name differs from an uninterrupted run's, that a re-run sweeps the killed run's temporaries, and
that the re-run's output is byte-identical (issue 14, item 3).

Shared helpers first (kill_when, snapshot, temporaries, the kill points and kill_matrix, which
runs a whole matrix for any command writing under one folder); each stage's cases follow in a
section of their own: the data stages of tinystories.py, then export.py.
"""

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fileio  # noqa: E402

ENV1 = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # 2 cores shared: one thread each
LOCK_RE = re.compile(r"^\..+\.lock$")  # FolderLock files: a killed run's is taken over, not compared


# ----------------------------------------------------------------------------------------------
# shared helpers

def temporaries(folder: Path) -> list[str]:
    """fileio's temporaries (`.NAME.tmp-PID`) anywhere under folder, as paths relative to it."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if fileio.TEMP_RE.match(p.name))


def snapshot(folder: Path, *, ignore: Callable[[Path], bool] = lambda p: False) -> dict[str, bytes]:
    """Every regular file under folder that is not a temporary (nor inside one), a lock file or
    named by ignore(): relative path -> bytes."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if any(fileio.TEMP_RE.match(part) for part in rel.parts) or LOCK_RE.match(p.name) or ignore(p):
            continue
        if p.is_file():
            out[str(rel)] = p.read_bytes()
    return out


def kill_when(argv: list[str], ready, *, timeout: float = 120.0, env: Optional[dict] = None) -> bool:
    """Start argv in a process group of its own, SIGKILL the whole group (spawned workers too) as
    soon as ready(pid) is true; False when it ended first (too fast to catch)."""
    proc = subprocess.Popen(argv, cwd=ROOT, env=env or ENV1, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if ready(proc.pid):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                _wait_group_gone(proc.pid)
                return True
            if time.monotonic() > deadline:
                raise AssertionError(f"{argv}: neither finished nor reached the kill point in {timeout} s")
            time.sleep(0.0005)
        assert proc.returncode == 0, f"{argv}: exit {proc.returncode} before the kill point"
        return False
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_group_gone(pgid: int, timeout: float = 5.0) -> None:
    """Until no process of the group is left (orphaned workers die a moment after their parent)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.005)


def assert_final_names_match(folder: Path, reference: dict[str, bytes], **kw) -> None:
    """After a kill: every file under a final name is the uninterrupted run's, byte for byte."""
    for name, data in snapshot(folder, **kw).items():
        assert name in reference and data == reference[name], f"{folder / name} differs from an uninterrupted run"


def exists(pattern: str) -> Callable[[Path], bool]:
    """A kill point: some path under the folder matches the glob pattern."""
    return lambda folder: next(folder.glob(pattern), None) is not None


def at_least(pattern: str, n: int) -> Callable[[Path], bool]:
    """A kill point: at least n paths under the folder match the glob pattern."""
    return lambda folder: sum(1 for _ in folder.glob(pattern)) >= n


def grown(pattern: str, nbytes: int) -> Callable[[Path], bool]:
    """A kill point: a file matching the glob pattern holds at least nbytes."""
    def ready(folder: Path) -> bool:
        for p in folder.glob(pattern):
            try:
                if p.stat().st_size >= nbytes:
                    return True
            except FileNotFoundError:  # renamed meanwhile
                pass
        return False
    return ready


def kill_matrix(tmp_path: Path, argv: Callable[[Path], list[str]], points: list, *,
                prepare: Callable[[Path], None] = lambda folder: None,
                rerun: Optional[Callable[[Path], None]] = None,
                ignore: Callable[[Path], bool] = lambda p: False, env: Optional[dict] = None) -> int:
    """Run argv(folder) (arguments to python) to the end once, then once per kill point, killed
    when point(folder) holds; check each killed folder, re-run it (rerun(folder), or argv again),
    and check the re-run as the module docstring says. Returns how many runs were really killed."""
    def run(folder: Path) -> None:
        subprocess.run([sys.executable, *argv(folder)], cwd=ROOT, env=env or ENV1, check=True,
                       capture_output=True, timeout=120)
    clean_folder = tmp_path / "clean"
    prepare(clean_folder)
    run(clean_folder)
    reference = snapshot(clean_folder, ignore=ignore)
    assert reference and not temporaries(clean_folder)
    killed = 0
    for i, point in enumerate(points):
        folder = tmp_path / f"kill{i}"
        prepare(folder)
        killed += kill_when([sys.executable, *argv(folder)], lambda pid: point(folder), env=env)
        assert_final_names_match(folder, reference, ignore=ignore)
        (rerun or run)(folder)
        assert temporaries(folder) == [], f"point {i}"
        assert not [p for p in folder.rglob("*") if LOCK_RE.match(p.name)], f"point {i}: a lock file is left"
        assert snapshot(folder, ignore=ignore) == reference, f"point {i}: the re-run's files differ"
    return killed


# ----------------------------------------------------------------------------------------------
# tinystories.py: synth, train_vocab, pretokenize, download

import storygen  # noqa: E402
import tinystories as ts  # noqa: E402
from test_download import ZH_PATH, hub, make_archive  # noqa: E402,F401 (hub is a fixture)

TS = str(ROOT / "tinystories.py")
VOCAB = 300


def in_process(argv: Callable[[Path], list[str]]) -> Callable[[Path], None]:
    """A re-run through ts.main in this process (saves an interpreter start per point)."""
    def rerun(folder: Path) -> None:
        assert ts.main(argv(folder)[1:]) == 0
    return rerun


@pytest.fixture(scope="module")
def stories(tmp_path_factory) -> Path:
    """The built-in corpus, 3000 stories in 6 files: the source of train_vocab and pretokenize."""
    root = tmp_path_factory.mktemp("corpus")
    assert ts.main(["synth", f"--data_root={root}", "--n_stories=3000", "--shard_size=500"]) == 0
    return root / "synth"


@pytest.fixture(scope="module")
def tokenizer_files(stories, tmp_path_factory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("tok")
    assert ts.main(["train_vocab", f"--data_root={root}", f"--data_dir={stories}", f"--vocab_size={VOCAB}"]) == 0
    return snapshot(root)


def test_synth_killed_anywhere_recovers(tmp_path):
    def argv(root):
        return [TS, "synth", f"--data_root={root}", "--n_stories=3000", "--shard_size=500"]
    points = [exists(".synth.tmp-*"), at_least(".synth.tmp-*/data*.jsonl", 2),
              at_least(".synth.tmp-*/data*.jsonl", 5), exists(".synth.tmp-*/.complete"),
              exists("synth/.complete")]
    assert kill_matrix(tmp_path, argv, points, rerun=in_process(argv)) >= 3


def test_train_vocab_killed_anywhere_recovers(tmp_path, stories):
    def argv(root):
        return [TS, "train_vocab", f"--data_root={root}", f"--data_dir={stories}", f"--vocab_size={VOCAB}"]
    scratch = f".tok{VOCAB}.train.tmp-*"
    points = [exists(scratch), grown(f"{scratch}/input.txt", 200_000), exists(f"{scratch}/tok{VOCAB}.model"),
              exists(f"tok{VOCAB}.vocab"), exists(f"tok{VOCAB}.model"), exists(f"tok{VOCAB}.bin")]
    assert kill_matrix(tmp_path, argv, points, rerun=in_process(argv)) >= 2


def test_pretokenize_killed_anywhere_recovers(tmp_path, stories, tokenizer_files):
    def argv(root):
        return [TS, "pretokenize", f"--data_root={root}", f"--data_dir={stories}", f"--vocab_size={VOCAB}",
                "--workers=2"]

    def prepare(root):
        for rel, data in tokenizer_files.items():
            fileio.write_bytes(root / rel, data)

    def rerun(root):  # one worker: the same shards, without spawning two interpreters again
        assert ts.main([*argv(root)[1:-1], "--workers=1"]) == 0
    tmp = f".tok{VOCAB}.tmp-*"
    points = [exists(f"{tmp}/.train_*.bin.tmp-*"), at_least(f"{tmp}/train_*.bin", 3),
              exists(f"{tmp}/val.bin"), exists(f"tok{VOCAB}/meta.json")]
    assert kill_matrix(tmp_path, argv, points, prepare=prepare, rerun=rerun) >= 2


def test_download_killed_anywhere_recovers(tmp_path, hub):
    stories_zh = [storygen.story(5, i) for i in range(1500)]
    archive = make_archive([({"name": "TinyStories_all_data_zh", "type": tarfile.DIRTYPE}, None)] + [
        ({"name": f"TinyStories_all_data_zh/data{i:02d}_zh.jsonl"},
         "".join(json.dumps({"story_zh": s}, ensure_ascii=False) + "\n" for s in shard).encode())
        for i, shard in enumerate([stories_zh[:750], stories_zh[750:]])])
    hub.files[ZH_PATH] = archive
    hub.chunk_delay = 0.001  # 1 KiB a millisecond: about 0.3 s for the whole archive

    def argv(root):
        return [TS, "download", f"--data_root={root}", "--backoff=0", "--timeout=10"]
    part = "TinyStories_all_data_zh.tar.gz.part"
    points = [exists(part), grown(part, len(archive) // 2), exists("TinyStories_all_data_zh.tar.gz"),
              exists(".zh.tmp-*"), exists("zh/TinyStories_all_data_zh/data01_zh.jsonl")]
    # .part is the resumable partial download: kept on purpose, and only ever a prefix of the file
    killed = kill_matrix(tmp_path, argv, points, rerun=in_process(argv), env={**ENV1, "HF_ENDPOINT": hub.endpoint},
                         ignore=lambda p: p.name.endswith(".part") and archive.startswith(p.read_bytes()))
    assert killed >= 2


# ----------------------------------------------------------------------------------------------
# export.py: fp32, int8, Hugging Face and GGUF

from test_export import save_checkpoint, train_tokenizer  # noqa: E402

# Large enough (about 43 MB in fp32) that writing takes a measurable time to kill into.
BIG = dict(dim=384, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=400, max_seq_len=64)


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    import torch

    from model import ModelArgs, Transformer
    folder = tmp_path_factory.mktemp("kill_export")
    torch.manual_seed(0)
    tok = train_tokenizer(folder / "tok", normalization_rule_name="identity", remove_extra_whitespaces=False,
                          add_dummy_prefix=True)
    ckpt = folder / "ckpt.pt"
    save_checkpoint(Transformer(ModelArgs(**BIG)), ckpt, tokenizer=tok)
    return ckpt, tok


# (case, output name, options, kill point): "open" as soon as the output's temporary exists,
# "half" once it holds half the final size (mid-body), for the .bin files.
EXPORTS = {
    "fp32-open": ("m.bin", ["--version=3"], "open"),
    "fp32-half": ("m.bin", ["--version=3"], "half"),
    "int8-half": ("m_q8.bin", ["--version=3", "--dtype=int8"], "half"),
    "hf": ("hf", ["--version=-1"], "open"),
    "gguf": ("m.gguf", ["--version=gguf", "--dtype=q8_0"], "open"),
}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """The uninterrupted export's files for (output name, argv), made once per module."""
    import export
    made = {}

    def get(name: str, argv: tuple) -> dict[str, bytes]:
        if (name, argv) not in made:
            folder = tmp_path_factory.mktemp("ref")
            assert export.main([str(folder / name), *argv]) == 0
            made[name, argv] = snapshot(folder)
        return made[name, argv]
    return get


@pytest.mark.parametrize("case", list(EXPORTS))
def test_export_killed_while_writing_recovers(case, big_checkpoint, references, tmp_path, capsys):
    import export
    ckpt, tok = big_checkpoint
    name, options, point = EXPORTS[case]
    argv = [f"--checkpoint={ckpt}", f"--tokenizer={tok}", *options]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    reference = references(name, tuple(argv))
    size = len(reference.get(name, b""))

    def ready(pid: int) -> bool:
        tmp = out_dir / f".{name}.tmp-{pid}"
        try:
            return tmp.stat().st_size >= size // 2 if point == "half" else tmp.exists()
        except FileNotFoundError:
            return False

    for _ in range(3):  # a scheduler hiccup can let the export finish first; try again
        if kill_when([sys.executable, str(ROOT / "export.py"), str(out_dir / name), *argv], ready):
            break
        for p in out_dir.iterdir():
            fileio._remove(p)
    else:
        pytest.fail(f"{case}: never caught export.py while it wrote {name}")
    assert temporaries(out_dir), "the kill left no temporary: it came too late to test anything"
    assert_final_names_match(out_dir, reference)
    assert export.main([str(out_dir / name), *argv]) == 0, capsys.readouterr().err
    assert temporaries(out_dir) == [] and temporaries(tmp_path) == []
    assert snapshot(out_dir) == reference


# ----------------------------------------------------------------------------------------------
# train.py: SIGKILL mid-loop (then the same command again) and during a checkpoint save (then a
# resume); either way the run ends as an uninterrupted one does (exact resume, test_train.py)

import test_train  # noqa: E402
from test_train import shards  # noqa: E402,F401 (the fixture)

# Big enough (about 10 MB with the optimizer state) that a save takes long enough to kill into.
KILL_TRAIN = [*test_train.TINY, "--dim=128", "--n_layers=4", "--n_heads=4", "--n_kv_heads=4", "--dropout=0.1",
              "--eval_interval=5", "--max_iters=15"]


@pytest.fixture(scope="module")
def train_reference(shards, tmp_path_factory) -> Path:
    """The out_dir of an uninterrupted KILL_TRAIN run."""
    out = tmp_path_factory.mktemp("train_reference")
    p = test_train.run_train([*KILL_TRAIN, f"--data_dir={shards}", f"--out_dir={out}"])
    assert p.returncode == 0, p.stderr
    return out


def assert_same_run(out: Path, reference: Path) -> None:
    """The same loss at every step and evaluation (later records win), and the same final weights."""
    import torch

    import train
    assert test_train.train_losses(out) == test_train.train_losses(reference)
    evals = [{(r["iter"], r["val_loss"]) for r in train.read_log(d / "log.jsonl") if r["type"] == "eval"}
             for d in (out, reference)]
    assert evals[0] == evals[1]
    for name in ("ckpt.pt", "best.pt"):
        got, want = test_train.weights(out / name), test_train.weights(reference / name)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), name


def kill_train(out: Path, shards: Path, ready: Callable[[int], bool]) -> None:
    argv = [sys.executable, str(ROOT / "train.py"), *KILL_TRAIN, f"--data_dir={shards}", f"--out_dir={out}"]
    for _ in range(3):  # a scheduler hiccup can let the run pass the kill point; try again
        if kill_when(argv, ready):
            return
        for p in out.iterdir():
            fileio._remove(p)
    pytest.fail("never caught train.py at the kill point")


def test_train_killed_mid_loop_then_rerun_equals_an_uninterrupted_run(shards, train_reference, tmp_path):
    out = tmp_path / "out"

    def ready(pid: int) -> bool:  # a few steps logged, no checkpoint yet
        try:
            return (out / "log.jsonl").read_bytes().count(b"\n") >= 3 and not (out / "ckpt.pt").exists()
        except FileNotFoundError:
            return False

    kill_train(out, shards, ready)
    assert not (out / "ckpt.pt").exists()
    p = test_train.run_train([*KILL_TRAIN, f"--data_dir={shards}", f"--out_dir={out}"])  # the same command
    assert p.returncode == 0, p.stderr
    assert temporaries(out) == [] and not (out / ".lock").exists()
    assert_same_run(out, train_reference)


def test_train_killed_while_saving_then_resumed_equals_an_uninterrupted_run(shards, train_reference, tmp_path):
    import checkpoint
    out = tmp_path / "out"

    def ready(pid: int) -> bool:  # ckpt.pt's temporary being written, an earlier ckpt.pt in place
        return (out / f".ckpt.pt.tmp-{pid}").exists() and (out / "ckpt.pt").exists()

    kill_train(out, shards, ready)
    assert [t for t in temporaries(out) if t.startswith(".ckpt.pt.tmp-")], temporaries(out)
    saved_at = checkpoint.load(out / "ckpt.pt")["iter_num"]  # the earlier file, whole
    assert saved_at in (5, 10)
    p = test_train.run_train(["--init_from=resume", f"--out_dir={out}"])
    assert p.returncode == 0, p.stderr
    assert f"resuming at iter {saved_at}" in p.stdout
    assert temporaries(out) == [] and not (out / ".lock").exists()
    assert_same_run(out, train_reference)
