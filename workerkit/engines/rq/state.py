"""What the parts of a workerkit RQ worker share: one attempt's record and the worker's state.

The worker is an RQ worker subclass put together from mixins by concern (drain, upkeep,
attempt, perform); :class:`WorkerState` holds the attributes they share and declares RQ's own
for the type checker. The signal handlers only write plain attributes here: a handler runs
between two bytecodes of whatever the main thread was doing and must not take its locks.
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import os
import signal
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import redis
import redis.exceptions
from rq.queue import Queue

from workerkit import events as events_module
from workerkit.engines.leasewatch import LeaseClock, since_monotonic
from workerkit.engines.presence import PausedQueues
from workerkit.engines.redis_presence import RedisPresenceStore
from workerkit.engines.rq.jobs import WorkerkitJob, job_class_of, resolve_rq_serializer
from workerkit.engines.rq.leases import WAKE_PREFIX, AttemptKeys, Leases
from workerkit.engines.rq.recovery import Recovery, lease_ttl, scan_interval
from workerkit.engines.rq.tasks import RqApp, load_app
from workerkit.settings import Settings, load_settings

if TYPE_CHECKING:
    from rq.executions import Execution
    from rq.job import Job, Retry

    from workerkit.engines.attempt import Keeper
    from workerkit.engines.leasewatch import LeaseGuard, Watchdog
    from workerkit.events import Outcome
    from workerkit.job import JobContext

__all__ = (
    "TICK",
    "Attempt",
    "WorkerState",
    "released_or_lost",
    "share_driver_info",
    "short_timeout_client",
)

log = logging.getLogger("workerkit.engines.rq")

TICK: Final = 0.05  # the local deadlines' resolution, and the waits that look at the stop flag


@dataclass(eq=False)
class Attempt:
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
    outcome: Outcome | None = None
    last_renewed: float = field(default_factory=time.monotonic)
    stop_pipe: int | None = None  # write end of the pipe to the horse (forking worker)
    horse_done: threading.Event = field(default_factory=threading.Event)
    context: JobContext | None = None
    # Shared with the forked work horse (forking worker): byte 0 is 1 once the job's code has
    # ended and the attempt is settling; byte 1 is 1 once the horse's lease watchdog stopped the
    # job; bytes 8-16 the monotonic time of the last renewal.
    shared: mmap.mmap | None = None
    _settling: bool = False
    _watchdog_stopped: bool = False

    def share(self) -> None:
        """Before the fork: the settling flag and the last renewal, seen by both processes."""
        self.shared = mmap.mmap(-1, 16)
        struct.pack_into("d", self.shared, 8, self.last_renewed)

    def unshare(self) -> None:
        """The horse is gone: what it shared is kept, in this process only."""
        if self.shared is not None:
            self._settling, self.last_renewed = self.settling, self.renewed_at()
            self._watchdog_stopped = self.watchdog_stopped
            # Not closed: the upkeep thread may be reading it right now (no lock between the
            # two); the anonymous map is freed with its last reference.
            self.shared = None

    def mark_settling(self) -> None:
        """The job's code has ended: what is left is its settle (fenced, retried)."""
        self._settling = True
        if (shared := self.shared) is not None:  # read once: unshare() may run meanwhile
            shared[0] = 1

    @property
    def settling(self) -> bool:
        shared = self.shared  # read once: unshare() may run meanwhile
        return self._settling or (shared is not None and shared[0] == 1)

    def mark_watchdog_stopped(self) -> None:
        """In the horse: its lease watchdog stopped the job (the worker stopped renewing)."""
        self._watchdog_stopped = True
        if (shared := self.shared) is not None:
            shared[1] = 1

    @property
    def watchdog_stopped(self) -> bool:
        shared = self.shared  # read once: unshare() may run meanwhile
        return self._watchdog_stopped or (shared is not None and shared[1] == 1)

    def renewed(self, at: float) -> None:
        """The lease was renewed by a request sent at ``at`` (monotonic)."""
        self.last_renewed = at
        if (shared := self.shared) is not None:
            struct.pack_into("d", shared, 8, at)

    def renewed_at(self) -> float:
        """The monotonic time the request that last set the lease was sent."""
        if (shared := self.shared) is not None:
            return float(struct.unpack_from("d", shared, 8)[0])
        return self.last_renewed


def released_or_lost(job_id: str, requeue: Callable[[], bool], failed: str) -> Outcome:
    """``released`` when ``requeue()`` (a fenced requeue) put the job back, else ``lease_lost``.

    A Redis error is logged as ``failed`` (a ``release_failed`` event): the lease will expire
    and crash recovery requeue the job.
    """
    try:
        if requeue():
            return "released"
    except redis.exceptions.RedisError as exc:
        log.warning(failed, extra={"event": "release_failed", "job_id": job_id, "error": str(exc)})
    return "lease_lost"


def share_driver_info(connection: redis.Redis[Any]) -> None:
    """Give ``connection``'s pool one ``DriverInfo`` for all its connections (redis-py >= 7).

    A pool made from a URL builds a new one, reading redis-py's package metadata (about a
    millisecond), for every connection it opens: in a forking worker, for every connection of
    every work horse. The values are the same; only the lookup is done once, here.
    """
    try:
        from redis.driver_info import DriverInfo
    except ImportError:  # redis-py < 7 reads its version once, at import
        return
    kwargs = connection.connection_pool.connection_kwargs
    if "driver_info" not in kwargs and not {"lib_name", "lib_version"} & kwargs.keys():
        kwargs["driver_info"] = DriverInfo()


def short_timeout_client(connection: redis.Redis[Any], settings: Settings) -> redis.Redis[Any]:
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


class WorkerState:
    """The state every part of a workerkit RQ worker shares; the base of its mixins."""

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
            app = load_app(settings)
        serializer = resolve_rq_serializer(serializer, app)
        base_job_class = job_class_of(job_class)
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
        self._wk_pid = os.getpid()  # the process that fetches (set again when it starts work)
        self._wk_events: events_module.EventClient = events_module.EventClient(None, role="")
        # A job's events (finished, lease renewed) in batches: the finish of one job shares the
        # write of the next one's start (sent at once), so a busy worker writes once per job.
        self._wk_job_events = events_module.BatchingSender(self._wk_events)
        self._wk_lease_ttl = lease_ttl(settings)
        self._wk_scan_every = scan_interval(settings)
        share_driver_info(self.connection)
        self._wk_redis = short_timeout_client(self.connection, settings)
        self._wk_leases = Leases(self._wk_redis, self._wk_lease_ttl)
        # Until when the lease in hand lives, shared with the work horses forked later; the
        # horse's watchdog (set in the horse) stops its job before then (leasewatch.py).
        self._wk_lease_clock = LeaseClock(self._wk_lease_ttl) if self.forking else None
        self._wk_watchdog: Watchdog | None = None
        # The process that wakes a horse's watchdog when its lease runs short (started with the
        # worker, worker.py), and the last process a wake-up reached before its watchdog existed.
        self._wk_guard: LeaseGuard | None = None
        self._wk_woken_in = 0
        self._wk_recovery = Recovery(
            self._wk_redis, self._wk_leases, self.job_class, self.serializer
        )
        self._wk_attempt: Attempt | None = None
        self._wk_lock = threading.Lock()
        # Set by signal handlers: plain attribute writes only (a handler runs between two
        # bytecodes of whatever the main thread was doing and must not take its locks).
        self._wk_signals = 0
        self._wk_stop_at: float | None = None
        self._wk_stopping = False
        self._wk_jobs_stop_requested = False
        self._wk_release_requested = False
        self._wk_upkeep: Keeper | None = None
        self._wk_signals_seen = 0  # the upkeep thread's: signals it has acted on
        self._wk_ready_sent = False
        # A job id popped just as Redis went away, to push back once it answers (drain.py).
        self._wk_popped: tuple[Queue, bytes] | None = None
        self._wk_queue_by_key = {q.key: q for q in self.queues}
        # The dashboard's paused queues, read at most once a second (docs/engines/rq.md).
        self._wk_paused = PausedQueues(RedisPresenceStore(self._wk_redis).paused_queues)

    def _wk_send(self, event: events_module.Event) -> None:
        """An event sent at once, after the job events gathered before it (the supervisor
        reads them in the order they happened)."""
        self._wk_job_events.flush()  # nothing gathered: no write
        self._wk_events.send(event)

    @property
    def _wk_wake_key(self) -> str:
        return WAKE_PREFIX + self.name

    def _wk_publish_lease(self, sent_at: float) -> None:
        """The lease in hand lives ``ttl`` past ``sent_at`` (monotonic): tell the work horse."""
        if self._wk_lease_clock is not None:
            self._wk_lease_clock.extend(since_monotonic(sent_at))

    def _wk_released_by_us(self, attempt: Attempt) -> bool:
        """Whether the release deadline took the ended attempt's lease back (``releasing``).

        Read under the lock a release holds from its run -> release transition to setting
        ``releasing``: a job that ended in between (a checkpoint fenced out by that transition
        raises LeaseLost) would otherwise read False, report ``lease_lost`` and requeue nothing.
        ``horse_done`` first: no release starts once it is set (it looks under the same lock).
        """
        attempt.horse_done.set()
        with self._wk_lock:
            return attempt.releasing

    def _wk_interrupt(self, attempt: Attempt) -> None:
        """Stop the running attempt's job (each worker class has its own way)."""
        raise NotImplementedError

    def _wk_take(self, queue: Queue, entry: bytes) -> Job | None:
        """The job a popped queue entry names, ready to start; None when there is none to run."""
        raise NotImplementedError
