"""`tinystories.py download` against a local HTTP server on 127.0.0.1 (no network).

The server (a thread in this process) plays the Hugging Face hub: the resolve URL redirects to a
"CDN" path and announces X-Linked-Size / X-Linked-Etag on the redirect, as the hub does for LFS
files. Scripted faults: a transfer that drops midway, transient 503s, wrong announced size or
checksum, and archives whose members try to escape the target folder.
"""

import hashlib
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import tinystories as ts

ROOT = Path(__file__).resolve().parent.parent
ZH_PATH = "/datasets/adam89/TinyStoriesChinese/resolve/main/TinyStories_all_data_zh.tar.gz"
EN_PATH = "/datasets/roneneldan/TinyStories/resolve/main/TinyStories_all_data.tar.gz"
STORIES = [f"从前有一只小猫，它的名字叫{i}号。" + "它很喜欢晒太阳。" * (i % 7) for i in range(300)]


def make_archive(members) -> bytes:
    """members: list of (TarInfo fields dict, bytes or None) -> .tar.gz bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            ti = tarfile.TarInfo(info["name"])
            ti.type = info.get("type", tarfile.REGTYPE)
            ti.linkname = info.get("linkname", "")
            ti.mode = 0o644
            if data is not None:
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
            else:
                tar.addfile(ti)
    return buf.getvalue()


def zh_archive() -> bytes:
    shards = [STORIES[:150], STORIES[150:]]
    return make_archive([({"name": "TinyStories_all_data_zh", "type": tarfile.DIRTYPE}, None)] + [
        ({"name": f"TinyStories_all_data_zh/data{i:02d}_zh.jsonl"},
         "".join(json.dumps({"story_zh": s, "story": "(English)"}, ensure_ascii=False) + "\n"
                 for s in shard).encode("utf-8"))
        for i, shard in enumerate(shards)])


class Hub:
    """What the server serves and how it misbehaves; the handler reads it on each request."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.drop_after: list[int] = []  # per CDN request, in order: close after this many bytes
        self.fail_status: list[int] = []  # statuses answered before serving normally
        self.linked_size: int | None = None  # overrides the announced X-Linked-Size
        self.linked_etag: str | None = None  # overrides the announced sha256
        self.honour_range = True
        self.chunk_delay = 0.0  # seconds between 1 KiB pieces of a body: a slow link to kill a run on


def make_handler(hub: Hub):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep pytest output clean
            pass

        def do_GET(self):
            hub.requests.append((self.path, self.headers.get("Range")))
            if self.path.startswith("/datasets/"):
                data = hub.files.get(self.path)
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                # the hub: a redirect announcing size and sha256 of the LFS file
                self.send_response(302)
                self.send_header("Location", "/cdn" + self.path)
                size = hub.linked_size if hub.linked_size is not None else len(data)
                self.send_header("X-Linked-Size", str(size))
                self.send_header("X-Linked-Etag",
                                 '"%s"' % (hub.linked_etag or hashlib.sha256(data).hexdigest()))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = hub.files.get(self.path[len("/cdn"):])
            if data is None:
                self.send_error(404)
                return
            if hub.fail_status:
                status = hub.fail_status.pop(0)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = 0
            rng = self.headers.get("Range")
            if rng and hub.honour_range:
                start = int(rng.split("=")[1].split("-")[0])
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if hub.drop_after:
                n = hub.drop_after.pop(0)
                self.wfile.write(body[:n])
                self.wfile.flush()
                self.close_connection = True  # the peer sees the body end early
                return
            step = 1024 if hub.chunk_delay else len(body) or 1
            try:
                for i in range(0, len(body), step):
                    self.wfile.write(body[i:i + step])
                    if hub.chunk_delay:
                        self.wfile.flush()
                        time.sleep(hub.chunk_delay)
            except (BrokenPipeError, ConnectionResetError):  # the client was killed mid-transfer
                self.close_connection = True

    return Handler


@pytest.fixture()
def hub(monkeypatch):
    h = Hub()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_handler(h))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02},
                              daemon=True)
    thread.start()
    h.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
    yield h
    server.shutdown()
    server.server_close()


def download(tmp_path, *extra):
    return ts.main(["download", f"--data_root={tmp_path}", "--backoff=0", "--timeout=10", *extra])


def read_zh(folder: Path):
    problems = ts.ProblemLog(strict=True)
    return [s for p in ts.list_text_files(folder) for s in ts.iter_file_stories(p, problems=problems)]


def test_download_extract_and_rerun_does_nothing(hub, tmp_path, capsys):
    archive = zh_archive()
    hub.files[ZH_PATH] = archive
    assert download(tmp_path) == 0
    assert (tmp_path / "TinyStories_all_data_zh.tar.gz").read_bytes() == archive
    assert not (tmp_path / "TinyStories_all_data_zh.tar.gz.part").exists()
    assert read_zh(tmp_path / "zh") == STORIES  # story_zh preferred over story
    # HF_ENDPOINT honoured: the hub URL form, then the redirect target
    assert [p for p, _ in hub.requests] == [ZH_PATH, "/cdn" + ZH_PATH]
    capsys.readouterr()
    n = len(hub.requests)
    assert download(tmp_path) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert len(hub.requests) == n  # not even a request
    assert sorted(p.name for p in tmp_path.iterdir()) == ["TinyStories_all_data_zh.tar.gz", "zh"]


def test_existing_data_put_there_by_hand_is_left_alone(hub, tmp_path, capsys):
    (tmp_path / "zh").mkdir()
    (tmp_path / "zh" / "mine.jsonl").write_text('{"story": "我的故事"}\n', "utf-8")
    assert download(tmp_path) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert hub.requests == [] and read_zh(tmp_path / "zh") == ["我的故事"]


def test_download_en_url_and_json_arrays(hub, tmp_path):
    data = [{"story": f"Once upon a time there was cat number {i}.", "instruction": {}}
            for i in range(40)]
    hub.files[EN_PATH] = make_archive([({"name": "data00.json"}, json.dumps(data).encode())])
    assert download(tmp_path, "--dataset=en", "--keep_archive=false") == 0
    assert hub.requests[0][0] == EN_PATH
    assert read_zh(tmp_path / "en") == [d["story"] for d in data]
    assert not (tmp_path / "TinyStories_all_data.tar.gz").exists()


def test_dropped_transfer_is_resumed_with_range(hub, tmp_path):
    # incompressible padding so the archive spans several download chunks
    pad = np.random.default_rng(0).integers(0, 256, 5 * ts.DOWNLOAD_CHUNK, dtype=np.uint8)
    archive = make_archive([({"name": "pad.bin"}, pad.tobytes())]
                           + [({"name": f"s{i}.jsonl"}, json.dumps({"story_zh": s}).encode())
                              for i, s in enumerate(STORIES)])
    hub.files[ZH_PATH] = archive
    C = ts.DOWNLOAD_CHUNK
    # two drops, then a clean transfer; whole chunks received before a drop are kept
    hub.drop_after = [int(2.5 * C), int(1.5 * C)]
    assert download(tmp_path) == 0
    assert (tmp_path / "TinyStories_all_data_zh.tar.gz").read_bytes() == archive
    ranges = [r for p, r in hub.requests if p.startswith("/cdn")]
    assert ranges[0] is None and len(ranges) == 3, ranges
    k1, k2 = (int(r.removeprefix("bytes=").removesuffix("-")) for r in ranges[1:])
    # requests hands over whole chunks (urllib3 2.x: exactly 2*C and 3*C); any sane resume
    # point is past the first chunk and no further than what the server actually sent
    assert C <= k1 <= 2.5 * C and k1 < k2 <= k1 + 1.5 * C, ranges
    assert sorted(read_zh(tmp_path / "zh")) == sorted(STORIES)


def test_partial_file_from_an_earlier_run_is_resumed(hub, tmp_path):
    archive = zh_archive()
    hub.files[ZH_PATH] = archive
    (tmp_path / "TinyStories_all_data_zh.tar.gz.part").write_bytes(archive[:1000])
    assert download(tmp_path) == 0
    assert [r for p, r in hub.requests if p.startswith("/cdn")] == ["bytes=1000-"]
    assert (tmp_path / "TinyStories_all_data_zh.tar.gz").read_bytes() == archive


def test_complete_partial_file_and_server_without_range(hub, tmp_path):
    archive = zh_archive()
    hub.files[ZH_PATH] = archive
    part = tmp_path / "TinyStories_all_data_zh.tar.gz.part"
    part.write_bytes(archive)  # all bytes there, never renamed: 416 tells us it is complete
    assert download(tmp_path) == 0
    assert (tmp_path / "TinyStories_all_data_zh.tar.gz").read_bytes() == archive
    # a server that ignores Range sends 200 and the whole file: start over, not append
    for p in tmp_path.iterdir():
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    part.write_bytes(archive[:500])
    hub.honour_range = False
    assert download(tmp_path) == 0
    assert (tmp_path / "TinyStories_all_data_zh.tar.gz").read_bytes() == archive


def test_transient_errors_retried_then_given_up(hub, tmp_path, capsys):
    archive = zh_archive()
    hub.files[ZH_PATH] = archive
    hub.fail_status = [503, 502]
    assert download(tmp_path) == 0
    assert "retry 2/5" in capsys.readouterr().err
    for p in list(tmp_path.iterdir()):
        if p.is_file():
            p.unlink()
    shutil.rmtree(tmp_path / "zh")
    hub.fail_status = [503] * 10
    assert download(tmp_path, "--max_retries=2") == 1
    err = capsys.readouterr().err
    assert "failed after 2 retries" in err and "Traceback" not in err
    assert not (tmp_path / "TinyStories_all_data_zh.tar.gz").exists()


def test_wrong_size_is_an_error_and_not_renamed(hub, tmp_path, capsys):
    archive = zh_archive()
    hub.files[ZH_PATH] = archive
    hub.linked_size = len(archive) + 10
    assert download(tmp_path) == 1
    err = capsys.readouterr().err
    assert f"got {len(archive)} bytes but the server announced {len(archive) + 10}" in err
    assert not (tmp_path / "TinyStories_all_data_zh.tar.gz").exists()
    assert not (tmp_path / "zh").exists()
    # longer than announced: the .part cannot be trusted and is removed
    hub.linked_size = len(archive) - 10
    (tmp_path / "TinyStories_all_data_zh.tar.gz.part").unlink()
    assert download(tmp_path) == 1
    assert "announced" in capsys.readouterr().err
    assert not (tmp_path / "TinyStories_all_data_zh.tar.gz.part").exists()


def test_checksum_mismatch_is_an_error(hub, tmp_path, capsys):
    hub.files[ZH_PATH] = zh_archive()
    hub.linked_etag = "0" * 64
    assert download(tmp_path) == 1
    assert "sha256" in capsys.readouterr().err
    assert not any(p.name.startswith("TinyStories_all_data_zh") for p in tmp_path.iterdir())


def test_missing_file_is_a_clear_error(hub, tmp_path, capsys):
    assert download(tmp_path) == 1  # nothing served: 404
    err = capsys.readouterr().err
    assert "HTTP 404" in err and ZH_PATH in err


EVIL = {
    "dotdot": [({"name": "ok.jsonl"}, b'{"story": "x"}\n'), ({"name": "../evil.txt"}, b"pwned")],
    "nested_dotdot": [({"name": "a/../../evil.txt"}, b"pwned")],
    "absolute": [({"name": "/tmp/evil_abs_tinystories.txt"}, b"pwned")],
    "symlink_out": [({"name": "link", "type": tarfile.SYMTYPE, "linkname": "../../"}, None),
                    ({"name": "link/evil.txt"}, b"pwned")],
    "symlink_abs": [({"name": "link", "type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}, None)],
    "hardlink_out": [({"name": "hl", "type": tarfile.LNKTYPE, "linkname": "../evil.txt"}, None)],
    "device": [({"name": "dev", "type": tarfile.CHRTYPE}, None)],
}


@pytest.mark.parametrize("case", sorted(EVIL))
def test_unsafe_members_are_refused(hub, tmp_path, capsys, case):
    hub.files[ZH_PATH] = make_archive(EVIL[case])
    root = tmp_path / "root"
    assert download(root) == 1
    err = capsys.readouterr().err
    assert "refusing member" in err and "Traceback" not in err
    assert not (tmp_path / "evil.txt").exists() and not (root / "evil.txt").exists()
    assert not Path("/tmp/evil_abs_tinystories.txt").exists()
    assert not (root / "zh").exists()  # nothing half-extracted left in place
    assert sorted(p.name for p in root.iterdir()) == ["TinyStories_all_data_zh.tar.gz"]


def test_safe_internal_symlink_is_allowed(tmp_path):
    arc = tmp_path / "a.tar.gz"
    arc.write_bytes(make_archive([({"name": "d/a.jsonl"}, b'{"story": "x"}\n'),
                                  ({"name": "d/b.jsonl", "type": tarfile.SYMTYPE,
                                    "linkname": "a.jsonl"}, None)]))
    assert ts.extract_archive(arc, tmp_path / "out") == 2
    assert (tmp_path / "out" / "d" / "b.jsonl").read_text() == '{"story": "x"}\n'


def test_hf_url_and_endpoint(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert ts.hf_url("adam89/TinyStoriesChinese", "f.tar.gz") == \
        "https://huggingface.co/datasets/adam89/TinyStoriesChinese/resolve/main/f.tar.gz"
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.com/")
    assert ts.hf_url("a/b", "c") == "https://hf-mirror.com/datasets/a/b/resolve/main/c"


def test_cli_process_reports_one_line(hub, tmp_path):
    """The real command line, in its own process, with HF_ENDPOINT from the environment."""
    hub.files[ZH_PATH] = make_archive(EVIL["dotdot"])
    env = dict(os.environ, HF_ENDPOINT=hub.endpoint)
    p = subprocess.run([sys.executable, str(ROOT / "tinystories.py"), "download",
                        f"--data_root={tmp_path}", "--backoff=0"], capture_output=True, text=True,
                       env=env, stdin=subprocess.DEVNULL, timeout=60)
    assert p.returncode == 1
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and "%|" not in ln]
    assert len(lines) == 1 and "'../evil.txt'" in lines[0], p.stderr
    p = subprocess.run([sys.executable, str(ROOT / "tinystories.py"), "download",
                        "--dataset=fr", f"--data_root={tmp_path}"], capture_output=True, text=True,
                       env=env, stdin=subprocess.DEVNULL, timeout=60)
    assert p.returncode == 1 and "zh, en" in p.stderr
