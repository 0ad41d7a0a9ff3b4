"""The flags of ``workerkit drill ENGINE`` (and ``drill local``, which adds its own) and the
command around :func:`~workerkit.drill.run.run_drill`.

Thin, as every command: parse the flags (``--rate 50/s``, ``--duration 2m``, ``--mix
short=90,long=5``), load the settings as ``workerkit run ENGINE`` would, show live counts (a
line rewritten in place on a terminal, plain lines otherwise), print the report, exit 0 only
when every canary completed exactly once. Imports no engine library until a drill runs.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from typing import IO, Any, Final, TypeVar

import click

from workerkit import exitcodes
from workerkit.errors import ConfigurationError, StoreUnavailable, WorkerkitError

__all__ = (
    "ENGINES",
    "ProgressPrinter",
    "drill_options",
    "engine_command",
    "parse_duration",
    "parse_mix",
    "parse_rate",
    "spec_from_options",
)

F = TypeVar("F", bound=Callable[..., Any])

ENGINES: Final = ("sql", "rq", "celery")

_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(raw: str, flag: str) -> float:
    """``120``, ``120s``, ``2m``, ``1.5h``, ``500ms`` -> seconds; ConfigurationError otherwise."""
    text = raw.strip().lower()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if text.endswith(unit) and text[: -len(unit)].strip():
            number, scale = text[: -len(unit)], _UNITS[unit]
            break
    else:
        number, scale = text, 1.0
    try:
        value = float(number) * scale
    except ValueError:
        raise ConfigurationError(
            f"{flag}: {raw!r} is not a duration; give seconds such as 120, 120s, 2m or 500ms"
        ) from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigurationError(f"{flag}: {raw!r} is not a finite duration")
    return value


def parse_rate(raw: str) -> float:
    """``50``, ``50/s``, ``600/m`` -> canaries per second."""
    text = raw.strip().lower()
    number, _, per = text.partition("/")
    per_seconds = {"": 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}.get(per.strip())
    try:
        value = float(number)
    except ValueError:
        value = float("nan")
    if per_seconds is None or not value > 0 or value == float("inf"):
        raise ConfigurationError(
            f"--rate: {raw!r} is not a rate; give canaries per second above 0, such as 50/s, "
            "50 or 600/m"
        )
    return value / per_seconds


def parse_mix(raw: str) -> dict[str, int]:
    """``short=90,long=5,flaky=5`` -> {"short": 90, ...} (weights, usually percentages)."""
    from workerkit.drill.canary import KINDS

    mix: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        kind, sep, weight = part.partition("=")
        kind = kind.strip()
        if not sep or kind not in KINDS or not weight.strip().isdigit():
            raise ConfigurationError(
                f"--mix: {part!r} is not KIND=WEIGHT with KIND one of {', '.join(KINDS)} and "
                "WEIGHT a whole number (e.g. --mix short=90,long=5,flaky=5)"
            )
        mix[kind] = int(weight)
    if not mix or sum(mix.values()) <= 0:
        raise ConfigurationError("--mix: give at least one kind with a weight above 0")
    return mix


def drill_options(func: F) -> F:
    """The flags every engine's drill takes (``drill local`` adds them to its own)."""
    options = [
        click.option("--app", "-A", "app", default=None, metavar="MODULE:APP",
                     help="The app the workers run (celery: what `celery -A` takes) "
                     "[env: WORKERKIT_APP]."),
        click.option("--rate", default="10/s", show_default=True,
                     help="Canaries enqueued per second: 50/s, 50, 600/m."),
        click.option("--duration", default="10s", show_default=True,
                     help="How long to enqueue: 120s, 2m, 120."),
        click.option("--mix", default="short=90,long=5,flaky=5", show_default=True,
                     help="Kinds of canary, by weight: short, long (checkpointed, "
                     "--long-seconds of work), flaky (fails its first attempt), stubborn "
                     "(long, never checkpoints, ignores stop requests)."),
        click.option("--queues", default=None, metavar="Q1,Q2",
                     help="Queues to put canaries on, in turn (default: the engine's default "
                     "queue)."),
        click.option("--long-seconds", default="10s", show_default=True,
                     help="How long a long (or stubborn) canary works."),
        click.option("--settle-timeout", default="60s", show_default=True,
                     help="After the last enqueue, how long to wait for canaries to complete; "
                     "those still not done then are lost."),
        click.option("--drill-id", default=None, help="The drill's id (default: a fresh one)."),
        click.option("--database-url", default=None, metavar="URL",
                     help="sql: the database [env: WORKERKIT_DATABASE_URL]."),
        click.option("--redis-url", default=None, metavar="URL",
                     help="rq: Redis; celery: when the app sets no broker_url "
                     "[env: WORKERKIT_REDIS_URL]."),
        click.option("--config", "config_file", default=None, metavar="PATH",
                     help="Config file (as for workerkit run) [env: WORKERKIT_CONFIG]."),
        click.option("--json", "as_json", is_flag=True,
                     help="Print the report as JSON (progress goes to stderr)."),
        click.option("--plot", default=None, metavar="FILE.png",
                     help="Also draw latency over time, with the workers' starts and stops, as "
                     "a PNG (needs workerkit[plot])."),
        click.option("--quiet", "-q", is_flag=True, help="No progress output."),
    ]  # fmt: skip
    for option in reversed(options):
        func = option(func)
    return func


def spec_from_options(engine: str, options: Mapping[str, Any]) -> Any:
    """A :class:`~workerkit.drill.run.DrillSpec` from the flags; ConfigurationError when bad."""
    from workerkit.drill.run import DrillSpec
    from workerkit.settings import load_settings

    cli = {
        "app": options.get("app"),
        "engine": engine,
        "database_url": options.get("database_url"),
        "redis_url": options.get("redis_url"),
    }
    settings = load_settings(cli, config_file=options.get("config_file"))
    queues = tuple(q.strip() for q in (options.get("queues") or "").split(",") if q.strip())
    extra = {"drill_id": options["drill_id"]} if options.get("drill_id") else {}
    spec = DrillSpec(
        engine=engine,
        settings=settings,
        rate=parse_rate(options["rate"]),
        duration=parse_duration(options["duration"], "--duration"),
        mix=parse_mix(options["mix"]),
        queues=queues,
        settle_timeout=parse_duration(options["settle_timeout"], "--settle-timeout"),
        long_seconds=parse_duration(options["long_seconds"], "--long-seconds"),
        **extra,
    )
    spec.check()
    return spec


class ProgressPrinter:
    """Live counts: one line rewritten in place on a terminal, a plain line every 5 s else."""

    def __init__(self, stream: IO[str], *, every: float = 5.0) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.every = every
        self._last_line = -every
        self._phase = ""

    def __call__(self, progress: Any) -> None:
        line = (
            f"{progress.phase:<10} {progress.elapsed:6.1f} s  sent {progress.sent}/"
            f"{progress.planned}  started {progress.started}  completed {progress.completed}"
            f"  twice {progress.twice}"
        )
        if self.tty:
            end = "\n" if progress.phase == "done" else ""
            self.stream.write(f"\r\x1b[2K{line}{end}")
        elif progress.phase != self._phase or progress.elapsed - self._last_line >= self.every:
            self.stream.write(line + "\n")
            self._last_line = progress.elapsed
        self._phase = progress.phase
        self.stream.flush()


def run_and_report(spec: Any, options: Mapping[str, Any], **run_kwargs: Any) -> None:
    """Run ``spec``, print its report (text or JSON), draw the plot, exit with the verdict."""
    from workerkit.drill.run import run_drill

    plot = options.get("plot")
    if plot:
        from workerkit.drill.plot import require_matplotlib

        require_matplotlib()
    progress_stream = sys.stderr if options.get("as_json") else sys.stdout
    printer = None if options.get("quiet") else ProgressPrinter(progress_stream)
    # The drill runs in a thread so that Ctrl-C stops it and still reports what it saw. Waited
    # for on an Event: a Thread.join() interrupted by Ctrl-C may think the thread ended.
    stop, finished = threading.Event(), threading.Event()
    outcome: list[Any] = []

    def drill_thread() -> None:
        try:
            outcome.append(run_drill(spec, progress=printer, stop=stop, **run_kwargs))
        except BaseException as exc:  # raised again below, in the command's thread
            outcome.append(exc)
        finally:
            finished.set()

    thread = threading.Thread(target=drill_thread, name="workerkit-drill", daemon=True)
    # A cancelled CI job gets SIGTERM: the drill stops the same way, with its report.
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    thread.start()
    try:
        while not finished.wait(0.5):
            pass
    except KeyboardInterrupt:
        click.echo("\nstopping the drill: reading the records once more", err=True)
        stop.set()
        finished.wait()
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    report = outcome[0]
    if options.get("as_json"):
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        click.echo(report.render_text())
    if plot:
        from workerkit.drill.plot import draw

        draw(report, plot)
        click.echo(f"plot written to {plot}", err=bool(options.get("as_json")))
    sys.exit(exitcodes.OK if report.ok else exitcodes.DRILL_FAILED)


def engine_command(engine: str) -> click.Command:
    """``workerkit drill ENGINE``: the drill's flags around :func:`run_and_report`."""

    def command(**options: Any) -> None:
        try:
            spec = spec_from_options(engine, options)
            run_and_report(spec, options)
        except (ConfigurationError, ImportError) as exc:
            click.echo(f"workerkit drill {engine}: {exc}", err=True)
            sys.exit(exitcodes.CONFIG_ERROR)
        except StoreUnavailable as exc:
            click.echo(f"workerkit drill {engine}: {exc}", err=True)
            sys.exit(exitcodes.STORE_UNAVAILABLE)
        except WorkerkitError as exc:
            click.echo(f"workerkit drill {engine}: {exc}", err=True)
            sys.exit(exitcodes.DRILL_FAILED)

    return click.command(
        engine,
        help=f"""Drill the {engine} engine: enqueue canary jobs at --rate for --duration while
        you roll the workers (kubectl rollout restart ...), then report from the canaries'
        records: sent, completed exactly once, twice, lost, released, resumed, and the
        enqueue -> start latency over time. Exit 0 only when every canary completed exactly
        once ({exitcodes.DRILL_FAILED} otherwise). See docs/reference/drill.md.""",
    )(drill_options(command))
