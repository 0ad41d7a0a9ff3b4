"""Enqueue throughput: workerkit's ``enqueue_many`` against a loop of ``enqueue``, Celery and RQ.

Run from the repository root::

    python -m bench.enqueue [--jobs 20000] [--loop-jobs 2000] [--rounds 5] [--no-record]

Producer side only (no worker runs): the time of the enqueue call(s), from the first to the
return of the last, for the same no-op job with one integer argument. Variants, interleaved
round by round (the order rotating, so none always runs first on a warmer machine):

- ``wk-pg-many`` / ``wk-sqlite-many``: ``task.enqueue_many`` of ``--jobs`` jobs, one call;
- ``wk-pg-loop`` / ``wk-sqlite-loop``: ``task.enqueue`` called ``--loop-jobs`` times;
- ``celery-loop``: Celery's ``apply_async`` called ``--loop-jobs`` times (Redis broker);
- ``rq-many``: RQ's ``Queue.enqueue_many`` of ``Queue.prepare_data`` items, ``--jobs`` jobs
  (one Redis pipeline, RQ's own bulk API).

Each run starts from an empty queue (the table emptied, Redis flushed) with a warm
connection, and is checked afterwards (exactly the jobs enqueued are there). PostgreSQL is the
test suite's throwaway cluster (fsync and synchronous_commit off), SQLite a file with the
engine's own settings (WAL, ``synchronous=FULL``). Results: bench/results/enqueue.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import _common
from bench._counter import URL_ENV

NAME = "enqueue"
VARIANTS = (
    "wk-pg-many",
    "wk-pg-loop",
    "wk-sqlite-many",
    "wk-sqlite-loop",
    "celery-loop",
    "rq-many",
)
DESCRIPTION = {
    "wk-pg-many": "workerkit `task.enqueue_many`, PostgreSQL",
    "wk-pg-loop": "workerkit `task.enqueue` loop, PostgreSQL",
    "wk-sqlite-many": "workerkit `task.enqueue_many`, SQLite",
    "wk-sqlite-loop": "workerkit `task.enqueue` loop, SQLite",
    "celery-loop": "Celery `apply_async` loop, Redis",
    "rq-many": "RQ `Queue.enqueue_many` (prepare_data), Redis",
}
RQ_QUEUE = "bench"


class Workerkit:
    """One App on one database, kept warm across rounds; the table emptied before each run."""

    def __init__(self, url: str) -> None:
        from bench.noop_app import TASK, make_app
        from workerkit.engines.sql import SqlQueue, upgrade
        from workerkit.settings import Settings

        upgrade(url)
        self.app = make_app(url, Settings(database_url=url))
        self.task = self.app.tasks[TASK]
        queue = self.app.backend
        assert isinstance(queue, SqlQueue)
        self.queue = queue
        self.task.enqueue(0)  # connect, check, compile once before the first timed run
        self.task.enqueue_many([((0,), {})])

    def empty(self) -> None:
        import sqlalchemy as sa

        # TRUNCATE on PostgreSQL: a DELETE would leave dead rows and index entries behind,
        # and every later round would insert into a bloated table.
        verb = "TRUNCATE" if self.queue.dialect == "postgresql" else "DELETE FROM"
        with self.queue.engine.begin() as conn:
            conn.execute(sa.text(f"{verb} workerkit_jobs"))

    def many(self, jobs: int) -> float:
        self.empty()
        items = [((n,), {}) for n in range(jobs)]
        started = time.perf_counter()
        ids = self.task.enqueue_many(items)
        elapsed = time.perf_counter() - started
        self.check(ids, jobs)
        return elapsed

    def loop(self, jobs: int) -> float:
        self.empty()
        enqueue = self.task.enqueue
        started = time.perf_counter()
        ids = [enqueue(n) for n in range(jobs)]
        elapsed = time.perf_counter() - started
        self.check(ids, jobs)
        return elapsed

    def check(self, ids: list[str], jobs: int) -> None:
        ready = self.queue.count_by_state()["ready"]
        if len(set(ids)) != jobs or ready != jobs:
            raise SystemExit(f"{self.queue!r}: {ready} ready, {len(set(ids))} ids, {jobs} sent")

    def close(self) -> None:
        self.queue.close()


class Brokers:
    """Celery's producer and RQ's queue on one private redis-server."""

    def __init__(self, url: str) -> None:
        import redis
        from rq import Queue
        from rq.serializers import JSONSerializer

        os.environ[URL_ENV] = url  # read by bench.celery_noop at import
        from bench import celery_noop

        self.celery_noop = celery_noop
        self.redis = redis.Redis.from_url(url)
        self.rq = Queue(RQ_QUEUE, connection=self.redis, serializer=JSONSerializer)
        celery_noop.noop.apply_async(args=(0,))  # connect before the first timed run
        self.rq.enqueue_many([Queue.prepare_data("bench.rq_noop.noop", (0,))])

    def celery_loop(self, jobs: int) -> float:
        self.redis.flushdb()
        send = self.celery_noop.noop.apply_async
        started = time.perf_counter()
        for n in range(jobs):
            send(args=(n,))
        elapsed = time.perf_counter() - started
        queued = int(self.redis.llen(self.celery_noop.QUEUE))
        if queued != jobs:
            raise SystemExit(f"celery: {queued} messages queued, {jobs} sent")
        return elapsed

    def rq_many(self, jobs: int) -> float:
        from rq import Queue

        self.redis.flushdb()
        items = [
            Queue.prepare_data("bench.rq_noop.noop", (n,), result_ttl=3600) for n in range(jobs)
        ]
        started = time.perf_counter()
        self.rq.enqueue_many(items)
        elapsed = time.perf_counter() - started
        if self.rq.count != jobs:
            raise SystemExit(f"rq: {self.rq.count} jobs queued, {jobs} sent")
        return elapsed

    def close(self) -> None:
        self.redis.close()


def run_rounds(
    args: argparse.Namespace, runs: dict[str, Callable[[], float]]
) -> list[dict[str, float]]:
    """Each round: every variant once, the order rotated by one per round; jobs/s per variant."""
    sizes = {name: args.jobs if name.endswith("-many") else args.loop_jobs for name in runs}
    rounds: list[dict[str, float]] = []
    names = list(runs)
    for index in range(args.rounds):
        order = names[index % len(names) :] + names[: index % len(names)]
        rates = {name: sizes[name] / runs[name]() for name in order}
        rounds.append(rates)
        print(f"round {index + 1}: " + ", ".join(f"{n} {rates[n]:.0f}/s" for n in names))
    return rounds


def ratios(rounds: list[dict[str, float]], name: str, against: str) -> list[float]:
    return [r[name] / r[against] for r in rounds if name in r and against in r]


def markdown(args: argparse.Namespace, info: dict[str, Any], rounds: list[dict[str, float]]) -> str:
    names = list(rounds[0])
    lines = [
        "# Enqueue throughput: workerkit enqueue_many vs a loop of enqueue, Celery, RQ",
        "",
        f"Command: `{_common.command_line('bench.enqueue')}`",
        "",
        _common.machine_markdown(info),
        (
            f"Producer side only, no worker running; {args.rounds} rounds, variants interleaved "
            f"(order rotating). Bulk variants enqueue {args.jobs} jobs in one call, loop variants "
            f"make {args.loop_jobs} calls. PostgreSQL: throwaway cluster, fsync and "
            "synchronous_commit off; SQLite: WAL, synchronous=FULL; Redis: no persistence. "
            "Ratios are medians of the same-round ratios."
        ),
        "",
        "| variant | jobs per run | jobs/s median | min-max | vs Celery loop | vs RQ bulk |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        rates = [r[name] for r in rounds]
        size = args.jobs if name.endswith("-many") else args.loop_jobs
        vs = []
        for against in ("celery-loop", "rq-many"):
            found = ratios(rounds, name, against)
            vs.append(f"{statistics.median(found):.2f}x" if found else "-")
        lines.append(
            f"| {DESCRIPTION[name]} | {size} | {statistics.median(rates):,.0f} | "
            f"{min(rates):,.0f}-{max(rates):,.0f} | {vs[0]} | {vs[1]} |"
        )
    for db in ("pg", "sqlite"):
        found = ratios(rounds, f"wk-{db}-many", f"wk-{db}-loop")
        if found:
            each = ", ".join(f"{r:.1f}" for r in found)
            lines.append("")
            lines.append(
                f"`enqueue_many` / `enqueue` loop, {'PostgreSQL' if db == 'pg' else 'SQLite'}: "
                f"{statistics.median(found):.1f}x (rounds: {each})"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--jobs", type=int, default=20_000, help="jobs per bulk call")
    parser.add_argument("--loop-jobs", type=int, default=2_000, help="calls per loop run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", default="", help="comma-separated variants")
    parser.add_argument("--no-record", action="store_true", help="print, do not write results")
    args = parser.parse_args()
    wanted = [v for v in VARIANTS if not args.only or v in args.only.split(",")]
    info = _common.machine()
    with (
        _common.postgres_server() as postgres,
        _common.redis_server() as redis_server,
        tempfile.TemporaryDirectory(prefix="wk-bench-enqueue-") as tmp,
    ):
        pg = Workerkit(postgres.url())
        lite = Workerkit(f"sqlite:///{Path(tmp) / 'queue.sqlite3'}")
        brokers = Brokers(redis_server.url(0))
        try:
            every: dict[str, Callable[[], float]] = {
                "wk-pg-many": lambda: pg.many(args.jobs),
                "wk-pg-loop": lambda: pg.loop(args.loop_jobs),
                "wk-sqlite-many": lambda: lite.many(args.jobs),
                "wk-sqlite-loop": lambda: lite.loop(args.loop_jobs),
                "celery-loop": lambda: brokers.celery_loop(args.loop_jobs),
                "rq-many": lambda: brokers.rq_many(args.jobs),
            }
            rounds = run_rounds(args, {name: every[name] for name in wanted})
        finally:
            pg.close()
            lite.close()
            brokers.close()
    text = markdown(args, info, rounds)
    print(text)
    if not args.no_record:
        data = {
            "command": _common.command_line("bench.enqueue"),
            "machine": info,
            "params": {"jobs": args.jobs, "loop_jobs": args.loop_jobs, "rounds": args.rounds},
            "rounds": rounds,
            "summary": {name: _common.summary([r[name] for r in rounds]) for name in rounds[0]},
        }
        for path in _common.write_results(NAME, data, text):
            print(f"wrote {path.relative_to(_common.REPO)}")


if __name__ == "__main__":
    main()
