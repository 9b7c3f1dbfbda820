"""``tool_choice: "auto"``: a model's own tool-call markup read out of its free text, through
the server on the fake engine (tests/test_server.py), whose answer is its prompt reversed: a
message whose text is a reversed ``<tool_call>`` block makes the "model" write that block."""

from __future__ import annotations

import json

import pytest

from plexus.serve.app import create_app
from plexus.serve.scheduler import Scheduler
from tests.test_server import MODEL, FakeEngine, FakeTokenizer, post, sse_events

CALL = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]


@pytest.fixture
def app():
    sched = Scheduler(world_size=1, stall_timeout=0, ping_interval=0.05)
    a = create_app(sched, MODEL)
    sched.start(FakeEngine(), FakeTokenizer())
    yield a.test_client()
    sched.stop(now=True)


def ask(content, **extra):
    # the fake template is "<user>...<assistant>": reversed, the answer is ">tnatsissa<" + content + ">resu<"
    return {"model": MODEL, "messages": [{"role": "user", "content": content[::-1]}], "max_tokens": 120,
            "temperature": 0, **extra}


def test_chat_auto_reads_the_call_streamed_and_not(app):
    r = post(app, "/v1/chat/completions", ask(CALL, tools=TOOLS)).get_json()
    (choice,) = r["choices"]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "add" and json.loads(call["function"]["arguments"]) == {"a": 1, "b": 2}
    assert choice["message"]["content"] == ">tnatsissa<>resu<"  # the text around the call
    events = sse_events(post(app, "/v1/chat/completions", ask(CALL, tools=TOOLS, stream=True)).get_data())
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    text = "".join(d.get("content") or "" for d in deltas)
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert "<tool_call>" not in text and text.startswith(">tnatsissa<")
    assert [c["function"]["name"] for c in calls] == ["add"] and events[-2]["choices"][0]["finish_reason"] == "tool_calls"
    # without tools, or with tool_choice none, the same text is text
    r = post(app, "/v1/chat/completions", ask(CALL)).get_json()
    assert r["choices"][0]["message"]["content"] == ">tnatsissa<" + CALL + ">resu<"
    r = post(app, "/v1/chat/completions", ask(CALL, tools=TOOLS, tool_choice="none")).get_json()
    assert "tool_calls" not in r["choices"][0]["message"]


def test_anthropic_auto_gives_text_and_tool_use_blocks(app):
    body = {"model": MODEL, "max_tokens": 120, "messages": [{"role": "user", "content": CALL[::-1]}], "top_k": 1,
            "tools": [{"name": "add", "input_schema": {"type": "object"}}]}
    r = post(app, "/v1/messages", body).get_json()
    assert r["stop_reason"] == "tool_use"
    assert [b["type"] for b in r["content"]] == ["text", "tool_use"] and r["content"][1]["input"] == {"a": 1, "b": 2}
    data = post(app, "/v1/messages", {**body, "stream": True}).get_data().decode()
    names = [block.split("\n")[0].removeprefix("event: ") for block in data.split("\n\n") if block.strip()]
    assert names.count("content_block_start") == 2 and names[-1] == "message_stop"
    assert '"stop_reason": "tool_use"' in data and "<tool_call>" not in data


def test_n_choices_each_run_as_their_own_sequence(app):
    from tests.test_server import COMP, _with, expected

    tok = FakeTokenizer()
    want = tok.decode(expected(tok.encode("hello there"), 8))
    r = post(app, "/v1/completions", _with(COMP, prompt="hello there", max_tokens=8, n=3)).get_json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2] and all(c["text"] == want for c in r["choices"])
    assert r["usage"]["completion_tokens"] == 3 * len(expected(tok.encode("hello there"), 8))  # 3 x 8
    assert r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"]
    events = sse_events(post(app, "/v1/chat/completions", {**ask("abc"), "n": 2, "stream": True,
                                                           "stream_options": {"include_usage": True}}).get_data())
    assert events[-1] == "[DONE]" and events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] > 0
    texts = {0: "", 1: ""}
    finished = set()
    for e in events[:-2]:
        (c,) = e["choices"]
        texts[c["index"]] += c["delta"].get("content") or ""
        if c["finish_reason"]:
            finished.add(c["index"])
    assert texts[0] == texts[1] == ">tnatsissa<abc>resu<" and finished == {0, 1}


def test_ollama_chat_with_tools_gives_the_call_in_the_final_object(app):
    body = {"model": MODEL, "messages": [{"role": "user", "content": CALL[::-1]}], "tools": TOOLS,
            "options": {"temperature": 0, "num_predict": 120}}
    r = post(app, "/api/chat", {**body, "stream": False}).get_json()
    (call,) = r["message"]["tool_calls"]
    assert call["function"] == {"name": "add", "arguments": {"a": 1, "b": 2}} and r["message"]["content"] == (
        ">tnatsissa<>resu<")
    lines = [json.loads(x) for x in post(app, "/api/chat", body).get_data().decode().splitlines()]
    streamed = "".join(x["message"]["content"] for x in lines)
    assert "<tool_call>" not in streamed and lines[-1]["done"] and lines[-1]["message"]["tool_calls"] == [call]
    plain = [json.loads(x) for x in post(app, "/api/chat", {**body, "messages": [
        {"role": "user", "content": "olleh"}]}).get_data().decode().splitlines()]
    assert "".join(x["message"]["content"] for x in plain) == ">tnatsissa<hello>resu<"  # no call: all the text
