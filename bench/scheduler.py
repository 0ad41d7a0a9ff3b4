"""Issue 14: ``workerkit scheduler`` (2-3 replicas, each engine) against Celery beat x2 and RQ's
built-in scheduler with 2 workers, in one run: duplicates, missed fire times, fire delay
(p50, p95), and the gap after a SIGTERM and after a SIGKILL of the leader.

Every system fires the same 1 s job, which records itself with its fire time
(tests/apps/sched_record.py, bench/scheduler_peers.py); the analysis is the e2e suite's
(tests/support/sched_records.py). Per system: ``--steady`` seconds with 2 replicas, then the
leader SIGTERMed (its replacement 2 s later) and ``--after`` seconds watched, then the leader
SIGKILLed (the pod's whole tree; replacement 2 s later) and ``--after`` seconds watched. A
fire time counts as run only if it ran by the end of its window. Then, for workerkit only,
``--chaos`` seconds with 3 replicas and the leader killed every ``--chaos-every`` s (SIGKILL
and SIGTERM in turn; each victim replaced at once, the next kill once 3 replicas are ready),
default timing, the engines at once: did every fire time run exactly once?

Celery beat has no fire time (runs are counted in the second beat sent them), so its delay
columns are empty; with no leader, "the leader" is whichever beat started first.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import math
import os
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bench._common import (
    PYTHON,
    Proc,
    child_env,
    command_line,
    descendants,
    machine,
    machine_markdown,
    wait_for,
    write_results,
)

PERIOD = 1.0
REPLACE_AFTER = 2.0
SYSTEMS = ("workerkit-sql", "workerkit-rq", "workerkit-celery", "celery-beat", "rq-scheduler")


class Victim(Protocol):
    def kill(self) -> float: ...
    def terminate(self) -> tuple[float, int]: ...


class System(Protocol):
    name: str
    bucket: bool
    records: Path

    def start(self, replicas: int) -> None: ...
    def leader(self, timeout: float) -> Victim: ...
    def replace(self) -> None: ...
    def close(self) -> None: ...


# --- workerkit ---------------------------------------------------------------------------------


class Workerkit:
    """``workerkit scheduler ENGINE`` replicas and one ``workerkit run ENGINE`` worker."""

    bucket = False

    def __init__(self, engine: str, tmp: Path, url: str, settings: dict[str, str]) -> None:
        from tests.support.sched_harness import SchedCase

        self.name = f"workerkit-{engine}"
        self.case = SchedCase(engine, tmp, url, settings=settings)
        self.records = self.case.records

    def start(self, replicas: int) -> None:
        self.case.start_worker()
        self.case.start_replicas(replicas)

    def leader(self, timeout: float) -> Victim:
        return self.case.leader(timeout=timeout)

    def replace(self) -> None:
        self.case.start_replica()

    def close(self) -> None:
        self.case.close()

    def fire_delays(self, since: float, until: float) -> list[float]:
        return self.case.fire_delays(since, until)


# --- peers -------------------------------------------------------------------------------------


@dataclass
class PeerProc:
    proc: Proc

    def kill(self) -> float:
        at = time.time()
        for pid in [*descendants(self.proc.pid), self.proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.popen.wait(10)
        return at

    def terminate(self) -> tuple[float, int]:
        at = time.time()
        self.proc.popen.send_signal(signal.SIGTERM)
        try:
            code = self.proc.popen.wait(30)
        except Exception:
            self.kill()
            code = -9
        return at, code


class CeleryBeat:
    """``celery beat`` x N (each its own schedule file) and one bare ``celery worker -P solo``."""

    bucket = True

    def __init__(self, tmp: Path, url: str) -> None:
        self.name = "celery-beat"
        self.tmp = tmp
        self.url = url
        self.records = tmp / "records.jsonl"
        self.env = child_env(BENCH_REDIS_URL=url, E2E_SCHED_RECORDS=str(self.records))
        self.beats: list[Proc] = []
        self.worker: Proc | None = None

    def _celery(self, *args: str, log: str) -> Proc:
        argv = [PYTHON, "-m", "celery", "-A", "bench.scheduler_peers:celery_app", *args]
        return Proc(argv, log_path=self.tmp / f"{log}.log", env=self.env)

    def start(self, replicas: int) -> None:
        self.worker = self._celery("worker", "-P", "solo", "-l", "WARNING", log="worker")
        for _ in range(replicas):
            self.replace()

    def replace(self) -> None:
        n = len(self.beats) + 1
        self.beats.append(
            self._celery(
                "beat", "-l", "INFO", "--schedule", str(self.tmp / f"beat-{n}"), log=f"beat-{n}"
            )
        )

    def leader(self, timeout: float) -> Victim:
        return PeerProc(next(b for b in self.beats if b.alive()))

    def close(self) -> None:
        for proc in [*self.beats, *([self.worker] if self.worker else [])]:
            proc.stop(signal.SIGKILL, timeout=10)


class RqScheduler:
    """Bare ``rq worker --with-scheduler`` x N; the ticks enqueued ahead with ``enqueue_at``."""

    bucket = False

    def __init__(self, tmp: Path, url: str, horizon: float) -> None:
        self.name = "rq-scheduler"
        self.tmp = tmp
        self.url = url
        self.records = tmp / "records.jsonl"
        self.env = child_env(E2E_SCHED_RECORDS=str(self.records))
        self.workers: list[Proc] = []
        self.horizon = horizon

    def start(self, replicas: int) -> None:
        import redis
        from rq import Queue

        from bench.scheduler_peers import rq_tick

        queue = Queue("default", connection=redis.Redis.from_url(self.url))
        first = math.floor(time.time()) + 3
        for k in range(int(self.horizon) + 1):
            t = first + k * PERIOD
            when = dt.datetime.fromtimestamp(t, dt.UTC)
            queue.enqueue_at(when, rq_tick, t, job_id=f"tick-{int(t * 1000)}")
        for _ in range(replicas):
            self.replace()

    def replace(self) -> None:
        n = len(self.workers) + 1
        argv = [PYTHON, "-m", "rq.cli", "worker", "--with-scheduler", "--url", self.url]
        self.workers.append(Proc(argv, log_path=self.tmp / f"rq-{n}.log", env=self.env))

    def leader(self, timeout: float) -> Victim:
        import redis

        client = redis.Redis.from_url(self.url, decode_responses=True)

        def holder() -> Proc | None:
            name = client.get("rq:scheduler-lock:default")
            pid = client.hget(f"rq:scheduler:{name}", "pid") if name else None
            for proc in self.workers:
                if proc.alive() and pid and int(pid) in [proc.pid, *descendants(proc.pid)]:
                    return proc
            return None

        try:
            found: Proc = wait_for(holder, timeout=timeout, what="the rq scheduler lock holder")
        finally:
            client.close()
        return PeerProc(found)

    def close(self) -> None:
        for proc in self.workers:
            proc.stop(signal.SIGKILL, timeout=10)


# --- the scenario ------------------------------------------------------------------------------


def _window(system: System, start: float, end: float) -> dict[str, Any]:
    from tests.support.sched_records import load_runs, tally

    runs = load_runs(system.records)
    result = tally(runs, start=start, end=end, period=PERIOD, bucket=system.bucket).summary()
    if system.bucket:
        for key in ("delay_p50_ms", "delay_p95_ms", "delay_max_ms"):
            result[key] = None
    return result


def _until(at: float) -> None:
    time.sleep(max(0.0, at - time.time()))


def _kill(system: System, sig: signal.Signals, after: float, out: dict[str, Any]) -> None:
    from tests.support.sched_records import gap_after, load_runs

    key = "sigterm" if sig == signal.SIGTERM else "sigkill"
    try:
        victim = system.leader(timeout=60)
    except RuntimeError as exc:
        out[key] = {"error": f"no leader to {sig.name}: {exc}"}
        return
    at = victim.kill() if sig == signal.SIGKILL else victim.terminate()[0]
    _until(at + REPLACE_AFTER)
    system.replace()
    _until(at + after + 1.5)  # the last fire time of the window gets 1.5 s to run
    window = _window(system, at - 2, at + after)
    window["gap_s"] = round(gap_after(load_runs(system.records), at, horizon=after), 2)
    out[key] = window


def scenario(system: System, steady: float, after: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    system.start(2)
    wait_for(lambda: system.records.exists(), timeout=60, what=f"{system.name}'s first run")
    first = math.floor(time.time()) + 2.0
    _until(first + steady + 1.5)
    out["steady"] = _window(system, first, first + steady)
    if isinstance(system, Workerkit):
        from tests.support.sched_records import percentile

        logged = system.fire_delays(first, first + steady)
        if logged:
            out["steady"]["logged_fire_delay_p50_ms"] = round(percentile(logged, 50) * 1000, 1)
            out["steady"]["logged_fire_delay_p95_ms"] = round(percentile(logged, 95) * 1000, 1)
    _kill(system, signal.SIGTERM, after, out)
    _kill(system, signal.SIGKILL, after, out)
    return out


def chaos(system: Workerkit, seconds: float, every: float) -> dict[str, Any]:
    """3 replicas, default timing; the leader killed every ``every`` s (KILL, TERM, ...)."""
    system.start(3)
    system.leader(timeout=60)
    first = math.floor(time.time()) + 1.0
    kills = []
    last = time.time()
    while time.time() < first + seconds:
        for replica in system.case.live():  # 3 ready replicas before each kill
            system.case.wait_ready(replica, timeout=60)
        victim = system.leader(timeout=60)
        _until(last + every)
        sig = signal.SIGKILL if len(kills) % 2 == 0 else signal.SIGTERM
        last = victim.kill() if sig == signal.SIGKILL else victim.terminate()[0]
        kills.append(sig.name)
        system.replace()
    end = math.floor(last) + 3.0
    _until(end + 3)
    window = _window(system, first, end)
    window["kills"] = len(kills)
    return window


# --- the run -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _servers() -> Iterator[tuple[Any, Any]]:
    from tests.support import servers

    redis = servers.start_redis()
    try:
        postgres = servers.start_postgres()
        try:
            yield redis, postgres
        finally:
            postgres.stop()
    finally:
        redis.stop()


def _make(name: str, tmp: Path, redis: Any, postgres: Any, db: int, horizon: float) -> System:
    from workerkit.engines.sql import upgrade

    if name == "celery-beat":
        return CeleryBeat(tmp, redis.url(db))
    if name == "rq-scheduler":
        return RqScheduler(tmp, redis.url(db), horizon)
    engine = name.removeprefix("workerkit-")
    if engine == "sql":
        from tests.support import servers

        database = f"bench_{db}"
        servers.create_database(postgres, database, "template1")
        upgrade(postgres.url(database))
        return Workerkit(engine, tmp, postgres.url(database), {})
    return Workerkit(engine, tmp, redis.url(db), {})


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _markdown(data: dict[str, Any]) -> str:
    lines = [
        "# bench/scheduler.py: workerkit scheduler vs Celery beat x2 and RQ's scheduler\n",
        f"Command: `{data['command']}`\n",
        machine_markdown(data["machine"]),
        (
            "Per system: 2 replicas, a 1 s job recording its own fire time. Delay: job start - fire"
            " time (fire + queue + worker pickup). Gap: the longest pause between run starts"
            " around the kill. A fire time not run by the end of its window is missed.\n"
        ),
        (
            "| system | window | fire times | runs | duplicates | missed | delay p50 ms |"
            " delay p95 ms | delay max ms | gap s |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in data["results"].items():
        for window in ("steady", "sigterm", "sigkill", "chaos"):
            row = result.get(window)
            if row is None:
                continue
            if "error" in row:
                lines.append(f"| {name} | {window} | {row['error']} |||||||| ")
                continue
            cells = [
                row.get(k)
                for k in (
                    "fire_times",
                    "runs",
                    "duplicates",
                    "missed",
                    "delay_p50_ms",
                    "delay_p95_ms",
                    "delay_max_ms",
                    "gap_s",
                )
            ]
            label = window if window != "chaos" else f"chaos ({row.get('kills')} kills)"
            lines.append(
                f"| {name} | {label} | "
                + " | ".join("-" if c is None else str(c) for c in cells)
                + " |"
            )
    extra = []
    for name, result in data["results"].items():
        steady = result.get("steady", {})
        if "logged_fire_delay_p95_ms" in steady:
            extra.append(
                f"- {name}: the replicas' own fire delay (their logs), steady: p50 "
                f"{steady['logged_fire_delay_p50_ms']} ms, "
                f"p95 {steady['logged_fire_delay_p95_ms']} ms"
            )
    return "\n".join([*lines, "", *extra, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steady", type=float, default=30.0)
    parser.add_argument("--after", type=float, default=20.0, help="seconds watched after a kill")
    parser.add_argument("--peer-after", type=float, default=60.0, help="the same, for peers")
    parser.add_argument("--chaos", type=float, default=300.0, help="0: no chaos run")
    parser.add_argument("--chaos-every", type=float, default=15.0)
    parser.add_argument("--only", default=",".join(SYSTEMS))
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    wanted = [s for s in args.only.split(",") if s]
    unknown = set(wanted) - set(SYSTEMS)
    if unknown:
        parser.error(f"--only: unknown {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    info = machine()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-sched-") as tmpdir, _servers() as (redis, pg):
        base = Path(tmpdir)
        for db, name in enumerate(wanted, start=1):
            after = args.peer_after if not name.startswith("workerkit") else args.after
            horizon = args.steady + 2 * after + 60
            system = _make(name, _mkdir(base / name), redis, pg, db, horizon)
            try:
                results[name] = scenario(system, args.steady, after)
            except Exception as exc:
                results[name] = {"steady": {"error": f"{type(exc).__name__}: {exc}"[:300]}}
            finally:
                system.close()
            print(name, results[name], flush=True)
        engines = [name for name in wanted if name.startswith("workerkit")]
        if args.chaos > 0 and engines:
            # The engines' 5-minute runs at once: they share nothing but the machine.
            chaotic = {
                name: _make(name, _mkdir(base / f"{name}-chaos"), redis, pg, db + 8, 0)
                for db, name in enumerate(engines, start=1)
            }

            def one(name: str) -> None:
                system = chaotic[name]
                assert isinstance(system, Workerkit)
                try:
                    results[name]["chaos"] = chaos(system, args.chaos, args.chaos_every)
                except Exception as exc:
                    results[name]["chaos"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                finally:
                    system.close()

            threads = [threading.Thread(target=one, args=(name,)) for name in engines]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            print({name: results[name]["chaos"] for name in engines}, flush=True)
    data = {"command": command_line("bench.scheduler"), "machine": info, "results": results}
    text = _markdown(data)
    print(text)
    if not args.no_record:
        json_path, md_path = write_results("scheduler", data, text)
        print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
