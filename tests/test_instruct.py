"""instruct.py: the instruction template, the held-out combinations and the feature detectors."""

import random

import pytest

import instruct
from instruct import Instruction, InstructError


def test_the_prompt_has_one_line_per_field_in_a_fixed_order():
    ins = instruct.make_instruction(words="苹果, 跑，开心", features="寓意,对话", summary="小明找到了皮球。")
    assert instruct.render_prompt(ins, "zh") == "词语：苹果，跑，开心\n特点：寓意，对话\n摘要：小明找到了皮球。\n故事："
    ins = instruct.make_instruction(words="apple,run", features="Dialogue")
    assert instruct.render_prompt(ins, "en") == "Words: apple, run\nFeatures: Dialogue\nStory:"


@pytest.mark.parametrize("kw, message", [
    ({}, "needs at least one of"),
    ({"words": " , ，"}, "needs at least one of"),
    ({"features": "魔法"}, "unknown feature '魔法'"),
    ({"summary": "one\ntwo"}, "one line each"),
])
def test_requests_that_cannot_work_are_refused(kw, message):
    with pytest.raises(InstructError, match=message):
        instruct.make_instruction(**kw)


def test_feature_names_in_any_spelling():
    assert [instruct.feature_id(n) for n in ("对话", "Dialogue", "dialogue", "BadEnding", "坏结局")] == \
        ["dialogue", "dialogue", "dialogue", "bad_ending", "bad_ending"]


def test_training_never_asks_for_a_held_out_triple():
    words = ["苹果", "跑", "开心", "小猫", "花园", "皮球"]
    full = Instruction(words, ["dialogue"], "小猫在花园里找到了皮球。", "小猫笑了。")
    rng = random.Random(0)
    asked = [instruct.training_instruction(full, rng) for _ in range(2000)]
    assert all(not a.empty() for a in asked)
    assert not any(instruct.held_out(a.words) for a in asked)
    assert any(len(a.words) == 3 for a in asked) and any(a.summary for a in asked)
    # words are asked nine times in ten, the other fields one time in two (with sampling noise)
    assert 0.86 < sum(bool(a.words) for a in asked) / len(asked) < 0.94
    assert 0.45 < sum(bool(a.summary) for a in asked) / len(asked) < 0.58
    assert any(not a.words and a.features for a in asked), "a request without words is still seen"
    # features are a random non-empty subset, so a lone feature is asked as in training
    assert any(a.features == ["dialogue"] for a in asked)
    full2 = Instruction(words, ["dialogue", "moral"], "", "")
    subsets = {tuple(instruct.training_instruction(full2, rng).features) for _ in range(300)}
    assert {("moral",), ("dialogue",), ("dialogue", "moral")} <= subsets
    held = [t for t in ([a, b, c] for a in words for b in words for c in words if len({a, b, c}) == 3)
            if instruct.held_out(t)]
    assert held, "some triples of these words are held out"


def test_detectors_and_adherence():
    story = "小明在花园里玩。突然，他的皮球不见了。“我的皮球呢？”他说。后来他懂得了要把东西收好。"
    assert instruct.detect_features(story, "zh") >= {"dialogue", "twist", "moral"}
    assert "bad_ending" not in instruct.detect_features(story, "zh")
    assert instruct.has_word(story, "皮球", "zh") and not instruct.has_word(story, "苹果", "zh")
    assert instruct.has_word("Tom was running home.", "run", "en")
    assert not instruct.has_word("Tom was brunning.", "run", "en")
    assert instruct.summary_adherence(story, "他的皮球", "zh") == 1.0  # 他的 的皮 皮球
    assert instruct.summary_adherence(story, "小明的皮球", "zh") == 0.75  # 明的 is not in it
    assert instruct.summary_adherence(story, "。", "zh") is None


def test_records_of_both_data_sets():
    ours = {"story": "…", "words": ["苹果"], "features": ["dialogue"], "summary": "s", "sentence": ""}
    assert instruct.from_record(ours) == Instruction(["苹果"], ["dialogue"], "s", "")
    en = {"story": "…", "instruction": {"prompt:": "…", "words": ["jump", "cat"],
                                        "features": ["Dialogue", "Twist", "Rhyme"]},
          "summary": "A cat jumps.", "source": "GPT-4"}
    assert instruct.from_record(en) == Instruction(["jump", "cat"], ["dialogue", "twist"], "A cat jumps.", "")
    assert instruct.from_record({"story": "plain"}) is None
