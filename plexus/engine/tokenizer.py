"""Tokenizer and chat template, from ``tokenizer.json`` and ``tokenizer_config.json``.

Encoding lets the tokenizer's own post-processor decide whether BOS is added, so it is never
added twice. Chat templates come from the model directory, which is untrusted input: they are
rendered in jinja2's ImmutableSandboxedEnvironment.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from plexus.checkpoint.gguf_vocab import gguf_vocab
from plexus.engine.source import gguf_source
from plexus.errors import PlexusError


def _token_text(tok) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlexusError(f"{path}: not valid JSON ({e})") from None


def load_tokenizer(model_dir, override=None, vocab_size: int | None = None) -> "Tokenizer":
    """The model's tokenizer, or ``override``'s (--tokenizer); one with more tokens than the
    model's vocabulary (``vocab_size``) is refused: it belongs to another model."""
    tok = Tokenizer(override or model_dir)
    if override and vocab_size is not None and tok.vocab_size > vocab_size:
        raise PlexusError(f"--tokenizer {override}: {tok.vocab_size} tokens, more than the model's vocabulary of "
                          f"{vocab_size}: a tokenizer of another model?")
    return tok


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        d = Path(model_dir)
        path = d / "tokenizer.json"
        gguf = None if path.is_file() else gguf_source(d)  # a tokenizer.json beside a .gguf wins
        if gguf is not None:  # the vocabulary in the GGUF's metadata
            v = gguf_vocab(gguf)
            self.tok, self.bos_token, self.eos_token, self.chat_template = (v.tokenizer, v.bos_token, v.eos_token,
                                                                            v.chat_template)
            self.eos_token_ids, self.bos_token_id = v.eos_token_ids, v.bos_token_id
            self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
            return
        if not path.is_file():
            raise PlexusError(f"{d}: no tokenizer.json")
        try:
            self.tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception
            raise PlexusError(f"{path}: cannot be read by tokenizers ({e})") from None
        cfg = _read_json(d / "tokenizer_config.json")
        gen = _read_json(d / "generation_config.json")
        model_cfg = _read_json(d / "config.json")
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: use "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template = template
        eos = set()
        for src in (gen.get("eos_token_id"), model_cfg.get("eos_token_id")):
            eos.update(src if isinstance(src, list) else [] if src is None else [src])
        if self.eos_token is not None and self.tok.token_to_id(self.eos_token) is not None:
            eos.add(self.tok.token_to_id(self.eos_token))
        self.eos_token_ids = frozenset(int(e) for e in eos)
        # the id of BOS: the tokenizer's own token, else config.json's (None: the model has none)
        bos = self.tok.token_to_id(self.bos_token) if self.bos_token is not None else None
        if bos is None and isinstance(model_cfg.get("bos_token_id"), int):
            bos = model_cfg["bos_token_id"]
        self.bos_token_id: int | None = bos
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([i for i in ids if 0 <= i < self.vocab_size], skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        if not self.chat_template:
            raise PlexusError("this model has no chat_template in tokenizer_config.json; use a plain prompt")
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise PlexusError("messages must be a list of objects with a string 'role'")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message):
            raise TemplateError(message)

        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "", tools=tools)
        except TemplateError as e:
            raise PlexusError(f"chat template failed: {e}") from None

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Token ids of a chat prompt (``tools``: OpenAI's tool definitions, for templates that
        render them); the template writes any BOS itself, as in transformers."""
        return self.encode(self.apply_chat_template(messages, tools=tools), add_special_tokens=False)


class IncrementalDecoder:
    """Text of a growing list of generated ids, released only when it is stable (no half
    UTF-8 character at the end), with stop strings cut off."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str] | tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # text released so far
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended it

    def add(self, token_id: int) -> str:
        """Append one id; return the newly released text (may be empty)."""
        self.ids.append(token_id)
        full = self.tokenizer.decode(self.ids)
        hits = [(full.find(s), i) for i, s in enumerate(self.stop) if s in full]
        if hits:
            at, i = min(hits)  # the first to appear
            self.stopped, self.matched = True, self.stop[i]
            full = full[:at]
        if not self.stopped:
            if full.endswith("\ufffd"):
                return ""
            # hold back a tail that could still grow into a stop string
            hold = max((k for s in self.stop for k in range(1, len(s)) if full.endswith(s[:k])), default=0)
            full = full[:len(full) - hold]
        delta = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += delta
        return delta

    def finish(self) -> str:
        """Release whatever was held back; return it."""
        if self.stopped:
            return ""
        full = self.tokenizer.decode(self.ids)
        delta = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += delta
        return delta
