"""The RQ engine's dashboard source: RQ's own keys read, and fenced actions on them.

Counts come from the queue lists and RQ's registries (``LLEN``, ``ZCARD``/``ZCOUNT``: constant
or logarithmic, whatever the number of jobs); pages are keyset cursors (``dashboard_pages.py``).
Every action is one Lua script that checks the job is still as the page showed it (its status and
timestamps, and its registry entry or list entry) before it changes anything. Payloads are
decoded with JSON, or a pickle reader that admits only basic types: the dashboard never runs app
code. What is shown, and how cancel maps onto RQ: docs/engines/rq.md ("Dashboard").
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Callable, Iterator
from importlib import resources
from typing import TYPE_CHECKING, Any, Final, TypeVar

import redis
import redis.exceptions
from rq.defaults import DEFAULT_FAILURE_TTL
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer

from workerkit.dashboard.model import (
    ActionRefused,
    DashboardSource,
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
from workerkit.engines.redis_presence import RedisPresenceStore, redis_time
from workerkit.engines.rq import dashboard_pages as pages
from workerkit.engines.rq.jobs import encode_state
from workerkit.engines.rq.leases import deferred_key, lease_key
from workerkit.engines.rq.options import SERIALIZER_ENV
from workerkit.engines.rq.serializers import SafePickleSerializer
from workerkit.errors import ConfigurationError, StoreUnavailable

if TYPE_CHECKING:
    from workerkit.engines.presence import Presence
    from workerkit.scheduler.contract import SchedulerBinding
    from workerkit.settings import Settings

__all__ = ("SEARCH_SCAN", "RqDashboardSource", "open_source", "presence_store")

log = logging.getLogger("workerkit.dashboard")

#: A search by task name reads at most this many entries of each queue's scheduled, running
#: and failed jobs (newest first); waiting and finished jobs are found by id only.
SEARCH_SCAN: Final = 1000
#: A page reads at most this many entries (a task filter, entries whose job hash is gone); the
#: next page goes on from there.
FILTER_SCAN: Final = 2000
#: A scheduled job due within this many seconds is not cancelled while RQ's scheduler runs for
#: its queue (it may be moving the job to its queue at that moment).
SCHEDULER_MARGIN: Final = 5.0
_UNREACHABLE: Final = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

T = TypeVar("T")


def _script(*parts: str) -> str:
    folder = resources.files(__package__ or "workerkit.engines.rq")
    return "".join(folder.joinpath(f"{part}.lua").read_text(encoding="utf-8") for part in parts)


def _client(settings: Settings) -> redis.Redis[Any]:
    url = str(settings.redis_url)
    try:
        return redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10)
    except ValueError as exc:
        raise ConfigurationError(
            f"WORKERKIT_REDIS_URL {url!r} is not a Redis URL ({exc}): give redis://HOST:PORT/DB"
        ) from exc


def dashboard_serializer() -> Any:
    """How the dashboard decodes payloads: JSON when the workers use JSON, else the safe
    pickle reader admitting basic types only (never the app's classes: nothing runs)."""
    name = os.environ.get(SERIALIZER_ENV) or "json"
    return JSONSerializer if name == "json" else SafePickleSerializer.bound_to(None)


def presence_store(settings: Settings) -> RedisPresenceStore:
    """The presence and pause store on the RQ engine's Redis (its own connection)."""
    return RedisPresenceStore(_client(settings), owns_client=True)


def open_source(settings: Settings) -> DashboardSource:
    """The dashboard source of the Redis at ``settings.redis_url``; StoreUnavailable when down."""
    connection = _client(settings)
    try:
        connection.ping()
    except _UNREACHABLE as exc:
        connection.close()
        raise StoreUnavailable(f"Redis at {settings.redis_url} unreachable: {exc}") from exc
    return RqDashboardSource(connection, settings)


class RqDashboardSource:
    """:class:`~workerkit.dashboard.model.DashboardSource` on RQ's keys."""

    engine = "rq"

    def __init__(self, connection: redis.Redis[Any], settings: Settings) -> None:
        self.connection = connection
        self.settings = settings
        self.serializer = dashboard_serializer()
        self.store = RedisPresenceStore(connection)
        self._retry = connection.register_script(_script("dash_version", "dash_retry"))
        self._discard = connection.register_script(_script("dash_version", "dash_discard"))
        self._cancel = connection.register_script(_script("dash_version", "dash_cancel"))
        self._binding: SchedulerBinding | None = None
        self._binding_read = False

    def _call(self, read: Callable[[], T]) -> T:
        try:
            return read()
        except _UNREACHABLE as exc:
            raise StoreUnavailable(f"Redis unreachable: {exc}") from exc

    def clock(self) -> float:
        return self._call(lambda: redis_time(self.connection))

    # --- queues ---------------------------------------------------------------------------

    def _queue_names(self) -> list[str]:
        names = {
            pages.text(raw).removeprefix("rq:queue:")
            for raw in self.connection.smembers("rq:queues")
        }
        return sorted(names | self.store.paused_queues())

    def queues(self) -> list[QueueSummary]:
        return self._call(self._queues)

    def _queues(self) -> list[QueueSummary]:
        names = self._queue_names()
        paused = self.store.paused_queues()
        now = redis_time(self.connection)
        with self.connection.pipeline(transaction=False) as pipeline:
            for name in names:
                pipeline.llen(f"rq:queue:{name}")
                pipeline.zcard(f"rq:scheduled:{name}")
                pipeline.zcard(f"rq:wip:{name}")
                pipeline.zcount(f"rq:failed:{name}", now, "+inf")
                pipeline.zcount(f"rq:finished:{name}", now, "+inf")
                pipeline.lindex(f"rq:queue:{name}", 0)
            replies = pipeline.execute()
        heads = [replies[6 * index + 5] for index in range(len(names))]
        with self.connection.pipeline(transaction=False) as pipeline:
            for head in heads:
                pipeline.hget(f"rq:job:{pages.text(head)}", "enqueued_at")
            stamps = pipeline.execute() if any(head is not None for head in heads) else []
        summaries = []
        for index, name in enumerate(names):
            waiting, scheduled, running, failed, finished = replies[6 * index : 6 * index + 5]
            enqueued = pages.epoch(stamps[index]) if stamps and heads[index] is not None else None
            summaries.append(
                QueueSummary(
                    name=name,
                    waiting=int(waiting),
                    scheduled=int(scheduled),
                    running=int(running),
                    failed=int(failed),
                    finished=int(finished),
                    oldest_waiting_age=max(0.0, now - enqueued) if enqueued is not None else None,
                    paused=name in paused,
                )
            )
        return summaries

    # --- jobs -----------------------------------------------------------------------------

    def jobs(self, query: JobQuery) -> JobPage:
        return self._call(lambda: self._jobs(query))

    def _entries(self, query: JobQuery) -> Iterator[pages.Entry]:
        after = pages.decode_cursor(query.cursor)
        names = [query.queue] if query.queue else self._queue_names()
        batch = pages.BATCH if query.task else max(2, min(pages.BATCH, query.limit + 1))
        for name in names:
            if after is not None and name < after.queue and query.queue is None:
                continue
            here = after if after is not None and after.queue == name else None
            source = pages.key_for(query.state, name)
            yield from pages.entries(self.connection, source, name, here, batch)

    def _jobs(self, query: JobQuery) -> JobPage:
        """Rows after the cursor up to the limit; a task filter reads at most FILTER_SCAN."""
        rows: list[JobRow] = []
        last: pages.Entry | None = None
        scanned = 0
        stream = self._entries(query)
        size = pages.BATCH if query.task else max(2, min(pages.BATCH, query.limit + 1))
        shown: list[pages.Entry] = []
        while batch := list(itertools.islice(stream, size)):
            ids = [entry.job_id(query.state) for entry in batch]
            built = self._rows(ids, query.state, [entry.position for entry in batch])
            for entry, row in zip(batch, built, strict=True):
                if len(rows) >= query.limit and last is not None:  # an entry after the page
                    cursor = pages.encode_cursor(last, shown)
                    return JobPage(tuple(rows), cursor, self._total(query))
                last, scanned = entry, scanned + 1
                if row is not None and (query.task is None or row.task == query.task):
                    rows.append(row)
                    shown.append(entry)
            if scanned >= FILTER_SCAN and last is not None:  # bounded: go on next page
                total = None if query.task else self._total(query)
                return JobPage(tuple(rows), pages.encode_cursor(last, shown), total)
        return JobPage(tuple(rows), None, self._total(query))

    def _rows(
        self, ids: list[str], state: JobState | None, positions: list[float | None]
    ) -> list[JobRow | None]:
        """Rows of ``ids`` (None for a job whose hash is gone); ``state`` None: from the hash."""
        if not ids:
            return []
        errors = state is None or state in pages.ERROR_STATES  # rows that show an error
        fields = [*pages.ROW_FIELDS, b"exc_info"] if errors else list(pages.ROW_FIELDS)
        with self.connection.pipeline(transaction=False) as pipeline:
            for job_id in ids:
                pipeline.hmget(f"rq:job:{job_id}", fields)  # never a whole (large) hash
                pipeline.pttl(lease_key(job_id))
                if errors:
                    pipeline.xrevrange(f"rq:results:{job_id}", "+", "-", count=1)
                else:
                    pipeline.echo(b"")  # a finished job's result (its return value) is not read
            replies = pipeline.execute()
        now = redis_time(self.connection)
        rows: list[JobRow | None] = []
        for index, job_id in enumerate(ids):
            values, lease_ms, results = replies[3 * index : 3 * index + 3]
            raw = {f: v for f, v in zip(fields, values, strict=True) if v is not None}
            if not raw.get(b"status") and not raw.get(b"data"):  # the hash is gone
                rows.append(None)
                continue
            here = state or pages.STATE_OF_STATUS.get(pages.text(raw.get(b"status", b"")))
            job = pages.restored(self.connection, job_id, raw, self.serializer)
            rows.append(
                pages.build_row(
                    job_id=job_id,
                    raw=raw,
                    state=here or "waiting",
                    job=job,
                    position=positions[index],
                    lease_ms=int(lease_ms) if lease_ms is not None else None,
                    result=results[0][1] if results else None,
                    now=now,
                )
            )
        return rows

    def _total(self, query: JobQuery) -> int | None:
        if query.task:
            return None
        names = [query.queue] if query.queue else self._queue_names()
        with self.connection.pipeline(transaction=False) as pipeline:
            for name in names:
                source = pages.key_for(query.state, name)
                if source.kind == "list":
                    pipeline.llen(source.key)
                else:
                    pipeline.zcard(source.key)
            return sum(int(count) for count in pipeline.execute())

    def job(self, job_id: str) -> JobDetail | None:
        return self._call(lambda: self._job(job_id))

    def _job(self, job_id: str) -> JobDetail | None:
        with self.connection.pipeline(transaction=False) as pipeline:
            pipeline.hgetall(f"rq:job:{job_id}")
            pipeline.xrevrange(f"rq:results:{job_id}", "+", "-", count=1)
            pipeline.get(lease_key(job_id))
            raw, results, lease = pipeline.execute()
        if not raw:
            return None
        state = pages.STATE_OF_STATUS.get(pages.text(raw.get(b"status", b"")), "waiting")
        position = None
        if state == "scheduled":
            position = self.connection.zscore(
                f"rq:scheduled:{pages.text(raw.get(b'origin', b''))}", job_id
            )
        [row] = self._rows([job_id], state, [position])
        if row is None:
            return None
        job = pages.restored(self.connection, job_id, raw, self.serializer)
        result = results[0][1] if results else None
        return JobDetail(
            row=row,
            args=pages.cap(_args_text(job)),
            checkpoint=pages.cap(_checkpoint_text(raw)),
            result=pages.cap(_result_text(result, self.serializer)),
            error=pages.cap(pages.error_of(raw, result)),
            extra=_extra(raw, lease),
        )

    def search(self, text: str, limit: int = 50) -> SearchResult:
        return self._call(lambda: self._search(text.strip(), limit))

    def _search(self, text: str, limit: int) -> SearchResult:
        found: list[JobRow] = []
        if text and self.connection.exists(f"rq:job:{text}"):
            row = self._job(text)
            if row is not None:
                found.append(row.row)
        if text:
            for state in ("scheduled", "running", "failed"):
                query = JobQuery(state=state, task=text, limit=limit)
                for name in self._queue_names():
                    found.extend(self._scan_task(query, name, limit - len(found)))
                    if len(found) >= limit:
                        break
        idempotency = self._idempotency(text) if text else None
        return SearchResult(tuple(found[:limit]), (idempotency,) if idempotency else ())

    def _scan_task(self, query: JobQuery, queue: str, wanted: int) -> list[JobRow]:
        if wanted <= 0:
            return []
        source = pages.key_for(query.state, queue)
        entries = pages.entries(self.connection, source, queue, None, pages.BATCH)
        batch = [entry for _, entry in zip(range(SEARCH_SCAN), entries, strict=False)]
        ids = [entry.job_id(query.state) for entry in batch]
        rows = self._rows(ids, query.state, [entry.position for entry in batch])
        return [row for row in rows if row is not None and row.task == query.task][:wanted]

    def _idempotency(self, key: str) -> IdempotencyView | None:
        from workerkit.idempotency.redis import RedisIdempotencyStore

        record = RedisIdempotencyStore(self.connection).get(key)
        if record is None:
            return None
        now = redis_time(self.connection)
        return IdempotencyView(
            key=record.key,
            state=record.state,
            owner=record.owner_token or None,
            claimed_at=None,
            completed_at=None,
            expires_at=now + record.expires_in,
            result=record.result_json,
        )

    def workers(self) -> list[Presence]:
        return self._call(self.store.list_all)

    # --- actions --------------------------------------------------------------------------

    def _act(self, action: str, job_id: str, actor: str, run: Callable[[], Any]) -> None:
        reply = self._call(run)
        code, status = int(reply[0]), pages.text(reply[1]) if len(reply) > 1 else ""
        outcome = "done" if code == 1 else "stale" if code == 0 else "refused"
        log.info(
            "dashboard %s of job %s: %s",
            action,
            job_id,
            outcome,
            extra={
                "event": "dashboard_action",
                "action": action,
                "job_id": job_id,
                "actor": actor,
                "outcome": outcome,
            },
        )
        if code == 1:
            return
        if code == -1:
            raise ActionRefused(f"job {job_id} does not exist (any more): nothing done")
        if code == -3:
            raise ActionRefused(
                f"job {job_id} is due within {SCHEDULER_MARGIN:g} s and RQ's scheduler runs for "
                "its queue: it may be enqueueing it now; nothing done (cancel it once it is "
                "waiting)"
            )
        state = pages.STATE_OF_STATUS.get(status, status)
        if code == 0:
            raise StaleAction(
                f"job {job_id} changed since the page showed it (now {state}): nothing done"
            )
        raise ActionRefused(f"job {job_id} is {state}: cannot {action} it")

    def retry_failed(self, job_id: str, version: str, actor: str) -> None:
        def run() -> Any:
            raw_state = self.connection.hget(f"rq:job:{job_id}", "workerkit")
            origin = pages.text(self.connection.hget(f"rq:job:{job_id}", "origin") or b"")
            new_state = b""
            if raw_state:
                state = pages.wk_state({b"workerkit": raw_state})
                new_state = encode_state({**state, "attempts": 0})
            queue_key = f"rq:queue:{origin}"
            enqueued_at = pages.rq_time(redis_time(self.connection))
            keys = [f"rq:job:{job_id}", f"rq:failed:{origin}", queue_key, "rq:queues"]
            args = [job_id, version, enqueued_at, new_state, raw_state or b"", queue_key]
            return self._retry(keys=keys, args=args)

        self._act("retry", job_id, actor, run)

    def discard_failed(self, job_id: str, version: str, actor: str) -> None:
        def run() -> Any:
            origin = pages.text(self.connection.hget(f"rq:job:{job_id}", "origin") or b"")
            keys = [
                f"rq:job:{job_id}",
                f"rq:failed:{origin}",
                f"rq:executions:{job_id}",
                f"rq:results:{job_id}",
                f"rq:job:{job_id}:dependents",
                f"rq:job:{job_id}:dependencies",
            ]
            return self._discard(keys=keys, args=[job_id, version, f"rq:execution:{job_id}:"])

        self._act("discard", job_id, actor, run)

    def cancel_waiting(self, job_id: str, version: str, actor: str) -> None:
        def run() -> Any:
            origin, ttl = self.connection.hmget(f"rq:job:{job_id}", ["origin", "failure_ttl"])
            queue = pages.text(origin or b"")
            failure_ttl = int(pages.text(ttl)) if ttl else DEFAULT_FAILURE_TTL
            now = redis_time(self.connection)
            score: float | str = "+inf" if failure_ttl < 0 else now + failure_ttl
            keys = [
                f"rq:job:{job_id}",
                f"rq:queue:{queue}",
                f"rq:scheduled:{queue}",
                deferred_key(queue),
                f"rq:failed:{queue}",
                RQScheduler.get_locking_key(queue),
            ]
            reason = f"cancelled by {actor} from the dashboard"
            args = [job_id, version, pages.rq_time(now), reason, score, max(0, failure_ttl)]
            return self._cancel(keys=keys, args=[*args, now + SCHEDULER_MARGIN])

        self._act("cancel", job_id, actor, run)

    def pause_queue(self, queue: str, actor: str) -> None:
        self._pause(queue, actor, paused=True)

    def resume_queue(self, queue: str, actor: str) -> None:
        self._pause(queue, actor, paused=False)

    def _pause(self, queue: str, actor: str, *, paused: bool) -> None:
        action = "pause" if paused else "resume"
        known = self._call(self._queue_names)
        if paused and queue not in known:
            listening = {name for worker in self.workers() for name in worker.queues}
            if queue not in listening:
                log.info(
                    "dashboard %s of queue %s: refused",
                    action,
                    queue,
                    extra={"event": "dashboard_action", "action": action, "queue": queue,
                           "actor": actor, "outcome": "refused"},
                )  # fmt: skip
                raise ActionRefused(f"no queue {queue!r} in this Redis: nothing paused")
        changed = self._call(lambda: self.store.set_queue_paused(queue, paused, actor))
        log.info(
            "dashboard %s of queue %s: %s",
            action,
            queue,
            "done" if changed else "unchanged",
            extra={
                "event": "dashboard_action",
                "action": action,
                "queue": queue,
                "actor": actor,
                "outcome": "done",
                "changed": changed,
            },
        )

    def scheduler(self) -> SchedulerBinding | None:
        if not self._binding_read:
            self._binding_read = True
            if self.settings.app:
                from workerkit.engines.rq.scheduling import open_scheduler
                from workerkit.engines.rq.tasks import load_app

                if load_app(self.settings).schedules:
                    self._binding = open_scheduler(self.settings)
        return self._binding

    def close(self) -> None:
        self.connection.close()


def _args_text(job: Any) -> str | None:
    if job is None:
        return None
    try:
        call = {"args": list(job.args), "kwargs": dict(job.kwargs)}
    except Exception as exc:  # the payload does not decode with a safe reader: say why
        cause = exc.__cause__ or exc
        return f"(not decoded: {type(cause).__name__}: {cause})"
    return json.dumps(call, default=repr, indent=1)


def _checkpoint_text(raw: dict[bytes, bytes]) -> str | None:
    state = pages.wk_state(raw)
    if state.get("checkpoint") is None:
        return None
    return json.dumps(state["checkpoint"], default=repr)


def _result_text(result: dict[bytes, bytes] | None, serializer: Any) -> str | None:
    kind, _, value = pages.latest_result(result)
    if kind != 1 or value is None:
        return None
    try:
        return json.dumps(serializer.loads(value), default=repr)
    except Exception as exc:
        return f"(not decoded: {type(exc).__name__}: {exc})"


def _extra(raw: dict[bytes, bytes], lease: bytes | None) -> dict[str, str]:
    extra = {
        name: pages.text(raw[field])
        for name, field in (
            ("description", b"description"),
            ("timeout", b"timeout"),
            ("retries_left", b"retries_left"),
            ("result_ttl", b"result_ttl"),
            ("failure_ttl", b"failure_ttl"),
            ("status", b"status"),
        )
        if raw.get(field)
    }
    if lease is not None:
        extra["lease"] = pages.text(lease)
    return extra
