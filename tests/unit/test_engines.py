"""workerkit.engines: an engine by name (every extra is installed in the test
environment), or a configuration error that says what to do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workerkit.engines import ENGINE_CLASSES, get_engine
from workerkit.engines.appcheck import decode, encode, start_app_check
from workerkit.engines.base import AppTiming
from workerkit.errors import ConfigurationError, EngineUnavailable
from workerkit.settings import load_settings
from workerkit.timing import CeleryFacts, TaskTiming


@pytest.mark.parametrize("name", sorted(ENGINE_CLASSES))
def test_each_engine_is_found_by_its_name(name: str) -> None:
    assert get_engine(name).name == name


def test_an_unknown_engine_names_the_known_ones() -> None:
    with pytest.raises(
        EngineUnavailable, match="unknown engine 'kafka'; expected one of sql, rq, celery"
    ):
        get_engine("kafka")
    assert issubclass(EngineUnavailable, ConfigurationError)  # the CLI exits CONFIG_ERROR


def test_the_app_check_answer_keeps_every_timing_fact() -> None:
    timing = AppTiming(
        tasks=(
            TaskTiming("a", 30.0, idempotent=True),
            TaskTiming("b", None, checkpointed=True, max_countdown=5.0),
        ),
        celery=CeleryFacts(acks_late=False, prefetch_multiplier=4, visibility_timeout=3600.0),
    )
    assert decode(json.loads(json.dumps(encode(timing)))) == timing
    assert decode(encode(AppTiming())) == AppTiming()


def test_the_app_check_refuses_an_app_that_cannot_be_loaded(tmp_path: Path) -> None:
    settings = load_settings(
        {"app": "no_such_module_here:app", "database_url": f"sqlite:///{tmp_path / 'q.sqlite3'}"},
        env={},
    )
    with pytest.raises(ConfigurationError, match="no_such_module_here"):
        start_app_check("sql", [], settings).result()


def test_the_app_check_answers_the_apps_tasks(tmp_path: Path) -> None:
    settings = load_settings(
        {"app": "bench.startup_apps:sql_app", "database_url": f"sqlite:///{tmp_path / 'q.db'}"},
        env={},
    )
    timing = start_app_check("sql", [], settings).result()
    assert [task.name for task in timing.tasks] == ["noop"]
    assert timing.tasks[0].timeout == 60
