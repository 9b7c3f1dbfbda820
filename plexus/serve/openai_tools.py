"""OpenAI's ``tools``, ``tool_choice`` and ``response_format`` on chat completions: parsed into
what the engine constrains (a JSON schema for the output, engine/constrain.py) and what the
chat template renders (the tools), and the constrained output turned back into ``tool_calls``.

A call is produced by constrained decoding, so its arguments always parse and match the
function's ``parameters`` schema: with ``tool_choice`` naming a function the output *is* that
function's arguments; with ``"required"`` it is ``{"name": ..., "arguments": ...}`` for one of
the tools. With ``"auto"`` (the default when tools are given) the tools are rendered by the chat
template and the model answers in text: Plexus does not yet read a model's own tool-call markup
out of free text, so ``auto`` never returns a call (documented in docs/api.md).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from plexus.serve.openai_api import APIError

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TOOLS = 128


def _bad(param: str, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class ToolPlan:
    """What a chat request asks of the output."""
    tools: list[dict] | None = None  # for the chat template: OpenAI's [{"type": "function", "function": {...}}]
    schema: dict | None = None  # the output must be JSON matching it (None: free text)
    call: str | None = None  # None: no call; "named": the output is ``name``'s arguments; "any": {"name", "arguments"}
    name: str | None = None
    param: str = "response_format"  # the field a schema problem is reported against


def _schema(value, param: str) -> dict:
    if value is None:
        return {"type": "object"}
    if not isinstance(value, dict):
        raise _bad(param, f"'{param}' must be a JSON schema (an object)")
    return value


def _functions(body: dict) -> list[dict]:
    tools = body.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise _bad("tools", f"'tools' must be a list of at most {MAX_TOOLS} tools")
    out, seen = [], set()
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise _bad(f"tools[{i}]", f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise _bad(f"tools[{i}].function.name", f"tools[{i}].function.name must be 1 to 64 letters, digits, "
                       f"'_' or '-', got {json.dumps(name)}")
        if name in seen:
            raise _bad(f"tools[{i}].function.name", f"two tools are named {name}")
        seen.add(name)
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise _bad(f"tools[{i}].function.description", f"tools[{i}].function.description must be a string")
        params = _schema(fn.get("parameters"), f"tools[{i}].function.parameters")
        out.append({"type": "function", "function": {**fn, "parameters": params}})
    return out


def parse_tools(body: dict) -> ToolPlan:
    """``tools``, ``tool_choice`` and ``response_format`` of a chat request (400 where invalid)."""
    if body.get("functions") not in (None, []):  # the deprecated form
        raise _bad("functions", "'functions' is deprecated and not supported; send 'tools'",
                   code="unsupported_parameter")
    tools = _functions(body)
    choice = body.get("tool_choice")
    plan = ToolPlan(tools=tools or None)
    fmt = body.get("response_format")
    if fmt is not None:
        plan.schema = _response_format(fmt)
    if choice is None or choice in ("auto", "none"):
        if choice == "none":
            plan.tools = None  # not even rendered: the model may not call one
        return plan
    if not tools:
        raise _bad("tool_choice", "'tool_choice' needs 'tools'")
    if plan.schema is not None:
        raise _bad("response_format", "'response_format' and a forced tool call ('tool_choice') exclude each other")
    by_name = {t["function"]["name"]: t["function"] for t in tools}
    if choice == "required":
        plan.call, plan.param = "any", "tools"
        plan.schema = {"anyOf": [{"type": "object", "properties": {"name": {"const": n}, "arguments": f["parameters"]},
                                  "required": ["name", "arguments"], "additionalProperties": False}
                                 for n, f in by_name.items()]}
        return plan
    fn = choice.get("function") if isinstance(choice, dict) else None
    if not (isinstance(choice, dict) and choice.get("type") == "function" and isinstance(fn, dict)):
        raise _bad("tool_choice", "'tool_choice' must be \"none\", \"auto\", \"required\" or "
                   "{\"type\": \"function\", \"function\": {\"name\": ...}}")
    if fn.get("name") not in by_name:
        raise _bad("tool_choice", f"'tool_choice' names {json.dumps(fn.get('name'))}, which is not in 'tools'")
    plan.call, plan.name, plan.param = "named", fn["name"], "tools"
    plan.schema = by_name[fn["name"]]["parameters"]
    return plan


def _response_format(fmt) -> dict | None:
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not NAME.match(spec["name"]):
            raise _bad("response_format", "response_format json_schema needs {\"name\": ..., \"schema\": {...}} "
                       "(a name of letters, digits, '_' or '-')")
        return _schema(spec.get("schema"), "response_format.json_schema.schema")
    raise _bad("response_format", "'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
               "{\"type\": \"json_schema\", \"json_schema\": {...}}")


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def tool_call(plan: ToolPlan, text: str) -> dict | None:
    """The call in a finished constrained output, or None where it did not complete (max_tokens
    ran out first): {"id", "type": "function", "function": {"name", "arguments"}}."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if plan.call == "named":
        name, args = plan.name, text
    else:
        name, args = value["name"], json.dumps(value["arguments"], ensure_ascii=False, separators=(",", ":"))
    return {"id": call_id(), "type": "function", "function": {"name": name, "arguments": args}}


def message(plan: ToolPlan, text: str, finish_reason: str) -> tuple[dict | None, str]:
    """A finished chat answer: (the message with its tool call, "tool_calls"), or (None, the
    reason) where it is plain text (no call asked for, or max_tokens cut the call short)."""
    call = tool_call(plan, text) if plan.call and finish_reason == "stop" else None
    if call is None:
        return None, finish_reason
    return {"role": "assistant", "content": None, "refusal": None, "tool_calls": [call]}, "tool_calls"


class StreamedCall:
    """A chat stream's deltas for a constrained tool call: a named function's arguments stream as
    they come (its id and name first); a call to any of the tools goes out whole at the end,
    once its name is known. Without a call, text deltas as usual."""

    def __init__(self, plan: ToolPlan):
        self.plan, self.text, self.started = plan, "", False
        self.id = call_id()

    def piece(self, text: str) -> list[dict]:
        self.text += text
        if self.plan.call is None:
            return [{"content": text}]
        if self.plan.call != "named":
            return []
        out = []
        if not self.started:
            self.started = True
            out.append({"tool_calls": [{"index": 0, "id": self.id, "type": "function",
                                        "function": {"name": self.plan.name, "arguments": ""}}]})
        return out + [{"tool_calls": [{"index": 0, "function": {"arguments": text}}]}]

    def end(self, finish_reason: str) -> tuple[list[dict], str]:
        """The last deltas and the finish reason."""
        if self.plan.call is None:
            return [], finish_reason
        if self.plan.call == "named":
            return [], "tool_calls" if finish_reason == "stop" and self.started else finish_reason
        call = tool_call(self.plan, self.text) if finish_reason == "stop" else None
        if call is None:
            return ([{"content": self.text}] if self.text else []), finish_reason
        return [{"tool_calls": [{"index": 0, **call}]}], "tool_calls"
