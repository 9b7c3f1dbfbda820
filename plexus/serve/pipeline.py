"""What every API surface (serve/app.py's OpenAI and Anthropic routes, serve/ollama.py) does with a
request once parsed: the prompt's tokens through the chat template, the grammar of a schema to
constrain to, and waiting on the scheduler's job."""

from __future__ import annotations

import queue

from flask import Response, request

from plexus.engine.constrain import check_grammar, json_grammar
from plexus.errors import PlexusError
from plexus.serve.openai_api import APIError
from plexus.serve.scheduler import Job, Scheduler


def chat_ids(scheduler: Scheduler, messages: list[dict], tools=None, param: str = "messages") -> list[int]:
    """The chat template's tokens (400 naming ``param`` if there is none, or it refuses)."""
    try:
        tok = scheduler.tokenizer
        return tok.encode_chat(messages, tools) if tools else tok.encode_chat(messages)
    except PlexusError as e:
        raise APIError(400, str(e), param=param) from None


def grammar_for(scheduler: Scheduler, schema: dict | None, param: str) -> str | None:
    """The constrained-output grammar of ``schema`` (None: free text); 400 naming ``param`` if
    the grammar engine cannot use it."""
    if schema is None:
        return None
    try:
        grammar = json_grammar(schema)
        check_grammar(scheduler.tokenizer, grammar)
    except PlexusError as e:
        raise APIError(400, str(e), param=param) from None
    return grammar


def client_gone():
    """waitress's check that this request's client closed its connection (never, elsewhere)."""
    return request.environ.get("waitress.client_disconnected", lambda: False)


def submit(scheduler: Scheduler, ids: list[int], params, stream: bool) -> Job:
    """The request's job, queued (429 past the queue)."""
    job = Job(ids, params, stream, client_gone())
    scheduler.submit(job)
    return job


def wait_for(job: Job, kinds: tuple[str, ...]):
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


def event_stream(events) -> Response:
    """A streamed answer (server-sent events) that no proxy buffers."""
    return Response(events, mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
