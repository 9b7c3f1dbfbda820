"""The Flask app of ``plexus serve`` (rank 0 only): the routes of every surface (OpenAI chat and
completions, Responses, Anthropic Messages, Ollama), the API key, CORS, and errors in each
surface's shape.

``create_app`` takes a Scheduler (plexus.serve.scheduler) and nothing MPI-specific, so the app
is tested with ``app.test_client()`` and a fake engine; plexus.serve.lifecycle wires it to the
ranks and plexus.serve.http runs it under waitress. A request's own work is in
serve/openai_run.py, serve/anthropic_run.py, serve/responses_api.py and serve/ollama.py.
"""

from __future__ import annotations

import hmac

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from plexus import __version__
from plexus.log import get_logger
from plexus.serve import anthropic_api as anthropic
from plexus.serve import anthropic_run, ollama, openai_run, responses_api
from plexus.serve.openai_api import APIError, model_card, now, parse_json
from plexus.serve.pipeline import chat_ids
from plexus.serve.scheduler import OK, Scheduler

DEFAULT_MAX_BODY = 4 * 2**20  # bytes; a long chat history is far smaller
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

    @app.get("/v1/pool")
    def pool():
        """Who holds what (the plan every rank agreed on) and how the pool is doing now."""
        scheduler.check_ready()
        engine, kv = scheduler.engine, scheduler.engine.kv
        plan = engine.pool.to_json() if engine.pool is not None else {}
        keep = ("architecture", "num_parameters", "dtype", "quantization", "max_context", "max_batch", "split",
                "world_size", "total_weight_bytes", "ranks")
        return jsonify({"model": model_name, **{k: plan[k] for k in keep if k in plan},
                        "kv_cache": {"block_tokens": kv.blocks and engine.kv_tokens // kv.blocks, "blocks": kv.blocks,
                                     "used": kv.used, "cached": kv.cached, "free": kv.blocks - kv.used - kv.cached},
                        "load": {"running": scheduler.running(), "waiting": scheduler.queue_depth(),
                                 "tokens_per_s": scheduler.tokens_per_s(),
                                 "prefix_hit_tokens": kv.hit_tokens}})

    @app.get("/v1/models/<path:model_id>")
    def get_model(model_id):
        if model_id != model_name:
            raise APIError(404, f"model '{model_id}' does not exist", param="model", code="model_not_found")
        return jsonify(card())

    @app.post("/v1/chat/completions")
    def chat_completions():
        return openai_run.complete(scheduler, model_name, "chat")

    @app.post("/v1/completions")
    def completions():
        return openai_run.complete(scheduler, model_name, "completion")

    ollama.register(app, scheduler, model_name)
    responses_api.register(app, scheduler, model_name)

    @app.post("/v1/messages")
    def messages():
        return anthropic_run.messages(scheduler, model_name)

    @app.post("/v1/messages/count_tokens")
    def count_tokens():
        req = anthropic.parse_messages(parse_json(request.get_data(cache=False)), count_only=True)
        scheduler.check_ready()
        return jsonify({"input_tokens": len(chat_ids(scheduler, req.messages, req.plan.tools))})

    return app


