"""evaluate.py end to end on a micro model trained here: engines, reference, series, report, errors.

A module fixture runs the real pipeline in a temporary folder (storygen corpus -> sentencepiece
vocab -> shards -> a micro training that keeps three checkpoints -> fp32 and int8 exports) and
every test evaluates those files.

    .venv/bin/python -m pytest tests/test_evaluate.py -q
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint
import evaluate
import export
import storygen
import tinystories
import train

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 512
ENV1 = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def run_bin(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bin") / "run"
    subprocess.run(["make", "-s", "-C", str(ROOT), "runomp", f"BIN={path}"], check=True)
    return path


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A trained micro model with ckpt_40/80/120.pt, its exports, and the data it came from."""
    root = tmp_path_factory.mktemp("evaldata")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        common = [f"--data_root={root}"]
        assert tinystories.main(["synth", *common, "--n_stories=4000", "--seed=3"]) == 0
        assert tinystories.main(["train_vocab", *common, "--dataset=synth", f"--vocab_size={VOCAB}"]) == 0
        assert tinystories.main(["pretokenize", *common, "--dataset=synth", f"--vocab_size={VOCAB}",
                                 "--workers=1", "--val_fraction=0.05"]) == 0
        out = root / "out"
        assert train.main(["--preset=micro", f"--data_dir={root}/tok{VOCAB}", f"--vocab_size={VOCAB}",
                           "--max_seq_len=128", "--dim=64", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2",
                           f"--out_dir={out}", "--max_iters=120", "--lr_decay_iters=120", "--eval_interval=60",
                           "--eval_iters=2", "--keep_every=40", "--batch_size=16", "--log_interval=40"]) == 0
    finally:
        torch.set_num_threads(old)
    tok_model = root / f"tok{VOCAB}.model"
    fp32, q8 = out / "model.bin", out / "model_q8.bin"
    assert export.main([str(fp32), f"--checkpoint={out}/ckpt.pt", f"--tokenizer={tok_model}"]) == 0
    assert export.main([str(q8), "--version=3", "--dtype=int8", f"--checkpoint={out}/ckpt.pt",
                        f"--tokenizer={tok_model}"]) == 0
    return {"root": root, "out": out, "tok": tok_model, "fp32": fp32, "q8": q8, "shards": root / f"tok{VOCAB}"}


def run_eval(args, out_dir: Path, **kw):
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *args, f"--out={out_dir}"], cwd=ROOT,
                       capture_output=True, text=True, env=ENV1, timeout=600, **kw)
    return r


def test_keep_every_kept_three_checkpoints(pipeline):
    kept = sorted(p.name for p in pipeline["out"].glob("ckpt_*.pt"))
    assert kept == ["ckpt_120.pt", "ckpt_40.pt", "ckpt_80.pt"]
    ckpt = checkpoint.load(pipeline["out"] / "ckpt_80.pt")
    assert ckpt["iter_num"] == 80


def test_pytorch_and_c_engine_greedy_completions_are_identical(pipeline, run_bin, tmp_path):
    out = tmp_path / "greedy"
    r = run_eval([f"--checkpoint={pipeline['out']}/ckpt.pt", f"--bin={pipeline['fp32']}",
                  f"--tokenizer={pipeline['tok']}", f"--run_bin={run_bin}", "--temperature=0", "--samples=1",
                  "--max_prompts=8", "--steps=60", "--val_stories=50"], out)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    torch_rows = {(x["prompt_index"]): x for x in rows if x["engine"] == "pytorch"}
    c_rows = {(x["prompt_index"]): x for x in rows if x["engine"] == "c-fp32"}
    assert len(torch_rows) == len(c_rows) == 8
    for i in torch_rows:
        assert torch_rows[i]["completion"] == c_rows[i]["completion"], i
        assert torch_rows[i]["ended"] == c_rows[i]["ended"], i
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    pt, c = report["models"]
    # The .bin holds the checkpoint's weights: the same val loss within float noise.
    assert abs(pt["val_loss"] - c["val_loss"]) < 1e-4
    assert pt["iter"] == 120 and pt["tokens_seen"] > 0 and c["iter"] is None


def test_report_has_every_metric_beside_the_reference(pipeline, run_bin, tmp_path):
    out = tmp_path / "full"
    r = run_eval([f"--bin={pipeline['fp32']}", f"--bin={pipeline['q8']}", f"--tokenizer={pipeline['tok']}",
                  f"--data_dir={pipeline['shards']}", f"--run_bin={run_bin}", "--samples=2", "--max_prompts=10",
                  "--steps=80", "--val_stories=100"], out)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    ref = report["reference"]
    for k in evaluate.TEXT_METRICS:
        assert k in ref, k
    assert ref["entity_consistency"] >= 0.95  # real storygen stories keep their characters
    assert ref["bad_utf8_rate"] == 0.0
    names = [m["engine"] for m in report["models"]]
    assert names == ["c-fp32", "c-int8"]
    for m in report["models"]:
        for k in evaluate.MODEL_ONLY + evaluate.TEXT_METRICS:
            assert m[k] is not None, (m["name"], k)
        assert 0 <= m["eos_rate"] <= 1 and 0 <= m["rep4"] <= 1 and m["bits_per_byte"] > 0
        assert m["perplexity"] == pytest.approx(2.718281828 ** m["val_loss"], rel=1e-6)
    # int8 weights cost a little loss, never much on a model this small.
    fp, q = report["models"]
    assert abs(fp["val_loss"] - q["val_loss"]) < 0.1
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {x["engine"] for x in rows} == {"reference", "c-fp32", "c-int8"}
    assert len([x for x in rows if x["engine"] == "c-int8"]) == 20
    for x in rows:
        assert {"prompt", "seed", "completion", "rep4", "entity_ok"} <= set(x)
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "| entity_consistency |" in md and "reference" in md
    assert (out / "metrics.png").stat().st_size > 1000
    assert "reference" in r.stdout and "report:" in r.stdout


def test_reference_comes_from_val_stories_only(pipeline, tmp_path):
    corpus = evaluate.Corpus(source=pipeline["root"] / "synth", text_key="", val_fraction=0.05,
                             shard_dir=pipeline["shards"], storygen=True)
    val = list(corpus.split("val"))
    train_set = set(corpus.split("train"))
    assert val and not (set(val) & train_set)
    import tokenizer
    tok = tokenizer.Tokenizer(str(pipeline["tok"]))
    cfg = evaluate.EvalConfig(steps=64)
    refs = evaluate.reference_completions(cfg, val, ["从前，", "有一天，小猫"], tok, 128, 20)
    assert len(refs) == 20
    for r in refs:
        story = r.prompt + r.text
        assert any(v.startswith(story) for v in val)
        assert tinystories.is_val_story(next(v for v in val if v.startswith(story)), 0.05)
        assert len(r.prompt) == len(["从前，", "有一天，小猫"][r.prompt_index])


def test_series_report_across_three_checkpoints(pipeline, tmp_path):
    out = tmp_path / "series"
    r = run_eval([f"--checkpoint={pipeline['out']}/ckpt_*.pt", "--samples=1", "--max_prompts=4", "--steps=40",
                  "--val_stories=50"], out)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert [m["iter"] for m in report["models"]] == [40, 80, 120]
    tokens = [m["tokens_seen"] for m in report["models"]]
    assert tokens == sorted(tokens) and tokens[0] > 0
    # Training lowers the val loss between the first and the last kept checkpoint.
    assert report["models"][-1]["val_loss"] < report["models"][0]["val_loss"]
    assert "series.png" in report["plots"] and (out / "series.png").stat().st_size > 1000
    md = (out / "report.md").read_text(encoding="utf-8")
    for name in ("ckpt_40", "ckpt_80", "ckpt_120"):
        assert f"*{name}*" in md  # each prompt's completions side by side


@pytest.mark.parametrize("case", ["missing", "mismatch", "empty_prompts", "long_prompt", "bad_option", "nothing"])
def test_bad_input_one_line_exit_1_or_2(case, pipeline, tmp_path):
    args = [f"--checkpoint={pipeline['out']}/ckpt.pt", "--max_prompts=2", "--samples=1", "--steps=8",
            "--val_stories=5"]
    if case == "missing":
        args[0] = f"--checkpoint={tmp_path}/nope.pt"
        want = "nope.pt"
    elif case == "mismatch":
        # A tokenizer of the same size trained on other text: the checkpoint's recorded hash refuses it.
        other = tmp_path / "other"
        assert tinystories.main(["synth", f"--data_root={other}", "--n_stories=1500", "--seed=99"]) == 0
        assert tinystories.main(["train_vocab", f"--data_root={other}", "--dataset=synth",
                                 f"--vocab_size={VOCAB}"]) == 0
        args.append(f"--tokenizer={other}/tok{VOCAB}.model")
        want = "tokenizer hash"
    elif case == "empty_prompts":
        p = tmp_path / "empty.txt"
        p.write_text("# nothing here\n\n", encoding="utf-8")
        args.append(f"--prompts={p}")
        want = "no prompts"
    elif case == "long_prompt":
        p = tmp_path / "long.txt"
        p.write_text("从前，\n" + "小猫在草地上跑来跑去。" * 40 + "\n", encoding="utf-8")
        args.append(f"--prompts={p}")
        want = "prompt 2"
    elif case == "bad_option":
        args.append("--samples=zero")
        want = "--samples"
    else:
        args = ["--samples=1"]
        want = "nothing to evaluate"
    r = run_eval(args, tmp_path / "out")
    assert r.returncode == (2 if case in ("bad_option", "nothing") else 1), (r.stdout, r.stderr)  # 2: usage
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaluate.py: error:") and want in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_judge_through_a_real_llama_cpp_server(pipeline, run_bin, tmp_path):
    """evaluate.py grades completions with an OpenAI-compatible server: llama-cpp-python's,
    serving this very model as a GGUF that export.py wrote. Its scores mean nothing (a micro
    model judging), the protocol is real: every judged completion is ok or unparsed, the
    judgments land in samples.jsonl and the cache, and a re-run makes no request."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test installs it)")
    from test_judge import llama_server

    gguf = tmp_path / "model.gguf"
    assert export.main([str(gguf), "--version=gguf", "--dtype=f32", f"--checkpoint={pipeline['out']}/ckpt.pt",
                        f"--tokenizer={pipeline['tok']}"]) == 0
    out = tmp_path / "judged"
    args = [f"--bin={pipeline['fp32']}", f"--tokenizer={pipeline['tok']}", f"--run_bin={run_bin}", "--samples=1",
            "--max_prompts=3", "--steps=30", "--val_stories=20", "--judge_model=tiny", "--judge_timeout=60",
            "--judge_retries=1"]
    with llama_server(gguf, tmp_path) as (url, server_log):
        r = run_eval([*args, f"--judge_url={url}"], out)
        assert r.returncode == 0, r.stderr + server_log()
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    m = report["models"][0]
    assert m["judge_error_rate"] == 0.0, server_log()
    assert report["reference"]["judge_error_rate"] == 0.0
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    judged = [x for x in rows if "judge" in x]
    assert len(judged) == 6  # 3 prompts x (the model + the reference)
    assert all(x["judge"]["status"] in ("ok", "unparsed") for x in judged)
    cached = (out / "judgments.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(cached) == 6
    # The server is gone: a re-run takes every judgment from the cache.
    r2 = run_eval([*args, f"--judge_url={url}"], out)
    assert r2.returncode == 0, r2.stderr
    again = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert again["models"][0]["judge_error_rate"] == 0.0
    assert again["models"][0]["judge_unparsed_rate"] == m["judge_unparsed_rate"]


# ----------------------------------------------------------------------------------------------
# stories on request (--instruct)

def flagged_instruct(pipeline, path: Path, lang: str = "zh") -> Path:
    """The pipeline's checkpoint with a data record saying it was trained with instructions: the
    weights never saw one, but every code path of an instruct model runs on it."""
    ckpt = checkpoint.load(pipeline["out"] / "ckpt.pt")
    ckpt["data"] = {**ckpt["data"], "instruct": {"lang": lang}}
    checkpoint.save(path, ckpt)
    return path


def test_instruct_requests_are_held_out_and_answerable(pipeline):
    import instruct
    corpus = evaluate.Corpus(source=pipeline["root"] / "synth", text_key="", val_fraction=0.05,
                             shard_dir=pipeline["shards"], storygen=True)
    records = evaluate.val_records(corpus)
    assert records and all(tinystories.is_val_story(t, 0.05) for t, _ in records)
    reqs = evaluate.instruct_requests(records, "zh", 5)
    triples = [r.ins.words for r in reqs if r.kind == "words"]
    assert len(triples) == 5
    for t in triples:
        assert instruct.held_out(t)  # never asked together in training
        assert any(set(t) <= set(ins.words) and all(w in text for w in t) for text, ins in records)
    assert {r.ins.features[0] for r in reqs if r.kind == "feature"} <= set(instruct.FEATURES)
    assert sum(r.kind == "summary" for r in reqs) == 5
    det = evaluate.detector_check(records, "zh")
    assert det["dialogue"]["labelled"] > 0 and det["dialogue"]["recall"] > 0.9


def test_instruct_mode_measures_requests_against_the_plain_baseline(pipeline, tmp_path):
    import instruct
    asked = flagged_instruct(pipeline, tmp_path / "instruct.pt")
    out = tmp_path / "ask"
    r = run_eval([f"--checkpoint={asked}", f"--checkpoint={pipeline['out']}/ckpt.pt", "--instruct=true",
                  "--instruct_requests=3", "--samples=2", "--max_prompts=2", "--steps=40", "--val_stories=20"], out)
    assert r.returncode == 0, r.stderr
    section = json.loads((out / "report.json").read_text(encoding="utf-8"))["instruct"]
    kinds = [q["kind"] for q in section["requests"]]
    assert kinds.count("words") == 3 and kinds.count("summary") == 3 and "feature" in kinds
    assert [(m["name"], m["asked"]) for m in section["models"]] == [("instruct", True), ("ckpt", False)]
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    for m in section["models"]:
        mine = [x for x in rows if x["model"] == m["name"] and "request" in x]
        assert len(mine) == len(kinds) * 2 == m["n"]
        for x in mine:  # the instruct model got the request's prompt, the baseline the story start
            assert x["prompt"] == (x["asked"] if m["asked"] else "")
            assert x["asked"].endswith("故事：")
        triples = [x for x in mine if x["request"] == "words"]
        want = sum(all(instruct.has_word(x["completion"].strip(), w, "zh") for w in
                       section["requests"][x["prompt_index"]]["words"]) for x in triples) / len(triples)
        assert m["all_words_rate"] == pytest.approx(want)
        assert 0 <= m["feature_rate"] <= 1 and 0 <= m["summary_adherence"] <= 1
        assert set(m["feature_rates"]) == {q["features"][0] for q in section["requests"] if q["kind"] == "feature"}
    assert section["models"][0]["meets_goal"] in (True, False) and section["models"][1]["meets_goal"] is None
    assert section["detectors"]["dialogue"]["precision"] is not None
    # teacher-forced copying: for the model that reads requests, per kind of storygen word
    wp = section["models"][0]["word_prob"]
    assert wp["n_words"] > 0 and 0 < wp["asked"] <= 1 and 0 < wp["unasked"] <= 1
    assert set(wp["by_kind"]) <= {*storygen.WORD_KINDS.values(), "other"}
    assert sum(k["n"] for k in wp["by_kind"].values()) == wp["n_words"]
    assert set(wp["by_start"]) <= {name for _, name in evaluate.WORD_PROB_STARTS}
    assert sum(k["n"] for k in wp["by_start"].values()) == wp["n_words"]
    assert "word_prob" not in section["models"][1]
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "## Stories on request" in md and "ckpt (baseline)" in md and "| all 3 words |" in md
    assert "Copying an asked word" in md and "| instruct | " in md and "| tokens 0-29 |" in md
    assert "on request, instruct:" in r.stdout and "an asked word's probability" in r.stdout


def test_word_token_span_is_the_tokens_that_spell_the_word(pipeline):
    """word_prob scores a word at the tokens that spell its first occurrence in the story: they
    hold the word, and neither end token can be dropped (none of them is a neighbour only)."""
    from tokenizer import Tokenizer
    tok = Tokenizer(str(pipeline["tok"]))
    n = 0
    for r in storygen.generate_records(40, seed=3):
        ids = tok.encode(r["story"])
        for w in r["words"]:
            a, b = evaluate.word_token_span(tok, r["story"], w)
            text = tok.sp.decode(ids[a:b])
            assert w in text, (w, text)
            # the first occurrence: the story's tokens before the span do not hold the word
            assert w not in tok.sp.decode(ids[:a]), (w, a)
            if b - a > 1:
                assert w not in tok.sp.decode(ids[a + 1:b]) and w not in tok.sp.decode(ids[a:b - 1])
            n += 1
    assert n > 100
    assert evaluate.word_token_span(tok, "小猫在花园里。", "皮球") is None


def test_instruct_mode_in_pytorch_and_the_c_engine_alike(pipeline, run_bin, tmp_path):
    """Greedy, the checkpoint and its .bin answer each request with the same story: ./run gets
    the request as -m instruct -w/-f/-u, PyTorch the prompt instruct.render_prompt writes."""
    asked = flagged_instruct(pipeline, tmp_path / "instruct.pt")
    model_bin = tmp_path / "instruct.bin"
    assert export.main([str(model_bin), f"--checkpoint={asked}", f"--tokenizer={pipeline['tok']}"]) == 0
    out = tmp_path / "both"
    r = run_eval([f"--checkpoint={asked}", f"--bin={model_bin}", f"--tokenizer={pipeline['tok']}",
                  f"--run_bin={run_bin}", "--instruct=true", "--instruct_requests=2", "--temperature=0",
                  "--samples=1", "--max_prompts=1", "--steps=30", "--val_stories=10"], out)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    by_engine = {e: {x["prompt_index"]: x for x in rows if x["engine"] == e and "request" in x}
                 for e in ("pytorch", "c-fp32")}
    assert len(by_engine["pytorch"]) == len(by_engine["c-fp32"]) >= 8
    for i, x in by_engine["pytorch"].items():
        assert x["completion"] == by_engine["c-fp32"][i]["completion"], x["asked"]
    section = json.loads((out / "report.json").read_text(encoding="utf-8"))["instruct"]
    pt, c = section["models"]
    assert pt["asked"] and c["asked"] and pt["all_words_rate"] == c["all_words_rate"]
