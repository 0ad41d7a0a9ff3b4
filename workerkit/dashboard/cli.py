"""``workerkit dashboard ENGINE``: serve the web view of ENGINE's store with uvicorn.

Imports no web library (nor any engine's) until the command runs, so ``workerkit --help`` stays
light. Binds 127.0.0.1 by default; any other address needs ``--token-file`` or
``--basic-auth-file`` (refused with exit 2 otherwise). docs/howto/dashboard.md.
"""

from __future__ import annotations

import importlib
import ipaddress
import logging
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from workerkit import exitcodes
from workerkit.errors import ConfigurationError, StoreUnavailable

if TYPE_CHECKING:
    from workerkit.dashboard.model import DashboardSource
    from workerkit.settings import Settings

__all__ = ("ENV_VARS", "allowed_hosts", "dashboard_command", "is_loopback")

F = TypeVar("F", bound=Callable[..., Any])

log = logging.getLogger("workerkit.dashboard")

#: The command's own variables (not settings: they configure this command only).
ENV_VARS = {
    "host": "WORKERKIT_DASHBOARD_HOST",
    "port": "WORKERKIT_DASHBOARD_PORT",
    "token_file": "WORKERKIT_DASHBOARD_TOKEN_FILE",
    "basic_auth_file": "WORKERKIT_DASHBOARD_BASIC_AUTH_FILE",
    "refresh": "WORKERKIT_DASHBOARD_REFRESH",
    "allowed_host": "WORKERKIT_DASHBOARD_ALLOWED_HOSTS",
    "secure_cookies": "WORKERKIT_DASHBOARD_SECURE_COOKIES",
}


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str, given: tuple[str, ...] | list[str]) -> list[str]:
    """The ``Host`` names to serve besides the loopback ones: ``--host`` (unless it is a
    wildcard address such as 0.0.0.0, which no client names), then each ``--allowed-host``
    (a value may hold several, comma-separated, as the variable does)."""
    names = [name.strip() for value in given for name in value.split(",") if name.strip()]
    try:
        wildcard = ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        wildcard = False
    return names if wildcard else [host, *names]


def _refuse(message: str, code: int = exitcodes.CONFIG_ERROR) -> NoReturn:
    click.echo(f"workerkit dashboard: {message}", err=True)
    sys.exit(code)


def _options(func: F) -> F:
    options = [
        click.option("--host", default="127.0.0.1", show_default=True, envvar=ENV_VARS["host"],
                     help="Address to bind. Anything but a loopback address needs --token-file "
                     f"or --basic-auth-file [env: {ENV_VARS['host']}]."),
        click.option("--port", type=click.IntRange(0, 65535), default=8089, show_default=True,
                     envvar=ENV_VARS["port"], help=f"Port to bind [env: {ENV_VARS['port']}]."),
        click.option("--token-file", default=None, metavar="FILE", envvar=ENV_VARS["token_file"],
                     help="A file holding a token (16 characters or more): requests carry it as "
                     "`Authorization: Bearer TOKEN`, or log in with it once (a cookie) "
                     f"[env: {ENV_VARS['token_file']}]."),
        click.option("--basic-auth-file", default=None, metavar="FILE",
                     envvar=ENV_VARS["basic_auth_file"],
                     help="A file of USER:PASSWORD lines for HTTP basic auth (the password plain "
                     "or a pbkdf2_sha256 hash from workerkit.dashboard.auth.hash_password) "
                     f"[env: {ENV_VARS['basic_auth_file']}]."),
        click.option("--refresh", type=click.FloatRange(min=0), default=2.0, show_default=True,
                     envvar=ENV_VARS["refresh"],
                     help="Seconds between live updates of the pages (0: none) "
                     f"[env: {ENV_VARS['refresh']}]."),
        click.option("--allowed-host", multiple=True, metavar="NAME",
                     envvar=ENV_VARS["allowed_host"],
                     help="A Host name to serve besides localhost, 127.0.0.1, [::1] and --host "
                     "(the name of your proxy or Ingress; *.example.com for subdomains); "
                     "repeatable. Requests for any other name answer 400 (DNS rebinding) "
                     f"[env: {ENV_VARS['allowed_host']}, comma-separated]."),
        click.option("--secure-cookies", is_flag=True, default=False,
                     envvar=ENV_VARS["secure_cookies"],
                     help="Set the Secure flag on every cookie, also over plain HTTP: behind a "
                     "proxy that terminates TLS [env: "
                     f"{ENV_VARS['secure_cookies']}]."),
    ]  # fmt: skip
    for option in reversed(options):
        func = option(func)
    return func


def dashboard_command(
    settings_options: Callable[[Callable[..., None]], Callable[..., None]],
    load: Callable[..., Settings],
) -> click.Command:
    """The command, with the settings options and loader of ``workerkit.cli`` (handed in, so
    that this module does not import the CLI that registers it)."""

    def command(engine: str, config_file: str | None, **options: Any) -> None:
        own = {name: options.pop(name) for name in ENV_VARS}
        settings = load(options, config_file, engine=engine)
        serve(engine, settings, **own)

    decorated: Callable[..., None] = _options(settings_options(command))
    decorated = click.argument("engine", type=click.Choice(["sql", "rq", "celery"]))(decorated)
    return click.command(
        "dashboard",
        help="""Serve a web view of ENGINE's queues, jobs, workers and schedules, with actions.

    Read-mostly: queue depths and throughput, jobs by state (search by id, task or idempotency
    key), workers with their lifecycle state and drain deadline, schedules and their leader;
    retry, discard and cancel jobs, pause and resume queues and schedules, trigger a schedule,
    each confirmed, fenced and logged. Binds 127.0.0.1 unless told otherwise (then it needs
    --token-file or --basic-auth-file). Needs workerkit[dashboard].
    """,
        context_settings={"max_content_width": 100},
    )(decorated)


def serve(
    engine: str,
    settings: Settings,
    *,
    host: str,
    port: int,
    token_file: str | None,
    basic_auth_file: str | None,
    refresh: float,
    allowed_host: tuple[str, ...] = (),
    secure_cookies: bool = False,
) -> None:
    """Check the flags, open the source, serve until SIGTERM or SIGINT."""
    from workerkit.dashboard.auth import check_allowed_hosts, load_credentials
    from workerkit.logs import configure_logging

    if not is_loopback(host) and not (token_file or basic_auth_file):
        _refuse(
            f"--host {host} is not a loopback address: anyone who reaches it could act on your "
            "jobs; give --token-file FILE or --basic-auth-file FILE, or bind --host 127.0.0.1 "
            "and reach it through `kubectl port-forward`"
        )
    configure_logging(settings.log_level, settings.log_format)
    try:
        credentials = load_credentials(token_file, basic_auth_file)
        allowed = check_allowed_hosts(allowed_hosts(host, allowed_host))
        import uvicorn

        from workerkit.dashboard.app import create_app
        from workerkit.dashboard.web import DashboardOptions
    except ConfigurationError as exc:
        _refuse(str(exc))
    except ImportError as exc:
        _refuse(f"the web stack is not installed ({exc}): pip install 'workerkit[dashboard]'")
    source = _open(engine, settings)
    options = DashboardOptions(
        credentials=credentials,
        refresh=refresh,
        allowed_hosts=allowed,
        secure_cookies=secure_cookies,
    )
    app = create_app(source, options=options)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http="h11",
        loop="asyncio",
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
    )
    server = uvicorn.Server(config)
    log.info(
        "starting the dashboard of the %s engine on http://%s:%d/",
        engine,
        host,
        port,
        extra={"event": "dashboard_starting", "host": host, "port": port, "engine": engine},
    )
    # uvicorn shuts down on SIGTERM/SIGINT, then raises the signal again for the handler that was
    # there before it: a no-op, so that a clean stop exits 0 (not 143, nor a KeyboardInterrupt).
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    try:
        server.run()
    except SystemExit:
        if not server.started:
            _refuse(f"cannot serve on {host}:{port} (see the log above)", exitcodes.STARTUP_FAILED)
        raise
    finally:
        source.close()
    if not server.started:
        _refuse(f"cannot serve on {host}:{port} (see the log above)", exitcodes.STARTUP_FAILED)


def _open(engine: str, settings: Settings) -> DashboardSource:
    """The engine's source, opened once now (a bad setting exits 2); when the store is down,
    a :class:`LazySource` that opens it on the first request that finds it up."""
    from workerkit.dashboard.lazy import LazySource

    try:
        module = importlib.import_module(f"workerkit.engines.{engine}.dashboard")
    except ImportError as exc:
        _refuse(f"the {engine} engine's dashboard source cannot be loaded: {exc}")
    source = LazySource(engine, lambda: module.open_source(settings))
    try:
        source.get()
    except ConfigurationError as exc:
        _refuse(str(exc))
    except StoreUnavailable as exc:
        log.warning(
            "the %s store is unreachable: %s; serving the 503 page until it answers",
            engine,
            exc,
            extra={"event": "dashboard_store_unavailable", "error": str(exc)},
        )
    return source
