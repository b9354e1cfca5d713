"""The READMEs and the manual (docs/*.md) stay true to what runs: CI runs the README's test command,
every script, stage, option, make target and ./run flag they show exists, every file they cite or
link to exists, the README's file map names functions that are in its files, every error message
the troubleshooting table quotes is one the code can print, and no file of the project cites a
path outside it."""

import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
READMES = [ROOT / "README.md", ROOT / "README.zh.md"]
MANUAL = sorted((ROOT / "docs").glob("*.md"))
DOCS = READMES + MANUAL
DOC_ID = lambda p: str(p.relative_to(ROOT))  # noqa: E731


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


def spellings(key: str) -> set[str]:
    """options.py reads `-` as `_` in option names, so either spelling names the same option."""
    return {key, key.replace("-", "_"), key.replace("_", "-")}


@pytest.mark.parametrize("readme", DOCS, ids=DOC_ID)
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
                assert any(f"--{k}" in text or k in text.split() for k in spellings(key)), \
                    f"{readme.name}: `{' '.join(words)}` uses --{key}, which `{' '.join(argv)} --help` does not list"
        checked += 1
    if readme in READMES:
        assert checked >= 10, f"{readme.name}: only {checked} python commands found; did the parser break?"


@pytest.mark.parametrize("readme", DOCS, ids=DOC_ID)
def test_make_targets_and_run_flags_exist(readme):
    makefile = (ROOT / "Makefile").read_text()
    targets = {t for line in re.findall(r"^([A-Za-z_][\w. -]*):", makefile, flags=re.M) for t in line.split()}
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
        # The `PROG: error: ` / `run: ` prefix is put in front by each program's one error printer.
        m = re.match(r"^([\w.]+): (?:error: )?", msg)
        if m and ((ROOT / m.group(1)).exists() or m.group(1) == "run"):
            msg = msg[m.end():]
        pieces = [p.strip(" :;,") for p in re.split(r"\b(?:N|M|PATH)\b|\.\.\.", msg)]
        pieces = [p for p in pieces if len(p) >= 12]
        assert pieces, f"nothing checkable in {msg!r}"
        for p in pieces:
            assert p in sources, f"troubleshooting quotes {msg!r}, but {p!r} is not in the code"


# ----------------------------------------------------------------------------------------------
# cited files, links and the file map


def slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    out, in_block = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_block = not in_block
        elif not in_block and re.match(r"^#{1,6} ", line):
            out.add(slug(line.lstrip("#")))
    return out


def prose(path: Path) -> str:
    """The markdown outside fenced code blocks."""
    return re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)


TRACKED = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()


def test_the_manual_exists():
    names = {p.name for p in MANUAL}
    for want in ("formats.md", "engine.md", "data.md", "training.md", "evaluation.md", "testing.md", "export.md"):
        assert want in names, f"docs/{want} is missing"


@pytest.mark.parametrize("doc", DOCS, ids=DOC_ID)
def test_links_point_at_files_and_headings_that_exist(doc):
    checked = 0
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(doc)):
        if re.match(r"^[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        assert dest.exists(), f"{DOC_ID(doc)} links to {target}, but {file} does not exist"
        assert ROOT in dest.parents or dest == ROOT, f"{DOC_ID(doc)} links outside the project: {target}"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), \
                f"{DOC_ID(doc)} links to {target}, but {dest.name} has no heading with that anchor"
        checked += 1
    if doc.name == "README.md":
        assert checked >= 8, f"only {checked} links found in README.md; did the parser break?"


@pytest.mark.parametrize("doc", DOCS, ids=DOC_ID)
def test_cited_project_files_exist(doc):
    """A path in backticks that names a project file (under tests/, docs/, prompts/, .ci/, or a
    source or top-level document by its bare name) must exist. Outputs (data/, out/, ckpt.pt,
    report.md ...) and patterns (<N>, *) are not files of the project and are not checked."""
    basenames = {Path(t).name for t in TRACKED}
    for token in re.findall(r"`([^`\s]+)`", doc.read_text(encoding="utf-8")):
        token = token.rstrip(".,:;")
        if re.search(r"[<>*{}$]", token) or "=" in token:
            continue
        if re.match(r"^(tests|docs|prompts|\.ci)/", token):
            assert (ROOT / token).exists(), f"{DOC_ID(doc)} cites {token}, which does not exist"
        elif re.fullmatch(r"[\w-]+\.(py|c|h)", token) or re.fullmatch(r"[A-Z][A-Z_.-]*\.md", token):
            assert token in basenames, f"{DOC_ID(doc)} cites {token}, which is not a file of the project"


def test_file_map_names_what_is_in_each_file():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## File map", 1)[1].split("\n## ", 1)[0]
    c_sources = "\n".join(p.read_text(encoding="utf-8") for p in [*ROOT.glob("*.c"), *ROOT.glob("*.h")])
    rows = [r for r in section.splitlines() if r.startswith("| `")]
    assert len(rows) >= 15, f"only {len(rows)} rows in the file map"
    mapped = set()
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        files = re.findall(r"`([^`]+)`", cells[0])
        for f in files:
            if f in ("data/", "out/"):  # generated, git-ignored
                continue
            assert (ROOT / f).exists(), f"the file map lists {f}, which does not exist"
            mapped.add(f.rstrip("/"))
        if len(cells) < 3 or len(files) != 1:
            continue
        source = c_sources if files[0].endswith(".c") else (ROOT / files[0]).read_text(encoding="utf-8") \
            if (ROOT / files[0]).is_file() else ""
        for name in re.findall(r"`([A-Za-z_]\w*)`", cells[2]):
            assert re.search(rf"\b(def|class) {name}\b|^{name}\b\s*[:=]|\b{name}\(", source, flags=re.M), \
                f"the file map points at {name} in {files[0]}, which does not define it"
    for f in TRACKED:
        top = f.split("/", 1)[0]
        if "/" not in f and (f.endswith((".py", ".c", ".h")) or f in ("Makefile",)):
            assert top in mapped, f"{f} is a top-level file the README's file map does not name"


def test_no_file_cites_formats_md_or_a_path_outside_the_project():
    banned = ["FORMATS" + ".md", "../" + "shared", "/work/" + "shared"]
    for f in TRACKED:
        path = ROOT / f
        if not path.is_file() or path.suffix not in (".md", ".py", ".c", ".h", ".txt", ""):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for b in banned:
            assert b not in text, f"{f} cites {b}; the file formats are specified in docs/formats.md"


def test_the_chinese_readme_translates_the_english_one():
    """README.zh.md is a full translation: the same sections, tables and commands."""
    en, zh = (p.read_text(encoding="utf-8") for p in READMES)
    count = lambda text, pattern: len(re.findall(pattern, text, flags=re.M))  # noqa: E731
    assert count(en, r"^## ") == count(zh, r"^## "), "README.zh.md has other sections than README.md"
    assert count(en, r"^\|") == count(zh, r"^\|"), "README.zh.md's tables have other rows than README.md's"
    assert code_lines(READMES[0]) == code_lines(READMES[1]), "README.zh.md shows other commands than README.md"
