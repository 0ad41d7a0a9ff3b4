"""The example's RQ jobs: plain functions, enqueued with plain RQ (see enqueue.py).

``app`` is the worker's allowlist and the timing facts ``workerkit check`` reads::

    WORKERKIT_REDIS_URL=redis://localhost:6379/0 workerkit run rq --app examples.rq_app.jobs:app
"""

from __future__ import annotations

import time

import workerkit
from workerkit.engines.rq import RqApp

app = RqApp(modules=["examples.rq_app.jobs"])


@app.task(timeout=10)
def send_welcome(user_id: int) -> str:
    """A short job: finishes well within any drain window."""
    time.sleep(0.2)
    return f"welcome sent to {user_id}"


@app.task(timeout=3600, checkpointed=True)
def backfill(total: int) -> int:
    """A long job that checkpoints, so a deploy costs it seconds of work, not the whole run.

    When the pod is told to stop, ``stop_requested`` turns true at the drain deadline: the job
    saves where it is and releases itself; the next worker resumes from the checkpoint.
    """
    job = workerkit.current_job()
    done = int(job.checkpoint or 0)
    while done < total:
        if job.stop_requested:
            job.release(done)
        time.sleep(0.05)  # one unit of work
        done += 1
        job.save_checkpoint(done)  # throttled: written at most every checkpoint_interval
    return done
