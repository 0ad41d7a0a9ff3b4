"""No-op job throughput: workerkit's RQ worker against bare ``rq worker``, same worker class.

Run from the repository root::

    python -m bench.rq_overhead [--jobs 3000] [--rounds 2]

For each worker class (forking, simple) and each round, the same number of no-op jobs (JSON
serializer) is enqueued and drained by ``rq worker --burst`` with ``--worker-class rq.Worker``
(or ``rq.SimpleWorker``) and with ``workerkit.engines.rq.Worker`` (or ``SimpleWorker``), in
the same round (interleaved, the order alternating), on a private redis-server. The time is
from the worker process's start to its exit; an empty burst run of each class is subtracted as
its start-up cost. Results are printed and written to bench/results/rq_overhead.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUEUE = "bench-rq-overhead"

WORKER_CLASSES = {
    "forking": ("rq.Worker", "workerkit.engines.rq.Worker"),
    "simple": ("rq.SimpleWorker", "workerkit.engines.rq.SimpleWorker"),
}


def noop() -> None:
    """The job: nothing at all."""


def _app() -> object:
    from workerkit.engines.rq import RqApp

    return RqApp(modules=["bench.rq_overhead"])


def __getattr__(name: str) -> object:
    # `WORKERKIT_APP=bench.rq_overhead:app`, built on first use so that importing this module
    # (as RQ does to find `noop`) costs nothing.
    if name == "app":
        return _app()
    raise AttributeError(name)


def run_burst(url: str, worker_class: str, jobs: int) -> float:
    import redis
    from rq import Queue
    from rq.serializers import JSONSerializer

    connection = redis.Redis.from_url(url)
    connection.flushdb()
    queue = Queue(QUEUE, connection=connection, serializer=JSONSerializer)
    with connection.pipeline() as pipeline:
        for _ in range(jobs):
            queue.enqueue("bench.rq_overhead.noop", pipeline=pipeline, result_ttl=3600)
        pipeline.execute()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "WORKERKIT_APP": "bench.rq_overhead:app",
        "WORKERKIT_REDIS_URL": url,
        "WORKERKIT_LOG_LEVEL": "warning",
    }
    command = [
        sys.executable, "-m", "rq.cli", "worker", "--burst", "--quiet",
        "--url", url, "--serializer", "rq.serializers.JSONSerializer",
        "--worker-class", worker_class, QUEUE,
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, env=env, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - started
    left = queue.count
    finished = queue.finished_job_registry.count
    connection.close()
    if left or finished != jobs:
        raise SystemExit(f"{worker_class}: {left} jobs left, {finished} of {jobs} finished")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from tests.support import servers

    server = servers.start_redis()
    lines = [
        "# RQ engine overhead: no-op job throughput",
        "",
        (
            f"Command: `python -m bench.rq_overhead --jobs {args.jobs} --rounds {args.rounds}` "
            f"(Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, private redis-server)."
        ),
        "",
        "Forking runs drain `--jobs / 5` jobs, simple runs `--jobs`; start-up subtracted.",
        "",
        "Each round runs bare RQ and workerkit back to back (the order alternating), so both",
        "see the same load on a shared, noisy machine. Overhead is the median over rounds of the",
        "same-round time ratio (workerkit / bare - 1); the rates' medians are shown too.",
        "",
        "| worker class | engine | jobs/s per round | median jobs/s | overhead (same-round) |",
        "|---|---|---|---|---|",
    ]
    try:
        url = server.url(0)
        for mode, (bare, ours) in WORKER_CLASSES.items():
            # A fork per job makes the forking worker about ten times slower: fewer jobs.
            jobs = args.jobs if mode == "simple" else max(1, args.jobs // 5)
            startup = {cls: run_burst(url, cls, 0) for cls in (bare, ours)}
            rates: dict[str, list[float]] = {bare: [], ours: []}
            ratios: list[float] = []
            for index in range(args.rounds):
                # Alternate which goes first, so neither always runs on a warmer machine.
                order = (bare, ours) if index % 2 == 0 else (ours, bare)
                elapsed = {cls: run_burst(url, cls, jobs) - startup[cls] for cls in order}
                for cls in (bare, ours):
                    rates[cls].append(jobs / elapsed[cls])
                ratios.append(elapsed[ours] / elapsed[bare])
            overhead = (statistics.median(ratios) - 1) * 100
            each_ratio = ", ".join(f"{(r - 1) * 100:+.1f}%" for r in ratios)
            for cls in (bare, ours):
                median = statistics.median(rates[cls])
                each = ", ".join(f"{rate:.0f}" for rate in rates[cls])
                cell = "" if cls == bare else f"{overhead:+.1f}% (rounds: {each_ratio})"
                lines.append(f"| {mode} | `{cls}` | {each} | {median:.0f} | {cell} |")
    finally:
        server.stop()
    text = "\n".join(lines) + "\n"
    print(text)
    (REPO / "bench" / "results" / "rq_overhead.md").write_text(text)


if __name__ == "__main__":
    main()
