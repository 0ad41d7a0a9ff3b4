"""What the Redis scheduler store adds to the contract, on a real redis-server: the lease lives
on Redis's clock, epochs only increase (the counter outlives the lease key), a fire and its
enqueue writes are one script, records expire after the retention period."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest
from celery import Celery
from rq.job import Job
from rq.serializers import JSONSerializer

from tests.support.scheduler_contract import Enqueued, SchedulerStoreContract
from tests.support.servers import restart_redis, start_redis
from workerkit.engines.celery.scheduling import CELERY_SCHEDULER_PREFIX, CeleryPublisher
from workerkit.engines.rq.jobs import read_state
from workerkit.engines.rq.scheduling import RQ_SCHEDULER_PREFIX, rq_enqueue_writes
from workerkit.errors import StoreError, StoreUnavailable
from workerkit.scheduler.contract import (
    FireOutcome,
    Schedule,
    SchedulerStore,
    fire_job_id,
    fire_key,
)
from workerkit.scheduler.redis_store import RedisSchedulerStore, RedisWrite, scheduler_client
from workerkit.scheduler.triggers import Every

if TYPE_CHECKING:
    import redis

PREFIX = "test:sched:"


def writes(schedule: Schedule, fire_time: float, job_id: str) -> list[RedisWrite]:
    return [
        RedisWrite("HSET", f"job:{job_id}", ("schedule", schedule.name, "at", fire_time)),
        RedisWrite("RPUSH", "queue", (job_id,)),
        RedisWrite("SADD", "queues", ("queue",)),
    ]


@pytest.fixture
def store(redis_client: redis.Redis[bytes]) -> Iterator[RedisSchedulerStore]:
    made = RedisSchedulerStore(redis_client, writes, prefix=PREFIX, retention=60)
    try:
        yield made
    finally:
        made.close()


TICK = Schedule("tick", "t", Every(1), args=(1,))


def test_the_epoch_outlives_the_lease_key(
    store: RedisSchedulerStore, redis_client: redis.Redis[bytes]
) -> None:
    first = store.acquire("a", 0.2)
    assert first is not None
    again = store.acquire("a", 0.2)  # the holder keeps its epoch
    assert again is not None
    assert again.epoch == first.epoch
    redis_client.delete(store.key("lease"))  # as if it expired
    second = store.acquire("a", 5)
    assert second is not None
    assert second.epoch > first.epoch
    assert redis_client.ttl(store.key("epoch")) == -1  # never expires


def test_the_lease_expires_on_redis_clock(store: RedisSchedulerStore) -> None:
    lease = store.acquire("a", 0.3)
    assert lease is not None
    assert store.acquire("b", 5) is None
    leader = store.leader()
    assert leader is not None
    assert 0 < leader.expires_in <= 0.3
    assert abs(lease.expires_at - store.clock() - 0.3) < 0.2
    deadline = time.monotonic() + 5
    while store.leader() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    taken = store.acquire("b", 5)
    assert taken is not None
    assert taken.epoch == lease.epoch + 1
    assert store.renew(lease, 5) is None
    assert store.fire(TICK, 10.0, epoch=lease.epoch, reason="on_time") is FireOutcome.NOT_LEADER


def test_a_fire_does_the_engines_writes_once(
    store: RedisSchedulerStore, redis_client: redis.Redis[bytes]
) -> None:
    lease = store.acquire("a", 5)
    assert lease is not None
    assert store.register(lease, [TICK])
    assert store.fire(TICK, 10.0, epoch=lease.epoch, reason="on_time") is FireOutcome.FIRED
    assert store.fire(TICK, 10.0, epoch=None, reason="standby") is FireOutcome.ALREADY_FIRED
    job_id = fire_job_id("tick", 10.0)
    assert redis_client.hgetall(f"job:{job_id}") == {b"schedule": b"tick", b"at": b"10.0"}
    assert redis_client.lrange("queue", 0, -1) == [job_id.encode()]
    record = store.fire_record("tick", 10.0)
    assert record is not None
    assert (record.job_id, record.reason) == (job_id, "on_time")
    # Kept for the retention period (60 s here), by Redis.
    ttl = redis_client.pttl(store.key("fire", "tick", fire_key(10.0)))
    assert 50_000 < ttl <= 60_000


def test_a_write_to_a_key_of_another_type_writes_nothing(
    store: RedisSchedulerStore, redis_client: redis.Redis[bytes]
) -> None:
    lease = store.acquire("a", 5)
    assert lease is not None
    assert store.register(lease, [TICK])
    redis_client.set("queues", "a string")
    with pytest.raises(StoreError, match="is a string, not a set"):
        store.fire(TICK, 10.0, epoch=lease.epoch, reason="on_time")
    assert store.fire_record("tick", 10.0) is None
    assert redis_client.llen("queue") == 0
    assert store.states()["tick"].last_fire is None


def test_the_last_fire_is_the_latest_fire_time_whatever_the_order(
    store: RedisSchedulerStore,
) -> None:
    lease = store.acquire("a", 5)
    assert lease is not None
    assert store.register(lease, [TICK])
    for t in (20.0, 12.0):  # a catch-up of an older time after a newer one
        assert store.fire(TICK, t, epoch=lease.epoch, reason="on_time") is FireOutcome.FIRED
    last = store.states()["tick"].last_fire
    assert last is not None
    assert last.fire_time == 20.0


def test_an_unreachable_redis_is_store_unavailable() -> None:
    store = RedisSchedulerStore(scheduler_client("redis://127.0.0.1:1/0"), writes, prefix=PREFIX)
    for call in (
        lambda: store.acquire("a", 5),
        lambda: store.fire(TICK, 1.0, epoch=None, reason="standby"),
        lambda: store.states(),
        store.clock,
    ):
        with pytest.raises(StoreUnavailable):
            call()


@pytest.mark.timeout(60)
def test_an_outage_that_loses_redis_data_keeps_old_epochs_fenced() -> None:
    """Redis restarted without persistence: the epoch counter is gone with the rest, yet the
    next leader's epoch is above the old one, so the old leader's fires are refused."""
    server = start_redis()
    try:
        url = server.url(0)
        store = RedisSchedulerStore(scheduler_client(url), writes, prefix=PREFIX)
        old = store.acquire("old", 60)
        assert old is not None
        assert store.register(old, [TICK])
        server.process.stop()  # down, its directory kept for the restart
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.fire(TICK, 10.0, epoch=old.epoch, reason="on_time")
        assert time.monotonic() - started < 5  # at once, not after a client backoff
        server = restart_redis(server)
        new = store.acquire("new", 60)
        assert new is not None
        assert new.epoch > old.epoch
        assert store.register(new, [TICK])
        assert store.fire(TICK, 10.0, epoch=old.epoch, reason="on_time") is FireOutcome.NOT_LEADER
        assert store.fire(TICK, 10.0, epoch=new.epoch, reason="on_time") is FireOutcome.FIRED
        store.close()
    finally:
        server.stop()


def test_writes_are_checked_when_built() -> None:
    with pytest.raises(ValueError, match="not HSET"):
        RedisWrite("DEL", "k", ("x",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unpaired"):
        RedisWrite("HSET", "k", ("field",))


# -- the contract suite, with each engine's enqueue writes --------------------------------------


class TestRqSchedulerStore(SchedulerStoreContract):
    """The store as ``workerkit scheduler rq`` opens it: RQ job hashes on RQ's queues."""

    @pytest.fixture
    def store(self, redis_url: str) -> Iterator[SchedulerStore]:
        client = scheduler_client(redis_url)
        made = RedisSchedulerStore(client, rq_enqueue_writes(client), prefix=RQ_SCHEDULER_PREFIX)
        made.own_client()
        try:
            yield made
        finally:
            made.close()

    @pytest.fixture
    def enqueued(self, redis_client: redis.Redis[bytes]) -> Callable[[], list[Enqueued]]:
        def read() -> list[Enqueued]:
            jobs = []
            for queue_key in sorted(redis_client.smembers("rq:queues")):
                for raw_id in redis_client.lrange(queue_key, 0, -1):
                    job = Job.fetch(
                        raw_id.decode(), connection=redis_client, serializer=JSONSerializer
                    )
                    fired = read_state(redis_client, job.id)
                    jobs.append(
                        Enqueued(
                            job_id=job.id,
                            schedule=fired["schedule"],
                            fire_time=fired["fire_time"],
                            task=str(job.func_name),
                            args=tuple(job.args),
                            kwargs=dict(job.kwargs),
                            queue=job.origin,
                        )
                    )
            return jobs

        return read


class TestCelerySchedulerStore(SchedulerStoreContract):
    """The store as ``workerkit scheduler celery`` opens it: kombu messages on Redis lists."""

    @pytest.fixture
    def store(self, redis_url: str) -> Iterator[SchedulerStore]:
        app = Celery("contract", broker=redis_url, set_as_current=False)
        made = RedisSchedulerStore(
            scheduler_client(redis_url), CeleryPublisher(app), prefix=CELERY_SCHEDULER_PREFIX
        )
        made.own_client()
        try:
            yield made
        finally:
            made.close()

    @pytest.fixture
    def enqueued(self, redis_client: redis.Redis[bytes]) -> Callable[[], list[Enqueued]]:
        def read() -> list[Enqueued]:
            jobs = []
            for key in redis_client.scan_iter():
                if redis_client.type(key) != b"list":
                    continue
                for raw in redis_client.lrange(key, 0, -1):
                    message = json.loads(raw)
                    headers = message["headers"]
                    args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
                    jobs.append(
                        Enqueued(
                            job_id=headers["id"],
                            schedule=headers["workerkit_schedule"],
                            fire_time=headers["workerkit_fire_time"],
                            task=headers["task"],
                            args=tuple(args),
                            kwargs=kwargs,
                            queue=message["properties"]["delivery_info"]["routing_key"],
                        )
                    )
            return jobs

        return read


def test_an_epoch_number_handed_out_again_does_not_fence_in_its_old_holder(
    redis_client: redis.Redis[bytes],
) -> None:
    """After a failover to a lagging replica the counter may give a new leader the number an
    old leader still holds: the old one's register, fire and prune are refused (holder+epoch)."""
    old_store = RedisSchedulerStore(redis_client, writes, prefix=PREFIX)
    new_store = RedisSchedulerStore(redis_client, writes, prefix=PREFIX)
    old = old_store.acquire("old", 5)
    assert old is not None
    assert old_store.register(old, [TICK])
    # The replica promoted had the counter from before old's INCR, and no lease.
    redis_client.delete(old_store.key("lease"))
    redis_client.set(old_store.key("epoch"), old.epoch - 1)
    new = new_store.acquire("new", 5)
    assert new is not None
    assert new.epoch == old.epoch
    changed = Schedule("tick", "t", Every(2), args=(1,))
    assert new_store.register(new, [changed])
    assert not old_store.register(old, [TICK])  # would re-register the old definition
    assert old_store.fire(TICK, 10.0, epoch=old.epoch, reason="on_time") is FireOutcome.NOT_LEADER
    assert old_store.prune(old, 1e12) == 0
    assert new_store.fire(changed, 10.0, epoch=new.epoch, reason="on_time") is FireOutcome.FIRED
    assert redis_client.llen("queue") == 1


def test_each_fire_record_keeps_the_fingerprint_it_fired_under(
    store: RedisSchedulerStore, redis_client: redis.Redis[bytes]
) -> None:
    """The record of one fire and the last fire both carry the fingerprint (REVIEW14 F2); a
    record written before fingerprints were kept reads as None."""
    lease = store.acquire("a", 5)
    assert lease is not None
    assert store.register(lease, [TICK])
    assert store.fire(TICK, 10.0, epoch=lease.epoch, reason="on_time") is FireOutcome.FIRED
    record = store.fire_record("tick", 10.0)
    assert record is not None
    assert record.fingerprint == TICK.fingerprint()
    last = store.states()["tick"].last_fire
    assert last is not None
    assert last.fingerprint == TICK.fingerprint()
    old = json.dumps(["11000", "wk-old", "on_time"])  # as written before fingerprints
    redis_client.set(store.key("fire", "tick", fire_key(11.0)), old)
    redis_client.hdel(store.key("last", "tick"), "fingerprint")
    older = store.fire_record("tick", 11.0)
    assert older is not None
    assert (older.job_id, older.fingerprint) == ("wk-old", None)
    last = store.states()["tick"].last_fire
    assert last is not None
    assert last.fingerprint is None
