"""Recovery after a kill: SIGKILL a stage while it writes, then check that no file under a final
name differs from an uninterrupted run's, that a re-run sweeps the killed run's temporaries, and
that the re-run's output is byte-identical (issue 14, item 3).

Shared helpers first; each stage's cases follow in a section of their own.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fileio  # noqa: E402

ENV1 = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # 2 cores shared: one thread each


# ----------------------------------------------------------------------------------------------
# shared helpers

def temporaries(folder: Path) -> list[str]:
    """fileio's temporaries (`.NAME.tmp-PID`) anywhere under folder, as paths relative to it."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if fileio.TEMP_RE.match(p.name))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every regular file under folder that is not a temporary: relative path -> bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(fileio.TEMP_RE.match(part) for part in p.relative_to(folder).parts)}


def kill_when(argv: list[str], ready, *, timeout: float = 120.0) -> bool:
    """Start argv, SIGKILL it as soon as ready(pid) is true; False when it ended first (too fast to catch)."""
    proc = subprocess.Popen(argv, cwd=ROOT, env=ENV1, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if ready(proc.pid):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            if time.monotonic() > deadline:
                raise AssertionError(f"{argv}: neither finished nor reached the kill point in {timeout} s")
            time.sleep(0.0005)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def assert_final_names_match(folder: Path, reference: dict[str, bytes]) -> None:
    """After a kill: every file under a final name is the uninterrupted run's, byte for byte."""
    for name, data in snapshot(folder).items():
        assert name in reference and data == reference[name], f"{folder / name} differs from an uninterrupted run"


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
