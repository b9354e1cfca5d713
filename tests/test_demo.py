"""`make demo`'s script end to end, shrunk to seconds: corpus, vocab, shards, training, both
exports, the OpenMP build, three stories from the C engine and one on request, and the closing
evaluation (stories on request included), all in a temporary folder."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_pipeline_runs_end_to_end(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "demo.py", "--n_stories=1500", "--vocab_size=400", "--preset=micro",
           "--max_iters=30", "--train_seconds=120", "--steps=24", f"--data_root={tmp_path / 'data'}",
           f"--out_dir={out}", f"--run_bin={tmp_path / 'run'}", "--eval_samples=1"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=600)
    text = r.stdout.decode("utf-8")
    assert r.returncode == 0, (text[-3000:], r.stderr.decode("utf-8", "replace")[-3000:])
    for f in ("model.bin", "model_q8.bin", "model_bf16.bin", "ckpt.pt", "loss.png", "log.jsonl"):
        assert (out / f).stat().st_size > 0, f
    # Each story is echoed with its prompt first, and the engine's output is valid UTF-8 (decoded above).
    for prompt in ("从前，", "有一天，小猫", "小明和他的狗"):
        assert f"\n{prompt}" in text, prompt
    assert "Done in" in text
    # One story written to a request: ./run -m instruct prints the prompt it built, then the story.
    assert "-m instruct -w '公园,面包,鸽子' -f '对话'" in text
    assert "\n词语：公园，面包，鸽子\n特点：对话\n故事：" in text
    # It ends with an evaluation of the three exports beside the reference stories.
    report = json.loads((out / "eval" / "report.json").read_text(encoding="utf-8"))
    assert [m["engine"] for m in report["models"]] == ["c-fp32", "c-int8", "c-bf16"]
    assert "entity_consistency" in report["reference"] and "report:" in text
    # The model was trained on mixed data and says so: its exports ask for instructions, and the
    # evaluation measured its stories on request.
    assert (out / "model.bin").read_bytes()[38] == 1
    assert [m["asked"] for m in report["instruct"]["models"]] == [True, True, True]
    assert "## Stories on request" in (out / "eval" / "report.md").read_text(encoding="utf-8")
    # A second run reuses everything: no training step runs again.
    r2 = subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=600)
    text2 = r2.stdout.decode("utf-8")
    assert r2.returncode == 0, text2[-2000:]
    assert "already reached step 30; skipping" in text2
    assert "nothing to do" in text2 or "up to date" in text2, text2[:2000]
    # make bench's quality measurement on the demo's checkpoint: the engine's fp32 val loss equals
    # PyTorch's, and int8 and the fp16 KV cache cost little.
    r3 = subprocess.run([sys.executable, "bench.py", "--models=", "--tokenizer_chars=0", "--write=false",
                         f"--quality_checkpoint={out / 'ckpt.pt'}", f"--quality_data={tmp_path / 'data' / 'tok400'}",
                         "--quality_windows=3"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r3.returncode == 0, r3.stderr[-2000:]
    m = re.search(r"fp32 ([\d.]+); int8 ([\d.]+) .*fp16 KV cache, ([\d.]+) .*fp32 one; .*fp16 KV cache ([\d.]+) "
                  r".*bf16 ([\d.]+) .*PyTorch fp32 ([\d.]+)\.", r3.stdout)
    assert m, r3.stdout[-2000:]
    fp32, int8, int8_kv32, fp32_kv16, bf16, torch_fp32 = map(float, m.groups())
    assert abs(fp32 - torch_fp32) < 1e-3 and abs(bf16 - fp32) < 0.02 * fp32
    assert abs(int8 - fp32) < 0.05 * fp32 and abs(int8_kv32 - fp32) < 0.05 * fp32
    assert abs(fp32_kv16 - fp32) < 0.01 * fp32  # fp16 keys and values: a 2^-11 relative rounding
