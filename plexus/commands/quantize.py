"""``plexus quantize``: a 16/32-bit Hugging Face checkpoint in, a compressed-tensors
``pack-quantized`` checkpoint out (one process, no MPI), which Plexus, vLLM, transformers and
compressed-tensors itself load.

Each decoder-layer linear weight (q/k/v/o_proj, gate/up/down_proj) is quantized with
plexus.quant.qweight.quantize, round to nearest per row and group of input columns: --bits 8 is
symmetric (compressed-tensors' W8A16 style, no zero points), --bits 4 asymmetric (W4A16_ASYM
style, packed zero points). Embeddings, norms, biases and the LM head are copied as they are.
The codes, float16 scales and zero points are Plexus's own, so the written checkpoint reloads
(through plexus.checkpoint.hf_quant) as exactly the model ``--quantize int4|int8`` builds.

What cannot be written: a weight holding inf or NaN (no integer code stands for it), a group whose
scale exceeds float16's range (|w| above about 8.3e6 at 8 bits, 9.8e5 at 4 bits), and a --group
that does not divide a layer's input width (compressed-tensors stores whole groups only) are
errors. Groups of tiny weights whose scale falls below float16's normal range keep only the
scale's subnormal precision; a group whose scale rounds to zero is stored as zeros.

The tensors are read one at a time (plexus.checkpoint.reader) and written in shards of about
2 GiB into a temporary directory beside --out, renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import click
import torch

from plexus.errors import PlexusError

LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                "added_tokens.json", "vocab.json", "merges.txt", "tiktoken.model", "chat_template.jinja",
                "chat_template.json", "generation_config.json")
SHARD_BYTES = 2 * 2**30
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@click.command("quantize")
@click.option("--model", required=True, help="Hugging Face model directory (bf16, fp16 or fp32 safetensors).")
@click.option("--out", required=True, help="Directory to write to (must not exist, or be empty).")
@click.option("--bits", type=click.Choice(["4", "8"]), required=True,
              help="4: asymmetric, with zero points; 8: symmetric.")
@click.option("--group", type=int, default=128, show_default=True,
              help="Input columns per group of scales (a multiple of 32 for 4 bits, of 16 for 8 bits, "
                   "dividing every layer's input width), or -1 for one group per row.")
def quantize(model, out, bits, group):
    """Write a compressed-tensors pack-quantized copy of a checkpoint (round to nearest)."""
    from plexus.engine.runtime import run_guarded

    def body():
        s = quantize_checkpoint(model, out, int(bits), group)
        click.echo(f"wrote {bits}-bit compressed-tensors checkpoint ({'channel' if group == -1 else f'group {group}'}) "
                   f"to {s['out']}: {s['quantized']} linear weights quantized, {s['bytes_in']:,} -> "
                   f"{s['bytes_out']:,} bytes", err=True)
        return 0

    run_guarded(body, lambda: None)


def check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PlexusError(f"--out {out} already exists and is not an empty directory")
    if not out.parent.is_dir():
        raise PlexusError(f"--out {out}: directory {out.parent} does not exist")


def quantize_checkpoint(model_dir: str | Path, out_dir: str | Path, bits: int, group: int) -> dict:
    """Write the quantized checkpoint; returns a summary for the command's last line."""
    from plexus.checkpoint.ct_pack import compress, quantization_config
    from plexus.checkpoint.reader import CheckpointReader
    from plexus.models.config import ModelConfig
    from plexus.quant.qweight import check_group

    if bits not in (4, 8):
        raise PlexusError(f"--bits {bits} is not supported (supported: 4, 8)")
    if group != -1:
        check_group(bits, group, "--group")
    model_dir, out = Path(model_dir), Path(out_dir)
    config = ModelConfig.from_dir(model_dir)
    raw = json.loads((model_dir / "config.json").read_text())
    if raw.get("quantization_config"):
        method = raw["quantization_config"].get("quant_method", "?") if isinstance(raw["quantization_config"], dict) \
            else "?"
        raise PlexusError(f"{model_dir / 'config.json'}: the checkpoint is already quantized ({method}); "
                          "plexus quantize reads bf16, fp16 or fp32 checkpoints")
    check_out_dir(out)
    reader = CheckpointReader(model_dir, config)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        summary = _write(reader, tmp, bits, None if group == -1 else group, compress)
        raw["quantization_config"] = quantization_config(bits, None if group == -1 else group, bits == 8, ["lm_head"])
        with open(tmp / "config.json", "w") as f:
            json.dump(raw, f, indent=2, sort_keys=True)
        for name in COPIED_FILES:
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, tmp / name)
        from plexus.files import apply_umask

        apply_umask(tmp)
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**summary, "out": str(out)}


def _write(reader, tmp: Path, bits: int, group: int | None, compress) -> dict:
    from safetensors.torch import save_file

    from plexus.quant.qweight import quantize

    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    files: list[Path] = []
    count, bytes_in, bytes_out = 0, 0, 0

    def flush():
        if shards[-1]:
            path = tmp / f"shard-{len(files)}.tmp"
            save_file(shards[-1], str(path), metadata={"format": "pt"})
            files.append(path)
            shards[-1], sizes[0] = {}, 0

    def add(name: str, t: torch.Tensor):
        nonlocal bytes_out
        t = t.contiguous()
        n = t.numel() * t.element_size()
        if sizes[0] and sizes[0] + n > SHARD_BYTES:
            flush()
        shards[-1][name] = t
        sizes[0] += n
        bytes_out += n

    names = [n for f in reader.files for n, (p, _) in reader.location.items() if p == f]
    for name in names:  # before any weight is read
        path, shape = reader.location[name]
        if LINEAR.match(name) and group is not None and shape[1] % group:
            raise PlexusError(f"{path.name}: tensor {name} has {shape[1]} input columns, which --group {group} "
                              "does not divide (compressed-tensors stores whole groups); choose a group dividing "
                              "every layer's input width, or -1")
    for name in names:
        t = reader.read(name)
        bytes_in += t.numel() * t.element_size()
        if not LINEAR.match(name):
            add(name, t)
            continue
        path = reader.location[name][0].name
        if t.dtype not in FLOATS:
            raise PlexusError(f"{path}: tensor {name} is {t.dtype}; plexus quantize reads bf16, fp16 or fp32 weights")
        cols = t.shape[1]
        if not torch.isfinite(t).all():
            raise PlexusError(f"{path}: tensor {name} holds inf or NaN values, which no integer code can hold")
        qw = quantize(t, bits, group or cols)
        if not torch.isfinite(qw.scales).all():
            raise PlexusError(f"{path}: tensor {name} holds values (up to {t.abs().max().item():.4g}) whose "
                              "quantization scales exceed float16's range, which compressed-tensors' float16 "
                              "scales cannot hold")
        prefix = name[: -len(".weight")]
        for k, v in compress(qw, symmetric=bits == 8).items():
            add(f"{prefix}.{k}", v)
        count += 1
        del t, qw
    flush()
    _name_shards(tmp, files, bytes_out)
    return {"quantized": count, "bytes_in": bytes_in, "bytes_out": bytes_out}


def _name_shards(tmp: Path, files: list[Path], total: int) -> None:
    from safetensors import safe_open

    if len(files) == 1:
        files[0].rename(tmp / "model.safetensors")
        return
    weight_map = {}
    for i, f in enumerate(files, 1):
        final = tmp / f"model-{i:05d}-of-{len(files):05d}.safetensors"
        f.rename(final)
        with safe_open(str(final), framework="pt") as st:
            weight_map.update({k: final.name for k in st.keys()})
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
