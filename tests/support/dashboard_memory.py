"""A DashboardSource on dicts, for the web layer's unit tests (and the browser tests' unit-level
checks): real keyset pagination and real fencing (a job's ``version`` changes with every change
of the job), so the pages and the actions are tested against the contract, not a stub.

Also :func:`served`: a real uvicorn server for an app, in a thread, on a free port (the tests
talk to it with http.client: no httpx here).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tests.support.servers import free_port
from workerkit.dashboard.model import (
    ActionRefused,
    IdempotencyView,
    JobDetail,
    JobPage,
    JobQuery,
    JobRow,
    JobState,
    QueueSummary,
    SearchResult,
    StaleAction,
)
from workerkit.errors import StoreUnavailable

if TYPE_CHECKING:
    from workerkit.engines.presence import Presence
    from workerkit.scheduler.contract import SchedulerBinding

__all__ = ("MemoryDashboardSource", "MemoryJob", "served")

log = logging.getLogger("workerkit.dashboard")


@dataclass
class MemoryJob:
    id: str
    queue: str
    task: str
    state: JobState
    enqueued_at: float
    attempt: int = 0
    max_attempts: int | None = 3
    run_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    lease_expires_at: float | None = None
    args: str = "[]"
    checkpoint: str | None = None
    result: str | None = None
    error: str | None = None
    changes: int = 0

    @property
    def version(self) -> str:
        return f"{self.state}:{self.changes}"

    def row(self) -> JobRow:
        return JobRow(
            id=self.id,
            queue=self.queue,
            task=self.task,
            state=self.state,
            attempt=self.attempt,
            max_attempts=self.max_attempts,
            enqueued_at=self.enqueued_at,
            run_at=self.run_at,
            finished_at=self.finished_at,
            worker=self.worker,
            lease_expires_at=self.lease_expires_at,
            has_checkpoint=self.checkpoint is not None,
            error=self.error.splitlines()[-1] if self.error else None,
            version=self.version,
        )


@dataclass
class MemoryDashboardSource:
    """The contract on dicts. ``down = True``: every call raises StoreUnavailable."""

    clock_fn: Callable[[], float] = time.time
    engine: str = "memory"
    jobs_by_id: dict[str, MemoryJob] = field(default_factory=dict)
    paused: set[str] = field(default_factory=set)
    presences: dict[str, Presence] = field(default_factory=dict)
    idempotency: dict[str, IdempotencyView] = field(default_factory=dict)
    binding: SchedulerBinding | None = None
    down: bool = False
    extra_queues: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    # --- test helpers ---------------------------------------------------------------------

    def add(self, job_id: str, *, queue: str = "default", task: str = "tasks.add",
            state: JobState = "waiting", **fields: Any) -> MemoryJob:  # fmt: skip
        now = self.clock_fn()
        job = MemoryJob(job_id, queue, task, state, enqueued_at=fields.pop("enqueued_at", now))
        self.jobs_by_id[job_id] = dataclasses.replace(job, **fields)
        return self.jobs_by_id[job_id]

    def change(self, job_id: str, **fields: Any) -> MemoryJob:
        """Change a job as a worker would (its version moves on)."""
        with self.lock:
            job = self.jobs_by_id[job_id]
            new = dataclasses.replace(job, **fields, changes=job.changes + 1)
            self.jobs_by_id[job_id] = new
            return new

    def _up(self) -> None:
        if self.down:
            raise StoreUnavailable("memory store: down (as the test asked)")

    # --- the contract -----------------------------------------------------------------------

    def clock(self) -> float:
        self._up()
        return self.clock_fn()

    def queues(self) -> list[QueueSummary]:
        self._up()
        names = {job.queue for job in self.jobs_by_id.values()} | self.paused | self.extra_queues
        now = self.clock_fn()
        found = []
        for name in sorted(names):
            jobs = [j for j in self.jobs_by_id.values() if j.queue == name]
            states = ("waiting", "scheduled", "running", "failed", "finished")
            by = {s: sum(1 for j in jobs if j.state == s) for s in states}
            waiting = [j.run_at or j.enqueued_at for j in jobs if j.state == "waiting"]
            oldest = now - min(waiting) if waiting else None
            found.append(QueueSummary(name, *by.values(), oldest, name in self.paused))
        return found

    def _sort_key(self, job: MemoryJob) -> list[Any]:
        if job.state in ("waiting", "scheduled"):
            return [job.run_at or job.enqueued_at, job.id]
        if job.state == "running":
            return [job.run_at or 0.0, job.id]
        return [-(job.finished_at or 0.0), _desc(job.id)]

    def jobs(self, query: JobQuery) -> JobPage:
        self._up()
        with self.lock:
            rows = [
                j
                for j in self.jobs_by_id.values()
                if j.state == query.state
                and (query.queue is None or j.queue == query.queue)
                and (query.task is None or j.task == query.task)
            ]
        total = len(rows)
        rows.sort(key=self._sort_key)
        if query.cursor:
            after = json.loads(base64.urlsafe_b64decode(query.cursor))
            rows = [j for j in rows if self._sort_key(j) > after]
        page = rows[: query.limit]
        more = len(rows) > query.limit
        cursor = (
            base64.urlsafe_b64encode(json.dumps(self._sort_key(page[-1])).encode()).decode()
            if more
            else None
        )
        return JobPage(tuple(j.row() for j in page), cursor, total)

    def job(self, job_id: str) -> JobDetail | None:
        self._up()
        job = self.jobs_by_id.get(job_id)
        if job is None:
            return None
        return JobDetail(job.row(), job.args, job.checkpoint, job.result, job.error,
                         {"memory.changes": str(job.changes)})  # fmt: skip

    def search(self, text: str, limit: int = 50) -> SearchResult:
        self._up()
        jobs = [j for j in self.jobs_by_id.values() if text in (j.id, j.task)]
        jobs.sort(key=lambda j: -j.enqueued_at)
        record = self.idempotency.get(text)
        return SearchResult(tuple(j.row() for j in jobs[:limit]), (record,) if record else ())

    def workers(self) -> list[Presence]:
        self._up()
        return list(self.presences.values())

    def _fenced(self, action: str, job_id: str, version: str, actor: str,
                states: tuple[str, ...], **change: Any) -> None:  # fmt: skip
        self._up()
        with self.lock:
            job = self.jobs_by_id.get(job_id)
            if job is None:
                outcome, error = "refused", ActionRefused(f"no job {job_id!r}")
            elif job.version != version or job.state not in states:
                outcome = "stale"
                error = StaleAction(
                    f"job {job_id} changed since the page showed it (now {job.state}): nothing done"
                )
            else:
                outcome, error = "done", None
                if change.pop("delete", False):
                    del self.jobs_by_id[job_id]
                else:
                    new = dataclasses.replace(job, **change, changes=job.changes + 1)
                    self.jobs_by_id[job_id] = new
        log.info(
            "dashboard %s %s: %s",
            action,
            job_id,
            outcome,
            extra={
                "event": "dashboard_action",
                "action": action,
                "job_id": job_id,
                "actor": actor,
                "outcome": outcome,
            },
        )
        if error is not None:
            raise error

    def retry_failed(self, job_id: str, version: str, actor: str) -> None:
        self._fenced("retry", job_id, version, actor, ("failed",), state="waiting", attempt=0,
                     run_at=self.clock_fn(), finished_at=None)  # fmt: skip

    def discard_failed(self, job_id: str, version: str, actor: str) -> None:
        self._fenced("discard", job_id, version, actor, ("failed",), delete=True)

    def cancel_waiting(self, job_id: str, version: str, actor: str) -> None:
        self._fenced("cancel", job_id, version, actor, ("waiting", "scheduled"), state="failed",
                     finished_at=self.clock_fn(),
                     error=f"cancelled by {actor} from the dashboard")  # fmt: skip

    def pause_queue(self, queue: str, actor: str) -> None:
        self._queue_action("pause", queue, actor)

    def resume_queue(self, queue: str, actor: str) -> None:
        self._queue_action("resume", queue, actor)

    def _queue_action(self, action: str, queue: str, actor: str) -> None:
        self._up()
        known = {q.name for q in self.queues()}
        if queue not in known:
            log.info("dashboard %s %s: refused", action, queue, extra={
                "event": "dashboard_action", "action": action, "queue": queue, "actor": actor,
                "outcome": "refused"})  # fmt: skip
            raise ActionRefused(f"no queue {queue!r}")
        if action == "pause":
            self.paused.add(queue)
        else:
            self.paused.discard(queue)
        log.info("dashboard %s %s: done", action, queue, extra={
            "event": "dashboard_action", "action": action, "queue": queue, "actor": actor,
            "outcome": "done"})  # fmt: skip

    def scheduler(self) -> SchedulerBinding | None:
        self._up()
        return self.binding

    def close(self) -> None:
        pass


def _desc(text: str) -> list[int]:
    """A sort key that orders ``text`` descending (as a list: JSON round trips it)."""
    return [-ord(char) for char in text] + [1]


@contextlib.contextmanager
def served(app: Any) -> Iterator[tuple[str, int]]:
    """Serve ``app`` with uvicorn in a thread; yields (host, port); stops it after."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, access_log=False, http="h11"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="dashboard-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the dashboard test server did not start")
        time.sleep(0.01)
    try:
        yield "127.0.0.1", port
    finally:
        server.should_exit = True
        thread.join(timeout=20)
