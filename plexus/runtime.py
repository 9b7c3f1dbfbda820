"""Start-up shared by ``generate``, ``serve`` and ``bench``: communicator, logging, device,
threads, and the one error policy: a PlexusError is one line and exit 1 on every rank; any
other exception aborts the whole MPI job so no rank waits forever in a collective."""

from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from plexus.comm import Communicator, check_world
from plexus.devices import cpu_threads, local_rank_from_env, select_device
from plexus.errors import PlexusError
from plexus.log import get_logger, setup_logging


@dataclass
class Runtime:
    comm: Communicator
    device: str
    threads: int

    @property
    def log(self):
        return get_logger()


def start(device: str | None = None, threads: int | None = None, verbose: bool = False) -> Runtime:
    comm = Communicator()
    setup_logging(comm.rank, verbose)
    check_world(comm)
    dev = select_device(local_rank_from_env(comm.local_rank), device)
    n = cpu_threads(comm.local_size, threads)
    torch.set_num_threads(n)
    return Runtime(comm, dev, n)


def resolve_model_dir(model: str | None, comm: Communicator) -> str:
    """``model`` if given (must exist), else the embedded tiny demo model, created once."""
    if model:
        if not Path(model).is_dir():
            raise PlexusError(f"model directory {model} does not exist")
        return model
    from plexus.demo import ensure_default_model

    log = get_logger()
    return str(ensure_default_model(log=log.info if comm.rank == 0 else (lambda *_: None)))


def run_guarded(body: Callable[[], int | None], comm_getter: Callable[[], Communicator | None]) -> None:
    """Run a command body under the error policy and exit with its status."""
    try:
        code = body() or 0
    except PlexusError as e:
        comm = comm_getter()
        if comm is None or comm.rank == 0 or not getattr(e, "collective", False):
            prefix = "" if comm is None or comm.rank == 0 else f"[rank {comm.rank}] "
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
