"""The SQL engine under real failure: a pod SIGKILLed mid-job, and many workers on one queue.

Each job writes what happened to it in the journal; the tests assert on that, on the queue's
own record of the job, and on the fence that keeps a dead attempt from finishing a job that
now belongs to someone else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.support.harness import Env, stop_gracefully, supervisor, wait_until
from workerkit.app import App
from workerkit.engines.base import Delivery
from workerkit.engines.sql import SqlQueue, upgrade
from workerkit.errors import LeaseLost
from workerkit.settings import Settings
from workerkit.supervisor.process import descendants

LEASE = 3.0  # V: how long a dead pod's job waits before another worker may take it
POLL = 0.2


@pytest.fixture
def sql_env(database_url: str, tmp_path: Path) -> Env:
    upgrade(database_url)  # a no-op on PostgreSQL, whose template is migrated
    return Env(tmp=tmp_path, database_url=database_url, journal=tmp_path / "journal.txt")


def kill_pod(pid: int) -> None:
    """SIGKILL the supervisor and everything under it at once, as a node failure would."""
    pids = [pid, *descendants(pid)]
    for each in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(each, signal.SIGKILL)


def test_pod_sigkilled_mid_job_is_rerun_after_the_lease_and_the_dead_ack_is_fenced(
    sql_env: Env,
) -> None:
    env = sql_env
    env.enqueue("sleep", "k", 2.0, job_id="k")
    timing = {"visibility_timeout": str(LEASE), "heartbeat_interval": "1", "poll_interval": "0.2"}
    with supervisor(env, name="pod-a", **timing) as pod_a:
        env.wait_line("start k 1")
        dead = env.job("k")
        kill_pod(pod_a.pid)
        killed_at = time.monotonic()
        pod_a.proc.wait(10)
    assert dead["state"] == "running"

    with supervisor(env, name="pod-b", **timing) as pod_b:
        env.wait_line("start k 2", timeout=LEASE + 15)
        rerun_after = time.monotonic() - killed_at
        env.wait_line("done k", timeout=15)
        assert stop_gracefully(pod_b) == 0

    # Within the lease plus a poll (and process start-up on a busy machine).
    assert rerun_after < LEASE + POLL + 5, rerun_after
    assert env.lines() == ["start k 1", "start k 2", "done k"]
    finished = env.job("k")
    assert (finished["state"], finished["attempts"]) == ("succeeded", 2)

    # The killed attempt's late ack, had it come, is refused by the fence.
    settings = Settings(database_url=env.database_url)
    queue = SqlQueue(env.database_url, settings=settings)
    try:
        late = Delivery(
            job_id="k",
            task="sleep",
            queue="default",
            payload="{}",
            attempt=1,
            max_attempts=dead["max_attempts"],
            token=dead["lease_token"],
        )
        with pytest.raises(LeaseLost):
            queue.ack(late, "stale result")
        assert queue.get_job("k")["result"] is None  # type: ignore[index]
    finally:
        queue.close()


@pytest.mark.timeout(180)
def test_four_workers_drain_two_thousand_jobs_each_exactly_once(
    postgres_url: str, tmp_path: Path
) -> None:
    env = Env(tmp=tmp_path, database_url=postgres_url, journal=tmp_path / "journal.txt")
    total = 2_000
    app = App(postgres_url, settings=Settings(database_url=postgres_url))
    try:
        for n in range(total):
            app.enqueue("tick", [f"j{n}"], {})
    finally:
        app.backend.close()

    with contextlib.ExitStack() as stack:
        pods = [
            stack.enter_context(supervisor(env, name=f"pod-{i}", concurrency="2")) for i in range(4)
        ]
        queue = SqlQueue(postgres_url, settings=Settings(database_url=postgres_url))
        stack.callback(queue.close)
        wait_until(
            lambda: queue.count_by_state()["succeeded"] == total,
            timeout=150,
            what=f"{total} jobs to succeed",
        )
        codes = [stop_gracefully(pod) for pod in pods]
        counts = queue.count_by_state()

    assert codes == [0, 0, 0, 0]
    assert counts["succeeded"] == total
    assert sum(counts.values()) == total
    runs = Counter(line.split()[1] for line in env.lines())
    assert len(runs) == total
    assert set(runs.values()) == {1}, [tag for tag, n in runs.items() if n > 1][:10]
    assert all(line.endswith(" 1") for line in env.lines())  # no job needed a second attempt
    # The work was shared: each pod's worker logged the jobs it started.
    worker_logger = "workerkit.engines.sql.worker"
    per_pod = [
        sum(1 for e in pod.events_named("job_started") if e.get("logger") == worker_logger)
        for pod in pods
    ]
    assert sum(per_pod) == total, per_pod
    assert sum(1 for n in per_pod if n) >= 2, per_pod
