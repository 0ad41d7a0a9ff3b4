"""What the dashboard shows and does, independent of the engine: the read models and the source.

Each engine implements :class:`DashboardSource` on the store it already has
(``workerkit.engines.<engine>.dashboard.open_source``); the web layer knows only this module.
Every action is fenced: it names the ``version`` of the job the page showed and changes nothing
(raising :class:`StaleAction`) when the job moved on since, as a worker's write is fenced by its
lease token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from workerkit.errors import WorkerkitError

if TYPE_CHECKING:
    from workerkit.engines.presence import Presence
    from workerkit.scheduler.contract import SchedulerBinding

__all__ = (
    "JOB_STATES",
    "ActionRefused",
    "DashboardSource",
    "IdempotencyView",
    "JobDetail",
    "JobPage",
    "JobQuery",
    "JobRow",
    "JobState",
    "QueueSummary",
    "SearchResult",
    "StaleAction",
)

#: ``waiting``: ready to run now; ``scheduled``: waiting for its time (delayed, or a retry's
#: back-off); ``running``: held by a worker (leased); ``failed``: the dead-letter state, kept
#: with its error; ``finished``: succeeded (kept until the engine's retention removes it).
JobState = Literal["waiting", "scheduled", "running", "failed", "finished"]
JOB_STATES: tuple[JobState, ...] = ("waiting", "scheduled", "running", "failed", "finished")


class ActionRefused(WorkerkitError):
    """An action that cannot be done (unknown job, wrong state, unknown queue); says why."""


class StaleAction(ActionRefused):
    """The job changed since the page showed it (its ``version`` differs): nothing was done."""


@dataclass(frozen=True)
class QueueSummary:
    """One queue now. Counts an engine cannot afford to compute exactly are ``None`` ("n/a")."""

    name: str
    waiting: int
    scheduled: int | None
    running: int
    failed: int
    finished: int | None
    #: Seconds the oldest waiting (due) job has waited, on the store's clock; None when empty.
    oldest_waiting_age: float | None
    paused: bool


@dataclass(frozen=True)
class JobQuery:
    """A page of jobs in one state; ``cursor`` is the previous page's ``next_cursor``."""

    state: JobState
    queue: str | None = None
    task: str | None = None
    cursor: str | None = None
    limit: int = 50


@dataclass(frozen=True)
class JobRow:
    """One job in a list. Times are epoch seconds (the store's clock); None: not known."""

    id: str
    queue: str
    task: str
    state: JobState
    #: Attempts taken so far (1 while the first attempt runs), and the most it may take.
    attempt: int
    max_attempts: int | None
    enqueued_at: float | None
    #: When a scheduled job becomes due; when a running job's current attempt started.
    run_at: float | None
    finished_at: float | None
    worker: str | None
    lease_expires_at: float | None
    has_checkpoint: bool
    #: The error's last line (failed jobs, and retried ones waiting for their next attempt).
    error: str | None
    #: Opaque: what an action must name so that it acts on this job as shown (the fence).
    version: str


@dataclass(frozen=True)
class JobPage:
    rows: tuple[JobRow, ...]
    #: The cursor of the next page; None on the last one.
    next_cursor: str | None
    #: The number of jobs in this state (and queue) when cheap to know; None otherwise.
    total: int | None = None


@dataclass(frozen=True)
class IdempotencyView:
    """An idempotency key's record (workerkit.idempotency) as stored."""

    key: str
    state: str
    owner: str | None
    claimed_at: float | None
    completed_at: float | None
    expires_at: float | None
    result: str | None


@dataclass(frozen=True)
class JobDetail:
    """One job, whole. Texts are as stored (JSON where the engine stores JSON), capped by the
    source at 64 KiB each (a note says so)."""

    row: JobRow
    args: str | None
    checkpoint: str | None
    result: str | None
    #: The full error (traceback where the engine keeps one).
    error: str | None
    #: Anything else the engine knows, for a key/value table (e.g. Celery's headers).
    extra: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SearchResult:
    """What a search text matched: a job by id, jobs by task name, an idempotency key."""

    jobs: tuple[JobRow, ...]
    idempotency: tuple[IdempotencyView, ...]


class DashboardSource(Protocol):
    """One engine's store as the dashboard reads and changes it. Methods are blocking (the web
    layer calls them from worker threads) and raise ``workerkit.errors.StoreUnavailable`` when
    the store cannot be reached."""

    engine: str

    def clock(self) -> float:
        """The store's time now (epoch seconds): ages and "in N s" are computed from it."""
        ...

    def queues(self) -> list[QueueSummary]:
        """Every queue the store knows (by name), paused ones included."""
        ...

    def jobs(self, query: JobQuery) -> JobPage:
        """A page of jobs: waiting/scheduled in run order, running by start, failed and
        finished newest first."""
        ...

    def job(self, job_id: str) -> JobDetail | None:
        """One job, or None when the store has no such job (any more)."""
        ...

    def search(self, text: str, limit: int = 50) -> SearchResult:
        """Jobs whose id is ``text`` or whose task name is ``text`` (newest first, at most
        ``limit``), and the idempotency record keyed ``text``."""
        ...

    def workers(self) -> list[Presence]:
        """Every worker's last published presence, stale ones included (the page marks a
        presence older than its ``ttl`` as lost)."""
        ...

    def retry_failed(self, job_id: str, version: str, actor: str) -> None:
        """Put a failed job back to waiting, due now, with a fresh attempt count."""
        ...

    def discard_failed(self, job_id: str, version: str, actor: str) -> None:
        """Delete a failed job for good."""
        ...

    def cancel_waiting(self, job_id: str, version: str, actor: str) -> None:
        """Take a waiting or scheduled job off its queue before it runs: it becomes failed with
        the error "cancelled by ACTOR from the dashboard" (kept, so it can still be retried)."""
        ...

    def pause_queue(self, queue: str, actor: str) -> None:
        """Workers start nothing more from ``queue`` (within ``PAUSE_REFRESH`` seconds); jobs
        in hand run on. Pausing a paused queue changes nothing."""
        ...

    def resume_queue(self, queue: str, actor: str) -> None:
        """Undo :meth:`pause_queue` (idle workers wake at once where the engine can wake them)."""
        ...

    def scheduler(self) -> SchedulerBinding | None:
        """The scheduler binding of the app's schedules, or None when the app declares none."""
        ...

    def close(self) -> None: ...
