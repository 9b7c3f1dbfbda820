"""Ollama's API (issue 19) through the official ``ollama`` client, unchanged, against a real
``plexus serve`` under ``mpirun -n 2`` on the tiny demo model: what Open WebUI reads to connect
(/, /api/version, /api/tags, /api/show, /api/ps), chat and generate streamed and not, their
greedy text equal to OpenAI chat's, options, format, and Ollama's error shape."""

from __future__ import annotations

import http.client
import json

import jsonschema
import ollama
import pytest

from tests.test_server_mpi import Serve, client

MODEL = "tiny"
KEY = "sk-ollama"
STORY = [{"role": "user", "content": "Tell me a story"}]
GREEDY = {"temperature": 0, "num_predict": 16}


@pytest.fixture(scope="module")
def port(demo_tiny):
    s = Serve(demo_tiny, "--api-key", KEY).wait_ready()
    yield s.port
    s.kill()


def olla(port, key=KEY) -> ollama.Client:
    return ollama.Client(host=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"})


def get(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path, headers={"Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    return resp.status, resp.read().decode()


@pytest.mark.timeout(120)
def test_what_open_webui_reads_to_connect(port):
    assert get(port, "/") == (200, "Ollama is running")
    status, body = get(port, "/api/version")
    assert status == 200 and json.loads(body)["version"].count(".") == 2
    c = olla(port)
    (m,) = c.list().models
    assert m.model == MODEL and m.size > 0 and m.details.family == "llama" and m.details.parameter_size
    show = c.show(MODEL)
    assert show.modelinfo["llama.context_length"] == 512 and show.modelinfo["general.parameter_count"] > 0
    assert show.details.family == "llama" and "completion" in show.capabilities
    assert [p.model for p in c.ps().models] == [MODEL]
    assert c.show(f"{MODEL}:latest").modelinfo == show.modelinfo


@pytest.mark.timeout(300)
def test_chat_and_generate_give_openais_greedy_text(port):
    c = olla(port)
    want = client(port, KEY).chat.completions.create(model=MODEL, messages=STORY, max_tokens=16,
                                                     temperature=0).choices[0].message.content
    r = c.chat(model=MODEL, messages=STORY, options=GREEDY)
    assert r.message.role == "assistant" and r.message.content == want and r.done
    assert r.done_reason in ("stop", "length") and r.eval_count <= 16 and r.prompt_eval_count > 0
    assert r.total_duration >= r.eval_duration > 0 and r.prompt_eval_duration > 0
    parts = list(c.chat(model=MODEL, messages=STORY, options=GREEDY, stream=True))
    assert "".join(p.message.content for p in parts) == want
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True] and parts[-1].eval_count == r.eval_count
    g = c.generate(model=MODEL, prompt=STORY[0]["content"], options=GREEDY)
    assert g.response == want and g.done  # the prompt as the user's message, through the template
    raw = c.generate(model=MODEL, prompt="Once upon a time", raw=True, options=GREEDY)
    want_raw = client(port, KEY).completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16,
                                                    temperature=0).choices[0].text
    assert raw.response == want_raw
    full = c.chat(model=MODEL, messages=STORY, options={"temperature": 0, "num_predict": 5})
    assert full.eval_count == 5 and full.done_reason == "length"


@pytest.mark.timeout(300)
def test_format_constrains_the_output(port):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    c = olla(port)
    for seed in range(3):
        r = c.chat(model=MODEL, messages=STORY, format=schema, options={"seed": seed, "num_predict": 60})
        jsonschema.validate(json.loads(r.message.content), schema)
    r = c.generate(model=MODEL, prompt="Describe a cat", format="json", options={"temperature": 0, "num_predict": 200})
    assert r.response.startswith("{")


@pytest.mark.timeout(120)
def test_errors_have_ollamas_shape(port):
    c = olla(port)
    with pytest.raises(ollama.ResponseError) as e:
        c.chat(model="llama3", messages=STORY)
    assert e.value.status_code == 404 and "llama3" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        c.chat(model=MODEL, messages=STORY, options={"num_predict": "many"})
    assert e.value.status_code == 400 and "num_predict" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        olla(port, "wrong").chat(model=MODEL, messages=STORY)
    assert e.value.status_code == 401 and "API key" in e.value.error
