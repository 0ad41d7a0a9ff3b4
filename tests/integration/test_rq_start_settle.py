"""The rq engine's start and settle under one exactly placed network fault, on a real redis-server
(tests/support/cutting_proxy.py cuts the worker's connections at one chosen command).

A worker runs in burst mode in the test's own process: a start that is one script (an id
queued twice never starts twice), a settle whose connection dies while RQ watches a key (RQ
runs its bookkeeping again: nothing left in the StartedJobRegistry), a settle that landed but
whose reply was lost (its real outcome, not ``lease_lost``), and a popped job whose start gives
up at the release while Redis is unreachable (pushed back, not lost), and a job whose Redis
went away before RQ called its function (deferred unrun, not failed).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from rq import Queue
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from tests.support.cutting_proxy import CuttingProxy
from tests.support.rq_in_process import rq_worker_in_this_process
from workerkit.engines.rq import RqApp, SimpleWorker
from workerkit.engines.rq.jobs import read_state
from workerkit.engines.rq.leases import AttemptKeys, Leases, lease_key, started_key
from workerkit.settings import Settings

if TYPE_CHECKING:
    from tests.support.servers import RedisServer

MODULE = __name__
app = RqApp(modules=[MODULE])
calls: list[str] = []


def note(name: str) -> str:
    calls.append(name)
    return name


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    with rq_worker_in_this_process(monkeypatch):
        calls.clear()
        yield


@pytest.fixture
def proxy(redis_server: RedisServer, redis_url: str) -> Iterator[CuttingProxy]:
    with CuttingProxy(redis_server.port) as cutting:
        yield cutting


def queue(client: redis.Redis[bytes]) -> Queue:
    return Queue("default", connection=client, serializer=JSONSerializer)


def worker_on(url: str, **settings: Any) -> SimpleWorker:
    # No retries inside redis-py: a connection error reaches the worker's own retry at once.
    client = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0))
    return SimpleWorker(
        ["default"],
        connection=client,
        app=app,
        settings=Settings(engine="rq", redis_url=url, app=f"{MODULE}:app", **settings),
    )


def proxied(proxy: CuttingProxy, redis_url: str) -> str:
    return proxy.url(int(redis_url.rsplit("/", 1)[1]))


def outcomes(caplog: pytest.LogCaptureFixture, job_id: str) -> list[str]:
    return [
        str(getattr(r, "outcome", ""))
        for r in caplog.records
        if getattr(r, "event", None) == "job_finished" and getattr(r, "job_id", None) == job_id
    ]


def test_an_id_queued_twice_runs_once_whether_the_first_attempt_ended_or_still_holds_it(
    redis_client: redis.Redis[bytes], redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="workerkit")
    q = queue(redis_client)
    q.enqueue(f"{MODULE}.note", "ended", job_id="ended")
    redis_client.rpush("rq:queue:default", "ended")  # queued twice (an old AOF, a push back)
    worker_on(redis_url).work(burst=True)
    assert calls == ["ended"]
    assert q.fetch_job("ended").get_status() == "finished"  # type: ignore[union-attr]

    # Another attempt holds the job (started, its horse not yet running it): not started here.
    q.enqueue(f"{MODULE}.note", "held", job_id="held")
    redis_client.lpop("rq:queue:default")
    redis_client.set(lease_key("held"), "run:other", px=60_000)
    redis_client.rpush("rq:queue:default", "held")
    worker_on(redis_url).work(burst=True)
    assert calls == ["ended"]
    assert redis_client.get(lease_key("held")) == b"run:other"
    assert StartedJobRegistry("default", connection=redis_client).get_job_ids() == []
    refused = [r for r in caplog.records if getattr(r, "event", None) == "job_start_refused"]
    assert [getattr(r, "job_id", None) for r in refused] == ["ended", "held"]


def test_a_start_whose_reply_was_lost_is_its_own_on_the_retry_and_nobody_elses(
    redis_client: redis.Redis[bytes],
) -> None:
    q = queue(redis_client)
    q.enqueue(f"{MODULE}.note", "s", job_id="s")
    leases = Leases(redis_client, lease_ttl=4.0)
    mine, theirs = AttemptKeys("s", "mine", "default"), AttemptKeys("s", "theirs", "default")
    writes = [("HSET", "rq:job:s", "worker_name", "w1")]
    assert leases.start(mine, writes).ok
    assert leases.start(mine, writes).ok  # the same attempt again: its reply was lost
    assert not leases.start(theirs, [("HSET", "rq:job:s", "worker_name", "w2")]).ok
    assert redis_client.hget("rq:job:s", "worker_name") == b"w1"
    assert redis_client.zrange(started_key("default"), 0, -1) == [mine.member.encode()]


def test_a_settle_cut_while_rq_watches_leaves_nothing_in_the_started_registry(
    redis_client: redis.Redis[bytes],
    redis_url: str,
    proxy: CuttingProxy,
) -> None:
    q = queue(redis_client)
    q.enqueue(f"{MODULE}.note", "w", job_id="w")
    # The success MULTI never reaches Redis: RQ's loop sees a WatchError and runs it again.
    proxy.cut_at(b"successful_job_count", deliver=False, outage=0.0)
    worker_on(proxied(proxy, redis_url)).work(burst=True)
    assert proxy.cut.is_set()
    assert calls == ["w"]
    assert q.fetch_job("w").get_status() == "finished"  # type: ignore[union-attr]
    assert StartedJobRegistry("default", connection=redis_client).get_job_ids() == []
    assert redis_client.zcard("rq:executions:w") == 0


def test_a_settle_that_landed_but_whose_reply_was_lost_reports_its_real_outcome(
    redis_client: redis.Redis[bytes],
    redis_url: str,
    proxy: CuttingProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="workerkit")
    q = queue(redis_client)
    q.enqueue(f"{MODULE}.note", "r", job_id="r")
    # The success MULTI runs; its reply is lost and Redis stays unreachable for a second.
    proxy.cut_at(b"successful_job_count", deliver=True, outage=1.0)
    worker_on(proxied(proxy, redis_url)).work(burst=True)
    assert proxy.cut.is_set()
    assert calls == ["r"]
    assert q.fetch_job("r").get_status() == "finished"  # type: ignore[union-attr]
    assert outcomes(caplog, "r") == ["succeeded"]
    assert StartedJobRegistry("default", connection=redis_client).get_job_ids() == []


def test_a_popped_job_whose_start_gives_up_at_the_release_goes_back_to_its_queue(
    redis_client: redis.Redis[bytes],
    redis_url: str,
    proxy: CuttingProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="workerkit")
    q = queue(redis_client)
    q.enqueue(f"{MODULE}.note", "p", job_id="p")
    worker = worker_on(proxied(proxy, redis_url), release_margin=8.0)
    # Popped; its start never reaches Redis, which stays unreachable for a second, and the
    # worker releases its work meanwhile (the supervisor's release, or its death).
    proxy.cut_at(
        b"rq:executions:p", deliver=False, outage=1.0, on_cut=worker.wk_release_now_and_stop
    )
    worker.work(burst=True)
    assert proxy.cut.is_set()
    assert calls == []
    assert q.get_job_ids() == ["p"]  # back at the front, not lost
    assert redis_client.exists(lease_key("p")) == 0
    events = [getattr(r, "event", None) for r in caplog.records]
    assert "popped_job_held" in events
    assert "popped_job_pushed_back" in events
    worker_on(redis_url).work(burst=True)
    assert calls == ["p"]


def test_redis_cut_before_the_job_s_function_is_called_defers_the_job_unrun_never_fails_it(
    redis_client: redis.Redis[bytes], redis_url: str, proxy: CuttingProxy
) -> None:
    q = queue(redis_client)
    job = q.enqueue(f"{MODULE}.note", "b", job_id="b")
    # RQ's Job.perform sends a PERSIST of the job hash before it calls the function.
    proxy.cut_at(b"PERSIST", deliver=False, outage=0.0)
    worker_on(proxied(proxy, redis_url)).work(burst=True)
    assert proxy.cut.is_set()
    assert calls == []
    assert job.get_status() == "scheduled"  # deferred, its attempt given back
    assert read_state(redis_client, "b")["attempts"] == 0
    assert Leases(redis_client, lease_ttl=4.0).promote("default", "", now=time.time() + 60) == 1
    worker_on(redis_url).work(burst=True)
    assert calls == ["b"]
    assert job.get_status() == "finished"
