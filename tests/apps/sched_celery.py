"""Celery's recording app for the scheduler tests: its own ``beat_schedule``, fired by
``workerkit scheduler celery`` (in place of ``celery beat``), run by ``workerkit run celery``;
every run records itself (tests/apps/sched_record.py) with the fire time ``current_job()``
carries.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

import workerkit
from tests.apps.sched_record import MAX_CATCH_UP, MISFIRE_SCHEDULES, PERIOD, declared, record_run

__all__ = ("app", "periodic_run")

app = Celery("sched", broker=os.environ.get("E2E_REDIS_URL", "redis://127.0.0.1:6379/1"))
app.conf.update(broker_connection_retry_on_startup=True, task_default_queue="celery")


@app.task(name="sched.periodic_run")
def periodic_run() -> None:
    job = workerkit.current_job()
    record_run("celery", job.schedule, job.fire_time)


def _entry(**misfire: Any) -> dict[str, Any]:
    return {"task": "sched.periodic_run", "schedule": PERIOD, **misfire}


if declared() == "misfire":
    app.conf.beat_schedule = {
        policy: _entry(misfire=policy, max_catch_up=MAX_CATCH_UP) for policy in MISFIRE_SCHEDULES
    }
else:
    app.conf.beat_schedule = {"tick": _entry()}
