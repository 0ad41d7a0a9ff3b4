"""The sql engine's queue (:class:`SqlQueue`): one row per job, leased by a token-fenced claim.

Every write after a claim is an UPDATE fenced by the lease token, so a worker whose lease ran
out and was taken over writes nothing (it hears LeaseLost); an expired lease is taken over by
the claim query itself, with no reaper. The statements are in :mod:`.statements`; the design
(claim, fence, autocommit, NOTIFY) is in docs/engines/sql.md.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import sqlalchemy as sa

from workerkit.engines.base import Delivery, NewJob, QueueStats, StoreHealth
from workerkit.engines.sql import bulk, db, retention, statements
from workerkit.engines.sql import claim as claiming
from workerkit.engines.sql.held import HeldConnection
from workerkit.engines.sql.listener import NOTIFY_CHANNEL, PgListener, SqliteWatcher, Wakeups
from workerkit.engines.sql.rules import JOB_FIELDS, dump_json, load_json, ref_parts
from workerkit.engines.sql.schema import JOB_STATES
from workerkit.engines.sql.statements import (
    ACK,
    CHECKPOINT,
    DEFER,
    EXTEND,
    FAIL,
    RELEASE,
    RELEASE_CRASHED,
    RETRY,
)
from workerkit.errors import (
    ConfigurationError,
    LeaseLost,
    SchemaOutOfDate,
    StoreError,
    StoreUnavailable,
)
from workerkit.settings import ENGINE_DEFAULT_VISIBILITY_TIMEOUT, Settings

__all__ = ("SqlQueue",)

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: On SQLite a health check waits this long at most for the write lock (seconds)...
_HEALTH_LOCK_WAIT = 1.0
#: ... and says "not ready" only once the lock has been out of its reach this long (or the busy
#: timeout, if shorter): a job's own transaction may hold the lock for seconds, and writers
#: wait for it up to the busy timeout, so one missed wait is no sign that writes fail.
_HEALTH_LOCKED_FOR = 5.0
_SQLITE_BUSY = 5
#: The connect timeout of the queue's PostgreSQL connections unless the URL sets one (seconds):
#: it bounds how long a retried write hangs in a connect to an unreachable host, which the
#: worker's claim pause after an outage covers (outage.recovery_grace).
_CONNECT_TIMEOUT = 3
#: A full disk checkpoints the WAL at most this often (seconds).
_WAL_TRUNCATE_EVERY = 5.0

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


class SqlQueue(db.ForkSafeEngine):
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
        #: How long one connect may hang (seconds; 0 on SQLite, which does not connect).
        self.connect_timeout = 0.0
        if self.dialect == "postgresql":
            given = self.url.query.get("connect_timeout")
            self.connect_timeout = float(given if isinstance(given, str) else _CONNECT_TIMEOUT)
        #: Asked inside a claim just before its write; False: claim nothing (the worker's pause).
        self.claim_gate: Callable[[], bool] | None = None
        self._adopt_engine(db.create_engine_for(self.url, connect_timeout=_CONNECT_TIMEOUT))
        #: The claim's own connection, the driver directly (see .held).
        self._held = HeldConnection(lambda: self.engine)
        #: The enqueue's own connection, the same way: a producer's enqueue is one prepared
        #: statement on a connection it keeps (another thread enqueueing meanwhile goes through
        #: the pool), ~0.1 ms of client CPU instead of ~0.3.
        self._enqueue_held = HeldConnection(lambda: self.engine)
        self._schema_ok = False
        self._wakeups = Wakeups()
        self._listener: PgListener | SqliteWatcher | None = None
        self._listener_lock = threading.Lock()
        self._closed = False
        self._wal_truncated_at = -_WAL_TRUNCATE_EVERY
        self._locked_since: float | None = None  # SQLite: health checks missing the write lock

    def __repr__(self) -> str:
        return f"<SqlQueue {self.url.render_as_string(hide_password=True)}>"

    # --- connections and errors ----------------------------------------------------------

    def _after_fork(self) -> None:
        # The parent's LISTEN (or SQLite watch) thread did not survive the fork; the next wait
        # starts another. New wake-ups too: a thread of the parent's may have held their lock
        # at the fork, and their callback is the old watcher's.
        self._listener = None
        self._listener_lock = threading.Lock()  # the parent's may have been held at the fork
        self._wakeups = Wakeups()
        self._held.forget()
        self._enqueue_held.forget()

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

    def _errors(self) -> contextlib.AbstractContextManager[None]:
        return db.store_errors(
            self.url,
            tables="workerkit tables are",
            on_schema_missing=self._schema_missing,
            on_disk_full=self._disk_full,
        )

    def _disk_full(self) -> str:
        """SQLITE_FULL: checkpoint the WAL into the database file and truncate it.

        The WAL only grows while nothing checkpoints it, and a full disk made the automatic
        checkpoints fail: truncating it gives its space back, so the queue writes again once
        the disk has room (the failed write itself is retried by its caller). At most every
        few seconds, however many writes fail.
        """
        now = time.monotonic()
        if now - self._wal_truncated_at < _WAL_TRUNCATE_EVERY:
            return "the WAL was checkpointed a moment ago"
        self._wal_truncated_at = now
        try:
            raw = self.engine.raw_connection()  # autocommit: no transaction around the pragma
            try:
                cursor = raw.cursor()
                row = cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                cursor.close()
            finally:
                raw.close()
        except Exception as exc:
            outcome = f"WAL checkpoint failed: {db.describe_error(exc)}"
        else:
            busy = bool(row and row[0])
            outcome = (
                "WAL checkpoint blocked by a reader; will try again"
                if busy
                else "WAL checkpointed and truncated to give space back"
            )
        log.warning(
            "SQLite disk full; %s",
            outcome,
            extra={"event": "sqlite_disk_full", "outcome": outcome},
        )
        return outcome

    def _schema_missing(self) -> None:
        self._schema_ok = False

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
        # PostgreSQL: one round trip in autocommit, the NOTIFY in the INSERT's RETURNING (sent at
        # its commit, only for a new row). SQLite: one BEGIN IMMEDIATE transaction.
        statement = statements.insert_job_statement(self.dialect)
        params = statements.insert_job_params(job, NOTIFY_CHANNEL)
        with self._errors(), self._enqueue_held.connection() as execute:
            if execute is not None:
                rows, _ = execute(statement, params)
        if execute is None:  # the held connection is busy (another thread's enqueue)
            with self._statement() as conn:
                rows = list(conn.execute(statement, params))
        inserted = bool(rows)
        if inserted:
            self._wakeups.notify(job.queue)
        else:
            log.info(
                "duplicate job id; not enqueued again",
                extra={"event": "job_duplicate", "job_id": job.job_id, "queue": job.queue},
            )
        return inserted

    def enqueue_many(self, jobs: Sequence[NewJob]) -> list[bool]:
        """Store the jobs in one transaction; for each, whether it went in.

        False for a job whose id exists already or came earlier in ``jobs``: skipped, as by
        :meth:`enqueue`. All or nothing. One INSERT per chunk (:mod:`.bulk`), one NOTIFY.
        """
        if not (unique := bulk.first_of_each_id(jobs)):
            return []
        with self._write() as conn:
            inserted = bulk.insert_jobs(conn, self.dialect, unique)
            woken = sorted({job.queue for job in unique if job.job_id in inserted})
            if woken and self.dialect == "postgresql":
                bulk.notify_queues(conn, woken)
        for queue in woken:
            self._wakeups.notify(queue)
        flags = bulk.went_in(jobs, inserted)
        if not all(flags):
            duplicates = [job.job_id for job, new in zip(jobs, flags, strict=True) if not new]
            log.info(
                "duplicate job ids; not enqueued again",
                extra={
                    "event": "job_duplicate",
                    "duplicates": len(duplicates),
                    "job_ids": duplicates[:10],
                },
            )
        return flags

    def claim(self, queues: Sequence[str], worker_id: str, limit: int) -> list[Delivery]:
        """Take up to ``limit`` runnable jobs (ready and due, or with an expired lease).

        One statement (:data:`~workerkit.engines.sql.statements.CLAIM`): on PostgreSQL one
        round trip in autocommit, on SQLite inside ``BEGIN IMMEDIATE``. A job whose lease
        expired with all its attempts used is failed by it, with the reason, instead of being
        run again: a job that kills its worker every time must end. Its slot is then filled by
        another round.
        """
        deliveries = claiming.claim(self, queues, worker_id, limit)[0]
        self._wakeups.claimed(bool(deliveries))
        return deliveries

    def ack_and_claim(
        self, acks: Sequence[claiming.Ack], queues: Sequence[str], worker_id: str, limit: int
    ) -> tuple[list[bool], list[Delivery]]:
        """Settle ``acks`` (each as :meth:`ack`, fenced) and :meth:`claim`, in one write.

        For each ack whether it matched (False: the lease was lost, nothing was written), and
        the jobs claimed. One statement on PostgreSQL, one transaction on SQLite (:mod:`.claim`).
        """
        deliveries, acked = claiming.claim(self, queues, worker_id, limit, acks)
        self._wakeups.claimed(bool(deliveries))
        return [ack.job_id in acked for ack in acks], deliveries

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
        return self._fenced(EXTEND, delivery.job_id, delivery.token, {"p_ttl": self.lease_ttl})

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
            self._settle(delivery, "checkpoint", CHECKPOINT, params)
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
            matched = connection.execute(CHECKPOINT, values).rowcount == 1
        except sa.exc.DBAPIError as exc:
            if db.is_missing_table(exc):
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
        self._settle(delivery, "result", ACK, {"p_result": encoded})

    def retry(self, delivery: Delivery, error: str, run_at: float) -> None:
        """The attempt failed; run again at ``run_at`` (epoch seconds). Fenced.

        The attempt stays consumed; the checkpoint is kept, so the next attempt resumes.
        """
        self._settle(delivery, "retry", RETRY, {"p_run_at": run_at, "p_error": error})

    def fail(self, delivery: Delivery, error: str) -> None:
        """The job failed for good, keeping the error (and the checkpoint). Fenced."""
        self._settle(delivery, "failure", FAIL, {"p_error": error})

    def release(self, delivery: Delivery) -> None:
        """Back to the queue now, checkpoint kept, attempt given back. Fenced."""
        if not self._release(delivery.job_id, delivery.token, delivery.queue):
            raise LeaseLost(_FENCE_LOST.format(job_id=delivery.job_id, what="release"))

    def defer(self, delivery: Delivery, run_at: float, reason: str) -> None:
        """Run again at ``run_at``, attempt given back, ``reason`` kept. Fenced."""
        self._settle(delivery, "defer", DEFER, {"p_run_at": run_at, "p_error": reason})

    def release_ref(self, ref: Mapping[str, Any], *, crashed: bool = False) -> bool:
        """Release by :meth:`Delivery.ref`, from another process; False when already settled.

        After a crash (``crashed``) the attempt stays consumed, and a job that has used its
        last one is failed with the reason, as when its lease expires. A prefetched delivery
        (``ref["prefetched"]``: claimed, never started) gets its attempt back even then.
        """
        job_id, token = ref_parts(ref)
        queue = ref.get("queue")
        notify_queue = queue if isinstance(queue, str) else None
        if not crashed or ref.get("prefetched"):
            return self._release(job_id, token, notify_queue)
        return self._fenced(RELEASE_CRASHED, job_id, token, notify_queue=notify_queue)

    def _release(self, job_id: str, token: str, queue: str | None) -> bool:
        return self._fenced(RELEASE, job_id, token, notify_queue=queue)

    def wait_for_jobs(self, queues: Sequence[str], timeout: float) -> None:
        """Block up to ``timeout`` seconds, returning early when new jobs may be there.

        Returns at once when a job of one of ``queues`` was enqueued or released (here, or on
        PostgreSQL anywhere) since this thread's previous call, so a wake-up that arrives while
        the thread is busy claiming is not lost.
        """
        if timeout <= 0:
            return
        # First, in a forked child: drops the parent's watcher and wake-ups (_after_fork).
        # Without it the child restarted the parent's watcher object, whose wake pipe the
        # parent's own watcher thread still reads: a child's wait could sleep to its timeout.
        self.engine  # noqa: B018 - the property's fork check is the point
        self._ensure_listener()
        self._wakeups.wait(queues, timeout)

    def _ensure_listener(self) -> None:
        with self._listener_lock:
            if self._closed:
                return
            if self._listener is None:
                self._listener = self._new_listener()
                if self._listener is None:
                    return  # an in-memory SQLite database: nobody else can write to it
            self._listener.start()

    def _new_listener(self) -> PgListener | SqliteWatcher | None:
        if self.dialect == "postgresql":
            return PgListener(self.engine, self._wakeups)
        path = self.url.database
        if not path or path == ":memory:" or path.startswith("file::memory:"):
            return None
        return SqliteWatcher(path, self._wakeups)

    def health(self) -> StoreHealth:
        """Can the store be used now: reachable, and the schema at head?

        On SQLite the check takes the write lock (waiting a second at most): a database that
        another process keeps locked for 5 s running (or the busy timeout, if shorter) is not
        ready, since claims and settles are about to fail; a shorter hold (a job's own
        transaction) is not. The reason never contains the URL or a password.
        """
        try:
            if self.dialect == "sqlite":
                status = self._sqlite_health()
            else:
                with self._read() as conn:
                    status = db.schema_status(conn)
        except StoreError as exc:
            return StoreHealth(False, str(exc))
        if status.ok:
            self._schema_ok = True
        return status

    def _sqlite_health(self) -> StoreHealth:
        busy = db.sqlite_busy_timeout(self.url)
        wait = min(_HEALTH_LOCK_WAIT, busy)
        started = time.monotonic()
        try:
            status = self._sqlite_lock_check(busy, wait)
        except StoreUnavailable as exc:
            if not _sqlite_busy(exc):
                raise
            if self._locked_since is None:
                self._locked_since = started
            held = time.monotonic() - self._locked_since
            if not self._schema_ok or held >= min(_HEALTH_LOCKED_FOR, busy):
                raise
            return StoreHealth(
                True,
                f"the write lock is held by a transaction (for {held:.1f} s at least); writers "
                f"wait for it up to the {busy:g} s busy timeout",
            )
        self._locked_since = None
        return status

    def _sqlite_lock_check(self, busy: float, wait: float) -> StoreHealth:
        with self._errors(), self.engine.connect() as conn:
            # On the driver's connection: through SQLAlchemy the pragma would begin the
            # transaction (and wait for the lock) before the shorter wait is set.
            driver = conn.connection.driver_connection
            assert driver is not None
            driver.execute(f"PRAGMA busy_timeout={int(wait * 1000)}")
            try:
                transaction = conn.begin()  # BEGIN IMMEDIATE: the write lock; nothing written
                try:
                    status = db.schema_status(conn)
                finally:
                    transaction.rollback()
            finally:
                driver.execute(f"PRAGMA busy_timeout={int(busy * 1000)}")
        return status

    def stats(self, queues: Sequence[str]) -> QueueStats:
        """Depth (ready and due) and the oldest ready job's age, per queue."""
        depth = dict.fromkeys(queues, 0)
        oldest = dict.fromkeys(queues, 0.0)
        if not queues:
            return QueueStats(depth, oldest)
        statement = statements.queue_stats(queues)
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
        self._held.close()
        self._enqueue_held.close()
        self._engine.dispose()

    # --- inspection and maintenance (tests, the CLI, operators) -------------------------

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        """Everything about one job (checkpoint and result decoded), or None."""
        with self._read() as conn:
            row = conn.execute(statements.select_job(job_id)).mappings().first()
        if row is None:
            return None
        job = {key: row[key] for key in JOB_FIELDS}
        job["checkpoint"] = load_json(job["checkpoint"])
        job["result"] = load_json(job["result"])
        return job

    def count_by_state(self, queue: str | None = None) -> dict[str, int]:
        """How many jobs are in each state (every state present, zeros included)."""
        statement = statements.count_by_state(queue)
        counts = dict.fromkeys(JOB_STATES, 0)
        with self._read() as conn:
            for state, count in conn.execute(statement):
                counts[state] = int(count)
        return counts

    def purge_finished(self, older_than: float, *, include_failed: bool = False) -> int:
        """Delete succeeded jobs (and failed ones, if asked) finished over ``older_than`` s ago.

        Failed jobs are the dead-letter queue, kept with their error until purged on purpose.
        Deletes in batches of short transactions (:mod:`.retention`); returns how many went.
        """
        states = retention.FINISHED_STATES if include_failed else ("succeeded",)
        with self._errors():
            deleted = retention.purge_jobs(self.engine, older_than, states=states)
        log.info(
            "finished jobs purged",
            extra={"event": "jobs_purged", "count": deleted, "older_than": older_than},
        )
        return deleted


def _sqlite_busy(exc: StoreUnavailable) -> bool:
    """Whether ``exc`` is SQLite's SQLITE_BUSY: the write lock was not free within the wait."""
    cause = exc.__cause__
    code = getattr(getattr(cause, "orig", None), "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF == _SQLITE_BUSY


def _disconnected(exc: StoreUnavailable) -> bool:
    """Whether ``exc`` came from a connection the server or the network had closed."""
    cause = exc.__cause__
    return isinstance(cause, sa.exc.DBAPIError) and bool(cause.connection_invalidated)
