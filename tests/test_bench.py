"""`make bench`'s script still runs: one small configuration, tables printed, BENCHMARKS.md untouched.
It checks that the benchmark works, not how fast anything is."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_smoke():
    before = (ROOT / "BENCHMARKS.md").read_bytes()
    r = subprocess.run([sys.executable, "bench.py", "--models=zh15M", "--dtypes=fp32,int8", "--threads=1",
                        "--runs=1", "--write=false"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "| zh15M | fp32 |" in out and "| zh15M | int8 |" in out, out[-2000:]
    assert "Tokenizer: encoding" in out
    assert (ROOT / "BENCHMARKS.md").read_bytes() == before
    bad = subprocess.run([sys.executable, "bench.py", "--models=zh7B"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "zh7B" in bad.stderr
