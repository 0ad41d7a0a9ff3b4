"""The SQL statements of the sql engine, named, in one place.

The hot ones (claim, heartbeat, settle) are built once, at import, with bind parameters, so
that SQLAlchemy compiles each once per dialect instead of rebuilding it on every call; the rest
are built per call by the functions at the end. docs/engines/sql.md explains the claim.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.visitors import InternalTraversal

from workerkit.engines.sql.rules import CRASH_EXHAUSTED_ERROR, lease_exhausted_error
from workerkit.engines.sql.schema import JOB_STATES, db_now, dialect_insert, jobs

if TYPE_CHECKING:
    from sqlalchemy.sql.compiler import SQLCompiler

    from workerkit.engines.base import NewJob

__all__ = (
    "ACK",
    "ACK_AND_CLAIM",
    "CHECKPOINT",
    "CLAIM",
    "DEFER",
    "EXTEND",
    "FAIL",
    "RELEASE",
    "RELEASE_CRASHED",
    "RETRY",
    "among",
    "count_by_state",
    "insert_job",
    "insert_job_params",
    "insert_job_statement",
    "queue_stats",
    "select_job",
)

_c = jobs.c

# Parameter names carry a ``p_`` prefix because a bindparam named after a column of an UPDATE
# is reserved for its SET clause.
#
# States are SQL literals, not bound parameters: the planners can only use the partial
# indexes (``WHERE state = 'ready'``, ``'running'``) when the query's own WHERE clause says the
# same with a constant. A parameter would do for PostgreSQL's first custom plans, but not for
# the generic plan of a statement psycopg has prepared, nor ever for SQLite.


def _state(name: str) -> sa.ColumnElement[str]:
    if name not in JOB_STATES:  # pragma: no cover - a typo here, caught at import
        raise ValueError(f"not a job state: {name!r}")
    return sa.literal_column(f"'{name}'", sa.Text)


_ONE: Final = sa.literal_column("1", sa.Integer)  # in the text, not a parameter per call
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


class among(sa.sql.expression.ColumnElement[Any]):  # noqa: N801 - reads like SQL
    """``column IN (select)``; on PostgreSQL ``column = ANY(ARRAY(select))``.

    For ``WHERE id IN (a few ids from a LIMITed subquery)`` over a table that may be large.

    The claim's ``id IN (expired UNION ALL ready)``: PostgreSQL cannot know how many ids the
    CTEs give (their LIMIT is a parameter, guessed at a tenth of the rows the index range
    holds), so with a large ``ready`` backlog it planned a hash join over a sequential scan of
    the whole table, finished rows included: a claim cost grew with the table (10x slower at
    20,000 rows, bench/queue_growth.py). ``= ANY(ARRAY(...))`` computes the ids first and
    looks each up by primary key, whatever the table holds. SQLite does the lookups by itself.
    """

    # Not sa.Boolean: on SQLite a Boolean expression in WHERE is rendered "(...) = 1", which
    # hides the IN from the planner (a full scan).
    type = sa.types.NullType()
    inherit_cache = True
    _traverse_internals = [  # noqa: RUF012 - SQLAlchemy's own convention
        ("column", InternalTraversal.dp_clauseelement),
        ("select", InternalTraversal.dp_clauseelement),
    ]

    def __init__(self, column: sa.ColumnElement[Any], select: sa.SelectBase) -> None:
        self.column = column
        self.select = select


@compiles(among)
def _among_default(element: among, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(element.column.in_(element.select), **kw)


@compiles(among, "postgresql")
def _among_postgresql(element: among, compiler: SQLCompiler, **kw: Any) -> str:
    column = compiler.process(element.column, **kw)
    select = compiler.process(element.select.scalar_subquery(), **kw)
    return f"{column} = ANY(ARRAY{select})"


def _constant(value: str) -> sa.ColumnElement[str]:
    """A string constant written into the statement's text, not sent as a parameter with every
    claim: the claim's eight constants were half its parameters, each encoded by the driver
    and bound by the server per call."""
    return sa.literal_column("'" + value.replace("'", "''") + "'", sa.Text)


def _exhausted_error_sql() -> sa.ColumnElement[str]:
    """:func:`~workerkit.engines.sql.rules.lease_exhausted_error` computed by the database, per row.

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
        return _constant(value)

    # NULLIF: Python's ``if last_error`` treats "" like None; || with NULL is NULL in both.
    earlier = sa.func.coalesce(
        text(error_head) + sa.func.nullif(_c.last_error, text("")) + text(error_tail), text("")
    )
    return (
        text(head)
        + sa.cast(_c.attempts, sa.Text)
        + text(middle)
        + sa.cast(_c.max_attempts, sa.Text)
        + text(tail)
        + earlier
    )


#: What a claim returns of each row it took (or failed).
_CLAIMED: Final = (
    "id",
    "state",
    "task",
    "queue",
    "payload",
    "attempts",
    "max_attempts",
    "lease_token",
    "checkpoint",
    "run_at",
    "lease_expires_at",
)


def _claim_statement(keep_out: sa.ColumnElement[bool] | None = None) -> sa.Update:
    """Take up to ``p_limit`` runnable jobs of ``p_queues`` in one statement.

    ``keep_out``: a condition on ``id`` that both scans add, keeping out the jobs whose acks the
    same write carries (:data:`ACK_AND_CLAIM`, :data:`CLAIM_EXCEPT`). An acked job's lease may
    have run out; and an ack that matched nothing (a stale token) may be of a job that another
    worker put back to ready meanwhile: claiming it here would start it in this worker while its
    old attempt's thread has not ended yet.

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
    keep = () if keep_out is None else (keep_out,)
    expired = (
        sa.select(_c.id)
        .where(
            _c.queue.in_(queues),
            _c.state == _RUNNING,
            _c.lease_expires_at < now,
            *keep,
        )
        .order_by(_c.lease_expires_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("expired")
        .prefix_with("MATERIALIZED", dialect="postgresql")
    )
    taken_over = sa.select(sa.func.count()).select_from(expired).scalar_subquery()
    ready = (
        sa.select(_c.id)
        .where(_c.queue.in_(queues), _c.state == _READY, _c.run_at <= now, *keep)
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
        .where(among(_c.id, picked))
        .values(
            state=sa.case((exhausted, _FAILED), else_=_RUNNING),
            lease_token=sa.case((exhausted, sa.null()), else_=_new_token()),
            lease_expires_at=sa.case(
                (exhausted, sa.null()), else_=now + sa.bindparam("p_ttl", type_=sa.Double)
            ),
            worker_id=sa.case((exhausted, _c.worker_id), else_=sa.bindparam("p_worker")),
            attempts=sa.case((exhausted, _c.attempts), else_=_c.attempts + _ONE),
            last_error=sa.case((exhausted, _exhausted_error_sql()), else_=_c.last_error),
            finished_at=sa.case((exhausted, now), else_=_c.finished_at),
            updated_at=now,
        )
        .returning(*(_c[name] for name in _CLAIMED))
    )


def _ack_and_claim_statement() -> sa.CompoundSelect[Any]:
    """PostgreSQL: acknowledge jobs, each fenced by its token, and claim, in one statement.

    The acks come as three arrays (``p_ack_ids``, ``p_ack_tokens``, ``p_ack_results``) in a
    data-modifying CTE (``acked``) that sets exactly what :data:`ACK` sets, under the same
    fence (id, token, running): a stale token matches no row and settles nothing. The claim is
    :data:`CLAIM` with the acked ids kept out of both its scans (a lease that ran out while its
    job finished is still that attempt's until someone else claims it; a stale ack's job must
    not start here beside its old attempt). PostgreSQL
    runs a data-modifying CTE exactly once, to completion, whatever the outer query reads; the
    statement is one transaction in autocommit. Rows: the claimed ones (as :data:`CLAIM`
    returns them), then one per ack that matched, with ``state`` = ``'acked'``.
    """
    text_array = sa.ARRAY(sa.Text)
    acks = sa.func.unnest(
        sa.bindparam("p_ack_ids", type_=text_array),
        sa.bindparam("p_ack_tokens", type_=text_array),
        sa.bindparam("p_ack_results", type_=text_array),
    )
    given = acks.table_valued("id", "token", "result").render_derived(name="given")
    ack_ids = sa.bindparam("p_ack_ids", type_=text_array)
    acked = (
        sa.update(jobs)
        # ``id = ANY(ids)`` says nothing the join does not, but lets the planner find the acked
        # rows by primary key: without it, it walked every running row (the lease index) and
        # joined, ~0.45 ms more per statement with 1,000 jobs running elsewhere.
        .where(
            _c.id == sa.any_(ack_ids),
            _c.id == given.c.id,
            _c.lease_token == given.c.token,
            _c.state == _RUNNING,
        )
        .values(updated_at=db_now(), result=given.c.result, **_ACKED)
        .returning(_c.id)
        .cte("acked")
    )
    keep_out = _c.id != sa.all_(sa.bindparam("p_ack_ids", type_=text_array))
    claimed = _claim_statement(keep_out).cte("claimed")
    rows = [claimed.c[name] for name in _CLAIMED]
    marks = [sa.null()] * (len(rows) - 2)
    return sa.union_all(
        sa.select(*rows), sa.select(acked.c.id, sa.literal_column("'acked'", sa.Text), *marks)
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
#: What an ack sets besides the result (here and in ACK_AND_CLAIM's ``acked``).
_ACKED: Final = {"state": _SUCCEEDED, "checkpoint": sa.null(), "finished_at": db_now(), **_NO_LEASE}
CLAIM: Final = _claim_statement()
#: CLAIM but none of ``p_except`` (the ids of the acks the same write carries or carried).
CLAIM_EXCEPT: Final = _claim_statement(_c.id.not_in(sa.bindparam("p_except", expanding=True)))
ACK: Final = _fenced_update(result=_param("result", sa.Text()), **_ACKED)
#: PostgreSQL only (SQLite runs ACK per job, then CLAIM, in one BEGIN IMMEDIATE transaction).
ACK_AND_CLAIM: Final = _ack_and_claim_statement()
EXTEND: Final = _fenced_update(lease_expires_at=db_now() + _param("ttl", sa.Double()))
CHECKPOINT: Final = _fenced_update(checkpoint=_param("checkpoint", sa.Text()))
RETRY: Final = _fenced_update(
    state=_READY,
    run_at=_param("run_at", sa.Double()),
    last_error=_param("error", sa.Text()),
    **_NO_LEASE,
)
FAIL: Final = _fenced_update(
    state=_FAILED, last_error=_param("error", sa.Text()), finished_at=db_now(), **_NO_LEASE
)
DEFER: Final = _fenced_update(
    state=_READY,
    run_at=_param("run_at", sa.Double()),
    attempts=_c.attempts - 1,
    last_error=_param("error", sa.Text()),
    **_NO_LEASE,
)
RELEASE: Final = _fenced_update(
    state=_READY, run_at=db_now(), attempts=_c.attempts - 1, **_NO_LEASE
)
_CRASHED_EXHAUSTED = _c.attempts >= _c.max_attempts
RELEASE_CRASHED: Final = _fenced_update(
    state=sa.case((_CRASHED_EXHAUSTED, _FAILED), else_=_READY),
    last_error=sa.case((_CRASHED_EXHAUSTED, CRASH_EXHAUSTED_ERROR), else_=_c.last_error),
    finished_at=sa.case((_CRASHED_EXHAUSTED, db_now()), else_=None),
    run_at=db_now(),
    **_NO_LEASE,
)


# --- built per call (not on the claim/settle path) -----------------------------------------


def insert_job(dialect: str, job: NewJob) -> sa.Insert:
    """Insert ``job`` as ready unless its id exists; RETURNING its id when it was inserted."""
    now = db_now()
    insert = dialect_insert(dialect)
    statement: sa.Insert = (
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
    return statement


@functools.cache
def insert_job_statement(dialect: str) -> sa.Insert:
    """The enqueue of one job (:meth:`SqlQueue.enqueue`): :func:`insert_job` with bind
    parameters for the job's fields, built once per dialect, not per call (building and caching
    a statement per job cost ~0.3 ms of the producer's CPU); on PostgreSQL with
    ``pg_notify(:p_channel, :p_queue)`` in its RETURNING."""
    now = db_now()
    insert = dialect_insert(dialect)
    statement: sa.Insert = (
        insert(jobs)
        .values(
            id=sa.bindparam("p_id"),
            queue=sa.bindparam("p_queue"),
            task=sa.bindparam("p_task"),
            payload=sa.bindparam("p_payload"),
            state="ready",
            attempts=0,
            max_attempts=sa.bindparam("p_max_attempts"),
            run_at=sa.func.coalesce(sa.bindparam("p_run_at", type_=_c.run_at.type), now),
            enqueued_at=now,
            created_at=now,
            updated_at=now,
        )
        .on_conflict_do_nothing(index_elements=[_c.id])
        .returning(_c.id)
    )
    if dialect == "postgresql":
        statement = statement.returning(
            sa.func.pg_notify(
                sa.bindparam("p_channel", type_=sa.Text), sa.bindparam("p_queue", type_=sa.Text)
            )
        )
    return statement


def insert_job_params(job: NewJob, channel: str) -> dict[str, Any]:
    """The parameters of :func:`insert_job_statement` for ``job``."""
    return {
        "p_id": job.job_id,
        "p_queue": job.queue,
        "p_task": job.task,
        "p_payload": job.payload,
        "p_max_attempts": job.max_attempts,
        "p_run_at": job.run_at,
        "p_channel": channel,
    }


def queue_stats(queues: Sequence[str]) -> sa.Select[Any]:
    """(queue, ready-and-due count, age of the oldest) for each of ``queues`` with any."""
    now = db_now()
    return (
        sa.select(_c.queue, sa.func.count(), now - sa.func.min(_c.run_at))
        .where(_c.queue.in_(list(queues)), _c.state == "ready", _c.run_at <= now)
        .group_by(_c.queue)
    )


def select_job(job_id: str) -> sa.Select[Any]:
    """The whole row of one job."""
    return sa.select(jobs).where(_c.id == job_id)


def count_by_state(queue: str | None) -> sa.Select[Any]:
    """(state, count) over every job, or those of ``queue``."""
    statement = sa.select(_c.state, sa.func.count()).group_by(_c.state)
    if queue is not None:
        statement = statement.where(_c.queue == queue)
    return statement
