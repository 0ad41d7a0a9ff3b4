"""``workerkit run rq`` and ``workerkit run celery`` publish their presence to their own Redis.

What the dashboard's workers page reads (workerkit/engines/redis_presence.py): the worker ready
under the id its jobs are claimed with, then draining after SIGTERM with the job in hand and its
deadlines, and no record once the pod exited cleanly. Timing (tests/support/harness.py): D = 4 s.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis

from tests.support.celery_harness import celery_supervisor, send
from tests.support.harness import DRAIN, Env, Supervisor, wait_until
from tests.support.redis_db import flushed_db
from tests.support.rq_harness import RqEnv, rq_supervisor
from workerkit import exitcodes
from workerkit.engines.presence import PRESENCE_INTERVAL, Presence
from workerkit.engines.redis_presence import RedisPresenceStore

if TYPE_CHECKING:
    from tests.support.servers import RedisServer

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:celery"),
]

REDIS_DB = 11


@pytest.fixture
def redis_db(redis_server: RedisServer) -> Iterator[str]:
    with flushed_db(redis_server, REDIS_DB) as url:
        yield url


def mine(store: RedisPresenceStore, pid: int, state: str) -> Presence | None:
    return next((p for p in store.list_all() if p.pid == pid and p.state == state), None)


def follow_a_drain(pod: Supervisor, store: RedisPresenceStore, engine: str, job_id: str) -> None:
    """Ready, then draining with ``job_id`` in hand and the drain deadline D after the SIGTERM;
    the pod exits 0 and its record is gone."""
    pid = pod.worker_pid()
    wait = 3 * PRESENCE_INTERVAL
    ready = wait_until(lambda: mine(store, pid, "ready"), timeout=wait, what="ready")
    assert ready.engine == engine
    assert ready.lost(ready.heartbeat_at + ready.ttl + 1)
    assert not ready.lost(time.time())
    wait_until(lambda: job_id in (mine(store, pid, "ready") or ready).jobs, timeout=15, what="job")
    signalled = time.time()
    pod.signal(signal.SIGTERM)
    draining = wait_until(lambda: mine(store, pid, "draining"), timeout=5, what="draining")
    assert draining.worker_id == ready.worker_id
    assert draining.jobs == (job_id,)
    assert draining.drain_deadline == pytest.approx(signalled + DRAIN, abs=0.5)
    assert draining.hard_deadline is not None
    assert draining.hard_deadline > draining.drain_deadline
    code, _ = pod.wait_exit()
    assert code == exitcodes.OK, pod.log_text()
    assert [p for p in store.list_all() if p.pid == pid] == []


def test_workerkit_run_rq_publishes_its_presence_under_its_rq_worker_name(
    redis_db: str, tmp_path: Path
) -> None:
    env = RqEnv(tmp=tmp_path, redis_url=redis_db, journal=tmp_path / "journal.txt")
    client: redis.Redis[bytes] = redis.Redis.from_url(redis_db)
    store = RedisPresenceStore(client)
    try:
        env.enqueue("cooperative", "x", 100, job_id="x")  # 10 s of steps: longer than D
        with rq_supervisor(env) as pod:
            env.wait_line("start x 1 from 0")
            pid = pod.worker_pid()
            ready = wait_until(lambda: mine(store, pid, "ready"), timeout=15, what="ready")
            # The id is RQ's own worker name: the one `rq info` and the job's worker_name show.
            members = client.smembers("rq:workers")
            rq_names = {m.decode().removeprefix("rq:worker:") for m in members}
            assert ready.worker_id in rq_names, (ready, rq_names)
            follow_a_drain(pod, store, "rq", "x")
    finally:
        client.close()


def test_workerkit_run_celery_publishes_its_presence_to_the_broker(
    redis_url: str, tmp_path: Path
) -> None:
    # The broker every Celery e2e test uses (redis_url): `send` goes through kombu's producer
    # pool, which keeps the URL of its first use for the whole test process.
    env = Env(tmp=tmp_path, database_url="", journal=tmp_path / "journal.txt")
    client: redis.Redis[bytes] = redis.Redis.from_url(redis_url)
    store = RedisPresenceStore(client)
    try:
        send(redis_url, "steps", "long", 10, 1.0, task_id="long")  # 10 s: longer than D
        with celery_supervisor(env, redis_url) as pod:
            wait_until(
                lambda: any(line.startswith("start long") for line in env.lines()),
                timeout=30,
                what="the task to start",
            )
            follow_a_drain(pod, store, "celery", "long")
    finally:
        client.close()
