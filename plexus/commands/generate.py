"""``plexus generate``: prompts in (a flag or a JSONL file), completions out (streamed text or
JSON lines); rank 0 reads and writes, every rank computes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from plexus.commands.common import common_engine_options, tokenizer_option
from plexus.errors import PlexusError


def read_requests(tokenizer, prompt: str | None, prompts_file: str | None, chat: bool) -> list[dict]:
    """Rank 0: the prompts to run, each {"prompt": text, "ids": [...], maybe "messages"}."""
    if (prompt is None) == (prompts_file is None):
        raise PlexusError("give exactly one of --prompt or --prompts-file")
    records = []
    if prompt is not None:
        records.append({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
    else:
        path = Path(prompts_file)
        if not path.is_file():
            raise PlexusError(f"prompts file {path} does not exist")
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise PlexusError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not (isinstance(rec.get("prompt"), str) or "messages" in rec):
                raise PlexusError(f'{path}:{n}: expected {{"prompt": "..."}} or {{"messages": [...]}}')
            if chat and "prompt" in rec and "messages" not in rec:
                rec = {"messages": [{"role": "user", "content": rec["prompt"]}]}
            records.append(rec)
        if not records:
            raise PlexusError(f"prompts file {path} has no prompts")
    out = []
    for rec in records:
        if "messages" in rec:
            text = tokenizer.apply_chat_template(rec["messages"])
            out.append({"prompt": text, "messages": rec["messages"], "ids": tokenizer.encode(text, False)})
        else:
            out.append({"prompt": rec["prompt"], "ids": tokenizer.encode(rec["prompt"])})
    return out


def check_output_path(output: str | None) -> None:
    """--output can be written: checked before loading, while an existing file there is left as
    it is until the model has loaded and the prompts start to run."""
    if output is None:
        return
    path = Path(output)
    if path.is_dir():
        raise PlexusError(f"--output {output} is a directory")
    parent = path.parent
    if not parent.is_dir():
        raise PlexusError(f"--output {output}: directory {parent} does not exist")
    if not os.access(path if path.exists() else parent, os.W_OK):
        raise PlexusError(f"--output {output} is not writable")


def run_generate(rt, model, prompt, prompts_file, chat, params, dtype, max_context, as_json, output,
                 split="memory", max_memory=None, quantize=None, quant_group=128, tokenizer_dir=None,
                 max_batch: int = 16, kv_tokens: int | None = None) -> int:
    from plexus.engine.engine import Engine, check_prompts
    from plexus.engine.runtime import load_progress, log_rank_table, resolve_model_dir
    from plexus.engine.tokenizer import load_tokenizer
    from plexus.engine.source import load_config

    comm, log = rt.comm, rt.log
    error, tokenizer, requests, model_dir = None, None, None, None
    try:
        model_dir = resolve_model_dir(model, comm)
        if comm.rank == 0:  # everything the config and tokenizer decide, before any weight
            check_output_path(output)
            config = load_config(model_dir)
            tokenizer = load_tokenizer(model_dir, tokenizer_dir, config.vocab_size)
            requests = read_requests(tokenizer, prompt, prompts_file, chat)
            check_prompts([r["ids"] for r in requests], params.max_tokens, config, max_context, kv_tokens)
    except PlexusError as e:
        error = str(e)
    comm.agree(error)
    batch = min(max_batch, comm.bcast_obj(len(requests) if comm.rank == 0 else None))  # the same on every rank

    with load_progress(rt, model_dir) as progress:
        engine = Engine.load(model_dir, comm, dtype, rt.device, max_context,
                             eos_token_ids=tokenizer.eos_token_ids if tokenizer else frozenset(), progress=progress,
                             split=split, max_memory=max_memory, quantize=quantize, quant_group=quant_group,
                             max_batch=batch, kv_tokens=kv_tokens)
    log_rank_table(rt, engine)
    if comm.rank != 0:
        engine.worker_loop()
        return 0
    log.info(f"loaded {model_dir} on {comm.size} rank(s)")
    try:
        _run_requests(engine, tokenizer, requests, params, as_json, output)
    except PlexusError as e:
        engine.shutdown(error=str(e))
        raise
    engine.shutdown()
    return 0


def _run_requests(engine, tokenizer, requests, params, as_json, output) -> None:
    """Rank 0: run the prompts (checked before loading) batched (engine/batch.py: up to
    --max-batch at once, as many as the KV cache holds), streaming plain text for one prompt,
    otherwise writing each completion in the input's order as soon as it and those before it are
    done."""
    from plexus.engine.batch import BatchRunner

    stream = not as_json and not output and len(requests) == 1
    on_text = (lambda s: (sys.stdout.write(s), sys.stdout.flush())) if stream else None
    sink = open(output, "w") if output else sys.stdout
    runner, results, written, todo = BatchRunner(engine, tokenizer), {}, 0, list(enumerate(requests))[::-1]
    try:
        while todo or runner.running:
            while todo and runner.room:
                n, req = todo[-1]
                if runner.add(req["ids"], params, on_text=on_text, tag=n) is None:
                    break  # the KV cache is promised to those running: after a step
                todo.pop()
            for seq in runner.step():
                results[seq.tag] = seq.result
            while written in results:
                _write(sink, requests[written], results.pop(written), as_json or output, stream)
                written += 1
    finally:
        runner.close()
        if output:
            sink.close()


def _write(sink, req, result, as_record, stream) -> None:
    if stream:
        sink.write("\n")
    elif as_record:
        record = {"prompt": req["prompt"], "prompt_token_ids": result.prompt_token_ids,
                  "token_ids": result.token_ids, "text": result.text, "finish_reason": result.finish_reason}
        if "messages" in req:
            record["messages"] = req["messages"]
        sink.write(json.dumps(record, ensure_ascii=False) + "\n")
    else:
        sink.write(result.text + "\n")
    sink.flush()


@click.command()
@common_engine_options
@click.option("--prompt", default=None, help="Prompt text.")
@click.option("--prompts-file", default=None, help='JSONL: {"prompt": ...} or {"messages": [...]} per line.')
@click.option("--chat", is_flag=True, help="Wrap --prompt in the model's chat template as a user message.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="0 is greedy.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 = no limit.")
@click.option("--seed", type=int, default=None, help="Sampling seed: same tokens at every world size.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per prompt on stdout.")
@click.option("--output", default=None, help="Write JSON lines to this file instead of stdout.")
@click.option("--max-batch", type=click.IntRange(min=1), default=16, show_default=True,
              help="Prompts of --prompts-file generated at once (fewer while the KV cache holds fewer).")
@click.option("--kv-tokens", type=click.IntRange(min=1), default=None,
              help="Tokens of KV cache, shared by the batch (default: max-context x max-batch, or what the "
                   "memory holds beside the weights).")
@tokenizer_option
def generate(model, dtype, device, threads, max_context, split, max_memory, verbose, prompt, prompts_file, chat,
             max_tokens, temperature, top_p, top_k, seed, stop, as_json, output, max_batch, kv_tokens, quantize,
             quant_group, tokenizer_dir):
    """Generate text from a prompt or a JSONL file of prompts (run under mpirun)."""
    from plexus.engine.runtime import run_guarded, start
    from plexus.engine.sampling import SamplingParams

    state = {}

    def body():
        rt = state["rt"] = start(device, threads, verbose)
        params = SamplingParams(max_tokens, temperature, top_p, top_k, seed, tuple(stop))
        return run_generate(rt, model, prompt, prompts_file, chat, params, dtype, max_context, as_json, output,
                            split, max_memory, quantize, quant_group, tokenizer_dir, max_batch, kv_tokens)

    run_guarded(body, lambda: state["rt"].comm if "rt" in state else None)
