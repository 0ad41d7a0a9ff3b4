"""Engines, migrations and the schema check of the SQL store (SQLite and PostgreSQL).

:func:`alembic_config` builds Alembic's configuration in code (no ``alembic.ini``);
:func:`upgrade` is ``workerkit db upgrade``, and workers only :func:`check_schema`. Why:
docs/engines/sql.md ("Migrations", "SQLite or PostgreSQL").
"""

from __future__ import annotations

import functools
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import sqlalchemy as sa
from sqlalchemy import event

from workerkit.engines.base import StoreHealth
from workerkit.engines.sql.schema import VERSION_TABLE
from workerkit.errors import ConfigurationError, SchemaOutOfDate, StoreError, StoreUnavailable

if TYPE_CHECKING:
    from alembic.config import Config

__all__ = (
    "MIGRATIONS_DIR",
    "PING_AFTER_IDLE",
    "READ_ONLY_OPTION",
    "SCHEMA_HEAD",
    "SQLITE_BUSY_TIMEOUT",
    "UPGRADE_HINT",
    "ForkSafeEngine",
    "alembic_config",
    "check_schema",
    "create_engine_for",
    "current_revision",
    "describe_error",
    "head_revision",
    "is_disk_full",
    "is_missing_table",
    "is_sqlite",
    "normalize_url",
    "postgres_connect_defaults",
    "schema_status",
    "sqlite_busy_timeout",
    "store_error",
    "store_errors",
    "upgrade",
)

log = logging.getLogger(__name__)

MIGRATIONS_DIR: Final = Path(__file__).resolve().parent / "migrations"

#: How long a SQLite writer waits for the file lock before giving up, in seconds. Claims hold it
#: for a few milliseconds; a long wait means something holds a write transaction open.
SQLITE_BUSY_TIMEOUT: Final = 30.0

UPGRADE_HINT: Final = "run `workerkit db upgrade`"

#: The newest of workerkit's migrations (``migrations/versions/``), which :func:`head_revision`
#: asks Alembic for. Written here so that a worker whose database is at head checks it with one
#: SELECT and without importing Alembic (0.1 s of its start); a unit test keeps the two equal.
SCHEMA_HEAD: Final = "0005"

#: Execution option: begin a plain deferred transaction on SQLite (reads), not BEGIN IMMEDIATE.
READ_ONLY_OPTION: Final = "workerkit_read_only"

#: A pooled PostgreSQL connection idle for longer than this (seconds) is pinged at checkout.
PING_AFTER_IDLE: Final = 1.0

_LAST_CHECKIN: Final = "workerkit_last_checkin"

_SQLITE_FULL: Final = 13
_SQLITE_BUSY: Final = 5
#: The WAL switch of a new file is tried again after 1 ms, doubling up to 50 ms (SQLite's own
#: busy handler waits in steps of that size).
_WAL_RETRY_FIRST: Final = 0.001
_WAL_RETRY_MAX: Final = 0.05


def normalize_url(url: str | sa.URL) -> sa.URL:
    """The SQLAlchemy URL workerkit connects with (PostgreSQL URLs use psycopg 3).

    ``postgres://`` and ``postgresql://`` (which SQLAlchemy would give to psycopg2) become
    ``postgresql+psycopg://``; anything but SQLite and PostgreSQL is refused.
    """
    try:
        parsed = sa.make_url(url)
    except (sa.exc.ArgumentError, ValueError) as exc:  # ValueError: a port that is not a number
        raise ConfigurationError(
            f"database_url is not a SQLAlchemy URL ({exc}); expected sqlite:///PATH or "
            "postgresql+psycopg://USER:PASSWORD@HOST/DB"
        ) from None
    backend, _, driver = parsed.drivername.partition("+")
    if backend in ("postgres", "postgresql"):
        parsed = parsed.set(drivername=f"postgresql+{driver or 'psycopg'}")
        backend = "postgresql"
    if backend not in ("sqlite", "postgresql"):
        raise ConfigurationError(
            f"database_url uses {backend!r}, which workerkit's SQL store does not support; use "
            "sqlite:///PATH (one host) or postgresql+psycopg://USER:PASSWORD@HOST/DB"
        )
    if backend == "sqlite" and (
        parsed.database in (None, "", ":memory:") or parsed.query.get("mode") == "memory"
    ):
        raise ConfigurationError(
            f"database_url {parsed.render_as_string(hide_password=True)!r} is an in-memory "
            "SQLite database, which every connection sees empty; use a file "
            "(sqlite:///workerkit.sqlite3), or workerkit.testing.InMemoryQueue in tests"
        )
    try:
        parsed.get_dialect()  # loads SQLAlchemy's dialect module only, not the driver
    except sa.exc.NoSuchModuleError:
        raise ConfigurationError(
            f"database_url names the driver {parsed.drivername!r}, which SQLAlchemy does not "
            "have; use sqlite:///PATH (one host) or postgresql+psycopg://USER:PASSWORD@HOST/DB"
        ) from None
    return parsed


def is_sqlite(url: str | sa.URL) -> bool:
    """Whether ``url`` names a SQLite database."""
    return sa.make_url(url).get_backend_name() == "sqlite"


def create_engine_for(url: str | sa.URL, *, connect_timeout: int = 10, **kwargs: Any) -> sa.Engine:
    """A SQLAlchemy engine set up for the queue; extra ``kwargs`` go to ``create_engine``.

    SQLite: WAL (readers never block the writer; a new file's switch to it retried while busy,
    see :func:`_switch_to_wal`), a busy timeout, and every write transaction
    begins with ``BEGIN IMMEDIATE``. The sqlite3 module's own transaction handling is turned
    off (SQLAlchemy's documented recipe) because it would begin with a *deferred* BEGIN: two
    claimers could then both read the same ready row and only collide at their first write, one
    of them failing with "database is locked" instead of waiting. IMMEDIATE takes the write lock
    at BEGIN, so claims queue up on the busy timeout and each sees the previous one's result.

    PostgreSQL: psycopg 3, a small LIFO pool, a connect timeout (``connect_timeout`` seconds
    unless the URL sets one) so probes answer and writes do not hang on a partition, and
    ``application_name=workerkit``. Connections are pinged when they come out of the pool only
    after sitting idle for :data:`PING_AFTER_IDLE` seconds (see :func:`_install_idle_ping`), not
    on every checkout as ``pool_pre_ping`` would: that ping was a round trip per statement, a
    fifth of a busy worker's traffic.
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        busy = sqlite_busy_timeout(parsed)
        connect_args = {"timeout": busy, **kwargs.pop("connect_args", {})}
        engine = sa.create_engine(parsed, connect_args=connect_args, **kwargs)
        _install_sqlite_hooks(engine, busy)
        return engine
    connect_args = dict(kwargs.pop("connect_args", {}))
    connect_args.update(postgres_connect_defaults(parsed, connect_timeout))
    options: dict[str, Any] = {
        # LIFO: a busy worker keeps reusing its few hot connections (never pinged, see below)
        # while the rest sit idle, get pinged on their next checkout, and age out by recycle.
        "pool_use_lifo": True,
        "pool_size": 5,
        "max_overflow": 10,
        "pool_recycle": 1800,
        "pool_timeout": 30,
    }
    options.update(kwargs)
    engine = sa.create_engine(parsed, connect_args=connect_args, **options)
    if not options.get("pool_pre_ping"):
        _install_idle_ping(engine)
    return engine


def _install_idle_ping(engine: sa.Engine) -> None:
    """Ping a pooled connection at checkout only when it sat idle for PING_AFTER_IDLE s.

    Why this is enough: a connection that was used a moment ago is as likely to be alive as a
    ping would show, and a ping cannot protect the statement that follows it anyway (the
    server may go away in between). What the ping is for is the connection that sat in the
    pool across a database restart, a failover or a firewall's idle cut-off: those are the idle
    ones. When a statement does hit a dead connection, SQLAlchemy sees the disconnect,
    invalidates the whole pool (every connection older than the failure is replaced at its
    next checkout), and the queue sends its claim or fenced write once more, on a new
    connection (``SqlQueue._twice_on_disconnect``). Only when that fails too (the database is
    really down) does it raise :class:`~workerkit.errors.StoreUnavailable`: the worker marks
    the store unready and retries its claim, and retries a settle that failed until the
    database is back (``outage.py``).

    A failed ping raises ``InvalidatePoolError``, as ``pool_pre_ping`` does: the pool drops
    this connection and every other one opened before now (a dead idle connection usually
    means the server restarted), and checks out a new one.
    """

    @event.listens_for(engine, "checkin")
    def _on_checkin(dbapi_connection: Any, connection_record: Any) -> None:
        connection_record.info[_LAST_CHECKIN] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, connection_record: Any, proxy: Any) -> None:
        last = connection_record.info.get(_LAST_CHECKIN)
        if last is None or time.monotonic() - last < PING_AFTER_IDLE:
            return  # brand new (just connected), or in use a moment ago
        try:
            engine.dialect.do_ping(dbapi_connection)
            # psycopg opened a transaction for the ping (the connection is not in autocommit
            # here); end it, so the checkout hands over an idle connection.
            dbapi_connection.rollback()
        except Exception as exc:
            raise sa.exc.InvalidatePoolError(describe_error(exc)) from exc


#: Held while a forked child drops its parent's connections (:class:`ForkSafeEngine`). A
#: fresh one in each child: one held by another of the parent's threads at the fork would never
#: be released there. Reentrant: an :meth:`ForkSafeEngine._after_fork` may use the engine.
_FORK_LOCK = threading.RLock()


def _new_fork_lock() -> None:
    global _FORK_LOCK
    _FORK_LOCK = threading.RLock()


os.register_at_fork(after_in_child=_new_fork_lock)


class ForkSafeEngine:
    """Mixin: an :attr:`engine` property that a forked child uses with fresh connections.

    Pooled connections are sockets shared with the parent after a fork; using them from both
    sides interleaves protocol bytes. The first use in a child drops them (without closing the
    parent's) and calls :meth:`_after_fork`, once, however many of the child's threads use
    the engine first at the same time: the others wait for it, and none sees the parent's state
    meanwhile. Call :meth:`_adopt_engine` in ``__init__``.
    """

    _engine: sa.Engine
    _engine_pid: int

    def _adopt_engine(self, engine: sa.Engine) -> None:
        self._engine = engine
        self._engine_pid = os.getpid()

    @property
    def engine(self) -> sa.Engine:
        """The SQLAlchemy engine (one per process: a forked child gets fresh connections)."""
        if os.getpid() != self._engine_pid:
            with _FORK_LOCK:
                if os.getpid() != self._engine_pid:  # not done by another thread meanwhile
                    self._engine.dispose(close=False)
                    self._after_fork()
                    self._engine_pid = os.getpid()  # last: until now, others wait above
        return self._engine

    def _after_fork(self) -> None:
        """Drop other state the child cannot share with the parent (threads, connections)."""


def is_missing_table(exc: sa.exc.DBAPIError) -> bool:
    """Whether the statement failed because a table does not exist."""
    if getattr(exc.orig, "sqlstate", None) == "42P01":  # PostgreSQL's undefined_table
        return True
    return "no such table" in str(exc.orig)  # SQLite says it in an OperationalError's text


def store_error(
    exc: sa.exc.DBAPIError | sa.exc.TimeoutError, url: sa.URL, *, tables: str
) -> StoreError | None:
    """workerkit's error for a database error, or None when it is none of the store's business.

    A missing table is :class:`SchemaOutOfDate` (``tables`` names them in the message); a lost or
    refused connection, or an exhausted pool, is :class:`StoreUnavailable`.
    """
    dialect = url.get_backend_name()
    if isinstance(exc, sa.exc.TimeoutError):
        return StoreUnavailable(
            f"{dialect} database unavailable: no pooled connection free ({exc})"
        )
    if getattr(exc.orig, "sqlstate", None) == "42P01" or "no such table" in str(exc.orig):
        # PostgreSQL's undefined_table; SQLite says it in an OperationalError's text.
        return SchemaOutOfDate(f"the {tables} missing; {UPGRADE_HINT}")
    if isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError) or (
        exc.connection_invalidated
    ):
        return StoreUnavailable(f"{dialect} database unavailable: {describe_error(exc, url)}")
    return None


@contextmanager
def store_errors(
    url: sa.URL,
    *,
    tables: str,
    otherwise: Callable[[sa.exc.DBAPIError], StoreError] | None = None,
    on_schema_missing: Callable[[], None] | None = None,
    on_disk_full: Callable[[], str] | None = None,
) -> Iterator[None]:
    """Raise :func:`store_error`'s translation of a database error (``otherwise``'s, if none).

    ``on_disk_full`` is called on SQLITE_FULL; what it returns is added to the message.
    """
    try:
        yield
    except (sa.exc.DBAPIError, sa.exc.TimeoutError) as exc:
        error = store_error(exc, url, tables=tables)
        if error is not None and on_disk_full is not None and is_disk_full(exc):
            error = type(error)(f"{error}; {on_disk_full()}")
        if error is None and otherwise is not None and isinstance(exc, sa.exc.DBAPIError):
            error = otherwise(exc)
        if error is None:
            raise
        if isinstance(error, SchemaOutOfDate) and on_schema_missing is not None:
            on_schema_missing()
        raise error from exc


def postgres_connect_defaults(url: sa.URL, connect_timeout: int = 10) -> dict[str, Any]:
    """psycopg connect arguments workerkit adds unless the URL sets them."""
    defaults: dict[str, Any] = {}
    if "connect_timeout" not in url.query:
        defaults["connect_timeout"] = connect_timeout
    if "application_name" not in url.query:
        defaults["application_name"] = "workerkit"
    return defaults


def sqlite_busy_timeout(url: sa.URL) -> float:
    """The SQLite busy timeout in seconds: the URL's ``?timeout=`` (as the sqlite3 driver's
    own), else :data:`SQLITE_BUSY_TIMEOUT`."""
    value = url.query.get("timeout")
    if value is None:
        return SQLITE_BUSY_TIMEOUT
    try:
        timeout = float(value if isinstance(value, str) else value[0])
    except ValueError:
        timeout = -1.0
    if not timeout >= 0:
        raise ConfigurationError(
            f"database_url has timeout={value!r}: the SQLite busy timeout is a number of "
            f"seconds (e.g. ?timeout=30, the default)"
        )
    return timeout


def is_disk_full(exc: BaseException) -> bool:
    """Whether a database error is SQLite's SQLITE_FULL (the disk or the file size limit)."""
    orig = exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc
    code = getattr(orig, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF == _SQLITE_FULL


def _create_with_umask(path: str) -> None:
    """Create the database file (empty) with 0666 less the process umask, if it is missing.

    SQLite itself creates a new file 0644 whatever the umask, so a umask of 002 (a group that
    shares the file) would not be honoured; its -wal and -shm files then copy this file's mode.
    An empty file is a valid empty database. Errors are left to SQLite's own open.
    """
    with suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _switch_to_wal(dbapi_connection: Any, busy_timeout: float) -> None:
    """``PRAGMA journal_mode=WAL``, tried again while SQLite says the file is busy.

    On a file not yet in WAL mode (a new one: the first connections of workers started
    together) the switch reads the header, then upgrades to the exclusive lock to write it. When
    another connection is doing the same, SQLite answers SQLITE_BUSY at once, *without* calling
    the busy handler (both hold a read lock: waiting could deadlock), so the busy timeout does
    not cover it. Trying again once the other has finished does; once a file is in WAL mode the
    pragma takes no lock. Bounded by the busy timeout, after which "database is locked" is
    raised as from any write.
    """
    deadline = time.monotonic() + busy_timeout
    delay = _WAL_RETRY_FIRST
    while True:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            code = getattr(exc, "sqlite_errorcode", None)
            busy = isinstance(code, int) and code & 0xFF == _SQLITE_BUSY
            if not busy or time.monotonic() + delay > deadline:
                raise
        finally:
            cursor.close()
        time.sleep(delay)
        delay = min(delay * 2, _WAL_RETRY_MAX)


def _install_sqlite_hooks(engine: sa.Engine, busy_timeout: float) -> None:
    @event.listens_for(engine, "do_connect")
    def _on_do_connect(dialect: Any, record: Any, cargs: list[Any], cparams: Any) -> None:
        path = cargs[0] if cargs else cparams.get("database")
        if isinstance(path, str) and path and not cparams.get("uri"):
            _create_with_umask(path)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        # None = autocommit at the sqlite3 level: the driver emits no BEGIN of its own, and
        # _on_begin below emits the one we want.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        finally:
            cursor.close()
        _switch_to_wal(dbapi_connection, busy_timeout)

    @event.listens_for(engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        if connection.get_execution_options().get(READ_ONLY_OPTION):
            connection.exec_driver_sql("BEGIN")
        else:
            connection.exec_driver_sql("BEGIN IMMEDIATE")


@contextmanager
def _engine(url: str | sa.URL) -> Iterator[sa.Engine]:
    engine = create_engine_for(url)
    try:
        yield engine
    finally:
        engine.dispose()


def describe_error(exc: BaseException, url: str | sa.URL | None = None) -> str:
    """One line about a database error, without the URL or its password."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()[0] if str(orig).strip() else ""
    if url is not None:
        password = sa.make_url(url).password
        if password:
            text = text.replace(str(password), "***")
    return f"{type(orig).__name__}: {text}" if text else type(orig).__name__


# --- migrations --------------------------------------------------------------------------


def alembic_config(connection: sa.Connection | None = None) -> Config:
    """Alembic's configuration for workerkit's migrations, built in code.

    With ``connection``, migrations run on it (inside its transaction). The URL is never put in
    the config: configparser would choke on a ``%`` in a password, and the config may be logged.
    """
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("version_table", VERSION_TABLE)
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@functools.cache
def head_revision() -> str:
    """The schema revision this version of workerkit needs."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package ships its migrations
        raise ConfigurationError("workerkit's migrations are missing from the installed package")
    return head


@functools.cache
def _known_revisions() -> frozenset[str]:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config())
    return frozenset(rev.revision for rev in script.walk_revisions())


def upgrade(url: str | sa.URL, revision: str = "head") -> str | None:
    """Migrate the database at ``url`` to ``revision`` (``workerkit db upgrade``).

    Returns the revision the database is at afterwards. Safe to run from several places at
    once: PostgreSQL serializes upgraders on an advisory lock (see ``env.py``), SQLite on its
    write lock; a database already at the revision is left alone. Raises
    :class:`~workerkit.errors.StoreUnavailable` (without the URL) when the database cannot be
    reached.
    """
    from alembic import command

    try:
        with _engine(url) as engine:
            with engine.begin() as connection:
                command.upgrade(alembic_config(connection), revision)
            with engine.connect() as connection:
                connection.execution_options(**{READ_ONLY_OPTION: True})
                now_at = _current(connection)
    except (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError) as exc:
        raise StoreUnavailable(f"database unreachable: {describe_error(exc, url)}") from exc
    log.info(
        "database schema upgraded",
        extra={"event": "db_upgraded", "revision": now_at},
    )
    return now_at


def current_revision(url: str | sa.URL) -> str | None:
    """The schema revision of the database at ``url``; None when it was never migrated."""
    with _engine(url) as engine, engine.connect() as connection:
        connection.execution_options(**{READ_ONLY_OPTION: True})
        return _current(connection)


def _current(connection: sa.Connection) -> str | None:
    """The revision(s) in Alembic's version table, read as Alembic reads them (the table's
    existence, then its rows), without importing Alembic."""
    if not sa.inspect(connection).has_table(VERSION_TABLE):
        return None
    version = sa.column("version_num", sa.String)
    heads = connection.execute(sa.select(version).select_from(sa.table(VERSION_TABLE))).scalars()
    return ",".join(sorted(heads)) or None


def schema_status(connection: sa.Connection) -> StoreHealth:
    """Whether the schema behind ``connection`` is the one this workerkit needs.

    At head (the usual case) that is one read and no Alembic; any other revision is compared
    with the migrations Alembic finds.
    """
    current = _current(connection)
    if current == SCHEMA_HEAD:
        return StoreHealth(True, f"schema at revision {SCHEMA_HEAD}")
    head = head_revision()
    if current == head:  # pragma: no cover - SCHEMA_HEAD is kept equal to it (a unit test)
        return StoreHealth(True, f"schema at revision {head}")
    if current is None:
        return StoreHealth(False, f"the workerkit tables are missing; {UPGRADE_HINT}")
    if current not in _known_revisions():
        # A newer workerkit migrated the database: during a rolling deploy the migration Job runs
        # before the new pods start, while old pods still work. Migrations are expand/contract
        # (a new schema keeps serving the previous release), so the old pods stay ready; turning
        # them all unready at once would stall the rollout behind the PodDisruptionBudget.
        return StoreHealth(
            True,
            f"schema revision {current} is newer than this workerkit's {head}; running on it "
            "(migrations keep the previous release working)",
        )
    return StoreHealth(
        False, f"schema is at revision {current}, this workerkit needs {head}; {UPGRADE_HINT}"
    )


def check_schema(url: str | sa.URL) -> StoreHealth:
    """Reachable and at head (``workerkit db check``); ``ok`` is False with the reason else.

    The reason never contains the URL or its password.
    """
    try:
        with _engine(url) as engine, engine.connect() as connection:
            connection.execution_options(**{READ_ONLY_OPTION: True})
            return schema_status(connection)
    except ConfigurationError:
        raise
    except (sa.exc.DBAPIError, sa.exc.TimeoutError, OSError) as exc:
        return StoreHealth(False, f"database unreachable: {describe_error(exc, url)}")
