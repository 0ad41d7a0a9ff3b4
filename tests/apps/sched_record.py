"""What every periodic run of the scheduler tests writes: one JSON line, appended to the file
named by ``$E2E_SCHED_RECORDS``, with its engine, schedule, fire time, start time and pid.

A file (not the store under test) so that a run's record survives a store outage; O_APPEND
writes of one short line are atomic, so concurrent workers do not interleave.
``$E2E_SCHEDULES`` says which schedules the recording apps declare: ``tick`` (one schedule,
every second) or ``misfire`` (``skip``, ``latest`` and ``all``, every second).
"""

from __future__ import annotations

import json
import os
import time

__all__ = ("MAX_CATCH_UP", "MISFIRE_SCHEDULES", "PERIOD", "declared", "record_run")

#: Every schedule of the recording apps fires each second, on the whole second.
PERIOD = 1.0
#: The misfire set: one schedule per policy. ``all`` catches up at most ``MAX_CATCH_UP``, more
#: than a 10 s outage misses, so it fires every missed time.
MISFIRE_SCHEDULES = ("skip", "latest", "all")
MAX_CATCH_UP = 100


def declared() -> str:
    """Which schedule set the app declares (``tick`` unless ``$E2E_SCHEDULES`` says)."""
    return os.environ.get("E2E_SCHEDULES", "tick")


def record_run(engine: str, schedule: str | None, fire_time: float | None) -> None:
    start = time.time()
    line = json.dumps(
        {
            "engine": engine,
            "schedule": schedule,
            "fire_time": fire_time,
            "start": round(start, 4),
            "pid": os.getpid(),
        }
    )
    fd = os.open(os.environ["E2E_SCHED_RECORDS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)
