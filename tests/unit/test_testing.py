"""workerkit.testing as users use it: an app on an in-memory queue, run_jobs() to run them."""

from __future__ import annotations

import pytest

from workerkit import App, current_job
from workerkit.testing import InMemoryQueue, ManualClock, run_jobs


def test_run_jobs_runs_due_jobs_of_every_queue_with_retries_and_follow_ups() -> None:
    clock = ManualClock()
    app = App(backend=InMemoryQueue(clock=clock))
    seen: list[str] = []

    @app.task(queue="emails")
    def send(to: str) -> None:
        seen.append(f"sent {to}")

    @app.task(queue="orders", max_attempts=2, retry_backoff=60)
    def charge(order: int) -> None:
        if current_job().attempt == 1:
            raise ConnectionError("gateway down")
        seen.append(f"charged {order}")
        send.enqueue(f"customer-{order}")  # a follow-up job enqueued by a job

    charge.enqueue(7)
    counts = run_jobs(app)
    assert seen == []
    assert (counts["ready"], counts["succeeded"]) == (1, 0)  # the retry waits for its backoff

    clock.advance(120)
    counts = run_jobs(app)
    assert seen == ["charged 7", "sent customer-7"]
    assert counts["succeeded"] == 2


def test_run_jobs_gives_up_after_its_timeout() -> None:
    app = App(backend=InMemoryQueue())

    @app.task(timeout=30)
    def slow() -> None:
        current_job().wait_for_stop(2)

    slow.enqueue()
    with pytest.raises(TimeoutError):
        run_jobs(app, timeout=0.2)
