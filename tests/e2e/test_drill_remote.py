"""``workerkit drill ENGINE`` against real workers, with a rollout done by hand in the middle.

Each engine: pod-a (``workerkit run ENGINE``) takes canaries; once it runs a long (checkpointed)
canary, pod-b starts as pod-a gets SIGTERM, as a rolling update does. The drill must see every
canary completed exactly once (counted again here, from the canaries' records in the store),
the long canary released by pod-a and resumed by pod-b, and exit 0. And the drill must catch a
loss: a pod SIGKILLed (supervisor and worker at once) with a stubborn canary in hand, whose lease
outlives the settle timeout, makes the drill report it lost and exit DRILL_FAILED. A worker
SIGSTOPped past its lease with a stubborn canary in hand: exactly once (the work horse's lease
watchdog, engines/leasewatch.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.harness import (
    REPO,
    WORKERKIT,
    Supervisor,
    spawn_logged,
    stopped_after,
    wait_until,
    worker_env,
)
from tests.support.redis_db import flushed_db
from tests.support.servers import RedisServer, free_port
from workerkit import exitcodes
from workerkit.drill import CanaryRun, DrillReport, DrillSpec, run_drill
from workerkit.drill.canary import run_canary
from workerkit.drill.records import RecordStore, RedisRecords, SqlRecords
from workerkit.engines.sql import upgrade
from workerkit.job import JobContext
from workerkit.settings import Settings

REDIS_DB = 7  # ours on the session's server, flushed around each test

#: G = 4 s, M = 2 s: request_stop 2 s after SIGTERM, release at 3 s, exit by 4 s.
TIMING = {"grace_period": "4", "release_margin": "2"}
LONG = 5.0  # a long canary seen running still runs at SIGTERM + D (2 s)


@dataclass
class Pods:
    """One test's directory and how to start a pod of its engine."""

    tmp: Path
    engine: str
    app: str
    argv: list[str]
    settings: dict[str, str]
    records: RecordStore
    journal: Path = field(init=False)
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.journal = self.tmp / "journal.txt"

    def start(self, hostname: str, *, new_session: bool = False) -> Supervisor:
        port = free_port()
        variables = worker_env(self, app=self.app, port=port, engine=self.settings, settings={})
        variables["HOSTNAME"] = hostname
        return spawn_logged(self.argv, self.tmp, hostname, port, variables, new_session=new_session)


@pytest.fixture
def redis_db(redis_server: RedisServer) -> Iterator[str]:
    with flushed_db(redis_server, REDIS_DB) as url:
        yield url


def sql_pods(tmp: Path) -> Pods:
    url = f"sqlite:///{tmp / 'queue.sqlite3'}"
    upgrade(url)
    return Pods(
        tmp, "sql", "tests.apps.sql_jobs:app", [*WORKERKIT, "run", "sql"],
        {"database_url": url, "poll_interval": "0.1", "concurrency": "4", **TIMING},
        SqlRecords(url),
    )  # fmt: skip


def rq_pods(tmp: Path, url: str) -> Pods:
    return Pods(
        tmp, "rq", "tests.apps.rq_jobs:app",
        [*WORKERKIT, "run", "rq", "--worker-class", "forking"],
        {"redis_url": url, "checkpoint_interval": "0.5", **TIMING},
        RedisRecords.from_url(url),
    )  # fmt: skip


def celery_pods(tmp: Path, url: str) -> Pods:
    from tests.apps import celery_jobs

    celery_jobs.app.conf.broker_url = url  # the drill sends through the workers' app
    return Pods(
        tmp, "celery", "tests.apps.celery_jobs:app",
        [*WORKERKIT, "run", "celery", "--", "--pool=prefork"],
        {"E2E_REDIS_URL": url, "redis_url": url, "queues": "celery", "log_level": "info",
         "concurrency": "2", **TIMING},
        RedisRecords.from_url(url),
    )  # fmt: skip


def spec_for(pods: Pods, **changes: Any) -> DrillSpec:
    settings = {
        "sql": lambda: Settings(database_url=pods.settings["database_url"]),
        "rq": lambda: Settings(redis_url=pods.settings["redis_url"]),
        "celery": lambda: Settings(app=pods.app, redis_url=pods.settings["redis_url"]),
    }[pods.engine]()
    values: dict[str, Any] = {
        "engine": pods.engine,
        "settings": settings,
        "rate": 10.0,
        "duration": 4.0,
        "mix": {"short": 90, "long": 5, "flaky": 5},
        "settle_timeout": 20.0,
        "long_seconds": LONG,
    }
    values.update(changes)
    return DrillSpec(**values)


def in_thread(work: Callable[[], DrillReport]) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []

    def target() -> None:
        try:
            result.append(work())
        except BaseException as exc:  # handed to the test's thread
            result.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def running_on(records: RecordStore, drill_id: str, hostname: str, kind: str) -> Any:
    return [
        run
        for run in records.runs(drill_id)
        if run.hostname == hostname and run.kind == kind and run.ended_at is None
    ]


def completions(runs: list[CanaryRun]) -> dict[int, int]:
    counted: dict[int, int] = {}
    for run in runs:
        if run.outcome == "completed":
            counted[run.seq] = counted.get(run.seq, 0) + 1
    return counted


def rolled_drill(pods: Pods) -> None:
    """pod-a alone; a long canary on it; pod-b starts as pod-a gets SIGTERM; the drill must pass."""
    spec = spec_for(pods)
    try:
        with stopped_after(pods.start("pod-a")) as pod_a:
            pod_a.wait_ready()
            thread, result = in_thread(lambda: run_drill(spec))
            wait_until(
                lambda: running_on(pods.records, spec.drill_id, "pod-a", "long"),
                timeout=15,
                what="a long canary running on pod-a",
            )
            # maxUnavailable 1: the new pod starts as the old one is told to stop.
            with stopped_after(pods.start("pod-b")) as pod_b:
                pod_a.signal(signal.SIGTERM)
                pod_b.wait_ready()
                code, _ = pod_a.wait_exit(15)
                assert code == exitcodes.OK, pod_a.log_text()
                thread.join(40)
                assert not thread.is_alive(), "the drill did not end"
        report = result[0]
        assert isinstance(report, DrillReport), report
        text = report.render_text()
        assert report.ok, text
        assert report.sent == 40
        # The drill's numbers, counted again from the records themselves.
        runs = pods.records.runs(spec.drill_id)
        assert completions(runs) == dict.fromkeys(range(40), 1), text
        released = [r for r in runs if r.outcome == "released" and r.hostname == "pod-a"]
        assert released, text
        assert any(r.resumed and r.hostname == "pod-b" for r in runs), text
        assert report.released >= 1 and report.resumed >= 1, text  # noqa: PT018
        assert report.retried == 2, text  # the two flaky canaries failed once each, by design
        assert {pod.hostname for pod in report.pods} == {"pod-a", "pod-b"}
        assert "PASS: all 40 canaries completed exactly once" in text
        if isinstance(pods.records, RedisRecords):  # every key of the drill expires
            keys = pods.records.client.keys(f"workerkit:drill:{spec.drill_id}:*")
            assert len(keys) == 2 + len(runs)  # the index, the done marks, one hash per run
            assert all(0 < pods.records.client.ttl(key) <= 86400 for key in keys)
    finally:
        pods.records.close()


@pytest.mark.timeout(60)
def test_sql_drill_through_a_rolling_restart_is_exactly_once(tmp_path: Path) -> None:
    rolled_drill(sql_pods(tmp_path))


@pytest.mark.timeout(60)
def test_rq_drill_through_a_rolling_restart_is_exactly_once(tmp_path: Path, redis_db: str) -> None:
    rolled_drill(rq_pods(tmp_path, redis_db))


@pytest.mark.timeout(60)
def test_celery_drill_through_a_rolling_restart_is_exactly_once(
    tmp_path: Path, redis_db: str
) -> None:
    rolled_drill(celery_pods(tmp_path, redis_db))


@pytest.mark.parametrize("engine", ["sql", "redis"])
def test_a_canary_delivered_again_after_it_completed_is_recorded_and_skipped(
    tmp_path: Path, redis_db: str, engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The canary is an idempotent job: its completion and its done mark are one write in the
    real store, so a second delivery after it completed (an ack lost with a killed pod) finds
    it done, records a ``redelivered`` run and does not run the body; a release leaves no mark."""
    if engine == "sql":
        url = f"sqlite:///{tmp_path / 'queue.sqlite3'}"
        upgrade(url)
        records: RecordStore = SqlRecords(url)
    else:
        records = RedisRecords.from_url(redis_db)
    try:
        for attempt, hostname in ((1, "pod-a"), (2, "pod-b")):
            job = JobContext(job_id="j", task="workerkit.canary", queue="q", attempt=attempt)
            monkeypatch.setenv("HOSTNAME", hostname)
            with job.activate():
                assert run_canary(
                    records, drill_id="again", seq=4, kind="long", enqueued_at=time.time(),
                    long_seconds=0.0 if attempt == 1 else 60.0,
                ) == "ok"  # fmt: skip
        runs = sorted(records.runs("again"), key=lambda r: r.started_at)
        assert [(r.hostname, r.outcome) for r in runs] == [
            ("pod-a", "completed"),
            ("pod-b", "redelivered"),
        ]
        assert records.completed_before("again", 4)
        released = CanaryRun("again", "r5", 5, "long", 1, "pod-a", 1, 0.0, 0.0)
        records.started(released)
        records.ended(released, 1.0, "released")
        assert not records.completed_before("again", 5)
    finally:
        records.close()


def drill_cli(pods: Pods, args: list[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    variables = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        **env,
    }
    return subprocess.Popen(
        [*WORKERKIT, "drill", pods.engine, *args],
        cwd=pods.tmp,
        env=variables,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.mark.timeout(60)
def test_a_pod_killed_with_a_stubborn_canary_is_reported_lost(tmp_path: Path) -> None:
    """SIGKILL to the whole pod: nobody releases; the job's lease (30 s) outlives the drill's
    settle timeout (3 s), so the canary it held is lost, and the drill exits DRILL_FAILED."""
    pods = sql_pods(tmp_path)
    url = pods.settings["database_url"]
    drill_id = "lost-e2e"
    plot = tmp_path / "drill.png"
    try:
        with stopped_after(pods.start("pod-a", new_session=True)) as pod_a:
            pod_a.wait_ready()
            drill = drill_cli(
                pods,
                ["--rate", "2/s", "--duration", "1s", "--mix", "short=50,stubborn=50",
                 "--long-seconds", "20s", "--settle-timeout", "3s", "--drill-id", drill_id,
                 "--json", "--plot", str(plot)],
                {"WORKERKIT_DATABASE_URL": url},
            )  # fmt: skip
            try:
                wait_until(
                    lambda: running_on(pods.records, drill_id, "pod-a", "stubborn"),
                    timeout=15,
                    what="a stubborn canary running on pod-a",
                )
                os.killpg(pod_a.pid, signal.SIGKILL)
                out, err = drill.communicate(timeout=40)
            finally:
                if drill.poll() is None:
                    drill.kill()
                    drill.wait(5)
                for pipe in (drill.stdout, drill.stderr):  # also when it ended on its own
                    if pipe is not None:
                        pipe.close()
        assert drill.returncode == exitcodes.DRILL_FAILED, err.decode()
        report = json.loads(out)
        assert report["ok"] is False
        assert report["counts"]["sent"] == 2
        assert report["counts"]["abandoned"] == 1  # the killed run: started, never ended
        killed = [r for r in pods.records.runs(drill_id) if r.kind == "stubborn"]
        assert len(killed) == 1
        assert killed[0].ended_at is None
        assert report["lost"] == [killed[0].seq]
        assert report["counts"]["exactly_once"] == 1  # the short canary
        assert plot.read_bytes().startswith(b"\x89PNG")
        progress = err.decode()  # --json: progress on stderr, plain lines (no terminal here)
        assert "\r" not in progress
        assert "done" in progress
    finally:
        pods.records.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_drill_stopped_by_a_signal_still_reports_and_fails(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """Ctrl-C, or a cancelled CI job's SIGTERM: the drill stops enqueueing, reads the records
    once more, prints its report and exits DRILL_FAILED (it did not run to its end)."""
    pods = sql_pods(tmp_path)
    pods.records.close()
    variables = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "WORKERKIT_DATABASE_URL": pods.settings["database_url"],
    }
    drill = subprocess.Popen(
        [*WORKERKIT, "drill", "sql", "--rate", "5/s", "--duration", "60s"],
        cwd=tmp_path,
        env=variables,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # pytest may run with SIGINT ignored (a background job): the drill gets Python's default.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert drill.stdout is not None
        first = drill.stdout.readline().decode()  # the first progress line: enqueueing began
        assert first.startswith("enqueueing"), first
        drill.send_signal(signum)
        out, _ = drill.communicate(timeout=30)
    finally:
        if drill.poll() is None:
            drill.kill()
            drill.wait(5)
    assert drill.returncode == exitcodes.DRILL_FAILED
    assert "FAIL: " in out.decode()
    assert "stopped before the end" in out.decode()


@pytest.mark.timeout(90)
def test_a_worker_stopped_past_its_lease_still_runs_its_canary_exactly_once(
    tmp_path: Path, redis_db: str
) -> None:
    """rq, lease 3 s (V = 4 s): the worker holding a stubborn canary is SIGSTOPped. Its work
    horse's lease watchdog interrupts the canary before the lease expires; the other pod takes
    it over when it does and completes it. The drill reports every canary exactly once, the
    stopped pod's run ended before the other's began, and passes."""
    pods = rq_pods(tmp_path, redis_db)
    pods.settings["visibility_timeout"] = "4"
    spec = spec_for(pods, rate=1.0, duration=1.0, mix={"stubborn": 100}, long_seconds=10.0)
    stopped: list[int] = []
    try:
        with (
            stopped_after(pods.start("pod-a")) as pod_a,
            stopped_after(pods.start("pod-b")) as pod_b,
        ):
            pod_a.wait_ready()
            pod_b.wait_ready()
            thread, result = in_thread(lambda: run_drill(spec))
            first = wait_until(
                lambda: pods.records.runs(spec.drill_id), timeout=15, what="the canary's first run"
            )[0]
            holder = pod_a if first.hostname == "pod-a" else pod_b
            stopped.append(holder.worker_pid())
            os.kill(stopped[0], signal.SIGSTOP)
            wait_until(
                lambda: len(pods.records.runs(spec.drill_id)) == 2,
                timeout=30,
                what="the canary taken over by the other pod",
            )
            thread.join(60)
            assert not thread.is_alive(), "the drill did not end"
            os.kill(stopped.pop(), signal.SIGCONT)
        report = result[0]
        assert isinstance(report, DrillReport), report
        text = report.render_text()
        assert report.ok, text
        assert (report.sent, report.exactly_once, report.twice, report.lost) == (1, 1, 0, 0), text
        runs = sorted(pods.records.runs(spec.drill_id), key=lambda run: run.started_at)
        assert [run.hostname for run in runs] == [
            first.hostname,
            next(name for name in ("pod-a", "pod-b") if name != first.hostname),
        ], runs
        interrupted, completed = runs
        assert interrupted.outcome == "interrupted", runs  # by its horse's watchdog
        assert completed.outcome == "completed", runs
        assert interrupted.ended_at is not None
        assert interrupted.ended_at < completed.started_at, runs  # never two runs at once
        assert "PASS: all 1 canaries completed exactly once" in text
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        pods.records.close()
