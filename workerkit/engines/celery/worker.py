"""The Celery worker process with workerkit inside (``python -m workerkit.engines.celery``).

:func:`install` hooks one :class:`~workerkit.engines.celery.runtime.Runtime` into the app's
worker through Celery's own extension points: a consumer bootstep, signals, a Worker subclass
(its signal handlers, its banner, and the task wrappers once the app is finalized). In JSON log
mode workerkit takes Celery's logging over (its ``setup_logging`` signal), so that every line of
the worker and its pool children is one JSON object.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from workerkit import events as events_module
from workerkit import exitcodes
from workerkit.engines.celery.config import (
    configure_app,
    limit_tasks,
    load_celery_app,
    startup_differences,
    worker_argv,
)
from workerkit.engines.celery.runtime import Runtime
from workerkit.engines.celery.task import QuietRelease, wrap_tasks
from workerkit.errors import ConfigurationError

if TYPE_CHECKING:
    from workerkit.settings import Settings

__all__ = ("install", "main")

log = logging.getLogger("workerkit.engines.celery")

#: billiard's logger (``billiard.util.LOGGER_NAME``): no handler and no propagation unless
#: Celery's own logging setup gave it one, so its lines would reach Python's plain-text fallback.
BILLIARD_LOGGER = "multiprocessing"


def install(app: Any, settings: Settings) -> Runtime:
    """Hook workerkit into the app's worker: a consumer bootstep, signals, a Worker subclass."""
    from celery import bootsteps
    from celery import signals as celery_signals

    runtime = Runtime(app, settings)

    class WorkerkitStep(bootsteps.StartStopStep):  # type: ignore[misc]
        """Gates the consumer's dispatch to the pool (see Runtime.attach); leases at delivery."""

        requires = ("celery.worker.consumer.tasks:Tasks",)

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            runtime.attach(parent)
            build = parent.update_strategies

            def update_strategies() -> None:
                # Celery builds each task's strategy (its Request class, its default time
                # limits) here, at every consumer start: a task registered since is adopted.
                _adopt_tasks(app, settings, runtime)
                build()

            parent.update_strategies = update_strategies

        def start(self, parent: Any) -> None:
            # After the Tasks step made the task consumer (again, after a reconnection).
            _start_consumer(runtime, parent)

    app.steps["consumer"].add(WorkerkitStep)

    def on_ready(sender: Any = None, **_: Any) -> None:
        runtime.on_worker_ready()

    def on_child_start(**_: Any) -> None:
        # A pool child: the pod's SIGTERM is the supervisor's to handle, and a Ctrl-C reaches
        # the whole foreground group; neither may kill a task mid-run. Celery's hard time limit
        # still works (billiard follows its SIGTERM with SIGKILL after 0.1 s).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # The lease watchdog's kill (lease.py): the kernel's, even while a task holds the GIL.
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        events_module.client("celery-executor").on_command(runtime.on_executor_command)
        runtime.start_watchdog()

    celery_signals.worker_ready.connect(on_ready, weak=False)
    celery_signals.worker_process_init.connect(on_child_start, weak=False)
    # A job's release is one INFO line of ours, not Celery's WARNING with a traceback.
    logging.getLogger("celery.app.trace").addFilter(QuietRelease())
    json_logs = settings.log_format == "json"
    if json_logs:
        celery_signals.setup_logging.connect(_json_logging(app), weak=False)

    base = app.Worker

    class Worker(base):  # type: ignore[misc,valid-type]
        def on_init_blueprint(self) -> None:
            super().on_init_blueprint()  # imports the task modules and finalizes the app
            _adopt_tasks(self.app, settings, runtime)

        def install_platform_tweaks(self, worker: Any) -> None:
            super().install_platform_tweaks(worker)
            runtime.install_signal_handlers()

        def emit_banner(self) -> None:
            if not json_logs:
                super().emit_banner()
                return
            # Celery prints it to the real stdout, around any logging: one record instead.
            banner = self.startup_info(artlines=False) + (self.extra_info() or "")
            log.info(
                "celery worker starting",
                extra={"event": "celery_banner", "banner": banner.strip("\n")},
            )

    app.Worker = Worker
    # Jobs of the solo and threads pools run in this process: they hear commands here.
    return runtime


def _start_consumer(runtime: Runtime, consumer: Any) -> None:
    """Runtime.on_consumer_start; a broker it cannot work with (pop.py) ends the worker with
    the configuration error's exit code (nothing was consumed yet)."""
    try:
        runtime.on_consumer_start(consumer)
    except ConfigurationError as exc:
        log.error(str(exc), extra={"event": "worker_config_error"})
        logging.shutdown()
        os._exit(exitcodes.CONFIG_ERROR)


def _adopt_tasks(app: Any, settings: Settings, runtime: Runtime) -> None:
    """workerkit's time limits, job context and Request class for every task registered so far."""
    limit_tasks(app, settings)
    wrap_tasks(app, runtime)


class _TaskFields(logging.Filter):
    """Adds ``task_id`` and ``task_name`` to a record written while a Celery task runs."""

    def __init__(self) -> None:
        super().__init__()
        from celery._state import get_current_task  # what Celery's TaskFormatter reads

        self._current = get_current_task

    def filter(self, record: logging.LogRecord) -> bool:
        task = self._current()
        if task is not None and not hasattr(record, "task_id"):
            request_id = getattr(task.request, "id", None)
            if request_id is not None:
                setattr(record, "task_id", request_id)  # noqa: B010 - a LogRecord extra
                setattr(record, "task_name", task.name)  # noqa: B010
        return True


def _json_logging(app: Any) -> Any:
    """A ``setup_logging`` receiver: Celery's loggers and output go to workerkit's handler.

    A receiver makes Celery skip its own setup: no plain-text handlers on ``celery.task`` and
    billiard's logger, and no stdout redirection; the receiver does the parts that matter.
    """
    from workerkit.logs import add_handler_filter, route_logger

    def setup(loglevel: Any = None, **_: Any) -> None:
        # What Celery's task log format puts in front of a task logger's line, as fields.
        add_handler_filter(_TaskFields())
        # Task loggers (get_task_logger) are children of celery.task: they propagate to the
        # root, whose handler is workerkit's. billiard's stays at ERROR, as Celery sets it.
        logging.getLogger("celery.task").propagate = True
        route_logger(BILLIARD_LOGGER, level=logging.ERROR)
        # print() in a task (or anything else writing to sys.stdout/stderr): one record per
        # write, as Celery's worker_redirect_stdouts does, also in the pool children (they
        # inherit the streams and the CELERY_LOG_REDIRECT variable). Always on in JSON mode:
        # a raw line would break the one-object-per-line promise.
        app.log.redirect_stdouts(app.conf.worker_redirect_stdouts_level)

    return setup


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m workerkit.engines.celery [celery worker options]``, started by the supervisor."""
    from workerkit.drill.canary import register_celery
    from workerkit.logs import configure_logging
    from workerkit.settings import load_settings

    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    try:
        app = load_celery_app(settings.app)
        configure_app(app, settings)
        install(app, settings)
        register_celery(app)  # the drill's canary, in every celery worker (docs/reference/drill.md)
    except ConfigurationError as exc:
        log.error(str(exc), extra={"event": "worker_config_error"})
        sys.exit(exitcodes.CONFIG_ERROR)
    args = list(sys.argv[1:] if argv is None else argv)
    message, differences = startup_differences(app, settings, args)
    log.info(message, extra={"event": "celery_differences", "differences": differences})
    app.worker_main(argv=worker_argv(settings, args, app))
