"""`--key=value` command-line options typed by a dataclass: the one parser every script uses.

    --key=value      the value converted by the field's type (bool: true/false, 1/0, yes/no)
    --key value      the same, as llama2.c's docs write it (when the next word is not an option)
    --flag           a bool option on its own means true
    --some-key=...   hyphens read as underscores

One positional word may fill a named field (export.py's output path). Every problem raises
OptionError, a ValueError whose message is one line naming the option; each script reports it
its own way. Kept free of torch so that the data stages start fast.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Optional

BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class OptionError(ValueError):
    pass


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
