"""An RqApp with schedules, for the RQ scheduler's tests: each run journals its fire."""

from __future__ import annotations

from tests.apps.journal import record
from workerkit.engines.rq import RqApp
from workerkit.job import current_job

app = RqApp(modules=["tests.apps.rq_schedules"])


@app.periodic("tick", every=1, args=["tick"], misfire="skip")
@app.task(timeout=30)
def fired(tag: str) -> str:
    """Journals ``fired TAG SCHEDULE FIRE_TIME JOB_ID`` as ``current_job()`` sees them."""
    job = current_job()
    record(f"fired {tag} {job.schedule} {job.fire_time!r} {job.job_id}")
    return tag


def add(a: int, b: int) -> int:
    """A plain function: what a plain RQ worker runs (no workerkit context there)."""
    return a + b


app.schedule("nightly-add", add, cron="0 3 * * *", timezone="Europe/Berlin", args=[2, 3])
