"""What every command that loads a model shares: its options (--config first)."""

from __future__ import annotations

import click

from plexus.commands.config_file import config_option

DTYPE_CHOICE = click.Choice(["float32", "bfloat16", "float16"])


def tokenizer_option(f):
    """--tokenizer, for the commands that turn text into tokens."""
    return click.option("--tokenizer", "tokenizer_dir", default=None,
                        help="Tokenizer to use instead of the model's own: a Hugging Face directory with a "
                             "tokenizer.json, or a .gguf file (default: --model's, or a GGUF file's metadata).")(f)


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
        click.option("--quantize", type=click.Choice(["int8", "int4"]), default=None,
                     help="Quantize a 16/32-bit checkpoint's layer weights as it loads (round to nearest, "
                          "groups along the input); the compute dtype stays --dtype. See docs/quantization.md."),
        click.option("--quant-group", type=click.IntRange(min=16), default=128, show_default=True,
                     help="Input columns per quantization group for --quantize (a multiple of 32 for int4, of 16 "
                          "for int8; a smaller group splits over more ranks)."),
        click.option("-v", "--verbose", is_flag=True, help="More log output."),
    ]):
        f = opt(f)
    return config_option(f)  # --config: listed first in --help, read before the other options
