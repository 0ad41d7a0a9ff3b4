"""The project's tasks. Each run appends one JSON line to the Redis list ``runs:<task id>``
(time, pid, retries, the queue it came from), so a test sees every execution, even a killed one.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import current_task, shared_task

__all__ = (
    "add",
    "flaky",
    "long_job",
    "monthly_report",
    "mul",
    "ping",
    "slow",
    "stamp",
    "tsum",
)

_client: redis.Redis[bytes] | None = None


def _record(**fields: Any) -> None:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(os.environ["COMPAT_REDIS_URL"])
    request = current_task.request
    info = {
        "t": time.time(),
        "pid": os.getpid(),
        "retries": request.retries,
        "queue": (request.delivery_info or {}).get("routing_key"),
        **fields,
    }
    _client.rpush(f"runs:{request.id}", json.dumps(info))


@shared_task
def add(x: int, y: int) -> int:
    _record()
    return x + y


@shared_task
def mul(x: int, y: int) -> int:
    _record()
    return x * y


@shared_task
def tsum(numbers: list[int]) -> int:
    _record()
    return sum(numbers)


@shared_task(bind=True, max_retries=3)
def flaky(self: Any, succeed_at: int) -> int:
    """Fails until its ``succeed_at``-th retry, retrying after 0.5 s each time."""
    _record()
    if self.request.retries < succeed_at:
        raise self.retry(exc=ConnectionError("flaky service"), countdown=0.5)
    return int(self.request.retries)


@shared_task
def stamp(label: str) -> str:
    """Sent with an ETA or a countdown: records when it ran."""
    _record(label=label)
    return label


@shared_task(time_limit=1.5)
def slow(seconds: float) -> float:
    """Its own hard limit and no soft limit: killed at 1.5 s where the pool enforces limits."""
    _record(phase="start")
    time.sleep(seconds)
    _record(phase="end")
    return seconds


@shared_task(rate_limit="60/m")
def ping(n: int) -> int:
    """At most one a second on a worker."""
    _record()
    return n


@shared_task
def monthly_report(month: str) -> str:
    _record()
    return f"report {month}"


@shared_task
def long_job(seconds: float) -> float:
    """In hand when the worker is told to stop: it finishes within the drain."""
    _record(phase="start")
    time.sleep(seconds)
    _record(phase="end")
    return seconds
