"""The dashboard's view of a Celery app's broker Redis (``workerkit dashboard celery``).

waiting: the queue lists (every priority key) and the workers' in-flight lists (pop.py);
scheduled: kombu's ``unacked`` deliveries whose eta is still ahead (a worker holds them until
then); running: the other deliveries, with their workerkit lease; failed: workerkit's
dead-letter lists (poison.py); finished: not counted (None). Every action is one Lua script
(dash_move.lua) fenced by the exact list entry the page showed. docs/engines/celery.md
("Dashboard") has the counts, the bounds of the scans and the actions.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import itertools
import json
import logging
from collections.abc import Iterator
from importlib import resources
from typing import TYPE_CHECKING, Any, Final

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
from workerkit.engines.celery.config import configure_app, load_celery_app
from workerkit.engines.celery.dashboard_messages import Message, detail, fresh_copy, version_of
from workerkit.engines.celery.dashboard_worker import broker_client, key_prefix, presence_store
from workerkit.engines.celery.ledger import Ledger
from workerkit.engines.celery.poison import DEAD_PREFIX, dead_record
from workerkit.engines.celery.pop import REGISTRY
from workerkit.engines.redis_presence import RedisPresenceStore
from workerkit.errors import StoreUnavailable

if TYPE_CHECKING:
    from workerkit.engines.presence import Presence
    from workerkit.scheduler.contract import SchedulerBinding
    from workerkit.settings import Settings

__all__ = ("LIST_SCAN", "UNACKED_SCAN", "CeleryDashboardSource", "open_source", "presence_store")

log = logging.getLogger("workerkit.dashboard")

#: The most entries of one list a page, a search or an action's lookup reads.
LIST_SCAN: Final = 10_000
#: The most ``unacked`` deliveries read (beyond: scheduled and running are not counted).
UNACKED_SCAN: Final = 10_000
_CHUNK: Final = 500
_PRIORITY_STEPS: Final = (0, 3, 6, 9)  # kombu's default
_SEP: Final = "\x06\x16"


def _lua(name: str) -> str:
    return resources.files("workerkit.engines.celery").joinpath(name).read_text()


_MOVE: Final = _lua("dash_move.lua")
_UNACKED: Final = _lua("dash_unacked.lua")
_CANCEL_HELD: Final = _lua("dash_cancel_held.lua")


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def open_source(settings: Settings) -> CeleryDashboardSource:
    """The app named by the settings, on its broker; StoreUnavailable when Redis is down."""
    import redis

    app = load_celery_app(settings.app)
    configure_app(app, settings)
    client = broker_client(str(app.conf.broker_url), timeout=10.0)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        raise StoreUnavailable(f"the broker's Redis cannot be reached: {exc}") from exc
    return CeleryDashboardSource(app, settings, client)


class _Found:
    """Where a job was found: its state, queue, list key (None: unacked) and the entry."""

    def __init__(
        self, state: JobState, queue: str, key: str | None, entry: bytes, message: Message
    ) -> None:
        self.state, self.queue, self.key, self.entry, self.message = (
            state,
            queue,
            key,
            entry,
            message,
        )


class CeleryDashboardSource:
    """:class:`~workerkit.dashboard.model.DashboardSource` on a Celery app's broker Redis."""

    engine = "celery"

    def __init__(self, app: Any, settings: Settings, client: Any) -> None:
        self.app = app
        self.settings = settings
        self.client = client
        options = app.conf.broker_transport_options or {}
        self.prefix = key_prefix(app)
        self.sep = str(options.get("sep") or _SEP)
        self.steps = tuple(sorted(options.get("priority_steps") or _PRIORITY_STEPS))
        self.unacked_key = self.prefix + str(options.get("unacked_key") or "unacked")
        self.index_key = self.prefix + str(options.get("unacked_index_key") or "unacked_index")
        self.store = RedisPresenceStore(client, self.prefix)
        self._scheduler: SchedulerBinding | None = None

    # --- reading -------------------------------------------------------------------------

    def clock(self) -> float:
        seconds, micros = self._call(self.client.time)
        return float(seconds) + float(micros) / 1e6

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        import redis

        try:
            return fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailable(f"the broker's Redis cannot be reached: {exc}") from exc

    def queue_keys(self, queue: str) -> list[str]:
        """Its list keys (prefixed), in kombu's order: priority 0 first."""
        return [self.prefix + (f"{queue}{self.sep}{p}" if p else queue) for p in self.steps]

    def dead_key(self, queue: str) -> str:
        return self.prefix + DEAD_PREFIX + queue

    def queue_names(self) -> list[str]:
        """The app's queues, those bound in Redis, paused ones and those workers consume."""
        names: set[str] = set()
        exchanges: set[str] = set()
        with contextlib.suppress(Exception):
            for name, queue in dict(self.app.amqp.queues).items():
                names.add(str(name))
                exchanges.add(str(getattr(queue.exchange, "name", "") or name))
        names.add(str(self.app.conf.task_default_queue))
        pipe = self.client.pipeline(transaction=False)
        for exchange in sorted(exchanges):
            pipe.smembers(f"{self.prefix}_kombu.binding.{exchange}")
        for members in self._call(pipe.execute):
            names.update(_text(m).split(self.sep)[-1] for m in members)
        names.update(self.store.paused_queues())
        for presence in self.store.list_all():
            names.update(presence.queues)
        return sorted(n for n in names if n)

    def _in_flight(self) -> dict[str, list[str]]:
        """The registered in-flight lists (prefixed) by queue."""
        lists: dict[str, list[str]] = {}
        registry = self._call(self.client.hgetall, self.prefix + REGISTRY)
        for key, value in registry.items():
            with contextlib.suppress(ValueError, TypeError, KeyError):
                source = str(json.loads(_text(value))["queue"])[len(self.prefix) :]
                lists.setdefault(source.split(self.sep)[0], []).append(_text(key))
        return lists

    def _unacked(self) -> list[tuple[str, str, float | None]] | None:
        """(tag, queue, eta) of every delivery; None when there are more than UNACKED_SCAN."""
        from workerkit.engines.celery.dashboard_messages import parse_eta

        reply = self._call(
            self.client.execute_command, "EVAL", _UNACKED, 1, self.unacked_key, UNACKED_SCAN
        )
        if reply is None:
            return None
        flat = [_text(v) for v in reply]
        return [(flat[i], flat[i + 1], parse_eta(flat[i + 2])) for i in range(0, len(flat), 3)]

    def queues(self) -> list[QueueSummary]:
        names = self.queue_names()
        flights = self._in_flight()
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            for key in [*self.queue_keys(name), *flights.get(name, ())]:
                pipe.llen(key)
            pipe.llen(self.dead_key(name))
        lengths = iter(self._call(pipe.execute))
        deliveries = self._unacked()
        now = self.clock()
        paused = self.store.paused_queues()
        found: list[QueueSummary] = []
        for name in names:
            waiting = sum(next(lengths) for _ in [*self.queue_keys(name), *flights.get(name, ())])
            failed = int(next(lengths))
            scheduled: int | None = None
            running = 0
            if deliveries is not None:
                mine = [eta for _, queue, eta in deliveries if queue == name]
                scheduled = sum(1 for eta in mine if eta is not None and eta > now)
                running = len(mine) - scheduled
            # Celery's messages carry no enqueue time: the oldest waiting age is not known.
            found.append(
                QueueSummary(name, waiting, scheduled, running, failed, None, None, name in paused)
            )
        return found

    def _list_entries(self, key: str, start: int) -> Iterator[tuple[int, bytes]]:
        """(offset from the head, entry) of ``key`` from ``start``, at most LIST_SCAN read; the
        head of a kombu queue (and the newest dead-letter record) is the right end."""
        offset = start
        while offset < start + LIST_SCAN:
            chunk = self._call(self.client.lrange, key, -(offset + _CHUNK), -(offset + 1))
            for entry in reversed(chunk):
                yield offset, bytes(entry)
                offset += 1
            if len(chunk) < _CHUNK:
                return

    def _row(self, state: JobState, queue: str, entry: bytes) -> tuple[Message, JobRow]:
        if state == "failed":
            return self._dead_row(queue, entry)
        message = Message.parse(entry)
        return message, message.row(queue, state, version_of(entry))

    def _dead_row(self, queue: str, record: bytes) -> tuple[Message, JobRow]:
        try:
            data = json.loads(record)
            message = Message.parse(base64.b64decode(str(data["entry"])))
        except (ValueError, TypeError, KeyError, binascii.Error):
            data, message = {}, Message.parse(record)
        at = None
        with contextlib.suppress(ValueError, TypeError):
            when = dt.datetime.strptime(str(data.get("at")), "%Y-%m-%dT%H:%M:%SZ")
            at = when.replace(tzinfo=dt.UTC).timestamp()
        row = message.row(
            str(data.get("queue") or queue),
            "failed",
            version_of(record),
            finished_at=at,
            worker=data.get("worker"),
            error=data.get("reason"),
        )
        return message, row

    def _list_page(self, query: JobQuery, keys: list[tuple[str, str]]) -> JobPage:
        """A page of list entries: ``keys`` are (queue, list key); the cursor "k:offset"."""
        index, offset = 0, 0
        if query.cursor:
            with contextlib.suppress(ValueError):
                index, offset = (int(part) for part in query.cursor.split(":", 1))
            if index < 0 or offset < 0:  # not a cursor of ours: the first page
                index, offset = 0, 0
        rows: list[JobRow] = []
        read = 0
        while index < len(keys) and len(rows) < query.limit and read < LIST_SCAN:
            queue, key = keys[index]
            for at, entry in self._list_entries(key, offset):
                read += 1
                offset = at + 1
                _, row = self._row(query.state, queue, entry)
                if query.task is None or row.task == query.task:
                    rows.append(row)
                if len(rows) >= query.limit or read >= LIST_SCAN:
                    break
            else:
                index, offset = index + 1, 0
        more = index < len(keys)
        if more and offset:
            more = self._call(self.client.llen, keys[index][1]) > offset
            if not more:
                index, offset = index + 1, 0
                more = index < len(keys)
        total = None
        if query.task is None:
            pipe = self.client.pipeline(transaction=False)
            for _, key in keys:
                pipe.llen(key)
            total = sum(self._call(pipe.execute))
        return JobPage(tuple(rows), f"{index}:{offset}" if more else None, total)

    def _held_page(self, query: JobQuery) -> JobPage:
        """A page of deliveries (scheduled or running), by delivery time; the cursor: the
        offset in kombu's unacked index."""
        start = 0
        if query.cursor and query.cursor.isascii() and query.cursor.isdigit():
            start = int(query.cursor)  # anything else is not a cursor of ours: the first page
        now = self.clock()
        rows: list[JobRow] = []
        offset = start
        while len(rows) < query.limit and offset < start + UNACKED_SCAN:
            tags = self._call(self.client.zrange, self.index_key, offset, offset + _CHUNK - 1)
            if not tags:
                offset = -1
                break
            for row in self._deliveries([_text(t) for t in tags], now):
                offset += 1
                if row is None or row.state != query.state:
                    continue
                if query.queue not in (None, row.queue) or query.task not in (None, row.task):
                    continue
                rows.append(row)
                if len(rows) >= query.limit:
                    break
        more = offset >= 0 and self._call(self.client.zcard, self.index_key) > offset
        return JobPage(tuple(rows), str(offset) if more else None, None)

    def _deliveries(self, tags: list[str], now: float) -> list[JobRow | None]:
        """Rows of the unacked deliveries ``tags`` (None: gone meanwhile)."""
        pipe = self.client.pipeline(transaction=False)
        for tag in tags:
            lease = self.prefix + Ledger.key("lease", tag)
            pipe.hget(self.unacked_key, tag).zscore(self.index_key, tag)
            pipe.get(lease).pttl(lease)
        replies = self._call(pipe.execute)
        rows: list[JobRow | None] = []
        for i, tag in enumerate(tags):
            raw, since, holder, ttl = replies[4 * i : 4 * i + 4]
            row = None if raw is None else self._delivery_row(tag, raw, since, holder, ttl, now)
            rows.append(row)
        return rows

    def _delivery_row(
        self, tag: str, raw: bytes, since: Any, holder: Any, ttl: Any, now: float
    ) -> JobRow | None:
        try:
            payload, _exchange, routing_key = json.loads(raw)
        except (ValueError, TypeError):
            return None
        message = Message(json.dumps(payload).encode("utf-8"), payload)
        eta = message.eta
        state: JobState = "scheduled" if eta is not None and eta > now else "running"
        return message.row(
            str(routing_key),
            state,
            f"{tag}:{version_of(raw)}",
            run_at=eta if state == "scheduled" else (float(since) if since else None),
            worker=_text(holder) if holder is not None else None,
            lease_expires_at=now + int(ttl) / 1000 if holder is not None and ttl > 0 else None,
            has_checkpoint=bool(self.client.exists(Ledger.key("checkpoint", message.id))),
        )

    def _list_keys(self, state: JobState, queue: str | None) -> list[tuple[str, str]]:
        names = [queue] if queue else self.queue_names()
        if state == "failed":
            return [(name, self.dead_key(name)) for name in names]
        flights = self._in_flight()
        return [
            (name, key)
            for name in names
            for key in [*self.queue_keys(name), *flights.get(name, ())]
        ]

    def jobs(self, query: JobQuery) -> JobPage:
        if query.state in ("waiting", "failed"):
            return self._list_page(query, self._list_keys(query.state, query.queue))
        if query.state in ("scheduled", "running"):
            return self._held_page(query)
        return JobPage((), None, None)  # finished: Celery's result backend is not read

    # --- finding one job -----------------------------------------------------------------

    def _find_all(self, job_id: str) -> Iterator[_Found]:
        """Every place ``job_id`` is (bounded scans): unacked, the queue lists, dead letters."""
        needle = json.dumps(job_id).encode("utf-8")
        scan = self.client.hscan_iter(self.unacked_key, count=_CHUNK)
        for tag, raw in self._call(lambda: list(itertools.islice(scan, UNACKED_SCAN))):
            if needle in raw:
                with contextlib.suppress(ValueError, TypeError):
                    payload, _exchange, routing_key = json.loads(raw)
                    message = Message(json.dumps(payload).encode("utf-8"), payload)
                    if message.id == job_id:
                        yield _Found("running", str(routing_key), _text(tag), raw, message)
        for queue, key in self._list_keys("waiting", None):
            for _, entry in self._list_entries(key, 0):
                if needle in entry or job_id.startswith("entry-"):
                    message = Message.parse(entry)
                    if message.id == job_id:
                        yield _Found("waiting", queue, key, entry, message)
        for queue, key in self._list_keys("failed", None):
            for _, record in self._list_entries(key, 0):
                message, _row = self._dead_row(queue, record)
                if message.id == job_id:
                    yield _Found("failed", queue, key, record, message)

    def job(self, job_id: str) -> JobDetail | None:
        for found in self._find_all(job_id):
            return self._detail(found)
        return None

    def _detail(self, found: _Found) -> JobDetail:
        now = self.clock()
        if found.key is not None and found.state != "running":
            message, row = self._row(found.state, found.queue, found.entry)
            checkpoint = self._call(self.client.get, Ledger.key("checkpoint", message.id))
            extra = {"list": found.key}
            return detail(message, row, checkpoint=_opt(checkpoint), error=row.error, extra=extra)
        tag = str(found.key)
        row_or_none = self._deliveries([tag], now)[0]
        if row_or_none is None:
            row_or_none = found.message.row(found.queue, "running", f"{tag}:gone")
        checkpoint = self._call(self.client.get, Ledger.key("checkpoint", found.message.id))
        return detail(found.message, row_or_none, checkpoint=_opt(checkpoint))

    def search(self, text: str, limit: int = 50) -> SearchResult:
        """The job with id ``text``, jobs of the task ``text`` (bounded scans: LIST_SCAN
        entries of each list, UNACKED_SCAN deliveries), the idempotency record of ``text``."""
        text = text.strip()
        jobs: list[JobRow] = []
        if not text:
            return SearchResult((), ())
        for found in self._find_all(text):
            jobs.append(self._detail(found).row)
            if len(jobs) >= limit:
                break
        for state in ("running", "scheduled", "waiting", "failed"):
            if len(jobs) >= limit:
                break
            page = self.jobs(JobQuery(state=state, task=text, limit=limit - len(jobs)))
            jobs.extend(row for row in page.rows if row.id != text)
        return SearchResult(tuple(jobs[:limit]), self._idempotency(text))

    def _idempotency(self, key: str) -> tuple[IdempotencyView, ...]:
        """The record of ``key`` in workerkit.idempotency's Redis store on the broker's Redis
        (its default prefix); none when the app keeps its records elsewhere."""
        from workerkit.idempotency.redis import RedisIdempotencyStore

        try:
            record = RedisIdempotencyStore(self.client).get(key)
        except Exception as exc:
            log.debug("idempotency record not read: %s", exc)
            return ()
        if record is None:
            return ()
        now = self.clock()
        return (
            IdempotencyView(
                key=record.key,
                state=record.state,
                owner=record.owner_token or None,
                claimed_at=None,
                completed_at=None,
                expires_at=now + record.expires_in,
                result=record.result_json,
            ),
        )

    def workers(self) -> list[Presence]:
        return self._call(self.store.list_all)  # type: ignore[no-any-return]

    # --- actions -------------------------------------------------------------------------

    def _locate(
        self, job_id: str, version: str, state: JobState, action: str, actor: str
    ) -> _Found:
        """The entry of ``job_id`` in ``state`` the page showed (``version``), or StaleAction."""
        seen: list[_Found] = []
        for found in self._find_all(job_id):
            if found.state == state and version_of(found.entry) == version:
                return found
            seen.append(found)
        now = seen[0].state if seen else "gone"
        if seen and seen[0].state == "running":
            eta = seen[0].message.eta
            now = "scheduled" if eta is not None and eta > self.clock() else "running"
        self._log(action, actor, "stale", job_id=job_id)
        changed = f"job {job_id} changed since the page showed it (now {now}): nothing done"
        raise StaleAction(changed)

    def _move(self, keys: list[str], *args: Any) -> bool:
        reply = self._call(self.client.execute_command, "EVAL", _MOVE, len(keys), *keys, *args)
        return bool(int(reply or 0))

    def _stale(self, job_id: str, action: str, actor: str) -> StaleAction:
        self._log(action, actor, "stale", job_id=job_id)
        return StaleAction(f"job {job_id} changed since the page showed it: nothing done")

    def retry_failed(self, job_id: str, version: str, actor: str) -> None:
        found = self._locate(job_id, version, "failed", "retry", actor)
        fresh = fresh_copy(found.message)
        if fresh is None:
            self._log("retry", actor, "refused", job_id=job_id)
            raise ActionRefused(
                f"job {job_id} is not a message kombu can read: retrying it would dead-letter "
                "it again; discard it"
            )
        priority = 0
        with contextlib.suppress(TypeError, ValueError):
            priority = int(found.message.properties.get("priority") or 0)
        step = max((s for s in self.steps if s <= priority), default=0)
        target = self.queue_keys(found.queue)[self.steps.index(step)]
        if not self._move([str(found.key), target], found.entry, fresh, "L"):
            raise self._stale(job_id, "retry", actor)
        self._log("retry", actor, "done", job_id=job_id, queue=found.queue)

    def discard_failed(self, job_id: str, version: str, actor: str) -> None:
        found = self._locate(job_id, version, "failed", "discard", actor)
        if not self._move([str(found.key)], found.entry):
            raise self._stale(job_id, "discard", actor)
        self._log("discard", actor, "done", job_id=job_id, queue=found.queue)

    def cancel_waiting(self, job_id: str, version: str, actor: str) -> None:
        reason = f"cancelled by {actor} from the dashboard"
        if ":" in version:  # a delivery's version: held by a worker until its eta
            self._cancel_held(job_id, version, actor, reason)
            return
        found = self._locate(job_id, version, "waiting", "cancel", actor)
        record = dead_record(found.queue, found.entry, reason, "dashboard")
        if not self._move([str(found.key), self.dead_key(found.queue)], found.entry, record, "R"):
            raise self._stale(job_id, "cancel", actor)
        self._log("cancel", actor, "done", job_id=job_id, queue=found.queue)

    def _cancel_held(self, job_id: str, version: str, actor: str, reason: str) -> None:
        """A scheduled message: its lease goes with its unacked record, so its worker drops
        it at its next lease round (every recovery_window / 6); refused when its eta is
        closer than the recovery window (it could start before that round)."""
        tag = version.split(":", 1)[0]
        found = next((f for f in self._find_all(job_id) if f.key == tag), None)
        if found is None or f"{tag}:{version_of(found.entry)}" != version:
            raise self._stale(job_id, "cancel", actor)
        eta = found.message.eta
        margin = float(self.settings.recovery_window)
        if eta is None or eta - self.clock() < margin:
            self._log("cancel", actor, "refused", job_id=job_id)
            raise ActionRefused(
                f"job {job_id} is due within the recovery window ({margin:g} s) or running: "
                "its worker could start it before it learns of the cancel; nothing done"
            )
        record = dead_record(found.queue, found.message.raw, reason, "dashboard")
        lease = self.prefix + Ledger.key("lease", tag)
        keys = [self.unacked_key, self.index_key, lease, self.dead_key(found.queue)]
        args = [tag, found.entry, record]
        reply = self._call(
            self.client.execute_command, "EVAL", _CANCEL_HELD, len(keys), *keys, *args
        )
        if not int(reply or 0):
            raise self._stale(job_id, "cancel", actor)
        self._log("cancel", actor, "done", job_id=job_id, queue=found.queue)

    def pause_queue(self, queue: str, actor: str) -> None:
        self._pause(queue, True, actor)

    def resume_queue(self, queue: str, actor: str) -> None:
        self._pause(queue, False, actor)

    def _pause(self, queue: str, paused: bool, actor: str) -> None:
        action = "pause" if paused else "resume"
        if queue not in self.queue_names():
            self._log(action, actor, "refused", queue=queue)
            raise ActionRefused(f"no queue {queue!r} in this app or its broker")
        changed = self._call(self.store.set_queue_paused, queue, paused, actor)
        self._log(action, actor, "done", queue=queue, changed=bool(changed))

    def _log(self, action: str, actor: str, outcome: str, **fields: Any) -> None:
        log.info(
            f"dashboard {action}: {outcome}",
            extra={
                "event": "dashboard_action",
                "action": action,
                "actor": actor,
                "outcome": outcome,
                "engine": "celery",
                **fields,
            },
        )

    # --- the rest ------------------------------------------------------------------------

    def scheduler(self) -> SchedulerBinding | None:
        """The Redis scheduler binding of the app's ``beat_schedule``; None without one."""
        if not self.app.conf.beat_schedule:
            return None
        if self._scheduler is None:
            from workerkit.engines.celery.scheduling import open_scheduler

            self._scheduler = open_scheduler(self.settings)
        return self._scheduler

    def close(self) -> None:
        binding, self._scheduler = self._scheduler, None
        if binding is not None:
            with contextlib.suppress(Exception):
                binding.store.close()
        with contextlib.suppress(Exception):
            self.client.close()


def _opt(value: Any) -> str | None:
    return None if value is None else _text(value)


if TYPE_CHECKING:  # mypy checks that the source is the contract's

    def _conforms(source: CeleryDashboardSource) -> DashboardSource:
        return source
