"""One OpenAI chat or completion request through the scheduler (serve/app.py routes it): parse,
check, submit one job per choice (``n``), and answer whole or as server-sent events."""

from __future__ import annotations

import queue
from dataclasses import replace

from flask import jsonify, request

from plexus.errors import PlexusError
from plexus.serve.openai_api import (APIError, chunk, logprobs_of, new_id, now, parse_chat, parse_completion,
                                     parse_json, response, sse, usage_chunk)
from plexus.serve.openai_tools import StreamedCall, ToolPlan, message, parse_tools
from plexus.serve.pipeline import client_gone, event_stream, grammar_for
from plexus.serve.scheduler import Job, Scheduler

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class _Tagged:
    """A choice's event queue that posts into the request's shared one, tagged with the choice."""

    def __init__(self, shared: queue.Queue, index: int):
        self.shared, self.index = shared, index

    def put(self, item) -> None:
        self.shared.put((self.index, item))


def _wait_all(jobs: list[Job], shared: queue.Queue, kind: str, backlog: list | None = None) -> list:
    """Every choice's ``kind`` event (an error of any raises it); the other events that come
    meanwhile (a started choice's text) go to ``backlog``, in order."""
    got = {}
    while len(got) < len(jobs):
        try:
            i, (what, value) = shared.get(timeout=1.0)
        except queue.Empty:
            if any(j.client_gone() for j in jobs):
                for j in jobs:
                    j.abandoned.set()
            continue
        if what == "error":
            for j in jobs:
                j.abandoned.set()
            raise value
        if what == kind:
            got[i] = value
        elif backlog is not None:
            backlog.append((i, (what, value)))
    return [got[i] for i in range(len(jobs))]


def complete(scheduler: Scheduler, model_name: str, kind: str):
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
    params = replace(req.sampling, max_tokens=max_tokens, grammar=grammar_for(scheduler, plan.schema, plan.param))
    gone = client_gone()
    shared: queue.Queue = queue.Queue()
    jobs = []
    for i in range(req.n):  # each choice its own sequence; a seed gives each its own (seed + i)
        job = Job(ids, params if params.seed is None else replace(params, seed=params.seed + i), req.stream, gone)
        job.events = _Tagged(shared, i)
        try:
            scheduler.submit(job)
        except APIError:  # the queue filled up part way: the others are not wanted either
            for j in jobs:
                j.abandoned.set()
            raise
        jobs.append(job)
    rid, created = new_id(kind), now()
    decode = scheduler.tokenizer.decode
    if not req.stream:
        results = _wait_all(jobs, shared, "done")
        choices = []
        for i, result in enumerate(results):
            msg, reason = message(plan, result.text, result.finish_reason)
            one = response(kind, rid, created, model_name, result.text, reason, len(ids), len(result.token_ids), msg,
                           logprobs_of(kind, result.logprobs, decode))
            choices.append({**one["choices"][0], "index": i})
        one["choices"] = choices
        one["usage"]["completion_tokens"] = sum(len(r.token_ids) for r in results)
        one["usage"]["total_tokens"] = len(ids) + one["usage"]["completion_tokens"]
        return jsonify(one)
    backlog: list = []
    _wait_all(jobs, shared, "start", backlog)  # errors while queued still get a real status code

    def events():
        calls = [StreamedCall(plan) for _ in jobs]
        pending, offset, made, left = [[] for _ in jobs], [0] * len(jobs), 0, len(jobs)
        try:
            if kind == "chat":
                for i in range(len(jobs)):
                    yield sse(chunk(kind, rid, created, model_name, "" if plan.call is None else None, True, None,
                                    req.include_usage, index=i))
            while left:
                i, (what, value) = backlog.pop(0) if backlog else shared.get()
                if what == "logprobs":  # the tokens of the choice's next text piece
                    pending[i] += value
                    continue
                lp = logprobs_of(kind, pending[i], decode, offset[i]) if pending[i] else None
                pending[i] = []
                if what == "text" and kind == "chat":
                    for k, delta in enumerate(calls[i].piece(value) or [{}] * bool(lp)):
                        yield sse(chunk(kind, rid, created, model_name, None, False, None, req.include_usage, delta,
                                        None if k else lp, index=i))
                elif what == "text":
                    yield sse(chunk(kind, rid, created, model_name, value, False, None, req.include_usage,
                                    logprobs=lp, index=i))
                    offset[i] += len(value)
                elif what == "done":
                    deltas, reason = calls[i].end(value.finish_reason) if kind == "chat" else ([], value.finish_reason)
                    for delta in deltas:
                        yield sse(chunk(kind, rid, created, model_name, None, False, None, req.include_usage, delta,
                                        index=i))
                    yield sse(chunk(kind, rid, created, model_name, None, False, reason, req.include_usage, index=i))
                    made, left = made + len(value.token_ids), left - 1
                elif what == "error":  # headers are sent: the error goes in the stream
                    yield sse(value.body())
                    return
            if req.include_usage:
                yield sse(usage_chunk(kind, rid, created, model_name, len(ids), made))
            yield sse("[DONE]")
        finally:
            for job in jobs:
                if not job.finished:
                    job.abandoned.set()  # the client went away: stop generating for it

    return event_stream(events())


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
