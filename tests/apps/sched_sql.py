"""The SQL engine's recording app for the scheduler tests: ``workerkit scheduler sql`` fires
its schedules, ``workerkit run sql`` runs them, and every run records itself
(tests/apps/sched_record.py) with the fire time ``current_job()`` carries.
"""

from __future__ import annotations

from tests.apps.sched_record import MAX_CATCH_UP, MISFIRE_SCHEDULES, PERIOD, declared, record_run
from workerkit.app import App
from workerkit.job import current_job

__all__ = ("app", "periodic_run")

app = App()


@app.task(name="sched.periodic_run", timeout=30)
def periodic_run() -> None:
    job = current_job()
    record_run("sql", job.schedule, job.fire_time)


if declared() == "misfire":
    for policy in MISFIRE_SCHEDULES:
        app.periodic(policy, every=PERIOD, misfire=policy, max_catch_up=MAX_CATCH_UP)(periodic_run)
else:
    app.periodic("tick", every=PERIOD)(periodic_run)
