"""The tokenizer a GGUF file describes in its metadata, as a ``tokenizers.Tokenizer``.

- ``tokenizer.ggml.model`` = ``llama`` (SentencePiece): BPE over the tokens with byte fallback
  (the ``<0xNN>`` tokens), merges from ``tokenizer.ggml.merges`` or, as SentencePiece ranks its
  pieces, derived from ``tokenizer.ggml.scores``; "▁" for spaces, one prefixed to the text unless
  ``tokenizer.ggml.add_space_prefix`` is false.
- ``gpt2``: byte-level BPE over the tokens and ``tokenizer.ggml.merges``, the text split by the
  pre-tokenizer ``tokenizer.ggml.pre`` names (llama3, qwen2, ...; GPT-2's split otherwise).

Tokens typed control (3) become special tokens, user-defined ones (4) added tokens matched whole.
BOS is added when ``tokenizer.ggml.add_bos_token`` says so (default: yes for SentencePiece,
no for BPE), EOS when ``add_eos_token`` does. This is the construction transformers' own GGUF
loader makes (transformers.integrations.gguf), so both encode a text alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from plexus.checkpoint.gguf_file import open_gguf
from plexus.errors import PlexusError
from plexus.log import get_logger

CONTROL, USER_DEFINED = 3, 4

_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> the split its merges were learned on (others: GPT-2's own)
SPLITS = {"llama3": _LLAMA3, "llama-v3": _LLAMA3, "llama-bpe": _LLAMA3, "smaug-bpe": _LLAMA3, "dbrx": _LLAMA3,
          "falcon3": _LLAMA3, "pixtral": _LLAMA3, "tekken": _TEKKEN,
          "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2, "megrez": _QWEN2}
GPT2_PRE = ("default", "gpt2", "gpt-2", None)


@dataclass(frozen=True)
class GGUFVocab:
    tokenizer: Tokenizer
    bos_token: str | None
    eos_token: str | None
    bos_token_id: int | None
    eos_token_ids: frozenset[int]
    chat_template: str | None
    add_bos: bool


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE's alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """SentencePiece BPE: every split of a piece into two pieces is a merge, ranked by the
    piece's score (best first), ties by the parts' lengths then ids (as transformers derives them)."""
    merges = []
    for piece, score in scores.items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _list(meta: dict, key: str, path: Path, n: int | None = None) -> list:
    v = meta.get(key)
    if v is None:
        return []
    v = list(v.tolist() if hasattr(v, "tolist") else v)
    if n is not None and len(v) != n:
        raise PlexusError(f"{path}: metadata {key} has {len(v)} entries, expected one per token ({n})")
    return v


def _build(meta: dict, path: Path) -> tuple[Tokenizer, str]:
    model = meta.get("tokenizer.ggml.model")
    tokens = _list(meta, "tokenizer.ggml.tokens", path)
    if not tokens or not all(isinstance(t, str) for t in tokens):
        raise PlexusError(f"{path}: no tokenizer.ggml.tokens (strings) in the metadata; pass --tokenizer DIR")
    types = _list(meta, "tokenizer.ggml.token_type", path, len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in _list(meta, "tokenizer.ggml.merges", path)]
    if any(len(m) != 2 for m in merges):
        raise PlexusError(f"{path}: metadata tokenizer.ggml.merges holds an entry that is not two tokens")
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    if model == "llama":
        vocab = {t: i for i, t in enumerate(tokens)}
        if not merges:
            scores = _list(meta, "tokenizer.ggml.scores", path, len(tokens))
            if not scores:
                raise PlexusError(f"{path}: a SentencePiece vocabulary needs tokenizer.ggml.scores or merges")
            merges = _merges_from_scores(vocab, dict(zip(tokens, scores)))
        unk_token = tokens[unk] if isinstance(unk, int) and 0 <= unk < len(tokens) else None
        tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk_token, fuse_unk=True, byte_fallback=True))
        prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never",
                                                     split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    elif model == "gpt2":
        spell = _bytes_to_unicode()
        alphabet = set(spell.values())
        vocab = {(t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8"))): i
                 for i, t in enumerate(tokens)}
        tok = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="",
                            fuse_unk=False))
        pre = meta.get("tokenizer.ggml.pre")
        if pre in SPLITS:
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLITS[pre]), behavior="isolated"),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                  use_regex=False)])
        else:
            if pre not in GPT2_PRE:
                get_logger().warning(f"{path}: pre-tokenizer {pre!r} is not one Plexus knows; splitting text "
                                     "as GPT-2 does (pass --tokenizer DIR if encodings look wrong)")
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    else:
        raise PlexusError(f"{path}: tokenizer.ggml.model {model!r} is not supported (expected llama or gpt2); "
                          "pass --tokenizer DIR")
    spelled = set(_bytes_to_unicode().values()) if model == "gpt2" else None
    control = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types)
               if ty == CONTROL and (spelled is None or set(t) <= spelled)]
    tok.add_special_tokens(control)
    known = tok.get_vocab()
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types)
                    if ty == USER_DEFINED and t in known])
    return tok, model


def _token(meta: dict, key: str, tokens: list, path: Path) -> tuple[int | None, str | None]:
    i = meta.get(f"tokenizer.ggml.{key}")
    if i is None:
        return None, None
    if not isinstance(i, int) or not 0 <= i < len(tokens):
        raise PlexusError(f"{path}: metadata tokenizer.ggml.{key} = {i!r} is not a token id (0-{len(tokens) - 1})")
    return i, tokens[i]


@lru_cache(maxsize=2)
def _cached(path: str, size: int, mtime_ns: int) -> GGUFVocab:
    p = Path(path)
    meta = open_gguf(p).metadata
    tok, model = _build(meta, p)
    tokens = _list(meta, "tokenizer.ggml.tokens", p)
    bos_id, bos = _token(meta, "bos_token_id", tokens, p)
    eos_id, eos = _token(meta, "eos_token_id", tokens, p)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama")) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    special = [(t, i) for t, i, on in ((bos, bos_id, add_bos), (eos, eos_id, add_eos)) if on]
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(dict.fromkeys(special)))
    ends = {i for k in ("eos", "eot", "eom") for i in [_token(meta, f"{k}_token_id", tokens, p)[0]] if i is not None}
    template = meta.get("tokenizer.chat_template")
    return GGUFVocab(tok, bos, eos, bos_id, frozenset(ends), template if isinstance(template, str) else None, add_bos)


def gguf_vocab(path: str | Path) -> GGUFVocab:
    """The tokenizer, special tokens and chat template of GGUF file ``path`` (built once per
    process while the file is unchanged)."""
    st = Path(path).stat()
    return _cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
