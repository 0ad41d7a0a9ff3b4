"""``workerkit scheduler`` with the in-memory binding of tests/apps/sched_memory.py as its child.

The same supervisor as ``workerkit scheduler ENGINE`` (run_scheduler_supervisor); only the
engine's ``scheduler_command`` points at the test binding instead of an engine's store.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from workerkit.engines.base import AppTiming
from workerkit.logs import configure_logging
from workerkit.settings import Settings, load_settings
from workerkit.supervisor.scheduling import run_scheduler_supervisor

__all__ = ("MemoryEngine",)


class MemoryEngine:
    name = "sql"

    def scheduler_command(self, settings: Settings) -> list[str]:
        return [sys.executable, "-m", "tests.apps.sched_memory"]

    def worker_command(self, settings: Settings) -> list[str]:
        raise AssertionError("a scheduler's supervisor starts the scheduler, not a worker")

    def app_timing(self, settings: Settings) -> AppTiming:
        return AppTiming()

    def release_in_flight(
        self, settings: Settings, refs: Sequence[Mapping[str, Any]], *, crashed: bool = False
    ) -> int:
        return 0


if __name__ == "__main__":
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    sys.exit(run_scheduler_supervisor(settings, MemoryEngine()))
