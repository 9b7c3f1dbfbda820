"""Rank 0's request queue: HTTP handler threads submit jobs; one engine thread runs them in a
continuous batch (engine/batch.py: up to ``max_batch`` at once, joining and leaving between
steps; every rank follows each broadcast step in lockstep), and each job's text flows back to its
own handler through the job's event queue. Past the batch, jobs wait in a bounded queue
(``max_queue``; beyond it 429 with Retry-After) for at most ``queue_timeout`` seconds (then 503).

The scheduler also owns the server's lifecycle, ``loading -> ok -> stopping | failed``, and
notices a broken mesh: an exception out of a collective (under ULFM, ``mpirun --with-ft ulfm``,
a dead rank makes the next collective raise) or a collective that makes no progress for
``stall_timeout`` seconds (any launcher). While idle it pings the other ranks every
``ping_interval`` seconds so a death is noticed without waiting for the next request.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import deque
from typing import Callable

from plexus.engine.batch import BatchRunner
from plexus.engine.sampling import SamplingParams
from plexus.errors import MeshBroken, PlexusError
from plexus.log import get_logger
from plexus.serve.metrics import ServerMetrics
from plexus.serve.openai_api import APIError, unavailable

LOADING, OK, STOPPING, FAILED = "loading", "ok", "stopping", "failed"


RATE_WINDOW_S = 5.0  # seconds of steps tokens_per_s averages over

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
        self.tokens_seen = 0  # generated tokens counted for the TPOT histogram
        self._lock = threading.Lock()
        self._finished = False

    def gone(self) -> bool:
        return self.abandoned.is_set() or self.client_gone()

    def put_text(self, text: str, logprobs: list | None = None) -> None:
        if logprobs:
            self.events.put(("logprobs", logprobs))  # the tokens of the text that follows
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
                 max_queue: int = 256, registry=None, max_batch: int | None = None, queue_timeout: float = 300.0,
                 prefill_chunk: int | None = None, prefix_cache: bool = True):
        self.world_size = world_size
        self.stall_timeout, self.ping_interval, self.max_queue = stall_timeout, ping_interval, max_queue
        self.max_batch, self.queue_timeout, self.prefill_chunk = max_batch, queue_timeout, prefill_chunk
        self.prefix_cache = prefix_cache
        self.state = LOADING
        self.engine = self.tokenizer = None
        self.runner: BatchRunner | None = None
        self.failure: str | None = None
        self.failure_kind: str | None = None  # "mpi" (a collective raised), "stall", "internal"
        self.stop_now = False
        self.stopped_at: float | None = None  # monotonic time of the first stop()
        self.finished = threading.Event()  # the engine thread is done (stopped or failed)
        self.metrics = ServerMetrics(world_size, self.queue_depth, self.running, registry, kv=lambda: self._kv())
        self._waiting: deque[Job] = deque()  # submitted, not yet in the batch
        self._made: deque[tuple[float, int]] = deque()  # (step's end, tokens it made), for tokens_per_s
        self._wake = threading.Condition()
        self._jobs: set[Job] = set()  # submitted and not finished
        self._lock = threading.Lock()
        self._deadline: float | None = None  # stopping: cancel in-flight work after this
        self._busy_since: float | None = None  # engine thread inside a collective since
        self._progress = 0.0  # last sign of life from the mesh (a token, a finished ping)
        self._step_s = 0.0  # a recent step's duration (for Retry-After)
        self.log = get_logger()

    # ---- lifecycle (called from the main thread and signal handlers) ---------------------------

    def start(self, engine, tokenizer) -> None:
        """Loaded: accept requests, start the engine thread and the watchdog."""
        self.engine, self.tokenizer = engine, tokenizer
        self.runner = BatchRunner(engine, tokenizer, max_batch=self.max_batch, prefix_cache=self.prefix_cache,
                                  **({"prefill_chunk": self.prefill_chunk} if self.prefill_chunk else {}))
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
        self._notify()  # wake the engine thread (started after loading if still loading)

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
            if len(self._waiting) >= self.max_queue:
                raise APIError(429, f"the server is busy: {self.running()} requests running and {len(self._waiting)} "
                               "waiting (--max-queue); retry later", "rate_limit_error", None, "queue_full",
                               headers={"Retry-After": str(self.retry_after())})
            self._jobs.add(job)
            self._waiting.append(job)
        self._notify()

    def retry_after(self) -> int:
        """Seconds a refused client might wait: about one running request's remaining steps."""
        return max(1, min(60, math.ceil(self._step_s * 64)))

    def in_flight(self) -> int:
        """Requests submitted and not yet answered (running or queued)."""
        with self._lock:
            return len(self._jobs)

    def queue_depth(self) -> int:
        with self._lock:
            return len(self._waiting)

    def _kv(self):
        return self.engine.kv if self.engine is not None else None

    def running(self) -> int:
        runner = self.runner
        return len(runner.running) if runner is not None else 0

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify()

    # ---- the engine thread ---------------------------------------------------------------------

    def _engine_thread(self) -> None:
        runner = self.runner
        try:
            while self.state != FAILED:
                self._admit(runner)
                if runner.running:
                    t0 = time.monotonic()
                    done = self._collective(runner.step)
                    self._step_s = time.monotonic() - t0
                    self._after_step(runner, done)
                    continue
                if self.state == STOPPING:
                    break
                with self._wake:  # idle: wait for a job; ping the ranks every ping_interval
                    idle = not self._waiting and self.state == OK and not self._wake.wait(self.ping_interval)
                if idle and self.state == OK and not self._waiting:
                    self._collective(self.engine.ping)
            if self.state == STOPPING:
                self._refuse_waiting()
                self._collective(lambda: self.engine.shutdown(now=self.stop_now))
        except _MeshFailure:
            pass
        finally:
            self.finished.set()

    def _admit(self, runner: BatchRunner) -> None:
        """Move waiting jobs into the batch while it has room; answer those whose client left,
        that waited past queue_timeout, or (stopping) past the drain deadline."""
        now = time.monotonic()
        while True:
            with self._lock:
                expired = [j for j in self._waiting if j.gone() or now - j.submitted > self.queue_timeout
                           or self._past_deadline()]
                for job in expired:
                    self._waiting.remove(job)
                job = self._waiting[0] if self._waiting and runner.room else None
            for old in expired:
                self._close(old, "error", APIError(499, "client closed the request") if old.gone() else
                            unavailable("the server is shutting down", "shutting_down") if self._past_deadline() else
                            unavailable(f"the request waited {self.queue_timeout:g} s in the queue without a place "
                                        "in the batch (--queue-timeout); retry later", "queue_timeout"))
            if job is None:
                return
            try:
                seq = runner.add(job.prompt_ids, job.params, on_text=job.put_text if job.stream else None,
                                 cancelled=lambda job=job: job.gone() or self._past_deadline()
                                 or self.state == FAILED, tag=job)
            except PlexusError as e:  # the request, not the mesh (nothing was broadcast)
                seq = e
            if seq is None:  # the KV cache is promised to those running: first in line waits for a step
                return
            with self._lock:
                self._waiting.remove(job)
            if isinstance(seq, PlexusError):
                self._close(job, "error", APIError(400, str(seq)))
                continue
            self.metrics.prefix_hit_tokens.inc(seq.reused)
            job.started = time.monotonic()
            job.events.put(("start", None))

    def _after_step(self, runner: BatchRunner, done: list) -> None:
        now = time.monotonic()
        self._progress = now
        made = 0
        for seq in [*runner.running, *done]:
            job = seq.tag
            n = len(seq.result.token_ids)
            if n != job.tokens_seen:
                made += n - job.tokens_seen
                job.tokens_seen = n
                if job.last_token is not None:
                    self.metrics.tpot.observe(now - job.last_token)
                job.last_token = now
        for seq in done:
            self._retire(seq.tag, seq.result)
        with self._lock:
            self._made.append((now, made))
            while self._made and now - self._made[0][0] > RATE_WINDOW_S:
                self._made.popleft()

    def tokens_per_s(self) -> float:
        """Tokens generated per second over the last RATE_WINDOW_S seconds (all requests)."""
        now = time.monotonic()
        with self._lock:
            recent = sum(n for t, n in self._made if now - t <= RATE_WINDOW_S)
        return recent / RATE_WINDOW_S

    def _retire(self, job: Job, result) -> None:
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

    def _close(self, job: Job, kind: str, value) -> None:
        job.finish(kind, value)
        with self._lock:
            self._jobs.discard(job)

    def _refuse_waiting(self) -> None:
        with self._lock:
            jobs = list(self._waiting)
            self._waiting.clear()
        for job in jobs:
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
