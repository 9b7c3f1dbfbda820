"""``plexus bench``: the options; plexus.bench.runner does the work on every rank."""

from __future__ import annotations

import json

import click

from plexus.bench.probes import PROBE_MIB
from plexus.bench.report import format_report
from plexus.bench.runner import run_bench
from plexus.commands.common import common_engine_options

@click.command()
@common_engine_options(model_default="the 'bench' demo preset, see --preset")
@click.option("--preset", type=click.Choice(["tiny", "small", "bench"]), default=None,
              help="Bench a demo model (written once into the cache); the default without --model is 'bench' "
                   "(~250M parameters).")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--new-tokens", type=click.IntRange(min=2), default=128, show_default=True)
@click.option("--baseline", type=click.Choice(["transformers"]), default=None,
              help="Also run the same generation through this library on rank 0, for a ratio.")
@click.option("--vs-one-rank", is_flag=True,
              help="Under mpirun: also decode with the whole model on rank 0 alone (every core of its node), in "
                   "blocks alternating with the pooled engine's, for a same-run ratio. Rank 0 must have room for "
                   "the whole model as well as its shard.")
@click.option("--probe-mib", type=click.IntRange(min=1), default=PROBE_MIB, show_default=True,
              help="Size of each rank's bandwidth-probe matrix.")
@click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True,
              help="Also decode this many streams at once in one continuous batch, for the aggregate tok/s and its "
                   "ratio to one stream.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench(model, dtype, device, threads, max_context, split, max_memory, verbose, preset, prompt_tokens,
          new_tokens, baseline, vs_one_rank, probe_mib, concurrency, as_json, quantize, quant_group):
    """Measure load time, time to first token, prefill and decode speed, memory, and decode's
    fraction of the memory-bandwidth floor (run under mpirun for several ranks). Without --model
    or --preset it benches the 'bench' demo model. See docs/benchmarks.md."""
    from plexus.engine.runtime import run_guarded, start

    state = {}

    def body():
        rt = state["rt"] = start(device, threads, verbose)
        report = run_bench(rt, model, preset, prompt_tokens, new_tokens, dtype, max_context, baseline, probe_mib,
                           split, max_memory, vs_one_rank, quantize, quant_group, concurrency)
        if report is not None:
            click.echo(json.dumps(report) if as_json else format_report(report))
        return 0

    run_guarded(body, lambda: state["rt"].comm if "rt" in state else None)
