"""Python function calls per job, this tree against another: an overhead measure immune to noise.

Run from the repository root, with the other tree checked out beside it::

    git worktree add --detach ../old 2247e05
    .venv/bin/python -m bench.call_counts --other ../old [--reps 2]

Timings on a shared two-core machine swing by tens of percent between rounds; the number of
Python calls a worker makes per job does not. For each tree it runs workerkit's RQ
``SimpleWorker`` (``rq worker --burst``) and workerkit's Celery engine (solo pool, no supervisor)
under cProfile on a small and a large batch of no-op jobs, and prints the difference divided by
the difference in jobs: the per-job calls, start-up excluded. cProfile sees the main thread only
(the RQ upkeep thread and Celery's keeper are not counted; they do not run per job).
"""

from __future__ import annotations

import argparse
import os
import pstats
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.celery_overhead import APP

REPO = Path(__file__).resolve().parents[1]
SMALL, LARGE = 300, 1300

# Runs in the profiled process: the Celery worker cannot be stopped in a way that lets cProfile
# write its file (workerkit exits with os._exit), so a thread dumps it once the queue is drained.
CELERY_RUNNER = """
import cProfile, os, threading, time
import redis
url, total, out = os.environ["BENCH_REDIS_URL"], int(os.environ["BENCH_TASKS"]), os.environ["OUT"]
profile = cProfile.Profile()
def watch():
    client = redis.Redis.from_url(url)
    while client.llen("celery") == total:
        time.sleep(0.001)
    while client.llen("celery") or client.hlen("unacked"):
        time.sleep(0.002)
    profile.create_stats()
    profile.dump_stats(out)
    os._exit(0)
threading.Thread(target=watch, daemon=True).start()
from workerkit.engines.celery import main
profile.enable()
main(["--pool=solo", "--concurrency=1", "--loglevel=WARNING"])
"""


def _env(url: str, tree: Path, work: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKERKIT_")}
    return {
        **env,
        "PYTHONPATH": f"{work}{os.pathsep}{tree}",
        "WORKERKIT_REDIS_URL": url,
        "WORKERKIT_LOG_LEVEL": "warning",
        **extra,
    }


def rq_calls(url: str, tree: Path, work: Path, jobs: int) -> int:
    import redis
    from rq import Queue
    from rq.serializers import JSONSerializer

    client = redis.Redis.from_url(url)
    client.flushdb()
    queue = Queue("bench-rq-overhead", connection=client, serializer=JSONSerializer)
    with client.pipeline() as pipeline:
        for _ in range(jobs):
            queue.enqueue("bench.rq_overhead.noop", pipeline=pipeline, result_ttl=3600)
        pipeline.execute()
    out = work / f"rq-{jobs}.prof"
    command = [
        sys.executable, "-m", "cProfile", "-o", str(out), "-m", "rq.cli", "worker", "--burst",
        "--quiet", "--url", url, "--serializer", "rq.serializers.JSONSerializer",
        "--worker-class", "workerkit.engines.rq.SimpleWorker", "bench-rq-overhead",
    ]  # fmt: skip
    env = _env(url, tree, work, WORKERKIT_APP="bench.rq_overhead:app")
    subprocess.run(command, env=env, cwd=tree, check=True, stdout=subprocess.DEVNULL, timeout=300)
    return pstats.Stats(str(out)).total_calls  # type: ignore[attr-defined,no-any-return]


def celery_calls(url: str, tree: Path, work: Path, tasks: int) -> int:
    import redis
    from celery import Celery

    redis.Redis.from_url(url).flushdb()
    producer = Celery("bench", broker=url)
    with producer.connection_for_write() as conn:
        for i in range(tasks):
            producer.send_task("noop", args=[i], queue="celery", connection=conn)
    out = work / f"celery-{tasks}.prof"
    env = _env(
        url, tree, work,
        BENCH_REDIS_URL=url, BENCH_TASKS=str(tasks), OUT=str(out), WORKERKIT_APP="bench_app:app",
        WORKERKIT_QUEUES="celery", WORKERKIT_HTTP_PORT="0", WORKERKIT_CONCURRENCY="1",
    )  # fmt: skip
    command = [sys.executable, "-c", CELERY_RUNNER]
    subprocess.run(command, env=env, cwd=work, check=True, stdout=subprocess.DEVNULL, timeout=300)
    return pstats.Stats(str(out)).total_calls  # type: ignore[attr-defined,no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", type=Path, required=True, help="the other tree's root")
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from tests.support import servers

    trees = {"this": REPO, "other": args.other.resolve()}
    server = servers.start_redis()
    try:
        url = server.url(0)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            (work / "bench_app.py").write_text(APP)
            for _ in range(args.reps):
                for name, tree in trees.items():
                    for engine, count in (("rq", rq_calls), ("celery", celery_calls)):
                        small, large = (count(url, tree, work, n) for n in (SMALL, LARGE))
                        per_job = (large - small) / (LARGE - SMALL)
                        print(
                            f"{engine:7} {name:6} {tree}: {per_job:,.0f} calls per job", flush=True
                        )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
