"""Where a decode step's time goes, on one rank: torch.profiler's per-op table (or cProfile's
per-function one) over a few decode steps of the engine.

    python benchmarks/profile_decode.py --model ~/.cache/plexus/demo-bench [--steps 16] [--cprofile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from plexus.engine.engine import Engine
from plexus.parallel.comm import Communicator


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument("--rows", type=int, default=25)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    comm = Communicator.self_only()
    engine = Engine.load(a.model, comm, a.dtype, "cpu")
    model = engine.model
    ids = torch.randint(2, engine.config.vocab_size, (1, a.prompt_tokens))

    def run():
        with torch.inference_mode():
            model(ids, 0)
            tok = torch.tensor([[5]])
            t0 = time.perf_counter()
            for i in range(a.steps):
                model(tok, a.prompt_tokens + i)
            return (time.perf_counter() - t0) / a.steps

    run()  # warm-up
    print(f"plain: {run() * 1e3:.2f} ms per decode step")
    if a.cprofile:
        prof = cProfile.Profile()
        prof.enable()
        run()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(a.rows)
        return
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step = run()
    print(f"profiled: {step * 1e3:.2f} ms per decode step (prefill included in the table)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))


if __name__ == "__main__":
    main()
