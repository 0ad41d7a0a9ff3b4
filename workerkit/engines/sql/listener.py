"""Waking idle workers when jobs arrive: PostgreSQL LISTEN/NOTIFY, SQLite's data version, and
in-process wake-ups.

Enqueues and releases NOTIFY :data:`NOTIFY_CHANNEL` with the queue name; each
:class:`~workerkit.engines.sql.SqlQueue` reads them on one dedicated connection. SQLite has no
notifications: a thread reads ``PRAGMA data_version`` (which changes when another connection
commits) every :data:`SQLITE_WATCH_EVERY` seconds and wakes the waiters when it moved. An enqueue
in the same process wakes waiters at once on either database.
"""

from __future__ import annotations

import logging
import pathlib
import sqlite3
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from workerkit.engines.sql import db

if TYPE_CHECKING:
    import psycopg
    import sqlalchemy as sa

__all__ = ("NOTIFY_CHANNEL", "SQLITE_WATCH_EVERY", "PgListener", "SqliteWatcher", "Wakeups")

log = logging.getLogger(__name__)

#: The PostgreSQL channel enqueues and releases NOTIFY, with the queue name as payload.
NOTIFY_CHANNEL: Final = "workerkit_jobs"

#: How often (seconds) an idle SQLite worker reads the database's data version. The read is a
#: look at the WAL index in shared memory (no table, no lock, no disk): about 20 us of CPU.
SQLITE_WATCH_EVERY: Final = 0.05


class Wakeups:
    """Wakes threads in :meth:`SqlQueue.wait_for_jobs` when a queue may have new jobs.

    Each notification bumps a sequence number; each waiting thread remembers the last number it
    saw (thread-local), so a notification that arrives while the thread is away claiming still
    wakes its next wait at once. ``None`` as the queue means "any queue" (the listener lost
    notifications while it reconnected).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._seq = 0
        self._latest: dict[str | None, int] = {}
        self._seen = threading.local()

    def notify(self, queue: str | None) -> None:
        with self._cond:
            self._seq += 1
            self._latest[queue] = self._seq
            self._cond.notify_all()

    def wait(self, queues: Sequence[str], timeout: float) -> bool:
        with self._cond:
            since: int = getattr(self._seen, "seq", self._seq)
            keys: tuple[str | None, ...] = (*queues, None)

            def woken() -> bool:
                return any(self._latest.get(key, 0) > since for key in keys)

            result = self._cond.wait_for(woken, timeout)
            self._seen.seq = self._seq
            return result


class PgListener:
    """One dedicated ``LISTEN workerkit_jobs`` connection, read by a daemon thread.

    A dedicated psycopg connection in autocommit mode, not a pooled one: LISTEN state belongs to
    the session, and a pooled connection would carry it to unrelated work. When the connection
    breaks, the thread reconnects with backoff and, once listening again, wakes every waiter:
    notifications sent meanwhile are lost, so a claim had better look.
    """

    _POLL: Final = 0.5  # how often the thread checks for stop()

    def __init__(self, engine: sa.Engine, wakeups: Wakeups) -> None:
        self._engine = engine
        self._wakeups = wakeups
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._run, name="workerkit-sql-listen", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self._POLL * 4)

    def _connect(self) -> psycopg.Connection[Any]:
        import psycopg

        # The dialect turns the URL into psycopg's arguments exactly as the pool does.
        cargs, cparams = self._engine.dialect.create_connect_args(self._engine.url)
        params = {**db.postgres_connect_defaults(self._engine.url), **cparams}
        return psycopg.connect(*cargs, autocommit=True, **params)

    def _run(self) -> None:
        import psycopg

        backoff = 0.5
        failing = False
        while not self._stopping.is_set():
            try:
                conn = self._connect()
            except psycopg.Error as exc:
                if not failing:
                    log.warning(
                        "cannot LISTEN for new jobs; polling until the database is back",
                        extra={"event": "listen_failed", "error": db.describe_error(exc)},
                    )
                failing = True
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            try:
                with conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    if failing:
                        log.info("listening for new jobs again", extra={"event": "listen_ok"})
                    failing, backoff = False, 0.5
                    self._wakeups.notify(None)
                    while not self._stopping.is_set():
                        for notification in conn.notifies(timeout=self._POLL):
                            self._wakeups.notify(notification.payload)
            except psycopg.Error as exc:
                if not self._stopping.is_set():
                    log.warning(
                        "LISTEN connection lost; reconnecting",
                        extra={"event": "listen_failed", "error": db.describe_error(exc)},
                    )
                    failing = True
                    self._stopping.wait(backoff)


class SqliteWatcher:
    """A daemon thread reading ``PRAGMA data_version`` on its own connection to the file.

    The value changes whenever another connection commits: an enqueue or a release by another
    process, but also this process's own claims, acks and heartbeats (each on a pooled
    connection), so a wake-up means "look", as a NOTIFY does, and a needless one costs one
    empty claim. Any error (the file gone, locked for long, a disk error) ends nothing: the
    thread logs once, tries again a second later, and the worker meanwhile polls as before.
    """

    def __init__(self, path: str, wakeups: Wakeups, every: float = SQLITE_WATCH_EVERY) -> None:
        self._path = path
        self._wakeups = wakeups
        self._every = every
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._run, name="workerkit-sqlite-watch", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)

    def _run(self) -> None:
        failing = False
        while not self._stopping.is_set():
            try:
                # An existing file only (never create one); autocommit: the pragma is a read
                # outside any transaction, no lock a writer would wait on.
                uri = f"{pathlib.Path(self._path).absolute().as_uri()}?mode=rw"
                conn = sqlite3.connect(uri, uri=True, timeout=1.0, isolation_level=None)
            except sqlite3.Error as exc:
                failing = self._failed(failing, exc)
                continue
            try:
                self._watch(conn)
                return
            except sqlite3.Error as exc:
                failing = self._failed(failing, exc)
            finally:
                conn.close()

    def _watch(self, conn: sqlite3.Connection) -> None:
        seen = conn.execute("PRAGMA data_version").fetchone()[0]
        self._wakeups.notify(None)  # what was committed before this first read
        while not self._stopping.wait(self._every):
            version = conn.execute("PRAGMA data_version").fetchone()[0]
            if version != seen:
                seen = version
                self._wakeups.notify(None)

    def _failed(self, failing: bool, exc: sqlite3.Error) -> bool:
        if not failing:
            log.warning(
                "cannot watch the SQLite file for new jobs; polling until it can",
                extra={"event": "listen_failed", "error": str(exc)},
            )
        self._stopping.wait(1.0)
        return True
