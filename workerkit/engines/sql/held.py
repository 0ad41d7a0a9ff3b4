"""The claim's own connection: the statements sent with the driver, the connection held.

The claim (acks folded in) is the sql worker's hot write. Through SQLAlchemy's
``Connection.execute`` it cost ~0.45-0.85 ms of client CPU per call on the bench machine (a pool
checkout, an execution context, a result object per statement); sent with the driver on a
connection kept between claims, ~0.3 ms on PostgreSQL (psycopg's prepared statement, autocommit)
and ~0.2 ms on SQLite (sqlite3, in the same ``BEGIN IMMEDIATE`` transaction as before).
SQLAlchemy still renders the statements and their parameters
(:meth:`~sqlalchemy.sql.compiler.SQLCompiler.construct_expanded_state`), and a driver error is
raised as SQLAlchemy raises it (a ``DBAPIError``; a lost connection invalidated with its pool,
``connection_invalidated`` set), so the queue's error translation, its retry on a new connection
and the worker's outage handling see what they saw before.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import sqlalchemy as sa

from workerkit.engines.sql.db import PING_AFTER_IDLE

__all__ = ("Execute", "HeldConnection")

#: ``execute(statement, params)``: the rows it returned, and how many rows it changed.
Execute = Callable[[Any, Mapping[str, Any]], tuple[list[Any], int]]

_T = TypeVar("_T")


class HeldConnection:
    """One pooled connection kept checked out for the claim; one caller at a time."""

    def __init__(self, engine: Callable[[], sa.Engine]) -> None:
        self._engine = engine  # the queue's (fork-safe) engine property
        self._lock = threading.Lock()
        self._raw: Any = None  # a PoolProxiedConnection (PostgreSQL: in autocommit)
        self._used_at = 0.0  # monotonic: when the last claim on it ended
        self._compiled: dict[int, Any] = {}  # id(statement) -> its compiled form

    @contextlib.contextmanager
    def connection(self) -> Iterator[Execute | None]:
        """``execute`` on the held connection, connected on entry (a pool checkout, raising as
        ``engine.connect()`` does); on SQLite inside one ``BEGIN IMMEDIATE`` transaction,
        committed on a normal exit. None while another thread uses it, or while statement
        events are listened to (the caller goes through the pool as before)."""
        engine = self._engine()  # first: in a forked child, this calls forget()
        dispatch = engine.dispatch
        if dispatch.before_cursor_execute or dispatch.after_cursor_execute:
            yield None  # someone traces statements (OpenTelemetry...): they see this one too
            return
        if not self._lock.acquire(blocking=False):
            yield None
            return
        try:
            yield from self._use(engine)
        finally:
            self._used_at = time.monotonic()  # as the pool's checkin (db._install_idle_ping)
            self._lock.release()

    def _use(self, engine: sa.Engine) -> Iterator[Execute]:
        try:
            if self._raw is None:
                self._raw = _checkout(engine)
            elif engine.dialect.name != "sqlite":
                self._ping_if_idle(engine)
            if engine.dialect.name != "sqlite":
                yield self._execute
                return
            self._driver_call(engine, "BEGIN IMMEDIATE", None, lambda d: d.execute(_BEGIN))
            try:
                yield self._execute
            except BaseException:
                self._rollback()
                raise
            try:
                self._driver_call(engine, "COMMIT", None, lambda d: d.commit())
            except BaseException:
                self._rollback()
                raise
        except Exception as exc:
            if not self._reusable(engine):
                self._drop(exc)  # e.g. SQLite's rollback failed: every later BEGIN would fail
            raise
        except BaseException as exc:
            self._drop(exc)  # a signal handler's SystemExit mid-protocol: state unknown
            raise

    def _ping_if_idle(self, engine: sa.Engine) -> None:
        """As the pool pings a connection idle for PING_AFTER_IDLE at checkout: a claim must not
        be sent into a network partition before the claim gate was asked (the ping waits out
        the partition; the gate then sees how long the claim waited, as on the pool path)."""
        if time.monotonic() - self._used_at < PING_AFTER_IDLE:
            return
        try:
            self._driver_call(engine, "SELECT 1", None, engine.dialect.do_ping)
        except sa.exc.DBAPIError as exc:
            if not exc.connection_invalidated:
                self._drop(exc)
                raise
            # Dropped, with the pool's older connections; a new one, as the pool's failed ping.
            self._raw = _checkout(engine)

    def _reusable(self, engine: sa.Engine) -> bool:
        raw = self._raw
        if raw is None:
            return True  # dropped already
        driver = raw.driver_connection
        if engine.dialect.name == "sqlite":
            return not driver.in_transaction
        # psycopg in autocommit: idle between statements unless a protocol exchange broke.
        return not getattr(driver, "broken", False) and driver.info.transaction_status == 0

    def _drop(self, exc: BaseException) -> None:
        """Close this connection (its pool slot is freed); the next use checks out another."""
        raw, self._raw = self._raw, None
        if raw is not None:
            with contextlib.suppress(Exception):
                raw.invalidate(exc if isinstance(exc, Exception) else None)

    def _rollback(self) -> None:
        raw = self._raw
        if raw is not None and raw.driver_connection.in_transaction:
            with contextlib.suppress(Exception):
                raw.driver_connection.rollback()

    def _execute(self, statement: Any, params: Mapping[str, Any]) -> tuple[list[Any], int]:
        engine = self._engine()
        compiled = self._compiled.get(id(statement))
        if compiled is None:
            compiled = self._compiled[id(statement)] = _Rendered(
                statement.compile(dialect=engine.dialect)
            )
        text, values = compiled.render(params)
        if engine.dialect.name == "sqlite":

            def run(driver: Any) -> tuple[list[Any], int]:
                cursor = driver.execute(text, values)
                try:
                    return _rows(cursor), cursor.rowcount
                finally:
                    cursor.close()

            return self._driver_call(engine, text, values, run)

        def run_pg(driver: Any) -> tuple[list[Any], int]:
            with driver.cursor() as cursor:
                cursor.execute(text, values, prepare=True)
                return _pg_rows(cursor), cursor.rowcount

        return self._driver_call(engine, text, values, run_pg)

    def _driver_call(
        self, engine: sa.Engine, statement: str, params: Any, run: Callable[[Any], _T]
    ) -> _T:
        raw = self._raw
        driver = raw.driver_connection
        dbapi_error = engine.dialect.loaded_dbapi.Error
        try:
            return run(driver)
        except dbapi_error as exc:
            disconnect = bool(engine.dialect.is_disconnect(exc, driver, None))
            if disconnect or getattr(driver, "broken", False):
                self._raw = None
                # As SQLAlchemy does on a disconnect: this connection is invalidated (given
                # back, closed), and every other of the pool older than now is replaced at its
                # next checkout.
                engine.pool._invalidate(raw, exc)
                disconnect = True
            raise sa.exc.DBAPIError.instance(
                statement,
                params,
                exc,
                dbapi_error,
                connection_invalidated=disconnect,
                dialect=engine.dialect,
            ) from exc

    def close(self) -> None:
        """Give the connection back to the pool (the queue is closing)."""
        # Not from under a claim still using it (a queue closed while its worker stops): that
        # connection is then left to be closed with the process.
        if not self._lock.acquire(timeout=_CLOSE_WAIT):
            return
        try:
            raw, self._raw = self._raw, None
        finally:
            self._lock.release()
        if raw is not None:
            with contextlib.suppress(Exception):
                if self._engine().dialect.name == "postgresql":
                    raw.driver_connection.autocommit = False  # psycopg: as the pool had it
                raw.close()

    def forget(self) -> None:
        """In a forked child: the parent's connection is not ours to use or close (and its
        lock may have been copied held)."""
        self._raw = None
        self._lock = threading.Lock()


def _checkout(engine: sa.Engine) -> Any:
    """A pool checkout for the held connection; PostgreSQL's in autocommit. Nothing leaks when
    switching to autocommit fails (or a signal's exception lands in between)."""
    raw = _connect(engine)
    try:
        if engine.dialect.name == "postgresql":
            driver: Any = raw.driver_connection
            driver.autocommit = True  # each statement its own transaction
    except BaseException as exc:
        with contextlib.suppress(Exception):
            raw.invalidate(exc if isinstance(exc, Exception) else None)
        raise
    return raw


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


_CLOSE_WAIT = 5.0  # seconds close() waits for a claim in progress
_BEGIN = "BEGIN IMMEDIATE"  # as db._install_sqlite_hooks begins every write transaction
_row_types: dict[tuple[str, ...], Any] = {}


def _rows(cursor: Any) -> list[Any]:
    """The cursor's rows with attribute access by column name, as SQLAlchemy's rows have."""
    description = cursor.description
    if not description:
        return []
    return _made(tuple(column[0] for column in description), cursor.fetchall())


def _pg_rows(cursor: Any) -> list[Any]:
    """:func:`_rows` of a psycopg cursor, the names read from its result: its ``description``
    builds a ``Column`` per field at every access, ~0.15 ms for the claim's 11."""
    result = cursor.pgresult
    if result is None or not result.nfields:
        return []
    names = tuple(result.fname(i) for i in range(result.nfields))
    return _made(names, cursor.fetchall())


def _made(names: tuple[Any, ...], rows: list[Any]) -> list[Any]:
    row_type: Any = _row_types.get(names)
    if row_type is None:
        text = [n.decode() if isinstance(n, bytes) else n for n in names]
        row_type = _row_types[names] = collections.namedtuple("Row", text)
    return [row_type._make(row) for row in rows]


class _Rendered:
    """A compiled statement's text and parameters for the driver, as SQLAlchemy renders them
    (:meth:`~sqlalchemy.sql.compiler.SQLCompiler.construct_expanded_state`), remembered per
    shape of the parameters: rendering cost ~0.1 ms per claim, and the claim's parameters
    take few shapes (the number of queues, of acks). A shape is the parameters' names and
    their values' types (and lengths, for lists); a rendering is remembered only when its
    driver parameters are the given values unchanged (no bind processor altered them) plus
    the statement's own constants, so the remembered form gives exactly what SQLAlchemy
    would. Anything else is rendered by SQLAlchemy at every call."""

    __slots__ = ("_compiled", "_expanding", "_names", "_shapes")

    def __init__(self, compiled: Any) -> None:
        self._compiled = compiled
        self._names = frozenset(compiled.binds)
        self._expanding = frozenset(n for n, b in compiled.binds.items() if b.expanding)
        self._shapes: dict[tuple[Any, ...], _Shape | None] = {}

    def render(self, params: Mapping[str, Any]) -> tuple[str, Any]:
        key = tuple((name, _kind(value)) for name, value in params.items())
        shape = self._shapes.get(key, _MISSING)
        if shape is _MISSING:
            state = self._compiled.construct_expanded_state(params)
            if len(self._shapes) >= _SHAPES:
                self._shapes.clear()
            shape = self._shapes[key] = self._shape(state, params)
            return state.statement, _driver_values(state)
        if shape is None:
            state = self._compiled.construct_expanded_state(params)
            return state.statement, _driver_values(state)
        return shape.text, shape.values(params)

    def _shape(self, state: Any, params: Mapping[str, Any]) -> _Shape | None:
        given = self._spread(params)
        rendered = state.parameters
        if any(not _same(rendered.get(name, _MISSING), value) for name, value in given.items()):
            return None  # a bind processor changed a value: SQLAlchemy renders every call
        constants = {name: v for name, v in rendered.items() if name not in given}
        shape = _Shape(state.statement, constants, state.positiontup, self._spread)
        if not _same_mapping(shape.values(params), _driver_values(state)):
            return None  # pragma: no cover - a rendering this class does not know
        return shape

    def _spread(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``params`` as SQLAlchemy names them once expanded (``p_queues_1``, ...)."""
        spread: dict[str, Any] = {}
        for name, value in params.items():
            if name not in self._names:
                continue  # not the statement's (SQLAlchemy ignores it too)
            if name in self._expanding:
                for i, item in enumerate(value, 1):
                    spread[f"{name}_{i}"] = item
            else:
                spread[name] = value
        return spread


class _Shape:
    __slots__ = ("_constants", "_order", "_spread", "text")

    def __init__(
        self,
        text: str,
        constants: dict[str, Any],
        order: Any,
        spread: Callable[[Mapping[str, Any]], dict[str, Any]],
    ) -> None:
        self.text = text
        self._constants = constants
        self._order = None if order is None else tuple(order)
        self._spread = spread

    def values(self, params: Mapping[str, Any]) -> Any:
        values = {**self._constants, **self._spread(params)}
        if self._order is None:
            return values
        return tuple(values[name] for name in self._order)


def _driver_values(state: Any) -> Any:
    """What the driver is given: a mapping (psycopg's named style), or a tuple (sqlite3)."""
    if state.positiontup is None:
        return state.parameters
    return tuple(state.positional_parameters)


def _kind(value: Any) -> Any:
    """A value's part of a shape: its type; a list's length and first item's type too (the
    claim's lists hold one type)."""
    kind = type(value)
    if kind is list or kind is tuple:
        return (kind, len(value), type(value[0]) if value else None)
    return kind


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _same_mapping(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return _same(tuple(a), tuple(b))


_MISSING: Any = object()
_SHAPES = 64  # shapes remembered per statement (forgotten all at once past it)
