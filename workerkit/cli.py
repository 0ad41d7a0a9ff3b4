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
from typing import Any, TypeVar

import click

from workerkit import exitcodes
from workerkit.errors import ConfigurationError, WorkerkitError
from workerkit.settings import Settings, load_settings, setting_specs

__all__ = ("main",)

F = TypeVar("F", bound=Callable[..., Any])


def settings_options(func: F) -> F:
    """Add one option per setting (``--grace-period`` ...) and ``--config``.

    Options are read as text and parsed by :mod:`workerkit.settings`, so a bad value gets the
    same message whether it came from the command line, the environment or the config file.
    """
    for spec in reversed(setting_specs()):
        if spec.name == "engine":
            continue  # a positional argument where it matters (workerkit run ENGINE)
        if spec.name == "strict":
            func = click.option("--strict/--no-strict", "strict", default=None, help=spec.help)(
                func
            )
            continue
        env_hint = f" [env: {spec.env_var}; default: {_show_default(spec.default)}]"
        func = click.option(
            spec.cli_flag, spec.name, default=None, metavar="VALUE", help=spec.help + env_hint
        )(func)
    return click.option(
        "--config",
        "config_file",
        default=None,
        metavar="PATH",
        help="Config file (default: ./workerkit.toml, else [tool.workerkit] in ./pyproject.toml)"
        " [env: WORKERKIT_CONFIG].",
    )(func)


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


def _fail(exc: WorkerkitError, code: int) -> None:
    click.echo(f"workerkit: {exc}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="workerkit")
def main() -> None:
    """workerkit: deploy, scale down and crash queue workers without losing a job."""


# --- check ------------------------------------------------------------------------------


@main.command()
@click.option("--engine", "engine", default=None, help="sql, rq or celery [env: WORKERKIT_ENGINE].")
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="text for people, json for machines.",
)
@settings_options
def check(engine: str | None, output_format: str, config_file: str | None, **options: Any) -> None:
    """Check that the grace period, job timeouts and leases agree.

    Prints the timing budget as a timeline and a table of rules. Exits 0 when there is no
    error, 1 when there is one (warnings count as errors with --strict), 2 on a bad setting.
    """
    from workerkit.engines import get_engine
    from workerkit.engines.base import AppTiming
    from workerkit.timing import evaluate, render_json, render_text

    settings = _load(options, config_file, engine=engine)
    try:
        timing = get_engine(settings.engine).app_timing(settings) if settings.app else AppTiming()
    except WorkerkitError as exc:
        _fail(exc, exitcodes.CONFIG_ERROR)
        return
    report = evaluate(settings, timing.tasks, timing.celery)
    if output_format == "json":
        click.echo(render_json(report))
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
    except WorkerkitError as exc:
        _fail(exc, exitcodes.STORE_UNAVAILABLE)
    click.echo(f"schema is at revision {revision}")


@db.command("check")
@settings_options
def db_check(config_file: str | None, **options: Any) -> None:
    """Say whether the schema is current; exit 0 only when it is."""
    from workerkit.engines.sql import check_schema

    settings = _load(options, config_file)
    health = check_schema(settings.database_url)
    click.echo(health.reason)
    sys.exit(exitcodes.OK if health.ok else exitcodes.CHECK_FAILED)


# --- enqueue ----------------------------------------------------------------------------


@main.command()
@click.argument("task")
@click.option("--args", "args_json", default="[]", help="Positional arguments as a JSON list.")
@click.option("--kwargs", "kwargs_json", default="{}", help="Keyword arguments as a JSON object.")
@click.option("--queue", default=None, help="Queue (default: the task's own, else 'default').")
@click.option("--delay", type=float, default=None, help="Run no sooner than this many seconds.")
@click.option("--job-id", default=None, help="Job id; enqueuing the same id twice is a no-op.")
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
    """Put one job on the SQL queue and print its id."""
    from workerkit.app import EnqueueOptions

    settings = _load(options, config_file)
    try:
        args = json.loads(args_json)
        kwargs = json.loads(kwargs_json)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}") from exc
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise click.BadParameter("--args must be a JSON list and --kwargs a JSON object")
    app = _native_app(settings)
    try:
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


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("engine", type=click.Choice(["sql", "rq", "celery"]))
@settings_options
@click.argument("worker_args", nargs=-1, type=click.UNPROCESSED)
def run(engine: str, config_file: str | None, worker_args: tuple[str, ...], **options: Any) -> None:
    """Run ENGINE's worker under the supervisor (the container's entrypoint).

    On SIGTERM: readiness goes false, fetching stops, the job in hand may finish within the drain
    window; then it is asked to stop, released to the queue with its checkpoint, and the
    supervisor exits before the grace period ends.

    Arguments after the options go to the engine's own worker (for celery, options of
    `celery worker`), e.g. `workerkit run celery --app proj:app -- --pool=threads`.
    """
    from workerkit.engines import get_engine
    from workerkit.logs import configure_logging
    from workerkit.supervisor.runner import run_supervisor

    settings = _load(options, config_file, engine=engine)
    configure_logging(settings.log_level, settings.log_format)
    try:
        engine_impl = get_engine(settings.engine, worker_args)
        timing = engine_impl.app_timing(settings)
    except WorkerkitError as exc:
        _fail(exc, exitcodes.CONFIG_ERROR)
        return
    code = run_supervisor(settings, engine_impl, timing=timing)
    # Everything is settled and logged by now; skip the interpreter's teardown (finalizing the
    # engine's libraries takes longer than the whole idle drain), as PID 1 of a pod that is
    # being stopped has nothing left to clean up.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
