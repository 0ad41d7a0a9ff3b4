"""Test doubles for code that uses workerkit: no database, no server, no sleeping.

Each fake lives next to what it imitates and is held to the same contract suite:
:class:`InMemoryQueue` (``workerkit/engines/sql/memory.py``),
:class:`InMemoryIdempotencyStore` (``workerkit/idempotency/memory.py``) and
:class:`InMemorySchedulerStore` (``workerkit/scheduler/memory.py``). This module gathers them
with :class:`ManualClock` (time that moves only when told) and :func:`run_jobs` (the production
worker loop, run in this process until nothing is due). Production code never imports it.
See docs/howto/testing.md.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from workerkit.engines.sql.memory import InMemoryQueue
from workerkit.idempotency.memory import InMemoryIdempotencyStore
from workerkit.scheduler.memory import InMemorySchedulerStore

if TYPE_CHECKING:
    from workerkit.app import App
    from workerkit.settings import Settings

__all__ = (
    "InMemoryIdempotencyStore",
    "InMemoryQueue",
    "InMemorySchedulerStore",
    "ManualClock",
    "run_jobs",
)


class ManualClock:
    """A clock that moves only when told to: ``clock()`` is the time, ``advance(s)`` moves it.

    It starts at the real epoch time (so ``run_at`` values computed from :func:`time.time`,
    such as a task's ``delay``, mean what they say) and is safe to share between threads.
    """

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> float:
        """Move the clock forward by ``seconds``; return the new time."""
        if seconds < 0:
            raise ValueError("a clock only moves forward")
        with self._lock:
            self._now += seconds
            return self._now


def run_jobs(
    app: App, *, timeout: float = 30.0, settings: Settings | None = None
) -> dict[str, int]:
    """Run the app's due jobs in this process until none is left; return the count by state.

    The real worker loop (:class:`~workerkit.engines.sql.worker.NativeWorker`) runs them, on the
    app's own queue (give the app an :class:`InMemoryQueue` in tests), with the job context,
    retries, checkpoints and idempotency keys working as in production. Jobs that become due
    later (a retry's backoff, a ``delay``) are left queued: advance a :class:`ManualClock` and
    call this again. Raises :class:`TimeoutError` when jobs are still running after ``timeout``
    seconds.

    ::

        app = App(backend=InMemoryQueue())
        ...
        send_receipt.enqueue(42)
        assert run_jobs(app)["succeeded"] == 1
    """
    from workerkit.engines.sql.worker import NativeWorker

    base = settings or app.settings
    queues = sorted({task.queue for task in app.tasks.values()} | set(base.queue_names))
    settings = settings or base.replace(poll_interval=0.01, queues=",".join(queues))
    backend = app.backend
    worker = NativeWorker(app, settings, backend=backend)
    outcome: list[int] = []
    thread = threading.Thread(
        target=lambda: outcome.append(worker.run(install_signal_handlers=False)),
        name="workerkit-run-jobs",
        daemon=True,
    )
    thread.start()
    deadline = time.monotonic() + timeout
    idle_checks = 0
    try:
        # Idle means: nothing due in any queue and nothing running, twice in a row (a job that
        # finishes may have just enqueued another).
        while idle_checks < 2:
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs still running after {timeout:g}s")
            due = sum(backend.stats(queues).depth.values())
            idle_checks = idle_checks + 1 if due == 0 and worker.running_count == 0 else 0
            time.sleep(0.01)
    finally:
        worker.stop_fetching()
        thread.join(timeout)
    counts: dict[str, int] = backend.count_by_state()  # type: ignore[attr-defined]
    return counts
