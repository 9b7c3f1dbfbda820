"""The HTTP layer without MPI: the Flask app over a Scheduler driving a fake engine.

The fake engine "generates" the prompt's characters in reverse (one character per token), so
every request has an answer derived independently from its own prompt: a response routed to
the wrong client, a lost or duplicated piece of a stream, or a wrong usage count shows up.
End-to-end tests under mpirun (the real engine, the openai client) are in test_server_mpi.py.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import torch

from plexus.engine.engine import check_request
from plexus.engine.kv import BlockPool
from plexus.errors import PlexusError
from plexus.parallel.sizes import KV_BLOCK
from plexus.serve.app import create_app
from plexus.serve.http import HttpServer
from plexus.serve.openai_api import APIError, parse_chat, parse_completion, parse_json
from plexus.serve.scheduler import FAILED, STOPPING, Scheduler

pytestmark = pytest.mark.timeout(60)

KEY = "sk-test"
MODEL = "fake"
BOS, EOS = 1, 2


class FakeTokenizer:
    """One token per character (id = code point + 3); BOS and EOS are 1 and 2."""
    eos_token_ids = frozenset({EOS})

    def encode(self, text, add_special_tokens=True):
        return ([BOS] if add_special_tokens else []) + [ord(c) + 3 for c in text]

    def encode_chat(self, messages, tools=None):
        return self.encode("".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>")

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids if i > 2)


def expected(prompt_ids, max_tokens):
    """The fake engine's answer: the prompt's characters reversed, then EOS."""
    out = [i for i in reversed(prompt_ids) if i > 2] + [EOS]
    return out[:max_tokens]


class MPIError(Exception):
    """Stands in for mpi4py.MPI.Exception (the scheduler tells MPI errors by their module)."""


MPIError.__module__ = "mpi4py.MPI"


class FakeEngine:
    """Engine's batch interface (engine/batch.py drives it) over fake steps: each row's logits
    pick the next token of ``expected``; a step sleeps ``delay`` and hangs while ``block`` is set.
    Its KV cache holds the tokens themselves, in the blocks the runner names, so a sequence's
    prompt is what its blocks hold (a reused prefix included)."""
    max_context = 256
    vocab_size = 0x110000
    eos_token_ids = frozenset({EOS})

    def __init__(self, delay=0.0, max_batch=8, kv_blocks=None):
        self.delay, self.max_batch = delay, max_batch
        self.kv = BlockPool(kv_blocks or max_batch * self.max_context // KV_BLOCK)
        self.kv_tokens = self.kv.blocks * KV_BLOCK
        self.tables: dict[int, list[int]] = {}
        self.cells: dict[tuple[int, int], int] = {}  # (block, row) -> the token at that position
        self.block = threading.Event()  # set: the next step hangs like a collective with a dead rank
        self.raise_next: Exception | None = None
        self.tokens_made = 0
        self.pings = 0
        self.shutdowns = []
        self.started = threading.Event()
        self.prompts: dict[int, list[int]] = {}  # sequence id -> its prompt
        self.most_rows = 0  # the largest batch a step ran
        self.most_sequences = 0  # the most sequences holding blocks at once

    def check_request(self, ids, max_tokens):
        check_request(ids, max_tokens, self.max_context, self.vocab_size, self.kv_tokens)
        if not ids:
            raise PlexusError("the prompt is empty (no tokens)")
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise PlexusError(f"token id {bad[0]} is outside the vocabulary (size {self.vocab_size})")

    def begin_batch(self):
        pass

    def end_batch(self):
        self.tables.clear()

    @staticmethod
    def _logits(token):
        logits = torch.full((token + 1,), float("-inf"))
        logits[token] = 0.0  # the only possible pick, at any temperature
        return logits

    def _next(self, slot, n):
        """The n-th generated token of the sequence in ``slot`` (0 = the first)."""
        out = expected(self.prompts[slot], 10**6)
        return out[n] if n < len(out) else EOS

    def _put(self, sid, pos, token):
        table = self.tables[sid]
        self.cells[(table[pos // KV_BLOCK], pos % KV_BLOCK)] = token

    def _held(self, sid, end):
        table = self.tables[sid]
        return [self.cells[(table[p // KV_BLOCK], p % KV_BLOCK)] for p in range(end)]

    def batch_step(self, prefill, rows, grow=(), drop=()):
        self.started.set()
        for sid in drop:
            del self.tables[sid]
        for sid, blocks in grow:
            self.tables.setdefault(sid, []).extend(blocks)
        if self.raise_next:
            err, self.raise_next = self.raise_next, None
            raise err
        while self.block.is_set():
            time.sleep(0.01)
        time.sleep(self.delay)
        chunks = []
        for sid, start, ids in prefill:
            for i, t in enumerate(ids):
                self._put(sid, start + i, t)
            self.prompts[sid] = self._held(sid, start + len(ids))
            chunks.append(self._logits(self._next(sid, 0)))
        for token, sid, pos in rows:
            self._put(sid, pos, token)
        self.most_sequences = max(self.most_sequences, len(self.tables))
        self.most_rows = max(self.most_rows, len(rows))
        self.tokens_made += len(prefill) + len(rows)
        logits = [self._logits(self._next(slot, pos - len(self.prompts[slot]) + 1)) for _, slot, pos in rows]
        return chunks, logits

    def ping(self):
        self.pings += 1
        while self.block.is_set():
            time.sleep(0.01)

    def shutdown(self, error=None, now=False):
        self.shutdowns.append(now)


@pytest.fixture
def stack():
    """(scheduler, engine, client) of a ready server with an API key."""
    sched = Scheduler(world_size=3, stall_timeout=0, ping_interval=0.05, max_queue=32)
    app = create_app(sched, MODEL, api_key=KEY, max_body_bytes=4096)
    engine = FakeEngine()
    sched.start(engine, FakeTokenizer())
    yield sched, engine, app.test_client()
    sched.stop(now=True)


def auth(**extra):
    return {"Authorization": f"Bearer {KEY}", **extra}


def post(client, path, body, headers=None, **kw):
    return client.post(path, data=body if isinstance(body, (bytes, str)) else json.dumps(body),
                       headers=auth() if headers is None else headers, **kw)


def sse_events(data: bytes) -> list:
    events = []
    for block in data.decode().split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            payload = block[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def assert_error_shape(body, status, resp_status):
    assert resp_status == status, body
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "temperature": 0}
COMP = {"model": MODEL, "prompt": "abc", "max_tokens": 8, "temperature": 0}


def _with(base, **changes):
    out = dict(base)
    for k, v in changes.items():
        if v is _DROP:
            out.pop(k, None)
        else:
            out[k] = v
    return out


_DROP = object()
# (name, method, path, body (dict, raw str/bytes, or None), extra headers, expected status, expected param)
# Shared with the end-to-end test in test_server_mpi.py, where the model is the tiny demo model
# ("tiny", context 512): bodies use the placeholders MODEL and the context length via CTX.
CTX = "__ctx__"
BAD_REQUESTS = [
    ("malformed json", "POST", "/v1/chat/completions", '{"model": "m", "messages": [', {}, 400, None),
    ("json not an object", "POST", "/v1/completions", "[1, 2, 3]", {}, 400, None),
    ("nan is not json", "POST", "/v1/completions", '{"model": "MODEL", "prompt": "a", "temperature": NaN}',
     {}, 400, None),
    ("missing model", "POST", "/v1/chat/completions", _with(CHAT, model=_DROP), {}, 400, "model"),
    ("model not a string", "POST", "/v1/completions", _with(COMP, model=7), {}, 400, "model"),
    ("unknown model", "POST", "/v1/chat/completions", _with(CHAT, model="gpt-9"), {}, 404, "model"),
    ("missing messages", "POST", "/v1/chat/completions", _with(CHAT, messages=_DROP), {}, 400, "messages"),
    ("empty messages", "POST", "/v1/chat/completions", _with(CHAT, messages=[]), {}, 400, "messages"),
    ("bad role", "POST", "/v1/chat/completions", _with(CHAT, messages=[{"role": "wizard", "content": "x"}]),
     {}, 400, "messages[0].role"),
    ("content not text", "POST", "/v1/chat/completions",
     _with(CHAT, messages=[{"role": "user", "content": 5}]), {}, 400, "messages[0].content"),
    ("image content", "POST", "/v1/chat/completions", _with(CHAT, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]), {}, 400, "messages[0].content"),
    ("max_tokens zero", "POST", "/v1/completions", _with(COMP, max_tokens=0), {}, 400, "max_tokens"),
    ("max_tokens string", "POST", "/v1/completions", _with(COMP, max_tokens="8"), {}, 400, "max_tokens"),
    ("max_tokens bool", "POST", "/v1/chat/completions", _with(CHAT, max_tokens=True), {}, 400, "max_tokens"),
    ("max_completion_tokens negative", "POST", "/v1/chat/completions",
     _with(CHAT, max_completion_tokens=-1), {}, 400, "max_completion_tokens"),
    ("temperature too high", "POST", "/v1/completions", _with(COMP, temperature=2.5), {}, 400, "temperature"),
    ("temperature string", "POST", "/v1/chat/completions", _with(CHAT, temperature="hot"), {}, 400,
     "temperature"),
    ("top_p above one", "POST", "/v1/completions", _with(COMP, top_p=1.5), {}, 400, "top_p"),
    ("seed not integer", "POST", "/v1/completions", _with(COMP, seed=1.5), {}, 400, "seed"),
    ("n over 16", "POST", "/v1/chat/completions", _with(CHAT, n=17), {}, 400, "n"),
    ("n zero", "POST", "/v1/completions", _with(COMP, n=0), {}, 400, "n"),
    ("stop not strings", "POST", "/v1/completions", _with(COMP, stop=[1, 2]), {}, 400, "stop"),
    ("five stops", "POST", "/v1/completions", _with(COMP, stop=list("abcde")), {}, 400, "stop"),
    ("stream not bool", "POST", "/v1/chat/completions", _with(CHAT, stream="yes"), {}, 400, "stream"),
    ("stream_options without stream", "POST", "/v1/chat/completions",
     _with(CHAT, stream_options={"include_usage": True}), {}, 400, "stream_options"),
    ("logprobs not a bool", "POST", "/v1/chat/completions", _with(CHAT, logprobs="yes"), {}, 400, "logprobs"),
    ("top_logprobs without logprobs", "POST", "/v1/chat/completions", _with(CHAT, top_logprobs=3), {}, 400,
     "top_logprobs"),
    ("top_logprobs over 20", "POST", "/v1/chat/completions", _with(CHAT, logprobs=True, top_logprobs=21), {}, 400,
     "top_logprobs"),
    ("completion logprobs not an integer", "POST", "/v1/completions", _with(COMP, logprobs=True), {}, 400,
     "logprobs"),
    ("tool without a function", "POST", "/v1/chat/completions", _with(CHAT, tools=[{"type": "function"}]), {}, 400,
     "tools[0]"),
    ("presence penalty", "POST", "/v1/completions", _with(COMP, presence_penalty=1.0), {}, 400,
     "presence_penalty"),
    ("logit_bias not an object", "POST", "/v1/completions", _with(COMP, logit_bias=[1, 2]), {}, 400, "logit_bias"),
    ("logit_bias key not a token id", "POST", "/v1/chat/completions", _with(CHAT, logit_bias={"abc": 1}), {}, 400,
     "logit_bias"),
    ("logit_bias value over 100", "POST", "/v1/completions", _with(COMP, logit_bias={"5": 101}), {}, 400,
     "logit_bias"),
    ("logit_bias token outside vocab", "POST", "/v1/completions", _with(COMP, logit_bias={"1000000000": -1}), {},
     400, "logit_bias"),
    ("missing prompt", "POST", "/v1/completions", _with(COMP, prompt=_DROP), {}, 400, "prompt"),
    ("empty token list", "POST", "/v1/completions", _with(COMP, prompt=[]), {}, 400, "prompt"),
    ("two prompts", "POST", "/v1/completions", _with(COMP, prompt=["a", "b"]), {}, 400, "prompt"),
    ("token id outside vocab", "POST", "/v1/completions", _with(COMP, prompt=[5, 10 ** 9]), {}, 400, "prompt"),
    ("prompt plus max_tokens over context", "POST", "/v1/completions", _with(COMP, max_tokens=CTX), {}, 400,
     "max_tokens"),
    ("prompt alone over context", "POST", "/v1/completions", _with(COMP, prompt=[5] * 2, max_tokens=_DROP,
                                                                   __long_prompt__=True), {}, 400, "prompt"),
    ("body too large", "POST", "/v1/completions", "__big__", {}, 413, None),
    ("unknown route", "GET", "/v1/nothing-here", None, {}, 404, None),
    ("unknown route outside v1", "POST", "/admin", None, {}, 404, None),
    ("wrong method", "GET", "/v1/chat/completions", None, {}, 405, None),
    ("wrong method on models", "DELETE", "/v1/models", None, {}, 405, None),
    ("missing api key", "POST", "/v1/chat/completions", CHAT, {"Authorization": None}, 401, None),
    ("wrong api key", "POST", "/v1/chat/completions", CHAT, {"Authorization": "Bearer nope"}, 401, None),
    ("trust verified", "POST", "/v1/chat/completions", CHAT, {"X-Plexus-Trust": "verified"}, 501, None),
    ("trust attested", "POST", "/v1/completions", COMP, {"X-Plexus-Trust": "attested"}, 501, None),
    ("trust unknown", "POST", "/v1/completions", COMP, {"X-Plexus-Trust": "paranoid"}, 400, None),
]


def materialize(body, model: str, context: int, max_body: int, key: str):
    """A BAD_REQUESTS body for a server serving ``model`` with ``context`` tokens."""
    if body == "__big__":
        return json.dumps({"model": model, "prompt": "x" * (max_body + 10)}).encode()
    if isinstance(body, str):
        return body.replace("MODEL", model).encode()
    if body is None:
        return None
    body = dict(body)
    if body.get("model") == MODEL:
        body["model"] = model
    if body.get("max_tokens") == CTX:
        body["max_tokens"] = context
    if body.pop("__long_prompt__", False):
        body["prompt"] = [5] * (context + 1)
    return json.dumps(body).encode()


def request_headers(extra: dict, key: str) -> dict:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    for k, v in extra.items():
        if v is None:
            headers.pop(k, None)
        else:
            headers[k] = v
    return headers


def test_bad_request_table_is_big_enough():
    assert len(BAD_REQUESTS) >= 20
    assert {s for *_, s, _ in BAD_REQUESTS} >= {400, 401, 404, 405, 413, 501}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests(stack, case):
    sched, engine, client = stack
    name, method, path, body, extra, status, param = case
    data = materialize(body, MODEL, engine.max_context, 4096, KEY)
    resp = client.open(path, method=method, data=data, headers=request_headers(extra, KEY))
    assert_error_shape(resp.get_json(), status, resp.status_code)
    if param is not None:
        assert resp.get_json()["error"]["param"] == param
    if status == 405:
        assert "Allow" in resp.headers
    assert engine.tokens_made == 0  # nothing bad reached the engine
    assert client.get("/health").status_code == 200
    ok = post(client, "/v1/completions", COMP)
    assert ok.status_code == 200 and ok.get_json()["choices"][0]["text"] == "cba"


def test_health_loading_then_ok():
    sched = Scheduler(world_size=2, stall_timeout=0)
    client = create_app(sched, MODEL).test_client()
    resp = client.get("/health")
    assert resp.status_code == 503 and resp.get_json()["status"] == "loading"
    resp = post(client, "/v1/completions", COMP, headers={})
    assert_error_shape(resp.get_json(), 503, resp.status_code)
    assert resp.get_json()["error"]["code"] == "loading"
    sched.start(FakeEngine(), FakeTokenizer())
    resp = client.get("/health")
    assert resp.status_code == 200
    assert resp.get_json() == {"status": "ok", "version": __import__("plexus").__version__, "world_size": 2,
                               "model": MODEL}
    sched.stop(now=True)


def test_models(stack):
    _, _, client = stack
    body = client.get("/v1/models", headers=auth()).get_json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == [MODEL]
    card = body["data"][0]
    assert card["object"] == "model" and isinstance(card["created"], int) and card["owned_by"]
    assert client.get(f"/v1/models/{MODEL}", headers=auth()).get_json()["id"] == MODEL
    resp = client.get("/v1/models/other", headers=auth())
    assert_error_shape(resp.get_json(), 404, resp.status_code)


def test_chat_completion(stack):
    sched, engine, client = stack
    body = post(client, "/v1/chat/completions", CHAT).get_json()
    ids = FakeTokenizer().encode_chat(CHAT["messages"])
    want = expected(ids, 8)
    assert body["object"] == "chat.completion" and body["model"] == MODEL and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": FakeTokenizer().decode(want), "refusal": None}
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 8, "total_tokens": len(ids) + 8}


def test_completion_stop_string_and_eos(stack):
    _, _, client = stack
    body = post(client, "/v1/completions", _with(COMP, prompt="xyzab", stop=["z"])).get_json()
    assert body["choices"][0]["text"] == "ba" and body["choices"][0]["finish_reason"] == "stop"
    body = post(client, "/v1/completions", _with(COMP, prompt="ab", max_tokens=10)).get_json()
    assert body["choices"][0] == {"index": 0, "text": "ba", "logprobs": None, "finish_reason": "stop"}
    assert body["usage"]["completion_tokens"] == 3  # b, a, EOS


def test_token_id_prompt_and_default_max_tokens(stack):
    _, _, client = stack
    ids = FakeTokenizer().encode("hello world, this is long", False)
    body = post(client, "/v1/completions", {"model": MODEL, "prompt": ids}).get_json()
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 16, "total_tokens": len(ids) + 16}
    chat = post(client, "/v1/chat/completions", {"model": MODEL, "messages": CHAT["messages"]}).get_json()
    prompt_len = len(FakeTokenizer().encode_chat(CHAT["messages"]))
    assert chat["usage"]["completion_tokens"] == prompt_len  # the reversed prompt and EOS all fit


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_streaming(stack, kind):
    _, _, client = stack
    path, body = ("/v1/chat/completions", CHAT) if kind == "chat" else ("/v1/completions", COMP)
    resp = post(client, path, _with(body, stream=True, stream_options={"include_usage": True}))
    assert resp.status_code == 200 and resp.mimetype == "text/event-stream"
    events = sse_events(resp.get_data())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1
    usage = chunks[-1]
    assert usage["choices"] == []
    ids = FakeTokenizer().encode_chat(CHAT["messages"]) if kind == "chat" else FakeTokenizer().encode("abc")
    want = expected(ids, 8)
    assert usage["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(want),
                              "total_tokens": len(ids) + len(want)}
    if kind == "chat":
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    else:
        text = "".join(c["choices"][0]["text"] for c in chunks[:-1])
    assert text == FakeTokenizer().decode(want)
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]][-1] in ("length", "stop")
    assert all(c["usage"] is None for c in chunks[:-1])


def test_concurrent_clients_get_their_own_answers(stack):
    sched, engine, client = stack
    engine.delay = 0.001
    prompts = [f"prompt number {i}: " + "xyz"[i % 3] * i for i in range(16)]

    def one(i):
        c = client.application.test_client()
        body = _with(COMP, prompt=prompts[i], max_tokens=12, stream=bool(i % 2))
        resp = post(c, "/v1/completions", body)
        if i % 2:
            return "".join(e["choices"][0]["text"] for e in sse_events(resp.get_data())[:-1])
        return resp.get_json()["choices"][0]["text"]

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, range(16)))
    want = [FakeTokenizer().decode(expected(FakeTokenizer().encode(p), 12)) for p in prompts]
    assert got == want


def test_past_the_batch_and_the_queue_is_429_with_retry_after():
    """One place in the batch, one in the queue: the third request is refused at once with 429,
    an OpenAI-shaped error and Retry-After; the first two are answered in full."""
    sched = Scheduler(world_size=1, stall_timeout=0, ping_interval=0.05, max_queue=1, max_batch=1)
    app = create_app(sched, MODEL)
    engine = FakeEngine()
    sched.start(engine, FakeTokenizer())
    engine.block.set()
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, app.test_client(), "/v1/completions", COMP)
        assert engine.started.wait(5)
        second = pool.submit(post, app.test_client(), "/v1/completions", COMP)
        deadline = time.monotonic() + 5
        while sched.queue_depth() < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sched.queue_depth() == 1 and sched.running() == 1
        resp = post(app.test_client(), "/v1/completions", COMP)
        assert_error_shape(resp.get_json(), 429, resp.status_code)
        assert resp.get_json()["error"]["code"] == "queue_full"
        assert int(resp.headers["Retry-After"]) >= 1
        engine.block.clear()
        want = FakeTokenizer().decode(expected(FakeTokenizer().encode(COMP["prompt"]), COMP["max_tokens"]))
        for f in (first, second):
            assert f.result(10).get_json()["choices"][0]["text"] == want
    sched.stop()


def test_a_request_waits_at_most_queue_timeout():
    """(Checked between steps: each of the running request's steps takes 0.1 s here.)"""
    sched = Scheduler(world_size=1, stall_timeout=0, ping_interval=0.05, max_batch=1, queue_timeout=0.3)
    app = create_app(sched, MODEL)
    engine = FakeEngine(delay=0.1)
    sched.start(engine, FakeTokenizer())
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, app.test_client(), "/v1/completions", _with(COMP, max_tokens=40, prompt="a" * 40))
        assert engine.started.wait(5)
        t0 = time.monotonic()
        resp = post(app.test_client(), "/v1/completions", COMP)
        assert_error_shape(resp.get_json(), 503, resp.status_code)
        assert resp.get_json()["error"]["code"] == "queue_timeout" and "--queue-timeout" in resp.get_json()["error"]["message"]
        assert time.monotonic() - t0 < 5
        assert first.result(10).status_code == 200
    sched.stop()


def test_client_gone_stops_generation(stack):
    sched, engine, client = stack
    engine.delay = 0.01
    calls = {"n": 0}

    def gone():  # waitress's environ["waitress.client_disconnected"]: true after a few tokens
        calls["n"] += 1
        return calls["n"] > 3

    body = _with(COMP, prompt="z" * 50, max_tokens=50, stream=True)
    resp = post(client, "/v1/completions", body,
                environ_overrides={"waitress.client_disconnected": gone})
    resp.get_data()
    assert engine.tokens_made < 10
    assert _metric(client, "plexus_requests_cancelled_total") == 1
    assert _metric(client, "plexus_kv_blocks_used") == 0  # its blocks are back (its prompt's whole chunks cached)
    assert _metric(client, "plexus_kv_blocks_cached") == 2  # tokens 0-31 (51 in the prompt, chunks of 32)


def test_stop_now_answers_everyone_503(stack):
    sched, engine, client = stack
    engine.block.set()
    results = []
    threads = [threading.Thread(target=lambda: results.append(post(client.application.test_client(),
                                                                   "/v1/completions", COMP)))
               for _ in range(3)]
    [t.start() for t in threads]
    assert engine.started.wait(5)
    time.sleep(0.1)
    sched.stop(now=True)
    [t.join(5) for t in threads]
    assert [r.status_code for r in results] == [503] * 3
    assert all(r.get_json()["error"]["code"] == "shutting_down" for r in results)
    assert client.get("/health").get_json()["status"] == STOPPING
    resp = post(client, "/v1/completions", COMP)
    assert_error_shape(resp.get_json(), 503, resp.status_code)
    engine.block.clear()
    assert sched.finished.wait(5) and engine.shutdowns == [True]


def test_graceful_stop_finishes_in_flight(stack):
    sched, engine, client = stack
    engine.delay = 0.02
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", post(client.application.test_client(),
                                                                 "/v1/completions", _with(COMP, max_tokens=3))))
    t.start()
    assert engine.started.wait(5)
    sched.stop(now=False, drain_timeout=5)
    t.join(5)
    assert out["r"].status_code == 200 and out["r"].get_json()["choices"][0]["text"] == "cba"
    assert sched.finished.wait(5) and engine.shutdowns == [False]


def test_drain_timeout_cancels_in_flight(stack):
    sched, engine, client = stack
    engine.delay = 0.05
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", post(client.application.test_client(),
                                                                 "/v1/completions", _with(COMP, max_tokens=60,
                                                                                          prompt="q" * 60))))
    t.start()
    assert engine.started.wait(5)
    t0 = time.monotonic()
    sched.stop(now=False, drain_timeout=0.3)
    t.join(5)
    assert out["r"].status_code == 503 and time.monotonic() - t0 < 2
    assert sched.finished.wait(5)


def test_mpi_error_fails_the_mesh(stack):
    sched, engine, client = stack
    engine.raise_next = MPIError("MPI_ERR_PROC_FAILED: Process Failure")
    resp = post(client, "/v1/completions", COMP)
    assert_error_shape(resp.get_json(), 503, resp.status_code)
    assert "Process Failure" in resp.get_json()["error"]["message"]
    assert sched.state == FAILED and sched.failure_kind == "mpi" and sched.finished.is_set()
    health = client.get("/health")
    assert health.status_code == 503 and health.get_json()["status"] == "failed"
    assert post(client, "/v1/chat/completions", CHAT).status_code == 503


def test_watchdog_notices_a_stuck_collective():
    sched = Scheduler(world_size=2, stall_timeout=0.3, ping_interval=0.05)
    client = create_app(sched, MODEL).test_client()
    engine = FakeEngine()
    sched.start(engine, FakeTokenizer())
    engine.block.set()  # the next ping (or token) never returns, like a collective with a dead rank
    t0 = time.monotonic()
    resp = post(client, "/v1/completions", COMP, headers={})
    assert_error_shape(resp.get_json(), 503, resp.status_code)
    assert sched.failure_kind == "stall" and time.monotonic() - t0 < 3
    engine.block.clear()


def test_idle_engine_pings_the_mesh(stack):
    sched, engine, _ = stack
    time.sleep(0.3)
    assert engine.pings >= 2


def _metric(client, name, labels=""):
    text = client.get("/metrics").get_data(as_text=True)
    for line in text.splitlines():
        if line.startswith(name + labels + " ") or (not labels and line.startswith(name + " ")):
            return float(line.split()[-1])
    raise AssertionError(f"{name}{labels} not in /metrics:\n{text}")


def test_metrics(stack):
    sched, engine, client = stack
    post(client, "/v1/completions", COMP)
    post(client, "/v1/completions", _with(COMP, model="nope"))
    text = client.get("/metrics").get_data(as_text=True)
    assert 'plexus_requests_total{route="/v1/completions",status="200"} 1.0' in text
    assert 'plexus_requests_total{route="/v1/completions",status="404"} 1.0' in text
    assert _metric(client, "plexus_prompt_tokens_total") == 4
    assert _metric(client, "plexus_generation_tokens_total") == 4
    assert _metric(client, "plexus_world_size") == 3
    assert _metric(client, "plexus_queue_depth") == 0
    assert _metric(client, "plexus_time_to_first_token_seconds_count") == 1
    assert _metric(client, "plexus_time_per_output_token_seconds_count") == 3  # 4 tokens (3 text, EOS): 3 gaps


def test_two_apps_have_separate_registries():
    a, b = Scheduler(stall_timeout=0), Scheduler(stall_timeout=0)
    ca, cb = create_app(a, "a").test_client(), create_app(b, "b").test_client()
    ca.get("/health")
    assert 'route="/health"' in ca.get("/metrics").get_data(as_text=True)
    assert 'route="/health"' not in cb.get("/metrics").get_data(as_text=True)


def test_api_key_not_needed_for_health_and_metrics(stack):
    _, _, client = stack
    assert client.get("/health").status_code == 200
    assert client.get("/metrics").status_code == 200
    assert post(client, "/v1/completions", COMP, headers=auth(**{"X-Plexus-Trust": "FAST"})).status_code == 200


# ---- the request parsers, directly --------------------------------------------------------------

def test_parse_chat_fields():
    req = parse_chat({"model": "m", "messages": [{"role": "system", "content": [{"type": "text", "text": "a"},
                                                                                {"type": "text", "text": "b"}]},
                                                 {"role": "assistant", "content": None}],
                      "max_completion_tokens": 5, "max_tokens": 9, "temperature": 0.5, "top_p": 0.9, "seed": -3,
                      "stop": "END", "stream": True, "stream_options": {"include_usage": True}, "user": "u",
                      "top_k": 7, "presence_penalty": 0})
    assert req.messages == [{"role": "system", "content": "ab"}, {"role": "assistant", "content": ""}]
    assert req.max_tokens == 5 and req.stream and req.include_usage
    s = req.sampling
    assert (s.temperature, s.top_p, s.top_k, s.seed, s.stop) == (0.5, 0.9, 7, -3, ("END",))


def test_parse_defaults_follow_openai():
    req = parse_completion({"model": "m", "prompt": ["only one"]})
    assert req.prompt == "only one" and req.max_tokens is None and not req.stream
    assert req.sampling.temperature == 1.0 and req.sampling.top_p == 1.0  # OpenAI's defaults
    assert parse_completion({"model": "m", "prompt": [[4, 5]]}).prompt == [4, 5]
    assert parse_completion({"model": "m", "prompt": "x", "top_p": 0}).sampling.temperature == 0.0


@pytest.mark.parametrize("data", [b"\xff\xfe", b"", b"null", b'"text"', b'{"a": Infinity}'])
def test_parse_json_rejects(data):
    with pytest.raises(APIError) as e:
        parse_json(data)
    assert e.value.status == 400


# ---- the real waitress server, in this process --------------------------------------------------

def _free_request(port, body, read_chunks=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    return conn, conn.getresponse()


def test_waitress_disconnect_and_stop_accepting():
    sched = Scheduler(world_size=1, stall_timeout=0, ping_interval=0.05)
    engine = FakeEngine(delay=0.02)
    http_server = HttpServer(create_app(sched, MODEL), "127.0.0.1", 0, threads=8)
    http_server.start()
    sched.start(engine, FakeTokenizer())
    try:
        body = json.dumps(_with(COMP, prompt="w" * 60, max_tokens=60, stream=True)).encode()
        sock = socket.create_connection(("127.0.0.1", http_server.port), timeout=10)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")  # the headers and the first chunk
        sock.close()  # the client leaves mid-stream
        deadline = time.monotonic() + 5
        while sched.running() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.tokens_made < 30, "generation went on after the client left"
        conn, resp = _free_request(http_server.port, _with(COMP, max_tokens=2))
        assert resp.status == 200 and json.loads(resp.read())["choices"][0]["text"] == "cb"
        conn.close()
        http_server.stop_accepting()
        time.sleep(0.2)
        with pytest.raises(OSError):
            _free_request(http_server.port, COMP)
        assert http_server.wait_idle(2)
    finally:
        sched.stop(now=True)


# ---- signals (plexus.serve.lifecycle) ---------------------------------------------------------------------

def test_sigcont_means_the_launcher_unless_we_were_stopped():
    from plexus.serve.lifecycle import Signals

    s = Signals()
    seen = []
    s.set_callback(lambda signum, launcher: seen.append((signum, launcher)))
    s.on_stop(15, None)  # a plain SIGTERM: drain
    # as if the process had been stopped (ctrl-Z) for 5 s: no CPU used since the last tick
    s.last_tick, s.last_cpu = time.monotonic() - 5, time.process_time()
    s.on_cont(18, None)
    s.last_tick = s.resumed = time.monotonic()  # the tick thread saw the resume before the handler ran
    s.on_cont(18, None)
    assert seen == [(15, False)]
    s.resumed = float("-inf")
    # a long tick gap while the process kept computing (a starved thread) is no stop
    s.last_tick, s.last_cpu = time.monotonic() - 5, time.process_time() - 2
    s.on_cont(18, None)  # a running process gets SIGCONT: PRRTE's kill sequence has begun
    s.on_stop(15, None)  # and its SIGTERM follows
    assert seen[1:] == [(18, True), (15, True)]


def test_signals_before_the_callback_are_replayed():
    from plexus.serve.lifecycle import Signals

    s = Signals()
    s.on_stop(2, None)
    seen = []
    s.set_callback(lambda signum, launcher: seen.append(signum))
    assert seen == [2]
