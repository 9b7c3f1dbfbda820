"""Continuous batching's two latency targets, on the engine alone (issue 18), interleaved rounds:

* ``second-turn``: a chat's next turn. A 1,000-token history runs once (its blocks stay in the
  prefix cache); then the time to first token of history + answer + new message, against a cold
  prompt of the same length (a different history, nothing cached). Target: warm <= 0.3 x cold.
* ``admission``: 8 streams decode; a 2,000-token prompt joins. Each step of the streams then
  also runs one ``--prefill-chunk`` of the prompt: their time per output token while it is
  admitted, against their steady value. Target: <= 2 x. Run with several chunk sizes to see what
  the chunk trades (the prompt's admission time against the streams' slow-down).

    python benchmarks/batching.py second-turn --rounds 5
    python benchmarks/batching.py admission --rounds 3 --chunks 16,32,64,128
    mpirun -n 2 python benchmarks/batching.py admission   # the same at world size 2

The bench preset model (``plexus bench``'s), bfloat16 unless ``--dtype``; one JSON line per
result on stdout (rank 0), the medians last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from plexus.bench.runner import ensure_preset_model, prompt_token_ids
from plexus.engine.batch import BatchRunner
from plexus.engine.engine import Engine
from plexus.engine.sampling import SamplingParams
from plexus.log import setup_logging
from plexus.parallel.comm import Communicator


def ttft(runner: BatchRunner, ids: list[int]) -> tuple[float, int]:
    """Seconds from adding ``ids`` to its first token (alone in the batch), and the prompt tokens
    the prefix cache served."""
    t0 = time.perf_counter()
    seq = runner.add(ids, SamplingParams(max_tokens=16))
    while not seq.result.token_ids:
        runner.step()
    took = time.perf_counter() - t0
    while runner.running:
        runner.step()
    return took, seq.reused


def second_turn(engine: Engine, rounds: int, history: int) -> dict:
    vocab = engine.config.vocab_size
    runner = BatchRunner(engine, None)
    warm, cold, reused = [], [], []
    for r in range(rounds):
        first = prompt_token_ids(history, vocab, seed=100 + r)
        runner.add(first, SamplingParams(max_tokens=16))
        while runner.running:
            runner.step()
        answer = prompt_token_ids(16, vocab, seed=200 + r)  # what the client sends back as the answer
        turn = first + answer + prompt_token_ids(24, vocab, seed=300 + r)
        other = prompt_token_ids(len(turn), vocab, seed=400 + r)  # same length, nothing cached
        for kind in (("warm", "cold") if r % 2 == 0 else ("cold", "warm")):
            took, hit = ttft(runner, turn if kind == "warm" else other)
            (warm if kind == "warm" else cold).append(took)
            if kind == "warm":
                reused.append(hit)
        print(json.dumps({"round": r, "warm_ttft_s": warm[-1], "cold_ttft_s": cold[-1], "reused": reused[-1],
                          "prompt_tokens": len(turn)}), flush=True)
    w, c = statistics.median(warm), statistics.median(cold)
    return {"experiment": "second-turn", "history_tokens": history, "prompt_tokens": len(turn),
            "warm_ttft_s": w, "cold_ttft_s": c, "warm_over_cold": w / c, "reused_tokens": statistics.median(reused)}


def admission(engine: Engine, rounds: int, chunk: int, streams: int, long_prompt: int) -> dict:
    vocab = engine.config.vocab_size
    steady, during, admit = [], [], []
    for r in range(rounds):
        runner = BatchRunner(engine, None, prefill_chunk=chunk, prefix_cache=False)
        seqs = [runner.add(prompt_token_ids(32, vocab, seed=10 * r + i), SamplingParams(max_tokens=10**4 // 20))
                for i in range(streams)]
        while any(s.prefilling for s in seqs):
            runner.step()
        times = []
        for _ in range(12):
            t0 = time.perf_counter()
            runner.step()
            times.append(time.perf_counter() - t0)
        steady.append(statistics.median(times[2:]))
        big = runner.add(prompt_token_ids(long_prompt, vocab, seed=999 + r), SamplingParams(max_tokens=1))
        times, t_admit = [], time.perf_counter()
        while big.prefilling:
            t0 = time.perf_counter()
            runner.step()
            times.append(time.perf_counter() - t0)
        admit.append(time.perf_counter() - t_admit)
        during.append(statistics.median(times))
        for s in seqs:
            s.cancelled = lambda: True
        while runner.running:
            runner.step()
        runner.close()
        print(json.dumps({"round": r, "chunk": chunk, "steady_tpot_s": steady[-1], "admitting_tpot_s": during[-1],
                          "admission_s": admit[-1]}), flush=True)
    s, d = statistics.median(steady), statistics.median(during)
    return {"experiment": "admission", "streams": streams, "prompt_tokens": long_prompt, "prefill_chunk": chunk,
            "steady_tpot_s": s, "admitting_tpot_s": d, "admitting_over_steady": d / s,
            "admission_s": statistics.median(admit)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiment", choices=["second-turn", "admission"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--history", type=int, default=1000, help="second-turn: tokens of history")
    ap.add_argument("--chunks", default="32", help="admission: prefill chunk sizes to try, comma-separated")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--long-prompt", type=int, default=2000)
    args = ap.parse_args()
    comm = Communicator()
    setup_logging(comm.rank)
    model_dir = str(ensure_preset_model("bench", lambda *a: None)) if comm.rank == 0 else None
    model_dir = comm.bcast_obj(model_dir)
    context = args.long_prompt + 48 if args.experiment == "admission" else args.history + 64  # bench preset: 2048
    engine = Engine.load(model_dir, comm, args.dtype, "cpu", max_context=context, max_batch=args.streams + 1)
    engine.eos_token_ids = frozenset()
    if comm.rank != 0:
        engine.worker_loop()
        return
    with torch.inference_mode():
        if args.experiment == "second-turn":
            results = [second_turn(engine, args.rounds, args.history)]
        else:
            results = [admission(engine, args.rounds, int(c), args.streams, args.long_prompt)
                       for c in args.chunks.split(",")]
    engine.shutdown()
    for res in results:
        print(json.dumps({**res, "world_size": comm.size, "dtype": args.dtype}), flush=True)


if __name__ == "__main__":
    main()
