"""Settings: every knob, its default, its environment variable, and how it is read.

Defaults live here and nowhere else (the CLI and docs/reference/settings.md, checked by a test,
take them from here). Precedence: ``--option``, then ``WORKERKIT_*``, then the config file
(``--config``, ``WORKERKIT_CONFIG``, ``workerkit.toml`` or ``[tool.workerkit]``), then the
default. A bad value refuses to start with a :class:`~workerkit.errors.SettingError` naming the
key, the value and what is accepted (docs/reference/settings.md).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from workerkit.errors import ConfigurationError, SettingError, UnknownSetting
from workerkit.parsers import (
    choice,
    optional,
    parse_bool,
    parse_database_url,
    parse_int,
    parse_seconds,
    parse_str,
    parse_str_list,
    redacted,
)

__all__ = (
    "DEFAULT_QUEUES",
    "ENGINES",
    "ENGINE_DEFAULT_VISIBILITY_TIMEOUT",
    "ENV_PREFIX",
    "MAX_SECONDS",
    "Engine",
    "SettingSpec",
    "Settings",
    "find_config_file",
    "load_settings",
    "setting_specs",
    "settings_to_env",
)

ENV_PREFIX = "WORKERKIT_"
Engine = Literal["sql", "rq", "celery"]
ENGINES: tuple[Engine, ...] = ("sql", "rq", "celery")

#: V when ``visibility_timeout`` is not set. On sql and rq it is workerkit's own job lease, which
#: heartbeats extend, so it can be short: it bounds how long a crashed worker's job waits. On
#: celery it is the Redis transport's ``visibility_timeout``, which nothing can extend, so it is
#: kombu's own default and must stay above the longest run (see docs/concepts/timing-budget.md).
ENGINE_DEFAULT_VISIBILITY_TIMEOUT: Mapping[Engine, float] = {
    "sql": 30.0,
    "rq": 30.0,
    "celery": 3600.0,
}

#: The queues sql and rq consume when ``queues`` is not set. The celery engine consumes what
#: ``celery worker`` without ``-Q`` does instead: the app's ``task_queues``, else its
#: ``task_default_queue`` (``celery`` unless the app sets it).
DEFAULT_QUEUES: tuple[str, ...] = ("default",)


#: The longest duration any setting accepts (about 31 years). Every duration ends up in a wait,
#: a deadline or a key's TTL; a wait past the platform's limit (``threading.TIMEOUT_MAX``, and
#: less once added to the clock) raises OverflowError in the worker instead of waiting.
MAX_SECONDS = 1e9


@dataclass(frozen=True)
class SettingSpec:
    """How one setting is named, documented, parsed and bounded."""

    name: str
    default: object
    help: str
    parse: Callable[[object], Any]
    minimum: float | None = None
    exclusive_minimum: bool = False
    maximum: float | None = None
    symbol: str = ""
    #: The engines whose ``workerkit run ENGINE`` reads it; () for the scheduler's settings (read
    #: by ``workerkit scheduler`` and ``workerkit check``). ``workerkit run`` refuses the option
    #: of another engine.
    engines: tuple[str, ...] = ENGINES
    #: Why the lower bound is where it is, said when a value is under it.
    minimum_why: str = ""
    #: Why the upper bound is where it is, said when a value is over it.
    maximum_why: str = ""

    @property
    def env_var(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def cli_flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def coerce(self, raw: object, source: str) -> Any:
        """Parse and bound-check one raw value; raise SettingError saying what is accepted."""
        shown = redacted(raw) if self.name.endswith("_url") else raw
        try:
            value = self.parse(raw)
        except ValueError as exc:
            raise SettingError(self.name, shown, f"expected {exc}", source) from None
        if value is None or (self.minimum is None and self.maximum is None):
            return value
        if isinstance(value, int | float):
            low = self.minimum
            if low is not None and (value <= low if self.exclusive_minimum else value < low):
                bound = f"above {low:g}" if self.exclusive_minimum else f"at least {low:g}"
                why = f" ({self.minimum_why})" if self.minimum_why else ""
                raise SettingError(self.name, shown, f"expected a value {bound}{why}", source)
            if self.maximum is not None and value > self.maximum:
                why = f" ({self.maximum_why})" if self.maximum_why else ""
                raise SettingError(
                    self.name, shown, f"expected a value at most {self.maximum:g}{why}", source
                )
        return value

    @property
    def bounds(self) -> str:
        """The accepted range as text (``> 0``, ``0.1 - 1e+09``...), "" when unbounded."""
        low = self.minimum
        high = self.maximum
        if low is None and high is None:
            return ""
        if low is None:
            return f"<= {high:g}"
        if high is None:
            return f"> {low:g}" if self.exclusive_minimum else f">= {low:g}"
        return f"> {low:g}, <= {high:g}" if self.exclusive_minimum else f"{low:g} - {high:g}"


def _s(
    default: object,
    help: str,  # noqa: A002 - mirrors click's vocabulary
    parse: Callable[[object], Any],
    *,
    minimum: float | None = None,
    exclusive_minimum: bool = False,
    maximum: float | None = None,
    symbol: str = "",
    engines: tuple[str, ...] = ENGINES,
    minimum_why: str = "",
    maximum_why: str = "",
) -> Any:
    if maximum is None and parse in (_seconds, _opt_seconds):
        maximum = MAX_SECONDS  # every duration: see MAX_SECONDS
        maximum_why = maximum_why or "about 31 years; a longer wait overflows the clock"
    meta = {
        "engines": engines,
        "help": help,
        "parse": parse,
        "minimum": minimum,
        "exclusive_minimum": exclusive_minimum,
        "maximum": maximum,
        "symbol": symbol,
        "minimum_why": minimum_why,
        "maximum_why": maximum_why,
    }
    return field(default=default, metadata=meta)


_seconds = parse_seconds
_opt_seconds = optional(parse_seconds)

_NAMESPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _namespace(raw: object) -> str:
    """A name that fits a Redis key prefix and a SQL key column as it is."""
    text = parse_str(raw).strip()
    if not _NAMESPACE.fullmatch(text):
        raise ValueError(
            "1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit, "
            "such as 'billing'"
        )
    return text


@dataclass(frozen=True)
class Settings:
    """Every workerkit setting, with its default. Build it with :func:`load_settings`."""

    # What to run.
    engine: str = _s("sql", "Which engine runs the jobs: sql, rq or celery.", choice(*ENGINES))
    app: str | None = _s(None, "The application to load, as MODULE:ATTRIBUTE.", optional(parse_str))
    queues: tuple[str, ...] | None = _s(
        None,
        "Queues to consume, comma-separated. Not set: `default`; celery: the app's queues, "
        "as `celery worker` without -Q (`task_default_queue`, `celery` unless set).",
        optional(parse_str_list),
    )
    concurrency: int = _s(
        1, "Jobs one worker runs at once.", parse_int, minimum=1, engines=("sql", "celery")
    )
    prefetch: int = _s(
        4,
        "Jobs a worker claims ahead and holds for its next free slots (leased, not started; "
        "put back at a stop). 0: claim only for free slots.",
        parse_int,
        minimum=0,
        engines=("sql",),
    )
    replicas: int = _s(
        1,
        "How many worker pods or hosts share the queue (SQLite allows only one).",
        parse_int,
        minimum=1,
        engines=("sql",),
    )
    database_url: str = _s(
        "sqlite:///workerkit.sqlite3",
        "SQLAlchemy URL of the SQL queue and store: sqlite:///PATH (one host) or "
        "postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB (postgres:// and postgresql:// use "
        "psycopg 3).",
        parse_database_url,
        engines=("sql",),
    )
    redis_url: str = _s(
        "redis://127.0.0.1:6379/0", "URL of the Redis server.", parse_str, engines=("rq", "celery")
    )

    # The timing budget (docs/concepts/timing-budget.md).
    grace_period: float = _s(
        30.0,
        "The pod's terminationGracePeriodSeconds (G).",
        _seconds,
        minimum=0,
        exclusive_minimum=True,
        symbol="G",
    )
    prestop_delay: float = _s(
        0.0, "Time a preStop hook takes, inside G (P).", _seconds, minimum=0, symbol="P"
    )
    release_margin: float = _s(
        5.0,
        "Time kept to stop the job, save its checkpoint, release it and exit (M).",
        _seconds,
        minimum=0,
        exclusive_minimum=True,
        symbol="M",
    )
    job_timeout: float = _s(
        300.0,
        "Hard limit on one run of a job, for tasks that set none (J).",
        _seconds,
        minimum=0,
        exclusive_minimum=True,
        symbol="J",
    )
    visibility_timeout: float | None = _s(
        None,
        "When an unacknowledged job is given to another worker (V): the job lease on sql and "
        "rq (30), the broker's visibility timeout on celery (3600).",
        _opt_seconds,
        minimum=1,
        symbol="V",
        minimum_why="a shorter lease expires on one slow round trip, and its heartbeat (V / 3) "
        "would renew it in a busy loop",
    )
    heartbeat_interval: float | None = _s(
        None,
        "How often a running job's lease is renewed (H); default V / 3.",
        _opt_seconds,
        minimum=0.1,
        symbol="H",
        engines=("sql", "rq"),
        minimum_why="renewing leases more than 10 times a second is a busy loop that burns CPU "
        "and store writes",
    )
    recovery_window: float = _s(
        30.0,
        "celery: how long the unacknowledged messages of a worker that died may wait before a "
        "live worker puts them back in their queue (W); far below visibility_timeout.",
        _seconds,
        minimum=1,
        symbol="W",
        engines=("celery",),
    )
    checkpoint_interval: float = _s(
        5.0,
        "The longest a checkpoint may wait before it is saved (F).",
        _seconds,
        minimum=0,
        exclusive_minimum=True,
        symbol="F",
    )
    idempotency_in_progress_expiry: float | None = _s(
        None,
        "When a claimed idempotency key may be taken over (Ip); default J + 30.",
        _opt_seconds,
        minimum=0,
        exclusive_minimum=True,
        symbol="Ip",
    )
    idempotency_retention: float = _s(
        86400.0,
        "How long a completed idempotency key is remembered (R).",
        _seconds,
        minimum=0,
        exclusive_minimum=True,
        symbol="R",
    )
    max_countdown: float = _s(
        0.0,
        "The longest ETA or countdown any job is enqueued with (celery's visibility timeout "
        "must exceed it).",
        _seconds,
        minimum=0,
        engines=("celery",),
    )
    # The scheduler (workerkit scheduler ENGINE; docs/concepts/scheduler.md).
    scheduler_lease_duration: float = _s(
        15.0,
        "Scheduler leadership lease: how long a standby waits for a silent leader (L).",
        _seconds,
        minimum=0,
        exclusive_minimum=True,
        symbol="L",
        engines=(),
    )
    scheduler_renew_deadline: float = _s(
        10.0,
        "A leader that has not renewed its lease for this long stops firing (Rd).",
        _seconds,
        minimum=0,
        exclusive_minimum=True,
        symbol="Rd",
        engines=(),
    )
    scheduler_retry_period: float = _s(
        2.0,
        "How often a scheduler renews or tries to acquire leadership, and polls trigger "
        "requests (Rp).",
        _seconds,
        minimum=0.05,
        symbol="Rp",
        engines=(),
        minimum_why="renewing a lease more than 20 times a second is a busy loop on the store",
    )
    scheduler_standby_delay: float = _s(
        0.5,
        "A standby fires a fire time nobody recorded this long after it (Sd): a crashed "
        "leader costs a late fire, not a missed one.",
        _seconds,
        minimum=0,
        symbol="Sd",
        engines=(),
    )
    scheduler_misfire_grace: float = _s(
        2.0,
        "A fire time later than this is missed and follows its schedule's misfire policy; "
        "within it, it still fires late (Mg).",
        _seconds,
        minimum=0,
        exclusive_minimum=True,
        symbol="Mg",
        engines=(),
    )
    scheduler_retention: float = _s(
        604800.0,
        "How long fire records are kept (each schedule's last one always is).",
        _seconds,
        minimum=60,
        engines=(),
        minimum_why="the records are what keeps a fire time from firing twice, and a standby "
        "may fire up to the misfire grace late",
    )
    scheduler_namespace: str = _s(
        "default",
        "Separates the leases, schedules and fire records of schedulers that share one store "
        "(two apps on one database or Redis): each app's scheduler Deployment sets its own.",
        _namespace,
        engines=(),
    )
    strict: bool = _s(False, "Treat timing-budget warnings as errors.", parse_bool)

    # Queue behaviour.
    poll_interval: float = _s(
        1.0,
        "How often an idle SQL worker looks for new jobs when it is not woken sooner.",
        _seconds,
        minimum=0.01,
        maximum=60,
        engines=("sql",),
        minimum_why="polling more than 100 times a second is a busy loop",
        maximum_why="an idle worker not woken by PostgreSQL's NOTIFY (SQLite, a missed "
        "notification) would leave a new job waiting longer than a minute",
    )
    finished_job_retention: float = _s(
        604800.0,
        "How long SQL workers keep succeeded jobs before deleting them (one worker at a time, "
        "at most once a minute, in batches); 0 keeps them until `workerkit db purge`.",
        _seconds,
        minimum=0,
        engines=("sql",),
    )
    failed_job_retention: float | None = _s(
        None,
        "How long SQL workers keep failed jobs (the dead-letter queue) before deleting them; "
        "unset keeps them until `workerkit db purge --state failed`.",
        _opt_seconds,
        minimum=0,
        exclusive_minimum=True,
        engines=("sql",),
    )
    max_payload_bytes: int = _s(
        1_048_576,
        "Largest encoded job payload accepted at enqueue.",
        parse_int,
        minimum=1,
        engines=("sql",),
    )

    # Operations.
    http_host: str = _s("0.0.0.0", "Address the probes and /metrics listen on.", parse_str)  # noqa: S104 - pods are reached on their own IP
    http_port: int = _s(
        8080,
        "Port of the probes and /metrics (0 turns HTTP off).",
        parse_int,
        minimum=0,
        maximum=65535,
    )
    liveness_timeout: float = _s(
        60.0,
        "How stale the worker's heartbeat may be before /livez fails.",
        _seconds,
        minimum=3,
        minimum_why="the worker reports every 2 s: a shorter timeout fails /livez between two "
        "reports and gets a healthy pod restarted",
    )
    startup_timeout: float = _s(
        120.0,
        "How long workerkit run waits for the app to load (an import still running then has "
        "its stacks logged and the start fails, exit 4); rq, sql: also how long the worker keeps "
        "retrying an unreachable Redis or database at start (not ready, each retry logged) "
        "before it exits with STORE_UNAVAILABLE (3). At most the startupProbe's periodSeconds x "
        "failureThreshold.",
        _seconds,
        minimum=1,
        minimum_why="a store that is starting or restarting needs seconds to answer",
    )
    log_level: str = _s(
        "info", "Log level.", choice("debug", "info", "warning", "error", "critical")
    )
    log_format: str = _s(
        "json", "Log format: json (one object a line) or text.", choice("json", "text")
    )

    # --- derived values of the timing budget ---------------------------------------------

    @property
    def drain_window(self) -> float:
        """D = G - P - M: how long the job in hand may run on after SIGTERM."""
        return self.grace_period - self.prestop_delay - self.release_margin

    @property
    def effective_visibility_timeout(self) -> float:
        """V, with the engine's default when not set."""
        if self.visibility_timeout is not None:
            return self.visibility_timeout
        return ENGINE_DEFAULT_VISIBILITY_TIMEOUT[cast(Engine, self.engine)]

    @property
    def effective_heartbeat_interval(self) -> float:
        """H, V / 3 when not set."""
        if self.heartbeat_interval is not None:
            return self.heartbeat_interval
        return self.effective_visibility_timeout / 3

    @property
    def effective_idempotency_in_progress_expiry(self) -> float:
        """Ip, J + 30 when not set."""
        if self.idempotency_in_progress_expiry is not None:
            return self.idempotency_in_progress_expiry
        return self.job_timeout + 30.0

    @property
    def queue_names(self) -> tuple[str, ...]:
        """The queues set, else ``default`` (the celery engine asks the app instead)."""
        return self.queues if self.queues is not None else DEFAULT_QUEUES

    def replace(self, **changes: Any) -> Settings:
        """A copy with some settings changed (values are checked like any other source)."""
        specs = {spec.name: spec for spec in setting_specs()}
        checked = {}
        for key, raw in changes.items():
            if key not in specs:
                raise _unknown_key(key, "Settings.replace()")
            checked[key] = specs[key].coerce(raw, "Settings.replace()")
        return dataclasses.replace(self, **checked)


def setting_specs() -> tuple[SettingSpec, ...]:
    """Every setting's spec, in declaration order."""
    specs = []
    for f in dataclasses.fields(Settings):
        meta = f.metadata
        specs.append(
            SettingSpec(
                name=f.name,
                default=f.default,
                help=meta["help"],
                parse=meta["parse"],
                minimum=meta["minimum"],
                exclusive_minimum=meta["exclusive_minimum"],
                maximum=meta["maximum"],
                symbol=meta["symbol"],
                engines=meta["engines"],
                minimum_why=meta["minimum_why"],
                maximum_why=meta["maximum_why"],
            )
        )
    return tuple(specs)


#: Settings that were renamed: the old name's error names the new one.
_RENAMED: dict[str, str] = {
    "leader_lease": "scheduler_lease_duration",
    "renew_deadline": "scheduler_renew_deadline",
    "retry_period": "scheduler_retry_period",
}


def _unknown_key(key: str, source: str) -> UnknownSetting:
    names = [spec.name for spec in setting_specs()]
    wanted = key.replace("-", "_").lower()
    close = [_RENAMED[wanted]] if wanted in _RENAMED else []
    close = close or difflib.get_close_matches(wanted, names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return UnknownSetting(
        key, f"{hint}the settings are listed in docs/reference/settings.md", source
    )


def find_config_file(cwd: Path, explicit: str | None) -> tuple[Path, bool] | None:
    """The config file to read and whether it is a pyproject.toml, or None."""
    if explicit:
        path = Path(explicit)
        if not path.is_absolute():
            path = cwd / path
        if not path.is_file():
            raise ConfigurationError(
                f"config file {str(path)!r} (from --config or {ENV_PREFIX}CONFIG) does not exist"
            )
        return path, path.name == "pyproject.toml"
    own = cwd / "workerkit.toml"
    if own.is_file():
        return own, False
    pyproject = cwd / "pyproject.toml"
    if pyproject.is_file():
        return pyproject, True
    return None


def _read_config_file(path: Path, is_pyproject: bool) -> dict[str, object]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"config file {str(path)!r} cannot be read: {exc}") from exc
    if is_pyproject:
        tool = data.get("tool", {})
        table = tool.get("workerkit", {}) if isinstance(tool, dict) else {}
        if not isinstance(table, dict):
            raise ConfigurationError(f"{path}: [tool.workerkit] must be a table")
        return table
    return data


# Kubernetes injects <SERVICE>_SERVICE_HOST, <SERVICE>_PORT, <SERVICE>_PORT_8080_TCP... for every
# Service in the namespace; a Service named "workerkit" would look like settings of ours.
_K8S_SERVICE_LINK_PREFIXES = ("SERVICE_", "PORT")
# Variables of ours that are not settings: the config file's path, the event socket, the pid
# and the start gate's pipes (engines/startgate.py) the supervisor hands its child, whether it
# forks that child (supervisor/forked.py), engine
# options read by the engine (engines/rq/options.py), and the options of `workerkit dashboard`
# (workerkit/dashboard/cli.py), which are not settings.
_ENV_NOT_SETTINGS = frozenset(
    {
        "CONFIG",
        "SUPERVISOR_SOCKET",
        "SUPERVISOR_PID",
        "START_GATE",
        "APP_CHECK",
        "FORK_WORKER",
        "RQ_SERIALIZER",
        "DASHBOARD_HOST",
        "DASHBOARD_PORT",
        "DASHBOARD_TOKEN_FILE",
        "DASHBOARD_BASIC_AUTH_FILE",
        "DASHBOARD_REFRESH",
        "DASHBOARD_ALLOWED_HOSTS",
        "DASHBOARD_SECURE_COOKIES",
    }
)


def load_settings(
    cli: Mapping[str, object] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    config_file: str | None = None,
) -> Settings:
    """Read the settings from the CLI, the environment and the config file, in that order.

    ``cli`` maps setting names to values given on the command line (``None`` means not given).
    """
    env = os.environ if env is None else env
    cwd = Path.cwd() if cwd is None else cwd
    specs = {spec.name: spec for spec in setting_specs()}
    values: dict[str, object] = {}

    located = find_config_file(cwd, config_file or env.get(ENV_PREFIX + "CONFIG"))
    if located is not None:
        path, is_pyproject = located
        where = f"{path.name} [tool.workerkit]" if is_pyproject else str(path.name)
        for key, raw in _read_config_file(path, is_pyproject).items():
            name = key.replace("-", "_")
            if name not in specs:
                raise _unknown_key(key, where)
            values[name] = specs[name].coerce(raw, where)

    for var, raw in env.items():
        if not var.startswith(ENV_PREFIX):
            continue
        suffix = var[len(ENV_PREFIX) :]
        name = suffix.lower()
        if name in specs:
            values[name] = specs[name].coerce(raw, f"${var}")
        elif suffix not in _ENV_NOT_SETTINGS and not suffix.startswith(_K8S_SERVICE_LINK_PREFIXES):
            raise _unknown_key(suffix.lower(), f"environment variable {var}")

    for name, raw in (cli or {}).items():
        if raw is None:
            continue
        if name not in specs:
            raise _unknown_key(name, "command line")
        values[name] = specs[name].coerce(raw, specs[name].cli_flag)

    return Settings(**values)  # type: ignore[arg-type]


def settings_to_env(settings: Settings) -> dict[str, str]:
    """Every setting as its ``WORKERKIT_*`` variable, so a child process reads the same values.

    The supervisor starts the engine's worker with these in its environment: the child's
    :func:`load_settings` then sees exactly what the supervisor resolved, whatever mix of
    options, variables and config file produced it.
    """
    env = {}
    for spec in setting_specs():
        value = getattr(settings, spec.name)
        if value is None:
            text = ""
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, tuple):
            text = ",".join(value)
        else:
            text = str(value)
        env[spec.env_var] = text
    return env
