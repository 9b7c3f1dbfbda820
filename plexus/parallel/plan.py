"""The sharding plan: which rank holds which heads, MLP columns and vocabulary rows.

Decided in one place, before any weight is read, from the model config and one weight per
rank (equal weights = Megatron's even split; memory-proportional weights let a big card take a
bigger share). The parallel layers read their slice boundaries from here at load time, and
``plexus plan`` prints the same numbers.

Attention is split by KV groups while there are at least as many KV heads as ranks, so no KV
head is stored twice. With more ranks than KV heads, query heads are split instead and each
rank keeps a copy of the KV heads its query heads use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence

from plexus.errors import PlexusError

class ModelShape(Protocol):
    """What a plan needs to know of a model: its sizes (plexus.models.config.ModelShape has
    them; the plan does not depend on how a model is built)."""

    architecture: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    group_size: int
    attention_bias: bool
    tie_word_embeddings: bool

    def num_parameters(self) -> int: ...


class QuantShape(Protocol):
    """How the decoder layers' linear weights are stored when quantized (plexus.quant.qweight.
    Layout has it): ``align``, the input columns a row-parallel split must land on (a group),
    and the bytes of a quantized (rows, columns) matrix."""

    align: int

    def linear_bytes(self, rows: int, columns: int) -> int: ...

    def describe(self) -> str: ...


MLP_GRANULARITY = 64  # MLP columns move between ranks in blocks of this many when sizes allow


def partition(total: int, weights: Sequence[float], minimum: int = 1) -> list[int]:
    """Split ``total`` units into len(weights) integer parts proportional to ``weights``,
    each at least ``minimum`` (largest-remainder rounding; deterministic)."""
    n = len(weights)
    if total < minimum * n:
        raise ValueError(f"cannot give {n} ranks at least {minimum} of {total}")
    wsum = float(sum(weights))
    ideal = [total * (w / wsum if wsum > 0 else 1.0 / n) for w in weights]
    counts = [max(minimum, int(x)) for x in ideal]
    while sum(counts) > total:
        i = max((i for i in range(n) if counts[i] > minimum), key=lambda i: counts[i] - ideal[i])
        counts[i] -= 1
    while sum(counts) < total:
        i = max(range(n), key=lambda i: ideal[i] - counts[i])
        counts[i] += 1
    return counts


def _ranges(counts: Sequence[int], scale: int = 1, total: int | None = None) -> list[tuple[int, int]]:
    out, start = [], 0
    for c in counts:
        out.append((start * scale, (start + c) * scale))
        start += c
    if total is not None:  # the last unit may be short
        out = [(min(a, total), min(b, total)) for a, b in out]
    return out


def _aligned(total: int, weights: Sequence[float], unit: int, item_columns: int, align: int,
             what: str) -> list[tuple[int, int]]:
    """Split ``total`` items (heads, MLP columns) of ``item_columns`` input columns each in whole
    units of ``unit`` items, grown so that every boundary falls on a multiple of ``align``
    columns (a quantization group); the last unit may be short."""
    unit = unit * (align // math.gcd(unit * item_columns, align))
    units = -(-total // unit)
    if units < len(weights):
        raise PlexusError(f"cannot split {what} across {len(weights)} ranks: its splits must fall on "
                          f"quantization groups of {align} columns, so at most {units} rank(s) can share it "
                          f"(use fewer ranks, or smaller groups: --quant-group, or a checkpoint quantized with them)")
    return _ranges(partition(units, weights), scale=unit, total=total)


@dataclass(frozen=True)
class RankShard:
    """One rank's slice of every parallel layer, as [start, end) ranges."""

    rank: int
    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    mlp_columns: tuple[int, int]
    vocab_rows: tuple[int, int]

    @property
    def num_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def intermediate(self) -> int:
        return self.mlp_columns[1] - self.mlp_columns[0]

    @property
    def vocab(self) -> int:
        return self.vocab_rows[1] - self.vocab_rows[0]


@dataclass(frozen=True)
class ShardPlan:
    config: ModelShape
    weights: tuple[float, ...]
    shards: tuple[RankShard, ...]

    @property
    def world_size(self) -> int:
        return len(self.shards)

    def __getitem__(self, rank: int) -> RankShard:
        return self.shards[rank]

    @property
    def vocab_sizes(self) -> list[int]:
        return [s.vocab for s in self.shards]

    @classmethod
    def build(cls, config: ModelShape, weights: Sequence[float], align: int = 1) -> "ShardPlan":
        """``align``: input columns the row-parallel layers' splits (o_proj's heads, down_proj's
        MLP columns) must land on — a quantized model's group — checked here, before any weight."""
        n = len(weights)
        c = config
        if n > c.num_heads:
            heads = "1 attention head" if c.num_heads == 1 else f"{c.num_heads} attention heads"
            most = "1 rank" if c.num_heads == 1 else f"{c.num_heads} ranks"
            raise PlexusError(f"cannot split {heads} across {n} ranks: use at most {most}")
        o_proj = f"o_proj's {c.num_heads * c.head_dim} input columns ({c.num_heads} heads of {c.head_dim})"
        if n <= c.num_kv_heads:
            kvs = _aligned(c.num_kv_heads, weights, 1, c.group_size * c.head_dim, align, o_proj)
            q = [(a * c.group_size, b * c.group_size) for a, b in kvs]
        else:
            q = _aligned(c.num_heads, weights, 1, c.head_dim, align, o_proj)
        kv = [(a // c.group_size, (b - 1) // c.group_size + 1) for a, b in q]
        unit = MLP_GRANULARITY if c.intermediate_size % MLP_GRANULARITY == 0 and \
            c.intermediate_size // MLP_GRANULARITY >= n else 1
        if align > 1 and -(-c.intermediate_size // (unit * align // math.gcd(unit, align))) < n:
            unit = 1
        down = f"down_proj's {c.intermediate_size} input columns"
        mlp = _aligned(c.intermediate_size, weights, unit, 1, align, down)
        vocab = _ranges(partition(c.vocab_size, weights))
        shards = tuple(RankShard(r, q[r], kv[r], mlp[r], vocab[r]) for r in range(n))
        return cls(config, tuple(float(w) for w in weights), shards)

    @classmethod
    def even(cls, config: ModelShape, world_size: int) -> "ShardPlan":
        return cls.build(config, [1.0] * world_size)

    # ---- who owns what, for logs and `plexus plan` ---------------------------------------

    @property
    def splits_kv_groups(self) -> bool:
        """True when each rank owns whole KV groups (>= 1), so no KV head is stored twice."""
        return self.world_size <= self.config.num_kv_heads

    def kv_head_owners(self) -> dict[int, list[int]]:
        """KV head -> the ranks that store it (more than one only when KV heads are copied)."""
        owners: dict[int, list[int]] = {}
        for s in self.shards:
            for h in range(*s.kv_heads):
                owners.setdefault(h, []).append(s.rank)
        return owners

    def notes(self) -> list[str]:
        """Why a rank owns no whole KV group, when that happens (more ranks than KV heads)."""
        if self.splits_kv_groups:
            return []
        c = self.config
        copied = [f"KV head {h} on ranks {','.join(map(str, rs))}"
                  for h, rs in self.kv_head_owners().items() if len(rs) > 1]
        return [f"{self.world_size} ranks but only {c.num_kv_heads} KV heads: no rank can own a whole KV group, "
                f"so query heads are split instead and ranks keep copies of the KV heads their query heads "
                f"read ({'; '.join(copied) or 'none copied'})"]

    # ---- sizes, for budgets and for `plexus plan` ----------------------------------------

    def weight_bytes(self, rank: int, dtype_bytes: int, quant: QuantShape | None = None) -> int:
        """Bytes of the weights rank ``rank`` stores: all in ``dtype_bytes`` each, or with the
        decoder layers' linear weights quantized as ``quant`` says (plus the one layer's dense
        scratch that prefill dequantizes into)."""
        if quant is None:
            return self.weight_elements(rank) * dtype_bytes
        c, s = self.config, self.shards[rank]
        h, d = c.hidden_size, c.head_dim
        qkv_rows = (s.num_heads + 2 * s.num_kv_heads) * d
        # a row-parallel slice may take more than its share of a whole weight's bytes (act-order)
        sliced = getattr(quant, "input_slice_bytes", lambda rows, cols, total: quant.linear_bytes(rows, cols))
        linears = (quant.linear_bytes(qkv_rows, h) + sliced(h, s.num_heads * d, c.num_heads * d)
                   + quant.linear_bytes(2 * s.intermediate, h) + sliced(h, s.intermediate, c.intermediate_size))
        dense = self.weight_elements(rank) - c.num_layers * (qkv_rows * h + s.num_heads * d * h + 3 * s.intermediate * h)
        # and the scratch buffer prefill dequantizes each layer's weight into, the largest one's size
        scratch = max(qkv_rows * h, s.num_heads * d * h, 2 * s.intermediate * h)
        quantized = 0
        embed = getattr(quant, "embed_bytes", lambda rows, cols: None)(s.vocab, h)
        if embed is not None:  # the table held quantized (rows dequantized on lookup); a tied head shares it
            dense -= s.vocab * h
            quantized += embed
            if c.tie_word_embeddings:
                scratch = max(scratch, s.vocab * h)
        head = getattr(quant, "head_bytes", lambda rows, cols: None)(s.vocab, h)
        if head is not None and not c.tie_word_embeddings:  # the LM head quantized too
            dense -= s.vocab * h
            quantized += head
            scratch = max(scratch, s.vocab * h)
        return c.num_layers * linears + quantized + (dense + scratch) * dtype_bytes

    def weight_elements(self, rank: int) -> int:
        """Number of weight elements rank ``rank`` stores."""
        c, s = self.config, self.shards[rank]
        h, d = c.hidden_size, c.head_dim
        qkv_rows = (s.num_heads + 2 * s.num_kv_heads) * d
        attn = qkv_rows * h + s.num_heads * d * h + (qkv_rows if c.attention_bias else 0)
        mlp = 3 * s.intermediate * h
        layer = attn + mlp + 2 * h  # two RMSNorm weights, replicated
        embed = s.vocab * h * (1 if c.tie_word_embeddings else 2)
        return c.num_layers * layer + embed + h

    def kv_cache_elements(self, rank: int, tokens: int) -> int:
        """K and V cache elements rank ``rank`` preallocates for ``tokens`` positions (its KV heads'
        share of every layer's pool)."""
        c, s = self.config, self.shards[rank]
        return 2 * c.num_layers * s.num_kv_heads * tokens * c.head_dim
