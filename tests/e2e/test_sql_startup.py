"""The sql engine's start when its database is wrong or missing: say why, retry or exit 3.

Real ``workerkit run sql`` processes against a SQLite file in a read-only directory (a bind
mount in a private mount namespace, root only), a port nothing listens on, and the test
PostgreSQL with a role or a database that does not exist.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.support.harness import Env, Supervisor, supervisor, try_http_get, wait_until
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
