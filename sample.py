"""Sample stories from a trained model: a train.py checkpoint (.pt) or any model .bin (versions 0-3).

    python sample.py                                             # out/ckpt.pt, empty prompt
    python sample.py --checkpoint=out/ckpt.pt --prompt="从前，有一个小女孩" --num_samples=3
    python sample.py --checkpoint=stories15M.bin --tokenizer=data/tok5000.model --temperature=0 --steps=100
    python sample.py --checkpoint=out/model.bin --seed=42 --top_p=0.9 --top_k=40
    python sample.py --words=苹果,跑 --features=对话 --summary="小明找到了皮球。"   # a story on request

A story on request (--words, --features, --summary, --sentence; a model trained with
`pretokenize --instruct=true`) starts from the prompt instruct.render_prompt writes, in the
language the checkpoint's data record (or a version 3 .bin's prompt_format) names, byte for byte
what pretokenize encoded; a model trained without instructions is refused, not asked.

The sampling options are the C engine's (`./run model.bin -t 1.0 -p 0.9 -k 0 -s 0 -n 256 -i PROMPT`):
temperature (0 = greedy), top_p (1 = off), top_k (0 = off), seed (0 = from the clock), steps
(tokens to generate; 0 = up to max_seq_len; --max_new_tokens is the same option). Each sample is
the prompt followed by its continuation, which stops at EOS (or a BOS, as run.c does).
Samples are separated by a line of dashes; timing goes to stderr.

From Python:

    from sample import generate_text
    texts = generate_text(model, tok, "从前", num_samples=2, steps=50, temperature=0.8, seed=1)
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

import export
from model import Transformer, pick_device
from options import OptionError, UserError, apply_options, cli, opt, render_help

SEPARATOR = "-" * 40
INSTRUCT_OPTIONS = ("words", "features", "summary", "sentence")
# The smallest positive temperature: float32's smallest normal number. A denormal one (1e-45) is a
# typo, not a choice, and 0 already means greedy.
MIN_TEMPERATURE = 1.1754943508222875e-38


@dataclass
class SampleConfig:
    checkpoint: str = opt("out/ckpt.pt", "train.py checkpoint (.pt) or a model .bin of version 0-3")
    tokenizer: str = opt("", "sentencepiece .model; \"\" = the checkpoint's (its config's tokenizer / data_dir), "
                             "else tok<vocab_size>.model beside the checkpoint, else data/tok<vocab_size>.model")
    prompt: str = opt("", "the story's beginning")
    words: str = opt("", "instruct: words the story must use, comma separated (苹果,跑)")
    features: str = opt("", "instruct: features it must have, Chinese or English names (对话,寓意 or Dialogue)")
    summary: str = opt("", "instruct: a one-line summary of the story")
    sentence: str = opt("", "instruct: a sentence it must contain")
    num_samples: int = opt(1, "samples, generated together as one batch")
    steps: int = opt(256, "tokens to generate per sample; 0 = up to max_seq_len (--max_new_tokens is the same)")
    temperature: float = opt(1.0, "0 = greedy")
    top_p: float = opt(0.9, "nucleus sampling mass in (0, 1]; 1 = off")
    top_k: int = opt(0, "keep the k most likely tokens; 0 = off")
    seed: int = opt(0, "0 = from the clock")
    device: str = opt("auto", "auto (cuda if present, else cpu) | cpu | cuda | cuda:N | mps")


def check_config(cfg: SampleConfig) -> None:
    problems = []
    if cfg.num_samples < 1:
        problems.append(f"--num_samples={cfg.num_samples} must be >= 1")
    if cfg.steps < 0:
        problems.append(f"--steps={cfg.steps} must be >= 0")
    if not (cfg.temperature == 0.0 or MIN_TEMPERATURE <= cfg.temperature < math.inf):  # also rejects nan
        problems.append(f"--temperature={cfg.temperature} must be 0 (greedy) or a finite number "
                        f">= {MIN_TEMPERATURE:.3g} (float32's smallest normal)")
    if not 0.0 < cfg.top_p <= 1.0:
        problems.append(f"--top_p={cfg.top_p} must be in (0, 1]")
    if cfg.top_k < 0:
        problems.append(f"--top_k={cfg.top_k} must be >= 0")
    if cfg.seed < 0:
        problems.append(f"--seed={cfg.seed} must be >= 0")
    for name in ("prompt",) + INSTRUCT_OPTIONS:
        try:
            getattr(cfg, name).encode("utf-8")
        except UnicodeEncodeError as e:
            # The OS hands undecodable argument bytes to Python as lone surrogates (PEP 383).
            bad = getattr(cfg, name)[e.start]
            shown = f"byte {ord(bad) - 0xDC00:#04x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"U+{ord(bad):04X}"
            problems.append(f"--{name} is not valid UTF-8 ({shown} at character {e.start})")
    if problems:
        raise OptionError("; ".join(problems))


def instruction_of(cfg: SampleConfig, argv: list[str] = ()) -> Optional["instruct.Instruction"]:
    """The request the instruct options make, None when none is given; an InstructError for one
    that cannot work (an empty --words= given on purpose, an unknown feature, a line break)."""
    import instruct
    given = {name for name in INSTRUCT_OPTIONS for a in argv if a.split("=", 1)[0].replace("-", "_") == f"__{name}"}
    if not given and not any(getattr(cfg, name) for name in INSTRUCT_OPTIONS):
        return None
    if "words" in given and not instruct.split_list(cfg.words):
        raise instruct.InstructError(f"--words={cfg.words!r} names no word; give words separated by commas")
    if cfg.prompt:
        raise instruct.InstructError("--prompt and an instruction do not mix: the story starts after the instruction")
    return instruct.make_instruction(cfg.words, cfg.features, cfg.summary, cfg.sentence)


def instruct_lang(info: dict, model_path: str) -> str:
    """The instruction language a model was trained with (info as export.load_checkpoint's);
    a one-line UserError for a model trained without instructions."""
    lang = export.PROMPT_LANGS.get(info.get("prompt_format", export.PROMPT_PLAIN))
    if lang is None:
        raise UserError(f"{model_path}: trained without instructions (its record names no instruct "
                        f"language), so it cannot take --words/--features/--summary/--sentence; "
                        f"train on pretokenize --instruct=true data")
    return lang


def instruct_prompt_ids(tok, ins, lang: str, max_seq_len: int) -> tuple[str, list[int]]:
    """The prompt text for ins and its ids (BOS first), as pretokenize encodes them; a UserError
    when the instruction leaves no room for a story in the context."""
    import instruct
    text = instruct.render_prompt(ins, lang)
    ids = tok.encode(text, bos=True)
    if len(ids) >= max_seq_len:
        raise UserError(f"the instruction is {len(ids)} tokens (BOS included), leaving no room for a story in "
                        f"the model's max_seq_len={max_seq_len}; ask for less")
    return text, ids


def find_tokenizer(cfg: SampleConfig, config: dict, vocab_size: int) -> str:
    if cfg.tokenizer:
        if not os.path.isfile(cfg.tokenizer):
            raise UserError(f"{cfg.tokenizer}: no such tokenizer file")
        return cfg.tokenizer
    beside = os.path.join(os.path.dirname(os.path.abspath(cfg.checkpoint)), f"tok{vocab_size}.model")
    found = export.default_tokenizer(config, vocab_size)
    if found is None and os.path.isfile(beside):
        found = beside
    if found is None:
        raise UserError(f"{cfg.checkpoint}: no tokenizer found for vocab_size {vocab_size} "
                          f"(pass --tokenizer=data/tok{vocab_size}.model)")
    return found


def load_tokenizer(path: str, *, vocab_size: int, expected_hash: int = 0, model_path: str = "the model file"):
    """tokenizer.Tokenizer for path, checked against the model's vocab size and the hash model_path
    records (a .bin's header or a checkpoint's data record; 0 = not recorded)."""
    import tokenizer as tokenizer_mod  # imported lazily: only sampling needs it
    try:
        tok = tokenizer_mod.Tokenizer(path)
    except tokenizer_mod.TokenizerError as e:
        raise UserError(str(e)) from None
    if tok.vocab_size != vocab_size:
        raise UserError(f"{path}: tokenizer has {tok.vocab_size} tokens but the model's vocab_size "
                          f"is {vocab_size}; pass the tokenizer it was trained with")
    export.check_tokenizer_identity(model_path=model_path, recorded=expected_hash, tokenizer_path=path,
                                    actual=tok.hash())
    return tok


@torch.inference_mode()
def generate_ids(model: Transformer, prompt_ids: list[int], *, num_samples: int = 1, steps: int = 256,
                 temperature: float = 1.0, top_p: float = 0.9, top_k: int = 0, seed: int = 0,
                 eos_id: Optional[int] = None, bos_id: Optional[int] = None) -> list[list[int]]:
    """The continuations (generated ids only) of prompt_ids, one list per sample, each cut before
    the first EOS or BOS. steps=0 means up to max_seq_len; top_p=1 and top_k=0 switch those off."""
    device = model.tok_embeddings.weight.device
    if len(prompt_ids) > model.params.max_seq_len:
        raise UserError(f"the prompt is {len(prompt_ids)} tokens (BOS included), more than the model's "
                          f"max_seq_len={model.params.max_seq_len}; shorten it")
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed > 0 else time.time_ns() & (2**63 - 1))
    idx = torch.tensor([prompt_ids] * num_samples, dtype=torch.long, device=device)  # (N, T)
    max_new = steps if steps > 0 else model.params.max_seq_len
    out = model.generate(idx, max_new, temperature=temperature, top_k=top_k or None,
                         top_p=top_p if top_p < 1.0 else None, eos_id=eos_id, generator=gen)
    stops = {i for i in (eos_id, bos_id) if i is not None and i >= 0}
    result = []
    for row in out[:, len(prompt_ids):].tolist():
        cut = next((j for j, t in enumerate(row) if t in stops), len(row))
        result.append(row[:cut])
    return result


def generate_text(model: Transformer, tok, prompt: str = "", **options) -> list[str]:
    """Prompt + continuation text for each sample (options as generate_ids)."""
    prompt_ids = tok.encode(prompt, bos=True)
    conts = generate_ids(model, prompt_ids, eos_id=tok.eos_id, bos_id=tok.bos_id, **options)
    head = tok.decode(prompt_ids)
    texts = []
    for cont in conts:
        full = tok.decode(prompt_ids + cont)
        # Keep the prompt exactly as typed; the continuation is what decoding added after it
        # (decoding the whole sequence keeps the spacing between prompt and continuation right).
        tail = full[len(head):] if full.startswith(head) else tok.decode(cont)
        texts.append(prompt + tail)
    return texts


def usage() -> str:
    """sample.py --help."""
    return render_help(SampleConfig, "python sample.py [--key=value ...]", __doc__)


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    return cli("sample.py", lambda: _main(argv))


def _main(argv: list[str]) -> int:
    argv = [a.replace("--max_new_tokens", "--steps", 1) if a.startswith("--max_new_tokens") else a
            for a in argv]
    cfg = apply_options(SampleConfig(), argv)
    check_config(cfg)
    ins = instruction_of(cfg, argv)
    device = pick_device(cfg.device)
    model, info = export.load_checkpoint(cfg.checkpoint)
    p = model.params
    lang = instruct_lang(info, cfg.checkpoint) if ins is not None else None
    tok_path = find_tokenizer(cfg, info["config"], p.vocab_size)
    tok = load_tokenizer(tok_path, vocab_size=p.vocab_size, expected_hash=info["tokenizer_hash"],
                         model_path=cfg.checkpoint)
    prompt = cfg.prompt if ins is None else instruct_prompt_ids(tok, ins, lang, p.max_seq_len)[0]
    model = model.to(device)
    t0 = time.perf_counter()
    texts = generate_text(model, tok, prompt, num_samples=cfg.num_samples, steps=cfg.steps,
                          temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, seed=cfg.seed)
    dt = time.perf_counter() - t0
    for i, text in enumerate(texts):
        if i:
            print(SEPARATOR)
        print(text, flush=True)
    print(f"sample.py: {len(texts)} sample(s) in {dt:.2f} s on {device}, tokenizer {tok_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
