"""tinystories.py data stages and the TokenBatches loader, on small corpora built in the test.

The chain synth -> train_vocab -> pretokenize runs for real (sentencepiece is the oracle), then
the shards are decoded back and compared with the source stories.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import given, settings, strategies as st

import storygen
import tinystories as ts
from options import OptionError

ROOT = Path(__file__).resolve().parent.parent
N_STORIES = 3000
SEED = 7
VOCAB = 600


def run_cli(*args, expect=0):
    """The real command line in a fresh process (exit status, one-line errors, no stdin)."""
    p = subprocess.run([sys.executable, str(ROOT / "tinystories.py"), *args], capture_output=True,
                       text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert p.returncode == expect, f"exit {p.returncode}, expected {expect}\n{p.stdout}\n{p.stderr}"
    return p


def stories_in_shard(path, sp):
    """Decode a shard back into its stories, checking the BOS ... EOS framing of every one."""
    head, tokens = ts.read_shard(path)
    toks = np.asarray(tokens, dtype=np.int64)
    bos, eos = sp.bos_id(), sp.eos_id()
    starts = np.flatnonzero(toks == bos)
    ends = np.flatnonzero(toks == eos)
    assert len(starts) == len(ends) == head["n_stories"], (path, len(starts), len(ends), head)
    if len(toks):
        assert toks[0] == bos and toks[-1] == eos
    # strictly alternating BOS, EOS, BOS, EOS ...: each story is BOS + tokens + EOS
    assert np.all(starts < ends) and np.all(ends[:-1] + 1 == starts[1:]), path
    return head, [sp.decode(toks[s + 1:e].tolist()) for s, e in zip(starts, ends)]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """synth -> train_vocab -> pretokenize in one data root, run through the real CLI."""
    root = tmp_path_factory.mktemp("chain")
    run_cli("synth", f"--data_root={root}", f"--n_stories={N_STORIES}", f"--seed={SEED}",
            "--shard_size=1000")
    tv = run_cli("train_vocab", f"--data_root={root}", "--dataset=synth", f"--vocab_size={VOCAB}")
    pt = run_cli("pretokenize", f"--data_root={root}", "--dataset=synth", f"--vocab_size={VOCAB}",
                 "--workers=2")
    return root, tv, pt


def test_synth_layout_matches_storygen(chain):
    root, _, _ = chain
    files = sorted((root / "synth").glob("*.jsonl"))
    assert [f.name for f in files] == ["data00.jsonl", "data01.jsonl", "data02.jsonl"]
    got = [json.loads(line)["story_zh"] for f in files for line in f.read_text("utf-8").splitlines()]
    assert got == list(storygen.generate_stories(N_STORIES, SEED))


def test_synth_rerun_does_nothing_and_new_seed_rewrites(tmp_path, capsys):
    assert ts.main(["synth", f"--data_root={tmp_path}", "--n_stories=50", "--seed=1"]) == 0
    first = (tmp_path / "synth" / "data00.jsonl").read_bytes()
    assert ts.main(["synth", f"--data_root={tmp_path}", "--n_stories=50", "--seed=1"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert ts.main(["synth", f"--data_root={tmp_path}", "--n_stories=50", "--seed=2"]) == 0
    assert (tmp_path / "synth" / "data00.jsonl").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]  # no temp folders left


def test_train_vocab_outputs_and_settings(chain):
    root, tv, _ = chain
    model = root / f"tok{VOCAB}.model"
    assert model.exists() and (root / f"tok{VOCAB}.vocab").exists()
    assert (root / f"tok{VOCAB}.bin").exists(), "tokenizer.py's exporter should have run"
    # the temporary training text is gone; nothing but our outputs is left behind
    assert not [p for p in root.iterdir() if p.name.startswith(".")], list(root.iterdir())
    assert "characters per token" in tv.stdout
    cpt = float(tv.stdout.split("val compression: ")[1].split()[0])
    sp = spm.SentencePieceProcessor(model_file=str(model))
    val = [s for s in storygen.generate_stories(N_STORIES, SEED) if ts.is_val_story(s, 0.01)]
    want = sum(map(len, val)) / sum(len(x) for x in sp.encode(val))
    assert cpt == pytest.approx(want, abs=1e-3), tv.stdout

    # the settings, as behaviour: BPE (merge pieces scored 0, -1, -2, ... in merge order; a
    # unigram model has log-probabilities), no NFKC folding, whitespace as written, byte fallback
    scores = [sp.get_score(i) for i in range(259, VOCAB)]
    assert scores == [-float(i) for i in range(len(scores))]
    for text in ["（全角）ＡＢＣ１２３", "a   b\t\t c  ", "\n\n两行\n"]:
        assert sp.decode(sp.encode(text)) == text
    ids = sp.encode("龘")  # not in the corpus: its 3 UTF-8 bytes
    assert [sp.id_to_piece(i) for i in ids if sp.is_byte(i)] == ["<0xE9>", "<0xBE>", "<0x98>"]
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)


def test_train_vocab_rerun_is_skipped(chain):
    root, _, _ = chain
    mtime = (root / f"tok{VOCAB}.model").stat().st_mtime_ns
    p = run_cli("train_vocab", f"--data_root={root}", "--dataset=synth", f"--vocab_size={VOCAB}")
    assert "nothing to do" in p.stdout
    assert (root / f"tok{VOCAB}.model").stat().st_mtime_ns == mtime


def test_shards_frame_every_story_and_split_without_leak(chain):
    root, _, pt = chain
    sp = spm.SentencePieceProcessor(model_file=str(root / f"tok{VOCAB}.model"))
    from tokenizer import Tokenizer
    tok_hash = Tokenizer(str(root / f"tok{VOCAB}.model")).hash()
    out = root / f"tok{VOCAB}"
    train_paths = sorted(out.glob("train_*.bin"))
    assert len(train_paths) == 3
    train = []
    for p in train_paths:
        head, stories = stories_in_shard(p, sp)
        assert head["vocab_size"] == VOCAB and head["tokenizer_hash"] == tok_hash
        train += stories
    head, val = stories_in_shard(out / "val.bin", sp)
    assert head["tokenizer_hash"] == tok_hash
    source = list(storygen.generate_stories(N_STORIES, SEED))
    # every story lands in exactly one split, decoded text identical to the source
    assert sorted(train + val) == sorted(source)
    assert not set(train) & set(val)
    assert val == [s for s in source if ts.is_val_story(s, 0.01)]
    assert 0 < len(val) < 0.05 * N_STORIES
    assert f"{len(train)} train stories" in pt.stdout


def test_pretokenize_rerun_skips_and_source_change_redoes(chain, tmp_path):
    root, _, _ = chain
    p = run_cli("pretokenize", f"--data_root={root}", "--dataset=synth", f"--vocab_size={VOCAB}")
    assert "nothing to do" in p.stdout
    # a different val_fraction changes the split, so the shards are rebuilt in full
    assert ts.main(["pretokenize", f"--data_root={root}", "--dataset=synth",
                    f"--vocab_size={VOCAB}", "--val_fraction=0.2", "--workers=1"]) == 0
    head = ts.read_shard_header(root / f"tok{VOCAB}" / "val.bin")
    assert head["n_stories"] > 0.1 * N_STORIES
    assert ts.main(["pretokenize", f"--data_root={root}", "--dataset=synth",
                    f"--vocab_size={VOCAB}", "--workers=1"]) == 0
    assert ts.read_shard_header(root / f"tok{VOCAB}" / "val.bin")["n_stories"] < 0.05 * N_STORIES


def test_roundtrip_builtin_corpus(chain):
    root, _, _ = chain
    sp = spm.SentencePieceProcessor(model_file=str(root / f"tok{VOCAB}.model"))
    stories = list(storygen.generate_stories(N_STORIES, SEED))
    assert sp.decode(sp.encode(stories)) == stories


# U+2581 is sentencepiece's own space marker: a literal one decodes as a plain space, a property of
# sentencepiece itself; surrogates cannot be UTF-8 encoded at all.
_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"),
                max_size=200)


@settings(max_examples=150, deadline=None)
@given(s=_TEXT)
def test_roundtrip_arbitrary_unicode(chain, s):
    root, _, _ = chain
    sp = spm.SentencePieceProcessor(model_file=str(root / f"tok{VOCAB}.model"))
    assert sp.decode(sp.encode(s)) == s


def test_vocab_size_limits(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("从前有一只小猫。\n", encoding="utf-8")
    p = run_cli("train_vocab", f"--data_root={tmp_path}", f"--data_dir={tmp_path / 'd'}",
                "--vocab_size=65536", expect=1)
    assert "65535" in p.stderr and "uint16" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("pretokenize", f"--data_root={tmp_path}", f"--data_dir={tmp_path / 'd'}",
                "--vocab_size=100", expect=1)
    assert "too small" in p.stderr


def test_largest_vocab_end_to_end(tmp_path, capsys):
    """65535 pieces: ids up to 65534 still fit the uint16 shards and decode back."""
    d = tmp_path / "d"
    d.mkdir()
    args = [f"--data_root={tmp_path}", f"--data_dir={d}", "--vocab_size=65535"]
    for n in (600, 1500):
        stories = list(storygen.generate_stories(n, 3))
        (d / "a.jsonl").write_text("".join(json.dumps({"story": s}, ensure_ascii=False) + "\n"
                                           for s in stories), "utf-8")
        code = ts.main(["train_vocab", *args])
        if n == 600:  # too little text for 65535 pieces: said plainly, no model written
            assert code == 1 and "use a smaller --vocab_size or more data" in capsys.readouterr().err
            assert not (tmp_path / "tok65535.model").exists()
    assert code == 0
    assert ts.main(["pretokenize", *args, "--workers=1", "--val_fraction=0"]) == 0
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok65535.model"))
    assert sp.get_piece_size() == 65535
    head, got = stories_in_shard(tmp_path / "tok65535" / "train_000.bin", sp)
    assert got == stories and head["vocab_size"] == 65535
    assert int(ts.read_shard(tmp_path / "tok65535" / "train_000.bin")[1].max()) > 60000


def test_small_vocab_on_chinese_and_long_lines(tmp_path):
    """vocab 300 on Chinese (more distinct characters than slots: coverage is chosen so
    sentencepiece accepts it), with paragraphs longer than sentencepiece's 4192-byte default."""
    d = tmp_path / "long"
    d.mkdir()
    stories = ["".join(storygen.generate_stories(12, i)).replace("\n", "") for i in range(60)]
    assert min(len(s.encode("utf-8")) for s in stories) > 4192
    (d / "s.jsonl").write_text("".join(json.dumps({"text": s}, ensure_ascii=False) + "\n"
                                       for s in stories), encoding="utf-8")
    assert ts.main(["train_vocab", f"--data_root={tmp_path}", f"--data_dir={d}",
                    "--vocab_size=300"]) == 0
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok300.model"))
    assert sp.get_piece_size() == 300
    assert sp.decode(sp.encode(stories)) == stories
    # sentencepiece saw the long lines: it learned merges, not just the base characters
    assert max(len(sp.id_to_piece(i)) for i in range(259, 300)) >= 2


def test_digits_split_and_english(tmp_path):
    d = tmp_path / "en"
    d.mkdir()
    rng = np.random.default_rng(0)
    stories = [f"Tom had {rng.integers(10, 99999)} red balls and {rng.integers(10, 9999)} cars. "
               f"He gave {rng.integers(100, 999)} to Sue." for _ in range(400)]
    (d / "a.json").write_text(json.dumps([{"story": s} for s in stories]), "utf-8")
    assert ts.main(["train_vocab", f"--data_root={tmp_path}", f"--data_dir={d}",
                    "--vocab_size=320"]) == 0
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok320.model"))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert "▁Tom" in pieces or "▁had" in pieces  # merges were learned ...
    assert not [p for p in pieces[259:] if sum(c.isdigit() for c in p) > 1]  # ... never of digits
    assert sp.encode("2024", out_type=str)[-4:] == ["2", "0", "2", "4"]
    assert sp.decode(sp.encode(stories)) == stories


def test_choose_kept_characters():
    latin = np.zeros(0x110000, dtype=np.int64)
    latin[32:127] = 1000
    assert ts.choose_kept_characters(latin, 5000) is None  # all fit: coverage 1.0
    cjk = np.zeros(0x110000, dtype=np.int64)
    cjk[0x4E00:0x4E00 + 6000] = np.arange(6000, 0, -1) ** 2  # a long tail of rare characters
    # no pair statistics: every free slot goes to a character ...
    kept = ts.choose_kept_characters(cjk, 5000)
    assert list(kept[:3]) == [0x4E00, 0x4E01, 0x4E02]  # most frequent first
    assert kept.size == 5000 - 260  # 3 special, 256 byte pieces and ▁
    # ... but never more characters than cover 99.95% of the text
    kept = ts.choose_kept_characters(cjk, 259 + 5900)
    assert cjk[kept].sum() / cjk.sum() >= 0.9995 > cjk[kept[:-1]].sum() / cjk.sum()
    # frequent pairs take slots: characters keep only those worth 2x count > the pair counts
    pairs = np.full(5000, 6000 ** 2)
    kept = ts.choose_kept_characters(cjk, 5000, pairs)
    assert kept.size == int((2 * cjk > 6000 ** 2).sum())
    assert ts.choose_kept_characters(cjk, 300).size == 300 - 260
    # a few characters (the built-in corpus has ~1,100) are all kept once they fit in half the
    # slots, even against merges worth more: as bytes a small model misspells them
    few = np.zeros(0x110000, dtype=np.int64)
    few[0x4E00:0x4E00 + 1000] = np.arange(1000, 0, -1) ** 2
    pairs = np.full(3000, 1000 ** 2)
    assert ts.choose_kept_characters(few, 260 + 2000, pairs) is None
    assert ts.choose_kept_characters(few, 260 + 1999, pairs).size < 1000


# ------------------------------------------------------------------------------------------------
# custom data: formats and malformed input

@pytest.fixture(scope="module")
def small_tok(chain):
    return chain[0] / f"tok{VOCAB}.model"


def _pretok_custom(tmp_path, small_tok, data_dir, *extra):
    """pretokenize a custom folder with the chain's tokenizer (copied into a fresh data root)."""
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    (root / small_tok.name).write_bytes(small_tok.read_bytes())
    code = ts.main(["pretokenize", f"--data_root={root}", f"--data_dir={data_dir}",
                    f"--vocab_size={VOCAB}", "--workers=1", "--val_fraction=0", *extra])
    return code, root / f"tok{VOCAB}"


def _decoded_train(out, small_tok):
    sp = spm.SentencePieceProcessor(model_file=str(small_tok))
    got = []
    for p in sorted(out.glob("train_*.bin")):
        got += stories_in_shard(p, sp)[1]
    return got


STORIES = ["从前有一只小猫。", "小狗说：“你好！”\n它们成了好朋友。", "Once upon a time, 2 cats.",
           "  空格和\t制表符  保留  ", "最后一个故事。"]


def test_custom_jsonl_autodetect_and_text_key(tmp_path, small_tok):
    d = tmp_path / "jsonl"
    d.mkdir()
    keys = ["story_zh", "text_zh", "story", "text", "content"]
    (d / "a.jsonl").write_text("".join(json.dumps({k: s, "id": i}, ensure_ascii=False) + "\n"
                                       for i, (k, s) in enumerate(zip(keys, STORIES))), "utf-8")
    code, out = _pretok_custom(tmp_path, small_tok, d)
    assert code == 0
    assert sorted(_decoded_train(out, small_tok)) == sorted(s.strip() for s in STORIES)

    d2 = tmp_path / "jsonl2"
    d2.mkdir()
    (d2 / "b.jsonl").write_text("".join(json.dumps({"body": s, "text": "no"}, ensure_ascii=False)
                                        + "\n" for s in STORIES), "utf-8")
    code, out = _pretok_custom(tmp_path, small_tok, d2, "--text_key=body")
    assert code == 0
    assert sorted(_decoded_train(out, small_tok)) == sorted(s.strip() for s in STORIES)


def test_batched_encoding_matches_source(tmp_path, small_tok, monkeypatch):
    """Stories stream through the encoder in batches; tiny batches must change nothing."""
    monkeypatch.setattr(ts, "ENCODE_BATCH", 3)
    d = tmp_path / "b"
    d.mkdir()
    stories = list(storygen.generate_stories(40, 11))
    (d / "a.jsonl").write_text("".join(json.dumps({"story": s}, ensure_ascii=False) + "\n"
                                       for s in stories), "utf-8")
    root = tmp_path / "root"
    root.mkdir()
    (root / small_tok.name).write_bytes(small_tok.read_bytes())
    assert ts.main(["pretokenize", f"--data_root={root}", f"--data_dir={d}",
                    f"--vocab_size={VOCAB}", "--workers=1", "--val_fraction=0.5"]) == 0
    sp = spm.SentencePieceProcessor(model_file=str(small_tok))
    _, train = stories_in_shard(root / f"tok{VOCAB}" / "train_000.bin", sp)
    _, val = stories_in_shard(root / f"tok{VOCAB}" / "val.bin", sp)
    assert train == [s for s in stories if not ts.is_val_story(s, 0.5)]
    assert val == [s for s in stories if ts.is_val_story(s, 0.5)]
    assert len(train) > 6 and len(val) > 6  # several batches each


def test_custom_json_array_and_txt(tmp_path, small_tok):
    d = tmp_path / "mixed"
    d.mkdir()
    # with a byte-order mark, as Windows editors write: not part of the first story
    (d / "a.json").write_text(json.dumps([{"story": STORIES[0]}, STORIES[1]], ensure_ascii=False),
                              "utf-8-sig")
    # .txt: stories separated by blank lines (whitespace-only lines count as blank)
    (d / "sub").mkdir()
    (d / "sub" / "b.txt").write_text(f"{STORIES[2]}\n\n\n{STORIES[3]}\n  \n{STORIES[4]}\n"
                                     "第二行。\n", "utf-8-sig")
    (d / "c.jsonl").write_text(json.dumps({"text": "带BOM的一行。"}, ensure_ascii=False) + "\n",
                               "utf-8-sig")
    (d / "notes.md").write_text("ignored", "utf-8")
    code, out = _pretok_custom(tmp_path, small_tok, d)
    assert code == 0
    want = [STORIES[0], STORIES[1], STORIES[2], STORIES[3].strip(), STORIES[4] + "\n第二行。",
            "带BOM的一行。"]
    assert sorted(_decoded_train(out, small_tok)) == sorted(want)


def test_malformed_lines_reported_skipped_or_fatal(tmp_path, small_tok, capsys):
    d = tmp_path / "bad"
    d.mkdir()
    lines = [json.dumps({"story": "好的故事一。"}, ensure_ascii=False), "{not json",
             json.dumps({"title": "no text"}), json.dumps({"story": 5}), "[1, 2]",
             json.dumps({"story": "好的故事二。"}, ensure_ascii=False)]
    (d / "s.jsonl").write_text("\n".join(lines) + "\n", "utf-8")
    code, out = _pretok_custom(tmp_path, small_tok, d)
    assert code == 0
    err = capsys.readouterr().err
    for lineno in (2, 3, 4, 5):
        assert f"s.jsonl:{lineno}:" in err, err
    assert "s.jsonl:1:" not in err and "s.jsonl:6:" not in err
    assert "skipped 4 malformed" in err
    assert sorted(_decoded_train(out, small_tok)) == ["好的故事一。", "好的故事二。"]

    code, _ = _pretok_custom(tmp_path, small_tok, d, "--strict=true")
    assert code == 1
    err = capsys.readouterr().err
    assert "s.jsonl:2:" in err and "strict" in err and "Traceback" not in err


def test_strict_failure_in_a_worker_surfaces(tmp_path, small_tok):
    """With several worker processes, a worker's error still ends the run with its message."""
    d = tmp_path / "many"
    d.mkdir()
    for i in range(3):
        (d / f"s{i}.jsonl").write_text(json.dumps({"story": f"故事{i}。"}, ensure_ascii=False)
                                       + "\n" + ("oops\n" if i == 2 else ""), "utf-8")
    root = tmp_path / "r"
    root.mkdir()
    (root / small_tok.name).write_bytes(small_tok.read_bytes())
    p = run_cli("pretokenize", f"--data_root={root}", f"--data_dir={d}", f"--vocab_size={VOCAB}",
                "--workers=2", "--strict=true", expect=1)
    assert "s2.jsonl:2:" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()[-1]) > 0
    assert not (root / f"tok{VOCAB}").exists()  # no half-written output
    assert sorted(x.name for x in root.iterdir()) == [small_tok.name]


def test_empty_and_unusable_folders(tmp_path, small_tok, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _ = _pretok_custom(tmp_path, small_tok, empty)
    assert code == 1 and "no .jsonl, .json or .txt files" in capsys.readouterr().err
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.jsonl").write_text('{"x": 1}\n\n', "utf-8")
    (junk / "b.txt").write_text("\n \n", "utf-8")
    code, _ = _pretok_custom(tmp_path, small_tok, junk)
    err = capsys.readouterr().err
    assert code == 1 and "no usable stories" in err and "1 malformed" in err
    code = ts.main(["train_vocab", f"--data_root={tmp_path}", f"--data_dir={junk}",
                    "--vocab_size=300"])
    assert code == 1 and "no usable stories" in capsys.readouterr().err
    code = ts.main(["pretokenize", f"--data_root={tmp_path}", "--dataset=zh", "--vocab_size=300"])
    assert code == 1
    assert "train_vocab --vocab_size=300" in capsys.readouterr().err


def test_missing_dataset_hint(tmp_path, capsys):
    assert ts.main(["train_vocab", f"--data_root={tmp_path}", "--vocab_size=300"]) == 1
    assert "tinystories.py download" in capsys.readouterr().err
    assert ts.main(["train_vocab", f"--data_root={tmp_path}", "--dataset=synth"]) == 1
    assert "tinystories.py synth" in capsys.readouterr().err


def test_cli_parsing_errors(capsys):
    p = run_cli("--help")
    for stage in ("download", "synth", "train_vocab", "pretokenize"):
        assert stage in p.stdout
    assert ts.main(["pretokenize", "--vocab_sise=5"]) == 2
    err = capsys.readouterr().err
    assert "unknown option --vocab_sise" in err and "--vocab_size" in err and "--data_dir" in err
    assert err.startswith("tinystories.py pretokenize: error: unknown option")
    assert ts.main(["pretokenize", "--strict=maybe"]) == 2
    assert "true/false" in capsys.readouterr().err
    assert ts.main(["pretokenize", "--vocab_size=big"]) == 2
    capsys.readouterr()
    assert ts.main(["nosuchstage"]) == 2
    assert capsys.readouterr().err.startswith("tinystories.py: error: unknown stage 'nosuchstage'")
    assert ts.main(["synth", "--help"]) == 0
    assert "--n_stories=100000" in capsys.readouterr().out
    cfg = ts.parse_config(ts.PretokenizeConfig, ["--strict=yes", "--vocab_size=512",
                                                 "--val_fraction=0.5"])
    assert cfg.strict is True and cfg.vocab_size == 512 and cfg.val_fraction == 0.5
    cfg = ts.parse_config(ts.PretokenizeConfig, ["--data_dir", "my folder", "--vocab-size=300"])
    assert cfg.data_dir == "my folder" and cfg.vocab_size == 300
    cfg = ts.parse_config(ts.PretokenizeConfig, ["--strict", "--force=1"])  # a bool alone means true
    assert cfg.strict is True and cfg.force is True
    with pytest.raises(OptionError, match="needs a value"):
        ts.parse_config(ts.PretokenizeConfig, ["--vocab_size", "--force=1"])
    with pytest.raises(OptionError, match="options are --key=value"):
        ts.parse_config(ts.PretokenizeConfig, ["5000"])


# ------------------------------------------------------------------------------------------------
# TokenBatches

@pytest.fixture()
def shard_dir(tmp_path):
    """Three train shards of known content: token value encodes (shard, position)."""
    sizes = [1000, 257, 2503]
    for i, n in enumerate(sizes):
        ts.write_shard(tmp_path / f"train_{i:03d}.bin", (np.arange(n) % 9000) + 10000 * (i + 1) % 60000,
                       vocab_size=65000, tokenizer_hash=123, n_stories=1)
    ts.write_shard(tmp_path / "val.bin", np.arange(300) % 50, vocab_size=65000,
                   tokenizer_hash=123, n_stories=1)
    return tmp_path


def _starts(tb, g):
    return [int(tb.window(g * tb.batch_size + b)[0]) for b in range(tb.batch_size)]


def test_batches_shapes_shift_and_header(shard_dir):
    tb = ts.TokenBatches(shard_dir, "train", 4, 64, seed=0)
    assert tb.vocab_size == 65000 and tb.tokenizer_hash == 123
    x, y = tb.get(0)
    assert x.shape == (4, 64) and y.shape == (4, 64)
    assert str(x.dtype) == "torch.int64" and str(y.dtype) == "torch.int64"
    assert (x[:, 1:] == y[:, :-1]).all()
    # each row is a contiguous slice of one shard (values encode the position)
    assert ((y - x) == 1).all()
    v = ts.TokenBatches(shard_dir, "val", 2, 64, seed=0)
    assert v.n_tokens == 300 and int(v.get(3)[0].max()) < 50


def test_batches_deterministic_and_resumable(shard_dir):
    a = ts.TokenBatches(shard_dir, "train", 3, 32, seed=5, grad_accum=2)
    seq = [a.get(s, m) for s in range(40) for m in range(2)]  # crosses several epochs
    b = ts.TokenBatches(shard_dir, "train", 3, 32, seed=5, grad_accum=2)
    for (s, m), (x, y) in zip([(s, m) for s in range(40) for m in range(2)], seq):
        if s >= 25:  # a fresh loader asked for the same (step, micro) resumes exactly
            bx, by = b.get(s, m)
            assert (bx == x).all() and (by == y).all()
    c = ts.TokenBatches(shard_dir, "train", 3, 32, seed=6, grad_accum=2)
    assert not (c.get(0, 0)[0] == seq[0][0]).all()


def test_batches_ddp_split_matches_grad_accum(shard_dir):
    one = ts.TokenBatches(shard_dir, "train", 2, 16, seed=3, grad_accum=2)
    ranks = [ts.TokenBatches(shard_dir, "train", 2, 16, seed=3, rank=r, world_size=2)
             for r in range(2)]
    for step in range(30):
        for r in range(2):
            assert (one.get(step, r)[0] == ranks[r].get(step)[0]).all()


def test_batches_epoch_covers_every_window_once_without_rank_overlap(shard_dir):
    T, B = 16, 2
    ranks = [ts.TokenBatches(shard_dir, "train", B, T, seed=9, rank=r, world_size=3)
             for r in range(3)]
    W = ranks[0].n_windows
    seen = {}
    step = 0
    while sum(len(v) for v in seen.values()) < W - 3 * B:  # whole micro-batches of epoch 0
        for r, tb in enumerate(ranks):
            g = tb.micro_index(step, 0)
            for b in range(B):
                j = g * B + b
                if j < W:
                    w = tb.window(j)
                    seen.setdefault(r, []).append((int(w[0]), len(w)))
        step += 1
    allw = [w for v in seen.values() for w in v]
    assert len(allw) == len(set(allw)), "a window was served twice in one epoch"
    assert all(n == T + 1 for _, n in allw)
    # windows of one epoch are consecutive T-strides in each shard: starts differ by multiples of T
    for shard_base in (10000, 20000, 30000):
        s = sorted(v - shard_base for v, _ in allw if shard_base <= v < shard_base + 9000)
        assert all((b - a) % T == 0 for a, b in zip(s, s[1:])), shard_base


def test_batches_errors(tmp_path, shard_dir):
    with pytest.raises(ts.DataError, match="no train shards"):
        ts.TokenBatches(tmp_path / "nowhere", "train", 1, 8, seed=0)
    with pytest.raises(ts.DataError, match="fewer than one window"):
        ts.TokenBatches(shard_dir, "val", 1, 300, seed=0)
    bad = tmp_path / "bad"
    bad.mkdir()
    ts.write_shard(bad / "train_000.bin", np.arange(100), vocab_size=500, tokenizer_hash=1,
                   n_stories=1)
    raw = (bad / "train_000.bin").read_bytes()
    (bad / "train_000.bin").write_bytes(raw[:-2])
    with pytest.raises(ts.DataError, match=r"train_000.bin: file is .* bytes but its header"):
        ts.TokenBatches(bad, "train", 1, 8, seed=0)
    (bad / "train_000.bin").write_bytes(b"XXXX" + raw[4:])
    with pytest.raises(ts.DataError, match="bad magic"):
        ts.TokenBatches(bad, "train", 1, 8, seed=0)
    (bad / "train_000.bin").write_bytes(raw)
    ts.write_shard(bad / "train_001.bin", np.arange(100), vocab_size=501, tokenizer_hash=1,
                   n_stories=1)
    with pytest.raises(ts.DataError, match="different tokenizer"):
        ts.TokenBatches(bad, "train", 1, 8, seed=0)


def test_shard_header_bytes(tmp_path):
    ts.write_shard(tmp_path / "s.bin", np.array([1, 65534, 2]), vocab_size=65535,
                   tokenizer_hash=0xDEADBEEF, n_stories=1)
    raw = (tmp_path / "s.bin").read_bytes()
    assert len(raw) == 256 + 6
    assert raw[:4] == b"tokn"
    assert int.from_bytes(raw[4:8], "little") == 1
    assert int.from_bytes(raw[8:12], "little") == 65535
    assert int.from_bytes(raw[12:16], "little") == 0xDEADBEEF
    assert int.from_bytes(raw[16:24], "little") == 3
    assert int.from_bytes(raw[24:32], "little") == 1
    assert raw[32:256] == bytes(224)
    assert list(np.frombuffer(raw[256:], "<u2")) == [1, 65534, 2]


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 300), min_size=1, max_size=4), T=st.integers(1, 40),
       seed=st.integers(0, 2 ** 32 - 1))
def test_batches_windows_always_in_bounds(tmp_path_factory, sizes, T, seed):
    d = tmp_path_factory.mktemp("win")
    for i, n in enumerate(sizes):  # shard i holds 1000*i + 0, 1, 2, ...: contiguity is visible
        ts.write_shard(d / f"train_{i:03d}.bin", np.arange(n) + 1000 * i, vocab_size=5000,
                       tokenizer_hash=1, n_stories=1)
    if max(sizes) < T + 1:
        with pytest.raises(ts.DataError, match="fewer than one window"):
            ts.TokenBatches(d, "train", 1, T, seed=seed)
        return
    tb = ts.TokenBatches(d, "train", 1, T, seed=seed)
    W = tb.n_windows
    assert W == sum(max((n - T) // T, 1) for n in sizes if n >= T + 1)
    for epoch in range(2):
        starts = []
        for j in range(epoch * W, (epoch + 1) * W):
            w = tb.window(j)
            assert len(w) == T + 1 and np.all(np.diff(w) == 1), (j, w)
            starts.append(int(w[0]))
        assert len(set(starts)) == W  # each window once per epoch
