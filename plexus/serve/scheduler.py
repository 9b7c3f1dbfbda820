"""Rank 0's request queue: HTTP handler threads submit jobs, one engine thread runs them one
after another (every rank follows each broadcast step in lockstep), and each job's text flows
back to its own handler through the job's event queue.

The scheduler also owns the server's lifecycle, ``loading -> ok -> stopping | failed``, and
notices a broken mesh: an exception out of a collective (under ULFM, ``mpirun --with-ft ulfm``,
a dead rank makes the next collective raise) or a collective that makes no progress for
``stall_timeout`` seconds (any launcher). While idle it pings the other ranks every
``ping_interval`` seconds so a death is noticed without waiting for the next request.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable

from plexus.engine.sampling import SamplingParams
from plexus.errors import MeshBroken, PlexusError
from plexus.log import get_logger
from plexus.serve.metrics import ServerMetrics
from plexus.serve.openai_api import APIError, unavailable

LOADING, OK, STOPPING, FAILED = "loading", "ok", "stopping", "failed"


class Job:
    """One request: its prompt and sampling, and the events its handler reads, in order:
    ``("start", None)``, ``("text", str)`` while streaming, then one terminal event,
    ``("done", Completion)`` or ``("error", APIError)``."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, stream: bool = False,
                 client_gone: Callable[[], bool] = lambda: False):
        self.prompt_ids, self.params, self.stream = prompt_ids, params, stream
        self.client_gone = client_gone
        self.events: queue.Queue = queue.Queue()
        self.abandoned = threading.Event()  # the handler stopped listening (client gone)
        self.submitted = time.monotonic()
        self.started: float | None = None
        self.last_token: float | None = None
        self._lock = threading.Lock()
        self._finished = False

    def gone(self) -> bool:
        return self.abandoned.is_set() or self.client_gone()

    def put_text(self, text: str) -> None:
        self.events.put(("text", text))

    def finish(self, kind: str, value) -> bool:
        """Post the terminal event once; later attempts (a failure racing a finish) are dropped."""
        with self._lock:
            if self._finished:
                return False
            self._finished = True
        self.events.put((kind, value))
        return True

    @property
    def finished(self) -> bool:
        return self._finished


class Scheduler:
    def __init__(self, world_size: int = 1, stall_timeout: float = 60.0, ping_interval: float = 1.0,
                 max_pending: int = 256, registry=None):
        self.world_size = world_size
        self.stall_timeout, self.ping_interval, self.max_pending = stall_timeout, ping_interval, max_pending
        self.state = LOADING
        self.engine = self.tokenizer = None
        self.failure: str | None = None
        self.failure_kind: str | None = None  # "mpi" (a collective raised), "stall", "internal"
        self.stop_now = False
        self.stopped_at: float | None = None  # monotonic time of the first stop()
        self.finished = threading.Event()  # the engine thread is done (stopped or failed)
        self.metrics = ServerMetrics(world_size, self.queue_depth, lambda: int(self._running is not None),
                                     registry)
        self._queue: queue.Queue = queue.Queue()
        self._jobs: set[Job] = set()  # submitted and not finished
        self._running: Job | None = None
        self._lock = threading.Lock()
        self._deadline: float | None = None  # stopping: cancel in-flight work after this
        self._busy_since: float | None = None  # engine thread inside a collective since
        self._progress = 0.0  # last sign of life from the mesh (a token, a finished ping)
        self.log = get_logger()

    # ---- lifecycle (called from the main thread and signal handlers) ---------------------------

    def start(self, engine, tokenizer) -> None:
        """Loaded: accept requests, start the engine thread and the watchdog."""
        self.engine, self.tokenizer = engine, tokenizer
        with self._lock:
            if self.state == LOADING:
                self.state = OK
        threading.Thread(target=self._engine_thread, name="plexus-engine", daemon=True).start()
        if self.stall_timeout:
            threading.Thread(target=self._watchdog, name="plexus-watchdog", daemon=True).start()

    def stop(self, now: bool = False, drain_timeout: float = 5.0) -> None:
        """Refuse new requests; finish queued and running ones for up to ``drain_timeout``
        seconds (``now``: not at all), then release the worker ranks."""
        with self._lock:
            if self.state in (FAILED,):
                return
            self.stopped_at = self.stopped_at or time.monotonic()
            deadline = time.monotonic() + (0.0 if now else drain_timeout)
            self._deadline = deadline if self._deadline is None else min(self._deadline, deadline)
            self.stop_now = self.stop_now or now
            self.state = STOPPING
            jobs = list(self._jobs) if now else []
        for job in jobs:  # now: answer at once, even if the engine thread is stuck in a collective
            job.finish("error", unavailable("the server is shutting down", "shutting_down"))
        self._queue.put(None)  # wake the engine thread (started after loading if still loading)

    def fail(self, reason: str, kind: str = "internal") -> None:
        """The mesh is broken: answer every waiting request with 503 and stop."""
        with self._lock:
            if self.state == FAILED:
                return
            self.state, self.failure, self.failure_kind = FAILED, reason, kind
            jobs = list(self._jobs)
        self.log.error(f"the mesh failed: {reason}")
        for job in jobs:
            job.finish("error", unavailable(f"the server failed: {reason}", "mesh_failed"))
        self.finished.set()

    # ---- handlers ----------------------------------------------------------------------------

    def check_ready(self) -> None:
        if self.state == LOADING:
            raise unavailable("the model is still loading; retry when GET /health says ok", "loading")
        if self.state == STOPPING:
            raise unavailable("the server is shutting down", "shutting_down")
        if self.state == FAILED:
            raise unavailable(f"the server failed: {self.failure}", "mesh_failed")

    def submit(self, job: Job) -> None:
        with self._lock:
            self.check_ready()
            if len(self._jobs) >= self.max_pending:
                raise APIError(429, f"too many requests in flight ({self.max_pending}); retry later",
                               "rate_limit_error", None, "queue_full")
            self._jobs.add(job)
        self._queue.put(job)

    def in_flight(self) -> int:
        """Requests submitted and not yet answered (running or queued)."""
        with self._lock:
            return len(self._jobs)

    def queue_depth(self) -> int:
        with self._lock:
            return len(self._jobs) - (self._running is not None)

    # ---- the engine thread ---------------------------------------------------------------------

    def _engine_thread(self) -> None:
        try:
            while self.state != FAILED:
                if self.state == STOPPING and (self._queue.empty() or self._past_deadline()):
                    break
                try:
                    job = self._queue.get(timeout=self.ping_interval)
                except queue.Empty:
                    if self.state == OK:
                        self._collective(self.engine.ping)
                    continue
                if job is not None:
                    self._run(job)
            if self.state == STOPPING:
                self._refuse_waiting()
                self._collective(lambda: self.engine.shutdown(now=self.stop_now))
        except _MeshFailure:
            pass
        finally:
            self.finished.set()

    def _run(self, job: Job) -> None:
        if job.gone() or self._past_deadline():
            self._close(job, "error", unavailable("the server is shutting down", "shutting_down")
                        if not job.gone() else APIError(499, "client closed the request"))
            return
        with self._lock:
            self._running = job
        job.started = time.monotonic()
        job.events.put(("start", None))
        try:
            result = self._collective(lambda: self.engine.complete(
                self.tokenizer, job.prompt_ids, job.params, on_text=job.put_text if job.stream else None,
                cancelled=lambda: self._tick(job)))
        except PlexusError as e:  # the request, not the mesh (checked before anything was broadcast)
            self._close(job, "error", APIError(400, str(e)))
            return
        finally:
            with self._lock:
                self._running = None
        m = self.metrics
        m.prompt_tokens.inc(len(job.prompt_ids))
        m.generation_tokens.inc(len(result.token_ids))
        if result.ttft_s is not None:
            m.ttft.observe(job.started - job.submitted + result.ttft_s)
        if result.finish_reason == "cancelled":
            m.cancelled.inc()
            err = APIError(499, "client closed the request") if job.gone() else \
                unavailable("the server is shutting down", "shutting_down")
            self._close(job, "error", err)
        else:
            self._close(job, "done", result)

    def _tick(self, job: Job) -> bool:
        """Called by the engine after each token: a sign of life, and whether to stop."""
        now = time.monotonic()
        self._progress = now
        if job.last_token is not None:
            self.metrics.tpot.observe(now - job.last_token)
        job.last_token = now
        return job.gone() or self._past_deadline() or self.state == FAILED

    def _close(self, job: Job, kind: str, value) -> None:
        job.finish(kind, value)
        with self._lock:
            self._jobs.discard(job)

    def _refuse_waiting(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                self._close(job, "error", unavailable("the server is shutting down", "shutting_down"))

    def _past_deadline(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _collective(self, fn):
        """Run engine work that involves every rank; an exception out of it (other than a
        request's PlexusError) means the mesh is broken."""
        self._busy_since = self._progress = time.monotonic()
        try:
            return fn()
        except MeshBroken as e:  # a peer rank on this node died or stalled (plexus/models/kernels.py)
            self.fail(f"{e}; a rank has probably died", "mpi")
            raise _MeshFailure() from e
        except PlexusError:
            raise
        except Exception as e:
            mpi = type(e).__module__.startswith("mpi4py")
            reason = (f"a collective failed ({e}); a rank has probably died" if mpi else
                      f"{type(e).__name__}: {e}")
            if not mpi:
                self.log.exception("engine error")
            self.fail(reason, "mpi" if mpi else "internal")
            raise _MeshFailure() from e
        finally:
            self._busy_since = None

    def _watchdog(self) -> None:
        """Notice a collective that never completes (a rank died without ULFM to tell us)."""
        while not self.finished.wait(min(0.25, self.stall_timeout / 4)):
            busy = self._busy_since
            if busy is not None and time.monotonic() - max(busy, self._progress) > self.stall_timeout:
                self.fail(f"no progress from the other ranks for {self.stall_timeout:g} s; a rank has "
                          "probably died or hung", "stall")


class _MeshFailure(Exception):
    pass
