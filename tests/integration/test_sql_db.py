"""The SQL store around the queue: migrations, the schema check, engines, maintenance."""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from tests.support import servers
from workerkit.engines.base import NewJob
from workerkit.engines.sql import SqlQueue
from workerkit.engines.sql.db import (
    ForkSafeEngine,
    check_schema,
    create_engine_for,
    current_revision,
    head_revision,
    upgrade,
)
from workerkit.engines.sql.schema import VERSION_TABLE, full_metadata
from workerkit.errors import ConfigurationError, PayloadError, StoreUnavailable
from workerkit.settings import Settings


@pytest.fixture
def migrated_url(database_url: str) -> str:
    upgrade(database_url)
    return database_url


@pytest.fixture
def queue(migrated_url: str) -> Iterator[SqlQueue]:
    queue = SqlQueue(migrated_url, settings=Settings())
    try:
        yield queue
    finally:
        queue.close()


def test_migrations_create_exactly_the_tables_the_code_uses(migrated_url: str) -> None:
    engine = create_engine_for(migrated_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"version_table": VERSION_TABLE, "compare_type": True}
            )
            assert compare_metadata(context, full_metadata()) == []
    finally:
        engine.dispose()


def test_upgrade_is_idempotent_and_check_schema_reports_head(blank_database_url: str) -> None:
    database_url = blank_database_url
    assert current_revision(database_url) is None
    assert not check_schema(database_url).ok

    assert upgrade(database_url) == head_revision()
    assert upgrade(database_url) == head_revision()

    assert current_revision(database_url) == head_revision()
    health = check_schema(database_url)
    assert health.ok, health.reason


def test_a_newer_schema_keeps_old_workers_ready(migrated_url: str) -> None:
    # A rolling deploy: the new release's migration ran first; this (old) worker must stay ready.
    engine = create_engine_for(migrated_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version_num = 'f00dface'"))  # noqa: S608 - a constant table name
    finally:
        engine.dispose()
    health = check_schema(migrated_url)
    assert health.ok
    assert "newer" in health.reason


def test_unreachable_database_is_reported_without_its_password() -> None:
    url = f"postgresql+psycopg://worker:s3cr3t-pw@127.0.0.1:{servers.free_port()}/jobs"

    health = check_schema(url)
    assert not health.ok
    assert "unreachable" in health.reason
    assert "s3cr3t-pw" not in health.reason

    queue = SqlQueue(url, settings=Settings())
    try:
        queue_health = queue.health()
        assert not queue_health.ok
        assert "s3cr3t-pw" not in queue_health.reason
        with pytest.raises(StoreUnavailable) as raised:
            queue.claim(["default"], "w", 1)
        assert "s3cr3t-pw" not in str(raised.value)
        assert "s3cr3t-pw" not in repr(queue)
    finally:
        queue.close()
    with pytest.raises(StoreUnavailable) as upgrade_failed:
        upgrade(url)
    assert "s3cr3t-pw" not in str(upgrade_failed.value)


def test_sqlite_with_several_replicas_is_refused_with_the_fix(sqlite_url: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        SqlQueue(sqlite_url, settings=Settings(replicas=3))
    message = str(raised.value)
    assert "replicas=3" in message
    assert "database_url" in message
    assert "PostgreSQL" in message


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_in_memory_sqlite_is_refused(url: str) -> None:
    with pytest.raises(ConfigurationError, match="InMemoryQueue"):
        SqlQueue(url)


def test_sqlite_runs_in_wal_mode(sqlite_url: str) -> None:
    engine = create_engine_for(sqlite_url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        engine.dispose()


@pytest.mark.parametrize(("umask", "mode"), [(0o002, 0o664), (0o077, 0o600), (0o022, 0o644)])
def test_a_new_sqlite_file_gets_its_mode_from_the_umask(
    tmp_path: Path, umask: int, mode: int
) -> None:
    path = tmp_path / "queue.sqlite3"
    url = f"sqlite:///{path}"
    previous = os.umask(umask)
    try:
        upgrade(url)
        queue = SqlQueue(url, settings=Settings(database_url=url))
        try:
            queue.enqueue(NewJob("j", "t", "default", "[]", max_attempts=3))
            files = [path, tmp_path / "queue.sqlite3-wal", tmp_path / "queue.sqlite3-shm"]
            modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in files}
        finally:
            queue.close()
    finally:
        os.umask(previous)
    assert modes == dict.fromkeys(modes, mode), modes  # SQLite's own default: 0644 always


def test_purge_finished_deletes_old_succeeded_jobs_and_failed_ones_on_request(
    queue: SqlQueue,
) -> None:
    for job_id in ("done", "dead", "waiting"):
        queue.enqueue(NewJob(job_id, "t", "default", "{}", max_attempts=1))
    by_id = {d.job_id: d for d in queue.claim(["default"], "w", 2)}
    queue.ack(by_id["done"], None)
    queue.fail(by_id["dead"], "boom")
    time.sleep(0.01)  # SQLite's clock has millisecond steps

    assert queue.purge_finished(3600) == 0
    assert queue.purge_finished(0) == 1
    assert queue.get_job("done") is None
    assert queue.get_job("dead") is not None
    assert queue.purge_finished(0, include_failed=True) == 1
    assert queue.count_by_state() == {"ready": 1, "running": 0, "succeeded": 0, "failed": 0}


def test_checkpoint_that_is_not_json_is_refused_before_the_write(queue: SqlQueue) -> None:
    queue.enqueue(NewJob("j", "t", "default", "{}", max_attempts=1))
    [delivery] = queue.claim(["default"], "w", 1)
    with pytest.raises(PayloadError, match="checkpoint"):
        queue.save_checkpoint(delivery, {"when": object()})
    with pytest.raises(PayloadError, match="result"):
        queue.ack(delivery, float("nan"))
    assert queue.get_job("j") is not None
    assert queue.count_by_state()["running"] == 1


def test_database_clock_drives_lease_expiry(queue: SqlQueue) -> None:
    queue.enqueue(NewJob("j", "t", "default", "{}", max_attempts=1))
    [delivery] = queue.claim(["default"], "w", 1)
    assert delivery.lease_expires_at is not None
    assert delivery.enqueued_at is not None
    # V = 30 s by default, measured from the database's now at the claim.
    assert 29.0 <= delivery.lease_expires_at - delivery.enqueued_at <= 40.0


def _session_id(queue: SqlQueue) -> int | None:
    """The PostgreSQL backend serving the queue's next pooled connection (None on SQLite)."""
    with queue.engine.connect() as conn:
        if conn.dialect.name != "postgresql":
            conn.exec_driver_sql("SELECT 1")
            return None
        return int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())


def test_a_forked_child_opens_its_own_connections_and_leaves_the_parents(
    queue: SqlQueue,
) -> None:
    queue.enqueue(NewJob("j", "t", "default", "{}", max_attempts=1))
    parent_session = _session_id(queue)  # the pool now holds a connection of the parent's
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            child_session = _session_id(queue)
            shares = parent_session is not None and child_session == parent_session
            job = queue.get_job("j")
            code = 0 if job is not None and not shares else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's pooled connection was left open by the child and still serves it.
    assert _session_id(queue) == parent_session
    assert queue.count_by_state()["ready"] == 1


def test_the_old_store_paths_still_migrate_and_check() -> None:
    import workerkit.store

    assert workerkit.store.upgrade is upgrade
    assert workerkit.store.check_schema is check_schema


def health_while_locked(url: str, hold: float) -> list[tuple[bool, str]]:
    """queue.health() again and again while a job's own transaction holds the write lock."""
    upgrade(url)
    queue = SqlQueue(url, settings=Settings())
    try:
        assert queue.health().ok
        taken, release = threading.Event(), threading.Event()

        def job() -> None:
            with queue.transaction():  # BEGIN IMMEDIATE: holds the write lock until it ends
                taken.set()
                release.wait(hold)

        holder = threading.Thread(target=job)
        holder.start()
        taken.wait(5)
        seen = []
        while holder.is_alive():
            health = queue.health()
            seen.append((health.ok, health.reason))
        holder.join()
        after = queue.health()
        assert after.ok, after.reason
        return seen
    finally:
        queue.close()


def test_a_job_holding_the_sqlite_write_lock_for_seconds_keeps_the_store_ready(
    sqlite_url: str,
) -> None:
    seen = health_while_locked(sqlite_url, hold=2.5)
    assert seen
    assert all(ok for ok, _ in seen), seen
    assert any("held by a transaction" in reason for _, reason in seen), seen


def test_the_sqlite_write_lock_held_past_the_busy_timeout_is_not_ready(sqlite_url: str) -> None:
    seen = health_while_locked(f"{sqlite_url}?timeout=2", hold=4.0)
    assert any(not ok and "locked" in reason for ok, reason in seen), seen


def test_a_sqlite_claim_waiting_for_the_lock_asks_the_claimer_again_before_writing(
    sqlite_url: str,
) -> None:
    """A claim blocked in SQLite's busy handler must not win the lock from a settle once the
    worker has paused its claims meanwhile: the gate is asked with the lock held."""
    upgrade(sqlite_url)
    queue = SqlQueue(sqlite_url, settings=Settings())
    try:
        queue.enqueue(
            NewJob(job_id="j1", task="t", queue="default", payload="[[], {}]", max_attempts=3)
        )
        allowed = threading.Event()
        allowed.set()
        queue.claim_gate = allowed.is_set
        taken, release = threading.Event(), threading.Event()

        def holder() -> None:
            with queue.transaction():  # the write lock, as a settle about to land would hold
                taken.set()
                release.wait(10)

        lock = threading.Thread(target=holder)
        lock.start()
        taken.wait(5)
        claimed: list[object] = []
        claimer = threading.Thread(target=lambda: claimed.extend(queue.claim(["default"], "w", 1)))
        claimer.start()
        # Likely in the busy handler by now; either way it cannot write before the release,
        # and it must see the pause that began before it got the lock.
        time.sleep(0.3)
        allowed.clear()  # the worker paused its claims meanwhile
        release.set()
        lock.join(5)
        claimer.join(10)
        assert claimed == []
        assert queue.get_job("j1")["state"] == "ready"  # type: ignore[index]
        allowed.set()
        assert [d.job_id for d in queue.claim(["default"], "w", 1)] == ["j1"]
    finally:
        queue.close()


class _CountedForks(ForkSafeEngine):
    """A store whose child-side reset is slow: the threads that use the engine first in the
    child all get there while the first one is still resetting."""

    def __init__(self, url: str) -> None:
        self._adopt_engine(sa.create_engine(url))
        self.resets = 0
        self.reset_done = False

    def _after_fork(self) -> None:
        self.resets += 1
        time.sleep(0.2)
        self.reset_done = True


def test_threads_of_a_forked_child_using_the_engine_first_at_once_reset_it_once(
    tmp_path: Path,
) -> None:
    """One reset, and no thread gets the engine before it is done (it would still hold the
    parent's state: a held connection, a listener)."""
    store = _CountedForks(f"sqlite:///{tmp_path / 'fork.sqlite3'}")
    with store.engine.connect() as conn:  # the parent's pooled connection
        conn.exec_driver_sql("SELECT 1")
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            start = threading.Barrier(4)
            saw_reset_done: list[bool] = []

            def first_use() -> None:
                start.wait()
                engine = store.engine
                saw_reset_done.append(store.reset_done)
                with engine.connect() as conn:
                    conn.exec_driver_sql("SELECT 1")

            threads = [threading.Thread(target=first_use) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            early = saw_reset_done.count(False)
            code = 0 if store.resets == 1 and not early else 10 * store.resets + early
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    # Exit 10 * resets + threads that got the engine before the reset was done.
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.resets == 0
