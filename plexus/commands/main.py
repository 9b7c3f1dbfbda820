"""The ``plexus`` command line: thin click commands over plain functions.

Run under ``mpirun -n N plexus ...``; without mpirun a command runs as a world of one rank.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from plexus import __version__
from plexus.errors import PlexusError
from plexus.commands.config_file import config_option

DTYPE_CHOICE = click.Choice(["float32", "bfloat16", "float16"])


def common_engine_options(f=None, *, model_default: str = "the embedded tiny demo model"):
    """Options every command that loads a model shares (``model_default``: what runs without
    --model, for its help)."""
    if f is None:
        return lambda g: common_engine_options(g, model_default=model_default)
    for opt in reversed([
        click.option("--model", "model", type=str, default=None,
                     help=f"Hugging Face model directory (default: {model_default})."),
        click.option("--dtype", type=DTYPE_CHOICE, default=None, help="Compute dtype (default: the checkpoint's)."),
        click.option("--device", default="auto", show_default=True,
                     help="auto, cpu, cuda[:i], mps or xpu[:i] (auto: by node-local rank)."),
        click.option("--threads", type=int, default=None,
                     help="CPU threads per rank (default: cores on the node / ranks on the node)."),
        click.option("--max-context", type=int, default=None,
                     help="Context length to preallocate the KV cache for (default: min(model's, 4096))."),
        click.option("--split", default="memory", show_default=True,
                     help="How to share the layers among ranks: even, memory (by each rank's --max-memory, "
                          "else its usable memory) or per-rank weights W1,W2,..."),
        click.option("--max-memory", default=None,
                     help="Memory budget for weights + KV cache: one size for every rank (6GiB) or one per "
                          "rank (12GiB,8GiB,6GiB); units B, KiB, MiB, GiB, TiB (powers of 1024) or KB, MB, "
                          "GB, TB (powers of 1000)."),
        click.option("-v", "--verbose", is_flag=True, help="More log output."),
    ]):
        f = opt(f)
    return config_option(f)  # --config: listed first in --help, read before the other options


def report_usage_error(e: click.ClickException) -> None:
    """A bad option or config file, before MPI is up: one ``plexus: error:`` line (the one a
    user needs, first), from rank 0 alone when a launcher started several."""
    from plexus.parallel.comm import launcher_rank

    if launcher_rank() not in (None, 0):
        return
    if isinstance(e, getattr(click.exceptions, "NoArgsIsHelpError", ())):  # bare `plexus`: the help
        e.show()
        return
    hint = ""
    ctx = getattr(e, "ctx", None)
    if isinstance(e, click.UsageError) and ctx is not None:
        hint = f" (see '{ctx.command_path} --help')"
    message = " ".join(e.format_message().split())
    click.echo(f"plexus: error: {message}{hint}", err=True)


class LazyGroup(click.Group):
    """Commands that live in their own modules are imported only when used, so that
    ``plexus generate`` does not pay for importing the HTTP server. Usage errors are reported
    by report_usage_error instead of click's three lines on every rank."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as e:
            if not standalone_mode:
                raise
            report_usage_error(e)
            sys.exit(e.exit_code)
        except click.Abort:
            if not standalone_mode:
                raise
            click.echo("plexus: aborted", err=True)
            sys.exit(1)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)

    lazy = {"serve": "plexus.serve.app:serve", "plan": "plexus.parallel.pool:plan", "bench": "plexus.bench.runner:bench"}

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx, name):
        if name in self.lazy:
            import importlib

            module, attr = self.lazy[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="plexus")
def main():
    """Plexus: pool several devices' memory to run one language model (tensor parallel over MPI)."""


# ---- generate ----------------------------------------------------------------------------------

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


def check_requests(requests: list[dict], max_tokens: int, config, max_context: int | None) -> None:
    """Rank 0, before any weight is read: every prompt fits the context and the vocabulary."""
    from plexus.engine.engine import check_request, context_length

    ctx = context_length(config, max_context)
    for n, req in enumerate(requests, 1):
        try:
            check_request(req["ids"], max_tokens, ctx, config.vocab_size)
        except PlexusError as e:
            raise PlexusError(f"prompt {n}: {e}" if len(requests) > 1 else str(e)) from None


def check_output_path(output: str | None) -> None:
    """--output can be written (checked before loading; an existing file is left as it is until
    the first result is ready)."""
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
                 split="memory", max_memory=None) -> int:
    from plexus.models.config import ModelConfig
    from plexus.engine.engine import Engine
    from plexus.engine.runtime import load_progress, log_rank_table, resolve_model_dir
    from plexus.engine.tokenizer import Tokenizer

    comm, log = rt.comm, rt.log
    error, tokenizer, requests, model_dir = None, None, None, None
    try:
        model_dir = resolve_model_dir(model, comm)
        if comm.rank == 0:  # everything the config and tokenizer decide, before any weight
            check_output_path(output)
            config = ModelConfig.from_dir(model_dir)
            tokenizer = Tokenizer(model_dir)
            requests = read_requests(tokenizer, prompt, prompts_file, chat)
            check_requests(requests, params.max_tokens, config, max_context)
    except PlexusError as e:
        error = str(e)
    comm.agree(error)

    with load_progress(rt, model_dir) as progress:
        engine = Engine.load(model_dir, comm, dtype, rt.device, max_context,
                             eos_token_ids=tokenizer.eos_token_ids if tokenizer else frozenset(), progress=progress,
                             split=split, max_memory=max_memory)
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
    """Rank 0: run the prompts (checked before loading) in order, streaming plain text or
    writing one JSON line per prompt as soon as it is done."""
    stream = not as_json and not output
    on_text = (lambda s: (sys.stdout.write(s), sys.stdout.flush())) if stream else None
    sink = open(output, "w") if output else sys.stdout
    try:
        for req in requests:
            result = engine.complete(tokenizer, req["ids"], params, on_text=on_text)
            if stream:
                sink.write("\n")
            else:
                record = {"prompt": req["prompt"], "prompt_token_ids": result.prompt_token_ids,
                          "token_ids": result.token_ids, "text": result.text,
                          "finish_reason": result.finish_reason}
                if "messages" in req:
                    record["messages"] = req["messages"]
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
            sink.flush()
    finally:
        if output:
            sink.close()


@main.command()
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
def generate(model, dtype, device, threads, max_context, split, max_memory, verbose, prompt, prompts_file, chat,
             max_tokens,
             temperature, top_p, top_k, seed, stop, as_json, output):
    """Generate text from a prompt or a JSONL file of prompts (run under mpirun)."""
    from plexus.engine.runtime import run_guarded, start
    from plexus.engine.sampling import SamplingParams

    state = {}

    def body():
        rt = state["rt"] = start(device, threads, verbose)
        params = SamplingParams(max_tokens, temperature, top_p, top_k, seed, tuple(stop))
        return run_generate(rt, model, prompt, prompts_file, chat, params, dtype, max_context, as_json, output,
                            split, max_memory)

    run_guarded(body, lambda: state["rt"].comm if "rt" in state else None)


# ---- demo-model ---------------------------------------------------------------------------------

@main.command("demo-model")
@click.option("--out", required=True, help="Directory to write the checkpoint to.")
@click.option("--preset", type=click.Choice(["tiny", "small", "bench"]), default="tiny", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dtype", type=DTYPE_CHOICE, default="float32", show_default=True)
def demo_model(out, preset, seed, dtype):
    """Write a Llama-architecture checkpoint with seeded random weights and a trained tokenizer."""
    from plexus.checkpoint.demo import write_demo_model

    path = write_demo_model(out, preset=preset, seed=seed, dtype=dtype)
    click.echo(f"wrote {preset} demo model to {path}", err=True)
