"""Enqueue -> start latency on an idle worker, p50 and p99 (issue 16, item 4).

Variants, interleaved round by round (the order rotates each round), one worker alive at a time:

* ``wk-sql-pg``: ``workerkit run sql`` on PostgreSQL (woken by LISTEN/NOTIFY);
* ``wk-sql-sqlite``: ``workerkit run sql`` on SQLite (woken by the file's data version, read
  every 50 ms; it polled every ``poll_interval``, 1 s, before 2026-12-04: ~970 ms);
* ``wk-rq`` / ``bare-rq``: ``workerkit run rq`` and ``rq worker`` (both RQ's forking Worker, JSON
  serializer), on a private redis-server;
* ``wk-celery`` / ``bare-celery``: ``workerkit run celery -- --pool=solo`` and ``celery worker
  --pool solo`` (defaults otherwise), on the same redis-server.

As users see it: the producer (this script) takes ``time.time()`` right before the enqueue call
and passes it as the job's argument; the job's first statement takes ``time.time()`` and pushes
both to a Redis list (bench/latency_stamp.py; the apps: bench/latency_jobs.py), which this
script pops. One job at a time: the next is enqueued a random 20-50 ms after the previous one's
stamp arrived, so the worker is idle each time. Each worker gets ``--warmup`` unmeasured jobs
first (imports, first connections).

Run from the repository root::

    .venv/bin/python -m bench.latency               # 5 rounds, ~6 minutes
    .venv/bin/python -m bench.latency --rounds 3 --only wk-sql-pg,bare-celery --no-record

Results: bench/results/latency.md and .json.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench._common import (
    PYTHON,
    WORKERKIT,
    Proc,
    child_env,
    command_line,
    fmt,
    machine,
    machine_markdown,
    percentile,
    postgres_server,
    redis_server,
    summary,
    wait_for,
    write_results,
)
from bench.latency_stamp import KEY_ENV, QUEUE, TASK, URL_ENV, stamp
from bench.supervisor import free_port, http_status

__all__ = ("main",)

VARIANTS = ("wk-sql-pg", "wk-sql-sqlite", "wk-rq", "bare-rq", "wk-celery", "bare-celery")
READY_TIMEOUT = 60.0
STAMP_TIMEOUT = 30.0


def _argv_env(variant: str, urls: dict[str, str], key: str, index: int) -> Any:
    port = free_port() if variant.startswith("wk") else None
    env = child_env(
        **{URL_ENV: urls["redis"], KEY_ENV: key},
        WORKERKIT_REDIS_URL=urls["redis"],
        WORKERKIT_QUEUES=QUEUE,
        WORKERKIT_HTTP_HOST="127.0.0.1",
        WORKERKIT_HTTP_PORT=str(port or 0),
        WORKERKIT_LOG_FORMAT="json",
    )
    argv: list[str]
    if variant.startswith("wk-sql"):
        env["WORKERKIT_DATABASE_URL"] = urls["pg" if variant == "wk-sql-pg" else "sqlite"]
        argv = [*WORKERKIT, "run", "sql", "--app", "bench.latency_jobs:sql_app"]
    elif variant == "wk-rq":
        argv = [*WORKERKIT, "run", "rq", "--app", "bench.latency_jobs:rq_app"]
    elif variant == "wk-celery":
        env["WORKERKIT_APP"] = "bench.latency_jobs:celery_app"
        argv = [*WORKERKIT, "run", "celery", "--", "--pool=solo", f"--hostname=wk{index}@%h"]
    elif variant == "bare-rq":
        argv = [
            PYTHON, "-m", "rq.cli", "worker", "--url", urls["redis"],
            "--serializer", "rq.serializers.JSONSerializer", QUEUE,
        ]  # fmt: skip
    else:
        argv = [
            PYTHON, "-m", "celery", "-A", "bench.latency_jobs:celery_app", "worker",
            "--pool", "solo", "-Q", QUEUE, "-n", f"bare{index}@%h", "-l", "INFO",
        ]  # fmt: skip
    return argv, env, port


class Producers:
    """One enqueue function per variant, each on its own long-lived client (as an app has)."""

    def __init__(self, urls: dict[str, str]) -> None:
        import redis
        from rq import Queue
        from rq.serializers import JSONSerializer

        from bench import latency_jobs
        from workerkit.app import App
        from workerkit.settings import Settings

        self._apps: list[App] = []
        self._tasks: dict[str, Any] = {}
        for name in ("pg", "sqlite"):
            url = urls[name]
            app = App(url, settings=Settings().replace(database_url=url))
            self._tasks[name] = app.task(name=TASK, queue=QUEUE, timeout=60)(stamp)
            self._apps.append(app)
        self.redis = redis.Redis.from_url(urls["redis"])
        os.environ[URL_ENV] = urls["redis"]
        self._rq = Queue(QUEUE, connection=self.redis, serializer=JSONSerializer)
        self._celery_task = latency_jobs.celery_app.tasks[TASK]

    def enqueue_for(self, variant: str) -> Callable[[float], object]:
        if variant == "wk-sql-pg":
            return self._tasks["pg"].enqueue  # type: ignore[no-any-return]
        if variant == "wk-sql-sqlite":
            return self._tasks["sqlite"].enqueue  # type: ignore[no-any-return]
        if variant in ("wk-rq", "bare-rq"):
            return lambda sent: self._rq.enqueue(
                "bench.latency_stamp.stamp", sent, result_ttl=60, failure_ttl=60
            )
        return lambda sent: self._celery_task.apply_async((sent,))

    def close(self) -> None:
        for app in self._apps:
            app.backend.close()
        self.redis.close()


def _ready(variant: str, proc: Proc, port: int | None, producers: Producers) -> Callable[[], bool]:
    if port is not None:
        return lambda: http_status(port, "/readyz", timeout=0.5) == 200
    if variant == "bare-rq":
        return lambda: producers.redis.scard(f"rq:workers:{QUEUE}") > 0
    return lambda: " ready." in proc.log_text(100_000)


def _one(enqueue: Callable[[float], object], producers: Producers, key: str) -> float:
    sent = time.time()
    enqueue(sent)
    popped = producers.redis.blpop([key], timeout=STAMP_TIMEOUT)
    if popped is None:
        raise RuntimeError(f"no stamp within {STAMP_TIMEOUT:g}s")
    got_sent, started = map(float, popped[1].split())
    if got_sent != sent:
        raise RuntimeError(f"stamp of another job: sent {got_sent!r}, expected {sent!r}")
    return (started - sent) * 1000.0


def run_one(
    variant: str, producers: Producers, urls: dict[str, str], tmp: Path, index: int, args: Any
) -> list[float]:
    key = f"latency:{variant}:{index}"
    argv, env, port = _argv_env(variant, urls, key, index)
    proc = Proc(argv, log_path=tmp / f"{variant}-{index}.log", env=env)
    enqueue = producers.enqueue_for(variant)
    jobs = args.jobs
    rng = random.Random(index)
    samples: list[float] = []
    try:
        wait_for(
            _ready(variant, proc, port, producers),
            timeout=READY_TIMEOUT,
            what=f"{variant} ready",
            proc=proc,
        )
        for n in range(args.warmup + jobs):
            time.sleep(rng.uniform(args.gap_min, args.gap_max) / 1000)
            if not proc.alive():
                raise RuntimeError(f"{variant} exited:\n{proc.log_text()}")
            latency = _one(enqueue, producers, key)
            if n >= args.warmup:
                samples.append(latency)
        proc.stop(signal.SIGTERM, timeout=30)
    finally:
        proc.stop(signal.SIGKILL)
        producers.redis.delete(key)
    return samples


def _cell(values: list[float], digits: int = 1) -> str:
    s = summary(values)
    if not s.get("n"):
        return "-"
    low, high = fmt(s["min"], "", digits), fmt(s["max"], "", digits)
    return f"{fmt(s['median'], '', digits)} ({low}-{high})"


def report(run: dict[str, Any]) -> str:
    lines = [
        "# bench/latency.py: enqueue -> start latency on an idle worker (issue 16, item 4)",
        "",
        f"Command: `{run['command']}`",
        "",
        machine_markdown(run["machine"]),
        (
            f"Load average at the end: {run['machine']['loadavg_at_end']}. Rounds: "
            f"{run['rounds']}, variants interleaved (order rotated each round), one worker alive "
            f"at a time; {run['jobs']} jobs per variant per round, "
            f"{run['warmup']} warm-up jobs not counted, "
            f"{run['gap_ms'][0]:g}-{run['gap_ms'][1]:g} ms random gap. Latency = the job's "
            "`time.time()` at its start minus the producer's `time.time()` right before the "
            "enqueue call, in ms."
        ),
        "",
        (
            "Per round: p50 and p99 of that round's jobs; the table gives the median of the "
            'rounds (min-max over the rounds). "all jobs" pools every measured job of every round.'
        ),
        "",
        (
            "| variant | p50 ms, median of rounds (min-max) | p99 ms, median of rounds (min-max) "
            "| p50 / p90 / p99 / max ms, all jobs | jobs |"
        ),
        "|---|---|---|---|---|",
    ]
    for variant, rounds in run["samples"].items():
        if not rounds:
            continue
        every = [x for r in rounds for x in r]
        pooled = " / ".join(fmt(percentile(every, q), "", 1) for q in (50, 90, 99))
        lines.append(
            f"| {variant} | {_cell([percentile(r, 50) for r in rounds])} | "
            f"{_cell([percentile(r, 99) for r in rounds])} | {pooled} / {fmt(max(every), '', 1)} "
            f"| {len(every)} |"
        )
    return "\n".join([*lines, ""])


def _prepare(tmp: Path, pg_url: str) -> dict[str, str]:
    urls = {"pg": pg_url, "sqlite": f"sqlite:///{tmp / 'latency.sqlite3'}"}
    for name in ("pg", "sqlite"):
        subprocess.run(
            [*WORKERKIT, "db", "upgrade"],
            env=child_env(WORKERKIT_DATABASE_URL=urls[name]),
            check=True,
            capture_output=True,
        )
    return urls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=200, help="measured jobs per round")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--gap-min", type=float, default=20.0, help="ms")
    parser.add_argument("--gap-max", type=float, default=50.0, help="ms")
    parser.add_argument("--only", default="", help="comma-separated variants")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    variants = [v for v in VARIANTS if not args.only or v in args.only.split(",")]
    info = machine()
    samples: dict[str, list[list[float]]] = {v: [] for v in variants}
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="workerkit-bench-") as tmp_name,
        redis_server() as rs,
        postgres_server() as pg,
    ):
        tmp = Path(tmp_name)
        urls = {**_prepare(tmp, pg.url()), "redis": rs.url()}
        producers = Producers(urls)
        try:
            for index in range(args.rounds):
                order = variants[index % len(variants) :] + variants[: index % len(variants)]
                line = [f"round {index + 1}/{args.rounds}:"]
                for variant in order:
                    values = run_one(variant, producers, urls, tmp, index, args)
                    samples[variant].append(values)
                    line.append(
                        f"{variant} p50 {percentile(values, 50):.1f} "
                        f"p99 {percentile(values, 99):.1f}"
                    )
                print("  ".join(line), f"(load {os.getloadavg()[0]:.1f})", flush=True)
        finally:
            producers.close()
    info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    run = {
        "command": command_line("bench.latency"),
        "machine": info,
        "rounds": args.rounds,
        "jobs": args.jobs,
        "warmup": args.warmup,
        "gap_ms": [args.gap_min, args.gap_max],
        "duration_s": round(time.monotonic() - started, 1),
        "summary": {
            v: {
                "p50_per_round": [percentile(r, 50) for r in rounds],
                "p99_per_round": [percentile(r, 99) for r in rounds],
                "p50_median": statistics.median(percentile(r, 50) for r in rounds),
                "p99_median": statistics.median(percentile(r, 99) for r in rounds),
            }
            for v, rounds in samples.items()
            if rounds
        },
        "samples": samples,
    }
    text = report(run)
    print(text)
    if not args.no_record:
        paths = write_results("latency", run, text)
        print("recorded:", *paths)


if __name__ == "__main__":
    main()
