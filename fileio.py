"""Writing files so that a kill or a full disk never leaves a half-written output: the one home
for temporary names, atomic replacement, and sweeping up after a killed run.

Every output is first written to a hidden temporary beside it, named `.NAME.tmp-PID` (a folder
the same way), then renamed over NAME in one step. A run that is killed leaves only such a
temporary; the next run of any stage that writes into that folder calls sweep_stale(), which
removes the temporaries whose process is gone. The temporaries of a live process are left alone,
so two stages can share a folder.

A failed write (full disk, permissions) removes the temporary and raises UserError
`PATH: reason`, which options.cli() prints as `PROG: error: PATH: no space left on device`.
Kept free of torch so that the data stages start fast.
"""

from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Union

from options import UserError, find_os_error, os_error_text

PathLike = Union[str, "os.PathLike[str]"]
# `.NAME.tmp-PID`, optionally with a `.N` counter when one process writes the same name twice.
TEMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)(?:\.\d+)?$")


def temp_path(path: PathLike) -> Path:
    """The hidden temporary beside path that this process writes before renaming it into place."""
    p = Path(path)
    return p.with_name(f".{p.name}.tmp-{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep_stale(folder: PathLike) -> list[Path]:
    """Remove the temporaries in folder (not below it) left by processes that no longer run."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        m = TEMP_RE.match(entry.name)
        if not m or _pid_alive(int(m.group("pid"))):
            continue
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except FileNotFoundError:  # another process swept it first
            pass
    return removed


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


def _as_user_error(path: Path, e: BaseException) -> UserError | None:
    """UserError `PATH: reason` for an OSError in e's chain, naming the output the user asked
    for rather than our hidden temporary."""
    err = find_os_error(e)
    if err is None:
        return None
    if err.filename is not None and os.fspath(err.filename) == str(temp_path(path)):
        err.filename = None
    return UserError(os_error_text(err, path))


def make_parent(path: PathLike) -> None:
    """Create path's folder, or UserError naming path when that is impossible."""
    folder = Path(os.path.abspath(path)).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{path}: cannot write here ({folder} is not a folder)") from None
    except OSError as e:
        raise UserError(f"{path}: cannot create folder {folder} ({os_error_text(e).split(': ')[-1]})") from None


def atomic_write(path: PathLike, write_body: Callable, *, mode: str = "wb", fsync: bool = True) -> None:
    """Run write_body(f) on temp_path(path), then rename it onto path.

    On any failure (an exception, Ctrl-C) the temporary is removed and path is left as it was;
    a failed write raises UserError `PATH: reason`."""
    path = Path(path)
    make_parent(path)
    tmp = temp_path(path)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write_body(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        _remove(tmp)
        err = _as_user_error(path, e) if isinstance(e, Exception) else None
        if err is not None:
            raise err from None
        raise


def write_bytes(path: PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def write_text(path: PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


@contextmanager
def atomic_dir(final: PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder; when the block ends normally it replaces final (the old
    folder is removed only after the swap). On failure the temporary is removed."""
    final = Path(final)
    make_parent(final)
    tmp = temp_path(final)
    _remove(tmp)
    try:
        tmp.mkdir()
        yield tmp
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.tmp-{os.getpid()}.1")  # swept if we die here
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            _remove(old)
    except BaseException as e:
        _remove(tmp)
        _raise_as_user_error(e, final, tmp, final)


@contextmanager
def scratch_dir(beside: PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder named temp_path(beside), removed when the block ends however
    it ends (work files that never become an output; sweep_stale finds it after a kill)."""
    tmp = temp_path(beside)
    make_parent(tmp)
    _remove(tmp)
    try:
        tmp.mkdir()
        yield tmp
    except BaseException as e:  # a full disk is reported for the folder beside, not the scratch
        _raise_as_user_error(e, tmp.parent, tmp, tmp.parent)
    finally:
        _remove(tmp)


def _raise_as_user_error(e: BaseException, path: Path, tmp: Path, shown: Path):
    """Re-raise e; an Exception with an OSError in its chain (or a UserError) as UserError
    `PATH: reason`, path naming the file when the error does not and any file under the
    temporary folder tmp named as under shown."""
    if isinstance(e, Exception):
        err = e if isinstance(e, UserError) else _as_user_error(path, e)
        if err is not None:
            raise type(err)(str(err).replace(str(tmp), str(shown))) from None
    raise e


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
