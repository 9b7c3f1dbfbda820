"""Grammar-constrained decoding on rank 0: a request's next token is chosen only among those its
grammar allows, so JSON output and tool-call arguments always parse and match their schema,
whatever the model (a tiny or random one included).

The grammar engine is llguidance (PyPI, Rust, no dependencies of its own, 3 MB): it reads the
model's ``tokenizers`` JSON directly and computes a step's mask in microseconds on a CPU. Of the
alternatives, xgrammar needs transformers and triton at run time, and outlines-core builds its
index from the vocabulary up front for each schema. The mask is applied to the gathered logits
before sampling (engine/batch.py), each sequence with its own matcher. The mask for a sequence's
next token is computed on a helper thread as soon as its last token is known, so it overlaps
the next step's forward pass (llguidance releases the GIL while it works).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import torch

from plexus.errors import PlexusError

_SHIFTS = torch.arange(32, dtype=torch.int32)
_AHEAD = ThreadPoolExecutor(max_workers=2, thread_name_prefix="plexus-mask")  # next masks, during the step


def _llguidance():
    try:
        import llguidance
    except ImportError:  # an install without it: the rest of the server works
        raise PlexusError("structured output needs the llguidance package (pip install llguidance)") from None
    return llguidance


def json_grammar(schema: dict) -> str:
    """The grammar of JSON text matching ``schema`` (compact: no whitespace between tokens)."""
    schema = {**schema, "x-guidance": {"whitespace_flexible": False, **schema.get("x-guidance", {})}}
    return _llguidance().LLMatcher.grammar_from_json_schema(json.dumps(schema))


def _ll_tokenizer(tokenizer):
    """llguidance's view of ``tokenizer`` (engine/tokenizer.py), made once per tokenizer."""
    ll = getattr(tokenizer, "_llguidance", None)
    if ll is None:
        eos = sorted(tokenizer.eos_token_ids)
        ll = _llguidance().LLTokenizer(tokenizer.tok.to_str(), n_vocab=tokenizer.vocab_size,
                                       eos_token=eos[0] if eos else None)
        tokenizer._llguidance = ll
    return ll


def check_grammar(tokenizer, grammar: str) -> None:
    """A PlexusError naming the problem if ``grammar`` cannot run (a schema llguidance refuses)."""
    try:
        error = _llguidance().LLMatcher.validate_grammar(grammar, _ll_tokenizer(tokenizer))
    except (ValueError, RuntimeError) as e:
        error = str(e)
    if error:
        raise PlexusError(f"the schema cannot be used for constrained output: {error.strip().splitlines()[0]}")


class Constraint:
    """One sequence's matcher: ``mask`` the logits, then ``advance`` by the chosen token."""

    def __init__(self, tokenizer, grammar: str):
        self.matcher = _llguidance().LLMatcher(_ll_tokenizer(tokenizer), grammar, log_level=0)
        if self.matcher.is_error():
            raise PlexusError(f"the schema cannot be used for constrained output: {self.matcher.get_error()}")
        self.eos = frozenset(tokenizer.eos_token_ids)
        self._stopped = False  # read here: the matcher is the helper thread's while a mask is computed
        self._next = _AHEAD.submit(self.matcher.compute_bitmask)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (vocab,) float32 with every token the grammar does not allow now at -inf (a copy)."""
        bits = torch.frombuffer(bytearray(self._next.result()), dtype=torch.int32)
        allowed = ((bits[:, None] >> _SHIFTS) & 1).flatten().bool()
        n = min(len(allowed), logits.numel())
        out = torch.full_like(logits, float("-inf"))
        out[:n] = torch.where(allowed[:n], logits[:n], out[:n])
        return out

    def advance(self, token: int) -> None:
        """Feed the chosen token; the next mask starts computing at once (it is needed after the
        next step)."""
        self._next.result()  # (done already: mask waited for it)
        if not self.matcher.consume_token(token):
            raise PlexusError(f"the constrained output went wrong: {self.matcher.get_error()}")
        self._stopped = self.matcher.is_stopped()
        if not self._stopped:
            self._next = _AHEAD.submit(self.matcher.compute_bitmask)

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows nothing more (EOS, or its own end)."""
        return self._stopped
