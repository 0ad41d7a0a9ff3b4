"""Deleting old rows on real SQLite and PostgreSQL: ``workerkit db purge`` and the pruner.

Only finished jobs older than the cutoff go, in the states asked for (failed ones only when
asked); ready and running rows never go, even with an old ``finished_at``; each batch is its own
DELETE; a dry run counts and deletes nothing; expired idempotency keys go, live ones stay. The
workers' pruner: one turn per interval among any number of callers; retention 0 turns it off.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from workerkit.cli import main
from workerkit.engines.base import NewJob
from workerkit.engines.sql import SqlQueue, create_engine_for, upgrade
from workerkit.engines.sql.retention import prune_turn, pruner, purge, purge_jobs, take_turn
from workerkit.engines.sql.schema import idempotency_keys, jobs
from workerkit.settings import ENV_PREFIX, Settings

OLD = 7200.0  # seconds an "old" row is moved back
CUTOFF = 3600.0


@pytest.fixture
def queue(database_url: str) -> Iterator[SqlQueue]:
    upgrade(database_url)
    queue = SqlQueue(database_url, settings=Settings())
    try:
        yield queue
    finally:
        queue.close()


@pytest.fixture
def engine(queue: SqlQueue) -> Iterator[sa.Engine]:
    engine = create_engine_for(queue.url)
    try:
        yield engine
    finally:
        engine.dispose()


def _fill(queue: SqlQueue, engine: sa.Engine) -> None:
    """7 old succeeded, 3 new succeeded, 2 old failed, 1 running, 2 ready (all 'old')."""
    ids = [f"j{i:02d}" for i in range(15)]
    queue.enqueue_many([NewJob(i, "t", "default", "[]", max_attempts=1) for i in ids])
    claimed = {d.job_id: d for d in queue.claim(["default"], "w", 13)}
    for job_id in ids[:10]:
        queue.ack(claimed[job_id], None)
    for job_id in ids[10:12]:
        queue.fail(claimed[job_id], "boom")
    old = [*ids[:7], *ids[10:]]  # ready and running rows too: their state protects them
    with engine.begin() as conn:
        conn.execute(
            sa.update(jobs)
            .where(jobs.c.id.in_(old))
            .values(finished_at=sa.func.coalesce(jobs.c.finished_at, jobs.c.created_at) - OLD)
        )


def _states(queue: SqlQueue) -> dict[str, int]:
    return queue.count_by_state()


def _deletes(engine: sa.Engine) -> list[str]:
    seen: list[str] = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE"):
            seen.append(statement)

    return seen


def test_purge_deletes_only_old_finished_jobs_in_batches(
    queue: SqlQueue, engine: sa.Engine
) -> None:
    _fill(queue, engine)
    deletes = _deletes(engine)

    assert purge_jobs(engine, CUTOFF, batch_size=3, dry_run=True) == 7
    assert deletes == []
    assert _states(queue) == {"ready": 2, "running": 1, "succeeded": 10, "failed": 2}

    assert purge_jobs(engine, CUTOFF, batch_size=3) == 7
    assert len(deletes) == 3  # 3 + 3 + 1: the short batch ends it
    assert _states(queue) == {"ready": 2, "running": 1, "succeeded": 3, "failed": 2}
    assert all(queue.get_job(f"j{i:02d}") is not None for i in range(7, 15))

    assert purge_jobs(engine, CUTOFF, states=("failed",), batch_size=2) == 2
    assert len(deletes) == 5  # 2, then an empty batch confirms the end
    assert _states(queue) == {"ready": 2, "running": 1, "succeeded": 3, "failed": 0}
    with pytest.raises(ValueError, match="only finished states"):
        purge_jobs(engine, 0, states=("ready",))
    assert purge_jobs(engine, 0, states=("succeeded", "failed")) == 3
    assert _states(queue) == {"ready": 2, "running": 1, "succeeded": 0, "failed": 0}


def test_purge_finished_on_the_queue_keeps_failed_jobs_unless_asked(
    queue: SqlQueue, engine: sa.Engine
) -> None:
    _fill(queue, engine)
    assert queue.purge_finished(CUTOFF) == 7
    assert queue.purge_finished(CUTOFF, include_failed=True) == 2
    assert _states(queue) == {"ready": 2, "running": 1, "succeeded": 3, "failed": 0}


def _keys(engine: sa.Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(sa.select(idempotency_keys.c.key)).scalars())


def _add_keys(engine: sa.Engine) -> None:
    rows = [
        {"key": f"k{i}", "fingerprint": "f", "state": "completed", "owner_token": "o",
         "expires_at": 1000.0 if i < 3 else 1e12, "claimed_at": 1.0}
        for i in range(5)
    ]  # fmt: skip
    with engine.begin() as conn:
        conn.execute(sa.insert(idempotency_keys), rows)


def test_purge_also_removes_expired_idempotency_keys(queue: SqlQueue, engine: sa.Engine) -> None:
    _fill(queue, engine)
    _add_keys(engine)
    dry = purge(queue.url, CUTOFF, dry_run=True, batch_size=2)
    assert (dry.jobs, dry.keys, dry.dry_run) == (7, 3, True)
    assert len(_keys(engine)) == 5
    done = purge(queue.url, CUTOFF, states=("succeeded", "failed"), batch_size=2)
    assert (done.jobs, done.keys) == (9, 3)
    assert _keys(engine) == {"k3", "k4"}
    assert _states(queue) == {"ready": 2, "running": 1, "succeeded": 3, "failed": 0}


def _invoke(*args: str) -> Result:
    cleared: dict[str, str | None] = {k: None for k in os.environ if k.startswith(ENV_PREFIX)}
    return CliRunner().invoke(main, list(args), env=cleared, catch_exceptions=False)


def test_db_purge_command(queue: SqlQueue, engine: sa.Engine) -> None:
    _fill(queue, engine)
    url = queue.url.render_as_string(hide_password=False)
    common = ("db", "purge", "--database-url", url, "--older-than", str(CUTOFF))

    dry = _invoke(*common, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "would delete 7 succeeded jobs" in dry.stdout
    assert _states(queue)["succeeded"] == 10

    done = _invoke(*common, "--batch-size", "2")
    assert done.exit_code == 0, done.output
    assert "deleted 7 succeeded jobs" in done.stdout
    failed = _invoke(*common, "--state", "failed")
    assert "deleted 2 failed jobs" in failed.stdout
    assert _states(queue) == {"ready": 2, "running": 1, "succeeded": 3, "failed": 0}

    refused = _invoke(*common, "--state", "ready")
    assert refused.exit_code == 2
    missing = _invoke("db", "purge", "--database-url", url)
    assert missing.exit_code == 2
    assert "--older-than" in missing.output


def test_one_caller_takes_each_turn_until_its_lease_runs_out(queue: SqlQueue) -> None:
    engines = [create_engine_for(queue.url) for _ in range(4)]
    start = threading.Barrier(len(engines))
    won: list[str] = []

    def offer(i: int) -> None:
        start.wait()
        if take_turn(engines[i], f"w{i}", every=3600):
            won.append(f"w{i}")

    try:
        threads = [threading.Thread(target=offer, args=(i,)) for i in range(len(engines))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(won) == 1, won  # the very first turn, raced by four workers: one wins
        assert not any(take_turn(e, "late", every=3600) for e in engines)
        with engines[0].begin() as conn:  # the lease ran out (as an hour later)
            conn.execute(sa.text("UPDATE workerkit_scheduler_lease SET expires_at = 0"))
        assert [take_turn(e, "next", every=3600) for e in engines].count(True) == 1
    finally:
        for engine in engines:
            engine.dispose()


def test_prune_turn_deletes_by_the_retention_settings(queue: SqlQueue, engine: sa.Engine) -> None:
    _fill(queue, engine)
    _add_keys(engine)
    off = Settings().replace(finished_job_retention=0.0)
    assert prune_turn(engine, off, "w", every=0.0) is None  # 0 and no failed retention: off
    assert pruner(queue, off, "w", when=lambda: True, stop=threading.Event()) is None
    assert _states(queue) == {"ready": 2, "running": 1, "succeeded": 10, "failed": 2}

    week = Settings().replace(finished_job_retention=CUTOFF)
    assert prune_turn(engine, week, "w", every=3600) == {
        "succeeded": 7, "failed": 0, "idempotency_keys": 3
    }  # fmt: skip
    assert prune_turn(engine, week, "other", every=3600) is None  # not its turn
    assert _states(queue) == {"ready": 2, "running": 1, "succeeded": 3, "failed": 2}

    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE workerkit_scheduler_lease SET expires_at = 0"))
    failed_too = week.replace(failed_job_retention=CUTOFF)
    assert prune_turn(engine, failed_too, "other", every=3600) == {
        "succeeded": 0, "failed": 2, "idempotency_keys": 0
    }  # fmt: skip
    assert _states(queue) == {"ready": 2, "running": 1, "succeeded": 3, "failed": 0}


def test_a_stopping_worker_ends_the_purge_between_batches(
    queue: SqlQueue, engine: sa.Engine
) -> None:
    _fill(queue, engine)
    stop = threading.Event()
    stop.set()  # the worker is stopping: one batch, then no more
    assert purge_jobs(engine, CUTOFF, batch_size=2, stop=stop) == 2
    assert purge_jobs(engine, CUTOFF, batch_size=2) == 5  # the rest of the 7 old succeeded ones
