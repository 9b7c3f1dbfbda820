"""Anthropic's Messages API shapes: ``POST /v1/messages`` and ``/v1/messages/count_tokens``.

Plain functions with no Flask in them (serve/app.py routes them). A request becomes what the
OpenAI surface runs: messages for the chat template (``system``, ``user``, ``assistant`` with
``tool_calls``, ``tool`` results), the tools in OpenAI's form for the template and the
constrained output (serve/openai_tools.py), and SamplingParams. Errors are Anthropic's
``{"type": "error", "error": {"type": ..., "message": ...}}``.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from plexus.engine.sampling import SamplingParams
from plexus.serve.openai_api import APIError, _int, _number
from plexus.serve.openai_tools import ToolPlan, parse_tools

MAX_STOP_SEQUENCES = 8
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
               429: "rate_limit_error", 500: "api_error", 501: "api_error", 503: "overloaded_error"}


def error_body(e: APIError) -> dict:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(e.status, "api_error"), "message": e.message}}


def _bad(param: str, message: str) -> APIError:
    return APIError(400, message, param=param)


@dataclass
class MessagesRequest:
    model: str
    messages: list[dict]  # for the chat template, OpenAI's roles
    plan: ToolPlan = field(default_factory=ToolPlan)
    max_tokens: int = 0
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stream: bool = False


def _text_of(blocks, where: str) -> str:
    """A string, or text blocks joined."""
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise _bad(where, f"{where} must be a string or a list of content blocks")
    out = []
    for j, b in enumerate(blocks):
        if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
            raise _bad(f"{where}[{j}]", f"{where}[{j}] must be a text block {{\"type\": \"text\", \"text\": ...}}")
        out.append(b["text"])
    return "".join(out)


def _message(i: int, m) -> list[dict]:
    """One Anthropic message as chat-template messages (a user turn's tool results become
    ``tool`` messages; an assistant's tool_use blocks its ``tool_calls``)."""
    where = f"messages[{i}]"
    if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
        raise _bad(where, f"{where} must be an object with role \"user\" or \"assistant\"")
    role, content = m["role"], m.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise _bad(f"{where}.content", f"{where}.content must be a string or a list of content blocks")
    text, calls, results = [], [], []
    for j, b in enumerate(content):
        kind = b.get("type") if isinstance(b, dict) else None
        at = f"{where}.content[{j}]"
        if kind == "text" and isinstance(b.get("text"), str):
            text.append(b["text"])
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(b.get("id"), str) or not isinstance(b.get("name"), str) or not isinstance(b.get("input"), dict):
                raise _bad(at, f"{at}: a tool_use block needs 'id', 'name' and an object 'input'")
            calls.append({"id": b["id"], "type": "function", "function": {"name": b["name"], "arguments": b["input"]}})
        elif kind == "tool_result" and role == "user":
            if not isinstance(b.get("tool_use_id"), str):
                raise _bad(at, f"{at}: a tool_result block needs 'tool_use_id'")
            c = b.get("content", "")
            results.append({"role": "tool", "tool_call_id": b["tool_use_id"], "content": _text_of(c, f"{at}.content")})
        else:
            raise _bad(at, f"{at}: only text blocks, tool_use (assistant) and tool_result (user) blocks are "
                       f"supported, got {json.dumps(kind)}")
    out = results
    if text or calls or not results:
        msg = {"role": role, "content": "".join(text)}
        if calls:
            msg["tool_calls"] = calls
        out = out + [msg]
    return out


def _tools(body: dict) -> ToolPlan:
    """Anthropic's tools and tool_choice, through OpenAI's parser (the same constraints)."""
    tools = body.get("tools")
    if tools is None:
        tools = []
    if not isinstance(tools, list):
        raise _bad("tools", "'tools' must be a list")
    converted = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise _bad(f"tools[{i}]", f"tools[{i}] must be an object with a 'name' and an 'input_schema'")
        converted.append({"type": "function", "function": {"name": t["name"], "description": t.get("description"),
                                                            "parameters": t.get("input_schema")}})
    choice = body.get("tool_choice")
    kind = choice.get("type") if isinstance(choice, dict) else None if choice is None else "?"
    openai_choice = {None: None, "auto": "auto", "none": "none", "any": "required",
                     "tool": {"type": "function", "function": {"name": (choice or {}).get("name")}}}
    if kind not in openai_choice:
        raise _bad("tool_choice", "'tool_choice' must be {\"type\": \"auto\" | \"any\" | \"tool\" | \"none\"}")
    return parse_tools({"tools": converted or None, "tool_choice": openai_choice[kind]})


def parse_messages(body: dict, count_only: bool = False) -> MessagesRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "'model' is required and must be a string")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "'messages' is required and must be a non-empty list")
    out = []
    if body.get("system") is not None:
        out.append({"role": "system", "content": _text_of(body["system"], "system")})
    for i, m in enumerate(messages):
        out += _message(i, m)
    req = MessagesRequest(model, out, _tools(body))
    if count_only:
        return req
    if body.get("max_tokens") is None:
        raise _bad("max_tokens", "'max_tokens' is required")
    req.max_tokens = _int(body, "max_tokens", 1)
    stops = body.get("stop_sequences") or []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP_SEQUENCES:
        raise _bad("stop_sequences", f"'stop_sequences' must be a list of at most {MAX_STOP_SEQUENCES} non-empty strings")
    temperature = _number(body, "temperature", 0.0, 1.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    top_k = _int(body, "top_k", 0)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream", "'stream' must be a boolean")
    req.sampling = SamplingParams(max_tokens=req.max_tokens, temperature=1.0 if temperature is None else temperature,
                                  top_p=1.0 if not top_p else top_p, top_k=top_k or 0, stop=tuple(stops))
    req.stream = stream
    return req


# ---- responses ----------------------------------------------------------------------------------

def message_id() -> str:
    return "msg_" + uuid.uuid4().hex[:24]


def stop_reason(finish_reason: str, stop_sequence: str | None, called: bool) -> str:
    if called:
        return "tool_use"
    if finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if stop_sequence else "end_turn"


def content_blocks(text: str, calls: list[dict]) -> list[dict]:
    """The answer's blocks: its text (when there is some, or nothing else), then its tool calls
    (OpenAI's shape from openai_tools) as tool_use blocks."""
    uses = [{"type": "tool_use", "id": "toolu_" + c["id"][5:], "name": c["function"]["name"],
             "input": json.loads(c["function"]["arguments"])} for c in calls]
    return ([{"type": "text", "text": text}] if text or not uses else []) + uses


def message(rid: str, model: str, content: list[dict], reason: str | None, stop_sequence: str | None,
            input_tokens: int, output_tokens: int) -> dict:
    return {"id": rid, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": reason, "stop_sequence": stop_sequence,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}}


def event(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()
