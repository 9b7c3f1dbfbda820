"""Ollama's API on rank 0, so Open WebUI and everything else that speaks Ollama connect to Plexus
as to an Ollama server: ``GET /`` ("Ollama is running"), ``/api/version``, ``/api/tags``,
``/api/show``, ``/api/ps``, and ``POST /api/chat`` and ``/api/generate``, streaming NDJSON by
default (``"stream": false``: one object), with ``options`` (temperature, top_p, top_k,
num_predict, stop, seed), ``format`` ("json" or a JSON schema, constrained), and Ollama's counts
and durations in nanoseconds. Errors are ``{"error": "..."}``. The same scheduler, API key and
size limit as the other surfaces.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from datetime import datetime, timezone

from flask import Flask, Response, jsonify, request

from plexus.engine.sampling import SamplingParams
from plexus.errors import PlexusError
from plexus.parallel.sizes import DTYPE_BYTES
from plexus.serve.openai_api import APIError, parse_json
from plexus.serve.openai_tools import StreamedCall, ToolPlan, parse_calls
from plexus.serve.pipeline import chat_ids, grammar_for, submit, wait_for
from plexus.serve.scheduler import Scheduler

OLLAMA_VERSION = "0.9.0"  # the Ollama API this surface follows (clients check it)
OPTIONS = {"temperature": float, "top_p": float, "top_k": int, "num_predict": int, "seed": int}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _bad(message: str, status: int = 400) -> APIError:
    return APIError(status, message)


def _sampling(body: dict, context: int, prompt_len: int) -> SamplingParams:
    opts = body.get("options") or {}
    if not isinstance(opts, dict):
        raise _bad("'options' must be an object")
    vals = {}
    for name, kind in OPTIONS.items():
        v = opts.get(name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
            raise _bad(f"option {name} must be {'an integer' if kind is int else 'a number'}, got {json.dumps(v)}")
        vals[name] = kind(v)
    stop = opts.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise _bad("option stop must be a string or a list of strings")
    room = context - prompt_len
    if room < 1:
        raise _bad(f"the prompt is {prompt_len} tokens; this model's context is {context} tokens")
    n = vals.get("num_predict", -1)
    max_tokens = room if n < 0 else min(n, room)  # -1 (or -2): to the end of the context
    if max_tokens < 1:
        raise _bad("option num_predict must be positive (or -1: to the end of the context)")
    t = vals.get("temperature", 0.8)  # Ollama's defaults
    if not 0 <= t <= 2 or not 0 <= vals.get("top_p", 0.9) <= 1:
        raise _bad("option temperature must be 0-2 and top_p 0-1")
    return SamplingParams(max_tokens=max_tokens, temperature=t, top_p=vals.get("top_p", 0.9) or 1.0,
                          top_k=max(vals.get("top_k", 40), 0), seed=vals.get("seed"), stop=tuple(s for s in stop if s))


def _schema(body: dict):
    fmt = body.get("format")
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return {"type": "object"}
    if isinstance(fmt, dict):
        return fmt
    raise _bad("'format' must be \"json\" or a JSON schema")


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("'messages' is required and must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            raise _bad(f"messages[{i}] must have a role of system, user, assistant or tool")
        if not isinstance(m.get("content", ""), str):
            raise _bad(f"messages[{i}].content must be a string")
        if m.get("images"):
            raise _bad(f"messages[{i}]: images are not supported by this model")
        out.append({"role": m["role"], "content": m.get("content", "")})
    return out


def register(app: Flask, scheduler: Scheduler, model_name: str) -> None:
    """Add Ollama's routes to ``app``."""
    names = {model_name, f"{model_name}:latest"}
    digest = hashlib.sha256(model_name.encode()).hexdigest()

    def family() -> str:
        engine = scheduler.engine
        return engine.config.architecture.removesuffix("ForCausalLM").lower() if engine is not None else ""

    def details() -> dict:
        engine = scheduler.engine
        n = engine.config.num_parameters() if engine is not None else 0
        size = next(f"{n / s:.3g}{u}" for s, u in ((1e9, "B"), (1e6, "M"), (1e3, "K"), (1, "")) if n >= s) if n else ""
        dtype = str(engine.model.embed_tokens.dtype).removeprefix("torch.") if engine is not None else ""
        return {"parent_model": "", "format": "safetensors", "family": family(), "families": [family()],
                "parameter_size": size, "quantization_level": dtype.upper()}

    def card() -> dict:
        engine = scheduler.engine
        size = 0
        if engine is not None:  # the weights in the compute dtype (quantized layers count less)
            dtype = str(engine.model.embed_tokens.dtype).removeprefix("torch.")
            size = engine.config.num_parameters() * DTYPE_BYTES[dtype]
        return {"name": model_name, "model": model_name, "modified_at": _now(), "size": size, "digest": digest,
                "details": details()}

    def check_model(body: dict) -> None:
        name = body.get("model")
        if name not in names:
            raise APIError(404, f"model '{name}' not found (this server serves '{model_name}')")

    @app.get("/")
    def root():
        return Response("Ollama is running", mimetype="text/plain")

    @app.get("/api/version")
    def version():
        return jsonify({"version": OLLAMA_VERSION})

    @app.get("/api/tags")
    def tags():
        return jsonify({"models": [card()]})

    @app.get("/api/ps")
    def ps():
        return jsonify({"models": [{**card(), "expires_at": "0001-01-01T00:00:00Z", "size_vram": 0}]})

    @app.post("/api/show")
    def show():
        body = parse_json(request.get_data(cache=False))
        check_model(body)
        scheduler.check_ready()
        engine, tok = scheduler.engine, scheduler.tokenizer
        c = engine.config
        f = family()
        info = {"general.architecture": f, "general.parameter_count": c.num_parameters(),
                f"{f}.context_length": engine.max_context, f"{f}.embedding_length": c.hidden_size,
                f"{f}.block_count": c.num_layers, f"{f}.attention.head_count": c.num_heads,
                f"{f}.attention.head_count_kv": c.num_kv_heads}
        return jsonify({"modelfile": "", "parameters": "", "template": tok.chat_template or "",
                        "details": details(), "model_info": info,
                        "capabilities": ["completion"] + (["tools"] if tok.chat_template else [])})

    @app.post("/api/chat")
    def chat():
        body = parse_json(request.get_data(cache=False))
        check_model(body)
        scheduler.check_ready()
        ids = chat_ids(scheduler, _messages(body), body.get("tools") or None)
        return _run(scheduler, body, ids, "message")

    @app.post("/api/generate")
    def generate():
        body = parse_json(request.get_data(cache=False))
        check_model(body)
        scheduler.check_ready()
        prompt = body.get("prompt", "")
        if not isinstance(prompt, str):
            raise _bad("'prompt' must be a string")
        if not prompt:  # Ollama: an empty prompt only loads the model
            return jsonify({"model": model_name, "created_at": _now(), "response": "", "done": True,
                            "done_reason": "load"})
        system = body.get("system")
        if body.get("raw") or not scheduler.tokenizer.chat_template:
            ids = scheduler.tokenizer.encode(prompt)
        else:
            msgs = ([{"role": "system", "content": system}] if isinstance(system, str) and system else [])
            ids = chat_ids(scheduler, msgs + [{"role": "user", "content": prompt}], param="prompt")
        return _run(scheduler, body, ids, "response")

    def _run(scheduler: Scheduler, body: dict, ids: list[int], field: str):
        params = _sampling(body, scheduler.engine.max_context, len(ids))
        try:
            scheduler.engine.check_request(ids, params.max_tokens)
        except PlexusError as e:
            raise _bad(str(e)) from None
        stream = body.get("stream", True)
        if not isinstance(stream, bool):
            raise _bad("'stream' must be a boolean")
        params = replace(params, grammar=grammar_for(scheduler, _schema(body), "format"))
        t0 = time.perf_counter_ns()
        job = submit(scheduler, ids, params, stream)

        def piece(text: str) -> dict:
            value = {"role": "assistant", "content": text} if field == "message" else text
            return {"model": model_name, "created_at": _now(), field: value, "done": False}

        def final(result) -> dict:
            end = time.perf_counter_ns()
            first = t0 + int((result.ttft_s or 0) * 1e9)
            out = {**piece("" if stream else result.text), "done": True,
                   "done_reason": "length" if result.finish_reason == "length" else "stop",
                   "total_duration": end - t0, "load_duration": 0, "prompt_eval_count": len(ids),
                   "prompt_eval_duration": first - t0, "eval_count": len(result.token_ids),
                   "eval_duration": end - first}
            if field == "response":
                out["context"] = []
            elif body.get("tools"):  # the model's own tool-call markup, read out of its text
                names = {(t.get("function") or {}).get("name") for t in body["tools"] if isinstance(t, dict)}
                text, calls = parse_calls(result.text, names)
                if calls:
                    out["message"] = {"role": "assistant", "content": "" if stream else text, "tool_calls": [
                        {"function": {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}}
                        for c in calls]}
            return out

        if not stream:
            return jsonify(final(wait_for(job, ("done",))))
        wait_for(job, ("start",))

        def lines():
            # with tools, text streams until it may be a call (openai_tools.StreamedCall); the calls
            # come in the final object
            held = StreamedCall(ToolPlan(tools=body["tools"], call="auto")) if field == "message" and body.get(
                "tools") else None
            try:
                while True:
                    what, value = job.events.get()
                    if what == "text":
                        for text in ([d["content"] for d in held.piece(value)] if held else [value]):
                            yield json.dumps(piece(text), ensure_ascii=False) + "\n"
                    elif what == "done":
                        last = final(value)
                        if held and "tool_calls" not in last["message"]:  # no call after all: what was held
                            last["message"]["content"] = "".join(d.get("content", "") for d in held.end("stop")[0])
                        yield json.dumps(last, ensure_ascii=False) + "\n"
                        return
                    elif what == "error":
                        yield json.dumps({"error": value.message}) + "\n"
                        return
            finally:
                if not job.finished:
                    job.abandoned.set()

        return Response(lines(), mimetype="application/x-ndjson")
