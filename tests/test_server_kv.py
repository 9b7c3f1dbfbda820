"""The server's KV-cache side on the fake engine (tests/test_server.py's FakeEngine, whose cache
holds the tokens themselves in the blocks the runner names): admission by free blocks, a request
larger than the whole cache, the prefix cache, and its metrics."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from plexus.serve.app import create_app
from plexus.serve.scheduler import Scheduler
from tests.test_server import (COMP, MODEL, FakeEngine, FakeTokenizer, _metric, _with, assert_error_shape,
                               expected, post)

pytestmark = pytest.mark.timeout(60)


def server(kv_blocks=None, prefix_cache=True, **engine):
    sched = Scheduler(world_size=1, stall_timeout=0, ping_interval=0.05, max_queue=32, prefix_cache=prefix_cache)
    app = create_app(sched, MODEL)
    eng = FakeEngine(kv_blocks=kv_blocks, **engine)
    sched.start(eng, FakeTokenizer())
    return sched, eng, app.test_client()


def answer(prompt, max_tokens):
    tok = FakeTokenizer()
    return tok.decode(expected(tok.encode(prompt), max_tokens))


def test_requests_wait_for_blocks_not_only_for_places_in_the_batch():
    """8 places, but 4 blocks (64 tokens): each request (20-token prompt + 12) needs 2, so at most
    two run at once; the rest wait in the queue and all get their answers."""
    sched, engine, client = server(kv_blocks=4, delay=0.002)
    prompts = [f"request {i:2d} abcdefghi" for i in range(6)]

    def one(p):
        return post(client.application.test_client(), "/v1/completions", _with(COMP, prompt=p, max_tokens=12))

    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(one, prompts))
    assert [r.get_json()["choices"][0]["text"] for r in got] == [answer(p, 12) for p in prompts]
    assert engine.most_sequences == 2 and engine.most_rows == 2
    assert engine.kv.used == 0 and engine.kv.reserved == 0
    sched.stop()


def test_a_request_larger_than_the_whole_cache_is_400_before_it_is_queued():
    sched, engine, client = server(kv_blocks=4)
    resp = post(client, "/v1/completions", _with(COMP, prompt="y" * 40, max_tokens=40))  # 41 + 40 - 1 = 80 > 64
    body = resp.get_json()
    assert_error_shape(body, 400, resp.status_code)
    assert "needs 80 tokens of KV cache" in body["error"]["message"] and "holds 64" in body["error"]["message"]
    assert not engine.started.is_set() and sched.queue_depth() == 0
    sched.stop()


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_the_second_turn_reuses_the_first_turns_blocks(prefix_cache):
    """A prompt that starts with an earlier one's 64 tokens (two whole chunks) starts from their
    blocks: the fake engine answers from what its blocks hold, so the answer shows they hold the
    prefix; the hit is counted. With --no-prefix-cache nothing is kept."""
    sched, engine, client = server(prefix_cache=prefix_cache)
    first = "the history of a chat, " * 3 + "tell me"  # 76 characters: 77 tokens
    second = first + " more"
    for p in (first, second):
        resp = post(client, "/v1/completions", _with(COMP, prompt=p, max_tokens=6))
        assert resp.get_json()["choices"][0]["text"] == answer(p, 6)
    assert _metric(client, "plexus_prefix_cache_hit_tokens_total") == (64 if prefix_cache else 0)
    assert _metric(client, "plexus_kv_blocks_used") == 0
    assert _metric(client, "plexus_kv_blocks_cached") == (4 if prefix_cache else 0)  # the second's are the first's
    assert _metric(client, "plexus_kv_blocks_total") == engine.kv.blocks
    assert (_metric(client, "plexus_kv_blocks_free") + _metric(client, "plexus_kv_blocks_cached")
            == engine.kv.blocks)
    sched.stop()


def test_a_full_pool_evicts_the_oldest_prefix_and_answers_stay_right():
    """A pool of 6 blocks: each 40-token prompt keeps 2 blocks cached; later prompts evict the
    oldest, and a prompt whose prefix was evicted is computed again, correctly."""
    sched, engine, client = server(kv_blocks=6)
    prompts = [f"{c * 8} some shared words {c}" * 1 for c in "abcd"]  # 38 characters each
    prompts = [p + "x" * (40 - len(p)) for p in prompts]
    for p in prompts + prompts[:1]:
        resp = post(client, "/v1/completions", _with(COMP, prompt=p, max_tokens=4))
        assert resp.get_json()["choices"][0]["text"] == answer(p, 4)
    assert engine.kv.evictions > 0
    assert _metric(client, "plexus_prefix_cache_hit_tokens_total") == 0  # "a..." was evicted before its return
    sched.stop()


def test_cors_is_off_by_default_and_on_for_the_listed_origins():
    from plexus.serve.app import create_app

    sched = Scheduler(world_size=1, stall_timeout=0, ping_interval=0.05)
    closed = create_app(sched, MODEL, api_key="k").test_client()
    pre = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization, content-type"}
    assert closed.options("/v1/chat/completions", headers=pre).status_code == 403
    r = closed.get("/health", headers={"Origin": "http://app.example"})
    assert "Access-Control-Allow-Origin" not in r.headers
    open_ = create_app(sched, MODEL, api_key="k", cors_origins=("http://app.example",)).test_client()
    r = open_.options("/v1/chat/completions", headers=pre)  # the preflight carries no key
    assert r.status_code == 204 and r.headers["Access-Control-Allow-Origin"] == "http://app.example"
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    assert "authorization" in r.headers["Access-Control-Allow-Headers"].lower()
    r = open_.get("/v1/models", headers={"Origin": "http://app.example", "Authorization": "Bearer k"})
    assert r.headers["Access-Control-Allow-Origin"] == "http://app.example"
    r = open_.get("/v1/models", headers={"Origin": "http://evil.example", "Authorization": "Bearer k"})
    assert "Access-Control-Allow-Origin" not in r.headers
    assert open_.options("/v1/models", headers={**pre, "Origin": "http://evil.example"}).status_code == 403
    r = open_.get("/v1/models", headers={"Origin": "http://app.example"})  # the key is still wanted
    assert r.status_code == 401 and r.headers["Access-Control-Allow-Origin"] == "http://app.example"
    anyone = create_app(sched, MODEL, cors_origins=("*",)).test_client()
    assert anyone.get("/health", headers={"Origin": "http://x"}).headers["Access-Control-Allow-Origin"] == "*"
