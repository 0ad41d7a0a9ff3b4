"""The Celery settings workerkit applies to the app, and the facts the timing budget checks.

:func:`celery_facts` must read the app before :func:`configure_app` fills in workerkit's values:
it reports what the *user* overrides (rules C1-C6, V1-V3 in the timing budget).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from workerkit.errors import ConfigurationError

if TYPE_CHECKING:
    from workerkit.settings import Settings
    from workerkit.timing import CeleryFacts, TaskTiming

__all__ = (
    "celery_facts",
    "check_worker_args",
    "configure_app",
    "load_celery_app",
    "task_timings",
    "user_tasks",
    "user_value",
    "worker_argv",
)


def load_celery_app(spec: str | None) -> Any:
    """The ``celery.Celery`` app named by ``spec`` (``-A`` / ``--app`` / ``WORKERKIT_APP``).

    ``spec`` is read as ``celery -A`` reads it: ``proj``, ``proj.celery``, ``proj.celery:app``
    (:func:`workerkit.loading.find_app`). Anything else, or a failure to import, is a
    ConfigurationError before anything starts.
    """
    from celery import Celery

    from workerkit.loading import find_app

    if not spec:
        raise ConfigurationError(
            "the celery engine needs an app: give -A/--app as `celery -A` takes it (e.g. "
            "'-A proj' or '--app proj.celery:app'), or set WORKERKIT_APP"
        )
    app = find_app(spec, Celery)
    if not isinstance(app, Celery):
        raise ConfigurationError(
            f"--app {spec!r} is a {type(app).__name__}, not a celery.Celery app; the celery "
            "engine runs Celery apps (use --engine sql for a workerkit.App)"
        )
    return app


def check_worker_args(app: Any, worker_args: Sequence[str]) -> None:
    """Refuse, before anything starts, an option that ``celery worker`` would not take.

    The celery engine hands the options it does not know to ``celery worker`` (with the app's
    own ``user_options``); a misspelled one, or another engine's, would otherwise fail only
    once the supervisor and its HTTP server are up.
    """
    from celery.bin.worker import worker as worker_command

    params = [
        *worker_command.params,
        *app.user_options.get("worker", ()),
        *app.user_options.get("preload", ()),
    ]
    names = {name for param in params for name in (*param.opts, *param.secondary_opts)}
    for token in worker_args:
        if not token.startswith("-") or token in ("-", "--"):
            continue
        name = token.split("=", 1)[0]
        if name in names or (not token.startswith("--") and token[:2] in names):
            continue
        hint = ""
        if name in ("-A", "--app"):
            hint = "; give -A/--app among workerkit's options, before `--`"
        raise ConfigurationError(
            f"{name} is not an option of `celery worker`{hint} (the "
            "celery engine passes the options it does not know to `celery worker`: see "
            "`celery worker --help`, and `workerkit run celery --help` for workerkit's own)"
        )


def user_value(app: Any, key: str) -> Any:
    """The app's value for a Celery setting, or None when it is Celery's default."""
    from celery.app.defaults import DEFAULTS

    value = app.conf.get(key)
    return None if value == DEFAULTS.get(key) else value


def celery_facts(app: Any) -> CeleryFacts:
    """What the app overrides among the settings workerkit manages (for the timing budget)."""
    from workerkit.timing import CeleryFacts

    options = app.conf.get("broker_transport_options") or {}
    visibility = options.get("visibility_timeout")
    return CeleryFacts(
        acks_late=user_value(app, "task_acks_late"),
        reject_on_worker_lost=user_value(app, "task_reject_on_worker_lost"),
        prefetch_multiplier=user_value(app, "worker_prefetch_multiplier"),
        soft_time_limit=user_value(app, "task_soft_time_limit"),
        time_limit=user_value(app, "task_time_limit"),
        visibility_timeout=float(visibility) if visibility is not None else None,
    )


def user_tasks(app: Any) -> list[Any]:
    """The app's own tasks, by name (not Celery's ``celery.*``)."""
    return [task for name, task in sorted(app.tasks.items()) if not name.startswith("celery.")]


def task_timings(app: Any) -> tuple[TaskTiming, ...]:
    """Each user task's hard limit and whether a re-run is safe."""
    from workerkit.idempotency import idempotency_of
    from workerkit.timing import TaskTiming

    timings = []
    for task in user_tasks(app):
        run = getattr(task, "_workerkit_original_run", task.run)
        limit = task.time_limit
        timings.append(
            TaskTiming(
                name=task.name,
                timeout=float(limit) if limit else None,
                idempotent=idempotency_of(run) is not None
                or bool(getattr(task, "workerkit_idempotent", False)),
                checkpointed=bool(getattr(task, "workerkit_checkpointed", False)),
            )
        )
    return tuple(timings)


def configure_app(app: Any, settings: Settings) -> None:
    """Apply workerkit's safe defaults to the app, leaving what the user set explicitly.

    Overrides that break the timing budget were reported (and refused when errors) by the
    supervisor before the worker started.
    """
    conf = app.conf
    if not str(conf.broker_url or "").startswith(("redis://", "rediss://", "redis+socket://")):
        if user_value(app, "broker_url") is not None:
            raise ConfigurationError(
                f"the celery engine needs a Redis broker; the app's broker_url is "
                f"{str(conf.broker_url).split(':', 1)[0]}://... (set it to a redis:// URL, or "
                f"remove it and set WORKERKIT_REDIS_URL)"
            )
        conf.broker_url = settings.redis_url
    defaults: dict[str, Any] = {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": settings.job_timeout,
        "task_soft_time_limit": max(
            settings.job_timeout - settings.release_margin, settings.job_timeout / 2
        ),
        # workerkit's own JSON logging stays in charge of the root logger.
        "worker_hijack_root_logger": False,
        # A warm shutdown by Celery itself (never reached under workerkit) would otherwise wait.
        "worker_cancel_long_running_tasks_on_connection_loss": True,
    }
    for key, value in defaults.items():
        if user_value(app, key) is None:
            conf[key] = value
    options = dict(conf.get("broker_transport_options") or {})
    options.setdefault("visibility_timeout", settings.effective_visibility_timeout)
    conf.broker_transport_options = options


def worker_argv(settings: Settings, worker_args: Sequence[str]) -> list[str]:
    """``celery worker`` options: workerkit's settings first, the user's own after (they win)."""
    argv = [
        "worker",
        f"--loglevel={settings.log_level.upper()}",
        f"--concurrency={settings.concurrency}",
        # Mingle waits a second for replies at start; gossip and worker heartbeats are broadcast
        # chatter workerkit does not use (the supervisor has its own probes).
        "--without-mingle",
        "--without-gossip",
        "--without-heartbeat",
    ]
    if not any(a in ("-Q", "--queues") or a.startswith("--queues=") for a in worker_args):
        argv.append(f"--queues={','.join(settings.queues)}")
    return [*argv, *worker_args]
