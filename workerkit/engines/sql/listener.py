"""Waking idle workers when jobs arrive: PostgreSQL LISTEN/NOTIFY, SQLite's data version, and
in-process wake-ups.

Enqueues and releases NOTIFY :data:`NOTIFY_CHANNEL` with the queue name; each
:class:`~workerkit.engines.sql.SqlQueue` reads them on one dedicated connection. SQLite has no
notifications: a thread reads ``PRAGMA data_version`` (which changes when another connection
commits) when the kernel reports a write to the database's files while a thread waits (Linux),
or every :data:`SQLITE_WATCH_EVERY` seconds, and wakes the waiters when it moved. An enqueue in
the same process wakes waiters at once on either database.
"""

from __future__ import annotations

import logging
import pathlib
import select
import sqlite3
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

from workerkit.engines.sql import db
from workerkit.engines.sql.filechanges import FileChanges, WatchUnavailable
from workerkit.engines.wakepipe import WakePipe

if TYPE_CHECKING:
    import psycopg
    import sqlalchemy as sa

__all__ = (
    "NOTIFY_CHANNEL",
    "SQLITE_GAP_FIRST",
    "SQLITE_SAFETY_EVERY",
    "SQLITE_WATCH_EVERY",
    "PgListener",
    "SqliteWatcher",
    "Wakeups",
)

log = logging.getLogger(__name__)

#: The PostgreSQL channel enqueues and releases NOTIFY, with the queue name as payload.
NOTIFY_CHANNEL: Final = "workerkit_jobs"

#: How often (seconds) an idle SQLite worker reads the database's data version where the kernel
#: cannot report writes to the file (not Linux). The read is a look at the WAL index in shared
#: memory (no table, no lock, no disk): about 20 us of CPU, and a wake of a thread.
SQLITE_WATCH_EVERY: Final = 0.05
#: With inotify: how often a waiting worker reads the version anyway (writes it cannot see).
SQLITE_SAFETY_EVERY: Final = 1.0
#: With inotify, the pause after a wake-up that the claim after it found nothing to take
#: (the worker's own commits move the data version too): doubled each time such a wake-up
#: follows, up to :data:`SQLITE_WATCH_EVERY`; none after a wake-up that found a job.
SQLITE_GAP_FIRST: Final = 0.005
#: After a write to the log that does not show as a commit yet, the waits before the next looks.
_COMMIT_SHOWS_WITHIN: Final = (0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064)


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
        self._waiting = 0
        #: Called (under the lock; it must not block) when a thread begins to wait while none
        #: was: the SQLite watcher looks only while someone waits.
        self.on_first_waiter: Callable[[], None] | None = None
        #: How long the SQLite watcher pauses after a wake-up (:meth:`claimed`).
        self.watch_gap = 0.0

    @property
    def waiting(self) -> bool:
        """Is a thread waiting now?"""
        return self._waiting > 0

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

            self._waiting += 1
            try:
                if self._waiting == 1 and self.on_first_waiter is not None and not woken():
                    self.on_first_waiter()
                result = self._cond.wait_for(woken, timeout)
            finally:
                self._waiting -= 1
            self._seen.watched = result and self._latest.get(None, 0) > since
            self._seen.seq = self._seq
            return result

    def claimed(self, found: bool) -> None:
        """This thread claimed after its last wait: if a watcher's wake-up (any queue) ended
        that wait, whether it found a job. Wake-ups that find nothing, one after another,
        lengthen the watcher's pause after each (the worker's own commits: a long job's
        checkpoints, its enqueues to other queues), to at most one a :data:`SQLITE_WATCH_EVERY`;
        one that finds a job ends the pause."""
        if not getattr(self._seen, "watched", False):
            return
        self._seen.watched = False
        gap = self.watch_gap
        self.watch_gap = 0.0 if found else min(max(2 * gap, SQLITE_GAP_FIRST), SQLITE_WATCH_EVERY)


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
    """A daemon thread that wakes the waiters when another connection committed to the file.

    It reads ``PRAGMA data_version`` on its own connection: the value changes whenever another
    connection commits, an enqueue or a release by another process, but also this process's own
    claims, acks and heartbeats (each on a pooled connection), so a wake-up means "look", as a
    NOTIFY does, and a needless one costs one empty claim. When to read it:

    * On Linux, when the kernel reports a write to the database's files (inotify,
      :mod:`~workerkit.engines.sql.filechanges`), and only while a thread waits: a busy worker's
      own commits do not wake this thread, an idle one hears of an enqueue at once. When the
      first thread begins to wait, the version is read at once (what was committed while
      nobody waited), and again every ``safety_every`` seconds while it waits (what inotify
      cannot see: another kernel's writes). After a wake-up it pauses :attr:`Wakeups.watch_gap`:
      none while the wake-ups find jobs, growing to ``every`` while they do not, so that a
      stream of the worker's own commits costs no more empty claims than the poll did.
    * Elsewhere (or with the watch lost), every ``every`` seconds; logged once
      (``sqlite_watch_polling``, with the reason: inotify's per-user limits, most often).

    Any error (the file gone, locked for long, a disk error) ends nothing: the thread logs
    once, tries again a second later, and the worker meanwhile polls as before.
    """

    def __init__(
        self,
        path: str,
        wakeups: Wakeups,
        every: float = SQLITE_WATCH_EVERY,
        *,
        safety_every: float = SQLITE_SAFETY_EVERY,
    ) -> None:
        self._path = path
        self._wakeups = wakeups
        self._every = every
        self._safety_every = safety_every
        self._said_polling = False
        self._stopping = threading.Event()
        self._wake = WakePipe()  # stop(), or a first waiter
        self._thread: threading.Thread | None = None
        self._seen: int | None = None

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._run, name="workerkit-sqlite-watch", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.wake()
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
        self._seen = None
        self._look(conn)  # what was committed before this first read wakes the waiters
        try:
            changes = FileChanges.open(self._path)
        except WatchUnavailable as exc:
            self._log_polling(str(exc))
        else:
            try:
                self._wakeups.on_first_waiter = self._wake.wake
                self._watch_changes(conn, changes)
            finally:
                self._wakeups.on_first_waiter = None
                changes.close()
            if changes.lost:
                self._log_polling("the watch of its directory was lost (moved or removed)")
        while not self._stopping.is_set():
            if not self._wake.wait(self._every):
                self._look(conn)

    def _watch_changes(self, conn: sqlite3.Connection, changes: FileChanges) -> None:
        """Read the version when the files were written while a thread waits; return when
        stopped, or when the watch was lost (the caller polls)."""
        while_waiting = select.poll()  # not select(): the descriptors may be above 1023
        while_waiting.register(self._wake.fileno(), select.POLLIN)
        while_waiting.register(changes.fileno(), select.POLLIN)
        while_idle = select.poll()
        while_idle.register(self._wake.fileno(), select.POLLIN)
        self._look(conn)  # a commit between the first read and the watch
        while not self._stopping.is_set() and not changes.lost:
            if self._wakeups.waiting:
                while_waiting.poll(self._safety_every * 1000)
            else:
                # The events meanwhile stay queued in the kernel (an overflow is one event).
                while_idle.poll()
            self._wake.clear()
            if not self._wakeups.waiting or self._stopping.is_set():
                continue
            written = changes.take()
            if self._look(conn) or (written and self._look_again(conn)):
                self._stopping.wait(self._wakeups.watch_gap)

    def _look_again(self, conn: sqlite3.Connection) -> bool:
        """After a write to the log that is not a visible commit yet: SQLite writes the log,
        fsyncs it, then updates the WAL index in shared memory (which raises no event). Look
        again, a little later each time, for as long as a commit's fsync can take."""
        for delay in _COMMIT_SHOWS_WITHIN:
            if self._stopping.wait(delay):
                return False
            if self._look(conn):
                return True
        return False

    def _look(self, conn: sqlite3.Connection) -> bool:
        """Read the data version; wake the waiters when it moved (True)."""
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        if version == self._seen:
            return False
        self._seen = version
        self._wakeups.notify(None)
        return True

    def _log_polling(self, why: str) -> None:
        """Say once per watcher that it polls instead of sleeping on the kernel's events: a job
        enqueued then waits up to ``every`` to start, and the idle worker wakes that often."""
        if self._said_polling:
            return
        self._said_polling = True
        log.info(
            "cannot watch the SQLite file for new jobs (%s); reading its data version every "
            "%g ms instead",
            why,
            self._every * 1000,
            extra={"event": "sqlite_watch_polling", "reason": why},
        )

    def _failed(self, failing: bool, exc: sqlite3.Error) -> bool:
        if not failing:
            log.warning(
                "cannot watch the SQLite file for new jobs; polling until it can",
                extra={"event": "listen_failed", "error": str(exc)},
            )
        self._stopping.wait(1.0)
        return True
