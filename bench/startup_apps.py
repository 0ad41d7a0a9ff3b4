"""The apps of bench/startup_memory.py: one no-op task each, importing nothing but the engine.

``sql_app`` is a workerkit App (``bench.startup_apps:sql_app``); the RQ and Celery apps are in
:mod:`bench.startup_rq_app` and :mod:`bench.startup_celery_app`, so that loading this one
imports neither library (what the supervisor of ``workerkit run sql`` loads is then workerkit's
own doing, not the app's).
"""

from __future__ import annotations

from workerkit.app import App

__all__ = ("noop", "sql_app")


def noop() -> None:
    """Does nothing (no job runs during the start-up benchmark)."""


sql_app = App()
sql_app.task(name="noop", queue="default", timeout=60)(noop)
