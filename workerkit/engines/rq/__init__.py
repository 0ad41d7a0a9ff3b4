"""The rq engine: graceful RQ workers that release, resume and recover in seconds.

``workerkit run rq --app myproject.rq_app:app --queues default`` runs an RQ worker (a subclass of
RQ's own, :class:`Worker` or :class:`SimpleWorker`) under the supervisor; the engine's own
arguments are in :mod:`workerkit.engines.rq.options`. This module is the facade: the engine as
the supervisor sees it, and every public name. How it works: docs/engines/rq.md.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from workerkit.engines.base import AppTiming
from workerkit.engines.rq.jobs import META_KEY, WorkerkitJob, resolve_rq_serializer
from workerkit.engines.rq.leases import AttemptKeys, Leases
from workerkit.engines.rq.options import parse_worker_args, worker_argv
from workerkit.engines.rq.recovery import Recovery, lease_ttl
from workerkit.engines.rq.tasks import (
    DEFAULT_MAX_ATTEMPTS,
    RqApp,
    RqTaskInfo,
    TaskNotAllowed,
    load_app,
)
from workerkit.engines.rq.worker import SimpleWorker, Worker, main

if TYPE_CHECKING:
    from workerkit.settings import Settings

__all__ = (
    "DEFAULT_MAX_ATTEMPTS",
    "META_KEY",
    "RqApp",
    "RqEngine",
    "RqTaskInfo",
    "SimpleWorker",
    "TaskNotAllowed",
    "Worker",
    "WorkerkitJob",
    "main",
)

log = logging.getLogger("workerkit.engines.rq")


class RqEngine:
    """The rq engine as the supervisor sees it (:class:`~workerkit.engines.base.Engine`)."""

    name = "rq"

    def __init__(self, worker_args: Sequence[str] = ()) -> None:
        self.args = parse_worker_args(worker_args)

    def redis_url(self, settings: Settings) -> str:
        return str(self.args.url or settings.redis_url)

    def worker_command(self, settings: Settings) -> list[str]:
        """The RQ worker in a fresh interpreter (settings come by environment)."""
        return [sys.executable, "-m", "workerkit.engines.rq", *worker_argv(self.args)]

    def app_timing(self, settings: Settings) -> AppTiming:
        """The tasks of the :class:`RqApp` named by ``settings.app``.

        The rq worker refuses to run without an app (it is the task allowlist), so a missing
        one is a configuration error here already, before the worker starts.
        """
        return AppTiming(tasks=tuple(load_app(settings).task_timings()))

    def release_in_flight(
        self, settings: Settings, refs: Sequence[Mapping[str, Any]], *, crashed: bool = False
    ) -> int:
        """Release the attempts of a worker that died or was killed; return how many.

        Whatever state the lease is in (running, settling, being released, or already
        expired), the attempt's process is gone, so its job may go back to the queue: at the
        front, with its checkpoint. ``crashed``: the attempt stays consumed and a job out of
        attempts is failed with the reason; otherwise (a deploy) it is given back.
        """
        if not refs:
            return 0
        import redis

        connection = redis.Redis.from_url(
            self.redis_url(settings), socket_timeout=2.0, socket_connect_timeout=2.0
        )
        serializer = resolve_rq_serializer(self.args.serializer)
        leases = Leases(connection, lease_ttl(settings))
        recovery = Recovery(connection, leases, WorkerkitJob, serializer)
        accepted = ["run", "settle", "release", "none"]
        released = 0
        try:
            for index, ref in enumerate(refs):
                try:
                    keys = AttemptKeys(str(ref["job_id"]), str(ref["token"]), str(ref["queue"]))
                except KeyError as exc:
                    log.warning(
                        "bad delivery ref", extra={"event": "release_failed", "error": repr(exc)}
                    )
                    continue
                try:
                    if crashed:
                        done = (
                            recovery.recover(keys, accepted, "its worker process exited")
                            is not None
                        )
                    else:
                        done = recovery.release(keys, accepted, give_back=True)
                except redis.exceptions.RedisError as exc:
                    log.warning(
                        "cannot release in-flight jobs; their leases will expire instead",
                        extra={
                            "event": "release_failed",
                            "error": str(exc),
                            "left": len(refs) - index,
                        },
                    )
                    break
                if done:
                    released += 1
        finally:
            connection.close()
        return released
