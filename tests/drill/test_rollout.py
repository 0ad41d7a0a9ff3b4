"""The local rollout (workerkit/drill/rollout.py) with real SQL workers on PostgreSQL.

Three replicas of ``workerkit run sql``, rolled once (maxSurge 1, maxUnavailable 0), then a crash,
while jobs run: every job the test enqueued is done, and the pods came and went as a
Deployment's do. The jobs record themselves in a journal (tests/apps/sql_jobs.py), so what is
checked is what the jobs did, not what the supervisors logged.
"""

from __future__ import annotations

import collections
import contextlib
import subprocess
import threading
from pathlib import Path

import pytest
import redis

from tests.support.harness import WORKERKIT, Env, wait_until
from workerkit.drill.pods import free_port
from workerkit.drill.rollout import Action, CommandStore, Rollout, RolloutSpec

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
    rollout = Rollout(_spec(env, replicas=3, grace=4), tmp_path / "drill", seed=1)
    tags = [f"c{i}" for i in range(3)]
    try:
        rollout.start()
        assert len(rollout.live()) == 3
        for tag in tags:  # 12 s each, checkpointed: far longer than the drain window (2 s), so
            # each pod has one in hand when the first rollout stops it
            env.enqueue("cooperative", tag, 120, job_id=tag)
        wait_until(lambda: env.lines(), timeout=30, what="a job started")
        stop = threading.Event()
        rollout.run([Action("restart", 0), Action("crash", 1)], stop)
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
    assert revisions == ["r1", "r2"], names
    assert sum(1 for _, what in events if what == "created") == 6
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


def test_the_store_is_restarted_by_the_operators_command(tmp_path: Path) -> None:
    """--restart-store --store-command CMD: the command runs, then the drill waits until the
    store's port answers again. Here a redis-server of the test's own, restarted by a shell
    command as `docker restart redis` would restart a container."""
    port = free_port()
    pidfile = tmp_path / "redis.pid"
    start = (
        f"redis-server --port {port} --bind 127.0.0.1 --save '' --daemonize yes "
        f"--pidfile {pidfile} --dir {tmp_path}"
    )
    subprocess.run(["sh", "-c", start], check=True)
    client = redis.Redis(port=port)
    try:
        wait_until(lambda: pidfile.exists() and client.ping(), timeout=10, what="redis up")
        first = pidfile.read_text()
        client.set("before", "1")
        command = f'sh -c "redis-cli -p {port} shutdown nosave; {start}"'
        rollout = Rollout(
            _spec(Env(tmp=tmp_path, database_url="", journal=tmp_path / "j"), replicas=1, grace=5),
            tmp_path / "drill",
            store=CommandStore(command, ("127.0.0.1", port)),
        )
        rollout.run([Action("store", 0)])
        assert client.ping()
        assert client.get("before") is None  # a new server (nosave): it was restarted
        assert pidfile.read_text() != first
        assert [e.what for e in rollout.events] == ["store restart", "store back"]
    finally:
        with contextlib.suppress(redis.RedisError):
            client.shutdown(nosave=True)
        client.close()
