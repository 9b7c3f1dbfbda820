"""OpenAI's Responses API, stateless: ``POST /v1/responses`` with ``input`` (a string or message
and function-call items), ``instructions``, ``max_output_tokens``, function ``tools`` and
``text.format`` (constrained), streamed with the events the ``openai`` client expects
(``response.created`` ... ``response.output_text.delta`` ... ``response.completed``).

Nothing is stored: ``store`` is answered ``false``, and ``previous_response_id`` (which needs a
stored response) gets 400; send the whole conversation as ``input`` instead.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import replace

from flask import Flask, jsonify, request

from plexus.errors import PlexusError
from plexus.serve.openai_api import APIError, _common, _int, parse_json
from plexus.serve.openai_tools import calls_of, parse_tools
from plexus.serve.pipeline import chat_ids, event_stream, grammar_for, submit, wait_for
from plexus.serve.scheduler import Scheduler

ROLES = ("user", "assistant", "system", "developer")


def _bad(param: str, message: str) -> APIError:
    return APIError(400, message, param=param)


def _text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(where, f"{where} must be a string or a list of text parts")
    out = []
    for j, p in enumerate(content):
        if not isinstance(p, dict) or p.get("type") not in ("input_text", "output_text", "text") or \
                not isinstance(p.get("text"), str):
            raise _bad(f"{where}[{j}]", f"{where}[{j}]: only text parts (input_text, output_text) are supported")
        out.append(p["text"])
    return "".join(out)


def messages_of(body: dict) -> list[dict]:
    """``instructions`` and ``input`` as chat-template messages."""
    out = []
    if body.get("instructions") is not None:
        if not isinstance(body["instructions"], str):
            raise _bad("instructions", "'instructions' must be a string")
        out.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    if isinstance(items, str):
        return out + [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise _bad("input", "'input' is required: a string or a non-empty list of items")
    for i, it in enumerate(items):
        kind = it.get("type", "message") if isinstance(it, dict) else None
        if kind == "message" and it.get("role") in ROLES:
            out.append({"role": it["role"], "content": _text(it.get("content", ""), f"input[{i}].content")})
        elif kind == "function_call" and all(isinstance(it.get(k), str) for k in ("call_id", "name", "arguments")):
            try:
                args = json.loads(it["arguments"])
            except ValueError:
                args = it["arguments"]
            call = {"id": it["call_id"], "type": "function", "function": {"name": it["name"], "arguments": args}}
            if out and out[-1]["role"] == "assistant" and "tool_calls" in out[-1]:
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output" and isinstance(it.get("call_id"), str):
            out.append({"role": "tool", "tool_call_id": it["call_id"], "content": _text(it.get("output", ""),
                                                                                       f"input[{i}].output")})
        else:
            raise _bad(f"input[{i}]", f"input[{i}] must be a message (role {', '.join(ROLES)}), a function_call "
                       "or a function_call_output item")
    return out


def _plan(body: dict):
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise _bad("tools", "'tools' must be a list")
    converted = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function":
            raise _bad(f"tools[{i}]", f"tools[{i}]: only function tools are supported")
        converted.append({"type": "function", "function": {k: t.get(k) for k in ("name", "description", "parameters")
                                                           if t.get(k) is not None}})
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        fmt = {"type": "json_schema", "json_schema": {"name": fmt.get("name"), "schema": fmt.get("schema")}}
    return parse_tools({"tools": converted or None, "tool_choice": choice, "response_format": fmt})


def register(app: Flask, scheduler: Scheduler, model_name: str) -> None:
    @app.post("/v1/responses")
    def responses():
        body = parse_json(request.get_data(cache=False))
        if body.get("previous_response_id") is not None:
            raise _bad("previous_response_id", "this server stores no responses (stateless): send the whole "
                       "conversation as 'input' instead of 'previous_response_id'")
        if body.get("model") != model_name:
            raise APIError(404, f"model '{body.get('model')}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")
        plan, msgs = _plan(body), messages_of(body)
        common = _common({k: body.get(k) for k in ("model", "temperature", "top_p", "stream") if k in body})
        scheduler.check_ready()
        ids = chat_ids(scheduler, msgs, plan.tools, param="input")
        max_tokens = _int(body, "max_output_tokens", 1) or scheduler.engine.max_context - len(ids)
        try:
            scheduler.engine.check_request(ids, max_tokens)
        except PlexusError as e:
            raise _bad("max_output_tokens", str(e)) from None
        params = replace(common["sampling"], max_tokens=max_tokens, grammar=grammar_for(scheduler, plan.schema, "text"))
        job = submit(scheduler, ids, params, common["stream"])
        rid, created, msg_id = "resp_" + uuid.uuid4().hex, int(time.time()), "msg_" + uuid.uuid4().hex[:24]

        def shell(status: str, output: list, result=None) -> dict:
            length = result is not None and result.finish_reason == "length"
            return {"id": rid, "object": "response", "created_at": created, "status": status, "model": model_name,
                    "output": output, "instructions": body.get("instructions"), "max_output_tokens": max_tokens,
                    "temperature": params.temperature, "top_p": params.top_p, "tools": body.get("tools") or [],
                    "tool_choice": body.get("tool_choice") or "auto", "parallel_tool_calls": False,
                    "text": body.get("text") or {"format": {"type": "text"}}, "store": False, "truncation": "disabled",
                    "metadata": body.get("metadata") or {}, "error": None,
                    "incomplete_details": {"reason": "max_output_tokens"} if length else None,
                    "usage": None if result is None else {
                        "input_tokens": len(ids), "output_tokens": len(result.token_ids),
                        "total_tokens": len(ids) + len(result.token_ids),
                        "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}}

        def output_of(result) -> list:
            text, calls = calls_of(plan, result.text, result.finish_reason)
            out = [{"type": "message", "id": msg_id, "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}]
            return (out if text or not calls else []) + [
                {"type": "function_call", "id": "fc_" + c["id"][5:], "call_id": c["id"], "name": c["function"]["name"],
                 "arguments": c["function"]["arguments"], "status": "completed"} for c in calls]

        def finished(result) -> dict:
            return shell("incomplete" if result.finish_reason == "length" else "completed", output_of(result), result)

        if not common["stream"]:
            return jsonify(finished(wait_for(job, ("done",))))
        wait_for(job, ("start",))
        seq = iter(range(10**9))

        def ev(kind: str, **data) -> bytes:
            return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': next(seq), **data})}\n\n".encode()

        def events():
            text, where = "", {"item_id": msg_id, "output_index": 0}
            try:
                yield ev("response.created", response=shell("in_progress", []))
                yield ev("response.in_progress", response=shell("in_progress", []))
                if plan.call is None:
                    yield ev("response.output_item.added", output_index=0, item={
                        "type": "message", "id": msg_id, "status": "in_progress", "role": "assistant", "content": []})
                    yield ev("response.content_part.added", **where, content_index=0,
                             part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
                while True:
                    what, value = job.events.get()
                    if what == "text":
                        text += value
                        if plan.call is None:
                            yield ev("response.output_text.delta", **where, content_index=0, delta=value, logprobs=[])
                    elif what == "done":
                        final = finished(value)
                        for n, item in enumerate(final["output"]):
                            if item["type"] == "message":
                                part = item["content"][0]
                                if plan.call is not None:  # held to the end (a call was possible): whole
                                    yield ev("response.output_item.added", output_index=n, item={**item, "content": []})
                                    yield ev("response.content_part.added", **where, content_index=0,
                                             part={**part, "text": ""})
                                    yield ev("response.output_text.delta", **where, content_index=0, delta=part["text"],
                                             logprobs=[])
                                yield ev("response.output_text.done", **where, content_index=0, text=part["text"],
                                         logprobs=[])
                                yield ev("response.content_part.done", **where, content_index=0, part=part)
                            else:
                                fc = {"item_id": item["id"], "output_index": n}
                                yield ev("response.output_item.added", output_index=n,
                                         item={**item, "arguments": "", "status": "in_progress"})
                                yield ev("response.function_call_arguments.delta", **fc, delta=item["arguments"])
                                yield ev("response.function_call_arguments.done", **fc, arguments=item["arguments"],
                                         name=item["name"])
                            yield ev("response.output_item.done", output_index=n, item=item)
                        yield ev("response.incomplete" if final["status"] == "incomplete" else "response.completed",
                                 response=final)
                        return
                    elif what == "error":
                        yield ev("error", code=value.code, message=value.message, param=value.param)
                        return
            finally:
                if not job.finished:
                    job.abandoned.set()

        return event_stream(events())
