"""``workerkit drill local ENGINE``: the drill, with the rollout done here on one machine.

Starts N replicas of ``workerkit run ENGINE`` (:mod:`workerkit.drill.rollout`), runs
:func:`~workerkit.drill.run.run_drill` in a thread while it rolls them K times (with crashes and
a store restart when asked), then prints the drill's report and the pods' starts and stops. The
values come from flags or a rendered Deployment (``--manifest``); the why of the precedence
(flags > manifest > defaults, and the container's own ``env`` over the derived variables): the
drill runs what the pods would run, including a grace period that disagrees with the
``WORKERKIT_GRACE_PERIOD`` the worker checks, which is the mistake it is there to show.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from workerkit import exitcodes
from workerkit.drill.manifest import DeploymentFacts, read_manifest
from workerkit.drill.options import ENGINES, ProgressPrinter, drill_options, spec_from_options
from workerkit.drill.rollout import (
    Action,
    CommandStore,
    Rollout,
    RolloutError,
    RolloutSpec,
    StoreControl,
    plan_actions,
    render_timeline,
    resolve_strategy,
    store_address,
)
from workerkit.errors import ConfigurationError, StoreUnavailable, WorkerkitError

__all__ = ("LocalPlan", "container_env", "local_command", "plan_local")

F = TypeVar("F", bound=Callable[..., Any])

#: The rollout's actions happen within this share of the enqueueing, so that the last
#: replacement pods have canaries to take and the stragglers settle on a steady Deployment.
WINDOW = 0.8

#: ``python -c`` of the installed workerkit: the same interpreter and package as this command.
WORKERKIT_ARGV = (sys.executable, "-c", "from workerkit.cli import main; main()")


@dataclass(frozen=True)
class LocalPlan:
    """Everything a local drill runs: the drill, the Deployment, the actions, the store."""

    drill: Any  # DrillSpec
    rollout: RolloutSpec
    actions: tuple[Action, ...]
    store: StoreControl | None
    directory: Path
    warnings: tuple[str, ...]


def rollout_options(func: F) -> F:
    """The flags of the rollout (the drill's own come from :func:`drill_options`)."""
    options = [
        click.option("--replicas", type=click.IntRange(min=1), default=None,
                     help="Pods of the Deployment [manifest: spec.replicas; default 3]."),
        click.option("--restarts", type=click.IntRange(min=0), default=3, show_default=True,
                     help="Rolling restarts (kubectl rollout restart) during the drill."),
        click.option("--crash", "crashes", type=click.IntRange(min=0), default=0,
                     show_default=True,
                     help="Pods SIGKILLed mid-run (every process of the container at once); "
                     "the kubelet restarts each in place."),
        click.option("--restart-store", is_flag=True,
                     help="Restart the Redis or PostgreSQL the workers use once mid-drill, by "
                     "--store-command (SQLite has no server to restart)."),
        click.option("--store-command", default=None, metavar="CMD",
                     help="How to restart the store, e.g. 'docker restart redis' or 'pg_ctl "
                     "-D DIR restart'; the drill then waits until it answers again."),
        click.option("--max-surge", default=None, metavar="N|N%",
                     help="strategy.rollingUpdate.maxSurge [manifest; default 1]."),
        click.option("--max-unavailable", default=None, metavar="N|N%",
                     help="strategy.rollingUpdate.maxUnavailable [manifest; default 0]."),
        click.option("--grace", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="terminationGracePeriodSeconds, and WORKERKIT_GRACE_PERIOD unless the "
                     "container's env sets it [manifest; default 30]."),
        click.option("--pre-stop", type=click.FloatRange(min=0), default=None,
                     help="The preStop sleep, and WORKERKIT_PRESTOP_DELAY unless the "
                     "container's env sets it [manifest; default 0]."),
        click.option("--manifest", type=click.Path(dir_okay=False, path_type=Path),
                     default=None,
                     help="A rendered Deployment (helm template ..., kubectl get deployment "
                     "NAME -o yaml): replicas, strategy, grace period, preStop, args, env."),
        click.option("--deployment", default=None, metavar="NAME",
                     help="Which Deployment of --manifest (when it has several)."),
        click.option("--run-arg", "run_args", multiple=True, metavar="ARG",
                     help="An argument added to every pod's `workerkit run ENGINE --app APP` "
                     "(repeatable), e.g. --run-arg=--worker-class --run-arg=simple; not with "
                     "--manifest, whose args are used as they are."),
        click.option("--env", "env_items", multiple=True, metavar="NAME=VALUE",
                     help="A variable of every pod's container, over the manifest's "
                     "(repeatable)."),
        click.option("--drill-dir", type=click.Path(file_okay=False, path_type=Path),
                     default=None,
                     help="Where the pods' logs go (default: ./workerkit-drill-<drill id>); "
                     "the pods run in the current directory, as in the image's WORKDIR."),
        click.option("--ready-timeout", type=click.FloatRange(min=1), default=120.0,
                     show_default=True, help="How long a pod may take to become ready."),
        click.option("--seed", type=int, default=None,
                     help="Which pods crash (random) is the same for the same seed."),
    ]  # fmt: skip
    for option in reversed(options):
        func = option(func)
    return func


def _seconds(value: float) -> str:
    return f"{value:g}"


def container_env(
    engine: str,
    settings: Any,
    facts: DeploymentFacts | None,
    *,
    grace: float,
    prestop: float,
    replicas: int,
    extra: Mapping[str, str],
) -> dict[str, str]:
    """Every pod's container environment: this shell's, then what the chart derives (grace
    period, preStop, app, store URL, replicas), then the manifest's ``env``, then ``--env``."""
    derived = {
        "WORKERKIT_GRACE_PERIOD": _seconds(grace),
        "WORKERKIT_PRESTOP_DELAY": _seconds(prestop),
        "WORKERKIT_APP": settings.app or "",
    }
    if engine == "sql":
        derived["WORKERKIT_DATABASE_URL"] = settings.database_url
        if not settings.database_url.startswith("sqlite"):
            # Here every pod is on this one host, where SQLite's locks hold across processes;
            # the replicas rule (S1) is about pods on several hosts, so it stays at 1 there.
            derived["WORKERKIT_REPLICAS"] = str(replicas)
    else:
        derived["WORKERKIT_REDIS_URL"] = settings.redis_url
    manifest = dict(facts.env) if facts is not None else {}
    return {**os.environ, **derived, **manifest, **extra}


def _extra_env(items: tuple[str, ...]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigurationError(f"--env {item!r}: expected NAME=VALUE")
        env[name] = value
    return env


def _store(engine: str, settings: Any, options: Mapping[str, Any]) -> StoreControl | None:
    if not options.get("restart_store"):
        return None
    url = settings.database_url if engine == "sql" else settings.redis_url
    address = store_address(url)
    if address is None:
        raise ConfigurationError(
            "--restart-store: the database is SQLite, a file with no server to restart; drop "
            "--restart-store, or drill against PostgreSQL (--database-url postgresql://...)"
        )
    command = options.get("store_command")
    if not command:
        raise ConfigurationError(
            "--restart-store: say how to restart the store with --store-command CMD (e.g. "
            "'docker restart redis', 'pg_ctl -D DIR restart'); the drill never stops a server "
            "it was not told how to start again"
        )
    return CommandStore(command, address)


def _grace_warning(env: Mapping[str, str], grace: float, prestop: float) -> list[str]:
    """The worker checks its budget against WORKERKIT_GRACE_PERIOD; the kubelet kills at the
    pod's grace period. Say so when they disagree: that is a broken budget no check sees."""
    found: list[str] = []
    for name, pod_value in (("GRACE_PERIOD", grace), ("PRESTOP_DELAY", prestop)):
        raw = env.get(f"WORKERKIT_{name}")
        try:
            differs = raw is not None and float(raw) != pod_value
        except ValueError:
            differs = False
        if differs:
            found.append(
                f"warning: the containers' WORKERKIT_{name} is {raw} but the pod's is "
                f"{pod_value:g} s: the supervisor plans its drain for a budget the kubelet "
                f"does not give it (the chart renders both from one value)"
            )
    return found


def plan_local(engine: str, options: Mapping[str, Any]) -> LocalPlan:
    """The plan of ``workerkit drill local ENGINE`` from its flags; ConfigurationError when bad."""
    options = dict(options)
    facts = None
    if options.get("manifest") is not None:
        facts = read_manifest(options["manifest"], options.get("deployment"))
        if facts.engine is not None and facts.engine != engine:
            raise ConfigurationError(
                f"--manifest: Deployment {facts.name} runs `workerkit run {facts.engine}`, "
                f"not {engine}; drill it with `workerkit drill local {facts.engine}`"
            )
        options["app"] = options.get("app") or facts.app
        for flag, var in (("database_url", "DATABASE_URL"), ("redis_url", "REDIS_URL")):
            options[flag] = options.get(flag) or facts.env.get(f"WORKERKIT_{var}")
    options["app"] = options.get("app") or os.environ.get("WORKERKIT_APP")
    if not options["app"]:
        raise ConfigurationError("give the app the workers run: --app MODULE:APP")
    drill = spec_from_options(engine, options)

    def pick(flag: str, fact: Any, default: Any) -> Any:
        given = options.get(flag)
        return given if given is not None else (fact if fact is not None else default)

    replicas = int(pick("replicas", facts and facts.replicas, 3))
    grace = float(pick("grace", facts and facts.grace, 30.0))
    prestop = float(pick("pre_stop", facts and facts.prestop, 0.0))
    env = container_env(
        engine,
        drill.settings,
        facts,
        grace=grace,
        prestop=prestop,
        replicas=replicas,
        extra=_extra_env(tuple(options.get("env_items") or ())),
    )
    args = list(facts.args) if facts is not None and facts.engine else []
    run_args = list(options.get("run_args") or ())
    if args and run_args:
        raise ConfigurationError(
            "--run-arg with --manifest: the manifest's container args are run as they are; "
            "edit them there instead"
        )
    argv = [*WORKERKIT_ARGV, *(args or ["run", engine, "--app", options["app"], *run_args])]
    spec = RolloutSpec(
        argv=argv,
        env=env,
        replicas=replicas,
        max_surge=_count(pick("max_surge", facts and facts.max_surge, 1)),
        max_unavailable=_count(pick("max_unavailable", facts and facts.max_unavailable, 0)),
        grace=grace,
        prestop=prestop,
        ready_timeout=float(options.get("ready_timeout") or 120.0),
        name=facts.name if facts is not None else f"workerkit-{engine}",
    )
    resolve_strategy(spec.replicas, spec.max_surge, spec.max_unavailable)  # refused before start
    store = _store(engine, drill.settings, options)
    actions = plan_actions(
        int(options.get("restarts") or 0),
        int(options.get("crashes") or 0),
        1 if store is not None else 0,
        drill.duration * WINDOW,
    )
    directory = options.get("drill_dir") or Path.cwd() / f"workerkit-drill-{drill.drill_id}"
    return LocalPlan(
        drill=drill,
        rollout=spec,
        actions=tuple(actions),
        store=store,
        directory=Path(directory),
        warnings=tuple(_grace_warning(env, grace, prestop)),
    )


def _count(value: Any) -> int | str:
    """A strategy value as given: a whole number of pods, or a percentage as text."""
    text = str(value).strip()
    return int(text) if text.isdigit() else text


class _DrillThread(threading.Thread):
    """run_drill in a thread; its report or its exception kept for the main thread."""

    def __init__(self, spec: Any, progress: Any, stop: threading.Event) -> None:
        super().__init__(name="drill", daemon=True)
        self.spec, self.progress, self.stop = spec, progress, stop
        self.report: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        from workerkit.drill.run import run_drill

        try:
            self.report = run_drill(self.spec, progress=self.progress, stop=self.stop)
        except BaseException as exc:  # handed to the main thread, which reports it
            self.error = exc


def run_local(plan: LocalPlan, options: Mapping[str, Any]) -> int:
    """Run the plan; print the report and the pods' timeline; the exit code."""
    as_json = bool(options.get("as_json"))
    say = sys.stderr if as_json else sys.stdout
    for warning in plan.warnings:
        click.echo(warning, err=True)
    plan.directory.mkdir(parents=True, exist_ok=True)
    rollout = Rollout(plan.rollout, plan.directory, store=plan.store, seed=options.get("seed"))
    click.echo(
        f"drill {plan.drill.drill_id}: {plan.rollout.replicas} replicas of "
        f"`workerkit run {plan.drill.engine}`, logs in {plan.directory}",
        file=say,
    )
    stop = threading.Event()
    thread: _DrillThread | None = None
    try:
        rollout.start()
        printer = None if options.get("quiet") else ProgressPrinter(say)
        thread = _DrillThread(plan.drill, printer, stop)
        thread.start()
        done = rollout.run(plan.actions, stop=_until_done(thread))
        thread.join()
        rollout.shutdown()
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (local_command): kill the pods, and still
        stop.set()  # report what was sent so far (the drill stops early: DRILL_FAILED)
        rollout.kill()
        if thread is None:
            raise
        thread.join(60)
        if thread.report is None:
            raise
        click.echo("interrupted: the pods were killed; the report covers what was sent", err=True)
        done = len(plan.actions)  # not a plan too slow for the pods: no warning about it
    except BaseException:
        stop.set()
        rollout.kill()
        raise
    if thread.error is not None:
        raise thread.error
    report = thread.report
    begun = report.started_at
    if done < len(plan.actions):
        left = ", ".join(a.kind for a in plan.actions[done:])
        click.echo(
            f"warning: the drill ended before the rollout's last {len(plan.actions) - done} "
            f"actions ({left}): pods took longer to be ready than the plan allowed; give a "
            f"longer --duration",
            err=True,
        )
    if as_json:
        body = report.to_json()
        body["rollout_actions"] = {"planned": len(plan.actions), "done": done}
        body["rollout"] = [
            {"t": round(e.at - begun, 3), "pod": e.pod, "event": e.what, "detail": e.detail}
            for e in rollout.events
        ]
        click.echo(json.dumps(body, indent=2))
    else:
        click.echo(report.render_text())
        click.echo("\nThe rollout (seconds from the drill's start):")
        click.echo(render_timeline(rollout.events, since=begun))
    if options.get("plot"):
        from workerkit.drill.plot import draw

        draw(report, options["plot"])
        click.echo(f"plot written to {options['plot']}", err=as_json)
    return exitcodes.OK if report.ok else exitcodes.DRILL_FAILED


def _until_done(thread: threading.Thread) -> threading.Event:
    """An event set when ``thread`` ends (the rollout stops taking actions then)."""
    done = threading.Event()

    def watch() -> None:
        thread.join()
        done.set()

    threading.Thread(target=watch, name="drill-watch", daemon=True).start()
    return done


@click.command(
    "local",
    context_settings={"max_content_width": 100},
    help="""Drill ENGINE with the rollout done here: start --replicas pods of `workerkit run
    ENGINE`, roll them --restarts times as a Deployment does (--max-surge, --max-unavailable,
    preStop, SIGTERM, SIGKILL at --grace), crash --crash of them, optionally restart the store;
    meanwhile enqueue canaries, then report what happened to each, and when each pod started
    and stopped. Exit 0 only when every canary completed exactly once. Values come from the
    flags or from a rendered Deployment (--manifest). See docs/operations/rollout-testing.md.""",
)
@click.argument("engine", type=click.Choice(ENGINES))
@rollout_options
@drill_options
def local_command(engine: str, **options: Any) -> None:
    # SIGTERM as Ctrl-C: the pods are this process's children and must not outlive it.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        plan = plan_local(engine, options)
        if options.get("plot"):
            from workerkit.drill.plot import require_matplotlib

            require_matplotlib()
        code = run_local(plan, options)
    except (ConfigurationError, ImportError) as exc:
        click.echo(f"workerkit drill local {engine}: {exc}", err=True)
        sys.exit(exitcodes.CONFIG_ERROR)
    except StoreUnavailable as exc:
        click.echo(f"workerkit drill local {engine}: {exc}", err=True)
        sys.exit(exitcodes.STORE_UNAVAILABLE)
    except (WorkerkitError, RolloutError) as exc:
        click.echo(f"workerkit drill local {engine}: {exc}", err=True)
        sys.exit(exitcodes.DRILL_FAILED)
    sys.exit(code)
