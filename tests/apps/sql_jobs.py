"""Tasks for the end-to-end tests. Every task records what happened to it, as it saw it.

The journal (``$E2E_JOURNAL``) gets one line per step, ``start TAG ATTEMPT [from N]``,
``stop TAG at N``, ``interrupted TAG``, ``done TAG``..., so a test asserts on what happened to
every job rather than on exit codes alone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

from tests.apps.journal import record
from workerkit.app import App
from workerkit.job import current_job

app = App()


@app.task(name="sleep", timeout=60)
def sleep(tag: str, seconds: float) -> None:
    """A job that just takes time (in one blocking call, as many real jobs do)."""
    record(f"start {tag} {current_job().attempt}")
    time.sleep(seconds)
    record(f"done {tag}")


@app.task(name="cooperative", timeout=60, checkpointed=True)
def cooperative(tag: str, steps: int) -> None:
    """Steps of 0.1 s; checkpoints as it goes; on a stop request saves and releases itself."""
    job = current_job()
    first = int(job.checkpoint or 0)
    record(f"start {tag} {job.attempt} from {first}")
    for step in range(first, steps):
        if job.stop_requested:
            record(f"stop {tag} at {step}")
            job.release(step)
        job.wait_for_stop(0.1)
        job.save_checkpoint(step + 1)
    record(f"done {tag}")


@app.task(name="stubborn", timeout=60)
def stubborn(tag: str, seconds: float) -> None:
    """Ignores stop requests; only an interrupt ends it early."""
    record(f"start {tag} {current_job().attempt}")
    started = time.monotonic()
    try:
        while time.monotonic() - started < seconds:
            time.sleep(0.02)
    except BaseException as exc:
        record(f"interrupted {tag} {type(exc).__name__}")
        raise
    record(f"done {tag}")


@app.task(name="orphan", timeout=60)
def orphan(tag: str) -> None:
    """Leaves an orphan behind: a grandchild that outlives its parent, then exits.

    Re-parented to PID 1, it stays a zombie forever unless PID 1 reaps it.
    """
    record(f"start {tag} {current_job().attempt}")
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        if os.fork() == 0:
            time.sleep(0.3)
            record(f"orphan {tag} exiting")
            os._exit(0)
        os._exit(0)
    os.waitpid(child, 0)
    record(f"done {tag}")


@app.task(name="tick", timeout=30)
def tick(tag: str) -> None:
    """A quick job that only records that it ran (for counting runs under load)."""
    record(f"ran {tag} {current_job().attempt}")


@app.task(name="spawner", timeout=60)
def spawner(tag: str) -> None:
    """Starts ``sleep 1000`` in a session of its own (out of reach of any process-group kill),
    records its pid, then ignores stop requests: only a release or a kill ends the attempt."""
    child = subprocess.Popen(["sleep", "1000"], start_new_session=True)
    record(f"child {tag} {child.pid}")
    record(f"start {tag} {current_job().attempt}")
    while True:
        time.sleep(0.02)


@app.task(name="spawner_checks", timeout=60)
def spawner_checks(tag: str) -> None:
    """Like ``spawner``, but its ``sleep`` ignores SIGTERM (only a SIGKILL ends it), and each
    attempt first records ``overlap TAG PID`` for an earlier attempt's subprocess still running."""
    try:
        with open(os.environ["E2E_JOURNAL"]) as lines:
            earlier = [line.split()[2] for line in lines if line.startswith(f"child {tag} ")]
    except FileNotFoundError:
        earlier = []
    for pid in earlier:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                state = stat.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            record(f"overlap {tag} {pid}")
    child = subprocess.Popen(["sh", "-c", "trap '' TERM; exec sleep 1000"], start_new_session=True)
    record(f"child {tag} {child.pid}")
    record(f"start {tag} {current_job().attempt}")
    while True:
        time.sleep(0.02)


@app.task(name="kills_its_worker", timeout=30)
def kills_its_worker(tag: str) -> None:
    """SIGKILLs the process it runs in, every time (an out-of-memory kill of the worker)."""
    record(f"start {tag} {current_job().attempt}")
    os.kill(os.getpid(), signal.SIGKILL)


@app.task(name="killed_once", timeout=30)
def killed_once(tag: str) -> None:
    """SIGKILLs its worker on its first attempt (an out-of-memory kill), then runs to the end."""
    record(f"start {tag} {current_job().attempt}")
    if current_job().attempt == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.2)
    record(f"done {tag}")
