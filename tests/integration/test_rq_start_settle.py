"""The rq engine's start and settle under one exactly placed network fault, on a real redis-server
(tests/support/cutting_proxy.py cuts the worker's connections at one chosen command).

A worker runs in burst mode in the test's own process: a start that is one script (an id
queued twice never starts twice), a settle whose connection dies while RQ watches a key (RQ
runs its bookkeeping again: nothing left in the StartedJobRegistry), a settle that landed but
whose reply was lost (its real outcome, not ``lease_lost``), and a popped job whose start gives
up at the release while Redis is unreachable (pushed back, not lost).
"""

from __future__ import annotations

import signal
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
from workerkit.engines.rq import RqApp, SimpleWorker
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
    # No supervisor here; and RQ's work() installs signal handlers in this process: put them back.
    monkeypatch.delenv("WORKERKIT_SUPERVISOR_SOCKET", raising=False)
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    calls.clear()
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


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
