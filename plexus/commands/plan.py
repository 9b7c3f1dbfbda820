"""``plexus plan``: how a model would split over a pool, and whether it fits, offline from
config.json and the safetensors headers (no MPI, no weights)."""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from plexus.errors import PlexusError
from plexus.models.config import ModelConfig
from plexus.parallel.pool import PoolPlan, plural
from plexus.parallel.sizes import _SIZE, DTYPE_BYTES, format_size, parse_budgets, parse_size

SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


@dataclass
class CheckpointInfo:
    files: int
    bytes: int
    parameters: int
    dtype: str | None  # the dtype most parameters are stored in, as a torch name


def read_checkpoint_info(model_dir: Path) -> CheckpointInfo | None:
    """Sizes from the safetensors headers only (no tensor data); None if there are no weights."""
    if not list(model_dir.glob("*.safetensors")) and not (model_dir / "model.safetensors.index.json").is_file():
        return None
    from plexus.checkpoint.reader import checkpoint_files, read_header

    files = checkpoint_files(model_dir)
    by_dtype: dict[str, int] = {}
    nbytes = 0
    for f in files:
        for info in read_header(f).values():
            n = math.prod(info["shape"])
            by_dtype[info["dtype"]] = by_dtype.get(info["dtype"], 0) + n
            nbytes += info["data_offsets"][1] - info["data_offsets"][0]
    main = max(by_dtype, key=by_dtype.get) if by_dtype else None
    return CheckpointInfo(len(files), nbytes, sum(by_dtype.values()), SAFETENSORS_DTYPES.get(main))


def parse_rank_spec(spec: str) -> list[tuple[str, int | None]]:
    """--ranks: 'cuda:0=8GiB,cuda:1=6GiB,cpu=16GiB', '3x8GiB', '8GiB,6GiB', or a count '3'."""
    spec = spec.strip()
    if spec.isdigit():
        if int(spec) < 1:
            raise PlexusError("--ranks must name at least one rank")
        return [("", None)] * int(spec)
    out: list[tuple[str, int | None]] = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            raise PlexusError(f"--ranks has an empty entry: {spec!r}")
        m = re.match(r"^(\d+)\s*[x*]\s*(.+)$", item)
        if m:
            out += parse_rank_spec(m.group(2)) * int(m.group(1))
        elif "=" in item:
            label, size = item.split("=", 1)
            out.append((label.strip(), parse_size(size)))
        elif _SIZE.match(item):
            out.append(("", parse_size(item)))
        else:
            out.append((item, None))  # a device with no size: nothing to check it against
    sized = [label for label, size in out if size is not None]
    if sized and len(sized) != len(out):
        bare = next(label for label, size in out if size is None)
        raise PlexusError(f"--ranks: give a memory size for every rank or for none ({bare!r} has none; "
                          "write it as DEVICE=SIZE, e.g. cuda:0=8GiB)")
    return out


def read_hostfile(path: str) -> list[tuple[str, int | None]]:
    """(host, slots) per line of an Open MPI hostfile; Open MPI places ranks slot by slot in this order."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise PlexusError(f"cannot read hostfile {path} ({e.strerror})") from None
    hosts = []
    for n, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        slots = None
        for w in words[1:]:
            if w.startswith("slots="):
                if not w[6:].isdigit():
                    raise PlexusError(f"{path}:{n}: cannot read {w!r}")
                slots = int(w[6:])
        hosts.append((words[0], slots))
    if not hosts:
        raise PlexusError(f"hostfile {path} lists no hosts")
    return hosts


def read_pool_config(path: str, probe: bool = False) -> dict | None:
    """The ``pool:`` (or ``hosts:``) section of a YAML file: host -> per-slot memory; None if
    absent (or, with ``probe``, if the file is not YAML at all: an Open MPI hostfile)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise PlexusError(f"cannot read {path} ({e.strerror})") from None
    except yaml.YAMLError as e:
        if probe:
            return None
        raise PlexusError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        return None
    pool = data.get("pool", data.get("hosts"))
    if pool is None:
        return None
    if not isinstance(pool, dict) or not pool:
        raise PlexusError(f"{path}: pool: must map each host name to its slots' memory, e.g. "
                          "{tower: [cuda:0=12GiB, cuda:1=8GiB], nuc: 6GiB}")
    return {str(k): v for k, v in pool.items()}


def _slot(host: str, i: int, entry, path: str) -> tuple[str, int | None]:
    if isinstance(entry, dict):
        device, size = entry.get("device"), entry.get("memory")
    elif isinstance(entry, str) and "=" in entry:
        device, size = entry.split("=", 1)
    else:
        device, size = None, entry
    if size is None:
        raise PlexusError(f"{path}: pool: {host} slot {i} has no memory size")
    return f"{host}:{device.strip() if device else i}", parse_size(size)


def pool_ranks(pool: dict, hosts: list[tuple[str, int | None]] | None, path: str) -> list[tuple[str, int | None]]:
    """Ranks in launch order with their budgets: the hostfile's slot order when given, else the
    YAML's. A host's value is a list (one entry per slot) or one entry for every slot."""
    if hosts is None:
        hosts = [(h, None) for h in pool]
    ranks = []
    for host, slots in hosts:
        if host not in pool:
            raise PlexusError(f"{path}: pool: has no entry for host {host!r} from the hostfile")
        spec = pool[host]
        entries = list(spec) if isinstance(spec, list) else [spec] * (slots or 1)
        if slots is not None and len(entries) != slots:
            raise PlexusError(f"the hostfile gives {host} {slots} slots but {path} lists memory for {len(entries)}")
        ranks += [_slot(host, i, e, path) for i, e in enumerate(entries)]
    return ranks


def _plan_ranks(ranks, hostfile, config_file, max_memory) -> list[tuple[str, int | None]]:
    if ranks and (hostfile or config_file):
        raise PlexusError("give either --ranks or --hostfile/--config, not both")
    if ranks:
        out = parse_rank_spec(ranks)
    elif hostfile or config_file:
        pool = read_pool_config(hostfile, probe=True) if hostfile and not config_file else None
        if pool is not None:  # --hostfile is itself the YAML with a pool: section
            out = pool_ranks(pool, None, hostfile)
        else:
            hosts = read_hostfile(hostfile) if hostfile else None
            pool = read_pool_config(config_file) if config_file else None
            if pool is None and max_memory is None:
                raise PlexusError("the hostfile gives no memory sizes: add --config FILE with a pool: section "
                                  "(see docs/pooling.md) or --max-memory")
            out = pool_ranks(pool, hosts, config_file) if pool is not None else [
                (f"{h}:{i}", None) for h, s in hosts for i in range(s or 1)]
    else:
        raise PlexusError('say which ranks: --ranks "cuda:0=8GiB,cuda:1=6GiB", --ranks 3x8GiB, or --hostfile')
    if max_memory is not None:
        budgets = parse_budgets(max_memory, len(out))
        out = [(label, b) for (label, _), b in zip(out, budgets)]
    return out


def make_plan(model: str, ranks: str | None = None, hostfile: str | None = None, config_file: str | None = None,
              max_memory: str | None = None, split: str = "memory", max_context: int | None = None,
              max_batch: int = 1, dtype: str | None = None, quantize: str | None = None,
              quant_group: int = 128, kv_tokens: int | None = None) -> tuple[PoolPlan, CheckpointInfo | None]:
    """The plan ``plexus plan`` prints: from config.json and safetensors headers only."""
    from plexus.checkpoint.gguf import gguf_config
    from plexus.engine.engine import context_length, quant_layout
    from plexus.engine.source import gguf_source

    path = Path(model)
    model_dir = path.parent if path.is_file() else path
    gguf = gguf_source(path)
    if gguf is not None:  # a GGUF file: its metadata is the config
        raw = gguf_config(gguf)
        config = ModelConfig.from_dict(raw, str(gguf))
    elif path.is_file():
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PlexusError(f"{path}: not valid JSON ({e})") from None
        config = ModelConfig.from_dict(raw, str(path))
    else:
        if not path.is_dir():
            raise PlexusError(f"model directory {model} does not exist")
        config = ModelConfig.from_dir(path)
        raw = json.loads((path / "config.json").read_text())
    info = read_checkpoint_info(model_dir)
    # the engine computes in config.json's dtype; the headers tell it when config.json does not
    stated = raw.get("torch_dtype") or raw.get("dtype")
    name = dtype or (config.torch_dtype if stated else None) or (info and info.dtype) or "float32"
    name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(name, name)
    ctx = context_length(config, max_context)
    layout, _ = quant_layout(config, quantize, quant_group, path)
    rank_list = _plan_ranks(ranks, hostfile, config_file, max_memory)
    budgets = [b for _, b in rank_list]
    pool = PoolPlan.build(config, len(rank_list), name, ctx, max_batch, split, budgets, "budget",
                          [label for label, _ in rank_list], layout, kv_tokens)
    return pool, info


@click.command("plan")
@click.option("--model", required=True, help="Model directory (config.json alone is enough) or a config.json.")
@click.option("--ranks", default=None,
              help='Ranks and their memory, in rank order: "cuda:0=8GiB,cuda:1=6GiB,cpu=16GiB", "3x8GiB", '
                   'or a count.')
@click.option("--hostfile", default=None,
              help="Open MPI hostfile (ranks in slot order) with per-slot memory from --config, or a YAML "
                   "file with a pool: section.")
@click.option("--config", "config_file", default=None, help="YAML file whose pool: section gives per-slot memory.")
@click.option("--max-memory", default=None, help="Budget for every rank (6GiB) or one per rank; overrides sizes.")
@click.option("--split", default="memory", show_default=True, help="even, memory, or per-rank weights W1,W2,...")
@click.option("--max-context", type=click.IntRange(min=1), default=None,
              help="Tokens of KV cache per sequence (default: min(model's, 4096)).")
@click.option("--max-batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Sequences at once: the KV cache is max-context x max-batch tokens unless --kv-tokens says.")
@click.option("--kv-tokens", type=click.IntRange(min=1), default=None,
              help="Tokens of KV cache (shared by all sequences, in blocks of 16).")
@click.option("--dtype", type=click.Choice(list(DTYPE_BYTES)), default=None,
              help="Compute dtype (default: config.json's, else the checkpoint's).")
@click.option("--quantize", type=click.Choice(["int8", "int4"]), default=None,
              help="Plan for a 16/32-bit checkpoint quantized as it loads (as generate/serve --quantize); a "
                   "pre-quantized checkpoint is planned from its own config.")
@click.option("--quant-group", type=click.IntRange(min=16), default=128, show_default=True,
              help="Input columns per quantization group for --quantize.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(model, ranks, hostfile, config_file, max_memory, split, max_context, max_batch, kv_tokens, dtype, as_json,
         quantize, quant_group):
    """Show how a model would be split over a pool of devices, and whether it fits (no MPI, no weights read)."""
    from plexus.engine.runtime import run_guarded

    def body():
        pool, info = make_plan(model, ranks, hostfile, config_file, max_memory, split, max_context, max_batch, dtype,
                               quantize, quant_group, kv_tokens)
        if as_json:
            out = pool.to_json()
            out["model"] = model
            if info is not None:
                out["checkpoint"] = {"files": info.files, "bytes": info.bytes, "parameters": info.parameters,
                                     "dtype": info.dtype}
            click.echo(json.dumps(out, indent=2))
        else:
            if info is not None:
                click.echo(f"checkpoint: {plural(info.files, 'file')}, {format_size(info.bytes)}, "
                           f"{info.parameters:,} parameters stored as {info.dtype or 'mixed'}")
            click.echo(pool.table())
        sys.stdout.flush()
        return 0

    run_guarded(body, lambda: None)
