"""Continuous batching on rank 0: many sequences advance together, one step at a time.

Each step runs every running sequence's next token as one row of a batched decode step (one
weight stream for all of them, ``CausalLM.step_rows``), plus prompt chunks of sequences being
admitted. Sequences join and leave between steps; a finished or cancelled one frees its KV-cache
slot at once. The other ranks follow each step's broadcast (``Engine.batch_step``).

A sequence's results do not depend on what else runs: its decode rows are bitwise the same in any
batch (models/rows.py), and its prompt is cut into chunks of ``prefill_chunk`` tokens from
position 0 whatever the load (the load decides only how many chunks a step runs). So a request
served among many others gets exactly the tokens it gets alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from plexus.engine.engine import Completion
from plexus.engine.sampling import Sampler, SamplingParams
from plexus.engine.tokenizer import IncrementalDecoder

PREFILL_CHUNK = 32  # prompt tokens per chunk: bounds what a joining prompt adds to a step (a guess, not yet measured)
IDLE_CHUNKS = 16  # chunks a step may run when no sequence is decoding (nothing waits on the step)


@dataclass(eq=False)
class Sequence:
    """One request in the batch: its prompt, sampling, KV-cache slot and result so far."""

    prompt_ids: list[int]
    params: SamplingParams
    slot: int
    on_text: Callable[[str], None] | None = None
    cancelled: Callable[[], bool] = lambda: False
    tag: object = None  # the caller's (the scheduler's job)
    filled: int = 0  # positions of the KV cache written
    next_token: int | None = None  # sampled, to be fed at position ``filled``
    result: Completion = field(init=False)

    def __post_init__(self):
        self.result = Completion(list(self.prompt_ids))
        self.sampler = Sampler(self.params)
        self.decoder: IncrementalDecoder | None = None
        self.started = time.perf_counter()

    @property
    def prefilling(self) -> bool:
        return self.filled < len(self.prompt_ids)


class BatchRunner:
    """Rank 0's batch: ``add`` sequences while there is ``room``, call ``step`` while any run."""

    def __init__(self, engine, tokenizer=None, prefill_chunk: int = PREFILL_CHUNK, max_batch: int | None = None):
        self.engine, self.tokenizer = engine, tokenizer
        self.prefill_chunk = prefill_chunk
        self.max_batch = min(engine.max_batch, max_batch or engine.max_batch)
        self.free = list(range(self.max_batch))[::-1]  # slot 0 first
        self.running: list[Sequence] = []
        self._in_batch = False

    @property
    def room(self) -> int:
        return len(self.free)

    def add(self, prompt_ids: list[int], params: SamplingParams, on_text=None, cancelled=lambda: False,
            tag=None) -> Sequence:
        """A new sequence, run from the next step (a PlexusError if the request cannot run)."""
        self.engine.check_request(prompt_ids, params.max_tokens)
        if not self.free:
            raise RuntimeError("no free slot in the batch (check room first)")
        seq = Sequence(list(prompt_ids), params, self.free.pop(), on_text, cancelled, tag)
        if self.tokenizer is not None:
            seq.decoder = IncrementalDecoder(self.tokenizer, params.stop)
        self.running.append(seq)
        return seq

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
                seq.filled = end
        if not chunks and not decoding:
            if not self.running:
                self.close()
            return done
        if not self._in_batch:
            self.engine.begin_batch()
            self._in_batch = True
        prefill = [(s.slot, a, s.prompt_ids[a:b]) for s, a, b in chunks]
        rows = [(s.next_token, s.slot, s.filled) for s in decoding]
        chunk_logits, row_logits = self.engine.batch_step(prefill, rows)
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
        """Release the other ranks from the batch (they go back to waiting for work)."""
        if self._in_batch:
            self._in_batch = False
            self.engine.end_batch()

    def _emit(self, seq: Sequence, logits, done: list) -> None:
        token = seq.sampler(logits)
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
            if delta and seq.on_text:
                seq.on_text(delta)
            if seq.decoder.stopped:
                reason = "stop"
        if reason is None and len(r.token_ids) >= seq.params.max_tokens:
            reason = "length"
        if reason is None and seq.cancelled():
            reason = "cancelled"
        if reason:
            self._finish(seq, reason)
            done.append(seq)

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.result.finish_reason = reason
        if seq.decoder is not None:
            tail = seq.decoder.finish()
            if tail and seq.on_text:
                seq.on_text(tail)
            seq.result.text = seq.decoder.text
        self.running.remove(seq)
        self.free.append(seq.slot)
