"""Bulk enqueue (``task.enqueue_many`` / ``app.enqueue_many``) on every queue backend.

In memory, on SQLite and on PostgreSQL alike: ids in order, duplicates skipped as a single
enqueue skips them, a bad payload refusing the whole batch before anything is written, a
database error rolling the whole batch back, batches larger than one statement's parameters,
and the wake-up of an idle worker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from workerkit.app import App, EnqueueOptions, PreparedJob, encode_payload
from workerkit.engines.base import NewJob
from workerkit.engines.sql import SqlQueue, upgrade
from workerkit.errors import PayloadError, PayloadTooLarge
from workerkit.settings import Settings
from workerkit.testing import InMemoryQueue, ManualClock

#: More jobs than one statement could carry at six parameters a row on either database
#: (SQLite: 32,766 variables = 5,461 rows; PostgreSQL: 65,535 parameters = 10,922 rows).
ACROSS_LIMITS = 12_000


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def queue(request: pytest.FixtureRequest) -> Iterator[Any]:
    if request.param == "memory":
        yield InMemoryQueue(clock=ManualClock(1_000_000.0))
        return
    url: str = request.getfixturevalue(f"{request.param}_url")
    upgrade(url)
    opened = SqlQueue(url, settings=Settings(database_url=url))
    try:
        yield opened
    finally:
        opened.close()


def make_app(queue: Any, **settings: Any) -> App:
    app = App(backend=queue, settings=Settings().replace(**settings))

    @app.task(name="work", queue="bulk", max_attempts=4)
    def work(n: int, *, label: str = "") -> None: ...

    @app.task(name="other")
    def other(text: str) -> None: ...

    return app


def nonzero(counts: dict[str, int]) -> dict[str, int]:
    return {state: count for state, count in counts.items() if count}


def new_job(job_id: str, n: int = 0, **fields: Any) -> NewJob:
    values: dict[str, Any] = {"task": "work", "queue": "bulk", "max_attempts": 3}
    values.update(fields)
    return NewJob(job_id=job_id, payload=f'{{"args":[{n}],"kwargs":{{}}}}', **values)


def test_ids_come_back_in_order_and_each_job_is_stored_as_enqueue_stores_it(queue: Any) -> None:
    app = make_app(queue)
    work = app.tasks["work"]
    ids = work.enqueue_many(
        [
            ((1,), {}),
            ((2,), {"label": "two"}),
            work.prepare(3),
            work.configure(job_id="fixed-4", queue="side", delay=3600).prepare(4),
        ]
    )
    assert len(ids) == 4
    assert ids[3] == "fixed-4"
    assert len(set(ids)) == 4
    jobs = [queue.get_job(job_id) for job_id in ids]
    assert [job["payload"] for job in jobs] == [
        '{"args":[1],"kwargs":{}}',
        '{"args":[2],"kwargs":{"label":"two"}}',
        '{"args":[3],"kwargs":{}}',
        '{"args":[4],"kwargs":{}}',
    ]
    assert [job["queue"] for job in jobs] == ["bulk", "bulk", "bulk", "side"]
    assert {job["state"] for job in jobs} == {"ready"}
    assert {job["max_attempts"] for job in jobs} == {4}
    assert jobs[3]["run_at"] > jobs[0]["run_at"] + 3000  # its own delay
    # The single enqueue stores the same row.
    single = queue.get_job(work.enqueue(1))
    keys = ("task", "queue", "payload", "state", "attempts", "max_attempts")
    assert {key: single[key] for key in keys} == {key: jobs[0][key] for key in keys}


def test_app_enqueue_many_takes_jobs_of_several_tasks_and_batch_options(queue: Any) -> None:
    app = make_app(queue)
    ids = app.enqueue_many(
        [
            app.tasks["work"].prepare(1),
            app.tasks["other"].prepare("x"),
            PreparedJob("not.imported.here", (5,), {}, EnqueueOptions(queue="elsewhere")),
        ],
        queue="batch",
        delay=600,
    )
    jobs = [queue.get_job(job_id) for job_id in ids]
    assert [job["task"] for job in jobs] == ["work", "other", "not.imported.here"]
    assert [job["queue"] for job in jobs] == ["batch", "batch", "elsewhere"]
    assert all(job["run_at"] > job["enqueued_at"] + 500 for job in jobs)
    assert app.enqueue_many([]) == []


def test_a_duplicate_id_is_skipped_as_a_single_enqueue_skips_it(queue: Any) -> None:
    app = make_app(queue)
    work = app.tasks["work"]
    assert work.configure(job_id="a").enqueue(1) == "a"
    ids = work.enqueue_many(
        [
            work.configure(job_id="a").prepare(100),  # exists: unchanged
            work.configure(job_id="b").prepare(2),
            work.configure(job_id="b").prepare(200),  # earlier in the batch: skipped
            work.configure(job_id="c").prepare(3),
        ]
    )
    assert ids == ["a", "b", "b", "c"]
    assert queue.get_job("a")["payload"] == '{"args":[1],"kwargs":{}}'
    assert queue.get_job("b")["payload"] == '{"args":[2],"kwargs":{}}'
    assert nonzero(queue.count_by_state("bulk")) == {"ready": 3}
    # The backend says which went in, in order.
    flags = queue.enqueue_many([new_job("a"), new_job("d"), new_job("d"), new_job("e")])
    assert flags == [False, True, False, True]


def test_a_bad_payload_refuses_the_whole_batch_before_anything_is_written(queue: Any) -> None:
    app = make_app(queue, max_payload_bytes=200)
    work = app.tasks["work"]
    with pytest.raises(PayloadTooLarge) as too_large:
        work.enqueue_many([((1,), {}), ((2,), {}), ((3,), {"label": "x" * 300})])
    message = str(too_large.value)
    assert "job 2" in message
    assert "nothing was enqueued" in message
    assert "max_payload_bytes=200" in message
    assert "WORKERKIT_MAX_PAYLOAD_BYTES" in message
    with pytest.raises(PayloadError, match=r"job 1 refused.*must be JSON"):
        work.enqueue_many([((1,), {}), ((object(),), {})])
    assert nonzero(queue.count_by_state()) == {}


def test_a_database_error_rolls_the_whole_batch_back(queue: Any) -> None:
    if isinstance(queue, InMemoryQueue):
        pytest.skip("the in-memory queue has no write that can fail half-way")
    # The bad row is in the last chunk, so earlier chunks were inserted before it failed.
    batch = [new_job(f"j{n}", n) for n in range(ACROSS_LIMITS)]
    batch[-1] = new_job("too-many-attempts", max_attempts=2**70)
    with pytest.raises(Exception):  # noqa: B017, PT011 - the driver's own error for the value
        queue.enqueue_many(batch)
    assert nonzero(queue.count_by_state()) == {}
    assert queue.get_job("j0") is None


def test_a_batch_larger_than_one_statement_goes_in_whole_and_in_order(queue: Any) -> None:
    app = make_app(queue)
    work = app.tasks["work"]
    already = {0, 5_461, 10_922, ACROSS_LIMITS - 1}  # at the chunk edges of either database
    for n in sorted(already):
        work.configure(job_id=f"j{n}").enqueue(-1)
    batch = [work.configure(job_id=f"j{n}").prepare(n) for n in range(ACROSS_LIMITS)]
    assert work.enqueue_many(batch) == [f"j{n}" for n in range(ACROSS_LIMITS)]
    assert nonzero(queue.count_by_state("bulk")) == {"ready": ACROSS_LIMITS}
    for n in (0, 1, 5_460, 5_461, 5_462, 10_921, 10_922, 10_923, ACROSS_LIMITS - 1):
        expected = -1 if n in already else n
        assert queue.get_job(f"j{n}")["payload"] == f'{{"args":[{expected}],"kwargs":{{}}}}'
    flags = queue.enqueue_many([new_job(f"j{n}") for n in range(ACROSS_LIMITS)])
    assert flags == [False] * ACROSS_LIMITS


def test_an_idle_worker_wakes_for_a_batch(request: pytest.FixtureRequest, queue: Any) -> None:
    if isinstance(queue, SqlQueue) and queue.dialect == "postgresql":
        # Another queue object, as another process would have: woken by the NOTIFY alone.
        producer: Any = SqlQueue(queue.url.render_as_string(hide_password=False))
        request.addfinalizer(producer.close)
    else:
        producer = queue  # SQLite and memory wake waiters of the same object
    if isinstance(queue, SqlQueue) and queue.dialect == "postgresql":
        queue.wait_for_jobs(["bulk"], 5)  # returns once the listener is connected
    woke: list[float] = []
    started = threading.Event()

    def wait() -> None:
        queue.wait_for_jobs(["bulk"], 0.01)  # from here on, this thread hears every wake-up
        started.set()
        queue.wait_for_jobs(["bulk"], 30.0)
        woke.append(time.monotonic())

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    assert started.wait(10)
    sent = time.monotonic()
    producer.enqueue_many([new_job("w1"), new_job("w2", queue="other")])
    waiter.join(20)
    assert woke, "the batch did not wake the waiter"
    assert woke[0] - sent < 10.0  # well before its 30 s wait would have ended


def test_payloads_are_stored_exactly_as_encoded(queue: Any) -> None:
    app = make_app(queue)
    awkward = ["é ü 😀", "nul \x00 byte", "tab\tnew\nline", 'quote " back \\ slash', "\\u0000"]
    ids = app.tasks["other"].enqueue_many([((text,), {}) for text in awkward])
    single = app.tasks["other"].enqueue(awkward[2])
    assert queue.get_job(ids[2])["payload"] == queue.get_job(single)["payload"]
    for job_id, text in zip(ids, awkward, strict=True):
        assert queue.get_job(job_id)["payload"] == encode_payload("other", [text], {}, 10_000)
