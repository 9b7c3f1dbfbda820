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

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import torch
import torch.nn.functional as F

from plexus.commands.main import common_engine_options
from plexus.errors import PlexusError

PROBE_MIB = 512  # per rank: well past any CPU's last-level cache
PROBE_REPS = 15


# ---- memory and time --------------------------------------------------------------------------

def current_rss() -> int | None:
    """Resident bytes of this process now (Linux /proc; psutil elsewhere if installed)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        return None


def peak_rss() -> int:
    """This process's high-water resident bytes: Linux's VmHWM (which reset_peak_rss can reset),
    else ru_maxrss (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def reset_peak_rss() -> bool:
    """Restart the high-water mark at the current RSS (Linux), so that the bandwidth probe's
    matrix does not count as the engine's memory. False where the OS does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_seconds() -> tuple[float | None, float]:
    """(busy seconds of every CPU of this host so far, or None where /proc/stat is missing;
    CPU seconds this process has used). Their difference over the timed run is the load other
    programs put on the node, which the report shows: a benchmark on a shared machine is only
    as good as that number is small."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait
    except (OSError, ValueError, IndexError):
        busy = None
    return busy, own.ru_utime + own.ru_stime


def peak_device_bytes(device: str) -> int | None:
    kind = device.split(":")[0]
    if kind == "cuda":
        return int(torch.cuda.max_memory_allocated(torch.device(device)))
    if kind == "xpu" and hasattr(torch.xpu, "max_memory_allocated"):
        return int(torch.xpu.max_memory_allocated(torch.device(device)))
    if kind == "mps" and hasattr(torch.mps, "driver_allocated_memory"):
        return int(torch.mps.driver_allocated_memory())
    return None


def reset_peak_device_bytes(device: str) -> None:
    kind = device.split(":")[0]
    if kind == "cuda":
        torch.cuda.reset_peak_memory_stats(torch.device(device))
    elif kind == "xpu" and hasattr(torch.xpu, "reset_peak_memory_stats"):
        torch.xpu.reset_peak_memory_stats(torch.device(device))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xpu":
        torch.xpu.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def decode_weight_bytes(model) -> int:
    """Bytes of weights one decode step reads on this rank: every parameter except the
    embedding table, of which a step reads one row (tied embeddings are read by the LM head)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.config.tie_word_embeddings:
        w = model.embed_tokens.weight
        total -= w.numel() * w.element_size()
    return int(total)


def resident_weight_bytes(model) -> int:
    return int(sum(p.numel() * p.element_size() for p in model.parameters()))


# ---- bandwidth probe ----------------------------------------------------------------------------

def matvec_kernels(dtype: torch.dtype, device: torch.device) -> dict:
    """The matrix-vector products the probe times: torch's stock ``F.linear``, the kernel the
    engine's layers use (the same function where the engine has no kernel of its own), and the
    fused decode kernel's loop where the engine decodes with it. The limit is the fastest of
    them, so an engine kernel cannot flatter itself."""
    from plexus.models import layers

    kernels = {"torch.nn.functional.linear": lambda x, w: F.linear(x, w)}
    engine_linear = getattr(layers, "linear", None)
    if engine_linear is not None:
        kernels["plexus.models.layers.linear"] = lambda x, w: engine_linear(x, w)
    if device.type == "cpu":
        from plexus.models import kernels as fused
        if fused.library(dtype) is not None:  # the fused decode kernel's own streaming loop
            outs = {}

            def fused_matvec(x, w):
                if w.shape[0] not in outs:  # its input and output are float32 in every dtype
                    outs[w.shape[0]] = torch.empty(w.shape[0]), x.float().contiguous()
                out, xf = outs[w.shape[0]]
                fused.matvec(w, xf, out)
            kernels["plexus.models.kernels.matvec"] = fused_matvec
    return kernels


@torch.inference_mode()
def measure_bandwidth(dtype: torch.dtype, device: torch.device, nbytes: int, width: int,
                      reps: int = PROBE_REPS) -> dict:
    """GB/s of y = W x over one (nbytes / width, width) matrix W of ``dtype``, per kernel: the
    median of ``reps`` products (decode speed is an average too, and a machine's bandwidth
    drifts; the best single product would be a peak no sustained run reaches). On the CPU W is
    allocated as the engine allocates its weights (huge pages where the OS allows), so the
    engine gets no advantage the probe lacks. Every rank runs it at once, after a barrier:
    ranks that share memory share its bandwidth."""
    from plexus.models.layers import host_empty

    rows = max(1, nbytes // (width * dtype.itemsize))
    if device.type == "cpu":
        w = host_empty((rows, width), dtype).fill_(0.01)
    else:
        w = torch.full((rows, width), 0.01, dtype=dtype, device=device)
    x = torch.ones((1, width), dtype=dtype, device=device)
    size = w.numel() * w.element_size()
    result = {"matrix_bytes": int(size), "shape": [rows, width], "kernels": {}}
    for name, kernel in matvec_kernels(dtype, device).items():
        kernel(x, w)
        synchronize(device)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            kernel(x, w)
            synchronize(device)
            times.append(time.perf_counter() - t0)
        result["kernels"][name] = size / statistics.median(times) / 1e9
    result["gbps"] = max(result["kernels"].values())
    result["kernel"] = max(result["kernels"], key=result["kernels"].get)
    del w
    return result


# ---- baselines on rank 0 alone ----------------------------------------------------------------

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
                "except (AttributeError, OSError):\n    pass\nfrom plexus.bench.runner import solo_main\nsolo_main()")
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
    from plexus.parallel.comm import Communicator
    from plexus.parallel.devices import cpu_threads
    from plexus.engine.engine import Engine
    from plexus.engine.sampling import SamplingParams

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
        if not Path(model).is_dir():
            raise PlexusError(f"model directory {model} does not exist")
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
              split="memory", max_memory=None, vs_one_rank=False) -> dict | None:
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
            from plexus.models.config import ModelConfig
            from plexus.engine.engine import check_request, context_length

            config = ModelConfig.from_dir(model_dir)
            check_request(prompt_token_ids(prompt_tokens, config.vocab_size), new_tokens,
                          context_length(config, max_context), config.vocab_size)
        except PlexusError as e:
            error = str(e)
    comm.agree(error)

    comm.barrier()
    t0 = time.perf_counter()
    with load_progress(rt, model_dir) as progress:
        engine = Engine.load(model_dir, comm, dtype, rt.device, max_context,
                             progress=progress, split=split, max_memory=max_memory)
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

    dt = engine.model.embed_tokens.weight.dtype
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
    if paired is not None:
        report.update(paired)
    if base is not None:
        report["baseline"] = {"name": "transformers", **base}
        report["decode_vs_baseline"] = decode_tok_s / base["decode_tok_s"] if base["decode_tok_s"] else None
        report["prefill_vs_baseline"] = report["prefill_tok_s"] / base["prefill_tok_s"]
    return report


# ---- output -----------------------------------------------------------------------------------

def _gib(n) -> str:
    return "?" if n is None else f"{n / 2**30:.2f} GiB"


def format_report(r: dict) -> str:
    ranks = range(r["world_size"])
    lines = [
        f"model            {r['model']}",
        f"world            {r['world_size']} rank(s), {r['dtype']}, threads {r['threads_per_rank']}, "
        f"devices {r['devices']}",
        f"tokens           {r['prompt_tokens']} prompt + {r['new_tokens']} new (EOS ignored)",
        f"load             {r['load_s']:.2f} s",
        f"time to first    {r['ttft_s'] * 1e3:.1f} ms  (prefill {r['prefill_tok_s']:.1f} tok/s)",
        f"decode           {r['decode_tok_s']:.2f} tok/s",
        f"bandwidth        {r['achieved_gbps']:.1f} GB/s of weights achieved / {r['bandwidth_limit_gbps']:.1f} "
        f"GB/s measured = {r['bandwidth_fraction']:.2f}",
    ]
    for i in ranks:
        dev = r["peak_device_bytes"][i]
        growth = r["rss_growth_bytes"][i]
        lines.append(f"  rank {i}         weights/step {_gib(r['weight_bytes_per_rank'][i])}, "
                     f"{r['achieved_gbps_per_rank'][i]:.1f} of {r['bandwidth_limit_gbps_per_rank'][i]:.1f} GB/s, "
                     f"peak RSS {_gib(r['peak_rss_bytes'][i])}"
                     + (f" (+{growth / 2**20:.1f} MiB during the timed run)" if growth is not None else "")
                     + (f", peak device {_gib(dev)}" if dev is not None else ""))
    for host, cores in r["other_load_cores"].items():
        lines.append(f"other load       {cores:.2f} cores busy with other programs on {host} during the timed run"
                     + ("  (figures disturbed)" if cores > 0.1 else ""))
    if "one_rank" in r:
        o, lo, hi = r["one_rank"], *r["decode_vs_one_rank_range"]
        lines.append(f"one rank         decode {o['decode_tok_s']:.2f} tok/s ({o['threads']} threads) vs pooled "
                     f"{r['paired_decode_tok_s']:.2f} tok/s, in {o['pairs']} alternating pairs of {o['block_tokens']}-token "
                     f"blocks")
        lines.append(f"pooled / one     decode {r['decode_vs_one_rank']:.3f}x (median of the pairs; {lo:.3f} to {hi:.3f})")
    if "baseline" in r:
        b = r["baseline"]
        lines.append(f"transformers     prefill {b['prefill_tok_s']:.1f} tok/s, decode {b['decode_tok_s']:.2f} tok/s "
                     f"({b['threads']} threads)")
        lines.append(f"plexus / base    decode {r['decode_vs_baseline']:.2f}x, prefill {r['prefill_vs_baseline']:.2f}x")
    return "\n".join(lines)


@click.command()
@common_engine_options(model_default="the 'bench' demo preset, see --preset")
@click.option("--preset", type=click.Choice(["tiny", "small", "bench"]), default=None,
              help="Bench a demo model (written once into the cache); the default without --model is 'bench' "
                   "(~250M parameters).")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--new-tokens", type=click.IntRange(min=2), default=128, show_default=True)
@click.option("--baseline", type=click.Choice(["transformers"]), default=None,
              help="Also run the same generation through this library on rank 0, for a ratio.")
@click.option("--vs-one-rank", is_flag=True,
              help="Under mpirun: also decode with the whole model on rank 0 alone (every core of its node), in "
                   "blocks alternating with the pooled engine's, for a same-run ratio. Rank 0 must have room for "
                   "the whole model as well as its shard.")
@click.option("--probe-mib", type=click.IntRange(min=1), default=PROBE_MIB, show_default=True,
              help="Size of each rank's bandwidth-probe matrix.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench(model, dtype, device, threads, max_context, split, max_memory, verbose, preset, prompt_tokens,
          new_tokens, baseline, vs_one_rank, probe_mib, as_json):
    """Measure load time, time to first token, prefill and decode speed, memory, and decode's
    fraction of the memory-bandwidth floor (run under mpirun for several ranks). Without --model
    or --preset it benches the 'bench' demo model. See docs/benchmarks.md."""
    from plexus.engine.runtime import run_guarded, start

    state = {}

    def body():
        rt = state["rt"] = start(device, threads, verbose)
        report = run_bench(rt, model, preset, prompt_tokens, new_tokens, dtype, max_context, baseline, probe_mib,
                           split, max_memory, vs_one_rank)
        if report is not None:
            click.echo(json.dumps(report) if as_json else format_report(report))
        return 0

    run_guarded(body, lambda: state["rt"].comm if "rt" in state else None)
