"""Core's runner on the Redis store of the RQ engine, on a real redis-server: two replicas, a
handover in the middle, and every fire time enqueued exactly once, on time."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING

import pytest

from tests.support.harness import wait_until
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


class Replica:
    def __init__(self, redis_url: str, holder: str) -> None:
        client = scheduler_client(redis_url)
        self.store = RedisSchedulerStore(
            client, rq_enqueue_writes(client), prefix=RQ_SCHEDULER_PREFIX
        )
        self.store.own_client()
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


def fired(redis_client: redis.Redis[bytes]) -> list[tuple[int, float]]:
    """(fire ms, seconds late) of each job enqueued, in queue order."""
    out = []
    for raw in redis_client.lrange("rq:queue:default", 0, -1):
        state = read_state(redis_client, raw.decode())
        enqueued = redis_client.hget(f"rq:job:{raw.decode()}", "enqueued_at")
        assert enqueued is not None
        at = datetime.fromisoformat(enqueued.decode().replace("Z", "+00:00")).timestamp()
        out.append((fire_key(state["fire_time"]), at - state["fire_time"]))
    return out


@pytest.mark.timeout(60)
def test_two_replicas_and_a_handover_fire_every_time_once(
    redis_url: str, redis_client: redis.Redis[bytes], replicas: list[Replica]
) -> None:
    first = Replica(redis_url, "first")
    replicas.append(first)
    wait_until(lambda: first.store.leader(), timeout=10, what="a leader")
    replicas.append(Replica(redis_url, "second"))
    wait_until(lambda: len(fired(redis_client)) >= 6, timeout=20, what="six fires")
    first.halt()  # SIGTERM's path: the lease is released, the standby takes over
    count = len(fired(redis_client))
    wait_until(lambda: len(fired(redis_client)) >= count + 6, timeout=20, what="six more")
    for replica in replicas:
        if not replica.stop.is_set():
            replica.halt()
    times = [ms for ms, _ in fired(redis_client)]
    assert len(times) == len(set(times)), "a fire time was enqueued twice"
    ordered = sorted(times)
    assert [b - a for a, b in itertools.pairwise(ordered)] == [500] * (len(ordered) - 1), (
        "a fire time was missed"
    )
    late = sorted(delay for _, delay in fired(redis_client))
    # The handover costs at most the standby delay; on time otherwise (a loose bound: CPU is
    # shared with other test runs).
    assert late[-1] < 1.0, f"a fire was {late[-1]:.3f} s late"
    assert late[len(late) // 2] < 0.2, f"median delay {late[len(late) // 2]:.3f} s"
