"""A process that fires one schedule through the SQL scheduler store, for the kill tests.

``python -m tests.support.sql_sched_proc URL FIRE_TIME MARKER [--block]``

Fires :func:`tick_schedule` at ``FIRE_TIME`` (epoch None, as a standby) and writes the outcome
to ``MARKER``. With ``--block`` on SQLite, the function ``wk_block()`` is registered on every
connection: a trigger the test put on ``workerkit_jobs`` calls it inside the fire's transaction,
after the fire record was inserted and before the job is; it writes ``MARKER`` with
``blocked`` and sleeps until the test SIGKILLs the process. (On PostgreSQL the test blocks the
job's INSERT with a table lock instead; no flag is needed.)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from sqlalchemy import event

from workerkit.engines.sql.scheduling import SqlSchedulerStore
from workerkit.scheduler.contract import Schedule
from workerkit.scheduler.triggers import Every
from workerkit.settings import Settings

__all__ = ("PATIENT", "TICK", "tick_schedule")

TICK = "tick"
#: Scheduler timing whose lock wait (15 s) outlasts the tests that block a fire on a lock on
#: purpose; the default timing gives up after 1 s (StoreUnavailable).
PATIENT = Settings(
    scheduler_lease_duration=180, scheduler_renew_deadline=120, scheduler_retry_period=30
)


def tick_schedule(*, args: tuple[Any, ...] = (1,)) -> Schedule:
    """The schedule every kill test fires: every second, task ``tests.tick`` on queue ``q``."""
    return Schedule(
        name=TICK,
        task="tests.tick",
        trigger=Every(1.0),
        args=args,
        queue="q",
        options={"max_attempts": 3},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("fire_time", type=float)
    parser.add_argument("marker", type=Path)
    parser.add_argument("--block", action="store_true")
    options = parser.parse_args(argv)
    store = SqlSchedulerStore(options.url, settings=PATIENT)
    if options.block:

        def block() -> int:
            options.marker.write_text("blocked")
            time.sleep(3600)
            return 0

        @event.listens_for(store.engine, "connect")
        def _on_connect(dbapi_connection: Any, record: Any) -> None:
            dbapi_connection.create_function("wk_block", 0, block)

    outcome = store.fire(tick_schedule(), options.fire_time, epoch=None, reason="standby")
    options.marker.write_text(str(outcome))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
