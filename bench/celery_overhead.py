"""No-op task throughput: workerkit's celery engine against bare Celery, solo and prefork.

Usage (one run, one machine; needs redis-server on PATH)::

    .venv/bin/python bench/celery_overhead.py [--tasks 3000] [--concurrency 2] [--rounds 3]

For each pool it enqueues ``--tasks`` no-op tasks, starts the worker (bare ``celery worker`` or
``workerkit run celery``), and times from the first to the last acknowledgement (the ``unacked``
hash and the queue both empty), so start-up time is not counted. The variants run interleaved,
round after round (a shared machine drifts: each round compares runs made seconds apart), and
the table gives each variant's median rate and workerkit's overhead against the median of bare
Celery with the same settings, with the per-round figures below it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.servers import free_port  # noqa: E402

APP = """
from celery import Celery
import os
app = Celery("bench", broker=os.environ["BENCH_REDIS_URL"])
app.conf.update(broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)
if os.environ.get("BENCH_SAFE"):  # what workerkit sets: late acks, prefetch 1
    app.conf.update(task_acks_late=True, task_reject_on_worker_lost=True,
                    worker_prefetch_multiplier=1)

@app.task(name="noop")
def noop(i):
    return i
"""


def run_one(kind: str, pool: str, tasks: int, concurrency: int, url: str, work: Path) -> float:
    import redis
    from celery import Celery

    client = redis.Redis.from_url(url)
    client.flushdb()
    producer = Celery("bench", broker=url)
    with producer.connection_for_write() as conn:
        for i in range(tasks):
            producer.send_task("noop", args=[i], queue="celery", connection=conn)
    env = {**os.environ, "BENCH_REDIS_URL": url, "PYTHONPATH": f"{work}:{REPO}"}
    if kind == "bare-safe":
        env["BENCH_SAFE"] = "1"
    common = [f"--pool={pool}", f"--concurrency={concurrency}", "--loglevel=WARNING"]
    if kind.startswith("bare"):
        argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench_app:app",
            "worker",
            "-Q",
            "celery",
            "--without-mingle",
            "--without-gossip",
            "--without-heartbeat",
            *common,
        ]
    else:
        env.update(
            WORKERKIT_APP="bench_app:app",
            WORKERKIT_REDIS_URL=url,
            WORKERKIT_QUEUES="celery",
            WORKERKIT_HTTP_PORT="0",
            WORKERKIT_LOG_LEVEL="warning",
            WORKERKIT_CONCURRENCY=str(concurrency),
        )
        argv = [
            sys.executable,
            "-c",
            "from workerkit.cli import main; main()",
            "run",
            "celery",
            "--",
            *common,
        ]
    proc = subprocess.Popen(
        argv,
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        while client.llen("celery") == tasks:
            time.sleep(0.001)
        started = time.perf_counter()
        while client.llen("celery") or client.hlen("unacked"):
            time.sleep(0.002)
        return time.perf_counter() - started
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    (work / "bench_app.py").write_text(APP)
    port = free_port()
    server = subprocess.Popen(
        [
            shutil.which("redis-server") or "redis-server",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(work),
        ],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        time.sleep(0.5)
        url = f"redis://127.0.0.1:{port}/0"
        print(
            f"{args.tasks} no-op tasks, concurrency {args.concurrency} (solo: 1), "
            f"{args.rounds} interleaved rounds; seconds from first to last ack, medians\n"
        )
        pools = ("solo", "prefork")
        kinds = ("bare", "bare-safe", "workerkit")
        times: dict[tuple[str, str], list[float]] = {(p, k): [] for p in pools for k in kinds}
        for _ in range(args.rounds):
            for pool in pools:
                conc = 1 if pool == "solo" else args.concurrency
                for kind in kinds:
                    times[pool, kind].append(run_one(kind, pool, args.tasks, conc, url, work))
        print(
            "| pool | bare Celery defaults | bare Celery, workerkit's config | workerkit "
            "| workerkit vs same config |"
        )
        print("|---|---|---|---|---|")
        for pool in pools:
            bare, safe, wk = (statistics.median(times[pool, k]) for k in kinds)
            print(
                f"| {pool} | {args.tasks / bare:.0f}/s | {args.tasks / safe:.0f}/s | "
                f"{args.tasks / wk:.0f}/s | {(wk - safe) / safe * 100:+.1f}% time |"
            )
        print("\nPer round (tasks/s: bare defaults / same config / workerkit; overhead):\n")
        for pool in pools:
            for i in range(args.rounds):
                bare, safe, wk = (times[pool, k][i] for k in kinds)
                print(
                    f"- {pool} round {i + 1}: {args.tasks / bare:.0f} / {args.tasks / safe:.0f} "
                    f"/ {args.tasks / wk:.0f}; {(wk - safe) / safe * 100:+.1f}%"
                )
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
