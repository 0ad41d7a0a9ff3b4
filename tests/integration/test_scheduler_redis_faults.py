"""Redis refusing writes for a while (OOM, READONLY after a failover, a BUSY script, MISCONF
after a failed save) on a real redis-server: the scheduler store answers StoreUnavailable with
Redis's reason, and core's runner rides it out (not ready, retrying) and fires again after."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from tests.support.harness import wait_until
from tests.support.servers import RedisServer, free_port, start_redis
from workerkit.errors import StoreError, StoreUnavailable
from workerkit.scheduler.contract import FireOutcome, Schedule
from workerkit.scheduler.plan import SchedulerTiming
from workerkit.scheduler.redis_store import (
    RedisSchedulerStore,
    RedisWrite,
    store_error,
)
from workerkit.scheduler.runner import NullReporter, Runner
from workerkit.scheduler.triggers import Every

TICK = Schedule("tick", "t", Every(0.5))
TIMING = SchedulerTiming(
    lease_duration=3.0,
    renew_deadline=2.0,
    retry_period=0.3,
    standby_delay=0.3,
    misfire_grace=2.0,
    retention=600.0,
)


def writes(schedule: Schedule, fire_time: float, job_id: str) -> list[RedisWrite]:
    return [RedisWrite("RPUSH", "queue", (job_id,))]


@pytest.fixture
def server() -> Iterator[RedisServer]:
    own = start_redis()
    try:
        yield own
    finally:
        own.process.stop()
        shutil.rmtree(own.directory, ignore_errors=True)


def busy_script(client: redis.Redis[bytes], seconds: float) -> threading.Thread:
    """A script that holds Redis for ``seconds`` (others get BUSY after the threshold)."""
    client.config_set("busy-reply-threshold", 100)
    spin = (
        "local t = redis.call('TIME') local until_us = t[1] * 1e6 + t[2] + ARGV[1] * 1e6 "
        "repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] >= until_us return 1"
    )
    kwargs = client.connection_pool.connection_kwargs
    runner = redis.Redis(host=kwargs["host"], port=kwargs["port"])
    thread = threading.Thread(target=runner.eval, args=(spin, 0, seconds), daemon=True)
    thread.start()
    wait_until(lambda: _busy(client), timeout=5, what="redis busy with the script")
    return thread


def _busy(client: redis.Redis[bytes]) -> bool:
    try:
        client.get("probe")
    except redis.ResponseError as exc:
        return str(exc).startswith("BUSY")
    return False


def oom(server: RedisServer, client: redis.Redis[bytes]) -> Callable[[], None]:
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", 1)
    return lambda: client.config_set("maxmemory", 0)


def readonly(server: RedisServer, client: redis.Redis[bytes]) -> Callable[[], None]:
    client.replicaof("127.0.0.1", free_port())  # a failover demoted it; its master is gone
    return lambda: client.replicaof("NO", "ONE")


def misconf(server: RedisServer, client: redis.Redis[bytes]) -> Callable[[], None]:
    client.config_set("save", "3600 1")
    shutil.rmtree(server.directory)  # the RDB save cannot write its file (even as root)
    client.bgsave()
    wait_until(
        lambda: client.info("persistence")["rdb_last_bgsave_status"] == "err",
        timeout=10,
        what="a failed RDB save",
    )
    return lambda: client.config_set("save", "")


def busy(server: RedisServer, client: redis.Redis[bytes]) -> Callable[[], None]:
    thread = busy_script(client, 2.5)
    return lambda: thread.join(timeout=10)


FAULTS: dict[str, Callable[[RedisServer, redis.Redis[bytes]], Callable[[], None]]] = {
    "OOM": oom,
    "READONLY": readonly,
    "MISCONF": misconf,
    "BUSY": busy,
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("code", ["OOM", "READONLY", "MISCONF", "BUSY"])
def test_a_redis_refusing_writes_is_store_unavailable_with_its_reason(
    server: RedisServer, code: str
) -> None:
    admin = redis.Redis.from_url(server.url())
    store = RedisSchedulerStore.from_url(server.url(), writes, prefix="t:")
    lease = store.acquire("a", 10)
    assert lease is not None
    assert store.register(lease, [TICK])
    undo = FAULTS[code](server, admin)
    try:
        if code == "BUSY":
            with pytest.raises(StoreUnavailable, match=code):
                store.states()  # a BUSY Redis refuses reads too
        with pytest.raises(StoreUnavailable, match=code):
            store.fire(TICK, 10.0, epoch=lease.epoch, reason="on_time")
    finally:
        undo()
    assert store.fire(TICK, 10.0, epoch=lease.epoch, reason="on_time") is FireOutcome.FIRED
    store.close()
    admin.close()


class Health(NullReporter):
    def __init__(self) -> None:
        self.reports: list[tuple[bool, str]] = []

    def store_health(self, ok: bool, reason: str) -> None:
        self.reports.append((ok, reason))


@pytest.mark.timeout(90)
@pytest.mark.parametrize("code", ["OOM", "READONLY", "MISCONF", "BUSY"])
def test_the_runner_rides_out_a_redis_refusing_writes_and_fires_after(
    server: RedisServer, code: str
) -> None:
    admin = redis.Redis.from_url(server.url())
    store = RedisSchedulerStore.from_url(server.url(), writes, prefix="t:")
    health, stop = Health(), threading.Event()
    runner = Runner(store, [TICK], holder="r1", timing=TIMING, reporter=health)
    failed: list[BaseException] = []

    def run() -> None:
        try:
            runner.run(stop)
        except BaseException as exc:  # the old code: StoreError killed the runner
            failed.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: admin.llen("queue") >= 2, timeout=15, what="fires before the fault")
        undo = FAULTS[code](server, admin)
        try:
            wait_until(
                lambda: failed or any(not ok for ok, _ in health.reports),
                timeout=15,
                what="the store reported down",
            )
            assert not failed, f"the runner died: {failed[0]!r}"
            reason = next(reason for ok, reason in health.reports if not ok)
            assert code in reason
        finally:
            undo()
        before = admin.llen("queue")
        wait_until(lambda: admin.llen("queue") >= before + 2, timeout=20, what="fires after")
        assert health.reports[-1][0], "the store was not reported back up"
        assert thread.is_alive()
        assert not failed
    finally:
        stop.set()
        thread.join(timeout=10)
        store.close()
        admin.close()


def test_redis_codes_map_to_unavailable_and_script_errors_stay_errors() -> None:
    def error(kind: Any, text: str) -> StoreError:
        return store_error(kind(text))

    assert isinstance(error(redis.exceptions.BusyLoadingError, "LOADING"), StoreUnavailable)
    loading = store_error(redis.exceptions.ResponseError("LOADING Redis is loading the dataset"))
    assert isinstance(loading, StoreUnavailable)
    assert "LOADING" in str(loading)
    for text in ("TRYAGAIN x", "NOREPLICAS Not enough good replicas", "MASTERDOWN y"):
        assert isinstance(store_error(redis.exceptions.ResponseError(text)), StoreUnavailable)
    wrong = store_error(redis.exceptions.ResponseError("workerkit fire: q is a string, not a set"))
    assert type(wrong) is StoreError
    piped = "Command # 1 (SMEMBERS t:names) of pipeline caused error: BUSY Redis is busy"
    assert isinstance(store_error(redis.exceptions.ResponseError(piped)), StoreUnavailable)
