"""Deleting old rows in batches: finished jobs and expired idempotency keys.

Each batch is its own short transaction (``DELETE ... WHERE id IN (SELECT id ... LIMIT n)``),
so a purge of millions of rows never holds the write lock (SQLite) or a huge transaction
(PostgreSQL) for long, and workers claim between batches. Ready and running jobs are never
touched: only the finished states can be asked for. Behind ``workerkit db purge`` and
:meth:`SqlQueue.purge_finished <workerkit.engines.sql.queue.SqlQueue.purge_finished>`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import sqlalchemy as sa

from workerkit.engines.sql import db
from workerkit.engines.sql.schema import db_now, idempotency_keys, jobs

__all__ = (
    "DEFAULT_BATCH_SIZE",
    "FINISHED_STATES",
    "PurgeResult",
    "purge",
    "purge_expired_keys",
    "purge_jobs",
)

#: Rows one transaction deletes at most.
DEFAULT_BATCH_SIZE: Final = 5000

#: The states a purge may delete; ``ready`` and ``running`` are never purged.
FINISHED_STATES: Final = ("succeeded", "failed")

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


def _delete_batches(engine: Any, delete: sa.Delete, batch_size: int) -> int:
    total = 0
    while True:
        with engine.begin() as conn:  # BEGIN IMMEDIATE on SQLite; one short transaction
            deleted = int(conn.execute(delete).rowcount)
        total += deleted
        if deleted < batch_size:
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
    batch = sa.select(jobs.c.id).where(where).limit(batch_size).scalar_subquery()
    return _delete_batches(engine, sa.delete(jobs).where(jobs.c.id.in_(batch)), batch_size)


def purge_expired_keys(
    engine: Any, *, batch_size: int = DEFAULT_BATCH_SIZE, dry_run: bool = False
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
    batch = sa.select(idempotency_keys.c.key).where(where).limit(batch_size).scalar_subquery()
    delete = sa.delete(idempotency_keys).where(idempotency_keys.c.key.in_(batch))
    return _delete_batches(engine, delete, batch_size)


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
