"""The paged KV cache of one attention layer: this rank's KV heads in fixed blocks of KV_BLOCK
positions, from one pool that every sequence draws on.

A sequence's *block table* (a 1-D int64 tensor, on the CPU) lists the blocks that hold its
positions in order: position p is row ``p % KV_BLOCK`` of block ``table[p // KV_BLOCK]``. Which
blocks a sequence gets is rank 0's bookkeeping (engine/kv.py); every rank stores the same blocks
of its own heads. The pool is laid out (kv heads, blocks, KV_BLOCK, head_dim), as the C kernel
reads it (csrc/decode.c), so a run of consecutive blocks is one view and any other table one
gather.
"""

from __future__ import annotations

import torch

from plexus.parallel.hostmem import host_empty
from plexus.parallel.sizes import KV_BLOCK, blocks_for

__all__ = ["KV_BLOCK", "PagedKV", "blocks_for"]


class PagedKV:
    """K and V pools (kv heads, blocks, KV_BLOCK, head_dim) of one layer."""

    def __init__(self, num_kv_heads: int, head_dim: int, blocks: int, dtype: torch.dtype, device: torch.device):
        shape = (num_kv_heads, blocks, KV_BLOCK, head_dim)
        if device.type == "cpu":  # read every decode step, like the weights
            self.k, self.v = host_empty(shape, dtype).zero_(), host_empty(shape, dtype).zero_()
        else:
            self.k = torch.zeros(shape, dtype=dtype, device=device)
            self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.blocks = blocks
        # a prompt chunk's attention over the blocks where they lie, (q, table, start) -> output:
        # the C kernel's where it runs (models/kernels.py sets it), else None (gather, then SDPA)
        self.kernel = None

    def write(self, table: torch.Tensor, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (T, kv heads, head_dim) into positions start .. start+T-1 of the sequence ``table``
        (on the pool's device)."""
        pos = torch.arange(start, start + k.shape[0], device=table.device)
        block, row = table[pos // KV_BLOCK], pos % KV_BLOCK
        self.k[:, block, row] = k.transpose(0, 1)  # (kv heads, T, head_dim)
        self.v[:, block, row] = v.transpose(0, 1)

    def read(self, table: torch.Tensor, lo: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequence's keys and values at positions lo .. end-1: (1, kv heads, end - lo, head_dim)
        each; a view when its blocks are consecutive, else a gather of them."""
        first, last = lo // KV_BLOCK, blocks_for(end)
        ids = table[first:last]
        n = last - first
        b0 = int(ids[0])
        if int(ids[-1]) - b0 == n - 1 and (n == 1 or bool((ids[1:] - ids[:-1] == 1).all())):
            k, v = self.k[:, b0:b0 + n], self.v[:, b0:b0 + n]
        else:
            k, v = self.k.index_select(1, ids), self.v.index_select(1, ids)
        h, d = k.shape[0], k.shape[-1]
        k, v = k.reshape(h, n * KV_BLOCK, d), v.reshape(h, n * KV_BLOCK, d)
        off = lo - first * KV_BLOCK
        return k[None, :, off:off + end - lo], v[None, :, off:off + end - lo]
