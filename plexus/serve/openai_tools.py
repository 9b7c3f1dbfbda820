"""OpenAI's ``tools``, ``tool_choice`` and ``response_format`` on chat completions: parsed into
what the engine constrains (a JSON schema for the output, engine/constrain.py) and what the
chat template renders (the tools), and the constrained output turned back into ``tool_calls``.

A call is produced by constrained decoding, so its arguments always parse and match the
function's ``parameters`` schema: with ``tool_choice`` naming a function the output *is* that
function's arguments; with ``"required"`` it is ``{"name": ..., "arguments": ...}`` for one of
the tools. With ``"auto"`` (the default when tools are given) the tools are rendered by the chat
template, the model writes freely, and its own tool-call markup is read out of the text
(``parse_calls``: Hermes/Qwen ``<tool_call>`` blocks, Mistral ``[TOOL_CALLS]``, or a message that
is one Llama-3-style ``{"name", "parameters"}`` object), naming only the request's tools.
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
    call: str | None = None  # None: no call; "named": the output is ``name``'s arguments; "any": {"name",
    # "arguments"}; "auto": free text, calls read out of the model's own markup
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
        elif tools and plan.schema is None:
            plan.call = "auto"
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


HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
MARKERS = ("<tool_call>", "[TOOL_CALLS]")


def parse_calls(text: str, names) -> tuple[str, list[dict]]:
    """(the text outside any calls, the calls) of free text with a model's own tool-call markup;
    (text, []) when there is none, it does not parse, or it names a function not in ``names``."""
    def call(obj) -> dict | None:
        if not isinstance(obj, dict) or obj.get("name") not in names:
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return None
        if not isinstance(args, dict):
            return None
        return {"id": call_id(), "type": "function",
                "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}

    def loads(s):
        try:
            return json.loads(s)
        except ValueError:
            return None

    stripped = text.strip()
    if "<tool_call>" in text:  # Hermes, Qwen 2.5/3
        calls = [call(loads(m)) for m in HERMES.findall(text)]
        if calls and all(calls):
            return HERMES.sub("", text).replace("<tool_call>", "").strip(), calls
    elif stripped.startswith("[TOOL_CALLS]"):  # Mistral
        found = loads(stripped[len("[TOOL_CALLS]"):])
        calls = [call(o) for o in found] if isinstance(found, list) and found else []
        if calls and all(calls):
            return "", calls
    elif stripped.startswith("{"):  # Llama 3.x: the whole message is one call
        found = call(loads(stripped))
        if found:
            return "", [found]
    return text, []


def calls_of(plan: ToolPlan, text: str, finish_reason: str) -> tuple[str, list[dict]]:
    """A finished answer as (its text, its tool calls), for every surface: the model's own markup
    read out (``auto``), or the constrained call (none where max_tokens cut it short)."""
    if plan.call == "auto":
        return parse_calls(text, _names(plan))
    call = tool_call(plan, text) if plan.call and finish_reason == "stop" else None
    return ("", [call]) if call else (text, [])


def message(plan: ToolPlan, text: str, finish_reason: str) -> tuple[dict | None, str]:
    """A finished chat answer: (the message with its tool calls, "tool_calls"), or (None, the
    reason) where it is plain text (no call asked for or found, or max_tokens cut a call short)."""
    content, calls = calls_of(plan, text, finish_reason)
    if not calls:
        return None, finish_reason
    return {"role": "assistant", "content": content or None, "refusal": None, "tool_calls": calls}, "tool_calls"


def _names(plan: ToolPlan) -> set[str]:
    return {t["function"]["name"] for t in plan.tools or ()}


class StreamedCall:
    """A chat stream's deltas for a tool call: a named function's arguments stream as they come
    (its id and name first); a call to any of the tools goes out whole at the end, once its name
    is known. With ``auto``, text streams until it may be a call (a marker, or a message that
    starts as JSON), then is held and read at the end. Without tools, text deltas as usual."""

    def __init__(self, plan: ToolPlan):
        self.plan, self.text, self.started = plan, "", False
        self.sent, self.holding = 0, False  # auto: characters passed on as content; holding the rest
        self.id = call_id()

    def piece(self, text: str) -> list[dict]:
        self.text += text
        if self.plan.call is None:
            return [{"content": text}]
        if self.plan.call == "auto":
            return self._auto()
        if self.plan.call != "named":
            return []
        out = []
        if not self.started:
            self.started = True
            out.append({"tool_calls": [{"index": 0, "id": self.id, "type": "function",
                                        "function": {"name": self.plan.name, "arguments": ""}}]})
        return out + [{"tool_calls": [{"index": 0, "function": {"arguments": text}}]}]

    def _auto(self) -> list[dict]:
        if self.holding:
            return []
        if self.sent == 0:
            head = self.text.lstrip()
            if not head:
                return []
            if head.startswith(("{", *MARKERS)):  # a call, or a Llama-style JSON one: held to the end
                self.holding = True
                return []
            if any(m.startswith(head) for m in MARKERS):
                return []  # could still become a marker
        at = self.text.find("<tool_call>", self.sent)
        if at >= 0:
            self.holding = True
            end = at
        else:  # hold back a tail that could grow into the marker
            end = len(self.text) - max((k for k in range(1, len("<tool_call>")) if self.text.endswith("<tool_call>"[:k])),
                                       default=0)
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return [{"content": out}] if out else []

    def end(self, finish_reason: str) -> tuple[list[dict], str]:
        """The last deltas and the finish reason."""
        if self.plan.call is None:
            return [], finish_reason
        if self.plan.call == "auto":
            content, calls = parse_calls(self.text, _names(self.plan))
            if not calls:
                rest = self.text[self.sent:]
                return ([{"content": rest}] if rest else []), finish_reason
            unsent = parse_calls(self.text[self.sent:], _names(self.plan))[0]  # the calls are all in the held tail
            out = [{"content": unsent}] if unsent else []
            return out + [{"tool_calls": [{"index": i, **c}]} for i, c in enumerate(calls)], "tool_calls"
        if self.plan.call == "named":
            return [], "tool_calls" if finish_reason == "stop" and self.started else finish_reason
        call = tool_call(self.plan, self.text) if finish_reason == "stop" else None
        if call is None:
            return ([{"content": self.text}] if self.text else []), finish_reason
        return [{"tool_calls": [{"index": 0, **call}]}], "tool_calls"
