"""How good are the stories? Story metrics for checkpoints and C-engine models, beside real stories.

    python evaluate.py --checkpoint=out/demo/ckpt.pt                       # PyTorch
    python evaluate.py --bin=out/demo/model.bin --bin=out/demo/model_q8.bin --tokenizer=data/tok3000.bin
    python evaluate.py --checkpoint='out/ckpt_*.pt' --out=out/series       # a series across training
    python evaluate.py --bin=out/demo/model.bin --judge_url=http://127.0.0.1:8080/v1 --judge_model=NAME

Every model gets the same prompts (prompts/zh.txt or prompts/en.txt, or --prompts=FILE) with the
same seeds, --samples completions each, so PyTorch, fp32 and int8 are compared on equal terms.
The reference is held-out stories of the same corpus (the val split the shards were made with,
never train), cut to the prompts' lengths and continued by their real text: each number has
"what real stories score" beside it. The metrics are defined in docs/evaluation.md (and in the
docstrings of metrics.py, which computes them).

--instruct=true also asks for stories on request (docs/evaluation.md): word triples held out of
training by construction (instruct.held_out), each feature, and summaries of val stories, --samples
stories each; a model trained with instructions gets the prompt instruct.render_prompt writes, a
plain one the story start only (the baseline), and both are measured against the same requests.

--out=DIR (default out/eval) gets report.json, report.md, metrics.png (series.png for a series)
and samples.jsonl, one line per completion with its prompt, seed, engine and metrics.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import fileio
from options import OptionError, UserError, cli, opt, parse_options, render_help

ROOT = Path(__file__).resolve().parent
PROG = "evaluate.py"


class EvalError(UserError):
    """A missing model, corpus or prompt file, or a refused pairing: `evaluate.py: error: ...`, exit 1."""


@dataclass
class EvalConfig:
    checkpoint: str = opt("", "train.py checkpoint: a path, a glob ('out/ckpt_*.pt') or a folder; repeatable")
    bin: str = opt("", "a model .bin (fp32 or int8) run by the C engine; repeatable")
    tokenizer: str = opt("", ".model or .bin (the other is looked for beside it); \"\" = the checkpoint's")
    data_dir: str = opt("", "shard folder whose meta.json names the corpus and its val split; \"\" = the "
                            "model's (see find_corpus)")
    prompts: str = opt("", "one story beginning a line ('#' lines are comments); \"\" = prompts/<lang>.txt")
    lang: str = opt("auto", "zh | en | auto (from the corpus)")
    max_prompts: int = opt(0, "use only the first N prompts; 0 = all")
    samples: int = opt(4, "completions per prompt")
    steps: int = opt(256, "tokens per completion at most (the C engine's -n)")
    temperature: float = opt(1.0, "the TinyStories paper sampled at 1.0")
    top_p: float = opt(1.0, "1 = off")
    top_k: int = opt(0, "0 = off")
    seed: int = opt(1, "completion j of prompt i uses seed + i * samples + j (>= 1: the C engine's 0 is the "
                       "clock)")
    val_stories: int = opt(500, "val stories for val_loss / bits_per_byte; 0 = all")
    reference_stories: int = opt(0, "reference stories; 0 = as many as completions per model")
    copy_k: int = opt(0, "a copy is a verbatim train span of at least this many characters; 0 = the "
                         "language's default")
    index_dir: str = opt("", "where the train split's copy index is kept; \"\" = <data_dir>/copyindex_k<K>")
    out: str = opt("out/eval", "folder for report.json, report.md, the plots and samples.jsonl")
    run_bin: str = opt("run", "the C engine (built with `make runomp` if missing)")
    jobs: int = opt(0, "C engine processes at once (one thread each); 0 = one per core")
    device: str = opt("cpu", "PyTorch device for checkpoints and val loss")
    judge_url: str = opt("", "an OpenAI-compatible server (http://HOST/v1); \"\" = no judge")
    judge_model: str = opt("", "the judge model's name on that server (with --judge_url)")
    judge_key_env: str = opt("", "environment variable holding the API key (never logged or written)")
    judge_timeout: float = opt(60.0, "seconds per judge request")
    judge_retries: int = opt(3, "further tries after a failed judge request")
    judge_cache: str = opt("", "judgments cache (jsonl); \"\" = <out>/judgments.jsonl")
    judge_samples: int = opt(1, "completions judged per prompt and model (the judge is slow)")
    instruct: bool = opt(False, "also measure stories on request: held-out word triples, features, summaries "
                                "(plain models are the baseline)")
    instruct_requests: int = opt(8, "with --instruct: word triples and summaries asked for (each feature once)")


REPEATABLE = ("checkpoint", "bin")

# Metric names in report order; docs/evaluation.md defines each one.
MODEL_ONLY = ["val_loss", "perplexity", "bits_per_byte"]
TEXT_METRICS = ["eos_rate", "mean_chars", "rep4", "distinct2", "copy_rate", "copy_longest",
                "entity_consistency", "hero_rate", "bad_utf8_rate"]
JUDGE_METRICS = ["judge_grammar", "judge_creativity", "judge_consistency", "judge_age", "judge_unparsed_rate",
                 "judge_error_rate"]
# Which way is better, for the "falls short" verdicts and the plots' captions.
HIGHER_IS_BETTER = {"eos_rate", "distinct2", "entity_consistency", "judge_grammar", "judge_creativity",
                    "judge_consistency"}


# ----------------------------------------------------------------------------------------------
# options

def usage() -> str:
    """evaluate.py --help."""
    return render_help(EvalConfig, "python evaluate.py --checkpoint=PATH|--bin=PATH [--key=value ...]", __doc__,
                       epilog="--checkpoint and --bin may be repeated.")


def parse_config(argv: list[str]) -> tuple[EvalConfig, dict[str, list[str]]]:
    """The config, and every value given for the repeatable options (in order)."""
    many: dict[str, list[str]] = {k: [] for k in REPEATABLE}
    rest = []
    i = 0
    while i < len(argv):
        a = argv[i]
        key = a[2:].split("=", 1)[0].replace("-", "_") if a.startswith("--") else ""
        if key in REPEATABLE:
            if "=" in a:
                many[key].append(a.split("=", 1)[1])
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                many[key].append(argv[i + 1])
                i += 1
            else:
                raise OptionError(f"--{key} needs a value: --{key}=PATH")
        else:
            rest.append(a)
        i += 1
    cfg = EvalConfig(**parse_options(EvalConfig, rest))
    problems = []
    if cfg.lang not in ("auto", "zh", "en"):
        problems.append(f"--lang={cfg.lang} must be zh, en or auto")
    for name in ("samples", "steps", "judge_retries", "judge_samples", "instruct_requests"):
        if getattr(cfg, name) < 1:
            problems.append(f"--{name}={getattr(cfg, name)} must be >= 1")
    for name in ("max_prompts", "val_stories", "reference_stories", "copy_k", "jobs", "top_k"):
        if getattr(cfg, name) < 0:
            problems.append(f"--{name}={getattr(cfg, name)} must be >= 0")
    if cfg.seed < 1:
        problems.append(f"--seed={cfg.seed} must be >= 1")
    if not cfg.temperature >= 0:
        problems.append(f"--temperature={cfg.temperature} must be >= 0")
    if not 0 < cfg.top_p <= 1:
        problems.append(f"--top_p={cfg.top_p} must be in (0, 1]")
    if not cfg.judge_timeout > 0:
        problems.append(f"--judge_timeout={cfg.judge_timeout} must be > 0")
    if cfg.judge_url and not cfg.judge_model:
        problems.append("--judge_url needs --judge_model=NAME")
    if problems:
        raise OptionError("; ".join(problems))
    if not many["checkpoint"] and not many["bin"]:
        raise OptionError("nothing to evaluate: give --checkpoint=PATH and/or --bin=PATH (--help lists the options)")
    return cfg, many


def checkpoint_iter_of(path: Path) -> int:
    m = re.search(r"_(\d+)\.pt$", path.name)
    return int(m.group(1)) if m else -1


def expand_checkpoints(specs: list[str]) -> list[Path]:
    """Paths, globs and folders -> checkpoint files; a glob or folder is sorted by the step in
    its names (ckpt_1000.pt before ckpt_2000.pt), a folder giving its ckpt_*.pt or else ckpt.pt."""
    out: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = sorted(p.glob("ckpt_*.pt"), key=checkpoint_iter_of) or sorted(p.glob("ckpt.pt"))
            if not found:
                raise EvalError(f"{p}: folder holds no ckpt_*.pt or ckpt.pt")
            out += found
        elif any(c in spec for c in "*?["):
            found = sorted((Path(x) for x in glob.glob(spec)), key=lambda q: (checkpoint_iter_of(q), str(q)))
            if not found:
                raise EvalError(f"{spec}: no checkpoint matches")
            out += found
        else:
            if not p.is_file():
                raise EvalError(f"{p}: no such checkpoint")
            out.append(p)
    return out


# ----------------------------------------------------------------------------------------------
# models

@dataclass
class ModelEntry:
    name: str
    engine: str  # pytorch | c-fp32 | c-int8 | c-bf16 (the C engine on that file)
    path: Path
    iter: Optional[int]
    tokens_seen: Optional[int]
    vocab_size: int
    max_seq_len: int
    tokenizer_hash: int  # 0 = not recorded
    config: dict  # the training config (checkpoints only)
    prompt_format: int = 0  # export.PROMPT_*: 0 plain, else the instruct language it was trained with


def describe_checkpoint(path: Path) -> ModelEntry:
    import checkpoint
    import export
    ckpt = checkpoint.load(path)  # CheckpointError, a UserError, names the file
    args = ckpt["model_args"]
    data = ckpt.get("data") or {}
    return ModelEntry(name=path.stem, engine="pytorch", path=path, iter=int(ckpt["iter_num"]),
                      tokens_seen=data.get("tokens_seen"), vocab_size=int(args["vocab_size"]),
                      max_seq_len=int(args["max_seq_len"]), tokenizer_hash=checkpoint.tokenizer_hash(ckpt),
                      config=dict(ckpt["config"]), prompt_format=export.prompt_format_of(ckpt))


def describe_bin(path: Path) -> ModelEntry:
    import export
    if not path.is_file():
        raise EvalError(f"{path}: no such model file")
    h = export.read_bin_header(str(path))  # ExportError, a UserError, names the file
    engine = f"c-{h.dtype}"  # fp32, int8 or bf16: the weights the C engine runs
    return ModelEntry(name=f"{path.stem} ({engine})", engine=engine, path=path, iter=None, tokens_seen=None,
                      vocab_size=h.vocab_size, max_seq_len=h.max_seq_len, tokenizer_hash=h.tokenizer_hash,
                      config={}, prompt_format=h.prompt_format)


def load_torch_model(entry: ModelEntry, device: str):
    """The PyTorch model of an entry; for a .bin, its weights as the C engine reads them (int8
    dequantized), so val_loss of an int8 file is the loss of the int8 weights."""
    import checkpoint
    import export
    if entry.engine == "pytorch":
        model, _ = checkpoint.model_from_checkpoint(entry.path)
    else:
        model = export.load_model_bin(str(entry.path))
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------
# tokenizer and corpus

@dataclass
class TokenizerFiles:
    model: Path  # sentencepiece .model (Python side)
    bin: Optional[Path]  # the C engine's tokenizer file (made on demand)


def find_tokenizer(cfg: EvalConfig, entries: list[ModelEntry]) -> TokenizerFiles:
    import export
    if cfg.tokenizer:
        p = Path(cfg.tokenizer)
        if not p.is_file():
            raise EvalError(f"{p}: no such tokenizer file")
        if p.suffix == ".model":
            return TokenizerFiles(p, p.with_suffix(".bin") if p.with_suffix(".bin").is_file() else None)
        model = p.with_suffix(".model")
        if not model.is_file():
            raise EvalError(f"{p}: the sentencepiece model {model} is not beside it (evaluate.py needs both; "
                            "pass --tokenizer=PATH.model)")
        return TokenizerFiles(model, p)
    for e in entries:
        found = export.default_tokenizer(e.config, e.vocab_size)
        if found:
            m = Path(found)
            return TokenizerFiles(m, m.with_suffix(".bin") if m.with_suffix(".bin").is_file() else None)
    raise EvalError(f"no tokenizer found for vocab_size {entries[0].vocab_size}; pass --tokenizer=data/tokN.model")


def check_tokenizer(tok, tok_path: Path, entries: list[ModelEntry]) -> None:
    for e in entries:
        if tok.vocab_size != e.vocab_size:
            raise EvalError(f"{tok_path}: tokenizer has {tok.vocab_size} tokens but {e.path} has vocab_size "
                            f"{e.vocab_size}; pass the tokenizer it was trained with")
        if e.tokenizer_hash and tok.hash() != e.tokenizer_hash:
            raise EvalError(f"{tok_path}: tokenizer hash {tok.hash():#010x} differs from the {e.tokenizer_hash:#010x} "
                            f"recorded in {e.path}; pass the tokenizer it was trained with")


@dataclass
class Corpus:
    source: Path  # the folder of story files the shards were made from
    text_key: str
    val_fraction: float
    shard_dir: Path
    storygen: bool  # the built-in corpus (exact entity checks)

    def stories(self):
        import tinystories
        problems = tinystories.ProblemLog(False)
        for f in tinystories.list_text_files(self.source):
            yield from tinystories.iter_file_stories(f, text_key=self.text_key, problems=problems)

    def split(self, which: str):
        """Stories of the val or train split, decided as pretokenize decided it."""
        import tinystories
        want_val = which == "val"
        for s in self.stories():
            if tinystories.is_val_story(s, self.val_fraction) == want_val:
                yield s


def find_corpus(cfg: EvalConfig, entries: list[ModelEntry], tok_model: Path) -> Corpus:
    """The corpus behind the shards: --data_dir, else a checkpoint's data_dir, else the shard
    folder beside the tokenizer (data/tok3000 for data/tok3000.model), else data/tok<vocab_size>."""
    if cfg.data_dir:
        shard_dir = Path(cfg.data_dir)
    else:
        candidates = [Path(e.config["data_dir"]) for e in entries if e.config.get("data_dir")]
        candidates += [tok_model.with_suffix(""), Path("data") / f"tok{entries[0].vocab_size}"]
        shard_dir = next((c for c in candidates if (c / "meta.json").is_file()), candidates[0])
    meta_path = shard_dir / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        source = Path(meta["source"])
    except (OSError, ValueError, KeyError, TypeError):
        raise EvalError(f"{meta_path}: missing or unreadable; the reference and val split come from the shards' "
                        "corpus (pass --data_dir=the folder pretokenize wrote)") from None
    if not source.is_dir():
        raise EvalError(f"{meta_path}: its corpus {source} no longer exists")
    marker = source / ".complete"
    is_synth = False
    try:
        is_synth = json.loads(marker.read_text(encoding="utf-8")).get("generator") == "storygen"
    except (OSError, ValueError, AttributeError):
        pass
    return Corpus(source=source, text_key=meta.get("text_key") or "", val_fraction=float(meta.get("val_fraction", 0.01)),
                  shard_dir=shard_dir, storygen=is_synth)


def read_prompts(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise EvalError(f"{path}: cannot read prompts ({e.strerror})") from None
    except UnicodeDecodeError:
        raise EvalError(f"{path}: prompts are not UTF-8 text") from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise EvalError(f"{path}: no prompts (one story beginning a line; '#' lines are comments)")
    return prompts


# ----------------------------------------------------------------------------------------------
# completions

@dataclass
class Completion:
    model: str
    engine: str
    prompt_index: int
    sample: int
    seed: int
    prompt: str
    text: str  # the continuation only
    ended: bool  # the model ended the story (EOS) before the length limit
    bad_bytes: bool = False  # the engine's raw output was not valid UTF-8


def seed_of(cfg: EvalConfig, i: int, j: int) -> int:
    return cfg.seed + i * cfg.samples + j


def torch_completions(cfg: EvalConfig, entry: ModelEntry, model, tok, prompts: list[str]) -> list[Completion]:
    """The PyTorch model's completions, one generator seed per completion (as the C engine)."""
    import torch
    from sample import generate_ids
    out = []
    for i, prompt in enumerate(prompts):
        ids = tok.encode(prompt, bos=True)
        limit = completion_limit(cfg, entry, len(ids))
        head = tok.decode(ids)
        for j in range(cfg.samples):
            s = seed_of(cfg, i, j)
            with torch.inference_mode():
                cont = generate_ids(model, ids, num_samples=1, steps=limit, temperature=cfg.temperature,
                                    top_p=cfg.top_p, top_k=cfg.top_k, seed=s, eos_id=tok.eos_id,
                                    bos_id=tok.bos_id)[0]
            # generate_ids cuts before the first EOS/BOS: a full-length row never met one.
            ended = len(cont) < limit
            full = tok.decode(ids + cont)
            text = full[len(head):] if full.startswith(head) else tok.decode(cont)
            out.append(Completion(entry.name, entry.engine, i, j, s, prompt, clip_cut_character(text, ended=ended),
                                  ended=ended))
    return out


ENDED = re.compile(r"ended by the model \(EOS\)|ended at the step limit")


def clip_cut_character(text: str, *, ended: bool) -> str:
    """A completion cut by the step limit in the middle of a character ends in U+FFFD (both
    engines decode unfinished bytes so, as sentencepiece does): drop those, since the limit cut
    the character, not the model. Broken characters anywhere else stay and are counted."""
    return text if ended else text.rstrip("\ufffd")


def build_engine(cfg: EvalConfig) -> Path:
    run = Path(cfg.run_bin)
    if not run.is_absolute() and not run.exists():
        run = ROOT / run
    run = run.resolve()  # a bare name would be looked up on PATH
    if run.is_file() and os.access(run, os.X_OK):
        return run
    print(f"{PROG}: building the C engine: make -s runomp BIN={run}", file=sys.stderr)
    r = subprocess.run(["make", "-s", "-C", str(ROOT), "runomp", f"BIN={run}"], capture_output=True, text=True)
    if r.returncode != 0 or not run.is_file():
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        raise EvalError(f"{run}: could not build the C engine ({tail[0]})")
    return run


def completion_limit(cfg: EvalConfig, entry: ModelEntry, n_prompt_ids: int) -> int:
    """Tokens a completion may have: --steps, within the context (both engines get this limit,
    so a completion that fills the context is as long in each)."""
    return min(cfg.steps, entry.max_seq_len - n_prompt_ids)


def engine_completions(cfg: EvalConfig, entry: ModelEntry, run: Path, tok_bin: Path,
                       prompts: list[str], tok, prompt_args: Optional[list[list[str]]] = None) -> list[Completion]:
    """./run once per completion, several at a time with one thread each (these models are small).
    prompt_args: the flags that give ./run prompt i (default `-i PROMPT`; `-m instruct -w ...` for a
    request, whose prompts[i] is then the prompt text ./run builds and prints)."""
    limits = [completion_limit(cfg, entry, len(tok.encode(p, bos=True))) for p in prompts]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    jobs = [(i, j) for i in range(len(prompts)) for j in range(cfg.samples)]

    def one(job):
        i, j = job
        s = seed_of(cfg, i, j)
        cmd = [str(run), str(entry.path), "-z", str(tok_bin), "-t", repr(cfg.temperature), "-p", repr(cfg.top_p),
               "-k", str(cfg.top_k), "-s", str(s), "-n", str(limits[i]),
               *(prompt_args[i] if prompt_args else ["-i", prompts[i]])]
        r = subprocess.run(cmd, capture_output=True, env=env, timeout=600)
        err = r.stderr.decode("utf-8", "replace").strip()
        if r.returncode != 0:
            raise EvalError(err.splitlines()[-1] if err else f"{run} failed with exit {r.returncode}")
        m = ENDED.search(err)
        if not m:
            raise EvalError(f"{run}: no end-of-generation line on stderr (an engine older than evaluate.py? "
                            "rebuild it with make runomp)")
        head = prompts[i].encode("utf-8")
        raw = r.stdout[len(head):] if r.stdout.startswith(head) else r.stdout
        raw = raw[:-1] if raw.endswith(b"\n") else raw
        ended = m.group(0).startswith("ended by")
        try:  # the engine prints valid UTF-8 (U+FFFD for broken bytes); anything else is counted too
            text, bad = raw.decode("utf-8"), False
        except UnicodeDecodeError:
            text, bad = raw.decode("utf-8", "replace"), True
        return Completion(entry.name, entry.engine, i, j, s, prompts[i], clip_cut_character(text, ended=ended),
                          ended=ended, bad_bytes=bad)

    workers = cfg.jobs or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as ex:
        return list(ex.map(one, jobs))


# ----------------------------------------------------------------------------------------------
# stories on request (--instruct)

INSTRUCT_GOAL = 0.8  # issue 17's goal: every required word, and each requested feature, in 80% of stories
MAX_INSTRUCT_RECORDS = 5000  # val records read for requests and the detectors' check


@dataclass
class Request:
    kind: str  # words | feature | summary
    ins: "instruct.Instruction"


def val_records(corpus: Corpus) -> list[tuple[str, "instruct.Instruction"]]:
    """(story, the instruction its record carries) for val-split records of the corpus that carry
    instruct fields (storygen's synth writes them; the English TinyStories has some)."""
    import instruct
    import tinystories
    out = []
    keys = (corpus.text_key,) if corpus.text_key else tinystories.TEXT_KEYS
    for f in tinystories.list_text_files(corpus.source):
        if f.suffix.lower() not in (".jsonl", ".json"):
            continue
        with open(f, encoding="utf-8-sig", errors="replace") as fh:
            for line in fh:
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue  # a .json array, or a damaged line: nothing to read here
                if not isinstance(obj, dict):
                    continue
                text = next((obj[k] for k in keys if isinstance(obj.get(k), str)), "").strip()
                ins = instruct.from_record(obj)
                if text and ins is not None and tinystories.is_val_story(text, corpus.val_fraction):
                    out.append((text, ins))
                    if len(out) >= MAX_INSTRUCT_RECORDS:
                        return out
    return out


def fallback_triples(n: int) -> list[list[str]]:
    """Held-out triples of storygen's table words (a food, a place, a thing), for a Chinese corpus
    whose records carry no words."""
    import instruct
    import storygen
    foods, places, things = ([t[0] for t in table] for table in (storygen.FOODS, storygen.PLACES, storygen.OBJECTS))
    out = [list(t) for t in itertools.product(foods, places, things) if instruct.held_out(list(t))]
    return out[::max(1, len(out) // max(n, 1))][:n]


def instruct_requests(records, lang: str, n: int) -> list[Request]:
    """n word triples that training never asks for together (instruct.held_out), each taken from
    one val story's own words so it can be met; each feature once; n summaries of val stories
    (val stories are never trained on)."""
    import instruct
    triples, seen = [], set()
    for _, ins in records:
        for t in itertools.combinations(ins.words, 3):
            key = tuple(sorted(t))
            if key not in seen and instruct.held_out(list(t)):
                seen.add(key)
                triples.append(list(t))
                break
        if len(triples) >= n:
            break
    if not triples and lang == "zh":
        triples = fallback_triples(n)
    labelled = {f for _, ins in records for f in ins.features}
    feats = [f for f in instruct.FEATURES if f in labelled] or list(instruct.FEATURES)
    summaries = list(dict.fromkeys(ins.summary for _, ins in records if ins.summary))[:n]
    return ([Request("words", instruct.Instruction(words=t)) for t in triples]
            + [Request("feature", instruct.Instruction(features=[f])) for f in feats]
            + [Request("summary", instruct.Instruction(summary=x)) for x in summaries])


def fitting_requests(reqs: list[Request], lang: str, tok, max_seq_len: int) -> tuple[list[Request], int]:
    """The requests whose prompt leaves at least a quarter of the context for the story, and how
    many were left out (a long summary in a small model's context)."""
    import instruct
    keep = [r for r in reqs if len(tok.encode(instruct.render_prompt(r.ins, lang), bos=True)) <= 0.75 * max_seq_len]
    return keep, len(reqs) - len(keep)


def detector_check(records, lang: str) -> dict:
    """Each feature detector against the labels the corpus records carry: precision, recall and
    how many stories carry the label (None where no story does)."""
    import instruct
    out = {}
    for fid in instruct.FEATURES:
        tp = fp = fn = 0
        for text, ins in records:
            got, want = fid in instruct.detect_features(text, lang), fid in ins.features
            tp += got and want
            fp += got and not want
            fn += want and not got
        out[fid] = {"labelled": tp + fn, "precision": tp / (tp + fp) if tp + fp else None,
                    "recall": tp / (tp + fn) if tp + fn else None}
    return out


def request_args(ins, lang: str) -> list[str]:
    """./run's flags for a request (-m instruct -w -f -u -x)."""
    import instruct
    args = ["-m", "instruct"]
    if ins.words:
        args += ["-w", ",".join(ins.words)]
    if ins.features:
        args += ["-f", ",".join(instruct.FEATURES[f][0 if lang == "zh" else 1] for f in ins.features)]
    if ins.summary:
        args += ["-u", ins.summary]
    if ins.sentence:
        args += ["-x", ins.sentence]
    return args


def request_completions(cfg: EvalConfig, entry: ModelEntry, reqs: list[Request], lang: str, tok, *,
                        model=None, run=None, tok_bin=None) -> list[Completion]:
    """A model trained with instructions is given each request's prompt; a plain one the story
    start (BOS only), with the same seeds: the baseline."""
    import export
    import instruct
    asked = export.PROMPT_LANGS.get(entry.prompt_format)
    if asked is not None and asked != lang:
        raise EvalError(f"{entry.path}: trained on {asked} instructions, but the corpus is {lang} (pass --lang={asked})")
    prompts = [instruct.render_prompt(r.ins, lang) if asked else "" for r in reqs]
    for p in prompts:
        n_tok = len(tok.encode(p, bos=True))
        if n_tok >= entry.max_seq_len:
            raise EvalError(f"{entry.path}: a request's prompt is {n_tok} tokens, no room left in max_seq_len="
                            f"{entry.max_seq_len}; use --instruct_requests or a model with a longer context")
    if entry.engine == "pytorch":
        return torch_completions(cfg, entry, model, tok, prompts)
    args = [request_args(r.ins, lang) for r in reqs] if asked else None
    return engine_completions(cfg, entry, run, tok_bin, prompts, tok, prompt_args=args)


def _mean(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def instruct_metrics(comps: list[Completion], reqs: list[Request], lang: str) -> tuple[dict, list[dict]]:
    """Per completion: which required words it has, which features, the summary's adherence;
    aggregated: all_words_rate (3-word requests with every word present), word_rate, the rate of
    each requested feature, feature_rate (over all feature requests), summary_adherence."""
    import instruct
    per = []
    for c in comps:
        r = reqs[c.prompt_index]
        story = c.text.strip()
        m = {"request": r.kind, "asked": instruct.render_prompt(r.ins, lang)}
        if r.ins.words:
            present = [instruct.has_word(story, w, lang) for w in r.ins.words]
            m.update(words_present=sum(present) / len(present), all_words=all(present))
        if r.ins.features:
            found = instruct.detect_features(story, lang)
            m.update(features_found=sorted(found), has_features=all(f in found for f in r.ins.features))
        if r.ins.summary:
            m["summary_adherence"] = instruct.summary_adherence(story, r.ins.summary, lang)
        per.append(m)
    triple = [m for m, c in zip(per, comps) if len(reqs[c.prompt_index].ins.words) == 3]
    feature_rates = {}
    for fid in instruct.FEATURES:
        rows = [m for m, c in zip(per, comps) if fid in reqs[c.prompt_index].ins.features]
        if rows:
            feature_rates[fid] = _mean(m["has_features"] for m in rows)
    agg = {"n": len(comps), "all_words_rate": _mean(m["all_words"] for m in triple),
           "word_rate": _mean(m.get("words_present") for m in per),
           "feature_rate": _mean(m.get("has_features") for m in per), "feature_rates": feature_rates,
           "summary_adherence": _mean(m.get("summary_adherence") for m in per)}
    return agg, per


WORD_PROB_STORIES = 150  # val stories whose asked words word_probabilities scores
# word_probabilities' split by where a word first comes in its story (story tokens after the
# prompt): a small model copies into a story's first sentences long before it copies further on.
WORD_PROB_STARTS = ((0, "0-29"), (30, "30-59"), (60, "60-99"), (100, "100+"))


def start_bucket(token: int) -> str:
    """The WORD_PROB_STARTS name of a story token index."""
    return [name for lo, name in WORD_PROB_STARTS if token >= lo][-1]


def word_token_span(tok, story: str, word: str, ids: Optional[list[int]] = None) -> Optional[tuple[int, int]]:
    """(first, last + 1) of the story's tokens (as tok encodes the story alone; ids when the
    caller has them already) that spell the first occurrence of word, or None when the story
    lacks it."""
    raw = b" " + story.encode("utf-8") if tok.sp.encode("a", out_type=str)[0].startswith("\u2581") \
        else story.encode("utf-8")  # the dummy prefix the encoder adds
    at = raw.find(word.encode("utf-8"))
    if at < 0:
        return None
    end, pos, span = at + len(word.encode("utf-8")), 0, []
    for k, i in enumerate(tok.encode(story) if ids is None else ids):
        piece = tok.sp.id_to_piece(i)
        n = 1 if piece.startswith("<0x") and piece.endswith(">") else len(piece.replace("\u2581", " ").encode("utf-8"))
        if pos + n > at and pos < end:
            span.append(k)
        pos += n
    return (span[0], span[-1] + 1) if span else None


def word_probabilities(model, tok, records, lang: str, *, device: str, kinds: Optional[dict] = None,
                       n: int = WORD_PROB_STORIES) -> dict:
    """Does a model trained with instructions use the words it is asked for? Teacher-forced on
    val stories: PyTorch's probability of each asked word's tokens (their product) at the word's
    first place in the story, after a request for three of the story's own words (`asked`) and
    after a request that names no words, only dialogue (`unasked`). Sampling noise and the plot a
    sampled story takes do not enter: the lift from unasked to asked is what copying from the
    prompt gives. kinds (word -> kind, storygen.WORD_KINDS for the built-in corpus) adds the same
    per kind of word; `by_start` splits the same by where in the story the word first comes
    (WORD_PROB_STARTS)."""
    import random

    import instruct
    import torch
    L = model.params.max_seq_len
    rng = random.Random(0)
    plain_prompt = tok.encode(instruct.render_prompt(instruct.Instruction(features=["dialogue"]), lang), bos=False)
    pairs = []  # (kind, start bucket, p asked, p unasked)
    for story, ins in [r for r in records if len(r[1].words) >= 3][:n]:
        words = rng.sample(ins.words, 3)
        asked_prompt = tok.encode(instruct.render_prompt(instruct.Instruction(words=words), lang), bos=False)
        ids = tok.encode(story)
        spans = {w: word_token_span(tok, story, w, ids) for w in words}
        got = []
        for prompt in (asked_prompt, plain_prompt):
            seq = [tok.bos_id] + prompt + ids
            start = 1 + len(prompt)
            with torch.inference_mode():
                logits, _ = model(torch.tensor([seq[:L]], device=device))
            logp = torch.log_softmax(logits[0].float(), dim=-1)
            per_word = {}
            for w, span in spans.items():
                if span is None or start + span[1] > L:
                    continue  # not spelled in this story's tokens, or past the context
                per_word[w] = math.exp(sum(float(logp[start + k - 1, ids[k]]) for k in range(*span)))
            got.append(per_word)
        pairs += [((kinds or {}).get(w, "other"), start_bucket(spans[w][0]), got[0][w], got[1][w])
                  for w in got[0] if w in got[1]]
    if not pairs:
        return {}

    def split(field: int, order) -> dict:
        return {key: {"n": len(sel), "asked": _mean(p[2] for p in sel), "unasked": _mean(p[3] for p in sel)}
                for key in order for sel in [[p for p in pairs if p[field] == key]] if sel}

    out = {"n_words": len(pairs), "asked": _mean(p[2] for p in pairs), "unasked": _mean(p[3] for p in pairs),
           "by_start": split(1, [name for _, name in WORD_PROB_STARTS])}
    if kinds:
        out["by_kind"] = split(0, sorted({p[0] for p in pairs}))
    return out


def instruct_goal(row: dict) -> bool:
    """Issue 17's goal for a model asked with instructions: every word in 80% of 3-word requests'
    stories and each requested feature in 80%."""
    rates = [row.get("all_words_rate")] + list(row.get("feature_rates", {}).values())
    return all(r is not None and r >= INSTRUCT_GOAL for r in rates)


# ----------------------------------------------------------------------------------------------
# val loss and bits per byte

def val_metrics(model, tok, stories: list[str], *, device: str, batch_size: int = 16) -> dict:
    """Mean loss per token over whole val stories (BOS + story + EOS, every token after BOS
    predicted), and the same loss summed per UTF-8 byte of the story text, in bits."""
    import torch
    import torch.nn.functional as F
    L = model.params.max_seq_len
    windows = []  # (x, y) pairs of at most L tokens
    n_bytes = 0
    for s in stories:
        ids = tok.encode(s, bos=True, eos=True)
        n_bytes += len(s.encode("utf-8"))
        # A story longer than the context goes in consecutive windows, each starting cold.
        for a in range(0, len(ids) - 1, L):
            chunk = ids[a:a + L + 1]
            windows.append((chunk[:-1], chunk[1:]))
    total, count = 0.0, 0
    windows.sort(key=lambda w: len(w[0]))  # similar lengths batch with little padding
    with torch.inference_mode():
        for b in range(0, len(windows), batch_size):
            group = windows[b:b + batch_size]
            T = max(len(x) for x, _ in group)
            x = torch.zeros((len(group), T), dtype=torch.long)
            y = torch.full((len(group), T), -1, dtype=torch.long)
            for r, (xs, ys) in enumerate(group):
                x[r, :len(xs)] = torch.tensor(xs)
                y[r, :len(ys)] = torch.tensor(ys)
            logits, _ = model(x.to(device))
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.to(device).reshape(-1),
                                   ignore_index=-1, reduction="sum")
            total += float(loss)
            count += int((y >= 0).sum())
    if count == 0:
        return {"val_loss": None, "perplexity": None, "bits_per_byte": None}
    mean = total / count
    return {"val_loss": mean, "perplexity": math.exp(min(mean, 700.0)),
            "bits_per_byte": total / math.log(2) / max(n_bytes, 1)}


# ----------------------------------------------------------------------------------------------
# the reference: real held-out stories, cut like the prompts

def reference_completions(cfg: EvalConfig, val: list[str], prompts: list[str], tok, max_seq_len: int,
                          n: int) -> list[Completion]:
    """Val story r is cut after as many characters as prompt r mod len(prompts) has; its real
    text continues it, capped at the models' token limit (then it does not count as ended)."""
    out = []
    for r, story in enumerate(val[:n]):
        p = prompts[r % len(prompts)]
        cut = min(len(p), max(len(story) - 1, 0))
        begin, rest = story[:cut], story[cut:]
        head_ids = tok.encode(begin, bos=True)
        rest_ids = tok.encode(story, bos=True)[len(head_ids):]
        limit = min(cfg.steps, max_seq_len - len(head_ids))
        ended = len(rest_ids) < limit  # the model would still have had room for EOS
        if not ended:
            full = tok.decode(tok.encode(story, bos=True)[:len(head_ids) + limit])
            rest = clip_cut_character(full[len(begin):] if full.startswith(begin) else full, ended=False)
        out.append(Completion("reference", "reference", r % len(prompts), r // len(prompts), 0, begin, rest, ended))
    return out


# ----------------------------------------------------------------------------------------------
# text metrics over a set of completions

def text_metrics(comps: list[Completion], *, lang: str, index, k: int, lexicon) -> tuple[dict, list[dict]]:
    """The aggregate metrics of a set of completions, and each completion's own."""
    import metrics
    per = []
    for c in comps:
        story = c.prompt + c.text
        span_len, span = index.longest_copy(c.text) if index is not None else (0, "")
        ent = metrics.entity_consistency(story, lexicon)
        per.append({"ended": c.ended, "chars": len(c.text), "rep4": metrics.rep4(story, lang),
                    "copy_longest": span_len, "copy_span": span, "copied": index is not None and span_len >= k,
                    "entity_ok": ent.ok, "hero": ent.hero, "entity_problems": ent.problems,
                    "bad_utf8": c.bad_bytes or metrics.has_bad_utf8(c.text)})
    n = max(len(per), 1)
    agg = {
        "eos_rate": sum(p["ended"] for p in per) / n,
        "mean_chars": sum(p["chars"] for p in per) / n,
        "rep4": sum(p["rep4"] for p in per) / n,
        "distinct2": metrics.distinct2([c.text for c in comps], lang),
        "copy_rate": (sum(p["copied"] for p in per) / n) if index is not None else None,
        "copy_longest": max((p["copy_longest"] for p in per), default=0) if index is not None else None,
        "entity_consistency": sum(p["entity_ok"] for p in per) / n,
        "hero_rate": sum(bool(p["hero"]) for p in per) / n,
        "bad_utf8_rate": sum(p["bad_utf8"] for p in per) / n,
    }
    return agg, per


def judge_metrics(grades: list[dict]) -> dict:
    if not grades:
        return {}
    ok = [g for g in grades if g.get("status") == "ok"]
    out = {}
    for key in ("grammar", "creativity", "consistency"):
        vals = [g[key] for g in ok if isinstance(g.get(key), (int, float))]
        out[f"judge_{key}"] = sum(vals) / len(vals) if vals else None
    ages = [g["age_group"] for g in ok if g.get("age_group")]
    out["judge_age"] = max(sorted(set(ages)), key=ages.count) if ages else None
    out["judge_unparsed_rate"] = sum(g.get("status") == "unparsed" for g in grades) / len(grades)
    out["judge_error_rate"] = sum(g.get("status") == "error" for g in grades) / len(grades)
    return out


# ----------------------------------------------------------------------------------------------
# verdicts, report and plots

def verdicts(model: dict, ref: dict) -> list[str]:
    """Plain-language shortfalls of one model against the reference (empty when none)."""
    out = []

    def f(x):
        return f"{x:.2f}"

    if model.get("entity_consistency") is not None and model["entity_consistency"] < ref["entity_consistency"] - 0.15:
        out.append(f"entity consistency {f(model['entity_consistency'])}, reference stories "
                   f"{f(ref['entity_consistency'])}: characters change name or kind; train longer")
    if model["rep4"] > ref["rep4"] + 0.10:
        out.append(f"rep4 {f(model['rep4'])}, reference {f(ref['rep4'])}: the model repeats itself; "
                   "train longer or lower --temperature")
    if model["eos_rate"] < ref["eos_rate"] - 0.20:
        out.append(f"eos_rate {f(model['eos_rate'])}, reference {f(ref['eos_rate'])}: stories do not end; train longer")
    if model.get("copy_rate") is not None and ref.get("copy_rate") is not None and \
            model["copy_rate"] > ref["copy_rate"] + 0.20:
        out.append(f"copy_rate {f(model['copy_rate'])}, reference {f(ref['copy_rate'])}: the model copies training "
                   "stories; a bigger corpus or fewer steps")
    if model["bad_utf8_rate"] > 0.01:
        out.append(f"bad_utf8_rate {f(model['bad_utf8_rate'])}: output with broken characters")
    if model["distinct2"] < ref["distinct2"] * 0.6:
        out.append(f"distinct2 {f(model['distinct2'])}, reference {f(ref['distinct2'])}: the stories are all alike")
    return out


def fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def write_report_md(path: Path, report: dict, samples: dict) -> None:
    ref, models = report["reference"], report["models"]
    keys = [k for k in MODEL_ONLY + TEXT_METRICS + JUDGE_METRICS
            if any(m.get(k) is not None for m in models) or ref.get(k) is not None]
    lines = ["# Story evaluation", "",
             f"{report['n_prompts']} prompts × {report['config']['samples']} samples, temperature "
             f"{report['config']['temperature']}, at most {report['config']['steps']} tokens; reference: "
             f"{report['n_reference']} held-out stories of {report['corpus']}. Metrics: docs/evaluation.md.", "",
             "| metric | reference | " + " | ".join(m["name"] for m in models) + " |",
             "|---|---|" + "---|" * len(models)]
    for k in keys:
        lines.append(f"| {k} | {fmt(ref.get(k))} | " + " | ".join(fmt(m.get(k)) for m in models) + " |")
    lines.append("")
    for m in models:
        if m["verdicts"]:
            lines.append(f"**{m['name']}** falls short: " + "; ".join(m["verdicts"]) + ".")
        else:
            lines.append(f"**{m['name']}**: within reach of the reference on every story metric.")
        lines.append("")
    if report.get("instruct"):
        lines += instruct_md(report["instruct"], report["lang"])
    lines += ["## The same prompts across models", ""]
    for i, prompt in list(enumerate(report["prompts"]))[:6]:
        lines.append(f"**Prompt {i + 1}:** {prompt}")
        lines.append("")
        for m in models:
            c = samples.get((m["name"], i))
            if c is not None:
                text = (prompt + c.text).replace("\n", " ")
                lines.append(f"- *{m['name']}*{'' if c.ended else ' (no EOS)'}: {text}")
        lines.append("")
    fileio.write_text(path, "\n".join(lines))


def instruct_md(section: dict, lang: str) -> list[str]:
    """report.md's "Stories on request" section."""
    import instruct
    models, reqs = section["models"], section["requests"]
    kinds = {k: sum(r["kind"] == k for r in reqs) for k in ("words", "feature", "summary")}
    name = {fid: f"{zh} ({en})" for fid, (zh, en) in instruct.FEATURES.items()}
    lines = ["## Stories on request", "",
             f"{kinds['words']} word triples held out of training by construction, {kinds['feature']} features and "
             f"{kinds['summary']} summaries of val stories, {section['samples']} "
             f"{'story' if section['samples'] == 1 else 'stories'} each. A model trained with "
             "instructions is given the request's prompt; a plain one (*baseline*) only the story start, and its "
             f"stories are measured against the same requests. Goal: {section['goal']:.0%} for every word of a "
             "triple and for each feature.", "",
             "| measure | " + " | ".join(m["name"] + ("" if m["asked"] else " (baseline)") for m in models) + " |",
             "|---|" + "---|" * len(models)]
    rows = [("all 3 words", "all_words_rate"), ("each word", "word_rate"), ("requested feature", "feature_rate")]
    for label, key in rows:
        lines.append(f"| {label} | " + " | ".join(fmt(m.get(key)) for m in models) + " |")
    for fid in instruct.FEATURES:
        if any(fid in m["feature_rates"] for m in models):
            lines.append(f"| feature: {name[fid]} | " + " | ".join(fmt(m["feature_rates"].get(fid)) for m in models) + " |")
    lines.append("| summary adherence | " + " | ".join(fmt(m.get("summary_adherence")) for m in models) + " |")
    lines.append("| meets the goal | " + " | ".join("–" if m["meets_goal"] is None else ("yes" if m["meets_goal"] else "no")
                                                  for m in models) + " |")
    lines.append("")
    probs = [(m["name"], m["word_prob"]) for m in models if m.get("word_prob")]
    if probs:
        lines += ["Copying an asked word, teacher-forced (`word_prob`): the probability of its tokens at its first "
                  "place in a val story, asked for / not asked for (a request for dialogue only):", ""]
        kinds = sorted({k for _, wp in probs for k in wp.get("by_kind", {})})
        lines += ["| model | all words | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
        def cell(d):
            return f"{fmt(d['asked'])} / {fmt(d['unasked'])}" if d else "–"
        for model_name, wp in probs:
            lines.append(f"| {model_name} | {cell(wp)} | "
                         + " | ".join(cell(wp.get("by_kind", {}).get(k)) for k in kinds) + " |")
        starts = [name for _, name in WORD_PROB_STARTS]
        lines += ["", "The same by where the word first comes in the story (its first token, counted from the "
                  "story's start):", "", "| model | " + " | ".join(f"tokens {s}" for s in starts) + " |",
                  "|---|" + "---|" * len(starts)]
        for model_name, wp in probs:
            by = wp.get("by_start", {})
            lines.append(f"| {model_name} | " + " | ".join(
                f"{cell(by.get(s))} ({by[s]['n']})" if by.get(s) else "–" for s in starts) + " |")
        lines.append("")
    if section["detectors"]:
        lines += [f"Feature detectors (instruct.detect_features) against the labels of {section['n_records']} val "
                  "records:", "", "| feature | labelled | precision | recall |", "|---|---|---|---|"]
        for fid, d in section["detectors"].items():
            lines.append(f"| {name[fid]} | {d['labelled']} | {fmt(d['precision'])} | {fmt(d['recall'])} |")
        lines.append("")
    return lines


def _save_png(fig, path: Path) -> None:
    fileio.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))


def plot(out: Path, report: dict) -> list[str]:
    """metrics.png (each metric per model, the reference as a dashed line), and series.png (each
    metric against tokens seen) when several checkpoints of one run were evaluated."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ref, models = report["reference"], report["models"]
    keys = [k for k in MODEL_ONLY + TEXT_METRICS + JUDGE_METRICS
            if k != "judge_age" and any(isinstance(m.get(k), (int, float)) for m in models)]
    written = []

    def grid(n):
        cols = min(4, n)
        rows = (n + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
        for ax in axes.flat[n:]:
            ax.axis("off")
        return fig, list(axes.flat)

    fig, axes = grid(len(keys))
    names = [m["name"] for m in models]
    for ax, k in zip(axes, keys):
        vals = [m.get(k) if isinstance(m.get(k), (int, float)) else 0.0 for m in models]
        ax.bar(range(len(vals)), vals, color="#4477aa")
        if isinstance(ref.get(k), (int, float)):
            ax.axhline(ref[k], color="#cc6677", linestyle="--", label="reference")
            ax.legend(fontsize=7, loc="best")
        ax.set_title(k + (" ↑" if k in HIGHER_IS_BETTER else ""), fontsize=9)
        ax.set_xticks(range(len(vals)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
    fig.tight_layout()
    _save_png(fig, out / "metrics.png")
    plt.close(fig)
    written.append("metrics.png")

    series = [m for m in models if m["engine"] == "pytorch" and m.get("tokens_seen") is not None]
    if len(series) >= 2:
        series.sort(key=lambda m: m["tokens_seen"])
        fig, axes = grid(len(keys))
        xs = [m["tokens_seen"] for m in series]
        for ax, k in zip(axes, keys):
            ys = [m.get(k) for m in series]
            ax.plot(xs, [y if isinstance(y, (int, float)) else float("nan") for y in ys], marker="o", color="#4477aa")
            if isinstance(ref.get(k), (int, float)):
                ax.axhline(ref[k], color="#cc6677", linestyle="--", label="reference")
                ax.legend(fontsize=7, loc="best")
            ax.set_title(k + (" ↑" if k in HIGHER_IS_BETTER else ""), fontsize=9)
            ax.set_xlabel("tokens seen", fontsize=7)
            ax.tick_params(labelsize=7)
        fig.tight_layout()
        _save_png(fig, out / "series.png")
        plt.close(fig)
        written.append("series.png")
    return written


# ----------------------------------------------------------------------------------------------
# the whole evaluation

def open_copy_index(cfg: EvalConfig, corpus: Corpus, lang: str):
    """The train split's copy index, built once per corpus and k and kept beside the shards
    (an evaluate.json in its folder records which corpus it indexes)."""
    import metrics
    k = cfg.copy_k or metrics.DEFAULT_K[lang]
    folder = Path(cfg.index_dir) if cfg.index_dir else corpus.shard_dir / f"copyindex_k{k}"
    stamp = {"corpus": corpus_signature(corpus), "k": k}
    try:
        if json.loads((folder / "evaluate.json").read_text(encoding="utf-8")) == stamp:
            return metrics.CopyIndex.open(folder), k
    except (OSError, ValueError):
        pass
    t0 = time.time()
    print(f"{PROG}: indexing the train split of {corpus.source} for copies of >= {k} characters -> {folder}",
          file=sys.stderr, flush=True)
    try:
        idx = metrics.CopyIndex.build(corpus.split("train"), folder, k=k)
        fileio.write_text(folder / "evaluate.json", json.dumps(stamp))
    except OSError as e:
        raise EvalError(f"{folder}: cannot write the copy index ({e.strerror})") from None
    print(f"{PROG}: copy index built in {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
    return idx, k


def corpus_signature(corpus: Corpus) -> str:
    import tinystories
    h = hashlib.sha256()
    for f in tinystories.list_text_files(corpus.source):
        st = f.stat()
        h.update(f"{f.relative_to(corpus.source)}:{st.st_size}:{int(st.st_mtime)};".encode())
    h.update(f"val_fraction={corpus.val_fraction};key={corpus.text_key}".encode())
    return h.hexdigest()[:16]


def make_judge(cfg: EvalConfig, out: Path):
    if not cfg.judge_url:
        return None
    import judge
    try:
        return judge.Judge(cfg.judge_url, cfg.judge_model, key_env=cfg.judge_key_env, timeout=cfg.judge_timeout,
                           retries=cfg.judge_retries, cache_path=cfg.judge_cache or str(out / "judgments.jsonl"))
    except judge.JudgeError as e:
        raise EvalError(str(e)) from None


def grade_all(judge, comps: list[Completion], lang: str, per_prompt: int) -> list[Optional[dict]]:
    """Judge grades for the first per_prompt samples of each prompt (None for the others)."""
    out: list[Optional[dict]] = []
    for c in comps:
        out.append(judge.grade(c.prompt, c.text, lang=lang) if c.sample < per_prompt else None)
    return out


def evaluate(cfg: EvalConfig, many: dict[str, list[str]]) -> dict:
    import metrics
    import tokenizer as tokenizer_mod
    t_start = time.time()
    entries = [describe_checkpoint(p) for p in expand_checkpoints(many["checkpoint"])]
    entries += [describe_bin(Path(p)) for p in many["bin"]]
    names = [e.name for e in entries]
    for e in entries:  # the same file name twice (two runs' ckpt.pt) gets its folder in front
        if names.count(e.name) > 1:
            e.name = f"{e.path.parent.name}/{e.name}"
    tok_files = find_tokenizer(cfg, entries)
    try:
        tok = tokenizer_mod.Tokenizer(str(tok_files.model))
    except tokenizer_mod.TokenizerError as e:
        raise EvalError(str(e)) from None
    check_tokenizer(tok, tok_files.model, entries)
    corpus = find_corpus(cfg, entries, tok_files.model)
    val = list(corpus.split("val"))
    if not val:
        raise EvalError(f"{corpus.source}: no story falls in the val split (val_fraction={corpus.val_fraction})")
    lang = cfg.lang if cfg.lang != "auto" else metrics.lang_of("".join(val[:50]))
    prompts_path = Path(cfg.prompts) if cfg.prompts else ROOT / "prompts" / f"{lang}.txt"
    prompts = read_prompts(prompts_path)
    if cfg.max_prompts:
        prompts = prompts[:cfg.max_prompts]
    max_len = min(e.max_seq_len for e in entries)
    for n, p in enumerate(prompts, 1):
        n_tok = len(tok.encode(p, bos=True))
        if n_tok >= max_len:
            raise EvalError(f"{prompts_path}: prompt {n} is {n_tok} tokens (BOS included), no room left in the "
                            f"model's max_seq_len={max_len}; shorten it")
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EvalError(f"{out}: cannot create the output folder ({e.strerror})") from None
    fileio.sweep_stale(out)
    index, copy_k = open_copy_index(cfg, corpus, lang)
    lexicon = metrics.Lexicon.storygen() if corpus.storygen else \
        metrics.Lexicon.from_corpus(list(_take(corpus.split("train"), 20000)), lang)
    judge = make_judge(cfg, out)
    reqs, records = [], []
    if cfg.instruct:
        records = val_records(corpus)
        reqs = instruct_requests(records, lang, cfg.instruct_requests)
        reqs, dropped = fitting_requests(reqs, lang, tok, max_len)
        if dropped:
            print(f"{PROG}: note: {dropped} request(s) left out: their prompt leaves under a quarter of "
                  f"max_seq_len={max_len} for the story", file=sys.stderr)
        if not any(r.kind == "words" for r in reqs):
            print(f"{PROG}: note: the corpus records carry no words: no word triples asked for", file=sys.stderr)
    run = tok_bin = None
    if any(e.engine != "pytorch" for e in entries):
        run = build_engine(cfg)
        tok_bin = tok_files.bin
        if tok_bin is None:
            tok_bin = out / f"{tok_files.model.stem}.bin"
            tokenizer_mod.export_tokenizer(str(tok_files.model), str(tok_bin))

    n_ref = cfg.reference_stories or len(prompts) * cfg.samples
    ref_comps = reference_completions(cfg, val, prompts, tok, max_len, n_ref)
    ref_agg, ref_per = text_metrics(ref_comps, lang=lang, index=index, k=copy_k, lexicon=lexicon)
    all_rows = [(c, m, None) for c, m in zip(ref_comps, ref_per)]
    if judge is not None:
        grades = grade_all(judge, ref_comps, lang, cfg.judge_samples)
        ref_agg.update(judge_metrics([g for g in grades if g]))
        all_rows = [(c, m, g) for (c, m, _), g in zip(all_rows, grades)]
    val_sample = val[:cfg.val_stories] if cfg.val_stories else val

    models = []
    asked_rows = []
    first_samples: dict = {}
    for e in entries:
        t0 = time.time()
        print(f"{PROG}: {e.name} ({e.engine}, {e.path})", file=sys.stderr, flush=True)
        model = load_torch_model(e, cfg.device)
        row = {"name": e.name, "engine": e.engine, "path": str(e.path), "iter": e.iter, "tokens_seen": e.tokens_seen}
        row.update(val_metrics(model, tok, val_sample, device=cfg.device))
        if e.engine == "pytorch":
            comps = torch_completions(cfg, e, model, tok, prompts)
        else:
            comps = engine_completions(cfg, e, run, tok_bin, prompts, tok)
        if cfg.instruct:
            import export
            rcomps = request_completions(cfg, e, reqs, lang, tok, model=model, run=run, tok_bin=tok_bin)
            ragg, rper = instruct_metrics(rcomps, reqs, lang)
            asked = export.PROMPT_LANGS.get(e.prompt_format) is not None
            if asked and any(len(r[1].words) >= 3 for r in records):
                import storygen
                ragg["word_prob"] = word_probabilities(model, tok, records, lang, device=cfg.device,
                                                       kinds=storygen.WORD_KINDS if corpus.storygen else None)
            asked_rows.append({"name": e.name, "engine": e.engine, "asked": asked, **ragg,
                               "meets_goal": instruct_goal(ragg) if asked else None})
            all_rows += [(c, m, None) for c, m in zip(rcomps, rper)]
        del model
        agg, per = text_metrics(comps, lang=lang, index=index, k=copy_k, lexicon=lexicon)
        row.update(agg)
        grades = [None] * len(comps)
        if judge is not None:
            grades = grade_all(judge, comps, lang, cfg.judge_samples)
            row.update(judge_metrics([g for g in grades if g]))
        row["verdicts"] = verdicts(row, ref_agg)
        row["seconds"] = round(time.time() - t0, 2)
        models.append(row)
        all_rows += list(zip(comps, per, grades))
        for c in comps:
            if c.sample == 0:
                first_samples[(e.name, c.prompt_index)] = c

    report = {
        "corpus": str(corpus.source), "lang": lang, "prompts_file": str(prompts_path), "prompts": prompts,
        "n_prompts": len(prompts), "n_reference": len(ref_comps), "n_val_stories": len(val_sample),
        "copy_k": copy_k, "tokenizer": str(tok_files.model),
        "config": dataclasses.asdict(cfg) | {"judge_key_env": cfg.judge_key_env and "(set)"},
        "reference": ref_agg, "models": models,
    }
    if cfg.instruct:
        report["instruct"] = {
            "goal": INSTRUCT_GOAL, "n_records": len(records), "samples": cfg.samples,
            "requests": [{"kind": r.kind, "words": r.ins.words, "features": r.ins.features,
                          "summary": r.ins.summary} for r in reqs],
            "detectors": detector_check(records, lang) if any(ins.features for _, ins in records) else {},
            "models": asked_rows,
        }
    report["config"].pop("checkpoint", None)
    report["config"].pop("bin", None)
    write_outputs(out, report, all_rows, first_samples, t_start)
    return report


def write_outputs(out: Path, report: dict, rows: list, first_samples: dict, t_start: float) -> None:
    """samples.jsonl, the plots, report.json and report.md, each through fileio (whole or not at all)."""
    def write_samples(f):
        for c, m, g in rows:
            rec = {"model": c.model, "engine": c.engine, "prompt_index": c.prompt_index, "sample": c.sample,
                   "seed": c.seed, "prompt": c.prompt, "completion": c.text, **m}
            if g is not None:
                rec["judge"] = {k: v for k, v in g.items() if k != "raw"} | {"raw": g.get("raw", "")[:2000]}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    fileio.atomic_write(out / "samples.jsonl", write_samples, mode="w")
    report["plots"] = plot(out, report)
    report["seconds"] = round(time.time() - t_start, 2)
    fileio.write_text(out / "report.json", json.dumps(report, ensure_ascii=False, indent=1))
    write_report_md(out / "report.md", report, first_samples)


def _take(it, n):
    for i, x in enumerate(it):
        if i >= n:
            return
        yield x


def print_summary(report: dict, out: str) -> None:
    ref, models = report["reference"], report["models"]
    keys = [k for k in MODEL_ONLY + TEXT_METRICS if any(m.get(k) is not None for m in models) or ref.get(k) is not None]
    width = max([len("reference")] + [len(m["name"]) for m in models])
    print(f"{'':20} {'reference':>{width}} " + " ".join(f"{m['name']:>{width}}" for m in models))
    for k in keys:
        print(f"{k:20} {fmt(ref.get(k)):>{width}} " + " ".join(f"{fmt(m.get(k)):>{width}}" for m in models))
    for m in models:
        for v in m["verdicts"]:
            print(f"{m['name']}: {v}")
    for m in (report.get("instruct") or {}).get("models", []):
        wp = m.get("word_prob") or {}
        copied = f", an asked word's probability {fmt(wp['asked'])} (not asked {fmt(wp['unasked'])})" if wp else ""
        print(f"on request, {m['name']}{'' if m['asked'] else ' (baseline)'}: all 3 words {fmt(m['all_words_rate'])}, "
              f"each word {fmt(m['word_rate'])}, requested feature {fmt(m['feature_rate'])}, "
              f"summary adherence {fmt(m['summary_adherence'])}{copied}")
    print(f"report: {out}/report.md, {out}/report.json, {out}/samples.jsonl, " +
          ", ".join(f"{out}/{p}" for p in report["plots"]) + f" ({report['seconds']:.0f} s)")


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(usage())
        return 0
    return cli(PROG, lambda: _main(argv))


def _main(argv: list[str]) -> int:
    cfg, many = parse_config(argv)
    report = evaluate(cfg, many)
    print_summary(report, cfg.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
