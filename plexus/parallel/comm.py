"""The Communicator: the only module in Plexus that imports mpi4py.

One object is created at start-up and passed explicitly to the parallel layers and the engine.
Tensor collectives use mpi4py's upper-case buffer methods on the tensor's own memory (zero-copy
for contiguous CPU tensors); device tensors are staged through host memory, so ranks of
different device types can share one job. MPI has no bf16/fp16 datatype: sums are done in
float32, and pure data movement (gather, broadcast) sends the raw bytes. With one rank every
collective returns at once.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Sequence

import torch

from plexus.errors import PlexusError

_REDUCE_DTYPES = (torch.float32, torch.float64, torch.int32, torch.int64)


def _as_bytes(t: torch.Tensor):
    """A contiguous CPU tensor's memory as a flat numpy view, without copying."""
    return t.reshape(-1).view(torch.uint8).numpy()


class Communicator:
    """Rank, world size and the handful of collectives tensor parallelism needs."""

    def __init__(self, mpi_comm: Any = None):
        from mpi4py import MPI

        self._MPI = MPI
        self.comm = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        self.rank: int = self.comm.Get_rank()
        self.size: int = self.comm.Get_size()
        self.hostname = socket.gethostname()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank: int = node.Get_rank()
        self.local_size: int = node.Get_size()
        node.Free()

    @classmethod
    def self_only(cls) -> "Communicator":
        """A world of one rank (COMM_SELF), whatever the launcher started."""
        from mpi4py import MPI

        return cls(MPI.COMM_SELF)

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    # ---- tensor collectives -------------------------------------------------------------

    def allreduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over all ranks, in place, and return it."""
        if self.size == 1:
            return t
        host = t if t.device.type == "cpu" and t.is_contiguous() else t.detach().to("cpu").contiguous()
        work = host if host.dtype in _REDUCE_DTYPES else host.float()  # MPI has no bf16/fp16 sum
        self.comm.Allreduce(self._MPI.IN_PLACE, work.reshape(-1).numpy())
        if work is not t:
            t.copy_(work)
        return t

    def allgather(self, t: torch.Tensor, dim: int = -1, sizes: Sequence[int] | None = None) -> torch.Tensor:
        """Concatenate every rank's ``t`` along ``dim``; ``sizes`` gives each rank's length there
        when shards are uneven (default: all equal to this rank's)."""
        return self._gather(t, dim, sizes, root=None)

    def gather(self, t: torch.Tensor, dim: int = -1, sizes: Sequence[int] | None = None, root: int = 0):
        """Like ``allgather`` but only ``root`` receives the result; other ranks get None."""
        return self._gather(t, dim, sizes, root=root)

    def _gather(self, t, dim, sizes, root):
        if self.size == 1:
            return t
        dim = dim % t.dim()
        sizes = list(sizes) if sizes is not None else [t.shape[dim]] * self.size
        front = t.detach().movedim(dim, 0).to("cpu").contiguous()  # (len_r, ...rest)
        rest = front.shape[1:]
        row_bytes = front[0:1].numel() * front.element_size() if front.shape[0] else (
            int(torch.tensor(rest).prod()) * front.element_size())
        counts = [n * row_bytes for n in sizes]
        displs = [sum(counts[:i]) for i in range(self.size)]
        out = None
        if root is None or self.rank == root:
            out = torch.empty((sum(sizes), *rest), dtype=t.dtype)
            recv = [_as_bytes(out), (counts, displs), self._MPI.BYTE]
        else:
            recv = None
        send = [_as_bytes(front), self._MPI.BYTE]
        if root is None:
            self.comm.Allgatherv(send, recv)
        else:
            self.comm.Gatherv(send, recv, root=root)
            if self.rank != root:
                return None
        return out.movedim(0, dim).to(t.device)

    def bcast_(self, t: torch.Tensor, root: int = 0) -> torch.Tensor:
        """Overwrite ``t`` on every rank with ``root``'s values (shapes must already agree). A
        numpy array goes to MPI as it is: the engine's per-token control message is one, since
        the torch-to-numpy view costs ~0.1 ms when a decode step has just evicted the caches."""
        if self.size == 1:
            return t
        if not isinstance(t, torch.Tensor):
            self.comm.Bcast(t, root=root)
            return t
        host = t if t.device.type == "cpu" and t.is_contiguous() else t.detach().to("cpu").contiguous()
        self.comm.Bcast([_as_bytes(host), self._MPI.BYTE], root=root)
        if host is not t:
            t.copy_(host)
        return t

    def sendrecv_(self, send: torch.Tensor, dest: int, recv: torch.Tensor, source: int) -> torch.Tensor:
        """Send ``send`` to rank ``dest`` while receiving ``recv`` (overwritten, returned) from
        rank ``source``: contiguous CPU tensors, as raw bytes (every rank calls it)."""
        self.comm.Sendrecv([_as_bytes(send), self._MPI.BYTE], dest=dest, recvbuf=[_as_bytes(recv), self._MPI.BYTE],
                           source=source)
        return recv

    # ---- small Python objects (pickled: only ever our own control messages) -------------

    def bcast_obj(self, obj: Any = None, root: int = 0, poll_s: float | None = None) -> Any:
        """``root``'s object on every rank. Always a non-blocking broadcast underneath (MPI does
        not match blocking with non-blocking collectives), so a receiver may instead poll with
        ``poll_s`` seconds of sleep between tests: idle worker ranks then do not spin a core."""
        if self.size == 1:
            return obj
        import pickle

        import numpy as np

        data = pickle.dumps(obj) if self.rank == root else b""
        n = np.array([len(data)], dtype=np.int64)
        self._wait(self.comm.Ibcast(n, root=root), poll_s)
        buf = np.frombuffer(bytearray(data), dtype=np.uint8) if self.rank == root else np.empty(n[0], np.uint8)
        self._wait(self.comm.Ibcast(buf, root=root), poll_s)
        return obj if self.rank == root else pickle.loads(buf.tobytes())

    @staticmethod
    def _wait(req, poll_s: float | None) -> None:
        if poll_s is None:
            req.Wait()
            return
        while not req.Test():
            time.sleep(poll_s)

    def allgather_obj(self, obj: Any) -> list:
        return [obj] if self.size == 1 else self.comm.allgather(obj)

    def barrier(self) -> None:
        if self.size > 1:
            self.comm.Barrier()

    def agree(self, error: str | None) -> None:
        """Collective error check: if any rank reports an error, every rank raises it.

        Used around work that can fail on one rank only (reading its slice of a file),
        so that the others do not wait forever in the next collective.
        """
        errors = self.allgather_obj(error)
        for r, e in enumerate(errors):
            if e is not None:
                err = PlexusError(e if self.size == 1 or r == 0 else f"{e} (on rank {r})")
                err.collective = True  # every rank raises it; rank 0 alone prints it
                raise err

    def abort(self, code: int = 1) -> None:
        if self.size > 1:
            self.comm.Abort(code)


def launcher_rank() -> int | None:
    """This process's rank as the launcher set it in the environment (None if unknown): for
    choosing who speaks before MPI is up, e.g. one usage error instead of one per rank."""
    for var in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return None


def launcher_world_size() -> int:
    """The world size the launcher meant to start, from its environment (1 if unknown)."""
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    if "SLURM_STEP_ID" in os.environ:
        n = os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS") or "1"
        if n.isdigit():
            return int(n)
    return 1


def check_world(comm: Communicator) -> None:
    """Refuse to run N independent copies: a launcher that started N tasks without wiring
    them together (plain ``srun`` with no PMIx plugin) gives every task a world of size 1."""
    expected = launcher_world_size()
    if comm.size == 1 and expected > 1:
        raise PlexusError(
            f"the launcher started {expected} tasks but MPI sees a world of 1: the ranks are not connected "
            "(under Slurm use 'srun --mpi=pmix', or run mpirun inside the allocation)")
