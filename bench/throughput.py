"""No-op job throughput: workerkit's SQL engine against bare Celery and bare RQ (issue 4).

Every job, whatever the engine, does the same work: one Redis INCR of a shared counter
(bench/_counter.py). The first and the K-th job also stamp the time. Method, identical for all:

1. enqueue K jobs (the worker is not running yet);
2. start the worker;
3. throughput = (K - 1) / (time of the K-th INCR - time of the first INCR), both taken inside
   the worker process: K - 1 complete job cycles (ack, fetch, start, run), with neither the
   worker's start-up nor this script's polling in the window;
4. check that the counter is exactly K (no job ran twice, none was lost) and, for workerkit, that
   ``SqlQueue.count_by_state()`` says K succeeded; stop the worker.

Variants (each ``--reps`` times, interleaved, median reported):

* ``wk-sqlite``: ``NativeWorker`` in this process, SQLite file (WAL), concurrency 1;
* ``wk-pg-c1`` / ``wk-pg-cN``: ``NativeWorker`` in this process, PostgreSQL, concurrency 1 / N;
* ``wk-run-sqlite`` / ``wk-run-pg-c1``: the same through the supervisor (``workerkit run sql``
  subprocess, with its events channel and JSON logs at INFO), ``--no-supervisor`` skips them;
* ``celery-solo``: ``celery worker --pool=solo --concurrency=1 --without-heartbeat
  --without-gossip --without-mingle``, Redis broker, Celery's defaults (acks on receipt,
  prefetch multiplier 4); ``celery-solo-acks-late``: the same with ``task_acks_late=True``
  (acknowledged after the run, like workerkit);
* ``rq-simple`` / ``rq-fork``: ``rq worker --worker-class rq.worker.SimpleWorker`` /
  ``rq.worker.Worker`` ``--burst``, RQ's defaults (pickle, its INFO lines to a file);
* ``wk-run-rq-simple`` / ``wk-run-rq-fork``: RQ as users run it under workerkit, ``workerkit run
  rq --worker-class simple`` / ``forking`` (supervisor, worker child, events channel, JSON logs
  at INFO to a file, presence, default settings; jobs enqueued with RQ's JSON serializer). The
  forking variants run ``--fork-jobs`` jobs (default K/4: a fork per job). Each RQ run also
  reports CPU and minor page faults per job of each of its processes, from /proc
  (:class:`CpuProbe`), and the report
  gives each ``wk-run-rq-*`` variant's same-round ratio to its bare class.

Servers: one private redis-server (no persistence) and one throwaway PostgreSQL cluster
(fsync, synchronous_commit and full_page_writes off), both from tests/support/servers.py, on
127.0.0.1.
Each workerkit repetition gets a fresh database (SQLite file, or a PostgreSQL database copied
from a migrated template); Redis is flushed between repetitions.

``--profile`` adds one profiled in-process PostgreSQL run (cProfile in every worker thread,
merged; SQL statements and pool pre-pings counted) and writes bench/results/throughput-profile.txt.

Run from the repository root::

    .venv/bin/python -m bench.throughput                # K=2000, 3 reps, ~4 minutes
    .venv/bin/python -m bench.throughput -k 500 --reps 1 --no-record   # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import signal
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench import _counter
from bench._common import (
    PYTHON,
    RESULTS,
    WORKERKIT,
    Proc,
    child_env,
    command_line,
    fmt,
    machine,
    machine_markdown,
    postgres_server,
    redis_server,
    summary,
    wait_for,
    write_results,
)

RUN_TIMEOUT = 120.0  # one repetition may not take longer than this


class Bench:
    """The servers and the per-repetition plumbing."""

    def __init__(
        self, tmp: Path, redis: Any, postgres: Any | None, k: int, fork_k: int | None = None
    ) -> None:
        import redis as redis_lib

        self.tmp = tmp
        self.redis = redis
        self.redis_url: str = redis.url()
        self.client = redis_lib.Redis.from_url(self.redis_url)
        self.postgres = postgres
        self.k = k
        self.fork_k = fork_k if fork_k is not None else max(2, k // 4)
        self.template: str | None = None
        os.environ[_counter.URL_ENV] = self.redis_url  # for the in-process worker's jobs

    # --- databases ---------------------------------------------------------------------------

    def fresh_database(self, dialect: str) -> tuple[str, Callable[[], None]]:
        """A migrated, empty workerkit database; returns its URL and how to drop it."""
        from tests.support import servers
        from workerkit.engines.sql import db

        if dialect == "sqlite":
            path = self.tmp / f"q-{uuid.uuid4().hex[:8]}.sqlite3"
            url = f"sqlite:///{path}"
            db.upgrade(url)

            def drop() -> None:
                for suffix in ("", "-wal", "-shm"):
                    with contextlib.suppress(OSError):
                        Path(f"{path}{suffix}").unlink()

            return url, drop
        assert self.postgres is not None
        if self.template is None:
            self.template = servers.create_template(self.postgres, [db.upgrade], "bench_template")
        name = f"bench_{uuid.uuid4().hex[:8]}"
        servers.create_database(self.postgres, name, self.template)
        return self.postgres.url(name), lambda: servers.drop_database(self.postgres, name)

    # --- the counter -------------------------------------------------------------------------

    def reset(self) -> None:
        self.client.flushdb()

    def done(self) -> int:
        return int(self.client.get(_counter.COUNTER) or 0)

    def window(self) -> tuple[float, float]:
        first, last = self.client.mget(_counter.FIRST, _counter.LAST)
        if first is None or last is None:
            raise RuntimeError("the first/last job time stamps are missing")
        return float(first), float(last)

    def k_for(self, worker_class: str) -> int:
        """K of a run: fewer jobs for RQ's forking worker (a fork per job, ~10x slower)."""
        return self.fork_k if worker_class == "forking" else self.k

    def wait_done(
        self,
        proc: Proc | None = None,
        what: str = "all jobs",
        *,
        k: int | None = None,
        probe: CpuProbe | None = None,
    ) -> float:
        """Block until the counter reaches K; return when (monotonic)."""
        k = self.k if k is None else k

        def reached() -> bool:
            done = self.done()
            if probe is not None:
                probe.observe(done, k)
            return done >= k

        wait_for(reached, timeout=RUN_TIMEOUT, what=what, proc=proc)
        return time.monotonic()

    def result(
        self, started: float, finished: float, *, k: int | None = None, **extra: Any
    ) -> dict[str, Any]:
        k = self.k if k is None else k
        first, last = self.window()
        done = self.done()
        if done != k:
            raise RuntimeError(f"counter is {done}, expected exactly {k}")
        return {
            "jobs_per_s": (k - 1) / (last - first),
            "window_s": last - first,
            "start_to_done_s": finished - started,
            **extra,
        }


# --- workerkit ---------------------------------------------------------------------------------


def _enqueue_workerkit(url: str, k: int) -> float:
    from bench.noop_app import TASK, make_app
    from workerkit.app import EnqueueOptions
    from workerkit.settings import Settings

    app = make_app(url, Settings().replace(database_url=url))
    started = time.monotonic()
    try:
        for _ in range(k):
            app.enqueue(TASK, [k], {}, EnqueueOptions())
    finally:
        app.backend.close()
    return time.monotonic() - started


def _check_succeeded(url: str, k: int) -> None:
    from workerkit.engines.sql import SqlQueue
    from workerkit.settings import Settings

    queue = SqlQueue(url, settings=Settings().replace(database_url=url))
    try:
        counts = wait_for(
            lambda: (c := queue.count_by_state())["succeeded"] == k and c,
            timeout=30,
            what=f"{k} jobs succeeded in the store",
        )
    finally:
        queue.close()
    if sum(counts.values()) != k:
        raise RuntimeError(f"unexpected job states: {counts}")


def run_workerkit_inprocess(
    bench: Bench, dialect: str, concurrency: int, *, instrument: Timeline | Profiler | None = None
) -> dict[str, Any]:
    from bench.noop_app import make_app
    from workerkit.engines.sql.worker import NativeWorker
    from workerkit.settings import Settings

    bench.reset()
    url, drop = bench.fresh_database(dialect)
    try:
        enqueue_s = _enqueue_workerkit(url, bench.k)
        settings = Settings().replace(database_url=url, concurrency=concurrency)
        app = make_app(url, settings)
        worker = NativeWorker(app, settings)
        codes: list[int] = []
        with instrument.installed(app) if instrument is not None else contextlib.nullcontext():
            thread = threading.Thread(
                target=lambda: codes.append(worker.run(install_signal_handlers=False)),
                name="bench-worker-main",
                daemon=True,
            )
            started = time.monotonic()
            thread.start()
            try:
                finished = bench.wait_done(what=f"in-process worker on {dialect}")
            finally:
                worker.stop_fetching()
                thread.join(30)
            if thread.is_alive() or codes != [0]:
                raise RuntimeError(f"in-process worker did not stop cleanly: {codes}")
            _check_succeeded(url, bench.k)
        app.backend.close()
        return bench.result(started, finished, enqueue_s=enqueue_s)
    finally:
        drop()


def run_workerkit_supervised(
    bench: Bench, dialect: str, concurrency: int, prefetch: int | None = None
) -> dict[str, Any]:
    from tests.support.servers import free_port

    bench.reset()
    url, drop = bench.fresh_database(dialect)
    try:
        enqueue_s = _enqueue_workerkit(url, bench.k)
        env = child_env(
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
        log_path = bench.tmp / f"wk-run-{dialect}-{uuid.uuid4().hex[:6]}.log"
        proc = Proc([*WORKERKIT, "run", "sql"], log_path=log_path, env=env)
        try:
            finished = bench.wait_done(proc, what=f"workerkit run sql on {dialect}")
            proc.stop(signal.SIGTERM, timeout=30)
            if proc.popen.returncode != 0:
                raise RuntimeError(f"workerkit run sql exited {proc.popen.returncode}")
        finally:
            proc.stop(signal.SIGKILL)
        _check_succeeded(url, bench.k)
        return bench.result(proc.started, finished, enqueue_s=enqueue_s)
    finally:
        drop()


# --- celery and rq -----------------------------------------------------------------------------


def run_celery(bench: Bench, *, acks_late: bool) -> dict[str, Any]:
    from bench import celery_noop

    bench.reset()
    enqueue_started = time.monotonic()
    with celery_noop.app.connection_for_write() as conn, conn.Producer() as producer:
        for _ in range(bench.k):
            celery_noop.noop.apply_async(args=(bench.k,), producer=producer)
    enqueue_s = time.monotonic() - enqueue_started
    env = child_env(
        BENCH_CELERY_ACKS_LATE="1" if acks_late else "0", **{_counter.URL_ENV: bench.redis_url}
    )
    name = f"bench-{uuid.uuid4().hex[:6]}@%h"
    argv = [
        PYTHON,
        "-m",
        "celery",
        "-A",
        "bench.celery_noop",
        "worker",
        "--pool=solo",
        "--concurrency=1",
        "--without-heartbeat",
        "--without-gossip",
        "--without-mingle",
        "-Q",
        celery_noop.QUEUE,
        "-n",
        name,
    ]
    proc = Proc(argv, log_path=bench.tmp / f"celery-{uuid.uuid4().hex[:6]}.log", env=env)
    try:
        finished = bench.wait_done(proc, what="celery solo worker")
        proc.stop(signal.SIGTERM, timeout=30)
    finally:
        proc.stop(signal.SIGKILL)
    return bench.result(proc.started, finished, enqueue_s=enqueue_s)


RQ_CLASSES = {"simple": "rq.worker.SimpleWorker", "forking": "rq.worker.Worker"}


def _enqueue_rq(bench: Bench, k: int, *, json: bool) -> float:
    """K jobs of :func:`bench.rq_noop.noop`, in batches of 500 (RQ's ``enqueue_many``)."""
    from rq import Queue
    from rq.serializers import JSONSerializer

    from bench import rq_noop

    serializer = JSONSerializer if json else None
    queue = Queue(rq_noop.QUEUE, connection=bench.client, serializer=serializer)
    started = time.monotonic()
    batch = 500
    for start in range(0, k, batch):
        queue.enqueue_many(
            [Queue.prepare_data(rq_noop.noop, args=(k,)) for _ in range(min(batch, k - start))]
        )
    return time.monotonic() - started


def run_rq(bench: Bench, worker_class: str = "simple") -> dict[str, Any]:
    """Bare ``rq worker --burst`` with RQ's defaults (pickle, its INFO lines to a file)."""
    from bench import rq_noop

    k = bench.k_for(worker_class)
    bench.reset()
    enqueue_s = _enqueue_rq(bench, k, json=False)
    argv = [
        PYTHON,
        "-m",
        "rq.cli",
        "worker",
        "--worker-class",
        RQ_CLASSES[worker_class],
        "--burst",
        "--url",
        bench.redis_url,
        rq_noop.QUEUE,
    ]
    proc = Proc(argv, log_path=bench.tmp / f"rq-{uuid.uuid4().hex[:6]}.log", env=child_env())
    try:
        cpu = CpuProbe(bench, worker=lambda: proc.pid)
        finished = bench.wait_done(proc, what=f"rq {worker_class} worker", k=k, probe=cpu)
        # --burst: it exits once the queue is empty, but now and then only a minute later (RQ's
        # teardown joins its pubsub thread, which redis-py 8 lets wait up to RQ's sleep_time of
        # 60 s; workerkit's worker bounds that wait, drain.py): the figures are taken, so kill it.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(30)
    finally:
        proc.stop(signal.SIGKILL)
    return bench.result(proc.started, finished, k=k, enqueue_s=enqueue_s, **cpu.figures())


def run_rq_supervised(bench: Bench, worker_class: str) -> dict[str, Any]:
    """``workerkit run rq --worker-class CLASS``: default settings, JSON logs at INFO to a file."""
    from bench import rq_noop
    from tests.support.servers import free_port

    k = bench.k_for(worker_class)
    bench.reset()
    enqueue_s = _enqueue_rq(bench, k, json=True)  # workerkit's default serializer
    env = child_env(
        WORKERKIT_APP="bench.rq_noop:app",
        WORKERKIT_REDIS_URL=bench.redis_url,
        WORKERKIT_QUEUES=rq_noop.QUEUE,
        WORKERKIT_HTTP_HOST="127.0.0.1",
        WORKERKIT_HTTP_PORT=str(free_port()),
        WORKERKIT_LOG_FORMAT="json",
        **{_counter.URL_ENV: bench.redis_url},
    )
    log_path = bench.tmp / f"wk-run-rq-{worker_class}-{uuid.uuid4().hex[:6]}.log"
    argv = [*WORKERKIT, "run", "rq", "--worker-class", worker_class]
    proc = Proc(argv, log_path=log_path, env=env)
    try:
        cpu = CpuProbe(bench, supervisor=lambda: proc.pid, worker=lambda: _only_child(proc.pid))
        finished = bench.wait_done(proc, what=f"workerkit run rq ({worker_class})", k=k, probe=cpu)
        proc.stop(signal.SIGTERM, timeout=30)
        if proc.popen.returncode != 0:
            raise RuntimeError(f"workerkit run rq exited {proc.popen.returncode}")
    finally:
        proc.stop(signal.SIGKILL)
    return bench.result(proc.started, finished, k=k, enqueue_s=enqueue_s, **cpu.figures())


def _only_child(pid: int) -> int | None:
    """The one live child of ``pid`` (the supervisor's worker), from /proc."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(text[0]) if len(text) == 1 else None


def _cpu_ticks(pid: int) -> tuple[int, int, int, int] | None:
    """(utime + stime, cutime + cstime, minflt, cminflt) of ``pid``: its own CPU in clock ticks
    and that of the children it has reaped (the forking worker's work horses), then the same
    for minor page faults (after a fork, each page a process first writes is one)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    own, reaped = int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])
    return own, reaped, int(fields[7]), int(fields[8])


class CpuProbe:
    """CPU time and minor page faults per job of each process of a run, from /proc/PID/stat
    (utime + stime, minflt).

    Read once when the counter first passes K/10 (start-up is over) and once when it reaches K;
    per job = the difference / the jobs done in between. ``horses`` is the forking worker's
    reaped children; ``redis`` the redis-server's own CPU (every Redis command of every process
    costs it there, on the same two cores). Faults move less with the machine's load than CPU
    does: the forking worker's gap to bare RQ is mostly theirs (bench/README.md, "tenth round").
    """

    def __init__(self, bench: Bench, **pids: Callable[[], int | None]) -> None:
        self.bench = bench
        self.pids = {**pids, "redis": lambda: int(bench.redis.pid)}
        self.first: tuple[int, dict[str, tuple[int, int, int, int]]] | None = None
        self.per_job: dict[str, float] = {}
        self.faults_per_job: dict[str, float] = {}

    def figures(self) -> dict[str, dict[str, float]]:
        """What a run's result carries: CPU (microseconds) and minor faults per job."""
        return {"cpu_us_per_job": self.per_job, "faults_per_job": self.faults_per_job}

    def _read(self) -> dict[str, tuple[int, int, int, int]]:
        found: dict[str, tuple[int, int, int, int]] = {}
        for name, pid_of in self.pids.items():
            pid = pid_of()
            ticks = _cpu_ticks(pid) if pid is not None else None
            if ticks is not None:
                found[name] = ticks
        return found

    def observe(self, done: int, k: int) -> None:
        if self.first is None and done >= max(1, k // 10):
            self.first = (done, self._read())
        elif self.first is not None and done >= k and not self.per_job:
            start_done, start = self.first
            end = self._read()
            jobs = max(1, done - start_done)
            tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
            for name, (own, reaped, faults, reaped_faults) in end.items():
                if name not in start:
                    continue
                was = start[name]
                self.per_job[name] = (own - was[0]) * tick_us / jobs
                self.faults_per_job[name] = (faults - was[2]) / jobs
                if name == "worker" and reaped_faults != was[3]:
                    self.per_job["horses"] = (reaped - was[1]) * tick_us / jobs
                    self.faults_per_job["horses"] = (reaped_faults - was[3]) / jobs


# --- profiling ---------------------------------------------------------------------------------


class Timeline:
    """Wall-clock stamps around each step of a concurrency-1 job cycle (no profiler overhead).

    At concurrency 1 the cycle is strictly sequential: claim, start the job's thread, run the
    task, ack, free the slot, wake the fetcher, claim again. The task function and the queue's
    ``claim``/``ack`` are wrapped on the instances (the library is not changed), and the median
    of each segment is reported.
    """

    def __init__(self) -> None:
        self.stamps: dict[str, list[float]] = {
            k: [] for k in ("claim0", "claim1", "run0", "run1", "ack0", "ack1")
        }

    @contextlib.contextmanager
    def installed(self, app: Any) -> Iterator[None]:
        from bench.noop_app import TASK

        backend, task = app.backend, app.tasks[TASK]
        claim, ack, fn = backend.claim, backend.ack, task.fn
        stamps, now = self.stamps, time.perf_counter

        def timed_claim(*args: Any, **kwargs: Any) -> Any:
            stamps["claim0"].append(now())
            try:
                return claim(*args, **kwargs)
            finally:
                stamps["claim1"].append(now())

        def timed_ack(*args: Any, **kwargs: Any) -> Any:
            stamps["ack0"].append(now())
            try:
                return ack(*args, **kwargs)
            finally:
                stamps["ack1"].append(now())

        def timed_fn(*args: Any, **kwargs: Any) -> Any:
            stamps["run0"].append(now())
            try:
                return fn(*args, **kwargs)
            finally:
                stamps["run1"].append(now())

        backend.claim, backend.ack, task.fn = timed_claim, timed_ack, timed_fn
        try:
            yield
        finally:
            del backend.claim, backend.ack
            task.fn = fn

    def segments(self) -> dict[str, float]:
        """Median milliseconds of each segment of the cycle."""
        s = self.stamps
        n = min(len(s["run0"]), len(s["ack1"]), len(s["claim1"]) - 1)
        # claim i hands out job i (one claim per job at concurrency 1, the queue never empty)
        parts: dict[str, list[float]] = {
            "claim (SQL transaction)": [s["claim1"][i] - s["claim0"][i] for i in range(n)],
            "claim -> task starts (context, event, log, new thread)": [
                s["run0"][i] - s["claim1"][i] for i in range(n)
            ],
            "task (the Redis INCR)": [s["run1"][i] - s["run0"][i] for i in range(n)],
            "task returns -> ack starts (JSON check)": [
                s["ack0"][i] - s["run1"][i] for i in range(n)
            ],
            "ack (SQL transaction)": [s["ack1"][i] - s["ack0"][i] for i in range(n)],
            "ack -> next claim (finish, event, slot wake-up)": [
                s["claim0"][i + 1] - s["ack1"][i] for i in range(n)
            ],
            "whole cycle": [s["claim0"][i + 1] - s["claim0"][i] for i in range(n)],
        }
        return {k: statistics.median(v) * 1000 for k, v in parts.items() if v}


class Profiler:
    """cProfile in every thread started while installed (merged at the end), plus SQL counts.

    cProfile only sees the thread that enabled it, and the worker's time is spent in its
    fetcher and job threads, so ``threading.Thread.run`` is wrapped to profile each thread on
    its own (one profile object per thread: they are not thread-safe) and the results merged.
    The default timer is wall-clock, so time blocked on a database round trip shows up; the
    profiler itself roughly halves the throughput, so read proportions, not absolute times.
    """

    def __init__(self) -> None:
        self.profiles: list[cProfile.Profile] = []
        self.lock = threading.Lock()
        self.commands: dict[str, int] = {}

    @contextlib.contextmanager
    def installed(self, app: Any) -> Iterator[None]:
        from psycopg import _connection_base, _cursor_base

        original_run = threading.Thread.run
        profiler = self

        def run(thread: threading.Thread) -> None:
            profile = cProfile.Profile()
            profile.enable()
            try:
                original_run(thread)
            finally:
                profile.disable()
                with profiler.lock:
                    profiler.profiles.append(profile)

        def count(text: str) -> None:
            words = text.split()
            key = " ".join(words[:1]) if words else "(empty query: the pool's pre-ping)"
            if key == "SELECT" and "FOR UPDATE" in text:
                key = "SELECT ... FOR UPDATE SKIP LOCKED"
            with profiler.lock:
                profiler.commands[key] = profiler.commands.get(key, 0) + 1

        # Every message psycopg sends that waits for an answer: commands (BEGIN, COMMIT) and
        # queries, prepared or not. Each is one network round trip.
        exec_command = _connection_base.BaseConnection._exec_command
        send_query = _cursor_base.BaseCursor._execute_send
        send_prepared = _cursor_base.BaseCursor._send_query_prepared

        def counted_command(conn: Any, command: Any, *args: Any, **kwargs: Any) -> Any:
            count(command.decode() if isinstance(command, bytes) else str(command))
            return exec_command(conn, command, *args, **kwargs)

        def counted_query(cursor: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
            count(bytes(query.query).decode(errors="replace"))
            return send_query(cursor, query, *args, **kwargs)

        def counted_prepared(cursor: Any, name: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
            count(bytes(query.query).decode(errors="replace"))
            return send_prepared(cursor, name, query, *args, **kwargs)

        threading.Thread.run = run  # type: ignore[method-assign]
        _connection_base.BaseConnection._exec_command = counted_command  # type: ignore[method-assign]
        _cursor_base.BaseCursor._execute_send = counted_query  # type: ignore[method-assign]
        _cursor_base.BaseCursor._send_query_prepared = counted_prepared  # type: ignore[method-assign]
        try:
            yield
        finally:
            threading.Thread.run = original_run  # type: ignore[method-assign]
            _connection_base.BaseConnection._exec_command = exec_command  # type: ignore[method-assign]
            _cursor_base.BaseCursor._execute_send = send_query  # type: ignore[method-assign]
            _cursor_base.BaseCursor._send_query_prepared = send_prepared  # type: ignore[method-assign]

    def text(self, top: int = 30) -> str:
        out = io.StringIO()
        stats = pstats.Stats(*self.profiles, stream=out)
        stats.sort_stats("cumulative").print_stats(top)
        body = out.getvalue()
        body = body.replace(str(Path(PYTHON).resolve().parents[1]), "<venv>")
        return body.replace(str(Path(__file__).resolve().parents[1]), "<repo>")


def round_trip_ms(bench: Bench, samples: int = 300) -> dict[str, float]:
    """Median latency of one trivial round trip to each server, from this process."""
    import psycopg

    assert bench.postgres is not None
    timings: dict[str, list[float]] = {"postgres ';'": [], "postgres BEGIN+COMMIT": [], "redis": []}
    with psycopg.connect(bench.postgres.conninfo(), autocommit=True) as conn:
        for _ in range(samples):
            t0 = time.perf_counter()
            conn.execute(";")
            timings["postgres ';'"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            conn.execute("BEGIN")
            conn.execute("COMMIT")
            timings["postgres BEGIN+COMMIT"].append(time.perf_counter() - t0)
    for _ in range(samples):
        t0 = time.perf_counter()
        bench.client.ping()
        timings["redis"].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1000 for k, v in timings.items()}


CLAIM_SQL = """
UPDATE workerkit_jobs
SET state = 'running', lease_token = %(token)s, worker_id = %(worker)s,
    lease_expires_at = EXTRACT(EPOCH FROM now()) + %(ttl)s, attempts = attempts + 1,
    updated_at = EXTRACT(EPOCH FROM now())
WHERE id = (
    SELECT id FROM workerkit_jobs
    WHERE queue = ANY(%(queues)s) AND state = 'ready' AND run_at <= EXTRACT(EPOCH FROM now())
    ORDER BY run_at LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING id, task, queue, payload, attempts, max_attempts, lease_token, checkpoint, run_at,
    lease_expires_at
"""
ACK_SQL = """
UPDATE workerkit_jobs
SET state = 'succeeded', result = 'null', checkpoint = NULL, lease_token = NULL,
    lease_expires_at = NULL, finished_at = EXTRACT(EPOCH FROM now()),
    updated_at = EXTRACT(EPOCH FROM now())
WHERE id = %(id)s AND lease_token = %(token)s AND state = 'running'
"""


def claim_floor(bench: Bench, jobs: int = 300) -> dict[str, float]:
    """What-if: median ms of one claim + ack, as is and as one fenced statement each.

    ``SqlQueue.claim`` + ``SqlQueue.ack`` against :data:`CLAIM_SQL` + :data:`ACK_SQL` sent
    with plain psycopg in autocommit (one round trip each, no pool pre-ping), on the same
    table, with the same guarantees for a ready job (SKIP LOCKED, a fresh token, the lease from
    the database clock, an ack fenced by the token). Not measured here: taking over expired
    leases, which the real claim does with a second SELECT first. Interleaved, one of each in
    turn, so that the shared machine's noise hits both alike.
    """
    import secrets

    import psycopg

    from bench.noop_app import QUEUE, TASK, make_app
    from workerkit.app import EnqueueOptions
    from workerkit.settings import Settings

    url, drop = bench.fresh_database("postgresql")
    timings: dict[str, list[float]] = {"as is": [], "one statement each (psycopg)": []}
    try:
        app = make_app(url, Settings().replace(database_url=url))
        queue = app.backend
        for _ in range(2 * jobs):
            app.enqueue(TASK, [1], {}, EnqueueOptions())
        conninfo = bench.postgres.conninfo(url.rsplit("/", 1)[1])
        with psycopg.connect(conninfo, autocommit=True) as conn:
            for _ in range(jobs):
                t0 = time.perf_counter()
                delivery = queue.claim([QUEUE], "bench", 1)[0]
                queue.ack(delivery, None)
                timings["as is"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                token = secrets.token_hex(16)
                row = conn.execute(
                    CLAIM_SQL,
                    {"token": token, "worker": "bench", "ttl": 30.0, "queues": [QUEUE]},
                ).fetchone()
                assert row is not None
                done = conn.execute(ACK_SQL, {"id": row[0], "token": token}).rowcount
                assert done == 1
                timings["one statement each (psycopg)"].append(time.perf_counter() - t0)
        queue.close()
    finally:
        drop()
    return {k: statistics.median(v) * 1000 for k, v in timings.items()}


def profile_report(bench: Bench) -> str:
    """Where a concurrency-1 PostgreSQL cycle spends its time (bench/results/...-profile.txt)."""
    k = bench.k
    timeline = Timeline()
    timed = run_workerkit_inprocess(bench, "postgresql", 1, instrument=timeline)
    rtt = round_trip_ms(bench)
    floor = claim_floor(bench)  # before the profiled run: its thousands of profiles weigh on GC
    profiler = Profiler()
    profiled = run_workerkit_inprocess(bench, "postgresql", 1, instrument=profiler)
    per_job = {key: n / k for key, n in sorted(profiler.commands.items(), key=lambda kv: -kv[1])}
    lines = [
        "# Where a workerkit job cycle goes (in-process NativeWorker, PostgreSQL, concurrency 1)",
        "",
        f"Command: {command_line('bench.throughput')}",
        "",
        (
            f"1. Timeline run (K={k}, no profiler): {timed['jobs_per_s']:.0f} jobs/s. "
            "Median ms per segment of one job's cycle:"
        ),
        "",
    ]
    lines += [f"   {value:7.3f} ms  {name}" for name, value in timeline.segments().items()]
    lines += [
        "",
        (
            "2. Round trips to PostgreSQL per job (counted in psycopg, profiled run; the "
            "bench's own count_by_state polls at the end are included, ~0.01/job):"
        ),
        "",
    ]
    lines += [f"   {value:5.2f}  {name}" for name, value in per_job.items()]
    lines += [
        f"   {sum(per_job.values()):5.2f}  total",
        "",
        "   Median round trip from this process: "
        + ", ".join(f"{name} {value:.3f} ms" for name, value in rtt.items()),
        "",
        "3. What-if, one claim + ack, median ms, measured alone (no worker loop, no job): "
        + ", ".join(f"{name} {value:.3f} ms" for name, value in floor.items()),
        (
            "   (one statement each: UPDATE ... WHERE id = (SELECT ... FOR UPDATE SKIP LOCKED "
            "LIMIT 1) RETURNING ..., then the token-fenced UPDATE, both in autocommit, no "
            "pre-ping; see CLAIM_SQL and ACK_SQL in bench/throughput.py)"
        ),
        "",
        (
            f"4. cProfile, every worker thread merged (K={k}; {profiled['jobs_per_s']:.0f} "
            "jobs/s under the profiler; wall-clock times, sorted by cumulative):"
        ),
        "",
        profiler.text(),
    ]
    return "\n".join(lines)


# --- the report --------------------------------------------------------------------------------

VARIANTS: dict[str, str] = {
    "wk-sqlite": "workerkit NativeWorker, SQLite, c=1 (in-process)",
    "wk-pg-c1": "workerkit NativeWorker, PostgreSQL, c=1 (in-process)",
    "wk-pg-cN": "workerkit NativeWorker, PostgreSQL, c={n} (in-process, 1 process)",
    "wk-run-sqlite": "workerkit run sql (supervisor), SQLite, c=1",
    "wk-run-sqlite-p4": "workerkit run sql (supervisor), SQLite, c=1, prefetch 4",
    "wk-run-pg-c1": "workerkit run sql (supervisor), PostgreSQL, c=1",
    "wk-run-pg-c1-p4": "workerkit run sql (supervisor), PostgreSQL, c=1, prefetch 4",
    "wk-run-pg-cN": "workerkit run sql (supervisor), PostgreSQL, c={n}",
    "wk-run-pg-c8": "workerkit run sql (supervisor), PostgreSQL, c=8",
    "celery-solo": "bare Celery, solo pool, Redis, defaults (acks on receipt)",
    "celery-solo-acks-late": "bare Celery, solo pool, Redis, task_acks_late=True",
    "rq-simple": "bare RQ, SimpleWorker --burst, Redis",
    "wk-run-rq-simple": "workerkit run rq --worker-class simple (supervisor), Redis",
    "rq-fork": "bare RQ, Worker (forking) --burst, Redis",
    "wk-run-rq-fork": "workerkit run rq (forking Worker, supervisor), Redis",
}

#: Same-round ratios reported for these (variant, its bare engine) pairs.
PAIRS: dict[str, str] = {"wk-run-rq-simple": "rq-simple", "wk-run-rq-fork": "rq-fork"}


def _pairs_markdown(data: dict[str, Any]) -> list[str]:
    """workerkit against its bare engine, same round; and CPU per job of each process."""
    samples = data["samples"]
    lines: list[str] = []
    pairs = [
        (ours, bare) for ours, bare in PAIRS.items() if samples.get(ours) and samples.get(bare)
    ]
    if pairs:
        lines += [
            "",
            "| variant | vs its bare engine, same round: median | rounds |",
            "|---|---|---|",
        ]
        for ours, bare in pairs:
            ratios = [
                a["jobs_per_s"] / b["jobs_per_s"]
                for a, b in zip(samples[ours], samples[bare], strict=False)
            ]
            each = ", ".join(f"{r:.2f}" for r in ratios)
            lines.append(f"| {ours} / {bare} | **{statistics.median(ratios):.2f}x** | {each} |")
    with_cpu = {v: rows for v, rows in samples.items() if rows and "cpu_us_per_job" in rows[0]}
    if with_cpu:
        names = ("supervisor", "worker", "horses", "redis")
        lines += [
            "",
            (
                "CPU time per job, microseconds, median of the rounds (/proc/PID/stat utime + "
                "stime, from the K/10-th job to the K-th; horses: the forking worker's reaped "
                "children; redis: redis-server):"
            ),
            "",
            "| variant | " + " | ".join(names) + " | total |",
            "|---|" + "---|" * (len(names) + 1),
        ]
        for variant, rows in with_cpu.items():
            cells, total = [], 0.0
            for name in names:
                values = [r["cpu_us_per_job"][name] for r in rows if name in r["cpu_us_per_job"]]
                if values:
                    value = statistics.median(values)
                    total += value
                    cells.append(f"{value:.0f}")
                else:
                    cells.append("-")
            lines.append(f"| {variant} | " + " | ".join(cells) + f" | {total:.0f} |")
    with_faults = {v: rows for v, rows in with_cpu.items() if "faults_per_job" in rows[0]}
    if with_faults:
        names = ("supervisor", "worker", "horses")
        lines += [
            "",
            (
                "Minor page faults per job, median of the rounds (/proc/PID/stat minflt, the "
                "same window; after a fork each page a process first writes is one):"
            ),
            "",
            "| variant | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for variant, rows in with_faults.items():
            cells = []
            for name in names:
                values = [r["faults_per_job"][name] for r in rows if name in r["faults_per_job"]]
                cells.append(f"{statistics.median(values):.0f}" if values else "-")
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return lines


def report(data: dict[str, Any]) -> str:
    n = data["concurrency_n"]
    lines = [
        "# bench/throughput.py: no-op job throughput",
        "",
        f"Command: `{data['command']}`",
        "",
        machine_markdown(data["machine"]),
        (
            f"K = {data['k']} jobs per repetition, {data['reps']} repetitions per variant "
            "(interleaved); jobs/s = (K - 1) / (last job's INCR - first job's INCR), measured "
            "inside the worker. Every job does one Redis INCR and nothing else."
        ),
        "",
        (
            "| variant | jobs/s median | min | max | spread | vs celery-solo, same rep (median) "
            "| same-rep ratios, min-max | start -> done, median (s) |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    baseline = [r["jobs_per_s"] for r in data["samples"].get("celery-solo", [])]
    for key, rows in data["samples"].items():
        if not rows:
            continue
        rates = [r["jobs_per_s"] for r in rows]
        s = summary(rates)
        spread = (s["max"] - s["min"]) / s["median"] * 100 if s["median"] else 0.0
        total = statistics.median(r["start_to_done_s"] for r in rows)
        ratios = [rate / base for rate, base in zip(rates, baseline, strict=False)]
        ratio = f"{statistics.median(ratios):.2f}x" if ratios else "-"
        ratio_range = f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else "-"
        lines.append(
            f"| {VARIANTS[key].format(n=n)} | **{s['median']:.0f}** | {s['min']:.0f} | "
            f"{s['max']:.0f} | {spread:.0f}% | {ratio} | {ratio_range} | {fmt(total, '', 2)} |"
        )
    lines += _pairs_markdown(data)
    lines.append("")
    lines.append(
        "start -> done: from starting the worker (thread or process) to the counter reaching K, "
        "polled every 10 ms: includes start-up (imports, connecting, Celery's boot). "
        "spread = (max - min) / median. vs celery-solo: this variant's rate divided by "
        "celery-solo's in the same repetition (run minutes apart at most, so it is less "
        "exposed to the shared machine's load swings than the absolute figures)."
    )
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("-k", "--jobs", type=int, default=2000, help="jobs per repetition")
    parser.add_argument(
        "--fork-jobs",
        type=int,
        default=None,
        help="jobs per repetition of rq-fork, wk-run-rq-fork (default K/4)",
    )
    parser.add_argument("--reps", type=int, default=3, help="repetitions per variant")
    parser.add_argument("-n", "--concurrency", type=int, default=4, help="N for wk-pg-cN")
    parser.add_argument(
        "--only", default="", help="comma-separated variants (default: all); " + ", ".join(VARIANTS)
    )
    parser.add_argument("--no-supervisor", action="store_true", help="skip wk-run-*")
    parser.add_argument("--no-postgres", action="store_true", help="skip the PostgreSQL variants")
    parser.add_argument("--profile", action="store_true", help="add a profiled wk-pg-c1 run")
    parser.add_argument("--no-record", action="store_true", help="print, do not write results")
    args = parser.parse_args()
    if args.jobs < 2:
        parser.error("-k must be at least 2")

    chosen = [v for v in args.only.split(",") if v] or [
        v for v in VARIANTS if v not in ("wk-run-pg-cN", "wk-run-pg-c8") and not v.endswith("-p4")
    ]
    if args.no_supervisor:
        chosen = [v for v in chosen if not v.startswith("wk-run")]
    if args.no_postgres:
        chosen = [v for v in chosen if "-pg-" not in v]
    unknown = set(chosen) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants: {sorted(unknown)}")

    info = machine()
    samples: dict[str, list[dict[str, Any]]] = {v: [] for v in chosen}
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="workerkit-bench-")))
        redis = stack.enter_context(redis_server())
        needs_pg = any("-pg-" in v for v in chosen) or args.profile
        postgres = stack.enter_context(postgres_server()) if needs_pg else None
        bench = Bench(tmp, redis, postgres, args.jobs, args.fork_jobs)
        n = args.concurrency
        runners: dict[str, Callable[[], dict[str, Any]]] = {
            "wk-sqlite": lambda: run_workerkit_inprocess(bench, "sqlite", 1),
            "wk-pg-c1": lambda: run_workerkit_inprocess(bench, "postgresql", 1),
            "wk-pg-cN": lambda: run_workerkit_inprocess(bench, "postgresql", n),
            "wk-run-sqlite": lambda: run_workerkit_supervised(bench, "sqlite", 1),
            "wk-run-sqlite-p4": lambda: run_workerkit_supervised(bench, "sqlite", 1, 4),
            "wk-run-pg-c1": lambda: run_workerkit_supervised(bench, "postgresql", 1),
            "wk-run-pg-c1-p4": lambda: run_workerkit_supervised(bench, "postgresql", 1, 4),
            "wk-run-pg-cN": lambda: run_workerkit_supervised(bench, "postgresql", n),
            "wk-run-pg-c8": lambda: run_workerkit_supervised(bench, "postgresql", 8),
            "celery-solo": lambda: run_celery(bench, acks_late=False),
            "celery-solo-acks-late": lambda: run_celery(bench, acks_late=True),
            "rq-simple": lambda: run_rq(bench, "simple"),
            "wk-run-rq-simple": lambda: run_rq_supervised(bench, "simple"),
            "rq-fork": lambda: run_rq(bench, "forking"),
            "wk-run-rq-fork": lambda: run_rq_supervised(bench, "forking"),
        }
        for rep in range(args.reps):
            for variant in chosen:
                result = runners[variant]()
                samples[variant].append(result)
                cpu = " ".join(
                    f"{name} {us:.0f}" for name, us in result.get("cpu_us_per_job", {}).items()
                )
                faults = result.get("faults_per_job", {})
                if faults:
                    cpu += "  faults/job: " + " ".join(
                        f"{name} {n:.0f}" for name, n in faults.items() if name != "redis"
                    )
                print(
                    f"rep {rep + 1} {variant:22} {result['jobs_per_s']:7.0f} jobs/s  "
                    f"(window {result['window_s']:.2f}s, start->done "
                    f"{result['start_to_done_s']:.2f}s, enqueue {result['enqueue_s']:.2f}s)"
                    + (f"  CPU us/job: {cpu}" if cpu else ""),
                    flush=True,
                )
        profile_text = profile_report(bench) if args.profile else None
    info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    data = {
        "command": command_line("bench.throughput"),
        "machine": info,
        "k": args.jobs,
        "reps": args.reps,
        "concurrency_n": args.concurrency,
        "duration_s": round(time.monotonic() - started, 1),
        "summary": {v: summary([r["jobs_per_s"] for r in rows]) for v, rows in samples.items()},
        "samples": samples,
    }
    text = report(data)
    print(text)
    if profile_text is not None:
        print(profile_text[:5000])
    if not args.no_record:
        paths = write_results("throughput", data, text)
        print("recorded:", *paths)
        if profile_text is not None:
            path = RESULTS / "throughput-profile.txt"
            path.write_text(profile_text)
            print("recorded:", path)


if __name__ == "__main__":
    main()
