"""Rank 0's bookkeeping of the paged KV cache: which blocks are free, which sequences use which,
and which hold a prompt prefix that a later request may reuse (the prefix cache).

Every rank has the same pool of blocks (models/paged.py); only rank 0 decides who gets which,
and the step messages tell the others (engine/batch.py). A block is *free* (nothing in it
worth keeping), *in use* (referenced by one or more sequences), or *cached*: no sequence uses it,
but it holds a prompt prefix under its key, and stays until the pool needs it (least recently
used first).

A prefix's key chains the block's tokens to the key of the block before it (SHA-256), so a block
is only ever found by a prompt that starts with exactly the same tokens. Reserving: a sequence
admitted with ``max_tokens`` is promised every block it may come to need, so no running sequence
ever waits for a block or is evicted; the blocks are taken as it grows.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from plexus.parallel.sizes import KV_BLOCK


def prefix_keys(ids: list[int], blocks: int) -> list[bytes]:
    """The keys of the first ``blocks`` whole blocks of ``ids``: key i names tokens 0 ..
    (i+1) KV_BLOCK - 1 exactly."""
    keys, key = [], b""
    for i in range(blocks):
        chunk = ids[i * KV_BLOCK:(i + 1) * KV_BLOCK]
        key = hashlib.sha256(key + b"".join(t.to_bytes(4, "little") for t in chunk)).digest()
        keys.append(key)
    return keys


class BlockPool:
    """``blocks`` KV blocks: take, release, reserve, and look prefixes up."""

    def __init__(self, blocks: int):
        self.blocks = blocks
        self._free = list(range(blocks))[::-1]  # block 0 first
        self._refs = [0] * blocks
        self._key = [None] * blocks  # the prefix a cached or in-use block holds, if any
        self._by_key: dict[bytes, int] = {}
        self._cached: OrderedDict[int, None] = OrderedDict()  # unreferenced, keyed; oldest first
        self.reserved = 0  # blocks promised to running sequences, not yet taken
        self.hit_tokens = 0  # prompt tokens served from the cache, ever
        self.evictions = 0

    @property
    def available(self) -> int:
        """Blocks a new sequence may be promised: free or cached, less those already promised."""
        return len(self._free) + len(self._cached) - self.reserved

    @property
    def used(self) -> int:
        """Blocks some sequence references."""
        return self.blocks - len(self._free) - len(self._cached)

    @property
    def cached(self) -> int:
        return len(self._cached)

    def take(self) -> int:
        """A block for a sequence to write: a free one, else the least recently used cached one
        (its prefix forgotten)."""
        if self._free:
            b = self._free.pop()
        elif self._cached:
            b, _ = self._cached.popitem(last=False)
            del self._by_key[self._key[b]]
            self._key[b] = None
            self.evictions += 1
        else:
            raise RuntimeError("the KV cache has no block left (a sequence took more than it reserved)")
        self._refs[b] = 1
        return b

    def release(self, blocks: list[int]) -> None:
        """A sequence is done with ``blocks``: each goes back (cached if it holds a prefix)."""
        for b in blocks:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if self._key[b] is not None:
                    self._cached[b] = None  # the most recently used
                else:
                    self._free.append(b)

    def lookup(self, keys: list[bytes]) -> list[int]:
        """The blocks holding the longest run of ``keys`` from the first, each now referenced
        once more by the caller (``release`` them when done)."""
        found = []
        for key in keys:
            b = self._by_key.get(key)
            if b is None:
                break
            if self._refs[b] == 0:
                del self._cached[b]
            self._refs[b] += 1
            found.append(b)
        return found

    def register(self, block: int, key: bytes) -> None:
        """``block`` (in use) now holds the prefix ``key``; if another block already does, this one
        stays unkeyed (freed, not cached, when released)."""
        if key not in self._by_key and self._key[block] is None:
            self._by_key[key] = block
            self._key[block] = key
