"""The ``workerkit`` command through click's runner: its commands, exit codes and messages.

``workerkit check`` has its own byte-for-byte test (test_check_golden.py); ``workerkit run``
runs real processes in tests/e2e. Here: the group, ``db`` and ``enqueue`` on a SQLite file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from workerkit import exitcodes
from workerkit.cli import main
from workerkit.engines.sql import SqlQueue
from workerkit.settings import ENV_PREFIX, Settings


def invoke(*args: str) -> Result:
    cleared: dict[str, str | None] = {k: None for k in os.environ if k.startswith(ENV_PREFIX)}
    return CliRunner().invoke(main, list(args), env=cleared, catch_exceptions=False)


@pytest.fixture
def url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.chdir(tmp_path)  # no workerkit.toml or pyproject.toml to find
    return f"sqlite:///{tmp_path / 'queue.sqlite3'}"


def test_the_group_lists_its_commands_and_its_version(url: str) -> None:
    del url
    listed = invoke("--help")
    assert listed.exit_code == 0
    for command in ("check", "db", "enqueue", "run"):
        assert f"  {command} " in listed.stdout
    version = invoke("--version")
    assert version.exit_code == 0
    assert "version" in version.stdout


def test_db_check_fails_until_db_upgrade_has_run(url: str) -> None:
    before = invoke("db", "check", "--database-url", url)
    assert before.exit_code == exitcodes.CHECK_FAILED
    upgraded = invoke("db", "upgrade", "--database-url", url)
    assert upgraded.exit_code == exitcodes.OK
    assert upgraded.stdout.startswith("schema is at revision ")
    after = invoke("db", "check", "--database-url", url)
    assert after.exit_code == exitcodes.OK, after.stdout


def test_enqueue_puts_one_job_on_the_queue_and_prints_its_id(url: str) -> None:
    assert invoke("db", "upgrade", "--database-url", url).exit_code == exitcodes.OK
    args = ("enqueue", "send_email", "--args", '["a@example.com"]', "--job-id", "job-1")
    result = invoke(*args, "--database-url", url)
    assert result.exit_code == exitcodes.OK
    assert result.stdout.strip() == "job-1"
    queue = SqlQueue(url, settings=Settings(database_url=url))
    try:
        job = queue.get_job("job-1")
    finally:
        queue.close()
    assert job is not None
    assert (job["task"], job["state"]) == ("send_email", "ready")
    assert json.loads(job["payload"]) == {"args": ["a@example.com"], "kwargs": {}}


def test_enqueue_refuses_arguments_that_are_not_json(url: str) -> None:
    result = CliRunner().invoke(main, ["enqueue", "t", "--args", "[1,", "--database-url", url])
    assert result.exit_code == exitcodes.CONFIG_ERROR  # click's usage error
    assert "not JSON" in result.stderr


def test_a_bad_setting_is_a_configuration_error(url: str) -> None:
    result = invoke("db", "check", "--database-url", url, "--grace-period", "soon")
    assert result.exit_code == exitcodes.CONFIG_ERROR
    assert "workerkit: configuration error: setting 'grace_period'" in result.stderr


def test_scheduler_needs_an_app_and_a_known_engine() -> None:
    result = invoke("scheduler", "sql")
    assert result.exit_code == exitcodes.CONFIG_ERROR
    assert "workerkit scheduler sql: give the app whose schedules to run: --app" in result.stderr
    assert invoke("scheduler", "kafka").exit_code == 2  # click: not one of sql, rq, celery
    # celery beat's spelling works: -A (a bad setting stops it before anything starts)
    spelled = invoke("scheduler", "celery", "-A", "proj", "--scheduler-retry-period", "x")
    assert spelled.exit_code == exitcodes.CONFIG_ERROR
    assert "scheduler_retry_period" in spelled.stderr


def test_scheduler_refuses_a_bad_scheduler_setting_naming_it() -> None:
    result = invoke("scheduler", "sql", "--app", "x:y", "--scheduler-retry-period", "0.001")
    assert result.exit_code == exitcodes.CONFIG_ERROR
    assert "scheduler_retry_period" in result.stderr
    assert "busy loop" in result.stderr


def test_schedules_commands_are_listed() -> None:
    result = invoke("schedules", "--help")
    for command in ("list", "pause", "resume", "trigger"):
        assert command in result.stdout


@pytest.fixture
def sched_store(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The sql engine's scheduling module replaced by one on the in-memory store."""
    import sys
    import types

    from workerkit.scheduler.contract import Schedule, SchedulerBinding
    from workerkit.scheduler.triggers import Every
    from workerkit.testing import InMemorySchedulerStore

    store = InMemorySchedulerStore()
    store.close = lambda: None  # type: ignore[method-assign]  # one store for every command
    tick = Schedule("tick", "tasks.tick", Every(60.0))
    lease = store.acquire("pod-a", 15)
    assert lease is not None
    store.register(lease, [tick])
    module = types.ModuleType("workerkit.engines.sql.scheduling")
    module.open_scheduler = lambda settings: SchedulerBinding(store, (tick,))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "workerkit.engines.sql.scheduling", module)
    return store


def test_schedules_list_pause_resume_trigger(sched_store: Any) -> None:
    listed = invoke("schedules", "list")
    assert listed.exit_code == 0, listed.output
    assert "leader: pod-a (epoch 1" in listed.stdout
    assert "tick: every 60" in listed.stdout
    data = json.loads(invoke("schedules", "list", "--json").stdout)
    assert data["schedules"][0]["status"] == "active"
    assert data["leader"]["holder"] == "pod-a"

    assert invoke("schedules", "pause", "tick").exit_code == 0
    assert sched_store.states(["tick"])["tick"].paused
    assert "paused" in invoke("schedules").stdout  # no command: list
    assert invoke("schedules", "resume", "tick").exit_code == 0
    assert not sched_store.states(["tick"])["tick"].paused
    triggered = invoke("schedules", "trigger", "tick")
    assert "the leader fires it within 2 s" in triggered.stdout
    assert len(sched_store.states(["tick"])["tick"].triggers) == 1


def test_schedules_refuses_an_unknown_name_and_says_when_the_store_is_down(
    sched_store: Any,
) -> None:
    unknown = invoke("schedules", "pause", "tock")
    assert unknown.exit_code == exitcodes.CONFIG_ERROR
    assert "the store knows no schedule 'tock' (the app's: tick)" in unknown.stderr
    sched_store.unavailable = True
    down = invoke("schedules", "list")
    assert down.exit_code == exitcodes.STORE_UNAVAILABLE
