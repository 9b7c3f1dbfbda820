"""``plexus perplexity``: how well a model (in a dtype, maybe quantized) predicts a text, the
number to compare when choosing a quantization (as llama.cpp's perplexity tool is used).

The token stream is BOS (when the model has one) followed by the text's tokens without special
tokens. It is cut into consecutive, non-overlapping windows of ``--context`` tokens (a last
window of one token is dropped: it has nothing to predict). Each window is a fresh sequence from
position 0, scored on every token but its first: perplexity = exp(sum of -log p / tokens scored).
Rank 0 reads and checks the text before any weight is read; every rank computes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from plexus.commands.common import common_engine_options, tokenizer_option
from plexus.errors import PlexusError


def read_token_stream(tokenizer, text_file: str) -> list[int]:
    """Rank 0: BOS (if any) + the tokens of ``text_file``'s text; at least two tokens."""
    path = Path(text_file)
    if not path.exists():
        raise PlexusError(f"text file {path} does not exist")
    if path.is_dir():
        raise PlexusError(f"text file {path} is a directory")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PlexusError(f"text file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise PlexusError(f"cannot read text file {path}: {e.strerror}") from None
    if not text.strip():
        raise PlexusError(f"text file {path} is empty")
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    ids = bos + tokenizer.encode(text, False)
    if len(ids) < 2:
        raise PlexusError(f"text file {path} gives {len(ids)} token(s){' with BOS' if bos else ''}; "
                          "perplexity needs at least 2")
    return ids


def window_length(config, context: int | None, max_context: int | None) -> tuple[int, int]:
    """(window length, KV-cache length) from --context and --max-context, checked against the
    model's positions before any weight is read. Without --context a window is the whole cache
    (min(model's positions, 4096) unless --max-context); without --max-context the cache is one
    window long."""
    from plexus.engine.engine import context_length

    positions = config.max_position_embeddings
    if context is not None:
        if context < 2:
            raise PlexusError(f"--context must be at least 2 tokens (one to predict from, one to predict), "
                              f"got {context}")
        if context > positions:
            raise PlexusError(f"--context {context} is beyond this model's {positions} positions "
                              "(max_position_embeddings in its config.json)")
    cache = context_length(config, max_context or context)
    window = context or cache
    if window > cache:
        raise PlexusError(f"--context {window} is longer than --max-context {cache}")
    if window < 2:
        raise PlexusError(f"a window of {window} token(s) has nothing to score: give --context 2 or more")
    return window, cache


def windows(ids: list[int], length: int) -> list[list[int]]:
    """Consecutive, non-overlapping windows of ``length`` tokens (the last may be shorter; one of a
    single token is dropped, as it has nothing to predict)."""
    out = [ids[i:i + length] for i in range(0, len(ids), length)]
    return [w for w in out if len(w) >= 2]


def run_perplexity(rt, model, text_file, context, dtype, max_context, as_json, split="memory",
                   max_memory=None, quantize=None, quant_group=128, tokenizer_dir=None) -> int:
    from plexus.engine.engine import Engine
    from plexus.engine.runtime import load_progress, log_rank_table, resolve_model_dir
    from plexus.engine.tokenizer import load_tokenizer
    from plexus.engine.source import load_config

    comm, log = rt.comm, rt.log
    error, chunks, window, model_dir = None, None, 0, None
    try:
        model_dir = resolve_model_dir(model, comm)
        if comm.rank == 0:  # everything the config, the tokenizer and the text decide, before any weight
            config = load_config(model_dir)
            window, _ = window_length(config, context, max_context)
            ids = read_token_stream(load_tokenizer(model_dir, tokenizer_dir, config.vocab_size), text_file)
            bad = [i for i in ids if not 0 <= i < config.vocab_size]
            if bad:
                raise PlexusError(f"token id {bad[0]} of {text_file} is outside the model's vocabulary "
                                  f"(size {config.vocab_size}): a tokenizer of another model?")
            chunks = windows(ids, window)
    except PlexusError as e:
        error = str(e)
    comm.agree(error)

    with load_progress(rt, model_dir) as progress:  # the KV cache: one window, unless --max-context
        engine = Engine.load(model_dir, comm, dtype, rt.device, max_context or context, progress=progress, split=split,
                             max_memory=max_memory, quantize=quantize, quant_group=quant_group)
    log_rank_table(rt, engine)
    if comm.rank != 0:
        engine.worker_loop()
        return 0
    log.info(f"loaded {model_dir} on {comm.size} rank(s); scoring {sum(map(len, chunks))} tokens "
             f"in {len(chunks)} window(s) of up to {window}")
    try:
        nll, count = 0.0, 0
        for chunk in chunks:
            s, n = engine.score(chunk)
            nll, count = nll + s, count + n
    except PlexusError as e:
        engine.shutdown(error=str(e))
        raise
    engine.shutdown()
    ppl = math.exp(nll / count)
    if as_json:
        click.echo(json.dumps({"perplexity": ppl, "tokens": count, "windows": len(chunks), "context": window}))
    else:
        click.echo(f"perplexity {ppl:.4f} over {count} tokens ({len(chunks)} window(s) of up to {window} tokens)")
    return 0


@click.command()
@common_engine_options
@click.option("--text-file", required=True, help="UTF-8 text to score (BOS is put before it).")
@click.option("--context", type=int, default=None,
              help="Tokens per window (default: the KV cache's length, --max-context or min(model's, 4096)).")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"perplexity": ..., "tokens": ..., "windows": ..., "context": ...}.')
@tokenizer_option
def perplexity(model, dtype, device, threads, max_context, split, max_memory, verbose, quantize, quant_group,
               text_file, context, as_json, tokenizer_dir):
    """Perplexity of a text under the model, in windows of --context tokens (run under mpirun)."""
    from plexus.engine.runtime import run_guarded, start

    state = {}

    def body():
        rt = state["rt"] = start(device, threads, verbose)
        return run_perplexity(rt, model, text_file, context, dtype, max_context, as_json, split, max_memory,
                              quantize, quant_group, tokenizer_dir)

    run_guarded(body, lambda: state["rt"].comm if "rt" in state else None)
