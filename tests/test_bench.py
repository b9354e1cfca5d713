"""`make bench`'s script still runs: one small configuration, tables printed, BENCHMARKS.md untouched.
It checks that the benchmark works, not how fast anything is. The llama.cpp rows are checked
without llama.cpp: its output parsed from a captured sample, its build with cmake stubbed out."""

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import bench  # noqa: E402


def test_bench_smoke():
    before = (ROOT / "BENCHMARKS.md").read_bytes()
    r = subprocess.run([sys.executable, "bench.py", "--models=zh15M", "--dtypes=fp32,int8", "--threads=1,2",
                        "--runs=1", "--decode_tokens=32", "--write=false", "--llama_cpp=off"], cwd=ROOT,
                       capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "| zh15M | fp32 |" in out and "| zh15M | int8 |" in out, out[-2000:]
    # the ceilings next to the ratios: prefill at the arithmetic peak, and the probe's own 2/1 bandwidth
    assert "| (at peak) |" in out and "| 2/1 bw |" in out, out[-2000:]
    assert "Tokenizer: encoding" in out
    assert "\nllama.cpp rows skipped: --llama_cpp=off.\n" in out
    assert (ROOT / "BENCHMARKS.md").read_bytes() == before
    bad = subprocess.run([sys.executable, "bench.py", "--models=zh7B"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "zh7B" in bad.stderr


# ----------------------------------------------------------------------------------------------
# llama.cpp beside the engine

def test_parse_llama_bench_reads_a_real_sample():
    # captured from `llama-bench -m zh15M_q8_0.gguf -p 200 -n 256 -t 1 -r 1 -o json`, built by bench.py
    text = (ROOT / "tests" / "llama_bench_sample.json").read_text()
    got = bench.parse_llama_bench(text, prompt_tokens=200, decode_tokens=256)
    assert got == {"prefill": pytest.approx(8315.944693), "decode": pytest.approx(1770.336402)}  # commit unknown
    with pytest.raises(bench.BenchError, match="no pp200 and tg128"):
        bench.parse_llama_bench(text, prompt_tokens=200, decode_tokens=128)
    with pytest.raises(bench.BenchError, match="no JSON"):
        bench.parse_llama_bench("error: failed to load model", prompt_tokens=200, decode_tokens=256)
    known = text.replace('"build_commit": "unknown"', '"build_commit": "abc123"')
    assert bench.parse_llama_bench(known, prompt_tokens=200, decode_tokens=256)["build"] == "abc123 (0)"


def test_peer_ratios_pair_runs_of_the_same_round():
    got = bench.peer_stats({"decode": [100.0, 50.0, 90.0], "prefill": [10.0, 10.0, 10.0]},
                           {"decode": [50.0, 50.0, 30.0], "prefill": [20.0, 5.0, 10.0]})
    assert got["decode_ratio"] == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}  # not 90/50
    assert got["prefill"]["median"] == 10.0 and got["prefill_ratio"]["max"] == 2.0


def test_without_cmake_the_rows_are_skipped_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(bench.shutil, "which", lambda tool: None)
    exe, note = bench.find_llama_bench("auto")
    assert exe is None and note == "llama.cpp rows skipped: could not build llama-bench: no cmake on PATH to build it"
    assert bench.find_llama_bench("off") == (None, "llama.cpp rows skipped: --llama_cpp=off")
    lines = bench.llama_table(bench.BenchConfig(), {"note": note}, {}, {})
    assert lines == ["", note + "."]
    with pytest.raises(bench.OptionError, match="not an executable llama-bench"):
        bench.parse_config([f"--llama_cpp={tmp_path / 'llama-bench'}", "--quality_checkpoint="])


def test_build_extracts_the_vendored_tree_and_configures_once(tmp_path, monkeypatch):
    """The sdist's vendor/llama.cpp lands in llama.cpp-VERSION/src; cmake (stubbed) builds only llama-bench."""
    sdist = tmp_path / "sdist" / "llama_cpp_python-9.9.tar.gz"
    sdist.parent.mkdir()
    with tarfile.open(sdist, "w:gz") as tar:
        for name, data in (("llama_cpp_python-9.9/vendor/llama.cpp/CMakeLists.txt", b"project(x)"),
                           ("llama_cpp_python-9.9/llama_cpp/__init__.py", b"")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    calls = []

    def fake_sh(argv, **kw):
        calls.append([str(a) for a in argv])
        if "--build" in calls[-1]:
            exe = tmp_path / "llama.cpp-9.9" / "build" / "bin" / "llama-bench"
            exe.parent.mkdir(parents=True)
            exe.write_text("")
        return ""

    monkeypatch.setattr(bench, "sh", fake_sh)
    monkeypatch.setattr(bench.shutil, "which", lambda tool: "/usr/bin/" + tool)
    exe = bench.build_llama_bench("9.9", tmp_path)
    assert exe == tmp_path / "llama.cpp-9.9" / "build" / "bin" / "llama-bench"
    assert (tmp_path / "llama.cpp-9.9" / "src" / "CMakeLists.txt").read_bytes() == b"project(x)"
    assert not (tmp_path / "llama.cpp-9.9" / "src" / "llama_cpp").exists()
    assert "-DGGML_NATIVE=ON" in calls[0] and "-DLLAMA_CURL=OFF" in calls[0]
    assert calls[1][-3:-1] == ["--target", "llama-bench"]
    assert bench.build_llama_bench("9.9", tmp_path) == exe and len(calls) == 2  # cached: no second build


def test_the_pinned_llama_cpp_version_is_read_from_requirements_test():
    assert f"llama-cpp-python[server]=={bench.llama_cpp_version()}" in (ROOT / "requirements-test.txt").read_text()
