"""Running ``workerkit run celery`` for real: the Celery app of tests/apps/celery_jobs.py on a
private Redis, and helpers to read its journal.
"""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path
from typing import Any

from tests.apps.celery_jobs import app
from tests.support.harness import WORKERKIT, Env, Supervisor, start_worker, stopped_after


def run_intervals(lines: list[str], label: str) -> list[tuple[float, float]]:
    """(start, end) of every execution of ``label``; an unfinished one ends at +inf."""
    intervals: list[tuple[float, float]] = []
    open_at: dict[str, float] = {}
    for line in lines:
        parts = line.split()
        if len(parts) < 2 or parts[1] != label:
            continue
        pid = next(p for p in parts if p.startswith("pid="))
        t = float(next(p for p in parts if p.startswith("t="))[2:])
        if parts[0] == "start":
            open_at[pid] = t
        elif parts[0] == "end" and pid in open_at:
            intervals.append((open_at.pop(pid), t))
    intervals += [(t, float("inf")) for t in open_at.values()]
    return sorted(intervals)


def overlapping(intervals: list[tuple[float, float]]) -> bool:
    return any(b[0] < a[1] for a, b in itertools.pairwise(intervals))


def start_celery(
    env: Env,
    redis_url: str,
    *,
    name: str = "supervisor",
    worker_args: tuple[str, ...] = (),
    **settings: str,
) -> Supervisor:
    return start_worker(
        [*WORKERKIT, "run", "celery", "--", *worker_args],
        env,
        app="tests.apps.celery_jobs:app",
        name=name,
        engine={
            "E2E_REDIS_URL": redis_url,
            "redis_url": redis_url,
            "queues": "celery",
            "log_level": "info",
        },
        settings=settings,
        new_session=True,
    )


def celery_supervisor(
    env: Env, redis_url: str, **kwargs: Any
) -> contextlib.AbstractContextManager[Supervisor]:
    return stopped_after(start_celery(env, redis_url, **kwargs))


def send(
    redis_url: str, task: str, *args: Any, task_id: str, countdown: float | None = None
) -> None:
    app.conf.broker_url = redis_url
    app.send_task(task, args=list(args), task_id=task_id, queue="celery", countdown=countdown)


def queue_ids(redis_client: Any, queue: str = "celery") -> list[str]:
    import json

    return [json.loads(raw)["headers"]["id"] for raw in redis_client.lrange(queue, 0, -1)]


def journal_path(tmp: Path) -> Path:
    return tmp / "journal.txt"
