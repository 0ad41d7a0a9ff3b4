"""The sql engine's start when its database is wrong, missing or new: say why, retry or exit 3.

Real ``workerkit run sql`` processes against a SQLite file in a read-only directory (a bind
mount in a private mount namespace, root only), a port nothing listens on, the test
PostgreSQL with a role or a database that does not exist, and several workers started together
on a new database while ``workerkit db upgrade`` runs.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.support.harness import (
    REPO,
    WORKERKIT,
    Env,
    Supervisor,
    stop_gracefully,
    supervisor,
    try_http_get,
    wait_until,
)
from tests.support.servers import PostgresServer, free_port
from workerkit import exitcodes
from workerkit.engines.sql import upgrade


def exit_code(pod: Supervisor, timeout: float) -> tuple[int, float]:
    started = time.monotonic()
    try:
        code = pod.proc.wait(timeout)
    except Exception:
        raise AssertionError(f"still running after {timeout:g} s:\n{pod.log_text()}") from None
    return code, time.monotonic() - started


def gave_up(pod: Supervisor) -> dict[str, object]:
    found = pod.events_named("store_unavailable")
    assert len(found) == 1, pod.log_text()
    assert found[0]["level"] == "error"
    assert "database unreachable" in str(found[0]["message"])
    assert "Traceback" not in pod.log_path.read_text()
    assert pod.events_named("supervisor_stopped")[-1]["exit_code"] == exitcodes.STORE_UNAVAILABLE
    return found[0]


@pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0,
    reason="needs unshare(1) and root for a read-only bind mount",
)
@pytest.mark.timeout(60)
def test_sqlite_in_a_read_only_directory_exits_3_at_once_saying_why(tmp_path: Path) -> None:
    directory = tmp_path / "readonly"
    directory.mkdir()
    url = f"sqlite:///{directory / 'queue.sqlite3'}"
    upgrade(url)
    env = Env(tmp=tmp_path, database_url=url, journal=tmp_path / "journal.txt")
    script = 'mount --bind -o ro "$1" "$1" && shift && exec "$@"'
    wrapper = ["unshare", "-m", "sh", "-c", script, "sh", str(directory)]
    with supervisor(env, wrapper=wrapper) as pod:
        code, elapsed = exit_code(pod, 30)
    assert code == exitcodes.STORE_UNAVAILABLE, pod.log_text()
    assert elapsed < 15, elapsed  # no startup_timeout spent on what waiting cannot fix
    event = gave_up(pod)
    assert "unable to open database file" in str(event["reason"]), event
    assert event["permanent"] is True
    assert not pod.events_named("store_connect_retry")


@pytest.mark.timeout(60)
def test_postgres_refusing_connections_is_retried_and_shown_then_exits_3(tmp_path: Path) -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/app"  # nothing listens
    env = Env(tmp=tmp_path, database_url=url, journal=tmp_path / "journal.txt")
    with supervisor(env, startup_timeout="4") as pod:
        wait_until(
            lambda: len(pod.events_named("store_connect_retry")) >= 2,
            timeout=20,
            what="two retry lines",
        )

        def startupz() -> str | None:
            answer = try_http_get(pod.port, "/startupz")
            return answer[1] if answer and answer[0] == 503 and "refused" in answer[1] else None

        body = wait_until(startupz, timeout=10, what="/startupz to say why")
        code, _ = exit_code(pod, 20)
    assert "store unreachable: database unreachable" in body, body
    assert code == exitcodes.STORE_UNAVAILABLE, pod.log_text()
    for retry in pod.events_named("store_connect_retry"):
        assert retry["level"] == "warning"
        assert "Connection refused" in str(retry["reason"]), retry
    event = gave_up(pod)
    assert "Connection refused" in str(event["reason"]), event
    assert event["permanent"] is False


@pytest.mark.timeout(60)
def test_sigterm_while_waiting_for_the_database_exits_at_once(tmp_path: Path) -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/app"
    env = Env(tmp=tmp_path, database_url=url, journal=tmp_path / "journal.txt")
    with supervisor(env) as pod:
        pod.wait_event("store_connect_retry", timeout=20)
        pod.signal(signal.SIGTERM)
        code, elapsed = pod.wait_exit(10)
    assert code == exitcodes.STARTUP_FAILED, pod.log_text()  # stopped before it was ready
    assert elapsed < 2.0, elapsed
    assert pod.events_named("worker_stopped_starting"), pod.log_text()


@pytest.mark.parametrize(
    ("user", "database", "says"),
    [
        ("nobody", "postgres", 'role "nobody" does not exist'),
        ("postgres", "no_such_db", 'database "no_such_db" does not exist'),
    ],
)
@pytest.mark.timeout(60)
def test_postgres_with_wrong_credentials_or_database_exits_3_at_once(
    tmp_path: Path, postgres_server: PostgresServer, user: str, database: str, says: str
) -> None:
    url = f"postgresql+psycopg://{user}@127.0.0.1:{postgres_server.port}/{database}"
    env = Env(tmp=tmp_path, database_url=url, journal=tmp_path / "journal.txt")
    with supervisor(env) as pod:
        code, elapsed = exit_code(pod, 30)
    assert code == exitcodes.STORE_UNAVAILABLE, pod.log_text()
    assert elapsed < 15, elapsed
    event = gave_up(pod)
    assert says in str(event["reason"]), event
    assert event["permanent"] is True


@pytest.mark.timeout(60)
def test_a_postgres_scheme_url_is_read_as_postgresql(tmp_path: Path, postgres_url: str) -> None:
    url = postgres_url.replace("postgresql+psycopg://", "postgres://")
    env = Env(tmp=tmp_path, database_url=url, journal=tmp_path / "journal.txt")
    env.enqueue("tick", "heroku", job_id="heroku")
    with supervisor(env) as pod:
        pod.wait_ready()
        env.wait_line("ran heroku 1")


@pytest.mark.timeout(120)
def test_three_workers_started_at_once_on_a_new_database_all_get_ready_and_run_each_job_once(
    tmp_path: Path, blank_database_url: str
) -> None:
    """A new SQLite file (or an empty PostgreSQL database), three workers and the migration
    started at the same moment: the first connections race to put the file in WAL mode, the
    workers wait for the schema. Every worker is ready well within the bound, none gave up or
    logged a retry on SQLite, and each job ran once."""
    url = blank_database_url
    env = Env(tmp=tmp_path, database_url=url, journal=tmp_path / "journal.txt")
    upgrade_env = {**os.environ, "PYTHONPATH": str(REPO)}
    with ExitStack() as stack:
        started = time.monotonic()
        pods = [stack.enter_context(supervisor(env, name=f"pod-{i}")) for i in range(3)]
        migration = subprocess.run(
            [*WORKERKIT, "db", "upgrade", "--database-url", url],
            env=upgrade_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert migration.returncode == 0, migration.stderr
        for pod in pods:
            pod.wait_ready(timeout=60)
        all_ready = time.monotonic() - started
        jobs = [f"once-{n}" for n in range(6)]
        for job_id in jobs:
            env.enqueue("tick", job_id, job_id=job_id)
        for job_id in jobs:
            env.wait_line(f"ran {job_id} 1", timeout=30)
        wait_until(
            lambda: all(env.job(j)["state"] == "succeeded" for j in jobs),
            timeout=15,
            what="every job settled",
        )
        for pod in pods:
            assert stop_gracefully(pod) == 0, pod.log_text()
    assert all_ready < 45, all_ready  # observed 3-7 s on a loaded 2-core machine
    for job_id in jobs:
        record = env.job(job_id)
        assert (record["state"], record["attempts"]) == ("succeeded", 1), record
    ran = [line for line in env.lines() if line.startswith("ran ")]
    assert sorted(ran) == sorted(f"ran {j} 1" for j in jobs), ran
    for pod in pods:
        assert not pod.events_named("store_unavailable"), pod.log_text()
        if url.startswith("sqlite"):
            assert not pod.events_named("store_connect_retry"), pod.log_text()


@pytest.mark.timeout(60)
def test_a_sqlite_file_locked_at_start_is_retried_shown_and_exits_3(tmp_path: Path) -> None:
    """Another process keeps the write lock past the busy timeout: each wait is a retry line
    with the reason, /startupz says it, and at startup_timeout the worker gives up saying so."""
    path = tmp_path / "queue.sqlite3"
    upgrade(f"sqlite:///{path}")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # held until the test ends
    try:
        url = f"sqlite:///{path}?timeout=1"
        env = Env(tmp=tmp_path, database_url=url, journal=tmp_path / "journal.txt")
        with supervisor(env, startup_timeout="5") as pod:
            pod.wait_event("store_connect_retry", timeout=30)

            def startupz() -> str | None:
                answer = try_http_get(pod.port, "/startupz")
                return answer[1] if answer and answer[0] == 503 and "locked" in answer[1] else None

            body = wait_until(startupz, timeout=10, what="/startupz to say why")
            code, _ = exit_code(pod, 30)
    finally:
        holder.close()
    assert "store unreachable: database unreachable: OperationalError: database is locked" in (
        body
    ), body
    assert code == exitcodes.STORE_UNAVAILABLE, pod.log_text()
    for retry in pod.events_named("store_connect_retry"):
        assert "database is locked" in str(retry["reason"]), retry
    event = gave_up(pod)
    assert "database is locked" in str(event["reason"]), event
    assert event["permanent"] is False


def _has_open(pid: int, path: Path) -> bool:
    try:
        return any(
            Path(f"/proc/{pid}/fd/{fd}").resolve() == path for fd in os.listdir(f"/proc/{pid}/fd")
        )
    except OSError:
        return False


@pytest.mark.timeout(120)
def test_workers_opening_a_new_sqlite_file_while_its_first_writer_holds_it_wait_for_it(
    tmp_path: Path,
) -> None:
    """What the first of several workers does to a new file (switching it to WAL under the
    exclusive lock), done by a plain sqlite3 connection holding the write lock while three
    workers open the file: they wait for it and start, instead of failing at once with
    "database is locked" and retrying."""
    path = tmp_path / "queue.sqlite3"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the write lock of a file not yet in WAL mode
    url = f"sqlite:///{path}"
    env = Env(tmp=tmp_path, database_url=url, journal=tmp_path / "journal.txt")
    with ExitStack() as stack:
        pods = [stack.enter_context(supervisor(env, name=f"pod-{i}")) for i in range(3)]
        try:
            workers = [pod.worker_pid() for pod in pods]
            wait_until(  # each waiting on the lock, or (before the fix) failed at once
                lambda: all(
                    _has_open(pid, path) or pod.events_named("store_connect_retry")
                    for pid, pod in zip(workers, pods, strict=True)
                ),
                timeout=30,
                what="every worker to open the database file",
            )
            time.sleep(0.3)  # into their wait for the lock (a failure would be at once)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        upgrade(url)
        for pod in pods:
            pod.wait_ready(timeout=60)
        env.enqueue("tick", "after", job_id="after")
        env.wait_line("ran after 1", timeout=30)
    for pod in pods:
        assert not pod.events_named("store_connect_retry"), pod.log_text()
