"""Workers' presences in ``workerkit_workers`` and the pause set, for the SQL engine.

One row per worker, replaced at each publish with ``heartbeat_at`` on the database clock (the
record's own ``heartbeat_at`` is overwritten with it when read back); rows older than a day are
deleted by the publishers (at most once a minute each). What the rows are: docs/engines/sql.md
("Dashboard").
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

import sqlalchemy as sa

from workerkit.engines.presence import Presence
from workerkit.engines.sql import db, pauses
from workerkit.engines.sql.schema import db_now, dialect_insert, workers

if TYPE_CHECKING:
    from workerkit.settings import Settings

__all__ = ("PRUNE_AFTER", "SqlPresenceStore", "presence_store")

#: A presence not refreshed for this long (seconds) is deleted: long lost.
PRUNE_AFTER: Final = 86400.0
#: A publisher prunes at most this often (seconds).
_PRUNE_EVERY: Final = 60.0

_c = workers.c


class SqlPresenceStore(db.ForkSafeEngine):
    """:class:`~workerkit.engines.presence.PresenceStore` and
    :class:`~workerkit.engines.presence.QueuePauseStore` on the queue's database.

    ``url`` is a database URL (the store owns a small engine) or an engine to share (then
    :meth:`close` leaves it open). Database errors are translated (``StoreUnavailable``,
    ``SchemaOutOfDate``). Safe to share between threads.
    """

    def __init__(self, url: str | sa.URL | sa.Engine) -> None:
        self._owns_engine = not isinstance(url, sa.Engine)
        if isinstance(url, sa.Engine):
            self._adopt_engine(url)
        else:
            self._adopt_engine(db.create_engine_for(url, pool_size=1, max_overflow=2))
        self.url = self._engine.url
        self.dialect = self.url.get_backend_name()
        self._pruned_at = -_PRUNE_EVERY
        self._prune_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<SqlPresenceStore {self.url.render_as_string(hide_password=True)}>"

    @contextlib.contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        with (
            db.store_errors(self.url, tables="workerkit dashboard tables are"),
            self.engine.begin() as conn,
        ):
            yield conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        with (
            db.store_errors(self.url, tables="workerkit dashboard tables are"),
            self.engine.connect() as conn,
        ):
            conn.execution_options(**{db.READ_ONLY_OPTION: True})
            with conn.begin():
                yield conn

    # --- presences ----------------------------------------------------------------------

    def publish(self, presence: Presence) -> None:
        """Insert or replace ``presence``'s row, its ``heartbeat_at`` the database's now."""
        insert = dialect_insert(self.dialect)
        values = {
            "worker_id": presence.worker_id,
            "record": presence.to_json(),
            "state": presence.state,
        }
        statement = insert(workers).values(heartbeat_at=db_now(), **values)
        statement = statement.on_conflict_do_update(
            index_elements=[_c.worker_id],
            set_={"record": values["record"], "state": presence.state, "heartbeat_at": db_now()},
        )
        prune = self._prune_due()
        with self._write() as conn:
            conn.execute(statement)
            if prune:
                conn.execute(sa.delete(workers).where(_c.heartbeat_at < db_now() - PRUNE_AFTER))

    def _prune_due(self) -> bool:
        now = time.monotonic()
        with self._prune_lock:
            if now - self._pruned_at < _PRUNE_EVERY:
                return False
            self._pruned_at = now
            return True

    def remove(self, worker_id: str) -> None:
        with self._write() as conn:
            conn.execute(sa.delete(workers).where(_c.worker_id == worker_id))

    def list_all(self) -> list[Presence]:
        """Every row, lost ones included (until pruned), by worker id."""
        with self._read() as conn:
            rows = conn.execute(sa.select(_c.record, _c.heartbeat_at).order_by(_c.worker_id)).all()
        found: list[Presence] = []
        for record, heartbeat_at in rows:
            try:
                presence = Presence.from_json(record)
            except (ValueError, TypeError):  # a record of another release's shape: skipped
                continue
            found.append(dataclasses.replace(presence, heartbeat_at=float(heartbeat_at)))
        return found

    # --- pauses -------------------------------------------------------------------------

    def paused_queues(self) -> frozenset[str]:
        with db.store_errors(self.url, tables="workerkit dashboard tables are"):
            return pauses.read_paused(self.engine)

    def set_queue_paused(self, queue: str, paused: bool, actor: str) -> bool:
        with self._write() as conn:
            return pauses.set_paused(conn, queue, paused, actor)

    def close(self) -> None:
        if self._owns_engine:
            self._engine.dispose()


def presence_store(settings: Settings) -> SqlPresenceStore:
    """The presence (and pause) store on ``settings.database_url``."""
    return SqlPresenceStore(settings.database_url)
