"""The OpenAI-compatible Flask app of ``plexus serve`` (rank 0 only).

``create_app`` takes a Scheduler (plexus.serve.scheduler) and nothing MPI-specific, so the app
is tested with ``app.test_client()`` and a fake engine; plexus.serve.lifecycle wires it to the
ranks and plexus.serve.http runs it under waitress.
"""

from __future__ import annotations

import hmac
import json
import uuid
from dataclasses import replace

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from plexus import __version__
from plexus.errors import PlexusError
from plexus.log import get_logger
from plexus.serve.openai_api import (APIError, chunk, logprobs_of, model_card, new_id, now, parse_chat,
                                    parse_completion, parse_json, response, sse, usage_chunk)
from plexus.serve import anthropic_api as anthropic
from plexus.serve import ollama, responses_api
from plexus.serve.openai_tools import StreamedCall, ToolPlan, message, parse_tools, tool_call
from plexus.serve.pipeline import chat_ids, grammar_for, wait_for
from plexus.serve.scheduler import OK, Job, Scheduler

DEFAULT_MAX_BODY = 4 * 2**20  # bytes; a long chat history is far smaller
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
TRUST_LEVELS = ("fast", "verified", "attested")


CORS_HEADERS = "Authorization, Content-Type, x-api-key, anthropic-version, anthropic-beta, X-Plexus-Trust"


def create_app(scheduler: Scheduler, model_name: str, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY, cors_origins: tuple[str, ...] = ()) -> Flask:
    """The OpenAI-compatible app over ``scheduler``; every answer, errors included, is JSON.
    ``cors_origins``: the browser origins allowed to call it ("*": any); none by default."""
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.json.sort_keys = False  # OpenAI's field order, easier to read in curl output
    created = now()
    log = get_logger()

    def allowed_origin() -> str | None:
        origin = request.headers.get("Origin")
        if origin and ("*" in cors_origins or origin in cors_origins):
            return "*" if "*" in cors_origins else origin
        return None

    @app.before_request
    def guard():
        if request.method == "OPTIONS" and request.headers.get("Access-Control-Request-Method"):
            origin = allowed_origin()  # a browser's preflight: answered before any key is asked for
            if origin is None:
                return Response(status=403)
            return Response(status=204, headers={"Access-Control-Allow-Origin": origin, "Vary": "Origin",
                                                 "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                                                 "Access-Control-Allow-Headers": CORS_HEADERS,
                                                 "Access-Control-Max-Age": "600"})
        if not request.path.startswith(("/v1/", "/api/")):
            return
        if api_key is not None:
            auth = request.headers.get("Authorization", "")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key")
            if given is None:
                raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>' "
                               "(or 'x-api-key: <key>')", code="missing_api_key")
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                raise APIError(401, "incorrect API key", code="invalid_api_key")
        trust = request.headers.get("X-Plexus-Trust", "fast").strip().lower()
        if trust in ("verified", "attested"):
            raise APIError(501, f"X-Plexus-Trust: {trust} is not available yet; this server serves 'fast' "
                           "(the ranks are trusted)", "not_implemented_error", None, "trust_level_unavailable")
        if trust != "fast":
            raise APIError(400, f"X-Plexus-Trust must be one of {', '.join(TRUST_LEVELS)}, got {trust!r}",
                           code="invalid_trust_level")

    @app.after_request
    def count(resp):
        route = request.url_rule.rule if request.url_rule else "unmatched"
        scheduler.metrics.requests.labels(route, str(resp.status_code)).inc()
        origin = allowed_origin()
        if origin is not None and "Access-Control-Allow-Origin" not in resp.headers:
            resp.headers["Access-Control-Allow-Origin"] = origin
            resp.headers["Access-Control-Expose-Headers"] = "Retry-After"
            resp.headers.add("Vary", "Origin")
        return resp

    @app.errorhandler(APIError)
    def api_error(e: APIError):
        if request.path.startswith("/api/"):  # Ollama's shape
            resp = jsonify({"error": e.message})
        else:
            resp = jsonify(anthropic.error_body(e) if request.path.startswith("/v1/messages") else e.body())
        resp.status_code = e.status
        resp.headers.update(e.headers)
        if e.status == 401:
            resp.headers["WWW-Authenticate"] = "Bearer"
        return resp

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        if e.code == 404:
            err = APIError(404, f"no such endpoint: {request.method} {request.path}", code="not_found")
        elif e.code == 405:
            allowed = ", ".join(sorted(set(e.valid_methods or []) - {"HEAD", "OPTIONS"}))
            err = APIError(405, f"{request.method} is not allowed on {request.path} (use {allowed})",
                           code="method_not_allowed")
        elif e.code == 413:
            err = APIError(413, f"the request body is larger than {max_body_bytes} bytes",
                           code="request_too_large")
        else:
            err = APIError(e.code or 500, e.description or e.name,
                           "invalid_request_error" if (e.code or 500) < 500 else "server_error")
        resp = api_error(err)
        if e.code == 405 and e.valid_methods:
            resp.headers["Allow"] = ", ".join(e.valid_methods)
        return resp

    @app.errorhandler(Exception)
    def internal_error(e: Exception):
        log.exception("error while handling a request")
        return api_error(APIError(500, f"internal error: {type(e).__name__}", "server_error"))

    @app.get("/health")
    def health():
        body = {"status": scheduler.state, "version": __version__, "world_size": scheduler.world_size,
                "model": model_name}
        if scheduler.failure:
            body["error"] = scheduler.failure
        return jsonify(body), 200 if scheduler.state == OK else 503

    @app.get("/metrics")
    def metrics():
        return Response(scheduler.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"})

    def card():
        return model_card(model_name, created, scheduler.engine.max_context if scheduler.engine else None)

    @app.get("/v1/models")
    def list_models():
        return jsonify({"object": "list", "data": [card()]})

    @app.get("/v1/models/<path:model_id>")
    def get_model(model_id):
        if model_id != model_name:
            raise APIError(404, f"model '{model_id}' does not exist", param="model", code="model_not_found")
        return jsonify(card())

    @app.post("/v1/chat/completions")
    def chat_completions():
        return _complete(scheduler, model_name, "chat")

    @app.post("/v1/completions")
    def completions():
        return _complete(scheduler, model_name, "completion")

    ollama.register(app, scheduler, model_name)
    responses_api.register(app, scheduler, model_name)

    @app.post("/v1/messages")
    def messages():
        return _messages(scheduler, model_name)

    @app.post("/v1/messages/count_tokens")
    def count_tokens():
        req = anthropic.parse_messages(parse_json(request.get_data(cache=False)), count_only=True)
        scheduler.check_ready()
        return jsonify({"input_tokens": len(chat_ids(scheduler, req.messages, req.plan.tools))})

    return app


# ---- one completion request ------------------------------------------------------------------

def _complete(scheduler: Scheduler, model_name: str, kind: str):
    body = parse_json(request.get_data(cache=False))  # over MAX_CONTENT_LENGTH: 413 here
    req = parse_chat(body) if kind == "chat" else parse_completion(body)
    plan = parse_tools(body) if kind == "chat" else ToolPlan()
    if req.model != model_name:
        raise APIError(404, f"model '{req.model}' does not exist; this server serves '{model_name}'",
                       param="model", code="model_not_found")
    scheduler.check_ready()
    ids = _prompt_ids(scheduler, req, plan.tools)
    max_tokens = _max_tokens(scheduler.engine.max_context, len(ids), req)
    try:
        scheduler.engine.check_request(ids, max_tokens)  # the vocabulary range of token-id prompts
    except PlexusError as e:
        raise APIError(400, str(e), param="prompt" if kind == "completion" else "messages") from None
    vocab = scheduler.engine.vocab_size
    outside = [t for t, _ in req.sampling.logit_bias if t >= vocab]
    if outside:
        raise APIError(400, f"logit_bias names token {outside[0]}, outside the vocabulary (size {vocab})",
                       param="logit_bias")
    grammar = grammar_for(scheduler, plan.schema, plan.param)  # constrained output (engine/constrain.py)
    job = Job(ids, replace(req.sampling, max_tokens=max_tokens, grammar=grammar), req.stream,
              request.environ.get("waitress.client_disconnected", lambda: False))
    scheduler.submit(job)
    rid, created = new_id(kind), now()
    decode = scheduler.tokenizer.decode
    if not req.stream:
        result = wait_for(job, ("done",))
        msg, reason = message(plan, result.text, result.finish_reason)
        return jsonify(response(kind, rid, created, model_name, result.text, reason, len(ids),
                                len(result.token_ids), msg, logprobs_of(kind, result.logprobs, decode)))
    wait_for(job, ("start",))  # errors while queued still get a real status code

    def events():
        calls, pending, offset = StreamedCall(plan), [], 0
        try:
            if kind == "chat":
                yield sse(chunk(kind, rid, created, model_name, "" if plan.call is None else None, True, None,
                                req.include_usage))
            while True:
                what, value = job.events.get()
                if what == "logprobs":  # the tokens of the next text piece
                    pending += value
                    continue
                lp = logprobs_of(kind, pending, decode, offset) if pending else None
                pending = []
                if what == "text" and kind == "chat":
                    for i, delta in enumerate(calls.piece(value) or [{}] * bool(lp)):
                        yield sse(chunk(kind, rid, created, model_name, None, False, None, req.include_usage, delta,
                                        None if i else lp))
                elif what == "text":
                    yield sse(chunk(kind, rid, created, model_name, value, False, None, req.include_usage,
                                    logprobs=lp))
                    offset += len(value)
                elif what == "done":
                    deltas, reason = calls.end(value.finish_reason) if kind == "chat" else ([], value.finish_reason)
                    for delta in deltas:
                        yield sse(chunk(kind, rid, created, model_name, None, False, None, req.include_usage, delta))
                    yield sse(chunk(kind, rid, created, model_name, None, False, reason, req.include_usage))
                    if req.include_usage:
                        yield sse(usage_chunk(kind, rid, created, model_name, len(ids), len(value.token_ids)))
                    yield sse("[DONE]")
                    return
                elif what == "error":  # headers are sent: the error goes in the stream
                    yield sse(value.body())
                    return
        finally:
            if not job.finished:
                job.abandoned.set()  # the client went away: stop generating for it

    return Response(events(), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---- one Anthropic Messages request ----------------------------------------------------------------

def _messages(scheduler: Scheduler, model_name: str):
    req = anthropic.parse_messages(parse_json(request.get_data(cache=False)))
    if req.model != model_name:
        raise APIError(404, f"model '{req.model}' does not exist; this server serves '{model_name}'", param="model")
    scheduler.check_ready()
    ids, plan = chat_ids(scheduler, req.messages, req.plan.tools), req.plan
    try:
        scheduler.engine.check_request(ids, req.max_tokens)
    except PlexusError as e:
        raise APIError(400, str(e), param="max_tokens") from None
    grammar = grammar_for(scheduler, plan.schema, "tools")
    job = Job(ids, replace(req.sampling, grammar=grammar), req.stream,
              request.environ.get("waitress.client_disconnected", lambda: False))
    scheduler.submit(job)
    rid = anthropic.message_id()

    def finished(result):
        call = tool_call(plan, result.text) if plan.call and result.finish_reason == "stop" else None
        return call, anthropic.stop_reason(result.finish_reason, result.stop_sequence, call is not None)

    if not req.stream:
        result = wait_for(job, ("done",))
        call, reason = finished(result)
        return jsonify(anthropic.message(rid, model_name, anthropic.content_blocks(result.text, call), reason,
                                         result.stop_sequence, len(ids), len(result.token_ids)))
    wait_for(job, ("start",))
    ev = anthropic.event

    def block_start(block):
        return ev("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block})

    def delta(d):
        return ev("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": d})

    def events():
        text = ""
        try:
            yield ev("message_start", {"type": "message_start",
                                       "message": anthropic.message(rid, model_name, [], None, None, len(ids), 0)})
            if plan.call is None:
                yield block_start({"type": "text", "text": ""})
            elif plan.call == "named":
                yield block_start({"type": "tool_use", "id": "toolu_" + uuid.uuid4().hex[:24], "name": plan.name,
                                   "input": {}})
            yield ev("ping", {"type": "ping"})
            while True:
                what, value = job.events.get()
                if what == "text":
                    text += value
                    if plan.call is None:
                        yield delta({"type": "text_delta", "text": value})
                    elif plan.call == "named":
                        yield delta({"type": "input_json_delta", "partial_json": value})
                elif what == "done":
                    call, reason = finished(value)
                    if plan.call == "any":  # its name is known now: the whole block at once
                        (block,) = anthropic.content_blocks(value.text, call)
                        if block["type"] == "tool_use":
                            yield block_start({**block, "input": {}})
                            yield delta({"type": "input_json_delta", "partial_json": json.dumps(block["input"])})
                        else:
                            yield block_start({"type": "text", "text": ""})
                            yield delta({"type": "text_delta", "text": value.text})
                    yield ev("content_block_stop", {"type": "content_block_stop", "index": 0})
                    yield ev("message_delta", {"type": "message_delta", "delta": {
                        "stop_reason": reason, "stop_sequence": value.stop_sequence},
                        "usage": {"output_tokens": len(value.token_ids)}})
                    yield ev("message_stop", {"type": "message_stop"})
                    return
                elif what == "error":
                    yield ev("error", anthropic.error_body(value))
                    return
        finally:
            if not job.finished:
                job.abandoned.set()

    return Response(events(), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _prompt_ids(scheduler: Scheduler, req, tools=None) -> list[int]:
    tok = scheduler.tokenizer
    try:
        if req.kind == "chat":
            return tok.encode_chat(req.messages, tools) if tools else tok.encode_chat(req.messages)
        return list(req.prompt) if isinstance(req.prompt, list) else tok.encode(req.prompt)
    except PlexusError as e:  # no chat template, or the template refused the messages
        raise APIError(400, str(e), param="messages" if req.kind == "chat" else "prompt") from None


def _max_tokens(context: int, prompt_len: int, req) -> int:
    """The request's max tokens, or its default: the rest of the context (chat) or 16."""
    if prompt_len >= context:
        raise APIError(400, f"the prompt is {prompt_len} tokens; this model's context is {context} tokens",
                       param="messages" if req.kind == "chat" else "prompt", code="context_length_exceeded")
    n = req.max_tokens
    if n is None:
        n = context - prompt_len if req.kind == "chat" else COMPLETION_DEFAULT_MAX_TOKENS
    if prompt_len + n > context:
        raise APIError(400, f"the prompt ({prompt_len} tokens) plus max_tokens ({n}) exceeds this model's "
                       f"context of {context} tokens", param="max_tokens", code="context_length_exceeded")
    return n


