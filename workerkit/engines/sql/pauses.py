"""Paused queues in ``workerkit_queue_pauses``: the dashboard's pause/resume, the workers' filter.

A pause is a row (queue, paused_at on the database clock, actor); a resume deletes it and, on
PostgreSQL, NOTIFYs the queue in the same transaction so idle workers wake and claim at once.
Workers read the set through :class:`~workerkit.engines.presence.PausedQueues` (at most once a
second). Why: docs/engines/sql.md ("Dashboard").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from workerkit.engines.presence import PausedQueues
from workerkit.engines.sql import db
from workerkit.engines.sql.listener import NOTIFY_CHANNEL
from workerkit.engines.sql.schema import db_now, queue_pauses

if TYPE_CHECKING:
    from workerkit.engines.sql.queue import SqlQueue

__all__ = ("read_paused", "set_paused", "worker_filter")


def read_paused(engine: sa.Engine) -> frozenset[str]:
    """The paused queues' names (one short read; autocommit on PostgreSQL)."""
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn.execution_options(isolation_level="AUTOCOMMIT")
        else:
            conn.execution_options(**{db.READ_ONLY_OPTION: True})
        return frozenset(conn.execute(sa.select(queue_pauses.c.queue)).scalars())


def set_paused(conn: sa.Connection, queue: str, paused: bool, actor: str) -> bool:
    """Pause or resume ``queue`` inside the caller's transaction; True when that changed it.

    A resume that deleted a row sends ``pg_notify(workerkit_jobs, queue)`` (PostgreSQL): it goes
    out at the commit and wakes the workers waiting for that queue's jobs.
    """
    dialect = conn.dialect.name
    if paused:
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        statement = (
            insert(queue_pauses)
            .values(queue=queue, paused_at=db_now(), actor=actor)
            .on_conflict_do_nothing(index_elements=[queue_pauses.c.queue])
            .returning(queue_pauses.c.queue)
        )
        return conn.execute(statement).first() is not None
    deleted = conn.execute(sa.delete(queue_pauses).where(queue_pauses.c.queue == queue)).rowcount
    if deleted and dialect == "postgresql":
        conn.execute(sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, queue)))
    return bool(deleted)


def worker_filter(queue: SqlQueue) -> PausedQueues:
    """The worker's cached view of the pause set, read on the queue's own engine."""
    return PausedQueues(lambda: read_paused(queue.engine))
