"""The Celery project of tests/compat/celery_project, run both as ``celery -A proj worker`` and as
``workerkit run celery -A proj``: every feature gives the same observable result.

One worker per (runner, pool) runs every feature of :data:`FEATURES` at once (results through
the result backend; each task run recorded in Redis by the task itself); each test compares one
feature on one pool. Then SIGTERM with a long task in hand and other features in flight, under
workerkit: after a restart every task has run, and none twice.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("celery")

import itertools

import redis
from celery import Celery, chain, chord, group

from tests.support.harness import (
    WORKERKIT,
    Env,
    Supervisor,
    spawn_logged,
    wait_until,
    worker_env,
)
from tests.support.servers import RedisServer, free_port
from workerkit import exitcodes

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore::DeprecationWarning:celery")]

PROJECT = Path(__file__).parent / "celery_project"
POOLS = ("prefork", "solo", "threads")
CELERY = [sys.executable, "-m", "celery"]
COMPAT_DB = 7  # this module's own Redis database (the redis_url fixture uses db 1)
RESULT_TIMEOUT = 30.0
#: "not before its time": the task may start this much before its ETA (float rounding only)
ETA_EARLY = 0.05
#: and at most this much after it, on a loaded two-core machine
ETA_LATE = 10.0


# --- the two ways of running the project ----------------------------------------------------


class Worker:
    """A running worker of either kind, stopped by SIGTERM to its own pid."""

    def __init__(self, runner: str, pool: str, workdir: Path, url: str, name: str) -> None:
        self.workdir = workdir
        worker_args = ["-P", pool, "-c", "2"]
        if runner == "bare":
            self.log_path = workdir / f"{name}.log"
            log = self.log_path.open("ab")
            self.proc = subprocess.Popen(
                [*CELERY, "-A", "proj", "worker", "--loglevel=INFO", *worker_args],
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "COMPAT_REDIS_URL": url},
                start_new_session=True,
            )
            log.close()
            self.sup: Supervisor | None = None
        else:
            env = Env(tmp=workdir, database_url="", journal=workdir / "journal.txt")
            env.extra["COMPAT_REDIS_URL"] = url
            port = free_port()
            variables = worker_env(env, app="", port=port, engine={"redis_url": url}, settings={})
            del variables["WORKERKIT_APP"]
            argv = [*WORKERKIT, "run", "celery", "-A", "proj", "--", *worker_args]
            self.sup = spawn_logged(argv, workdir, name, port, variables, new_session=True)
            self.proc = self.sup.proc
            self.log_path = self.sup.log_path

    def wait_ready(self) -> None:
        if self.sup is not None:
            self.sup.wait_ready(timeout=40)
            return

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"celery worker exited: {self.log_text()}")
            return b" ready." in self.log_path.read_bytes()

        wait_until(ready, timeout=40, what="bare celery worker ready")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> int:
        """SIGTERM, the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the worker did not exit: {self.log_text()}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        if self.sup is not None:
            self.sup.log_file.close()


@contextlib.contextmanager
def running(runner: str, pool: str, workdir: Path, url: str, name: str) -> Iterator[Worker]:
    worker = Worker(runner, pool, workdir, url, name)
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.kill()


def producer_app(url: str) -> Celery:
    """The project's settings as its web process sends with them (routes included), on ``url``."""
    spec = importlib.util.spec_from_file_location(
        "compat_celeryconfig", PROJECT / "proj" / "celeryconfig.py"
    )
    assert spec is not None
    assert spec.loader is not None
    config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config)
    app = Celery("producer")
    app.config_from_object(config)
    app.conf.update(broker_url=url, result_backend=url)
    return app


def runs(client: redis.Redis[bytes], task_id: str) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in client.lrange(f"runs:{task_id}", 0, -1)]


def outcome(result: Any) -> Any:
    """The task's return value, or the name of the exception it ended with."""
    try:
        return result.get(timeout=RESULT_TIMEOUT)
    except Exception as exc:
        return type(exc).__name__


# --- the features: sent together, observed one by one ---------------------------------------


@dataclass(frozen=True)
class Feature:
    """``send(app)`` returns a handle; ``observe(handle, client)`` the comparable result;
    ``expected(pool)`` what bare Celery gives (None: whatever bare Celery gives)."""

    name: str
    send: Callable[[Celery], Any]
    observe: Callable[[Any, redis.Redis[bytes]], Any]
    expected: Callable[[str], Any]


def _task(app: Celery, name: str, *args: Any, **options: Any) -> Any:
    return app.send_task(f"proj.tasks.{name}", args=list(args), **options)


def _observe_return(result: Any, client: redis.Redis[bytes]) -> Any:
    return outcome(result), [r["queue"] for r in runs(client, result.id)]


def _observe_retries(result: Any, client: redis.Redis[bytes]) -> Any:
    value = outcome(result)
    done = runs(client, result.id)
    times = [r["t"] for r in done]
    spaced = all(b - a >= 0.5 - ETA_EARLY for a, b in itertools.pairwise(times))
    return value, [r["retries"] for r in done], spaced


def _send_at(app: Celery, label: str, *, countdown: float | None = None) -> Any:
    due = time.time() + (countdown or 2.0)
    if countdown is None:
        eta = dt.datetime.fromtimestamp(due, tz=dt.UTC)
        return _task(app, "stamp", label, eta=eta), due
    return _task(app, "stamp", label, countdown=countdown), due


def _observe_timing(handle: Any, client: redis.Redis[bytes]) -> Any:
    result, due = handle
    value = outcome(result)
    done = runs(client, result.id)
    return (
        value,
        len(done),
        all(r["t"] >= due - ETA_EARLY for r in done),  # not before its time
        all(r["t"] <= due + ETA_LATE for r in done),
    )


def _observe_time_limit(result: Any, client: redis.Redis[bytes]) -> Any:
    return outcome(result), [r["phase"] for r in runs(client, result.id)]


def _time_limit_expected(pool: str) -> Any:
    # Celery enforces time limits in the prefork pool only; solo and threads let it run.
    return ("TimeLimitExceeded", ["start"]) if pool == "prefork" else (3.0, ["start", "end"])


def _observe_rate(results: list[Any], client: redis.Redis[bytes]) -> Any:
    values = [outcome(r) for r in results]
    starts = sorted(run["t"] for r in results for run in runs(client, r.id))
    # "60/m": one a second on a worker (Celery's token bucket), within 250 ms of jitter
    return values, len(starts), all(b - a >= 0.75 for a, b in itertools.pairwise(starts))


def _send_canvas(app: Celery) -> Any:
    def sig(name: str, *args: Any) -> Any:
        return app.signature(f"proj.tasks.{name}", args=args)

    return (
        chord(group(sig("add", i, i) for i in range(3)), sig("tsum")).apply_async(),
        chain(sig("add", 1, 2), sig("mul", 10)).apply_async(),
        group(sig("mul", i, 2) for i in range(1, 4)).apply_async(),
    )


def _observe_canvas(handle: Any, client: redis.Redis[bytes]) -> Any:
    del client
    return tuple(outcome(r) for r in handle)


FEATURES = (
    Feature(
        "return value",
        lambda app: _task(app, "add", 2, 3),
        _observe_return,
        lambda pool: (5, ["celery"]),
    ),
    Feature(
        "retries with countdown",
        lambda app: _task(app, "flaky", 2),
        _observe_retries,
        lambda pool: (2, [0, 1, 2], True),
    ),
    Feature(
        "countdown",
        lambda app: _send_at(app, "countdown", countdown=2.0),
        _observe_timing,
        lambda pool: ("countdown", 1, True, True),
    ),
    Feature(
        "eta",
        lambda app: _send_at(app, "eta"),
        _observe_timing,
        lambda pool: ("eta", 1, True, True),
    ),
    Feature(
        "own time_limit",
        lambda app: _task(app, "slow", 3.0),
        _observe_time_limit,
        _time_limit_expected,
    ),
    Feature(
        "rate limit",
        lambda app: [_task(app, "ping", n) for n in range(3)],
        _observe_rate,
        lambda pool: ([0, 1, 2], 3, True),
    ),
    Feature(
        "canvas",
        _send_canvas,
        _observe_canvas,
        lambda pool: (6, 30, [2, 4, 6]),
    ),
    Feature(
        "routing",
        lambda app: _task(app, "monthly_report", "2026-11"),
        _observe_return,
        lambda pool: ("report 2026-11", ["reports"]),
    ),
)


def observe_all(runner: str, pool: str, workdir: Path, url: str) -> dict[str, Any]:
    """Start one worker, send every feature, observe each, stop the worker (exit 0)."""
    client = redis.Redis.from_url(url)
    client.flushdb()
    app = producer_app(url)
    try:
        with running(runner, pool, workdir, url, f"{runner}-{pool}") as worker:
            handles = [(f, f.send(app)) for f in FEATURES]
            observed = {f.name: f.observe(handle, client) for f, handle in handles}
            observed["exit code"] = worker.stop()
            observed["output"] = worker.log_path.read_text(errors="replace")
            return observed
    finally:
        app.close()
        client.close()


@pytest.fixture(scope="module")
def observed(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str, str], dict[str, Any]]:
    """``observed(runner, pool)``: every feature's result on that worker, run once per module."""
    workdir = tmp_path_factory.mktemp("celery_compat")
    shutil.copytree(PROJECT / "proj", workdir / "proj")
    cache: dict[tuple[str, str], dict[str, Any] | BaseException] = {}

    def get(runner: str, pool: str) -> dict[str, Any]:
        key = (runner, pool)
        if key not in cache:
            try:
                cache[key] = observe_all(runner, pool, workdir, redis_server.url(COMPAT_DB))
            except Exception as exc:
                cache[key] = exc
        found = cache[key]
        if isinstance(found, BaseException):
            raise AssertionError(f"the {runner} {pool} worker failed: {found!r}") from found
        return found

    return get


@pytest.mark.timeout(240)
@pytest.mark.parametrize("feature", FEATURES, ids=lambda f: f.name.replace(" ", "-"))
@pytest.mark.parametrize("pool", POOLS)
def test_same_result_bare_and_under_workerkit(
    observed: Callable[[str, str], dict[str, Any]], pool: str, feature: Feature
) -> None:
    bare = observed("bare", pool)
    under = observed("workerkit", pool)
    assert bare[feature.name] == feature.expected(pool)  # what bare Celery does, as documented
    assert under[feature.name] == bare[feature.name]
    assert (bare["exit code"], under["exit code"]) == (0, exitcodes.OK)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("pool", POOLS)
def test_in_json_mode_every_line_the_worker_writes_is_one_json_object(
    observed: Callable[[str, str], dict[str, Any]], pool: str
) -> None:
    # The workerkit runs above log in JSON (tests/support/harness.py: worker_env), stdout and
    # stderr of the supervisor, the Celery worker and its pool children all in one file.
    lines = observed("workerkit", pool)["output"].splitlines()
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not one JSON object: {line!r}") from None
    assert all(isinstance(record, dict) for record in records)
    loggers = {str(record.get("logger", "")) for record in records}
    assert any(name.startswith("celery") for name in loggers), loggers  # Celery's own, routed
    assert "celery_banner" in {record.get("event") for record in records}


# --- SIGTERM mid-feature --------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("pool", POOLS)
def test_sigterm_mid_features_loses_nothing_and_runs_nothing_twice(
    redis_server: RedisServer, tmp_path: Path, pool: str
) -> None:
    url = redis_server.url(COMPAT_DB)
    shutil.copytree(PROJECT / "proj", tmp_path / "proj")
    client = redis.Redis.from_url(url)
    client.flushdb()
    app = producer_app(url)
    try:
        with running("workerkit", pool, tmp_path, url, "first") as first:
            long = _task(app, "long_job", 3.0)
            wait_until(lambda: runs(client, long.id), timeout=20, what="the long task started")
            adds = [_task(app, "add", n, 1) for n in range(4)]
            retried = _task(app, "flaky", 2)
            eta, due = _send_at(app, "eta", countdown=3.0)
            report = _task(app, "monthly_report", "2026-12")
            canvas = _send_canvas(app)
            assert first.stop() == exitcodes.OK  # the long task finished within the drain
            assert [r["phase"] for r in runs(client, long.id)] == ["start", "end"]
        with running("workerkit", pool, tmp_path, url, "second") as second:
            assert outcome(long) == 3.0
            assert [outcome(r) for r in adds] == [1, 2, 3, 4]
            assert outcome(retried) == 2
            assert outcome(eta) == "eta"
            assert outcome(report) == "report 2026-12"
            assert _observe_canvas(canvas, client) == (6, 30, [2, 4, 6])
            assert second.stop() == exitcodes.OK
        # nothing ran twice: one run per task (one per retry for the retried one)
        assert [r["phase"] for r in runs(client, long.id)] == ["start", "end"]
        assert [len(runs(client, r.id)) for r in adds] == [1, 1, 1, 1]
        assert [r["retries"] for r in runs(client, retried.id)] == [0, 1, 2]
        (eta_run,) = runs(client, eta.id)
        assert eta_run["t"] >= due - ETA_EARLY
        assert [r["queue"] for r in runs(client, report.id)] == ["reports"]
        every = [key.decode() for key in client.scan_iter("runs:*")]
        assert all(client.llen(key) == 1 for key in every if key[5:] not in {retried.id, long.id})
        # the canvas: 3 chord members + its body, 2 chain links, 3 group members
        assert len(every) == 1 + 4 + 1 + 1 + 1 + 4 + 2 + 3
    finally:
        app.close()
        client.close()
