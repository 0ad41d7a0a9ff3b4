"""The Celery engine's scheduler on a real redis-server: the app's ``beat_schedule`` read with
Celery's own crontab math, the fired message equal to the one ``send_task`` publishes, a real
Celery worker under workerkit running it with ``current_job().schedule``/``.fire_time``, and
what cannot be honoured refused at startup with the reason."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from celery import Celery
from celery.schedules import crontab, schedule, solar
from kombu import Exchange, Queue

from tests.apps import celery_schedules
from tests.support.harness import WORKERKIT, Env, start_worker, stopped_after, wait_until
from workerkit.engines.celery.scheduling import (
    CELERY_SCHEDULER_PREFIX,
    CeleryPublisher,
    beat_schedules,
    open_scheduler,
)
from workerkit.errors import ConfigurationError, StoreUnavailable
from workerkit.scheduler.contract import FireOutcome, Schedule, SchedulerBinding, fire_job_id
from workerkit.scheduler.redis_store import RedisSchedulerStore, scheduler_client
from workerkit.scheduler.triggers import Every
from workerkit.settings import load_settings

if TYPE_CHECKING:
    import redis

APP = "tests.apps.celery_schedules:app"


@pytest.fixture
def binding(redis_url: str) -> Iterator[SchedulerBinding]:
    celery_schedules.app.conf.broker_url = redis_url
    settings = load_settings(env={"WORKERKIT_APP": APP, "WORKERKIT_REDIS_URL": redis_url})
    bound = open_scheduler(settings)
    try:
        yield bound
    finally:
        bound.store.close()


def named(binding: SchedulerBinding, name: str) -> Any:
    return next(s for s in binding.schedules if s.name == name)


def leader_fire(binding: SchedulerBinding, name: str, fire_time: float) -> FireOutcome:
    store = binding.store
    lease = store.acquire("test-leader", 15)
    assert lease is not None
    assert store.register(lease, binding.schedules)
    return store.fire(named(binding, name), fire_time, epoch=lease.epoch, reason="on_time")


def test_beat_schedule_entries_become_schedules(binding: SchedulerBinding) -> None:
    tick, minutely, nightly = (named(binding, n) for n in ("tick", "minutely", "nightly"))
    assert (tick.task, tick.args, tick.queue) == ("sched.fired", ("tick",), None)
    assert tick.trigger.next_after(100.5) == 101.0
    assert minutely.trigger.next_after(100.0) == 120.0  # aligned to the epoch: whole minutes
    assert minutely.queue == "other"
    assert dict(minutely.options) == {"priority": 6, "expires": 30}
    assert (nightly.misfire, nightly.max_catch_up) == ("all", 5)
    assert dict(nightly.kwargs) == {"tag": "nightly"}


def test_crontab_times_are_celerys_own_in_the_apps_time_zone(binding: SchedulerBinding) -> None:
    trigger = named(binding, "nightly").trigger
    # 03:00 Europe/Berlin: 02:00 UTC in winter, 01:00 UTC in summer.
    jan = datetime(2024, 1, 15, 12, tzinfo=UTC).timestamp()
    assert trigger.next_after(jan) == datetime(2024, 1, 16, 2, tzinfo=UTC).timestamp()
    jul = datetime(2024, 7, 15, 12, tzinfo=UTC).timestamp()
    assert trigger.next_after(jul) == datetime(2024, 7, 16, 1, tzinfo=UTC).timestamp()
    # Strictly after: a fire time itself gives the next day's.
    at = datetime(2024, 1, 16, 2, tzinfo=UTC).timestamp()
    assert trigger.next_after(at) == at + 86400
    # Every step agrees with Celery's own is_due/remaining_estimate view of the entry.
    cron = crontab(minute="*/15", hour="9-17", day_of_week="mon-fri", app=celery_schedules.app)
    from workerkit.engines.celery.scheduling import CeleryCrontab

    t = datetime(2024, 3, 1, 16, 50, tzinfo=UTC).timestamp()  # a Friday, 17:50 in Berlin
    times = []
    for _ in range(3):
        t = CeleryCrontab(cron).next_after(t)
        times.append(datetime.fromtimestamp(t, cron.tz).strftime("%a %H:%M"))
    assert times == ["Mon 09:00", "Mon 09:15", "Mon 09:30"]


def queued(redis_client: redis.Redis[bytes], key: str) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in redis_client.lrange(key, 0, -1)]


def without_tag(message: dict[str, Any]) -> dict[str, Any]:
    copy = json.loads(json.dumps(message))
    copy["properties"].pop("delivery_tag")
    return copy


def test_the_fired_message_is_the_one_send_task_publishes(
    binding: SchedulerBinding, redis_client: redis.Redis[bytes]
) -> None:
    fire_time = 1_800_000_000.0
    assert leader_fire(binding, "tick", fire_time) is FireOutcome.FIRED
    job_id = fire_job_id("tick", fire_time)
    (ours,) = queued(redis_client, "celery")
    redis_client.delete("celery")

    # What Celery beat itself publishes for the entry (args as a list, its header), with
    # workerkit's headers and the fire's id.
    headers = {"workerkit_schedule": "tick", "workerkit_fire_time": fire_time}
    celery_schedules.fired.apply_async(
        ["tick"], {}, task_id=job_id, headers={**headers, "celery_beat_task": True}
    )
    (theirs,) = queued(redis_client, "celery")
    assert without_tag(ours) == without_tag(theirs)
    assert ours["headers"]["id"] == job_id
    assert ours["headers"]["workerkit_fire_time"] == fire_time


def test_queue_priority_and_expires_go_where_kombu_puts_them(
    binding: SchedulerBinding, redis_client: redis.Redis[bytes]
) -> None:
    assert leader_fire(binding, "minutely", 1_800_000_000.0) is FireOutcome.FIRED
    (message,) = queued(redis_client, "other\x06\x166")  # kombu's priority list of "other"
    assert message["properties"]["priority"] == 6
    assert message["properties"]["delivery_info"]["routing_key"] == "other"
    assert message["headers"]["expires"] is not None
    assert redis_client.llen("other") == 0


def test_a_task_the_scheduler_does_not_know_is_sent_by_name(
    binding: SchedulerBinding, redis_client: redis.Redis[bytes]
) -> None:
    assert leader_fire(binding, "unregistered", 1_800_000_040.0) is FireOutcome.FIRED
    (message,) = queued(redis_client, "celery")
    assert message["headers"]["task"] == "elsewhere.report"


@pytest.mark.timeout(90)
def test_a_celery_worker_under_workerkit_runs_it_with_schedule_and_fire_time(
    binding: SchedulerBinding, redis_url: str, tmp_path: Path
) -> None:
    fire_time = 1_800_000_001.0
    assert leader_fire(binding, "tick", fire_time) is FireOutcome.FIRED
    assert binding.store.fire(named(binding, "tick"), fire_time, epoch=None, reason="standby") is (
        FireOutcome.ALREADY_FIRED
    )
    env = Env(tmp=tmp_path, database_url="", journal=tmp_path / "journal.txt")
    pod = start_worker(
        [*WORKERKIT, "run", "celery", "--", "--pool", "solo"],
        env,
        app=APP,
        name="celery",
        engine={"E2E_REDIS_URL": redis_url, "redis_url": redis_url, "queues": "celery"},
        settings={},
        new_session=True,
    )
    with stopped_after(pod):
        line = wait_until(
            lambda: next((x for x in env.lines() if x.startswith("fired ")), None),
            timeout=60,
            what="the fired task's journal line",
        )
    assert line == f"fired tick tick {fire_time!r} {fire_job_id('tick', fire_time)}"


class Sunrise(solar):  # type: ignore[misc]
    """A solar schedule without the ephem library (not installed): only its type matters."""

    def __init__(self) -> None:
        pass


def app_with(**entry: Any) -> Celery:
    app = Celery("refusals", set_as_current=False)
    app.conf.beat_schedule = {"job": {"task": "t", **entry}}
    return app


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ({"schedule": Sunrise()}, "solar schedules are not supported"),
        ({"schedule": schedule(timedelta(seconds=5), relative=True)}, "relative"),
        ({"schedule": 5, "relative": True}, "relative=True shifts the times"),
        ({"schedule": "5"}, "is not supported; use a crontab"),
        ({"schedule": 0}, "is not supported"),
        ({"schedule": 5, "options": {"countdown": 3}}, "option\\(s\\) countdown"),
        ({"schedule": 5, "limit": 3}, "key\\(s\\) limit"),
        ({"schedule": 5, "misfire": "never"}, "misfire='never'"),
        ({"schedule": 5, "max_catch_up": 0}, "max_catch_up"),
        ({"schedule": 5, "args": "abc"}, "args must be a list or tuple"),
    ],
)
def test_what_workerkit_cannot_honour_is_refused_with_the_reason(
    entry: dict[str, Any], reason: str
) -> None:
    with pytest.raises(ConfigurationError, match=reason):
        beat_schedules(app_with(**entry))


def test_task_always_eager_is_refused() -> None:
    app = app_with(schedule=5)
    app.conf.task_always_eager = True
    with pytest.raises(ConfigurationError, match="task_always_eager"):
        beat_schedules(app)


def test_a_broadcast_queue_is_refused_at_startup_not_at_the_first_fire(redis_url: str) -> None:
    from kombu.common import Broadcast

    app = Celery("bcast", broker=redis_url, set_as_current=False)
    app.conf.task_queues = (Broadcast("everyone"),)
    app.conf.beat_schedule = {"all": {"task": "t", "schedule": 5, "options": {"queue": "everyone"}}}
    publisher = CeleryPublisher(app)
    try:
        with pytest.raises(ConfigurationError, match=r"beat_schedule\['all'\].*fanout"):
            publisher.check(beat_schedules(app))
    finally:
        publisher.close()


def test_the_startup_check_leaves_an_unreachable_broker_to_the_first_fire() -> None:
    app = Celery("down", broker="redis://127.0.0.1:1/0", set_as_current=False)
    app.conf.broker_connection_timeout = 1
    app.conf.beat_schedule = {"tick": {"task": "t", "schedule": 5}}
    publisher = CeleryPublisher(app)
    try:
        publisher.check(beat_schedules(app))  # no error: Redis may come up later
    finally:
        publisher.close()


def test_a_crontab_keeps_its_apps_time_zone_whatever_app_is_current() -> None:
    from celery import current_app

    berlin = Celery("berlin", set_as_current=False)
    berlin.conf.timezone = "Europe/Berlin"
    berlin.conf.beat_schedule = {"n": {"task": "t", "schedule": crontab(hour=3, minute=0)}}
    previous = current_app._get_current_object()
    other = Celery("utc")  # becomes the current app, as any app created later would
    other.conf.timezone = "UTC"
    try:
        (nightly,) = beat_schedules(berlin)
        jan = datetime(2024, 1, 15, 12, tzinfo=UTC).timestamp()
        assert nightly.trigger.next_after(jan) == datetime(2024, 1, 16, 2, tzinfo=UTC).timestamp()
    finally:
        previous.set_current()


@pytest.fixture
def topic_store(redis_url: str) -> Iterator[RedisSchedulerStore]:
    """A store whose schedule is routed through a topic exchange (a kombu binding in Redis)."""
    app = Celery("topic", broker=redis_url, set_as_current=False)
    app.conf.task_queues = [Queue("bound", Exchange("sched-topic", type="topic"), "sched.#")]
    store = RedisSchedulerStore(
        scheduler_client(redis_url), CeleryPublisher(app), prefix=CELERY_SCHEDULER_PREFIX
    )
    store.own_client()
    try:
        yield store
    finally:
        store.close()


TOPIC = Schedule("topic", "elsewhere.topic", Every(1), args=("t",), queue="bound")


def test_a_binding_lost_with_redis_data_is_declared_again_at_the_next_fire(
    topic_store: RedisSchedulerStore, redis_client: redis.Redis[bytes]
) -> None:
    """Redis restarted without persistence (or evicted ``_kombu.binding.*``): the publisher's
    warm connection would not declare the queue again and kombu's lookup would find no queue
    (a crash of every replica before); the fire declares it again and publishes."""
    for fire_time in (1_800_000_000.0, 1_800_000_001.0):
        redis_client.flushdb()  # the second time: the lease, the state, kombu's binding
        lease = topic_store.acquire("leader", 15)
        assert lease is not None
        assert topic_store.register(lease, [TOPIC])
        outcome = topic_store.fire(TOPIC, fire_time, epoch=lease.epoch, reason="on_time")
        assert outcome is FireOutcome.FIRED
        (message,) = queued(redis_client, "bound")
        assert message["headers"]["workerkit_fire_time"] == fire_time
        assert redis_client.exists("_kombu.binding.sched-topic")  # others find it again


def test_a_publish_refused_by_redis_is_store_unavailable_not_a_crash(
    topic_store: RedisSchedulerStore, redis_client: redis.Redis[bytes]
) -> None:
    """Declaring the binding again is a write: an OOM Redis refuses it, which the runner rides
    out (StoreUnavailable) like any other Redis refusing writes."""
    publisher = topic_store.enqueue
    assert publisher(TOPIC, 1_800_000_002.0, "wk-x")
    redis_client.delete("_kombu.binding.sched-topic")
    redis_client.config_set("maxmemory-policy", "noeviction")
    redis_client.config_set("maxmemory", 1)
    try:
        with pytest.raises(StoreUnavailable, match="OOM"):
            publisher(TOPIC, 1_800_000_002.0, "wk-x")
    finally:
        redis_client.config_set("maxmemory", 0)
    assert publisher(TOPIC, 1_800_000_002.0, "wk-x")


def test_the_scheduler_namespace_keys_its_own_lease_and_schedules(
    binding: SchedulerBinding, redis_url: str
) -> None:
    """A second app on the broker's Redis under its own ``scheduler_namespace`` leads too."""
    assert isinstance(binding.store, RedisSchedulerStore)
    assert binding.store.key("lease") == "workerkit:scheduler:celery:lease"  # as before
    env = {"WORKERKIT_APP": APP, "WORKERKIT_REDIS_URL": redis_url}
    other = open_scheduler(load_settings(env={**env, "WORKERKIT_SCHEDULER_NAMESPACE": "b2"}))
    try:
        assert isinstance(other.store, RedisSchedulerStore)
        assert other.store.key("lease") == "workerkit:scheduler:celery@b2:lease"
        assert leader_fire(binding, "tick", 1_800_000_000.0) is FireOutcome.FIRED
        lease = other.store.acquire("theirs", 15)
        assert lease is not None  # while the default namespace's leader holds its lease
        assert other.store.register(lease, [])  # removes nothing of the default namespace
        assert leader_fire(binding, "tick", 1_800_000_001.0) is FireOutcome.FIRED
    finally:
        other.store.close()


@pytest.mark.parametrize(
    ("minute", "hour"), [("30", "2"), ("*/15", "*"), ("0", "*"), ("45", "1-3"), ("0", "3")]
)
def test_celery_crontab_across_dst_agrees_with_core_cron(minute: str, hour: str) -> None:
    """A time in the spring-forward gap fires once at the first instant after it (Celery's own
    math gave 02:30 -> 03:30), a repeated hour's wall time fires in its first pass only, also
    for a chain that starts in the second pass: as core ``Cron`` does."""
    from zoneinfo import ZoneInfo

    from workerkit.engines.celery.scheduling import CeleryCrontab
    from workerkit.scheduler.triggers import Cron

    app = Celery("dst", set_as_current=False)
    app.conf.timezone = "Europe/Berlin"
    entry = crontab(minute=minute, hour=hour)
    entry.app = app
    ours, core = CeleryCrontab(entry), Cron(f"{minute} {hour} * * *", timezone="Europe/Berlin")
    zone = ZoneInfo("Europe/Berlin")
    for day in (datetime(2026, 3, 28, 22, tzinfo=zone), datetime(2026, 10, 24, 22, tzinfo=zone)):
        for step in range(0, 8 * 3600, 1200):
            start = day.timestamp() + step
            assert ours.next_after(start) == core.next_after(start), (
                f"after {datetime.fromtimestamp(start, zone).isoformat()}"
            )
