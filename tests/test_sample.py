"""sample.py: stories from a checkpoint and from a .bin, stopping at EOS, with run.c's options.

The model here is a real Transformer whose weights are set by hand so that greedy decoding
walks a known chain of tokens and then emits EOS: attention and FFN outputs are zeroed (wo, w2),
so the residual stream is the current token's embedding, a basis vector; the classifier row of
the chain's next token is a large multiple of that vector.
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

import sample  # noqa: E402
from export import write_model_bin  # noqa: E402
from model import Transformer, model_args_from_preset  # noqa: E402
from test_export import save_checkpoint  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

VOCAB = 400
STORY = "她看见一只小猫。"  # what the chain model says
PROMPT = "她看见"  # encodes to a prefix of STORY's ids
STORIES = [
    "从前有一个小女孩，她喜欢在花园里玩。她看见一只小猫。",
    "小狗和小猫是好朋友，它们每天一起玩。",
    "Once upon a time there was a little girl named Lily. She liked to play in the park.",
    "The cat was happy and they played all day. One day, Tom found a big red ball.",
]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> str:
    """A byte-fallback BPE tokenizer with tinystories.py's settings."""
    prefix = tmp_path_factory.mktemp("tok") / "tok"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(STORIES * 40), model_prefix=str(prefix), vocab_size=VOCAB, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        minloglevel=2)
    return str(prefix) + ".model"


def chain_model(tok: Tokenizer) -> Transformer:
    """Greedy decoding from BOS says STORY, then EOS."""
    chain = tok.encode(STORY)
    assert len(set(chain)) == len(chain) and tok.bos_id not in chain and tok.eos_id not in chain, chain
    torch.manual_seed(0)
    model = Transformer(model_args_from_preset("micro", vocab_size=VOCAB, tie_embeddings=False))
    dim = model.params.dim
    assert len(chain) + 1 <= dim
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        model.output.weight.mul_(0.01)
        order = [tok.bos_id] + chain  # token order[i] is followed by order[i + 1], the last by EOS
        for i, t in enumerate(order):
            model.tok_embeddings.weight[t] = torch.nn.functional.one_hot(torch.tensor(i), dim).float()
            nxt = order[i + 1] if i + 1 < len(order) else tok.eos_id
            model.output.weight[nxt] = 20.0 * model.tok_embeddings.weight[t]
    return model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory, tok_path):
    """The chain model as a train.py-style checkpoint (naming its tokenizer), a version 3 .bin
    (recording the tokenizer hash) and a version 2 int8 .bin."""
    folder = tmp_path_factory.mktemp("models")
    tok = Tokenizer(tok_path)
    model = chain_model(tok)
    ckpt = folder / "ckpt.pt"
    save_checkpoint(model, ckpt, tokenizer=tok_path)
    v3 = folder / "model.bin"
    write_model_bin(model, v3, version=3, tokenizer_hash=tok.hash())
    v2 = folder / "model_q8.bin"
    write_model_bin(model, v2, version=2)
    return {"ckpt": ckpt, "v3": v3, "v2": v2, "model": model, "tok": tok}


def run_main(capsys, *argv):
    rc = sample.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_checkpoint_as_a_process_stops_at_eos(files):
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--checkpoint={files['ckpt']}",
                        "--temperature=0", "--steps=50"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # 50 steps allowed, but EOS comes after the story: nothing follows it.
    assert r.stdout == STORY + "\n"


@pytest.mark.parametrize("which", ["v3", "v2"])
def test_bin_files(files, tok_path, capsys, which):
    rc, out, err = run_main(capsys, f"--checkpoint={files[which]}", f"--tokenizer={tok_path}",
                            "--temperature=0", "--num_samples=3")
    assert rc == 0, err
    assert out == "\n".join([STORY, sample.SEPARATOR, STORY, sample.SEPARATOR, STORY]) + "\n"


def test_prompt_is_kept_and_continued(files, capsys):
    tok = files["tok"]
    assert tok.encode(STORY)[:len(tok.encode(PROMPT))] == tok.encode(PROMPT)
    rc, out, err = run_main(capsys, "--checkpoint", files["ckpt"], "--prompt", PROMPT, "--temperature", "0")
    assert rc == 0, err
    assert out == STORY + "\n"


def test_steps_limit_the_continuation(files):
    model, tok = files["model"], files["tok"]
    chain = tok.encode(STORY)
    for steps in (1, 3):
        (ids,) = sample.generate_ids(model, [tok.bos_id], steps=steps, temperature=0.0,
                                     eos_id=tok.eos_id, bos_id=tok.bos_id)
        assert ids == chain[:steps]
    # steps=0: up to max_seq_len, still ending at EOS.
    (ids,) = sample.generate_ids(model, [tok.bos_id], steps=0, temperature=0.0, eos_id=tok.eos_id)
    assert ids == chain
    # top_k=1 is greedy whatever the temperature.
    (ids,) = sample.generate_ids(model, [tok.bos_id], steps=0, temperature=5.0, top_k=1, seed=3,
                                 eos_id=tok.eos_id)
    assert ids == chain


def test_sampling_follows_the_seed(files, tok_path, capsys):
    """A random model: the same seed gives the same samples, the samples of one batch differ."""
    torch.manual_seed(1)
    model = Transformer(model_args_from_preset("micro", vocab_size=VOCAB))
    tok = files["tok"]
    opts = dict(num_samples=3, steps=30, temperature=1.0, top_p=1.0)
    a = sample.generate_text(model, tok, "从前", seed=7, **opts)
    b = sample.generate_text(model, tok, "从前", seed=7, **opts)
    c = sample.generate_text(model, tok, "从前", seed=8, **opts)
    assert a == b and a != c
    assert len(set(a)) > 1
    assert all(t.startswith("从前") for t in a)


def test_tokenizer_mismatches_are_refused(files, tmp_path, capsys):
    other = tmp_path / "other"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(STORIES[::-1] * 40), model_prefix=str(other), vocab_size=350,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, minloglevel=2)
    rc, out, err = run_main(capsys, f"--checkpoint={files['v3']}", f"--tokenizer={other}.model")
    assert rc == 1 and out == "" and err.count("\n") == 1 and "vocab_size" in err
    # Same size, other pieces: the hash recorded in the version 3 header catches it.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(STORIES[::-1] * 40), model_prefix=str(other), vocab_size=VOCAB,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, minloglevel=2)
    assert struct.unpack_from("<I", files["v3"].read_bytes(), 52)[0] == files["tok"].hash()
    rc, out, err = run_main(capsys, f"--checkpoint={files['v3']}", f"--tokenizer={other}.model")
    assert rc == 1 and out == "" and err.count("\n") == 1 and "hash" in err


@pytest.mark.parametrize("argv,needle,status", [  # exit 2 for a bad command line, 1 otherwise
    (["--temperature=-1"], "--temperature", 2),
    (["--top_p=0"], "--top_p", 2),
    (["--top_k=-2"], "--top_k", 2),
    (["--num_samples=0"], "--num_samples", 2),
    (["--steps=x"], "--steps", 2),
    (["--temprature=1"], "valid:", 2),
    (["--device=tpu"], "--device=tpu", 2),
    (["--checkpoint=/nonexistent/ckpt.pt"], "/nonexistent/ckpt.pt", 1),
])
def test_bad_options_are_one_line(capsys, argv, needle, status):
    rc, out, err = run_main(capsys, *argv)
    assert rc == status and out == ""
    assert err.count("\n") == 1 and needle in err and err.startswith("sample.py: error: "), err


def test_help_comes_from_the_config(capsys):
    assert sample.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python sample.py")
    for f in dataclasses.fields(sample.SampleConfig):
        assert f"--{f.name}=" in out and f.metadata["help"][:30] in out, f.name


def test_prompt_longer_than_the_context_is_refused(files, capsys):
    rc, out, err = run_main(capsys, f"--checkpoint={files['ckpt']}", "--prompt=" + "小猫" * 200)
    assert rc == 1 and "max_seq_len" in err and err.count("\n") == 1
