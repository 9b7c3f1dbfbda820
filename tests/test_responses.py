"""OpenAI's Responses API (issue 19) through the official ``openai`` client against a real
``plexus serve`` under ``mpirun -n 2`` on the tiny demo model; and one request on all four
surfaces (OpenAI chat, Responses, Anthropic Messages, Ollama chat) gives the same greedy text."""

from __future__ import annotations

import json

import anthropic
import jsonschema
import ollama
import openai
import pytest

from tests.test_server_mpi import Serve, client

MODEL = "tiny"
KEY = "sk-responses"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
           "required": ["city"], "additionalProperties": False}
TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather now", "parameters": WEATHER}]


@pytest.fixture(scope="module")
def port(demo_tiny):
    s = Serve(demo_tiny, "--api-key", KEY).wait_ready()
    yield s.port
    s.kill()


@pytest.mark.timeout(300)
def test_response_streamed_deltas_concatenate_to_the_final_text(port):
    c = client(port, KEY)
    kw = dict(model=MODEL, input="Tell me a story", max_output_tokens=16, temperature=0)
    r = c.responses.create(**kw)
    assert r.object == "response" and r.id.startswith("resp_") and r.output[0].type == "message"
    assert r.status == ("incomplete" if r.usage.output_tokens == 16 else "completed")
    assert r.output_text and r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    deltas, types = [], []
    with c.responses.stream(**kw) as s:
        for e in s:
            types.append(e.type)
            if e.type == "response.output_text.delta":
                deltas.append(e.delta)
            last = e
    assert "".join(deltas) == r.output_text == last.response.output_text
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete" if r.status == "incomplete" else "response.completed"]
    # items as input: instructions, a message with text parts, a past call and its output
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "21 degrees"}]
    r = c.responses.create(model=MODEL, instructions="Be brief.", input=items, tools=TOOLS, max_output_tokens=8)
    assert r.output[0].type == "message" and r.usage.input_tokens > 10


@pytest.mark.timeout(300)
@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "get_weather"}])
def test_function_calls_and_json_output_validate(port, choice):
    c = client(port, KEY)
    for seed_text in ("Weather in Oslo?", "And in Rome?"):
        r = c.responses.create(model=MODEL, input=seed_text, tools=TOOLS, tool_choice=choice, max_output_tokens=80)
        (call,) = r.output
        assert r.status == "completed" and call.type == "function_call" and call.name == "get_weather"
        jsonschema.validate(json.loads(call.arguments), WEATHER)
        with c.responses.stream(model=MODEL, input=seed_text, tools=TOOLS, tool_choice=choice,
                                max_output_tokens=80) as s:
            final = s.get_final_response()
        assert final.output[0].type == "function_call"
        jsonschema.validate(json.loads(final.output[0].arguments), WEATHER)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    r = c.responses.create(model=MODEL, input="A number", max_output_tokens=40,
                           text={"format": {"type": "json_schema", "name": "num", "schema": schema}})
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), schema)


@pytest.mark.timeout(120)
def test_stateless_and_bad_requests(port):
    c = client(port, KEY)
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model=MODEL, input="x", previous_response_id="resp_123")
    assert e.value.body["param"] == "previous_response_id" and "stateless" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model=MODEL, input=[{"type": "input_image", "image_url": "x"}])
    assert e.value.body["param"] == "input[0]"
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model="gpt-9", input="x")
    assert c.responses.create(model=MODEL, input="x", max_output_tokens=2, store=True).store is False


@pytest.mark.timeout(300)
def test_one_request_four_surfaces_the_same_greedy_text(port):
    user = "Tell me about the sea"
    chat = client(port, KEY).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": user}],
                                                      max_tokens=12, temperature=0).choices[0].message.content
    resp = client(port, KEY).responses.create(model=MODEL, input=user, max_output_tokens=12, temperature=0).output_text
    msg = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key=KEY, max_retries=0).messages.create(
        model=MODEL, max_tokens=12, messages=[{"role": "user", "content": user}], extra_body={"top_k": 1})
    oll = ollama.Client(host=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {KEY}"}).chat(
        model=MODEL, messages=[{"role": "user", "content": user}], options={"temperature": 0, "num_predict": 12})
    assert chat and chat == resp == msg.content[0].text == oll.message.content
