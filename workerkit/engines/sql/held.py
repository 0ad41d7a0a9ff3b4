"""The claim's own PostgreSQL connection: the statement sent with psycopg, the connection held.

The claim (acks folded in) is the sql worker's hot statement. Through SQLAlchemy's
``Connection.execute`` it cost ~0.75 ms of client CPU per call on the bench machine (a pool
checkout, an execution context, a result object); sent here as psycopg's prepared statement on
a connection kept between claims, ~0.35 ms. SQLAlchemy still renders the statement and its
parameters (:meth:`~sqlalchemy.sql.compiler.SQLCompiler.construct_expanded_state`), and a driver
error is raised as SQLAlchemy raises it (a ``DBAPIError``; a lost connection invalidated with its
pool, ``connection_invalidated`` set), so the queue's error translation, its retry on a new
connection and the worker's outage handling see what they saw before.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import sqlalchemy as sa
from psycopg.rows import namedtuple_row

__all__ = ("HeldConnection",)


class HeldConnection:
    """One pooled connection kept checked out for :meth:`execute`; one caller at a time."""

    def __init__(self, engine: Callable[[], sa.Engine]) -> None:
        self._engine = engine  # the queue's (fork-safe) engine property
        self._lock = threading.Lock()
        self._raw: Any = None  # a PoolProxiedConnection, in autocommit
        self._compiled: dict[int, Any] = {}  # id(statement) -> its compiled form

    @contextlib.contextmanager
    def connection(self) -> Iterator[Callable[[Any, Mapping[str, Any]], list[Any]] | None]:
        """``execute(statement, params)`` on the held connection, connected on entry (a pool
        checkout, raising as ``engine.connect()`` does); None while another thread uses it, or
        while statement events are listened to (the caller goes through the pool as before)."""
        engine = self._engine()  # first: in a forked child, this calls forget()
        dispatch = engine.dispatch
        if dispatch.before_cursor_execute or dispatch.after_cursor_execute:
            yield None  # someone traces statements (OpenTelemetry...): they see this one too
            return
        if not self._lock.acquire(blocking=False):
            yield None
            return
        try:
            if self._raw is None:
                raw = _connect(engine)
                driver: Any = raw.driver_connection
                driver.autocommit = True  # each statement its own transaction
                self._raw = raw
            yield self._execute
        finally:
            self._lock.release()

    def _execute(self, statement: Any, params: Mapping[str, Any]) -> list[Any]:
        engine = self._engine()
        compiled = self._compiled.get(id(statement))
        if compiled is None:
            compiled = self._compiled[id(statement)] = statement.compile(dialect=engine.dialect)
        state = compiled.construct_expanded_state(params)
        raw = self._raw
        driver = raw.driver_connection
        try:
            with driver.cursor(row_factory=namedtuple_row) as cursor:
                cursor.execute(state.statement, state.parameters, prepare=True)
                return list(cursor.fetchall()) if cursor.description else []
        except engine.dialect.loaded_dbapi.Error as exc:
            disconnect = bool(engine.dialect.is_disconnect(exc, driver, None))
            if disconnect or driver.closed or driver.broken:
                self._raw = None
                # As SQLAlchemy does on a disconnect: this connection is invalidated (given
                # back, closed), and every other of the pool older than now is replaced at its
                # next checkout.
                engine.pool._invalidate(raw, exc)
            raise sa.exc.DBAPIError.instance(
                state.statement,
                state.parameters,
                exc,
                engine.dialect.loaded_dbapi.Error,
                connection_invalidated=disconnect,
                dialect=engine.dialect,
            ) from exc

    def close(self) -> None:
        """Give the connection back to the pool (a fork's child: forget the parent's)."""
        raw, self._raw = self._raw, None
        if raw is not None:
            with contextlib.suppress(Exception):
                raw.driver_connection.autocommit = False
                raw.close()

    def forget(self) -> None:
        """In a forked child: the parent's connection is not ours to use or close (and its
        lock may have been copied held)."""
        self._raw = None
        self._lock = threading.Lock()


def _connect(engine: sa.Engine) -> Any:
    """A pool checkout, failing as ``engine.connect()`` does (a DBAPIError, not the driver's)."""
    dbapi_error = engine.dialect.loaded_dbapi.Error
    try:
        return engine.raw_connection()
    except dbapi_error as exc:
        raise sa.exc.DBAPIError.instance(
            None,
            None,
            exc,
            dbapi_error,
            connection_invalidated=bool(engine.dialect.is_disconnect(exc, None, None)),
            dialect=engine.dialect,
        ) from exc
