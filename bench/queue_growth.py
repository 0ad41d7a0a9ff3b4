"""Flat cost as the queue grows (issue 16 item 3): an empty table against a big one, PostgreSQL.

Two databases on one throwaway PostgreSQL cluster (tests/support/servers.py):

* ``empty``: a migrated, empty ``workerkit_jobs``;
* ``grown``: the same plus 1,000,000 succeeded jobs (finished within the last hour, so inside
  the default ``finished_job_retention`` and never pruned during the run) and 100,000 waiting
  jobs (``ready``, due tomorrow), all on the worker's own queue, bulk-loaded with one
  ``INSERT ... SELECT generate_series`` each, then ``VACUUM ANALYZE``.

Each round, for each database in turn (rounds interleaved): enqueue K no-op jobs
(``app.enqueue_many``), start ``workerkit run sql`` (concurrency 1, JSON logs at INFO),
throughput = (K - 1) / (last job's INCR - first job's INCR) inside the worker (as
bench/throughput.py); then claim latency: M jobs enqueued, claimed one at a time by
``SqlQueue.claim`` from this process and acked, each claim timed. After the round the no-op
jobs are deleted and the table vacuumed, so every round starts from the same table.

Run from the repository root::

    .venv/bin/python -m bench.queue_growth                   # K=2000, 5 rounds, ~3 minutes
    .venv/bin/python -m bench.queue_growth -k 300 --rounds 1 --finished 10000 --no-record
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench import _counter
from bench._common import (
    WORKERKIT,
    Proc,
    child_env,
    command_line,
    execute_sql,
    machine,
    machine_markdown,
    percentile,
    postgres_server,
    redis_server,
    summary,
    write_results,
)
from bench.throughput import Bench

_BULK = """
INSERT INTO workerkit_jobs (id, queue, task, payload, state, attempts, max_attempts, run_at,
                            enqueued_at, created_at, updated_at, finished_at, result)
SELECT 'done-' || g, 'default', 'bulk', '{{"args":[],"kwargs":{{}}}}', 'succeeded', 1, 1,
       t - 3600, t - 3600, t - 3600, t - 3000 + g * 0.001, t - 3000 + g * 0.001, 'null'
FROM generate_series(1, {finished}) AS g, (SELECT EXTRACT(EPOCH FROM now()) AS t) AS n;
INSERT INTO workerkit_jobs (id, queue, task, payload, state, attempts, max_attempts, run_at,
                            enqueued_at, created_at, updated_at)
SELECT 'wait-' || g, 'default', 'bulk', '{{"args":[],"kwargs":{{}}}}', 'ready', 0, 1,
       t + 86400 + g * 0.001, t, t, t
FROM generate_series(1, {waiting}) AS g, (SELECT EXTRACT(EPOCH FROM now()) AS t) AS n;
"""


def _grow(url: str, finished: int, waiting: int) -> float:
    started = time.monotonic()
    sql = _BULK.format(finished=finished, waiting=waiting)
    execute_sql(url, *[s for s in sql.split(";") if s.strip()])
    execute_sql(url, "VACUUM ANALYZE workerkit_jobs", autocommit=True)
    return time.monotonic() - started


def _enqueue(url: str, k: int) -> None:
    from bench.noop_app import TASK, make_app
    from workerkit.app import PreparedJob
    from workerkit.settings import Settings

    app = make_app(url, Settings().replace(database_url=url))
    try:
        app.enqueue_many(PreparedJob(TASK, (k,)) for _ in range(k))
    finally:
        app.backend.close()


def _throughput(bench: Bench, url: str, name: str) -> dict[str, Any]:
    from tests.support.servers import free_port

    bench.reset()
    _enqueue(url, bench.k)
    env = child_env(
        WORKERKIT_APP="bench.noop_app:app",
        WORKERKIT_DATABASE_URL=url,
        WORKERKIT_CONCURRENCY="1",
        WORKERKIT_HTTP_HOST="127.0.0.1",
        WORKERKIT_HTTP_PORT=str(free_port()),
        WORKERKIT_LOG_FORMAT="json",
        **{_counter.URL_ENV: bench.redis_url},
    )
    log_path = bench.tmp / f"wk-run-{name}-{uuid.uuid4().hex[:6]}.log"
    proc = Proc([*WORKERKIT, "run", "sql"], log_path=log_path, env=env)
    try:
        finished = bench.wait_done(proc, what=f"workerkit run sql on {name}")
        proc.stop(signal.SIGTERM, timeout=30)
        if proc.popen.returncode != 0:
            raise RuntimeError(f"workerkit run sql exited {proc.popen.returncode}")
    finally:
        proc.stop(signal.SIGKILL)
    return bench.result(proc.started, finished)


def _claim_latency(url: str, m: int) -> list[float]:
    """Milliseconds of each of ``m`` single-job claims (each job acked before the next claim)."""
    from workerkit.engines.sql import SqlQueue
    from workerkit.settings import Settings

    _enqueue(url, m)
    queue = SqlQueue(url, settings=Settings().replace(database_url=url))
    timings: list[float] = []
    try:
        queue.claim(["default"], "warm-up", 0)  # connect outside the timings
        for _ in range(m):
            started = time.perf_counter()
            deliveries = queue.claim(["default"], "bench", 1)
            timings.append((time.perf_counter() - started) * 1000)
            if len(deliveries) != 1:
                raise RuntimeError(f"claim returned {len(deliveries)} jobs")
            queue.ack(deliveries[0], None)
    finally:
        queue.close()
    return timings


def _reset(url: str) -> None:
    execute_sql(url, "DELETE FROM workerkit_jobs WHERE task = 'noop'")
    execute_sql(url, "VACUUM ANALYZE workerkit_jobs", autocommit=True)


def _counts(url: str) -> dict[str, int]:
    from workerkit.engines.sql import SqlQueue
    from workerkit.settings import Settings

    queue = SqlQueue(url, settings=Settings().replace(database_url=url))
    try:
        return queue.count_by_state()
    finally:
        queue.close()


def report(data: dict[str, Any]) -> str:
    lines = [
        "# bench/queue_growth.py: throughput and claim latency, empty table vs grown table",
        "",
        f"Command: `{data['command']}`",
        "",
        machine_markdown(data["machine"]),
        (
            f"PostgreSQL. grown = {data['finished']:,} succeeded + {data['waiting']:,} waiting "
            f"(due tomorrow) jobs on the worker's queue (loaded in {data['load_s']:.0f} s). "
            f"K = {data['k']} no-op jobs per round through `workerkit run sql` (c=1); "
            f"claim latency: {data['m']} single-job claims per round from `SqlQueue.claim`. "
            f"{data['rounds']} rounds, variants interleaved."
        ),
        "",
        "| table | jobs/s median | min-max | claim p50 ms (median of rounds) | claim p99 ms |",
        "|---|---|---|---|---|",
    ]
    for name, rows in data["samples"].items():
        rates = [r["jobs_per_s"] for r in rows]
        p50 = statistics.median(r["claim_ms"]["p50"] for r in rows)
        p99 = statistics.median(r["claim_ms"]["p99"] for r in rows)
        lines.append(
            f"| {name} | **{statistics.median(rates):.0f}** | {min(rates):.0f}-{max(rates):.0f} "
            f"| {p50:.2f} | {p99:.2f} |"
        )
    ratios = data["ratios"]
    lines += [
        "",
        (
            f"grown / empty, same round: throughput {ratios['throughput']['median']:.2f}x "
            f"(rounds {', '.join(f'{r:.2f}' for r in ratios['throughput']['rounds'])}); "
            f"claim p50 {ratios['claim_p50']['median']:.2f}x "
            f"(rounds {', '.join(f'{r:.2f}' for r in ratios['claim_p50']['rounds'])}). "
            "Goal: the grown table within 20% of the empty one."
        ),
        "",
    ]
    return "\n".join(lines)


def _ratio(samples: dict[str, list[dict[str, Any]]], key: Any) -> dict[str, Any]:
    rounds = [key(g) / key(e) for e, g in zip(samples["empty"], samples["grown"], strict=True)]
    return {"median": statistics.median(rounds), "rounds": rounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("-k", "--jobs", type=int, default=2000, help="no-op jobs per round")
    parser.add_argument("-m", "--claims", type=int, default=300, help="timed claims per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--finished", type=int, default=1_000_000)
    parser.add_argument("--waiting", type=int, default=100_000)
    parser.add_argument("--no-record", action="store_true", help="print, do not write results")
    args = parser.parse_args()

    info = machine()
    started = time.monotonic()
    samples: dict[str, list[dict[str, Any]]] = {"empty": [], "grown": []}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="workerkit-bench-")))
        redis = stack.enter_context(redis_server())
        postgres = stack.enter_context(postgres_server())
        bench = Bench(tmp, redis, postgres, args.jobs)
        urls: dict[str, str] = {}
        for name in samples:
            url, drop = bench.fresh_database("postgresql")
            stack.callback(drop)
            urls[name] = url
        load_s = _grow(urls["grown"], args.finished, args.waiting)
        print(f"grown table loaded in {load_s:.1f}s: {_counts(urls['grown'])}", flush=True)
        for round_no in range(args.rounds):
            for name, url in urls.items():
                result = _throughput(bench, url, name)
                claims = _claim_latency(url, args.claims)
                result["claim_ms"] = {
                    "p50": percentile(claims, 50),
                    "p99": percentile(claims, 99),
                    "max": max(claims),
                }
                result["table"] = _counts(url)
                _reset(url)
                samples[name].append(result)
                print(
                    f"round {round_no + 1} {name:5} {result['jobs_per_s']:6.0f} jobs/s  claim "
                    f"p50 {result['claim_ms']['p50']:.2f} ms p99 {result['claim_ms']['p99']:.2f} "
                    f"ms  table {result['table']}",
                    flush=True,
                )
    info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    data = {
        "command": command_line("bench.queue_growth"),
        "machine": info,
        "k": args.jobs,
        "m": args.claims,
        "rounds": args.rounds,
        "finished": args.finished,
        "waiting": args.waiting,
        "load_s": load_s,
        "duration_s": round(time.monotonic() - started, 1),
        "summary": {n: summary([r["jobs_per_s"] for r in rows]) for n, rows in samples.items()},
        "ratios": {
            "throughput": _ratio(samples, lambda r: r["jobs_per_s"]),
            "claim_p50": _ratio(samples, lambda r: r["claim_ms"]["p50"]),
        },
        "samples": samples,
    }
    text = report(data)
    print(text)
    if not args.no_record:
        print("recorded:", *write_results("queue_growth", data, text))


if __name__ == "__main__":
    main()
