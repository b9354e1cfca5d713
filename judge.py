"""An optional LLM judge for generated stories, over any OpenAI-compatible chat-completions server.

    python judge.py --url=http://127.0.0.1:8080/v1 --model=qwen2.5-7b-instruct \\
        --beginning="从前，有一只小猫，" --completion="它叫咪咪。咪咪喜欢在花园里玩。"
    python judge.py --url=https://api.example.com/v1 --model=NAME --key_env=JUDGE_API_KEY \\
        --beginning="One day, a little cat" --completion=" found a ball." --cache=out/judge.jsonl
    python judge.py --dry_run --beginning="从前，" --completion="有一只小兔子。"   # print the prompt only

llama.cpp's server, ollama, vLLM and hosted APIs all speak this protocol; the URL is the base that
ends before /chat/completions (…/v1). The protocol is the TinyStories paper's, with prompt text of
our own in Chinese and in English: the judge sees the story beginning and the model's completion
joined by `***`, writes a short assessment, then marks grammar, creativity and consistency from 0
to 10 and guesses the writer's age group (AGE_GROUPS), ending with one JSON object; a reply with
"Grammar: 7" lines instead is read too. A reply that does not give all three marks as whole numbers
from 0 to 10 is recorded as "unparsed", never guessed.

From Python (evaluate.py does this):

    from judge import Judge
    j = Judge("http://127.0.0.1:8080/v1", "qwen2.5-7b-instruct", cache_path="out/judge.jsonl")
    g = j.grade("从前，", "有一只小兔子……", lang="zh")
    g["status"], g["grammar"], g["creativity"], g["consistency"], g["age_group"]

Time: one request never runs past `timeout` seconds (connect, the wait for the reply, and reading
it, counted together; a DNS lookup aside), and a failed request is retried `retries` times after
waits of backoff, 2*backoff, 4*backoff ... seconds, so one grade() takes at most about
(retries + 1) * timeout + backoff * (2**retries - 1) seconds. Connection errors, timeouts, HTTP 429
and 5xx are retried; any other HTTP 4xx and a reply that is not the API's JSON are errors at once.
Every failure ends as status "error" with a one-line reason: grade() does not raise for what the
server does, only JudgeError for a bad configuration.

The API key is read from the environment variable named by key_env and sent as a Bearer token; it is
never printed, logged, cached or put in an error message.

Cache (cache_path): one JSON line per judgment, keyed by a hash of the judge model, the URL without
credentials, TEMPLATE_VERSION, the language, max_tokens, the beginning and the completion. A
re-run with the same inputs sends nothing; "ok" and "unparsed" records are reused, "error" records
are kept as a log but retried. Each line is appended with one write call, and a torn last line
(a killed run) is skipped when the file is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Optional

import requests
import requests.adapters
import urllib3
import urllib3.connection

from options import OptionError, UserError, apply_options, cli, opt, render_help

# Bump whenever the prompt text or the reading of replies changes: it is part of every cache key.
TEMPLATE_VERSION = 1

# The writer's age group the judge guesses, one letter.
AGE_GROUPS = {"A": "3 or under", "B": "4-5", "C": "6-7", "D": "8-9", "E": "10-12", "F": "13-16",
              "G": "17 or older"}
SCORE_KEYS = ("grammar", "creativity", "consistency")
RESULT_KEYS = ("status", *SCORE_KEYS, "age_group", "assessment", "raw", "judge")
MAX_REPLY_BYTES = 4 << 20  # a chat reply of a few hundred tokens is a few KB; more is a broken server
SEPARATOR = "***"

TEMPLATES = {
    "en": """\
You are marking a writing exercise. A writer was given the opening of a short story for young \
children and asked to continue it into a whole story. Below is the story: the given opening comes \
first, and the mark *** shows where the writer's own text begins.

<story>
{story}
</story>

Mark only the writer's part, the text after ***. First write a brief assessment, two to four \
sentences: Is the language correct and natural? Does the continuation fit the opening: the same \
characters, the same places, the same events? If the opening stops in the middle of a sentence, \
does the writer finish that sentence sensibly? Does the story go somewhere and come to an end?

Then give three marks, each a whole number from 0 (very poor) to 10 (excellent):
- grammar: correct words and grammar, fluent sentences
- creativity: an original, interesting plot and choice of words
- consistency: agrees with the opening and with itself from start to finish

Then guess how old the writer is, as one letter:
{ages}

Finish with one line that holds only a JSON object with these four keys, in this form, where each N \
is one of your marks and L is your letter:
{{"grammar": N, "creativity": N, "consistency": N, "age_group": "L"}}""",
    "zh": """\
你在批改一道写作练习。写作者拿到了一个讲给小朋友听的短故事的开头，要把它续写成一个完整的故事。\
下面是这个故事：前面是给定的开头，*** 这个记号后面是写作者自己写的部分。

<故事>
{story}
</故事>

只评价写作者写的部分，也就是 *** 后面的文字。先写一段简短的评语（两到四句话）：语言是否正确、通顺？\
续写和开头接得上吗——人物、地点和事情是否前后一致？如果开头停在一句话的中间，写作者有没有把这句话\
合理地接下去？故事有没有情节，有没有结尾？

然后打三个分，每个都是 0（很差）到 10（很好）之间的整数：
- grammar（语法）：用字和语法正确，句子通顺
- creativity（创造力）：情节和用词新颖、有趣
- consistency（一致性）：和开头一致，从头到尾不自相矛盾

再猜一猜写作者的年龄段，用一个字母回答：
{ages}

最后单独写一行，只写一个含有这四个键的 JSON 对象，格式如下（每个 N 换成你打的分，L 换成你选的字母）：
{{"grammar": N, "creativity": N, "consistency": N, "age_group": "L"}}""",
}
AGE_LINES = {
    "en": ", ".join(f"{k}: {v}" for k, v in AGE_GROUPS.items()),
    "zh": "A：3岁及以下，B：4-5岁，C：6-7岁，D：8-9岁，E：10-12岁，F：13-16岁，G：17岁及以上",
}


class JudgeError(UserError):
    """A bad configuration (URL, key variable, cache file): one line, raised before any request, exit 1."""


class _Retry(Exception):
    """A failure worth another try: connection error, timeout, HTTP 429 or 5xx."""


class _Fail(Exception):
    """A failure another try will not fix: HTTP 4xx, a reply that is not the API's JSON."""


# ----------------------------------------------------------------------------------------------
# prompt and reply


def build_prompt(beginning: str, completion: str, *, lang: str) -> str:
    """The judge's one user message: the template of `lang` around beginning***completion."""
    if lang not in TEMPLATES:
        raise JudgeError(f"lang={lang!r}: choose from {', '.join(TEMPLATES)}")
    return TEMPLATES[lang].format(story=f"{beginning}{SEPARATOR}{completion}", ages=AGE_LINES[lang])


LABELS = {
    "grammar": r"grammar|语法",
    "creativity": r"creativity|创造力|创意",
    "consistency": r"consistency|一致性|连贯性",
    "age_group": r"age[ _]group|age|年龄段|年龄组|年龄",
}
# A "Grammar: 7" line, also "- **Grammar (语法)**: 7/10" and "语法：7分"; the value is captured as
# written (sign and decimals included) so that 7.5 or -1 is rejected rather than cut to a number.
_LINE = r"(?im)^[ \t>*#\-•]*(?:\d+[.)、]\s*)?(?:{label})\**(?:\s*[（(][^）)\n]*[）)])?\**\s*[:：=]\s*\**\s*"
_SCORE_LINE = {k: re.compile(_LINE.format(label=LABELS[k]) + r"(-?\d+(?:\.\d+)?)(?:\s*/\s*10|\s*分)?")
               for k in SCORE_KEYS}
_AGE_LINE = re.compile(_LINE.format(label=LABELS["age_group"]) + r"[\"']?([A-Ga-g])(?![A-Za-z])")
_THINK = re.compile(r"(?is)<think>.*?</think>")
_INT = re.compile(r"^\s*(-?\d+)\s*(?:/\s*10)?\s*$")


def _score(value) -> Optional[int]:
    """A mark as an int 0..10, or None when it is not a whole number in range (never rounded)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and _INT.match(value):
        value = int(_INT.match(value).group(1))
    return value if isinstance(value, int) and 0 <= value <= 10 else None


def _age(value) -> Optional[str]:
    m = re.match(r"^\s*([A-Ga-g])(?![A-Za-z])", value) if isinstance(value, str) else None
    return m.group(1).upper() if m else None


def _json_objects(text: str):
    """(start, dict) for every outermost JSON object that parses from a '{' in text, first to last."""
    dec = json.JSONDecoder()
    end = 0
    for m in re.finditer(r"\{", text):
        if m.start() < end:
            continue  # inside an object already read
        try:
            obj, end_here = dec.raw_decode(text, m.start())
        except ValueError:
            continue
        if isinstance(obj, dict):
            end = end_here
            yield m.start(), obj


def _score_dict(obj: dict) -> Optional[dict]:
    """obj with its keys lower-cased if it names any mark, or a dict inside it does (then merged
    over obj, so {"scores": {...}, "age_group": "C"} reads whole); None if no mark is named."""
    def low(d: dict) -> dict:
        return {str(k).strip().lower().replace(" ", "_"): v for k, v in d.items()}

    outer = low(obj)
    if any(k in outer for k in SCORE_KEYS):
        return outer
    for v in obj.values():
        if isinstance(v, dict) and any(k in low(v) for k in SCORE_KEYS):
            return {**outer, **low(v)}
    return None


def _clean_assessment(text: str) -> str:
    text = re.sub(r"(?i)^\s*[*#]*\s*(assessment|评语|评价)\s*[*]*\s*[:：]\s*", "", text.strip())
    return re.sub(r"\s*```(json)?\s*$", "", text).strip()


def parse_reply(text: str) -> dict:
    """The judge's reply -> {status: "ok" | "unparsed", grammar, creativity, consistency, age_group,
    assessment}. The last JSON object that names a mark decides; without one, "Grammar: 7" lines do.
    All three marks must be whole numbers 0..10, else the reply is unparsed and every mark is None.
    age_group is a letter of AGE_GROUPS, or None when the judge gave none it could be read as."""
    body = _THINK.sub("", text or "")
    marks: dict = {}
    age, cut, found = None, len(body), False
    for start, obj in _json_objects(body):
        d = _score_dict(obj)
        if d is not None:
            found, cut = True, start
            marks = {k: _score(d.get(k)) for k in SCORE_KEYS}
            age = _age(d.get("age_group", d.get("age")))
    if not found:
        for k, pattern in _SCORE_LINE.items():
            values = {m.group(1) for m in pattern.finditer(body)}
            starts = [m.start() for m in pattern.finditer(body)]
            # One value per mark: a reply that names two different grammar marks is not guessed at.
            marks[k] = _score(values.pop()) if len(values) == 1 else None
            cut = min([cut, *starts])
        m = _AGE_LINE.search(body)
        age = m.group(1).upper() if m else None
    ok = len(marks) == len(SCORE_KEYS) and all(v is not None for v in marks.values())
    if not ok:
        return {"status": "unparsed", **{k: None for k in SCORE_KEYS}, "age_group": None,
                "assessment": _clean_assessment(body)}
    return {"status": "ok", **marks, "age_group": age, "assessment": _clean_assessment(body[:cut])}


def guess_lang(text: str) -> str:
    """"zh" when text has any CJK ideograph, else "en" (the CLI's --lang=auto)."""
    return "zh" if re.search(r"[\u3400-\u9fff\uf900-\ufaff]", text) else "en"


# ----------------------------------------------------------------------------------------------
# the judge


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _connection_reason(e: Exception) -> str:
    """'[Errno 111] Connection refused' out of requests' nested message, else the class name."""
    m = re.search(r"\[Errno -?\d+\][^'\")]*", str(e))
    return m.group(0).strip() if m else type(e).__name__


# The watchdog: each request's sockets are registered, as urllib3 opens them, with the _Watch of the
# thread that sends the request; when the request's time is up the watch shuts them down, which
# wakes a recv blocked in any stage (status line, headers, body) with end-of-file.
_local = threading.local()


class _Watch:
    def __init__(self):
        self.fired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.append(sock)
            if self.fired:
                self._cut(sock)

    def fire(self) -> None:
        with self._lock:
            self.fired = True
            for sock in self._socks:
                self._cut(sock)

    @staticmethod
    def _cut(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed


class _WatchedConnection:
    def _new_conn(self):  # urllib3's hook that opens the TCP socket (before any TLS)
        sock = super()._new_conn()
        watch = getattr(_local, "watch", None)
        if watch is not None:
            watch.add(sock)
        return sock


class _HTTPConnection(_WatchedConnection, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_WatchedConnection, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class _WatchedAdapter(requests.adapters.HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}


class Judge:
    """grade(beginning, completion, lang=...) against one model on one server; see the module doc."""

    def __init__(self, url: str, model: str, *, key_env: str = "", timeout: float = 60.0, retries: int = 3,
                 backoff: float = 1.0, cache_path: Optional[str] = None, max_tokens: int = 400):
        parts = urllib.parse.urlsplit(str(url).strip())
        # What may be shown and hashed: the URL without user:password@ (requests still sends those).
        netloc = parts.hostname or ""
        if ":" in netloc:
            netloc = f"[{netloc}]"
        try:
            if parts.port:
                netloc += f":{parts.port}"
        except ValueError:
            netloc = ""
        self.url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        if parts.scheme not in ("http", "https") or not netloc:
            raise JudgeError(f"judge url {self.url or '(empty)'!r} is not an http(s) URL "
                             "(for example http://127.0.0.1:8080/v1)")
        if parts.query or parts.fragment:
            raise JudgeError(f"judge url {self.url}: give the base URL without ?query or #fragment")
        if not str(model).strip():
            raise JudgeError("no judge model given (the name the server knows it by)")
        if not timeout > 0 or retries < 0 or backoff < 0 or max_tokens < 1:
            raise JudgeError(f"judge timeout={timeout}, retries={retries}, backoff={backoff}, "
                             f"max_tokens={max_tokens}: need timeout > 0, retries >= 0, backoff >= 0, "
                             "max_tokens >= 1")
        self.model = str(model).strip()
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.max_tokens = int(max_tokens)
        # user:password@ in the URL is sent as Basic auth, which would replace a Bearer key.
        base = self.url if key_env else urllib.parse.urlunsplit(parts._replace(path=parts.path.rstrip("/")))
        self._endpoint = base + "/chat/completions"
        self._secrets = [s for s in (parts.password,) if s]
        self._headers = {"Content-Type": "application/json"}
        if key_env:
            key = os.environ.get(key_env, "")
            if not key.strip():
                raise JudgeError(f"environment variable {key_env} is not set; it should hold the judge's API key")
            self._headers["Authorization"] = f"Bearer {key.strip()}"
            self._secrets.append(key.strip())
        self._session = requests.Session()
        self._session.trust_env = False  # no .netrc or proxy settings between us and a local server
        for prefix in ("http://", "https://"):
            self._session.mount(prefix, _WatchedAdapter(max_retries=0))
        self._lock = threading.Lock()
        self.cache_path = os.fspath(cache_path) if cache_path else None
        self._cache: dict[str, dict] = {}
        self._cache_needs_newline = False
        self.cache_skipped = 0  # unreadable lines met when the cache was loaded (a torn last line)
        if self.cache_path:
            self._load_cache()

    # -- cache ------------------------------------------------------------------------------

    def cache_key(self, beginning: str, completion: str, *, lang: str) -> str:
        ident = [TEMPLATE_VERSION, self.model, self.url, lang, self.max_tokens, beginning, completion]
        return hashlib.sha256(json.dumps(ident, ensure_ascii=False).encode("utf-8")).hexdigest()

    def _load_cache(self) -> None:
        if os.path.isdir(self.cache_path):
            raise JudgeError(f"{self.cache_path}: judge cache is a directory, expected a .jsonl file")
        try:
            with open(self.cache_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return
        except OSError as e:
            raise JudgeError(f"{self.cache_path}: cannot read the judge cache ({e.strerror})") from None
        self._cache_needs_newline = bool(data) and not data.endswith(b"\n")
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            try:
                rec = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                self.cache_skipped += 1
                continue
            if isinstance(rec, dict) and isinstance(rec.get("key"), str) and rec.get("status") in ("ok", "unparsed"):
                self._cache[rec["key"]] = {k: rec.get(k) for k in RESULT_KEYS}

    def _append(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        if self._cache_needs_newline:
            line = "\n" + line  # end the torn line so that ours stays whole
        folder = os.path.dirname(self.cache_path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        fd = os.open(self.cache_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))  # one write per line: O_APPEND keeps lines whole
        finally:
            os.close(fd)
        self._cache_needs_newline = False

    # -- requests ---------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        for s in self._secrets:
            text = text.replace(s, "***")
        return text

    def _read_body(self, resp) -> bytes:
        # read1 returns what one recv brings (urllib3 2); read blocks for the whole amount, which the
        # watchdog bounds just the same.
        read = getattr(resp.raw, "read1", None) or resp.raw.read
        chunks, size = [], 0
        while True:
            chunk = read(1 << 16, decode_content=True)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_REPLY_BYTES:
                raise _Fail(f"reply larger than {MAX_REPLY_BYTES >> 20} MiB")

    def _request(self, prompt: str) -> str:
        """One POST to /chat/completions -> the reply's message text; _Retry or _Fail otherwise.

        requests' timeout bounds each wait for a byte, not the whole exchange, so a watchdog shuts
        the request's socket down when `timeout` seconds have passed: a server that sends nothing,
        or trickles its headers or body a byte at a time, is cut off there."""
        payload = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                   "temperature": 0, "max_tokens": self.max_tokens, "stream": False}
        watch = _Watch()
        timer = threading.Timer(self.timeout, watch.fire)
        timer.daemon = True
        _local.watch = watch
        timer.start()
        try:
            try:
                resp = self._session.post(self._endpoint, json=payload, headers=self._headers, stream=True,
                                          timeout=(self.timeout, self.timeout), allow_redirects=False)
                try:
                    body = self._read_body(resp)
                finally:
                    resp.close()
            except _Fail:
                raise
            except requests.exceptions.ConnectTimeout:
                raise _Retry(f"no connection to {self.url} within {self.timeout:g} s") from None
            except Exception as e:  # requests', urllib3's and the socket's errors, a cut-off among them
                if watch.fired or isinstance(e, requests.exceptions.Timeout) or "timed out" in str(e):
                    raise _Retry(f"no complete reply within {self.timeout:g} s") from None
                if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError,
                                  OSError)) or "Connection broken" in str(e):
                    raise _Retry(f"cannot reach {self.url} ({_connection_reason(e)})") from None
                raise _Fail(f"request to {self.url} failed ({type(e).__name__})") from None
        finally:
            timer.cancel()
            _local.watch = None
        text = body.decode("utf-8", errors="replace")
        code = resp.status_code
        if code == 429 or code >= 500:
            raise _Retry(f"HTTP {code} {resp.reason or ''}".strip())
        if not 200 <= code < 300:
            detail = "" if code in (401, 403) else f": {_one_line(text, 120)}"  # a 401 may echo the key
            raise _Fail(f"HTTP {code} {resp.reason or ''}".strip() + detail)
        try:
            data = json.loads(text)
        except ValueError:
            raise _Fail(f"reply is not JSON: {_one_line(text, 80)!r}") from None
        try:
            message = data["choices"][0]["message"]
        except (KeyError, IndexError, TypeError):
            raise _Fail(f"reply has no choices[0].message: {_one_line(text, 80)!r}") from None
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):  # content parts [{"type": "text", "text": ...}]
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if content is not None and not isinstance(content, str):
            raise _Fail(f"reply's message content is a {type(content).__name__}, not text")
        return content or ""  # no text at all is the judge's answer: it parses as unparsed

    def _ask(self, prompt: str) -> tuple[bool, str]:
        """(True, reply text) or (False, one-line reason) after up to 1 + retries requests."""
        reason = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                return True, self._request(prompt)
            except _Retry as e:
                reason = str(e)
            except _Fail as e:
                return False, self._scrub(_one_line(str(e), 240))
        tries = f"{self.retries + 1} attempts" if self.retries else "1 attempt"
        return False, self._scrub(_one_line(f"{reason} ({tries})", 240))

    # -- grading ----------------------------------------------------------------------------

    def grade(self, beginning: str, completion: str, *, lang: str) -> dict:
        """One judgment: {status, grammar, creativity, consistency, age_group, assessment, raw, judge,
        cached}. status "ok": all three marks read; "unparsed": the reply gave no readable marks (all
        None); "error": no reply after the retries (raw holds the reason). Never raises for what the
        server does."""
        prompt = build_prompt(beginning, completion, lang=lang)
        key = self.cache_key(beginning, completion, lang=lang)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return {**hit, "cached": True}
        ok, text = self._ask(prompt)
        if ok:
            result = {**parse_reply(text), "raw": text}
        else:
            result = {"status": "error", **{k: None for k in SCORE_KEYS}, "age_group": None,
                      "assessment": "", "raw": text}
        result = {k: result.get(k) for k in RESULT_KEYS[:-1]} | {"judge": self.model}
        if self.cache_path:
            record = {"key": key, **result, "lang": lang, "url": self.url, "template": TEMPLATE_VERSION,
                      "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            with self._lock:
                self._append(record)
                if result["status"] != "error":
                    self._cache[key] = dict(result)
        return {**result, "cached": False}


# ----------------------------------------------------------------------------------------------
# CLI


@dataclass
class JudgeConfig:
    url: str = opt("", "the server's OpenAI-compatible base URL (POSTs to URL/chat/completions), "
                       "e.g. http://127.0.0.1:8080/v1")
    model: str = opt("", "the judge model's name on that server")
    key_env: str = opt("", "name of the environment variable that holds the API key (sent as Bearer; "
                           "\"\" = send none)")
    beginning: str = opt("", "the story beginning (the prompt the model was given)")
    completion: str = opt("", "the model's continuation")
    lang: str = opt("auto", "zh, en, or auto (zh when the text has Chinese characters)")
    timeout: float = opt(60.0, "seconds one request may take, all of it")
    retries: int = opt(3, "further tries after a connection error, timeout, HTTP 429 or 5xx")
    backoff: float = opt(1.0, "seconds before the first retry, doubled for each next one")
    max_tokens: int = opt(400, "the judge's reply length limit")
    cache: str = opt("", "judgments .jsonl to reuse and append to (\"\" = none)")
    dry_run: bool = opt(False, "print the prompt the judge would get and exit, sending nothing")


def usage() -> str:
    """judge.py --help."""
    return render_help(JudgeConfig, "python judge.py --url=URL --model=NAME --beginning=TEXT --completion=TEXT "
                       "[--key=value ...]", __doc__,
                       epilog="Prints the grade as JSON; exit 0 when the judge answered (ok or unparsed), "
                              "1 when it did not, 2 for a bad command line.")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2  # no arguments: nothing to grade
    return cli("judge.py", lambda: _main(argv))


def _main(argv: list[str]) -> int:
    cfg = apply_options(JudgeConfig(), argv)
    if cfg.lang != "auto" and cfg.lang not in TEMPLATES:
        raise OptionError(f"--lang={cfg.lang}: choose from auto, {', '.join(TEMPLATES)}")
    lang = guess_lang(cfg.beginning + cfg.completion) if cfg.lang == "auto" else cfg.lang
    if not cfg.completion:
        raise OptionError("--completion is empty: give the text to grade")
    if cfg.dry_run:
        print(build_prompt(cfg.beginning, cfg.completion, lang=lang))
        return 0
    judge = Judge(cfg.url, cfg.model, key_env=cfg.key_env, timeout=cfg.timeout, retries=cfg.retries,
                  backoff=cfg.backoff, cache_path=cfg.cache or None, max_tokens=cfg.max_tokens)
    grade = judge.grade(cfg.beginning, cfg.completion, lang=lang)
    print(json.dumps(grade, ensure_ascii=False, indent=2))
    if grade["status"] == "error":
        raise UserError(grade["raw"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
