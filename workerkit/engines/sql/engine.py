"""The sql engine as the supervisor sees it: worker command, app timing, release after a kill.

Imports nothing of SQLAlchemy or Alembic at module level: the supervisor holds this object for
its whole life, and needs the queue only to release after a kill (:meth:`release_in_flight`).
:meth:`SqlEngine.app_timing` runs in ``workerkit check`` and in the app check process
(:mod:`workerkit.engines.appcheck`), never in the supervisor.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from workerkit.engines.base import AppTiming
from workerkit.errors import ConfigurationError, StoreUnavailable

if TYPE_CHECKING:
    from workerkit.settings import Settings

__all__ = ("SqlEngine",)

log = logging.getLogger(__name__)


class SqlEngine:
    """The sql engine as the supervisor sees it (:class:`~workerkit.engines.base.Engine`)."""

    name = "sql"
    #: Jobs run in threads of the worker process, so a job's out-of-memory kill kills it: the
    #: supervisor starts a new one rather than exit (supervisor/restarts.py).
    restarts_worker = True
    #: The worker waits at its start gate (engines/startgate.py): ``workerkit run`` spawns it
    #: before its own checks are done (supervisor/early.py).
    start_gate = True

    def __init__(self, worker_args: Sequence[str] = ()) -> None:
        if worker_args:
            raise ConfigurationError(
                f"the sql engine takes no extra worker arguments, got {list(worker_args)!r}; "
                "its options are settings (workerkit run sql --help)"
            )

    def scheduler_command(self, settings: Settings) -> list[str]:
        """The scheduler process (``workerkit scheduler sql``), in a fresh interpreter."""
        return [sys.executable, "-m", "workerkit.engines.sql.scheduling"]

    def worker_command(self, settings: Settings) -> list[str]:
        """The native worker loop, in a fresh interpreter (settings come by environment)."""
        return [sys.executable, "-m", "workerkit.engines.sql"]

    def app_timing(self, settings: Settings) -> AppTiming:
        """The tasks of the workerkit :class:`~workerkit.app.App` named by ``settings.app``.

        Also where a missing app and a ``database_url`` the SQL store cannot use are refused,
        before the supervisor starts anything (the worker would fail on them after start).
        """
        if not settings.app:
            raise ConfigurationError(
                "the sql engine needs an app: set --app / WORKERKIT_APP to MODULE:ATTRIBUTE of "
                "a workerkit.App (e.g. 'myproject.tasks:app')"
            )
        from workerkit.app import App
        from workerkit.engines.sql.db import normalize_url

        normalize_url(settings.database_url)
        from workerkit.loading import import_app

        app = import_app(settings.app)
        if not isinstance(app, App):
            raise ConfigurationError(
                f"--app {settings.app!r} is a {type(app).__name__}, not a workerkit.App; the sql "
                "engine runs workerkit apps (use --engine celery or rq for theirs)"
            )
        return AppTiming(tasks=tuple(app.task_timings()))

    def prepare_release(self, settings: Settings) -> None:
        """Import the queue (SQLAlchemy) ahead of a release: the supervisor calls this when a
        drain begins."""
        import workerkit.engines.attempt
        import workerkit.engines.sql.queue  # noqa: F401

    def release_in_flight(
        self, settings: Settings, refs: Sequence[Mapping[str, Any]], *, crashed: bool = False
    ) -> int:
        """Release deliveries whose worker died or was killed; return how many were released.

        When the database cannot be reached the rest are left alone (their leases expire
        within V and the claim query takes them back) rather than spending the shutdown
        deadline on connection timeouts.
        """
        if not refs:
            return 0
        from workerkit.engines import attempt  # imported ahead by prepare_release, as the queue
        from workerkit.engines.sql.queue import SqlQueue  # SQLAlchemy: only now, after a kill

        queue = SqlQueue(settings.database_url, settings=settings)
        try:
            return attempt.release_each(
                refs,
                lambda ref: queue.release_ref(ref, crashed=crashed),
                log=log,
                give_up_on=(StoreUnavailable,),
                skip_on=(ValueError,),  # a bad ref
            ).released
        finally:
            queue.close()
