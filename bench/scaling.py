"""Scaling out the SQL engine: 1, 2 and 4 ``workerkit run sql`` processes on one PostgreSQL.

For each number of worker processes N (one supervisor each, default settings, so concurrency
as configured by default), per round: a fresh database, K no-op jobs enqueued in bulk, then the
N processes started together. Measured over the drain (from the first job's Redis INCR to the
K-th, as bench/throughput.py):

* jobs/s (all processes together);
* WAL bytes per job: ``pg_current_wal_lsn()`` before the workers start and once all K jobs
  succeeded, divided by K (the server runs with full_page_writes off, so a production primary
  writes more: add the first-touch full-page images of its checkpoint interval);
* transactions per job: ``xact_commit`` of ``pg_stat_database`` (this database) over the same
  span, divided by K. Every claim, ack and lease renewal is one autocommit statement, so this
  counts the workers' round trips that write (plus their health checks' read transactions).

Rounds are interleaved across N (1, 2, 4, 1, 2, 4, ...); the report gives medians and the ratio
to N = 1 in the same round. Run from the repository root::

    .venv/bin/python -m bench.scaling                    # K=2000, 3 rounds, ~3 minutes
    .venv/bin/python -m bench.scaling --procs 1,2 --rounds 1 --no-record
"""

from __future__ import annotations

import argparse
import contextlib
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
    machine,
    machine_markdown,
    postgres_server,
    redis_server,
    summary,
    write_results,
)
from bench.throughput import Bench, _check_succeeded

__all__ = ("main",)


def _enqueue_bulk(url: str, k: int) -> None:
    from bench.noop_app import TASK, make_app
    from workerkit.settings import Settings

    app = make_app(url, Settings().replace(database_url=url))
    try:
        app.tasks[TASK].enqueue_many([((k,), {}) for _ in range(k)])
    finally:
        app.backend.close()


def _counters(url: str) -> tuple[int, int]:
    """(WAL position in bytes, committed transactions of this database so far)."""
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT pg_stat_clear_snapshot()")
            lsn = conn.exec_driver_sql(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint"
            ).scalar_one()
            commits = conn.exec_driver_sql(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
            ).scalar_one()
    finally:
        engine.dispose()
    return int(lsn), int(commits)


def run_round(bench: Bench, procs: int) -> dict[str, Any]:
    from tests.support.servers import free_port

    bench.reset()
    url, drop = bench.fresh_database("postgresql")
    try:
        _enqueue_bulk(url, bench.k)
        time.sleep(0.7)  # the statistics collector flushes at most every 0.5 s (PostgreSQL 15)
        wal0, xact0 = _counters(url)
        started: list[Proc] = []
        try:
            for i in range(procs):
                env = child_env(
                    WORKERKIT_APP="bench.noop_app:app",
                    WORKERKIT_DATABASE_URL=url,
                    WORKERKIT_HTTP_HOST="127.0.0.1",
                    WORKERKIT_HTTP_PORT=str(free_port()),
                    WORKERKIT_LOG_FORMAT="json",
                    WORKERKIT_REPLICAS=str(procs),
                    **{_counter.URL_ENV: bench.redis_url},
                )
                log_path = bench.tmp / f"scaling-{procs}-{i}-{uuid.uuid4().hex[:6]}.log"
                started.append(Proc([*WORKERKIT, "run", "sql"], log_path=log_path, env=env))
            finished = bench.wait_done(started[0], what=f"{procs} x workerkit run sql")
            _check_succeeded(url, bench.k)
            # Counted once the workers stopped: a backend flushes its transaction counts at
            # most once a second while it runs, and always when it exits (a drain of ~1 s was
            # counted as 0.01-0.19 transactions per job before).
            for proc in started:
                proc.stop(signal.SIGTERM, timeout=30)
        finally:
            for proc in started:
                proc.stop(signal.SIGKILL)
        time.sleep(0.7)
        wal1, xact1 = _counters(url)
        result = bench.result(started[0].started, finished)
        result["wal_bytes_per_job"] = (wal1 - wal0) / bench.k
        result["xacts_per_job"] = (xact1 - xact0) / bench.k
        return result
    finally:
        drop()


def report(data: dict[str, Any]) -> str:
    lines = [
        "# bench/scaling.py: 1, 2, 4 `workerkit run sql` processes on one PostgreSQL",
        "",
        f"Command: `{data['command']}`",
        "",
        machine_markdown(data["machine"]),
        (
            f"K = {data['k']} no-op jobs per round, {data['rounds']} rounds (interleaved); default "
            "settings per process. WAL and transactions are counted over the whole drain, the "
            "workers' start, health checks and stop included."
        ),
        "",
        (
            "| processes | jobs/s median (min-max) | vs 1 process, same round | WAL bytes / job | "
            "transactions / job |"
        ),
        "|---|---|---|---|---|",
    ]
    base = [r["jobs_per_s"] for r in data["samples"].get("1", [])]
    for key, rows in data["samples"].items():
        rates = [r["jobs_per_s"] for r in rows]
        ratios = [rate / b for rate, b in zip(rates, base, strict=False)]
        s = summary(rates)
        lines.append(
            f"| {key} | {s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f}) | "
            f"{statistics.median(ratios):.2f}x | "
            f"{statistics.median(r['wal_bytes_per_job'] for r in rows):.0f} | "
            f"{statistics.median(r['xacts_per_job'] for r in rows):.2f} |"
        )
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("-k", "--jobs", type=int, default=2000, help="jobs per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--procs", default="1,2,4", help="comma-separated process counts")
    parser.add_argument("--no-record", action="store_true", help="print, do not write results")
    args = parser.parse_args()
    counts = [int(n) for n in args.procs.split(",") if n]
    info = machine()
    samples: dict[str, list[dict[str, Any]]] = {str(n): [] for n in counts}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="workerkit-bench-")))
        redis = stack.enter_context(redis_server())
        postgres = stack.enter_context(postgres_server())
        bench = Bench(tmp, redis, postgres, args.jobs)
        for rnd in range(args.rounds):
            for n in counts:
                result = run_round(bench, n)
                samples[str(n)].append(result)
                print(
                    f"round {rnd + 1} procs={n} {result['jobs_per_s']:7.0f} jobs/s  "
                    f"WAL {result['wal_bytes_per_job']:.0f} B/job  "
                    f"xacts {result['xacts_per_job']:.2f}/job",
                    flush=True,
                )
    data = {
        "command": command_line("bench.scaling"),
        "machine": info,
        "k": args.jobs,
        "rounds": args.rounds,
        "samples": samples,
    }
    text = report(data)
    print(text)
    if not args.no_record:
        print("recorded:", *write_results("scaling", data, text))


if __name__ == "__main__":
    main()
