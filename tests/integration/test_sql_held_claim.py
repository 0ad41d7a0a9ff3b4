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
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support.pausing_proxy import PausingProxy
from tests.support.pg_sessions import kill_sessions
from tests.support.servers import PostgresServer, restart_postgres, start_postgres
from tests.support.suite import start_or_skip
from workerkit.engines.base import NewJob
from workerkit.engines.sql import SqlQueue, upgrade
from workerkit.engines.sql.claim import Ack
from workerkit.engines.sql.db import PING_AFTER_IDLE
from workerkit.engines.sql.held import HeldConnection
from workerkit.engines.sql.outage import ClaimPause
from workerkit.errors import StoreUnavailable

QUEUES = ["default"]


def _enqueue(queue: SqlQueue, count: int) -> list[str]:
    ids = [f"job-{i}-{uuid.uuid4().hex[:6]}" for i in range(count)]
    for i, job_id in enumerate(ids):
        assert queue.enqueue(NewJob(job_id, "t", "default", "[[], {}]", 3, time.time() - 10 + i))
    return ids


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
    assert kill_sessions(postgres_url) >= 1  # the held connection among them

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


def test_a_claim_sent_into_a_network_partition_is_held_back_by_the_claim_pause(
    postgres_url: str,
) -> None:
    """The held connection is pinged after sitting idle, as the pool's are: the ping waits out
    the partition, so the claim gate (issue 13) is asked after it and sees the outage. Without
    the ping the claim itself waited in the network and, once it healed, took leases that had
    expired meanwhile, with their owners' acks still being retried."""
    url = sa.make_url(postgres_url)
    with PausingProxy(int(url.port or 5432)) as proxy:
        queue = SqlQueue(url.set(port=proxy.port).render_as_string(hide_password=False))
        direct = SqlQueue(postgres_url)
        try:
            assert queue.claim(QUEUES, "w", 1) == []  # the held connection, then idle
            (job_id,) = _enqueue(direct, 1)
            pause = ClaimPause(grace=60.0, threshold=1.0)
            sent = time.monotonic() + 60.0  # set as the claim starts
            queue.claim_gate = lambda: pause.allows(sent)
            time.sleep(PING_AFTER_IDLE + 0.2)  # idle long enough for a pool to ping it
            claimed: list[list[str]] = []
            proxy.partition()
            sent = time.monotonic()
            claiming = threading.Thread(
                target=lambda: claimed.append([d.job_id for d in queue.claim(QUEUES, "w", 1)])
            )
            claiming.start()
            assert proxy.held.wait(10)  # the claim (or its ping) waits in the partition
            time.sleep(pause.threshold + 0.5)  # an outage of at least the threshold
            proxy.heal()
            claiming.join(30)

            assert claimed == [[]]  # held back: nothing claimed
            assert pause.left() > 0
            job = direct.get_job(job_id)
            assert job is not None
            assert job["state"] == "ready"
        finally:
            queue.close()
            direct.close()


class _RollbackFails(sqlite3.Connection):
    """A real sqlite3 connection whose rollback fails while ``fail`` is set (as a rollback can,
    e.g. "cannot rollback - SQL statements in progress"), leaving its transaction open."""

    fail = False

    def rollback(self) -> None:
        if _RollbackFails.fail:
            raise sqlite3.OperationalError("cannot rollback - SQL statements in progress")
        super().rollback()


def test_sqlite_a_held_connection_left_in_its_transaction_is_replaced(tmp_path: Path) -> None:
    engine = sa.create_engine(
        f"sqlite:///{tmp_path / 'held.db'}", connect_args={"factory": _RollbackFails}
    )
    held = HeldConnection(lambda: engine)
    try:
        with held.connection() as execute:
            assert execute is not None
            execute(sa.text("CREATE TABLE t (x INTEGER)"), {})
        _RollbackFails.fail = True

        def fail_mid_way() -> None:
            with held.connection() as execute:
                assert execute is not None
                execute(sa.text("INSERT INTO t VALUES (1)"), {})
                raise RuntimeError("the claim failed mid-way")

        with pytest.raises(RuntimeError):
            fail_mid_way()
        _RollbackFails.fail = False

        # Before: every later BEGIN IMMEDIATE failed "cannot start a transaction within a
        # transaction", and the worker stayed unready for good.
        with held.connection() as execute:
            assert execute is not None
            assert execute(sa.text("SELECT count(*) AS n FROM t"), {})[0][0].n == 0
    finally:
        _RollbackFails.fail = False
        held.close()
        engine.dispose()


def test_claims_whose_queues_and_acks_change_in_number_take_and_settle_the_right_jobs(
    database_url: str,
) -> None:
    """The held connection remembers each statement's rendering per shape of its parameters
    (how many queues, how many acks, their types): one shape's rendering must never serve
    another's. Claims alternate between one and two queues, one and three acks, and a stale
    token among fresh ones; every job is taken once, in order, and each ack matches as it
    should."""
    upgrade(database_url)
    queue = SqlQueue(database_url)
    try:
        for i, name in enumerate(["a", "b", "a", "b", "a", "b", "a", "b"]):
            queue.enqueue(NewJob(f"{name}{i}", "t", name, "[[], {}]", 3, time.time() - 10 + i))
        (a0,) = queue.claim(["a"], "w", 1)
        assert a0.job_id == "a0"
        matched, taken = queue.ack_and_claim([Ack(a0.job_id, a0.token, "1")], ["a", "b"], "w", 3)
        assert matched == [True]
        assert [d.job_id for d in taken] == ["b1", "a2", "b3"]
        stale = Ack(taken[0].job_id, "not-its-token", "2")
        acks = [stale, *(Ack(d.job_id, d.token, "3") for d in taken[1:])]
        matched, more = queue.ack_and_claim(acks, ["b"], "w", 1)
        assert matched == [False, True, True]
        assert [d.job_id for d in more] == ["b5"]
        matched, last = queue.ack_and_claim(
            [Ack(more[0].job_id, more[0].token, "4")], ["a"], "w", 2
        )
        assert matched == [True]
        assert [d.job_id for d in last] == ["a4", "a6"]
        states = {
            job_id: (queue.get_job(job_id) or {}).get("state")
            for job_id in ["a0", "b1", "a2", "b3", "b5", "a4"]
        }
        assert states == {
            "a0": "succeeded",
            "b1": "running",  # its ack's token was stale: nothing written
            "a2": "succeeded",
            "b3": "succeeded",
            "b5": "succeeded",
            "a4": "running",
        }
    finally:
        queue.close()
