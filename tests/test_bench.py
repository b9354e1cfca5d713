"""`make bench`'s script still runs: one small configuration, tables printed, BENCHMARKS.md untouched.
It checks that the benchmark works, not how fast anything is."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_smoke():
    before = (ROOT / "BENCHMARKS.md").read_bytes()
    r = subprocess.run([sys.executable, "bench.py", "--models=zh15M", "--dtypes=fp32,int8", "--threads=1,2",
                        "--runs=1", "--decode_tokens=32", "--write=false"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "| zh15M | fp32 |" in out and "| zh15M | int8 |" in out, out[-2000:]
    # the ceilings next to the ratios: prefill at the arithmetic peak, and the probe's own 2/1 bandwidth
    assert "| (at peak) |" in out and "| 2/1 bw |" in out, out[-2000:]
    assert "Tokenizer: encoding" in out
    assert (ROOT / "BENCHMARKS.md").read_bytes() == before
    bad = subprocess.run([sys.executable, "bench.py", "--models=zh7B"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "zh7B" in bad.stderr
