"""Sizes as users write them (--max-memory 6GiB, --split 3,1) and as Plexus prints them, and the
bytes per element of each compute dtype."""

from __future__ import annotations

import math
import re
from typing import Sequence

from plexus.errors import PlexusError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


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


KV_BLOCK = 16  # positions a KV-cache block holds (models/paged.py; csrc/decode.c's KV_BLOCK, checked where it loads)


def blocks_for(tokens: int) -> int:
    """KV-cache blocks that hold ``tokens`` positions."""
    return -(-tokens // KV_BLOCK)
