"""A Celery app with a ``beat_schedule``, for the Celery scheduler's tests: each run journals
its fire as ``current_job()`` sees it."""

from __future__ import annotations

import os
from datetime import timedelta

from celery import Celery
from celery.schedules import crontab

from tests.apps.journal import record
from workerkit.job import current_job

__all__ = ("app", "fired")

app = Celery("sched", broker=os.environ.get("E2E_REDIS_URL"))
app.conf.update(
    broker_connection_retry_on_startup=True,
    task_default_queue="celery",
    timezone="Europe/Berlin",
    beat_schedule={
        "tick": {"task": "sched.fired", "schedule": 1.0, "args": ("tick",)},
        "minutely": {
            "task": "sched.fired",
            "schedule": timedelta(minutes=1),
            "args": ("minutely",),
            "options": {"queue": "other", "priority": 6, "expires": 30},
        },
        "nightly": {
            "task": "sched.fired",
            "schedule": crontab(hour=3, minute=0),
            "kwargs": {"tag": "nightly"},
            "misfire": "all",
            "max_catch_up": 5,
        },
        "unregistered": {"task": "elsewhere.report", "schedule": 60, "args": [1]},
    },
)


@app.task(name="sched.fired")
def fired(tag: str) -> str:
    """Journals ``fired TAG SCHEDULE FIRE_TIME JOB_ID``."""
    job = current_job()
    record(f"fired {tag} {job.schedule} {job.fire_time!r} {job.job_id}")
    return tag
