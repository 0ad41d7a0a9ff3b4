"""The job context: what a running job knows about itself, on every engine.

Inside a job, :func:`current_job` returns a :class:`JobContext` (id, task, attempt, deadline,
``stop_requested``, the last checkpoint, ``save_checkpoint()``, ``release()``). An engine builds
one per attempt with a :class:`CheckpointSink` (its fenced checkpoint write) and runs the job in
:meth:`JobContext.activate`; the supervisor's ``request_stop`` reaches every context of the
process through :func:`request_stop_all`. See docs/howto/checkpointed-jobs.md.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, TypeGuard, runtime_checkable

from workerkit.engines.base import TransactionalQueue
from workerkit.errors import ConfigurationError, LeaseLost, NoCurrentJob, ReleaseJob

if TYPE_CHECKING:
    from workerkit.engines.base import Delivery, QueueBackend

__all__ = (
    "CheckpointSink",
    "JobContext",
    "TransactionalCheckpointSink",
    "active_contexts",
    "current_job",
    "current_job_or_none",
    "request_stop_all",
)

_UNSET: Any = object()


class CheckpointSink(Protocol):
    """An engine's fenced checkpoint write for one attempt.

    It raises :class:`~workerkit.errors.LeaseLost` when the attempt no longer owns the job.
    """

    def __call__(self, state: Any) -> None: ...


@runtime_checkable
class TransactionalCheckpointSink(Protocol):
    """A sink whose fenced write can also join the caller's database transaction.

    The native worker gives one to every job of a queue that supports it
    (:class:`~workerkit.engines.sql.SqlQueue`); see :meth:`JobContext.delivery_sink`.
    """

    def __call__(self, state: Any) -> None:
        """Write ``state`` now, in a transaction of its own. Fenced."""
        ...

    def save_in(self, connection: Any, state: Any) -> None:
        """Write ``state`` inside ``connection``'s open transaction, without committing. Fenced."""
        ...

    def transaction(self) -> AbstractContextManager[Any]:
        """A write transaction in the queue's database, yielding its connection."""
        ...


class _QueueSink:
    """The checkpoint sink of one delivery of a plain :class:`QueueBackend`."""

    def __init__(self, backend: QueueBackend, delivery: Delivery) -> None:
        self.backend = backend
        self.delivery = delivery

    def __call__(self, state: Any) -> None:
        self.backend.save_checkpoint(self.delivery, state)


class _TransactionalQueueSink:
    """The checkpoint sink of one delivery of a :class:`TransactionalQueue`."""

    def __init__(self, backend: TransactionalQueue, delivery: Delivery) -> None:
        self.backend = backend
        self.delivery = delivery

    def __call__(self, state: Any) -> None:
        self.backend.save_checkpoint(self.delivery, state)

    def save_in(self, connection: Any, state: Any) -> None:
        self.backend.save_checkpoint(self.delivery, state, connection=connection)

    def transaction(self) -> AbstractContextManager[Any]:
        return self.backend.transaction()


_transactional: dict[type, bool] = {}


def _is_transactional(backend: QueueBackend) -> TypeGuard[TransactionalQueue]:
    """``isinstance(backend, TransactionalQueue)``, remembered per class: a protocol's check
    looks up each of its methods (~0.05 ms), and a queue's methods are its class's."""
    kind = type(backend)
    known = _transactional.get(kind)
    if known is None:
        known = _transactional[kind] = isinstance(backend, TransactionalQueue)
    return known


class _StopFlag:
    """``threading.Event``'s is_set/set/wait, with the Event made only when a job first waits.

    A context is built for every job, most jobs never wait for a stop, and an Event (a
    Condition and its lock) is a measurable part of a no-op task's cost in Celery's solo pool.
    """

    __slots__ = ("_event", "_set")

    def __init__(self) -> None:
        self._set = False
        self._event: threading.Event | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        # Written before the Event is read; wait() makes the Event before it reads the flag. So
        # either this sees wait()'s Event and sets it, or wait() sees the flag (the GIL orders
        # the two threads' steps).
        self._set = True
        event = self._event
        if event is not None:
            event.set()

    def wait(self, timeout: float | None) -> bool:
        event = self._event
        if event is None:
            with _stop_event_lock:  # two first waiters must share one Event
                event = self._event
                if event is None:
                    event = self._event = threading.Event()
        if self._set:
            event.set()
        return event.wait(timeout)


class JobContext:
    """One attempt of one job, as the job itself sees it."""

    def __init__(
        self,
        *,
        job_id: str,
        task: str,
        queue: str,
        attempt: int,
        checkpoint: Any = None,
        deadline: float | None = None,
        checkpoint_interval: float = 5.0,
        save: CheckpointSink | None = None,
        on_checkpoint_saved: Callable[[JobContext], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        schedule: str | None = None,
        fire_time: float | None = None,
    ) -> None:
        self.job_id = job_id
        self.task = task
        self.queue = queue
        self.attempt = attempt
        self.deadline = deadline
        #: The schedule that enqueued this job and its fire time (epoch seconds), when the
        #: scheduler did; the pair is the same on every replica, so it makes an idempotency key.
        self.schedule = schedule
        self.fire_time = fire_time
        self.checkpoint_interval = checkpoint_interval
        self._checkpoint = checkpoint
        self._save = save
        self._on_saved = on_checkpoint_saved
        self._clock = clock
        self._stop = _StopFlag()
        self._lease_lost = False
        self._pending: Any = _UNSET
        self._last_saved_at = clock()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<JobContext {self.task} id={self.job_id} attempt={self.attempt}>"

    # --- what the job reads ---------------------------------------------------------------

    @property
    def stop_requested(self) -> bool:
        """True once the job should save its checkpoint and return (or call :meth:`release`)."""
        return self._stop.is_set()

    @property
    def lease_lost(self) -> bool:
        """True when another worker owns the job now; nothing this attempt writes will count."""
        return self._lease_lost

    @property
    def checkpoint(self) -> Any:
        """The last checkpoint saved for this job (by this attempt or an earlier one), or None."""
        with self._lock:
            return self._checkpoint if self._pending is _UNSET else self._pending

    def time_left(self) -> float | None:
        """Seconds until the job's deadline (wall clock), or None when it has none."""
        return None if self.deadline is None else self.deadline - time.time()

    def wait_for_stop(self, timeout: float | None = None) -> bool:
        """Sleep up to ``timeout`` seconds, waking early when a stop is requested."""
        return self._stop.wait(timeout)

    # --- what the job does ----------------------------------------------------------------

    def save_checkpoint(self, state: Any, *, force: bool = False, connection: Any = None) -> bool:
        """Record ``state`` (JSON-serializable) as where a later attempt should resume.

        Writes are throttled: the state is written at once when ``force`` is given, a stop has
        been requested, or ``checkpoint_interval`` seconds passed since the last write; otherwise
        it is kept and written by a later call, by :meth:`flush` or by :meth:`release`. Returns
        whether it was written now. Raises :class:`~workerkit.errors.LeaseLost` when another
        worker owns the job.

        With ``connection`` (a SQLAlchemy connection in an open transaction on the queue's
        database, such as the one :meth:`transaction` yields), the fenced write is made inside
        that transaction, at once and never throttled: the checkpoint then commits or rolls back
        with the caller's own writes. That is how a batch is done exactly once. When the lease
        is gone, :class:`~workerkit.errors.LeaseLost` is raised inside the transaction, so the
        caller's writes roll back with it. If the transaction rolls back for another reason, let
        the exception end the attempt (the stored checkpoint is still the previous one, which is
        right for the data), or use :func:`workerkit.batches`, which tracks commits.
        """
        if connection is not None:
            self._save_in(connection, state)
            return True
        with self._lock:
            self._pending = state
            due = self._clock() - self._last_saved_at >= self.checkpoint_interval
            if not (force or due or self._stop.is_set()):
                return False
        self.flush()
        return True

    def _save_in(self, connection: Any, state: Any) -> None:
        sink = self._transactional_sink()
        # Held across the write, as flush() does: a flush() of an older kept state from another
        # thread (the worker releasing this job) must not commit after this one and move the
        # stored cursor back behind work that has committed.
        with self._lock:
            try:
                sink.save_in(connection, state)
            except LeaseLost:
                self._lease_lost = True
                self._stop.set()
                raise
            # A kept (throttled) state is older than this one: never write it after this one.
            self._pending = _UNSET
            # Believed saved from here on, though the caller has yet to commit: if it rolls
            # back instead, the stored checkpoint is the previous one, which matches its data;
            # the attempt should then end (batches() re-fetches the batch instead).
            self._checkpoint = state
            self._last_saved_at = self._clock()
        if self._on_saved is not None:
            self._on_saved(self)

    def _transactional_sink(self) -> TransactionalCheckpointSink:
        if isinstance(self._save, TransactionalCheckpointSink):
            return self._save
        backend = getattr(self._save, "backend", None)
        where = f"the {type(backend).__name__}" if backend is not None else "this engine"
        raise ConfigurationError(
            f"job {self.job_id}: {where} cannot write a checkpoint inside a database "
            "transaction; transactional checkpoints need workerkit's SQL queue (SqlQueue, "
            "engine 'sql') with the job's data in the same database. Save without "
            "connection= here (at-least-once batches), or run the job on the SQL queue"
        )

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        """A write transaction in the job's queue database; yields its SQLAlchemy connection.

        For jobs whose data lives in the same database as workerkit's SQL queue: write the data
        and ``save_checkpoint(state, connection=conn)`` in it, and both commit when the block
        ends (or roll back together when it raises). On SQLite this is ``BEGIN IMMEDIATE``, so
        the transaction holds the database's single write lock from the start: keep it short
        (a batch), because the worker's lease renewal and other writers wait for it. Raises
        :class:`~workerkit.errors.ConfigurationError` on a queue that has no database (the
        in-memory queue of :mod:`workerkit.testing`).
        """
        with self._transactional_sink().transaction() as connection:
            yield connection

    def flush(self) -> None:
        """Write the kept checkpoint, if any, now."""
        with self._lock:
            state, self._pending = self._pending, _UNSET
            if state is _UNSET:
                return
            if self._save is not None:
                try:
                    self._save(state)
                except LeaseLost:
                    self._lease_lost = True
                    self._stop.set()
                    raise
            self._checkpoint = state
            self._last_saved_at = self._clock()
        if self._on_saved is not None:
            self._on_saved(self)

    def release(self, state: Any = _UNSET) -> NoReturn:
        """Save ``state`` (or the kept checkpoint) and hand the job back to its queue now.

        The attempt is not counted: the next worker to take the job resumes from the checkpoint.
        This raises :class:`~workerkit.errors.ReleaseJob`, which the engine turns into a release.
        """
        if state is not _UNSET:
            with self._lock:
                self._pending = state
        self.flush()
        raise ReleaseJob

    # --- what the engine does -------------------------------------------------------------

    @staticmethod
    def delivery_sink(backend: QueueBackend, delivery: Delivery) -> CheckpointSink:
        """The ``save=`` sink for one delivery of a workerkit queue (the native worker's).

        It writes through ``backend.save_checkpoint(delivery, state)``. When the backend is a
        :class:`~workerkit.engines.base.TransactionalQueue` (it can join the caller's
        transaction, as :class:`~workerkit.engines.sql.SqlQueue` does), the sink is a
        :class:`TransactionalCheckpointSink` and the job may use :meth:`transaction` and
        ``save_checkpoint(state, connection=conn)``.
        """
        if _is_transactional(backend):
            return _TransactionalQueueSink(backend, delivery)
        return _QueueSink(backend, delivery)

    def request_stop(self) -> None:
        """Ask the job to stop: the drain deadline passed."""
        self._stop.set()

    def mark_lease_lost(self) -> None:
        """The engine found that another worker owns the job now."""
        self._lease_lost = True
        self._stop.set()

    def activate(self) -> AbstractContextManager[JobContext]:
        """Make this the current job in this thread (and register it for stop requests)."""
        return _Activation(self)


class _Activation:
    """``with context.activate():``; a class, as generator-based context managers cost more
    per job than the rest of a no-op job's wrapper."""

    __slots__ = ("_context", "_token")

    def __init__(self, context: JobContext) -> None:
        self._context = context

    def __enter__(self) -> JobContext:
        context = self._context
        self._token = _current.set(context)
        with _registry_lock:
            _active.add(context)
        return context

    def __exit__(self, *exc_info: object) -> None:
        with _registry_lock:
            _active.discard(self._context)
        _current.reset(self._token)


_current: contextvars.ContextVar[JobContext | None] = contextvars.ContextVar(
    "workerkit_current_job", default=None
)
_active: set[JobContext] = set()
_registry_lock = threading.Lock()
_stop_event_lock = threading.Lock()


def current_job() -> JobContext:
    """The context of the job running in this thread; :class:`NoCurrentJob` outside a job."""
    context = _current.get()
    if context is None:
        raise NoCurrentJob
    return context


def current_job_or_none() -> JobContext | None:
    """The context of the job running in this thread, or None outside a job."""
    return _current.get()


def active_contexts() -> tuple[JobContext, ...]:
    """The contexts of the jobs running in this process now."""
    with _registry_lock:
        return tuple(_active)


def request_stop_all() -> None:
    """Ask every job running in this process to stop (for engines whose jobs run in pools)."""
    for context in active_contexts():
        context.request_stop()


def _reset_after_fork() -> None:
    # A forked child (RQ's work horse, Celery's pool) inherits the parent's registry, but none of
    # the parent's job threads; and another thread may have held the lock at fork time.
    global _registry_lock, _stop_event_lock
    _registry_lock = threading.Lock()
    _stop_event_lock = threading.Lock()
    _active.clear()


os.register_at_fork(after_in_child=_reset_after_fork)
