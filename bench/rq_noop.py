"""The bare RQ job of the benchmarks: a no-op (a Redis INCR, see bench/_counter.py)."""

from __future__ import annotations

from bench._counter import hit

QUEUE = "bench"


def noop(total: int) -> None:
    hit(total)
