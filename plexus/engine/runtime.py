"""Start-up shared by ``generate``, ``serve`` and ``bench``: communicator, logging, device,
threads, the load progress bar and the rank table, and the one error policy: a PlexusError is
one line and exit 1 on every rank; any other exception aborts the whole MPI job so no rank
waits forever in a collective."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from plexus.errors import PlexusError
from plexus.log import get_logger, setup_logging
from plexus.parallel.comm import Communicator, check_world, launcher_rank
from plexus.parallel.devices import allowed_cpus, cpu_threads, device_info, node_local_rank, select_device

PROGRESS_ENVVAR = "PLEXUS_PROGRESS"  # 1: always show the load bar, 0: never; unset: on a terminal


@dataclass
class Runtime:
    comm: Communicator
    device: str
    threads: int
    local_rank: int = 0

    @property
    def log(self):
        return get_logger()


def start(device: str | None = None, threads: int | None = None, verbose: bool = False) -> Runtime:
    """Connect the ranks, then give each its device (by node-local rank) and CPU threads."""
    comm = Communicator()
    setup_logging(comm.rank, verbose)
    check_world(comm)
    local_rank = node_local_rank(comm.local_rank, comm.local_size)
    error, dev = None, "cpu"
    try:
        dev = select_device(local_rank, device)
    except PlexusError as e:  # e.g. --device cuda on a box without one: every rank stops
        error = f"{e} ({comm.hostname})" if comm.size > 1 else str(e)
    comm.agree(error)
    cpus = allowed_cpus()
    # the cores every rank on this node may use, to split them fairly (see cpu_threads)
    node_cpus = [c for host, c in comm.allgather_obj((comm.hostname, cpus)) if host == comm.hostname]
    n = cpu_threads(comm.local_size, threads, cpus, node_cpus)
    torch.set_num_threads(n)
    return Runtime(comm, dev, n, local_rank)


def resolve_model_dir(model: str | None, comm: Communicator) -> str:
    """``model`` if given (a directory or a .gguf file; must exist), else the embedded tiny demo
    model, created once."""
    if model:
        if not Path(model).is_dir() and not (Path(model).is_file() and Path(model).suffix.lower() == ".gguf"):
            raise PlexusError(f"model directory {model} does not exist (--model takes a directory or a .gguf file)")
        return model
    from plexus.checkpoint.demo import ensure_default_model

    log = get_logger()
    return str(ensure_default_model(log=log.info if comm.rank == 0 else (lambda *_: None)))


# ---- loading progress and the rank table -------------------------------------------------------

def progress_enabled(env=os.environ, stream=sys.stderr) -> bool:
    """The bar is for people: shown on a terminal, never in CI logs unless forced. Under
    mpirun a rank's stderr is a pipe, so launch/*.sh set PLEXUS_PROGRESS=1 from their own tty."""
    forced = env.get(PROGRESS_ENVVAR, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


def plan_bytes(plan, rank: int = 0) -> int:
    """Bytes of ``rank``'s share of the checkpoint as stored (the file's dtype: what the loader
    reads, whatever dtype it then computes in)."""
    from plexus.models.config import dtype_size, resolve_dtype

    return plan.weight_elements(rank) * dtype_size(resolve_dtype(None, plan.config))


class LoadProgress:
    """Rank 0's bar of the bytes it loads: the ``progress`` callback of Engine.load. Engine.load
    calls ``set_plan`` once the ranks agree on a plan, which gives the bar its total (this rank's
    share); until then it counts bytes without a percentage."""

    def __init__(self, bar, rank: int = 0):
        self.bar, self.rank = bar, rank

    def __call__(self, nbytes: int) -> None:
        self.bar.update(nbytes)

    def set_plan(self, plan) -> None:
        self.bar.total = plan_bytes(plan, self.rank)
        self.bar.refresh()


@contextlib.contextmanager
def load_progress(rt: Runtime, model_dir: str | Path | None = None) -> Iterator[LoadProgress | None]:
    """Rank 0's load bar (see LoadProgress) for ``model_dir``, when progress_enabled(); yields
    None elsewhere."""
    comm = rt.comm
    if comm.rank != 0 or not progress_enabled():
        yield None
        return
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    what = f"{Path(model_dir).name} " if model_dir else ""
    # log lines while loading (the plan) go above the bar instead of through it
    with logging_redirect_tqdm([get_logger()]), \
            tqdm(total=None, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, dynamic_ncols=True,
                 desc=f"plexus: loading {what}(rank 0 of {comm.size})") as bar:
        yield LoadProgress(bar, comm.rank)
        if bar.total and bar.n != bar.total:  # the checkpoint mixes dtypes: end at 100%, not 97%
            bar.total = bar.n
            bar.refresh()


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "?"


def format_rank_table(rows: list[dict]) -> str:
    """One line per rank: where it runs, its memory (free / total) and its share of the weights."""
    total = sum(r["weight_bytes"] for r in rows) or 1
    header = ("rank", "host", "device", "memory free / total", "threads", "weights")
    lines = [header]
    for r in rows:
        device = r["device"] + (f" ({r['name']})" if r.get("name") else "")
        memory = f"{_size(r['free'])} / {_size(r['total'])}" + (" RAM" if r["device"] == "cpu" else "")
        share = f"{_size(r['weight_bytes'])} ({100 * r['weight_bytes'] / total:.1f}%)"
        lines.append((str(r["rank"]), r["host"], device, memory, str(r["threads"]), share))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def log_rank_table(rt: Runtime, engine) -> None:
    """Collective: every rank reports where it runs; rank 0 logs one table (and warns when two
    ranks landed on the same accelerator). Call on every rank right after Engine.load, so that
    "free" memory is what is left for activations once the weights are in."""
    comm = rt.comm
    dtype = engine.model.embed_tokens.dtype
    from plexus.models.config import dtype_size

    row = dict(rank=comm.rank, host=comm.hostname, device=rt.device, threads=rt.threads,
               weight_bytes=engine.plan.weight_elements(comm.rank) * dtype_size(dtype), **device_info(rt.device))
    rows = comm.allgather_obj(row)
    if comm.rank != 0:
        return
    log = rt.log
    dtype_name = str(dtype).removeprefix("torch.")
    log.info(f"{comm.size} rank(s), {_size(sum(r['weight_bytes'] for r in rows))} of {dtype_name} weights:\n"
             + format_rank_table(rows))
    seen: dict[tuple, int] = {}
    for r in rows:
        if r["device"] == "cpu":
            continue
        key = (r["host"], r["uuid"] or r["device"])
        if key in seen:
            log.warning(f"ranks {seen[key]} and {r['rank']} share {r['device']} on {r['host']}: more ranks "
                        "than accelerators there (fewer slots, or --device)")
        seen.setdefault(key, r["rank"])


def run_guarded(body: Callable[[], int | None], comm_getter: Callable[[], Communicator | None]) -> None:
    """Run a command body under the error policy and exit with its status."""
    try:
        code = body() or 0
    except PlexusError as e:
        comm = comm_getter()
        rank = comm.rank if comm is not None else (launcher_rank() or 0)  # (failed before start() returned)
        if rank == 0 or not getattr(e, "collective", False):
            prefix = "" if rank == 0 else f"[rank {rank}] "
            print(f"plexus: error: {prefix}{e}", file=sys.stderr, flush=True)
        code = 1
    except KeyboardInterrupt:
        code = 130
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        comm = comm_getter()
        if comm is not None and comm.size > 1:
            comm.abort(1)
        code = 1
    sys.stdout.flush()
    sys.exit(code)
