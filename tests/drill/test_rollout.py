"""The local rollout (workerkit/drill/rollout.py) with real SQL workers on PostgreSQL.

Three replicas of ``workerkit run sql``, rolled twice (maxSurge 1, maxUnavailable 0) with a crash
between, while jobs run: every job the test enqueued is done, and the pods came and went as a
Deployment's do. The jobs record themselves in a journal (tests/apps/sql_jobs.py), so what is
checked is what the jobs did, not what the supervisors logged.
"""

from __future__ import annotations

import collections
import threading
from pathlib import Path

import pytest

from tests.support.harness import WORKERKIT, Env, wait_until
from workerkit.drill.rollout import Action, Rollout, RolloutSpec

pytestmark = [pytest.mark.drill, pytest.mark.timeout(180)]


def _spec(env: Env, *, replicas: int, grace: float) -> RolloutSpec:
    return RolloutSpec(
        argv=[*WORKERKIT, "run", "sql", "--app", "tests.apps.sql_jobs:app"],
        env={
            "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
            "PATH": "/usr/bin:/bin",
            "E2E_JOURNAL": str(env.journal),
            "WORKERKIT_DATABASE_URL": env.database_url,
            "WORKERKIT_REPLICAS": str(replicas + 1),
            "WORKERKIT_GRACE_PERIOD": str(grace),
            "WORKERKIT_RELEASE_MARGIN": "2",
            "WORKERKIT_CHECKPOINT_INTERVAL": "0.5",
            "WORKERKIT_VISIBILITY_TIMEOUT": "3",
            "WORKERKIT_POLL_INTERVAL": "0.1",
            "WORKERKIT_LOG_FORMAT": "json",
        },
        replicas=replicas,
        grace=grace,
        ready_timeout=60,
    )


def _done(env: Env) -> list[str]:
    return [line.split()[1] for line in env.lines() if line.startswith("done")]


def test_rolling_restarts_and_a_crash_lose_no_job(postgres_url: str, tmp_path: Path) -> None:
    env = Env(tmp=tmp_path, database_url=postgres_url, journal=tmp_path / "journal.txt")
    rollout = Rollout(_spec(env, replicas=3, grace=8), tmp_path / "drill", seed=1)
    tags = [f"c{i}" for i in range(12)]
    try:
        rollout.start()
        assert len(rollout.live()) == 3
        for tag in tags:  # 8 s each, checkpointed: longer than the drain window (6 s)
            env.enqueue("cooperative", tag, 80, job_id=tag)
        wait_until(lambda: env.lines(), timeout=30, what="a job started")
        stop = threading.Event()
        rollout.run([Action("restart", 0), Action("crash", 1), Action("restart", 2)], stop)
        wait_until(lambda: set(_done(env)) >= set(tags), timeout=120, what="every job done")
    finally:
        rollout.shutdown()
    counts = collections.Counter(_done(env))
    # Graceful stops release and resume; only the job in hand at the crash (concurrency 1)
    # may run to its end twice.
    assert sum(c - 1 for c in counts.values()) <= 1, counts
    stops = [line for line in env.lines() if line.startswith("stop")]
    assert stops, "no job was in hand at a termination: the test proves nothing"

    events = [(e.pod, e.what) for e in rollout.events]
    names = {pod for pod, _ in events if pod != "-"}
    revisions = sorted({name.split("-")[1] for name in names})
    assert revisions == ["r1", "r2", "r3"], names
    assert sum(1 for _, what in events if what == "created") == 9
    assert sum(1 for _, what in events if what == "crashed") == 1
    assert sum(1 for _, what in events if what == "restarted") == 1
    # maxUnavailable 0: an old pod is told to stop only once its replacement is ready, so a
    # revision's first termination follows a ready pod of the next revision.
    first_stop = next(i for i, (pod, what) in enumerate(events) if what == "terminating")
    assert any(
        what == "ready" and pod.startswith("drill-r2") for pod, what in events[:first_stop]
    ), events
    # Every pod ended by itself within its grace period (the drain budget holds).
    assert not [e for e in rollout.events if e.what == "sigkill"], rollout.events
    assert all(p.exit_code() is not None for p in rollout.pods)
