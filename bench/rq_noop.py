"""The bare RQ job of the benchmarks: a no-op (a Redis INCR, see bench/_counter.py).

``app`` is the ``RqApp`` that allows it under ``workerkit run rq --app bench.rq_noop:app``,
built on first access, so that a bare ``rq worker`` importing :func:`noop` loads no workerkit.
"""

from __future__ import annotations

from typing import Any

from bench._counter import hit

QUEUE = "bench"


def noop(total: int) -> None:
    hit(total)


def __getattr__(name: str) -> Any:
    if name == "app":
        from workerkit.engines.rq import RqApp

        value = RqApp(modules=["bench.rq_noop"])
        globals()["app"] = value
        return value
    raise AttributeError(name)
