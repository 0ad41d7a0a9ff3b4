"""RQ tasks for the end-to-end tests. Every task records what happened to it, as it saw it.

The journal (``$E2E_JOURNAL``) gets one line per step (``start TAG ATTEMPT [from N]``,
``stop TAG at N``, ``done TAG``...), and ``begin TAG PID TIME`` / ``end TAG PID TIME`` around
every run, so a test can check that no two runs of one job ever overlapped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator

from tests.apps.journal import record
from workerkit.engines.rq import RqApp
from workerkit.job import current_job

app = RqApp(modules=["tests.apps.rq_jobs"])


@contextlib.contextmanager
def run_of(tag: str) -> Iterator[int]:
    """Journal one run: ``begin``/``end`` with pid and time around it, ``start``, and ``done``
    when it returns. Yields the step to resume from (the checkpoint)."""
    job = current_job()
    first = int(job.checkpoint or 0)
    record(f"begin {tag} {os.getpid()} {time.time():.3f}")
    record(f"start {tag} {job.attempt} from {first}")
    try:
        yield first
        record(f"done {tag}")
    finally:
        record(f"end {tag} {os.getpid()} {time.time():.3f}")


@app.task(timeout=60, checkpointed=True)
def cooperative(tag: str, steps: int, step_seconds: float = 0.1) -> str:
    """Checkpoints every step; on a stop request saves and releases itself."""
    job = current_job()
    with run_of(tag) as first:
        for step in range(first, steps):
            if job.stop_requested:
                record(f"stop {tag} at {step}")
                job.release(step)
            job.wait_for_stop(step_seconds)
            job.save_checkpoint(step + 1)
    return f"{tag} ok"


@app.task(timeout=60, checkpointed=True)
def stubborn(tag: str, steps: int) -> str:
    """Checkpoints every 0.1 s step but ignores stop requests: only an interrupt ends it early."""
    job = current_job()
    with run_of(tag) as first:
        for step in range(first, steps):
            time.sleep(0.1)
            job.save_checkpoint(step + 1)
    return f"{tag} ok"


@app.task(timeout=30)
def tick(tag: str) -> str:
    """A quick job that only records that it ran."""
    record(f"ran {tag} {current_job().attempt}")
    return tag


@app.task(timeout=120)
def sleepy(tag: str, seconds: float) -> str:
    """Sleeps without touching Redis: it runs on through a Redis outage if its worker does."""
    with run_of(tag):
        time.sleep(seconds)
    return f"{tag} ok"


def noop() -> None:
    """For throughput: does nothing."""


@app.task(timeout=60)
def spawner(tag: str) -> str:
    """Starts ``sleep 1000`` in a session of its own (out of reach of any process-group kill),
    records its pid, then ignores stop requests: only a release or a kill ends the attempt."""
    child = subprocess.Popen(["sleep", "1000"], start_new_session=True)
    record(f"child {tag} {child.pid}")
    with run_of(tag):
        while True:
            time.sleep(0.02)


@app.task(timeout=60)
def deaf(tag: str, seconds: float) -> str:
    """Ignores stop requests and swallows every exception (JobInterrupted too): only a kill
    ends it early. Records ``tick TAG PID TIME`` every 0.1 s, its last signs of life."""
    return _ticks_deaf(tag, seconds)


@app.task(timeout=60)
def numb(tag: str, seconds: float) -> str:
    """:func:`deaf`, with every signal a handler could act on blocked (as a job held in C code
    from before its lease ran short): neither its watchdog starts nor anything is raised into
    it; only a SIGKILL ends it early."""
    signal.pthread_sigmask(
        signal.SIG_BLOCK, {signal.SIGURG, signal.SIGTERM, signal.SIGALRM, signal.SIGINT}
    )
    return _ticks_deaf(tag, seconds)


def _ticks_deaf(tag: str, seconds: float) -> str:
    with run_of(tag):
        ends = time.monotonic() + seconds
        while time.monotonic() < ends:
            try:
                record(f"tick {tag} {os.getpid()} {time.time():.3f}")
                time.sleep(0.1)
            except BaseException:  # noqa: S112 - deaf on purpose
                continue
    return f"{tag} ok"
