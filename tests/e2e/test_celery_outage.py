"""A Celery worker whose broker restarts under a checkpointed task (issue 13, celery (a)).

A checkpoint write that meets the outage is retried while the lease holds; one the broker
cannot take within the lease stops the task, which goes back to its queue with its last saved
checkpoint: never failed, never lost. Asserted from the task's own journal lines.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from tests.support import servers
from tests.support.celery_harness import celery_supervisor
from tests.support.harness import Env, wait_until
from tests.support.suite import start_or_skip

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:celery"),
]


@pytest.fixture(scope="module")
def restartable() -> Iterator[list[servers.RedisServer]]:
    """The module's redis-server (append-only: its data survives a restart)."""
    holder = [start_or_skip(lambda: servers.start_redis(appendonly=True))]
    try:
        yield holder
    finally:
        holder[0].stop()


@pytest.fixture
def broker(restartable: list[servers.RedisServer]) -> list[servers.RedisServer]:
    client = redis.Redis.from_url(restartable[0].url(0))
    client.flushdb()
    client.close()
    return restartable


def send(url: str, task: str, *args: object, task_id: str) -> None:
    """Through an app of its own: the test app's producer pool keeps the first URL it used."""
    app = Celery("outage", broker=url)
    app.send_task(task, args=list(args), task_id=task_id, queue="celery")
    app.close()


def _lines(env: Env, kind: str, label: str) -> list[str]:
    return [line for line in env.lines() if line.startswith(f"{kind} {label} ")]


def test_a_checkpoint_write_rides_out_a_broker_restart_shorter_than_the_lease(
    tmp_path: Path, broker: list[servers.RedisServer]
) -> None:
    # W = 12 s: leases live 6 s, renewed every 2 s; a task stops when less than 1.5 s is left,
    # so a 1.5 s outage stays well inside the lease.
    url = broker[0].url(0)
    env = Env(tmp=tmp_path, database_url="", journal=tmp_path / "journal.txt")
    env.extra["WORKERKIT_RECOVERY_WINDOW"] = "12"
    with celery_supervisor(env, url, worker_args=("--pool=prefork",)) as pod:
        pod.wait_ready()
        send(url, "steps", "s", 12, 0.3, task_id="s")
        client = redis.Redis.from_url(url)
        wait_until(
            lambda: client.exists("workerkit:celery:checkpoint:s"),
            timeout=20,
            what="the first checkpoint",
        )
        client.close()
        broker[0] = servers.restart_redis(broker[0], down_for=1.5)
        wait_until(lambda: _lines(env, "done", "s"), timeout=40, what="the task to complete")
        retried = [e for e in pod.events_named("broker_write_retry") if e["what"] == "checkpoint"]
        assert retried, pod.log_text()
        assert [e for e in pod.events_named("broker_write_recovered") if e["job_id"] == "s"]
        # One run, which went on across the restart: never failed by the write's error.
        assert len(_lines(env, "start", "s")) == 1, env.lines()
        assert len(_lines(env, "done", "s")) == 1, env.lines()
        assert not [line for line in _lines(env, "end", "s") if "Error" in line], env.lines()


def test_a_checkpoint_the_broker_cannot_take_within_the_lease_releases_the_task(
    tmp_path: Path, broker: list[servers.RedisServer]
) -> None:
    # W = 4 s: leases live 2 s. Redis stays down 4 s: no checkpoint can be saved within the
    # lease; the task stops and its message goes back (once Redis is back) with its last
    # saved checkpoint. Before the fix the write's ConnectionError failed the task, whose
    # message Celery then acknowledged: lost.
    url = broker[0].url(0)
    env = Env(tmp=tmp_path, database_url="", journal=tmp_path / "journal.txt")
    env.extra["WORKERKIT_RECOVERY_WINDOW"] = "4"
    with celery_supervisor(env, url, worker_args=("--pool=prefork",)) as pod:
        pod.wait_ready()
        send(url, "steps", "r", 16, 0.25, task_id="r")
        client = redis.Redis.from_url(url)
        wait_until(
            lambda: client.get("workerkit:celery:checkpoint:r") not in (None, b"0"),
            timeout=20,
            what="a checkpoint",
        )
        client.close()
        broker[0] = servers.restart_redis(broker[0], down_for=4.0)
        wait_until(lambda: _lines(env, "done", "r"), timeout=60, what="the task to complete")
        starts = _lines(env, "start", "r")
        assert len(starts) >= 2, env.lines()
        resumed = [int(m.group(1)) for s in starts[1:] if (m := re.search(r"from=(\d+)", s))]
        assert max(resumed, default=0) > 0, env.lines()  # the saved checkpoint was kept
        assert len(_lines(env, "done", "r")) == 1, env.lines()
        client = redis.Redis.from_url(url)
        wait_until(lambda: client.hlen("unacked") == 0, timeout=20, what="the ack")
        assert client.llen("celery") == 0
        client.close()
        assert pod.proc.poll() is None, pod.log_text()
