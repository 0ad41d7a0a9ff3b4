"""Test doubles for code that uses workerkit: no database, no server, no sleeping.

:class:`InMemoryQueue` is workerkit's queue contract
(:class:`~workerkit.engines.base.QueueBackend`) kept in a dict. It follows the same rules as the
SQL queue, checked by the same contract test suite: attempts count claims, a release gives the
attempt back, a lease that expires lets another worker claim the job, and every write after the
claim is fenced by the delivery's token. Give it a :class:`ManualClock` to expire leases and
make delayed jobs due without waiting::

    from workerkit import App
    from workerkit.testing import InMemoryQueue, ManualClock

    clock = ManualClock()
    queue = InMemoryQueue(clock=clock, lease_ttl=30)
    app = App(backend=queue)

    @app.task(max_attempts=3)
    def charge(order_id: int) -> None: ...

    job_id = charge.enqueue(7)
    [delivery] = queue.claim(["default"], worker_id="test", limit=1)
    clock.advance(31)                      # the worker "crashed": its lease runs out
    [again] = queue.claim(["default"], worker_id="other", limit=1)
    assert again.attempt == 2
    assert queue.get_job(job_id)["state"] == "running"

:class:`InMemoryIdempotencyStore` is the idempotency store contract
(:class:`~workerkit.idempotency.IdempotencyStore`), held to the same contract suite as the SQL
and Redis stores; with a :class:`ManualClock`, claims and results expire when the test says::

    store = InMemoryIdempotencyStore(clock=clock)
    app = App(backend=queue)                # an InMemoryQueue's app uses one by default

    @workerkit.idempotent(key="charge:{order_id}", store=store, in_progress_expiry=60)
    def charge(order_id: int) -> str: ...
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from workerkit.engines.sql.memory import InMemoryQueue
from workerkit.idempotency.memory import InMemoryIdempotencyStore

if TYPE_CHECKING:
    from workerkit.app import App
    from workerkit.settings import Settings

__all__ = ("InMemoryIdempotencyStore", "InMemoryQueue", "ManualClock", "run_jobs")


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
    queues = sorted({task.queue for task in app.tasks.values()} | set(base.queues))
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
