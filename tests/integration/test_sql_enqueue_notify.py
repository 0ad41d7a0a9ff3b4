"""An enqueue on PostgreSQL: one statement in autocommit, its NOTIFY only for a job that went in.

The latency of a job to an idle worker starts with the enqueue's round trips (issue 16, item 4):
the INSERT carries the ``pg_notify`` in its RETURNING, so the job and its wake-up commit
together, in one round trip. The statement goes through the driver on a connection the queue
keeps for enqueues (the pool when another thread holds it, or when statements are traced).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa

from tests.support.pg_sessions import kill_sessions
from workerkit.engines.base import NewJob
from workerkit.engines.sql import SqlQueue
from workerkit.settings import Settings

__all__ = ()


def new_job(job_id: str, queue: str) -> NewJob:
    return NewJob(
        job_id=job_id, task="work", queue=queue, max_attempts=3, payload='{"args":[],"kwargs":{}}'
    )


@pytest.fixture
def queue(postgres_url: str) -> Iterator[SqlQueue]:
    opened = SqlQueue(postgres_url, settings=Settings(database_url=postgres_url))
    try:
        yield opened
    finally:
        opened.close()


def test_an_enqueue_is_one_statement_and_notifies_only_for_a_new_job(
    postgres_url: str, queue: SqlQueue
) -> None:
    conninfo = sa.make_url(postgres_url).set(drivername="postgresql")
    statements: list[str] = []
    commits: list[object] = []

    def on_execute(conn: object, cursor: object, statement: str, *rest: object) -> None:
        statements.append(statement)

    sa.event.listen(queue.engine, "before_cursor_execute", on_execute)
    sa.event.listen(queue.engine, "commit", commits.append)
    with psycopg.connect(conninfo.render_as_string(hide_password=False), autocommit=True) as ear:
        ear.execute("LISTEN workerkit_jobs")

        assert queue.enqueue(new_job("job-1", "first")) is True
        assert len(statements) == 1, statements  # was INSERT, then SELECT pg_notify
        assert "pg_notify" in statements[0]
        assert commits == []  # autocommit: no BEGIN ... COMMIT around it
        received = list(ear.notifies(timeout=10, stop_after=1))
        assert [(n.channel, n.payload) for n in received] == [("workerkit_jobs", "first")]

        # A duplicate id goes in nowhere and wakes nobody: the next notification is the next
        # new job's (notifications arrive in commit order).
        assert queue.enqueue(new_job("job-1", "first")) is False
        assert queue.enqueue(new_job("job-2", "second")) is True
        received = list(ear.notifies(timeout=10, stop_after=1))
        assert [n.payload for n in received] == ["second"]
    assert queue.count_by_state("first").get("ready") == 1
    assert queue.count_by_state("second").get("ready") == 1


def test_enqueues_from_many_threads_each_go_in_once_and_each_wakes_a_listener(
    postgres_url: str, queue: SqlQueue
) -> None:
    # One thread at a time has the held connection; the others go through the pool.
    conninfo = sa.make_url(postgres_url).set(drivername="postgresql")
    threads, per_thread = 8, 25
    results: list[bool] = []
    lock = threading.Lock()

    def produce(index: int) -> None:
        for n in range(per_thread):
            went_in = queue.enqueue(new_job(f"t{index}-{n}", "many"))
            again = queue.enqueue(new_job(f"t{index}-{n}", "many"))  # a duplicate: refused
            with lock:
                results.extend([went_in, not again])

    with psycopg.connect(conninfo.render_as_string(hide_password=False), autocommit=True) as ear:
        ear.execute("LISTEN workerkit_jobs")
        workers = [threading.Thread(target=produce, args=(i,)) for i in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=60)
        received = list(ear.notifies(timeout=10, stop_after=threads * per_thread))
    assert len(results) == 2 * threads * per_thread
    assert all(results)
    assert [n.payload for n in received] == ["many"] * (threads * per_thread)
    assert queue.count_by_state("many")["ready"] == threads * per_thread


def test_an_enqueue_after_the_database_dropped_its_connection_reconnects(
    postgres_url: str, queue: SqlQueue
) -> None:
    # As the pool does at checkout: a connection idle for a second is pinged first, and a dead
    # one replaced, so the enqueue that follows a database restart goes in.
    assert queue.enqueue(new_job("before", "outage")) is True
    assert kill_sessions(postgres_url) >= 1  # the enqueue's held connection among them
    time.sleep(1.1)  # past PING_AFTER_IDLE: what a restart's downtime takes at least
    assert queue.enqueue(new_job("after", "outage")) is True
    assert queue.count_by_state("outage")["ready"] == 2
