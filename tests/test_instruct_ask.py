"""Asking for a story: the prompt format in the model header, and sample.py and ./run building the
instruction's prompt byte for byte as instruct.render_prompt (what pretokenize encodes) writes it.

The models are tiny random ones: these tests are about prompts and refusals, not about stories.
"""

import dataclasses
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import checkpoint  # noqa: E402
import export  # noqa: E402
import instruct  # noqa: E402
import sample  # noqa: E402
from model import Transformer, model_args_from_preset  # noqa: E402
from tokenizer import Tokenizer, export_tokenizer  # noqa: E402

VOCAB = 500
TEXTS = [
    "词语：苹果，跑，开心\n特点：对话，寓意\n摘要：小明找到了皮球。\n故事：从前有一个小女孩，她喜欢苹果。",
    "小狗说：“我们一起跑吧！”小猫很开心。从那以后，它们懂得了分享。",
    "Words: apple, run, happy\nFeatures: Dialogue, Twist\nSummary: Tom finds a ball.\nStory: Once upon a time.",
    "Lily ran to the park. Suddenly, she saw a big red apple. \"Look!\" she said.",
]

# (words, features, summary, sentence) as typed: odd spacing, both kinds of comma, 、, any spelling.
REQUESTS = [
    ("苹果,跑，开心", "", "", ""),
    (" 苹果 ， 跑 ,开心 ", "对话, Twist", "", ""),
    ("小猫、皮球", "寓意，坏结局", "小明丢了皮球，后来找到了。", ""),
    ("", "dialogue", "", "她笑了。"),
    ("apple,run , happy", "Dialogue,MoralValue", "Tom finds a ball.", " He smiled. "),
    ("", "", "A cat and a dog  play.", ""),
    ("\u3000苹果\u3000,跑", "BadEnding", "", ""),
]


def save_ckpt(model: Transformer, path: Path, tok_path: str, lang=None) -> Path:
    """A checkpoint in train.py's layout whose data record says whether it learned instructions."""
    data = {"tokenizer_hash": Tokenizer(tok_path).hash(), "vocab_size": VOCAB}
    if lang:
        data["instruct"] = {"lang": lang}
    checkpoint.save(path, {"format": checkpoint.CKPT_FORMAT, "version": checkpoint.CKPT_VERSION,
                           "model": model.state_dict(), "model_args": dataclasses.asdict(model.params),
                           "config": {"tokenizer": tok_path}, "iter_num": 1, "optimizer": {},
                           "best_val_loss": 9.0, "data": data})
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ask")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS * 40), model_prefix=str(folder / "tok"), vocab_size=VOCAB, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        minloglevel=2)
    tok_path = str(folder / "tok.model")
    export_tokenizer(tok_path, str(folder / "tok.bin"))
    torch.manual_seed(0)
    model = Transformer(model_args_from_preset("micro", vocab_size=VOCAB)).eval()
    out = {"tok": tok_path, "tok_bin": folder / "tok.bin", "model": model}
    for lang in ("zh", "en", None):
        name = lang or "plain"
        out[f"{name}_ckpt"] = save_ckpt(model, folder / f"{name}.pt", tok_path, lang)
        bin_path = folder / f"{name}.bin"
        assert export.main([str(bin_path), f"--checkpoint={out[f'{name}_ckpt']}"]) == 0
        out[f"{name}_bin"] = bin_path
    return out


def expected_ids(tok_path: str, request, lang: str) -> list[int]:
    """What pretokenize --instruct=true puts before a story: BOS + encode(prompt)."""
    tok = Tokenizer(tok_path)
    ins = instruct.make_instruction(*request)
    return [tok.bos_id] + spm.SentencePieceProcessor(model_file=tok_path).encode(instruct.render_prompt(ins, lang))


# ----------------------------------------------------------------------------------------------
# the header's prompt_format

def test_export_records_the_prompt_format_at_byte_38(files):
    for name, want in (("zh", 1), ("en", 2), ("plain", 0)):
        data = files[f"{name}_bin"].read_bytes()
        assert (data[38], data[39]) == (want, 0), name
        assert export.read_bin_header(files[f"{name}_bin"]).prompt_format == want
        assert export.load_checkpoint(files[f"{name}_bin"])[1]["prompt_format"] == want
        assert export.load_checkpoint(files[f"{name}_ckpt"])[1]["prompt_format"] == want


def test_an_unknown_prompt_format_is_refused(files, tmp_path):
    bad = tmp_path / "bad.bin"
    data = bytearray(files["zh_bin"].read_bytes())
    data[38] = 7
    bad.write_bytes(bytes(data))
    with pytest.raises(export.ExportError, match="unknown prompt_format 7"):
        export.read_bin_header(bad)
    with pytest.raises(export.ExportError, match="prompt_format"):
        export.write_model_bin(files["model"], tmp_path / "x.bin", version=3, prompt_format=3)


def test_older_versions_say_they_cannot_record_it(files, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "export.py"), str(tmp_path / "v1.bin"), "--version=1",
                        f"--checkpoint={files['zh_ckpt']}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "no prompt_format field" in r.stderr


# ----------------------------------------------------------------------------------------------
# sample.py

def run_sample(capsys, *argv):
    rc = sample.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def flags(request) -> list[str]:
    return [f"--{k}={v}" for k, v in zip(sample.INSTRUCT_OPTIONS, request) if v]


@pytest.mark.parametrize("lang", ["zh", "en"])
@pytest.mark.parametrize("request_", REQUESTS)
def test_sample_builds_the_pretokenized_prompt(files, capsys, lang, request_):
    tok = Tokenizer(files["tok"])
    ins = instruct.make_instruction(*request_)
    text, ids = sample.instruct_prompt_ids(tok, ins, lang, 64)
    assert ids == expected_ids(files["tok"], request_, lang)
    for model in (files[f"{lang}_ckpt"], files[f"{lang}_bin"]):
        rc, out, err = run_sample(capsys, f"--checkpoint={model}", f"--tokenizer={files['tok']}", "--steps=1",
                                  "--temperature=0", *flags(request_))
        assert rc == 0, err
        assert out.startswith(instruct.render_prompt(ins, lang)), out


@pytest.mark.parametrize("argv, needle", [
    (["--words=苹果"], "trained without instructions"),
    (["--features=对话"], "trained without instructions"),
])
def test_sample_refuses_a_plain_model(files, capsys, argv, needle):
    for model in (files["plain_ckpt"], files["plain_bin"]):
        rc, out, err = run_sample(capsys, f"--checkpoint={model}", *argv)
        assert rc == 1 and out == "" and err.count("\n") == 1 and needle in err, err


@pytest.mark.parametrize("argv, needle", [
    (["--words=,， "], "names no word"),
    (["--words="], "names no word"),
    (["--summary= "], "needs at least one of"),
    (["--features=魔法"], "unknown feature"),
    (["--words=苹果", "--prompt=从前"], "do not mix"),
    (["--summary=" + "小猫找到了皮球。" * 30], "no room for a story"),
])
def test_sample_refuses_requests_that_cannot_work(files, capsys, argv, needle):
    rc, out, err = run_sample(capsys, f"--checkpoint={files['zh_ckpt']}", *argv)
    assert rc == 1 and out == "" and err.count("\n") == 1 and needle in err, err


# ----------------------------------------------------------------------------------------------
# ./run -m instruct

@pytest.fixture(scope="module", params=["run", "runsan"])
def run_bin(request, tmp_path_factory) -> Path:
    """The plain build, and the sanitizers' (the request parsing walks UTF-8 by hand)."""
    path = tmp_path_factory.mktemp(request.param) / "run"
    p = subprocess.run(["make", "-s", request.param, f"BIN={path}"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0 and "warning" not in p.stderr, p.stdout + p.stderr
    return path


def run_c(run_bin: Path, model: Path, *args, tok: Path) -> subprocess.CompletedProcess:
    env = {"OMP_NUM_THREADS": "1", "ASAN_OPTIONS": "detect_leaks=1:exitcode=99",
           "UBSAN_OPTIONS": "halt_on_error=1:exitcode=98"}
    return subprocess.run([str(run_bin), str(model), "-z", str(tok), *map(str, args)], capture_output=True,
                          env=env, timeout=120)


def c_flags(request) -> list[str]:
    out = []
    for flag, value in zip(("-w", "-f", "-u", "-x"), request):
        if value:
            out += [flag, value]
    return out


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_run_builds_the_pretokenized_prompt(files, run_bin, lang):
    for request_ in REQUESTS:
        want = expected_ids(files["tok"], request_, lang)
        p = run_c(run_bin, files[f"{lang}_bin"], "-m", "encode", *c_flags(request_), tok=files["tok_bin"])
        assert p.returncode == 0, p.stderr
        assert [Tokenizer(files["tok"]).bos_id] + [int(x) for x in p.stdout.split()] == want, request_
        # -m instruct prints the prompt it built, then the story.
        p = run_c(run_bin, files[f"{lang}_bin"], "-m", "instruct", *c_flags(request_), "-n", "3", "-t", "0",
                  tok=files["tok_bin"])
        assert p.returncode == 0, p.stderr
        ins = instruct.make_instruction(*request_)
        assert p.stdout.decode("utf-8", "replace").startswith(instruct.render_prompt(ins, lang))


def test_run_and_sample_answer_a_request_alike(files, capsys):
    """Greedy: the PyTorch checkpoint and the .bin in C continue the same prompt with the same text."""
    path = files["zh_bin"].parent / "run"
    p = subprocess.run(["make", "-s", "run", f"BIN={path}"], cwd=ROOT, capture_output=True)
    assert p.returncode == 0, p.stderr
    request_ = ("苹果,跑", "对话", "", "")
    rc, out, err = run_sample(capsys, f"--checkpoint={files['zh_ckpt']}", "--steps=12", "--temperature=0",
                              *flags(request_))
    assert rc == 0, err
    c = run_c(path, files["zh_bin"], "-m", "instruct", *c_flags(request_), "-n", "12", "-t", "0", tok=files["tok_bin"])
    assert c.returncode == 0, c.stderr
    assert c.stdout.decode("utf-8") == out


@pytest.mark.parametrize("args, needle", [
    (["-m", "instruct", "-w", "苹果"], "trained without instructions"),
    (["-m", "encode", "-f", "对话"], "trained without instructions"),
])
def test_run_refuses_a_plain_model(files, run_bin, args, needle):
    p = run_c(run_bin, files["plain_bin"], *args, tok=files["tok_bin"])
    err = p.stderr.decode("utf-8")
    assert p.returncode == 1 and p.stdout == b"" and err.count("\n") == 1 and needle in err, err


@pytest.mark.parametrize("args, needle", [
    (["-m", "instruct"], "needs a request"),
    (["-m", "instruct", "-w", ",， 、"], "names no word"),
    (["-m", "instruct", "-u", "  "], "needs a request"),
    (["-m", "instruct", "-f", "魔法"], "unknown feature '魔法'"),
    (["-m", "instruct", "-w", "苹果", "-i", "从前"], "do not mix"),
    (["-m", "instruct", "-u", "一\n二"], "one line"),
    (["-m", "instruct", "-u", "小猫找到了皮球。" * 30], "no room for a story"),
])
def test_run_refuses_requests_that_cannot_work(files, run_bin, args, needle):
    p = run_c(run_bin, files["zh_bin"], *args, tok=files["tok_bin"])
    err = p.stderr.decode("utf-8")
    assert p.returncode == 1 and p.stdout == b"" and err.count("\n") == 1 and needle in err, err


def test_run_wants_instruct_mode_for_a_request_and_a_known_prompt_format(files, run_bin, tmp_path):
    p = run_c(run_bin, files["zh_bin"], "-w", "苹果", tok=files["tok_bin"])
    assert p.returncode == 1 and b"add -m instruct" in p.stderr and p.stdout == b""
    bad = tmp_path / "bad.bin"
    data = bytearray(files["zh_bin"].read_bytes())
    data[38] = 3
    bad.write_bytes(bytes(data))
    p = run_c(run_bin, bad, "-n", "2", tok=files["tok_bin"])
    err = p.stderr.decode("utf-8")
    assert p.returncode == 1 and err.count("\n") == 1 and "unknown prompt_format 3" in err and str(bad) in err


# ----------------------------------------------------------------------------------------------
# pretokenize --instruct=true, sample.py and ./run: the same ids for the same request

def request_of(prompt: str, lang: str) -> tuple[str, str, str, str]:
    """The (words, features, summary, sentence) a rendered prompt asks for, read back by its labels."""
    t = instruct.TEMPLATES[lang]
    fields = dict.fromkeys(instruct.FIELDS, "")
    for line in prompt.split("\n")[:-1]:
        name = next(f for f in instruct.FIELDS if line.startswith(t[f]))
        fields[name] = line[len(t[name]):]
    return tuple(fields[f] for f in instruct.FIELDS)


def test_pretokenized_instructions_are_what_sample_and_run_build(tmp_path, run_bin):
    import numpy as np
    import tinystories as ts
    root, vocab = tmp_path / "data", 600
    assert ts.main(["synth", f"--data_root={root}", "--n_stories=300", "--seed=5"]) == 0
    assert ts.main(["train_vocab", f"--data_root={root}", "--dataset=synth", f"--vocab_size={vocab}"]) == 0
    assert ts.main(["pretokenize", f"--data_root={root}", "--dataset=synth", f"--vocab_size={vocab}", "--workers=1",
                    "--instruct=true", "--instruct_share=1"]) == 0
    tok_path = str(root / f"tok{vocab}.model")
    tok_bin = Path(export_tokenizer(tok_path, str(tmp_path / "tok.bin")))
    tok = Tokenizer(tok_path)
    model = Transformer(model_args_from_preset("micro", vocab_size=vocab, max_seq_len=256)).eval()
    model_bin = tmp_path / "zh.bin"
    export.write_model_bin(model, model_bin, version=3, tokenizer_hash=tok.hash(),
                           prompt_format=export.PROMPT_INSTRUCT_ZH)
    head, tokens = ts.read_shard(root / f"tok{vocab}" / "train_000.bin")
    flags = np.asarray(ts.read_mask(root / f"tok{vocab}" / "train_000.bin", head))
    toks = np.asarray(tokens, dtype=np.int64)
    starts = np.flatnonzero(toks == tok.bos_id)
    checked = 0
    for s in starts[:40]:
        n = 0
        while flags[s + 1 + n]:
            n += 1
        prompt_ids = toks[s:s + 1 + n].tolist()  # BOS + the instruction's ids, as the model saw them
        request_ = request_of(tok.decode(prompt_ids[1:]), "zh")
        ins = instruct.make_instruction(*request_)
        assert sample.instruct_prompt_ids(tok, ins, "zh", 256)[1] == prompt_ids, request_
        p = run_c(run_bin, model_bin, "-m", "encode", *c_flags(request_), tok=tok_bin)
        assert p.returncode == 0, p.stderr
        assert [tok.bos_id] + [int(x) for x in p.stdout.split()] == prompt_ids, request_
        checked += 1
    assert checked == 40
