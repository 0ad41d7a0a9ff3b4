"""The Celery engine's scheduler: the app's own ``beat_schedule``, fired once per fire time.

Each entry becomes a :class:`~workerkit.scheduler.contract.Schedule` (``crontab`` through
:class:`CeleryCrontab`), or is refused at startup with the reason; a fire publishes the message
Celery's own ``apply_async`` builds, captured at kombu's channel and written by the store's fire
script. Which entries and why: docs/engines/celery.md ("Periodic jobs"). ``python -m
workerkit.engines.celery.scheduling`` runs it (``workerkit scheduler celery``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps
from redis import exceptions as redis_errors

from workerkit.engines.celery.config import configure_app, load_celery_app, load_tasks
from workerkit.engines.celery.task import FIRE_TIME_HEADER, SCHEDULE_HEADER
from workerkit.errors import ConfigurationError, StoreError, StoreUnavailable
from workerkit.scheduler.contract import Schedule, SchedulerBinding
from workerkit.scheduler.plan import validate_schedule
from workerkit.scheduler.redis_store import (
    DEFAULT_RETENTION,
    RedisSchedulerStore,
    RedisWrite,
    scheduler_client,
    scheduler_prefix,
    store_error,
)
from workerkit.scheduler.triggers import Every

if TYPE_CHECKING:
    from workerkit.scheduler.contract import Trigger
    from workerkit.settings import Settings

__all__ = (
    "CELERY_SCHEDULER_PREFIX",
    "CeleryCrontab",
    "CeleryPublisher",
    "beat_schedules",
    "main",
    "open_scheduler",
)

#: The scheduler's keys (lease, epoch, records, state) in the broker's Redis, for the
#: ``default`` ``scheduler_namespace``; another's are ``workerkit:scheduler:celery@<namespace>:``.
CELERY_SCHEDULER_PREFIX: Final = "workerkit:scheduler:celery:"
#: The ``options`` of an entry workerkit carries into the message.
ENTRY_OPTIONS: Final = ("queue", "routing_key", "exchange", "expires", "priority")
#: The keys of an entry: Celery beat's, and workerkit's misfire policy (beat has none).
ENTRY_KEYS: Final = (
    *("task", "schedule", "args", "kwargs", "options", "relative"),
    *("misfire", "max_catch_up", "misfire_grace"),
)


#: Steps through one repeated hour at most (a minute each, or one skipped fire time each).
_DST_STEPS: Final = 1500


def _gap_end(wall: dt.datetime) -> float:
    """The first instant after the DST gap ``wall`` (not a local time) falls in: where the
    offset changes, between its fold=1 and fold=0 readings (a search to the second)."""
    low, high = sorted((wall.replace(fold=1).timestamp(), wall.replace(fold=0).timestamp()))
    zone = wall.tzinfo
    after = dt.datetime.fromtimestamp(high, zone).utcoffset()
    lo, hi = int(low), int(high)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if dt.datetime.fromtimestamp(mid, zone).utcoffset() == after:
            hi = mid
        else:
            lo = mid
    return float(hi)


class CeleryCrontab:
    """A Celery ``crontab`` as a trigger: its own next-run math (``remaining_delta``), in its
    time zone (the app's ``timezone``), on epoch seconds."""

    def __init__(self, crontab: Any) -> None:
        self.crontab = crontab
        self.zone = crontab.tz

    def next_after(self, after: float) -> float:
        """Celery's next run after ``after``, with DST as core ``Cron`` has it: a wall time in
        a spring-forward gap fires once at the first instant after the gap (Celery's own math
        would add the old offset: 02:30 -> 03:30), and a wall time of a repeated hour fires in
        its first pass only (a chain started in the second pass skips the times it repeats)."""
        probe = after
        for _ in range(_DST_STEPS):
            nxt = self._celery_next(probe)
            instant = nxt.timestamp()
            local = dt.datetime.fromtimestamp(instant, self.zone)
            if local.replace(tzinfo=None) != nxt.replace(tzinfo=None):
                gap_end = _gap_end(nxt)  # not a local time: in a spring-forward gap
                return gap_end if gap_end > after else instant
            if instant <= after:  # from a repeated hour's second pass, back to its first
                probe += 60
            elif local.fold and local.replace(fold=0).timestamp() != instant:
                probe = instant  # the second pass of a repeated hour: fired in the first
            else:
                return instant
        raise ValueError(f"{self.describe()}: no fire time found after {after}")

    def _celery_next(self, after: float) -> dt.datetime:
        last = dt.datetime.fromtimestamp(after, self.zone)
        start, delta, _ = self.crontab.remaining_delta(last, tz=self.zone)
        nxt: dt.datetime = start + delta
        if nxt.timestamp() <= after:  # a fraction of a second into a due minute
            start, delta, _ = self.crontab.remaining_delta(
                last.replace(second=0, microsecond=0) + dt.timedelta(minutes=1), tz=self.zone
            )
            nxt = start + delta
        return nxt

    def describe(self) -> str:
        return f"crontab {self._fields()} {self.zone}"

    def identity(self) -> str:
        return f"celery-crontab {self._fields()} {self.zone}"

    def _fields(self) -> str:
        c = self.crontab
        parts = (
            c._orig_minute,
            c._orig_hour,
            c._orig_day_of_month,
            c._orig_month_of_year,
            c._orig_day_of_week,
        )
        return "'" + " ".join(str(part) for part in parts) + "'"


def _trigger(app: Any, name: str, entry: dict[str, Any]) -> Trigger:
    from celery.schedules import crontab, schedule, solar

    where = f"beat_schedule[{name!r}]"
    value: Any = entry["schedule"]
    if entry.get("relative"):
        raise ConfigurationError(
            f"{where}: relative=True shifts the times to when beat started, so replicas would "
            "disagree on them; remove relative (workerkit aligns intervals to the epoch)"
        )
    if isinstance(value, solar):
        raise ConfigurationError(
            f"{where}: solar schedules are not supported by workerkit's scheduler (their times "
            "depend on an astronomy library's output); use a crontab at the times you need"
        )
    if isinstance(value, crontab):
        # Bound to the app as beat binds its entries (maybe_schedule): its time zone is the
        # app's, not whichever Celery app happens to be current.
        value.app = app
        return CeleryCrontab(value)
    seconds: Any = value
    if type(value) is schedule:
        if value.relative:
            raise ConfigurationError(f"{where}: schedule(relative=True) is not supported")
        seconds = value.run_every
    if isinstance(seconds, dt.timedelta):
        seconds = seconds.total_seconds()
    if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and seconds > 0:
        return Every(float(seconds))
    raise ConfigurationError(
        f"{where}: schedule {value!r} ({type(value).__name__}) is not supported; use a "
        "crontab, a schedule(timedelta), a timedelta or a number of seconds"
    )


def _entry(app: Any, name: str, entry: Any) -> Schedule:
    where = f"beat_schedule[{name!r}]"
    if not isinstance(entry, dict) or "task" not in entry or "schedule" not in entry:
        raise ConfigurationError(f"{where}: give a dict with at least 'task' and 'schedule'")
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        raise ConfigurationError(
            f"{where}: key(s) {', '.join(unknown)} are not supported; an entry has "
            f"{', '.join(ENTRY_KEYS)}"
        )
    options = dict(entry.get("options") or {})
    refused = sorted(set(options) - set(ENTRY_OPTIONS))
    if refused:
        raise ConfigurationError(
            f"{where}: option(s) {', '.join(refused)} are not supported by workerkit's "
            f"scheduler; it carries {', '.join(ENTRY_OPTIONS)}"
        )
    args, kwargs = entry.get("args") or (), entry.get("kwargs") or {}
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
        raise ConfigurationError(f"{where}: args must be a list or tuple, kwargs a dict")
    queue = options.pop("queue", None)
    declared = Schedule(
        name=name,
        task=str(entry["task"]),
        trigger=_trigger(app, name, entry),
        args=tuple(args),
        kwargs=dict(kwargs),
        queue=None if queue is None else str(getattr(queue, "name", queue)),
        options=options,
        misfire=entry.get("misfire", "latest"),
        max_catch_up=entry.get("max_catch_up", 100),
        misfire_grace=entry.get("misfire_grace"),
    )
    try:
        validate_schedule(declared)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"{where}: {exc}") from exc
    return declared


def beat_schedules(app: Any) -> tuple[Schedule, ...]:
    """The app's ``beat_schedule`` as schedules; ConfigurationError says what cannot be honoured."""
    if app.conf.task_always_eager:
        raise ConfigurationError(
            "task_always_eager is set: apply_async would run the task inside the scheduler; "
            "unset it for the scheduler process"
        )
    entries = app.conf.beat_schedule or {}
    return tuple(_entry(app, str(name), entry) for name, entry in entries.items())


class _CapturingChannel(kombu_redis.Channel):
    """kombu's Redis channel, except that a publish is captured, never sent."""

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        if self._expires and queue in self._expires:
            raise ConfigurationError(
                f"queue {queue!r} has x-expires: its priority lists' expiry is not supported"
            )
        priority = self._get_message_priority(message, reverse=False)  # type: ignore[no-untyped-call]
        key = self._q_for_pri(queue, priority)  # type: ignore[no-untyped-call]
        body = dumps(message)  # type: ignore[no-untyped-call]
        self.connection.captured.append((self.global_keyprefix + key, body))

    def _put_fanout(self, exchange: str, message: Any, routing_key: str, **kwargs: Any) -> None:
        raise ConfigurationError(
            f"exchange {exchange!r} is a fanout (broadcast) exchange: not supported by "
            "workerkit's scheduler (every consumer would run the fire)"
        )


class _CapturingTransport(kombu_redis.Transport):
    Channel = _CapturingChannel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.captured: list[tuple[str, str]] = []


def _unavailable(exc: BaseException) -> StoreError:
    """kombu's error (it wraps redis-py's: OOM while declaring, READONLY, ...) as the store's:
    StoreUnavailable with Redis's reason for what the runner rides out."""
    cause = exc if isinstance(exc, redis_errors.RedisError) else exc.__cause__
    if isinstance(cause, redis_errors.RedisError):
        return store_error(cause)
    return StoreUnavailable(f"redis unavailable: {type(exc).__name__}: {exc}")


class CeleryPublisher:
    """The message ``apply_async``/``send_task`` would publish for one fire, as store writes.

    Celery's own code builds it (routing, the task's own options, serializer, compression,
    the protocol-2 headers, kombu's envelope and priority list); the channel captures it.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._connection: Any = None
        self._producer: Any = None

    def _open(self) -> tuple[Any, Any]:
        if self._producer is None:
            connection = self.app.connection_for_write().clone(
                transport=_CapturingTransport, connect_timeout=2
            )
            self._connection = connection
            self._producer = self.app.amqp.Producer(connection.default_channel)
        return self._connection, self._producer

    def __call__(self, schedule: Schedule, fire_time: float, job_id: str) -> list[RedisWrite]:
        captured = self._build(schedule, fire_time, job_id)
        if not captured:
            # Not a crash at fire time: the binding may come back (another publisher or
            # worker declares it); the runner retries, and the startup check refused routes
            # that never reach a queue.
            raise StoreUnavailable(
                f"Celery's routing of {schedule.task!r} reaches no queue even after declaring "
                "its queue again (kombu's binding in Redis is missing); retrying"
            )
        return captured

    def _build(self, schedule: Schedule, fire_time: float, job_id: str) -> list[RedisWrite]:
        """The writes; none when kombu's routing reaches no queue even on a fresh connection.

        kombu declares a queue (its binding, ``_kombu.binding.<exchange>`` in Redis) once per
        connection: when Redis lost its data or evicted the binding, the warm connection
        does not declare it again and the lookup finds nothing. A fresh connection does.
        """
        headers = {SCHEDULE_HEADER: schedule.name, FIRE_TIME_HEADER: fire_time}
        headers["celery_beat_task"] = True  # as Celery beat marks its messages
        options: dict[str, Any] = dict(schedule.options)
        if schedule.queue is not None:
            options["queue"] = schedule.queue
        task = self.app.tasks.get(schedule.task)
        send = task.apply_async if task is not None else self._send_task(schedule.task)
        with self._lock:
            for attempt in (1, 2):
                try:
                    connection, producer = self._open()
                    transport = connection.transport
                    transport.captured.clear()
                    send(
                        list(schedule.args),
                        dict(schedule.kwargs),
                        task_id=job_id,
                        producer=producer,
                        headers=headers,
                        retry=False,
                        **options,
                    )
                except self._unreachable as exc:
                    self._reset()  # the next fire opens a fresh connection
                    raise _unavailable(exc) from exc
                captured = list(transport.captured)
                if captured or attempt == 2:
                    break
                self._reset()  # declare the queue again on a fresh connection
        return [RedisWrite("LPUSH", key, (body,)) for key, body in captured]

    def check(self, schedules: Sequence[Schedule]) -> None:
        """Build each schedule's message once, at startup: what cannot be published (a fanout
        exchange, a queue the router cannot name) fails now, not at the first fire; and the
        connection and kombu's queue declarations are warm for it. A broker not reachable
        yet is left to the first fire."""
        for schedule in schedules:
            options = {"queue": schedule.queue} if schedule.queue else {}
            route = self.app.amqp.router.route(
                {**schedule.options, **options}, schedule.task, schedule.args, schedule.kwargs
            )
            exchange = getattr(route.get("queue"), "exchange", None)
            if getattr(exchange, "type", "direct") == "fanout":
                raise ConfigurationError(
                    f"beat_schedule[{schedule.name!r}]: its queue is a fanout (broadcast) "
                    "exchange: not supported (every consumer would run the fire)"
                )
            try:
                built = self._build(schedule, 0.0, "wk-sched-startup-check")
            except StoreUnavailable:
                return
            except ConfigurationError as exc:
                raise ConfigurationError(f"beat_schedule[{schedule.name!r}]: {exc}") from exc
            except Exception as exc:
                raise ConfigurationError(
                    f"beat_schedule[{schedule.name!r}]: Celery cannot build its message: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            if not built:
                raise ConfigurationError(
                    f"beat_schedule[{schedule.name!r}]: Celery's routing of {schedule.task!r} "
                    f"(options {dict(schedule.options)}) reaches no queue (a fanout exchange, "
                    "or an exchange no queue is bound to); route it to a queue"
                )

    def _send_task(self, name: str) -> Any:
        def send(args: Any, kwargs: Any, **options: Any) -> Any:
            return self.app.send_task(name, args, kwargs, **options)

        return send

    @property
    def _unreachable(self) -> tuple[type[BaseException], ...]:
        import redis.exceptions
        from kombu.exceptions import OperationalError

        # Any Redis error: kombu's declare raises OOM/READONLY/... unwrapped.
        return (OperationalError, redis.exceptions.RedisError)

    def _reset(self) -> None:
        connection, self._connection, self._producer = self._connection, None, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.release()

    def close(self) -> None:
        """Release the connection (the store's close calls it)."""
        with self._lock:
            self._reset()


def open_scheduler(settings: Settings) -> SchedulerBinding:
    """The app's ``beat_schedule`` and the Redis store of its broker."""
    app = load_celery_app(settings.app)
    configure_app(app, settings)
    load_tasks(app)
    schedules = beat_schedules(app)
    publisher = CeleryPublisher(app)
    publisher.check(schedules)
    client = scheduler_client(str(app.conf.broker_url))
    retention = float(getattr(settings, "scheduler_retention", DEFAULT_RETENTION))
    # kombu's global_keyprefix applies to workerkit's keys too, as to the ledger's.
    transport = app.conf.broker_transport_options or {}
    prefix = str(transport.get("global_keyprefix") or "") + scheduler_prefix(
        CELERY_SCHEDULER_PREFIX, settings.scheduler_namespace
    )
    store = RedisSchedulerStore(
        client,
        publisher,
        prefix=prefix,
        retention=retention,
        namespace=settings.scheduler_namespace,
    )
    store.own_client()
    return SchedulerBinding(store=store, schedules=schedules)


def main() -> None:
    """``python -m workerkit.engines.celery.scheduling``: the Celery engine's scheduler process."""
    from workerkit.scheduler.process import run_scheduler_process

    sys.exit(run_scheduler_process(open_scheduler))


if __name__ == "__main__":
    main()
