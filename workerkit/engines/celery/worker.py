"""The Celery worker process with workerkit inside (``python -m workerkit.engines.celery``).

:func:`install` hooks one :class:`~workerkit.engines.celery.runtime.Runtime` into the app's
worker through Celery's own extension points: a consumer bootstep, two signals, a Worker
subclass (its signal handlers, and the task wrappers once the app is finalized).
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from workerkit import events as events_module
from workerkit.engines.celery.config import (
    configure_app,
    load_celery_app,
    startup_differences,
    worker_argv,
)
from workerkit.engines.celery.runtime import Runtime
from workerkit.engines.celery.task import wrap_tasks
from workerkit.errors import ConfigurationError

if TYPE_CHECKING:
    from workerkit.settings import Settings

__all__ = ("install", "main")

log = logging.getLogger("workerkit.engines.celery")


def install(app: Any, settings: Settings) -> Runtime:
    """Hook workerkit into the app's worker: a consumer bootstep, signals, a Worker subclass."""
    from celery import bootsteps
    from celery import signals as celery_signals

    runtime = Runtime(app, settings)

    class WorkerkitStep(bootsteps.StartStopStep):  # type: ignore[misc]
        """Gates the consumer's dispatch to the pool (see Runtime.attach)."""

        requires = ("celery.worker.consumer.tasks:Tasks",)

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            runtime.attach(parent)

    app.steps["consumer"].add(WorkerkitStep)

    def on_ready(sender: Any = None, **_: Any) -> None:
        runtime.on_worker_ready()

    def on_child_start(**_: Any) -> None:
        # A pool child: the pod's SIGTERM is the supervisor's to handle, and a Ctrl-C reaches
        # the whole foreground group; neither may kill a task mid-run. Celery's hard time limit
        # still works (billiard follows its SIGTERM with SIGKILL after 0.1 s).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        events_module.client("celery-executor").on_command(runtime.on_executor_command)

    celery_signals.worker_ready.connect(on_ready, weak=False)
    celery_signals.worker_process_init.connect(on_child_start, weak=False)

    base = app.Worker

    class Worker(base):  # type: ignore[misc,valid-type]
        def on_init_blueprint(self) -> None:
            super().on_init_blueprint()  # imports the task modules and finalizes the app
            wrap_tasks(self.app, runtime)

        def install_platform_tweaks(self, worker: Any) -> None:
            super().install_platform_tweaks(worker)
            runtime.install_signal_handlers()

    app.Worker = Worker
    # Jobs of the solo and threads pools run in this process: they hear commands here.
    return runtime


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m workerkit.engines.celery [celery worker options]``, started by the supervisor."""
    from workerkit.logs import configure_logging
    from workerkit.settings import load_settings

    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    try:
        app = load_celery_app(settings.app)
        configure_app(app, settings)
        install(app, settings)
    except ConfigurationError as exc:
        log.error(str(exc), extra={"event": "worker_config_error"})
        sys.exit(2)
    args = list(sys.argv[1:] if argv is None else argv)
    message, differences = startup_differences(app, settings, args)
    log.info(message, extra={"event": "celery_differences", "differences": differences})
    app.worker_main(argv=worker_argv(settings, args, app))
