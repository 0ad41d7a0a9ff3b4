"""Automatic retention under real workers: of two ``workerkit run sql`` pods, one prunes.

Old succeeded jobs go once the pods are ready; failed jobs (no ``failed_job_retention``),
recent ones and waiting ones stay, and the other pod finds the turn taken (SQLite and
PostgreSQL).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support.harness import Env, Supervisor, start_supervisor, wait_until
from workerkit.engines.base import NewJob
from workerkit.engines.sql import SqlQueue, upgrade
from workerkit.settings import Settings


def _old_jobs(queue: SqlQueue) -> None:
    """old-0..4 and new-0..1 succeeded, dead failed (all but new-* finished 2 h ago), w waiting."""
    ids = [*(f"old-{i}" for i in range(5)), "new-0", "new-1", "dead"]
    queue.enqueue_many([NewJob(i, "t", "done", "[]", max_attempts=1) for i in ids])
    queue.enqueue(NewJob("w", "t", "parked", "[]", max_attempts=1))
    claimed = {d.job_id: d for d in queue.claim(["done"], "setup", len(ids))}
    for job_id in ids[:-1]:
        queue.ack(claimed[job_id], None)
    queue.fail(claimed["dead"], "boom")
    with queue.engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE workerkit_jobs SET finished_at = COALESCE(finished_at, created_at) - 7200"
                " WHERE id NOT LIKE 'new-%'"
            )
        )


@pytest.mark.timeout(90)
def test_one_of_two_pods_prunes_old_succeeded_jobs(tmp_path: Path, database_url: str) -> None:
    upgrade(database_url)
    env = Env(tmp=tmp_path, database_url=database_url, journal=tmp_path / "journal.txt")
    queue = SqlQueue(database_url, settings=Settings(database_url=database_url))
    pods: list[Supervisor] = []
    try:
        _old_jobs(queue)
        pods.extend(
            start_supervisor(env, name=name, finished_job_retention="3600")
            for name in ("first", "second")
        )
        for pod in pods:
            pod.wait_ready()
        wait_until(
            lambda: (
                [bool(p.events_named("retention_pruned")) for p in pods].count(True) == 1
                and [bool(p.events_named("retention_skipped")) for p in pods].count(True) == 1
            ),
            timeout=30,
            what="one pod to prune and the other to find the turn taken",
        )
        [pruned] = [e for p in pods for e in p.events_named("retention_pruned")]
        assert (pruned["succeeded"], pruned["failed"]) == (5, 0)
        assert queue.count_by_state() == {"ready": 1, "running": 0, "succeeded": 2, "failed": 1}
        assert queue.get_job("w") is not None
    finally:
        for pod in pods:
            pod.stop()
        queue.close()
