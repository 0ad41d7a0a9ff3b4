"""The ``workerkit`` command.

Every option that is a setting can also come from its ``WORKERKIT_*`` variable or the config
file (see :mod:`workerkit.settings` for the precedence). Exit codes are the named constants of
:mod:`workerkit.exitcodes`, documented in docs/reference/exit-codes.md.

The commands are thin: they read settings and call the library. Logic lives in the library.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from workerkit import exitcodes
from workerkit.dashboard.cli import dashboard_command
from workerkit.engines import ENGINE_OPTIONS, EngineOption
from workerkit.errors import ConfigurationError, UnknownTask, WorkerkitError
from workerkit.settings import Settings, load_settings, setting_specs

__all__ = ("main",)

F = TypeVar("F", bound=Callable[..., Any])


def settings_options(func: F) -> F:
    """Add one option per setting (``--grace-period`` ...) and ``--config``.

    Options are read as text and parsed by :mod:`workerkit.settings`, so a bad value gets the
    same message whether it came from the command line, the environment or the config file.
    """
    return _setting_options(None)(func)


_CELERY_APP_HELP = (
    "The Celery app, as `celery -A` takes it: a module (proj: its app or celery attribute, "
    "else proj.celery), module.attribute or module:attribute."
)


_SCHEDULER_APP_HELP = (
    "The app whose schedules to run: MODULE:APP (sql: a workerkit.App, rq: an RqApp); celery: "
    "what `celery -A` takes (the app's beat_schedule)."
)


def _setting_options(engine: str | None, *, short_app: bool = False) -> Callable[[F], F]:
    """:func:`settings_options`; for ``workerkit run ENGINE``, the other engines' are hidden.

    A hidden option is still parsed (it is not handed to the engine's worker as an unknown
    one), so that :func:`_refuse_other_engines` can name it.
    """

    def decorate(func: F) -> F:
        for spec in reversed(setting_specs()):
            if spec.name == "engine":
                continue  # a positional argument where it matters (workerkit run ENGINE)
            hidden = engine is not None and engine not in spec.engines
            if spec.name == "strict":
                func = click.option("--strict/--no-strict", "strict", default=None, help=spec.help)(
                    func
                )
                continue
            flags, text = [spec.cli_flag], spec.help
            if spec.name == "app" and (engine == "celery" or short_app):
                flags.insert(0, "-A")  # Celery's own spelling: celery -A proj worker
                text = _CELERY_APP_HELP if engine == "celery" else _SCHEDULER_APP_HELP
            env_hint = f" [env: {spec.env_var}; default: {_show_default(spec.default)}]"
            func = click.option(
                *flags,
                spec.name,
                default=None,
                metavar="VALUE",
                help=text + env_hint,
                hidden=hidden,
            )(func)
        return click.option(
            "--config",
            "config_file",
            default=None,
            metavar="PATH",
            help="Config file (default: ./workerkit.toml, else [tool.workerkit] in "
            "./pyproject.toml) [env: WORKERKIT_CONFIG].",
        )(func)

    return decorate


def _show_default(value: object) -> str:
    if value is None:
        return "derived"
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def _load(options: dict[str, Any], config_file: str | None, **fixed: Any) -> Settings:
    options = {**options, **{k: v for k, v in fixed.items() if v is not None}}
    try:
        return load_settings(options, config_file=config_file)
    except ConfigurationError as exc:
        click.echo(f"workerkit: configuration error: {exc}", err=True)
        sys.exit(exitcodes.CONFIG_ERROR)


def _debug_logging(settings: Settings) -> None:
    """With --log-level debug, logs go to stderr (the traceback of an app that fails to load)."""
    if settings.log_level == "debug":
        from workerkit.logs import configure_logging

        configure_logging(settings.log_level, settings.log_format)


def _fail(exc: WorkerkitError, code: int) -> None:
    click.echo(f"workerkit: {exc}", err=True)
    sys.exit(code)


class _Main(click.Group):
    """The ``workerkit`` group, whose ``drill`` (~0.06 s of imports that ``workerkit run``, the
    container's entrypoint, does not need before it spawns the worker) is imported when asked."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), "drill"})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name == "drill":
            from workerkit.drill.cli import drill

            return drill
        return super().get_command(ctx, cmd_name)


@click.group(
    cls=_Main,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(package_name="workerkit")
def main() -> None:
    """workerkit: deploy, scale down and crash queue workers without losing a job."""


# --- check ------------------------------------------------------------------------------


@main.command()
@click.option("--engine", "engine", default=None, help="sql, rq or celery [env: WORKERKIT_ENGINE].")
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["text", "json", "helm-values", "svg"]),
    default="text",
    show_default=True,
    help="text for people, json for machines, helm-values for the Helm chart's timing block "
    "(deploy/helm/workerkit), svg for a picture of the timeline and the rules' verdicts.",
)
@settings_options
def check(engine: str | None, output_format: str, config_file: str | None, **options: Any) -> None:
    """Check that the grace period, job timeouts and leases agree.

    Prints the timing budget as a timeline and a table of rules (--format helm-values: the
    chart's timing block, the values that differ from the defaults, after the rules' verdicts).
    Exits 0 when there is no error, 1 when there is one (warnings count as errors with
    --strict), 2 on a bad setting.
    """
    from workerkit.engines import get_engine
    from workerkit.engines.base import AppTiming
    from workerkit.timing import evaluate, render_json, render_text
    from workerkit.timing.helm_values import render_helm_values

    settings = _load(options, config_file, engine=engine)
    _debug_logging(settings)
    try:
        timing = get_engine(settings.engine).app_timing(settings) if settings.app else AppTiming()
    except WorkerkitError as exc:
        _fail(exc, exitcodes.CONFIG_ERROR)
        return
    report = evaluate(settings, timing.tasks, timing.celery)
    if output_format == "json":
        click.echo(render_json(report))
    elif output_format == "helm-values":
        click.echo(render_helm_values(report, settings))
    elif output_format == "svg":
        from workerkit.timing.svg import render_svg

        click.echo(render_svg(report), nl=False)
    else:
        click.echo(render_text(report, color=sys.stdout.isatty()))
    sys.exit(exitcodes.OK if report.ok else exitcodes.CHECK_FAILED)


# --- db ---------------------------------------------------------------------------------


@main.group()
def db() -> None:
    """Manage the SQL queue's schema (apply migrations before workers start)."""


@db.command("upgrade")
@settings_options
def db_upgrade(config_file: str | None, **options: Any) -> None:
    """Apply the schema migrations to --database-url."""
    from workerkit.engines.sql import upgrade

    settings = _load(options, config_file)
    try:
        revision = upgrade(settings.database_url)
    except ConfigurationError as exc:
        _fail(exc, exitcodes.CONFIG_ERROR)
    except WorkerkitError as exc:
        _fail(exc, exitcodes.STORE_UNAVAILABLE)
    click.echo(f"schema is at revision {revision}")


@db.command("check")
@settings_options
def db_check(config_file: str | None, **options: Any) -> None:
    """Say whether the schema is current; exit 0 only when it is."""
    from workerkit.engines.sql import check_schema

    settings = _load(options, config_file)
    try:
        health = check_schema(settings.database_url)
    except ConfigurationError as exc:
        _fail(exc, exitcodes.CONFIG_ERROR)
        return
    click.echo(health.reason)
    sys.exit(exitcodes.OK if health.ok else exitcodes.CHECK_FAILED)


@db.command("purge")
@click.option(
    "--older-than",
    "older_than",
    type=click.FloatRange(min=0),
    required=True,
    help="Delete jobs that finished more than this many seconds ago (e.g. 604800: a week).",
)
@click.option(
    "--state",
    "states",
    type=click.Choice(["succeeded", "failed"]),
    multiple=True,
    help="Finished states to delete (repeatable); default succeeded only. Failed jobs are the "
    "dead-letter queue: they go only when asked for. Ready and running jobs never go.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=5000,
    show_default=True,
    help="Rows deleted per transaction, so that no lock or transaction is held for long.",
)
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
@settings_options
def db_purge(
    older_than: float,
    states: tuple[str, ...],
    batch_size: int,
    dry_run: bool,
    config_file: str | None,
    **options: Any,
) -> None:
    """Delete old finished jobs and expired idempotency keys from --database-url, in batches."""
    from workerkit.engines.sql.retention import purge

    settings = _load(options, config_file)
    states = tuple(dict.fromkeys(states)) or ("succeeded",)
    try:
        result = purge(
            settings.database_url, older_than, states=states, batch_size=batch_size, dry_run=dry_run
        )
    except ConfigurationError as exc:
        _fail(exc, exitcodes.CONFIG_ERROR)
        return
    except WorkerkitError as exc:
        _fail(exc, exitcodes.STORE_UNAVAILABLE)
        return
    verb = "would delete" if dry_run else "deleted"
    click.echo(
        f"{verb} {result.jobs} {'/'.join(states)} jobs finished over {older_than:g} s ago "
        f"and {result.keys} expired idempotency keys"
    )


# --- enqueue ----------------------------------------------------------------------------


@main.command()
@click.argument("task")
@click.option("--args", "args_json", default="[]", help="Positional arguments as a JSON list.")
@click.option("--kwargs", "kwargs_json", default="{}", help="Keyword arguments as a JSON object.")
@click.option("--queue", default=None, help="Queue (default: the task's own, else 'default').")
@click.option("--delay", type=float, default=None, help="Run no sooner than this many seconds.")
@click.option(
    "--job-id",
    default=None,
    help="Job id; enqueuing the same id twice is a no-op (sql: while the first job is kept, "
    "see finished_job_retention).",
)
@settings_options
def enqueue(
    task: str,
    args_json: str,
    kwargs_json: str,
    queue: str | None,
    delay: float | None,
    job_id: str | None,
    config_file: str | None,
    **options: Any,
) -> None:
    """Put one job on the SQL queue and print its id.

    With --app (or WORKERKIT_APP) the task must be one of the app's and the arguments must fit
    its signature; without, any name is enqueued as it is (the worker's app decides).
    """
    from workerkit.app import EnqueueOptions
    from workerkit.engines.attempt import Unrunnable, check_arguments

    settings = _load(options, config_file)
    _debug_logging(settings)
    try:
        args = json.loads(args_json)
        kwargs = json.loads(kwargs_json)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}") from exc
    except RecursionError:
        raise click.BadParameter("--args or --kwargs is nested too deeply") from None
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise click.BadParameter("--args must be a JSON list and --kwargs a JSON object")
    try:
        app = _native_app(settings)
        if settings.app:
            try:
                check_arguments(app.get_task(task).fn, args, kwargs)
            except UnknownTask as exc:
                _refuse(f"enqueue: --app {settings.app!r}: {exc}")
            except Unrunnable as exc:
                _refuse(f"enqueue {task}: {exc}; fix --args/--kwargs")
        job = app.enqueue(
            task, args, kwargs, EnqueueOptions(queue=queue, delay=delay, job_id=job_id)
        )
    except WorkerkitError as exc:
        _fail(exc, exitcodes.CONFIG_ERROR)
    click.echo(job)


def _native_app(settings: Settings) -> Any:
    from workerkit.app import App
    from workerkit.loading import import_app

    if settings.app:
        app = import_app(settings.app)
        if not isinstance(app, App):
            raise click.UsageError(f"--app {settings.app!r} is not a workerkit.App")
        app.configure_settings(settings)
        return app
    return App(settings=settings)


# --- run --------------------------------------------------------------------------------

_RUN_HELP = {
    "sql": """Run the sql engine's worker (workerkit's own SQL queue) under the supervisor.

    The app is a workerkit.App (--app MODULE:APP); every option is a setting.
    """,
    "rq": """Run an RQ worker under the supervisor.

    The app is a workerkit.engines.rq.RqApp, the allowlist of the tasks the worker may run
    (--app MODULE:APP). After the settings come the rq engine's own options (--worker-class,
    --serializer, --url, --with-scheduler).
    """,
    "celery": """Run a Celery worker under the supervisor.

    -A/--app takes what `celery -A` takes (proj, proj.celery, proj.celery:app). Options that
    are not workerkit's go to `celery worker`, e.g.
    `workerkit run celery -A proj --concurrency 4 -- --pool=threads -O fair`; an option that
    `celery worker` does not take is refused before anything starts.
    """,
}


@main.group()
def run() -> None:
    """Run ENGINE's worker under the supervisor (the container's entrypoint).

    On SIGTERM: readiness goes false, fetching stops, the job in hand may finish within the drain
    window; then it is asked to stop, released to the queue with its checkpoint, and the
    supervisor exits before the grace period ends.

    Each engine has its own options: `workerkit run ENGINE --help`.
    """


def _engine_option(option: EngineOption, *, hidden: bool) -> Callable[[F], F]:
    if option.is_flag:
        return click.option(
            option.flag, option.dest, is_flag=True, default=False, help=option.help, hidden=hidden
        )
    default = f" [default: {option.default}]" if option.default else ""
    return click.option(
        option.flag,
        option.dest,
        type=click.Choice(option.choices) if option.choices and not hidden else None,
        default=None,
        metavar=option.metavar,
        help=option.help + default,
        hidden=hidden,
    )


def _run_command(engine: str) -> click.Command:
    """``workerkit run ENGINE``: the settings that apply to it, and its own options."""

    def command(config_file: str | None, **options: Any) -> None:
        worker_args = tuple(options.pop("worker_args", ()))
        _run(engine, config_file, options, worker_args)

    decorated: Callable[..., None] = command
    if engine == "celery":
        decorated = click.argument("worker_args", nargs=-1, type=click.UNPROCESSED)(decorated)
    for name, engine_options in reversed(list(ENGINE_OPTIONS.items())):
        for option in reversed(engine_options):
            decorated = _engine_option(option, hidden=name != engine)(decorated)
    decorated = _setting_options(engine)(decorated)
    context: dict[str, Any] = {"max_content_width": 100}
    if engine == "celery":
        context["ignore_unknown_options"] = True
    return click.command(engine, help=_RUN_HELP[engine], context_settings=context)(decorated)


def _own_args(engine: str, options: dict[str, Any]) -> list[str]:
    """Take the engines' own options out of ``options``: ``engine``'s as arguments for it."""
    argv: list[str] = []
    for name, engine_options in ENGINE_OPTIONS.items():
        for option in engine_options:
            value = options.pop(option.dest, None)
            if value in (None, False):
                continue
            if name != engine:
                _refuse(
                    f"workerkit run {engine}: {option.flag} is an option of the {name} engine; "
                    f"the {engine} engine does not take it (see workerkit run {engine} --help)"
                )
            argv += [option.flag] if option.is_flag else [option.flag, str(value)]
    return argv


def _refuse_other_engines(engine: str, options: dict[str, Any]) -> None:
    """Refuse a setting given as an option that ``workerkit run ENGINE`` does not read."""
    for spec in setting_specs():
        if options.get(spec.name) is None or engine in spec.engines:
            continue
        owners = (
            f"a setting of the {' and '.join(spec.engines)} engine{'s' * (len(spec.engines) > 1)}"
            if spec.engines
            else "a setting of the scheduler: workerkit scheduler ENGINE"
        )
        _refuse(
            f"workerkit run {engine}: {spec.cli_flag} does not apply to the {engine} engine (it "
            f"is {owners}); remove it (see workerkit run {engine} --help)"
        )


def _refuse(message: str) -> NoReturn:
    click.echo(f"workerkit: configuration error: {message}", err=True)
    sys.exit(exitcodes.CONFIG_ERROR)


def _run(
    engine: str, config_file: str | None, options: dict[str, Any], worker_args: tuple[str, ...]
) -> None:
    from workerkit.engines import get_engine
    from workerkit.engines.appcheck import AppCheckStopped, AppCheckTimedOut, start_app_check
    from workerkit.logs import configure_logging

    own_args = _own_args(engine, options)
    _refuse_other_engines(engine, options)
    settings = _load(options, config_file, engine=engine)
    configure_logging(settings.log_level, settings.log_format)
    try:
        # The engine as the supervisor holds it imports none of the engine's libraries; the app
        # (which does) is loaded and checked by the worker, spawned now and held at its start
        # gate, or else in a forked child, while we import the rest.
        engine_impl = get_engine(settings.engine, [*own_args, *worker_args])
        from workerkit.supervisor import held_signals
        from workerkit.supervisor.early import start_early, stopped_while_loading

        held_signals.hold()  # a SIGTERM from here on waits for the supervisor, not lost

        early = start_early(settings, engine_impl)
        if early is not None:
            check = early.check
        else:
            check = start_app_check(settings.engine, [*own_args, *worker_args], settings)
        try:
            from workerkit.supervisor.runner import run_supervisor

            # Bounded as the startupProbe bounds the start; a held SIGTERM ends it at once.
            timing = check.result(settings.startup_timeout, held_signals.first)
        except BaseException:
            if early is not None:
                early.abandon()
            raise
    except AppCheckStopped as exc:
        sys.exit(stopped_while_loading(exc))
    except AppCheckTimedOut as exc:
        _fail(exc, exitcodes.STARTUP_FAILED)
        return
    except WorkerkitError as exc:
        _fail(exc, exitcodes.CONFIG_ERROR)
        return
    code = run_supervisor(settings, engine_impl, timing=timing, early=early)
    # Everything is settled and logged by now; skip the interpreter's teardown (finalizing the
    # engine's libraries takes longer than the whole idle drain), as PID 1 of a pod that is
    # being stopped has nothing left to clean up.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


for _engine in ENGINE_OPTIONS:
    run.add_command(_run_command(_engine))


# --- scheduler, schedules -----------------------------------------------------------------------

_ENGINE_CHOICE = click.Choice(list(ENGINE_OPTIONS))


@main.command()
@click.argument("engine", type=_ENGINE_CHOICE)
@_setting_options(None, short_app=True)
def scheduler(engine: str, config_file: str | None, **options: Any) -> None:
    """Run ENGINE's leader-elected scheduler under the supervisor (the container's entrypoint).

    Run 2 or more replicas: one leads and fires each schedule's times on time; the others stand
    by and fire a time nobody recorded scheduler_standby_delay after it, so a crashed leader
    costs a late fire, not a missed one. Every fire time is enqueued exactly once. On SIGTERM
    the leader hands its lease over at once and the process exits 0. The schedules are the
    app's (--app): see docs/concepts/scheduler.md.
    """
    from workerkit.engines import get_engine
    from workerkit.logs import configure_logging
    from workerkit.supervisor.scheduling import run_scheduler_supervisor

    settings = _load(options, config_file, engine=engine)
    configure_logging(settings.log_level, settings.log_format)
    if not settings.app:
        _refuse(
            f"workerkit scheduler {engine}: give the app whose schedules to run: --app "
            "MODULE:APP (or WORKERKIT_APP)"
        )
    try:
        engine_impl = get_engine(settings.engine, [])
    except WorkerkitError as exc:
        _fail(exc, exitcodes.CONFIG_ERROR)
        return
    code = run_scheduler_supervisor(settings, engine_impl)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@main.group(invoke_without_command=True)
@click.pass_context
def schedules(ctx: click.Context) -> None:
    """List the schedules, pause, resume or trigger one (the store's state, shared by replicas).

    Without a command: list, with the settings from the environment and the config file.
    """
    if ctx.invoked_subcommand is None:
        _schedules_list(None, {}, as_json=False)


def _engine_flag(func: F) -> F:
    return click.option(
        "--engine", "engine", default=None, help="sql, rq or celery [env: WORKERKIT_ENGINE]."
    )(func)


@schedules.command("list")
@_engine_flag
@click.option("--json", "as_json", is_flag=True, help="JSON for machines (times in epoch s).")
@settings_options
def schedules_list(config_file: str | None, as_json: bool, **options: Any) -> None:
    """Every schedule: its next fire times, its last fire and how it went, and who leads."""
    _schedules_list(config_file, options, as_json=as_json)


@schedules.command("pause")
@click.argument("name")
@_engine_flag
@settings_options
def schedules_pause(name: str, config_file: str | None, **options: Any) -> None:
    """Pause schedule NAME: no replica fires it until it is resumed (times meanwhile are
    missed, and follow its misfire policy on resume only within the misfire grace)."""
    _schedule_state(name, config_file, options, "pause")


@schedules.command("resume")
@click.argument("name")
@_engine_flag
@settings_options
def schedules_resume(name: str, config_file: str | None, **options: Any) -> None:
    """Resume schedule NAME."""
    _schedule_state(name, config_file, options, "resume")


@schedules.command("trigger")
@click.argument("name")
@_engine_flag
@settings_options
def schedules_trigger(name: str, config_file: str | None, **options: Any) -> None:
    """Fire schedule NAME now (once): the leader enqueues it within scheduler_retry_period,
    with the store's time now as its fire time."""
    _schedule_state(name, config_file, options, "trigger")


def _open_binding(settings: Settings) -> Any:
    """The engine's scheduler binding (the engine's module is imported only now)."""
    import importlib

    from workerkit.errors import StoreUnavailable

    try:
        module = importlib.import_module(f"workerkit.engines.{settings.engine}.scheduling")
        return module.open_scheduler(settings)
    except ImportError as exc:
        _refuse(f"the {settings.engine} engine's scheduler cannot be loaded: {exc}")
    except ConfigurationError as exc:
        _fail(exc, exitcodes.CONFIG_ERROR)
    except StoreUnavailable as exc:
        _fail(exc, exitcodes.STORE_UNAVAILABLE)


def _schedules_list(config_file: str | None, options: dict[str, Any], *, as_json: bool) -> None:
    from workerkit.errors import StoreUnavailable
    from workerkit.scheduler.overview import overview, render_text, to_json

    settings = _load(options, config_file)
    _debug_logging(settings)
    binding = _open_binding(settings)
    try:
        view = overview(binding)
    except StoreUnavailable as exc:
        _fail(exc, exitcodes.STORE_UNAVAILABLE)
        return
    finally:
        binding.store.close()
    click.echo(json.dumps(to_json(view), indent=2) if as_json else render_text(view))


def _schedule_state(name: str, config_file: str | None, options: dict[str, Any], what: str) -> None:
    from workerkit.errors import StoreUnavailable
    from workerkit.scheduler.overview import names

    settings = _load(options, config_file)
    _debug_logging(settings)
    binding = _open_binding(settings)
    store = binding.store
    try:
        if what == "trigger":
            at = store.clock()
            known = store.request_trigger(name, at)
        else:
            known = store.set_paused(name, what == "pause")
    except StoreUnavailable as exc:
        _fail(exc, exitcodes.STORE_UNAVAILABLE)
        return
    finally:
        store.close()
    if not known:
        listed = ", ".join(names(binding)) or "none"
        _refuse(
            f"schedules {what} {name}: the store knows no schedule {name!r} (the app's: "
            f"{listed}); a schedule is known once a leader registered it (workerkit scheduler "
            f"{settings.engine} running this code)"
        )
    done = {
        "pause": f"schedule {name} paused: no replica fires it until `workerkit schedules resume`",
        "resume": f"schedule {name} resumed",
        "trigger": f"schedule {name} triggered: the leader fires it within "
        f"{settings.scheduler_retry_period:g} s (scheduler_retry_period)",
    }
    click.echo(done[what])


main.add_command(dashboard_command(settings_options, _load))
