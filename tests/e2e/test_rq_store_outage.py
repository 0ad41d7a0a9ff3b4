"""The rq engine when Redis is down: at start (wait, not ready, give up) and under a running job.

Real processes (``workerkit run rq``, RQ's worker and its work horse) and a redis-server of the
test's own, started late or restarted by its pid, with its data kept (append-only file) as a
production Redis keeps it.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
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
    restart_redis,
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
    # Stopped before it was ever ready: the pod's last state says so (docs/operations/lifecycle.md).
    assert code == exitcodes.STARTUP_FAILED, pod.log_text()
    assert elapsed < 1.0, elapsed
    assert pod.events_named("worker_stopped_starting"), pod.log_text()


# --- Redis restarting under a running job ----------------------------------------------------


@pytest.fixture
def restartable_redis() -> Iterator[list[RedisServer]]:
    """A private Redis that keeps its data across a restart; [0] is the one running now."""
    holder = [start_redis_or_skip(appendonly=True)]
    try:
        yield holder
    finally:
        holder[0].stop()


@pytest.mark.timeout(150)
def test_redis_restart_under_a_running_job_is_ridden_out_and_the_job_finishes_once(
    tmp_path: Path, restartable_redis: list[RedisServer]
) -> None:
    env = rq_env_on(tmp_path, restartable_redis[0].port)
    env.enqueue("sleepy", "long", 42, job_id="long")
    with rq_supervisor(env) as pod:
        pod.wait_ready()
        env.wait_line("start long 1 from 0")
        began = time.monotonic()
        # The worker writes RQ's bookkeeping every 30 s while its work horse runs (RQ's
        # job_monitoring_interval): Redis is down across the first of those writes.
        time.sleep(24)
        restartable_redis[0].process.stop()
        wait_until(
            lambda: "store unreachable" in probe(pod, "/readyz")[1],
            timeout=10,
            what="/readyz to say the store is unreachable",
        )
        time.sleep(max(0.0, 37 - (time.monotonic() - began)))
        restartable_redis[0] = restart_redis(restartable_redis[0])
        pod.wait_ready(timeout=20)
        env.wait_line("done long", timeout=30)
        env.enqueue("tick", "after-restart", job_id="after-restart")
        env.wait_line("ran after-restart 1")
        assert pod.proc.poll() is None, pod.log_text()
        pod.signal(signal.SIGTERM)
        code, _ = pod.wait_exit(10)
    assert code == exitcodes.OK, pod.log_text()
    assert not pod.events_named("worker_crashed"), pod.log_text()
    lines = env.lines()
    assert len([line for line in lines if line.startswith("begin long ")]) == 1, lines
    assert lines.count("done long") == 1, lines
    finished = [
        event
        for event in pod.events_named("job_finished")
        if event.get("job_id") == "long" and event.get("logger") == "workerkit.engines.rq"
    ]
    assert [event["outcome"] for event in finished] == ["succeeded"], finished
    job = env.job("long")
    assert job.get_status() == "finished"
    assert job.return_value() == "long ok"
    assert env.started() == []


@pytest.mark.timeout(120)
def test_job_ending_while_redis_is_down_records_its_result_once_redis_is_back_run_once(
    tmp_path: Path, restartable_redis: list[RedisServer]
) -> None:
    # The job ends while Redis is down, which stays down past the job's lease (V = 6 s). Its
    # work horse retries its settle (it used to give up, and the job ran again through crash
    # recovery); nobody took the job meanwhile, so the token lets the result land: one run.
    env = rq_env_on(tmp_path, restartable_redis[0].port)
    env.enqueue("sleepy", "short", 3, job_id="short")
    with rq_supervisor(env, visibility_timeout="6") as pod:
        pod.wait_ready()
        env.wait_line("start short 1 from 0")
        restartable_redis[0].process.stop()
        stopped = time.monotonic()
        env.wait_line("done short", timeout=10)
        retry = pod.wait_event("store_write_retry", timeout=10)
        assert retry["what"] in ("settle", "job result"), retry
        wait_until(
            lambda: "unreachable" in probe(pod, "/readyz")[1],
            timeout=10,
            what="/readyz to say the store is unreachable",
        )
        assert pod.proc.poll() is None, pod.log_text()
        time.sleep(max(0.0, 9 - (time.monotonic() - stopped)))  # the outage: past the lease
        restartable_redis[0] = restart_redis(restartable_redis[0])
        pod.wait_event("store_write_recovered", timeout=20)
        pod.wait_ready(timeout=20)
        wait_until(
            lambda: env.job("short").get_status() == "finished",
            timeout=30,
            what="the job to end finished",
        )
        # No recovery runs it again (the scan's grace is over, the member is gone).
        env.enqueue("tick", "after-restart", job_id="after-restart")
        env.wait_line("ran after-restart 1")
        pod.signal(signal.SIGTERM)
        code, _ = pod.wait_exit(10)
    assert code == exitcodes.OK, pod.log_text()
    assert not pod.events_named("worker_crashed"), pod.log_text()
    assert not pod.events_named("job_recovered"), pod.log_text()
    marks = [
        line.split()[0] for line in env.lines() if line.startswith(("begin short ", "end short "))
    ]
    assert marks == ["begin", "end"], env.lines()
    assert env.lines().count("done short") == 1, env.lines()
    finished = [
        event
        for event in pod.events_named("job_finished")
        if event.get("job_id") == "short" and event.get("logger") == "workerkit.engines.rq"
    ]
    assert [event["outcome"] for event in finished] == ["succeeded"], finished
    assert env.started() == []
