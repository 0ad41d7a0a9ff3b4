"""The RQ engine's scheduler on a real redis-server: the fired job is the one RQ would enqueue,
a plain RQ worker and workerkit's RQ worker both run it, and the declarations refuse bad input."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from rq import Queue, SimpleWorker
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from tests.apps import rq_schedules
from tests.support.harness import WORKERKIT, start_worker, stopped_after
from tests.support.rq_harness import RqEnv
from workerkit.engines.rq import RqApp
from workerkit.engines.rq.jobs import read_state
from workerkit.engines.rq.scheduling import open_scheduler, rq_enqueue_writes
from workerkit.errors import ConfigurationError, StoreError
from workerkit.scheduler.contract import FireOutcome, Schedule, SchedulerBinding, fire_job_id
from workerkit.scheduler.redis_store import RedisSchedulerStore
from workerkit.scheduler.triggers import Every
from workerkit.settings import load_settings

if TYPE_CHECKING:
    import redis

APP = "tests.apps.rq_schedules:app"


@pytest.fixture
def binding(redis_url: str) -> Iterator[SchedulerBinding]:
    settings = load_settings(env={"WORKERKIT_APP": APP, "WORKERKIT_REDIS_URL": redis_url})
    bound = open_scheduler(settings)
    try:
        yield bound
    finally:
        bound.store.close()


def schedule_named(binding: SchedulerBinding, name: str) -> Any:
    return next(s for s in binding.schedules if s.name == name)


def leader_fire(binding: SchedulerBinding, name: str, fire_time: float) -> FireOutcome:
    store = binding.store
    lease = store.acquire("test-leader", 15)
    assert lease is not None
    assert store.register(lease, binding.schedules)
    return store.fire(schedule_named(binding, name), fire_time, epoch=lease.epoch, reason="on_time")


def test_the_app_declares_its_schedules_with_their_triggers(binding: SchedulerBinding) -> None:
    tick = schedule_named(binding, "tick")
    assert tick.task == "tests.apps.rq_schedules.fired"
    assert tick.args == ("tick",)
    assert tick.queue == "default"
    assert tick.misfire == "skip"
    assert tick.trigger.next_after(100.2) == 101.0
    nightly = schedule_named(binding, "nightly-add")
    assert nightly.task == "tests.apps.rq_schedules.add"
    # 03:00 in Berlin on 2024-01-15 (CET, UTC+1) is 02:00 UTC.
    assert nightly.trigger.next_after(1705276800.0) == 1705284000.0


def test_the_fired_job_hash_is_the_one_rq_enqueue_writes(
    binding: SchedulerBinding, redis_client: redis.Redis[bytes]
) -> None:
    fire_time = 1_800_000_000.0
    assert leader_fire(binding, "nightly-add", fire_time) is FireOutcome.FIRED
    job_id = fire_job_id("nightly-add", fire_time)
    ours = redis_client.hgetall(f"rq:job:{job_id}")

    queue = Queue("default", connection=redis_client, serializer=JSONSerializer)
    queue.enqueue("tests.apps.rq_schedules.add", 2, 3, job_id="reference")
    theirs = redis_client.hgetall("rq:job:reference")

    assert set(ours) == set(theirs) | {b"workerkit"}
    varying = {b"created_at", b"enqueued_at", b"workerkit"}
    assert {k: v for k, v in ours.items() if k not in varying} == {
        k: v for k, v in theirs.items() if k not in varying
    }
    assert zlib.decompress(ours[b"data"]) == zlib.decompress(theirs[b"data"])
    # Pushed as RQ pushes: the id at the tail of the queue's list, the queue in rq:queues.
    assert redis_client.lrange("rq:queue:default", 0, -1) == [job_id.encode(), b"reference"]
    assert b"rq:queue:default" in redis_client.smembers("rq:queues")
    assert read_state(redis_client, job_id) == {"schedule": "nightly-add", "fire_time": fire_time}


def test_a_plain_rq_worker_runs_the_fired_job(
    binding: SchedulerBinding, redis_client: redis.Redis[bytes]
) -> None:
    fire_time = 1_800_000_000.0
    assert leader_fire(binding, "nightly-add", fire_time) is FireOutcome.FIRED
    queue = Queue("default", connection=redis_client, serializer=JSONSerializer)
    worker = SimpleWorker([queue], connection=redis_client, serializer=JSONSerializer)
    assert worker.work(burst=True)
    job = Job.fetch(
        fire_job_id("nightly-add", fire_time), connection=redis_client, serializer=JSONSerializer
    )
    assert job.get_status() == JobStatus.FINISHED
    assert job.return_value() == 5


@pytest.mark.timeout(60)
@pytest.mark.parametrize("worker_class", ["simple", "forking"])
def test_workerkits_rq_worker_runs_it_with_the_schedule_and_fire_time_in_current_job(
    binding: SchedulerBinding, redis_url: str, tmp_path: Path, worker_class: str
) -> None:
    fire_time = 1_800_000_001.0
    assert leader_fire(binding, "tick", fire_time) is FireOutcome.FIRED
    # A second fire of the same time, by a standby: recorded once, enqueued once.
    tick = schedule_named(binding, "tick")
    assert binding.store.fire(tick, fire_time, epoch=None, reason="standby") is (
        FireOutcome.ALREADY_FIRED
    )
    env = RqEnv(tmp=tmp_path, redis_url=redis_url, journal=tmp_path / "journal.txt")
    argv = [*WORKERKIT, "run", "rq", "--worker-class", worker_class]
    pod = start_worker(argv, env, app=APP, name="rq", engine={"redis_url": redis_url}, settings={})
    with stopped_after(pod):
        line = env.wait_prefix("fired ", timeout=30)
    job_id = fire_job_id("tick", fire_time)
    assert line == f"fired tick tick {fire_time!r} {job_id}"
    assert env.lines().count(line) == 1


def test_the_fire_and_its_job_are_one_write(
    binding: SchedulerBinding, redis_client: redis.Redis[bytes]
) -> None:
    """A queue key of the wrong type makes the fire fail before it writes anything: no record
    without its job, no job without its record."""
    redis_client.set("rq:queue:default", "not a list")
    with pytest.raises(StoreError, match="is a string, not a list"):
        leader_fire(binding, "tick", 1_800_000_002.0)
    store = binding.store
    assert isinstance(store, RedisSchedulerStore)
    assert store.fire_record("tick", 1_800_000_002.0) is None
    assert not redis_client.exists(f"rq:job:{fire_job_id('tick', 1_800_000_002.0)}")
    redis_client.delete("rq:queue:default")
    assert leader_fire(binding, "tick", 1_800_000_002.0) is FireOutcome.FIRED


def test_rq_enqueue_writes_pushes_at_the_front_when_asked(redis_client: redis.Redis[bytes]) -> None:
    app = RqApp(modules=["tests.apps.rq_schedules"])
    schedule = app.schedule("urgent", rq_schedules.add, every=60, args=[1, 1], at_front=True)
    writes = rq_enqueue_writes(redis_client)(schedule, 60.0, "wk-x")
    assert [(w.command, w.key) for w in writes] == [
        ("HSET", "rq:job:wk-x"),
        ("SADD", "rq:queues"),
        ("LPUSH", "rq:queue:default"),
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of cron"),
        ({"cron": "* * *"}, "five fields"),
        ({"every": 5, "timezone": "UTC"}, "timezone= applies to cron="),
        ({"cron": "0 3 * * *", "timezone": "Mars/Olympus"}, "not a known IANA time zone"),
        ({"every": 5, "misfire": "sometimes"}, "misfire='sometimes'"),
        ({"every": 5, "max_catch_up": 0}, "max_catch_up"),
        ({"every": 5, "retry": 3}, "unknown option"),
    ],
)
def test_bad_declarations_are_refused_naming_the_argument(
    kwargs: dict[str, Any], message: str
) -> None:
    app = RqApp(modules=["tests.apps.rq_schedules"])
    with pytest.raises(ConfigurationError, match=message):
        app.schedule("bad", rq_schedules.add, **kwargs)


def test_a_duplicate_name_is_refused() -> None:
    app = RqApp(modules=["tests.apps.rq_schedules"])
    app.schedule("one", rq_schedules.add, every=5)
    with pytest.raises(ConfigurationError, match="already declared"):
        app.schedule("one", rq_schedules.add, every=10)


def test_a_schedule_whose_task_the_workers_would_refuse_fails_at_startup(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = RqApp(modules=["tests.apps.rq_schedules"])
    app.schedule("escape", "os.system", every=5, args=["true"])
    monkeypatch.setattr(rq_schedules, "other_app", app, raising=False)
    settings = load_settings(
        env={"WORKERKIT_APP": "tests.apps.rq_schedules:other_app", "WORKERKIT_REDIS_URL": redis_url}
    )
    with pytest.raises(ConfigurationError, match="'escape': the workers would refuse its task"):
        open_scheduler(settings)


def test_arguments_that_do_not_encode_fail_at_startup(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = RqApp(modules=["tests.apps.rq_schedules"])
    app.schedule("opaque", rq_schedules.add, every=5, args=[object(), 1])
    monkeypatch.setattr(rq_schedules, "other_app", app, raising=False)
    settings = load_settings(
        env={"WORKERKIT_APP": "tests.apps.rq_schedules:other_app", "WORKERKIT_REDIS_URL": redis_url}
    )
    with pytest.raises(ConfigurationError, match="do not encode with the workers' serializer"):
        open_scheduler(settings)


def test_every_takes_an_anchor_as_the_sql_apps_periodic_does() -> None:
    app = RqApp(modules=["tests.apps.rq_schedules"])
    schedule = app.schedule("offset", rq_schedules.add, every=60, anchor=15, args=[1, 1])
    assert schedule.trigger.next_after(100.0) == 135.0


def test_two_apps_on_one_redis_each_lead_their_own_namespace(
    redis_url: str, redis_client: redis.Redis[bytes]
) -> None:
    """``scheduler_namespace`` keys the lease, the schedules and the records: a second app's
    scheduler on the same Redis neither waits for this one's lease nor unregisters its
    schedules. The default namespace keeps the key names of before namespaces."""
    env = {"WORKERKIT_APP": APP, "WORKERKIT_REDIS_URL": redis_url}
    ours = open_scheduler(load_settings(env=env))
    theirs = open_scheduler(load_settings(env={**env, "WORKERKIT_SCHEDULER_NAMESPACE": "billing"}))
    try:
        assert isinstance(ours.store, RedisSchedulerStore)
        assert isinstance(theirs.store, RedisSchedulerStore)
        assert ours.store.key("lease") == "workerkit:scheduler:rq:lease"
        assert theirs.store.key("lease") == "workerkit:scheduler:rq@billing:lease"
        our_lease = ours.store.acquire("ours", 15)
        their_lease = theirs.store.acquire("theirs", 15)
        assert our_lease is not None
        assert their_lease is not None  # not one leader between the two apps
        invoice = Schedule("invoice", "tests.apps.rq_schedules.add", Every(60), args=(1, 2))
        assert ours.store.register(our_lease, ours.schedules)
        assert theirs.store.register(their_lease, [invoice])  # does not remove ours
        tick = schedule_named(ours, "tick")
        fired = ours.store.fire(tick, 1_800_000_000.0, epoch=our_lease.epoch, reason="on_time")
        assert fired is FireOutcome.FIRED
        fired = theirs.store.fire(invoice, 1_800_000_000.0, epoch=their_lease.epoch, reason="x")
        assert fired is FireOutcome.FIRED
        # The same schedule name and fire time in the other namespace is another job.
        assert theirs.store.register(their_lease, [invoice, tick])
        fired = theirs.store.fire(tick, 1_800_000_000.0, epoch=their_lease.epoch, reason="x")
        assert fired is FireOutcome.FIRED
        assert set(ours.store.states()) == {s.name for s in ours.schedules}
        assert set(theirs.store.states()) == {"invoice", "tick"}
        queued = {job.decode() for job in redis_client.lrange("rq:queue:default", 0, -1)}
        assert fire_job_id("tick", 1_800_000_000.0) in queued
        assert fire_job_id("tick", 1_800_000_000.0, "billing") in queued
        assert len(queued) == 3
    finally:
        ours.store.close()
        theirs.store.close()
