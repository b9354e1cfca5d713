"""`--key=value` command-line options typed by a dataclass: the one parser every script uses.

    --key=value      the value converted by the field's type (bool: true/false, 1/0, yes/no)
    --key value      the same, as llama2.c's docs write it (when the next word is not an option)
    --flag           a bool option on its own means true
    --some-key=...   hyphens read as underscores

One positional word may fill a named field (export.py's output path). Every problem raises
OptionError, a ValueError whose message is one line naming the option.

It is also the one error and help contract of every script (docs/formats.md has the files):
  - opt(default, "help") declares a field and its one-line help; render_help() prints them all;
  - UserError is a problem the user can fix; cli() prints it as `PROG: error: message`;
  - exit 2 for a usage error (OptionError), 1 for everything else, 130 after Ctrl-C and 143 after
    SIGTERM, so that `train && export` stops when a step did not finish.
Kept free of torch so that the data stages start fast.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
import sys
import typing
from typing import Callable, Optional

BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class UserError(Exception):
    """A problem the user can fix (bad input, a missing file, a full disk): one line, exit 1."""


class OptionError(UserError, ValueError):
    """A bad command line: one line naming the option, exit 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is so that cleanup (finally, temp files) runs."""


def opt(default, help: str):
    """A config field with its one-line help, shown by render_help()."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def render_help(cls, usage: str, summary: str = "", *, positional: Optional[str] = None,
                epilog: str = "") -> str:
    """`--help` text from a dataclass: each field as --name=default (type) and its help."""
    kinds = field_kinds(cls)
    lines = [f"usage: {usage}"] + ([summary.strip()] if summary else []) + ["", "options:"]
    for f in dataclasses.fields(cls):
        if f.name == positional:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = str(default).lower() if kinds[f.name] == "bool" else default
        lines.append(f"  {f'--{f.name}={shown}':<32} ({kinds[f.name]}) {f.metadata.get('help', '')}".rstrip())
    if epilog:
        lines += ["", epilog.strip()]
    return "\n".join(lines)


def find_os_error(e: Optional[BaseException]) -> Optional[OSError]:
    """The OSError in e's chain, if any (torch.save wraps a full disk in a RuntimeError whose
    context is the OSError)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and (e.errno or e.strerror):
            return e
        e = e.__cause__ or e.__context__
    return None


def os_error_text(e: BaseException, path=None) -> Optional[str]:
    """`PATH: reason` for an OSError in e's chain, else None; path names the file when the
    error itself does not (a failed write() does not)."""
    err = find_os_error(e)
    if err is None:
        return None
    reason = "no space left on device" if err.errno == errno.ENOSPC else (err.strerror or str(err))
    reason = reason[:1].lower() + reason[1:]
    where = err.filename if err.filename is not None else path
    return f"{where}: {reason}" if where is not None else reason


def _raise_terminated(signum, frame):
    raise Terminated()


def cli(prog: str, body: Callable[[], Optional[int]], *, quiet: bool = False) -> int:
    """Run a script's body under the contract above; returns the exit status.

    quiet silences the messages (train.py's ranks other than 0 under torchrun)."""
    def say(msg: str) -> None:
        if not quiet:
            print(f"{prog}: {msg}", file=sys.stderr, flush=True)
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        return body() or 0
    except OptionError as e:
        say(f"error: {e}")
        return 2
    except UserError as e:
        say(f"error: {e}")
        return 1
    except Terminated:
        say("terminated")
        return 143
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except Exception as e:  # OSError (full disk, permissions), possibly wrapped: one line, no traceback
        text = os_error_text(e)
        if text is None:
            raise
        say(f"error: {text}")
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def field_kinds(cls) -> dict[str, str]:
    """Field name -> "bool", "int", "float" or "str" for a dataclass (or an instance of one)."""
    hints = typing.get_type_hints(cls if isinstance(cls, type) else type(cls))
    kinds = {}
    for f in dataclasses.fields(cls):
        t = hints.get(f.name, str)
        kinds[f.name] = "bool" if t is bool else "int" if t is int else "float" if t is float else "str"
    return kinds


def convert(key: str, raw: str, kind: str):
    """One option's text as its field's type; OptionError naming the option if it does not fit."""
    try:
        if kind == "bool":
            return BOOL_WORDS[raw.strip().lower()]
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except (KeyError, ValueError):
        hint = " (use true/false, 1/0 or yes/no)" if kind == "bool" else ""
        raise OptionError(f"--{key}={raw}: not a valid {kind}{hint}") from None
    return raw


def parse_options(cls, argv: list[str], *, positional: Optional[str] = None, spell: str = "_") -> dict:
    """argv -> {field: typed value}, in the order given (later repeats win).

    positional names the field one bare word may fill; spell ("_" or "-") is how the list of
    valid options in an unknown-option error writes the names."""
    kinds = field_kinds(cls)
    out = {}
    seen_positional = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--"):
            if positional and not seen_positional:
                out[positional] = arg
                seen_positional = True
                continue
            raise OptionError(f"unexpected argument {arg!r}: options are --key=value")
        key, eq, raw = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in kinds:
            valid = ", ".join("--" + k.replace("_", spell) for k in kinds if k != positional)
            raise OptionError(f"unknown option --{key}; valid: {valid}")
        if not eq:
            nxt = argv[i] if i < len(argv) else None
            if kinds[key] == "bool" and (nxt is None or nxt.strip().lower() not in BOOL_WORDS):
                raw = "true"  # `--flag` alone
            elif nxt is not None and not nxt.startswith("--"):
                raw = nxt
                i += 1
            else:
                raise OptionError(f"--{key} needs a value: --{key}=...")
        out[key] = convert(key, raw, kinds[key])
    return out


def apply_options(cfg, argv: list[str], **kw):
    """cfg (a dataclass instance) with the options in argv set on it; returns cfg."""
    for key, value in parse_options(cfg, argv, **kw).items():
        setattr(cfg, key, value)
    return cfg
