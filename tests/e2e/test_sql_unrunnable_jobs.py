"""Jobs no attempt can run, under ``workerkit run sql``: they fail at attempt 1 with the reason.

Arguments that do not fit the task's signature and a payload nested past the recursion limit
(written straight into the queue, as another producer could) used to be retried as transient
failures until their attempts ran out. The worker goes on with the other jobs meanwhile.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.harness import Env, stop_gracefully, supervisor, wait_until
from workerkit.engines.base import NewJob
from workerkit.engines.sql import SqlQueue, upgrade
from workerkit.settings import Settings

pytestmark = pytest.mark.e2e

DEEP = 100_000


@pytest.fixture
def sql_env(database_url: str, tmp_path: Path) -> Env:
    upgrade(database_url)  # a no-op on PostgreSQL, whose template is migrated
    return Env(tmp=tmp_path, database_url=database_url, journal=tmp_path / "journal.txt")


def enqueue_raw(env: Env, job_id: str, task: str, payload: str) -> None:
    queue = SqlQueue(env.database_url, settings=Settings(database_url=env.database_url))
    try:
        queue.enqueue(NewJob(job_id, task, "default", payload, 3))
    finally:
        queue.close()


def test_a_job_whose_arguments_do_not_fit_or_whose_payload_is_too_deep_fails_at_attempt_1(
    sql_env: Env,
) -> None:
    env = sql_env
    env.enqueue("tick", job_id="unbound")  # tick(tag) given no argument
    deep = '{"args":[' + "[" * DEEP + "]" * DEEP + '],"kwargs":{}}'
    enqueue_raw(env, "deep", "tick", deep)
    env.enqueue("tick", "fine", job_id="fine")
    with supervisor(env, name="pod") as pod:
        env.wait_line("ran fine 1")
        wait_until(
            lambda: env.job("unbound")["state"] == env.job("deep")["state"] == "failed",
            timeout=30,
            what="both unrunnable jobs failed",
        )
        assert stop_gracefully(pod) == 0
        finished = pod.events_named("job_finished")

    unbound, too_deep = env.job("unbound"), env.job("deep")
    assert (unbound["state"], unbound["attempts"]) == ("failed", 1)
    assert (too_deep["state"], too_deep["attempts"]) == ("failed", 1)
    assert "ArgumentsMismatch: tick(tag): missing a required argument: 'tag'" in str(
        unbound["last_error"]
    )
    assert "nested too deeply to decode" in str(too_deep["last_error"])
    assert env.lines() == ["ran fine 1"]  # the task's body ran only for the good job
    outcomes = {event["job_id"]: event["outcome"] for event in finished}
    assert outcomes == {"unbound": "failed", "deep": "failed", "fine": "succeeded"}
