"""The engine: every rank runs the same forward passes in lockstep, rank 0 decides.

Rank 0 broadcasts each unit of work (a prompt's ids) to the other ranks, which wait in
``worker_loop``. During generation rank 0 samples each token from the gathered logits and
broadcasts it with a continue/stop flag, so all ranks feed the same token and stop together.
A batch (engine/batch.py, for serve and generate) is one broadcast per step instead: the prompt
chunks and decode rows every rank runs (``batch_step``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from plexus.engine.build import load_model
from plexus.engine.kv import BlockPool
from plexus.engine.source import load_config
from plexus.engine.sampling import Sampler, SamplingParams
from plexus.errors import PlexusError
from plexus.log import get_logger
from plexus.models.config import ModelConfig, resolve_dtype
from plexus.models.llama import CausalLM
from plexus.parallel.comm import Communicator
from plexus.parallel.plan import ShardPlan
from plexus.parallel.pool import agree_pool_plan
from plexus.parallel.sizes import KV_BLOCK, blocks_for
from plexus.quant.qweight import bits_of

DEFAULT_MAX_CONTEXT = 4096  # caps the preallocated KV cache for long-context checkpoints
# positions per forward pass when scoring a window: bounds the logits gathered on rank 0 (and
# their float64 log-softmax) to SCORE_CHUNK x vocab, whatever the window's length
SCORE_CHUNK = 256


def context_length(config: ModelConfig, max_context: int | None) -> int:
    """The KV cache's length: ``max_context`` (--max-context), else the model's positions capped
    at DEFAULT_MAX_CONTEXT. Known from config.json alone, so it is checked before any weight."""
    positions = config.max_position_embeddings
    ctx = max_context or min(positions, DEFAULT_MAX_CONTEXT)
    if ctx < 1:
        raise PlexusError(f"--max-context must be positive, got {ctx}")
    if ctx > positions:
        raise PlexusError(f"--max-context {ctx} is beyond this model's {positions} positions "
                          "(max_position_embeddings in its config.json)")
    return ctx


def kv_positions(prompt_len: int, max_tokens: int) -> int:
    """KV-cache positions a request may fill: its prompt and every generated token but the last
    (which is never fed back)."""
    return prompt_len + max_tokens - 1


def check_request(prompt_ids: list[int], max_tokens: int, max_context: int, vocab_size: int,
                  kv_tokens: int | None = None) -> None:
    """A prompt's ids and max tokens against the context, the whole KV cache (``kv_tokens``) and
    the vocabulary (before any work: rank 0 checks every prompt of a run before the weights load,
    and each again before it runs)."""
    if not prompt_ids:
        raise PlexusError("the prompt is empty (no tokens)")
    if max_tokens < 1:
        raise PlexusError(f"max tokens must be at least 1, got {max_tokens}")
    if len(prompt_ids) + max_tokens > max_context:
        raise PlexusError(f"prompt ({len(prompt_ids)} tokens) plus max tokens ({max_tokens}) exceeds the "
                          f"context length of {max_context} tokens")
    need = blocks_for(kv_positions(len(prompt_ids), max_tokens)) * KV_BLOCK
    if kv_tokens is not None and need > kv_tokens:
        raise PlexusError(f"prompt ({len(prompt_ids)} tokens) plus max tokens ({max_tokens}) needs {need} tokens "
                          f"of KV cache; the whole cache holds {kv_tokens} (--kv-tokens)")
    bad = [i for i in prompt_ids if not 0 <= i < vocab_size]
    if bad:
        raise PlexusError(f"token id {bad[0]} is outside the vocabulary (size {vocab_size})")


def check_prompts(prompts: list[list[int]], max_tokens: int, config: ModelConfig, max_context: int | None,
                  kv_tokens: int | None = None) -> None:
    """Before any weight is read: every prompt of a run fits the context (--max-context, itself
    checked against the model), the KV cache (--kv-tokens, when given) and the vocabulary; with
    several, the error says which."""
    ctx = context_length(config, max_context)
    kv = blocks_for(kv_tokens) * KV_BLOCK if kv_tokens else None
    for n, ids in enumerate(prompts, 1):
        try:
            check_request(ids, max_tokens, ctx, config.vocab_size, kv)
        except PlexusError as e:
            raise PlexusError(f"prompt {n}: {e}" if len(prompts) > 1 else str(e)) from None


def quant_layout(config: ModelConfig, quantize: str | None, group: int, source) -> tuple:
    """(the planner's Layout, the checkpoint's quantized format) from --quantize or the
    checkpoint's quantization_config; (None, None) for a dense model. Known before any weight."""
    from plexus.engine.source import gguf_source
    from plexus.quant.qweight import Layout, bits_of, check_group

    gguf = gguf_source(source)
    if gguf is not None:
        from plexus.checkpoint.gguf import gguf_layout

        info = gguf_layout(gguf)
        if info is not None:
            if quantize:
                raise PlexusError(f"{gguf}: --quantize {quantize} is for 16/32-bit weights; this file's layers are "
                                  f"already quantized ({', '.join(sorted(info['types']))})")
            types = "/".join(sorted(info["types"]))
            head, embed = info["head"] or (0, 0), info["embed"] or (0, 0)
            return Layout(info["bits"], info["group"], f"GGUF {types}", align_to=info["align"], head_bits=head[0],
                          head_group=head[1], embed_bits=embed[0], embed_group=embed[1]), None
    elif config.quantization_config is not None:
        from plexus.checkpoint.hf_quant import quant_format

        if quantize:
            raise PlexusError(f"{source}: --quantize {quantize} is for 16/32-bit checkpoints; this one is already "
                              f"quantized ({config.quantization_config.get('quant_method')})")
        fmt = quant_format(config.quantization_config, f"{source}/config.json")
        return fmt, fmt  # a Format is the planner's QuantShape too (align, linear_bytes, describe)
    if not quantize:
        return None, None
    bits = bits_of(quantize)
    check_group(bits, group)
    # the LM head stays in --dtype, as in the checkpoints `plexus quantize` and llm-compressor write
    return Layout(bits, group, quantize), None


@dataclass
class Completion:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # "stop" (EOS or stop string), "length", or "cancelled"
    ttft_s: float | None = None
    stop_sequence: str | None = None  # the stop string that ended it, if one did
    # with SamplingParams.logprobs: per generated token (id, log-probability, [(id, log-probability)
    # of the most likely ones]), from the model's own distribution (before bias or constraints)
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None


class Engine:
    def __init__(self, model: CausalLM, comm: Communicator, eos_token_ids: frozenset[int] = frozenset(),
                 max_batch: int = 1, kv_blocks: int | None = None):
        self.model, self.comm = model, comm
        self.max_batch = max_batch  # sequences a batch may run at once
        self.config: ModelConfig = model.config
        self.plan: ShardPlan = model.plan
        self.max_context = model.max_context
        self.eos_token_ids = eos_token_ids
        self.device = model.embed_tokens.device
        self._ctrl = np.zeros(2, dtype=np.int64)  # (token id, 1 = go on / 0 = stop)
        kv_blocks = kv_blocks or blocks_for(self.max_context) * max_batch
        model.allocate_cache(kv_blocks)
        self.kv = BlockPool(kv_blocks)  # rank 0's bookkeeping (engine/kv.py)
        self.kv_tokens = kv_blocks * KV_BLOCK
        self._tables: dict[int, list] = {}  # sequence id -> [block table (int64), blocks in it]: every rank
        self.pool = None  # the PoolPlan it was loaded with (Engine.load): who holds what, in bytes

    @classmethod
    def load(cls, model_dir: str | Path, comm: Communicator, dtype: str | None = None, device: str = "cpu",
             max_context: int | None = None, weights: list[float] | None = None,
             eos_token_ids: frozenset[int] = frozenset(), progress=None, split="memory",
             max_memory=None, max_batch: int = 1, quantize: str | None = None, quant_group: int = 128,
             kv_tokens: int | None = None) -> "Engine":
        """Read the config, agree on one plan, and load this rank's shard on every rank.

        ``split``: "even", "memory" or per-rank weights (``weights`` is the same, older spelling);
        ``max_memory``: one budget for all ranks or one per rank ("6GiB", [bytes, ...]), for the
        weights plus the KV cache: ``kv_tokens`` positions, or by default ``max_context`` x
        ``max_batch`` lowered to what the budgets hold (at least one max_context sequence). If
        the plan does not fit, every rank raises the same PlexusError before any weight is read.
        """
        error, config, torch_dtype, ctx, layout, fmt = None, None, None, 0, None, None
        try:
            config = load_config(model_dir)
            torch_dtype = resolve_dtype(dtype, config)
            ctx = context_length(config, max_context)
            layout, fmt = quant_layout(config, quantize, quant_group, model_dir)
        except PlexusError as e:
            error = str(e)
        comm.agree(error)
        pool = agree_pool_plan(comm, config, torch_dtype, device, ctx, weights or split, max_memory, max_batch,
                               layout, kv_tokens)
        if hasattr(progress, "set_plan"):
            progress.set_plan(pool.plan)  # the load bar's total: this rank's share
        if comm.rank == 0:
            get_logger().info(pool.table())
        model = load_model(model_dir, config, pool.plan, comm, ctx, torch_dtype, device, progress,
                           (bits_of(quantize), quant_group) if quantize else None, fmt)
        engine = cls(model, comm, eos_token_ids or frozenset(config.eos_token_ids), pool.max_batch, pool.kv_blocks)
        engine.pool = pool
        if model.fused is not None and model.fused.group is not None:  # ranks of one node
            model.fused.take_rows(model, pool.spare_bytes(comm.rank))
        return engine

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    # ---- rank 0 ---------------------------------------------------------------------------

    def check_request(self, prompt_ids: list[int], max_tokens: int) -> None:
        check_request(prompt_ids, max_tokens, self.max_context, self.config.vocab_size, self.kv_tokens)

    def _take_blocks(self, positions: int) -> list[int]:
        """Rank 0, outside a batch: blocks for one sequence of ``positions``, taken at once."""
        n = blocks_for(positions)
        if n > self.kv.available:
            raise PlexusError(f"{positions} positions need {n * KV_BLOCK} tokens of KV cache; "
                              f"{self.kv.available * KV_BLOCK} are free")
        return [self.kv.take() for _ in range(n)]

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[int]:
        """Yield generated token ids (rank 0 only). Stops after EOS or ``max_tokens``; closing the
        iterator early (stop string, cancelled client) stops every rank too."""
        self.check_request(prompt_ids, params.max_tokens)
        sampler = Sampler(params)
        blocks = self._take_blocks(kv_positions(len(prompt_ids), params.max_tokens))
        self.comm.bcast_obj({"op": "generate", "ids": prompt_ids, "table": blocks})
        table = torch.tensor(blocks)
        stopped = False
        try:
            logits = self.model(torch.tensor([prompt_ids], device=self.device), 0, table=table)
            pos = len(prompt_ids)
            for i in range(params.max_tokens):
                token = sampler(logits[0, -1])
                last = token in self.eos_token_ids or i == params.max_tokens - 1
                yield token
                if last:
                    break
                self._broadcast_ctrl(token, 1)
                logits = self.model.step(token, pos, table)
                pos += 1
            self._broadcast_ctrl(0, 0)
            stopped = True
        finally:
            if not stopped:  # the consumer closed us between tokens
                self._broadcast_ctrl(0, 0)
            self.kv.release(blocks)

    def _broadcast_ctrl(self, token: int, go: int) -> None:
        if self.comm.size > 1:
            self._ctrl[0], self._ctrl[1] = token, go
            self.comm.bcast_(self._ctrl)

    def score(self, ids: list[int]) -> tuple[float, int]:
        """Rank 0: one window scored from position 0 (the KV cache is overwritten): the float64
        sum of -log p(ids[t+1] | ids[:t+1]) over every t, and how many tokens that is
        (len(ids) - 1: the first token is context only)."""
        if not 2 <= len(ids) <= self.max_context:
            raise PlexusError(f"a window to score needs 2 to {self.max_context} tokens, got {len(ids)}")
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise PlexusError(f"token id {bad[0]} is outside the vocabulary (size {self.config.vocab_size})")
        blocks = self._take_blocks(len(ids) - 1)
        try:
            self.comm.bcast_obj({"op": "score", "ids": list(ids), "table": blocks})
            return self._score(ids, blocks), len(ids) - 1
        finally:
            self.kv.release(blocks)

    @torch.inference_mode()
    def _score(self, ids: list[int], blocks: list[int]) -> float:
        """Every rank: the window's forward passes, SCORE_CHUNK positions at a time over ids[:-1]
        (the last token is only a target); rank 0 sums the negative log-likelihoods (0 elsewhere)."""
        total, inputs, table = 0.0, ids[:-1], torch.tensor(blocks)
        for start in range(0, len(inputs), SCORE_CHUNK):
            chunk = inputs[start:start + SCORE_CHUNK]
            logits = self.model(torch.tensor([chunk], device=self.device), start, last_only=False, table=table)
            if logits is not None:  # rank 0: (1, len(chunk), vocab)
                logits = logits[0].cpu() if logits.device.type == "mps" else logits[0]  # mps has no float64
                targets = torch.tensor(ids[start + 1:start + 1 + len(chunk)], device=logits.device)
                logp = torch.log_softmax(logits.double(), dim=-1)  # (len(chunk), vocab)
                total -= logp.gather(1, targets[:, None]).sum().item()
        return total

    # ---- batches (engine/batch.py drives them on rank 0) --------------------------------------

    def begin_batch(self) -> None:
        """Rank 0: the other ranks follow batch steps (``batch_step``) until ``end_batch``."""
        self.comm.bcast_obj({"op": "batch"})

    def batch_step(self, prefill: list[tuple[int, int, list[int]]], rows: list[tuple[int, int, int]],
                   grow: list[tuple[int, list[int]]] = (), drop: list[int] = ()) -> tuple:
        """Rank 0, inside a batch: one step on every rank. First the block tables change: the
        sequences in ``drop`` are forgotten, each (sequence id, blocks) in ``grow`` appends blocks
        to that sequence's table (a new id: a new table). Then ``prefill``: prompt chunks
        (sequence id, start, ids), each run on its own; ``rows``: decode rows (token, sequence
        id, position), run together. Returns (the last position's logits (vocab,) of each chunk,
        the rows' logits (n, vocab))."""
        step = {"prefill": prefill, "rows": rows, "grow": list(grow), "drop": list(drop)}
        self.comm.bcast_obj(step)
        return self._batch_step(step)

    def end_batch(self) -> None:
        self.comm.bcast_obj(None)
        self._tables.clear()

    def _table(self, sid: int) -> torch.Tensor:
        buf, n = self._tables[sid]
        return buf[:n]

    @torch.inference_mode()
    def _batch_step(self, step: dict) -> tuple:
        for sid in step["drop"]:
            self._tables.pop(sid, None)
        for sid, blocks in step["grow"]:
            entry = self._tables.setdefault(sid, [torch.empty(blocks_for(self.max_context), dtype=torch.long), 0])
            entry[0][entry[1]:entry[1] + len(blocks)] = torch.tensor(blocks, dtype=torch.long)
            entry[1] += len(blocks)
        chunks = []
        for sid, start, ids in step["prefill"]:
            logits = self.model(torch.tensor([ids], device=self.device), start, table=self._table(sid))
            chunks.append(None if logits is None else logits[0, -1].float().cpu())
        rows = step["rows"]
        logits = (self.model.step_rows([t for t, _, _ in rows], [self._table(s) for _, s, _ in rows],
                                       [p for _, _, p in rows]) if rows else None)
        return chunks, logits

    def ping(self) -> None:
        """A collective every rank joins (rank 0, while idle). A dead rank then shows up now,
        as an MPI error under ULFM or as a stall a watchdog sees, not at the next request."""
        if self.comm.size > 1:
            self.comm.bcast_obj({"op": "ping"})
            self.comm.barrier()

    def shutdown(self, error: str | None = None, now: bool = False) -> None:
        """Release the worker ranks from ``worker_loop`` (rank 0); with ``error`` they exit
        non-zero too (rank 0 prints the message). ``now`` tells them the launcher is about to
        kill the job, so they should exit at once rather than finalize MPI politely."""
        if self.comm.size > 1:
            self.comm.bcast_obj({"op": "shutdown", "error": error, "now": now})

    # ---- ranks > 0 -------------------------------------------------------------------------

    def worker_loop(self) -> dict:
        """Follow rank 0's work until it says shut down; return that shutdown message."""
        while True:
            cmd = self.comm.bcast_obj(poll_s=0.001)
            if cmd["op"] == "shutdown":
                if cmd.get("error"):
                    err = PlexusError(cmd["error"])
                    err.collective = True
                    raise err
                return cmd
            if cmd["op"] == "generate":
                self._follow(cmd["ids"], cmd["table"])
            elif cmd["op"] == "score":
                self._score(cmd["ids"], cmd["table"])
            elif cmd["op"] == "batch":
                while (step := self.comm.bcast_obj()) is not None:
                    self._batch_step(step)
                self._tables.clear()
            elif cmd["op"] == "ping":
                self.comm.barrier()

    @torch.inference_mode()
    def _follow(self, prompt_ids: list[int], blocks: list[int]) -> None:
        table = torch.tensor(blocks)
        self.model(torch.tensor([prompt_ids], device=self.device), 0, table=table)
        pos = len(prompt_ids)
        while True:
            self.comm.bcast_(self._ctrl)
            if int(self._ctrl[1]) == 0:
                return
            self.model.step(int(self._ctrl[0]), pos, table)
            pos += 1
