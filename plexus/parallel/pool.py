"""Pooling memory of unequal devices: per-rank budgets, the fit check, and ``plexus plan``.

Megatron splits every layer evenly, so the smallest card caps the pool. Here each rank gets a
share of KV groups, MLP columns and vocabulary rows in proportion to a weight (``--split``):
``even``, explicit ``W1,W2,...``, or ``memory`` — each rank's budget (``--max-memory``) or, without
budgets, the memory it can actually use. Budgets count weights plus the KV cache preallocated
for ``--max-context`` tokens x ``--max-batch`` sequences. The engine decides the plan here,
before any weight is read, and ``plexus plan`` prints the same numbers offline from config.json
(and the safetensors headers) without MPI.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import click

from plexus.models.config import ModelConfig
from plexus.errors import PlexusError
from plexus.parallel.plan import ShardPlan

# Left free on every rank for activations, the allocator and the runtime (CUDA context, MPI
# buffers, Python); measured memory minus this is what a rank offers to the pool.
RESERVE_BYTES = 512 * 2**20

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


# ---- parsing -------------------------------------------------------------------------------

def parse_size(text: str | int) -> int:
    """'6GiB' -> 6442450944. Units B, KiB, MiB, GiB, TiB (powers of 1024; K, M, G, T too) and
    KB, MB, GB, TB (powers of 1000); a bare number is bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = _SIZE.match(str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise PlexusError(f"cannot read memory size {text!r} (examples: 6GiB, 512MiB, 8GB, 1073741824)")
        value, unit = float(m.group(1)), m.group(2).lower()
    n = int(value * _UNITS[unit])
    if n <= 0:
        raise PlexusError(f"memory size {text!r} must be positive")
    return n


def format_size(n: int | float, round_up: bool = False) -> str:
    """Bytes in binary units with two decimals; ``round_up`` for sizes that must suffice."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            x = math.ceil(n / scale * 100) / 100 if round_up else n / scale
            return f"{x:.2f} {unit}"
    return f"{math.ceil(n) if round_up else int(n)} B"


def parse_split(split: str | Sequence[float] | None) -> str | tuple[float, ...]:
    """'even', 'memory' or per-rank weights '3,1' (any positive numbers)."""
    if split is None:
        return "memory"
    if not isinstance(split, str):
        weights = tuple(float(w) for w in split)
    else:
        s = split.strip().lower()
        if s in ("even", "memory"):
            return s
        try:
            weights = tuple(float(w) for w in s.split(","))
        except ValueError:
            raise PlexusError(f"--split must be even, memory or per-rank weights like 3,1 (got {split!r})") from None
    if not weights or not all(math.isfinite(w) and w > 0 for w in weights):
        raise PlexusError(f"--split weights must be positive numbers, one per rank (got {split!r}): "
                          "a rank with no share would be dropped from the pool")
    return weights


def parse_budgets(max_memory: str | int | Sequence | None, world_size: int) -> list[int] | None:
    """--max-memory: one size for every rank, or one per rank ('8GiB,6GiB')."""
    if max_memory is None or (isinstance(max_memory, str) and not max_memory.strip()):
        return None
    items = max_memory.split(",") if isinstance(max_memory, str) else (
        [max_memory] if isinstance(max_memory, int) else list(max_memory))
    sizes = [parse_size(x) for x in items]
    if len(sizes) == 1:
        return sizes * world_size
    if len(sizes) != world_size:
        raise PlexusError(f"--max-memory lists {len(sizes)} sizes but there are {world_size} ranks "
                          "(give one size for all ranks or one per rank)")
    return sizes


# ---- measuring what each rank can use --------------------------------------------------------

def host_available_bytes() -> int | None:
    """Memory the OS can hand out without swapping (MemAvailable), or None if unknown."""
    from plexus.parallel.devices import host_memory

    available = host_memory()[1]  # /proc/meminfo, else the OS's count of free pages
    if available is not None:
        return available
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return None


def device_free_bytes(device: str) -> int | None:
    """Free bytes in the memory ``device`` allocates from: the accelerator's own (CUDA/ROCm, xpu),
    Apple's unified memory for mps, the host's for cpu. None if it cannot be measured."""
    kind = device.split(":")[0]
    try:
        import torch

        if kind == "cuda":
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        if kind == "xpu":
            dev = torch.device(device)
            if hasattr(torch.xpu, "mem_get_info"):
                return int(torch.xpu.mem_get_info(dev)[0])
            return int(torch.xpu.get_device_properties(dev).total_memory - torch.xpu.memory_reserved(dev))
        if kind == "mps":
            return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    except Exception:  # an old torch or a busy device: fall back below / report unknown
        if kind in ("cuda", "xpu"):
            return None
    return host_available_bytes()


def _pool_key(host: str, device: str) -> tuple[str, str]:
    kind = device.split(":")[0]
    if kind in ("cuda", "xpu") and ":" not in device:
        device = f"{kind}:0"
    return host, device


def usable_memory(reports: Sequence[tuple[str, str, int | None]], reserve: int = RESERVE_BYTES) -> list[int | None]:
    """Each rank's usable bytes from every rank's (host, device, free bytes): ranks that draw on
    the same memory (same host and device, e.g. CPU ranks on one node) share it evenly — one
    measurement for all of them, so they get equal shares — minus a reserve each."""
    groups: dict[tuple[str, str], list[int]] = {}
    for r, (host, device, _) in enumerate(reports):
        groups.setdefault(_pool_key(host, device), []).append(r)
    out: list[int | None] = [None] * len(reports)
    for ranks in groups.values():
        free = reports[ranks[0]][2]
        if free is not None:
            for r in ranks:
                out[r] = max(0, free // len(ranks) - reserve)
    return out


def split_weights(split: str | tuple[float, ...], budgets: Sequence[int | None], world_size: int) -> list[float]:
    """Per-rank weights for ShardPlan.build: the budgets for 'memory' (unknown ones get the mean
    of the known), all ones for 'even', or the explicit weights."""
    if split == "even":
        return [1.0] * world_size
    if split == "memory":
        known = [b for b in budgets if b is not None]
        if not known or sum(known) <= 0:
            return [1.0] * world_size
        mean = sum(known) / len(known)
        return [float(b if b is not None else mean) for b in budgets]
    if len(split) != world_size:
        raise PlexusError(f"--split gives {len(split)} weights but there are {world_size} ranks")
    return list(split)


# ---- the plan with its memory -------------------------------------------------------------

def _span(r: tuple[int, int]) -> str:
    a, b = r
    return f"{b - a} ({a})" if b - a == 1 else f"{b - a} ({a}-{b - 1})"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@dataclass(frozen=True)
class PoolPlan:
    """A ShardPlan plus what it costs each rank in bytes, and what each rank may spend."""

    plan: ShardPlan
    dtype: str
    dtype_bytes: int
    max_context: int
    max_batch: int
    split: str | tuple[float, ...]
    budgets: tuple[int | None, ...]  # None: no limit known for that rank
    budget_kind: str = "budget"  # "budget" (given) or "usable memory" (measured)
    labels: tuple[str, ...] = ()

    @classmethod
    def build(cls, config: ModelConfig, world_size: int, dtype: str, max_context: int, max_batch: int = 1,
              split: str | Sequence[float] | None = "memory", budgets: Sequence[int | None] | None = None,
              budget_kind: str = "budget", labels: Sequence[str] = ()) -> "PoolPlan":
        if dtype not in DTYPE_BYTES:
            raise PlexusError(f"unsupported dtype {dtype!r} (use {', '.join(DTYPE_BYTES)})")
        if max_batch < 1:
            raise PlexusError(f"--max-batch must be at least 1, got {max_batch}")
        split = parse_split(split)
        budgets = tuple(budgets) if budgets is not None else (None,) * world_size
        plan = ShardPlan.build(config, split_weights(split, budgets, world_size))
        return cls(plan, dtype, DTYPE_BYTES[dtype], max_context, max_batch, split, budgets, budget_kind,
                   tuple(labels) or ("",) * world_size)

    @property
    def config(self) -> ModelConfig:
        return self.plan.config

    @property
    def world_size(self) -> int:
        return self.plan.world_size

    def weight_bytes(self, rank: int) -> int:
        return self.plan.weight_elements(rank) * self.dtype_bytes

    def kv_cache_bytes(self, rank: int) -> int:
        return self.plan.kv_cache_elements(rank, self.max_context, self.max_batch) * self.dtype_bytes

    def total_bytes(self, rank: int) -> int:
        return self.weight_bytes(rank) + self.kv_cache_bytes(rank)

    @property
    def total_weight_bytes(self) -> int:
        """The model's weights once (norms that every rank copies counted once)."""
        return self.config.num_parameters() * self.dtype_bytes

    def spare_bytes(self, rank: int) -> int | None:
        """What the rank's budget (or usable memory) leaves after its weights and KV cache."""
        b = self.budgets[rank]
        return None if b is None else b - self.total_bytes(rank)

    def rank_fits(self, rank: int) -> bool | None:
        spare = self.spare_bytes(rank)
        return None if spare is None else spare >= 0

    @property
    def fits(self) -> bool | None:
        """False if any rank needs more than its budget; None if no rank has a known budget."""
        verdicts = [self.rank_fits(r) for r in range(self.world_size)]
        if all(v is None for v in verdicts):
            return None
        return all(v is not False for v in verdicts)

    # ---- when it does not fit ------------------------------------------------------------

    def _with_budgets(self, budgets: Sequence[int], split="memory") -> "PoolPlan | None":
        try:
            return PoolPlan.build(self.config, len(budgets), self.dtype, self.max_context, self.max_batch,
                                  split, budgets, self.budget_kind)
        except PlexusError:
            return None

    def smallest_pool(self) -> str:
        """The smallest pool like this one that would hold the model, in words."""
        positive = [b for b in self.budgets if b]
        if not positive:
            return "none of these ranks has memory to spare (free some, or set --max-memory)"
        n, unit = self.world_size, min(positive)
        budgets = [b or unit for b in self.budgets]  # unknown or empty ranks: like the smallest
        uniform = len(set(budgets)) == 1
        alt = self._with_budgets(budgets)
        if self.split != "memory" and alt is not None and alt.fits:
            return f"these {_plural(n, 'rank')} with --split memory"
        # scaling every budget by the same factor keeps the memory split's shares
        scale = max(alt.total_bytes(r) / budgets[r] for r in range(n)) if alt else 1.0
        scaled = [int(math.ceil(b * scale)) for b in budgets]
        bigger = (f"{_plural(n, 'rank')} of {format_size(scaled[0], True)}" if uniform
                  else f"these {_plural(n, 'rank')} with {', '.join(format_size(b, True) for b in scaled)}")
        for k in range(n + 1, self.config.num_heads + 1):
            grown = budgets + [unit] * (k - n)
            alt = self._with_budgets(grown)
            if alt is not None and alt.fits:
                more = (f"{k} ranks of {format_size(unit)} each" if uniform else
                        f"{k} ranks (these {n} plus {k - n} more of {format_size(unit)} each)")
                return f"{more}, {format_size(sum(grown))} in all; or {bigger}"
        return (f"{bigger} (no pool of up to {self.config.num_heads} ranks of {format_size(unit)} fits: "
                "the model's attention heads cap the number of ranks)")

    def failure(self) -> str | None:
        """One line: what is needed, what each rank has, and the smallest pool that fits."""
        if self.fits is not False:
            return None
        n = self.world_size
        needed = sum(self.total_bytes(r) for r in range(n))
        weights = sum(self.weight_bytes(r) for r in range(n))
        kv = sum(self.kv_cache_bytes(r) for r in range(n))
        over = [r for r in range(n) if self.rank_fits(r) is False]
        per_rank = ", ".join(
            f"rank {r} {format_size(self.total_bytes(r))} of {format_size(b) if b is not None else 'unlimited'}"
            for r, b in enumerate(self.budgets))
        where = (f"rank {over[0]} would get more than it has" if len(over) == 1 else
                 f"ranks {','.join(map(str, over))} would get more than they have")
        measured = (f" (free memory less {format_size(RESERVE_BYTES)} each; --max-memory overrides)"
                    if self.budget_kind == "usable memory" else "")
        return (f"the model does not fit in the {self.budget_kind} of {_plural(n, 'rank')}{measured}: it needs "
                f"{needed:,} bytes ({format_size(needed)}: weights {format_size(weights)} + KV cache "
                f"{format_size(kv)} for {self.max_context} tokens x {_plural(self.max_batch, 'sequence')} in "
                f"{self.dtype}) and {where} (needed of available per rank: "
                f"{per_rank}); the smallest pool that would fit: {self.smallest_pool()}")

    # ---- output -------------------------------------------------------------------------

    def describe_split(self) -> str:
        total = sum(self.plan.weights)
        shares = "/".join(f"{100 * w / total:.0f}" for w in self.plan.weights)
        name = self.split if isinstance(self.split, str) else ",".join(f"{w:g}" for w in self.split)
        how = {"memory": f" (by {self.budget_kind})", "even": ""}.get(name, "")
        return f"split {name}{how}: shares {shares}%"

    def table(self) -> str:
        c = self.config
        n = c.num_parameters()
        count = next(f"{n / s:.3g}{u}" for s, u in ((1e9, "B"), (1e6, "M"), (1e3, "K"), (1, "")) if n >= s)
        head = (f"plan: {c.architecture}, {count} parameters = "
                f"{format_size(self.total_weight_bytes)} of weights in {self.dtype}, KV cache for "
                f"{self.max_context} tokens x {_plural(self.max_batch, 'sequence')}, "
                f"{_plural(self.world_size, 'rank')}, {self.describe_split()}")
        cols = ["rank", "device", "kv heads", "q heads", "mlp columns", "vocab rows", "weights", "kv cache",
                "total", "budget", "fits"]
        rows = []
        for r, s in enumerate(self.plan.shards):
            fit = self.rank_fits(r)
            rows.append([str(r), self.labels[r] or "-", _span(s.kv_heads), _span(s.q_heads),
                         _span(s.mlp_columns), _span(s.vocab_rows), format_size(self.weight_bytes(r)),
                         format_size(self.kv_cache_bytes(r)), format_size(self.total_bytes(r)),
                         format_size(self.budgets[r]) if self.budgets[r] is not None else "-",
                         {True: "yes", False: "NO", None: "-"}[fit]])
        widths = [max(len(x) for x in col) for col in zip(cols, *rows)]
        lines = [head] + ["  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in [cols] + rows]
        return "\n".join(lines + [f"note: {n}" for n in self.plan.notes()] + [self.verdict()])

    def verdict(self) -> str:
        fits = self.fits
        if fits is None:
            return "verdict: no memory sizes given, so nothing to check against"
        if fits is False:
            return f"verdict: does not fit: {self.failure()}"
        n = self.world_size
        needed = sum(self.total_bytes(r) for r in range(n))
        have = sum(b for b in self.budgets if b is not None)
        tight = max((r for r in range(n) if self.budgets[r]), key=lambda r: self.total_bytes(r) / self.budgets[r])
        return (f"verdict: fits: {format_size(needed)} needed of {format_size(have)}; fullest is rank {tight} at "
                f"{100 * self.total_bytes(tight) / self.budgets[tight]:.1f}% of its {self.budget_kind}")

    def to_json(self) -> dict:
        ranks = []
        for r, s in enumerate(self.plan.shards):
            ranks.append({
                "rank": r, "device": self.labels[r] or None, "weight": self.plan.weights[r],
                "kv_heads": list(s.kv_heads), "num_kv_heads": s.num_kv_heads,
                "q_heads": list(s.q_heads), "num_heads": s.num_heads,
                "mlp_columns": list(s.mlp_columns), "intermediate": s.intermediate,
                "vocab_rows": list(s.vocab_rows), "vocab": s.vocab,
                "weight_bytes": self.weight_bytes(r), "kv_cache_bytes": self.kv_cache_bytes(r),
                "total_bytes": self.total_bytes(r), "budget_bytes": self.budgets[r], "fits": self.rank_fits(r)})
        return {
            "architecture": self.config.architecture, "num_parameters": self.config.num_parameters(),
            "dtype": self.dtype, "dtype_bytes": self.dtype_bytes, "max_context": self.max_context,
            "max_batch": self.max_batch, "split": self.split if isinstance(self.split, str) else list(self.split),
            "world_size": self.world_size, "total_weight_bytes": self.total_weight_bytes,
            "pool_weight_bytes": sum(x["weight_bytes"] for x in ranks),
            "total_kv_cache_bytes": sum(x["kv_cache_bytes"] for x in ranks),
            "fits": self.fits, "verdict": self.verdict(), "notes": self.plan.notes(), "ranks": ranks}


# ---- the engine's side: one plan agreed by all ranks -----------------------------------------

def agree_pool_plan(comm, config: ModelConfig, dtype, device: str, max_context: int,
                    split: str | Sequence[float] | None = "memory", max_memory=None,
                    max_batch: int = 1) -> PoolPlan:
    """Collective. Every rank measures the memory it can use, all ranks gather the measurements
    and build the same plan; if it does not fit the budgets (``max_memory``, else the measured
    memory) every rank raises the same one-line PlexusError — before any weight is read."""
    report = (comm.hostname, str(device), device_free_bytes(str(device)))
    reports = comm.allgather_obj(report)
    pool, error = None, None
    try:
        budgets = parse_budgets(max_memory, comm.size)
        kind = "budget" if budgets is not None else "usable memory"
        if budgets is None:
            budgets = usable_memory(reports)
        multi_host = len({h for h, _, _ in reports}) > 1
        labels = [f"{d}@{h}" if multi_host else d for h, d, _ in reports]
        name = str(dtype).removeprefix("torch.")
        pool = PoolPlan.build(config, comm.size, name, max_context, max_batch, split, budgets, kind, labels)
        error = pool.failure()
    except PlexusError as e:
        error = str(e)
    comm.agree(error)
    return pool


# ---- `plexus plan`: offline, from config.json and safetensors headers --------------------------

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
              max_batch: int = 1, dtype: str | None = None) -> tuple[PoolPlan, CheckpointInfo | None]:
    """The plan ``plexus plan`` prints: from config.json and safetensors headers only."""
    from plexus.engine.engine import DEFAULT_MAX_CONTEXT

    path = Path(model)
    model_dir = path.parent if path.is_file() else path
    if path.is_file():
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
    ctx = max_context or min(config.max_position_embeddings, DEFAULT_MAX_CONTEXT)
    rank_list = _plan_ranks(ranks, hostfile, config_file, max_memory)
    budgets = [b for _, b in rank_list]
    pool = PoolPlan.build(config, len(rank_list), name, ctx, max_batch, split, budgets, "budget",
                          [label for label, _ in rank_list])
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
              help="Sequences of KV cache.")
@click.option("--dtype", type=click.Choice(list(DTYPE_BYTES)), default=None,
              help="Compute dtype (default: config.json's, else the checkpoint's).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(model, ranks, hostfile, config_file, max_memory, split, max_context, max_batch, dtype, as_json):
    """Show how a model would be split over a pool of devices, and whether it fits (no MPI, no weights read)."""
    from plexus.engine.runtime import run_guarded

    def body():
        pool, info = make_plan(model, ranks, hostfile, config_file, max_memory, split, max_context, max_batch, dtype)
        if as_json:
            out = pool.to_json()
            out["model"] = model
            if info is not None:
                out["checkpoint"] = {"files": info.files, "bytes": info.bytes, "parameters": info.parameters,
                                     "dtype": info.dtype}
            click.echo(json.dumps(out, indent=2))
        else:
            if info is not None:
                click.echo(f"checkpoint: {_plural(info.files, 'file')}, {format_size(info.bytes)}, "
                           f"{info.parameters:,} parameters stored as {info.dtype or 'mixed'}")
            click.echo(pool.table())
        sys.stdout.flush()
        return 0

    run_guarded(body, lambda: None)
