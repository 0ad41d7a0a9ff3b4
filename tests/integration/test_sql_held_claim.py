"""The claim sent with the driver on a connection held between claims fails as it did before.

The claim (acks folded in) skips SQLAlchemy's execution path, not its error handling. PostgreSQL:
a connection the server killed is replaced and the claim sent once more; a database that is down
is ``StoreUnavailable`` (what the worker's outage handling expects), and claims work again once
it is back. SQLite: a claim behind another writer waits for the busy timeout, then fails with
its transaction rolled back (the acks unwritten). A folded ack is fenced on this path too
(tests/integration/test_sql_ack_and_claim.py runs on it: no statement events are listened to).
"""

from __future__ import annotations

import logging
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from tests.support.servers import PostgresServer, restart_postgres, start_postgres
from tests.support.suite import start_or_skip
from workerkit.engines.base import NewJob
from workerkit.engines.sql import SqlQueue, upgrade
from workerkit.engines.sql.claim import Ack
from workerkit.errors import StoreUnavailable

QUEUES = ["default"]


def _enqueue(queue: SqlQueue, count: int) -> list[str]:
    ids = [f"job-{i}-{uuid.uuid4().hex[:6]}" for i in range(count)]
    for i, job_id in enumerate(ids):
        assert queue.enqueue(NewJob(job_id, "t", "default", "[[], {}]", 3, time.time() - 10 + i))
    return ids


def _kill_sessions(url: str) -> int:
    conninfo = sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def queue(postgres_url: str) -> Iterator[SqlQueue]:
    made = SqlQueue(postgres_url)
    try:
        yield made
    finally:
        made.close()


def test_a_claim_whose_connection_the_server_killed_is_sent_again_on_a_new_one(
    queue: SqlQueue, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    ids = _enqueue(queue, 3)
    (first,) = queue.claim(QUEUES, "w", 1)
    assert first.job_id == ids[0]
    assert _kill_sessions(postgres_url) >= 1  # the held connection among them

    with caplog.at_level(logging.INFO, logger="workerkit.engines.sql.queue"):
        matched, claimed = queue.ack_and_claim(
            [Ack(first.job_id, first.token, "1")], QUEUES, "w", 1
        )

    assert matched == [True]
    assert [d.job_id for d in claimed] == [ids[1]]
    assert any(getattr(r, "event", "") == "store_reconnect" for r in caplog.records)
    job = queue.get_job(first.job_id)
    assert job is not None
    assert (job["state"], job["result"]) == ("succeeded", 1)


def test_a_claim_with_the_database_down_is_store_unavailable_until_it_is_back() -> None:
    server: PostgresServer = start_or_skip(start_postgres)
    queue: SqlQueue | None = None
    try:
        upgrade(server.url())
        queue = SqlQueue(server.url())
        ids = _enqueue(queue, 3)
        (first,) = queue.claim(QUEUES, "w", 1)
        server.process.stop()

        with pytest.raises(StoreUnavailable):
            queue.ack_and_claim([Ack(first.job_id, first.token, "1")], QUEUES, "w", 1)
        with pytest.raises(StoreUnavailable):
            queue.claim(QUEUES, "w", 1)

        server = restart_postgres(server)
        matched, claimed = queue.ack_and_claim(
            [Ack(first.job_id, first.token, "1")], QUEUES, "w", 1
        )
        assert matched == [True]
        assert [d.job_id for d in claimed] == [ids[1]]
    finally:
        if queue is not None:
            queue.close()
        server.stop()


def test_sqlite_a_claim_behind_another_writer_waits_then_fails_with_its_acks_unwritten(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}?timeout=0.5"
    upgrade(url)
    queue = SqlQueue(url)
    try:
        ids = _enqueue(queue, 3)
        (first,) = queue.claim(QUEUES, "w", 1)
        other = sqlite3.connect(str(tmp_path / "q.db"), isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another writer holds the write lock
        try:
            with pytest.raises(StoreUnavailable, match="locked"):
                queue.ack_and_claim([Ack(first.job_id, first.token, "1")], QUEUES, "w", 1)
            job = queue.get_job(first.job_id)
            assert job is not None
            assert job["state"] == "running"  # the ack was not written (nor anything else)
        finally:
            other.execute("ROLLBACK")
            other.close()
        matched, claimed = queue.ack_and_claim(
            [Ack(first.job_id, first.token, "1")], QUEUES, "w", 1
        )
        assert matched == [True]
        assert [d.job_id for d in claimed] == [ids[1]]
    finally:
        queue.close()
