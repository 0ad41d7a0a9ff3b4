"""The Celery settings workerkit applies and reports, on real Celery apps configured the ways
users configure them (``conf.update``, ``config_from_object``, a namespace, old setting names).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("celery")

from celery import Celery

from workerkit.engines.celery.config import (
    celery_facts,
    configure_app,
    limit_tasks,
    set_by_app,
    startup_differences,
    task_timings,
    worker_argv,
)
from workerkit.settings import Settings, load_settings, settings_to_env

BROKER = "redis://127.0.0.1:1/0"  # never connected to
SETTINGS = Settings(engine="celery", redis_url=BROKER, job_timeout=100, release_margin=5)


class ExplicitDefaults:
    """A settings object whose values equal Celery's defaults, set on purpose."""

    task_acks_late = False
    worker_prefetch_multiplier = 4
    task_reject_on_worker_lost = None


class DjangoStyle:
    """``config_from_object("django.conf:settings", namespace="CELERY")``."""

    CELERY_BROKER_URL = BROKER
    CELERY_TASK_ACKS_LATE = False
    CELERY_WORKER_PREFETCH_MULTIPLIER = 4


class OldNames:
    """Pre-4.0 setting names, which Celery still reads."""

    BROKER_URL = BROKER
    CELERY_ACKS_LATE = False
    CELERYD_PREFETCH_MULTIPLIER = 4


def _app(source: Any = None, namespace: str | None = None, **conf: Any) -> Celery:
    app = Celery("t", broker=BROKER if namespace is None else None, set_as_current=False)
    if source is not None:
        app.config_from_object(source, namespace=namespace)
    app.conf.update(conf)
    return app


@pytest.mark.parametrize(
    "app",
    [
        pytest.param(lambda: _app(ExplicitDefaults), id="config_from_object"),
        pytest.param(lambda: _app(task_acks_late=False, worker_prefetch_multiplier=4), id="update"),
        pytest.param(lambda: _app(DjangoStyle, namespace="CELERY"), id="namespace"),
        pytest.param(lambda: _app(OldNames), id="old_names"),
    ],
)
def test_values_equal_to_celerys_defaults_set_by_the_app_are_kept_and_reported(
    app: Any,
) -> None:
    celery = app()
    assert celery_facts(celery).acks_late is False
    assert celery_facts(celery).prefetch_multiplier == 4
    configure_app(celery, SETTINGS)
    assert celery.conf.task_acks_late is False
    assert celery.conf.worker_prefetch_multiplier == 4
    # read again after workerkit filled in its values: still the app's, still reported
    assert celery_facts(celery).acks_late is False
    assert celery_facts(celery).prefetch_multiplier == 4
    assert celery_facts(celery).reject_on_worker_lost is None


def test_values_the_app_does_not_set_are_workerkits_and_not_reported() -> None:
    app = _app()
    configure_app(app, SETTINGS)
    configure_app(app, SETTINGS)  # again (the supervisor and the worker both configure)
    assert (app.conf.task_acks_late, app.conf.worker_prefetch_multiplier) == (True, 1)
    assert not set_by_app(app, "task_acks_late")
    assert celery_facts(app).acks_late is None
    assert celery_facts(app).visibility_timeout is None
    assert app.conf.broker_transport_options["visibility_timeout"] == 3600


def test_a_task_with_its_own_hard_limit_gets_no_pool_wide_soft_limit() -> None:
    """billiard runs a hard limit after the soft one: a pool-wide soft limit of 95 s would let
    ``time_limit=2`` run on until 95 s. Tasks without limits get the soft limit on the task."""
    app = _app()

    @app.task(name="own_limit", time_limit=2, shared=False)
    def own_limit() -> None: ...

    @app.task(name="no_limit", shared=False)
    def no_limit() -> None: ...

    @app.task(name="own_soft", soft_time_limit=7, shared=False)
    def own_soft() -> None: ...

    configure_app(app, SETTINGS)
    app.finalize()
    assert app.conf.task_soft_time_limit is None  # Celery's default: no pool-wide soft limit
    assert app.conf.task_time_limit == 100  # the pool's hard limit: J
    assert app.tasks["own_limit"].soft_time_limit is None
    assert app.tasks["own_limit"].time_limit == 2
    assert app.tasks["no_limit"].soft_time_limit == 95  # J - M, below J = 100
    assert app.tasks["no_limit"].time_limit == 100
    assert app.tasks["own_soft"].soft_time_limit == 7
    assert app.tasks["own_soft"].time_limit is None  # the pool's J applies
    timings = {t.name: t.timeout for t in task_timings(app)}
    mine = {"no_limit": None, "own_limit": 2.0, "own_soft": None}
    assert {name: timings[name] for name in mine} == mine


def test_a_task_registered_after_finalize_gets_its_soft_limit_when_the_worker_starts() -> None:
    # Celery binds a task registered after finalize with the pool's J and no soft limit; a
    # task whose own time_limit equals J is still the task's own (kept, as under bare Celery).
    app = _app()
    configure_app(app, SETTINGS)
    app.finalize()

    @app.task(name="late", shared=False)
    def late() -> None: ...

    @app.task(name="late_own", time_limit=100, shared=False)
    def late_own() -> None: ...

    assert (app.tasks["late"].time_limit, app.tasks["late"].soft_time_limit) == (100, None)
    limit_tasks(app, SETTINGS)  # what the worker does as it starts its consumer
    assert (app.tasks["late"].time_limit, app.tasks["late"].soft_time_limit) == (100, 95)
    assert (app.tasks["late_own"].time_limit, app.tasks["late_own"].soft_time_limit) == (100, None)


def test_the_apps_own_soft_and_hard_limits_apply_as_under_bare_celery() -> None:
    app = _app(task_soft_time_limit=30, task_time_limit=60)

    @app.task(name="plain", shared=False)
    def plain() -> None: ...

    configure_app(app, SETTINGS)
    app.finalize()
    assert (app.conf.task_soft_time_limit, app.conf.task_time_limit) == (30, 60)
    assert app.tasks["plain"].soft_time_limit == 30  # the app's, as Celery binds it
    timings = {t.name: t.timeout for t in task_timings(app)}
    assert timings["plain"] == 60.0  # the limit the pool enforces


def test_without_queues_the_worker_consumes_the_apps_queues_as_celery_does(
    tmp_path: Path,
) -> None:
    settings = load_settings(env={"WORKERKIT_ENGINE": "celery"}, cwd=tmp_path)
    assert settings.queues is None
    argv = worker_argv(settings, [])
    assert not any(a.startswith(("--queues", "-Q")) for a in argv)
    # the worker process reads the settings back from the environment: still not set
    assert load_settings(env=settings_to_env(settings), cwd=tmp_path).queues is None
    assert "--queues=a,b" in worker_argv(settings.replace(queues="a,b"), [])
    assert worker_argv(settings.replace(queues="a"), ["-Q", "x"]).count("--queues=a") == 0


def test_rq_and_sql_still_consume_default_without_queues(tmp_path: Path) -> None:
    for engine in ("sql", "rq"):
        settings = load_settings(env={"WORKERKIT_ENGINE": engine}, cwd=tmp_path)
        assert settings.queue_names == ("default",)
        again = load_settings(env=settings_to_env(settings), cwd=tmp_path)
        assert again.queue_names == ("default",)


def test_task_events_keep_worker_heartbeats_on() -> None:
    assert "--without-heartbeat" in worker_argv(SETTINGS, [])
    assert "--without-heartbeat" not in worker_argv(SETTINGS, ["-E"])
    assert "--without-heartbeat" not in worker_argv(SETTINGS, ["--task-events"])
    events_app = _app(worker_send_task_events=True)
    assert "--without-heartbeat" not in worker_argv(SETTINGS, [], events_app)


def test_startup_differences_name_each_difference_and_what_it_breaks() -> None:
    app = _app(worker_prefetch_multiplier=2)
    configure_app(app, SETTINGS)
    message, found = startup_differences(app, SETTINGS, ["--concurrency=512"])
    assert found["concurrency"].startswith("512 (celery: ")
    assert "worker_prefetch_multiplier" not in found  # the app's own value: kept
    assert found["task_acks_late"].startswith("True (celery: False)")
    assert found["time_limits"].startswith("hard 100 s (job_timeout J), soft 95 s")
    assert "revokes" in found["mingle"]
    assert "Flower" in found["heartbeat"]
    assert "-E" in found["heartbeat"]
    assert message.startswith("differs from bare `celery worker`: concurrency 512")
    _, with_events = startup_differences(app, SETTINGS, ["-E", "-P", "solo"])
    assert "heartbeat" not in with_events
    assert "concurrency" not in with_events  # solo runs one task at a time anyway
