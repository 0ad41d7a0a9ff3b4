"""The SQL store's tables, as SQLAlchemy Core metadata, and the database clock.

Every time the store compares is computed by the database (:func:`db_now`), never by Python; the
migrations (:mod:`workerkit.engines.sql.migrations`) create exactly this schema, the partial
indexes of :func:`full_metadata` included (:data:`metadata` alone lacks them). Why:
docs/engines/sql.md ("The table", "Migrations").
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Final

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

if TYPE_CHECKING:
    from sqlalchemy.sql.compiler import SQLCompiler

__all__ = (
    "IDEMPOTENCY_STATES",
    "JOB_STATES",
    "VERSION_TABLE",
    "db_now",
    "dialect_insert",
    "drill_runs",
    "full_metadata",
    "idempotency_keys",
    "jobs",
    "metadata",
    "queue_pauses",
    "scheduler_fires",
    "scheduler_lease",
    "scheduler_schedules",
    "scheduler_triggers",
    "workers",
)

#: Alembic's version table for workerkit's own migrations. Not ``alembic_version``, so that an
#: application keeping its own Alembic history in the same database does not collide with ours.
VERSION_TABLE: Final = "workerkit_alembic_version"

#: ``ready`` (waiting, possibly not due yet: ``run_at`` in the future is how a delayed or
#: retried job waits, so there is no separate "scheduled" state), ``running`` (leased),
#: ``succeeded`` and ``failed`` (the dead-letter state: kept with its error until purged).
JOB_STATES: Final = ("ready", "running", "succeeded", "failed")

metadata = sa.MetaData()

jobs = sa.Table(
    "workerkit_jobs",
    metadata,
    sa.Column("id", sa.Text, nullable=False),
    sa.Column("queue", sa.Text, nullable=False),
    sa.Column("task", sa.Text, nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    # Claims taken; a release gives one back (see workerkit.engines.base).
    sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("run_at", sa.Double, nullable=False),
    sa.Column("enqueued_at", sa.Double, nullable=False),
    sa.Column("lease_token", sa.Text, nullable=True),
    sa.Column("lease_expires_at", sa.Double, nullable=True),
    sa.Column("worker_id", sa.Text, nullable=True),
    sa.Column("checkpoint", sa.Text, nullable=True),
    sa.Column("result", sa.Text, nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.Column("finished_at", sa.Double, nullable=True),
    sa.PrimaryKeyConstraint("id", name="pk_workerkit_jobs"),
    sa.CheckConstraint(
        "state IN ('ready', 'running', 'succeeded', 'failed')", name="ck_workerkit_jobs_state"
    ),
)


def dialect_insert(dialect: str) -> Any:
    """The dialect's ``insert`` construct, the one with ``on_conflict_do_nothing`` (``dialect``
    as ``engine.dialect.name``). PostgreSQL's is imported here, not at the top: importing its
    dialect costs ~30 ms, on the way to ready of a worker on SQLite."""
    if dialect == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert
    from sqlalchemy.dialects import sqlite

    return sqlite.insert


_partial_indexes_defined = False
_partial_indexes_lock = threading.Lock()  # two Index objects of one name would both be compared


def full_metadata() -> sa.MetaData:
    """:data:`metadata` with the partial indexes of ``workerkit_jobs``, for what compares the
    schema with a database (the migrations' autogenerate, the schema test).

    They are defined on first use, not at import: a ``postgresql_where`` makes SQLAlchemy import
    its whole PostgreSQL dialect (~30 ms) to check the argument, on every worker's way to ready,
    SQLite's too. Queries never need the Index objects; the migrations create the indexes.
    """
    global _partial_indexes_defined
    with _partial_indexes_lock:
        if not _partial_indexes_defined:
            _define_partial_indexes()
            _partial_indexes_defined = True
    return metadata


def _define_partial_indexes() -> None:
    # The claim query's two halves, each served by a small partial index: due jobs in run_at
    # order, and leases that ran out (their worker crashed). Finished rows, the bulk of an old
    # table, are in neither, so the claim never walks them.
    sa.Index(
        "ix_workerkit_jobs_ready",
        jobs.c.queue,
        jobs.c.run_at,
        postgresql_where=jobs.c.state == "ready",
        sqlite_where=jobs.c.state == "ready",
    )
    sa.Index(
        "ix_workerkit_jobs_lease",
        jobs.c.queue,
        jobs.c.lease_expires_at,
        postgresql_where=jobs.c.state == "running",
        sqlite_where=jobs.c.state == "running",
    )
    # The dashboard (workerkit.engines.sql.dashboard, migration 0005): dead letters per queue,
    # newest first (counts and pages), and waiting jobs by task (search, the jobs page's task
    # filter). Both hold only rows of a small state: a claim, a heartbeat or an ack never writes
    # to them.
    sa.Index(
        "ix_workerkit_jobs_failed",
        jobs.c.queue,
        jobs.c.finished_at,
        jobs.c.id,
        postgresql_where=jobs.c.state == "failed",
        sqlite_where=jobs.c.state == "failed",
    )
    sa.Index(
        "ix_workerkit_jobs_ready_task",
        jobs.c.task,
        jobs.c.run_at,
        postgresql_where=jobs.c.state == "ready",
        sqlite_where=jobs.c.state == "ready",
    )
    # workerkit.engines.sql.retention deletes by age.
    sa.Index(
        "ix_workerkit_jobs_finished",
        jobs.c.finished_at,
        postgresql_where=jobs.c.finished_at.is_not(None),
        sqlite_where=jobs.c.finished_at.is_not(None),
    )


#: ``in_progress``: claimed by the holder of ``owner_token`` until ``expires_at`` (Ip after the
#: claim), then open to a takeover. ``completed``: the run finished; its ``result`` is replayed to
#: every later run with the same fingerprint until ``expires_at`` (R after completion). A failed
#: run deletes its record. See workerkit.idempotency and docs/howto/idempotent-tasks.md.
IDEMPOTENCY_STATES: Final = ("in_progress", "completed")

idempotency_keys = sa.Table(
    "workerkit_idempotency",
    metadata,
    sa.Column("key", sa.Text, nullable=False),
    # sha256 of the canonical JSON of (task, args, kwargs): the same key with other arguments is
    # refused instead of replayed.
    sa.Column("fingerprint", sa.Text, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    # The claiming attempt's token; completion and forget are fenced by it.
    sa.Column("owner_token", sa.Text, nullable=False),
    sa.Column("result", sa.Text, nullable=True),  # JSON text, once completed
    # How many times an expired claim of this key was taken over since it was last claimed fresh
    # (a crash count, for people reading the table).
    sa.Column("takeovers", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("expires_at", sa.Double, nullable=False),
    sa.Column("claimed_at", sa.Double, nullable=False),
    sa.Column("completed_at", sa.Double, nullable=True),
    sa.PrimaryKeyConstraint("key", name="pk_workerkit_idempotency"),
    sa.CheckConstraint(
        "state IN ('in_progress', 'completed')", name="ck_workerkit_idempotency_state"
    ),
)
# purge_expired() deletes by expiry.
sa.Index("ix_workerkit_idempotency_expires_at", idempotency_keys.c.expires_at)


# --- the scheduler (workerkit.engines.sql.scheduling) -------------------------------------

# Every scheduler table is keyed by ``namespace`` first (the ``scheduler_namespace`` setting):
# two apps' schedulers on one database each have their own lease, schedules and records.

#: Leadership: one row per namespace. ``epoch`` only ever grows (a release clears ``holder``
#: and keeps it), so a fire or a registration fenced by an old epoch is refused forever after.
scheduler_lease = sa.Table(
    "workerkit_scheduler_lease",
    metadata,
    sa.Column("namespace", sa.Text, nullable=False),
    sa.Column("holder", sa.Text, nullable=True),  # None: released
    sa.Column("epoch", sa.BigInteger, nullable=False),
    sa.Column("expires_at", sa.Double, nullable=False),  # database clock
    sa.Column("acquired_at", sa.Double, nullable=True),
    sa.Column("renewed_at", sa.Double, nullable=True),
    sa.PrimaryKeyConstraint("namespace", name="pk_workerkit_scheduler_lease"),
)

#: One row per fire time that fired: the primary key is what makes a fire happen at most once,
#: whoever fires it (leader, standby, a leader of an old epoch). ``fire_ms`` is fire_key().
scheduler_fires = sa.Table(
    "workerkit_scheduler_fires",
    metadata,
    sa.Column("namespace", sa.Text, nullable=False),
    sa.Column("schedule", sa.Text, nullable=False),
    sa.Column("fire_ms", sa.BigInteger, nullable=False),
    sa.Column("fire_time", sa.Double, nullable=False),
    sa.Column("job_id", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("epoch", sa.BigInteger, nullable=True),  # None: fired by a standby
    sa.Column("recorded_at", sa.Double, nullable=False),
    sa.Column("fingerprint", sa.Text, nullable=True),  # the fired definition's
    sa.PrimaryKeyConstraint(
        "namespace", "schedule", "fire_ms", name="pk_workerkit_scheduler_fires"
    ),
)

#: Each schedule as the leader registered it, and what operators set (paused).
scheduler_schedules = sa.Table(
    "workerkit_scheduler_schedules",
    metadata,
    sa.Column("namespace", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("fingerprint", sa.Text, nullable=True),
    sa.Column("task", sa.Text, nullable=True),
    sa.Column("description", sa.Text, nullable=True),
    sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("removed", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("registered_at", sa.Double, nullable=True),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.PrimaryKeyConstraint("namespace", "name", name="pk_workerkit_scheduler_schedules"),
)

#: Trigger-now requests (``workerkit schedules trigger``), consumed by the fire of that time.
scheduler_triggers = sa.Table(
    "workerkit_scheduler_triggers",
    metadata,
    sa.Column("namespace", sa.Text, nullable=False),
    sa.Column("schedule", sa.Text, nullable=False),
    sa.Column("at_ms", sa.BigInteger, nullable=False),
    sa.Column("at", sa.Double, nullable=False),
    sa.Column("requested_at", sa.Double, nullable=False),
    sa.PrimaryKeyConstraint(
        "namespace", "schedule", "at_ms", name="pk_workerkit_scheduler_triggers"
    ),
)


# --- the dashboard (workerkit.engines.sql.dashboard) --------------------------------------

#: One row per worker (its supervisor's presence record, workerkit.engines.presence): replaced
#: every PRESENCE_INTERVAL, ``heartbeat_at`` on the database clock; rows older than a day are
#: pruned by the publishers. A worker that exited cleanly deletes its row.
workers = sa.Table(
    "workerkit_workers",
    metadata,
    sa.Column("worker_id", sa.Text, nullable=False),
    sa.Column("record", sa.Text, nullable=False),  # Presence.to_json()
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("heartbeat_at", sa.Double, nullable=False),
    sa.PrimaryKeyConstraint("worker_id", name="pk_workerkit_workers"),
)
sa.Index("ix_workerkit_workers_heartbeat_at", workers.c.heartbeat_at)

#: Paused queues: workers claim nothing from a queue listed here (read at most once a second).
queue_pauses = sa.Table(
    "workerkit_queue_pauses",
    metadata,
    sa.Column("queue", sa.Text, nullable=False),
    sa.Column("paused_at", sa.Double, nullable=False),
    sa.Column("actor", sa.Text, nullable=False),
    sa.PrimaryKeyConstraint("queue", name="pk_workerkit_queue_pauses"),
)


# --- the drill's canaries (workerkit.drill) ---------------------------------------------

#: One row per execution of a canary job (``workerkit drill``): written at its start, finished
#: at its end. ``outcome``: NULL while running (or forever, for a run whose process was killed),
#: ``completed``, ``released`` (handed back at a stop, checkpoint saved), ``failed`` (a flaky
#: canary's first attempt) or ``lease_lost``. Times are the worker's wall clock.
drill_runs = sa.Table(
    "workerkit_drill_runs",
    metadata,
    sa.Column("drill_id", sa.Text, nullable=False),
    sa.Column("run_id", sa.Text, nullable=False),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("hostname", sa.Text, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("enqueued_at", sa.Double, nullable=False),
    sa.Column("started_at", sa.Double, nullable=False),
    sa.Column("ended_at", sa.Double, nullable=True),
    sa.Column("outcome", sa.Text, nullable=True),
    sa.Column("resumed", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.PrimaryKeyConstraint("drill_id", "run_id", name="pk_workerkit_drill_runs"),
)


class db_now(FunctionElement[float]):  # noqa: N801 - reads like the SQL function it renders
    """The database's current time, as epoch seconds (a float).

    PostgreSQL: ``statement_timestamp()``, the start of the current statement. Not ``now()``,
    which is frozen at the start of the transaction (a claim that waited for a lock would grant a
    lease already partly spent), and not ``clock_timestamp()``, which is volatile: PostgreSQL
    cannot use a volatile value as an index bound, so ``run_at <= now`` would filter the whole
    backlog instead of stopping at the first rows. SQLite: ``julianday('now')``, millisecond
    precision, constant within one statement.
    """

    type = sa.Double()
    inherit_cache = True
    name = "db_now"


@compiles(db_now, "postgresql")
def _db_now_postgresql(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    return "CAST(EXTRACT(EPOCH FROM statement_timestamp()) AS DOUBLE PRECISION)"


@compiles(db_now, "sqlite")
def _db_now_sqlite(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    return "((julianday('now') - 2440587.5) * 86400.0)"


@compiles(db_now)
def _db_now_default(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    # Only for str(statement) in logs and errors: other databases are refused at engine creation.
    return "db_now()"
