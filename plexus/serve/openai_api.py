"""OpenAI's request and response shapes for ``/v1/chat/completions`` and ``/v1/completions``.

Plain functions with no Flask in them, so they are tested directly. Validation is strict about
types (a bool is not an integer, "0.5" is not a number) so a client's mistake gets a 400 naming
the field instead of a surprising answer. Fields Plexus does not use are ignored, as vLLM does,
except those that would change the answer (``n`` > 1, ``echo``, penalties, ...): those get a
clear 400 rather than being silently dropped. (``tools``, ``tool_choice`` and
``response_format``: serve/openai_tools.py.)
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from plexus.engine.sampling import SamplingParams

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_TOP_LOGPROBS = 20
MAX_N = 16  # choices per request
INT64 = 2 ** 63


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}  # e.g. Retry-After on a 429

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def unavailable(message: str, code: str = "service_unavailable") -> APIError:
    return APIError(503, message, "server_error", None, code)


def parse_json(data: bytes) -> dict:
    """The request body as a JSON object (400 otherwise). NaN and Infinity are not JSON."""
    def no_constants(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(data.decode("utf-8"), parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return body


@dataclass
class ParsedRequest:
    """A validated completion request; the prompt is tokenized later, by the server."""
    kind: str  # "chat" or "completion"
    model: str
    messages: list[dict] | None = None  # chat: [{"role", "content"}], content as plain text
    prompt: str | list[int] | None = None  # completion: text, or token ids
    max_tokens: int | None = None  # None: the rest of the context (chat) / 16 (completion)
    sampling: SamplingParams = field(default_factory=SamplingParams)  # its max_tokens is unset
    stream: bool = False
    include_usage: bool = False
    n: int = 1  # choices, each its own sequence in the batch


# ---- field checks ------------------------------------------------------------------------------

def _bad(param: str, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(body: dict, name: str, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v):
        raise _bad(name, f"'{name}' must be an integer, got {json.dumps(v)}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
        raise _bad(name, f"'{name}' must be {rng}, got {v}")
    return v


def _number(body: dict, name: str, lo: float, hi: float) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if not (isinstance(v, (int, float)) and not isinstance(v, bool)) or not math.isfinite(v):
        raise _bad(name, f"'{name}' must be a number, got {json.dumps(v)}")
    if not lo <= v <= hi:
        raise _bad(name, f"'{name}' must be between {lo:g} and {hi:g}, got {v}")
    return float(v)


def _bool(body: dict, name: str) -> bool | None:
    v = body.get(name)
    if v is not None and not isinstance(v, bool):
        raise _bad(name, f"'{name}' must be true or false, got {json.dumps(v)}")
    return v


def _unsupported(body: dict, name: str, allowed=(None,)) -> None:
    """Fields that would change the answer: only their no-op values are accepted."""
    if name in body and body[name] not in allowed:
        raise _bad(name, f"'{name}' is not supported by Plexus yet", code="unsupported_parameter")


MAX_LOGIT_BIAS = 1024  # entries


def _logit_bias(body: dict) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias``: token ids (as strings) to a number in [-100, 100], added to that
    token's logit before sampling (the ids are checked against the vocabulary with the prompt)."""
    v = body.get("logit_bias")
    if v is None:
        return ()
    if not isinstance(v, dict):
        raise _bad("logit_bias", "'logit_bias' must be an object mapping token ids to numbers")
    if len(v) > MAX_LOGIT_BIAS:
        raise _bad("logit_bias", f"'logit_bias' may have at most {MAX_LOGIT_BIAS} entries, got {len(v)}")
    out = []
    for key, bias in v.items():
        if not (key.isascii() and key.isdigit()):
            raise _bad("logit_bias", f"'logit_bias' keys must be token ids, got {json.dumps(key)}")
        if not (isinstance(bias, (int, float)) and not isinstance(bias, bool)) or not -100 <= bias <= 100:
            raise _bad("logit_bias", f"'logit_bias' values must be numbers between -100 and 100, got "
                       f"{json.dumps(bias)} for token {key}")
        out.append((int(key), float(bias)))
    return tuple(sorted(out))


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise _bad("stop", "'stop' must be a string or a list of strings")
    if len(v) > MAX_STOP:
        raise _bad("stop", f"'stop' may hold at most {MAX_STOP} sequences, got {len(v)}")
    return tuple(s for s in v if s)


def _model(body: dict) -> str:
    v = body.get("model")
    if not isinstance(v, str) or not v:
        raise _bad("model", "'model' is required and must be a string (see GET /v1/models)")
    return v


def _common(body: dict, logprobs: int | None = None) -> dict:
    """Fields both endpoints share: sampling, n, stream, and the unsupported ones (``logprobs``:
    the endpoint's own field, read by it)."""
    n = _int(body, "n", 1, MAX_N) or 1
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    top_k = _int(body, "top_k", -1)  # vLLM's extension; -1 or 0: no limit
    seed = _int(body, "seed", -INT64, INT64 - 1)
    for name in ("presence_penalty", "frequency_penalty"):
        _number(body, name, -2.0, 2.0)
        _unsupported(body, name, (None, 0, 0.0))
    stream = bool(_bool(body, "stream"))
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not stream:
            raise _bad("stream_options", "'stream_options' is only allowed when 'stream' is true")
        if not isinstance(opts, dict):
            raise _bad("stream_options", "'stream_options' must be an object")
        include_usage = bool(_bool(opts, "include_usage"))
    if top_p == 0.0:  # the smallest nucleus is the single most likely token: greedy
        temperature = 0.0
    sampling = SamplingParams(
        max_tokens=0, temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if not top_p else top_p, top_k=max(top_k or 0, 0), seed=seed, stop=_stop(body),
        logit_bias=_logit_bias(body), logprobs=logprobs)
    return dict(model=_model(body), sampling=sampling, stream=stream, include_usage=include_usage, n=n)


# ---- the two endpoints -------------------------------------------------------------------------

def _message_text(i: int, content: Any, role: str) -> str:
    if isinstance(content, str):
        return content
    if content is None and role in ("assistant", "tool"):
        return ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"messages[{i}].content", "only text content parts ({\"type\": \"text\", \"text\": "
                           "...}) are supported", code="unsupported_content")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(f"messages[{i}].content", f"messages[{i}].content must be a string or a list of text parts")


def _tool_fields(i: int, m: dict) -> dict:
    """An assistant message's ``tool_calls`` or a tool message's ``tool_call_id``, checked and
    passed on to the chat template (arguments as objects, as templates expect)."""
    out = {}
    if m.get("role") == "tool":
        if not isinstance(m.get("tool_call_id"), str):
            raise _bad(f"messages[{i}].tool_call_id", f"messages[{i}] (a tool result) needs a string 'tool_call_id'")
        out["tool_call_id"] = m["tool_call_id"]
    calls = m.get("tool_calls")
    if calls is not None and m.get("role") == "assistant":
        if not isinstance(calls, list):
            raise _bad(f"messages[{i}].tool_calls", f"messages[{i}].tool_calls must be a list")
        out["tool_calls"] = []
        for j, c in enumerate(calls):
            fn = c.get("function") if isinstance(c, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
                raise _bad(f"messages[{i}].tool_calls[{j}]", "a tool call needs function.name and function.arguments "
                           "(a string)")
            try:
                args = json.loads(fn["arguments"])
            except ValueError:
                args = fn["arguments"]
            out["tool_calls"].append({"id": c.get("id"), "type": "function",
                                      "function": {"name": fn["name"], "arguments": args}})
    return out


def parse_chat(body: dict) -> ParsedRequest:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "'messages' is required and must be a non-empty list")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", f"messages[{i}] must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise _bad(f"messages[{i}].role", f"messages[{i}].role must be one of {', '.join(ROLES)}, "
                       f"got {json.dumps(role)}")
        clean.append({"role": role, "content": _message_text(i, m.get("content"), role), **_tool_fields(i, m)})
    # tools, tool_choice and response_format: serve/openai_tools.py
    logprobs = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top and not logprobs:
        raise _bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    max_tokens = _int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1)
    else:
        _int(body, "max_tokens", 1)
    return ParsedRequest("chat", messages=clean, max_tokens=max_tokens,
                         **_common(body, (top or 0) if logprobs else None))


def _prompt(body: dict) -> str | list[int]:
    """A string, or token ids; OpenAI's batch forms are accepted with exactly one prompt."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # ["text"] or [[ids]]
    if isinstance(p, str):
        return p
    if isinstance(p, list) and p and all(_is_int(t) for t in p):
        return p
    if isinstance(p, list) and len(p) > 1 and all(isinstance(t, (str, list)) for t in p):
        raise _bad("prompt", f"one prompt per request (got {len(p)}); send them as separate requests",
                   code="unsupported_parameter")
    raise _bad("prompt", "'prompt' is required: a string, or a non-empty list of token ids")


def parse_completion(body: dict) -> ParsedRequest:
    prompt = _prompt(body)
    _unsupported(body, "echo", (None, False))
    _unsupported(body, "suffix", (None, ""))
    logprobs = _int(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    best_of = _int(body, "best_of", 1)
    if best_of not in (None, 1):
        raise _bad("best_of", "'best_of' must be 1", code="unsupported_parameter")
    return ParsedRequest("completion", prompt=prompt, max_tokens=_int(body, "max_tokens", 1),
                         **_common(body, logprobs))


# ---- responses ---------------------------------------------------------------------------------

def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def logprobs_of(kind: str, entries: list | None, decode, offset: int = 0) -> dict | None:
    """OpenAI's ``logprobs`` of a choice (or a chunk) for Completion.logprobs entries; ``decode``
    turns one token id into its text; ``offset``: where the entries' text starts (completions)."""
    if entries is None:
        return None
    if kind == "chat":
        def item(i, lp):
            s = decode([i])
            return {"token": s, "logprob": lp, "bytes": list(s.encode())}
        return {"content": [{**item(t, lp), "top_logprobs": [item(i, x) for i, x in top]} for t, lp, top in entries],
                "refusal": None}
    tokens = [decode([t]) for t, _, _ in entries]
    offsets = [offset + sum(len(s) for s in tokens[:k]) for k in range(len(tokens))]
    tops = []
    for _, _, top in entries:  # keyed by text: where two tokens read the same, the likelier one
        d = {}
        for i, x in top:
            d.setdefault(decode([i]), x)
        tops.append(d)
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries], "top_logprobs": tops,
            "text_offset": offsets}


def response(kind: str, rid: str, created: int, model: str, text: str, finish_reason: str,
             prompt_tokens: int, completion_tokens: int, message: dict | None = None,
             logprobs: dict | None = None) -> dict:
    """``message``: the chat message instead of the text (tool calls, serve/openai_tools.py)."""
    if kind == "chat":
        choice = {"index": 0, "message": message or {"role": "assistant", "content": text, "refusal": None},
                  "logprobs": logprobs, "finish_reason": finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": None}


def chunk(kind: str, rid: str, created: int, model: str, text: str | None = None, first: bool = False,
          finish_reason: str | None = None, with_usage_field: bool = False, delta: dict | None = None,
          logprobs: dict | None = None, index: int = 0) -> dict:
    """One streamed delta: the role first (chat), then text pieces (or ``delta``s: tool calls),
    then the finish reason."""
    if kind == "chat":
        delta = dict(delta or {})
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        obj = "text_completion"
    out = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice],
           "system_fingerprint": None}
    if with_usage_field:
        out["usage"] = None
    return out


def usage_chunk(kind: str, rid: str, created: int, model: str, prompt_tokens: int,
                completion_tokens: int) -> dict:
    """``stream_options.include_usage``: a last chunk with no choices and the usage."""
    return {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": created, "model": model, "choices": [], "system_fingerprint": None,
            "usage": usage(prompt_tokens, completion_tokens)}


def sse(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def model_card(name: str, created: int, max_context: int | None) -> dict:
    card = {"id": name, "object": "model", "created": created, "owned_by": "plexus"}
    if max_context:
        card["max_model_len"] = max_context
    return card


def now() -> int:
    return int(time.time())
