"""Run under ``mpirun -n K``: load each checkpoint of a job file with ``Engine.load`` and record,
on rank 0, the last-position logits of a prompt and the greedy tokens that follow it.

    mpirun -n K python tests/mpi_scripts/parity.py JOBS.json OUT.json

JOBS.json: [{"name", "dir", "prompt_ids", "max_new_tokens", "dtype" (optional), "mpi_sums"
(optional: sum through MPI as ranks on several machines do, not the node's shared memory)}, ...]. One
launch handles every checkpoint, so the suite pays MPI and torch start-up once per world size.
OUT.json (rank 0): {name: {"logits": [...], "tokens": [...], "world_size": K, "step_logits":
[[...], ...], "fused": [bool per rank], "node_group": [bool per rank]}}: step_logits are the
logits of each decode step, replayed over the greedy tokens (the path one-token steps take,
which is the fused kernel where ``fused``). Any exception aborts the whole job (no rank is left
waiting in a collective).
"""

import json

import torch
from _abort import run  # this folder (the script's own) is on sys.path

from plexus.engine.engine import Engine
from plexus.engine.sampling import SamplingParams
from plexus.parallel.comm import Communicator


def main(jobs_path: str, out_path: str) -> None:
    comm = Communicator()
    torch.set_num_threads(1)
    results = {}
    for job in json.loads(open(jobs_path).read()):
        engine = Engine.load(job["dir"], comm, dtype=job.get("dtype"))
        if job.get("mpi_sums") and engine.model.fused is not None:
            engine.model.fused.group = None  # the fused kernel's path for ranks on several machines
        ids = torch.tensor([job["prompt_ids"]])
        with torch.inference_mode():
            logits = engine.model(ids, 0)  # every rank takes part; rank 0 gets (1, 1, vocab)
        if comm.rank == 0:
            tokens = list(engine.generate(job["prompt_ids"], SamplingParams(max_tokens=job["max_new_tokens"])))
            engine.shutdown()
            results[job["name"]] = {"logits": logits[0, -1].float().tolist(), "tokens": tokens,
                                    "world_size": comm.size}
        else:
            assert logits is None, "only rank 0 should receive logits"
            engine.worker_loop()
        # replay: the prompt, then each greedy token as a one-token step, every rank in step
        tokens = comm.bcast_obj(tokens if comm.rank == 0 else None)
        steps = []
        with torch.inference_mode():
            out = engine.model(ids, 0)
            pos = ids.shape[1]
            for tok in tokens[:-1]:
                out = engine.model(torch.tensor([[tok]]), pos)
                pos += 1
                if comm.rank == 0:
                    steps.append(out[0, -1].float().tolist())
        fused = engine.model.fused
        flags = comm.allgather_obj((fused is not None, fused is not None and fused.group is not None))
        if comm.rank == 0:
            results[job["name"]].update(step_logits=steps, fused=[f for f, _ in flags],
                                        node_group=[g for _, g in flags])
    if comm.rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    run(main)
