"""The rq engine under real signals and kills: drain, release and resume, crash recovery.

Real processes (``workerkit run rq`` as the supervisor, RQ's worker and its work horses), a
private redis-server, and a journal that every job writes itself: the tests assert on what
happened to every job, including that no two runs of one job ever overlapped in time.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from rq import Queue

from tests.support.harness import wait_until
from tests.support.redis_db import flushed_db
from tests.support.rq_harness import RqEnv, rq_supervisor
from tests.support.run_socket import socket_of
from workerkit import exitcodes
from workerkit.events import WorkerStopping, encode
from workerkit.supervisor.process import descendants

if TYPE_CHECKING:
    from tests.support.harness import Supervisor
    from tests.support.servers import RedisServer

REDIS_DB = 4  # a database of our own on the session's server; flushed around each test
LEASE = 10.0  # V in the crash test: a dead pod's job must run again within it


@pytest.fixture
def rq_env(redis_server: RedisServer, tmp_path: Path) -> Iterator[RqEnv]:
    with flushed_db(redis_server, REDIS_DB) as url:
        yield RqEnv(tmp=tmp_path, redis_url=url, journal=tmp_path / "journal.txt")


def runs(env: RqEnv, tag: str) -> list[tuple[float, float]]:
    """Each run of job ``tag`` as (began, ended) wall-clock seconds, from its own journal lines."""
    began: dict[str, float] = {}
    spans = []
    for line in env.lines():
        parts = line.split()
        if len(parts) == 4 and parts[1] == tag and parts[0] in ("begin", "end"):
            if parts[0] == "begin":
                began[parts[2]] = float(parts[3])
            else:
                spans.append((began.pop(parts[2]), float(parts[3])))
    assert not began, f"runs of {tag} that never ended: {began}"
    return sorted(spans)


def assert_never_overlapped(spans: list[tuple[float, float]]) -> None:
    for (_, first_end), (second_begin, _) in itertools.pairwise(spans):
        assert second_begin >= first_end, f"two runs at once: {spans}"


def kill_pod(pid: int) -> None:
    """SIGKILL the supervisor and everything under it at once, as a node failure would."""
    for each in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(each, signal.SIGKILL)


def released_at(pod: Supervisor) -> float:
    """Wall-clock time the pod's worker reported the job released."""
    import datetime as dt

    for event in pod.events_named("job_finished"):
        if event.get("outcome") == "released" and event.get("logger") == "workerkit.engines.rq":
            stamp = dt.datetime.strptime(event["ts"], "%Y-%m-%dT%H:%M:%S.%fZ")
            return stamp.replace(tzinfo=dt.UTC).timestamp()
    raise AssertionError(f"no release logged:\n{pod.log_text()}")


@pytest.mark.parametrize("worker_class", ["forking", "simple"])
def test_idle_worker_exits_0_within_half_a_second_of_sigterm(
    rq_env: RqEnv, worker_class: str
) -> None:
    with rq_supervisor(rq_env, worker_class=worker_class) as pod:
        pod.wait_ready()
        pod.signal(signal.SIGTERM)
        code, elapsed = pod.wait_exit(5)
    assert code == 0, pod.log_text()
    assert elapsed < 0.5, elapsed


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("worker_class", "task", "steps"),
    [
        ("forking", "cooperative", 120),  # checkpoints, and releases itself when asked to stop
        ("simple", "stubborn", 120),  # ignores the stop request: interrupted and released
        ("forking", "stubborn", 120),
    ],
)
def test_sigterm_mid_job_releases_it_and_a_fresh_worker_resumes_from_its_checkpoint(
    rq_env: RqEnv, worker_class: str, task: str, steps: int
) -> None:
    env = rq_env
    grace = {"grace_period": "10", "release_margin": "2"}  # D = 8 s; release at 9 s, kill at 9.6
    env.enqueue(task, "long", steps, job_id="long")  # a 12 s job (the 30 s one is below)
    for n in range(3):
        env.enqueue("tick", f"q{n}", job_id=f"q{n}")  # queued behind the one in hand
    with rq_supervisor(env, name="pod-a", worker_class=worker_class, **grace) as pod_a:
        pod_a.wait_ready()
        env.wait_line("start long 1 from 0")
        time.sleep(1.0)
        pod_a.signal(signal.SIGTERM)
        code, elapsed = pod_a.wait_exit(15)
        assert code == 0, pod_a.log_text()
        assert elapsed < 10.0, elapsed  # released and gone before the grace period ends
        release = released_at(pod_a)
    # The jobs behind it never started and are still queued, the long one first again.
    assert not any(line.startswith("ran ") for line in env.lines())
    assert env.queue().get_job_ids() == ["long", "q0", "q1", "q2"]
    assert env.started() == []
    stopped_at = int(env.state("long")["checkpoint"])
    assert stopped_at >= 50, stopped_at  # about 8-9 s of 0.1 s steps were saved
    assert env.state("long")["attempts"] == 0  # the release gave it back

    with rq_supervisor(env, name="pod-b", worker_class=worker_class) as pod_b:
        resumed = env.wait_prefix("start long 1 from ", timeout=15, nth=2)
        # The first run was released at `release`; a worker that is up picks it at once.
        begin_b = runs_begin(env, "long")[-1]
        env.wait_line("done long", timeout=40)
        for n in range(3):
            env.wait_line(f"ran q{n} 1")
        pod_b.signal(signal.SIGTERM)
        assert pod_b.wait_exit(10)[0] == 0

    assert int(resumed.split()[-1]) == stopped_at
    assert release <= begin_b  # never before the release
    spans = runs(env, "long")
    assert len(spans) == 2
    assert_never_overlapped(spans)
    job = env.job("long")
    assert job.get_status() == "finished"
    assert job.return_value() == "long ok"
    assert "checkpoint" not in env.state("long")  # dropped when the job completed
    assert job.meta == {}  # workerkit's state is not in the user's meta
    assert env.started() == []


def runs_begin(env: RqEnv, tag: str) -> list[float]:
    return [float(line.split()[3]) for line in env.lines() if line.startswith(f"begin {tag} ")]


@pytest.mark.timeout(120)
def test_30s_job_released_at_sigterm_is_resumed_by_a_waiting_worker_within_two_seconds(
    rq_env: RqEnv,
) -> None:
    env = rq_env
    grace = {"grace_period": "10", "release_margin": "2"}
    env.enqueue("cooperative", "long", 300, job_id="long")  # 300 steps of 0.1 s: 30 s
    with rq_supervisor(env, name="pod-a", **grace) as pod_a:
        pod_a.wait_ready()
        env.wait_line("start long 1 from 0")
        # Pod B is up and idle before pod A is told to stop: a rolling deploy's new pod.
        with rq_supervisor(env, name="pod-b") as pod_b:
            pod_b.wait_ready()
            pod_a.signal(signal.SIGTERM)
            code, elapsed = pod_a.wait_exit(15)
            assert code == 0, pod_a.log_text()
            assert elapsed < 10.0, elapsed  # released and gone before the grace period ends
            release = released_at(pod_a)
            resumed = env.wait_prefix("start long 1 from ", timeout=5, nth=2)
            begin_b = runs_begin(env, "long")[-1]
            env.wait_line("done long", timeout=40)
            pod_b.signal(signal.SIGTERM)
            assert pod_b.wait_exit(10)[0] == 0
    assert begin_b - release < 2.0, begin_b - release
    assert int(resumed.split()[-1]) >= 70  # about 8 s of 0.1 s steps were not redone
    assert_never_overlapped(runs(env, "long"))
    assert env.started() == []
    assert env.job("long").get_status() == "finished"


@pytest.mark.timeout(120)
def test_pod_sigkilled_mid_job_is_rerun_within_the_lease_window_and_completes(
    rq_env: RqEnv,
) -> None:
    env = rq_env
    timing = {"visibility_timeout": str(LEASE)}  # H = V/3; the recovery scan runs every second
    env.enqueue("cooperative", "k", 60, job_id="k")  # 6 s of work
    with rq_supervisor(env, name="pod-a", **timing) as pod_a:
        pod_a.wait_ready()
        env.wait_line("start k 1 from 0")
        time.sleep(1.0)
        # Pod B starts after pod A took the job, so pod A is the one that dies holding it.
        with rq_supervisor(env, name="pod-b", **timing) as pod_b2:
            pod_b2.wait_ready()
            kill_pod(pod_a.pid)
            killed_at = time.time()
            pod_a.proc.wait(10)
            env.wait_prefix("start k 2 ", timeout=LEASE + 10)
            rerun_after = runs_begin(env, "k")[-1] - killed_at
            env.wait_line("done k", timeout=30)
            pod_b2.signal(signal.SIGTERM)
            assert pod_b2.wait_exit(10)[0] == 0
    assert rerun_after <= LEASE + 0.5, rerun_after
    lines = env.lines()
    assert next(line for line in lines if line.startswith("start k")) == "start k 1 from 0"
    resumed_from = int(next(line for line in lines if line.startswith("start k 2")).split()[-1])
    assert resumed_from >= 5  # the killed attempt's checkpoints survived it
    assert env.job("k").get_status() == "finished"
    assert env.state("k")["attempts"] == 2
    assert env.started() == []
    # The killed run never wrote its end line; the rerun began after the kill.
    assert runs_begin(env, "k")[-1] > killed_at


@pytest.mark.parametrize("worker_class", ["forking", "simple"])
def test_a_pickled_job_with_meta_is_failed_with_the_reason_and_the_worker_runs_on(
    rq_env: RqEnv, worker_class: str
) -> None:
    env = rq_env
    producer = Queue("default", connection=env.connection())  # RQ's defaults: pickle
    producer.enqueue("tests.apps.rq_jobs.tick", "pickled", job_id="pickled", meta={"a": "b"})
    env.enqueue("tick", "after", job_id="after")
    refused = 'workerkit_payloads_refused_total{engine="rq",queue="default",reason="pickled"} 1.0'
    with rq_supervisor(env, worker_class=worker_class) as pod:
        pod.wait_ready()
        env.wait_line("ran after 1")  # the worker went on
        assert pod.wait_event("job_payload_refused")["job_id"] == "pickled"
        wait_until(lambda: refused in pod.get("/metrics")[1], timeout=5, what="the refusal count")
        assert pod.proc.poll() is None  # still running
        pod.signal(signal.SIGTERM)
        code, _ = pod.wait_exit(10)
    assert code == 0, pod.log_text()
    assert not any(line.startswith("ran pickled") for line in env.lines())
    assert env.failed() == ["pickled"]
    assert env.job("pickled").get_status() == "failed"
    assert env.queue().get_job_ids() == []


def _channel_path(worker_pid: int) -> str:
    """The supervisor's event socket, as every process of the pod under the worker sees it."""
    return str(socket_of(worker_pid))


@pytest.mark.timeout(60)
def test_a_worker_stopping_the_worker_never_sent_does_not_swallow_the_sigterm(
    rq_env: RqEnv,
) -> None:
    # Issue 13, item 11: a worker_stopping reached the supervisor while the simple worker went
    # on starting jobs; the real SIGTERM was then ignored and the stop waited for the drain
    # deadline (D = 4 s here). The line is written here as any process under the worker could.
    env = rq_env
    total = 3000
    env.queue().enqueue_many(
        [
            Queue.prepare_data("tests.apps.rq_jobs.tick", (f"t{i}",), job_id=f"t{i}")
            for i in range(total)
        ]
    )
    with rq_supervisor(env, worker_class="simple") as pod:
        pod.wait_ready()
        wait_until(lambda: len(env.lines()) >= 50, timeout=20, what="jobs running")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stranger:
            stranger.connect(_channel_path(pod.worker_pid()))
            stranger.sendall(encode(WorkerStopping(0)))
            pod.wait_event("drain_started")
            pod.wait_event("worker_still_fetching")  # the worker did not stop: jobs still start
            pod.signal(signal.SIGTERM)
            code, elapsed = pod.wait_exit(15)
    assert code == exitcodes.OK, pod.log_text()
    assert not pod.events_named("signal_ignored"), pod.log_text()
    assert len(pod.events_named("worker_signalled")) == 1  # the SIGTERM reached the worker
    assert elapsed < 2.0, elapsed  # not the 4 s drain deadline of the false stop
    ran = [line for line in env.lines() if line.startswith("ran ")]
    assert len(ran) == len(set(ran)), "a job ran twice"
    assert len(ran) + len(env.queue().get_job_ids()) == total  # nothing lost
    assert env.started() == []
