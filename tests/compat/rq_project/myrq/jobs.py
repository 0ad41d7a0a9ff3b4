"""myrq's jobs, written the way RQ users write them: plain functions, RQ's own API.

Every job records what it did in Redis itself (keys ``myrq:...``), through the connection RQ
gives it (``get_current_job().connection``), so a test sees what ran, in which order, how often
and when, whichever worker ran it.
"""

from __future__ import annotations

import time
from typing import Any

from rq import get_current_job

from myrq.rq_app import app
from workerkit import current_job

__all__ = (
    "Reports",
    "add",
    "boom",
    "flaky",
    "import_rows",
    "in_order",
    "on_failed",
    "on_succeeded",
    "slow",
    "stamp",
    "track_progress",
)


def _redis() -> Any:
    job = get_current_job()
    assert job is not None
    return job.connection


def add(a: int, b: int) -> int:
    return a + b


def slow(seconds: float) -> str:
    """Runs for ``seconds``; enqueued with a shorter ``job_timeout``, RQ must kill it."""
    _redis().set("myrq:slow:began", time.time())
    time.sleep(seconds)
    _redis().set("myrq:slow:ended", time.time())
    return "slept"


def flaky(name: str) -> str:
    """Fails on its first try and succeeds on the second (enqueued with ``Retry(max=2)``)."""
    tries = int(_redis().incr(f"myrq:tries:{name}"))
    if tries < 2:
        raise RuntimeError(f"{name}: try {tries} fails")
    return f"{name} ok on try {tries}"


def in_order(key: str, name: str, seconds: float = 0.0) -> str:
    """Appends ``name`` to the list ``myrq:order:KEY`` when it runs (dependencies, priorities)."""
    time.sleep(seconds)
    _redis().rpush(f"myrq:order:{key}", name)
    return name


def stamp(name: str) -> float:
    """Records when it ran (``enqueue_in``)."""
    now = time.time()
    _redis().set(f"myrq:ran_at:{name}", now)
    return now


def track_progress(total: int) -> dict[str, Any]:
    """Reads the meta its producer set and updates it, as RQ apps report progress."""
    job = get_current_job()
    assert job is not None
    seen = dict(job.meta)
    job.meta["done"] = total
    job.meta["status_line"] = f"{total} of {total} for {seen.get('requested_by')}"
    job.save_meta()
    return seen


def boom(message: str) -> None:
    raise ValueError(message)


def on_succeeded(job: Any, connection: Any, result: Any, *args: Any, **kwargs: Any) -> None:
    """RQ's ``on_success`` callback."""
    connection.hset("myrq:callbacks", job.id, f"success {result!r}")


def on_failed(
    job: Any, connection: Any, exc_type: Any, exc_value: Any, tb: Any, *args: Any, **kwargs: Any
) -> None:
    """RQ's ``on_failure`` callback."""
    connection.hset("myrq:callbacks", job.id, f"failure {exc_type.__name__}: {exc_value}")


class Reports:
    """Jobs as static methods of a class, as many RQ apps group them."""

    @staticmethod
    def build(n: int) -> str:
        return f"report {n} built"


@app.task(timeout=60, checkpointed=True)
def import_rows(name: str, rows: int) -> int:
    """A long job made resumable (step 5 of the migration): each row is pushed exactly once.

    It appends each row to ``myrq:rows:NAME``, checkpoints after each, and on a stop request
    hands the job back with the next row to do (``current_job().release``).
    """
    redis = _redis()
    context = current_job()
    first = int(context.checkpoint or 0)
    redis.rpush(f"myrq:runs:{name}", f"attempt {context.attempt} from {first}")
    for row in range(first, rows):
        if context.stop_requested:
            redis.rpush(f"myrq:runs:{name}", f"released at {row}")
            context.release(row)
        context.wait_for_stop(0.1)
        redis.rpush(f"myrq:rows:{name}", row)
        context.save_checkpoint(row + 1)
    redis.rpush(f"myrq:runs:{name}", "done")
    return rows
