"""The peers bench/scheduler.py runs against ``workerkit scheduler``: Celery beat and RQ's
built-in scheduler, each firing a 1 s job that records itself as the e2e apps' jobs do
(tests/apps/sched_record.py).

Celery beat has no fire time: the job records when beat published its message (stamped by a
``before_task_publish`` handler into the task's kwargs), and the analysis counts a run against
the second it was sent in. RQ's scheduler moves jobs enqueued with ``enqueue_at`` to the
queue; each job is given its own scheduled time as its fire time.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery, signals

from tests.apps.sched_record import PERIOD, record_run

__all__ = ("celery_app", "celery_tick", "rq_tick")

celery_app = Celery("peers", broker=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
celery_app.conf.update(
    broker_connection_retry_on_startup=True,
    task_default_queue="celery",
    beat_schedule={"tick": {"task": "peers.tick", "schedule": PERIOD}},
)


@signals.before_task_publish.connect
def _stamp(sender: str | None = None, body: Any = None, **_: Any) -> None:
    """Beat's publish time, in the message itself (kwargs are not serialized yet here)."""
    if sender == "peers.tick" and isinstance(body, tuple) and isinstance(body[1], dict):
        body[1]["sent"] = time.time()


@celery_app.task(name="peers.tick")
def celery_tick(sent: float | None = None) -> None:
    record_run("celery-beat", "tick", sent)


def rq_tick(fire_time: float) -> None:
    record_run("rq-scheduler", "tick", fire_time)
