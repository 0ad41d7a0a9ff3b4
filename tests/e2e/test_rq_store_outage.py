"""The rq engine when Redis is down at start: it waits, not ready, and gives up after a budget.

Real processes (``workerkit run rq``, RQ's worker and its work horse) and a redis-server of the
test's own, started late.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.harness import Supervisor, try_http_get, wait_until
from tests.support.rq_harness import RqEnv, rq_supervisor
from tests.support.servers import (
    HOST,
    RedisServer,
    ServerUnavailableError,
    free_port,
    start_redis,
)
from workerkit import exitcodes


def rq_env_on(tmp: Path, port: int) -> RqEnv:
    return RqEnv(tmp=tmp, redis_url=f"redis://{HOST}:{port}/0", journal=tmp / "journal.txt")


def start_redis_or_skip(**kwargs: Any) -> RedisServer:
    try:
        return start_redis(**kwargs)
    except ServerUnavailableError as exc:
        pytest.skip(str(exc))


def probe(pod: Supervisor, path: str) -> tuple[int, str]:
    answer: tuple[int, str] = wait_until(
        lambda: try_http_get(pod.port, path), timeout=10, what=f"{path} to answer"
    )
    return answer


def retries(pod: Supervisor) -> list[dict[str, Any]]:
    return pod.events_named("store_connect_retry")


@pytest.mark.timeout(90)
def test_redis_down_at_start_waits_not_ready_logging_each_retry_then_runs_jobs(
    tmp_path: Path,
) -> None:
    port = free_port()  # nothing listens on it yet
    env = rq_env_on(tmp_path, port)
    server: RedisServer | None = None
    try:
        with rq_supervisor(env) as pod:
            wait_until(lambda: len(retries(pod)) >= 3, timeout=20, what="three retry lines")
            assert pod.proc.poll() is None, pod.log_text()
            assert probe(pod, "/readyz")[0] == 503
            assert probe(pod, "/startupz")[0] == 503
            assert probe(pod, "/livez")[0] == 200  # waiting is not wedged: no restart
            server = start_redis_or_skip(port=port)
            pod.wait_ready(timeout=20)
            assert probe(pod, "/startupz")[0] == 200
            env.enqueue("tick", "after-wait", job_id="after-wait")
            env.wait_line("ran after-wait 1")
            pod.signal(signal.SIGTERM)
            code, _ = pod.wait_exit(10)
            assert code == exitcodes.OK, pod.log_text()
    finally:
        if server is not None:
            server.stop()
    lines = retries(pod)
    delays = [line["retry_in"] for line in lines]
    assert delays[:3] == [0.5, 1.0, 2.0], delays  # backoff ...
    assert max(delays) <= 5.0, delays  # ... capped
    for line in lines:
        assert line["level"] == "warning"
        assert "ConnectionError" in line["reason"], line
        assert f"retrying in {line['retry_in']:.1f} s" in line["message"], line
    assert "Traceback" not in pod.log_path.read_text()


@pytest.mark.timeout(60)
def test_redis_down_for_the_whole_startup_timeout_exits_store_unavailable(tmp_path: Path) -> None:
    env = rq_env_on(tmp_path, free_port())
    with rq_supervisor(env, startup_timeout="2") as pod:
        started = time.monotonic()
        try:
            code = pod.proc.wait(20)
        except Exception:
            raise AssertionError(f"still running after 20 s:\n{pod.log_text()}") from None
        elapsed = time.monotonic() - started
    assert code == exitcodes.STORE_UNAVAILABLE, pod.log_text()
    assert 2.0 <= elapsed < 10.0, elapsed
    assert len(retries(pod)) >= 2
    gave_up = pod.events_named("store_unavailable")
    assert len(gave_up) == 1, pod.log_text()
    assert gave_up[0]["startup_timeout"] == 2.0
    assert "Traceback" not in pod.log_path.read_text()
    stopped = pod.events_named("supervisor_stopped")
    assert stopped[-1]["exit_code"] == exitcodes.STORE_UNAVAILABLE


@pytest.mark.timeout(60)
def test_sigterm_while_waiting_for_redis_exits_at_once(tmp_path: Path) -> None:
    env = rq_env_on(tmp_path, free_port())
    with rq_supervisor(env) as pod:
        pod.wait_event("store_connect_retry", timeout=20)
        pod.signal(signal.SIGTERM)
        code, elapsed = pod.wait_exit(10)
    assert code == exitcodes.OK, pod.log_text()
    assert elapsed < 1.0, elapsed
    assert pod.events_named("worker_stopped_starting"), pod.log_text()
