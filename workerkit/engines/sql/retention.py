"""Deleting old rows in batches: finished jobs and expired idempotency keys.

Each batch is its own short transaction; ready and running jobs are never touched. Behind
``workerkit db purge``, :meth:`SqlQueue.purge_finished
<workerkit.engines.sql.queue.SqlQueue.purge_finished>` and the workers' :func:`pruner` (one per
interval, on a lease row). Why and how: docs/engines/sql.md ("Retention and purging").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import sqlalchemy as sa

from workerkit.engines.attempt import Duty, Keeper
from workerkit.engines.sql import db
from workerkit.engines.sql.schema import (
    db_now,
    dialect_insert,
    idempotency_keys,
    jobs,
    scheduler_lease,
)
from workerkit.engines.sql.statements import among

if TYPE_CHECKING:
    from workerkit.settings import Settings

__all__ = (
    "DEFAULT_BATCH_SIZE",
    "FINISHED_STATES",
    "LEASE_NAME",
    "MAX_BATCHES",
    "PRUNE_EVERY",
    "PurgeResult",
    "prune_turn",
    "pruner",
    "purge",
    "purge_expired_keys",
    "purge_jobs",
    "take_turn",
)

log = logging.getLogger(__name__)

#: Rows one transaction deletes at most.
DEFAULT_BATCH_SIZE: Final = 5000

#: The states a purge may delete; ``ready`` and ``running`` are never purged.
FINISHED_STATES: Final = ("succeeded", "failed")

#: How often a worker offers to prune; one worker prunes per interval (the lease's length).
PRUNE_EVERY: Final = 60.0

#: Batches one turn deletes at most, per kind of row.
MAX_BATCHES: Final = 20

#: The pruner's row in ``workerkit_scheduler_lease``. No scheduler namespace starts with '@'.
LEASE_NAME: Final = "@retention"

_JOB_TABLES: Final = "workerkit_jobs table is"
_KEY_TABLES: Final = "workerkit_idempotency table is"


@dataclass(frozen=True, slots=True)
class PurgeResult:
    """What :func:`purge` deleted (or, on a dry run, would delete)."""

    jobs: int
    keys: int
    dry_run: bool


def _check_states(states: Sequence[str]) -> None:
    if not states or set(states) - set(FINISHED_STATES):
        raise ValueError(f"only finished states can be purged ({', '.join(FINISHED_STATES)})")


def _job_filter(cutoff: float, states: Sequence[str]) -> sa.ColumnElement[bool]:
    # finished_at < x implies finished_at IS NOT NULL: the partial ix_workerkit_jobs_finished.
    return sa.and_(jobs.c.finished_at < cutoff, jobs.c.state.in_(list(states)))


def _cutoff(engine: Any, older_than: float) -> float:
    """Now minus ``older_than`` on the database clock, fixed once for the whole purge.

    Fixed so that a long purge ends: jobs finishing meanwhile are not chased batch after batch.
    """
    if older_than < 0:
        raise ValueError("older_than must be >= 0 seconds")
    with engine.connect() as conn:
        conn.execution_options(**{db.READ_ONLY_OPTION: True})
        return float(conn.execute(sa.select(db_now())).scalar_one()) - older_than


def _delete_batches(
    engine: Any,
    delete: sa.Delete,
    batch_size: int,
    max_batches: int | None = None,
    stop: threading.Event | None = None,
) -> int:
    total = batches = 0
    while max_batches is None or batches < max_batches:
        started = time.monotonic()
        with engine.begin() as conn:  # BEGIN IMMEDIATE on SQLite; one short transaction
            deleted = int(conn.execute(delete).rowcount)
        total += deleted
        batches += 1
        if deleted < batch_size:
            break
        # SQLite has one writer: a batch begun as soon as the last one committed would leave
        # the workers' heartbeats and settles no gap, so wait as long as the batch took. A
        # stopping worker (its drain) ends the turn between batches.
        pause = time.monotonic() - started if engine.dialect.name == "sqlite" else 0.0
        if stop is not None and stop.wait(pause):
            break
        if stop is None and pause:
            time.sleep(pause)
    return total


def _count(engine: Any, statement: sa.Select[Any]) -> int:
    with engine.connect() as conn:
        conn.execution_options(**{db.READ_ONLY_OPTION: True})
        return int(conn.execute(statement).scalar_one())


def purge_jobs(
    engine: Any,
    older_than: float,
    *,
    states: Sequence[str] = ("succeeded",),
    batch_size: int = DEFAULT_BATCH_SIZE,
    dry_run: bool = False,
    max_batches: int | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Delete jobs in ``states`` finished over ``older_than`` s ago, ``batch_size`` per commit.

    ``engine`` is a SQLAlchemy engine on the store. Returns how many rows were deleted (on a dry
    run, how many would be). Raises ValueError for a state that is not a finished one.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    _check_states(states)
    where = _job_filter(_cutoff(engine, older_than), states)
    if dry_run:
        return _count(engine, sa.select(sa.func.count()).select_from(jobs).where(where))
    batch = sa.select(jobs.c.id).where(where).limit(batch_size)
    # The filter again on the DELETE itself: a row requeued between the subquery and the delete
    # (PostgreSQL re-checks the outer WHERE on the locked row) is kept.
    delete = sa.delete(jobs).where(among(jobs.c.id, batch), where)
    return _delete_batches(engine, delete, batch_size, max_batches, stop)


def purge_expired_keys(
    engine: Any,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dry_run: bool = False,
    max_batches: int | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Delete idempotency keys past their expiry, in batches; return how many (would) go.

    Safe at any time: an expired key is claimable anyway.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    where = idempotency_keys.c.expires_at <= _cutoff(engine, 0.0)
    if dry_run:
        statement = sa.select(sa.func.count()).select_from(idempotency_keys).where(where)
        return _count(engine, statement)
    batch = sa.select(idempotency_keys.c.key).where(where).limit(batch_size)
    delete = sa.delete(idempotency_keys).where(among(idempotency_keys.c.key, batch), where)
    return _delete_batches(engine, delete, batch_size, max_batches, stop)


def purge(
    url: str | sa.URL,
    older_than: float,
    *,
    states: Sequence[str] = ("succeeded",),
    batch_size: int = DEFAULT_BATCH_SIZE,
    dry_run: bool = False,
    keys: bool = True,
) -> PurgeResult:
    """``workerkit db purge``: old finished jobs, then (``keys``) expired idempotency keys.

    Raises :class:`~workerkit.errors.StoreUnavailable` or
    :class:`~workerkit.errors.SchemaOutOfDate` for the database's errors.
    """
    _check_states(states)
    engine = db.create_engine_for(url)
    url = engine.url
    try:
        with db.store_errors(url, tables=_JOB_TABLES):
            deleted = purge_jobs(
                engine, older_than, states=states, batch_size=batch_size, dry_run=dry_run
            )
        expired = 0
        if keys:
            with db.store_errors(url, tables=_KEY_TABLES):
                expired = purge_expired_keys(engine, batch_size=batch_size, dry_run=dry_run)
    finally:
        engine.dispose()
    return PurgeResult(jobs=deleted, keys=expired, dry_run=dry_run)


# --- automatic retention ----------------------------------------------------------------


def take_turn(engine: Any, holder: str, every: float = PRUNE_EVERY) -> bool:
    """Whether ``holder`` prunes now: True for one caller per ``every`` seconds, on any host.

    One conditional UPDATE of the lease row, on the database clock: it succeeds only once the
    last turn's lease ran out, and then holds the row for ``every``. On PostgreSQL a second
    caller waits for the first one's row lock, re-checks and finds the lease taken; SQLite's
    ``BEGIN IMMEDIATE`` serializes them.
    """
    lease = scheduler_lease.c
    now = db_now()
    update = (
        sa.update(scheduler_lease)
        .where(lease.namespace == LEASE_NAME, lease.expires_at <= now)
        .values(
            holder=holder,
            epoch=lease.epoch + 1,
            acquired_at=now,
            renewed_at=now,
            expires_at=now + every,
        )
    )
    insert = dialect_insert(engine.dialect.name)
    seed = (
        insert(scheduler_lease)
        .values(namespace=LEASE_NAME, holder=None, epoch=0, expires_at=0.0)
        .on_conflict_do_nothing(index_elements=[lease.namespace])
    )
    with engine.begin() as conn:
        won = bool(conn.execute(update).rowcount == 1)
        if not won and conn.execute(seed).rowcount:
            won = bool(conn.execute(update).rowcount == 1)  # the very first turn on this database
    return won


def prune_turn(
    engine: Any,
    settings: Settings,
    holder: str,
    *,
    every: float = PRUNE_EVERY,
    batch_size: int = DEFAULT_BATCH_SIZE,
    stop: threading.Event | None = None,
) -> dict[str, int] | None:
    """If it is ``holder``'s turn (:func:`take_turn`), prune by ``settings``; None otherwise.

    Succeeded jobs older than ``finished_job_retention`` (unless 0), failed ones older than
    ``failed_job_retention`` (when set), expired idempotency keys; :data:`MAX_BATCHES` each.
    Returns how many rows of each kind went.
    """
    finished, failed = settings.finished_job_retention, settings.failed_job_retention
    if not finished and failed is None:
        return None
    if not take_turn(engine, holder, every):
        log.debug("another worker prunes this interval", extra={"event": "retention_skipped"})
        return None
    size, most = batch_size, MAX_BATCHES
    counts = {"succeeded": 0, "failed": 0, "idempotency_keys": 0}
    if finished:
        counts["succeeded"] = purge_jobs(
            engine, finished, states=("succeeded",), batch_size=size, max_batches=most, stop=stop
        )
    if failed is not None:
        counts["failed"] = purge_jobs(
            engine, failed, states=("failed",), batch_size=size, max_batches=most, stop=stop
        )
    counts["idempotency_keys"] = purge_expired_keys(
        engine, batch_size=size, max_batches=most, stop=stop
    )
    if any(counts.values()):
        log.info("old rows pruned", extra={"event": "retention_pruned", **counts})
    return counts


def pruner(
    queue: Any, settings: Settings, holder: str, *, when: Callable[[], bool], stop: threading.Event
) -> Keeper | None:
    """The SQL worker's pruner thread (start it), or None when retention is off.

    ``queue`` is the worker's SqlQueue; ``when`` says whether the store is usable (the worker's
    readiness), ``stop`` ends the thread (the worker's stop).
    """
    if not settings.finished_job_retention and settings.failed_job_retention is None:
        return None

    def turn() -> None:
        with db.store_errors(queue.url, tables="workerkit tables are"):
            prune_turn(queue.engine, settings, holder, stop=stop)

    return Keeper(
        [Duty("retention", PRUNE_EVERY, turn, when=when)],
        log=log,
        name="workerkit-retention",
        stop_event=stop,
    )
