"""A scheduler binding on the in-memory store, for the scheduler process's end-to-end tests.

``python -m tests.apps.sched_memory`` is what ``python -m workerkit.engines.<e>.scheduling`` is
for an engine: ``run_scheduler_process`` on a binding; one schedule, every 0.5 s.
``E2E_SCHED_BAD=1`` makes the binding refuse the app, as an engine's ``open_scheduler`` does;
while the file ``E2E_SCHED_OUTAGE`` names exists, the store is unreachable (an outage).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import TYPE_CHECKING

from workerkit.errors import ConfigurationError
from workerkit.scheduler.contract import Schedule, SchedulerBinding
from workerkit.scheduler.memory import InMemorySchedulerStore
from workerkit.scheduler.process import run_scheduler_process
from workerkit.scheduler.triggers import Every

if TYPE_CHECKING:
    from workerkit.settings import Settings

__all__ = ("open_binding",)


def open_binding(settings: Settings) -> SchedulerBinding:
    if os.environ.get("E2E_SCHED_BAD"):
        raise ConfigurationError("schedule 'tick': misfire='sometimes' is not a misfire policy")
    store = InMemorySchedulerStore()
    outage = os.environ.get("E2E_SCHED_OUTAGE")
    if outage:
        threading.Thread(target=_follow, args=(store, outage), daemon=True).start()
    return SchedulerBinding(store, (Schedule("tick", "tasks.tick", Every(0.5)),))


def _follow(store: InMemorySchedulerStore, path: str) -> None:
    while True:
        store.unavailable = os.path.exists(path)
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(run_scheduler_process(open_binding))
