"""Running ``workerkit run celery`` for real: a Celery app on a private Redis, and a journal.

The app below is what the worker imports (``--app tests.e2e.celery_harness:app``); its tasks
write every execution to the journal file named by ``E2E_JOURNAL`` (one line per event, with
the pid and a timestamp), so tests can assert what happened to each task, including that two
executions never overlapped.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from celery import Celery

import workerkit
from tests.e2e.harness import REPO, WORKERKIT, Env, Supervisor, spawn_logged
from tests.servers import free_port

app = Celery("e2e", broker=os.environ.get("E2E_REDIS_URL", "redis://127.0.0.1:6379/1"))
app.conf.update(broker_connection_retry_on_startup=True, task_default_queue="celery")


def _journal(*fields: object) -> None:
    path = os.environ.get("E2E_JOURNAL")
    if not path:
        return
    line = " ".join(str(f) for f in fields)
    with open(path, "a") as journal:
        journal.write(f"{line} pid={os.getpid()} t={time.time():.3f}\n")


@app.task(name="noop")
def noop(label: str) -> str:
    _journal("noop", label)
    return label


@app.task(name="steps", workerkit_checkpointed=True)
def steps(label: str, total: int, step_seconds: float = 1.0) -> int:
    """``total`` steps of ``step_seconds``; checkpoints after each; releases itself when asked."""
    job = workerkit.current_job()
    done = int(job.checkpoint or 0)
    _journal("start", label, f"from={done}", f"attempt={job.attempt}")
    try:
        while done < total:
            if job.stop_requested:
                _journal("release", label, f"at={done}")
                job.release(done)
            job.wait_for_stop(step_seconds)
            if job.stop_requested:
                continue
            done += 1
            job.save_checkpoint(done, force=True)
    except BaseException as exc:
        _journal("end", label, type(exc).__name__)
        raise
    _journal("end", label, "done")
    _journal("done", label)
    return done


@app.task(name="stubborn")
def stubborn(label: str, seconds: float) -> None:
    """Ignores stop requests: only the release deadline can end it."""
    _journal("start", label)
    time.sleep(seconds)
    _journal("end", label, "done")
    _journal("done", label)


@app.task(name="poison", workerkit_max_attempts=3)
def poison(label: str) -> None:
    """Kills the process that runs it, every time (an out-of-memory kill, a segfault)."""
    _journal("start", label)
    os.kill(os.getpid(), signal.SIGKILL)


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
    port = free_port()
    variables = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "E2E_JOURNAL": str(env.journal),
        "E2E_REDIS_URL": redis_url,
        "WORKERKIT_APP": "tests.e2e.celery_harness:app",
        "WORKERKIT_REDIS_URL": redis_url,
        "WORKERKIT_QUEUES": "celery",
        "WORKERKIT_GRACE_PERIOD": "6",
        "WORKERKIT_RELEASE_MARGIN": "2",
        "WORKERKIT_CHECKPOINT_INTERVAL": "1",
        "WORKERKIT_HTTP_HOST": "127.0.0.1",
        "WORKERKIT_HTTP_PORT": str(port),
        "WORKERKIT_LOG_FORMAT": "json",
        "WORKERKIT_LOG_LEVEL": "info",
        **env.extra,
        **{
            (k if k.startswith(("WORKERKIT_", "E2E_")) else f"WORKERKIT_{k.upper()}"): v
            for k, v in settings.items()
        },
    }
    argv = [*WORKERKIT, "run", "celery", "--", *worker_args]
    return spawn_logged(argv, env.tmp, name, port, variables, new_session=True)


@contextlib.contextmanager
def celery_supervisor(env: Env, redis_url: str, **kwargs: Any) -> Iterator[Supervisor]:
    running = start_celery(env, redis_url, **kwargs)
    try:
        yield running
    finally:
        running.stop()


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
