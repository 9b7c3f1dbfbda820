"""The Communicator under pytest-mpi: every test body runs on COMM_WORLD (marked
``mpi(min_size=2)``; skipped without ``--with-mpi``) and on ``Communicator.self_only()`` (a world
of one, which must short-circuit). Each rank builds deterministic inputs from its rank and checks
closed-form results, as Megatron's tests do.

    mpirun -n 2 python -m pytest --with-mpi tests/test_comm_mpi.py
    mpirun -n 3 python -m pytest --with-mpi tests/test_comm_mpi.py
    mpirun -n 4 --oversubscribe python -m pytest --with-mpi tests/test_comm_mpi.py

A failing assertion on one rank can leave the others in a collective, so every test has a
thread-method timeout (it kills the process, and mpirun then ends the job).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from plexus.errors import PlexusError

pytestmark = pytest.mark.timeout(60, method="thread")

WORLD = pytest.param("world", marks=pytest.mark.mpi(min_size=2), id="world")
SELF = pytest.param("self", id="self")


@pytest.fixture(params=[WORLD, SELF])
def comm(request):
    from plexus.parallel.comm import Communicator

    return Communicator() if request.param == "world" else Communicator.self_only()


def tri(n: int) -> int:
    """1 + 2 + ... + n."""
    return n * (n + 1) // 2


def test_rank_and_size(comm):
    from mpi4py import MPI

    assert 0 <= comm.rank < comm.size
    assert comm.is_root == (comm.rank == 0)
    if comm.size == 1:
        assert comm.rank == 0
    else:
        assert comm.size == MPI.COMM_WORLD.Get_size() and comm.rank == MPI.COMM_WORLD.Get_rank()
    assert 1 <= comm.local_size <= comm.size and 0 <= comm.local_rank < comm.local_size


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_allreduce_float(comm, dtype):
    n = comm.size
    t = torch.arange(12, dtype=dtype).reshape(3, 4) * (comm.rank + 1) + 0.25
    out = comm.allreduce_(t)
    assert out is t  # in place
    want = torch.arange(12, dtype=torch.float64).reshape(3, 4) * tri(n) + 0.25 * n
    assert torch.equal(t, want.to(dtype))


def test_allreduce_float64_keeps_double_precision(comm):
    # 1 + 1e-12 per rank is not representable in float32: a float32 path would lose it
    t = torch.full((5,), 1.0 + 1e-12 * (comm.rank + 1), dtype=torch.float64)
    comm.allreduce_(t)
    assert torch.allclose(t, torch.full((5,), comm.size + 1e-12 * tri(comm.size), dtype=torch.float64),
                          rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_allreduce_int(comm, dtype):
    big = 2 ** 40 if dtype == torch.int64 else 2 ** 20  # int64: beyond float64's exact integers with the + r
    t = torch.tensor([big * (comm.rank + 1) + comm.rank, -comm.rank, 7], dtype=dtype)
    comm.allreduce_(t)
    n = comm.size
    assert t.tolist() == [big * tri(n) + tri(n - 1), -tri(n - 1), 7 * n]
    assert t.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_allreduce_half_precision(comm, dtype):
    """MPI has no bf16/fp16 type. Rank-dependent values whose exact sum is checked:
    - element 0: rank 0 adds a big value B, every other rank adds 1. Summed pairwise in the
      half dtype, B + 1 rounds back to B each time; summed in float32 the result is the correctly
      rounded B + (n - 1) (for n >= 3 a different number).
    - element 1 (fp16 only matters): two ranks add 60000 and the rest -60000; in fp16 the
      partial sum 120000 overflows to inf, in float32 the total is finite for n >= 3.
    - element 2: small fractions, rank-scaled."""
    n, r = comm.size, comm.rank
    big = 256.0 if dtype == torch.bfloat16 else 2048.0  # where the spacing of the format is 2
    exact = torch.tensor([big + (n - 1), 60000.0 * (2 - max(n - 2, 0)) if n >= 2 else 60000.0,
                          0.125 * tri(n)], dtype=torch.float64)
    mine = [big if r == 0 else 1.0, 60000.0 if r < 2 else -60000.0, 0.125 * (r + 1)]
    t = torch.tensor(mine, dtype=dtype)
    comm.allreduce_(t)
    assert t.dtype == dtype
    want = exact.to(dtype)
    assert torch.equal(t, want), (t, want)


def test_allreduce_non_contiguous_view_in_place(comm):
    base = torch.zeros(4, 6)
    view = base[:, 1:4]  # not contiguous
    view.fill_(comm.rank + 1)
    comm.allreduce_(view)
    assert torch.all(base[:, 1:4] == tri(comm.size))
    assert torch.all(base[:, 0] == 0) and torch.all(base[:, 4:] == 0)


def _shard(rank: int, rows: int, cols: int, dtype=torch.float32) -> torch.Tensor:
    """Rank ``rank``'s block: entry (i, j) = 1000*rank + 10*i + j, so every value says where it came from."""
    i = torch.arange(rows).unsqueeze(1)
    j = torch.arange(cols).unsqueeze(0)
    return (1000 * rank + 10 * i + j).to(dtype)


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_allgather_even(comm, dim):
    n = comm.size
    mine = _shard(comm.rank, 3, 4)
    if dim == 0:
        want = torch.cat([_shard(r, 3, 4) for r in range(n)], dim=0)
    else:
        want = torch.cat([_shard(r, 3, 4) for r in range(n)], dim=1)
    assert torch.equal(comm.allgather(mine, dim=dim), want)


@pytest.mark.parametrize("dim", [0, 1])
def test_allgather_uneven_sizes(comm, dim):
    """Rank r holds r + 1 rows (or columns), as vocabulary shards of an odd vocab do."""
    n = comm.size
    sizes = [r + 1 for r in range(n)]
    shape = lambda r: (sizes[r], 5) if dim == 0 else (5, sizes[r])  # noqa: E731
    mine = _shard(comm.rank, *shape(comm.rank))
    want = torch.cat([_shard(r, *shape(r)) for r in range(n)], dim=dim)
    assert torch.equal(comm.allgather(mine, dim=dim, sizes=sizes), want)


def test_allgather_three_dims_bf16(comm):
    n = comm.size
    mine = torch.full((2, 3, 2), comm.rank + 1, dtype=torch.bfloat16)
    out = comm.allgather(mine, dim=1)
    assert out.shape == (2, 3 * n, 2) and out.dtype == torch.bfloat16
    for r in range(n):
        assert torch.all(out[:, 3 * r:3 * (r + 1)] == r + 1)


def test_allgather_with_an_empty_shard(comm):
    """A rank may hold nothing along the gathered dim (size 0)."""
    n = comm.size
    sizes = [0 if r == 0 else 2 for r in range(n)]
    mine = _shard(comm.rank, 4, sizes[comm.rank])
    want = torch.cat([_shard(r, 4, sizes[r]) for r in range(n)], dim=1)
    assert torch.equal(comm.allgather(mine, dim=1, sizes=sizes), want)


@pytest.mark.parametrize("root_of", [lambda n: 0, lambda n: n - 1], ids=["root0", "rootlast"])
def test_gather_to_root(comm, root_of):
    n = comm.size
    root = root_of(n)
    sizes = [2 + r % 2 for r in range(n)]
    mine = _shard(comm.rank, 3, sizes[comm.rank])
    out = comm.gather(mine, dim=-1, sizes=sizes, root=root)
    if comm.rank == root:
        assert torch.equal(out, torch.cat([_shard(r, 3, sizes[r]) for r in range(n)], dim=-1))
    else:
        assert out is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.int64])
@pytest.mark.parametrize("root_of", [lambda n: 0, lambda n: n - 1], ids=["root0", "rootlast"])
def test_bcast_tensor(comm, dtype, root_of):
    root = root_of(comm.size)
    values = torch.tensor([1.5, -2.25, 3e4, 0.0078125]) if dtype != torch.int64 else torch.tensor([2 ** 50, -3, 0, 9])
    t = values.to(dtype).clone() if comm.rank == root else torch.full((4,), 7, dtype=dtype)
    out = comm.bcast_(t, root=root)
    assert out is t and torch.equal(t, values.to(dtype))


def test_bcast_numpy_array(comm):
    """The engine's per-token control message is a numpy array, sent as it is."""
    root = comm.size - 1
    a = np.array([2 ** 50 + 7, 1], dtype=np.int64) if comm.rank == root else np.zeros(2, dtype=np.int64)
    assert comm.bcast_(a, root=root) is a
    assert a.tolist() == [2 ** 50 + 7, 1]


def test_sendrecv_around_a_ring(comm):
    """Each rank sends to the previous and receives from the next (the fused kernel's tails);
    sizes differ by rank, as shards of an uneven split do."""
    nxt, prev = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
    send = torch.arange(3 + comm.rank, dtype=torch.float32) + 100 * comm.rank
    recv = torch.full((3 + nxt,), -1.0)
    assert comm.sendrecv_(send, prev, recv, nxt) is recv
    assert torch.equal(recv, torch.arange(3 + nxt, dtype=torch.float32) + 100 * nxt)


def test_bcast_into_non_contiguous_view(comm):
    base = torch.zeros(3, 4, dtype=torch.bfloat16)
    view = base.t()  # (4, 3), not contiguous
    if comm.rank == 0:
        view.copy_(torch.arange(12, dtype=torch.bfloat16).reshape(4, 3))
    comm.bcast_(view)
    assert torch.equal(base.t(), torch.arange(12, dtype=torch.bfloat16).reshape(4, 3))


@pytest.mark.parametrize("poll_s", [None, 0.001])
def test_bcast_obj(comm, poll_s):
    root = comm.size - 1
    payload = {"op": "generate", "ids": list(range(1000)), "text": "héllo", "nested": {"a": (1, 2.5, None)}}
    got = comm.bcast_obj(payload if comm.rank == root else None, root=root, poll_s=poll_s)
    assert got == payload


def test_allgather_obj(comm):
    assert comm.allgather_obj({"rank": comm.rank}) == [{"rank": r} for r in range(comm.size)]


def test_barrier(comm):
    comm.barrier()


def test_agree_without_errors_passes(comm):
    comm.agree(None)


def test_agree_raises_on_every_rank(comm):
    """The last rank alone reports a problem; every rank raises it, naming that rank."""
    last = comm.size - 1
    with pytest.raises(PlexusError) as exc:
        comm.agree("model.safetensors: tensor x is broken" if comm.rank == last else None)
    msg = str(exc.value)
    assert "model.safetensors: tensor x is broken" in msg
    if comm.size > 1:
        assert f"(on rank {last})" in msg
    assert getattr(exc.value, "collective", False)
    comm.barrier()  # everyone is still in step after the error


def test_agree_reports_first_failing_rank(comm):
    err = f"error from rank {comm.rank}" if comm.rank >= min(1, comm.size - 1) else None
    with pytest.raises(PlexusError, match=f"error from rank {min(1, comm.size - 1)}"):
        comm.agree(err)
