"""No-op task throughput: workerkit's celery engine against bare Celery, solo and prefork.

Run from the repository root (needs redis-server on PATH)::

    .venv/bin/python -m bench.celery_overhead [--tasks 3000] [--concurrency 2] [--rounds 9]

For each pool and each round it enqueues ``--tasks`` no-op tasks, starts a worker, and times
from the first to the last acknowledgement (the queue and kombu's ``unacked`` hash both empty),
so start-up is not counted. The variants:

* ``bare``: ``celery worker`` with Celery's defaults (acks on receipt, prefetch multiplier 4);
* ``bare-safe``: ``celery worker`` with what workerkit sets by default (late acks, reject on
  worker lost, prefetch multiplier 1, time limits 300 s / soft 295 s from the default budget),
  the baseline workerkit is held to: the same Celery work, without workerkit's code;
* ``engine``: workerkit's engine alone, ``python -m workerkit.engines.celery``, no supervisor
  (as a user's own ``celery worker`` command with workerkit's bootsteps would run);
* ``workerkit``: the production path, ``workerkit run celery`` (supervisor, events channel,
  metrics, probes).

The variants of a pool run back to back within a round, in an order that rotates from round to
round (a shared machine drifts; each round compares runs made seconds apart, and none always
goes first). Overhead is the median over rounds of the same-round time ratio against
``bare-safe``. Results go to bench/results/celery_overhead.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import (
    REPO,
    child_env,
    command_line,
    machine,
    machine_markdown,
    redis_server,
    write_results,
)

APP = """
from celery import Celery
import os
app = Celery("bench", broker=os.environ["BENCH_REDIS_URL"])
app.conf.update(broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)
if os.environ.get("BENCH_SAFE"):  # what workerkit sets by default (workerkit.engines.celery)
    app.conf.update(task_acks_late=True, task_reject_on_worker_lost=True,
                    worker_prefetch_multiplier=1, task_time_limit=300, task_soft_time_limit=295)

@app.task(name="noop")
def noop(i):
    return i
"""

KINDS = ("bare", "bare-safe", "engine", "workerkit")
POOLS = ("solo", "prefork")
#: How often the drain is polled: 5 ms resolution on runs of 2-4 s, and few enough Redis
#: commands that the poll does not load the server the workers share.
POLL = 0.005


def _argv(kind: str, common: list[str]) -> list[str]:
    if kind.startswith("bare"):
        return [
            sys.executable, "-m", "celery", "-A", "bench_app:app", "worker", "-Q", "celery",
            "--without-mingle", "--without-gossip", "--without-heartbeat", *common,
        ]  # fmt: skip
    if kind == "engine":
        return [sys.executable, "-m", "workerkit.engines.celery", *common]
    # What the `workerkit` console script runs.
    cli = "from workerkit.cli import main; main()"
    return [sys.executable, "-c", cli, "run", "celery", "--", *common]


def run_one(kind: str, pool: str, tasks: int, concurrency: int, url: str, work: Path) -> float:
    """Seconds from the first to the last acknowledgement of ``tasks`` no-op tasks."""
    import redis
    from celery import Celery

    client = redis.Redis.from_url(url)
    client.flushdb()
    producer = Celery("bench", broker=url)
    with producer.connection_for_write() as conn:
        for i in range(tasks):
            producer.send_task("noop", args=[i], queue="celery", connection=conn)
    env = child_env(
        BENCH_REDIS_URL=url,
        PYTHONPATH=f"{work}{os.pathsep}{REPO}",
        WORKERKIT_APP="bench_app:app",
        WORKERKIT_REDIS_URL=url,
        WORKERKIT_QUEUES="celery",
        WORKERKIT_HTTP_PORT="0",
        WORKERKIT_LOG_LEVEL="warning",
        WORKERKIT_CONCURRENCY=str(concurrency),
    )
    if kind == "bare-safe":
        env["BENCH_SAFE"] = "1"
    common = [f"--pool={pool}", f"--concurrency={concurrency}", "--loglevel=WARNING"]
    proc = subprocess.Popen(
        _argv(kind, common),
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # killed below as a group: the worker, its pool, its supervisor
    )
    try:
        while client.llen("celery") == tasks:
            time.sleep(POLL / 5)
        started = time.perf_counter()
        while client.llen("celery") or client.hlen("unacked"):
            time.sleep(POLL)
        return time.perf_counter() - started
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    info = machine()
    times: dict[str, dict[str, list[float]]] = {p: {k: [] for k in KINDS} for p in POOLS}
    with tempfile.TemporaryDirectory() as tmp, redis_server() as server:
        work = Path(tmp)
        (work / "bench_app.py").write_text(APP)
        url = server.url(0)
        for index in range(args.rounds):
            order = KINDS[index % len(KINDS) :] + KINDS[: index % len(KINDS)]
            for pool in POOLS:
                concurrency = 1 if pool == "solo" else args.concurrency
                for kind in order:
                    elapsed = run_one(kind, pool, args.tasks, concurrency, url, work)
                    times[pool][kind].append(elapsed)
                    print(f"round {index + 1} {pool:8} {kind:10} {args.tasks / elapsed:6.0f}/s")
    lines = [
        "# Celery engine overhead: no-op task throughput",
        "",
        f"Command: `{command_line('bench.celery_overhead')}`",
        "",
        machine_markdown(info),
        (
            f"{args.tasks} no-op tasks per run, private redis-server, prefork concurrency "
            f"{args.concurrency}; time from the first to the last acknowledgement. Overhead: "
            "the median over rounds of the same-round time ratio against `bare-safe` (bare "
            "Celery with workerkit's default settings: late acks, reject on worker lost, "
            "prefetch 1, time limits 300 s / soft 295 s)."
        ),
        "",
        "| pool | variant | tasks/s per round | median tasks/s | overhead vs bare-safe |",
        "|---|---|---|---|---|",
    ]
    summary: dict[str, Any] = {}
    for pool in POOLS:
        baseline = times[pool]["bare-safe"]
        for kind in KINDS:
            runs = times[pool][kind]
            rates = [args.tasks / t for t in runs]
            ratios = [t / b - 1 for t, b in zip(runs, baseline, strict=True)]
            overhead = statistics.median(ratios) * 100
            summary[f"{pool}/{kind}"] = {
                "seconds": runs,
                "median_rate": statistics.median(rates),
                "overhead_percent": overhead,
            }
            cell = (
                "(baseline)"
                if kind == "bare-safe"
                else f"**{overhead:+.1f}%** ({', '.join(f'{r * 100:+.1f}' for r in ratios)})"
            )
            lines.append(
                f"| {pool} | {kind} | {', '.join(f'{r:.0f}' for r in rates)} | "
                f"{statistics.median(rates):.0f} | {cell} |"
            )
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    write_results("celery_overhead", {"machine": info, "args": vars(args), "runs": summary}, text)


if __name__ == "__main__":
    main()
