"""Celery tasks for the end-to-end tests: each writes every execution to the journal.

The worker imports this app (``--app tests.apps.celery_jobs:app``); the journal is the file
named by ``E2E_JOURNAL`` (one line per event, with the pid and a timestamp), so tests can assert
what happened to each task, including that two executions never overlapped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

from celery import Celery, signals

import workerkit

__all__ = ("app", "noop", "poison", "spawner", "steps", "stubborn", "ticker", "wrapup")

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


def _tick(label: str, seconds: float) -> None:
    """Ignores stop requests and swallows every exception: only a kill can end it early.

    Writes a ``tick`` line every 0.1 s, so a test sees when a run really stopped.
    """
    job = workerkit.current_job()
    _journal("start", label, f"attempt={job.attempt}")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            time.sleep(0.1)
            _journal("tick", label)
        except BaseException as exc:  # a task that ignores everything
            _journal("swallowed", label, type(exc).__name__)
    _journal("end", label, "done")
    _journal("done", label)


@app.task(name="ticker")
def ticker(label: str, seconds: float) -> None:
    _tick(label, seconds)


@app.task(name="wrapup")
def wrapup(label: str, seconds: float) -> str:
    """Works until asked to stop (or ``seconds``), then finishes and returns: a success."""
    job = workerkit.current_job()
    _journal("start", label)
    end = time.monotonic() + seconds
    while time.monotonic() < end and not job.stop_requested:
        time.sleep(0.05)
    _journal("done", label, f"stopped={job.stop_requested}")
    return label


@signals.worker_init.connect
def _register_late_task(**_: object) -> None:
    """A task registered once the worker starts, after the app is finalized (as a module
    imported by a signal handler or a bootstep would register it)."""
    app.task(name="late_ticker")(_late_ticker)


def _late_ticker(label: str, seconds: float) -> None:
    _tick(label, seconds)


@app.task(name="poison", workerkit_max_attempts=3)
def poison(label: str) -> None:
    """Kills the process that runs it, every time (an out-of-memory kill, a segfault)."""
    _journal("start", label)
    os.kill(os.getpid(), signal.SIGKILL)


@app.task(name="spawner")
def spawner(label: str) -> None:
    """Starts ``sleep 1000`` in a session of its own (out of reach of any process-group kill),
    journals its pid, then ignores stop requests: only the release deadline ends it."""
    child = subprocess.Popen(["sleep", "1000"], start_new_session=True)
    _journal("child", label, child.pid)
    _journal("start", label)
    while True:
        time.sleep(0.02)
