"""The rq engine: graceful RQ workers that release, resume and recover in seconds.

``workerkit run rq --app myproject.rq_app:app --queues default`` runs an RQ worker (a subclass
of RQ's own, :class:`Worker` or :class:`SimpleWorker`) under the supervisor. Extra arguments
after the settings are the engine's own:

``--worker-class forking|simple``  fork a work horse per job (RQ's default), or run jobs in the
                                   worker process
``--serializer json|pickle``       how jobs are (de)serialized; JSON unless pickle is asked for
``--url URL``                      the Redis URL (the same as ``--redis-url``, spelled as rq does)
``--with-scheduler``               also run RQ's scheduler (jobs enqueued with ``enqueue_in``)

People who keep their own ``rq worker`` command can use ``--worker-class
workerkit.engines.rq.Worker`` (settings from ``WORKERKIT_*`` variables); see docs/engines/rq.md
for what they get and what only the supervisor gives.

How release, crash recovery and fencing work on Redis: :mod:`workerkit.engines._rq.leases` and
:mod:`workerkit.engines._rq.worker`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from workerkit.engines._rq.leases import AttemptKeys, Leases
from workerkit.engines._rq.tasks import DEFAULT_MAX_ATTEMPTS, RqApp, RqTaskInfo, TaskNotAllowed
from workerkit.engines._rq.worker import (
    META_KEY,
    Recovery,
    SimpleWorker,
    Worker,
    WorkerkitJob,
    lease_ttl,
    resolve_rq_serializer,
)
from workerkit.engines.base import AppTiming
from workerkit.errors import ConfigurationError

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

WORKER_CLASSES: dict[str, type[Worker] | type[SimpleWorker]] = {
    "forking": Worker,
    "simple": SimpleWorker,
}


class _ArgumentError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _ArgumentError(message)


def _parser() -> _Parser:
    parser = _Parser(prog="workerkit run rq", add_help=False)
    parser.add_argument("--worker-class", choices=sorted(WORKER_CLASSES), default="forking")
    parser.add_argument("--serializer", choices=("json", "pickle"), default="json")
    parser.add_argument("--url", default=None)
    parser.add_argument("--with-scheduler", action="store_true")
    return parser


def parse_worker_args(worker_args: Sequence[str]) -> argparse.Namespace:
    """The rq engine's own arguments; ConfigurationError naming the problem and the choices."""
    try:
        return _parser().parse_args(list(worker_args))
    except _ArgumentError as exc:
        raise ConfigurationError(
            f"workerkit run rq: {exc}; the rq engine takes --worker-class forking|simple, "
            "--serializer json|pickle, --url URL and --with-scheduler (other options are "
            "settings: workerkit run rq --help)"
        ) from None


def _args_to_argv(args: argparse.Namespace) -> list[str]:
    argv = ["--worker-class", args.worker_class, "--serializer", args.serializer]
    if args.url:
        argv += ["--url", args.url]
    if args.with_scheduler:
        argv.append("--with-scheduler")
    return argv


class RqEngine:
    """The rq engine as the supervisor sees it (:class:`~workerkit.engines.base.Engine`)."""

    name = "rq"

    def __init__(self, worker_args: Sequence[str] = ()) -> None:
        self.args = parse_worker_args(worker_args)

    def redis_url(self, settings: Settings) -> str:
        return str(self.args.url or settings.redis_url)

    def worker_command(self, settings: Settings) -> list[str]:
        """The RQ worker in a fresh interpreter (settings come by environment)."""
        return [sys.executable, "-m", "workerkit.engines._rq", *_args_to_argv(self.args)]

    def app_timing(self, settings: Settings) -> AppTiming:
        """The tasks of the :class:`RqApp` named by ``settings.app``.

        The rq worker refuses to run without an app (it is the task allowlist), so a missing
        one is a configuration error here already, before the worker starts.
        """
        from workerkit.engines._rq.worker import _load_app

        return AppTiming(tasks=tuple(_load_app(settings).task_timings()))

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


def main(argv: Sequence[str] | None = None) -> None:
    """The RQ worker process: ``python -m workerkit.engines._rq [engine args]``."""
    import redis

    from workerkit.logs import configure_logging
    from workerkit.settings import load_settings

    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    try:
        args = parse_worker_args(sys.argv[1:] if argv is None else argv)
        from workerkit.engines._rq.worker import _load_app

        app = _load_app(settings)
    except ConfigurationError as exc:
        log.error(str(exc), extra={"event": "worker_config_error"})
        sys.exit(2)
    worker_class = WORKER_CLASSES[args.worker_class]
    connection = redis.Redis.from_url(str(args.url or settings.redis_url))
    worker = worker_class(
        list(settings.queues),
        connection=connection,
        app=app,
        settings=settings,
        serializer=args.serializer,
    )
    # Installed before work() starts (RQ installs its handlers only after registering), so a
    # SIGTERM that arrives during startup is a warm stop too, not a kill.
    worker._install_signal_handlers()
    worker.work(with_scheduler=args.with_scheduler)
    logging.shutdown()
    # The upkeep and event threads are daemons that may be blocked on a socket; the worker's
    # state in Redis is settled, so do not wait for them.
    os._exit(0)
