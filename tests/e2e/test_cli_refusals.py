"""Bad input refused at configuration by the real ``workerkit`` command: exit 2 and one line.

A database URL the SQL store cannot use, a missing app, an interval too short to be anything
but a busy loop, and an ``enqueue`` of a task the app does not have used to be accepted and
fail later: in the worker (exit 4 with a traceback) or when the job ran. Each is refused here
before anything starts, with a message that names the setting (or the task) and the fix.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.harness import REPO, WORKERKIT
from tests.support.servers import free_port
from workerkit import exitcodes
from workerkit.engines.sql import SqlQueue, upgrade
from workerkit.settings import Settings

pytestmark = pytest.mark.e2e

APP = "tests.apps.sql_jobs:app"


@dataclass(frozen=True)
class Ran:
    code: int
    stdout: str
    stderr: str

    @property
    def started_something(self) -> bool:
        output = self.stdout + self.stderr
        return any(event in output for event in ("worker_started", "http_listening"))

    @property
    def one_line(self) -> str:
        """The whole of stderr, which must be one line (no traceback)."""
        lines = self.stderr.strip().splitlines()
        assert len(lines) == 1, self.stderr
        return lines[0]


def cli(*args: str, cwd: Path, timeout: float = 30.0) -> Ran:
    """``workerkit ARGS`` in ``cwd``, with no WORKERKIT_* from this process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKERKIT_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env["WORKERKIT_HTTP_PORT"] = str(free_port())
    proc = subprocess.Popen(
        [*WORKERKIT, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # should it start a worker after all, stop the whole session
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"workerkit {args} did not exit:\n{stdout}\n{stderr}") from None
    return Ran(proc.returncode, stdout, stderr)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        (
            "nonsense",
            (
                "setting 'database_url' (from --database-url): got 'nonsense'; expected a "
                "SQLAlchemy URL, such as sqlite:///PATH"
            ),
        ),
        ("postgresql://app:s3cret@db:notaport/q", "port is a number"),
        ("foo://host/db", "database_url uses 'foo', which workerkit's SQL store does not support"),
        ("postgresql+nodriver://app@db/q", "driver 'postgresql+nodriver', which SQLAlchemy"),
        ("sqlite://", "in-memory SQLite database"),
    ],
)
def test_run_sql_refuses_a_database_url_it_cannot_use_before_starting_anything(
    tmp_path: Path, url: str, says: str
) -> None:
    ran = cli("run", "sql", "--app", APP, "--database-url", url, cwd=tmp_path)
    assert ran.code == exitcodes.CONFIG_ERROR, ran
    assert says in ran.one_line
    assert "s3cret" not in ran.stderr + ran.stdout
    assert not ran.started_something


@pytest.mark.parametrize("app", [[], ["--app", ""]], ids=["no-app", "empty-app"])
def test_run_sql_without_an_app_is_refused_before_starting_anything(
    tmp_path: Path, app: list[str]
) -> None:
    ran = cli("run", "sql", *app, cwd=tmp_path)
    assert ran.code == exitcodes.CONFIG_ERROR, ran
    assert "the sql engine needs an app: set --app / WORKERKIT_APP" in ran.one_line
    assert not ran.started_something


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        (
            "--heartbeat-interval",
            "1e-7",
            (
                "setting 'heartbeat_interval' (from --heartbeat-interval): got '1e-7'; "
                "expected a value at least 0.1 (renewing leases"
            ),
        ),
        ("--poll-interval", "0.000001", "setting 'poll_interval'"),
        ("--visibility-timeout", "0.01", "expected a value at least 1"),
        ("--job-timeout", "1e12", "expected a value at most 1e+09"),
    ],
)
def test_run_sql_refuses_an_interval_out_of_bounds_naming_the_setting_and_the_bound(
    tmp_path: Path, option: str, value: str, says: str
) -> None:
    ran = cli("run", "sql", "--app", APP, option, value, cwd=tmp_path)
    assert ran.code == exitcodes.CONFIG_ERROR, ran
    assert ran.one_line.startswith("workerkit: configuration error: ")
    assert says in ran.one_line
    assert not ran.started_something


def test_db_upgrade_with_a_url_it_cannot_use_is_a_configuration_error(tmp_path: Path) -> None:
    ran = cli("db", "upgrade", "--database-url", "foo://host/db", cwd=tmp_path)
    assert ran.code == exitcodes.CONFIG_ERROR, ran  # not STORE_UNAVAILABLE: nothing to reach
    assert "database_url uses 'foo'" in ran.one_line


@pytest.fixture
def queue_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'queue.sqlite3'}"
    upgrade(url)
    return url


def jobs_in(url: str) -> int:
    queue = SqlQueue(url, settings=Settings(database_url=url))
    try:
        return sum(queue.stats(["default"]).depth.values())
    finally:
        queue.close()


def test_enqueue_with_an_app_refuses_a_task_it_does_not_have_naming_close_ones(
    tmp_path: Path, queue_url: str
) -> None:
    ran = cli(
        "enqueue", "tik", "--args", '["a"]', "--app", APP, "--database-url", queue_url, cwd=tmp_path
    )
    assert ran.code == exitcodes.CONFIG_ERROR, ran
    assert (
        f"--app '{APP}': no task 'tik' is registered in the app; did you mean 'tick'?"
        in ran.one_line
    )
    assert jobs_in(queue_url) == 0


def test_enqueue_with_an_app_refuses_arguments_that_do_not_fit_the_task(
    tmp_path: Path, queue_url: str
) -> None:
    ran = cli(
        "enqueue",
        "tick",
        "--args",
        '["a", "b"]',
        "--app",
        APP,
        "--database-url",
        queue_url,
        cwd=tmp_path,
    )
    assert ran.code == exitcodes.CONFIG_ERROR, ran
    assert "ArgumentsMismatch: tick(tag): too many positional arguments" in ran.one_line
    assert jobs_in(queue_url) == 0


def test_enqueue_without_an_app_takes_any_task_name_as_documented(
    tmp_path: Path, queue_url: str
) -> None:
    ran = cli("enqueue", "no.such.task", "--database-url", queue_url, cwd=tmp_path)
    assert ran.code == exitcodes.OK, ran
    assert jobs_in(queue_url) == 1
    with_app = cli(
        "enqueue",
        "tick",
        "--args",
        '["a"]',
        "--app",
        APP,
        "--database-url",
        queue_url,
        cwd=tmp_path,
    )
    assert with_app.code == exitcodes.OK, with_app
    assert jobs_in(queue_url) == 2
