"""The READMEs stay true to what runs: CI runs the README's test command, every script, stage,
option, make target and ./run flag a README shows exists, and every error message the
troubleshooting table quotes is one the code can print."""

import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
READMES = [ROOT / "README.md", ROOT / "README.zh.md"]


def code_lines(path: Path) -> list[str]:
    """Shell lines from the ```bash / ```sh blocks of a markdown file, continuations joined."""
    lines, in_block, lang = [], False, ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        if raw.startswith("```"):
            in_block, lang = (not in_block), raw[3:].strip()
            continue
        if in_block and lang in ("bash", "sh"):
            line = raw.split(" #")[0].rstrip() if not raw.lstrip().startswith("#") else ""
            if lines and lines[-1].endswith("\\"):
                lines[-1] = lines[-1][:-1] + " " + line.strip()
            elif line:
                lines.append(line.strip())
    return lines


def commands(path: Path) -> list[list[str]]:
    """Each simple command of each code line, split like a shell would (&&, ; and env prefixes)."""
    out = []
    for line in code_lines(path):
        for part in re.split(r"&&|;|\|\|", line):
            words = shlex.split(part)
            while words and re.match(r"^[A-Z_]+=", words[0]):  # VAR=value prefixes
                words = words[1:]
            if words:
                out.append(words)
    return out


@lru_cache(maxsize=None)
def help_text(*argv: str) -> str:
    r = subprocess.run([sys.executable, *argv, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{' '.join(argv)} --help failed: {r.stderr[-500:]}"
    return r.stdout + r.stderr


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    ci_cmds = [l.strip() for l in ci.splitlines() if l.strip() and not l.strip().startswith("#")]
    for readme in READMES:
        shown = code_lines(readme)
        assert any(l.startswith("make demo") for l in shown), f"{readme.name} does not show `make demo`"
        assert any(l.startswith("make test") for l in shown), f"{readme.name} does not show `make test`"
    assert "make test" in ci_cmds, f".ci/run does not run `make test`: {ci_cmds}"


@pytest.mark.parametrize("readme", READMES, ids=lambda p: p.name)
def test_python_commands_use_real_scripts_stages_and_options(readme):
    checked = 0
    for words in commands(readme):
        if words[0] == "torchrun":  # torchrun's own flags come before the script
            words = ["python"] + words[next(i for i, w in enumerate(words) if w.endswith(".py")):]
        if words[0] not in ("python", "python3") or len(words) < 2 or not words[1].endswith(".py"):
            continue
        script = words[1]
        assert (ROOT / script).exists(), f"{readme.name}: {script} does not exist"
        args = words[2:]
        argv = [script]
        if script in ("tinystories.py",) or (script == "train.py" and args[:1] == ["plot"]):
            if script == "tinystories.py":
                assert args and not args[0].startswith("-"), f"{readme.name}: tinystories.py needs a stage"
                argv.append(args[0])
            else:
                continue  # `train.py plot DIR` has no options
        text = help_text(*argv)
        for a in args:
            if a.startswith("--") and a != "--help":
                key = a[2:].split("=", 1)[0]
                assert f"--{key}" in text or f"{key}" in text.split(), \
                    f"{readme.name}: `{' '.join(words)}` uses --{key}, which `{' '.join(argv)} --help` does not list"
        checked += 1
    assert checked >= 10, f"{readme.name}: only {checked} python commands found; did the parser break?"


@pytest.mark.parametrize("readme", READMES, ids=lambda p: p.name)
def test_make_targets_and_run_flags_exist(readme):
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z_][\w.-]*):", makefile, flags=re.M))
    run_c = (ROOT / "run.c").read_text()
    for words in commands(readme):
        if words[0] == "make":
            for t in words[1:]:
                if "=" not in t and not t.startswith("-"):
                    assert t in targets or t == "run", f"{readme.name}: make target {t!r} is not in the Makefile"
        if words[0] == "./run":
            for w in words[1:]:
                if re.fullmatch(r"-[a-z]", w):
                    assert f"'{w[1]}'" in run_c or f'"{w}"' in run_c, f"{readme.name}: ./run flag {w} is not in run.c"


def test_troubleshooting_messages_come_from_the_code():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    sources = "\n".join(p.read_text(encoding="utf-8") for p in
                        [*ROOT.glob("*.py"), ROOT / "run.c", ROOT / "run_tok.c"])
    quoted = [m for row in section.splitlines() if row.startswith("| `")
              for m in re.findall(r"^\| `([^`]+)`", row)]
    assert len(quoted) >= 6
    for msg in quoted:
        # Placeholders (N, M, PATH, ...) stand for values; every literal run of 12+ characters
        # between them must be in the source.
        pieces = [p.strip(" :;,") for p in re.split(r"\b(?:N|M|PATH)\b|\.\.\.", msg)]
        pieces = [p for p in pieces if len(p) >= 12]
        assert pieces, f"nothing checkable in {msg!r}"
        for p in pieces:
            assert p in sources, f"troubleshooting quotes {msg!r}, but {p!r} is not in the code"
