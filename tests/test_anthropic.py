"""Anthropic's Messages API (issue 19) through the official ``anthropic`` client, unchanged,
against a real ``plexus serve`` under ``mpirun -n 2`` on the tiny demo model. Greedy runs use
``top_k: 1`` (this client version sends no temperature)."""

from __future__ import annotations

import http.client
import json

import anthropic
import jsonschema
import pytest

from tests.test_server_mpi import Serve, client

MODEL = "tiny"
KEY = "sk-anthropic"
GREEDY = {"top_k": 1}
HELLO = [{"role": "user", "content": "Tell me a story"}]
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"name": "get_weather", "description": "Weather now", "input_schema": WEATHER},
         {"name": "add", "input_schema": {"type": "object", "properties": {"a": {"type": "integer", "maximum": 99}},
                                          "required": ["a"], "additionalProperties": False}}]


@pytest.fixture(scope="module")
def port(demo_tiny):
    s = Serve(demo_tiny, "--api-key", KEY).wait_ready()
    yield s.port
    s.kill()


def claude(port, key=KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key=key, max_retries=0, timeout=60)


def raw_events(port, body) -> list[tuple[str, dict]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/messages", json.dumps({**body, "stream": True}),
                 {"x-api-key": KEY, "content-type": "application/json", "anthropic-version": "2023-06-01"})
    data = conn.getresponse().read().decode()
    out = []
    for block in data.split("\n\n"):
        if block.strip():
            name, payload = block.split("\n", 1)
            out.append((name.removeprefix("event: "), json.loads(payload.removeprefix("data: "))))
    return out


@pytest.mark.timeout(300)
def test_messages_stream_and_not_give_the_same_text_in_anthropics_event_order(port):
    c = claude(port)
    r = c.messages.create(model=MODEL, max_tokens=24, messages=HELLO, extra_body=GREEDY)
    assert r.type == "message" and r.role == "assistant" and r.id.startswith("msg_")
    assert [b.type for b in r.content] == ["text"] and r.stop_reason in ("end_turn", "max_tokens")
    with c.messages.stream(model=MODEL, max_tokens=24, messages=HELLO, extra_body=GREEDY) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == r.content[0].text == final.content[0].text
    assert final.usage.output_tokens == r.usage.output_tokens and final.usage.input_tokens == r.usage.input_tokens
    names = [n for n, _ in raw_events(port, {"model": MODEL, "max_tokens": 24, "messages": HELLO, **GREEDY})]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert set(names[3:-3]) == {"content_block_delta"} and len(names) > 6
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert c.messages.count_tokens(model=MODEL, messages=HELLO).input_tokens == r.usage.input_tokens


@pytest.mark.timeout(300)
def test_the_same_greedy_text_as_openai_chat(port):
    a = claude(port).messages.create(model=MODEL, max_tokens=16, messages=HELLO, system="Be brief.",
                                     extra_body=GREEDY)
    o = client(port, KEY).chat.completions.create(
        model=MODEL, max_tokens=16, temperature=0,
        messages=[{"role": "system", "content": "Be brief."}] + HELLO)
    assert a.content[0].text == o.choices[0].message.content
    assert a.usage.input_tokens == o.usage.prompt_tokens and a.usage.output_tokens == o.usage.completion_tokens


@pytest.mark.timeout(300)
def test_stop_sequences_end_the_text_where_they_appear(port):
    c = claude(port)
    full = c.messages.create(model=MODEL, max_tokens=30, messages=HELLO, extra_body=GREEDY).content[0].text
    stop = full[6:9]
    assert len(stop) == 3 and full.find(stop) >= 0
    r = c.messages.create(model=MODEL, max_tokens=30, messages=HELLO, stop_sequences=["@@never@@", stop],
                          extra_body=GREEDY)
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == stop
    assert r.content[0].text == full[:full.find(stop)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("choice", [{"type": "any"}, {"type": "tool", "name": "get_weather"}])
def test_tool_use_blocks_validate_stream_and_not(port, choice):
    c = claude(port)
    schemas = {t["name"]: t["input_schema"] for t in TOOLS}
    for seed_prompt in ("Weather in Oslo?", "Add one"):
        msgs = [{"role": "user", "content": seed_prompt}]
        r = c.messages.create(model=MODEL, max_tokens=120, messages=msgs, tools=TOOLS, tool_choice=choice,
                              extra_body=GREEDY)
        (block,) = r.content
        assert r.stop_reason == "tool_use" and block.type == "tool_use" and block.id.startswith("toolu_")
        jsonschema.validate(block.input, schemas[block.name])
        if choice["type"] == "tool":
            assert block.name == "get_weather"
        with c.messages.stream(model=MODEL, max_tokens=120, messages=msgs, tools=TOOLS, tool_choice=choice,
                               extra_body=GREEDY) as s:
            final = s.get_final_message()
        assert final.stop_reason == "tool_use" and final.content[0].name == block.name
        assert final.content[0].input == block.input
        # the result goes back as a tool_result block, and the model answers
        history = msgs + [{"role": "assistant", "content": [block.model_dump(include={"type", "id", "name", "input"})]},
                          {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block.id,
                                                        "content": "21 degrees"}]}]
        after = c.messages.create(model=MODEL, max_tokens=8, messages=history, tools=TOOLS, extra_body=GREEDY)
        assert after.content[0].type == "text" and after.usage.input_tokens > r.usage.input_tokens


@pytest.mark.timeout(120)
def test_errors_have_anthropics_shape(port):
    c = claude(port)
    with pytest.raises(anthropic.BadRequestError) as e:
        c.messages.create(model=MODEL, max_tokens=0, messages=HELLO)
    assert e.value.body == {"type": "error", "error": {"type": "invalid_request_error",
                                                       "message": "'max_tokens' must be at least 1, got 0"}}
    with pytest.raises(anthropic.BadRequestError) as e:
        c.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": [{"type": "image"}]}])
    assert e.value.body["error"]["type"] == "invalid_request_error" and "image" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as e:
        c.messages.create(model="claude-9", max_tokens=4, messages=HELLO)
    assert e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.AuthenticationError) as e:
        claude(port, "wrong").messages.create(model=MODEL, max_tokens=4, messages=HELLO)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "authentication_error"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # max_tokens is required
    conn.request("POST", "/v1/messages", json.dumps({"model": MODEL, "messages": HELLO}),
                 {"x-api-key": KEY, "content-type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 400 and json.loads(resp.read())["error"]["message"] == "'max_tokens' is required"
