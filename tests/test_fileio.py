"""fileio.py: atomic outputs, temporaries swept after a kill, one line for a full disk."""

import errno
import os
import subprocess
import sys

import pytest

import fileio
from options import UserError


def _full_disk(f):
    f.write(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_leaves_the_old_file_and_no_temporary(tmp_path):
    out = tmp_path / "model.bin"
    out.write_bytes(b"old")
    with pytest.raises(UserError, match=f"^{out}: no space left on device$"):
        fileio.atomic_write(out, _full_disk)
    assert out.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.bin"]


def test_outputs_get_the_usual_permissions(tmp_path):
    fileio.write_text(tmp_path / "a.txt", "hi")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_folder_replaces_the_old_one_only_when_complete(tmp_path):
    final = tmp_path / "tok512"
    with fileio.atomic_dir(final) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with fileio.atomic_dir(final) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("killed halfway")
    assert sorted(os.listdir(final)) == ["a"]
    assert sorted(os.listdir(tmp_path)) == ["tok512"]


def test_sweep_removes_what_dead_processes_left_and_only_that(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / f".model.bin.tmp-{dead}").write_bytes(b"x")
    (tmp_path / f".synth.tmp-{dead}").mkdir()
    mine = tmp_path / f".ckpt.pt.tmp-{os.getpid()}"
    mine.write_bytes(b"y")
    (tmp_path / "keep.tmp-1").write_bytes(b"z")  # not our naming: never touched
    removed = fileio.sweep_stale(tmp_path)
    assert sorted(p.name for p in removed) == sorted([f".model.bin.tmp-{dead}", f".synth.tmp-{dead}"])
    assert sorted(os.listdir(tmp_path)) == sorted([mine.name, "keep.tmp-1"])
