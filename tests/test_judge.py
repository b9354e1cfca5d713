"""judge.py: reading the judge's replies, and the HTTP protocol against servers started here on
127.0.0.1 — well-formed replies (JSON and "Grammar: 7" lines), prose, broken bodies, HTTP 500, 401,
silence and a trickle — then the cache, and a real OpenAI-compatible server (llama-cpp-python's)
serving a tiny random model that export.py wrote as GGUF.

No network: every server is local, timeouts are at most 2 s, so the fake-server tests take seconds.
"""

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import judge  # noqa: E402
from judge import Judge, JudgeError, build_prompt, parse_reply  # noqa: E402

SECRET = "sk-test-Secret-9f3a1c"  # the API key the tests send; it must appear only in the header
BEGIN, STORY = "从前，有一只小兔子，", "它叫跳跳。跳跳喜欢在草地上蹦蹦跳跳地跑。"

JSON_REPLY = ("The continuation is simple and correct, and the rabbit stays the same rabbit.\n\n"
              '{"grammar": 8, "creativity": 5, "consistency": 9, "age_group": "B"}')
LINES_REPLY = ("Assessment: Short, but the sentences are fine.\n"
               "Grammar: 7\nCreativity: 4/10\nConsistency: 6\nAge group: C")
PROSE_REPLY = "What a lovely little story! The rabbit is very cute and I enjoyed reading it."


# ----------------------------------------------------------------------------------------------
# reading replies (no server)

@pytest.mark.parametrize("text, want", [
    (JSON_REPLY, (8, 5, 9, "B")),
    (LINES_REPLY, (7, 4, 6, "C")),
    ("评语：句子通顺，人物前后一致。\n语法：9分\n创造力：6\n一致性：8\n年龄段：B（4-5岁）", (9, 6, 8, "B")),
    ("- **Grammar**: 6/10\n- **Creativity**: 3\n- **Consistency**: 5\n- **Age group**: D", (6, 3, 5, "D")),
    ('Fine.\n```json\n{"Grammar": "7", "Creativity": 2, "Consistency": 10.0, "Age Group": "A: 3 or under"}\n```',
     (7, 2, 10, "A")),
    ('<think>{"grammar": 1, "creativity": 1, "consistency": 1}</think>ok {"grammar": 4, "creativity": 4, '
     '"consistency": 4}', (4, 4, 4, None)),  # a reasoning block is not the answer; no age given
    ('{"scores": {"grammar": 5, "creativity": 6, "consistency": 7}, "age_group": "E"}', (5, 6, 7, "E")),
])
def test_parse_reply_reads_the_marks(text, want):
    g = parse_reply(text)
    assert g["status"] == "ok", g
    assert (g["grammar"], g["creativity"], g["consistency"], g["age_group"]) == want


@pytest.mark.parametrize("text", [
    PROSE_REPLY,
    "",
    '{"grammar": 11, "creativity": 5, "consistency": 5, "age_group": "B"}',   # out of range
    '{"grammar": -1, "creativity": 5, "consistency": 5}',
    '{"grammar": 7.5, "creativity": 5, "consistency": 5}',                   # not a whole number
    '{"grammar": true, "creativity": 5, "consistency": 5}',
    '{"grammar": 7, "creativity": 5}',                                       # a mark missing
    "Grammar: 7\nCreativity: 5",
    "Grammar: 12\nCreativity: 5\nConsistency: 5",
    "Grammar: 7\nCreativity: 5\nConsistency: 5\nGrammar: 3",                 # two grammar marks
    '{"grammar": N, "creativity": N, "consistency": N, "age_group": "L"}',  # the template echoed
])
def test_parse_reply_never_guesses(text):
    g = parse_reply(text)
    assert g["status"] == "unparsed", g
    assert g["grammar"] is g["creativity"] is g["consistency"] is g["age_group"] is None


def test_assessment_is_the_text_before_the_marks():
    assert parse_reply(JSON_REPLY)["assessment"].startswith("The continuation is simple")
    assert "{" not in parse_reply(JSON_REPLY)["assessment"]
    assert parse_reply(LINES_REPLY)["assessment"] == "Short, but the sentences are fine."


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_prompt_separates_beginning_and_completion(lang):
    p = build_prompt(BEGIN, STORY, lang=lang)
    assert f"{BEGIN}***{STORY}" in p
    assert all(k in p for k in ("grammar", "creativity", "consistency", "age_group"))
    assert all(f"{letter}" in p for letter in judge.AGE_GROUPS)
    with pytest.raises(JudgeError):
        build_prompt(BEGIN, STORY, lang="fr")


def test_bad_configuration_is_one_line(monkeypatch):
    monkeypatch.delenv("JUDGE_TEST_KEY", raising=False)
    cases = [(dict(url="ftp://127.0.0.1/v1", model="m"), "http"),
             (dict(url="127.0.0.1:8080/v1", model="m"), "http"),
             (dict(url="http:///v1", model="m"), "http"),
             (dict(url="http://127.0.0.1:1/v1", model=""), "model"),
             (dict(url="http://127.0.0.1:1/v1", model="m", key_env="JUDGE_TEST_KEY"), "JUDGE_TEST_KEY"),
             (dict(url="http://127.0.0.1:1/v1", model="m", timeout=0), "timeout")]
    for kw, word in cases:
        with pytest.raises(JudgeError) as e:
            Judge(kw.pop("url"), kw.pop("model"), **kw)
        assert word in str(e.value) and "\n" not in str(e.value), str(e.value)
    # Credentials in the URL stay out of messages.
    with pytest.raises(JudgeError) as e:
        Judge("ftp://user:hunter2@example.org/v1", "m")
    assert "hunter2" not in str(e.value)


# ----------------------------------------------------------------------------------------------
# fake servers

def chat_body(content) -> bytes:
    return json.dumps({"id": "x", "object": "chat.completion", "model": "fake",
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": content}}]}).encode()


class FakeServer:
    """An HTTP server on 127.0.0.1 in a thread; respond(handler, n) answers the n-th request (0-based).
    Every request's path, headers and JSON body are kept in .requests."""

    def __init__(self, respond):
        self.respond, self.requests, self.stop = respond, [], threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                n = len(outer.requests)
                outer.requests.append((self.path, dict(self.headers), json.loads(body)))
                try:
                    outer.respond(self, n)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up, as it should

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def send(handler, status: int, body: bytes, ctype: str = "application/json"):
    handler.send_response(status)
    handler.send_header("Content-Type", ctype)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@pytest.fixture
def serve():
    servers = []

    def start(respond):
        servers.append(FakeServer(respond))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def fast_judge(url, **kw):
    return Judge(url, kw.pop("model", "fake-judge"), **{"timeout": 2.0, "retries": 2, "backoff": 0.05, **kw})


def test_json_reply_and_the_request_sent(serve, monkeypatch, tmp_path):
    monkeypatch.setenv("JUDGE_TEST_KEY", SECRET)
    srv = serve(lambda h, n: send(h, 200, chat_body(JSON_REPLY)))
    cache = tmp_path / "judge.jsonl"
    g = fast_judge(srv.url + "/", key_env="JUDGE_TEST_KEY", cache_path=cache).grade(BEGIN, STORY, lang="zh")
    assert g["status"] == "ok", g
    assert (g["grammar"], g["creativity"], g["consistency"], g["age_group"]) == (8, 5, 9, "B")
    assert g["raw"] == JSON_REPLY and g["judge"] == "fake-judge" and g["cached"] is False
    assert g["assessment"].startswith("The continuation")
    [(path, headers, body)] = srv.requests
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == f"Bearer {SECRET}"
    assert body["model"] == "fake-judge" and body["temperature"] == 0 and body["max_tokens"] == 400
    assert body["messages"] == [{"role": "user", "content": build_prompt(BEGIN, STORY, lang="zh")}]
    # The key travels in the header only: not in the result, not in the cache.
    assert SECRET not in json.dumps(g) and SECRET not in cache.read_text(encoding="utf-8")


def test_line_reply(serve):
    srv = serve(lambda h, n: send(h, 200, chat_body(LINES_REPLY)))
    g = fast_judge(srv.url).grade("One day, a little cat", " found a ball.", lang="en")
    assert g["status"] == "ok" and (g["grammar"], g["creativity"], g["consistency"], g["age_group"]) == (7, 4, 6, "C")
    assert "Authorization" not in srv.requests[0][1]  # no key_env: no key sent


def test_chunked_gzip_reply(serve):
    """Hosted APIs often answer in chunks and gzip-compressed; the body is read whole either way."""
    import gzip

    def respond(h, n):
        body = gzip.compress(chat_body(JSON_REPLY))
        h.protocol_version = "HTTP/1.1"
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Encoding", "gzip")
        h.send_header("Transfer-Encoding", "chunked")
        h.send_header("Connection", "close")
        h.end_headers()
        for i in range(0, len(body), 50):
            piece = body[i:i + 50]
            h.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        h.wfile.write(b"0\r\n\r\n")

    srv = serve(respond)
    g = fast_judge(srv.url).grade(BEGIN, STORY, lang="zh")
    assert g["status"] == "ok" and g["raw"] == JSON_REPLY, g


def test_prose_is_unparsed(serve):
    srv = serve(lambda h, n: send(h, 200, chat_body(PROSE_REPLY)))
    g = fast_judge(srv.url).grade(BEGIN, STORY, lang="zh")
    assert g["status"] == "unparsed" and g["raw"] == PROSE_REPLY
    assert g["grammar"] is g["creativity"] is g["consistency"] is None
    assert len(srv.requests) == 1  # an answer, even a useless one, is not retried


@pytest.mark.parametrize("body, words", [
    (b"<html><body>Bad gateway page</body></html>", "not JSON"),
    (b'{"object": "list", "data": []}', "choices"),
    (b'{"choices": []}', "choices"),
    (b'{"choices": [{"message": {"content": 42}}]}', "not text"),
])
def test_malformed_bodies_are_errors(serve, body, words):
    srv = serve(lambda h, n: send(h, 200, body))
    g = fast_judge(srv.url).grade(BEGIN, STORY, lang="zh")
    assert g["status"] == "error" and words in g["raw"] and "\n" not in g["raw"], g
    assert g["grammar"] is None and len(srv.requests) == 1


def test_http_500_then_success_is_retried(serve):
    srv = serve(lambda h, n: send(h, 500, b'{"error": "busy"}') if n < 2 else send(h, 200, chat_body(JSON_REPLY)))
    g = fast_judge(srv.url, retries=3).grade(BEGIN, STORY, lang="zh")
    assert g["status"] == "ok" and len(srv.requests) == 3


def test_http_429_is_retried(serve):
    srv = serve(lambda h, n: send(h, 429, b'{"error": "slow down"}') if n == 0 else send(h, 200, chat_body(JSON_REPLY)))
    assert fast_judge(srv.url).grade(BEGIN, STORY, lang="zh")["status"] == "ok" and len(srv.requests) == 2


def test_http_500_forever_gives_up_in_bounded_time(serve):
    srv = serve(lambda h, n: send(h, 500, b"internal error"))
    t0 = time.monotonic()
    g = fast_judge(srv.url, retries=2, backoff=0.1).grade(BEGIN, STORY, lang="zh")
    dt = time.monotonic() - t0
    assert g["status"] == "error" and "HTTP 500" in g["raw"] and "3 attempts" in g["raw"], g
    assert len(srv.requests) == 3 and dt < 2.0, dt  # waits of 0.1 + 0.2 s, instant replies


def test_http_401_is_an_error_at_once(serve, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", SECRET)
    srv = serve(lambda h, n: send(h, 401, json.dumps({"error": {"message": f"bad key {SECRET}"}}).encode()))
    g = fast_judge(srv.url, key_env="JUDGE_TEST_KEY", retries=3).grade(BEGIN, STORY, lang="zh")
    assert g["status"] == "error" and "401" in g["raw"] and len(srv.requests) == 1, g
    assert SECRET not in json.dumps(g)


def test_http_400_echoing_the_key_is_scrubbed(serve, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", SECRET)
    srv = serve(lambda h, n: send(h, 400, f"unknown model; your key {SECRET}".encode(), "text/plain"))
    g = fast_judge(srv.url, key_env="JUDGE_TEST_KEY").grade(BEGIN, STORY, lang="zh")
    assert g["status"] == "error" and "400" in g["raw"] and SECRET not in g["raw"], g


def test_silent_server_times_out(serve):
    srv = serve(lambda h, n: srv.stop.wait(30))
    t0 = time.monotonic()
    g = fast_judge(srv.url, timeout=1.0, retries=0).grade(BEGIN, STORY, lang="zh")
    dt = time.monotonic() - t0
    assert g["status"] == "error" and "1 s" in g["raw"], g
    assert 0.9 < dt < 2.0, dt
    # With retries, each try is cut off the same way: 2 tries + a 0.05 s wait.
    t0 = time.monotonic()
    g = fast_judge(srv.url, timeout=1.0, retries=1).grade(BEGIN, STORY, lang="zh")
    dt = time.monotonic() - t0
    assert g["status"] == "error" and "2 attempts" in g["raw"] and 1.9 < dt < 3.2, (g, dt)


@pytest.mark.parametrize("stage", ["body", "headers"])
def test_trickling_server_is_cut_off(serve, stage):
    """One byte every 0.25 s, far inside requests' per-read timeout, forever: only the whole-request
    deadline stops it, whether the trickle is the body or the status line and headers."""
    def trickle(h, n):
        if stage == "body":
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", "100000")
            h.end_headers()
            data = b" " * 100000
        else:
            data = b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"a" * 100000
        for i in range(len(data)):
            if srv.stop.is_set():
                return
            h.wfile.write(data[i:i + 1])
            h.wfile.flush()
            time.sleep(0.25)

    srv = serve(trickle)
    t0 = time.monotonic()
    g = fast_judge(srv.url, timeout=1.5, retries=0).grade(BEGIN, STORY, lang="zh")
    dt = time.monotonic() - t0
    assert g["status"] == "error" and "1.5 s" in g["raw"], g
    assert 1.4 < dt < 2.5, dt


def test_nothing_listening_is_an_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    g = fast_judge(f"http://127.0.0.1:{port}/v1", retries=1).grade(BEGIN, STORY, lang="zh")
    assert g["status"] == "error" and "cannot reach" in g["raw"] and "\n" not in g["raw"], g


# ----------------------------------------------------------------------------------------------
# the cache

def test_cache_reuses_ok_and_unparsed_but_retries_errors(serve, tmp_path):
    def respond(h, n):  # the completion names the answer: "ok", "unparsed" or "error"
        prompt = srv.requests[n][2]["messages"][0]["content"]
        if "***error\n" in prompt:
            send(h, 500, b"down")
        else:
            send(h, 200, chat_body(PROSE_REPLY if "***unparsed\n" in prompt else JSON_REPLY))

    srv = serve(respond)
    cache = tmp_path / "sub" / "judge.jsonl"
    j = fast_judge(srv.url, cache_path=cache, retries=0)
    first = {c: j.grade(BEGIN, c, lang="zh") for c in ("ok", "unparsed", "error")}
    assert [first[c]["status"] for c in first] == ["ok", "unparsed", "error"]
    assert len(srv.requests) == 3 and len(cache.read_text(encoding="utf-8").splitlines()) == 3

    # A new Judge (a re-run) on the same file: ok and unparsed come from the cache, error is asked again.
    j2 = fast_judge(srv.url, cache_path=cache, retries=0)
    again = {c: j2.grade(BEGIN, c, lang="zh") for c in ("ok", "unparsed", "error")}
    assert len(srv.requests) == 4
    for c in ("ok", "unparsed"):
        assert again[c]["cached"] is True
        assert {k: v for k, v in again[c].items() if k != "cached"} == \
               {k: v for k, v in first[c].items() if k != "cached"}
    assert again["error"]["cached"] is False and again["error"]["status"] == "error"

    # Other inputs, another judge model, another language or template: not the same judgment.
    fast_judge(srv.url, cache_path=cache, retries=0, model="other").grade(BEGIN, "ok", lang="zh")
    fast_judge(srv.url, cache_path=cache, retries=0).grade(BEGIN, "ok", lang="en")
    assert len(srv.requests) == 6
    keys = {j.cache_key(BEGIN, "ok", lang="zh"), j.cache_key(BEGIN, "ok", lang="en"),
            j.cache_key(BEGIN + " ", "ok", lang="zh"), j.cache_key(BEGIN, "ok ", lang="zh")}
    assert len(keys) == 4


def test_cache_key_ignores_credentials_in_the_url():
    a = Judge("http://alice:pw1@127.0.0.1:9/v1", "m").cache_key("a", "b", lang="en")
    b = Judge("http://127.0.0.1:9/v1/", "m").cache_key("a", "b", lang="en")
    c = Judge("http://127.0.0.1:10/v1", "m").cache_key("a", "b", lang="en")
    assert a == b != c


def test_cache_survives_a_torn_last_line(serve, tmp_path):
    srv = serve(lambda h, n: send(h, 200, chat_body(JSON_REPLY)))
    cache = tmp_path / "judge.jsonl"
    fast_judge(srv.url, cache_path=cache).grade(BEGIN, STORY, lang="zh")
    whole = cache.read_bytes()
    cache.write_bytes(whole + whole[: len(whole) // 2])  # a run killed halfway through a write
    j = fast_judge(srv.url, cache_path=cache)
    assert j.cache_skipped == 1
    assert j.grade(BEGIN, STORY, lang="zh")["cached"] is True and len(srv.requests) == 1
    j.grade(BEGIN, STORY + "。", lang="zh")  # appended after the torn line, on a line of its own
    lines = cache.read_bytes().split(b"\n")
    assert json.loads(lines[-2])["status"] == "ok" and lines[-1] == b""
    j3 = fast_judge(srv.url, cache_path=cache)
    assert j3.cache_skipped == 1 and len(j3._cache) == 2


def test_cli_prints_the_grade(serve, tmp_path):
    srv = serve(lambda h, n: send(h, 200, chat_body(LINES_REPLY)))
    r = subprocess.run([sys.executable, str(ROOT / "judge.py"), f"--url={srv.url}", "--model=fake",
                        "--beginning=One day,", "--completion= a cat sat.", "--timeout=2"],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    g = json.loads(r.stdout)
    assert g["status"] == "ok" and g["grammar"] == 7 and g["judge"] == "fake"
    assert srv.requests[0][2]["messages"][0]["content"].startswith("You are marking")  # lang=auto: English
    h = subprocess.run([sys.executable, str(ROOT / "judge.py"), "--help"], capture_output=True, text=True, timeout=60)
    assert h.returncode == 0 and "usage: python judge.py" in h.stdout and "(float) seconds one request" in h.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "judge.py"), "--url=nope", "--model=m", "--completion=x"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "http" in bad.stderr
    assert bad.stderr.startswith("judge.py: error: ")
    for argv in ([], ["--lang=fr", "--completion=x"], ["--completion="], ["--retries=x"]):  # usage errors
        assert judge.main(argv) == 2, argv


# ----------------------------------------------------------------------------------------------
# a real OpenAI-compatible server: llama-cpp-python's, serving a GGUF that export.py wrote

SERVER_WAIT = 120.0  # seconds for the server to load the model and answer /v1/models


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_gguf(folder: Path) -> Path:
    """A random micro model and a sentencepiece BPE tokenizer trained on built-in stories (with the
    settings tinystories.py uses, which llama.cpp encodes exactly), exported by export.py's CLI."""
    import sentencepiece as spm
    import torch

    import storygen
    from model import Transformer, model_args_from_preset
    from test_export import save_checkpoint

    vocab = 2000  # room for the corpus's ~1,300 characters and the 256 byte pieces
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(storygen.generate_stories(300, seed=0))), model_prefix=str(folder / "tok"),
        vocab_size=vocab, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    torch.manual_seed(0)
    model = Transformer(model_args_from_preset("micro", vocab_size=vocab))
    ckpt = folder / "ckpt.pt"
    save_checkpoint(model, ckpt, tokenizer=str(folder / "tok.model"))
    out = folder / "tiny.gguf"
    r = subprocess.run([sys.executable, str(ROOT / "export.py"), str(out), "--version=gguf", "--dtype=f32",
                        f"--checkpoint={ckpt}", f"--tokenizer={folder / 'tok.model'}"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0 and out.is_file(), f"export.py --version=gguf failed:\n{r.stdout}\n{r.stderr}"
    return out


@contextlib.contextmanager
def llama_server(gguf: Path, folder: Path, *, alias: str = "tiny"):
    """llama_cpp.server serving gguf on a free 127.0.0.1 port; yields (base url, log reader)."""
    import requests

    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    log = folder / "server.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
                                 "--model_alias", alias, "--host", "127.0.0.1", "--port", str(port),
                                 "--n_ctx", "4096", "--n_threads", "2", "--verbose", "false"],
                                stdout=logf, stderr=subprocess.STDOUT, cwd=folder)

    def server_log() -> str:
        return log.read_text(errors="replace")[-3000:]

    try:
        t0 = time.monotonic()
        while True:  # a bounded wait for the server to come up
            assert proc.poll() is None, f"llama_cpp.server exited with {proc.returncode}:\n{server_log()}"
            assert time.monotonic() - t0 < SERVER_WAIT, f"no server after {SERVER_WAIT:g} s:\n{server_log()}"
            try:
                if requests.get(f"{url}/models", timeout=1.0).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.2)
        yield url, server_log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def test_real_llama_cpp_server(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test installs it)")
    import requests

    gguf = tiny_gguf(tmp_path)
    with llama_server(gguf, tmp_path) as (url, server_log):
        cache = tmp_path / "judgments.jsonl"
        beginning, completion = "从前，", "有一只小兔子，它叫跳跳。"
        j = Judge(url, "tiny", timeout=60.0, retries=1, cache_path=cache, max_tokens=24)
        g = j.grade(beginning, completion, lang="zh")
        # A random model's words mean nothing; the protocol around them is what is tested.
        assert g["status"] in ("ok", "unparsed"), f"{g}\n{server_log()}"
        assert g["judge"] == "tiny" and g["cached"] is False and isinstance(g["raw"], str)
        # raw is the server's reply text: the same request sent by hand (temperature 0) gets it back.
        direct = requests.post(f"{url}/chat/completions", timeout=60, json={
            "model": "tiny", "temperature": 0, "max_tokens": 24,
            "messages": [{"role": "user", "content": build_prompt(beginning, completion, lang="zh")}]})
        assert direct.status_code == 200, direct.text
        assert g["raw"] == direct.json()["choices"][0]["message"]["content"]

        again = j.grade(beginning, completion, lang="zh")
        assert again["cached"] is True and {**again, "cached": False} == g
    # With the server gone, a re-run over the same cache still has its judgment: no request made.
    rerun = Judge(url, "tiny", timeout=2.0, retries=0, cache_path=cache, max_tokens=24)
    assert rerun.grade(beginning, completion, lang="zh") == {**g, "cached": True}
