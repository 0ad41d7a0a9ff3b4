"""A Celery app run under workerkit: ``workerkit run celery --app examples.celery_app.tasks:app``.

Nothing here is specific to workerkit except the job context in ``backfill``: workerkit sets
late acks, reject-on-worker-lost, prefetch 1, time limits and the visibility timeout itself.
"""

from __future__ import annotations

import os

from celery import Celery

import workerkit

app = Celery("example", broker=os.environ.get("WORKERKIT_REDIS_URL", "redis://127.0.0.1:6379/0"))
app.conf.task_default_queue = "default"


@app.task(name="example.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="example.backfill", workerkit_checkpointed=True)
def backfill(total: int) -> int:
    """Processes ``total`` items, checkpointing; a deploy releases it and the next pod resumes."""
    job = workerkit.current_job()
    done = int(job.checkpoint or 0)
    while done < total:
        if job.stop_requested:
            job.release(done)  # back to the queue now, attempt not consumed
        job.wait_for_stop(0.1)  # one item of work
        done += 1
        job.save_checkpoint(done)  # throttled by checkpoint_interval; forced once a stop is asked
    return done
