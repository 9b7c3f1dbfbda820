"""The ``plexus`` command group: the commands, each imported only when used, and the one way a
usage error is reported.

Run under ``mpirun -n N plexus ...``; without mpirun a command runs as a world of one rank.
"""

from __future__ import annotations

import sys

import click

from plexus import __version__
from plexus.commands.common import DTYPE_CHOICE

USAGE_WAIT_S = 5.0  # how long a rank other than 0 waits before its usage-error exit


def report_usage_error(e: click.ClickException) -> None:
    """A bad option or config file, before MPI is up: one ``plexus: error:`` line (the one a
    user needs, first), from rank 0 alone when a launcher started several."""
    from plexus.parallel.comm import launcher_rank

    if launcher_rank() not in (None, 0):
        # exit after rank 0 rather than first: the launcher stops the job at the first exit, and
        # rank 0 (on a busy node still starting) must have printed its line by then
        import time

        time.sleep(USAGE_WAIT_S)
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

    lazy = {"generate": "plexus.commands.generate:generate", "serve": "plexus.commands.serve:serve",
            "plan": "plexus.commands.plan:plan", "bench": "plexus.commands.bench:bench",
            "perplexity": "plexus.commands.perplexity:perplexity",
            "quantize": "plexus.commands.quantize:quantize"}

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
