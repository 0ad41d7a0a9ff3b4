"""workerkit's own queue, in SQLite or PostgreSQL.

One row per job in ``workerkit_jobs`` (:mod:`workerkit.store.schema`). A claim takes a *lease*:
a random owner token and an expiry computed by the database clock, ``V`` seconds ahead
(``visibility_timeout``, 30 s by default), which heartbeats extend. Every later write of the
attempt (checkpoint, ack, retry, fail, release) is one ``UPDATE ... WHERE id = :id AND
lease_token = :token AND state = 'running'``: when another worker claimed the job since, the
token differs, nothing is written and the attempt gets :class:`~workerkit.errors.LeaseLost`.
A lease that ran out is taken over by the claim query itself: there is no reaper process.

Claims: PostgreSQL ``SELECT ... FOR UPDATE SKIP LOCKED``, so concurrent claimers skip each
other's rows instead of queueing on them; SQLite one ``BEGIN IMMEDIATE`` transaction, which
serializes claimers on the file lock (SQLite is for one host: see ``replicas``).

New jobs wake idle workers: PostgreSQL ``NOTIFY workerkit_jobs, '<queue>'`` in the enqueuing
transaction, received on one dedicated ``LISTEN`` connection per queue object; SQLite (and any
enqueue in the same process) an in-process wake-up. Other processes' SQLite enqueues are seen at
the next poll (``poll_interval``).

See docs/engines/sql.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

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

__all__ = ("NOTIFY_CHANNEL", "SqlEngine", "SqlQueue")

log = logging.getLogger(__name__)

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


class SqlQueue:
    """The SQL queue (:class:`~workerkit.engines.base.QueueBackend`), on SQLite or PostgreSQL.

    ``url`` defaults to ``settings.database_url``. Constructing one does not connect, and never
    migrates: :meth:`health` reports a schema that is not at head, and :meth:`claim` raises
    :class:`~workerkit.errors.SchemaOutOfDate`, until ``workerkit db upgrade`` has run.

    Safe to share between threads: each call checks a connection out of the engine's pool for
    one transaction.
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

        A job whose lease expired with all its attempts used is failed here, with the reason,
        instead of being run again: a job that kills its worker every time must end.
        """
        if limit < 1 or not queues:
            return []
        self._ensure_schema()
        claimed: list[Delivery] = []
        exhausted_jobs: list[tuple[str, str, int, int]] = []
        with self._write() as conn:
            while len(claimed) < limit:
                rows = self._lock_runnable(conn, list(queues), limit - len(claimed))
                if not rows:
                    break
                take: list[str] = []
                exhausted = 0
                for row in rows:
                    if row.state == "running" and row.attempts >= row.max_attempts:
                        self._fail_exhausted(conn, row)
                        exhausted_jobs.append((row.id, row.queue, row.attempts, row.max_attempts))
                        exhausted += 1
                    else:
                        take.append(row.id)
                if take:
                    claimed.extend(self._take(conn, take, worker_id))
                if not exhausted:
                    break  # everything runnable that we could lock is ours now
        for job_id, queue, attempts, max_attempts in exhausted_jobs:
            log.warning(
                "job failed: lease expired with no attempts left",
                extra={
                    "event": "job_lease_exhausted",
                    "job_id": job_id,
                    "queue": queue,
                    "attempts": attempts,
                    "max_attempts": max_attempts,
                },
            )
        claimed.sort(key=lambda d: (d.enqueued_at or 0.0, d.job_id))
        return claimed

    def _lock_runnable(self, conn: sa.Connection, queues: list[str], want: int) -> list[Any]:
        """Lock up to ``want`` runnable rows: expired leases first, then due jobs by run_at.

        Two queries rather than one with an OR: each is a plain range scan of its own partial
        index in the order asked for, so the LIMIT stops after ``want`` rows even when a
        backlog of millions is waiting (an OR would have to collect and sort the whole
        backlog on every claim).

        ``FOR UPDATE SKIP LOCKED`` (PostgreSQL): rows another claimer has locked are skipped,
        not waited for, so N workers take N different jobs in parallel; and a row that another
        claimer changed after our snapshot is re-checked against the WHERE clause before it is
        locked, so a job claimed a moment ago no longer matches. SQLite ignores FOR UPDATE:
        there BEGIN IMMEDIATE already made this transaction the only writer.
        """
        now = db_now()
        columns = (_c.id, _c.queue, _c.state, _c.attempts, _c.max_attempts, _c.last_error)
        expired = conn.execute(
            sa.select(*columns)
            .where(_c.queue.in_(queues), _c.state == "running", _c.lease_expires_at < now)
            .order_by(_c.lease_expires_at)
            .limit(want)
            .with_for_update(skip_locked=True)
        ).all()
        if len(expired) >= want:
            return list(expired)
        ready = conn.execute(
            sa.select(*columns)
            .where(_c.queue.in_(queues), _c.state == "ready", _c.run_at <= now)
            .order_by(_c.run_at)
            .limit(want - len(expired))
            .with_for_update(skip_locked=True)
        ).all()
        return [*expired, *ready]

    def _fail_exhausted(self, conn: sa.Connection, row: Any) -> None:
        now = db_now()
        conn.execute(
            sa.update(jobs)
            .where(_c.id == row.id)
            .values(
                state="failed",
                last_error=lease_exhausted_error(row.attempts, row.max_attempts, row.last_error),
                lease_token=None,
                lease_expires_at=None,
                finished_at=now,
                updated_at=now,
            )
        )

    def _take(self, conn: sa.Connection, ids: list[str], worker_id: str) -> list[Delivery]:
        tokens = {job_id: secrets.token_hex(16) for job_id in ids}
        now = db_now()
        result = conn.execute(
            sa.update(jobs)
            # The rows are locked by this transaction (FOR UPDATE, or SQLite's write lock), so
            # nothing can have claimed them between the SELECT and here.
            .where(_c.id.in_(ids))
            .values(
                state="running",
                # One statement, a distinct token per row.
                lease_token=sa.case(tokens, value=_c.id),
                lease_expires_at=now + self.lease_ttl,
                worker_id=worker_id,
                attempts=_c.attempts + 1,
                updated_at=now,
            )
            .returning(
                _c.id,
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
        return [
            Delivery(
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
            for row in result
        ]

    def _fenced(
        self,
        job_id: str,
        token: str,
        values: Mapping[str, Any],
        *,
        notify_queue: str | None = None,
    ) -> bool:
        """One fenced UPDATE of an attempt's job; whether it matched (the lease was ours)."""
        statement = (
            sa.update(jobs)
            .where(_c.id == job_id, _c.lease_token == token, _c.state == "running")
            .values(updated_at=db_now(), **values)
        )
        with self._write() as conn:
            matched = conn.execute(statement).rowcount == 1
            if matched and notify_queue is not None:
                self._notify(conn, notify_queue)
        if matched and notify_queue is not None:
            self._wakeups.notify(notify_queue)
        return matched

    def _settle(self, delivery: Delivery, what: str, values: Mapping[str, Any]) -> None:
        if not self._fenced(delivery.job_id, delivery.token, values):
            raise LeaseLost(_FENCE_LOST.format(job_id=delivery.job_id, what=what))

    def extend(self, delivery: Delivery) -> bool:
        """Renew the lease for another V seconds; False when it was lost.

        A lease that ran out but that nobody claimed since is still this attempt's (the token
        is the owner, not the clock), so extending it succeeds. Raises
        :class:`~workerkit.errors.StoreUnavailable` when the database cannot be reached: the
        lease may well still be held, and the caller decides how long to keep trying.
        """
        return self._fenced(
            delivery.job_id, delivery.token, {"lease_expires_at": db_now() + self.lease_ttl}
        )

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
        values = {"checkpoint": dump_json(state, "a checkpoint")}
        if connection is None:
            self._settle(delivery, "checkpoint", values)
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
        statement = (
            sa.update(jobs)
            .where(_c.id == delivery.job_id, _c.lease_token == delivery.token)
            .where(_c.state == "running")
            .values(updated_at=db_now(), **values)
        )
        try:
            matched = connection.execute(statement).rowcount == 1
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
        self._settle(
            delivery,
            "result",
            {
                "state": "succeeded",
                "result": encoded,
                "checkpoint": None,
                "lease_token": None,
                "lease_expires_at": None,
                "finished_at": db_now(),
            },
        )

    def retry(self, delivery: Delivery, error: str, run_at: float) -> None:
        """The attempt failed; run again at ``run_at`` (epoch seconds). Fenced.

        The attempt stays consumed; the checkpoint is kept, so the next attempt resumes.
        """
        self._settle(
            delivery,
            "retry",
            {
                "state": "ready",
                "run_at": run_at,
                "last_error": error,
                "lease_token": None,
                "lease_expires_at": None,
            },
        )

    def fail(self, delivery: Delivery, error: str) -> None:
        """The job failed for good, keeping the error (and the checkpoint). Fenced."""
        self._settle(
            delivery,
            "failure",
            {
                "state": "failed",
                "last_error": error,
                "lease_token": None,
                "lease_expires_at": None,
                "finished_at": db_now(),
            },
        )

    def release(self, delivery: Delivery) -> None:
        """Back to the queue now, checkpoint kept, attempt given back. Fenced."""
        if not self._release(delivery.job_id, delivery.token, delivery.queue):
            raise LeaseLost(_FENCE_LOST.format(job_id=delivery.job_id, what="release"))

    def defer(self, delivery: Delivery, run_at: float, reason: str) -> None:
        """Run again at ``run_at``, attempt given back, ``reason`` kept. Fenced."""
        self._settle(
            delivery,
            "defer",
            {
                "state": "ready",
                "run_at": run_at,
                "attempts": _c.attempts - 1,
                "last_error": reason,
                "lease_token": None,
                "lease_expires_at": None,
            },
        )

    def release_ref(self, ref: Mapping[str, Any], *, crashed: bool = False) -> bool:
        """Release by :meth:`Delivery.ref`, from another process; False when already settled.

        After a crash (``crashed``) the attempt stays consumed, and a job that has used its
        last one is failed with the reason, as when its lease expires.
        """
        job_id, token = ref_parts(ref)
        queue = ref.get("queue")
        if not crashed:
            return self._release(job_id, token, queue if isinstance(queue, str) else None)
        exhausted = _c.attempts >= _c.max_attempts
        now = db_now()
        return self._fenced(
            job_id,
            token,
            {
                "state": sa.case((exhausted, "failed"), else_="ready"),
                "last_error": sa.case((exhausted, CRASH_EXHAUSTED_ERROR), else_=_c.last_error),
                "finished_at": sa.case((exhausted, now), else_=None),
                "run_at": now,
                "lease_token": None,
                "lease_expires_at": None,
            },
            notify_queue=queue if isinstance(queue, str) else None,
        )

    def _release(self, job_id: str, token: str, queue: str | None) -> bool:
        return self._fenced(
            job_id,
            token,
            {
                "state": "ready",
                "run_at": db_now(),
                "attempts": _c.attempts - 1,
                "lease_token": None,
                "lease_expires_at": None,
            },
            notify_queue=queue,
        )

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
