"""Do two processes stream memory as fast as one process with two threads? The question behind
"world size 2 >= world size 1" (docs/benchmarks.md), without the engine around it.

    mpirun -n 2 python benchmarks/processes_vs_threads.py [--rounds 12] [--mib 256]

Each of the 2 ranks (one core each, mpirun's binding) holds an --mib float32 matrix; a fresh
process on rank 0's node (every core, 2 OpenMP threads, none of the launcher's environment)
holds one of twice the size. In alternating rounds the fresh process runs 4 matrix-vector
products over its matrix with the engine's kernel (plexus/models/kernels.py), then the two ranks run 4
over theirs at once (a barrier after each). Prints both rates and the median of the rounds'
ratios. The ranks' own times are printed too: if one is much faster than the other, the pair
waits for the slower one, as the engine's ranks do at each meeting.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SOLO = r"""
import json, sys, time, torch
from plexus.models import kernels
from plexus.parallel.hostmem import host_empty
rows, k = int(sys.argv[1]), 1024
torch.set_num_threads(int(sys.argv[2]))
w = host_empty((rows, k), torch.float32); w.normal_()
x, y = torch.randn(k), torch.empty(rows)
print("ready", flush=True)
for _ in sys.stdin:
    kernels.matvec(w, x, y)
    t0 = time.perf_counter()
    for _ in range(4):
        kernels.matvec(w, x, y)
    print(json.dumps((time.perf_counter() - t0) / 4), flush=True)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--mib", type=int, default=256, help="each rank's matrix (the fresh process: twice this)")
    args = ap.parse_args()

    import torch
    from mpi4py import MPI

    from plexus.bench.baselines import solo_environment
    from plexus.models import kernels
    from plexus.parallel.hostmem import host_empty

    comm, k = MPI.COMM_WORLD, 1024
    rank, size = comm.Get_rank(), comm.Get_size()
    rows = args.mib * 2**20 // (4 * k)
    if kernels.library() is None:
        sys.exit("the fused kernel is not available here (see plexus/models/kernels.py)")
    torch.set_num_threads(1)
    w = host_empty((rows, k), torch.float32)
    w.normal_()
    x, y = torch.randn(k), torch.empty(rows)
    solo = None
    if rank == 0:
        env = solo_environment()  # a world of its own, with every core
        cores = set(range(os.cpu_count() or 1))
        solo = subprocess.Popen([sys.executable, "-c", SOLO, str(rows * size), str(len(cores))], env=env, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                preexec_fn=lambda: os.sched_setaffinity(0, cores))
        if solo.stdout.readline().strip() != "ready":
            sys.exit("the one-process side failed to start")

    def sleep_barrier():  # the idle side must not spin a core
        req = comm.Ibarrier()
        while not req.Test():
            time.sleep(0.0005)

    one, pair, own = [], [], []
    for _ in range(args.rounds):
        sleep_barrier()
        if rank == 0:
            solo.stdin.write("go\n")
            solo.stdin.flush()
            one.append(json.loads(solo.stdout.readline()))
        sleep_barrier()
        kernels.matvec(w, x, y)
        comm.Barrier()
        t0, mine = time.perf_counter(), 0.0
        for _ in range(4):
            t1 = time.perf_counter()
            kernels.matvec(w, x, y)
            mine += time.perf_counter() - t1
            comm.Barrier()
        pair.append(comm.allreduce((time.perf_counter() - t0) / 4, op=MPI.MAX))
        own.append(comm.gather(mine / 4))
    if rank == 0:
        solo.stdin.close()
        solo.wait()
        gb = size * rows * k * 4 / 1e9
        ratios = sorted(o / p for o, p in zip(one, pair))
        print(f"one process, {os.cpu_count()} threads: {gb / statistics.median(one):.1f} GB/s; "
              f"{size} processes, 1 thread each: {gb / statistics.median(pair):.1f} GB/s; "
              f"processes / one process: median {statistics.median(ratios):.3f} "
              f"(rounds {ratios[0]:.3f}-{ratios[-1]:.3f}); each rank alone: "
              + ", ".join(f"{gb / size / statistics.median(t):.1f}" for t in zip(*own)) + " GB/s")


if __name__ == "__main__":
    main()
