"""The Celery settings workerkit applies to the app, and the facts the timing budget checks.

"Set by the app" is read from where the value comes from, never from the value: Celery's
``app.conf`` layers the app's own maps (``conf.update``, ``config_from_object``) over a copy of
its defaults, so ``task_acks_late=False`` set explicitly is the user's, and kept and reported
(rules C1-C6), although it equals Celery's default. What workerkit fills in is recorded on the
app, so reading after :func:`configure_app` still tells the two apart.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from workerkit.errors import ConfigurationError
from workerkit.timing.budget import format_seconds as fmt_seconds

if TYPE_CHECKING:
    from workerkit.settings import Settings
    from workerkit.timing import CeleryFacts, TaskTiming

__all__ = (
    "PoolLimit",
    "celery_facts",
    "check_worker_args",
    "configure_app",
    "limit_tasks",
    "limited_by_workerkit",
    "load_celery_app",
    "load_tasks",
    "set_by_app",
    "soft_limit_for",
    "startup_differences",
    "task_timings",
    "user_tasks",
    "user_value",
    "worker_argv",
)

#: Where :func:`configure_app` records what it filled in (key -> value) on the app.
_APPLIED = "_workerkit_applied"
#: Where :func:`limit_tasks` records the tasks it gave workerkit's time limits (they had none).
_LIMITED = "_workerkit_limited"


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


def set_by_app(app: Any, key: str) -> bool:
    """Whether the app's own configuration sets ``key``, whatever the value.

    Celery's ``app.conf`` is a chain of maps: the app's changes (``conf.update``, assignments,
    the ``Celery(...)`` arguments), then the loader's (``config_from_object``), then a copy of
    Celery's defaults, last. A key found before that last map, in any of its spellings (the
    namespaced ``CELERY_...`` one, the pre-4.0 one), is the app's; one workerkit filled in is not.
    """
    conf = app.conf
    conf.finalize()  # a pending configuration reads config_from_object now
    if key in getattr(app, _APPLIED, {}):
        return False
    to_keys = getattr(conf, "_to_keys", None)
    spellings = tuple(to_keys(key)) if to_keys is not None else (key,)
    return any(name in mapping for mapping in list(conf.maps)[:-1] for name in spellings)


def user_value(app: Any, key: str) -> Any:
    """The app's value for a Celery setting, or None when the app does not set it."""
    return app.conf.get(key) if set_by_app(app, key) else None


def celery_facts(app: Any) -> CeleryFacts:
    """What the app sets among the settings workerkit manages (for the timing budget)."""
    from workerkit.timing import CeleryFacts

    options = user_value(app, "broker_transport_options") or {}
    visibility = options.get("visibility_timeout")
    return CeleryFacts(
        acks_late=_flag(user_value(app, "task_acks_late")),
        reject_on_worker_lost=_flag(user_value(app, "task_reject_on_worker_lost")),
        prefetch_multiplier=user_value(app, "worker_prefetch_multiplier"),
        soft_time_limit=user_value(app, "task_soft_time_limit"),
        time_limit=user_value(app, "task_time_limit"),
        visibility_timeout=float(visibility) if visibility is not None else None,
    )


def _flag(value: Any) -> bool | None:
    return None if value is None else bool(value)


def load_tasks(app: Any) -> None:
    """Import the app's task modules as ``celery worker`` does, then finalize the app.

    ``imports``, ``include=[...]`` and ``autodiscover_tasks()`` register their tasks only when
    the loader imports the default modules (the worker does it at start): without this,
    ``workerkit check`` would see none of them.
    """
    try:
        app.loader.import_default_modules()
    except Exception as exc:  # the user's modules: anything may fail at import
        raise ConfigurationError(
            f"the Celery app's task modules (imports, include, autodiscover_tasks) do not "
            f"import: {type(exc).__name__}: {exc}"
        ) from exc
    app.finalize(auto=True)


def user_tasks(app: Any) -> list[Any]:
    """The app's own tasks, by name (not Celery's ``celery.*``)."""
    return [task for name, task in sorted(app.tasks.items()) if not name.startswith("celery.")]


def task_timings(app: Any) -> tuple[TaskTiming, ...]:
    """Each user task's hard limit, as the prefork pool enforces it, and whether a re-run is safe.

    The limit is the task's own ``time_limit``, else the app's ``task_time_limit``; None means
    workerkit's (``job_timeout``).
    """
    from workerkit.idempotency import idempotency_of
    from workerkit.timing import TaskTiming

    load_tasks(app)
    limited: set[str] = getattr(app, _LIMITED, set())
    timings = []
    for task in user_tasks(app):
        run = getattr(task, "_workerkit_original_run", task.run)
        # Celery's bind gave the task the app's task_time_limit when it sets none.
        limit = None if task.name in limited else task.time_limit
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


def soft_limit_for(hard: float, settings: Settings) -> float:
    """The soft limit workerkit gives a task whose hard limit is ``hard``: M before it."""
    return max(hard - settings.release_margin, hard / 2)


class PoolLimit(float):
    """workerkit's ``task_time_limit`` (J): a float that says where it comes from.

    Celery's bind copies ``task_time_limit`` into every task bound later that sets none; such a
    task's limit is this type, where a task's own ``time_limit=J`` is a plain number: that is
    how :func:`limit_tasks` tells a task registered after the app was finalized (which needs
    workerkit's soft limit) from a task with a limit of its own (kept as it is).
    """

    __slots__ = ()


def limited_by_workerkit(app: Any, task_name: str) -> bool:
    """Whether workerkit gave the task its time limits (it had none of its own)."""
    return task_name in getattr(app, _LIMITED, ())


def _workerkit_defaults() -> dict[str, Any]:
    """What workerkit fills in when the app does not set it (docs/engines/celery.md).

    Before the app is finalized: Celery copies ``task_acks_late`` and the like into each task
    when it binds it. The time limits come after (see :func:`limit_tasks`).
    """
    return {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Off: on a lost broker connection Celery would "cancel" every running task (its pool
        # child goes on) while kombu put its message back; workerkit keeps the running tasks
        # in hand, their leases renewed, and hands back those Celery dropped (runtime.py).
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }


def configure_app(app: Any, settings: Settings) -> None:
    """Apply workerkit's safe defaults to the app, keeping every value the app sets itself.

    Overrides that break the timing budget were reported (and refused when errors) by the
    supervisor before the worker started.
    """
    conf = app.conf
    applied: dict[str, Any] = getattr(app, _APPLIED, {})
    if not str(conf.broker_url or "").startswith(("redis://", "rediss://", "redis+socket://")):
        if user_value(app, "broker_url") is not None:
            raise ConfigurationError(
                f"the celery engine needs a Redis broker; the app's broker_url is "
                f"{str(conf.broker_url).split(':', 1)[0]}://... (set it to a redis:// URL, or "
                f"remove it and set WORKERKIT_REDIS_URL)"
            )
        applied["broker_url"] = conf.broker_url = settings.redis_url
    filled = {k: v for k, v in _workerkit_defaults().items() if not set_by_app(app, k)}
    # workerkit's logging (JSON or text) owns the root logger, whatever the app asks.
    filled["worker_hijack_root_logger"] = False
    options = dict(conf.get("broker_transport_options") or {})
    if "visibility_timeout" not in options or "broker_transport_options" in applied:
        options["visibility_timeout"] = settings.effective_visibility_timeout
        filled["broker_transport_options"] = options
    for key, value in filled.items():
        conf[key] = applied[key] = value
    setattr(app, _APPLIED, applied)
    if app.finalized:
        limit_tasks(app, settings)
    else:
        app.on_after_finalize.connect(lambda **_: limit_tasks(app, settings), weak=False)


def limit_tasks(app: Any, settings: Settings) -> None:
    """Give each task without time limits a hard limit J and a soft limit M before it.

    Once the app is finalized: Celery's bind copies ``task_time_limit`` and
    ``task_soft_time_limit`` into every task that sets none, so before it a limit of the app's
    own (kept, as under bare Celery) and workerkit's cannot be told apart, and after it
    workerkit's no longer reach the tasks. Again as the worker starts its consumer: a task
    registered after the app was finalized (by a ``worker_init`` handler, a bootstep) was bound
    with the pool's J (a :class:`PoolLimit`) and no soft limit. Per task, never pool-wide:
    billiard runs a task's hard limit after its soft one, so a pool-wide soft limit would
    postpone the kill of ``@app.task(time_limit=2)`` until that soft limit (bare Celery kills it
    at 2 s).
    """
    applied: dict[str, Any] = getattr(app, _APPLIED)
    if not set_by_app(app, "task_time_limit"):
        # The pool's default: Celery's own tasks, and tasks registered from now on.
        app.conf["task_time_limit"] = applied["task_time_limit"] = PoolLimit(settings.job_timeout)
    hard = float(settings.job_timeout)
    soft = soft_limit_for(hard, settings)
    limited: set[str] = getattr(app, _LIMITED, set())
    for task in user_tasks(app):
        if task.name in limited:
            continue
        # None: bound before workerkit's J was the pool's; a PoolLimit: bound after, from it.
        pool_default = task.time_limit is None or type(task.time_limit) is PoolLimit
        if pool_default and task.soft_time_limit is None:
            task.time_limit, task.soft_time_limit = hard, soft
            limited.add(task.name)
    setattr(app, _LIMITED, limited)


def _option(args: Sequence[str], short: str, long: str) -> str | None:
    """The last value of ``-X VALUE``, ``-XVALUE``, ``--long VALUE`` or ``--long=VALUE``."""
    value = None
    for i, arg in enumerate(args):
        if arg in (short, long):
            value = args[i + 1] if i + 1 < len(args) else None
        elif arg.startswith(long + "="):
            value = arg.split("=", 1)[1]
        elif arg.startswith(short) and not arg.startswith("--") and len(arg) > len(short):
            value = arg[len(short) :]
    return value


def _task_events(app: Any, worker_args: Sequence[str]) -> bool:
    """Whether the worker sends task events (``-E``, or the app's ``worker_send_task_events``)."""
    flagged = any(a in ("-E", "--task-events") for a in worker_args)
    return flagged or bool(app is not None and app.conf.get("worker_send_task_events"))


def worker_argv(settings: Settings, worker_args: Sequence[str], app: Any = None) -> list[str]:
    """``celery worker`` options: workerkit's settings first, the user's own after (they win).

    Without ``queues`` (and no ``-Q``) the worker consumes the app's queues, as ``celery worker``
    does. Worker heartbeats stay on when task events are (``-E``): Flower and ``celery events``
    show a worker without them as offline.
    """
    argv = [
        "worker",
        f"--loglevel={settings.log_level.upper()}",
        f"--concurrency={settings.concurrency}",
        # Mingle waits a second for replies at start; gossip is broadcast chatter workerkit does
        # not use (the supervisor has its own probes). startup_differences says what it costs.
        "--without-mingle",
        "--without-gossip",
    ]
    if not _task_events(app, worker_args):
        argv.append("--without-heartbeat")
    given = any(a in ("-Q", "--queues") or a.startswith("--queues=") for a in worker_args)
    if settings.queues is not None and not given:
        argv.append(f"--queues={','.join(settings.queues)}")
    return [*argv, *worker_args]


def startup_differences(
    app: Any, settings: Settings, worker_args: Sequence[str]
) -> tuple[str, dict[str, str]]:
    """The one startup log line: what differs from ``celery worker`` with the same app, and why.

    Returns the message and the same as fields (name -> what and why). Values the app sets
    itself are not differences: they are kept.
    """
    from celery.app.defaults import DEFAULTS

    applied = getattr(app, _APPLIED, {})
    found: dict[str, str] = {}
    pool = _option(worker_args, "-P", "--pool") or "prefork"
    concurrency = _option(worker_args, "-c", "--concurrency") or str(settings.concurrency)
    cpus = os.cpu_count() or 1
    if pool != "solo" and concurrency != str(cpus):
        found["concurrency"] = f"{concurrency} (celery: {cpus}, the CPUs; set --concurrency)"
    for key, why in _WHY.items():
        theirs = DEFAULTS.get(key)
        if key in applied and applied[key] != theirs:
            found[key] = f"{applied[key]} (celery: {theirs}): {why}"
    if not set_by_app(app, "task_time_limit"):
        hard = settings.job_timeout
        found["time_limits"] = (
            f"hard {fmt_seconds(hard)} s (job_timeout J), soft "
            f"{fmt_seconds(soft_limit_for(hard, settings))} s, for tasks without limits of "
            f"their own (celery: none): the job is warned, then killed, within the budget"
        )
    found["mingle"] = "off: revokes sent before this worker started are not applied to it"
    found["gossip"] = "off: workers do not track each other (no clock sync, no leader election)"
    if not _task_events(app, worker_args):
        found["heartbeat"] = (
            "off without -E (celery: on): Flower and `celery events` do not see this worker; "
            "-E turns on task events and worker heartbeats"
        )
    text = "; ".join(f"{name} {what}" for name, what in found.items())
    return f"differs from bare `celery worker`: {text}", found


#: The settings workerkit fills in that a migrating user may notice, and why.
_WHY = {
    "task_acks_late": "a job in hand at a kill or crash is not lost",
    "task_reject_on_worker_lost": "a killed pool child's job goes back to its queue",
    "worker_prefetch_multiplier": "no message waits unacknowledged behind a running job",
    "worker_hijack_root_logger": "workerkit's logs own the root logger",
}
