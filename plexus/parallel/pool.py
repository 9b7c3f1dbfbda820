"""Pooling memory of unequal devices: per-rank budgets, the fit check, and the plan every rank
agrees on before loading.

Megatron splits every layer evenly, so the smallest card caps the pool. Here each rank gets a
share of KV groups, MLP columns and vocabulary rows in proportion to a weight (``--split``):
``even``, explicit ``W1,W2,...``, or ``memory`` — each rank's budget (``--max-memory``) or, without
budgets, the memory it can actually use (plexus.parallel.memory). Budgets count weights plus the
KV cache: a pool of ``kv_tokens`` positions in blocks that any sequence may use (by default
``--max-context`` x ``--max-batch``, lowered to what the memory holds). The engine decides
the plan here, before any weight is read, and ``plexus plan`` prints the same numbers offline
from config.json (and the safetensors headers) without MPI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

from plexus.errors import PlexusError
from plexus.parallel.memory import RESERVE_BYTES, device_free_bytes, usable_memory
from plexus.parallel.plan import ModelShape, QuantShape, ShardPlan
from plexus.parallel.sizes import DTYPE_BYTES, KV_BLOCK, blocks_for, format_size, parse_budgets, parse_split

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


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@dataclass(frozen=True)
class PoolPlan:
    """A ShardPlan plus what it costs each rank in bytes, and what each rank may spend."""

    plan: ShardPlan
    dtype: str
    dtype_bytes: int
    max_context: int
    max_batch: int
    kv_tokens: int  # positions the KV cache's pool holds, a multiple of KV_BLOCK
    split: str | tuple[float, ...]
    budgets: tuple[int | None, ...]  # None: no limit known for that rank
    budget_kind: str = "budget"  # "budget" (given) or "usable memory" (measured)
    labels: tuple[str, ...] = ()
    quant: QuantShape | None = None  # the layers' linear weights quantized (--quantize, a quantized checkpoint)
    hosts: tuple[str, ...] = ()  # each rank's host (the engine's plan; plexus plan knows none)

    @classmethod
    def build(cls, config: ModelShape, world_size: int, dtype: str, max_context: int, max_batch: int = 1,
              split: str | Sequence[float] | None = "memory", budgets: Sequence[int | None] | None = None,
              budget_kind: str = "budget", labels: Sequence[str] = (), quant: QuantShape | None = None,
              kv_tokens: int | None = None) -> "PoolPlan":
        """``kv_tokens``: the KV cache's positions (rounded up to whole blocks); None: max_batch
        sequences of max_context."""
        if dtype not in DTYPE_BYTES:
            raise PlexusError(f"unsupported dtype {dtype!r} (use {', '.join(DTYPE_BYTES)})")
        if max_batch < 1:
            raise PlexusError(f"--max-batch must be at least 1, got {max_batch}")
        if kv_tokens is not None and kv_tokens < 1:
            raise PlexusError(f"--kv-tokens must be at least 1, got {kv_tokens}")
        split = parse_split(split)
        budgets = tuple(budgets) if budgets is not None else (None,) * world_size
        plan = ShardPlan.build(config, split_weights(split, budgets, world_size), quant.align if quant else 1)
        tokens = (blocks_for(kv_tokens) if kv_tokens else blocks_for(max_context) * max_batch) * KV_BLOCK
        return cls(plan, dtype, DTYPE_BYTES[dtype], max_context, max_batch, tokens, split, budgets, budget_kind,
                   tuple(labels) or ("",) * world_size, quant)

    @property
    def config(self) -> ModelShape:
        return self.plan.config

    @property
    def world_size(self) -> int:
        return self.plan.world_size

    def weight_bytes(self, rank: int) -> int:
        return self.plan.weight_bytes(rank, self.dtype_bytes, self.quant)

    @property
    def kv_blocks(self) -> int:
        return self.kv_tokens // KV_BLOCK

    def kv_cache_bytes(self, rank: int) -> int:
        return self.plan.kv_cache_elements(rank, self.kv_tokens) * self.dtype_bytes

    def describe_kv(self) -> str:
        """The KV cache in words: its tokens, blocks and what that is in sequences."""
        full = self.kv_tokens / self.max_context
        return (f"KV cache for {self.kv_tokens:,} tokens ({self.kv_blocks:,} blocks of {KV_BLOCK}; "
                f"{full:.3g} x the {self.max_context}-token context)")

    def kv_room(self) -> int | None:
        """Tokens of KV cache (whole blocks) that every rank's budget holds beside its weights;
        None where no rank's budget is known."""
        fits = []
        for r, budget in enumerate(self.budgets):
            per_token = self.plan.kv_cache_elements(r, 1) * self.dtype_bytes
            if budget is not None and per_token:
                fits.append(max(0, budget - self.weight_bytes(r)) // per_token)
        return min(fits) // KV_BLOCK * KV_BLOCK if fits else None

    def fit_kv(self) -> "PoolPlan":
        """The same plan with the KV cache lowered to what the budgets hold (``kv_room``), never
        below one max-context sequence, nor raised."""
        room = self.kv_room()
        if room is None:
            return self
        return replace(self, kv_tokens=max(blocks_for(self.max_context) * KV_BLOCK, min(self.kv_tokens, room)))

    def total_bytes(self, rank: int) -> int:
        return self.weight_bytes(rank) + self.kv_cache_bytes(rank)

    @property
    def total_weight_bytes(self) -> int:
        """The model's weights once (norms that every rank copies counted once)."""
        if self.quant is not None:
            return ShardPlan.build(self.config, [1.0]).weight_bytes(0, self.dtype_bytes, self.quant)
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
                                  split, budgets, self.budget_kind, quant=self.quant, kv_tokens=self.kv_tokens)
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
            return f"these {plural(n, 'rank')} with --split memory"
        # scaling every budget by the same factor keeps the memory split's shares
        scale = max(alt.total_bytes(r) / budgets[r] for r in range(n)) if alt else 1.0
        scaled = [int(math.ceil(b * scale)) for b in budgets]
        bigger = (f"{plural(n, 'rank')} of {format_size(scaled[0], True)}" if uniform
                  else f"these {plural(n, 'rank')} with {', '.join(format_size(b, True) for b in scaled)}")
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
        return (f"the model does not fit in the {self.budget_kind} of {plural(n, 'rank')}{measured}: it needs "
                f"{needed:,} bytes ({format_size(needed)}: weights {format_size(weights)} + KV cache "
                f"{format_size(kv)} for {self.kv_tokens:,} tokens in {self.dtype}) and {where} (needed of "
                f"available per rank: "
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
                f"{format_size(self.total_weight_bytes)} of weights in {self.dtype}"
                f"{f', layers quantized to {self.quant.describe()}' if self.quant else ''}, {self.describe_kv()}, "
                f"{plural(self.world_size, 'rank')}, {self.describe_split()}")
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
        room = self.kv_room()
        if room is not None:
            lines.append(f"kv cache: the budgets hold up to {room:,} tokens of it beside the weights "
                         f"({room / self.max_context:.3g} x the {self.max_context}-token context; --kv-tokens sets it)")
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
                "rank": r, "host": self.hosts[r] if self.hosts else None, "device": self.labels[r] or None,
                "weight": self.plan.weights[r],
                "kv_heads": list(s.kv_heads), "num_kv_heads": s.num_kv_heads,
                "q_heads": list(s.q_heads), "num_heads": s.num_heads,
                "mlp_columns": list(s.mlp_columns), "intermediate": s.intermediate,
                "vocab_rows": list(s.vocab_rows), "vocab": s.vocab,
                "weight_bytes": self.weight_bytes(r), "kv_cache_bytes": self.kv_cache_bytes(r),
                "total_bytes": self.total_bytes(r), "budget_bytes": self.budgets[r], "fits": self.rank_fits(r)})
        return {
            "architecture": self.config.architecture, "num_parameters": self.config.num_parameters(),
            "dtype": self.dtype, "dtype_bytes": self.dtype_bytes, "max_context": self.max_context,
            "quantization": self.quant.describe() if self.quant else None,
            "max_batch": self.max_batch, "kv_tokens": self.kv_tokens, "kv_blocks": self.kv_blocks,
            "kv_block_tokens": KV_BLOCK, "split": self.split if isinstance(self.split, str) else list(self.split),
            "world_size": self.world_size, "total_weight_bytes": self.total_weight_bytes,
            "pool_weight_bytes": sum(x["weight_bytes"] for x in ranks),
            "total_kv_cache_bytes": sum(x["kv_cache_bytes"] for x in ranks),
            "kv_tokens_that_fit": self.kv_room(),
            "fits": self.fits, "verdict": self.verdict(), "notes": self.plan.notes(), "ranks": ranks}


# ---- the engine's side: one plan agreed by all ranks -----------------------------------------

def agree_pool_plan(comm, config: ModelShape, dtype, device: str, max_context: int,
                    split: str | Sequence[float] | None = "memory", max_memory=None,
                    max_batch: int = 1, quant: QuantShape | None = None, kv_tokens: int | None = None) -> PoolPlan:
    """Collective. Every rank measures the memory it can use, all ranks gather the measurements
    and build the same plan; if it does not fit the budgets (``max_memory``, else the measured
    memory) every rank raises the same one-line PlexusError — before any weight is read.
    ``kv_tokens``: the KV cache's size; None: max_context x max_batch, lowered to what the
    budgets hold (at least one max_context sequence)."""
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
        pool = PoolPlan.build(config, comm.size, name, max_context, max_batch, split, budgets, kind, labels, quant,
                              kv_tokens)
        if kv_tokens is None:
            pool = pool.fit_kv()
        pool = replace(pool, hosts=tuple(h for h, _, _ in reports))
        error = pool.failure()
    except PlexusError as e:
        error = str(e)
    comm.agree(error)
    return pool
