"""Jobs enqueued one after another start in that order, on SQLite and PostgreSQL.

SQLite's clock has millisecond precision, and the rows of one ``enqueue_many`` statement share
PostgreSQL's: jobs enqueued within one tick have the same ``run_at``, and a claim starts them in
``(run_at, job id)`` order. With random ids they started in a random order (the prefetch tests
failed when the held job was the first one enqueued); workerkit's ids sort by creation
(:mod:`workerkit.job_ids`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from workerkit.app import App
from workerkit.engines.sql import SqlQueue, upgrade
from workerkit.settings import Settings

JOBS = 50


@pytest.fixture
def queue(database_url: str) -> Iterator[SqlQueue]:
    if database_url.startswith("sqlite"):
        upgrade(database_url)
    opened = SqlQueue(database_url, settings=Settings())
    yield opened
    opened.close()


def _task(queue: SqlQueue) -> Any:
    app = App(backend=queue, settings=Settings())

    @app.task
    def step(n: int) -> int:
        return n

    return step


def test_jobs_enqueued_one_by_one_are_claimed_in_that_order(queue: SqlQueue) -> None:
    step = _task(queue)
    ids = [step.enqueue(n) for n in range(JOBS)]
    claimed = queue.claim(["default"], "w", JOBS)
    assert [d.job_id for d in claimed] == ids


def test_jobs_of_one_enqueue_many_are_claimed_in_their_order(queue: SqlQueue) -> None:
    step = _task(queue)
    ids = step.enqueue_many([((n,), {}) for n in range(JOBS)])
    claimed = queue.claim(["default"], "w", JOBS)
    assert [d.job_id for d in claimed] == list(ids)
