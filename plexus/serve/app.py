"""The HTTP side of ``plexus serve`` (rank 0 only): an OpenAI-compatible Flask app, the
waitress server it runs under, and the ``serve`` command.

``create_app`` takes a Scheduler (plexus.serve.scheduler) and nothing MPI-specific, so the app is
tested with ``app.test_client()`` and a fake engine; ``plexus.serve.lifecycle`` wires it to the ranks.
"""

from __future__ import annotations

import hmac
import queue
import threading
import time
from dataclasses import replace

import click
from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from plexus import __version__
from plexus.commands.main import common_engine_options
from plexus.errors import PlexusError
from plexus.log import get_logger
from plexus.serve.openai_api import (APIError, chunk, model_card, new_id, now, parse_chat, parse_completion,
                               parse_json, response, sse, usage_chunk)
from plexus.serve.scheduler import OK, Job, Scheduler

DEFAULT_MAX_BODY = 4 * 2**20  # bytes; a long chat history is far smaller
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
TRUST_LEVELS = ("fast", "verified", "attested")


def create_app(scheduler: Scheduler, model_name: str, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY) -> Flask:
    """The OpenAI-compatible app over ``scheduler``; every answer, errors included, is JSON."""
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.json.sort_keys = False  # OpenAI's field order, easier to read in curl output
    created = now()
    log = get_logger()

    @app.before_request
    def guard():
        if not request.path.startswith("/v1/"):
            return
        if api_key is not None:
            auth = request.headers.get("Authorization", "")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else None
            if given is None:
                raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                               code="missing_api_key")
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
        return resp

    @app.errorhandler(APIError)
    def api_error(e: APIError):
        resp = jsonify(e.body())
        resp.status_code = e.status
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

    return app


# ---- one completion request ------------------------------------------------------------------

def _complete(scheduler: Scheduler, model_name: str, kind: str):
    body = parse_json(request.get_data(cache=False))  # over MAX_CONTENT_LENGTH: 413 here
    req = parse_chat(body) if kind == "chat" else parse_completion(body)
    if req.model != model_name:
        raise APIError(404, f"model '{req.model}' does not exist; this server serves '{model_name}'",
                       param="model", code="model_not_found")
    scheduler.check_ready()
    ids = _prompt_ids(scheduler, req)
    max_tokens = _max_tokens(scheduler.engine.max_context, len(ids), req)
    try:
        scheduler.engine.check_request(ids, max_tokens)  # the vocabulary range of token-id prompts
    except PlexusError as e:
        raise APIError(400, str(e), param="prompt" if kind == "completion" else "messages") from None
    job = Job(ids, replace(req.sampling, max_tokens=max_tokens), req.stream,
              request.environ.get("waitress.client_disconnected", lambda: False))
    scheduler.submit(job)
    rid, created = new_id(kind), now()
    if not req.stream:
        result = _wait_for(job, ("done",))
        return jsonify(response(kind, rid, created, model_name, result.text, result.finish_reason, len(ids),
                                len(result.token_ids)))
    _wait_for(job, ("start",))  # errors while queued still get a real status code

    def events():
        try:
            if kind == "chat":
                yield sse(chunk(kind, rid, created, model_name, "", True, None, req.include_usage))
            while True:
                what, value = job.events.get()
                if what == "text":
                    yield sse(chunk(kind, rid, created, model_name, value, False, None, req.include_usage))
                elif what == "done":
                    yield sse(chunk(kind, rid, created, model_name, None, False, value.finish_reason,
                                    req.include_usage))
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


def _prompt_ids(scheduler: Scheduler, req) -> list[int]:
    tok = scheduler.tokenizer
    try:
        if req.kind == "chat":
            return tok.encode_chat(req.messages)
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


def _wait_for(job: Job, kinds: tuple[str, ...]):
    """Block until one of ``kinds`` (or the job's error) arrives; the scheduler always posts a
    terminal event, also when the mesh fails or the server stops."""
    while True:
        try:
            what, value = job.events.get(timeout=1.0)
        except queue.Empty:
            if job.client_gone():
                job.abandoned.set()
            continue
        if what == "error":
            raise value
        if what in kinds:
            return value


# ---- waitress ---------------------------------------------------------------------------------

class HttpServer:
    """waitress (a threaded production WSGI server) on its own thread. Binding happens in the
    constructor, so a busy port fails before the model is loaded."""

    def __init__(self, app: Flask, host: str = "127.0.0.1", port: int = 8000, threads: int = 64,
                 max_body_bytes: int = DEFAULT_MAX_BODY):
        from waitress.server import create_server

        self._active, self._lock = 0, threading.Lock()
        # waitress refuses (with its own plain-text 413) only bodies far over the limit, so
        # that moderately oversized ones reach Flask and get the JSON error
        self.server = create_server(self._wsgi(app), host=host, port=port, threads=threads, ident="plexus",
                                    channel_request_lookahead=2,  # lets a handler see its client leave
                                    max_request_body_size=4 * max_body_bytes + 65536)
        listen = getattr(self.server, "effective_listen", None) or [
            (self.server.effective_host, self.server.effective_port)]
        self.host, self.port = listen[0][0], int(listen[0][1])
        shown = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{shown}:{self.port}"

    def _wsgi(self, app):
        """Count requests in progress (until their body is fully written), for a clean exit."""
        def wsgi(environ, start_response):
            with self._lock:
                self._active += 1
            try:
                body = app(environ, start_response)
            except BaseException:
                self._done()
                raise
            return _Closing(body, self._done)
        return wsgi

    def _done(self):
        with self._lock:
            self._active -= 1

    def start(self) -> None:
        threading.Thread(target=self.server.run, name="plexus-http", daemon=True).start()

    def stop_accepting(self) -> None:
        """Close the listening socket(s) from waitress's own loop thread; requests in progress
        (and their connections) carry on."""
        from waitress import wasyncore
        from waitress.server import BaseWSGIServer

        smap = getattr(self.server, "map", None) or self.server._map
        listeners = [d for d in list(smap.values()) if isinstance(d, BaseWSGIServer)]
        if listeners:
            listeners[0].trigger.pull_trigger(lambda: [wasyncore.dispatcher.close(d) for d in listeners])

    def wait_idle(self, timeout: float, linger: float = 0.05) -> bool:
        """Wait until no request is in progress; then ``linger`` for the last bytes to leave
        (waitress's loop thread sends what a handler could not)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                if self._active <= 0:
                    break
            time.sleep(0.005)
        time.sleep(linger)
        return self._active <= 0


class _Closing:
    """A WSGI body that calls ``done`` once it is closed (waitress always closes it)."""

    def __init__(self, body, done):
        self.body, self.done, self.closed = body, done, False

    def __iter__(self):
        return iter(self.body)

    def close(self):
        if self.closed:
            return
        self.closed = True
        try:
            if hasattr(self.body, "close"):
                self.body.close()
        finally:
            self.done()


# ---- the command -------------------------------------------------------------------------------

@click.command()
@common_engine_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (rank 0).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to listen on; 0 picks a free one (the startup line shows it).")
@click.option("--api-key", envvar="PLEXUS_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1/* (default: $PLEXUS_API_KEY; none: open).")
@click.option("--served-model-name", default=None, help="Model id clients send (default: the directory's name).")
@click.option("--max-body-bytes", type=click.IntRange(min=1024), default=DEFAULT_MAX_BODY, show_default=True,
              help="Larger request bodies get 413.")
@click.option("--http-threads", type=click.IntRange(min=8), default=64, show_default=True,
              help="HTTP worker threads; each waiting request holds one (4 stay free for /health).")
@click.option("--drain-timeout", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="On a drain (SIGTERM/SIGINT to rank 0 or launch/serve.sh, SIGUSR1 to mpirun), seconds "
                   "to finish in-flight requests before cancelling them.")
@click.option("--stall-timeout", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="Declare the mesh dead when a step makes no progress this long (0: never).")
def serve(model, dtype, device, threads, max_context, split, max_memory, verbose, host, port, api_key,
          served_model_name, max_body_bytes, http_threads, drain_timeout, stall_timeout):
    """Serve an OpenAI-compatible HTTP API from rank 0 (run under mpirun; see docs/api.md)."""
    from plexus.engine.runtime import run_guarded, start
    from plexus.serve.lifecycle import ServeOptions, run_serve

    opts = ServeOptions(model=model, dtype=dtype, max_context=max_context, split=split, max_memory=max_memory,
                        host=host, port=port, api_key=api_key or None, served_model_name=served_model_name,
                        max_body_bytes=max_body_bytes, http_threads=http_threads, drain_timeout=drain_timeout,
                        stall_timeout=stall_timeout)
    state = {}

    def body():
        from plexus.serve.lifecycle import install_signal_handlers

        signals = install_signal_handlers()  # first: a signal during start-up must not kill a rank
        rt = state["rt"] = start(device, threads, verbose)
        return run_serve(rt, opts, signals)

    run_guarded(body, lambda: state["rt"].comm if "rt" in state else None)
