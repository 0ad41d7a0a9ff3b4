"""The ``workerkit`` command as a user types it, in a real process: how it finds the app, what
each engine's help lists, and what it refuses before anything starts.

A refusal must come before the supervisor starts anything (no HTTP server, no worker): exit 2
(CONFIG_ERROR) with one line naming what is wrong, never a traceback and never the exit 4 of a
worker that failed after start.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.harness import REPO, WORKERKIT, Env, spawn_logged, stopped_after, worker_env
from tests.support.servers import free_port
from workerkit import exitcodes

CELERY_PROJ = REPO / "tests" / "apps" / "celery_proj"
NEEDS_DATABASE_URL = "tests.apps.needs_database_url:app"


@dataclass(frozen=True)
class Ran:
    code: int
    stdout: str
    stderr: str

    @property
    def started_something(self) -> bool:
        """Whether the supervisor got as far as starting its worker or its HTTP server."""
        output = self.stdout + self.stderr
        return any(event in output for event in ("worker_started", "http_listening"))


def cli(*args: str, cwd: Path, timeout: float = 30.0) -> Ran:
    """``workerkit ARGS`` in ``cwd`` with no WORKERKIT_* (nor DATABASE_URL) from this process."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("WORKERKIT_") and k != "DATABASE_URL"
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env["WORKERKIT_HTTP_PORT"] = str(free_port())
    # Its own session: should the command start a worker after all (the bug), the test stops
    # the supervisor and its worker by that session's id.
    proc = subprocess.Popen(
        [*WORKERKIT, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"workerkit {args} did not exit:\n{stdout}\n{stderr}") from None
    return Ran(proc.returncode, stdout, stderr)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A working directory holding the Celery project ``proj``, as ``celery -A proj`` needs."""
    shutil.copytree(CELERY_PROJ / "proj", tmp_path / "proj")
    return tmp_path


# --- item 5: -A proj, Celery's own spelling -------------------------------------------------


@pytest.mark.parametrize("spec", ["proj", "proj.celery", "proj.celery.app", "proj.celery:app"])
def test_check_finds_the_celery_app_as_celery_a_does(project: Path, spec: str) -> None:
    ran = cli("check", "--engine", "celery", "--app", spec, "--format", "json", cwd=project)
    assert ran.code == exitcodes.OK, ran.stderr
    assert "configuration error" not in ran.stderr


def test_run_celery_dash_a_proj_starts_the_worker_and_drains(project: Path, redis_url: str) -> None:
    port = free_port()
    env = Env(tmp=project, database_url="", journal=project / "journal.txt")
    variables = worker_env(env, app="", port=port, engine={"redis_url": redis_url}, settings={})
    del variables["WORKERKIT_APP"]
    argv = [*WORKERKIT, "run", "celery", "-A", "proj", "--queues", "celery", "--", "-P", "solo"]
    with stopped_after(
        spawn_logged(argv, project, "supervisor", port, variables, new_session=True)
    ) as supervisor:
        supervisor.wait_ready(timeout=30)
        supervisor.signal(signal.SIGTERM)
        code, _ = supervisor.wait_exit(timeout=15)
    assert code == exitcodes.OK, supervisor.log_text()


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("nothere", "no module named 'nothere'"),
        ("proj.nothing:app", "no module named 'proj.nothing'"),
        ("proj/celery.py", "not a file path"),
        ("proj:", "give what `celery -A` takes"),
        ("json", "module 'json' has no app"),
        ("proj.tasks:add", "not a celery.Celery app"),
    ],
)
def test_run_celery_refuses_an_app_celery_cannot_find_before_starting_anything(
    project: Path, spec: str, says: str
) -> None:
    ran = cli("run", "celery", "-A", spec, cwd=project)
    assert ran.code == exitcodes.CONFIG_ERROR, ran
    assert says in ran.stderr
    assert ran.stderr.strip().count("\n") == 0, ran.stderr
    assert not ran.started_something


def test_run_celery_without_an_app_is_refused_before_starting_anything(project: Path) -> None:
    ran = cli("run", "celery", cwd=project)
    assert ran.code == exitcodes.CONFIG_ERROR, ran
    assert "-A/--app" in ran.stderr
    assert not ran.started_something


# --- item 13: each engine its own help and options ----------------------------------------


def test_run_help_lists_the_engines(tmp_path: Path) -> None:
    ran = cli("run", "--help", cwd=tmp_path)
    assert ran.code == exitcodes.OK
    for engine in ("celery", "rq", "sql"):
        assert f"  {engine} " in ran.stdout


@pytest.mark.parametrize(
    ("engine", "listed", "not_listed"),
    [
        (
            "rq",
            ["--worker-class", "--serializer", "--url", "--with-scheduler", "--redis-url"],
            [
                "--poll-interval",
                "--database-url",
                "--scheduler-lease-duration",
                "--recovery-window",
            ],
        ),
        (
            "celery",
            ["-A, --app", "--recovery-window", "--max-countdown", "--concurrency"],
            ["--poll-interval", "--database-url", "--scheduler-lease-duration", "--worker-class"],
        ),
        (
            "sql",
            ["--poll-interval", "--database-url", "--concurrency"],
            [
                "--redis-url",
                "--worker-class",
                "--scheduler-lease-duration",
                "--recovery-window",
                "-A,",
            ],
        ),
    ],
)
def test_each_engine_has_its_own_help(
    tmp_path: Path, engine: str, listed: list[str], not_listed: list[str]
) -> None:
    ran = cli("run", engine, "--help", cwd=tmp_path)
    assert ran.code == exitcodes.OK, ran.stderr
    for option in listed:
        assert option in ran.stdout, option
    for option in not_listed:
        assert option not in ran.stdout, option


@pytest.mark.parametrize(
    ("engine", "args", "says"),
    [
        ("rq", ["--poll-interval", "2"], "--poll-interval does not apply to the rq engine"),
        ("rq", ["--concurrency", "4"], "--concurrency does not apply to the rq engine"),
        (
            "rq",
            ["--scheduler-lease-duration", "20"],
            "--scheduler-lease-duration does not apply to the rq engine",
        ),
        ("celery", ["--database-url", "sqlite://"], "--database-url does not apply"),
        ("celery", ["--worker-class", "simple"], "--worker-class is an option of the rq engine"),
        ("sql", ["--with-scheduler"], "--with-scheduler is an option of the rq engine"),
        ("sql", ["--redis-url", "redis://x"], "--redis-url does not apply to the sql engine"),
    ],
)
def test_an_option_of_another_engine_is_refused_naming_it(
    project: Path, engine: str, args: list[str], says: str
) -> None:
    ran = cli("run", engine, "--app", "proj.celery:app", *args, cwd=project)
    assert ran.code == exitcodes.CONFIG_ERROR, ran
    assert says in ran.stderr
    assert not ran.started_something


@pytest.mark.parametrize(
    ("worker_args", "says"),
    [
        (["--no-such-option"], "--no-such-option is not an option of `celery worker`"),
        (["-A", "proj"], "give -A/--app among workerkit's options"),
    ],
)
def test_an_option_celery_worker_does_not_take_is_refused_before_starting_anything(
    project: Path, worker_args: list[str], says: str
) -> None:
    ran = cli("run", "celery", "-A", "proj", "--", *worker_args, cwd=project)
    assert ran.code == exitcodes.CONFIG_ERROR, ran
    assert says in ran.stderr
    assert not ran.started_something


# --- item 15: an app that fails to import ----------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["run", "sql"],
        ["run", "rq"],
        ["run", "celery"],
        ["check", "--engine", "sql"],
        ["check", "--engine", "rq"],
        ["check", "--engine", "celery"],
        ["enqueue", "send_email"],
    ],
)
def test_an_app_that_raises_at_import_is_one_line_and_exit_2(
    tmp_path: Path, command: list[str]
) -> None:
    ran = cli(*command, "--app", NEEDS_DATABASE_URL, cwd=tmp_path)
    assert ran.code == exitcodes.CONFIG_ERROR, ran
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1, ran.stderr
    assert "KeyError: 'DATABASE_URL'" in lines[0]
    assert "needs_database_url.py:" in lines[0]  # where it was raised
    assert not ran.started_something


def test_the_traceback_of_an_app_that_fails_to_import_is_logged_at_debug(tmp_path: Path) -> None:
    ran = cli("run", "sql", "--app", NEEDS_DATABASE_URL, "--log-level", "debug", cwd=tmp_path)
    assert ran.code == exitcodes.CONFIG_ERROR, ran
    assert '"event":"app_import_failed"' in ran.stderr
    assert "Traceback (most recent call last)" in ran.stderr
    assert ran.stderr.strip().splitlines()[-1].startswith("workerkit: --app ")
