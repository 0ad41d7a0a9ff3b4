"""The Celery app of bench/startup_memory.py: ``bench.startup_celery_app:app``, one no-op task.

Broker ``BENCH_REDIS_URL``; no result backend. Run bare (``celery -A bench.startup_celery_app
worker --pool solo``) and under ``workerkit run celery``.
"""

from __future__ import annotations

import os

from celery import Celery

__all__ = ("app", "noop")

app = Celery("startup", broker=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(task_ignore_result=True, broker_connection_retry_on_startup=True)


@app.task(name="startup.noop")
def noop() -> None:
    """Does nothing (no job runs during the start-up benchmark)."""
