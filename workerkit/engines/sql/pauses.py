"""Paused queues in ``workerkit_queue_pauses``: the dashboard's pause/resume, the workers' filter.

A pause is a row (queue, paused_at on the database clock, actor); a resume deletes it and, on
PostgreSQL, NOTIFYs the queue in the same transaction (a worker idle on its other queues does not
listen for a paused one: it sees the resume at its next read of the set, within a second).
Workers read the set through :class:`~workerkit.engines.presence.PausedQueues` (at most once a
second). Why: docs/engines/sql.md ("Dashboard").
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import sqlalchemy as sa

from workerkit.engines.presence import PAUSE_REFRESH, PausedQueues
from workerkit.engines.sql import db
from workerkit.engines.sql.listener import NOTIFY_CHANNEL
from workerkit.engines.sql.schema import db_now, dialect_insert, queue_pauses

if TYPE_CHECKING:
    from workerkit.engines.sql.queue import SqlQueue

__all__ = ("WorkerPauses", "read_paused", "set_paused", "worker_filter")

log = logging.getLogger("workerkit.engines.sql.worker")


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
        insert = dialect_insert(dialect)
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


def worker_filter(queue: SqlQueue, queues: Sequence[str]) -> WorkerPauses:
    """The worker's view of the pause set, read on the queue's own engine (cached 1 s)."""
    return WorkerPauses(queues, PausedQueues(lambda: read_paused(queue.engine)))


class WorkerPauses:
    """A worker's queues less the paused ones, and how long it may wait while idle.

    Logs ``queues_paused`` (INFO) whenever the set it leaves out changes, so an operator (and a
    test) sees when a worker took a pause or a resume into account.
    """

    def __init__(self, queues: Sequence[str], read: PausedQueues) -> None:
        self._queues = list(queues)
        self._read = read
        self._left_out: frozenset[str] = frozenset()

    def active(self) -> list[str]:
        """The queues to claim from now (the pause set read at most once a second)."""
        active = self._read.active(self._queues)
        left_out = frozenset(self._queues).difference(active)
        if left_out != self._left_out:
            self._left_out = left_out
            log.info(
                "claiming from %s; paused: %s",
                ", ".join(active) or "no queue",
                ", ".join(sorted(left_out)) or "none",
                extra={"event": "queues_paused", "paused": sorted(left_out), "active": active},
            )
        return active

    def idle_wait(self, poll_interval: float) -> float:
        """How long an idle fetch waits: while one of its queues is paused, PAUSE_REFRESH at
        most whatever the poll interval, so that a resume is seen within a second or two (the
        idle wait listens only for the active queues: a paused queue's enqueues wake nobody)."""
        if self._read.paused().intersection(self._queues):
            return min(poll_interval, PAUSE_REFRESH)
        return poll_interval
