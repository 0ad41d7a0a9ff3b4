"""A queue paused from the dashboard, under a real ``workerkit run rq`` on two queues.

The paused queue's jobs wait (their own records say so: RQ's status, and no run in the journal)
while the other queue's run; after the resume they run, each exactly once. An idle worker with
every queue paused blocks on Redis (no busy loop) and stays ready.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.harness import wait_until
from tests.support.redis_db import flushed_db
from tests.support.rq_harness import RqEnv, rq_supervisor
from workerkit.engines.presence import PAUSE_REFRESH
from workerkit.engines.rq.dashboard import open_source
from workerkit.settings import Settings

if TYPE_CHECKING:
    import redis

    from tests.support.servers import RedisServer
    from workerkit.dashboard.model import DashboardSource

REDIS_DB = 7  # a database of our own on the session's server; flushed around each test
#: The contract: a pause takes effect within about 1-2 s (the pause set is re-read every
#: PAUSE_REFRESH, a blocked pop comes back within 1 s). Waited out with a margin.
PAUSE_TAKES_EFFECT = 2 * PAUSE_REFRESH + 1.0


@pytest.fixture
def rq_env(redis_server: RedisServer, tmp_path: Path) -> Iterator[RqEnv]:
    with flushed_db(redis_server, REDIS_DB) as url:
        yield RqEnv(tmp=tmp_path, redis_url=url, journal=tmp_path / "journal.txt")


@pytest.fixture
def source(rq_env: RqEnv) -> Iterator[DashboardSource]:
    opened = open_source(Settings(engine="rq", redis_url=rq_env.redis_url))
    try:
        yield opened
    finally:
        opened.close()


def ran(env: RqEnv, tag: str) -> int:
    return sum(1 for line in env.lines() if line.split()[:2] == ["ran", tag])


def commands(client: redis.Redis[bytes], name: str) -> int:
    stats = client.info("commandstats")
    return int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))


@pytest.mark.parametrize("worker_class", ["forking", "simple"])
def test_a_paused_queue_waits_while_the_other_runs_and_runs_each_job_once_after_the_resume(
    rq_env: RqEnv, source: DashboardSource, worker_class: str
) -> None:
    client = rq_env.connection()
    with rq_supervisor(rq_env, worker_class=worker_class, queues="a,b") as pod:
        pod.wait_ready()
        rq_env.enqueue("tick", "warm", job_id="warm", queue="a")
        rq_env.wait_line("ran warm 1")  # idle now, blocked in its pop on a and b

        source.pause_queue("a", "tester")
        time.sleep(PAUSE_TAKES_EFFECT)  # the contract's bound, not a guess: asserted below
        for n in (1, 2):
            rq_env.enqueue("tick", f"a-{n}", job_id=f"a-{n}", queue="a")
        for n in (1, 2):
            rq_env.enqueue("tick", f"b-{n}", job_id=f"b-{n}", queue="b")
        rq_env.wait_line("ran b-2 1")  # the worker went past a's jobs, twice
        assert [ran(rq_env, f"a-{n}") for n in (1, 2)] == [0, 0]
        assert [rq_env.job(f"a-{n}").get_status() for n in (1, 2)] == ["queued", "queued"]
        assert client.lrange("rq:queue:a", 0, -1) == [b"a-1", b"a-2"]
        assert {s.name: (s.waiting, s.paused) for s in source.queues()} == {
            "a": (2, True),
            "b": (0, False),
        }

        # Every queue paused: the worker idles, blocked in Redis (no busy loop), and is ready.
        source.pause_queue("b", "tester")
        time.sleep(PAUSE_TAKES_EFFECT)
        pops, reads = commands(client, "blpop"), commands(client, "hkeys")
        window_started = time.monotonic()
        time.sleep(3.0)
        window = time.monotonic() - window_started
        pops, reads = commands(client, "blpop") - pops, commands(client, "hkeys") - reads
        assert 1 <= pops <= window + 2, pops  # about one blocking pop a second
        assert reads <= window / PAUSE_REFRESH + 2, reads  # the cached pause read
        assert pod.get("/readyz")[0] == 200

        resumed_at = time.monotonic()
        source.resume_queue("a", "tester")
        source.resume_queue("b", "tester")
        rq_env.wait_line("ran a-1 1")
        rq_env.wait_line("ran a-2 1")
        took = time.monotonic() - resumed_at
        print(f"resume->run {took:.2f}s; idle over {window:.1f}s: blpop {pops}, hkeys {reads}")
        assert took < 10, took  # within a second or two; a generous bound under load
        wait_until(
            lambda: rq_env.job("a-2").get_status() == "finished", timeout=15, what="a-2 finished"
        )
    assert [ran(rq_env, tag) for tag in ("warm", "a-1", "a-2", "b-1", "b-2")] == [1] * 5
