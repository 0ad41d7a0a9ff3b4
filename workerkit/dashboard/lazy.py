"""A source opened on first use and again after a failed open: the dashboard starts (and stays
up) while its store is unreachable, showing the 503 page until the store answers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workerkit.dashboard.model import (
        DashboardSource,
        JobDetail,
        JobPage,
        JobQuery,
        QueueSummary,
        SearchResult,
    )
    from workerkit.engines.presence import Presence
    from workerkit.scheduler.contract import SchedulerBinding

__all__ = ("LazySource",)


class LazySource:
    """:class:`~workerkit.dashboard.model.DashboardSource` around ``open_source``: each call
    opens the source if it is not open yet (``StoreUnavailable`` from the open goes to the
    caller, and the next call tries again)."""

    def __init__(self, engine: str, open_source: Callable[[], DashboardSource]) -> None:
        self.engine = engine
        self._open = open_source
        self._source: DashboardSource | None = None
        self._lock = threading.Lock()

    def get(self) -> DashboardSource:
        with self._lock:
            if self._source is None:
                self._source = self._open()
            return self._source

    def clock(self) -> float:
        return self.get().clock()

    def queues(self) -> list[QueueSummary]:
        return self.get().queues()

    def jobs(self, query: JobQuery) -> JobPage:
        return self.get().jobs(query)

    def job(self, job_id: str) -> JobDetail | None:
        return self.get().job(job_id)

    def search(self, text: str, limit: int = 50) -> SearchResult:
        return self.get().search(text, limit)

    def workers(self) -> list[Presence]:
        return self.get().workers()

    def retry_failed(self, job_id: str, version: str, actor: str) -> None:
        self.get().retry_failed(job_id, version, actor)

    def discard_failed(self, job_id: str, version: str, actor: str) -> None:
        self.get().discard_failed(job_id, version, actor)

    def cancel_waiting(self, job_id: str, version: str, actor: str) -> None:
        self.get().cancel_waiting(job_id, version, actor)

    def pause_queue(self, queue: str, actor: str) -> None:
        self.get().pause_queue(queue, actor)

    def resume_queue(self, queue: str, actor: str) -> None:
        self.get().resume_queue(queue, actor)

    def scheduler(self) -> SchedulerBinding | None:
        return self.get().scheduler()

    def close(self) -> None:
        with self._lock:
            source, self._source = self._source, None
        if source is not None:
            source.close()
