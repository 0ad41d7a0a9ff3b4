"""workerkit's own queue, in SQLite or PostgreSQL.

One row per job in ``workerkit_jobs`` (:mod:`workerkit.store.schema`). A claim takes a *lease*:
a random owner token and an expiry computed by the database clock, ``V`` seconds ahead
(``visibility_timeout``, 30 s by default), which heartbeats extend. Every later write of the
attempt (checkpoint, ack, retry, fail, release) is one ``UPDATE ... WHERE id = :id AND
lease_token = :token AND state = 'running'``: when another worker claimed the job since, the
token differs, nothing is written and the attempt gets :class:`~workerkit.errors.LeaseLost`.
A lease that ran out is taken over by the claim query itself: there is no reaper process.

Claims: one ``UPDATE ... RETURNING`` over two ``FOR UPDATE SKIP LOCKED`` CTEs (expired leases,
due jobs), so concurrent PostgreSQL claimers skip each other's rows instead of queueing on them;
on SQLite inside ``BEGIN IMMEDIATE``, which serializes claimers on the file lock (SQLite is for
one host: see ``replicas``). On PostgreSQL the claim and every fenced write run in autocommit:
one statement, one round trip, no BEGIN/COMMIT (see ``_statement``).

New jobs wake idle workers: PostgreSQL ``NOTIFY workerkit_jobs, '<queue>'`` in the enqueuing
transaction, received on one dedicated ``LISTEN`` connection per queue object; SQLite (and any
enqueue in the same process) an in-process wake-up. Other processes' SQLite enqueues are seen at
the next poll (``poll_interval``).

See docs/engines/sql.md.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from workerkit.engines.base import AppTiming, Delivery, NewJob, QueueStats, StoreHealth
from workerkit.errors import (
    ConfigurationError,
    LeaseLost,
    SchemaOutOfDate,
    StoreError,
    StoreUnavailable,
)
from workerkit.settings import ENGINE_DEFAULT_VISIBILITY_TIMEOUT, Settings
from workerkit.store import db
from workerkit.store._jobs import (
    CRASH_EXHAUSTED_ERROR,
    JOB_FIELDS,
    dump_json,
    lease_exhausted_error,
    load_json,
    ref_parts,
)
from workerkit.store.schema import JOB_STATES, db_now, jobs

if TYPE_CHECKING:
    import psycopg
    from sqlalchemy.sql.compiler import SQLCompiler

__all__ = ("NOTIFY_CHANNEL", "SqlEngine", "SqlQueue")

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: The PostgreSQL channel enqueues and releases NOTIFY, with the queue name as payload.
NOTIFY_CHANNEL: Final = "workerkit_jobs"

_c = jobs.c
_FENCE_LOST = (
    "job {job_id}: this attempt's lease is gone (it expired and another worker claimed the "
    "job, or the job was already settled); the {what} was not written"
)


def _lease_ttl(settings: Settings) -> float:
    # V of the sql engine, even when these settings name another engine (an App enqueuing into
    # the SQL queue from a process configured for celery must not get celery's 3600 s).
    if settings.visibility_timeout is not None:
        return settings.visibility_timeout
    if settings.engine == "sql":
        return settings.effective_visibility_timeout
    return ENGINE_DEFAULT_VISIBILITY_TIMEOUT["sql"]


# --- the hot statements, built once --------------------------------------------------------
#
# Each is a module-level construct with bind parameters: SQLAlchemy compiles it once per
# dialect and memoizes its cache key, where building the statement on every call (sa.select(),
# sa.case(), ...) cost ~0.1-0.3 ms of Python per statement. Parameter names carry a ``p_``
# prefix because a bindparam named after a column of an UPDATE is reserved for its SET clause.
#
# States are SQL literals, not bound parameters: the planners can only use the partial
# indexes (``WHERE state = 'ready'``, ``'running'``) when the query's own WHERE clause says the
# same with a constant. A parameter would do for PostgreSQL's first custom plans, but not for
# the generic plan of a statement psycopg has prepared, nor ever for SQLite.


def _state(name: str) -> sa.ColumnElement[str]:
    if name not in JOB_STATES:  # pragma: no cover - a typo here, caught at import
        raise ValueError(f"not a job state: {name!r}")
    return sa.literal_column(f"'{name}'", sa.Text)


_READY: Final = _state("ready")
_RUNNING: Final = _state("running")
_SUCCEEDED: Final = _state("succeeded")
_FAILED: Final = _state("failed")


class _new_token(FunctionElement[str]):  # noqa: N801 - reads like the SQL function it renders
    """A fresh random lease token per row (32 hex digits), made by the database.

    The claim is one statement over up to n rows, so the tokens cannot come from Python
    without a row-to-token mapping; both functions are volatile, evaluated once per row, and
    drawn from the database's strong random source (PostgreSQL 13+ ``gen_random_uuid``: 122
    random bits; SQLite ``randomblob``). A token only has to be unique per claim of a job: the
    fence compares it, nothing derives secrets from it.
    """

    type = sa.Text()
    inherit_cache = True
    name = "new_token"


@compiles(_new_token, "postgresql")
def _new_token_postgresql(element: _new_token, compiler: SQLCompiler, **kw: Any) -> str:
    return "replace(CAST(gen_random_uuid() AS TEXT), '-', '')"


@compiles(_new_token, "sqlite")
def _new_token_sqlite(element: _new_token, compiler: SQLCompiler, **kw: Any) -> str:
    return "lower(hex(randomblob(16)))"


def _exhausted_error_sql() -> sa.ColumnElement[str]:
    """:func:`~workerkit.store._jobs.lease_exhausted_error` computed by the database, per row.

    The claim fails a crash-looping job in the same statement that takes the others, so the
    message has to be SQL; it is cut out of the Python function's own output (with marker
    values in the number and error slots) so that the two cannot drift apart.
    """
    attempts_mark, max_mark, error_mark = 918273645, 546372819, "\x00"
    plain = lease_exhausted_error(attempts_mark, max_mark, None)
    head, rest = plain.split(str(attempts_mark))
    middle, tail = rest.split(str(max_mark))
    with_error = lease_exhausted_error(attempts_mark, max_mark, error_mark)
    if not with_error.startswith(plain):
        raise RuntimeError("lease_exhausted_error() changed shape; update _exhausted_error_sql")
    error_head, error_tail = with_error[len(plain) :].split(error_mark)

    def text(value: str) -> sa.ColumnElement[str]:
        return sa.literal(value, sa.Text)

    # NULLIF: Python's ``if last_error`` treats "" like None; || with NULL is NULL in both.
    earlier = sa.func.coalesce(
        text(error_head) + sa.func.nullif(_c.last_error, "") + text(error_tail), ""
    )
    return (
        text(head)
        + sa.cast(_c.attempts, sa.Text)
        + text(middle)
        + sa.cast(_c.max_attempts, sa.Text)
        + text(tail)
        + earlier
    )


def _claim_statement() -> sa.Update:
    """Take up to ``p_limit`` runnable jobs of ``p_queues`` in one statement.

    Two range scans, each of its own partial index in the order wanted, rather than one scan
    with an OR: ``expired`` walks ``ix_workerkit_jobs_lease`` (leases that ran out, oldest
    first), ``ready`` walks ``ix_workerkit_jobs_ready`` (due jobs by run_at) and stops after
    the slots ``expired`` left, so neither collects and sorts a backlog, however long.

    ``FOR UPDATE SKIP LOCKED`` (PostgreSQL): rows another claimer has locked are skipped, not
    waited for, so N workers take N different jobs in parallel; and a row that another claimer
    changed after our snapshot is re-checked against the WHERE clause before it is locked, so a
    job claimed a moment ago no longer matches. The locks are held until the statement's
    transaction ends (here, the statement itself in autocommit), by which time the rows carry
    our token. Both CTEs are ``MATERIALIZED``: computed once, so a plan that rescans a
    subquery cannot lock (and take) more rows than the limit. SQLite has no FOR UPDATE; there
    the claim runs inside ``BEGIN IMMEDIATE``, already the only writer.

    An expired job with no attempts left (its worker died on the last one: a crash loop) is
    failed by the same statement with the reason instead of being taken; RETURNING says which
    rows were which (``state``).
    """
    now = db_now()
    queues: sa.BindParameter[str] = sa.bindparam("p_queues", expanding=True)
    limit = sa.bindparam("p_limit", type_=sa.Integer)
    expired = (
        sa.select(_c.id)
        .where(_c.queue.in_(queues), _c.state == _RUNNING, _c.lease_expires_at < now)
        .order_by(_c.lease_expires_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("expired")
        .prefix_with("MATERIALIZED", dialect="postgresql")
    )
    taken_over = sa.select(sa.func.count()).select_from(expired).scalar_subquery()
    ready = (
        sa.select(_c.id)
        .where(_c.queue.in_(queues), _c.state == _READY, _c.run_at <= now)
        .order_by(_c.run_at)
        .limit(limit - taken_over)
        .with_for_update(skip_locked=True)
        .cte("ready")
        .prefix_with("MATERIALIZED", dialect="postgresql")
    )
    picked = sa.union_all(sa.select(expired.c.id), sa.select(ready.c.id))
    # SET expressions read the row as it was (PostgreSQL and SQLite alike); RETURNING the row
    # as written.
    exhausted = sa.and_(_c.state == _RUNNING, _c.attempts >= _c.max_attempts)
    return (
        sa.update(jobs)
        .where(_c.id.in_(picked))
        .values(
            state=sa.case((exhausted, _FAILED), else_=_RUNNING),
            lease_token=sa.case((exhausted, sa.null()), else_=_new_token()),
            lease_expires_at=sa.case(
                (exhausted, sa.null()), else_=now + sa.bindparam("p_ttl", type_=sa.Double)
            ),
            worker_id=sa.case((exhausted, _c.worker_id), else_=sa.bindparam("p_worker")),
            attempts=sa.case((exhausted, _c.attempts), else_=_c.attempts + 1),
            last_error=sa.case((exhausted, _exhausted_error_sql()), else_=_c.last_error),
            finished_at=sa.case((exhausted, now), else_=_c.finished_at),
            updated_at=now,
        )
        .returning(
            _c.id,
            _c.state,
            _c.task,
            _c.queue,
            _c.payload,
            _c.attempts,
            _c.max_attempts,
            _c.lease_token,
            _c.checkpoint,
            _c.run_at,
            _c.lease_expires_at,
        )
    )


def _fenced_update(**values: Any) -> sa.Update:
    """``UPDATE ... SET values WHERE id = :p_id AND lease_token = :p_token AND running``."""
    return (
        sa.update(jobs)
        .where(
            _c.id == sa.bindparam("p_id"),
            _c.lease_token == sa.bindparam("p_token"),
            _c.state == _RUNNING,
        )
        .values(updated_at=db_now(), **values)
    )


def _param(name: str, type_: sa.types.TypeEngine[Any]) -> sa.BindParameter[Any]:
    return sa.bindparam(f"p_{name}", type_=type_)


_NO_LEASE: Final = {"lease_token": sa.null(), "lease_expires_at": sa.null()}
_CLAIM: Final = _claim_statement()
_ACK: Final = _fenced_update(
    state=_SUCCEEDED,
    result=_param("result", sa.Text()),
    checkpoint=sa.null(),
    finished_at=db_now(),
    **_NO_LEASE,
)
_EXTEND: Final = _fenced_update(lease_expires_at=db_now() + _param("ttl", sa.Double()))
_CHECKPOINT: Final = _fenced_update(checkpoint=_param("checkpoint", sa.Text()))
_RETRY: Final = _fenced_update(
    state=_READY,
    run_at=_param("run_at", sa.Double()),
    last_error=_param("error", sa.Text()),
    **_NO_LEASE,
)
_FAIL: Final = _fenced_update(
    state=_FAILED, last_error=_param("error", sa.Text()), finished_at=db_now(), **_NO_LEASE
)
_DEFER: Final = _fenced_update(
    state=_READY,
    run_at=_param("run_at", sa.Double()),
    attempts=_c.attempts - 1,
    last_error=_param("error", sa.Text()),
    **_NO_LEASE,
)
_RELEASE: Final = _fenced_update(
    state=_READY, run_at=db_now(), attempts=_c.attempts - 1, **_NO_LEASE
)
_CRASHED_EXHAUSTED = _c.attempts >= _c.max_attempts
_RELEASE_CRASHED: Final = _fenced_update(
    state=sa.case((_CRASHED_EXHAUSTED, _FAILED), else_=_READY),
    last_error=sa.case((_CRASHED_EXHAUSTED, CRASH_EXHAUSTED_ERROR), else_=_c.last_error),
    finished_at=sa.case((_CRASHED_EXHAUSTED, db_now()), else_=None),
    run_at=db_now(),
    **_NO_LEASE,
)


class SqlQueue:
    """The SQL queue (:class:`~workerkit.engines.base.QueueBackend`), on SQLite or PostgreSQL.

    ``url`` defaults to ``settings.database_url``. Constructing one does not connect, and never
    migrates: :meth:`health` reports a schema that is not at head, and :meth:`claim` raises
    :class:`~workerkit.errors.SchemaOutOfDate`, until ``workerkit db upgrade`` has run.

    Safe to share between threads: each call checks a connection out of the engine's pool for
    one statement or one transaction.
    """

    name = "sql"

    def __init__(self, url: str | None = None, *, settings: Settings | None = None) -> None:
        self.settings = settings if settings is not None else Settings()
        self.url = db.normalize_url(url if url is not None else self.settings.database_url)
        self.dialect = self.url.get_backend_name()
        if self.dialect == "sqlite" and self.settings.replicas > 1:
            raise ConfigurationError(
                f"replicas={self.settings.replicas} with a SQLite database_url: SQLite works on "
                "one host only (its file lock does not reach across pods or network "
                "filesystems, so two hosts could run one job twice). Set database_url to a "
                "PostgreSQL URL (postgresql+psycopg://USER:PASSWORD@HOST/DB), or replicas=1"
            )
        #: V: how long a claim (or the last heartbeat) keeps a job, in seconds.
        self.lease_ttl = _lease_ttl(self.settings)
        self._engine = db.create_engine_for(self.url)
        self._pid = os.getpid()
        self._schema_ok = False
        self._wakeups = _Wakeups()
        self._listener: _PgListener | None = None
        self._listener_lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"<SqlQueue {self.url.render_as_string(hide_password=True)}>"

    # --- connections and errors ----------------------------------------------------------

    @property
    def engine(self) -> sa.Engine:
        """The SQLAlchemy engine (one per process: a forked child gets fresh connections)."""
        if os.getpid() != self._pid:
            # Pooled connections are sockets shared with the parent; using them from both sides
            # of a fork interleaves protocol bytes. Drop them here without closing the parent's.
            self._engine.dispose(close=False)
            self._pid = os.getpid()
            self._listener = None
        return self._engine

    @contextlib.contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        """One write transaction (BEGIN IMMEDIATE on SQLite), with errors translated."""
        with self._errors(), self.engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        """One read-only transaction (a deferred BEGIN on SQLite, so writers are not blocked)."""
        with self._errors(), self.engine.connect() as conn:
            conn.execution_options(**{db.READ_ONLY_OPTION: True})
            with conn.begin():
                yield conn

    @contextlib.contextmanager
    def _statement(self) -> Iterator[sa.Connection]:
        """A connection for one write statement that commits by itself, errors translated.

        PostgreSQL: autocommit, so the statement is its own transaction and costs one round
        trip, not three (BEGIN, statement, COMMIT). Only for single statements: anything that
        must see or change more than one statement atomically uses :meth:`_write`.
        SQLite: a ``BEGIN IMMEDIATE`` transaction (:meth:`_write`) all the same. SQLite's own
        implicit transaction would read first and upgrade to the write lock at the first write,
        and in WAL mode an upgrade after another writer's commit fails at once with "database
        is locked" instead of waiting; its BEGIN and COMMIT cost no round trip anyway.
        """
        if self.dialect != "postgresql":
            with self._write() as conn:
                yield conn
            return
        with self._errors(), self.engine.connect() as conn:
            # Client-side only with psycopg (no round trip); the pool restores the default
            # when the connection goes back.
            conn.execution_options(isolation_level="AUTOCOMMIT")
            yield conn

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sa.exc.DBAPIError as exc:
            if _missing_table(exc):
                self._schema_ok = False
                raise SchemaOutOfDate(
                    f"the workerkit tables are missing; {db.UPGRADE_HINT}"
                ) from exc
            if isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError) or (
                exc.connection_invalidated
            ):
                raise StoreUnavailable(
                    f"{self.dialect} database unavailable: {db.describe_error(exc, self.url)}"
                ) from exc
            raise
        except sa.exc.TimeoutError as exc:
            raise StoreUnavailable(
                f"{self.dialect} database unavailable: no pooled connection free ({exc})"
            ) from exc

    def _ensure_schema(self) -> None:
        # Checked until it has once been right, then trusted for the life of this object: a
        # newer migration applied during a rolling deploy must not stop running workers (new
        # revisions are additive; the new pods carry the code that needs them).
        if self._schema_ok:
            return
        with self._read() as conn:
            status = db.schema_status(conn)
        if not status.ok:
            raise SchemaOutOfDate(status.reason)
        self._schema_ok = True

    def _notify(self, conn: sa.Connection, queue: str) -> None:
        if self.dialect == "postgresql":
            # Delivered on commit, and only then: listeners never wake for a rolled-back job.
            conn.execute(sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, queue)))

    # --- the QueueBackend contract -------------------------------------------------------

    def enqueue(self, job: NewJob) -> bool:
        """Store the job; False (and no change) when a job with this id already exists."""
        now = db_now()
        insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        statement = (
            insert(jobs)
            .values(
                id=job.job_id,
                queue=job.queue,
                task=job.task,
                payload=job.payload,
                state="ready",
                attempts=0,
                max_attempts=job.max_attempts,
                run_at=now if job.run_at is None else job.run_at,
                enqueued_at=now,
                created_at=now,
                updated_at=now,
            )
            .on_conflict_do_nothing(index_elements=[_c.id])
            # RETURNING, not rowcount: drivers need not report a row count for an INSERT.
            .returning(_c.id)
        )
        with self._write() as conn:
            inserted = conn.execute(statement).first() is not None
            if inserted:
                self._notify(conn, job.queue)
        if inserted:
            self._wakeups.notify(job.queue)
        else:
            log.info(
                "duplicate job id; not enqueued again",
                extra={"event": "job_duplicate", "job_id": job.job_id, "queue": job.queue},
            )
        return inserted

    def claim(self, queues: Sequence[str], worker_id: str, limit: int) -> list[Delivery]:
        """Take up to ``limit`` runnable jobs (ready and due, or with an expired lease).

        One statement (:func:`_claim_statement`): on PostgreSQL one round trip in autocommit,
        on SQLite inside ``BEGIN IMMEDIATE``. A job whose lease expired with all its attempts
        used is failed by it, with the reason, instead of being run again: a job that kills its
        worker every time must end. Its slot is then filled by another round.
        """
        if limit < 1 or not queues:
            return []
        self._ensure_schema()
        params: dict[str, Any] = {
            "p_queues": list(queues),
            "p_worker": worker_id,
            "p_ttl": self.lease_ttl,
        }
        claimed: list[Delivery] = []
        exhausted: list[Any] = []
        while len(claimed) < limit:
            round_params = {**params, "p_limit": limit - len(claimed)}
            try:
                # A claim that committed just before its connection broke leaves its jobs
                # leased to a token nobody knows: they come back after V, as after a crash,
                # whether or not the claim is sent again.
                rows = self._twice_on_disconnect(functools.partial(self._claim_round, round_params))
            except StoreError:
                if not claimed:
                    raise
                # Each round committed on its own: the jobs of the earlier rounds are ours
                # (leased, attempt counted), so hand them out rather than strand them until V.
                log.warning(
                    "claim round failed; returning the jobs already claimed",
                    extra={"event": "claim_failed", "claimed": len(claimed)},
                    exc_info=True,
                )
                break
            failed = [row for row in rows if row.state == "failed"]
            exhausted.extend(failed)
            claimed.extend(_delivery(row) for row in rows if row.state == "running")
            if not failed:
                break  # everything runnable that we could lock is ours now
        for row in exhausted:
            log.warning(
                "job failed: lease expired with no attempts left",
                extra={
                    "event": "job_lease_exhausted",
                    "job_id": row.id,
                    "queue": row.queue,
                    "attempts": row.attempts,
                    "max_attempts": row.max_attempts,
                },
            )
        claimed.sort(key=lambda d: (d.enqueued_at or 0.0, d.job_id))
        return claimed

    def _claim_round(self, params: Mapping[str, Any]) -> list[Any]:
        with self._statement() as conn:
            return list(conn.execute(_CLAIM, params).all())

    def _fenced(
        self,
        statement: sa.Update,
        job_id: str,
        token: str,
        params: Mapping[str, Any] | None = None,
        *,
        notify_queue: str | None = None,
    ) -> bool:
        """One fenced UPDATE of an attempt's job; whether it matched (the lease was ours).

        A single statement needs no transaction of its own: in autocommit (PostgreSQL) it is
        atomic, and the fence is in its WHERE clause, evaluated under the row lock it takes. A
        statement with a NOTIFY runs with it in one transaction, so the NOTIFY goes out at
        commit, only when the row changed.
        """
        values = {"p_id": job_id, "p_token": token, **(params or {})}
        # Safe to send twice because the write is fenced: if the first try did commit before
        # the connection broke, the row no longer carries our token, the retry matches nothing,
        # and the caller hears LeaseLost for a job that is in fact settled as asked (and is not
        # run again). Without the retry the job would run again after V.
        matched = self._twice_on_disconnect(
            lambda: self._fenced_once(statement, values, notify_queue)
        )
        if matched and notify_queue is not None:
            self._wakeups.notify(notify_queue)
        return matched

    def _twice_on_disconnect(self, run: Callable[[], _T]) -> _T:
        """``run()``, and once more when it failed on a connection that had died.

        There is no pre-ping on the hot path (see ``db._install_idle_ping``): a pooled
        connection that the server closed a moment ago (a restart, a failover, an admin
        terminating it) fails its next statement. SQLAlchemy then invalidates the whole pool,
        so the second try gets a new connection; a database that is really down fails that one
        too, and the caller gets :class:`~workerkit.errors.StoreUnavailable`.
        """
        try:
            return run()
        except StoreUnavailable as exc:
            if not _disconnected(exc):
                raise
            log.info(
                "database connection lost; retrying once on a new connection",
                extra={"event": "store_reconnect", "error": str(exc)},
            )
        return run()

    def _fenced_once(
        self, statement: sa.Update, values: Mapping[str, Any], notify_queue: str | None
    ) -> bool:
        if notify_queue is not None and self.dialect == "postgresql":
            with self._write() as conn:
                matched = conn.execute(statement, values).rowcount == 1
                if matched:
                    self._notify(conn, notify_queue)
            return matched
        with self._statement() as conn:
            return bool(conn.execute(statement, values).rowcount == 1)

    def _settle(
        self,
        delivery: Delivery,
        what: str,
        statement: sa.Update,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        if not self._fenced(statement, delivery.job_id, delivery.token, params):
            raise LeaseLost(_FENCE_LOST.format(job_id=delivery.job_id, what=what))

    def extend(self, delivery: Delivery) -> bool:
        """Renew the lease for another V seconds; False when it was lost.

        A lease that ran out but that nobody claimed since is still this attempt's (the token
        is the owner, not the clock), so extending it succeeds. Raises
        :class:`~workerkit.errors.StoreUnavailable` when the database cannot be reached: the
        lease may well still be held, and the caller decides how long to keep trying.
        """
        return self._fenced(_EXTEND, delivery.job_id, delivery.token, {"p_ttl": self.lease_ttl})

    def save_checkpoint(
        self, delivery: Delivery, state: Any, connection: sa.Connection | None = None
    ) -> None:
        """Store the checkpoint (JSON-serializable). Fenced.

        With ``connection`` (a SQLAlchemy connection to this queue's database, inside a
        transaction that also holds the job's own writes) the fenced UPDATE runs in that
        transaction and nothing is committed here: the caller's commit makes the checkpoint
        and the writes durable together, and when the lease is gone the
        :class:`~workerkit.errors.LeaseLost` raised here makes the caller roll its writes back.
        This is :class:`~workerkit.engines.base.TransactionalQueue`.

        Why this is exactly-once on PostgreSQL (READ COMMITTED): the UPDATE locks the job row
        until the caller's transaction ends. A claimer that finds the lease expired meanwhile
        uses ``FOR UPDATE SKIP LOCKED`` and skips the locked row, so it cannot take the job
        between our fence check and our commit; and if it claimed first, our UPDATE waits for
        its lock, re-reads the row, finds another token and matches nothing. Either this
        attempt's batch commits with its cursor before anyone else reads the checkpoint, or it
        does not commit at all. On SQLite the caller's transaction holds the single write lock
        (``BEGIN IMMEDIATE``), which serializes the same way.
        """
        params = {"p_checkpoint": dump_json(state, "a checkpoint")}
        if connection is None:
            self._settle(delivery, "checkpoint", _CHECKPOINT, params)
            return
        if not isinstance(connection, sa.Connection):
            raise ConfigurationError(
                f"save_checkpoint(connection=...) takes a SQLAlchemy Connection, got "
                f"{type(connection).__name__}; with an ORM Session pass session.connection()"
            )
        if not connection.in_transaction():
            raise ConfigurationError(
                "save_checkpoint(connection=...) needs a connection inside the transaction that "
                "holds the job's writes (with engine.begin() as conn: ...); this one has none, "
                "so the checkpoint would not commit together with them"
            )
        if connection.dialect.name != self.dialect:
            raise ConfigurationError(
                f"save_checkpoint(connection=...) got a {connection.dialect.name} connection, "
                f"but the queue is on {self.dialect}: the checkpoint must commit in the queue's "
                "database, together with the job's writes"
            )
        values = {"p_id": delivery.job_id, "p_token": delivery.token, **params}
        try:
            matched = connection.execute(_CHECKPOINT, values).rowcount == 1
        except sa.exc.DBAPIError as exc:
            if _missing_table(exc):
                raise ConfigurationError(
                    "save_checkpoint(connection=...): this connection's database has no "
                    f"workerkit tables; it must be the queue's database ({self!r}), so that the "
                    "checkpoint commits together with the job's writes"
                ) from exc
            raise
        if not matched:
            raise LeaseLost(_FENCE_LOST.format(job_id=delivery.job_id, what="checkpoint"))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sa.Connection]:
        """A write transaction on the queue's database, for a job's own writes and checkpoint.

        Commits when the block ends, rolls back when it raises. On SQLite it begins with
        ``BEGIN IMMEDIATE`` (the queue's engine does that for every write transaction), so it
        waits for the write lock up front (up to the busy timeout) instead of failing with
        "database is locked" when a read turns into a write; it then holds that single lock
        until it ends, so the worker's lease renewals and other workers' claims wait for it.
        Database errors are not translated: they are the job's, and end its attempt.
        """
        with self.engine.begin() as connection:
            yield connection

    def ack(self, delivery: Delivery, result: Any) -> None:
        """The job succeeded: store the result, drop the checkpoint. Fenced."""
        encoded = dump_json(result, f"the result of task {delivery.task!r}")
        self._settle(delivery, "result", _ACK, {"p_result": encoded})

    def retry(self, delivery: Delivery, error: str, run_at: float) -> None:
        """The attempt failed; run again at ``run_at`` (epoch seconds). Fenced.

        The attempt stays consumed; the checkpoint is kept, so the next attempt resumes.
        """
        self._settle(delivery, "retry", _RETRY, {"p_run_at": run_at, "p_error": error})

    def fail(self, delivery: Delivery, error: str) -> None:
        """The job failed for good, keeping the error (and the checkpoint). Fenced."""
        self._settle(delivery, "failure", _FAIL, {"p_error": error})

    def release(self, delivery: Delivery) -> None:
        """Back to the queue now, checkpoint kept, attempt given back. Fenced."""
        if not self._release(delivery.job_id, delivery.token, delivery.queue):
            raise LeaseLost(_FENCE_LOST.format(job_id=delivery.job_id, what="release"))

    def defer(self, delivery: Delivery, run_at: float, reason: str) -> None:
        """Run again at ``run_at``, attempt given back, ``reason`` kept. Fenced."""
        self._settle(delivery, "defer", _DEFER, {"p_run_at": run_at, "p_error": reason})

    def release_ref(self, ref: Mapping[str, Any], *, crashed: bool = False) -> bool:
        """Release by :meth:`Delivery.ref`, from another process; False when already settled.

        After a crash (``crashed``) the attempt stays consumed, and a job that has used its
        last one is failed with the reason, as when its lease expires.
        """
        job_id, token = ref_parts(ref)
        queue = ref.get("queue")
        notify_queue = queue if isinstance(queue, str) else None
        if not crashed:
            return self._release(job_id, token, notify_queue)
        return self._fenced(_RELEASE_CRASHED, job_id, token, notify_queue=notify_queue)

    def _release(self, job_id: str, token: str, queue: str | None) -> bool:
        return self._fenced(_RELEASE, job_id, token, notify_queue=queue)

    def wait_for_jobs(self, queues: Sequence[str], timeout: float) -> None:
        """Block up to ``timeout`` seconds, returning early when new jobs may be there.

        Returns at once when a job of one of ``queues`` was enqueued or released (here, or on
        PostgreSQL anywhere) since this thread's previous call, so a wake-up that arrives while
        the thread is busy claiming is not lost.
        """
        if timeout <= 0:
            return
        if self.dialect == "postgresql":
            self._ensure_listener()
        self._wakeups.wait(queues, timeout)

    def _ensure_listener(self) -> None:
        with self._listener_lock:
            if self._closed:
                return
            if self._listener is None:
                self._listener = _PgListener(self.engine, self._wakeups)
            self._listener.start()

    def health(self) -> StoreHealth:
        """Can the store be used now: reachable, and the schema at head?

        The reason never contains the URL or a password.
        """
        try:
            with self._read() as conn:
                status = db.schema_status(conn)
        except StoreError as exc:
            return StoreHealth(False, str(exc))
        if status.ok:
            self._schema_ok = True
        return status

    def stats(self, queues: Sequence[str]) -> QueueStats:
        """Depth (ready and due) and the oldest ready job's age, per queue."""
        depth = dict.fromkeys(queues, 0)
        oldest = dict.fromkeys(queues, 0.0)
        if not queues:
            return QueueStats(depth, oldest)
        now = db_now()
        statement = (
            sa.select(_c.queue, sa.func.count(), now - sa.func.min(_c.run_at))
            .where(_c.queue.in_(list(queues)), _c.state == "ready", _c.run_at <= now)
            .group_by(_c.queue)
        )
        with self._read() as conn:
            for queue, count, age in conn.execute(statement):
                depth[queue] = int(count)
                oldest[queue] = max(0.0, float(age or 0.0))
        return QueueStats(depth, oldest)

    def close(self) -> None:
        """Stop listening and close every connection. The queue may not be used afterwards."""
        with self._listener_lock:
            self._closed = True
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.stop()
        self._engine.dispose()

    # --- inspection and maintenance (tests, the CLI, operators) -------------------------

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        """Everything about one job (checkpoint and result decoded), or None."""
        with self._read() as conn:
            row = conn.execute(sa.select(jobs).where(_c.id == job_id)).mappings().first()
        if row is None:
            return None
        job = {key: row[key] for key in JOB_FIELDS}
        job["checkpoint"] = load_json(job["checkpoint"])
        job["result"] = load_json(job["result"])
        return job

    def count_by_state(self, queue: str | None = None) -> dict[str, int]:
        """How many jobs are in each state (every state present, zeros included)."""
        statement = sa.select(_c.state, sa.func.count()).group_by(_c.state)
        if queue is not None:
            statement = statement.where(_c.queue == queue)
        counts = dict.fromkeys(JOB_STATES, 0)
        with self._read() as conn:
            for state, count in conn.execute(statement):
                counts[state] = int(count)
        return counts

    def purge_finished(self, older_than: float, *, include_failed: bool = False) -> int:
        """Delete succeeded jobs (and failed ones, if asked) finished over ``older_than`` s ago.

        Failed jobs are the dead-letter queue, kept with their error until purged on purpose.
        Returns how many rows were deleted.
        """
        states = ["succeeded", "failed"] if include_failed else ["succeeded"]
        statement = sa.delete(jobs).where(
            _c.state.in_(states), _c.finished_at < db_now() - older_than
        )
        with self._write() as conn:
            deleted = conn.execute(statement).rowcount
        log.info(
            "finished jobs purged",
            extra={"event": "jobs_purged", "count": deleted, "older_than": older_than},
        )
        return int(deleted)


def _delivery(row: Any) -> Delivery:
    return Delivery(
        job_id=row.id,
        task=row.task,
        queue=row.queue,
        payload=row.payload,
        attempt=row.attempts,
        max_attempts=row.max_attempts,
        token=row.lease_token,
        checkpoint=load_json(row.checkpoint),
        enqueued_at=row.run_at,
        lease_expires_at=row.lease_expires_at,
    )


def _disconnected(exc: StoreUnavailable) -> bool:
    """Whether ``exc`` came from a connection the server or the network had closed."""
    cause = exc.__cause__
    return isinstance(cause, sa.exc.DBAPIError) and bool(cause.connection_invalidated)


def _missing_table(exc: sa.exc.DBAPIError) -> bool:
    if getattr(exc.orig, "sqlstate", None) == "42P01":  # PostgreSQL undefined_table
        return True
    return "no such table" in str(exc.orig)  # SQLite says it as an OperationalError


class _Wakeups:
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


class _PgListener:
    """One dedicated ``LISTEN workerkit_jobs`` connection, read by a daemon thread.

    A dedicated psycopg connection in autocommit mode, not a pooled one: LISTEN state belongs to
    the session, and a pooled connection would carry it to unrelated work. When the connection
    breaks, the thread reconnects with backoff and, once listening again, wakes every waiter:
    notifications sent meanwhile are lost, so a claim had better look.
    """

    _POLL: Final = 0.5  # how often the thread checks for stop()

    def __init__(self, engine: sa.Engine, wakeups: _Wakeups) -> None:
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


class SqlEngine:
    """The sql engine as the supervisor sees it (:class:`~workerkit.engines.base.Engine`)."""

    name = "sql"

    def __init__(self, worker_args: Sequence[str] = ()) -> None:
        if worker_args:
            raise ConfigurationError(
                f"the sql engine takes no extra worker arguments, got {list(worker_args)!r}; "
                "its options are settings (workerkit run sql --help)"
            )

    def worker_command(self, settings: Settings) -> list[str]:
        """The native worker loop, in a fresh interpreter (settings come by environment)."""
        return [sys.executable, "-m", "workerkit.worker"]

    def app_timing(self, settings: Settings) -> AppTiming:
        """The tasks of the workerkit :class:`~workerkit.app.App` named by ``settings.app``."""
        if not settings.app:
            return AppTiming()
        from workerkit.app import App
        from workerkit.loading import import_app

        app = import_app(settings.app)
        if not isinstance(app, App):
            raise ConfigurationError(
                f"--app {settings.app!r} is a {type(app).__name__}, not a workerkit.App; the sql "
                "engine runs workerkit apps (use --engine celery or rq for theirs)"
            )
        return AppTiming(tasks=tuple(app.task_timings()))

    def release_in_flight(
        self, settings: Settings, refs: Sequence[Mapping[str, Any]], *, crashed: bool = False
    ) -> int:
        """Release deliveries whose worker died or was killed; return how many were released.

        When the database cannot be reached the rest are left alone (their leases expire
        within V and the claim query takes them back) rather than spending the shutdown
        deadline on connection timeouts.
        """
        if not refs:
            return 0
        queue = SqlQueue(settings.database_url, settings=settings)
        released = 0
        try:
            for index, ref in enumerate(refs):
                try:
                    if queue.release_ref(ref, crashed=crashed):
                        released += 1
                except StoreUnavailable as exc:
                    log.warning(
                        "cannot release in-flight jobs; their leases will expire instead",
                        extra={
                            "event": "release_failed",
                            "error": str(exc),
                            "left": len(refs) - index,
                        },
                    )
                    break
                except ValueError as exc:
                    log.warning(
                        "bad delivery ref", extra={"event": "release_failed", "error": str(exc)}
                    )
        finally:
            queue.close()
        return released
