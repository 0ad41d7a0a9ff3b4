"""The fault suite's jobs (tests/apps/fault_jobs.py) as Celery tasks, journaled the same way."""

from __future__ import annotations

import os

from celery import Celery

from tests.apps.fault_jobs import IDEM_EXPIRY, gate_body, long_body, short_body, tick_body
from workerkit.idempotency import idempotent

__all__ = ("app", "gate", "idem", "long", "short", "tick")

app = Celery("faults", broker=os.environ.get("E2E_REDIS_URL", "redis://127.0.0.1:6379/1"))
app.conf.update(broker_connection_retry_on_startup=True, task_default_queue="celery")


@app.task(name="short")
def short(job_id: str, seconds: float) -> str:
    return short_body(job_id, seconds)


@app.task(name="idem")
@idempotent("fault:{job_id}", in_progress_expiry=IDEM_EXPIRY)
def idem(job_id: str, seconds: float) -> str:
    return short_body(job_id, seconds)


@app.task(name="long", workerkit_checkpointed=True)
def long(job_id: str, steps: int, step_seconds: float) -> int:
    return long_body(job_id, steps, step_seconds)


@app.task(name="gate")
def gate(job_id: str, gate: str) -> str:
    return gate_body(job_id, gate)


@app.task(name="tick")
def tick(job_id: str, ticks: int, seconds: float) -> int:
    return tick_body(job_id, ticks, seconds)
