"""The apps of bench/latency.py around one job, :func:`bench.latency_stamp.stamp`.

The same function as a workerkit SQL task (``sql_app``), an RQ job allowed by ``rq_app``
(``workerkit run rq``; a bare ``rq worker`` imports it by name) and a Celery task
(``celery_app``). The RQ and Celery apps are built on first access, so the SQL worker imports
neither library.
"""

from __future__ import annotations

import os
from typing import Any

from bench.latency_stamp import QUEUE, TASK, URL_ENV, stamp
from workerkit.app import App

__all__ = ("sql_app",)

sql_app = App()
sql_app.task(name=TASK, queue=QUEUE, timeout=60)(stamp)


def _celery_app() -> Any:
    from celery import Celery

    app = Celery("latency", broker=os.environ.get(URL_ENV, "redis://127.0.0.1:6379/0"))
    app.conf.update(
        task_ignore_result=True, task_default_queue=QUEUE, broker_connection_retry_on_startup=True
    )
    app.task(name=TASK)(stamp)
    return app


def _rq_app() -> Any:
    from workerkit.engines.rq import RqApp

    return RqApp(modules=["bench.latency_stamp"])


_LAZY = {"celery_app": _celery_app, "rq_app": _rq_app}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = _LAZY[name]()
        globals()[name] = value
        return value
    raise AttributeError(name)
