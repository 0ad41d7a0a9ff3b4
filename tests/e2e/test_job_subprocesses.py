"""A job's subprocesses end with its attempt: none survives a release or the supervisor's exit.

On each engine a job starts ``sleep 1000`` in a session of its own (so no process-group kill
reaches it), records its pid in the journal, and ignores stop requests; SIGTERM releases it at
the release deadline. When the supervisor has exited, that pid must be gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis

from tests.support.celery_harness import send, start_celery
from tests.support.harness import Env, Supervisor, process_state, start_supervisor, wait_until
from tests.support.rq_harness import RqEnv, start_rq_supervisor

if TYPE_CHECKING:
    from tests.support.servers import RedisServer

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:celery"),
    pytest.mark.timeout(120),
]

REDIS_DB = 7  # a database of our own on the session's server; flushed around each test


def _start(engine: str, tmp: Path, request: pytest.FixtureRequest) -> tuple[Supervisor, Env]:
    journal = tmp / "journal.txt"
    if engine == "sql":
        from workerkit.engines.sql import upgrade

        url = f"sqlite:///{tmp / 'queue.sqlite3'}"
        upgrade(url)
        env = Env(tmp=tmp, database_url=url, journal=journal)
        env.enqueue("spawner", "s", job_id="s")
        return start_supervisor(env), env
    server: RedisServer = request.getfixturevalue("redis_server")
    url = server.url(REDIS_DB)
    env = Env(tmp=tmp, database_url="", journal=journal)
    if engine == "rq":
        RqEnv(tmp=tmp, redis_url=url, journal=journal).enqueue("spawner", "s", job_id="s")
        return start_rq_supervisor(RqEnv(tmp=tmp, redis_url=url, journal=journal)), env
    # The database every celery test uses: the test app's producer keeps its first broker.
    celery_url = request.getfixturevalue("redis_url")
    send(celery_url, "spawner", "s", task_id="s")
    return start_celery(env, celery_url, worker_args=("--pool=prefork", "--concurrency=1")), env


@pytest.fixture
def flushed(request: pytest.FixtureRequest) -> Iterator[Callable[[], None]]:
    clients: list[redis.Redis[bytes]] = []

    def flush() -> None:
        server: RedisServer = request.getfixturevalue("redis_server")
        client = redis.Redis.from_url(server.url(REDIS_DB))
        client.flushdb()
        clients.append(client)

    yield flush
    for client in clients:
        client.flushdb()
        client.close()


def child_pid(env: Env) -> int:
    line: str = wait_until(
        lambda: next((x for x in env.lines() if x.startswith("child s ")), None),
        timeout=30,
        what="the job's subprocess",
    )
    return int(line.split()[2])


@pytest.mark.parametrize("engine", ["sql", "rq", "celery"])
def test_a_released_jobs_subprocess_is_gone_when_the_supervisor_exits(
    engine: str, tmp_path: Path, request: pytest.FixtureRequest, flushed: Callable[[], None]
) -> None:
    if engine != "sql":
        flushed()
    pod, env = _start(engine, tmp_path, request)
    sleeper: int | None = None
    try:
        sleeper = child_pid(env)
        wait_until(
            lambda: any(line.startswith("start s") for line in env.lines()),
            timeout=10,
            what="the job to run",
        )
        assert process_state(sleeper) not in (None, "Z")
        pod.signal(signal.SIGTERM)
        code, _ = pod.wait_exit(20)
        assert code == 0, pod.log_text()
        # Released by the worker (or, on a slow machine, by the supervisor after its kill).
        assert (
            any(e.get("outcome") == "released" for e in pod.events_named("job_finished"))
            or pod.events_named("worker_released")
            or pod.events_named("in_flight_released")
        ), pod.log_text()
        # Stopped before the supervisor exited (a zombie until init reaps it is gone too).
        assert process_state(sleeper) in (None, "Z"), pod.log_text()
    finally:
        if sleeper is not None and process_state(sleeper) not in (None, "Z"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(sleeper, signal.SIGKILL)
        pod.stop()


def test_sql_a_released_jobs_subprocess_is_gone_before_its_next_attempt_starts(
    tmp_path: Path,
) -> None:
    # Jobs run in threads of the sql worker: a released job's subprocess (here one that ignores
    # SIGTERM, so it lives until the SIGKILL after the stop grace) must be stopped before the
    # release makes the job claimable, or the waiting pod's attempt runs beside it.
    from workerkit.engines.sql import upgrade

    url = f"sqlite:///{tmp_path / 'queue.sqlite3'}"
    upgrade(url)
    env = Env(tmp=tmp_path, database_url=url, journal=tmp_path / "journal.txt")
    env.enqueue("spawner_checks", "s", job_id="s")
    first = start_supervisor(env, name="first")
    second: Supervisor | None = None
    pids: list[int] = []
    try:
        pids.append(child_pid(env))
        second = start_supervisor(env, name="second")
        second.wait_ready()
        first.signal(signal.SIGTERM)
        wait_until(
            lambda: len([x for x in env.lines() if x.startswith("start s ")]) == 2,
            timeout=30,
            what="the job's second attempt, on the second pod",
        )
        pids = [int(x.split()[2]) for x in env.lines() if x.startswith("child s ")]
        code, _ = first.wait_exit(20)
        assert code == 0, first.log_text()
        assert [x for x in env.lines() if x.startswith("overlap ")] == [], env.lines()
        assert first.events_named("worker_released"), first.log_text()
    finally:
        for pod in (first, second):
            if pod is not None:
                pod.stop()
        for pid in pids:
            if process_state(pid) not in (None, "Z"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
