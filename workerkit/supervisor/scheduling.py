"""``workerkit scheduler ENGINE``: the supervisor as PID 1, running the engine's scheduler process.

The same supervisor as ``workerkit run`` (signals, probes, metrics, reaping, exit codes), given
an :class:`~workerkit.engines.base.Engine` whose worker is the scheduler. A scheduler holds no
job, so its stop is short: SIGTERM is passed on, the scheduler hands its lease over and exits 0,
and so does the supervisor; nothing is ever released on its behalf. Readiness is the store's
health as the scheduler reports it; the scheduler's metric families are on ``/metrics``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from workerkit.engines.base import AppTiming
from workerkit.supervisor.runner import run_supervisor

if TYPE_CHECKING:
    from workerkit.engines.base import Engine
    from workerkit.settings import Settings

__all__ = ("SchedulerEngine", "run_scheduler_supervisor")


class SchedulerEngine:
    """An engine as the scheduler's supervisor sees it: its worker is the scheduler process."""

    #: The supervisor adds the scheduler's metric families.
    runs_scheduler = True
    #: A crashed scheduler is not restarted in the pod: the pod restarts (a standby fires
    #: meanwhile), and the exit code says it crashed.
    restarts_worker = False

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.name = engine.name

    def worker_command(self, settings: Settings) -> list[str]:
        return self.engine.scheduler_command(settings)

    def scheduler_command(self, settings: Settings) -> list[str]:
        return self.engine.scheduler_command(settings)

    def app_timing(self, settings: Settings) -> AppTiming:
        """No tasks run here: the budget's scheduler rules read the settings only."""
        return AppTiming()

    def release_in_flight(
        self, settings: Settings, refs: Sequence[Mapping[str, Any]], *, crashed: bool = False
    ) -> int:
        """Nothing is ever in flight in a scheduler process."""
        return 0


def run_scheduler_supervisor(settings: Settings, engine: Engine) -> int:
    """Run the scheduler of ``engine`` under the supervisor until it stops; the exit code."""
    return run_supervisor(settings, SchedulerEngine(engine))
