"""The contracts between the supervisor, the worker loops and a queue.

:class:`QueueBackend` is a queue workerkit runs itself (the SQL queue and its in-memory fake):
claim, extend, and settle each delivery exactly once, every write after the claim fenced by the
delivery's token (:class:`~workerkit.errors.LeaseLost` otherwise). :class:`TransactionalQueue`
adds checkpoints inside the caller's transaction. :class:`Engine` is what the supervisor needs
from any engine: the worker's command, and releasing deliveries in flight when it died.
Attempt accounting (a release gives the attempt back, a crash keeps it) is in
docs/howto/checkpointed-jobs.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from workerkit.settings import Settings
    from workerkit.timing import CeleryFacts, TaskTiming

__all__ = (
    "AppTiming",
    "Delivery",
    "Engine",
    "NewJob",
    "QueueBackend",
    "QueueStats",
    "StoreHealth",
    "TransactionalQueue",
)


@dataclass(frozen=True)
class AppTiming:
    """What the timing budget needs to know about the user's app.

    ``tasks``: each task's timeout and whether a re-run is safe (idempotent or checkpointed);
    ``celery``: the Celery settings a Celery app overrides (None for other engines).
    """

    tasks: tuple[TaskTiming, ...] = ()
    celery: CeleryFacts | None = None


@dataclass(frozen=True)
class NewJob:
    """A job to enqueue. ``payload`` is already-encoded JSON text (args and kwargs)."""

    job_id: str
    task: str
    queue: str
    payload: str
    max_attempts: int
    run_at: float | None = None  # epoch seconds; None = now (by the store's clock)


@dataclass(frozen=True)
class Delivery:
    """One claimed attempt of one job, owned by the holder of ``token`` until its lease ends."""

    job_id: str
    task: str
    queue: str
    payload: str  # JSON text as enqueued; decoded by the worker (a bad one fails the job)
    attempt: int  # this attempt's number, from 1
    max_attempts: int
    token: str
    checkpoint: Any = None
    enqueued_at: float | None = None  # epoch seconds the job became runnable, for queue wait
    lease_expires_at: float | None = None

    def ref(self) -> dict[str, Any]:
        """What the supervisor keeps to release this delivery if its worker dies."""
        return {"job_id": self.job_id, "token": self.token, "queue": self.queue}


@dataclass(frozen=True)
class QueueStats:
    """Queue depth and the age of the oldest ready job, per queue (for metrics, autoscaling)."""

    depth: Mapping[str, int] = field(default_factory=dict)
    oldest_ready_age: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StoreHealth:
    """Whether the store can be used now, and why not (one line, no secrets)."""

    ok: bool
    reason: str


@runtime_checkable
class QueueBackend(Protocol):
    """A queue the native worker loop runs. Safe to call from several threads at once."""

    name: str

    def enqueue(self, job: NewJob) -> bool:
        """Store the job; False (and no change) when a job with this id already exists."""
        ...

    def enqueue_many(self, jobs: Sequence[NewJob]) -> list[bool]:
        """Store the jobs, all or none; for each, whether it went in (False for an id that
        exists already or came earlier in ``jobs``, skipped as :meth:`enqueue` skips it)."""
        ...

    def claim(self, queues: Sequence[str], worker_id: str, limit: int) -> list[Delivery]:
        """Take up to ``limit`` runnable jobs (ready and due, or with an expired lease)."""
        ...

    def extend(self, delivery: Delivery) -> bool:
        """Renew the lease; False when it was lost (then nothing else of it will count)."""
        ...

    def save_checkpoint(self, delivery: Delivery, state: Any) -> None:
        """Store the checkpoint (JSON-serializable). Fenced."""
        ...

    def ack(self, delivery: Delivery, result: Any) -> None:
        """The job succeeded: store the result, drop the checkpoint. Fenced."""
        ...

    def retry(self, delivery: Delivery, error: str, run_at: float) -> None:
        """The attempt failed; run again at ``run_at`` (epoch seconds). Fenced."""
        ...

    def fail(self, delivery: Delivery, error: str) -> None:
        """The job failed for good, keeping the error. Fenced."""
        ...

    def release(self, delivery: Delivery) -> None:
        """Back to the queue now, checkpoint kept, attempt given back. Fenced."""
        ...

    def defer(self, delivery: Delivery, run_at: float, reason: str) -> None:
        """Not now: run again at ``run_at`` (epoch seconds), attempt given back. Fenced.

        For a job that could not start its work because something else holds what it needs
        (its idempotency key is claimed by a live attempt): waiting is not a failure, so it
        must not use up the retries that crash recovery depends on.
        """
        ...

    def release_ref(self, ref: Mapping[str, Any], *, crashed: bool = False) -> bool:
        """Release by :meth:`Delivery.ref`, from another process; False when already settled.

        ``crashed``: the worker died on its own, and the job may be why (an out-of-memory kill),
        so the attempt stays consumed, and a job with no attempts left is failed with the
        reason instead of being released. Otherwise (a deploy) the attempt is given back.
        """
        ...

    def wait_for_jobs(self, queues: Sequence[str], timeout: float) -> None:
        """Block up to ``timeout`` seconds, returning early when new jobs may be there."""
        ...

    def health(self) -> StoreHealth:
        """Can the store be used now (reachable, schema current)?"""
        ...

    def stats(self, queues: Sequence[str]) -> QueueStats:
        """Depth and oldest ready age of each queue."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


@runtime_checkable
class TransactionalQueue(Protocol):
    """A queue whose checkpoint write can join the caller's database transaction (optional).

    For jobs whose data lives in the queue's database: the batch and the cursor that says it is
    done commit together, so a batch is applied exactly once however often the job is
    interrupted (docs/howto/checkpointed-jobs.md).
    """

    def save_checkpoint(self, delivery: Delivery, state: Any, connection: Any = None) -> None:
        """Store the checkpoint; with ``connection``, inside its open transaction. Fenced.

        With a connection nothing is committed here: the caller's commit makes the checkpoint
        durable together with the caller's own writes, and :class:`~workerkit.errors.LeaseLost`
        (raised inside the transaction) makes the caller roll them back.
        """
        ...

    def transaction(self) -> AbstractContextManager[Any]:
        """A write transaction on the queue's database, yielding its connection."""
        ...


class Engine(Protocol):
    """What the supervisor needs from an engine.

    An engine's class imports none of its libraries until a method needs them: the supervisor
    holds it for its whole life. It may also have ``prepare_release(settings)``, which imports
    (or loads) ahead what :meth:`release_in_flight` needs; the supervisor calls it in a thread
    when a drain begins, so that a release after the kill spends no margin on imports.
    """

    name: str

    def worker_command(self, settings: Settings) -> list[str]:
        """The argv of the engine's worker process (settings reach it through the environment)."""
        ...

    def scheduler_command(self, settings: Settings) -> list[str]:
        """The argv of the engine's scheduler process (``workerkit scheduler ENGINE``):
        ``python -m workerkit.engines.<engine>.scheduling`` (settings through the environment)."""
        ...

    def app_timing(self, settings: Settings) -> AppTiming:
        """The timing facts of ``settings.app`` (empty without an app).

        Raises :class:`~workerkit.errors.ConfigurationError` when the app cannot be loaded or
        is not an app of this engine.
        """
        ...

    def release_in_flight(
        self, settings: Settings, refs: Sequence[Mapping[str, Any]], *, crashed: bool = False
    ) -> int:
        """Release deliveries whose worker died or was killed; return how many were released.

        ``crashed`` as for :meth:`QueueBackend.release_ref`: True when the worker exited
        unasked, False when the supervisor killed it at the shutdown deadline.
        """
        ...
