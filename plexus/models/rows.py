"""Decode steps of several sequences at once through the kernel (csrc/rows.h): one stream of the
weights for every row, each row with its own token, position and KV block table.

Batch invariance: every row's arithmetic is its own -- the kernel's dot products, norms and
attention per row, and on several ranks the partial outputs summed in rank order, element by
element (``ordered_sum``), never by an MPI reduction whose order may change with the message's
size -- so a sequence's logits are bitwise the same whatever else is in the step.
"""

from __future__ import annotations

import ctypes

import torch

from plexus.models.cstructs import _Row, _RowScratch
from plexus.models.paged import KV_BLOCK


def ordered_sum(comm, t: torch.Tensor) -> None:
    """t (float32, contiguous) = the sum of every rank's t, in rank order for each element: the
    bits do not depend on t's length (an MPI allreduce may split and reorder with the size)."""
    parts = comm.allgather(t.view(1, -1), dim=0)  # (ranks, n)
    out = t.view(-1)
    out.copy_(parts[0])
    for r in range(1, comm.size):
        out.add_(parts[r])


class RowStepper:
    """A FusedDecoder's batched step, with scratch for as many rows as it has seen."""

    def __init__(self, fused):
        self.fused, self.capacity, self._bufs = fused, 0, []

    def _scratch(self, n: int, threads: int):
        h, qkv, attn, gate_up, ctx = self.fused._sizes
        if not self._bufs or n > self.capacity or threads * ctx > self._bufs[-1].numel():
            self.capacity = max(n, self.capacity)
            self._bufs = [torch.empty(self.capacity * w) for w in (h, h, h, qkv, attn, gate_up)]
            self._bufs.append(torch.empty(threads * ctx))
            self._struct = _RowScratch(*(b.data_ptr() for b in self._bufs))
        return ctypes.byref(self._struct)

    def __call__(self, tokens: list[int], tables: list[torch.Tensor], positions: list[int]) -> torch.Tensor | None:
        f, n, threads = self.fused, len(tokens), torch.get_num_threads()
        scratch = self._scratch(n, threads)
        if any(len(t) * KV_BLOCK <= p or not t.is_contiguous() for t, p in zip(tables, positions)):
            raise ValueError("a row's block table does not cover its position")
        rows = (_Row * n)(*(_Row(t, p, s.data_ptr()) for t, s, p in zip(tokens, tables, positions)))
        comm, lib, ends = f.comm, f.lib, ctypes.byref(f.ends)
        cos, sin, rope_row = f._cos, f._sin, f._rope_row // 4
        if comm.size == 1:
            logits = torch.empty(n, f.vocab)
            failed = lib.plexus_step_rows(f.layers, len(f._layer_ptrs), ends, scratch, rows, n, logits.data_ptr(),
                                          cos, sin, rope_row, threads)
            self._check(failed, n)
            return logits
        h = f._sizes[0]
        x, out = self._bufs[0][:n * h], self._bufs[1][:n * h]
        lib.plexus_rows_embed(ends, scratch, rows, n)
        ordered_sum(comm, x)
        for i, layer in enumerate(f._layer_ptrs):
            for mlp in (0, 1):
                failed = lib.plexus_rows_half(layer, scratch, rows, n, mlp, i > 0 or mlp, cos, sin, rope_row, threads)
                self._check(failed, n)
                ordered_sum(comm, out)
        local = torch.empty(n, f.vocab_rows)
        self._check(lib.plexus_rows_head(ends, scratch, n, local.data_ptr(), threads), n)
        return f.lm_head.gather(local)  # (n, vocab) on rank 0

    @staticmethod
    def _check(failed: int, n: int) -> None:
        if failed:
            raise MemoryError(f"a batched decode step of {n} rows could not allocate its scratch")
