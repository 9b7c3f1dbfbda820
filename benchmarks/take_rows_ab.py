"""Ranks of one node taking rows from one another (plexus/models/csrc/decode.c, "Taking rows"), on
and off, side by side in one job: the engine's decoder (which takes rows) and one made without
the copies, on the same loaded model, in alternating blocks of decode steps.

    mpirun -n 2 python benchmarks/take_rows_ab.py [--model DIR | --preset bench] [--rounds 20] [--steps 32]

Prints both median step times (the slower rank's), the median of the per-round speed ratios
(taking / not taking) with the lowest and highest round, and the blocks of 8 rows each rank took
per step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--steps", type=int, default=32, help="decode steps per block")
    args = ap.parse_args()

    import torch
    from mpi4py import MPI

    from plexus.bench.runner import ensure_preset_model
    from plexus.engine.engine import Engine
    from plexus.log import setup_logging
    from plexus.models import kernels
    from plexus.parallel.comm import Communicator

    comm = Communicator()
    log = setup_logging(comm.rank)
    torch.set_num_threads(1)
    model_dir = args.model or (str(ensure_preset_model(args.preset, log)) if comm.rank == 0 else None)
    model = Engine.load(comm.bcast_obj(model_dir), comm, "float32", "cpu").model
    taking = model.fused
    if taking is None or taking.group is None or taking.layers[0].tail_rows == 0:
        if comm.rank == 0:
            print("no node group taking rows here (one node, float32, the fused kernel; see the log)", file=sys.stderr)
        sys.exit(1)
    decoders = {"taking": taking, "not taking": kernels.FusedDecoder.for_model(model)}
    prompt = torch.randint(2, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    times = {k: [] for k in decoders}
    with torch.inference_mode():
        model(prompt, 0)
        for r in range(args.rounds):
            for k in (list(decoders) if r % 2 == 0 else list(decoders)[::-1]):
                d = decoders[k]
                comm.barrier()
                t0 = time.perf_counter()
                for s in range(args.steps):
                    d(7, 128 + s, model.solo_table, reuse=True)
                times[k].append(comm.comm.allreduce((time.perf_counter() - t0) / args.steps, op=MPI.MAX))
    taken = comm.allgather_obj(taking.rows_taken / (args.rounds * args.steps))
    if comm.rank == 0:
        on, off = times["taking"], times["not taking"]
        ratios = sorted(b / a for a, b in zip(on, off))
        print(f"step: taking rows {1e3 * statistics.median(on):.2f} ms, not {1e3 * statistics.median(off):.2f} ms; "
              f"speed taking / not: median {statistics.median(ratios):.3f} (rounds {ratios[0]:.3f}-{ratios[-1]:.3f}); "
              "blocks taken per step by rank: " + ", ".join(f"{t:.0f}" for t in taken))


if __name__ == "__main__":
    main()
