"""Run under mpirun by tests/test_pooling.py: load a model with a --split / --max-memory, then
print (rank 0, one JSON line) the last-position logits of a prompt, its greedy tokens, each
rank's shard and each rank's peak memory growth while loading.

Peak memory: writing "5" to /proc/self/clear_refs resets the process's high-water mark (VmHWM)
to its current RSS just before Engine.load, so VmHWM - VmRSS(before) afterwards is the most
memory the load ever held at once: weights, KV cache, and any transient copies. A tiny model is
built, loaded and run first, so that the pages of torch's and safetensors' code that the first
call of each op faults in (several MiB, once per process) are not counted as the load's.

    mpirun -n 2 python tests/pooling_logits.py --model DIR --ids 1,2,3 --split 3,1 [--max-memory 6GiB]
"""

from __future__ import annotations

import argparse
import json
import sys


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def warm_up(model_dir: str) -> None:
    """Run the code paths of a load once on a tiny model (a few KiB of data)."""
    import torch

    from plexus.checkpoint.reader import CheckpointReader
    from plexus.models.config import ModelConfig
    from plexus.models.llama import CausalLM
    from plexus.parallel.comm import Communicator
    from plexus.parallel.plan import ShardPlan

    real = ModelConfig.from_dir(model_dir)
    CheckpointReader(model_dir, real).read("model.norm.weight", 0, 0, 1)
    tiny = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "hidden_size": 16, "intermediate_size": 32,
                                  "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                  "vocab_size": 8})
    model = CausalLM(tiny, ShardPlan.even(tiny, 1), Communicator.self_only(), 8)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand(p.shape))
    model.allocate_cache()
    with torch.inference_mode():
        model(torch.tensor([[1, 2]]), 0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--ids", required=True, help="prompt token ids, comma-separated")
    ap.add_argument("--split", default="memory")
    ap.add_argument("--max-memory", default=None)
    ap.add_argument("--max-context", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=8)
    args = ap.parse_args()

    import torch

    from plexus.engine.engine import Engine
    from plexus.engine.runtime import run_guarded, start
    from plexus.engine.sampling import SamplingParams
    from plexus.errors import PlexusError

    ids = [int(x) for x in args.ids.split(",")]
    state = {}

    def body():
        rt = state["rt"] = start("cpu", None, False)
        comm = rt.comm
        warm_up(args.model)
        reset_peak()
        before = status_kib("VmRSS")
        try:
            engine = Engine.load(args.model, comm, None, rt.device, args.max_context, split=args.split,
                                 max_memory=args.max_memory)
        except PlexusError as e:
            growth = comm.allgather_obj((status_kib("VmHWM") - before) * 1024)
            if comm.rank == 0:
                print(json.dumps({"error": str(e), "peak_growth_bytes": growth}), flush=True)
            raise
        growth = (status_kib("VmHWM") - before) * 1024
        with torch.inference_mode():
            logits = engine.model(torch.tensor([ids]), 0)  # every rank runs the forward pass
        if comm.rank == 0:
            tokens = list(engine.generate(ids, SamplingParams(max_tokens=args.max_tokens)))
            engine.shutdown()
        else:
            engine.worker_loop()
        shard = engine.plan[comm.rank]
        info = comm.allgather_obj({"peak_growth_bytes": growth, "kv_heads": shard.kv_heads,
                                   "q_heads": shard.q_heads, "mlp_columns": shard.mlp_columns,
                                   "vocab_rows": shard.vocab_rows})
        if comm.rank == 0:
            print(json.dumps({"logits": logits[0, -1].tolist(), "tokens": tokens, "ranks": info}), flush=True)

    run_guarded(body, lambda: state["rt"].comm if "rt" in state else None)


if __name__ == "__main__":
    sys.exit(main())
