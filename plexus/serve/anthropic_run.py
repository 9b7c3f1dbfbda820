"""One Anthropic Messages request through the scheduler (serve/app.py routes it): the shapes are
serve/anthropic_api.py's; this runs it and answers whole or as Anthropic's event stream."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace

from flask import jsonify, request

from plexus.errors import PlexusError
from plexus.serve import anthropic_api as anthropic
from plexus.serve.openai_api import APIError, parse_json
from plexus.serve.openai_tools import StreamedCall, calls_of
from plexus.serve.pipeline import chat_ids, event_stream, grammar_for, submit, wait_for
from plexus.serve.scheduler import Scheduler


def messages(scheduler: Scheduler, model_name: str):
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
    job = submit(scheduler, ids, replace(req.sampling, grammar=grammar), req.stream)
    rid = anthropic.message_id()

    def finished(result) -> tuple[str, list[dict], str]:
        """(the text, the tool calls, the stop reason) of a finished answer."""
        text, calls = calls_of(plan, result.text, result.finish_reason)
        return text, calls, anthropic.stop_reason(result.finish_reason, result.stop_sequence, bool(calls))

    if not req.stream:
        result = wait_for(job, ("done",))
        text, calls, reason = finished(result)
        return jsonify(anthropic.message(rid, model_name, anthropic.content_blocks(text, calls), reason,
                                         result.stop_sequence, len(ids), len(result.token_ids)))
    wait_for(job, ("start",))
    ev = anthropic.event

    def block_start(block, index=0):
        return ev("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})

    def delta(d, index=0):
        return ev("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d})

    def block_stop(index=0):
        return ev("content_block_stop", {"type": "content_block_stop", "index": index})

    def whole_blocks(blocks, first):
        """Blocks known only at the end, from index ``first``."""
        for i, block in enumerate(blocks, first):
            if block["type"] == "tool_use":
                yield block_start({**block, "input": {}}, i)
                yield delta({"type": "input_json_delta", "partial_json": json.dumps(block["input"])}, i)
            else:
                yield block_start({"type": "text", "text": ""}, i)
                yield delta({"type": "text_delta", "text": block["text"]}, i)
            yield block_stop(i)

    def events():
        held = StreamedCall(plan)  # auto: text streams until it may be a call
        try:
            yield ev("message_start", {"type": "message_start",
                                       "message": anthropic.message(rid, model_name, [], None, None, len(ids), 0)})
            if plan.call in (None, "auto"):
                yield block_start({"type": "text", "text": ""})
            elif plan.call == "named":
                yield block_start({"type": "tool_use", "id": "toolu_" + uuid.uuid4().hex[:24], "name": plan.name,
                                   "input": {}})
            yield ev("ping", {"type": "ping"})
            while True:
                what, value = job.events.get()
                if what == "text":
                    if plan.call in (None, "auto"):
                        for d in held.piece(value):
                            yield delta({"type": "text_delta", "text": d["content"]})
                    elif plan.call == "named":
                        yield delta({"type": "input_json_delta", "partial_json": value})
                    else:
                        held.text += value
                elif what == "done":
                    text, calls, reason = finished(value)
                    if plan.call == "any":  # its name is known now: the whole block at once
                        yield from whole_blocks(anthropic.content_blocks(text, calls), 0)
                    elif plan.call == "auto":
                        rest = held.end(value.finish_reason)[0]
                        for d in rest:
                            if "content" in d:
                                yield delta({"type": "text_delta", "text": d["content"]})
                        yield block_stop()
                        uses = [b for b in anthropic.content_blocks("", calls) if b["type"] != "text"]
                        yield from whole_blocks(uses, 1)
                    else:
                        yield block_stop()
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

    return event_stream(events())
