"""The KV cache's bookkeeping (plexus/engine/kv.py): blocks taken and given back, reservations,
and the prefix cache's keys, reference counts and least-recently-used eviction."""

from __future__ import annotations

import pytest

from plexus.engine.kv import BlockPool, prefix_keys
from plexus.parallel.sizes import KV_BLOCK


def test_prefix_keys_name_the_whole_prefix():
    a = list(range(3 * KV_BLOCK))
    b = a[:KV_BLOCK] + [7] + a[KV_BLOCK + 1:]  # differs in block 1 only
    ka, kb = prefix_keys(a, 3), prefix_keys(b, 3)
    assert len(ka) == 3 and len(set(ka)) == 3
    assert ka[0] == kb[0] and ka[1] != kb[1]
    assert ka[2] != kb[2]  # block 2's tokens are the same, but not what comes before them
    assert prefix_keys(a, 2) == ka[:2]
    # a token's bytes are not confused with its neighbours' (ids up to 2^32)
    assert prefix_keys([1, 256] + [0] * 14, 1) != prefix_keys([256, 1] + [0] * 14, 1)


def test_take_release_and_what_is_counted():
    pool = BlockPool(4)
    got = [pool.take() for _ in range(4)]
    assert sorted(got) == [0, 1, 2, 3] and pool.used == 4 and pool.available == 0
    with pytest.raises(RuntimeError):
        pool.take()
    pool.release(got[:2])
    assert pool.used == 2 and pool.available == 2 and pool.cached == 0
    pool.reserved = 1
    assert pool.available == 1


def test_a_registered_prefix_is_found_shared_and_evicted_last_used_first():
    pool = BlockPool(3)
    keys = prefix_keys(list(range(2 * KV_BLOCK)), 2)
    a, b = pool.take(), pool.take()
    pool.register(a, keys[0])
    pool.register(b, keys[1])
    assert pool.lookup(keys) == [a, b]  # while its writer still runs: shared
    pool.release([a, b])  # the writer is done: still referenced by the reader
    assert pool.used == 2 and pool.cached == 0
    pool.release([a, b])
    assert pool.used == 0 and pool.cached == 2 and pool.available == 3
    # a reader takes block a again (most recently used now), then lets go
    assert pool.lookup(keys[:1]) == [a]
    pool.release([a])
    c = pool.take()  # the free block first
    assert c not in (a, b) and pool.cached == 2
    d = pool.take()  # then the least recently used cached block: b, and its key is forgotten
    assert d == b and pool.evictions == 1 and pool.cached == 1
    assert pool.lookup(keys) == [a]  # the run stops where a key is missing
    pool.release([a, c, d])
    # a key already held by another block is not registered twice
    e = pool.take()
    pool.register(e, keys[0])
    pool.release([e])
    assert pool.lookup(keys[:1]) == [a]
