"""A Celery app as its users write it, with two queues, for the dashboard's tests.

Each task writes its run to the journal named by ``E2E_JOURNAL`` (one line per run: the task,
its label, the pid and the time), so a test asserts what ran, where and how often.
"""

from __future__ import annotations

import os
import time

from celery import Celery
from kombu import Queue

__all__ = ("app", "build_report", "send_mail")

app = Celery("shop", broker=os.environ.get("E2E_REDIS_URL", "redis://127.0.0.1:6379/1"))
app.conf.update(
    task_queues=(Queue("mail"), Queue("reports")),
    task_default_queue="mail",
    task_routes={"build_report": {"queue": "reports"}},
    broker_connection_retry_on_startup=True,
)


def _journal(*fields: object) -> None:
    path = os.environ.get("E2E_JOURNAL")
    if path:
        with open(path, "a") as journal:
            line = " ".join(str(f) for f in fields)
            journal.write(f"{line} pid={os.getpid()} t={time.time():.3f}\n")


@app.task(name="send_mail")
def send_mail(to: str, subject: str = "hello") -> str:
    _journal("send_mail", to)
    return to


@app.task(name="build_report")
def build_report(label: str, rows: int = 10) -> int:
    _journal("build_report", label)
    return rows
