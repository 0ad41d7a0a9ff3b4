"""Bulk enqueue for the sql engine: many jobs in few statements, inside one transaction.

PostgreSQL: one ``INSERT ... SELECT FROM json_to_recordset(rows) ... ON CONFLICT DO NOTHING``
per chunk: the rows travel as one JSON text parameter, so the protocol's 65,535-parameter limit
is never near. SQLite: a multi-row ``VALUES`` per chunk, sized to the connection's own variable
limit (32,766 by default). A duplicate id is skipped by ``ON CONFLICT (id) DO NOTHING``, as a
single enqueue skips it; RETURNING says which ids went in.
"""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Final

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite

from workerkit.engines.sql.listener import NOTIFY_CHANNEL
from workerkit.engines.sql.schema import db_now, jobs

if TYPE_CHECKING:
    from workerkit.engines.base import NewJob

__all__ = (
    "POSTGRES_CHUNK_ROWS",
    "SQLITE_DEFAULT_MAX_VARIABLES",
    "first_of_each_id",
    "insert_jobs",
    "notify_queues",
    "sqlite_chunk_rows",
    "went_in",
)

#: Rows per INSERT on PostgreSQL: bounds one statement's size (a few MiB of payloads at most),
#: not a parameter limit (the rows are one JSON parameter however many).
POSTGRES_CHUNK_ROWS: Final = 10_000
#: SQLITE_MAX_VARIABLE_NUMBER of SQLite >= 3.32, used when the connection cannot say its own.
SQLITE_DEFAULT_MAX_VARIABLES: Final = 32_766
#: Bound parameters per row on SQLite: id, queue, task, payload, max_attempts, run_at.
_SQLITE_PARAMS_PER_ROW: Final = 6
_COLUMNS: Final = (
    "id, queue, task, payload, state, attempts, max_attempts, run_at, enqueued_at, "
    "created_at, updated_at"
)


def first_of_each_id(batch: Sequence[NewJob]) -> list[NewJob]:
    """The jobs of ``batch`` in order, each id once (its first job: a later one is a duplicate,
    as it would be if the jobs were enqueued one after the other)."""
    seen: set[str] = set()
    unique: list[NewJob] = []
    for job in batch:
        if job.job_id not in seen:
            seen.add(job.job_id)
            unique.append(job)
    return unique


def went_in(batch: Sequence[NewJob], inserted: set[str]) -> list[bool]:
    """For each job of ``batch``, whether it is the one inserted under its id (the first)."""
    pending = set(inserted)
    flags: list[bool] = []
    for job in batch:
        flags.append(job.job_id in pending)
        pending.discard(job.job_id)
    return flags


#: At most this many rows per SQLite INSERT: sqlite3 keeps each prepared statement cached on
#: the connection, and one statement as large as the variable limit allows (41,666 rows on
#: Debian's SQLite, 9 MB of SQL) kept ~290 MiB per pooled connection; 500 rows is as fast.
SQLITE_MAX_CHUNK_ROWS: Final = 500


def sqlite_chunk_rows(max_variables: int) -> int:
    """Rows per multi-row INSERT: its bound parameters within ``max_variables``, at most
    :data:`SQLITE_MAX_CHUNK_ROWS`."""
    return max(1, min(max_variables // _SQLITE_PARAMS_PER_ROW, SQLITE_MAX_CHUNK_ROWS))


def insert_jobs(conn: sa.Connection, dialect: str, batch: Sequence[NewJob]) -> set[str]:
    """Insert ``batch`` (ids unique) as ready jobs, in chunks; the ids that went in.

    The caller holds the transaction: the chunks commit together or not at all.
    """
    inserted: set[str] = set()
    if dialect == "postgresql":
        for chunk in _chunks(batch, POSTGRES_CHUNK_ROWS):
            inserted.update(conn.execute(_postgres_insert(), _rows_json(chunk)).scalars())
        return inserted
    rows = sqlite_chunk_rows(_sqlite_max_variables(conn))
    for chunk in _chunks(batch, rows):
        params = tuple(
            value
            for job in chunk
            for value in (
                job.job_id,
                job.queue,
                job.task,
                job.payload,
                job.max_attempts,
                job.run_at,
            )
        )
        result = conn.exec_driver_sql(_sqlite_insert(len(chunk)), params)
        inserted.update(row[0] for row in result)
    return inserted


def notify_queues(conn: sa.Connection, queues: Sequence[str]) -> None:
    """One statement: a NOTIFY for each queue, delivered when the caller's transaction commits."""
    conn.execute(_POSTGRES_NOTIFY, {"p_queues": list(queues)})


def _chunks(batch: Sequence[NewJob], size: int) -> Iterator[Sequence[NewJob]]:
    for start in range(0, len(batch), size):
        yield batch[start : start + size]


def _rows_json(chunk: Sequence[NewJob]) -> dict[str, str]:
    # One JSON text parameter: encoded by the json module and decoded by the server, both in C.
    # (Six array parameters instead spent more client CPU in psycopg's array dumper than the
    # whole insert took on the server.)
    rows = [
        {
            "i": job.job_id,
            "q": job.queue,
            "t": job.task,
            "p": job.payload,
            "m": job.max_attempts,
            "r": job.run_at,
        }
        for job in chunk
    ]
    return {"p_rows": json.dumps(rows, separators=(",", ":"), allow_nan=False)}


def _sqlite_max_variables(conn: sa.Connection) -> int:
    raw = conn.connection.dbapi_connection
    getlimit = getattr(raw, "getlimit", None)
    if getlimit is None:  # pragma: no cover - Python < 3.11, or another driver
        return SQLITE_DEFAULT_MAX_VARIABLES
    return int(getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))


def _now_sql(dialect: sa.engine.Dialect) -> str:
    return str(db_now().compile(dialect=dialect))


@functools.lru_cache(maxsize=8)
def _sqlite_insert(rows: int) -> str:
    # Built from constants only (S608 below): every value is a bound parameter.
    # ``now`` is evaluated per row, but julianday('now') is constant within one statement.
    now = _now_sql(sqlite.dialect())
    row = f"(?, ?, ?, ?, 'ready', 0, ?, coalesce(?, {now}), {now}, {now}, {now})"
    return (
        f"INSERT INTO {jobs.name} ({_COLUMNS}) VALUES {', '.join([row] * rows)} "  # noqa: S608
        "ON CONFLICT (id) DO NOTHING RETURNING id"
    )


@functools.cache
def _postgres_insert() -> sa.TextClause:
    # statement_timestamp() is one value for the whole statement: the chunk's jobs share their
    # enqueue time. WITH ORDINALITY + ORDER BY inserts them in the caller's order.
    # Imported here: the PostgreSQL dialect costs ~30 ms to import, on a SQLite worker's way to
    # ready.
    from sqlalchemy.dialects.postgresql.base import PGDialect

    now = _now_sql(PGDialect())  # type: ignore[no-untyped-call]
    return sa.text(
        f"INSERT INTO {jobs.name} ({_COLUMNS}) "  # noqa: S608 - constants; values are bound
        f"SELECT j.i, j.q, j.t, j.p, 'ready', 0, j.m, coalesce(j.r, {now}), {now}, {now}, {now} "
        "FROM ROWS FROM (json_to_recordset(CAST(:p_rows AS json)) "
        "AS (i text, q text, t text, p text, m integer, r double precision)) "
        "WITH ORDINALITY AS j(i, q, t, p, m, r, n) "
        "ORDER BY j.n "
        "ON CONFLICT (id) DO NOTHING RETURNING id"
    )


_POSTGRES_NOTIFY: Final = sa.text(
    "SELECT pg_notify(:p_channel, q) FROM unnest(CAST(:p_queues AS text[])) AS q"
).bindparams(p_channel=NOTIFY_CHANNEL)
