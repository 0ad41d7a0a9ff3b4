"""Checkpointed jobs under real processes and signals: they resume, and redo little or nothing.

Timing: G = 4 s, M = 2 s, so D = 2 s (SIGTERM at 0, request_stop at 2 s, release at 3 s, kill at
3.6 s); F = 0.2 s; V = 3 s, so a lease of a pod that died is claimed again within 3 s.

* "Resume": a job over 10,000 items (``tests/apps/resume_app.py``, each item recorded as it is
  done) SIGTERMed past the drain window resumes where it stopped: exactly 10,000 items in all.
  When its whole pod is SIGKILLed instead, it redoes at most one checkpoint interval's worth
  (F / 1 ms items) per kill.
* The backfill example on PostgreSQL, under SIGTERM, SIGKILL of its worker, SIGKILL of its
  whole pod and a rolling deploy, updates every row exactly once.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from examples.backfill.app import backfill_email_normalized
from examples.backfill.seed import create_accounts, times_backfilled, wrongly_normalized
from tests.apps.resume_app import ITEM_SECONDS
from tests.support.harness import Env, Supervisor, stop_gracefully, supervisor, wait_until
from workerkit import exitcodes
from workerkit.app import App, EnqueueOptions
from workerkit.engines.sql import create_engine_for
from workerkit.settings import Settings

if TYPE_CHECKING:
    import sqlalchemy as sa

GRACE = 4.0
DRAIN = 2.0
CHECKPOINT_INTERVAL = 0.2
TIMING = {
    "grace_period": str(GRACE),
    "release_margin": str(GRACE - DRAIN),
    "checkpoint_interval": str(CHECKPOINT_INTERVAL),
    "visibility_timeout": "3",
}
RESUME_APP = "tests.apps.resume_app:app"
TOTAL = 10_000
#: One checkpoint interval's worth of items, plus the one in hand when the pod died.
REDO_PER_KILL = int(CHECKPOINT_INTERVAL / ITEM_SECONDS) + 1
#: ``setsid`` makes the supervisor a process-group leader (it execs, the pid stays the same),
#: so ``os.killpg`` can kill it and its worker at once, as when a node or a pod dies.
POD = ["setsid"]


def items(env: Env) -> list[int]:
    return [int(line.split()[1]) for line in env.lines() if line.startswith("item ")]


def starts(env: Env) -> list[str]:
    return [line for line in env.lines() if line.startswith("start ")]


def wait_for_items(env: Env, at_least: int) -> None:
    wait_until(lambda: len(items(env)) >= at_least, timeout=30, what=f"{at_least} items done")


def kill_pod(running: Supervisor) -> None:
    assert os.getpgid(running.pid) == running.pid
    os.killpg(running.pid, signal.SIGKILL)
    running.proc.wait(10)


@pytest.mark.timeout(120)
def test_job_of_10000_items_sigtermed_past_the_drain_window_resumes_and_does_each_once(
    env: Env,
) -> None:
    env.enqueue("walk", TOTAL, job_id="walk")
    began = time.monotonic()
    stopped_at: list[int] = []
    for name in ("first", "second"):
        with supervisor(env, name=name, app=RESUME_APP, **TIMING) as running:
            wait_for_items(env, len(items(env)) + 1500)
            at_sigterm = len(items(env))
            running.signal(signal.SIGTERM)
            code, elapsed = running.wait_exit()
        assert code == exitcodes.OK
        assert DRAIN - 0.5 < elapsed < GRACE, elapsed
        job = env.job("walk")
        assert (job["state"], job["attempts"]) == ("ready", 0), job
        done = items(env)
        assert len(done) > at_sigterm  # the job went on through the drain window
        assert done == list(range(len(done)))  # nothing done twice so far
        assert job["checkpoint"] == len(done)  # the release saved the exact cursor
        stopped_at.append(len(done))

    with supervisor(env, name="last", app=RESUME_APP, **TIMING) as running:
        env.wait_line("done", timeout=60)
        assert stop_gracefully(running) == exitcodes.OK
    took = time.monotonic() - began
    done = items(env)
    assert done == list(range(TOTAL))  # exactly 10,000: each item once, in order
    assert starts(env) == [
        "start 1 from 0",
        f"start 1 from {stopped_at[0]}",
        f"start 1 from {stopped_at[1]}",
    ]
    assert env.job("walk")["state"] == "succeeded"
    print(
        f"\nresume: {len(done)} items processed for {TOTAL}, 2 releases at {stopped_at}, "
        f"3 attempts, {took:.1f}s"
    )


@pytest.mark.timeout(120)
def test_job_whose_pod_is_sigkilled_resumes_from_its_last_checkpoint_redoing_at_most_f(
    env: Env,
) -> None:
    env.enqueue("walk", TOTAL, job_id="walk")
    began = time.monotonic()
    killed_after: list[int] = []
    for name in ("first", "second"):
        with supervisor(env, name=name, wrapper=POD, app=RESUME_APP, **TIMING) as running:
            wait_for_items(env, len(items(env)) + 1500)
            kill_pod(running)  # no drain, no release: the lease has to expire (V = 3 s)
        killed_after.append(max(items(env)) + 1)  # the cursor after the last item recorded

    with supervisor(env, name="last", app=RESUME_APP, **TIMING) as running:
        env.wait_line("done", timeout=60)
        assert stop_gracefully(running) == exitcodes.OK
    took = time.monotonic() - began
    done = items(env)
    assert set(done) == set(range(TOTAL))
    redone = len(done) - TOTAL
    assert 0 <= redone <= 2 * REDO_PER_KILL, redone
    resumed_from = [int(line.rsplit(" ", 1)[1]) for line in starts(env)]
    assert resumed_from[0] == 0
    assert [line.split()[1] for line in starts(env)] == ["1", "2", "3"]  # crashes keep attempts
    for kill, cursor in zip(killed_after, resumed_from[1:], strict=True):
        assert kill - REDO_PER_KILL <= cursor <= kill
    print(
        f"\npod killed twice: {len(done)} items processed for {TOTAL} ({redone} redone, bound "
        f"{2 * REDO_PER_KILL}), resumed from {resumed_from[1:]} after kills at {killed_after}, "
        f"{took:.1f}s"
    )


# --- the backfill example on PostgreSQL --------------------------------------------------


BACKFILL = {"app": "examples.backfill.app:app", **TIMING}
ROWS = 40_000
JOB_ID = "backfill"


@pytest.fixture
def pg_env(tmp_path: Path, postgres_url: str) -> Env:
    return Env(tmp=tmp_path, database_url=postgres_url, journal=tmp_path / "journal.txt")


@pytest.fixture
def accounts_engine(postgres_url: str) -> Iterator[sa.Engine]:
    engine = create_engine_for(postgres_url)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.mark.timeout(120)
def test_backfill_under_sigterm_and_sigkill_of_its_workers_updates_every_row_exactly_once(
    pg_env: Env, accounts_engine: sa.Engine
) -> None:
    env = pg_env
    create_accounts(accounts_engine, ROWS)
    app = App(env.database_url, settings=Settings(database_url=env.database_url))
    try:
        app.enqueue(
            backfill_email_normalized.name,
            kwargs={"batch_size": 100, "pause": 0.03},  # batches of 100 rows, 30 ms apart
            options=EnqueueOptions(job_id=JOB_ID),
            max_attempts=backfill_email_normalized.max_attempts,  # each SIGKILL costs one
        )
    finally:
        app.backend.close()
    began = time.monotonic()

    def cursor() -> int:
        return int(env.job(JOB_ID)["checkpoint"] or 0)

    def progressed(by: int = 1500) -> None:
        since = cursor()
        wait_until(lambda: cursor() >= since + by, timeout=30, what=f"{by} more rows")
        assert env.job(JOB_ID)["state"] == "running", "finished too early to interrupt"

    def holds(running: Supervisor) -> bool:
        job = env.job(JOB_ID)
        latest = running.events_named("worker_started")[-1]["pid"]  # after a restart, too
        return job["state"] == "running" and f":{latest}:" in job["worker_id"]

    def pod(name: str) -> AbstractContextManager[Supervisor]:
        return supervisor(env, name=name, wrapper=POD, **BACKFILL)

    # 1. A deploy: SIGTERM; the job runs through the drain window, then releases itself.
    with pod("sigterm") as running:
        progressed()
        running.signal(signal.SIGTERM)
        assert running.wait_exit()[0] == exitcodes.OK
    assert env.job(JOB_ID)["state"] == "ready"

    # 2. The worker process is SIGKILLed (OOM): the supervisor releases the job itself and
    #    starts a new worker, which resumes it from its checkpoint; then that pod dies.
    with pod("worker-killed") as running:
        progressed()
        os.kill(running.worker_pid(), signal.SIGKILL)
        running.wait_event("worker_restarting")
        progressed()
        assert holds(running)
        kill_pod(running)

    # 3. The pod dies: supervisor and worker SIGKILLed at once, mid-batch; the lease expires.
    with pod("pod-killed") as running:
        progressed()
        kill_pod(running)

    # 4. A rolling deploy: two pods; the one holding the job is SIGTERMed and the other takes
    #    over at once; then that one's pod dies too.
    with pod("old") as old, pod("new") as new:
        progressed()
        holder, other = (old, new) if holds(old) else (new, old)
        assert holds(holder)
        holder.signal(signal.SIGTERM)
        assert holder.wait_exit()[0] == exitcodes.OK
        progressed()
        assert holds(other)
        kill_pod(other)

    # 5. The last pod finishes the backfill.
    with pod("last") as running:
        wait_until(lambda: env.job(JOB_ID)["state"] == "succeeded", timeout=60, what="the backfill")
        assert stop_gracefully(running) == exitcodes.OK
    took = time.monotonic() - began

    assert times_backfilled(accounts_engine) == {1: ROWS}
    assert wrongly_normalized(accounts_engine) == 0
    job = env.job(JOB_ID)
    assert job["checkpoint"] is None
    print(
        f"\nbackfill: {ROWS} rows updated exactly once through 1 SIGTERM release, 1 worker "
        f"SIGKILL (and restart), 3 pod SIGKILLs and a rolling deploy; final attempt "
        f"{job['attempts']}, result {job['result']}, {took:.1f}s"
    )
