"""``plexus bench``: how fast the pooled engine loads, prefills and decodes, and how close each
decode step comes to its floor.

Decoding one token streams every weight a rank holds once (the embedding table aside: a step
reads one row of it), so a step can take no less than (rank weight bytes) / (rank memory
bandwidth). The bench measures that bandwidth in the same run, on every rank at once (ranks on
one node share the memory bus), with a large matrix-vector product of the model's dtype, and
reports decode speed as a fraction of the floor. Two baselines give ratios that do not depend on
the machine, each in the same run, in a fresh process of its own on rank 0's node with every
core of it (``SoloProcess``) while the ranks sleep: ``--baseline transformers`` runs the same
checkpoint, prompt and greedy length through ``transformers``; ``--vs-one-rank`` (under
mpirun) runs the whole model through Plexus as a world of one rank, in blocks alternating with
the pooled engine's, for what pooling costs or gains on that node.

Phases, every rank in step: load; warm-up generation; bandwidth probe; timed generation (the
engine's own ``generate``, with EOS ignored so it makes exactly ``--new-tokens`` tokens);
bandwidth probe again (the limit is the better of the two: a shared machine's bandwidth
drifts); the one-rank pairs; the transformers baseline. Between phases rank 0 releases the
workers from ``worker_loop`` with ``shutdown`` so that every rank can join the bench's own
collectives. Besides the speeds, each rank reports its peak and its change of resident memory
over the timed run, and each node how busy other programs kept it meanwhile
(``other_load_cores``): on a shared machine that is what says whether the figures can be trusted.
"""


from __future__ import annotations

import time
from pathlib import Path

import torch

from plexus.bench.baselines import (ONE_RANK_BLOCK_TOKENS, ONE_RANK_PAIRS, SoloProcess, check_baseline,
                                   on_rank_zero_alone, pair_with_one_rank)
from plexus.bench.probes import (cpu_seconds, current_rss, decode_weight_bytes, measure_bandwidth, peak_device_bytes,
                                peak_rss, reset_peak_device_bytes, reset_peak_rss, resident_weight_bytes)
from plexus.errors import PlexusError

# ---- the model to bench -------------------------------------------------------------------------

def preset_dir(preset: str) -> Path:
    """The cached demo model for ``preset``, next to the embedded tiny model's cache."""
    from plexus.checkpoint.demo import default_model_dir

    return default_model_dir().parent / f"demo-{preset}"


def ensure_preset_model(preset: str, log) -> Path:
    """The preset's demo checkpoint, written once and reused afterwards."""
    from plexus.checkpoint.demo import ensure_demo_model

    return ensure_demo_model(preset, preset_dir(preset), log)


def resolve_bench_model(model: str | None, preset: str | None, comm, log) -> str:
    """Collective: the model directory every rank benches (rank 0 writes a preset if needed)."""
    if model and preset:
        raise PlexusError("give --model or --preset, not both")
    if model:
        if not Path(model).exists():
            raise PlexusError(f"model {model} does not exist (a model directory or a .gguf file)")
        return model
    error, path = None, None
    if comm.rank == 0:
        try:
            path = str(ensure_preset_model(preset or "bench", log))
        except OSError as e:
            error = f"cannot write the {preset or 'bench'} demo model: {e}"
    path = comm.bcast_obj(path, poll_s=None if comm.rank == 0 else 0.01)
    comm.agree(error)
    return path


def prompt_token_ids(n: int, vocab_size: int, seed: int = 0) -> list[int]:
    """A fixed pseudo-random prompt: the same ids at every world size and for the baseline."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, max(3, vocab_size), (n,), generator=g).tolist()


# ---- the phases -------------------------------------------------------------------------------

def run_bench(rt, model, preset, prompt_tokens, new_tokens, dtype, max_context, baseline, probe_mib,
              split="memory", max_memory=None, vs_one_rank=False, quantize=None, quant_group=128,
              concurrency: int = 1) -> dict | None:
    """Every rank: run the phases; rank 0 returns the report, the others None."""
    from plexus.engine.engine import Engine
    from plexus.engine.runtime import load_progress
    from plexus.engine.sampling import SamplingParams

    comm, log = rt.comm, rt.log
    error = None
    try:
        check_baseline(baseline if comm.rank == 0 else None)
        if vs_one_rank and comm.size == 1:
            raise PlexusError("--vs-one-rank compares a pooled run with one rank: run it under mpirun with 2 or "
                              "more ranks")
    except PlexusError as e:
        error = str(e)
    comm.agree(error)
    model_dir = resolve_bench_model(model, preset, comm, log.info if comm.rank == 0 else (lambda *_: None))
    error = None
    if comm.rank == 0:  # the prompt and new tokens fit the context: known before any weight is read
        try:
            from plexus.engine.engine import check_prompts
            from plexus.engine.source import load_config

            config = load_config(model_dir)
            check_prompts([prompt_token_ids(prompt_tokens, config.vocab_size)], new_tokens, config, max_context)
        except PlexusError as e:
            error = str(e)
    comm.agree(error)

    if concurrency > 1 and max_context is None:  # KV slots of the run's length, not the model's
        max_context = prompt_tokens + new_tokens
    comm.barrier()
    t0 = time.perf_counter()
    with load_progress(rt, model_dir) as progress:
        engine = Engine.load(model_dir, comm, dtype, rt.device, max_context,
                             progress=progress, split=split, max_memory=max_memory, quantize=quantize,
                             quant_group=quant_group, max_batch=concurrency)
    comm.barrier()  # loaded means every rank has its shard
    load_s = time.perf_counter() - t0
    engine.eos_token_ids = frozenset()  # exactly new_tokens steps: the bench never stops at EOS
    ids = prompt_token_ids(prompt_tokens, engine.config.vocab_size)

    def phase(work):
        """Rank 0 runs ``work`` on the engine while the others follow, then releases them."""
        if comm.rank != 0:
            engine.worker_loop()
            return None
        try:
            done = work()
        except PlexusError as e:
            engine.shutdown(error=str(e))  # the workers stop with the same error
            raise
        engine.shutdown()
        return done

    def warm_up():
        for _ in engine.generate(ids, SamplingParams(max_tokens=2)):
            pass

    def timed():
        times = []
        t0 = time.perf_counter()
        for _ in engine.generate(ids, SamplingParams(max_tokens=new_tokens)):
            times.append(time.perf_counter())
        return t0, times

    def batched():
        """``concurrency`` sequences (distinct prompts) in one continuous batch: once every prompt
        is in, the decode tokens of all of them per second."""
        from plexus.engine.batch import BatchRunner

        runner = BatchRunner(engine, None)
        seqs = [runner.add(prompt_token_ids(prompt_tokens, engine.config.vocab_size, seed=i + 1),
                           SamplingParams(max_tokens=new_tokens)) for i in range(concurrency)]
        while any(s.prefilling for s in seqs):
            runner.step()
        made, t0 = sum(len(s.result.token_ids) for s in seqs), time.perf_counter()
        while runner.running:
            runner.step()
        return (sum(len(s.result.token_ids) for s in seqs) - made) / (time.perf_counter() - t0)

    dt = engine.model.embed_tokens.dtype
    width = max(1024, engine.config.hidden_size)
    device = engine.device

    def probe() -> dict:
        comm.barrier()  # every rank streams at once, as in a decode step
        return measure_bandwidth(dt, device, probe_mib * 2**20, width)

    phase(warm_up)
    peak_before = peak_rss()  # the load and a first generation
    device_peak_before = peak_device_bytes(rt.device)
    probes = [probe()]  # before and after the timed run: the machine's bandwidth drifts
    probe_in_peak = not reset_peak_rss()
    reset_peak_device_bytes(rt.device)
    rss_before = current_rss()
    comm.barrier()
    cpu_before = cpu_seconds()
    result = phase(timed)
    cpu_after = cpu_seconds()
    rss_after = current_rss()
    batched_tok_s = phase(batched) if concurrency > 1 else None
    peak = max(peak_before, peak_rss())
    device_peak = peak_device_bytes(rt.device)
    if device_peak is not None and device_peak_before is not None:
        device_peak = max(device_peak, device_peak_before)
    probes.append(probe())
    best = max(probes, key=lambda p: p["gbps"])
    per_rank = {
        "peak_rss_bytes": peak, "peak_rss_includes_probe": probe_in_peak,
        "rss_growth_bytes": None if rss_before is None else rss_after - rss_before,
        "peak_device_bytes": device_peak, "device": rt.device, "threads": rt.threads,
        "weight_bytes": decode_weight_bytes(engine.model),
        "resident_weight_bytes": resident_weight_bytes(engine.model), "host": comm.hostname,
        "host_busy_s": None if cpu_before[0] is None else cpu_after[0] - cpu_before[0],
        "own_cpu_s": cpu_after[1] - cpu_before[1], "bandwidth_gbps": best["gbps"], "probe": best}
    ranks = comm.allgather_obj(per_rank)

    paired = base = None
    if vs_one_rank:
        solo = SoloProcess() if comm.rank == 0 else None
        try:
            paired = pair_with_one_rank(comm, engine, phase, solo, model_dir, dt, rt.device, max_context, ids,
                                        min(new_tokens, ONE_RANK_BLOCK_TOKENS), ONE_RANK_PAIRS, log)
        finally:
            if solo is not None:
                solo.close()
    if baseline == "transformers":
        def transformers_baseline():
            log.info("running the transformers baseline in a process of its own on rank 0's node")
            solo = SoloProcess()
            try:
                return solo.ask(op="transformers", model_dir=model_dir, dtype=str(dt).removeprefix("torch."),
                                device=rt.device, prompt_ids=ids, new_tokens=new_tokens)
            finally:
                solo.close()
        base = on_rank_zero_alone(comm, transformers_baseline)
    if comm.rank != 0:
        return None

    t_start, times = result
    ttft = times[0] - t_start
    decode_tok_s = (len(times) - 1) / (times[-1] - times[0])
    other_load = {}  # host -> average cores busy with other programs during the timed run
    for host in dict.fromkeys(r["host"] for r in ranks):
        mine = [r for r in ranks if r["host"] == host]
        busy = [r["host_busy_s"] for r in mine if r["host_busy_s"] is not None]
        if busy:
            other = max(busy) - sum(r["own_cpu_s"] for r in mine)
            other_load[host] = max(0.0, other) / (times[-1] - t_start)
    weight_bytes = [r["weight_bytes"] for r in ranks]
    bandwidth = [r["bandwidth_gbps"] for r in ranks]
    achieved = [b * decode_tok_s / 1e9 for b in weight_bytes]
    report = {
        "model": str(model_dir), "world_size": comm.size, "dtype": str(dt).removeprefix("torch."),
        "prompt_tokens": prompt_tokens, "new_tokens": len(times),
        "devices": [r["device"] for r in ranks], "threads_per_rank": [r["threads"] for r in ranks],
        "load_s": load_s, "ttft_s": ttft, "prefill_tok_s": prompt_tokens / ttft, "decode_tok_s": decode_tok_s,
        "peak_rss_bytes": [r["peak_rss_bytes"] for r in ranks],
        "peak_rss_includes_probe": any(r["peak_rss_includes_probe"] for r in ranks),
        "rss_growth_bytes": [r["rss_growth_bytes"] for r in ranks],
        "peak_device_bytes": [r["peak_device_bytes"] for r in ranks],
        "weight_bytes_per_rank": weight_bytes,
        "resident_weight_bytes_per_rank": [r["resident_weight_bytes"] for r in ranks],
        "achieved_gbps": sum(achieved), "achieved_gbps_per_rank": achieved,
        "bandwidth_limit_gbps": sum(bandwidth), "bandwidth_limit_gbps_per_rank": bandwidth,
        "bandwidth_fraction": sum(achieved) / sum(bandwidth),
        "other_load_cores": other_load,
        "probe": {"matrix_bytes": ranks[0]["probe"]["matrix_bytes"], "shape": ranks[0]["probe"]["shape"],
                  "kernels_gbps_per_rank": [r["probe"]["kernels"] for r in ranks]},
    }
    if batched_tok_s is not None:
        report.update(concurrency=concurrency, batched_decode_tok_s=batched_tok_s,
                      batched_vs_one_stream=batched_tok_s / decode_tok_s)
    if paired is not None:
        report.update(paired)
    if base is not None:
        report["baseline"] = {"name": "transformers", **base}
        report["decode_vs_baseline"] = decode_tok_s / base["decode_tok_s"] if base["decode_tok_s"] else None
        report["prefill_vs_baseline"] = report["prefill_tok_s"] / base["prefill_tok_s"]
    return report
