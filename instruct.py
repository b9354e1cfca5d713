"""Stories written to a request (TinyStories-Instruct): the one home of the instruction template,
the feature names, the feature detectors and the held-out combinations.

An instruction is a few lines before the story, one per field given, in a fixed order, then the
story's own label; the model learns to write the story after it:

    词语：苹果，跑，开心          Words: apple, run, happy
    特点：对话，寓意              Features: Dialogue, MoralValue
    摘要：小明丢了皮球……          Summary: Tom loses his ball ...
    句子：……                      Sentence: ...
    故事：                        Story:

The prompt is the text up to and including `故事：` / `Story:`; the story follows directly
(pretokenize encodes the two separately, so the prompt's tokens are exactly what `./run` and
sample.py encode from the same text). During training each story gets a random subset of its
fields, as the TinyStories paper did, so any combination can be asked for later. docs/formats.md
records the template; run.c carries the same strings.
Kept free of torch and sentencepiece so the data stages and the tests use it directly.
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass, field
from typing import Optional

from options import UserError

FIELDS = ("words", "features", "summary", "sentence")  # the order they appear in a prompt

# Per language: the label of each field, the story's label, and the separator between words.
TEMPLATES = {
    "zh": {"words": "词语：", "features": "特点：", "summary": "摘要：", "sentence": "句子：",
           "story": "故事：", "sep": "，"},
    "en": {"words": "Words: ", "features": "Features: ", "summary": "Summary: ",
           "sentence": "Sentence: ", "story": "Story:", "sep": ", "},
}

# Feature id -> (Chinese name, English name as the English TinyStories records spell it).
FEATURES = {
    "dialogue": ("对话", "Dialogue"),
    "moral": ("寓意", "MoralValue"),
    "twist": ("转折", "Twist"),
    "bad_ending": ("坏结局", "BadEnding"),
    "conflict": ("冲突", "Conflict"),
    "foreshadowing": ("伏笔", "Foreshadowing"),
}
_FEATURE_BY_NAME = {name.lower(): fid for fid, names in FEATURES.items() for name in (fid, *names)}


class InstructError(UserError):
    pass


@dataclass
class Instruction:
    """What a story should contain; empty fields are left out of the prompt."""
    words: list[str] = field(default_factory=list)
    features: list[str] = field(default_factory=list)  # feature ids (FEATURES keys)
    summary: str = ""
    sentence: str = ""

    def empty(self) -> bool:
        return not (self.words or self.features or self.summary or self.sentence)


def feature_id(name: str) -> str:
    """A feature given in any spelling (对话, Dialogue, dialogue) -> its id; InstructError if unknown."""
    fid = _FEATURE_BY_NAME.get(name.strip().lower())
    if fid is None:
        known = ", ".join(f"{zh} ({en})" for zh, en in FEATURES.values())
        raise InstructError(f"unknown feature {name!r}; features: {known}")
    return fid


def split_list(text: str) -> list[str]:
    """`苹果,跑，开心` -> ['苹果', '跑', '开心']: ASCII or full-width commas, spaces trimmed."""
    return [w.strip() for w in re.split(r"[,，、]", text) if w.strip()]


def make_instruction(words: str = "", features: str = "", summary: str = "", sentence: str = "") -> Instruction:
    """An Instruction from command-line strings, with one clear error for what cannot work."""
    ins = Instruction(split_list(words), [feature_id(f) for f in split_list(features)],
                      summary.strip(), sentence.strip())
    for w in ins.words:
        if "\n" in w:
            raise InstructError(f"word {w!r}: a word cannot hold a line break")
    if "\n" in ins.summary or "\n" in ins.sentence:
        raise InstructError("--summary and --sentence must be one line each")
    if ins.empty():
        raise InstructError("an instruction needs at least one of words, features, summary, sentence")
    return ins


def render_prompt(ins: Instruction, lang: str) -> str:
    """The prompt text for ins: one line per given field, then the story's label."""
    t = TEMPLATES[lang]
    lines = []
    if ins.words:
        lines.append(t["words"] + t["sep"].join(ins.words))
    if ins.features:
        names = [FEATURES[f][0 if lang == "zh" else 1] for f in ins.features]
        lines.append(t["features"] + t["sep"].join(names))
    if ins.summary:
        lines.append(t["summary"] + ins.summary)
    if ins.sentence:
        lines.append(t["sentence"] + ins.sentence)
    lines.append(t["story"])
    return "\n".join(lines)


def template_lines(ins: Instruction, lang: str) -> list[str]:
    """Text for the tokenizer's training: the prompt lines of ins's words and features, and every
    field label (a summary's or sentence's text is the story's own and stays out)."""
    t = TEMPLATES[lang]
    return [t["summary"], t["sentence"], *render_prompt(Instruction(ins.words, ins.features), lang).split("\n")]


# ---------------------------------------------------------------------------------------------
# Training: a random subset of a story's own fields, never a held-out word combination.

def held_out(words: list[str]) -> bool:
    """True for the word triples kept out of training by construction (1 in 8 of all triples),
    so evaluation can ask for combinations the model never saw together."""
    if len(words) != 3:
        return False
    return zlib.crc32("|".join(sorted(words)).encode("utf-8")) % 8 == 0


# How often a training prompt asks for words, and for each other field. Words are asked far more
# often than the rest: copying an asked word from the prompt into its place in the story is the
# skill a small model learns last, and it forms sooner the more asked words it sees (BENCHMARKS.md,
# "Stories on request"); the other fields keep one chance in two, so any combination is still seen.
WORDS_SHARE = 0.9
FIELD_SHARE = 0.5


def training_instruction(full: Instruction, rng: random.Random) -> Instruction:
    """A random subset of full's fields (words with probability WORDS_SHARE, the others each with
    FIELD_SHARE, at least one present one), with up to three of its words and a random non-empty
    subset of its features, so that a request for any one feature looks like prompts seen in
    training (every built-in story has dialogue: asking for all of them would always start the
    list with 对话). A held-out triple is asked as its first two words."""
    present = [f for f in FIELDS if getattr(full, f)]
    if not present:
        return Instruction()
    keep = {f: rng.random() < (WORDS_SHARE if f == "words" else FIELD_SHARE) for f in FIELDS}
    if not any(keep[f] for f in present):
        keep[present[int(rng.random() * len(present))]] = True
    words = rng.sample(full.words, min(3, len(full.words))) if keep["words"] else []
    if held_out(words):
        words = words[:2]
    features = []
    if keep["features"] and full.features:
        features = [f for f in full.features if rng.random() < 0.5] or [rng.choice(full.features)]
    return Instruction(words, features,
                       full.summary if keep["summary"] else "",
                       full.sentence if keep["sentence"] else "")


# ---------------------------------------------------------------------------------------------
# Detectors: does a story have a feature? Checked against storygen's own labels in the tests.

_DIALOGUE = {"zh": re.compile(r"“[^”]+”"), "en": re.compile(r"\"[^\"]+\"|“[^”]+”")}
_CUES = {
    "zh": {
        # Looked for in narration only (_NARRATED_ONLY): 我们要, 只要 and 希望 are common in speech.
        # 从那以后 and 从此以后 are left out: they open a change of habit (从那以后，她每次都把球收好),
        # not a lesson.
        "moral": ("懂得了", "明白了", "知道了", "学会了", "这个道理",
                  "只要", "就一定", "要有耐心", "我们要", "要认真", "要互相", "不要着急", "就要",
                  "才行", "其实并不", "也会很快乐", "让大家都", "大家都开心", "比一个人", "是最好的礼物",
                  "也多了", "越来越好", "就会发现", "要放回", "要和朋友", "希望", "要小心",
                  "自己做", "是一件快乐的事"),
        "twist": ("突然", "忽然", "没想到", "原来", "这时候", "就在这时"),
        "bad_ending": ("再也没有找到", "哭了起来", "很难过", "伤心地回家", "再也不能", "只好回家"),
        "conflict": ("吵", "抢", "不肯", "生气", "不愿意", "不同意", "这是我的"),
        "foreshadowing": ("想起", "果然", "记得"),
    },
    "en": {
        "moral": ("learned", "lesson", "from that day", "always remember", "the moral"),
        "twist": ("suddenly", "but then", "to their surprise", "turned out"),
        "bad_ending": ("never saw", "was sad forever", "never came back", "cried and cried", "the end was sad"),
        "conflict": ("argued", "fight", "angry", "did not want to share", "refused"),
        "foreshadowing": ("remembered", "just as", "knew that one day"),
    },
}


# Features whose cues count only outside quotes: a Chinese story states its moral in narration.
# (English TinyStories often give the lesson in a parent's words, so there speech counts too.)
_NARRATED_ONLY = {"zh": {"moral"}, "en": set()}


def detect_features(story: str, lang: str) -> set[str]:
    """The feature ids a story shows by its surface cues (docs/evaluation.md lists them)."""
    found = set()
    if _DIALOGUE[lang].search(story):
        found.add("dialogue")
    # 原来的 is "the original" (放回原来的地方), not the 原来 of a revelation.
    low = story.lower() if lang == "en" else story.replace("原来的", "")
    narration = _DIALOGUE[lang].sub("|", low)
    for fid, cues in _CUES[lang].items():
        text = narration if fid in _NARRATED_ONLY[lang] else low
        if any(c in text for c in cues):
            found.add(fid)
    return found


def has_word(story: str, word: str, lang: str) -> bool:
    """A required word is present: as a substring in Chinese; in English as a word, allowing the
    usual inflections (run -> runs, running; an irregular ran is not caught)."""
    if lang == "zh":
        return word in story
    w = word.lower()
    doubled = f"(?:{re.escape(w[-1])})?" if w else ""  # run -> running, stop -> stopped
    pattern = rf"\b{re.escape(w)}(?:s|es|d|{doubled}(?:ed|ing|er|est))?\b"
    return re.search(pattern, story.lower()) is not None


def content_words(text: str, lang: str) -> list[str]:
    """The words of a summary that adherence counts: Chinese character bigrams without
    punctuation, English words of three letters or more."""
    if lang == "zh":
        chars = re.sub(r"[^\u4e00-\u9fff]", " ", text).split()
        return [run[i:i + 2] for run in chars for i in range(len(run) - 1)]
    return [w for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 3]


def summary_adherence(story: str, summary: str, lang: str) -> Optional[float]:
    """Share of the summary's content words found in the story (None for an empty summary)."""
    words = content_words(summary, lang)
    if not words:
        return None
    hay = story.lower() if lang == "en" else story
    return sum(w in hay for w in words) / len(words)


# ---------------------------------------------------------------------------------------------
# Reading the fields a data set's record carries.

def from_record(rec: dict) -> Optional[Instruction]:
    """The Instruction a jsonl record carries, or None when it has no instruct fields.

    Our synth records hold `words`, `features` (ids), `summary`, `sentence` at the top level. The
    English TinyStories records hold `instruction: {words, features}` and `summary`; features are
    spelled as in FEATURES' English names. Unknown feature names are dropped, not guessed."""
    inner = rec.get("instruction") if isinstance(rec.get("instruction"), dict) else {}
    words = rec.get("words", inner.get("words", []))
    feats = rec.get("features", inner.get("features", []))
    summary = rec.get("summary", "")
    sentence = rec.get("sentence", "")
    if not isinstance(words, list) or not isinstance(feats, list):
        return None
    ins = Instruction([w.strip() for w in words if isinstance(w, str) and w.strip()],
                      [_FEATURE_BY_NAME[f.strip().lower()] for f in feats
                       if isinstance(f, str) and f.strip().lower() in _FEATURE_BY_NAME],
                      summary.strip() if isinstance(summary, str) else "",
                      sentence.strip() if isinstance(sentence, str) else "")
    return None if ins.empty() else ins
