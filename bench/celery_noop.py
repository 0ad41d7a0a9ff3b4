"""The bare Celery app of the benchmarks: one no-op task (a Redis INCR, see bench/_counter.py).

Broker: ``BENCH_REDIS_URL``. No result backend (results ignored), JSON serializer, everything
else at Celery's defaults (prefetch multiplier 4, acks on receipt), except that
``BENCH_CELERY_ACKS_LATE=1`` turns ``task_acks_late`` on: the ack then follows the run, as
workerkit's does.
"""

from __future__ import annotations

import os

from celery import Celery

from bench._counter import URL_ENV, hit

QUEUE = "bench"

app = Celery("bench", broker=os.environ.get(URL_ENV, "redis://127.0.0.1:6379/0"))
app.conf.update(
    task_ignore_result=True,
    task_default_queue=QUEUE,
    task_acks_late=os.environ.get("BENCH_CELERY_ACKS_LATE") == "1",
    broker_connection_retry_on_startup=True,
)


@app.task(name="bench.noop")
def noop(total: int) -> None:
    hit(total)
