"""Structured output and tool calls (issue 19, first part), through the official ``openai`` client
against a real ``plexus serve`` under ``mpirun -n 2`` on the tiny demo model (random-ish weights:
whatever it would say, constrained decoding makes the output parse and match the schema, and
``jsonschema`` checks it independently)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from plexus.serve.openai_api import APIError
from plexus.serve.openai_tools import StreamedCall, message, parse_tools
from tests.test_server_mpi import Serve, client

MODEL = "tiny"
TRIP = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 30},
                                         "kind": {"enum": ["beach", "city", "mountains"]}},
        "required": ["city", "days", "kind"], "additionalProperties": False}
WEATHER = {"type": "object", "properties": {"location": {"type": "string", "maxLength": 16},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["location", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                                        "b": {"type": "integer", "minimum": -1000, "maximum": 1000}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "a + b", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def port(demo_tiny):
    s = Serve(demo_tiny, "--api-key", "k").wait_ready()
    yield s.port
    s.kill()


def streamed(stream) -> tuple[str, dict, str | None]:
    """(content, {index: {"id", "name", "arguments"}}, finish_reason) of a chat stream."""
    text, calls, reason = "", {}, None
    for ch in stream:
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        text += d.content or ""
        for tc in d.tool_calls or []:
            e = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            e["id"] = tc.id or e["id"]
            if tc.function is not None:
                e["name"] += tc.function.name or ""
                e["arguments"] += tc.function.arguments or ""
        reason = ch.choices[0].finish_reason or reason
    return text, calls, reason


@pytest.mark.timeout(300)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_validates(port, temperature):
    c = client(port, "k")
    fmt = {"type": "json_schema", "json_schema": {"name": "trip", "schema": TRIP, "strict": True}}
    for seed in range(3):
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Plan trip {seed}"}],
                                      max_tokens=80, temperature=temperature, seed=seed, response_format=fmt)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), TRIP)
        s = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Plan trip {seed}"}],
                                      max_tokens=80, temperature=temperature, seed=seed, response_format=fmt,
                                      stream=True)
        text, calls, reason = streamed(s)
        assert reason == "stop" and not calls and text == r.choices[0].message.content  # same seed, same text
    # any object: the model may wander inside a string past max_tokens (then "length", the text so far)
    r = c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=200, temperature=temperature, seed=1,
                                  response_format={"type": "json_object"})
    text = r.choices[0].message.content
    assert text.startswith("{") and r.choices[0].finish_reason in ("stop", "length")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("choice", ["named", "required"])
def test_forced_tool_calls_parse_and_validate(port, choice):
    c = client(port, "k")
    tool_choice = {"type": "function", "function": {"name": "get_weather"}} if choice == "named" else "required"
    names = set()
    for seed in range(4):
        kw = dict(model=MODEL, messages=ASK, max_tokens=200, tools=TOOLS, tool_choice=tool_choice, temperature=1.0,
                  seed=seed)
        r = c.chat.completions.create(**kw)
        assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
        (call,) = r.choices[0].message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name == "get_weather" if choice == "named" else call.function.name in SCHEMAS
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        names.add(call.function.name)
        text, calls, reason = streamed(c.chat.completions.create(**kw, stream=True))
        assert reason == "tool_calls" and text == "" and list(calls) == [0]
        assert calls[0]["id"].startswith("call_") and calls[0]["name"] == call.function.name
        assert calls[0]["arguments"] == call.function.arguments  # same seed: the same call, streamed
    if choice == "named":
        assert names == {"get_weather"}


@pytest.mark.timeout(300)
def test_a_tool_result_goes_back_to_the_model(port):
    """The assistant's call and the tool's result, sent back as OpenAI clients do, render and run."""
    c = client(port, "k")
    r = c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=60, tools=TOOLS, temperature=0,
                                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = r.choices[0].message.tool_calls[0]
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
    r = c.chat.completions.create(model=MODEL, messages=history, max_tokens=8, tools=TOOLS, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.tool_calls is None
    assert r.usage.prompt_tokens > 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"messages": ASK + [{"role": "tool", "content": "x"}]}, "messages[1].tool_call_id"),
])
def test_bad_structured_requests_are_400_naming_the_field(port, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        client(port, "k").chat.completions.create(**{"model": MODEL, "messages": ASK, "max_tokens": 4, **body})
    assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body


def test_parse_tools_and_the_stream_shapes():
    plan = parse_tools({"tools": TOOLS})
    assert plan.call == "auto" and plan.schema is None and plan.tools[0]["function"]["name"] == "get_weather"
    assert parse_tools({"tools": TOOLS, "tool_choice": "none"}).tools is None
    plan = parse_tools({"tools": TOOLS, "tool_choice": "required"})
    assert plan.call == "any" and len(plan.schema["anyOf"]) == 2
    named = parse_tools({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "add"}}})
    assert named.schema == ADD and named.name == "add"
    with pytest.raises(APIError):
        parse_tools({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}})
    msg, reason = message(named, '{"a":1,"b":2}', "stop")
    assert reason == "tool_calls" and msg["tool_calls"][0]["function"] == {"name": "add", "arguments": '{"a":1,"b":2}'}
    assert message(named, '{"a":1,', "length") == (None, "length")  # cut short: the text as it is
    s = StreamedCall(plan)
    assert s.piece('{"name":"add",') == [] and s.piece('"arguments":{"a":1,"b":2}}') == []
    deltas, reason = s.end("stop")
    assert reason == "tool_calls" and deltas[0]["tool_calls"][0]["function"]["name"] == "add"
    assert json.loads(deltas[0]["tool_calls"][0]["function"]["arguments"]) == {"a": 1, "b": 2}


@pytest.mark.timeout(300)
def test_logprobs_are_well_formed_and_greedy_picks_the_top_one(port):
    c = client(port, "k")
    kw = dict(model=MODEL, messages=ASK, max_tokens=12, temperature=0, logprobs=True, top_logprobs=5)
    r = c.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 5 and bytes(e.bytes).decode() == e.token
        tops = [t.logprob for t in e.top_logprobs]
        assert tops == sorted(tops, reverse=True) and sum(2.718281828 ** t for t in tops) <= 1 + 1e-5
        assert e.logprob == tops[0]  # greedy: the chosen token is the most likely one
    chunks = list(c.chat.completions.create(**kw, stream=True))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    assert c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4).choices[0].logprobs is None
    r = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert all(len(t) <= 3 and max(t.values()) == x for t, x in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


NAMES = {"get_weather", "add"}


@pytest.mark.parametrize("text,content,calls", [
    # Hermes / Qwen 2.5: <tool_call> blocks, text around them kept
    ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris", "unit": "celsius"}}\n'
     '</tool_call>', "Let me check.", [("get_weather", {"location": "Paris", "unit": "celsius"})]),
    ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n<tool_call>{"name": "add", '
     '"arguments": {"a": 3, "b": 4}}</tool_call>', "", [("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})]),
    # Llama 3.1: the whole message one JSON object with "parameters"
    ('{"name": "add", "parameters": {"a": 5, "b": 6}}', "", [("add", {"a": 5, "b": 6})]),
    # Mistral: [TOOL_CALLS] and a list
    ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"location": "Rome", "unit": "fahrenheit"}}]', "",
     [("get_weather", {"location": "Rome", "unit": "fahrenheit"})]),
    # not calls: plain text, JSON that names no tool, broken markup
    ("The weather is fine.", "The weather is fine.", []),
    ('{"name": "rm_rf", "parameters": {}}', '{"name": "rm_rf", "parameters": {}}', []),
    ('<tool_call>{"name": "add", "arguments": {"a": 1</tool_call>', '<tool_call>{"name": "add", "arguments": {"a": 1'
     '</tool_call>', []),
])
def test_a_models_own_tool_call_markup_is_read(text, content, calls):
    from plexus.serve.openai_tools import parse_calls

    got_content, got = parse_calls(text, NAMES)
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] == calls


def test_auto_streams_text_and_holds_what_may_be_a_call():
    plan = parse_tools({"tools": TOOLS})
    assert plan.call == "auto"
    s = StreamedCall(plan)
    out = s.piece("Let me ") + s.piece("check. <tool") + s.piece('_call>{"name": "add", ') + s.piece(
        '"arguments": {"a": 1, "b": 2}}</tool_call>')
    assert "".join(d.get("content", "") for d in out) == "Let me check. "  # the marker's start was held back
    deltas, reason = s.end("stop")
    assert reason == "tool_calls" and deltas[-1]["tool_calls"][0]["function"]["name"] == "add"
    s = StreamedCall(plan)
    assert s.piece('{"name"') == [] and s.piece(': "add", "parameters": {"a": 1, "b": 2}}') == []
    assert s.end("stop")[1] == "tool_calls"
    s = StreamedCall(plan)
    assert s.piece("Plain ") == [{"content": "Plain "}] and s.end("stop") == ([], "stop")
    s = StreamedCall(plan)
    assert s.piece("{not json") == [] and s.end("length") == ([{"content": "{not json"}], "length")


@pytest.mark.timeout(300)
def test_n_choices_with_a_seed_are_the_single_requests_seeds(port):
    """n = 3 with seed s: choice i is what a single request with seed s + i gives (each choice its
    own sequence in the batch, batch-invariant), streamed and not."""
    c = client(port, "k")
    kw = dict(model=MODEL, messages=ASK, max_tokens=10, temperature=1.0)
    r = c.chat.completions.create(**kw, n=3, seed=40)
    singles = [c.chat.completions.create(**kw, seed=40 + i).choices[0].message.content for i in range(3)]
    assert [ch.message.content for ch in sorted(r.choices, key=lambda ch: ch.index)] == singles
    assert len(set(singles)) > 1  # they really sample
    texts = {}
    for ch in c.chat.completions.create(**kw, n=3, seed=40, stream=True):
        for choice in ch.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    assert [texts[i] for i in range(3)] == singles
