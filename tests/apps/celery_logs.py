"""A Celery app that writes to every output a real app does: for the JSON-log tests.

Task loggers, ``print``, a Python warning, a retry, a failure with a traceback, a release by
the job; each task also writes its executions to the journal (``E2E_JOURNAL``).
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

from celery import Celery
from celery.utils.log import get_task_logger

import workerkit
from tests.apps.journal import record

__all__ = ("app", "boom", "flaky", "release_once", "say", "sleepy", "warn")

app = Celery("e2e_logs", broker=os.environ.get("E2E_REDIS_URL", "redis://127.0.0.1:6379/1"))
app.conf.update(broker_connection_retry_on_startup=True, task_default_queue="celery")
logger = get_task_logger(__name__)


@app.task(name="say")
def say(label: str) -> str:
    logger.info("task logger says %s", label)
    print(f"printed by say {label}")
    record(f"say {label}")
    return label


@app.task(name="warn")
def warn(label: str) -> None:
    warnings.warn(f"a warning from task warn {label}", UserWarning, stacklevel=1)
    record(f"warn {label}")


@app.task(name="flaky", bind=True, max_retries=3)
def flaky(self: Any, label: str) -> str:
    record(f"flaky {label} {self.request.retries}")
    if self.request.retries == 0:
        raise self.retry(countdown=0.2, exc=RuntimeError("first run fails"))
    return label


@app.task(name="boom")
def boom(label: str) -> None:
    record(f"boom {label}")
    raise ValueError(f"boom {label}")


@app.task(name="release_once")
def release_once(label: str) -> str:
    """Releases itself on its first run (a cooperative stop), succeeds on the next."""
    job = workerkit.current_job()
    try:
        with open(os.environ["E2E_JOURNAL"]) as journal:
            released = f"release {label}\n" in journal.read()
    except FileNotFoundError:
        released = False
    if not released:
        record(f"release {label}")
        job.release()
    record(f"done {label}")
    return label


@app.task(name="sleepy")
def sleepy(label: str, seconds: float) -> str:
    record(f"start {label}")
    time.sleep(seconds)
    record(f"done {label}")
    return label
