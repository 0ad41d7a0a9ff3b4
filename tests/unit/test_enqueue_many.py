"""Bulk enqueue's own logic: what a job of a batch may be, the batch options, the chunk sizes.

The writes themselves, on SQLite and PostgreSQL, are in tests/integration/test_enqueue_many.py.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from workerkit.app import App, EnqueueOptions, PreparedJob
from workerkit.engines.base import NewJob
from workerkit.engines.sql.bulk import first_of_each_id, sqlite_chunk_rows, went_in
from workerkit.errors import ConfigurationError
from workerkit.testing import InMemoryQueue, ManualClock, run_jobs


def make_app() -> tuple[App, InMemoryQueue, list[Any]]:
    queue = InMemoryQueue(clock=ManualClock(1_000.0))
    app = App(backend=queue)
    ran: list[Any] = []

    @app.task(name="add", queue="math")
    def add(a: int, b: int = 0) -> None:
        ran.append(a + b)

    @app.task(name="echo")
    def echo(text: str) -> None:
        ran.append(text)

    return app, queue, ran


def test_every_job_of_a_batch_runs_once() -> None:
    app, _queue, ran = make_app()
    add = app.tasks["add"]
    ids = add.enqueue_many([((1, 2), {}), ((3,), {"b": 4}), add.prepare(5, b=6)])
    assert len(set(ids)) == 3
    assert run_jobs(app)["succeeded"] == 3
    assert sorted(ran) == [3, 7, 11]


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ((1, 2), r"job 0 is \(1, 2\); give each job as an \(args, kwargs\) pair"),
        ([(1,), {}], r"job 0 is \[\(1,\), \{\}\]"),
        (((1,), {}, {}), r"job 0 is"),
        ("x", r"or as add.prepare\(\.\.\.\)"),
        (PreparedJob("echo", ("x",)), r"job 0 is for task 'echo'; give jobs of several tasks to "),
    ],
)
def test_a_job_that_is_not_a_pair_or_this_tasks_prepared_job_is_refused(
    item: Any, message: str
) -> None:
    app, queue, _ran = make_app()
    with pytest.raises(ConfigurationError, match=message):
        app.tasks["add"].enqueue_many([item])
    assert queue.count_by_state()["ready"] == 0


def test_app_enqueue_many_takes_prepared_jobs_only() -> None:
    app, _queue, _ran = make_app()
    with pytest.raises(ConfigurationError, match=r"job 1 is tuple, not a PreparedJob"):
        app.enqueue_many([app.tasks["add"].prepare(1), ((2,), {})])  # type: ignore[list-item]


def test_batch_options_fill_in_what_a_job_does_not_set() -> None:
    app, queue, _ran = make_app()
    add = app.tasks["add"]
    ids = add.enqueue_many(
        [
            ((1,), {}),
            add.configure(queue="own", run_at=5_000.0).prepare(2),
            add.configure(delay=10).prepare(3),
        ],
        queue="batch",
        run_at=9_000.0,
    )
    jobs = [queue.get_job(job_id) for job_id in ids]
    assert [job["queue"] for job in jobs if job] == ["batch", "own", "batch"]
    assert [job["run_at"] for job in jobs if job][:2] == [9_000.0, 5_000.0]
    assert jobs[2] is not None
    assert abs(jobs[2]["run_at"] - (time.time() + 10)) < 60
    with pytest.raises(ConfigurationError, match="give delay or run_at, not both"):
        add.enqueue_many([((1,), {})], delay=1, run_at=2)


def test_a_prepared_job_carries_the_configured_options() -> None:
    app, _queue, _ran = make_app()
    prepared = app.tasks["add"].configure(job_id="k", delay=3).prepare(1, b=2)
    assert prepared == PreparedJob("add", (1,), {"b": 2}, EnqueueOptions(delay=3, job_id="k"))


def job(job_id: str) -> NewJob:
    return NewJob(job_id=job_id, task="t", queue="q", payload="{}", max_attempts=1)


def test_the_first_job_of_an_id_is_the_one_that_goes_in() -> None:
    batch = [job("a"), job("b"), job("a"), job("c"), job("b")]
    assert [j.job_id for j in first_of_each_id(batch)] == ["a", "b", "c"]
    assert went_in(batch, {"a", "c"}) == [True, False, False, True, False]


def test_sqlite_chunks_stay_within_the_variable_limit() -> None:
    assert sqlite_chunk_rows(32_766) == 500  # capped: a cached 5,461-row statement is ~40 MiB
    assert sqlite_chunk_rows(999) == 166  # SQLite before 3.32
    assert sqlite_chunk_rows(3) == 1
