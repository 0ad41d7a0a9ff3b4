"""The Celery worker's pop when its reply never arrives (issue 13): Redis serves the pop, the
reply is lost (a proxy drops it and cuts every connection, as a Redis shutting down does).

With kombu's BRPOP the message was gone: popped in Redis, in no worker. The reliable pop
(workerkit/engines/celery/pop.py) moves it into the worker's in-flight list instead, from where
it goes back to its queue: at the worker's reconnection, or, when the worker died meanwhile, by
another worker's crash recovery. Asserted from the task's own journal: it ran exactly once.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import redis

from tests.support.celery_harness import celery_supervisor, send
from tests.support.cutting_proxy import CuttingProxy
from tests.support.harness import Env, wait_until

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:celery"),
]

#: In the pop's request, old and new: kombu's BRPOP, and the pop script's RPOP.
POP: bytes = b"RPOP"


def _env(tmp_path: Path) -> Env:
    env = Env(tmp=tmp_path, database_url="", journal=tmp_path / "journal.txt")
    env.extra["WORKERKIT_RECOVERY_WINDOW"] = "6"  # leases and liveness live 3 s
    return env


def _runs(env: Env, label: str) -> int:
    return sum(line.split()[:2] == ["noop", label] for line in env.lines())


def _nothing_left(url: str) -> bool:
    """No copy of the message anywhere it could run again from (its run acknowledged)."""
    client = redis.Redis.from_url(url)
    try:
        in_flight = [k for k in client.scan_iter("workerkit:celery:inflight:*") if client.llen(k)]
        return client.llen("celery") == 0 and client.hlen("unacked") == 0 and not in_flight
    finally:
        client.close()


def _whereabouts(url: str) -> str:
    """Every key that holds a copy of a message, and what it holds (for a failure's message)."""
    client = redis.Redis.from_url(url)
    try:
        lines = []
        for key in sorted(client.scan_iter("*")):
            kind = client.type(key).decode()
            if kind == "list":
                value: object = client.lrange(key, 0, -1)
            elif kind == "hash":
                value = client.hgetall(key)
            elif kind == "zset":
                value = client.zrange(key, 0, -1, withscores=True)
            else:
                value = kind
            lines.append(f"{key.decode()}: {str(value)[:300]}")
        return "\n".join(lines)
    finally:
        client.close()


def _proxied(url: str, port: int) -> str:
    return url.replace(url.split("//")[1].split("/")[0], f"127.0.0.1:{port}")


def test_a_pop_whose_reply_is_lost_runs_its_message_exactly_once(
    tmp_path: Path, redis_url: str, redis_server: object
) -> None:
    env = _env(tmp_path)
    send(redis_url, "noop", "lost", task_id="lost")  # waiting: the first pop takes it
    with CuttingProxy(redis_server.port) as proxy:  # type: ignore[attr-defined]
        proxy.cut_at(POP, deliver=True, outage=1.0)
        with celery_supervisor(env, _proxied(redis_url, proxy.port)) as pod:
            assert proxy.cut.wait(30), pod.log_text()
            try:
                wait_until(lambda: _runs(env, "lost"), timeout=30, what="the message to run")
            except AssertionError as exc:  # once in a loaded CI run: say where the message is
                where = _whereabouts(redis_url)
                raise AssertionError(f"{exc}\n{where}\n{pod.log_text()}") from None
            wait_until(lambda: _nothing_left(redis_url), timeout=15, what="the ack")
            pod.signal(signal.SIGTERM)
            assert pod.wait_exit(15)[0] == 0
            assert pod.events_named("pop_returned"), pod.log_text()
    assert _runs(env, "lost") == 1
    assert _nothing_left(redis_url)


def test_a_worker_that_dies_with_a_popped_message_has_it_recovered_and_run_once(
    tmp_path: Path, redis_url: str, redis_server: object
) -> None:
    env = _env(tmp_path)
    send(redis_url, "noop", "orphan", task_id="orphan")
    with CuttingProxy(redis_server.port) as proxy:  # type: ignore[attr-defined]
        doomed = celery_supervisor(env, _proxied(redis_url, proxy.port), name="doomed")
        with doomed as pod:
            # The reply is lost and the pod dies before it can reconnect (a long outage).
            proxy.cut_at(POP, deliver=True, outage=60.0, on_cut=lambda: os.killpg(pod.pid, 9))
            assert proxy.cut.wait(30), pod.log_text()
            pod.proc.wait(10)
        client = redis.Redis.from_url(redis_url)
        left = [k for k in client.scan_iter("workerkit:celery:inflight:*") if client.llen(k)]
        client.close()
        assert left, "the popped message is in the dead worker's in-flight list"
        with celery_supervisor(env, redis_url, name="survivor") as survivor:
            wait_until(lambda: _runs(env, "orphan"), timeout=30, what="the recovered run")
            recovered = survivor.wait_event("pop_recovered")
            assert recovered["messages"] == 1
            wait_until(lambda: _nothing_left(redis_url), timeout=15, what="the ack")
            survivor.signal(signal.SIGTERM)
            assert survivor.wait_exit(15)[0] == 0
    assert _runs(env, "orphan") == 1
    assert _nothing_left(redis_url)


def _blocked(url: str) -> bool:
    client = redis.Redis.from_url(url)
    try:
        return int(client.info("clients")["blocked_clients"]) >= 1
    finally:
        client.close()


def test_a_worker_killed_while_its_blocking_pop_lands_has_it_run_once_by_a_survivor(
    tmp_path: Path, redis_url: str, redis_server: object
) -> None:
    """The idle worker waits in its BLMOVE; a message lands in its in-flight list, the reply is
    lost and the worker dies: the survivor's recovery finds the list (its scan registered it)."""
    env = _env(tmp_path)
    env.extra["WORKERKIT_RECOVERY_WINDOW"] = "12"  # the BLMOVE waits its full 1 s
    send(redis_url, "noop", "warm", task_id="warm")  # the producer's connection, first
    with CuttingProxy(redis_server.port) as proxy:  # type: ignore[attr-defined]
        doomed = celery_supervisor(env, _proxied(redis_url, proxy.port), name="doomed")
        with doomed as pod:
            wait_until(lambda: _runs(env, "warm"), timeout=30, what="the warm-up run")
            wait_until(lambda: _nothing_left(redis_url), timeout=15, what="its ack")
            proxy.cut_at(b"BLMOVE", deliver=True, outage=60.0, on_cut=lambda: os.killpg(pod.pid, 9))
            assert proxy.sent.wait(30), pod.log_text()  # this BLMOVE reached Redis...
            wait_until(lambda: _blocked(redis_url), timeout=10, what="the BLMOVE to wait")
            send(redis_url, "noop", "landed", task_id="landed")
            assert proxy.cut.wait(30), pod.log_text()
            pod.proc.wait(10)
        client = redis.Redis.from_url(redis_url)
        left = [k for k in client.scan_iter("workerkit:celery:inflight:*") if client.llen(k)]
        registered = [client.hexists("workerkit:celery:inflights", k) for k in left]
        client.close()
        assert left, "the message landed in the dead worker's in-flight list"
        assert registered == [True]
        with celery_supervisor(env, redis_url, name="survivor") as survivor:
            wait_until(lambda: _runs(env, "landed"), timeout=30, what="the recovered run")
            assert survivor.wait_event("pop_recovered")["messages"] == 1
            wait_until(lambda: _nothing_left(redis_url), timeout=15, what="the ack")
            survivor.signal(signal.SIGTERM)
            assert survivor.wait_exit(15)[0] == 0
    assert _runs(env, "landed") == 1
    assert _nothing_left(redis_url)
