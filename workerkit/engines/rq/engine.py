"""The rq engine as the supervisor sees it: worker command, app timing, release after a kill.

Imports neither rq nor redis at module level: the supervisor holds this object for its whole
life and needs them only to release after a kill (:meth:`RqEngine.release_in_flight`).
:meth:`RqEngine.app_timing` runs in ``workerkit check`` and in the app check process
(:mod:`workerkit.engines.appcheck`), never in the supervisor.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from workerkit.engines.base import AppTiming
from workerkit.engines.rq.options import parse_worker_args, worker_argv

if TYPE_CHECKING:
    from workerkit.settings import Settings

__all__ = ("RqEngine",)

log = logging.getLogger("workerkit.engines.rq")


class RqEngine:
    """The rq engine as the supervisor sees it (:class:`~workerkit.engines.base.Engine`)."""

    name = "rq"
    #: The worker waits at its start gate (engines/startgate.py): ``workerkit run`` spawns it
    #: before its own checks are done (supervisor/early.py).
    start_gate = True

    def __init__(self, worker_args: Sequence[str] = ()) -> None:
        self.args = parse_worker_args(worker_args)

    def redis_url(self, settings: Settings) -> str:
        return str(self.args.url or settings.redis_url)

    def scheduler_command(self, settings: Settings) -> list[str]:
        """The scheduler process (``workerkit scheduler rq``), in a fresh interpreter."""
        return [sys.executable, "-m", "workerkit.engines.rq.scheduling"]

    def worker_command(self, settings: Settings) -> list[str]:
        """The RQ worker in a fresh interpreter (settings come by environment)."""
        return [sys.executable, "-m", "workerkit.engines.rq", *worker_argv(self.args)]

    def app_timing(self, settings: Settings) -> AppTiming:
        """The tasks of the :class:`RqApp` named by ``settings.app``.

        The rq worker refuses to run without an app (it is the task allowlist), so a missing
        one is a configuration error here already, before the worker starts.
        """
        from workerkit.engines.rq.tasks import load_app

        return AppTiming(tasks=tuple(load_app(settings).task_timings()))

    def prepare_release(self, settings: Settings) -> None:
        """Import rq and redis ahead of a release: the supervisor calls this when a drain
        begins."""
        import workerkit.engines.attempt
        import workerkit.engines.rq.jobs
        import workerkit.engines.rq.recovery  # noqa: F401

    def release_in_flight(
        self, settings: Settings, refs: Sequence[Mapping[str, Any]], *, crashed: bool = False
    ) -> int:
        """Release the attempts of a worker that died or was killed; return how many.

        See :meth:`Recovery.release_ref`. When Redis cannot be reached the rest are left
        alone: their leases expire and the recovery scans of live workers take them back.
        rq and redis are imported only now, after a kill.
        """
        if not refs:
            return 0
        import redis

        from workerkit.engines import attempt
        from workerkit.engines.rq.jobs import WorkerkitJob, resolve_rq_serializer
        from workerkit.engines.rq.leases import Leases
        from workerkit.engines.rq.recovery import BadRef, Recovery, lease_ttl
        from workerkit.engines.rq.tasks import load_app

        connection = redis.Redis.from_url(
            self.redis_url(settings), socket_timeout=2.0, socket_connect_timeout=2.0
        )
        leases = Leases(connection, lease_ttl(settings))
        app = load_app(settings) if self.args.serializer == "safe-pickle" else None
        serializer = resolve_rq_serializer(self.args.serializer, app)
        recovery = Recovery(connection, leases, WorkerkitJob, serializer)
        try:
            return attempt.release_each(
                refs,
                lambda ref: recovery.release_ref(ref, crashed=crashed),
                log=log,
                give_up_on=(redis.exceptions.RedisError,),
                skip_on=(BadRef,),
            ).released
        finally:
            connection.close()
