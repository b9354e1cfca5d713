"""fuzz_shard.py: atheris (libFuzzer for Python) harness for tinystories.py's shard reader.

The pretokenized shards are read by Python only (train.py through tinystories.read_shard; run.c
never reads them), so the shard reader is fuzzed in Python, with coverage of tinystories.py.
Each input is a whole shard file, written to an in-memory file (memfd). The property:
read_shard either raises DataError (one line for the user) or returns a header whose n_tokens is
the number of tokens it maps, every one of them a valid id (< vocab_size). Any other exception
is a finding.

    python tests/fuzz/fuzz_shard.py -atheris_runs=100000 out/fuzz/corpus/shard out/fuzz/seeds/shard
(make fuzz runs it; tests/test_fuzz.py calls check_one on a few inputs.)
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

try:
    import atheris
except ImportError:   # check_one works without it (the smoke test); fuzzing needs it
    atheris = None

if atheris is not None and __name__ == "__main__":
    with atheris.instrument_imports(include=["tinystories"]):
        import tinystories
else:
    import tinystories

_PATH = None   # the file each input is written to: a memfd's /proc/self/fd path (see main)


def check_one(data: bytes, path: Path = None) -> None:
    path = path or _PATH
    path.write_bytes(data)
    try:
        head, tokens = tinystories.read_shard(path)
    except tinystories.DataError as e:
        assert "\n" not in str(e), f"DataError spans lines: {e!r}"
        return
    assert tokens.size == head["n_tokens"], (tokens.size, head)
    if tokens.size:
        top = int(tokens.max())
        assert top < head["vocab_size"], \
            f"read_shard accepted token id {top} >= vocab_size {head['vocab_size']}"
    del tokens   # close the memmap before the next write


def main() -> None:
    if atheris is None:
        sys.exit("fuzz_shard.py: atheris is not installed (pip install atheris)")
    global _PATH
    # an in-memory file: libFuzzer ends the process with exit(), so nothing on disk to clean up
    _PATH = Path(f"/proc/self/fd/{os.memfd_create('fuzz_shard')}")
    atheris.Setup(sys.argv, check_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
