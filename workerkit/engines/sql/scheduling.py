"""The scheduler's store on the SQL engine (:class:`SqlSchedulerStore`), on the queue's database.

The lease is one row on the database clock; a fire (record + job + trigger request) is one
transaction, and a store error raises :class:`~workerkit.errors.StoreUnavailable`. Why and how:
docs/engines/sql.md ("Periodic jobs"). ``python -m workerkit.engines.sql.scheduling`` runs the
scheduler process.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from collections.abc import Iterator, Sequence
from typing import Any, Final

import sqlalchemy as sa

from workerkit.engines.base import NewJob
from workerkit.engines.sql import db, statements
from workerkit.engines.sql.listener import NOTIFY_CHANNEL
from workerkit.engines.sql.schema import (
    db_now,
    dialect_insert,
    scheduler_fires,
    scheduler_lease,
    scheduler_schedules,
    scheduler_triggers,
)
from workerkit.errors import ConfigurationError, PayloadError, StoreError
from workerkit.scheduler.contract import (
    FireOutcome,
    FireRecord,
    LeaderInfo,
    Lease,
    Schedule,
    SchedulerBinding,
    ScheduleState,
    fire_job_id,
    fire_key,
)
from workerkit.settings import Settings

__all__ = (
    "DEFAULT_MAX_ATTEMPTS",
    "SqlSchedulerStore",
    "lock_wait",
    "main",
    "open_scheduler",
)

log = logging.getLogger(__name__)

#: Attempts of a scheduled job whose schedule does not say (``options["max_attempts"]``).
DEFAULT_MAX_ATTEMPTS: Final = 3

#: The connect timeout of the store's PostgreSQL connections unless the URL sets one (seconds):
#: a connect that hangs (a partition) holds up the runner's renewals, so it is kept well under
#: the renew deadline; the runner tries again each retry period.
_CONNECT_TIMEOUT: Final = 3

#: A float whose JSON is as long as any float's (24 characters), for the startup size check:
#: every fire's payload is at most as large as the check's.
_LONGEST_FIRE_TIME: Final = -2.2250738585072014e-308

_L = scheduler_lease.c
_F = scheduler_fires.c
_S = scheduler_schedules.c
_T = scheduler_triggers.c


class SqlSchedulerStore(db.ForkSafeEngine):
    """:class:`~workerkit.scheduler.contract.SchedulerStore` on SQLite or PostgreSQL.

    ``url`` is the queue's database (the fire's job goes into its ``workerkit_jobs``). The
    tables come from ``workerkit db upgrade`` (revision 0003); without them every call raises
    :class:`~workerkit.errors.SchemaOutOfDate`. Safe to share between threads.
    """

    def __init__(
        self,
        url: str | sa.URL,
        *,
        settings: Settings | None = None,
        namespace: str | None = None,
    ) -> None:
        self.settings = settings if settings is not None else Settings()
        self.url = db.normalize_url(url)
        self.dialect = self.url.get_backend_name()
        #: Keys every row this store reads or writes (``scheduler_namespace`` by default).
        self.namespace = namespace if namespace is not None else self.settings.scheduler_namespace
        self._adopt_engine(_create_engine(self.url, self.settings))
        self._insert = dialect_insert(self.dialect)

    def __repr__(self) -> str:
        return f"<SqlSchedulerStore {self.url.render_as_string(hide_password=True)}>"

    # --- connections and errors ----------------------------------------------------------

    def _errors(self) -> contextlib.AbstractContextManager[None]:
        return db.store_errors(
            self.url, tables="workerkit scheduler tables are", otherwise=self._store_error
        )

    def _store_error(self, exc: sa.exc.DBAPIError) -> StoreError:
        return StoreError(f"scheduler store: {db.describe_error(exc, self.url)}")

    @contextlib.contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        """One write transaction (BEGIN IMMEDIATE on SQLite), errors translated."""
        with self._errors(), self.engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        """One read-only transaction (a deferred BEGIN on SQLite: writers are not blocked)."""
        with self._errors(), self.engine.connect() as conn:
            conn.execution_options(**{db.READ_ONLY_OPTION: True})
            with conn.begin():
                yield conn

    def _current(self, conn: sa.Connection, epoch: int, holder: str | None = None) -> bool:
        """Whether ``epoch`` (of ``holder``) is the live lease's; the row stays locked until
        the transaction ends.

        ``FOR SHARE`` (PostgreSQL): a change of leader (an UPDATE of this row) waits until the
        caller's transaction commits, and a transaction that waited for one reads the new epoch;
        so a write fenced by an epoch cannot commit after that epoch ended. SQLite's single
        write lock serializes the same way.
        """
        row = conn.execute(
            sa.select(_L.epoch, _L.holder, (_L.expires_at > db_now()).label("live"))
            .where(_L.namespace == self.namespace)
            .with_for_update(read=True)
        ).first()
        return (
            row is not None
            and row.holder is not None
            and bool(row.live)
            and int(row.epoch) == epoch
            and (holder is None or row.holder == holder)
        )

    # --- leadership ----------------------------------------------------------------------

    def acquire(self, holder: str, duration: float) -> Lease | None:
        """Take or keep leadership (see the contract); a new holder means a new epoch.

        One conditional UPDATE: on PostgreSQL a second acquirer waits for the first one's row
        lock, then re-checks the condition on the row it wrote and finds it led.
        """
        now = db_now()
        leading = sa.and_(_L.holder == holder, _L.expires_at > now)
        update = (
            sa.update(scheduler_lease)
            .where(
                _L.namespace == self.namespace,
                sa.or_(_L.holder.is_(None), _L.expires_at <= now, _L.holder == holder),
            )
            .values(
                holder=holder,
                epoch=sa.case((leading, _L.epoch), else_=_L.epoch + 1),
                acquired_at=sa.case((leading, _L.acquired_at), else_=now),
                renewed_at=now,
                expires_at=now + duration,
            )
            .returning(_L.holder, _L.epoch, _L.expires_at)
        )
        seed = (
            self._insert(scheduler_lease)
            .values(namespace=self.namespace, holder=None, epoch=0, expires_at=0.0)
            .on_conflict_do_nothing(index_elements=[_L.namespace])
        )
        with self._write() as conn:
            row = conn.execute(update).first()
            if row is None and conn.execute(seed).rowcount:
                row = conn.execute(update).first()  # the very first acquire on this database
        return None if row is None else _lease(row)

    def renew(self, lease: Lease, duration: float) -> Lease | None:
        """Extend the lease by ``duration`` from now; None when ``lease`` is not the live one
        (it expired, even if nobody took it: the runner stopped firing by then anyway)."""
        now = db_now()
        update = (
            sa.update(scheduler_lease)
            .where(
                _L.namespace == self.namespace,
                _L.holder == lease.holder,
                _L.epoch == lease.epoch,
                _L.expires_at > now,
            )
            .values(expires_at=now + duration, renewed_at=now)
            .returning(_L.holder, _L.epoch, _L.expires_at)
        )
        with self._write() as conn:
            row = conn.execute(update).first()
        return None if row is None else _lease(row)

    def release(self, lease: Lease) -> None:
        """Give leadership up now; the epoch stays, so the next acquire makes a new one."""
        update = (
            sa.update(scheduler_lease)
            .where(
                _L.namespace == self.namespace,
                _L.holder == lease.holder,
                _L.epoch == lease.epoch,
            )
            .values(holder=None, expires_at=db_now())
        )
        with self._write() as conn:
            conn.execute(update)

    def leader(self) -> LeaderInfo | None:
        """Who holds an unexpired lease now, by the database clock."""
        query = sa.select(_L.holder, _L.epoch, (_L.expires_at - db_now()).label("left")).where(
            _L.namespace == self.namespace
        )
        with self._read() as conn:
            row = conn.execute(query).first()
        if row is None or row.holder is None or row.left <= 0:
            return None
        return LeaderInfo(holder=row.holder, epoch=int(row.epoch), expires_in=float(row.left))

    # --- schedules -----------------------------------------------------------------------

    def register(self, lease: Lease, schedules: Sequence[Schedule]) -> bool:
        """As leader: store each schedule's fingerprint; mark every other one removed.

        ``paused`` is left as operators set it; a schedule that comes back is not removed.
        """
        now = db_now()
        names = [schedule.name for schedule in schedules]
        with self._write() as conn:
            if not self._current(conn, lease.epoch, lease.holder):
                return False
            for schedule in schedules:
                statement = self._insert(scheduler_schedules).values(
                    namespace=self.namespace,
                    name=schedule.name,
                    fingerprint=schedule.fingerprint(),
                    task=schedule.task,
                    description=schedule.trigger.describe(),
                    paused=False,
                    removed=False,
                    registered_at=now,
                    updated_at=now,
                )
                excluded = statement.excluded
                conn.execute(
                    statement.on_conflict_do_update(
                        index_elements=[_S.namespace, _S.name],
                        set_={
                            "fingerprint": excluded.fingerprint,
                            "task": excluded.task,
                            "description": excluded.description,
                            "removed": False,
                            "registered_at": excluded.registered_at,
                            "updated_at": excluded.updated_at,
                        },
                    )
                )
            conn.execute(
                sa.update(scheduler_schedules)
                .where(_S.namespace == self.namespace, _S.name.not_in(names))
                .where(_S.removed.is_(False))
                .values(removed=True, fingerprint=None, updated_at=now)
            )
        return True

    def fire(
        self, schedule: Schedule, fire_time: float, *, epoch: int | None, reason: str
    ) -> FireOutcome:
        """Record the fire and enqueue its job in one transaction (see the module docstring).

        Checked inside it, in this order: the epoch of a live lease (``NOT_LEADER``), the
        record (``ALREADY_FIRED``), the registered fingerprint and removal (``STALE``; an
        unregistered schedule is stale too: no leader has vouched for its definition), pause
        (``PAUSED``). Four round trips on PostgreSQL besides BEGIN and COMMIT at most: the
        checks are one SELECT, the NOTIFY rides on the job's INSERT.
        """
        key = fire_key(fire_time)
        job = self._job(schedule, fire_time)
        checks = self._fire_checks(schedule.name, key, epoch)
        fingerprint = schedule.fingerprint()
        record = (
            self._insert(scheduler_fires)
            .values(
                namespace=self.namespace,
                schedule=schedule.name,
                fire_ms=key,
                fire_time=fire_time,
                job_id=job.job_id,
                reason=reason,
                epoch=epoch,
                recorded_at=db_now(),
                fingerprint=fingerprint,
            )
            .on_conflict_do_nothing(index_elements=[_F.namespace, _F.schedule, _F.fire_ms])
            .returning(_F.fire_ms)
        )
        enqueue = statements.insert_job(self.dialect, job)
        if self.dialect == "postgresql":  # wakes the workers, at commit only
            enqueue = enqueue.returning(sa.func.pg_notify(NOTIFY_CHANNEL, job.queue))
        consumed = sa.delete(scheduler_triggers).where(
            _T.namespace == self.namespace, _T.schedule == schedule.name, _T.at_ms == key
        )
        with self._write() as conn:
            row = conn.execute(checks).first()
            if row is None:  # no lease row, or the schedule was never registered
                if epoch is not None and not self._current(conn, epoch):
                    return FireOutcome.NOT_LEADER
                return FireOutcome.STALE
            if epoch is not None and not (row.holder and row.live and int(row.epoch) == epoch):
                return FireOutcome.NOT_LEADER
            if row.fired:
                if row.requested:  # a request for a time that fired: nothing left to do
                    conn.execute(consumed)
                return FireOutcome.ALREADY_FIRED
            if row.removed or row.fingerprint != fingerprint:
                return FireOutcome.STALE
            if row.paused:
                return FireOutcome.PAUSED
            if conn.execute(record).first() is None:  # fired meanwhile, by a standby
                return FireOutcome.ALREADY_FIRED
            conn.execute(enqueue)
            if row.requested:
                conn.execute(consumed)
        return FireOutcome.FIRED

    def _fire_checks(self, name: str, key: int, epoch: int | None) -> sa.Select[Any]:
        """One SELECT of what a fire checks: the schedule's row and, for a leader's fire, the
        lease row, both ``FOR SHARE`` (see :meth:`_current`); whether the time has a record
        and a trigger request."""
        ns = self.namespace
        fired = sa.exists().where(_F.namespace == ns, _F.schedule == name, _F.fire_ms == key)
        requested = sa.exists().where(_T.namespace == ns, _T.schedule == name, _T.at_ms == key)
        checks = sa.select(
            _S.fingerprint,
            _S.paused,
            _S.removed,
            fired.label("fired"),
            requested.label("requested"),
        ).where(_S.namespace == ns, _S.name == name)
        if epoch is not None:
            lease = scheduler_lease.join(scheduler_schedules, _L.namespace == ns)
            checks = checks.add_columns(
                _L.epoch, _L.holder, (_L.expires_at > db_now()).label("live")
            ).select_from(lease)
        return checks.with_for_update(read=True)

    def _job(self, schedule: Schedule, fire_time: float) -> NewJob:
        """The job of one fire: its deterministic id, the schedule's arguments and origin."""
        from workerkit.app import encode_payload

        try:
            payload = encode_payload(
                schedule.task,
                schedule.args,
                dict(schedule.kwargs),
                self.settings.max_payload_bytes,
                fired_by=(schedule.name, fire_time),
            )
        except PayloadError as exc:
            raise ConfigurationError(f"schedule {schedule.name!r}: {exc}") from exc
        attempts = schedule.options.get("max_attempts", DEFAULT_MAX_ATTEMPTS)
        return NewJob(
            job_id=fire_job_id(schedule.name, fire_time, self.namespace),
            task=schedule.task,
            queue=schedule.queue or "default",
            payload=payload,
            max_attempts=int(attempts),
        )

    def states(self, names: Sequence[str] | None = None) -> dict[str, ScheduleState]:
        """Stored state of the named schedules (every known one when None); names never
        registered are left out."""
        rows = sa.select(_S.name, _S.fingerprint, _S.paused, _S.removed)
        rows = rows.where(_S.namespace == self.namespace)
        requests = sa.select(_T.schedule, _T.at).where(_T.namespace == self.namespace)
        requests = requests.order_by(_T.at)
        if names is not None:
            rows = rows.where(_S.name.in_(list(names)))
            requests = requests.where(_T.schedule.in_(list(names)))
        with self._read() as conn:
            found = {row.name: row for row in conn.execute(rows)}
            pending: dict[str, list[float]] = {}
            for name, at in conn.execute(requests):
                pending.setdefault(name, []).append(float(at))
            wanted = [name for name in (sorted(found) if names is None else names) if name in found]
            last = {name: self._last_fire(conn, self.namespace, name) for name in wanted}
        states = {}
        for name in wanted:
            row = found[name]
            states[name] = ScheduleState(
                name=name,
                fingerprint=row.fingerprint,
                paused=bool(row.paused),
                last_fire=last[name],
                triggers=tuple(pending.get(name, ())),
                removed=bool(row.removed),
            )
        return states

    @staticmethod
    def _last_fire(conn: sa.Connection, namespace: str, name: str) -> FireRecord | None:
        row = conn.execute(
            sa.select(_F.fire_time, _F.recorded_at, _F.job_id, _F.reason, _F.fingerprint)
            .where(_F.namespace == namespace, _F.schedule == name)
            .order_by(_F.fire_ms.desc())
            .limit(1)
        ).first()
        if row is None:
            return None
        return FireRecord(
            schedule=name,
            fire_time=float(row.fire_time),
            recorded_at=float(row.recorded_at),
            job_id=row.job_id,
            reason=row.reason,
            fingerprint=row.fingerprint,
        )

    def set_paused(self, name: str, paused: bool) -> bool:
        """Pause or resume ``name``; False when no leader ever registered it."""
        update = (
            sa.update(scheduler_schedules)
            .where(_S.namespace == self.namespace, _S.name == name)
            .values(paused=paused, updated_at=db_now())
        )
        with self._write() as conn:
            return bool(conn.execute(update).rowcount == 1)

    def request_trigger(self, name: str, at: float) -> bool:
        """Ask the leader to fire ``name`` with fire time ``at``; False when it is unknown."""
        request = (
            self._insert(scheduler_triggers)
            .values(
                namespace=self.namespace,
                schedule=name,
                at_ms=fire_key(at),
                at=at,
                requested_at=db_now(),
            )
            .on_conflict_do_nothing(index_elements=[_T.namespace, _T.schedule, _T.at_ms])
        )
        known = sa.select(_S.name).where(_S.namespace == self.namespace, _S.name == name)
        with self._write() as conn:
            if conn.execute(known).first() is None:
                return False
            conn.execute(request)
        return True

    def prune(self, lease: Lease, older_than: float) -> int:
        """As leader: delete fire records with a fire time before ``older_than``, keeping
        each schedule's last one. One range delete per schedule, on the primary key."""
        cut = fire_key(older_than)
        with self._write() as conn:
            if not self._current(conn, lease.epoch, lease.holder):
                return 0
            ns = self.namespace
            names = list(conn.execute(sa.select(_S.name).where(_S.namespace == ns)).scalars())
            deleted = 0
            for name in names:
                mine = sa.and_(_F.namespace == ns, _F.schedule == name)
                last = conn.execute(sa.select(sa.func.max(_F.fire_ms)).where(mine)).scalar()
                if last is None:
                    continue
                deleted += conn.execute(
                    sa.delete(scheduler_fires).where(mine, _F.fire_ms < min(cut, int(last)))
                ).rowcount
        if deleted:
            log.info(
                "old fire records pruned",
                extra={"event": "scheduler_pruned", "count": deleted},
            )
        return deleted

    def clock(self) -> float:
        """The database's clock now (epoch seconds)."""
        with self._read() as conn:
            return float(conn.execute(sa.select(db_now())).scalar_one())

    def close(self) -> None:
        """Close every connection."""
        self._engine.dispose()


def lock_wait(settings: Settings) -> float:
    """How long one scheduler call may wait for a database lock, in seconds (1 s by default).

    Half a retry period, and at most a quarter of the renew deadline: a call that gives up is
    :class:`~workerkit.errors.StoreUnavailable`, tried again next retry period, so a renewal
    held up by a lock still lands before the deadline, and a standby's loop (which fires late
    times too) is never stuck behind a lock held by a leader that died mid-fire.
    """
    return min(settings.scheduler_retry_period / 2, settings.scheduler_renew_deadline / 4)


def _create_engine(url: sa.URL, settings: Settings) -> sa.Engine:
    """The store's engine: every wait bounded well below the renew deadline.

    SQLite: the busy timeout is :func:`lock_wait` (unless the URL's ``?timeout=`` is shorter),
    not the queue's 30 s: a worker holding the write lock makes a call StoreUnavailable instead
    of stalling the runner past its renew deadline.
    """
    wait = lock_wait(settings)
    if url.get_backend_name() == "sqlite":
        busy = min(db.sqlite_busy_timeout(url), wait)
        return db.create_engine_for(url.update_query_dict({"timeout": repr(busy)}))
    connect_args = _postgres_session(url, settings, wait)
    return db.create_engine_for(url, connect_timeout=_CONNECT_TIMEOUT, connect_args=connect_args)


def _postgres_session(url: sa.URL, settings: Settings, wait: float) -> dict[str, Any]:
    """libpq arguments so that a dead or stuck session cannot hold the scheduler up.

    A leader whose node dies inside a fire keeps its row locks until PostgreSQL notices; with
    the kernel's keepalive defaults that is over two hours, and every standby's acquire waits
    on the lease row meanwhile. So: ``lock_timeout`` = :func:`lock_wait` (1 s), a lock wait
    fails instead; ``statement_timeout`` and ``idle_in_transaction_session_timeout`` = half the
    renew deadline (5 s; the store's transactions never pause between statements, so a session
    idle that long inside one is dead, and the server ends it, releasing its locks long before
    the lease duration); TCP keepalives on both ends (idle 3 s, then 3 probes 1 s apart) and
    ``tcp_user_timeout`` (5 s) so a vanished peer is noticed in seconds. Options the URL sets
    win (they come after ours).
    """
    bound_ms = max(1, round(settings.scheduler_renew_deadline / 2 * 1000))
    idle = max(1, math.ceil(settings.scheduler_renew_deadline / 4))
    server = {
        "lock_timeout": max(1, round(wait * 1000)),
        "statement_timeout": bound_ms,
        "idle_in_transaction_session_timeout": bound_ms,
        "tcp_keepalives_idle": idle,
        "tcp_keepalives_interval": 1,
        "tcp_keepalives_count": 3,
        "tcp_user_timeout": bound_ms,
    }
    options = " ".join(f"-c {name}={value}" for name, value in server.items())
    own = url.query.get("options")
    if own:
        options += " " + (own if isinstance(own, str) else " ".join(own))
    client: dict[str, Any] = {
        "keepalives": 1,
        "keepalives_idle": idle,
        "keepalives_interval": 1,
        "keepalives_count": 3,
        "tcp_user_timeout": bound_ms,
    }
    return {"options": options} | {k: v for k, v in client.items() if k not in url.query}


def _lease(row: Any) -> Lease:
    return Lease(holder=row.holder, epoch=int(row.epoch), expires_at=float(row.expires_at))


def open_scheduler(settings: Settings) -> SchedulerBinding:
    """The store on the app's database and the app's schedules (``settings.app``).

    Raises :class:`~workerkit.errors.ConfigurationError` when there is no app, it is not a
    workerkit App, or a schedule's arguments do not fit ``max_payload_bytes``.
    """
    from workerkit.app import App, encode_payload
    from workerkit.loading import import_app

    if not settings.app:
        raise ConfigurationError(
            "the sql scheduler needs an app: set --app / WORKERKIT_APP to MODULE:ATTRIBUTE of "
            "a workerkit.App (e.g. 'myproject.tasks:app')"
        )
    app = import_app(settings.app)
    if not isinstance(app, App):
        raise ConfigurationError(
            f"--app {settings.app!r} is a {type(app).__name__}, not a workerkit.App; the sql "
            "scheduler fires the schedules declared with app.periodic / app.schedule"
        )
    app.configure_settings(settings)
    schedules = tuple(app.schedules.values())
    for schedule in schedules:
        try:  # as the fire encodes it, with the schedule and a fire time of the longest kind
            encode_payload(
                schedule.task,
                schedule.args,
                dict(schedule.kwargs),
                settings.max_payload_bytes,
                fired_by=(schedule.name, _LONGEST_FIRE_TIME),
            )
        except PayloadError as exc:
            raise ConfigurationError(f"schedule {schedule.name!r}: {exc}") from exc
    return SchedulerBinding(SqlSchedulerStore(app.database_url, settings=settings), schedules)


def main() -> None:
    """``python -m workerkit.engines.sql.scheduling``: the scheduler process of the sql engine
    (started by ``workerkit scheduler sql``); exits with the process's exit code."""
    from workerkit.scheduler.process import run_scheduler_process

    sys.exit(run_scheduler_process(open_scheduler))


if __name__ == "__main__":
    main()
