"""The shared-memory segment through which the ranks of one node sum their partial outputs
inside the fused decode step (struct Group in csrc/decode.c), and its layout."""

from __future__ import annotations

import ctypes
import os
import tempfile

import torch

from plexus.log import get_logger

LINE = 64  # bytes per flag in the node group's segment (one cache line)
GROUP_TIMEOUT_S = 120.0  # a rank that waits this long for another in the fused step gives up


class _Group(ctypes.Structure):  # struct Group in decode.c
    _fields_ = [("base", ctypes.c_void_p)] + [(n, ctypes.c_long) for n in ("ranks", "rank", "n", "stride", "seq")] + [
        ("timeout_s", ctypes.c_double), ("failed", ctypes.c_int), ("logits", ctypes.c_void_p), ("vocab", ctypes.c_long),
        ("lines", ctypes.c_void_p), ("act", ctypes.c_void_p), ("act_stride", ctypes.c_long), ("taken", ctypes.c_long),
        ("leave_own_tail", ctypes.c_int)]


class _NodeGroup:
    """The shared-memory segment the ranks of one node sum their partial outputs through
    (struct Group in decode.c): rank 0 makes a file in /dev/shm, every rank maps it, and it is
    unlinked at once, so it vanishes with the processes."""

    def __init__(self, memory: torch.Tensor, comm, n: int, vocab: int, act_floats: int):
        self.memory = memory  # keeps the mapping alive
        base, at = memory.data_ptr(), _offsets(comm.size, n, vocab, act_floats)
        self.struct = _Group(base, comm.size, comm.rank, n, _round16(n), 0, GROUP_TIMEOUT_S, 0, base + at["logits"],
                             vocab, base + at["lines"], base + at["act"], _round16(act_floats))
        self.ref = ctypes.byref(self.struct)


def _round16(n: int) -> int:
    return -(-n // 16) * 16  # whole cache lines of floats


def _offsets(ranks: int, n: int, vocab: int, act_floats: int) -> dict:
    """Byte offsets of the segment's parts (struct Group in decode.c) and its size: a flag line
    per rank, two sets of slots of n floats per rank, the logits, a ready and a claim line per
    rank, and an area per rank for the input of the rows another rank may take."""
    at = {"slots": ranks * LINE}
    at["logits"] = at["slots"] + 2 * ranks * _round16(n) * 4
    at["lines"] = at["logits"] + _round16(vocab) * 4
    at["act"] = at["lines"] + 2 * ranks * LINE
    at["size"] = at["act"] + ranks * _round16(act_floats) * 4
    return at


def _node_group(comm, n: int, vocab: int, act_floats: int) -> "_NodeGroup | None":
    """Collective over ranks that are all on one node; None (MPI is used instead) if rank 0
    could not make the segment. ``act_floats``: this rank's widest row-parallel input."""
    act_floats = max(comm.allgather_obj(act_floats))
    nbytes = _offsets(comm.size, n, vocab, act_floats)["size"]
    path, error = None, None
    if comm.rank == 0:
        try:
            fd, path = tempfile.mkstemp(prefix="plexus-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
            os.ftruncate(fd, nbytes)  # zero-filled: every flag starts at 0
            os.close(fd)
        except OSError as e:
            error, path = str(e), None
    path = comm.bcast_obj(path)
    if path is None:
        if comm.rank == 0:
            get_logger().warning("no shared memory for the node's ranks (%s); summing through MPI", error)
        return None
    try:
        memory = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        # each rank's process id after its flag: a waiting rank can tell a dead peer from a slow one
        memory[comm.rank * LINE + 8:comm.rank * LINE + 16].view(torch.int64)[0] = os.getpid()
    except RuntimeError as e:
        memory, error = None, f"rank {comm.rank}: {e}"
    errors = [e for e in comm.allgather_obj(error) if e]
    if comm.rank == 0:
        os.unlink(path)
    if errors:
        if comm.rank == 0:
            get_logger().warning("shared memory for the node's ranks failed (%s); summing through MPI", errors[0])
        return None
    return _NodeGroup(memory, comm, n, vocab, act_floats)
