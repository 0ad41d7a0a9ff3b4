"""CPU time per job of each process: ``workerkit run sql`` on PostgreSQL against bare Celery solo.

For each variant, K no-op jobs (bench/_counter.py: one Redis INCR each) are queued and the worker
started; once 300 jobs ran, the CPU time (utime + stime, ``/proc/PID/stat``) of every process is
read, again ``--window`` seconds later, with the counter: jobs/s and milliseconds of CPU per job
of the supervisor, its worker (and the worker's children), all PostgreSQL backends and Redis.
Steady state only: neither start-up nor the last jobs are in the window. CPU per job is less
exposed to a shared machine's load than rates are, but it moves too (caches, frequency);
interleaved rounds and same-round ratios, as bench/throughput.py.

Variants: ``wk-cN`` (``workerkit run sql`` at concurrency N, this checkout), ``before-cN`` (the
same from the tree given with ``--before DIR``, e.g. ``git archive <commit>`` unpacked there) and
``celery`` (``celery worker --pool=solo``, as bench/throughput.py runs it). ``-pM`` after either
sets ``prefetch`` to M (``wk-c8-p0``); without it, the default.

    .venv/bin/python -m bench.cpu_per_job --variants wk-c1,celery --rounds 5
    .venv/bin/python -m bench.cpu_per_job --before /tmp/old --variants before-c1,wk-c1,celery
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from bench import _counter
from bench._common import (
    PYTHON,
    REPO,
    Proc,
    descendants,
    postgres_server,
    redis_server,
)
from bench.throughput import Bench

TICK = os.sysconf("SC_CLK_TCK")
WARM = 300  # jobs run before the window opens

Groups = dict[str, list[int]]


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (0 when it is gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def measure(
    bench: Bench, proc: Proc, groups: Callable[[], Groups], window: float
) -> dict[str, float]:
    """jobs/s and ms of CPU per job of each group, over ``window`` seconds of steady state."""
    count = lambda: int(bench.client.get(_counter.COUNTER) or 0)  # noqa: E731
    deadline = time.monotonic() + 60
    while count() < WARM:
        if time.monotonic() > deadline or not proc.alive():
            raise RuntimeError(f"the worker did not run {WARM} jobs:\n{proc.log_text()}")
        time.sleep(0.02)
    pids = groups()
    before = {name: sum(map(cpu_seconds, members)) for name, members in pids.items()}
    done0, t0 = count(), time.monotonic()
    time.sleep(window)
    done1, t1 = count(), time.monotonic()
    after = {name: sum(map(cpu_seconds, members)) for name, members in pids.items()}
    if done1 >= bench.k:
        raise RuntimeError("the jobs ran out inside the window: raise -k or lower --window")
    jobs = done1 - done0
    out = {"jobs_per_s": jobs / (t1 - t0)}
    out.update({name: (after[name] - before[name]) / jobs * 1000 for name in pids})
    return out


def run_workerkit(
    bench: Bench, root: Path, concurrency: int, window: float, prefetch: int | None = None
) -> dict[str, float]:
    from bench.throughput import _enqueue_workerkit
    from tests.support.servers import free_port

    assert bench.postgres is not None
    bench.reset()
    url, drop = bench.fresh_database("postgresql")
    try:
        _enqueue_workerkit(url, bench.k)
        env = dict(os.environ)
        env.pop("WORKERKIT_CONFIG", None)
        env.update(
            PYTHONPATH=str(root),
            WORKERKIT_APP="bench.noop_app:app",
            WORKERKIT_DATABASE_URL=url,
            WORKERKIT_CONCURRENCY=str(concurrency),
            WORKERKIT_HTTP_HOST="127.0.0.1",
            WORKERKIT_HTTP_PORT=str(free_port()),
            WORKERKIT_LOG_FORMAT="json",
            **{_counter.URL_ENV: bench.redis_url},
        )
        if prefetch is not None:
            env["WORKERKIT_PREFETCH"] = str(prefetch)
        argv = [PYTHON, "-c", "from workerkit.cli import main; main()", "run", "sql"]
        log_path = bench.tmp / f"wk-{uuid.uuid4().hex[:6]}.log"
        proc = Proc(argv, log_path=log_path, env=env, cwd=root)
        postmaster = bench.postgres.pid
        try:
            return measure(
                bench,
                proc,
                lambda: {
                    "supervisor": [proc.pid],
                    "worker": descendants(proc.pid),
                    "postgres": descendants(postmaster),
                    "redis": [bench.redis.pid],
                },
                window,
            )
        finally:
            proc.stop(signal.SIGTERM, timeout=30)
            proc.stop(signal.SIGKILL)
    finally:
        drop()


def run_celery(bench: Bench, window: float) -> dict[str, float]:
    from bench import celery_noop

    bench.reset()
    with celery_noop.app.connection_for_write() as conn, conn.Producer() as producer:
        for _ in range(bench.k):
            celery_noop.noop.apply_async(args=(bench.k,), producer=producer)
    env = dict(os.environ, PYTHONPATH=str(REPO), BENCH_CELERY_ACKS_LATE="0")
    env[_counter.URL_ENV] = bench.redis_url
    argv = [
        *(PYTHON, "-m", "celery", "-A", "bench.celery_noop", "worker", "--pool=solo"),
        *("--concurrency=1", "--without-heartbeat", "--without-gossip", "--without-mingle"),
        *("-Q", celery_noop.QUEUE, "-n", f"bench-{uuid.uuid4().hex[:6]}@%h"),
    ]
    proc = Proc(argv, log_path=bench.tmp / f"celery-{uuid.uuid4().hex[:6]}.log", env=env)
    try:
        return measure(
            bench, proc, lambda: {"worker": [proc.pid], "redis": [bench.redis.pid]}, window
        )
    finally:
        proc.stop(signal.SIGTERM, timeout=30)
        proc.stop(signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--variants", default="wk-c1,celery", help="wk-cN[-pM], before-cN[-pM], celery"
    )
    parser.add_argument("--before", type=Path, help="the tree the before-cN variants run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=float, default=3.0, help="seconds measured per run")
    parser.add_argument("-k", "--jobs", type=int, default=6000, help="jobs queued per run")
    args = parser.parse_args()
    variants = args.variants.split(",")
    if any(v.startswith("before-") for v in variants) and args.before is None:
        parser.error("before-cN needs --before DIR")
    results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    with (
        tempfile.TemporaryDirectory(prefix="workerkit-bench-") as tmp,
        redis_server() as redis,
        postgres_server() as postgres,
    ):
        bench = Bench(Path(tmp), redis, postgres, args.jobs)
        for round_no in range(1, args.rounds + 1):
            for variant in variants:
                if variant == "celery":
                    row = run_celery(bench, args.window)
                else:
                    code, concurrency = variant.split("-c")
                    concurrency, _, prefetch = concurrency.partition("-p")
                    root = REPO if code == "wk" else args.before
                    row = run_workerkit(
                        bench,
                        root,
                        int(concurrency),
                        args.window,
                        int(prefetch) if prefetch else None,
                    )
                results[variant].append(row)
                shown = " ".join(f"{k}={v:.3f}" for k, v in row.items())
                print(f"round {round_no} {variant:12} {shown}", flush=True)
    print(f"\nload average at the end: {os.getloadavg()}")
    print("medians (CPU in ms per job); vs celery: median of same-round ratios (min-max)")
    celery = results.get("celery")
    for variant, rows in results.items():
        medians = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
        ratio = ""
        if celery:
            ratios = [r["jobs_per_s"] / c["jobs_per_s"] for r, c in zip(rows, celery, strict=True)]
            low, high = min(ratios), max(ratios)
            ratio = f"  vs celery {statistics.median(ratios):.2f}x ({low:.2f}-{high:.2f})"
        print(f"{variant:12} " + " ".join(f"{k}={v:.3f}" for k, v in medians.items()) + ratio)


if __name__ == "__main__":
    main()
