"""``plexus serve`` on every rank: who listens, who loads, who follows, and how it all ends.

Rank 0 binds the port first (so ``/health`` answers "loading" while the weights load), loads
its shard with the others, then hands requests to the Scheduler's engine thread while its main
thread waits for signals. The other ranks load their shards and follow rank 0 in
``Engine.worker_loop``; they never listen on a port, and they ignore SIGTERM/SIGINT/SIGUSR1: rank 0
tells them when to go, so a forwarded signal cannot kill one in the middle of a collective.

Endings (details and the reasons in docs/api.md):

- SIGTERM/SIGINT to rank 0, or SIGUSR1 to any launcher (mpirun and srun forward it to every
  rank; launch/serve.sh and slurm/serve.sbatch turn their own SIGTERM/SIGINT into it): stop
  accepting, finish in-flight requests for up to ``--drain-timeout`` seconds, release the
  workers; every rank exits 0. A second signal stops at once.
- SIGTERM/SIGINT to ``mpirun`` (Open MPI 5): PRRTE sends every rank SIGCONT, then SIGTERM
  0.25 s later, then SIGKILL 0.25 s after that; nothing configures those delays, and each wait
  ends early when one of its children exits. So a SIGCONT to a rank that was not stopped (or a
  SIGTERM within a second of a SIGCONT) is taken as "the launcher is ending the job": rank 0
  answers waiting requests with 503 at once and releases the workers, then all ranks pass one
  barrier and exit 0 together, before PRRTE's SIGKILL. (mpirun itself then reports 1: PRRTE
  marks any job it aborted so.)
- A rank dies: see plexus.serve.scheduler; rank 0 answers in-flight and new requests with 503 for a
  moment, then exits 1 (or aborts the job when ranks may be stuck in a collective).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from plexus.errors import PlexusError
from plexus.parallel.sizes import KV_BLOCK

LAUNCHER_WINDOW_S = 1.0  # SIGTERM this soon after SIGCONT: PRRTE's kill sequence
STOPPED_GAP_S = 0.5  # a tick gap this long with no CPU used by the process: it was stopped (ctrl-Z)
FAIL_LINGER_S = 2.0  # after a failure, keep answering 503 this long before exiting
NOW_EXIT_S = 0.35  # fast path: the time to answer and leave (PRRTE's SIGKILL is 0.5 s after its SIGCONT)


@dataclass
class ServeOptions:
    model: str | None
    dtype: str | None
    max_context: int | None
    split: str
    max_memory: str | None
    host: str
    port: int
    api_key: str | None
    served_model_name: str | None
    max_body_bytes: int
    http_threads: int
    drain_timeout: float
    stall_timeout: float
    quantize: str | None = None
    quant_group: int = 128
    max_batch: int = 16
    max_queue: int = 64
    queue_timeout: float = 300.0
    prefill_chunk: int = 32
    kv_tokens: int | None = None  # None: max_context x max_batch, or what the memory holds
    prefix_cache: bool = True
    cors_origins: tuple[str, ...] = ()  # browser origins allowed (--cors-origin); none: CORS off
    tokenizer: str | None = None  # --tokenizer: instead of the model's own


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Signals:
    """Records the stop signals (STOP_SIGNALS) and SIGCONT (PRRTE's warning shot) in the main
    thread; rank 0 sets ``callback(signum, launcher)`` once it can act on them. The other ranks
    never do: they only follow rank 0.

    A SIGCONT also ends a real stop (ctrl-Z, then fg); that one must not stop the server. A
    thread ticks every 0.1 s: a long gap in its ticks during which the whole process used no
    CPU means the process was stopped (a thread merely starved of the GIL or of a core leaves
    the others running)."""

    def __init__(self):
        self.last_cont = self.resumed = float("-inf")
        self.last_tick, self.last_cpu = time.monotonic(), time.process_time()
        self.pending: list[tuple[int, bool]] = []
        self._callback = None
        threading.Thread(target=self._tick, name="plexus-tick", daemon=True).start()

    def _was_stopped(self, now: float, cpu: float) -> bool:
        gap = now - self.last_tick
        return gap > STOPPED_GAP_S and cpu - self.last_cpu < 0.05 * gap

    def _tick(self):
        while True:
            now, cpu = time.monotonic(), time.process_time()
            if self._was_stopped(now, cpu):
                self.resumed = now  # this thread may see the resume before the handler runs
            self.last_tick, self.last_cpu = now, cpu
            time.sleep(0.1)

    def on_cont(self, signum, frame):
        now = time.monotonic()
        was_stopped = self._was_stopped(now, time.process_time()) or now - self.resumed < 0.2
        self.last_cont = now
        if not was_stopped:
            self.on_stop(signum, frame)

    def on_stop(self, signum, frame):
        launcher = time.monotonic() - self.last_cont < LAUNCHER_WINDOW_S
        if self._callback is None:
            self.pending.append((signum, launcher))
        else:
            self._callback(signum, launcher)

    @property
    def received(self) -> bool:
        return bool(self.pending)

    def set_callback(self, callback) -> None:
        self._callback = callback
        for signum, launcher in self.pending:
            callback(signum, launcher)


def install_signal_handlers() -> Signals:
    s = Signals()
    signal.signal(signal.SIGCONT, s.on_cont)
    for sig in STOP_SIGNALS:
        signal.signal(sig, s.on_stop)
    return s


def run_serve(rt, opts: ServeOptions, signals: Signals) -> int:
    from plexus.engine.engine import Engine
    from plexus.engine.runtime import load_progress, log_rank_table, resolve_model_dir
    from plexus.engine.source import load_config
    from plexus.engine.tokenizer import load_tokenizer
    from plexus.serve.app import create_app
    from plexus.serve.http import HttpServer
    from plexus.serve.scheduler import Scheduler

    comm, log = rt.comm, rt.log
    t0 = time.monotonic()
    error, model_dir, tokenizer, scheduler, http = None, None, None, None, None
    try:
        model_dir = resolve_model_dir(opts.model, comm)
        if comm.rank == 0:
            tokenizer = load_tokenizer(model_dir, opts.tokenizer, load_config(model_dir).vocab_size)
            name = opts.served_model_name or Path(model_dir).resolve().name
            scheduler = Scheduler(comm.size, opts.stall_timeout, max_queue=opts.max_queue, max_batch=opts.max_batch,
                                  queue_timeout=opts.queue_timeout, prefill_chunk=opts.prefill_chunk,
                                  prefix_cache=opts.prefix_cache)
            app = create_app(scheduler, name, opts.api_key, opts.max_body_bytes, opts.cors_origins)
            http = HttpServer(app, opts.host, opts.port, opts.http_threads, opts.max_body_bytes)
    except PlexusError as e:
        error = str(e)
    except OSError as e:  # the port is taken, or the address is not ours
        error = f"cannot listen on {opts.host}:{opts.port}: {e.strerror or e}"
    comm.agree(error)

    if comm.rank == 0:
        http.start()
        log.info(f"serving {name} at {http.url}/v1 on {comm.size} rank(s) "
                 "(GET /health says 'loading' until every rank has loaded)")
        signals.set_callback(lambda signum, launcher: _on_signal(scheduler, http, opts, log, signum, launcher))
    with load_progress(rt) as progress:
        engine = Engine.load(model_dir, comm, opts.dtype, rt.device, opts.max_context,
                             eos_token_ids=tokenizer.eos_token_ids if tokenizer else frozenset(),
                             progress=progress, split=opts.split, max_memory=opts.max_memory,
                             quantize=opts.quantize, quant_group=opts.quant_group, max_batch=opts.max_batch,
                             kv_tokens=opts.kv_tokens)
    log_rank_table(rt, engine)
    if comm.rank != 0:
        return _worker_main(engine, log)
    scheduler.start(engine, tokenizer)
    log.info(f"batch: up to {engine.max_batch} sequences at once, each up to {engine.max_context} tokens; "
             f"KV cache {engine.kv_tokens:,} tokens ({engine.kv.blocks:,} blocks of {KV_BLOCK}, "
             f"{engine.kv_tokens / engine.max_context:.3g} x the context) shared by them"
             f"{', prefix cache on' if opts.prefix_cache else ''}; then up to {opts.max_queue} waiting "
             f"(--max-queue), each for up to {opts.queue_timeout:g} s")
    log.info(f"ready: {name} loaded on {comm.size} rank(s) in {time.monotonic() - t0:.1f} s; "
             f"SIGTERM rank 0 (pid {os.getpid()}) or SIGUSR1 the launcher to drain and stop")
    return _rank0_main(scheduler, http, comm, log, opts)


def _on_signal(scheduler, http, opts, log, signum, launcher) -> None:
    from plexus.serve.scheduler import STOPPING

    if scheduler.stop_now:
        return  # PRRTE's SIGTERM after its SIGCONT: already on the way out
    name = signal.Signals(signum).name + (" (a stop request)" if signum == signal.SIGUSR1 else "")
    now = launcher or scheduler.state == STOPPING  # a second signal: do not wait any longer
    in_flight = scheduler.in_flight()
    scheduler.stop(now=now, drain_timeout=opts.drain_timeout)  # first: the 503s go out at once
    http.stop_accepting()
    if now:
        log.info(f"{name}: {'the launcher is ending the job' if launcher else 'again'}; stopping now"
                 + (f" (503 to {in_flight} in-flight request(s))" if in_flight else ""))
    else:
        log.info(f"{name}: stopping: no new requests; finishing {in_flight} in-flight request(s) "
                 f"(up to {opts.drain_timeout:g} s), then every rank exits")


def _rank0_main(scheduler, http, comm, log, opts) -> int:
    """Rank 0's main thread: wait for the end and leave the way it calls for."""
    from plexus.serve.scheduler import FAILED, STOPPING

    while not scheduler.finished.wait(0.01):
        if scheduler.state == STOPPING:
            limit = NOW_EXIT_S if scheduler.stop_now else opts.drain_timeout + 5.0
            if time.monotonic() - scheduler.stopped_at > limit:
                break  # the engine thread is stuck (a dead rank?): leave without it
    if scheduler.state == FAILED:
        time.sleep(FAIL_LINGER_S)  # health checks and new requests see 503 and why
        http.stop_accepting()
        http.wait_idle(1.0)
        _exit(log, 1, abort=comm if scheduler.failure_kind != "mpi" else None)
    if scheduler.stop_now:  # let the 503s out, but leave before the launcher's SIGKILL
        http.wait_idle(max(0.05, scheduler.stopped_at + NOW_EXIT_S - time.monotonic()), linger=0.01)
    else:
        http.wait_idle(2.0)
    if not scheduler.finished.is_set():  # the workers may be stuck: end them (unless PRRTE is at it)
        _exit(log, 1, abort=None if scheduler.stop_now else comm)
    if scheduler.stop_now:  # the launcher's SIGKILL is due: no polite MPI finalize
        _exit_together(comm, log)
    log.debug("exiting (status 0)")
    return 0


def _worker_main(engine, log) -> int:
    """A worker rank's main thread: follow rank 0 until it says shut down."""
    try:
        cmd = engine.worker_loop()
    except PlexusError:
        raise
    except Exception as e:  # under ULFM: rank 0 (or another rank) died mid-collective
        print(f"plexus: error: [rank {engine.comm.rank}] lost the other ranks ({e})", file=sys.stderr)
        _exit(log, 1)
    if cmd.get("now"):
        _exit_together(engine.comm, log)
    log.debug("exiting (status 0)")
    return 0


def _exit_together(comm, log) -> None:
    """Exit 0 on every rank at (nearly) the same instant: PRRTE's SIGKILL follows as soon as
    its second child exits, so a rank that lags behind the others would be killed."""
    comm.barrier()
    _exit(log, 0)


def _exit(log, code: int, abort=None) -> None:
    """Leave at once, without MPI_Finalize (which would wait for ranks that are gone)."""
    log.debug(f"exiting (status {code})")
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # the launcher may have closed our output already
            pass
    if abort is not None:
        abort.abort(code)  # ranks may be stuck in a collective: end the whole job
    os._exit(code)
