"""The one piece of work every benchmark job does, whatever the engine: one Redis INCR.

The first and the last job (by the counter's value) also write a timestamp, so the throughput
window is measured the same way for workerkit, Celery and RQ: from the first job's INCR to the
last job's INCR, inside the worker, with no polling latency of the benchmark process in it.
Those two extra SETs happen in two jobs out of K.
"""

from __future__ import annotations

import os
import time

import redis

COUNTER = "bench:done"
FIRST = "bench:first"
LAST = "bench:last"
URL_ENV = "BENCH_REDIS_URL"

_client: redis.Redis | None = None
_pid = 0


def _redis() -> redis.Redis:
    # One connection per process (a forked pool child opens its own).
    global _client, _pid
    if _client is None or _pid != os.getpid():
        _client = redis.Redis.from_url(os.environ[URL_ENV])
        _pid = os.getpid()
    return _client


def hit(total: int) -> None:
    """Count this job; stamp the time when it is the first or the ``total``-th."""
    client = _redis()
    done = int(client.incr(COUNTER))
    if done == 1:
        client.set(FIRST, repr(time.time()))
    if done == total:
        client.set(LAST, repr(time.time()))
