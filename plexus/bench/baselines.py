"""The baselines, each in a fresh process of its own on rank 0's node with every core of it
(``SoloProcess``): the same checkpoint through ``transformers``, and the whole model through
Plexus as a world of one rank, in blocks alternating with the pooled engine's (--vs-one-rank)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from plexus.bench.probes import synchronize
from plexus.errors import PlexusError

def check_baseline(baseline: str | None) -> None:
    if baseline == "transformers":
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise PlexusError("--baseline transformers needs the transformers package, which Plexus does not "
                              "need otherwise: pip install 'plexus[bench]' (or pip install transformers)") from None


def run_transformers_baseline(model_dir: str, dtype: torch.dtype, device: str, prompt_ids: list[int],
                              new_tokens: int, threads: int) -> dict:
    """The same checkpoint, prompt and greedy length through ``transformers.generate`` (EOS
    suppressed with ``min_new_tokens``), timed per token with a streamer."""
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        """generate calls put() once with the prompt, then once per new token."""

        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    except TypeError:  # transformers < 4.56 spells it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=dtype)
    model = model.to(device).eval()
    load_s = time.perf_counter() - t0
    ids = torch.tensor([prompt_ids], device=device)
    eos = model.generation_config.eos_token_id
    pad = eos[0] if isinstance(eos, list) and eos else eos
    common = dict(do_sample=False, pad_token_id=pad, attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **common)  # warm-up
        clock = Clock()
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=clock,
                             **common)
        synchronize(torch.device(device))
    generated = out.shape[1] - len(prompt_ids)
    first, last = clock.times[1], clock.times[-1]
    ttft = first - t0
    return {"load_s": load_s, "ttft_s": ttft, "prefill_tok_s": len(prompt_ids) / ttft,
            "decode_tok_s": (generated - 1) / (last - first) if generated > 1 else None,
            "new_tokens": int(generated), "threads": threads,
            "transformers_version": transformers.__version__}


ONE_RANK_PAIRS = 8  # blocks of each kind in --vs-one-rank
ONE_RANK_BLOCK_TOKENS = 32
_LAUNCHER_ENV = ("OMPI_", "PMIX_", "PRTE_", "OPAL_", "PMI_", "SLURM_", "HYDRA_", "I_MPI_", "MPI_LOCAL")


def solo_environment() -> dict:
    """This process's environment without the launcher's variables (a child is then a world of
    its own, not a rank of this job) and without OMP_NUM_THREADS (so it takes every core)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(_LAUNCHER_ENV) or k.startswith("OMPI_ALLOW_RUN_AS_ROOT")}
    env.pop("OMP_NUM_THREADS", None)
    return env


class SoloProcess:
    """A fresh Python process on rank 0's node, with every core of it, for the baselines: the
    whole model through Plexus as a world of one rank, or through transformers. Fresh, because
    a launcher binds each rank to its own cores and OpenMP sizes its thread pool and its spin
    waits from that at start-up: in the rank's own process a whole-node baseline runs slower
    than it would alone. The launcher's environment is left out, so the process is a world of
    its own (and OMP_NUM_THREADS, so it takes every core). Commands and replies are one JSON
    line each, over its stdin and stdout; its log goes to a file, quoted if it fails."""

    def __init__(self):
        env = solo_environment()
        self.log = tempfile.TemporaryFile(mode="w+")
        # the current directory first on sys.path could shadow the package (a plexus/ folder
        # there is a namespace package): the child leaves it out before importing anything
        code = ("import sys\nsys.path[:] = [p for p in sys.path if p]\nimport os\n"
                "try:\n    os.sched_setaffinity(0, range(os.cpu_count()))\n"
                "except (AttributeError, OSError):\n    pass\n"
                "from plexus.bench.baselines import solo_main\nsolo_main()")
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, env=env, text=True)

    def ask(self, **command) -> dict:
        """Send one command, return its reply; PlexusError if the process failed."""
        try:
            self.proc.stdin.write(json.dumps(command) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except OSError:
            line = ""
        reply = json.loads(line) if line.strip() else {"error": self._failure()}
        if "error" in reply:
            raise PlexusError(reply["error"])
        return reply

    def _reap(self) -> None:
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # it closed its output (or we closed its input) but it did not exit
            self.proc.kill()
            self.proc.wait()

    def _failure(self) -> str:
        self._reap()
        self.log.seek(0)
        tail = [ln for ln in self.log.read().splitlines() if ln.strip()][-1:]
        return f"the baseline process exited with code {self.proc.returncode}" + (f": {tail[0]}" if tail else "")

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        self._reap()
        self.log.close()


def solo_main() -> None:
    """The SoloProcess side: answer commands until stdin closes."""
    from plexus.engine.engine import Engine
    from plexus.engine.sampling import SamplingParams
    from plexus.parallel.comm import Communicator
    from plexus.parallel.devices import cpu_threads

    threads, engine = cpu_threads(1), None
    torch.set_num_threads(threads)
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "load":  # the whole model as a world of one rank
                t0 = time.perf_counter()
                engine = Engine.load(cmd["model_dir"], Communicator.self_only(), cmd["dtype"], cmd["device"],
                                     cmd["max_context"])
                engine.eos_token_ids = frozenset()
                for _ in engine.generate(cmd["prompt_ids"], SamplingParams(max_tokens=2)):  # warm-up
                    pass
                reply = {"threads": threads, "load_s": time.perf_counter() - t0}
            elif cmd["op"] == "block":
                reply = {"decode_tok_s": decode_block(engine, cmd["prompt_ids"], cmd["block_tokens"])}
            elif cmd["op"] == "transformers":
                reply = run_transformers_baseline(cmd["model_dir"], getattr(torch, cmd["dtype"]), cmd["device"],
                                                  cmd["prompt_ids"], cmd["new_tokens"], threads)
            else:
                reply = {"error": f"unknown command {cmd['op']!r}"}
        except PlexusError as e:
            reply = {"error": str(e)}
        print(json.dumps(reply), flush=True)


def decode_block(engine, prompt_ids: list[int], block_tokens: int) -> float:
    """Rank 0: decode tok/s of one generation of ``block_tokens`` + 1 tokens, after its prefill."""
    from plexus.engine.sampling import SamplingParams

    times = []
    for _ in engine.generate(prompt_ids, SamplingParams(max_tokens=block_tokens + 1)):
        times.append(time.perf_counter())
    return (len(times) - 1) / (times[-1] - times[0])


def on_rank_zero_alone(comm, work):
    """Collective: rank 0 runs ``work`` (with a SoloProcess) while the other ranks sleep; a
    PlexusError there is raised on every rank. Rank 0 returns the result, the others None."""
    result, error = None, None
    if comm.rank == 0:
        try:
            result = work()
        except PlexusError as e:
            error = str(e)
        comm.bcast_obj(error)
    else:
        error = comm.bcast_obj(poll_s=0.01)  # sleep, not spin
    if error is not None:
        raise PlexusError(error)
    return result


def pair_with_one_rank(comm, engine, phase, solo: SoloProcess | None, model_dir: str, dtype: torch.dtype,
                       device: str, max_context, prompt_ids: list[int], block_tokens: int, pairs: int,
                       log) -> dict | None:
    """Collective. Decode speed of the pooled engine against the whole model as a world of one
    rank on rank 0's node (``solo``, every core of the node, the other ranks asleep), in
    alternating blocks of ``block_tokens`` tokens ordered ABBA, so that a shared machine's
    drift falls on both alike: the same-run ratio of what pooling costs or gains over one rank.
    Rank 0 returns the figures, the others None."""
    def load():
        log.info("--vs-one-rank: loading the whole model as one rank in a process of its own")
        return solo.ask(op="load", model_dir=model_dir, dtype=str(dtype).removeprefix("torch."), device=device,
                        max_context=max_context, prompt_ids=prompt_ids)

    loaded = on_rank_zero_alone(comm, load)
    pooled, single = [], []
    for i in range(pairs):
        for kind in ("one", "pooled") if i % 2 == 0 else ("pooled", "one"):
            if kind == "one":
                reply = on_rank_zero_alone(comm, lambda: solo.ask(op="block", prompt_ids=prompt_ids,
                                                                  block_tokens=block_tokens))
                single.append(reply and reply["decode_tok_s"])
            else:
                pooled.append(phase(lambda: decode_block(engine, prompt_ids, block_tokens)))
    if comm.rank != 0:
        return None
    ratios = sorted(p / s for p, s in zip(pooled, single))
    return {"one_rank": {"decode_tok_s": statistics.median(single), "threads": loaded["threads"], "pairs": pairs,
                         "block_tokens": block_tokens},
            "paired_decode_tok_s": statistics.median(pooled),
            "decode_vs_one_rank": statistics.median(ratios), "decode_vs_one_rank_range": [ratios[0], ratios[-1]]}
