"""workerkit's RQ workers: :class:`Worker` (forks a work horse per job) and :class:`SimpleWorker`.

They are RQ worker subclasses, so ``rq worker --worker-class workerkit.engines.rq.Worker`` runs
them too; ``workerkit run rq`` runs them under the supervisor (docs/engines/rq.md). What they add
to RQ:

* **Leases** (:mod:`workerkit.engines._rq.leases`): the attempt's lease is taken in the same
  MULTI as RQ's own start bookkeeping, renewed every H by a thread of the worker's *main* process
  (not the work horse: a job that holds the GIL in C code must not lose its lease while it is
  alive), and every settle is fenced by it.
* **Crash recovery**: every live worker looks, about once a second and one worker per queue at a
  time, for attempts whose lease is gone, and puts them back at the front of their queue (the
  attempt stays consumed; a job out of attempts goes to the failed registry with the reason).
  The lease lives ``V - scan interval`` seconds, so a dead pod's job is requeued within V.
* **Bounded drain**: SIGTERM stops the dequeuing at once (the blocked BLPOP is woken through a
  private key, never by raising from the signal handler, which could drop a job Redis had
  already popped); ``request_stop`` reaches the job's :class:`~workerkit.job.JobContext`;
  ``release`` takes the lease from the work horse, stops it, and requeues the job at the front
  with its checkpoint and its attempt given back.
* **The job context, events and the task allowlist** (:class:`~workerkit.engines._rq.tasks.RqApp`).

Processes and threads of the forking worker: the main process runs RQ's loop (dequeue, fork,
wait for the horse) in its main thread, and an *upkeep* thread (heartbeats, store health, queue
stats, lease renewal, the recovery scan, the local deadlines when there is no supervisor). The
supervisor's commands arrive on the event client's reader thread. The work horse is forked per
job; it gets a pipe from its parent for ``request_stop`` and dies with its parent
(``PR_SET_PDEATHSIG``), so that it can never run on, unleased, after its worker is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import errno
import logging
import math
import os
import random
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, Final, cast

import redis
import redis.exceptions
from rq import SimpleWorker as RqSimpleWorker
from rq import Worker as RqWorker
from rq.exceptions import DeserializationError, NoSuchJobError
from rq.executions import Execution
from rq.job import Job, JobStatus, Retry
from rq.queue import Queue
from rq.serializers import DefaultSerializer, JSONSerializer, resolve_serializer
from rq.timeouts import HorseMonitorTimeoutException, JobTimeoutException
from rq.utils import as_text, now, utcformat, utcparse
from rq.worker.base import WorkerStatus

from workerkit import events as events_module
from workerkit.engines._rq.leases import (
    SETTLE_TTL_MS,
    WAKE_PREFIX,
    AttemptKeys,
    Leases,
    lease_key,
    started_key,
)
from workerkit.engines._rq.tasks import DEFAULT_MAX_ATTEMPTS, RqApp, TaskNotAllowed
from workerkit.errors import (
    ConfigurationError,
    IdempotencyInProgress,
    IdempotencyKeyMismatch,
    JobInterrupted,
    LeaseLost,
    ReleaseJob,
)
from workerkit.idempotency import Idempotency, outcome_of
from workerkit.job import JobContext, request_stop_all
from workerkit.settings import Settings, load_settings

if TYPE_CHECKING:
    from redis.client import Pipeline

__all__ = (
    "META_KEY",
    "RECOVERY_SCAN_INTERVAL",
    "Recovery",
    "SimpleWorker",
    "Worker",
    "WorkerkitJob",
    "lease_ttl",
    "resolve_rq_serializer",
    "scan_interval",
)

log = logging.getLogger("workerkit.engines.rq")

#: The job meta key of workerkit's own state: ``{"attempts", "max_attempts", "checkpoint"}``.
META_KEY: Final = "workerkit"
#: How often live workers look for abandoned attempts (at most; less when H is shorter).
RECOVERY_SCAN_INTERVAL: Final = 1.0
TICK: Final = 0.05  # the upkeep thread's resolution: how soon a SIGTERM wakes the dequeue
HEARTBEAT_EVERY: Final = 2.0
HEALTH_EVERY: Final = 5.0
WAKE_TOKEN: Final = b"wake"
#: A job whose idempotency key another live attempt holds comes back after min(the holder's
#: claim expiry, this backoff with equal jitter): soon enough to replay the holder's result
#: shortly after it completes, spread out so that a burst of duplicates does not come back
#: together. Deferred jobs are put back by the recovery scan, so add up to one scan interval.
DEFER_BACKOFF: Final = 2.0

# The work horse's exit status tells its parent how the attempt ended (the parent reports
# job_finished, so the supervisor sees job_started and job_finished on one connection, in order).
_HORSE_CODES: Final[dict[str, int]] = {
    "succeeded": 0,
    "failed": 64,
    "retried": 65,
    "timed_out": 66,
    "released": 67,
    "lease_lost": 68,
    "deferred": 70,
    "skipped_duplicate": 71,
}
_HORSE_OUTCOMES: Final[dict[int, str]] = {code: name for name, code in _HORSE_CODES.items()}
_HORSE_INTERRUPTED: Final = 69  # stopped by our SIGTERM; the parent settles the attempt


def scan_interval(settings: Settings) -> float:
    """How often the recovery scan runs: every second, or every H when that is shorter."""
    return max(0.05, min(RECOVERY_SCAN_INTERVAL, settings.effective_heartbeat_interval))


def lease_ttl(settings: Settings) -> float:
    """The lease TTL: V minus one scan interval, so that a dead attempt is requeued within V."""
    v = settings.visibility_timeout if settings.visibility_timeout is not None else 30.0
    return max(v - scan_interval(settings), settings.effective_heartbeat_interval * 1.5, 0.5)


def resolve_rq_serializer(serializer: Any) -> Any:
    """JSON unless pickle (or a custom serializer) is asked for by name or object, with a warning.

    RQ's own default is pickle, which runs code chosen by anyone who can write to Redis.
    """
    if serializer is None or serializer in ("json", JSONSerializer):
        return JSONSerializer
    resolved = resolve_serializer(serializer)
    if resolved is JSONSerializer:
        return JSONSerializer
    what = "pickle" if resolved is DefaultSerializer else f"the custom serializer {serializer!r}"
    log.warning(
        "jobs are deserialized with %s: anyone who can write to Redis can run code in this "
        "worker; use the JSON serializer unless every Redis writer is trusted",
        what,
        extra={"event": "unsafe_serializer", "serializer": str(serializer)},
    )
    return resolved


class WorkerkitJob(Job):
    """An RQ job whose function and callbacks come only from the worker's :class:`RqApp`.

    RQ resolves ``job.func`` (and the callbacks) with ``import_attribute`` on whatever dotted
    path is stored in Redis; here the path is checked against the allowlist first. The worker
    uses a subclass bound to its app (:meth:`bound_to`).
    """

    workerkit_app: RqApp | None = None
    #: The worker's settings: the defaults of ``@workerkit.idempotent`` functions it runs.
    workerkit_settings: Settings | None = None

    @classmethod
    def bound_to(
        cls, app: RqApp, base: type[Job] = Job, settings: Settings | None = None
    ) -> type[WorkerkitJob]:
        """A job class that resolves functions through ``app`` (``base``: a custom job class)."""
        bases: tuple[type, ...] = (cls,) if base in (Job, cls) else (cls, base)
        attributes = {"workerkit_app": app, "workerkit_settings": settings}
        bound = type("WorkerkitJob", bases, attributes)
        return cast("type[WorkerkitJob]", bound)

    def _resolve(self, name: str | None, what: str) -> Callable[..., Any]:
        app = self.workerkit_app
        if app is None:
            raise TaskNotAllowed(f"job {self.id}: no RqApp configured, so no {what} may run")
        func = app.resolve(name)
        settings = self.workerkit_settings
        if settings is not None:
            _bind_idempotency(func, settings)
        return func

    @property
    def func(self) -> Any:
        if self.instance is not None:
            raise TaskNotAllowed(
                f"job {self.id}: jobs that call a method of a stored instance are not supported; "
                "enqueue a module-level function"
            )
        return self._resolve(self.func_name, "function")

    @property
    def success_callback(self) -> Any:
        name = self._success_callback_name
        return self._resolve(name, "callback") if name else None

    @property
    def failure_callback(self) -> Any:
        name = self._failure_callback_name
        return self._resolve(name, "callback") if name else None

    @property
    def stopped_callback(self) -> Any:
        name = self._stopped_callback_name
        return self._resolve(name, "callback") if name else None


def _bind_idempotency(func: Callable[..., Any], settings: Settings) -> None:
    """Give an ``@idempotent`` function that was given no settings the worker's own.

    Its default store is chosen by ``settings.engine``: left to itself it would load the
    settings from the environment, where ``rq worker --worker-class ...`` may have no
    ``WORKERKIT_ENGINE`` (the sql engine's default, a local SQLite file: no deduplication across
    pods) nor the Redis URL the worker was given.
    """
    policy = getattr(func, "__workerkit_idempotency__", None)
    if isinstance(policy, Idempotency):
        policy.bind_settings(settings)


def _wk_meta(job: Job) -> dict[str, Any]:
    meta = job.meta.get(META_KEY)
    if not isinstance(meta, dict):
        meta = {}
        job.meta[META_KEY] = meta
    return meta


class Recovery:
    """Settling attempts whose process is gone: crash recovery and releases by ref.

    Used by every live worker (the recovery scan, a work horse that died) and by the supervisor
    (``RqEngine.release_in_flight``). Every change goes through the fenced scripts of
    :class:`~workerkit.engines._rq.leases.Leases`.
    """

    def __init__(
        self, connection: redis.Redis[Any], leases: Leases, job_class: type[Job], serializer: Any
    ) -> None:
        self.connection = connection
        self.leases = leases
        self.job_class = job_class
        self.serializer = serializer

    def fetch(self, job_id: str) -> Job | None:
        try:
            return self.job_class.fetch(
                job_id, connection=self.connection, serializer=self.serializer
            )
        except NoSuchJobError:
            return None

    def release(self, keys: AttemptKeys, accepted: Sequence[str], *, give_back: bool) -> bool:
        """Requeue at the front; the attempt is given back when ``give_back`` (a deploy)."""
        meta: bytes | None = None
        if give_back:
            job = self.fetch(keys.job_id)
            if job is not None:
                wk = _wk_meta(job)
                wk["attempts"] = max(0, int(wk.get("attempts", 1)) - 1)
                meta = self.serializer.dumps(job.meta)
        return self.leases.requeue(keys, accepted, meta)

    def recover(self, keys: AttemptKeys, accepted: Sequence[str], reason: str) -> str | None:
        """After a crash: requeue ("retried"), or fail a job out of attempts ("failed").

        None when the attempt was not ours to recover (settled, or another attempt owns it).
        """
        job = self.fetch(keys.job_id)
        if job is None:
            self._forget(keys, accepted)
            return None
        wk = _wk_meta(job)
        attempts = int(wk.get("attempts", 1))
        max_attempts = int(wk.get("max_attempts", DEFAULT_MAX_ATTEMPTS))
        if attempts < max_attempts:
            if not self.leases.requeue(keys, accepted, None):
                return None
            log.warning(
                "job requeued after its attempt was abandoned",
                extra={
                    "event": "job_recovered",
                    "job_id": keys.job_id,
                    "queue": keys.queue,
                    "attempt": attempts,
                    "max_attempts": max_attempts,
                    "reason": reason,
                },
            )
            return "retried"
        # Take the attempt over ("settle") before RQ's failure bookkeeping, so that no other
        # recovering worker fails it too; if we die half-way, the settle lease expires and the
        # next scan finishes the job's failure.
        if not self.leases.transition(keys, accepted, "settle", SETTLE_TTL_MS):
            return None
        error = (
            f"workerkit: the job's worker died {attempts} times (max_attempts={max_attempts}); "
            f"last time: {reason}"
        )
        with self.connection.pipeline() as pipeline:
            job.set_status(JobStatus.FAILED, pipeline=pipeline)
            job._handle_failure(error, pipeline, worker_name="")
            pipeline.zrem(f"rq:wip:{keys.queue}", keys.member)
            pipeline.delete(f"rq:execution:{keys.job_id}:{keys.token}")
            pipeline.zrem(f"rq:executions:{keys.job_id}", keys.token)
            pipeline.delete(lease_key(keys.job_id))
            pipeline.zrem(started_key(keys.queue), keys.member)
            pipeline.execute()
        with contextlib.suppress(Exception):
            Queue(
                keys.queue, connection=self.connection, serializer=self.serializer
            ).enqueue_dependents(job)
        log.error(
            "job failed: its worker died with no attempts left",
            extra={
                "event": "job_lease_exhausted",
                "job_id": keys.job_id,
                "queue": keys.queue,
                "error": error,
            },
        )
        return "failed"

    def _forget(self, keys: AttemptKeys, accepted: Sequence[str]) -> None:
        # The job hash is gone (deleted, or its TTL ran out): nothing to requeue; drop the member
        # through the fenced script, with an empty queue push avoided by removing it directly.
        if self.leases.transition(keys, accepted, "settle", SETTLE_TTL_MS):
            with self.connection.pipeline() as pipeline:
                pipeline.zrem(f"rq:wip:{keys.queue}", keys.member)
                pipeline.delete(lease_key(keys.job_id))
                pipeline.zrem(started_key(keys.queue), keys.member)
                pipeline.execute()


@dataclass(eq=False)
class _Attempt:
    """One attempt in the worker's main process (and its copy in the forked work horse)."""

    keys: AttemptKeys
    task: str
    number: int
    started: float  # monotonic
    run_limit: int
    checkpoint: Any = None
    releasing: bool = False  # the worker took the lease back to release the job
    stop_requested: bool = False
    lease_lost: bool = False
    succeeded: bool = False
    in_job: bool = False
    rq_settled: bool = False  # RQ's own end bookkeeping ran (it clears the worker's job id)
    outcome: str | None = None
    last_renewed: float = field(default_factory=time.monotonic)
    stop_pipe: int | None = None  # write end of the pipe to the horse (forking worker)
    horse_done: threading.Event = field(default_factory=threading.Event)
    context: JobContext | None = None


def _parent_death_signal() -> None:
    """Ask Linux to SIGKILL this process (a work horse) when its parent dies."""
    if not sys.platform.startswith("linux"):
        return
    name = ctypes.util.find_library("c")
    if name is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        pr_set_pdeathsig = 1
        ctypes.CDLL(name, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


class _WorkerkitMixin:
    """What workerkit adds to an RQ worker (see the module docstring)."""

    # Provided by rq.worker.base.BaseWorker; declared for the type checker.
    if TYPE_CHECKING:
        connection: redis.Redis[Any]
        name: str
        queues: list[Queue]
        _ordered_queues: list[Queue]
        job_class: type[Job]
        serializer: Any
        execution: Execution | None
        death_penalty_class: Any
        _stop_requested: bool
        _stopped_job_id: str | None
        _horse_pid: int
        _is_horse: bool
        job_monitoring_interval: int
        current_job_working_time: float
        log: logging.Logger

        def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None: ...
        def set_state(self, state: str, pipeline: Any = None) -> None: ...
        def procline(self, message: str) -> None: ...
        def queue_names(self) -> list[str]: ...
        def reorder_queues(self, reference_queue: Queue) -> None: ...
        def run_maintenance_tasks(self) -> None: ...
        def get_heartbeat_ttl(self, job: Job) -> int: ...
        def set_current_job_id(self, job_id: str | None = None, pipeline: Any = None) -> None: ...
        def set_current_job_working_time(self, t: float, pipeline: Any = None) -> None: ...
        def prepare_job_execution(
            self, job: Job, remove_from_intermediate_queue: bool = False
        ) -> None: ...
        def handle_execution_ended(self, job: Job, queue: Queue, heartbeat_ttl: int) -> None: ...
        def handle_job_retry(
            self,
            job: Job,
            queue: Queue,
            retry: Retry,
            started_job_registry: Any,
            execution: Execution,
        ) -> None: ...
        def handle_job_success(self, job: Job, queue: Queue, started_job_registry: Any) -> None: ...
        def handle_job_failure(
            self, job: Job, queue: Queue, started_job_registry: Any = None, exc_string: str = ""
        ) -> None: ...
        def handle_exception(self, job: Job, *exc_info: Any) -> None: ...
        def kill_horse(self, sig: signal.Signals = ...) -> None: ...
        def wait_for_horse(self) -> tuple[int | None, int | None, Any]: ...
        def maintain_heartbeats(self, job: Job) -> None: ...
        @property
        def should_run_maintenance_tasks(self) -> bool: ...
        @property
        def horse_pid(self) -> int: ...
        @property
        def dequeue_timeout(self) -> int: ...

    forking: bool = True

    def __init__(
        self,
        queues: Any,
        *args: Any,
        app: RqApp | None = None,
        settings: Settings | None = None,
        serializer: Any = None,
        job_class: Any = None,
        **kwargs: Any,
    ) -> None:
        settings = settings if settings is not None else load_settings()
        if settings.engine != "rq":
            # `rq worker --worker-class ...` without WORKERKIT_ENGINE: this is the rq engine all
            # the same (its idempotency records, for one, live in Redis, not in a SQL database).
            settings = dataclasses.replace(settings, engine="rq")
        if app is None:
            app = _load_app(settings)
        serializer = resolve_rq_serializer(serializer)
        base_job_class = _job_class(job_class)
        bound = WorkerkitJob.bound_to(app, base_job_class, settings)
        # Queue objects (as `rq worker` builds them) carry the CLI's serializer and job class;
        # rebuild them by name so that ours apply.
        names = [
            q.name if isinstance(q, Queue) else q
            for q in ([queues] if isinstance(queues, str | Queue) else queues)
        ]
        super().__init__(names, *args, serializer=serializer, job_class=bound, **kwargs)  # type: ignore[call-arg]
        self.wk_settings = settings
        self.wk_app = app
        self._wk_supervised = bool(os.environ.get(events_module.SOCKET_ENV))
        self._wk_events: events_module.EventClient = events_module.EventClient(None, role="")
        self._wk_lease_ttl = lease_ttl(settings)
        self._wk_scan_every = scan_interval(settings)
        self._wk_redis = _short_timeout_client(self.connection, settings)
        self._wk_leases = Leases(self._wk_redis, self._wk_lease_ttl)
        self._wk_recovery = Recovery(
            self._wk_redis, self._wk_leases, self.job_class, self.serializer
        )
        self._wk_attempt: _Attempt | None = None
        self._wk_lock = threading.Lock()
        # Set by signal handlers: plain attribute writes only (a handler runs between two
        # bytecodes of whatever the main thread was doing and must not take its locks).
        self._wk_signals = 0
        self._wk_stop_at: float | None = None
        self._wk_stopping = False
        self._wk_jobs_stop_requested = False
        self._wk_release_requested = False
        self._wk_upkeep_stop = threading.Event()
        self._wk_upkeep: threading.Thread | None = None
        self._wk_ready_sent = False
        self._wk_queue_by_key = {q.key: q for q in self.queues}

    # --- start and stop ---------------------------------------------------------------------

    @property
    def _wk_wake_key(self) -> str:
        return WAKE_PREFIX + self.name

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        super().bootstrap(*args, **kwargs)  # type: ignore[misc]
        self._wk_events = events_module.client("worker")
        self._wk_events.on_command(self._wk_on_command)
        self._wk_upkeep = threading.Thread(
            target=self._wk_upkeep_loop, name="workerkit-rq-upkeep", daemon=True
        )
        self._wk_upkeep.start()

    def teardown(self) -> None:
        if not self._is_horse:
            self._wk_upkeep_stop.set()
            if self._wk_upkeep is not None and self._wk_upkeep is not threading.current_thread():
                self._wk_upkeep.join(timeout=2.0)
            with contextlib.suppress(redis.exceptions.RedisError):
                self._wk_redis.delete(self._wk_wake_key)
        super().teardown()  # type: ignore[misc]

    def unsubscribe(self) -> None:
        """RQ's unsubscribe without its wait of up to a second for the pubsub thread.

        The thread is a daemon blocked reading the subscription; the process is about to exit,
        and an idle worker must be gone within half a second of SIGTERM.
        """
        thread = getattr(self, "pubsub_thread", None)
        pubsub = getattr(self, "pubsub", None)
        if thread is None or pubsub is None:
            return
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            pubsub.unsubscribe()
        thread.stop()
        thread.join(timeout=0.1)
        if not thread.is_alive():
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                pubsub.close()

    def _install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._wk_on_stop_signal)
        # Under the supervisor a terminal's Ctrl-C reaches the whole process group; the
        # supervisor decides (and sends us SIGTERM). Run on its own, Ctrl-C is a SIGTERM.
        if self._wk_supervised:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        else:
            signal.signal(signal.SIGINT, self._wk_on_stop_signal)

    def _wk_on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        # Flags only: the upkeep thread does the rest (wakes the dequeue, tells the supervisor).
        self._stop_requested = True  # RQ's own flag: its loop stops after the job in hand
        self._wk_signals += 1
        if self._wk_stop_at is None:
            self._wk_stop_at = time.monotonic()

    def _wk_on_command(self, command: str, message: dict[str, Any]) -> None:
        if command == "request_stop":
            self._wk_request_stop_jobs()
        elif command == "release":
            self._wk_release_now()

    def _wk_begin_stopping(self) -> None:
        if self._wk_stopping:
            return
        self._wk_stopping = True
        self._stop_requested = True
        running = 1 if self._wk_attempt is not None else 0
        self._wk_events.send("worker_stopping", running=running)
        log.info("stopped dequeuing", extra={"event": "worker_stopping", "running": running})
        with (
            contextlib.suppress(redis.exceptions.RedisError),
            self._wk_redis.pipeline() as pipeline,
        ):
            pipeline.lpush(self._wk_wake_key, WAKE_TOKEN)
            pipeline.expire(self._wk_wake_key, 60)
            pipeline.execute()

    def _wk_request_stop_jobs(self) -> None:
        self._wk_begin_stopping()
        self._wk_jobs_stop_requested = True
        attempt = self._wk_attempt
        if attempt is None:
            return
        attempt.stop_requested = True
        if attempt.stop_pipe is not None:
            with contextlib.suppress(OSError):
                os.write(attempt.stop_pipe, b"s")
        else:
            request_stop_all()
        log.info(
            "stop requested for the running job",
            extra={"event": "jobs_stop_requested", "job_id": attempt.keys.job_id},
        )

    def _wk_release_now(self) -> None:
        """Take the running attempt back from its job and release it (the release deadline)."""
        self._wk_begin_stopping()
        self._wk_release_requested = True
        with self._wk_lock:
            attempt = self._wk_attempt
            if attempt is None or attempt.releasing or attempt.horse_done.is_set():
                return
            try:
                taken = self._wk_leases.transition(attempt.keys, ["run"], "release")
            except redis.exceptions.RedisError as exc:
                log.warning(
                    "cannot release: Redis unavailable",
                    extra={"event": "release_failed", "error": str(exc)},
                )
                return
            if not taken:
                return  # it is settling (finishing) right now, or it is no longer ours
            attempt.releasing = True
        log.info(
            "releasing the running job",
            extra={"event": "job_releasing", "job_id": attempt.keys.job_id},
        )
        self._wk_interrupt(attempt)

    def _wk_interrupt(self, attempt: _Attempt) -> None:
        raise NotImplementedError

    def _wk_stop_pending(self) -> bool:
        # A method, not the attribute: a signal handler may set it between any two lines.
        return self._stop_requested

    # --- the upkeep thread --------------------------------------------------------------------

    def _wk_upkeep_loop(self) -> None:
        next_heartbeat = next_health = next_scan = 0.0
        signals_seen = 0
        settings = self.wk_settings
        renew_every = settings.effective_heartbeat_interval
        while not self._wk_upkeep_stop.wait(TICK):
            try:
                now_ = time.monotonic()
                if self._wk_signals != signals_seen:
                    first = signals_seen == 0
                    signals_seen = self._wk_signals
                    self._wk_begin_stopping()
                    if not first and not self._wk_supervised:
                        # A second signal never skips the release; it makes it happen now.
                        self._wk_request_stop_jobs()
                        self._wk_release_now()
                if self._wk_stop_at is not None and not self._wk_supervised:
                    self._wk_local_deadlines(now_ - self._wk_stop_at)
                if now_ >= next_heartbeat:
                    self._wk_events.send("heartbeat", running=1 if self._wk_attempt else 0)
                    next_heartbeat = now_ + HEARTBEAT_EVERY
                if now_ >= next_health:
                    self._wk_report_health()
                    next_health = now_ + HEALTH_EVERY
                attempt = self._wk_attempt
                if attempt is not None and now_ - attempt.last_renewed >= renew_every:
                    self._wk_renew(attempt, now_)
                if now_ >= next_scan and not self._wk_stopping:
                    next_scan = now_ + self._wk_scan_every
                    self.wk_recover_abandoned()
            except Exception:
                log.exception("upkeep failed; trying again", extra={"event": "upkeep_failed"})

    def _wk_local_deadlines(self, elapsed: float) -> None:
        # Without a supervisor the worker keeps the timeline itself: request a stop at D,
        # release at D + M/2 (the same instants the supervisor would use).
        settings = self.wk_settings
        if elapsed >= settings.drain_window and not self._wk_jobs_stop_requested:
            self._wk_request_stop_jobs()
        if (
            elapsed >= settings.drain_window + settings.release_margin / 2
            and not self._wk_release_requested
        ):
            self._wk_release_now()

    def _wk_report_health(self) -> None:
        try:
            self._wk_redis.ping()
            ok, reason = True, "redis reachable"
        except redis.exceptions.RedisError as exc:
            ok, reason = False, f"redis unavailable: {type(exc).__name__}"
        self._wk_events.send("store_health", ok=ok, reason=reason)
        if ok and not self._wk_ready_sent:
            self._wk_ready_sent = True
            self._wk_events.send(
                "worker_ready", engine="rq", queues=self.queue_names(), concurrency=1
            )
            log.info("worker ready", extra={"event": "worker_ready", "queues": self.queue_names()})
        if ok:
            with contextlib.suppress(Exception):
                depth, oldest = self.wk_queue_stats()
                self._wk_events.send("queue_stats", depth=depth, oldest_ready_age=oldest)

    def wk_queue_stats(self) -> tuple[dict[str, int], dict[str, float]]:
        """Depth and the age of the oldest waiting job, per queue."""
        queues = self.queues
        with self._wk_redis.pipeline(transaction=False) as pipeline:
            for queue in queues:
                pipeline.llen(queue.key)
                pipeline.lindex(queue.key, 0)
            replies = pipeline.execute()
        depth: dict[str, int] = {}
        oldest: dict[str, float] = {}
        heads: list[tuple[str, str]] = []
        for index, queue in enumerate(queues):
            depth[queue.name] = int(replies[2 * index])
            oldest[queue.name] = 0.0
            head = replies[2 * index + 1]
            if head is not None:
                heads.append((queue.name, as_text(head)))
        if heads:
            stamps = self._wk_redis.pipeline(transaction=False)
            for _, job_id in heads:
                stamps.hget(f"rq:job:{job_id}", "enqueued_at")
            for (name, _), raw in zip(heads, stamps.execute(), strict=True):
                if raw:
                    with contextlib.suppress(ValueError):
                        oldest[name] = max(0.0, (now() - utcparse(as_text(raw))).total_seconds())
        return depth, oldest

    def _wk_renew(self, attempt: _Attempt, now_: float) -> None:
        try:
            kept = self._wk_leases.renew(attempt.keys)
        except redis.exceptions.RedisError as exc:
            # The lease may still hold; but once it has surely expired another worker may run
            # the job, so this attempt must stop (fencing by time, not only by token).
            if now_ - attempt.last_renewed < self._wk_lease_ttl:
                log.warning(
                    "lease renewal failed; retrying",
                    extra={
                        "event": "lease_extend_failed",
                        "job_id": attempt.keys.job_id,
                        "error": str(exc),
                    },
                )
                return
            kept = False
        if kept:
            attempt.last_renewed = now_
            self._wk_events.send("job_heartbeat", job_id=attempt.keys.job_id)
            return
        if attempt.lease_lost or attempt.horse_done.is_set():
            return
        attempt.lease_lost = True
        log.warning(
            "lease lost: the job may run elsewhere now; stopping this attempt",
            extra={"event": "lease_lost", "job_id": attempt.keys.job_id},
        )
        self._wk_interrupt(attempt)

    def wk_recover_abandoned(self) -> int:
        """Requeue (or fail) abandoned attempts of this worker's queues; return how many.

        Due deferred jobs of the queues are put back too (:meth:`Leases.promote`).
        """
        recovered = 0
        for queue in self.queues:
            try:
                if not self._wk_leases.try_scan_lock(
                    queue.name, self.name, self._wk_scan_every * 0.9
                ):
                    continue
                for keys in self._wk_leases.abandoned(queue.name):
                    if self._wk_recovery.recover(keys, ["none"], "its lease expired (worker gone)"):
                        recovered += 1
                # Deferred jobs come back through workerkit's own workers, so that they do not
                # depend on RQ's scheduler (off unless --with-scheduler) running somewhere.
                self._wk_leases.promote(queue.name, utcformat(now()))
            except redis.exceptions.RedisError as exc:
                log.warning(
                    "recovery scan failed",
                    extra={"event": "recovery_scan_failed", "error": str(exc)},
                )
        return recovered

    def clean_registries(self) -> None:
        # RQ's maintenance fails every StartedJobRegistry entry whose score ran out; our own
        # recovery must look first, so that an abandoned workerkit attempt is requeued instead.
        self.wk_recover_abandoned()
        super().clean_registries()  # type: ignore[misc]

    # --- dequeuing ----------------------------------------------------------------------------

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        """RQ's dequeue, with a private wake-up key so that SIGTERM stops it without a raise.

        RQ stops an idle worker by raising from its signal handler in the middle of BLPOP; a job
        that Redis had already popped when that happened is lost. Here the handler only sets a
        flag, the upkeep thread pushes a token on a key of this worker's own, and BLPOP returns
        it. A job popped just as the stop came is pushed back to the front of its queue.
        """
        self.set_state(WorkerStatus.IDLE)
        self.procline("Listening on " + ",".join(self.queue_names()))
        wait = 1.0
        idle_since = time.monotonic()
        while True:
            if self._stop_requested:
                return None
            try:
                self.heartbeat()
                if self.should_run_maintenance_tasks:
                    self.run_maintenance_tasks()
                keys = [queue.key for queue in self._ordered_queues]
                if timeout is None:  # burst mode
                    reply = next(
                        (
                            (key, job_id)
                            for key in keys
                            if (job_id := self.connection.lpop(key)) is not None
                        ),
                        None,
                    )
                    if reply is None:
                        return None
                else:
                    block = timeout
                    if max_idle_time is not None:
                        left = max_idle_time - (time.monotonic() - idle_since)
                        if left <= 0:
                            return None
                        block = max(1, min(block, math.ceil(left)))
                    reply = self.connection.blpop([*keys, self._wk_wake_key], block)
                    if reply is None:
                        continue
                wait = 1.0
                key, job_id = as_text(reply[0]), as_text(reply[1])
                if key == self._wk_wake_key:
                    continue
                if self._wk_stop_pending():
                    # Popped as the stop came: it never started, so it goes back where it was.
                    self.connection.lpush(key, job_id)
                    return None
                queue = self._wk_queue_by_key[key]
                try:
                    job = self.job_class.fetch(
                        job_id, connection=self.connection, serializer=self.serializer
                    )
                except NoSuchJobError:
                    continue
                self.reorder_queues(reference_queue=queue)
                self.log.info("Worker %s: %s: %s", self.name, queue.name, job.id)
                self.heartbeat()
                return job, queue
            except redis.exceptions.ConnectionError as exc:
                self.log.error(
                    "Worker %s: cannot reach Redis (%s); retrying in %.0f s", self.name, exc, wait
                )
                deadline = time.monotonic() + wait
                while time.monotonic() < deadline and not self._stop_requested:
                    time.sleep(TICK)
                wait = min(wait * 2, 30.0)

    # --- starting an attempt (the main process) -----------------------------------------------

    def prepare_execution(self, job: Job) -> Execution:
        """RQ's start bookkeeping plus the lease and the attempt count, in one MULTI."""
        info = self.wk_app.info(_safe_func_name(job))
        wk = _wk_meta(job)
        attempts = int(wk.get("attempts", 0)) + 1
        wk["attempts"] = attempts
        if "max_attempts" not in wk:
            wk["max_attempts"] = info.max_attempts if info else DEFAULT_MAX_ATTEMPTS
        limit = self._wk_run_limit(job, info.timeout if info else None)
        job.timeout = limit  # RQ's parent kills a horse at timeout + 60; keep them in step
        with self.connection.pipeline() as pipeline:
            heartbeat_ttl = self.get_heartbeat_ttl(job)
            execution = Execution.create(
                job, heartbeat_ttl, pipeline=pipeline, worker_name=self.name
            )
            keys = AttemptKeys(job.id, execution.id, job.origin)
            self._wk_leases.start(pipeline, keys)
            pipeline.hset(job.key, "meta", self.serializer.dumps(job.meta))
            self.set_state(WorkerStatus.BUSY, pipeline=pipeline)
            pipeline.execute()
        self.execution = execution
        self._wk_attempt = _Attempt(
            keys=keys,
            task=_safe_func_name(job) or "<undecodable>",
            number=attempts,
            started=time.monotonic(),
            run_limit=limit,
            checkpoint=wk.get("checkpoint"),
            stop_requested=self._wk_jobs_stop_requested,
        )
        # Neither the event nor the log line is built when nobody takes it (a plain `rq worker`
        # run has no supervisor): a no-op job's whole cost is a few hundred microseconds.
        if self._wk_events.connected:
            queued_for = None
            if job.enqueued_at is not None:
                queued_for = max(0.0, (now() - job.enqueued_at).total_seconds())
            self._wk_events.send(
                "job_started",
                job_id=job.id,
                task=self._wk_attempt.task,
                queue=job.origin,
                attempt=attempts,
                delivery=keys.ref(),
                queued_for=queued_for,
            )
        if log.isEnabledFor(logging.INFO):
            log.info(
                "job started",
                extra={
                    "event": "job_started",
                    "job_id": job.id,
                    "task": self._wk_attempt.task,
                    "attempt": attempts,
                },
            )
        return execution

    def _wk_run_limit(self, job: Job, task_timeout: float | None) -> int:
        if task_timeout is not None:
            seconds = task_timeout
        elif job.timeout is not None and job.timeout > 0:
            seconds = float(job.timeout)
        else:
            seconds = self.wk_settings.job_timeout
        return max(1, math.ceil(seconds))

    def _wk_end(self, job: Job, attempt: _Attempt, outcome: str) -> None:
        attempt.horse_done.set()
        with self._wk_lock:
            self._wk_attempt = None
        if attempt.stop_pipe is not None:
            with contextlib.suppress(OSError):
                os.close(attempt.stop_pipe)
            attempt.stop_pipe = None
        self.execution = None
        if not attempt.rq_settled:
            with contextlib.suppress(redis.exceptions.RedisError):
                self.set_current_job_id(None)
        duration = time.monotonic() - attempt.started
        self._wk_events.send(
            "job_finished",
            job_id=job.id,
            task=attempt.task,
            queue=attempt.keys.queue,
            outcome=outcome,
            duration=duration,
        )
        if log.isEnabledFor(logging.INFO):
            log.info(
                "job finished",
                extra={
                    "event": "job_finished",
                    "job_id": job.id,
                    "task": attempt.task,
                    "outcome": outcome,
                    "duration": round(duration, 3),
                },
            )

    def _wk_settle_taken(self, job: Job, attempt: _Attempt) -> str:
        """The worker took the lease back ("release") and the job no longer runs: requeue it."""
        try:
            if self._wk_recovery.release(attempt.keys, ["release"], give_back=True):
                return "released"
        except redis.exceptions.RedisError as exc:
            log.warning(
                "release failed; the lease will expire and the job be recovered",
                extra={"event": "release_failed", "job_id": job.id, "error": str(exc)},
            )
        return "lease_lost"

    # --- running an attempt (the work horse, or the simple worker's main thread) -------------

    def perform_job(self, job: Job, queue: Queue) -> bool:
        attempt = self._wk_attempt
        if attempt is None:  # pragma: no cover - only when RQ calls us outside execute_job
            raise RuntimeError("perform_job without an attempt")
        try:
            attempt.outcome = self._wk_perform(job, queue, attempt)
        except JobInterrupted:
            # Our interrupt landed after the job's own code (RQ's bookkeeping, the way out).
            attempt.outcome = "released" if attempt.releasing else "lease_lost"
        return attempt.outcome in ("succeeded", "skipped_duplicate")

    def _wk_context(self, job: Job, queue: Queue, attempt: _Attempt) -> JobContext:
        leases = self._wk_leases
        serializer = self.serializer

        def save(state: Any) -> None:
            _wk_meta(job)["checkpoint"] = state
            if not leases.write_meta(attempt.keys, serializer.dumps(job.meta)):
                raise LeaseLost(
                    f"job {job.id}: this attempt's lease is gone; the checkpoint was not written"
                )

        def saved(context: JobContext) -> None:
            events_module.client("executor").send(
                "checkpoint_saved", job_id=context.job_id, task=context.task, queue=context.queue
            )

        context = JobContext(
            job_id=job.id,
            task=attempt.task,
            queue=queue.name,
            attempt=attempt.number,
            checkpoint=attempt.checkpoint,
            deadline=time.time() + attempt.run_limit,
            checkpoint_interval=self.wk_settings.checkpoint_interval,
            save=save,
            on_checkpoint_saved=saved,
        )
        if attempt.stop_requested:
            context.request_stop()
        return context

    def _wk_perform(self, job: Job, queue: Queue, attempt: _Attempt) -> str:
        registry = queue.started_job_registry
        context: JobContext | None = None
        try:
            self.prepare_job_execution(job, remove_from_intermediate_queue=False)
            job.started_at = now()
            context = self._wk_context(job, queue, attempt)
            attempt.context = context
            with context.activate():
                attempt.in_job = True
                try:
                    with self.death_penalty_class(
                        attempt.run_limit, JobTimeoutException, job_id=job.id
                    ):
                        return_value = job.perform()
                finally:
                    attempt.in_job = False
        except ReleaseJob:
            return self._wk_release_self(job, attempt)
        except JobInterrupted:
            return "released" if attempt.releasing else "lease_lost"
        except LeaseLost:
            # IdempotencyClaimLost too: another attempt took the key over and this run's result
            # was not recorded. Nothing is settled; the lease expires and crash recovery requeues
            # the job (attempt consumed), whose next run replays the recorded result.
            return "lease_lost"
        except IdempotencyInProgress as busy:
            if attempt.releasing or attempt.lease_lost:
                return "released" if attempt.releasing else "lease_lost"
            return self._wk_defer(job, attempt, busy)
        except BaseException:
            exc_info = sys.exc_info()
            if (
                attempt.releasing
                or attempt.lease_lost
                or (context is not None and context.lease_lost)
            ):
                return "released" if attempt.releasing else "lease_lost"
            if not self._wk_end_execution(job, attempt, job.failure_callback_timeout):
                return "lease_lost"
            attempt.rq_settled = True
            return self._wk_fail_settled(job, queue, registry, exc_info)
        if not self._wk_end_execution(job, attempt, job.success_callback_timeout):
            return "lease_lost"
        attempt.rq_settled = True
        try:
            job._result = return_value
            if isinstance(return_value, Retry):
                assert self.execution is not None
                self.handle_job_retry(
                    job=job,
                    queue=queue,
                    retry=return_value,
                    started_job_registry=registry,
                    execution=self.execution,
                )
                return "retried"
            job._status = JobStatus.FINISHED
            job.execute_success_callback(self.death_penalty_class, return_value)
        except BaseException:
            return self._wk_fail_settled(job, queue, registry, sys.exc_info())
        attempt.succeeded = True
        self.handle_job_success(job=job, queue=queue, started_job_registry=registry)
        job.send_webhooks(JobStatus.FINISHED)
        self.log.info("Worker %s: %s: Job OK (%s)", self.name, queue.name, job.id)
        # A replay returned the stored result of the run that held the key: nothing ran.
        return "skipped_duplicate" if outcome_of(context) == "replayed" else "succeeded"

    def _wk_end_execution(self, job: Job, attempt: _Attempt, heartbeat_ttl: int) -> bool:
        """RQ's ``handle_execution_ended`` and the move to ``settle``, in one round trip.

        The move to ``settle`` must come before RQ's result bookkeeping (nobody may release or
        recover the job while it is being settled); sharing the round trip RQ makes anyway
        keeps the fence free for throughput (bench/rq_overhead.py).
        """
        job.ended_at = now()
        ttl = max(SETTLE_TTL_MS, self._wk_leases.lease_ms)
        try:
            with self._wk_redis.pipeline(transaction=False) as pipeline:
                job.heartbeat(now(), heartbeat_ttl, pipeline=pipeline)
                self._wk_leases.transition_in(pipeline, attempt.keys, ["run"], "settle", ttl)
                moved = pipeline.execute(raise_on_error=False)[-1]
        except redis.exceptions.RedisError:
            return False  # the lease will expire and the job be recovered
        if isinstance(moved, redis.exceptions.NoScriptError):
            return self._wk_claim_settle(attempt)  # the script did not run; this loads it
        if isinstance(moved, Exception):
            return False
        return bool(moved)

    def _wk_claim_settle(self, attempt: _Attempt) -> bool:
        try:
            return self._wk_leases.transition(
                attempt.keys, ["run"], "settle", max(SETTLE_TTL_MS, self._wk_leases.lease_ms)
            )
        except redis.exceptions.RedisError:
            return False  # the lease will expire and the job be recovered

    def _wk_fail_settled(
        self,
        job: Job,
        queue: Queue,
        registry: Any,
        exc_info: tuple[type[BaseException], BaseException, TracebackType | None]
        | tuple[None, None, None],
    ) -> str:
        """RQ's failure handling (retry with ``Retry``, else the failed registry), settled."""
        exc = exc_info[1]
        job._status = JobStatus.FAILED
        exc_string = "".join(traceback.format_exception(*exc_info))
        if isinstance(exc, TaskNotAllowed | DeserializationError | IdempotencyKeyMismatch):
            job.retries_left = 0  # the same on every attempt: never retried
        try:
            job.execute_failure_callback(self.death_penalty_class, *exc_info)
        except BaseException:
            exc_info = sys.exc_info()
            exc_string = "".join(traceback.format_exception(*exc_info))
        self.handle_exception(job, *exc_info)
        retry = job.should_retry
        self.handle_job_failure(
            job=job, queue=queue, started_job_registry=registry, exc_string=exc_string
        )
        if isinstance(exc, JobTimeoutException):
            return "timed_out"
        return "retried" if retry else "failed"

    def _wk_release_self(self, job: Job, attempt: _Attempt) -> str:
        """The job called ``current_job().release()``: requeue it now, attempt given back."""
        wk = _wk_meta(job)
        wk["attempts"] = max(0, attempt.number - 1)
        try:
            if self._wk_leases.requeue(attempt.keys, ["run"], self.serializer.dumps(job.meta)):
                return "released"
        except redis.exceptions.RedisError as exc:
            log.warning(
                "release failed",
                extra={"event": "release_failed", "job_id": job.id, "error": str(exc)},
            )
        return "lease_lost"

    def _wk_defer(self, job: Job, attempt: _Attempt, busy: IdempotencyInProgress) -> str:
        """Another live attempt holds the job's idempotency key: not now, attempt given back.

        As the native engine's ``defer``: waiting is not a failure, so it must not use up the
        attempts (or the RQ ``Retry`` left) that crash recovery and real failures depend on. The job
        goes to RQ's ScheduledJobRegistry (``rq info`` shows it as scheduled), fenced by the
        lease; the recovery scan of any live workerkit worker puts it back when it is due.
        """
        step = DEFER_BACKOFF
        backoff = step / 2 + random.uniform(0, step / 2)
        delay = backoff if busy.retry_after is None else min(max(0.0, busy.retry_after), backoff)
        wk = _wk_meta(job)
        wk["attempts"] = max(0, attempt.number - 1)
        try:
            deferred = self._wk_leases.defer(
                attempt.keys, ["run"], self.serializer.dumps(job.meta), time.time() + delay
            )
        except redis.exceptions.RedisError as exc:
            log.warning(
                "defer failed; the lease will expire and the job be recovered",
                extra={"event": "defer_failed", "job_id": job.id, "error": str(exc)},
            )
            return "lease_lost"
        if not deferred:
            return "lease_lost"
        log.info(
            "job deferred: its idempotency key is held by another live run",
            extra={
                "event": "job_deferred",
                "job_id": job.id,
                "delay": round(delay, 3),
                "reason": f"IdempotencyInProgress: {busy}",
            },
        )
        return "deferred"

    def cleanup_execution(self, job: Job, pipeline: Pipeline[Any]) -> None:
        """RQ's end bookkeeping plus dropping the lease (and, on success, the checkpoint)."""
        attempt = self._wk_attempt
        if attempt is not None and attempt.keys.job_id == job.id:
            Leases.forget(pipeline, attempt.keys)
            wk = job.meta.get(META_KEY)
            if (
                attempt.succeeded
                and isinstance(wk, dict)
                and wk.pop("checkpoint", None) is not None
            ):
                pipeline.hset(job.key, "meta", self.serializer.dumps(job.meta))
        super().cleanup_execution(job, pipeline)  # type: ignore[misc]


def _safe_func_name(job: Job) -> str | None:
    try:
        return job.func_name
    except DeserializationError:
        return None


def _job_class(job_class: Any) -> type[Job]:
    if job_class is None:
        return Job
    if isinstance(job_class, str):
        from rq.utils import import_job_class

        job_class = import_job_class(job_class)
    if not (isinstance(job_class, type) and issubclass(job_class, Job)):
        raise ConfigurationError(f"job_class {job_class!r} is not an rq.job.Job subclass")
    return job_class


def _load_app(settings: Settings) -> RqApp:
    if not settings.app:
        raise ConfigurationError(
            "workerkit's RQ worker runs only the tasks of an RqApp (RQ would otherwise import "
            "any function a Redis writer names): set --app / WORKERKIT_APP to MODULE:ATTRIBUTE "
            "of a workerkit.engines.rq.RqApp (docs/engines/rq.md)"
        )
    from workerkit.loading import import_app

    app = import_app(settings.app)
    if not isinstance(app, RqApp):
        raise ConfigurationError(
            f"--app {settings.app!r} is a {type(app).__name__}, not a workerkit.engines.rq.RqApp"
        )
    return app


def _short_timeout_client(connection: redis.Redis[Any], settings: Settings) -> redis.Redis[Any]:
    """A client of the same server whose calls give up quickly (lease renewal cannot wait 7 min).

    RQ raises the socket timeout of the worker's own connection above its BLPOP timeout.
    """
    pool = connection.connection_pool
    timeout = max(0.5, min(5.0, settings.effective_heartbeat_interval))
    kwargs = {
        **pool.connection_kwargs,
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
    }
    return redis.Redis(connection_pool=type(pool)(connection_class=pool.connection_class, **kwargs))


class Worker(_WorkerkitMixin, RqWorker):
    """The forking worker: each job runs in a work horse forked for it (RQ's default)."""

    forking = True

    def execute_job(self, job: Job, queue: Queue) -> None:
        self.prepare_execution(job)
        attempt = self._wk_attempt
        assert attempt is not None
        try:
            self.fork_work_horse(job, queue)
            outcome = self.monitor_work_horse(job, queue)
        finally:
            attempt.horse_done.set()
        self._wk_end(job, attempt, outcome)
        self.set_state(WorkerStatus.IDLE)

    def fork_work_horse(self, job: Job, queue: Queue) -> None:
        attempt = self._wk_attempt
        assert attempt is not None
        read_end, write_end = os.pipe()
        child_pid = os.fork()
        if child_pid == 0:  # pragma: no cover - the work horse
            os.close(write_end)
            try:
                os.setpgrp()
                os.environ["RQ_WORKER_ID"] = self.name
                os.environ["RQ_JOB_ID"] = job.id
                self._wk_horse_stop_reader(read_end)
                self.main_work_horse(job, queue)
            finally:
                os._exit(_HORSE_INTERRUPTED)
        os.close(read_end)
        attempt.stop_pipe = write_end
        self._horse_pid = child_pid
        self.procline(f"Forked {child_pid} at {time.time()}")

    def _wk_horse_stop_reader(self, read_end: int) -> None:
        """In the horse: a thread that turns the parent's ``request_stop`` into the context's."""

        def read() -> None:
            with contextlib.suppress(OSError):
                while os.read(read_end, 1):
                    attempt = self._wk_attempt
                    if attempt is not None:
                        attempt.stop_requested = True
                    request_stop_all()

        threading.Thread(target=read, name="workerkit-horse-stop", daemon=True).start()

    def setup_work_horse_signals(self) -> None:
        """The horse ignores Ctrl-C (its parent decides); SIGTERM, from its parent, interrupts.

        The exception is raised from the handler on purpose: it interrupts even a blocking
        call (``time.sleep``) and lets the job's ``finally`` blocks run, and the parent has
        already taken the lease, so nothing the job writes afterwards counts.
        """
        _parent_death_signal()
        signal.signal(signal.SIGINT, signal.SIG_IGN)

        def interrupted(signum: int, frame: FrameType | None) -> None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once; the parent SIGKILLs if need be
            raise JobInterrupted

        signal.signal(signal.SIGTERM, interrupted)

    def main_work_horse(self, job: Job, queue: Queue) -> None:  # pragma: no cover - the horse
        code = _HORSE_INTERRUPTED
        try:
            import random

            random.seed()
            self.setup_work_horse_signals()
            self._is_horse = True
            self.perform_job(job, queue)
            attempt = self._wk_attempt
            outcome = attempt.outcome if attempt is not None else None
            code = _HORSE_CODES.get(outcome or "", _HORSE_INTERRUPTED)
            if outcome == "released" and attempt is not None and attempt.releasing:
                code = _HORSE_INTERRUPTED  # the parent releases it
        except BaseException:
            code = _HORSE_INTERRUPTED
        finally:
            logging.shutdown()
            os._exit(code)

    def monitor_work_horse(self, job: Job, queue: Queue) -> str:
        """Wait for the horse (RQ's loop, heartbeats included); return the attempt's outcome."""
        attempt = self._wk_attempt
        assert attempt is not None
        ret_val: int | None = None
        killed_for_timeout = False
        job.started_at = now()
        while True:
            try:
                with self.death_penalty_class(
                    self.job_monitoring_interval, HorseMonitorTimeoutException
                ):
                    _, ret_val, _ = self.wait_for_horse()
                break
            except HorseMonitorTimeoutException:
                assert job.started_at is not None
                self.set_current_job_working_time((now() - job.started_at).total_seconds())
                if job.timeout != -1 and self.current_job_working_time > (job.timeout or 0) + 60:
                    self.heartbeat(self.job_monitoring_interval + 60)
                    killed_for_timeout = True
                    self.kill_horse()
                    self.wait_for_horse()
                    break
                with contextlib.suppress(redis.exceptions.RedisError):
                    self.maintain_heartbeats(job)
            except OSError as exc:
                if exc.errno != errno.EINTR:
                    raise
        self.set_current_job_working_time(0)
        self._horse_pid = 0
        attempt.horse_done.set()
        return self._wk_after_horse(job, queue, attempt, ret_val, killed_for_timeout)

    def _wk_after_horse(
        self,
        job: Job,
        queue: Queue,
        attempt: _Attempt,
        ret_val: int | None,
        killed_for_timeout: bool,
    ) -> str:
        code = os.waitstatus_to_exitcode(ret_val) if ret_val is not None else None
        if attempt.releasing:
            return self._wk_settle_taken(job, attempt)
        if code in _HORSE_OUTCOMES:
            attempt.rq_settled = _HORSE_OUTCOMES[code] in (
                "succeeded",
                "skipped_duplicate",
                "failed",
                "retried",
                "timed_out",
            )
            return _HORSE_OUTCOMES[code]
        if attempt.lease_lost:
            return "lease_lost"
        if self._stopped_job_id == job.id or killed_for_timeout:
            # RQ's own two reasons to kill a horse: `rq` stop-job, and a horse wedged past its
            # timeout. RQ fails the job (or retries it with Retry); so do we, fenced.
            if not self._wk_claim_settle(attempt):
                return "lease_lost"
            if self._stopped_job_id == job.id and job.stopped_callback:
                job.execute_stopped_callback(self.death_penalty_class)
            message = (
                "Job stopped by user, work-horse terminated."
                if self._stopped_job_id == job.id
                else f"Work-horse killed: still running {job.timeout}s + 60s after it started"
            )
            self.handle_job_failure(job, queue=queue, exc_string=message)
            return "timed_out" if killed_for_timeout else "failed"
        # The horse died on its own (out of memory, a segfault, a kill): a crash. The attempt
        # stays consumed; the job goes back to the front of its queue, or fails when it is out
        # of attempts. The horse is dead, so requeuing now cannot make it run twice.
        described = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        log.warning(
            "work horse died",
            extra={"event": "work_horse_died", "job_id": job.id, "status": described},
        )
        try:
            outcome = self._wk_recovery.recover(
                attempt.keys, ["run", "settle"], f"its work horse died ({described})"
            )
        except redis.exceptions.RedisError:
            outcome = None
        return outcome or "lease_lost"

    def _wk_interrupt(self, attempt: _Attempt) -> None:
        """Stop the horse: SIGTERM (its job's ``finally`` blocks run), SIGKILL after a grace."""
        pid = self.horse_pid
        if not pid or attempt.horse_done.is_set():
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        grace = max(0.1, min(1.0, self.wk_settings.release_margin * 0.2))
        if not attempt.horse_done.wait(grace) and self.horse_pid == pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


class SimpleWorker(_WorkerkitMixin, RqSimpleWorker):
    """Runs each job in the worker process itself (no fork): cheaper, less isolated.

    A job that holds the GIL for longer than the lease (a long C call that does not release it)
    stops the lease renewal thread too; use the forking :class:`Worker` for such jobs.
    """

    forking = False

    def execute_job(self, job: Job, queue: Queue) -> None:
        self.prepare_execution(job)
        attempt = self._wk_attempt
        assert attempt is not None
        try:
            self.perform_job(job, queue)
        except JobInterrupted:
            attempt.outcome = "released" if attempt.releasing else "lease_lost"
        attempt.horse_done.set()
        outcome = (
            self._wk_settle_taken(job, attempt)
            if attempt.releasing
            else (attempt.outcome or "lease_lost")
        )
        self._wk_end(job, attempt, outcome)
        self.set_state(WorkerStatus.IDLE)

    def _install_signal_handlers(self) -> None:
        super()._install_signal_handlers()
        signal.signal(signal.SIGUSR1, self._wk_on_interrupt_signal)

    def _wk_on_interrupt_signal(self, signum: int, frame: FrameType | None) -> None:
        # Sent by our own release (or lease loss) to the main thread, where the job runs: raising
        # here interrupts even a blocking call. Only while the job's own code runs.
        attempt = self._wk_attempt
        if attempt is not None and attempt.in_job and (attempt.releasing or attempt.lease_lost):
            attempt.in_job = False
            raise JobInterrupted

    def _wk_interrupt(self, attempt: _Attempt) -> None:
        if attempt.context is not None:
            if attempt.lease_lost:
                attempt.context.mark_lease_lost()
            else:
                attempt.context.request_stop()
        with contextlib.suppress(ProcessLookupError, ValueError):
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR1)
