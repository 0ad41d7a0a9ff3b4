"""Pausing a queue under a real ``workerkit run sql`` (SQLite and PostgreSQL).

One worker on two queues; the dashboard source pauses one: its jobs wait (never claimed, their
rows untouched) while the other queue's jobs, enqueued after them, run; a resume runs them, each
exactly once. Asserted on the jobs' own journal lines and rows, not on timings.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.support.harness import Env, start_supervisor, wait_until
from workerkit.engines.base import NewJob
from workerkit.engines.sql import SqlQueue, upgrade
from workerkit.engines.sql.dashboard import open_source
from workerkit.settings import Settings


def _tick(tag: str, queue: str) -> NewJob:
    return NewJob(tag, "tick", queue, f'{{"args":["{tag}"],"kwargs":{{}}}}', max_attempts=3)


def _runs(env: Env) -> Counter[str]:
    return Counter(line.split()[1] for line in env.lines() if line.startswith("ran "))


@pytest.mark.timeout(120)
def test_a_paused_queue_waits_while_the_other_runs(tmp_path: Path, database_url: str) -> None:
    upgrade(database_url)
    env = Env(tmp=tmp_path, database_url=database_url, journal=tmp_path / "journal.txt")
    settings = Settings(database_url=database_url)
    queue = SqlQueue(database_url, settings=settings)
    source = open_source(settings)
    pod = start_supervisor(env, queues="alpha,beta")
    try:
        pod.wait_ready()
        source.pause_queue("alpha", "tester")
        seen = pod.wait_event("queues_paused", timeout=20)
        assert seen["paused"] == ["alpha"]
        assert seen["active"] == ["beta"]

        alpha = [f"a{i}" for i in range(5)]
        beta = [f"b{i}" for i in range(5)]
        queue.enqueue_many(
            [_tick(tag, "alpha") for tag in alpha]
        )  # older: claimed first if not paused
        queue.enqueue_many([_tick(tag, "beta") for tag in beta])
        wait_until(
            lambda: all(_runs(env)[tag] for tag in beta), timeout=30, what="beta's jobs to run"
        )
        assert not any(_runs(env)[tag] for tag in alpha), env.lines()
        for tag in alpha:
            row = queue.get_job(tag)
            assert row is not None
            assert (row["state"], row["attempts"]) == ("ready", 0)
        (summary,) = [s for s in source.queues() if s.name == "alpha"]
        assert summary.paused
        assert summary.waiting == 5

        source.resume_queue("alpha", "tester")
        wait_until(
            lambda: all(_runs(env)[tag] for tag in alpha), timeout=30, what="alpha's jobs to run"
        )
        wait_until(
            lambda: all(
                (queue.get_job(tag) or {}).get("state") == "succeeded" for tag in alpha + beta
            ),
            timeout=15,
            what="every job to succeed",
        )
        assert {tag: _runs(env)[tag] for tag in alpha + beta} == dict.fromkeys(alpha + beta, 1)
        resumed = [e for e in pod.events_named("queues_paused") if e["paused"] == []]
        assert resumed
        assert resumed[-1]["active"] == ["alpha", "beta"]
    finally:
        pod.stop()
        source.close()
        queue.close()
