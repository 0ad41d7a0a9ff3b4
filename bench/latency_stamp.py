"""The job of bench/latency.py: stamp the wall clock at its start, push it to a Redis list.

``stamp(sent)`` takes the producer's ``time.time()`` taken right before the enqueue and pushes
``"sent started"`` to ``BENCH_LATENCY_KEY`` on ``BENCH_REDIS_URL``. Kept apart from the apps
(bench/latency_jobs.py) and light to import: RQ's forking worker imports a job's module in each
work horse unless the worker preloaded it, and a bare ``rq worker`` does not.
"""

from __future__ import annotations

import os
import time
from typing import Any

__all__ = ("KEY_ENV", "QUEUE", "TASK", "URL_ENV", "stamp")

QUEUE = "latency"
TASK = "latency.stamp"
KEY_ENV = "BENCH_LATENCY_KEY"
URL_ENV = "BENCH_REDIS_URL"

_client: Any = None


def stamp(sent: float) -> None:
    started = time.time()  # first thing: the start as the job sees it
    global _client
    if _client is None:
        import redis

        _client = redis.Redis.from_url(os.environ[URL_ENV])
    _client.rpush(os.environ[KEY_ENV], f"{sent!r} {started!r}")
