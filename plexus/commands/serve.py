"""``plexus serve``: the options; plexus.serve.lifecycle does the rest on every rank."""

from __future__ import annotations

import click

from plexus.commands.common import common_engine_options, tokenizer_option
from plexus.serve.app import DEFAULT_MAX_BODY

@click.command()
@common_engine_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (rank 0).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to listen on; 0 picks a free one (the startup line shows it).")
@click.option("--api-key", envvar="PLEXUS_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1/* (default: $PLEXUS_API_KEY; none: open).")
@click.option("--served-model-name", default=None, help="Model id clients send (default: the directory's name).")
@click.option("--cors-origin", "cors_origins", multiple=True,
              help="A browser origin allowed to call the API (repeatable; '*' for any); default: none (CORS off).")
@click.option("--max-body-bytes", type=click.IntRange(min=1024), default=DEFAULT_MAX_BODY, show_default=True,
              help="Larger request bodies get 413.")
@click.option("--max-batch", type=click.IntRange(min=1), default=16, show_default=True,
              help="Sequences generated at once (continuous batching), as many as the KV cache holds.")
@click.option("--kv-tokens", type=click.IntRange(min=1), default=None,
              help="Tokens of KV cache, shared by all sequences in blocks of 16 (default: max-context x max-batch, "
                   "or what the memory holds beside the weights).")
@click.option("--prefix-cache/--no-prefix-cache", default=True, show_default=True,
              help="Keep prompts' KV blocks for later requests that start with the same tokens.")
@click.option("--max-queue", type=click.IntRange(min=0), default=64, show_default=True,
              help="Requests that may wait for a place in the batch; past them, 429 with Retry-After.")
@click.option("--queue-timeout", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True,
              help="Seconds a request may wait for a place in the batch; then 503.")
@click.option("--prefill-chunk", type=click.IntRange(min=1), default=32, show_default=True,
              help="Prompt tokens a step adds while other requests stream (bounds their slow-down); a multiple "
                   "of 16.")
@click.option("--http-threads", type=click.IntRange(min=8), default=None,
              help="HTTP worker threads; each running or waiting request holds one, 4 stay free for /health "
                   "(default and least: max-batch + max-queue + 4).")
@click.option("--drain-timeout", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="On a drain (SIGTERM/SIGINT to rank 0 or launch/serve.sh, SIGUSR1 to mpirun), seconds "
                   "to finish in-flight requests before cancelling them.")
@click.option("--stall-timeout", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="Declare the mesh dead when a step makes no progress this long (0: never).")
@tokenizer_option
def serve(model, dtype, device, threads, max_context, split, max_memory, verbose, host, port, api_key,
          served_model_name, cors_origins, max_body_bytes, max_batch, kv_tokens, prefix_cache, max_queue, queue_timeout,
          prefill_chunk, http_threads, drain_timeout, stall_timeout, quantize, quant_group, tokenizer_dir):
    """Serve an OpenAI-compatible HTTP API from rank 0 (run under mpirun; see docs/api.md)."""
    from plexus.engine.runtime import run_guarded, start
    from plexus.serve.lifecycle import ServeOptions, run_serve

    if prefill_chunk % 16:
        raise click.UsageError(f"--prefill-chunk {prefill_chunk} is not a multiple of 16 (the KV cache's block)")
    least = max_batch + max_queue + 4
    if http_threads is not None and http_threads < least:
        raise click.UsageError(f"--http-threads {http_threads} is fewer than --max-batch + --max-queue + 4 = {least} "
                               "(each running or waiting request holds a thread)")

    opts = ServeOptions(model=model, dtype=dtype, max_context=max_context, split=split, max_memory=max_memory,
                        host=host, port=port, api_key=api_key or None, served_model_name=served_model_name,
                        max_body_bytes=max_body_bytes, http_threads=http_threads or least, drain_timeout=drain_timeout,
                        stall_timeout=stall_timeout, quantize=quantize, quant_group=quant_group,
                        tokenizer=tokenizer_dir, max_batch=max_batch, max_queue=max_queue,
                        queue_timeout=queue_timeout, prefill_chunk=prefill_chunk, kv_tokens=kv_tokens,
                        prefix_cache=prefix_cache, cors_origins=tuple(cors_origins))
    state = {}

    def body():
        from plexus.serve.lifecycle import install_signal_handlers

        signals = install_signal_handlers()  # first: a signal during start-up must not kill a rank
        rt = state["rt"] = start(device, threads, verbose)
        return run_serve(rt, opts, signals)

    run_guarded(body, lambda: state["rt"].comm if "rt" in state else None)
