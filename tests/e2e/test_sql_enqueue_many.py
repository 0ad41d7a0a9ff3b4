"""A bulk-enqueued batch under real workers: two ``workerkit run sql`` pods run every job once.

On SQLite and on PostgreSQL (where the idle pods wake by NOTIFY): the batch goes in with one
call while both pods claim, and the journal shows each job started once, on its first attempt.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.support.harness import Env, Supervisor, start_supervisor, wait_until
from workerkit.app import App, PreparedJob
from workerkit.engines.sql import SqlQueue, upgrade
from workerkit.settings import Settings

JOBS = 400


@pytest.mark.timeout(120)
def test_two_pods_run_every_job_of_a_batch_exactly_once(tmp_path: Path, database_url: str) -> None:
    upgrade(database_url)
    env = Env(tmp=tmp_path, database_url=database_url, journal=tmp_path / "journal.txt")
    pods: list[Supervisor] = []
    queue = SqlQueue(database_url, settings=Settings(database_url=database_url))
    app = App(database_url, settings=Settings(database_url=database_url))
    try:
        pods.extend(start_supervisor(env, name=name) for name in ("first", "second"))
        for pod in pods:
            pod.wait_ready()
        # By name: this process does not import the tasks (tests/apps/sql_jobs.py has "tick").
        ids = app.enqueue_many(PreparedJob("tick", (f"t{n}",)) for n in range(JOBS))
        assert len(set(ids)) == JOBS
        wait_until(
            lambda: queue.count_by_state()["succeeded"] == JOBS,
            timeout=90,
            what=f"all {JOBS} jobs to succeed",
        )
        runs = Counter(line for line in env.lines() if line.startswith("ran "))
        assert sorted(runs) == sorted(f"ran t{n} 1" for n in range(JOBS))
        assert set(runs.values()) == {1}
        assert queue.count_by_state()["failed"] == 0
    finally:
        for pod in pods:
            pod.stop()
        queue.close()
        app.backend.close()  # type: ignore[attr-defined]  # a SqlQueue
