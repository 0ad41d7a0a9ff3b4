"""Transactional checkpoints and the backfill example against real databases.

The backfill runs under the native worker in this process, interrupted over and over: stop
requests (it releases itself between batches), release commands (its thread is interrupted
wherever it is, maybe mid-transaction) and a lease taken away mid-batch. Every row must end
updated exactly once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from examples.backfill import app as backfill_app
from examples.backfill.seed import accounts, create_accounts, times_backfilled
from tests.support.native_worker import RecordingEvents, wait_until
from workerkit.app import App
from workerkit.engines.base import Delivery, NewJob
from workerkit.engines.sql import SqlQueue, upgrade
from workerkit.engines.sql.worker import NativeWorker
from workerkit.errors import ConfigurationError, LeaseLost
from workerkit.events import JobFinished
from workerkit.job import JobContext
from workerkit.settings import Settings

JOB_ID = "backfill"


class Backfill:
    """The example's task on a test app, a queue on ``url`` and workers started on demand."""

    def __init__(self, url: str) -> None:
        self.settings = Settings().replace(
            database_url=url, poll_interval=0.05, checkpoint_interval=0.05
        )
        self.queue = SqlQueue(url, settings=self.settings)
        self.app = App(url, backend=self.queue, settings=self.settings)
        self.task = self.app.task(name=backfill_app.TASK, timeout=60, max_attempts=100)(
            backfill_app.backfill_email_normalized.fn
        )
        self.engine = self.queue.engine
        self.events = RecordingEvents()
        self.workers: list[tuple[NativeWorker, threading.Thread]] = []

    def seed(self, rows: int, batch_size: int, pause: float = 0.0) -> None:
        create_accounts(self.engine, rows)
        self.task.configure(job_id=JOB_ID).enqueue(batch_size=batch_size, pause=pause)

    def start(self) -> NativeWorker:
        worker = NativeWorker(self.app, self.settings, events=self.events)  # type: ignore[arg-type]
        thread = threading.Thread(
            target=worker.run, kwargs={"install_signal_handlers": False}, daemon=True
        )
        thread.start()
        self.workers.append((worker, thread))
        return worker

    def join(self, timeout: float = 15.0) -> None:
        _, thread = self.workers[-1]
        thread.join(timeout)
        assert not thread.is_alive(), "worker did not exit"

    def job(self) -> dict[str, Any]:
        job = self.queue.get_job(JOB_ID)
        assert job is not None
        return job

    def cursor(self) -> int:
        return int(self.job()["checkpoint"] or 0)

    def outcomes(self) -> list[str]:
        return [e.outcome for e in self.events.of_type(JobFinished)]

    def close(self) -> None:
        for worker, thread in self.workers:
            if thread.is_alive():
                worker.request_release()
                thread.join(5)
        self.queue.close()


@pytest.fixture
def backfill(postgres_url: str) -> Iterator[Backfill]:
    running = Backfill(postgres_url)
    try:
        yield running
    finally:
        running.close()


@pytest.fixture
def migrated_url(database_url: str) -> str:
    upgrade(database_url)  # PostgreSQL's is migrated already; SQLite's is a new file
    return database_url


@pytest.fixture
def any_backfill(migrated_url: str) -> Iterator[Backfill]:
    running = Backfill(migrated_url)
    try:
        yield running
    finally:
        running.close()


def test_backfill_updates_every_row_exactly_once_across_stops_and_interrupts(
    any_backfill: Backfill,
) -> None:
    backfill = any_backfill
    rows = 3000
    backfill.seed(rows, batch_size=40, pause=0.005)
    rounds = 0
    while backfill.job()["state"] != "succeeded":
        worker = backfill.start()
        before = backfill.cursor()

        def moved(before: int = before) -> bool:
            return backfill.cursor() >= before + 200 or backfill.job()["state"] == "succeeded"

        wait_until(moved, timeout=20)
        if backfill.job()["state"] == "succeeded":
            worker.stop_fetching()
        elif rounds % 2 == 0:
            # The drain deadline: the job saves and releases itself between two batches.
            backfill.events.command("request_stop")
        else:
            # The release deadline: the job's thread is interrupted wherever it is, maybe in
            # the middle of a batch's transaction, after the delivery was released.
            worker.request_release()
        backfill.join()
        rounds += 1
        assert rounds < 40, "the backfill is not making progress"
    assert rounds >= 4
    assert times_backfilled(backfill.engine) == {1: rows}
    assert "released" in backfill.outcomes()
    assert backfill.job()["checkpoint"] is None  # dropped when the job completed


def _waiting_on_a_row_lock(engine: sa.Engine) -> bool:
    with engine.connect() as conn:
        waiting = conn.scalar(
            sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query ILIKE 'UPDATE accounts%'"
            )
        )
    return bool(waiting)


def test_a_worker_that_lost_its_lease_mid_batch_rolls_the_batch_back(backfill: Backfill) -> None:
    backfill.seed(400, batch_size=100)
    with backfill.engine.connect() as blocker:
        # Hold row 250: the worker does batches 1-100 and 101-200, then its UPDATE of 201-300
        # waits on this lock, mid-transaction.
        blocker.execute(sa.select(accounts.c.id).where(accounts.c.id == 250).with_for_update())
        backfill.start()
        wait_until(lambda: _waiting_on_a_row_lock(backfill.engine), timeout=20)
        assert backfill.cursor() == 200
        # Meanwhile the lease "expired" and another worker claimed the job (a new token).
        with backfill.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "UPDATE workerkit_jobs SET lease_token = 'thief', worker_id = 'thief' "
                    "WHERE id = :id"
                ),
                {"id": JOB_ID},
            )
        blocker.rollback()  # the stalled UPDATE goes on; its fenced checkpoint write cannot
    wait_until(lambda: "lease_lost" in backfill.outcomes(), timeout=20)
    assert times_backfilled(backfill.engine) == {1: 200, 0: 200}  # rows 201-300 rolled back
    assert backfill.cursor() == 200

    # The thief gives the job back; the worker claims it again and finishes it.
    assert backfill.queue.release_ref({"job_id": JOB_ID, "token": "thief"})
    wait_until(lambda: backfill.job()["state"] == "succeeded", timeout=20)
    assert times_backfilled(backfill.engine) == {1: 400}


# --- the transactional checkpoint itself, on SQLite and PostgreSQL -----------------------


@pytest.fixture
def claimed(migrated_url: str) -> Iterator[tuple[SqlQueue, Delivery, JobContext]]:
    queue = SqlQueue(migrated_url, settings=Settings(database_url=migrated_url))
    with queue.engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE scratch (n INTEGER NOT NULL)"))
    queue.enqueue(NewJob("j", "t", "default", '{"args":[],"kwargs":{}}', 3))
    [delivery] = queue.claim(["default"], "w1", 1)
    context = JobContext(
        job_id="j",
        task="t",
        queue="default",
        attempt=1,
        save=JobContext.delivery_sink(queue, delivery),
    )
    try:
        yield queue, delivery, context
    finally:
        queue.close()


def _scratch(queue: SqlQueue) -> list[int]:
    with queue.engine.connect() as conn:
        return list(conn.scalars(sa.text("SELECT n FROM scratch ORDER BY n")))


def _checkpoint(queue: SqlQueue) -> Any:
    job = queue.get_job("j")
    assert job is not None
    return job["checkpoint"]


def test_transactional_checkpoint_commits_and_rolls_back_with_the_callers_writes(
    claimed: tuple[SqlQueue, Delivery, JobContext],
) -> None:
    queue, _, job = claimed
    insert = sa.text("INSERT INTO scratch (n) VALUES (:n)")
    with job.transaction() as conn:
        conn.execute(insert, {"n": 1})
        assert job.save_checkpoint({"n": 1}, connection=conn) is True
        assert _checkpoint(queue) is None  # not visible before the commit
    assert (_scratch(queue), _checkpoint(queue)) == ([1], {"n": 1})

    def failing_batch() -> None:
        with job.transaction() as conn:
            conn.execute(insert, {"n": 2})
            job.save_checkpoint({"n": 2}, connection=conn)
            raise RuntimeError("the batch failed after writing its cursor")

    with pytest.raises(RuntimeError):
        failing_batch()
    assert (_scratch(queue), _checkpoint(queue)) == ([1], {"n": 1})  # both rolled back


def test_transactional_checkpoint_of_a_lost_lease_raises_and_the_writes_roll_back(
    claimed: tuple[SqlQueue, Delivery, JobContext],
) -> None:
    queue, delivery, job = claimed
    queue.release(delivery)  # the attempt's lease is gone (released, then claimed by another)
    [other] = queue.claim(["default"], "w2", 1)

    def batch() -> None:
        with job.transaction() as conn:
            conn.execute(sa.text("INSERT INTO scratch (n) VALUES (7)"))
            job.save_checkpoint({"n": 7}, connection=conn)

    with pytest.raises(LeaseLost):
        batch()
    assert _scratch(queue) == []
    assert _checkpoint(queue) is None
    assert job.lease_lost
    assert job.stop_requested
    queue.save_checkpoint(other, {"n": 8})  # the new owner's writes still count


def test_transactional_checkpoint_refuses_a_connection_it_cannot_commit_with(
    claimed: tuple[SqlQueue, Delivery, JobContext],
) -> None:
    queue, delivery, _ = claimed
    with queue.engine.connect() as conn, pytest.raises(ConfigurationError, match="transaction"):
        queue.save_checkpoint(delivery, 1, connection=conn)
    with pytest.raises(ConfigurationError, match="SQLAlchemy Connection"):
        queue.save_checkpoint(delivery, 1, connection=object())  # type: ignore[arg-type]
