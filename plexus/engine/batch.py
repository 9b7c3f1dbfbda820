"""Continuous batching on rank 0: many sequences advance together, one step at a time.

Each step runs every running sequence's next token as one row of a batched decode step (one
weight stream for all of them, ``CausalLM.step_rows``), plus prompt chunks of sequences being
admitted. Sequences join and leave between steps. A sequence is admitted when the KV cache can
promise it every block it may need (engine/kv.py); it takes them as it grows and gives them back
when it finishes or is cancelled. The other ranks follow each step's broadcast
(``Engine.batch_step``), which carries the changes to the block tables.

Prefix cache: the blocks of a prompt's whole chunks are kept under their prefix's key, and a
later prompt that starts with the same tokens starts from them (in whole chunks, leaving at
least its last token to run), so a chat's next turn prefills only what is new.

A sequence's results do not depend on what else runs: its decode rows are bitwise the same in any
batch (models/rows.py), and its prompt is cut into chunks of ``prefill_chunk`` tokens from
position 0 whatever the load (the load decides only how many chunks a step runs). So a request
served among many others gets exactly the tokens it gets alone. A reused prefix keeps that: a
block is kept only from a chunk that ran whole, which is what the same prompt alone would run
there, and a prompt resumes from a chunk boundary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from plexus.engine.constrain import Constraint
from plexus.engine.engine import Completion, kv_positions
from plexus.engine.kv import prefix_keys
from plexus.engine.sampling import Sampler, SamplingParams
from plexus.engine.tokenizer import IncrementalDecoder
from plexus.errors import PlexusError
from plexus.parallel.sizes import KV_BLOCK, blocks_for

PREFILL_CHUNK = 32  # prompt tokens per chunk: bounds what a joining prompt adds to a step (a guess, not yet measured)
IDLE_CHUNKS = 16  # chunks a step may run when no sequence is decoding (nothing waits on the step)


@dataclass(eq=False)
class Sequence:
    """One request in the batch: its prompt, sampling, KV blocks and result so far."""

    prompt_ids: list[int]
    params: SamplingParams
    sid: int  # its id in the step messages
    on_text: Callable[[str], None] | None = None
    cancelled: Callable[[], bool] = lambda: False
    tag: object = None  # the caller's (the scheduler's job)
    filled: int = 0  # positions of the KV cache written
    next_token: int | None = None  # sampled, to be fed at position ``filled``
    blocks: list[int] = field(default_factory=list)  # its block table
    reserved: int = 0  # blocks promised to it, not yet taken
    keys: list[bytes] = field(default_factory=list)  # prefix keys of its prompt's whole chunks' blocks
    reused: int = 0  # prompt tokens found in the prefix cache
    known: bool = False  # the other ranks hold its block table
    logprobs_sent: int = 0  # entries of result.logprobs passed to on_text so far
    result: Completion = field(init=False)

    def __post_init__(self):
        self.result = Completion(list(self.prompt_ids), logprobs=None if self.params.logprobs is None else [])
        self.sampler = Sampler(self.params)
        self.decoder: IncrementalDecoder | None = None
        self.constraint: Constraint | None = None
        self.started = time.perf_counter()

    @property
    def prefilling(self) -> bool:
        return self.filled < len(self.prompt_ids)


class BatchRunner:
    """Rank 0's batch: ``add`` sequences while there is ``room``, call ``step`` while any run."""

    def __init__(self, engine, tokenizer=None, prefill_chunk: int = PREFILL_CHUNK, max_batch: int | None = None,
                 prefix_cache: bool = True):
        if prefill_chunk < 1 or prefill_chunk % KV_BLOCK:
            raise PlexusError(f"the prefill chunk must be a positive multiple of {KV_BLOCK} tokens (a KV block), "
                              f"got {prefill_chunk}")
        self.engine, self.tokenizer, self.kv = engine, tokenizer, engine.kv
        self.prefill_chunk, self.prefix_cache = prefill_chunk, prefix_cache
        self.max_batch = min(engine.max_batch, max_batch or engine.max_batch)
        self.running: list[Sequence] = []
        self._in_batch = False
        self._next_sid = 0
        self._grow: dict[int, list[int]] = {}  # blocks the other ranks learn of with the next step
        self._drop: list[int] = []  # sequences they forget then

    @property
    def room(self) -> int:
        return self.max_batch - len(self.running)

    def add(self, prompt_ids: list[int], params: SamplingParams, on_text=None, cancelled=lambda: False,
            tag=None) -> Sequence | None:
        """A new sequence, run from the next step; None if the KV cache cannot promise it its
        blocks now (try again after a step); a PlexusError if the request can never run."""
        self.engine.check_request(prompt_ids, params.max_tokens)
        if not self.room:
            raise RuntimeError("the batch is full (check room first)")
        if params.grammar is not None and self.tokenizer is None:
            raise PlexusError("constrained output needs the tokenizer")
        constraint = Constraint(self.tokenizer, params.grammar) if params.grammar is not None else None
        n, c = len(prompt_ids), self.prefill_chunk
        keys = prefix_keys(prompt_ids, n // c * c // KV_BLOCK) if self.prefix_cache else []
        # whole chunks only, and never the last token: its logits are the first sample's
        hits = self.kv.lookup(keys[:(n - 1) // c * c // KV_BLOCK])
        keep = len(hits) * KV_BLOCK // c * c // KV_BLOCK
        self.kv.release(hits[keep:])
        hits = hits[:keep]
        need = blocks_for(kv_positions(n, params.max_tokens)) - len(hits)
        if need > self.kv.available:
            self.kv.release(hits)
            return None
        self.kv.reserved += need
        seq = Sequence(list(prompt_ids), params, self._next_sid, on_text, cancelled, tag, filled=len(hits) * KV_BLOCK,
                       blocks=hits, reserved=need, keys=keys, reused=len(hits) * KV_BLOCK)
        self._next_sid += 1
        self.kv.hit_tokens += seq.reused
        self._grow[seq.sid] = list(hits)
        if self.tokenizer is not None:
            seq.decoder = IncrementalDecoder(self.tokenizer, params.stop)
        seq.constraint = constraint
        self.running.append(seq)
        return seq

    def _cover(self, seq: Sequence, positions: int) -> None:
        """Blocks for ``seq``'s first ``positions`` positions, from its reservation."""
        while len(seq.blocks) * KV_BLOCK < positions:
            b = self.kv.take()
            seq.reserved -= 1
            self.kv.reserved -= 1
            seq.blocks.append(b)
            self._grow.setdefault(seq.sid, []).append(b)

    def step(self) -> list[Sequence]:
        """One step on every rank; returns the sequences that finished in it (their ``result``
        final: finish_reason "stop", "length" or "cancelled")."""
        done = [s for s in self.running if s.cancelled()]
        for seq in done:
            self._finish(seq, "cancelled")
        decoding = [s for s in self.running if not s.prefilling]
        chunks, budget = [], self.prefill_chunk * (1 if decoding else IDLE_CHUNKS)
        for seq in self.running:
            while seq.prefilling and budget > 0:
                # chunks end at multiples of prefill_chunk, so where they fall never depends on the load
                end = min(len(seq.prompt_ids), (seq.filled // self.prefill_chunk + 1) * self.prefill_chunk)
                chunks.append((seq, seq.filled, end))
                budget -= end - seq.filled
                self._cover(seq, end)
                seq.filled = end
        if not chunks and not decoding:
            if not self.running:
                self.close()
            return done
        if not self._in_batch:
            self.engine.begin_batch()
            self._in_batch = True
        for seq in decoding:
            self._cover(seq, seq.filled + 1)
        prefill = [(s.sid, a, s.prompt_ids[a:b]) for s, a, b in chunks]
        rows = [(s.next_token, s.sid, s.filled) for s in decoding]
        grow, self._grow = list(self._grow.items()), {}
        drop, self._drop = self._drop, []
        for seq in self.running:
            seq.known = True
        chunk_logits, row_logits = self.engine.batch_step(prefill, rows, grow, drop)
        for seq, a, end in chunks:
            if end - a == self.prefill_chunk:  # a whole chunk: its blocks are what the prompt alone puts there
                for i in range(a // KV_BLOCK, min(end // KV_BLOCK, len(seq.keys))):
                    self.kv.register(seq.blocks[i], seq.keys[i])
        for seq in decoding:
            seq.filled += 1
        for (seq, _, end), logits in zip(chunks, chunk_logits):
            if end == len(seq.prompt_ids):
                self._emit(seq, logits, done)
        for i, seq in enumerate(decoding):
            self._emit(seq, row_logits[i], done)
        if not self.running:
            self.close()
        return done

    def close(self) -> None:
        """Release the other ranks from the batch (they go back to waiting for work, forgetting
        the block tables; any sequence still here is sent whole with the next step)."""
        if self._in_batch:
            self._in_batch = False
            self.engine.end_batch()
            self._drop = []
            self._grow = {s.sid: list(s.blocks) for s in self.running}
            for seq in self.running:
                seq.known = False

    def _emit(self, seq: Sequence, logits, done: list) -> None:
        raw = logits
        if seq.constraint is not None:
            logits = seq.constraint.mask(logits)
        token = seq.sampler(logits)
        if seq.params.logprobs is not None:
            lp = torch.log_softmax(raw.float(), -1)
            top = torch.topk(lp, seq.params.logprobs) if seq.params.logprobs else None
            seq.result.logprobs.append((token, float(lp[token]), [] if top is None else
                                        list(zip(top.indices.tolist(), top.values.tolist()))))
        if seq.constraint is not None:
            seq.constraint.advance(token)
        r = seq.result
        if r.ttft_s is None:
            r.ttft_s = time.perf_counter() - seq.started
        r.token_ids.append(token)
        seq.next_token = token
        reason = None
        if token in self.engine.eos_token_ids:
            reason = "stop"
        elif seq.decoder is not None:
            delta = seq.decoder.add(token)
            if delta:
                self._text(seq, delta)
            if seq.decoder.stopped:
                reason, r.stop_sequence = "stop", seq.decoder.matched
        if reason is None and seq.constraint is not None and seq.constraint.finished:
            reason = "stop"  # the grammar is complete
        if reason is None and len(r.token_ids) >= seq.params.max_tokens:
            reason = "length"
        if reason is None and seq.cancelled():
            reason = "cancelled"
        if reason:
            self._finish(seq, reason)
            done.append(seq)

    @staticmethod
    def _text(seq: Sequence, delta: str) -> None:
        """Pass on a piece of text, with the log-probabilities of the tokens since the last piece
        when the request asked for them (``on_text(delta, entries)``)."""
        if seq.on_text is None:
            return
        if seq.result.logprobs is None:
            seq.on_text(delta)
            return
        entries = seq.result.logprobs[seq.logprobs_sent:]
        seq.logprobs_sent += len(entries)
        seq.on_text(delta, entries)

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.result.finish_reason = reason
        if seq.decoder is not None:
            tail = seq.decoder.finish()
            if tail or (seq.result.logprobs or ())[seq.logprobs_sent:]:
                self._text(seq, tail)
            seq.result.text = seq.decoder.text
        self.running.remove(seq)
        self.kv.release(seq.blocks)
        self.kv.reserved -= seq.reserved
        seq.reserved = 0
        self._grow.pop(seq.sid, None)
        if seq.known:
            self._drop.append(seq.sid)
