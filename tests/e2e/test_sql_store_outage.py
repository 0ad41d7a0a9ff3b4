"""The sql engine when its database goes away under load: restarts, a held write lock.

Real processes (``workerkit run sql``, two pods) and a PostgreSQL of the test's own, stopped and
started again by its pid with its data kept, or a SQLite file whose write lock another
connection holds past the busy timeout. Every job writes ``start``/``done`` in the journal; the
tests assert from those records that each job ran to completion exactly once.

Timing: V = 6 s (H = 2 s), so an outage of 4 s is shorter than the lease and one of 10 s longer.
The long job's lease runs out during the longer outage: nobody took it, so its renewal matches
(the token decides) once the database is back and the job finishes once.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.harness import (
    Env,
    Supervisor,
    stop_gracefully,
    supervisor,
    try_http_get,
    wait_until,
)
from tests.support.servers import PostgresServer, start_postgres
from tests.support.suite import start_or_skip
from workerkit import exitcodes
from workerkit.engines.sql import SqlQueue, upgrade
from workerkit.settings import Settings

LEASE = "6"
DURATIONS = (0.5, 1.2, 2.0, 2.8, 3.5)
LONG = 16.0  # runs through the 10 s outage, its lease (6 s) running out meanwhile
TIMING = {"visibility_timeout": LEASE, "concurrency": "4", "poll_interval": "0.2"}


@pytest.fixture
def restartable_postgres() -> Iterator[list[PostgresServer]]:
    """A private PostgreSQL that keeps its data across a restart; [0] is the one running now."""
    holder = [start_or_skip(start_postgres)]
    try:
        yield holder
    finally:
        holder[0].stop()


def pg_env(tmp: Path, server: PostgresServer) -> Env:
    url = server.url()
    upgrade(url)
    return Env(tmp=tmp, database_url=url, journal=tmp / "journal.txt")


def enqueue_load(env: Env, count: int) -> list[str]:
    """One long job (running across the whole outage, past its lease) and ``count`` short ones."""
    env.enqueue("sleep", "long", LONG, job_id="long")
    tags = [f"j{n:02d}" for n in range(count)]
    for n, tag in enumerate(tags):
        env.enqueue("sleep", tag, DURATIONS[n % len(DURATIONS)], job_id=tag)
    return ["long", *tags]


def states(env: Env) -> Counter[str]:
    queue = SqlQueue(env.database_url, settings=Settings(database_url=env.database_url))
    try:
        return Counter(queue.count_by_state())
    finally:
        queue.close()


def assert_each_ran_once(env: Env, tags: list[str]) -> None:
    lines = env.lines()
    starts = Counter(line.split()[1] for line in lines if line.startswith("start "))
    dones = Counter(line.split()[1] for line in lines if line.startswith("done "))
    assert {tag: dones[tag] for tag in tags if dones[tag] != 1} == {}, lines
    assert {tag: starts[tag] for tag in tags if starts[tag] != 1} == {}, lines
    for tag in tags:
        assert env.job(tag)["state"] == "succeeded", env.job(tag)


class ReadyzWatch:
    """Polls a pod's /readyz on a thread; remembers every status it answered."""

    def __init__(self, pod: Supervisor) -> None:
        self.pod = pod
        self.seen: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            answer = try_http_get(self.pod.port, "/readyz")
            if answer is not None:
                self.seen.append(answer[0])

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join(5)
        return self.seen


def wait_all_done(env: Env, tags: list[str], timeout: float) -> None:
    wait_until(
        lambda: states(env)["succeeded"] == len(tags),
        timeout=timeout,
        what=f"{len(tags)} jobs succeeded",
    )


def run_through_a_postgres_restart(
    tmp_path: Path, holder: list[PostgresServer], down_for: float
) -> None:
    env = pg_env(tmp_path, holder[0])
    tags = enqueue_load(env, 30)
    with (
        supervisor(env, name="pod-a", **TIMING) as pod_a,
        supervisor(env, name="pod-b", **TIMING) as pod_b,
    ):
        pod_a.wait_ready()
        pod_b.wait_ready()
        wait_until(
            lambda: sum(line.startswith("start") for line in env.lines()) >= 8,
            timeout=20,
            what="eight jobs started",
        )
        watch = ReadyzWatch(pod_a)
        holder[0].process.stop()
        down_at, journal_at_stop = time.monotonic(), len(env.lines())
        wait_until(lambda: 503 in watch.seen, timeout=10, what="/readyz 503 while down")
        time.sleep(max(0.0, down_for - (time.monotonic() - down_at)))
        finished_while_down = [line for line in env.lines()[journal_at_stop:] if "done" in line]
        holder[0] = start_postgres(port=holder[0].port, directory=holder[0].directory)
        wait_all_done(env, tags, timeout=120)
        wait_until(lambda: watch.seen[-1:] == [200], timeout=20, what="/readyz 200 after")
        watch.stop()
        assert stop_gracefully(pod_a) == exitcodes.OK, pod_a.log_text()
        assert stop_gracefully(pod_b) == exitcodes.OK, pod_b.log_text()
    assert_each_ran_once(env, tags)
    # The scenario happened: jobs finished while the database was down, and had to wait.
    assert finished_while_down, env.lines()
    retried = pod_a.events_named("store_write_retry") + pod_b.events_named("store_write_retry")
    assert retried, pod_a.log_text()


@pytest.mark.timeout(240)
def test_postgres_restart_shorter_than_the_lease_runs_every_job_exactly_once(
    tmp_path: Path, restartable_postgres: list[PostgresServer]
) -> None:
    run_through_a_postgres_restart(tmp_path, restartable_postgres, down_for=4.0)


@pytest.mark.timeout(240)
def test_postgres_restart_longer_than_the_lease_runs_no_finished_job_again(
    tmp_path: Path, restartable_postgres: list[PostgresServer]
) -> None:
    run_through_a_postgres_restart(tmp_path, restartable_postgres, down_for=10.0)


@contextlib.contextmanager
def write_lock(path: Path) -> Iterator[None]:
    """Hold SQLite's write lock (BEGIN IMMEDIATE) on ``path`` from another connection."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=10)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


@pytest.mark.timeout(180)
def test_sqlite_write_lock_held_past_the_busy_timeout_is_not_ready_and_runs_no_job_twice(
    env: Env,
) -> None:
    busy = 1.0  # the queue's busy timeout (?timeout=), shortened from 30 s for a quick test
    url = f"{env.database_url}?timeout={busy:g}"
    tags = enqueue_load(env, 16)
    with supervisor(env, name="pod", database_url=url, **TIMING) as pod:
        pod.wait_ready()
        wait_until(
            lambda: sum(line.startswith("start") for line in env.lines()) >= 4,
            timeout=20,
            what="four jobs started",
        )
        watch = ReadyzWatch(pod)
        with write_lock(Path(env.database_url.removeprefix("sqlite:///"))):
            journal_at_lock = len(env.lines())
            wait_until(lambda: 503 in watch.seen, timeout=10, what="/readyz 503 while locked")
            wait_until(
                lambda: pod.events_named("store_write_retry"),
                timeout=10,
                what="a settle retried while locked",
            )
            time.sleep(4 * busy)  # well past the busy timeout
            finished_while_locked = [
                line for line in env.lines()[journal_at_lock:] if "done" in line
            ]
        wait_all_done(env, tags, timeout=90)
        wait_until(lambda: watch.seen[-1:] == [200], timeout=20, what="/readyz 200 after")
        watch.stop()
        assert stop_gracefully(pod) == exitcodes.OK, pod.log_text()
    assert finished_while_locked, env.lines()
    assert_each_ran_once(env, tags)
    reasons = [e["reason"] for e in pod.events_named("store_health") if not e["ok"]]
    assert any("locked" in reason for reason in reasons), reasons
