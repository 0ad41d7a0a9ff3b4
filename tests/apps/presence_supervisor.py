"""``workerkit run``'s supervisor with tests/apps/presence_worker.py as its worker process.

The same supervisor (run_supervisor); only the engine's ``worker_command`` points at the test
worker, which publishes its presence to files instead of an engine's store.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from workerkit.engines.base import AppTiming
from workerkit.logs import configure_logging
from workerkit.settings import Settings, load_settings
from workerkit.supervisor.runner import run_supervisor

__all__ = ("PresenceEngine",)


class PresenceEngine:
    name = "sql"

    def worker_command(self, settings: Settings) -> list[str]:
        return [sys.executable, "-m", "tests.apps.presence_worker"]

    def app_timing(self, settings: Settings) -> AppTiming:
        return AppTiming()

    def release_in_flight(
        self, settings: Settings, refs: Sequence[Mapping[str, Any]], *, crashed: bool = False
    ) -> int:
        return len(refs)


if __name__ == "__main__":
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    sys.exit(run_supervisor(settings, PresenceEngine()))
