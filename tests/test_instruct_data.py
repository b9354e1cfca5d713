"""Instruct data: storygen's fields match their stories, instruct.detect_features against those
labels, and `pretokenize --instruct=true` shards (BOS + prompt + story + EOS, the instruction mask).

Run: .venv/bin/python -m pytest tests/test_instruct_data.py -q -s   (-s shows the detector table)
"""

import json
import re

import numpy as np
import pytest

import instruct
import storygen
import tinystories as ts

N_CHECK = 600
# Floors measured on N_CHECK stories of seed 0 (see the table this test prints): every detector
# is 1.00 in precision and recall on the built-in corpus (the moral's was 0.88 and 0.955 before
# it counted narration only).
FLOORS = {"dialogue": 0.95, "moral": 0.95, "twist": 0.9, "bad_ending": 0.9, "conflict": 0.9,
          "foreshadowing": 0.9}


@pytest.fixture(scope="module")
def records():
    return list(storygen.generate_records(N_CHECK, seed=0))


def test_fields_match_their_stories(records):
    counts = {f: 0 for f in instruct.FEATURES}
    for i, r in enumerate(records):
        text, feats = r["story"], set(r["features"])
        assert 3 <= len(r["words"]) <= 6, (i, r["words"])
        for w in r["words"]:
            assert w in text, f"story {i}: word {w!r} is not in the text"
        assert feats <= set(instruct.FEATURES), feats
        assert ("dialogue" in feats) == bool(re.search(r"“[^”]+”", text)), i
        assert ("moral" in feats) == any(m in text for m in storygen.MORALS), i
        assert r["sentence"] in text and r["sentence"][-1] in "。！？" and "“" not in r["sentence"], i
        assert r["summary"] and "\n" not in r["summary"] and r["summary"].endswith("。"), i
        for f in feats:
            counts[f] += 1
    # every feature occurs somewhere, foreshadowing included
    assert all(n >= 0.02 * len(records) for n in counts.values()), counts


def test_words_lead_their_kind(records):
    """A listed table word is the first word of its kind in its story (a second food, a later
    happy word are never listed), so an asked word always belongs in the first place of its kind."""
    kinds = storygen.WORD_KINDS
    topped = 0
    for i, r in enumerate(records):
        text = r["story"]
        lead = []
        for w in r["words"]:
            kind = kinds.get(w)  # None: a plot's own word (高高的滑梯, 学小鸟飞), no other of its kind
            rivals = [x for x, k in kinds.items() if k == kind and x != w and x in text] if kind else []
            lead.append(all(text.find(x) >= text.find(w) for x in rivals))
        # all lead, or a story with fewer than three such words topped up to three after them
        n = lead.index(False) if False in lead else len(lead)
        assert n == len(lead) or (n < 3 and len(lead) == 3 and not any(lead[n:])), (i, r["words"], lead)
        topped += n < len(lead)
    assert topped <= 0.01 * len(records), topped


def test_plot_features_are_really_there(records):
    made = [storygen.make_story(0, i) for i in range(len(records))]
    for s, r in zip(made, records):
        text, feats, plot = r["story"], set(r["features"]), s.template.__name__
        if "conflict" in feats:  # a refusal or a quarrel between the hero and a friend
            assert plot in ("_share", "_quarrel") and ("这是我的" in text or "吵了起来" in text)
        if "bad_ending" in feats:  # the thing is gone for good and the hero is sad at the end
            assert plot == "_warning"
            assert "再也" in text and ("哭" in text.split("\n")[-1] or "伤心" in text.split("\n")[-1])
        if "foreshadowing" in feats:  # a warning given early comes true
            assert "说：“" in text.split("\n")[1] and "想起了" in text.split("\n")[-1]
        if "twist" in feats:
            assert any(c in text for c in ("突然", "这时候", "原来")), text
        assert r["summary"].startswith(s.hero.name) or s.hero.name in r["summary"]


def test_summary_comes_from_the_plot(records):
    # The summary paraphrases the story, so it shares part of its character bigrams with it
    # (measured on seed 0: lowest 0.19, mean 0.52); an unrelated story scores far lower.
    scores = [instruct.summary_adherence(r["story"], r["summary"], "zh") for r in records]
    assert min(scores) >= 0.15 and sum(scores) / len(scores) >= 0.45, (min(scores), sum(scores) / len(scores))
    other = [instruct.summary_adherence(a["story"], b["summary"], "zh") for a, b in zip(records, records[1:])]
    assert sum(other) / len(other) < sum(scores) / len(scores) - 0.15


def test_detector_precision_recall(records):
    tp = {f: 0 for f in instruct.FEATURES}
    fp, fn = dict(tp), dict(tp)
    for r in records:
        labels, found = set(r["features"]), instruct.detect_features(r["story"], "zh")
        for f in instruct.FEATURES:
            tp[f] += f in labels and f in found
            fp[f] += f not in labels and f in found
            fn[f] += f in labels and f not in found
    print(f"\ninstruct.detect_features against storygen labels, {len(records)} stories (seed 0):")
    bad = []
    for f in instruct.FEATURES:
        p = tp[f] / max(tp[f] + fp[f], 1)
        r = tp[f] / max(tp[f] + fn[f], 1)
        print(f"  {f:<14} labelled {tp[f] + fn[f]:4d}  precision {p:.3f}  recall {r:.3f}")
        if min(p, r) < FLOORS[f]:
            bad.append((f, round(p, 3), round(r, 3)))
    assert not bad, bad


def test_every_moral_is_found_and_speech_is_not_one():
    # Each of storygen's morals, alone, is a moral; the cues they share with speech (我们要, 只要)
    # do not make a quoted line one.
    assert [m for m in storygen.MORALS if "moral" not in instruct.detect_features(m, "zh")] == []
    said = "小猫说：“我们要快一点，只要跑过去就到了。”小猫跑了过去。"
    assert "moral" not in instruct.detect_features(said, "zh")
    assert "moral" in instruct.detect_features(said + storygen.MORALS[0], "zh")


def test_records_round_trip_through_from_record(records):
    for r in records[:50]:
        ins = instruct.from_record({"story_zh": r["story"], **{k: r[k] for k in instruct.FIELDS}})
        assert ins.words == r["words"] and ins.features == r["features"]
        assert ins.summary == r["summary"] and ins.sentence == r["sentence"]


def test_synth_writes_the_fields(tmp_path):
    assert ts.main(["synth", f"--data_root={tmp_path}", "--n_stories=20", "--seed=3"]) == 0
    lines = (tmp_path / "synth" / "data00.jsonl").read_text("utf-8").splitlines()
    recs = [json.loads(x) for x in lines]
    want = list(storygen.generate_records(20, seed=3))
    assert [r["story_zh"] for r in recs] == [w["story"] for w in want]
    for got, w in zip(recs, want):
        assert list(got) == ["story_zh", "words", "features", "summary", "sentence"]
        assert all(got[k] == w[k] for k in instruct.FIELDS)


# ---------------------------------------------------------------------------------------------
# pretokenize --instruct=true

VOCAB = 600
N_SYNTH = 400


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A data root with 400 synth stories (with fields) and a tokenizer trained on them."""
    r = tmp_path_factory.mktemp("instruct")
    assert ts.main(["synth", f"--data_root={r}", f"--n_stories={N_SYNTH}", "--seed=1"]) == 0
    assert ts.main(["train_vocab", f"--data_root={r}", "--dataset=synth", f"--vocab_size={VOCAB}"]) == 0
    return r


def pretokenize(root, *args, dataset="synth"):
    assert ts.main(["pretokenize", f"--data_root={root}", f"--dataset={dataset}", f"--vocab_size={VOCAB}",
                    "--workers=1", "--force=true", *args]) == 0
    return root / f"tok{VOCAB}"


def sp_of(root):
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=str(root / f"tok{VOCAB}.model"))


def framed(out, name):
    """[(ids, flags)] per story of shard `name`: BOS ... EOS, flags from the .mask beside it."""
    head, tokens = ts.read_shard(out / name)
    mask = ts.read_mask(out / name, head)
    toks = np.asarray(tokens, dtype=np.int64)
    flags = np.zeros(toks.size, dtype=np.uint8) if mask is None else np.asarray(mask)
    assert set(np.unique(flags)) <= {0, ts.MASK_INSTRUCTION}
    bos, eos = 1, 2
    starts, ends = np.flatnonzero(toks == bos), np.flatnonzero(toks == eos)
    assert len(starts) == len(ends) == head["n_stories"]
    return [(toks[s:e + 1], flags[s:e + 1]) for s, e in zip(starts, ends)]


def expected_prompts(path, ins_cfg, val_fraction=0.01):
    """(story, prompt) of the train stories of one source file, as pretokenize must choose them."""
    counts = {"bad_fields": 0}
    out = []
    for k, (story, obj) in enumerate(ts.iter_file_records(path, problems=ts.ProblemLog(False))):
        if not ts.is_val_story(story, val_fraction):
            out.append((story, ts.story_prompt(obj, ins_cfg, k, counts, story)))
    return out


def test_instruct_shards_are_bos_prompt_story_eos_with_the_mask(root):
    out = pretokenize(root, "--instruct=true", "--instruct_share=0.5")
    sp = sp_of(root)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["instruct"] == {"lang": "zh", "share": 0.5, "loss_on_instruction": False, "seed": 0,
                                "max_tokens": 128, "mask_version": 1}
    want = expected_prompts(root / "synth" / "data00.jsonl", {**meta["instruct"], "file_index": 0})
    got = framed(out, "train_000.bin")
    assert len(got) == len(want)
    n_prompts = 0
    for (ids, flags), (story, prompt) in zip(got, want):
        p = sp.encode(prompt) if prompt else []
        if len(p) > 128:
            p = []  # too long: written plain
        # BOS + prompt + story + EOS, each encoded on its own, as ./run -i and sample.py do
        assert ids.tolist() == [sp.bos_id()] + p + sp.encode(story) + [sp.eos_id()]
        assert flags.tolist() == [0] + [1] * len(p) + [0] * (len(ids) - 1 - len(p))
        if p:
            n_prompts += 1
            assert sp.decode(p) == prompt and prompt.endswith("故事：")
    # the share is respected (0.5 of stories with fields, binomial spread on ~400)
    assert 0.38 <= n_prompts / len(got) <= 0.62, n_prompts
    # val gets the same treatment and its own mask
    framed(out, "val.bin")  # framed like train, with its own val.mask


def test_vocabulary_covers_the_template(root):
    """train_vocab reads the records' instructions too, so the labels are pieces, not bytes."""
    sp = sp_of(root)
    prompt = instruct.render_prompt(instruct.Instruction(["小猫"], ["dialogue", "moral"], "小猫笑了。", "小猫笑了。"), "zh")
    pieces = sp.encode(prompt, out_type=str)
    assert not [p for p in pieces if p.startswith("<0x") and p != "<0x0A>"], pieces


def test_instruct_windows_start_at_each_story(root):
    """Instruct shards are cut shortly before the BOS of each story, with an instruction or plain,
    each once an epoch (so a share below 1 trains BOS + story too); a plain shard beside them keeps
    its windows at multiples of max_seq_len."""
    out = pretokenize(root, "--instruct=true", "--instruct_share=0.5")
    T = 64
    tb = ts.TokenBatches(out, "train", 1, T, seed=3)
    head, tokens = ts.read_shard(out / "train_000.bin")
    toks = np.asarray(tokens, dtype=np.int64)
    flags = np.asarray(ts.read_mask(out / "train_000.bin", head)).astype(bool)
    want = {int(p) for p in np.flatnonzero(toks == 1) if p + T + 1 <= toks.size}
    asked = {p for p in want if flags[p + 1]}
    assert asked and want - asked  # both kinds of story at a half share
    assert tb.n_windows == len(want)  # the one train shard of this corpus
    for epoch in range(2):
        seen, leads = [], set()
        for j in range(epoch * tb.n_windows, (epoch + 1) * tb.n_windows):
            w, m = tb.window(j), tb.window_mask(j)
            _, start = tb._locate(j)
            bos = min(p for p in want if p >= start)
            lead = bos - start
            assert 0 <= lead <= T // 4, (start, bos)
            assert w[lead] == 1 and not m[lead]  # a story's BOS
            assert bool(m[lead + 1]) == (bos in asked)  # then its instruction, if it has one
            seen.append(bos)
            leads.add(lead)
        assert sorted(seen) == sorted(want)
        assert len(leads) > 1  # the lead varies: some rows begin inside the story before
    # a plain shard (no .mask) in the same folder keeps offset windows
    plain = out / "train_001.bin"
    ts.write_shard(plain, np.arange(5 * T) % 500 + 3, vocab_size=head["vocab_size"],
                   tokenizer_hash=head["tokenizer_hash"], n_stories=1)
    tb = ts.TokenBatches(out, "train", 1, T, seed=3)
    assert tb.n_windows == len(want) + (5 * T - T) // T


def test_instruction_words_are_the_same_pieces_in_prompt_and_story(tmp_path):
    """train_vocab marks the edges of the records' words, so a word asked in a prompt is spelled
    with the pieces the story spells it with (BPE learns no piece across its edge, such as 园里
    or 开心极了). A corpus big enough for such merges: with the edges marked 0.97 of the words
    match here, without them 0.81 (measured when the marks were added)."""
    assert ts.main(["synth", f"--data_root={tmp_path}", "--n_stories=3000", "--seed=1"]) == 0
    assert ts.main(["train_vocab", f"--data_root={tmp_path}", "--dataset=synth", "--vocab_size=1500"]) == 0
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok1500.model"))
    same = total = 0
    for r in storygen.generate_records(300, seed=1):
        prompt = instruct.render_prompt(instruct.Instruction(words=r["words"][:3]), "zh")
        for w in r["words"][:3]:
            total += 1
            same += _pieces_of(sp, prompt, w) == _pieces_of(sp, r["story"], w)
    assert same / total >= 0.9, same / total


def _pieces_of(sp, text, word):
    """The pieces that spell the first occurrence of word in text as sp encodes the whole text."""
    ids = sp.encode(text)
    raw = b" " + text.encode()  # the dummy prefix
    at, end, pos, out = raw.index(word.encode()), raw.index(word.encode()) + len(word.encode()), 0, []
    for i in ids:
        piece = sp.id_to_piece(i)
        n = 1 if piece.startswith("<0x") and piece.endswith(">") else len(piece.replace("\u2581", " ").encode())
        if pos + n > at and pos < end:
            out.append(piece)
        pos += n
    return out


def test_instruct_deterministic_and_loader_masks_targets(root):
    out = pretokenize(root, "--instruct=true")
    first = [(out / n).read_bytes() for n in ("train_000.bin", "train_000.mask", "val.mask")]
    out = pretokenize(root, "--instruct=true")
    assert [(out / n).read_bytes() for n in ("train_000.bin", "train_000.mask", "val.mask")] == first
    got = framed(out, "train_000.bin")
    assert sum(f.any() for _, f in got) >= 0.9 * len(got)  # share 1.0: all but the too-long ones
    tb = ts.TokenBatches(out, "train", 4, 64, seed=0)
    assert tb.mask_instructions and tb.instruct["lang"] == "zh"
    for step in range(5):
        x, y = tb.get(step)
        for b in range(4):
            j = tb.micro_index(step, 0) * 4 + b
            w, m = tb.window(j), tb.window_mask(j)
            assert x[b].tolist() == w[:-1].tolist()
            assert y[b].tolist() == [-1 if f else int(t) for t, f in zip(w[1:], m[1:])]
    # --instruct_loss=true: the mask is still written, but nothing is left out of the loss
    out = pretokenize(root, "--instruct=true", "--instruct_loss=true")
    tb = ts.TokenBatches(out, "train", 4, 64, seed=0)
    assert not tb.mask_instructions and (out / "train_000.mask").exists()
    assert int((tb.get(0)[1] == -1).sum()) == 0


def test_instruction_longer_than_the_limit_stays_plain(root, capsys):
    out = pretokenize(root, "--instruct=true", "--instruct_max_tokens=3")
    err = capsys.readouterr().err
    assert "longer than --instruct_max_tokens=3 tokens were left out; those stories are plain" in err
    assert not any(f.any() for _, f in framed(out, "train_000.bin"))
    assert ts.main(["pretokenize", f"--data_root={root}", "--dataset=synth", f"--vocab_size={VOCAB}",
                    "--instruct=true", "--instruct_share=0"]) == 1
    assert "--instruct_share=0.0: must be in (0, 1]" in capsys.readouterr().err


def test_plain_pretokenize_writes_no_mask(root):
    out = pretokenize(root)
    assert not list(out.glob("*.mask")) and "instruct" not in json.loads((out / "meta.json").read_text())
    tb = ts.TokenBatches(out, "train", 2, 32, seed=0)
    assert not tb.mask_instructions and tb.instruct is None


def test_bad_fields_give_a_plain_story_and_one_warning(root, tmp_path, capsys):
    data = tmp_path / "mine"
    data.mkdir()
    good = storygen.story_record(5, 0)
    recs = [{"story": "从前有一只小猫。它很开心。", "words": "小猫", "features": ["dialogue"]},  # words not a list
            {"story": good["story"], "words": good["words"], "features": good["features"]},
            {"story": "小狗在草地上跑来跑去。", "features": {"x": 1}},  # features not a list
            {"story": "没有字段的故事。"}]
    (data / "a.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), "utf-8")
    dr = tmp_path / "root"
    dr.mkdir()
    for suffix in (".model", ".vocab"):
        (dr / f"tok{VOCAB}{suffix}").write_bytes((root / f"tok{VOCAB}{suffix}").read_bytes())
    assert ts.main(["pretokenize", f"--data_root={dr}", f"--data_dir={data}", f"--vocab_size={VOCAB}",
                    "--workers=1", "--instruct=true", "--val_fraction=0"]) == 0
    err = capsys.readouterr().err
    assert "2 records had unusable instruct fields" in err and "Traceback" not in err
    got = framed(dr / f"tok{VOCAB}", "train_000.bin")
    assert [bool(f.any()) for _, f in got] == [False, True, False, False]


def test_english_tinystories_records(root, tmp_path, capsys):
    """--dataset=en: TinyStories_all_data's layout, instruction {prompt:, words, features} + summary."""
    dr = tmp_path / "root"
    (dr / "en").mkdir(parents=True)
    for suffix in (".model", ".vocab"):
        (dr / f"tok{VOCAB}{suffix}").write_bytes((root / f"tok{VOCAB}{suffix}").read_bytes())
    recs = [{"story": f"Tom had a red ball {i}. \"Look!\" he said. He learned to share.",
             "instruction": {"prompt:": "Write a short story ...", "words": ["ball", "red", "share"],
                             "features": ["Dialogue", "MoralValue"]},
             "summary": "Tom learns to share his ball.", "source": "GPT-4"} for i in range(30)]
    (dr / "en" / "data00.json").write_text(json.dumps(recs), "utf-8")
    out = pretokenize(dr, "--instruct=true", "--val_fraction=0", dataset="en")
    assert json.loads((out / "meta.json").read_text())["instruct"]["lang"] == "en"
    sp = sp_of(dr)
    got = framed(out, "train_000.bin")
    assert len(got) == 30
    for (ids, flags), rec in zip(got, recs):
        n = int(flags.sum())
        assert n > 0
        prompt = sp.decode(ids[1:1 + n].tolist())
        assert prompt.endswith("Story:") and sp.decode(ids[1 + n:-1].tolist()) == rec["story"]
        assert set(re.findall(r"Words: (.*)", prompt)[0].split(", ") if "Words:" in prompt else []) <= {"ball", "red", "share"}
        feats = re.findall(r"Features: (.*)", prompt)
        assert not feats or set(feats[0].split(", ")) <= {"Dialogue", "MoralValue"}  # a subset of the record's


def test_translated_records_ask_only_for_what_the_story_holds():
    """A zh record that kept the English instruction: its English words and summary are dropped,
    its features kept; a record with nothing left stays plain."""
    cfg = {"lang": "zh", "share": 1.0, "seed": 0, "file_index": 0}
    story = "小猫说：“你好！”它学会了分享。"
    rec = {"story_zh": story, "instruction": {"words": ["cat", "share"], "features": ["Dialogue"]},
           "summary": "A cat learns to share."}
    counts = {"bad_fields": 0}
    prompts = {ts.story_prompt(rec, cfg, k, counts, story) for k in range(20)}
    assert prompts == {"特点：对话\n故事："}
    rec2 = {"story_zh": story, "instruction": {"words": ["cat"], "features": []}, "summary": "A cat."}
    assert ts.story_prompt(rec2, cfg, 0, counts, story) == "" and counts["bad_fields"] == 0
