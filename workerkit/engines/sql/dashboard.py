"""The sql engine's :class:`~workerkit.dashboard.model.DashboardSource`: its tables as the
dashboard reads and changes them.

Counts and pages go through partial indexes of the small states (ready, running, failed); the
succeeded bulk is only walked newest first by ``ix_workerkit_jobs_finished``, a bounded window
per page, and never counted. Pages use keyset cursors. Every action is one statement fenced by
the job's state, attempts and ``updated_at`` as the page showed them. docs/engines/sql.md
("Dashboard").
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final, NoReturn

import sqlalchemy as sa

from workerkit.dashboard.model import (
    ActionRefused,
    IdempotencyView,
    JobDetail,
    JobPage,
    JobQuery,
    JobRow,
    JobState,
    QueueSummary,
    SearchResult,
    StaleAction,
)
from workerkit.engines.sql import db
from workerkit.engines.sql.listener import NOTIFY_CHANNEL
from workerkit.engines.sql.presence_store import SqlPresenceStore, presence_store
from workerkit.engines.sql.schema import db_now, idempotency_keys, jobs, queue_pauses
from workerkit.errors import ConfigurationError, SchemaOutOfDate

if TYPE_CHECKING:
    from workerkit.app import App
    from workerkit.engines.presence import Presence
    from workerkit.scheduler.contract import SchedulerBinding
    from workerkit.settings import Settings

__all__ = ("FINISHED_WINDOW", "TEXT_CAP", "SqlDashboardSource", "open_source", "presence_store")

log = logging.getLogger("workerkit.dashboard")

#: Texts of a job's detail (arguments, checkpoint, result, error) are cut at this many chars.
TEXT_CAP: Final = 64 * 1024
#: A page of finished jobs looks at this many finished rows (newest first) per page row at most:
#: a page filtered by queue or task may come back short, with a next link, never scanning on.
FINISHED_WINDOW: Final = 20

_c = jobs.c


def _state(name: str) -> sa.ColumnElement[str]:
    # A literal, not a parameter: the planners pick a partial index only for a constant.
    return sa.literal_column(f"'{name}'", sa.Text)


_READY, _RUNNING, _FAILED = (_state(name) for name in ("ready", "running", "failed"))

#: What a list row needs (no payload, checkpoint or result text).
_LIST: Final = (
    _c.id,
    _c.queue,
    _c.task,
    _c.state,
    _c.attempts,
    _c.max_attempts,
    _c.run_at,
    _c.enqueued_at,
    _c.finished_at,
    _c.worker_id,
    _c.lease_expires_at,
    sa.case((_c.checkpoint.is_(None), 0), else_=1).label("has_checkpoint"),
    _c.last_error,
    _c.updated_at,
    db_now().label("now"),
)


#: The queues with ready jobs: a skip scan of ix_workerkit_jobs_ready (one probe per queue).
_READY_QUEUES: Final = sa.text(
    "WITH RECURSIVE q(name) AS ("
    " SELECT MIN(queue) FROM workerkit_jobs WHERE state = 'ready'"
    " UNION ALL SELECT (SELECT MIN(queue) FROM workerkit_jobs"
    " WHERE state = 'ready' AND queue > q.name) FROM q WHERE q.name IS NOT NULL"
    ") SELECT name FROM q WHERE name IS NOT NULL"
)


def _version(state: str, attempts: int, updated_at: float) -> str:
    return f"{state}|{attempts}|{updated_at!r}"


def _parse_version(version: str) -> tuple[str, int, float] | None:
    try:
        state, attempts, updated_at = version.split("|", 2)
        return state, int(attempts), float(updated_at)
    except ValueError:
        return None


def _shown(state: str, run_at: float, now: float) -> JobState:
    if state == "ready":
        return "waiting" if run_at <= now else "scheduled"
    if state == "succeeded":
        return "finished"
    return "running" if state == "running" else "failed"


def _last_line(text: str | None) -> str | None:
    if not text:
        return None
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else None


def _job_row(row: Any) -> JobRow:
    shown = _shown(row.state, row.run_at, row.now)
    return JobRow(
        id=row.id,
        queue=row.queue,
        task=row.task,
        state=shown,
        attempt=int(row.attempts),
        max_attempts=int(row.max_attempts),
        enqueued_at=row.enqueued_at,
        # When a ready job is (was) due; a running attempt's start is not stored.
        run_at=row.run_at if row.state == "ready" else None,
        finished_at=row.finished_at,
        worker=row.worker_id,
        lease_expires_at=row.lease_expires_at,
        has_checkpoint=bool(row.has_checkpoint),
        error=_last_line(row.last_error),
        version=_version(row.state, int(row.attempts), float(row.updated_at)),
    )


def _encode_cursor(at: float, job_id: str) -> str:
    raw = json.dumps([at, job_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str | None) -> tuple[float, str] | None:
    """A cursor back to its key; None (the first page) for none or one that is not ours."""
    if not cursor:
        return None
    try:
        at, job_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return float(at), str(job_id)
    except (ValueError, TypeError):
        return None


def _after(column: sa.ColumnElement[Any], key: tuple[float, str] | None, *, desc: bool) -> Any:
    """The keyset condition: rows after ``key`` in (column, id) order, an index range."""
    if key is None:
        return sa.true()
    at, job_id = key
    if desc:
        return sa.and_(column <= at, sa.or_(column < at, _c.id < job_id))
    return sa.and_(column >= at, sa.or_(column > at, _c.id > job_id))


def _head(column: sa.ColumnElement[str], name: str) -> tuple[sa.ColumnElement[Any], ...]:
    """A text column's first TEXT_CAP characters and its length, cut by the database (SQLite
    and PostgreSQL both have ``substr`` and ``length`` in characters): a 5 MB payload is not
    read to show 64 KiB of it."""
    return (
        sa.func.substr(column, 1, TEXT_CAP).label(name),
        sa.func.length(column).label(f"{name}_length"),
    )


def _cap(text: str | None, what: str, notes: list[str], length: int | None = None) -> str | None:
    """``text`` cut at TEXT_CAP; ``length``: the whole text's, when the database cut it."""
    full = len(text) if length is None and text is not None else length
    if text is None or full is None or full <= TEXT_CAP:
        return text
    notes.append(f"{what} cut at {TEXT_CAP // 1024} KiB of {full} characters")
    return text[:TEXT_CAP]


class SqlDashboardSource:
    """The dashboard's view of one SQL database (SQLite or PostgreSQL). Thread-safe."""

    engine = "sql"

    def __init__(self, engine: sa.Engine, settings: Settings, app: App | None = None) -> None:
        self._engine = engine
        self._url = engine.url
        self._dialect = engine.dialect.name
        self._settings = settings
        self._app = app
        self._presence = SqlPresenceStore(engine)
        self._scheduler: SchedulerBinding | None = None

    def __repr__(self) -> str:
        return f"<SqlDashboardSource {self._url.render_as_string(hide_password=True)}>"

    @contextlib.contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        with db.store_errors(self._url, tables="workerkit tables are"), self._engine.connect() as c:
            c.execution_options(**{db.READ_ONLY_OPTION: True})
            with c.begin():
                yield c

    @contextlib.contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        with db.store_errors(self._url, tables="workerkit tables are"), self._engine.begin() as c:
            yield c

    def check(self) -> None:
        """Reach the database and check its schema (``SchemaOutOfDate``: run db upgrade)."""
        with self._read() as conn:
            status = db.schema_status(conn)
        if not status.ok:
            raise SchemaOutOfDate(status.reason)

    def clock(self) -> float:
        with self._read() as conn:
            return float(conn.execute(sa.select(db_now())).scalar_one())

    # --- queues -------------------------------------------------------------------------

    def queues(self) -> list[QueueSummary]:
        """Per queue: counts through the ready, running and failed partial indexes (range
        scans, index-only where the visibility map allows); ``finished`` is None (only a scan
        of the succeeded rows could count them)."""
        now = db_now()
        zero, none = sa.literal(0, sa.Integer), sa.null()

        def ready(name: str) -> sa.Select[Any]:
            # Per queue, so that each count is a range of ix_workerkit_jobs_ready (queue,
            # run_at): grouping the whole backlog made PostgreSQL scan the table.
            def of(*where: sa.ColumnElement[bool]) -> Any:
                mine = (_c.state == _READY, _c.queue == name, *where)
                return sa.select(sa.func.count()).where(*mine).scalar_subquery()

            due = of(_c.run_at <= now)
            oldest = sa.select(sa.func.min(_c.run_at)).where(_c.state == _READY, _c.queue == name)
            tag = sa.literal("ready", sa.Text)
            later = of(_c.run_at > now)  # the count column: the scheduled ones (disjoint)
            return sa.select(
                sa.literal(name, sa.Text), tag, later, due, oldest.scalar_subquery(), now
            )

        def grouped(state: str) -> sa.Select[Any]:
            tag = sa.literal(state, sa.Text)
            return (
                sa.select(_c.queue, tag, sa.func.count(), zero, none, none)
                .where(_c.state == _state(state))
                .group_by(_c.queue)
            )

        found: dict[str, dict[str, Any]] = {}
        with self._read() as conn:
            names = list(conn.execute(_READY_QUEUES).scalars())
            counts = sa.union_all(*map(ready, names), grouped("running"), grouped("failed"))
            rows = conn.execute(counts).all()
            paused = set(conn.execute(sa.select(queue_pauses.c.queue)).scalars())
        for queue, state, count, due_count, oldest, at in rows:
            entry = found.setdefault(queue, {})
            entry[state] = int(count)
            if state == "ready":
                entry["due"] = int(due_count or 0)
                entry["ready"] += entry["due"]
                entry["age"] = (float(at) - float(oldest)) if entry["due"] else None
        every = set(found) | paused | self._known_queues()
        return [self._summary(name, found.get(name, {}), name in paused) for name in sorted(every)]

    @staticmethod
    def _summary(name: str, counts: dict[str, Any], paused: bool) -> QueueSummary:
        due = counts.get("due", 0)
        return QueueSummary(
            name=name,
            waiting=due,
            scheduled=counts.get("ready", 0) - due,
            running=counts.get("running", 0),
            failed=counts.get("failed", 0),
            finished=None,
            oldest_waiting_age=max(0.0, counts["age"]) if counts.get("age") is not None else None,
            paused=paused,
        )

    def _known_queues(self) -> set[str]:
        """Queues with no job in a small state yet: the app's tasks', the workers'."""
        names = {task.queue for task in self._app.tasks.values()} if self._app else set()
        with contextlib.suppress(Exception):  # the workers' page reports its own errors
            for presence in self._presence.list_all():
                names.update(presence.queues)
        names.discard("")
        return names

    # --- job lists ----------------------------------------------------------------------

    def jobs(self, query: JobQuery) -> JobPage:
        limit = max(1, min(int(query.limit), 500))
        key = _decode_cursor(query.cursor)
        if query.state == "finished":
            return self._finished_page(query, limit, key)
        now = db_now()
        order: sa.ColumnElement[Any]
        if query.state in ("waiting", "scheduled"):
            when = _c.run_at <= now if query.state == "waiting" else _c.run_at > now
            where, order, desc = [_c.state == _READY, when], _c.run_at, False
        elif query.state == "running":
            # By when it became due (unchanged while it runs, so pages do not shift).
            where, order, desc = [_c.state == _RUNNING], _c.run_at, False
        else:
            where, order, desc = [_c.state == _FAILED], _c.finished_at, True
        if query.queue:
            where.append(_c.queue == query.queue)
        if query.task:
            where.append(_c.task == query.task)
        sort = (order.desc(), _c.id.desc()) if desc else (order, _c.id)

        def page_of(*extra: sa.ColumnElement[bool]) -> sa.Select[Any]:
            after = _after(order, key, desc=desc)
            return sa.select(*_LIST).where(*where, *extra, after).order_by(*sort).limit(limit + 1)

        ready = query.state in ("waiting", "scheduled")
        with self._read() as conn:
            statement = page_of()
            if ready and not query.queue and not query.task:
                # Each queue's range of ix_workerkit_jobs_ready (queue, run_at), merged: no sort
                # of the whole backlog, whatever its size.
                names = list(conn.execute(_READY_QUEUES).scalars())
                if len(names) > 1:
                    parts = [page_of(_c.queue == name).subquery() for name in names]
                    merged = sa.union_all(*(sa.select(part) for part in parts)).subquery()
                    statement = sa.select(merged).order_by(merged.c.run_at, merged.c.id)
                    statement = statement.limit(limit + 1)
            rows = conn.execute(statement).all()
            total = None
            if not ready and not query.task:  # the small states: counted through their index
                total = int(conn.execute(sa.select(sa.func.count()).where(*where)).scalar_one())
        page = [_job_row(row) for row in rows[:limit]]
        more = None
        if len(rows) > limit:
            last = rows[limit - 1]
            more = _encode_cursor(float(getattr(last, order.key)), last.id)
        return JobPage(tuple(page), more, total)

    def _finished_page(self, query: JobQuery, limit: int, key: tuple[float, str] | None) -> JobPage:
        """Succeeded jobs newest first, walking ``ix_workerkit_jobs_finished`` a window of
        ``FINISHED_WINDOW * limit`` rows at most (filters apply within it)."""
        window = FINISHED_WINDOW * limit
        light = (
            sa.select(_c.id, _c.finished_at, _c.state, _c.queue, _c.task)
            .where(_c.finished_at.is_not(None), _after(_c.finished_at, key, desc=True))
            .order_by(_c.finished_at.desc(), _c.id.desc())
            .limit(window)
        )
        with self._read() as conn:
            seen = conn.execute(light).all()
            wanted = [
                row
                for row in seen
                if row.state == "succeeded"
                and (not query.queue or row.queue == query.queue)
                and (not query.task or row.task == query.task)
            ]
            ids = [row.id for row in wanted[:limit]]
            full = conn.execute(sa.select(*_LIST).where(_c.id.in_(ids))).all() if ids else []
        by_id = {row.id: row for row in full}
        page = [_job_row(by_id[i]) for i in ids if i in by_id]
        last = (
            wanted[limit - 1]
            if len(wanted) > limit
            else (seen[-1] if len(seen) == window else None)
        )
        more = _encode_cursor(float(last.finished_at), last.id) if last is not None else None
        return JobPage(tuple(page), more, None)

    def job(self, job_id: str) -> JobDetail | None:
        statement = sa.select(
            *_LIST,
            *_head(_c.payload, "payload"),
            *_head(_c.checkpoint, "checkpoint"),
            *_head(_c.result, "result"),
            _c.created_at,
        ).where(_c.id == job_id)
        with self._read() as conn:
            row = conn.execute(statement).first()
        if row is None:
            return None
        notes: list[str] = []
        return JobDetail(
            row=_job_row(row),
            args=_cap(row.payload, "arguments", notes, row.payload_length),
            checkpoint=_cap(row.checkpoint, "checkpoint", notes, row.checkpoint_length),
            result=_cap(row.result, "result", notes, row.result_length),
            error=_cap(row.last_error, "error", notes),
            extra={
                "stored state": row.state,
                "created_at": repr(row.created_at),
                "updated_at": repr(row.updated_at),
                **({"note": "; ".join(notes)} if notes else {}),
            },
        )

    def search(self, text: str, limit: int = 50) -> SearchResult:
        """A job by id (primary key); jobs by task name among the waiting, scheduled, running
        and failed ones (through ``ix_workerkit_jobs_ready_task`` and the small running and
        failed sets; succeeded jobs are found by id only); the idempotency record keyed ``text``.
        """
        text = text.strip()
        if not text:
            return SearchResult((), ())
        limit = max(1, min(int(limit), 500))
        by_task = (
            sa.select(*_LIST)
            .where(_c.state == _READY, _c.task == text)
            .order_by(_c.run_at.desc())
            .limit(limit),
            sa.select(*_LIST).where(_c.state == _RUNNING, _c.task == text).limit(limit),
            sa.select(*_LIST)
            .where(_c.state == _FAILED, _c.task == text)
            .order_by(_c.finished_at.desc())
            .limit(limit),
        )
        key = idempotency_keys.c.key
        with self._read() as conn:
            exact = conn.execute(sa.select(*_LIST).where(_c.id == text)).all()
            named = [row for statement in by_task for row in conn.execute(statement).all()]
            records = conn.execute(sa.select(idempotency_keys).where(key == text)).all()
        named.sort(key=lambda row: -(row.enqueued_at or 0.0))
        rows = [*exact, *(row for row in named if row.id != text)]
        return SearchResult(
            tuple(_job_row(row) for row in rows[:limit]), tuple(_idempotency(r) for r in records)
        )

    def workers(self) -> list[Presence]:
        return self._presence.list_all()

    # --- actions ------------------------------------------------------------------------

    def retry_failed(self, job_id: str, version: str, actor: str) -> None:
        self._act("retry", job_id, version, actor, "failed", self._retry_statement)

    def discard_failed(self, job_id: str, version: str, actor: str) -> None:
        self._act("discard", job_id, version, actor, "failed", lambda fence: _discard(fence))

    def cancel_waiting(self, job_id: str, version: str, actor: str) -> None:
        error = f"cancelled by {actor} from the dashboard"
        self._act("cancel", job_id, version, actor, "ready", lambda fence: _cancel(fence, error))

    @staticmethod
    def _retry_statement(fence: sa.ColumnElement[bool]) -> sa.Update:
        now = db_now()
        return (
            sa.update(jobs)
            .where(fence)
            .values(
                state=_READY,
                run_at=now,
                attempts=0,
                finished_at=None,
                lease_token=None,
                lease_expires_at=None,
                updated_at=now,
            )
            .returning(_c.queue)
        )

    def _act(
        self,
        action: str,
        job_id: str,
        version: str,
        actor: str,
        expected: str,
        statement: Callable[[sa.ColumnElement[bool]], Any],
    ) -> None:
        """One fenced statement: the row changes only if it is still as the page showed it."""
        shown = _parse_version(version)
        if shown is None or shown[0] != expected:
            what = "waiting or scheduled" if expected == "ready" else expected
            self._refuse(action, job_id, actor, f"only a {what} job can be: {action} refused")
        state, attempts, updated_at = shown
        fence = sa.and_(
            _c.id == job_id,
            _c.state == _state(state),
            _c.attempts == attempts,
            _c.updated_at == updated_at,
        )
        with self._write() as conn:
            queue = conn.execute(statement(fence)).scalar()
            if queue is not None and action == "retry" and self._dialect == "postgresql":
                conn.execute(sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, queue)))
        if queue is not None:
            _log(action, actor, "done", job_id=job_id)
            return
        now = self._current_state(job_id)
        if now is None:
            self._refuse(action, job_id, actor, "no such job (any more): nothing done")
        _log(action, actor, "stale", job_id=job_id)
        raise StaleAction(
            f"job {job_id} changed since the page showed it (now {now}): nothing done"
        )

    def _refuse(self, action: str, job_id: str, actor: str, why: str) -> NoReturn:
        _log(action, actor, "refused", job_id=job_id)
        raise ActionRefused(f"job {job_id}: {why}")

    def _current_state(self, job_id: str) -> JobState | None:
        with self._read() as conn:
            row = conn.execute(
                sa.select(_c.state, _c.run_at, db_now()).where(_c.id == job_id)
            ).first()
        return None if row is None else _shown(row[0], row[1], row[2])

    def pause_queue(self, queue: str, actor: str) -> None:
        self._pause(queue, actor, paused=True)

    def resume_queue(self, queue: str, actor: str) -> None:
        self._pause(queue, actor, paused=False)

    def _pause(self, queue: str, actor: str, *, paused: bool) -> None:
        action = "pause" if paused else "resume"
        if not queue.strip():
            _log(action, actor, "refused", queue=queue)
            raise ActionRefused("a queue name is needed")
        changed = self._presence.set_queue_paused(queue, paused, actor)
        _log(action, actor, "done", queue=queue, changed=changed)

    # --- the rest -----------------------------------------------------------------------

    def scheduler(self) -> SchedulerBinding | None:
        """The SQL scheduler's binding (workerkit.engines.sql.scheduling) when the app declares
        schedules; made once, closed with the source."""
        if self._app is None or not self._app.schedules:
            return None
        if self._scheduler is None:
            from workerkit.engines.sql.scheduling import open_scheduler

            self._scheduler = open_scheduler(self._settings)
        return self._scheduler

    def close(self) -> None:
        if self._scheduler is not None:
            with contextlib.suppress(Exception):
                self._scheduler.store.close()
        self._engine.dispose()


def _discard(fence: sa.ColumnElement[bool]) -> Any:
    return sa.delete(jobs).where(fence).returning(_c.queue)


def _cancel(fence: sa.ColumnElement[bool], error: str) -> sa.Update:
    now = db_now()
    return (
        sa.update(jobs)
        .where(fence)
        .values(state=_FAILED, last_error=error, finished_at=now, updated_at=now)
        .returning(_c.queue)
    )


def _idempotency(row: Any) -> IdempotencyView:
    return IdempotencyView(
        key=row.key,
        state=row.state,
        owner=row.owner_token,
        claimed_at=row.claimed_at,
        completed_at=row.completed_at,
        expires_at=row.expires_at,
        result=row.result if row.result is None else row.result[:TEXT_CAP],
    )


def _log(action: str, actor: str, outcome: str, **fields: Any) -> None:
    log.info(
        "dashboard %s %s: %s",
        action,
        fields.get("job_id") or fields.get("queue"),
        outcome,
        extra={
            "event": "dashboard_action",
            "action": action,
            "actor": actor,
            "outcome": outcome,
            **fields,
        },
    )


def _load_app(settings: Settings) -> App | None:
    if not settings.app:
        return None
    from workerkit.app import App
    from workerkit.loading import import_app

    app = import_app(settings.app)
    if not isinstance(app, App):
        raise ConfigurationError(
            f"--app {settings.app!r} is a {type(app).__name__}, not a workerkit.App; the sql "
            "dashboard reads the queue of a workerkit App"
        )
    app.configure_settings(settings)
    return app


def open_source(settings: Settings) -> SqlDashboardSource:
    """The source on the app's database (``settings.app``'s ``database_url``, else the
    ``database_url`` setting). Raises ``StoreUnavailable`` when the database cannot be reached,
    ``ConfigurationError`` on a bad URL or app, or a schema not at head ("run ``workerkit db
    upgrade``")."""
    app = _load_app(settings)
    url = app.database_url if app is not None else settings.database_url
    source = SqlDashboardSource(db.create_engine_for(url), settings, app)
    try:
        source.check()
    except SchemaOutOfDate as exc:  # the command exits 2 with the fix, not a traceback
        source.close()
        raise ConfigurationError(f"the sql dashboard cannot read this database: {exc}") from exc
    except BaseException:
        source.close()
        raise
    return source
