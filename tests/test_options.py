"""options.py: the `--key=value` parser every script shares."""

from dataclasses import dataclass

import pytest

from options import OptionError, apply_options, field_kinds, parse_options


@dataclass
class Cfg:
    out: str = ""
    steps: int = 10
    temperature: float = 1.0
    legacy: bool = False
    data_dir: str = "data"


def test_kinds_come_from_the_annotations():
    assert field_kinds(Cfg) == {"out": "str", "steps": "int", "temperature": "float", "legacy": "bool",
                                "data_dir": "str"}


def test_forms_of_an_option():
    got = parse_options(Cfg, ["--steps=5", "--temperature", "0.5", "--data-dir=x=y", "--legacy"])
    assert got == {"steps": 5, "temperature": 0.5, "data_dir": "x=y", "legacy": True}
    assert list(got) == ["steps", "temperature", "data_dir", "legacy"]  # the order given
    assert parse_options(Cfg, ["--legacy", "no", "--steps=1", "--steps=2"]) == {"legacy": False, "steps": 2}
    assert parse_options(Cfg, ["--temperature=-1e-3"]) == {"temperature": -0.001}
    for word, value in (("true", True), ("YES", True), ("1", True), ("false", False), ("No", False), ("0", False)):
        assert parse_options(Cfg, [f"--legacy={word}"]) == {"legacy": value}


def test_positional_word():
    cfg = apply_options(Cfg(), ["model.bin", "--legacy", "--steps", "3"], positional="out")
    assert (cfg.out, cfg.legacy, cfg.steps) == ("model.bin", True, 3)
    # a bare bool before the positional word does not swallow it
    cfg = apply_options(Cfg(), ["--legacy", "model.bin"], positional="out")
    assert (cfg.out, cfg.legacy) == ("model.bin", True)
    with pytest.raises(OptionError, match="unexpected argument 'two': options are --key=value"):
        apply_options(Cfg(), ["one", "two"], positional="out")


@pytest.mark.parametrize("argv, message", [
    (["--stpes=3"], "unknown option --stpes; valid: --out, --steps, --temperature, --legacy, --data_dir"),
    (["--steps"], "--steps needs a value: --steps=..."),
    (["--steps", "--legacy"], "--steps needs a value"),
    (["--steps=3.5"], "--steps=3.5: not a valid int"),
    (["--temperature=hot"], "--temperature=hot: not a valid float"),
    (["--legacy=maybe"], "--legacy=maybe: not a valid bool (use true/false, 1/0 or yes/no)"),
    (["--legacy="], "not a valid bool"),
    (["steps=3"], "unexpected argument 'steps=3': options are --key=value"),
])
def test_errors_are_one_line_and_name_the_option(argv, message):
    with pytest.raises(OptionError) as e:
        parse_options(Cfg, argv)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_valid_list_spelling_and_positional_left_out():
    with pytest.raises(OptionError, match="valid: --steps, --temperature, --legacy, --data-dir$"):
        parse_options(Cfg, ["--nope=1"], positional="out", spell="-")


# ---- the error and help contract every script shares (options.cli, render_help) ----

import errno
import signal

from options import OptionError as _OptionError, Terminated, UserError, cli, opt, render_help


@dataclass
class Helped:
    out: str = opt("", "where to write")
    steps: int = opt(10, "how many steps")
    legacy: bool = opt(False, "write the old format")


def test_help_is_rendered_from_the_fields():
    text = render_help(Helped, "python x.py OUT [--key=value ...]", "Does x.", positional="out")
    assert text.splitlines()[:2] == ["usage: python x.py OUT [--key=value ...]", "Does x."]
    assert "--steps=10" in text and "(int) how many steps" in text
    assert "--legacy=false" in text and "(bool) write the old format" in text
    assert "--out=" not in text  # the positional word is in the usage line instead


def _raise(e):
    def body():
        raise e
    return body


@pytest.mark.parametrize("error, status, line", [
    (_OptionError("--steps=x: not a valid int"), 2, "prog: error: --steps=x: not a valid int"),
    (UserError("data/x.bin: truncated"), 1, "prog: error: data/x.bin: truncated"),
    (OSError(errno.ENOSPC, "No space left on device", "out/ckpt.pt"), 1,
     "prog: error: out/ckpt.pt: no space left on device"),
    (KeyboardInterrupt(), 130, "prog: interrupted"),
    (Terminated(), 143, "prog: terminated"),
])
def test_one_line_and_the_exit_status(capsys, error, status, line):
    assert cli("prog", _raise(error)) == status
    assert capsys.readouterr().err == line + "\n"


def test_an_os_error_wrapped_by_another_is_still_one_line(capsys):
    def body():
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos")
    assert cli("prog", body) == 1
    assert capsys.readouterr().err == "prog: error: no space left on device\n"


def test_a_bug_is_not_hidden():
    with pytest.raises(ZeroDivisionError):
        cli("prog", lambda: 1 / 0)


def test_sigterm_becomes_exit_143(capsys):
    def body():
        signal.raise_signal(signal.SIGTERM)
    assert cli("prog", body) == 143
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored afterwards
