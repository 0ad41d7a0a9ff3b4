"""Core's runner on the Redis store of the RQ and Celery engines, on a real redis-server: two
replicas, a handover in the middle, and every fire time enqueued exactly once, on time."""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
from celery import Celery

from tests.support.harness import wait_until
from workerkit.engines.celery.scheduling import CELERY_SCHEDULER_PREFIX, CeleryPublisher
from workerkit.engines.rq.jobs import read_state
from workerkit.engines.rq.scheduling import RQ_SCHEDULER_PREFIX, rq_enqueue_writes
from workerkit.scheduler.contract import Schedule, fire_key
from workerkit.scheduler.plan import SchedulerTiming
from workerkit.scheduler.redis_store import RedisSchedulerStore, scheduler_client
from workerkit.scheduler.runner import NullReporter, Runner
from workerkit.scheduler.triggers import Every

if TYPE_CHECKING:
    import redis

TIMING = SchedulerTiming(
    lease_duration=3.0,
    renew_deadline=2.0,
    retry_period=0.3,
    standby_delay=0.3,
    misfire_grace=2.0,
    retention=600.0,
)
TICK = Schedule("tick", "tests.apps.rq_schedules.add", Every(0.5), args=(1, 2), queue="default")


def open_store(engine: str, redis_url: str) -> RedisSchedulerStore:
    client = scheduler_client(redis_url)
    if engine == "rq":
        store = RedisSchedulerStore(client, rq_enqueue_writes(client), prefix=RQ_SCHEDULER_PREFIX)
    else:
        app = Celery("runner", broker=redis_url, set_as_current=False)
        store = RedisSchedulerStore(client, CeleryPublisher(app), prefix=CELERY_SCHEDULER_PREFIX)
    store.own_client()
    return store


class Replica:
    def __init__(self, engine: str, redis_url: str, holder: str) -> None:
        self.store = open_store(engine, redis_url)
        self.stop = threading.Event()
        runner = Runner(self.store, [TICK], holder=holder, timing=TIMING, reporter=NullReporter())
        self.thread = threading.Thread(target=runner.run, args=(self.stop,), daemon=True)
        self.thread.start()

    def halt(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()
        self.store.close()


@pytest.fixture
def replicas(redis_url: str) -> Iterator[list[Replica]]:
    started: list[Replica] = []
    try:
        yield started
    finally:
        for replica in started:
            if not replica.stop.is_set():
                replica.halt()


def fired(engine: str, redis_client: redis.Redis[bytes]) -> list[int]:
    """The fire time (ms) of each job on the queue, as the engine's worker would read it."""
    if engine == "rq":
        return [
            fire_key(read_state(redis_client, raw.decode())["fire_time"])
            for raw in redis_client.lrange("rq:queue:default", 0, -1)
        ]
    return [
        fire_key(json.loads(raw)["headers"]["workerkit_fire_time"])
        for raw in redis_client.lrange("default", 0, -1)
    ]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("engine", ["rq", "celery"])
def test_two_replicas_and_a_handover_fire_every_time_once(
    engine: str, redis_url: str, redis_client: redis.Redis[bytes], replicas: list[Replica]
) -> None:
    first = Replica(engine, redis_url, "first")
    replicas.append(first)
    wait_until(lambda: first.store.leader(), timeout=10, what="a leader")
    replicas.append(Replica(engine, redis_url, "second"))
    wait_until(lambda: len(fired(engine, redis_client)) >= 6, timeout=20, what="six fires")
    first.halt()  # SIGTERM's path: the lease is released, the standby takes over
    count = len(fired(engine, redis_client))
    wait_until(lambda: len(fired(engine, redis_client)) >= count + 6, timeout=20, what="six more")
    observer = open_store(engine, redis_url)
    for replica in replicas:
        if not replica.stop.is_set():
            replica.halt()
    times = fired(engine, redis_client)
    assert len(times) == len(set(times)), "a fire time was enqueued twice"
    ordered = sorted(times)
    assert [b - a for a, b in itertools.pairwise(ordered)] == [500] * (len(ordered) - 1), (
        "a fire time was missed"
    )
    # How late each was recorded (the record and the enqueue are one script), by Redis's clock.
    late = []
    for ms in ordered:
        record = observer.fire_record("tick", ms / 1000)
        assert record is not None
        late.append(record.recorded_at - ms / 1000)
    observer.close()
    late.sort()
    # The handover costs at most the standby delay; on time otherwise (loose bounds: the CPU
    # is shared with other test runs).
    assert late[-1] < 1.0, f"a fire was {late[-1]:.3f} s late"
    assert late[len(late) // 2] < 0.2, f"median delay {late[len(late) // 2]:.3f} s"
