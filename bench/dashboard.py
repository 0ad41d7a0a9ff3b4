"""The dashboard's page loads on a big SQL queue (issue 19: under 300 ms), PostgreSQL.

One throwaway PostgreSQL cluster (tests/support/servers.py), one migrated database bulk-loaded
with ``INSERT ... SELECT generate_series`` (as bench/queue_growth.py): 1,000,000 succeeded jobs
(finished within the last hour), 100,000 waiting jobs (due; 90 % on ``default``, 10 % on
``mail``; one task per queue), 1,000 scheduled, 1,000 failed (with a traceback), 50 running,
and 20 workers' presences; then ``VACUUM ANALYZE``.

Each source call a page makes (``workerkit.engines.sql.dashboard``) is timed N times in a row:
``queues()``; ``jobs()`` for each state, the first page and the 20th (its cursor found by walking
there once); the same filtered by queue and by task; ``job(id)``; ``search()`` by id and by task;
``workers()``; and a whole overview (``queues()`` + ``workers()``). When the ``workerkit
dashboard`` command exists (the web branch), each page is also fetched over HTTP from a real
``workerkit dashboard sql`` process (http.client, one connection per request).

Run from the repository root::

    .venv/bin/python -m bench.dashboard                          # ~2 minutes, mostly the load
    .venv/bin/python -m bench.dashboard --finished 10000 --waiting 1000 -n 5 --no-record
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    wait_for,
    write_results,
)

_ERROR = r"Traceback (most recent call last):\n  File x.py, line 1\nValueError: bad input"
_BULK = f"""
INSERT INTO workerkit_jobs (id, queue, task, payload, state, attempts, max_attempts, run_at,
                            enqueued_at, created_at, updated_at, finished_at, result)
SELECT 'done-' || g, 'default', 'reports.build', '{{{{"args":[],"kwargs":{{{{}}}}}}}}',
       'succeeded', 1, 1, t - 3600, t - 3600, t - 3600, t - 3000 + g * 0.001,
       t - 3000 + g * 0.001, 'null'
FROM generate_series(1, {{finished}}) AS g, (SELECT EXTRACT(EPOCH FROM now()) AS t) AS n;
INSERT INTO workerkit_jobs (id, queue, task, payload, state, attempts, max_attempts, run_at,
                            enqueued_at, created_at, updated_at)
SELECT 'wait-' || g, CASE WHEN g % 10 = 0 THEN 'mail' ELSE 'default' END,
       CASE WHEN g % 10 = 0 THEN 'mail.send' ELSE 'reports.build' END,
       '{{{{"args":[],"kwargs":{{{{}}}}}}}}', 'ready', 0, 3, t - 600 + g * 0.001, t, t, t
FROM generate_series(1, {{waiting}}) AS g, (SELECT EXTRACT(EPOCH FROM now()) AS t) AS n;
INSERT INTO workerkit_jobs (id, queue, task, payload, state, attempts, max_attempts, run_at,
                            enqueued_at, created_at, updated_at)
SELECT 'later-' || g, 'default', 'reports.build', '{{{{"args":[],"kwargs":{{{{}}}}}}}}', 'ready',
       0, 3, t + 86400 + g, t, t, t
FROM generate_series(1, 1000) AS g, (SELECT EXTRACT(EPOCH FROM now()) AS t) AS n;
INSERT INTO workerkit_jobs (id, queue, task, payload, state, attempts, max_attempts, run_at,
                            enqueued_at, created_at, updated_at, finished_at, last_error)
SELECT 'dead-' || g, 'default', 'reports.build', '{{{{"args":[],"kwargs":{{{{}}}}}}}}', 'failed',
       3, 3, t - 7200, t - 7200, t - 7200, t - 7000 + g, t - 7000 + g, E'{_ERROR}'
FROM generate_series(1, 1000) AS g, (SELECT EXTRACT(EPOCH FROM now()) AS t) AS n;
INSERT INTO workerkit_jobs (id, queue, task, payload, state, attempts, max_attempts, run_at,
                            enqueued_at, created_at, updated_at, lease_token, lease_expires_at,
                            worker_id)
SELECT 'run-' || g, 'default', 'reports.build', '{{{{"args":[],"kwargs":{{{{}}}}}}}}', 'running',
       1, 3, t - 60, t - 60, t - 60, t, md5(g::text), t + 30, 'host-' || (g % 20)
FROM generate_series(1, 50) AS g, (SELECT EXTRACT(EPOCH FROM now()) AS t) AS n;
"""


def _load(url: str, finished: int, waiting: int) -> float:
    from workerkit.engines.presence import Presence
    from workerkit.engines.sql.presence_store import SqlPresenceStore

    started = time.monotonic()
    sql = _BULK.format(finished=finished, waiting=waiting)
    execute_sql(url, *[s for s in sql.split(";") if s.strip()])
    execute_sql(url, "VACUUM ANALYZE", autocommit=True)
    store = SqlPresenceStore(url)
    try:
        for i in range(20):
            store.publish(
                Presence(
                    worker_id=f"host-{i}:1:{i:08x}",
                    hostname=f"host-{i}",
                    pid=1,
                    engine="sql",
                    queues=("default", "mail"),
                    concurrency=4,
                    state="ready",
                    started_at=time.time() - 600,
                    heartbeat_at=time.time(),
                    ttl=15.0,
                    jobs=tuple(f"run-{j}" for j in range(i, 50, 20)),
                    counts={"default": {"succeeded": 1000 * i, "failed": i}},
                )
            )
    finally:
        store.close()
    return time.monotonic() - started


def _time(call: Callable[[], Any], n: int) -> dict[str, float]:
    call()  # the first call plans and warms the pool; not counted
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return {
        "n": n,
        "median_ms": statistics.median(samples),
        "p95_ms": percentile(samples, 95),
        "max_ms": max(samples),
    }


def _later_cursor(source: Any, query: Any, pages: int) -> str | None:
    import dataclasses

    cursor = None
    for _ in range(pages - 1):
        page = source.jobs(dataclasses.replace(query, cursor=cursor))
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    return cursor


def _source_calls(url: str, n: int) -> dict[str, dict[str, float]]:
    import dataclasses

    from workerkit.dashboard.model import JOB_STATES, JobQuery
    from workerkit.engines.sql.dashboard import open_source
    from workerkit.settings import Settings

    source = open_source(Settings(database_url=url))
    results: dict[str, dict[str, float]] = {}
    try:
        results["queues()"] = _time(source.queues, n)
        results["workers()"] = _time(source.workers, n)
        results["overview: queues() + workers()"] = _time(
            lambda: (source.queues(), source.workers()), n
        )
        queries = [JobQuery(state=state) for state in JOB_STATES]
        queries += [
            JobQuery(state="waiting", queue="mail"),
            JobQuery(state="waiting", task="mail.send"),
            JobQuery(state="finished", queue="default"),
            JobQuery(state="finished", queue="mail"),  # none: every window comes back empty
        ]
        for query in queries:
            label = f"jobs({query.state}" + "".join(
                f", {k}={v}" for k, v in (("queue", query.queue), ("task", query.task)) if v
            )
            results[label + ") page 1"] = _time(lambda q=query: source.jobs(q), n)
            later = dataclasses.replace(query, cursor=_later_cursor(source, query, 20))
            results[label + ") page 20"] = _time(lambda q=later: source.jobs(q), n)
        for job_id in ("wait-1000", "done-10000", "dead-10"):
            results[f"job({job_id})"] = _time(lambda j=job_id: source.job(j), n)
        results["search(id)"] = _time(lambda: source.search("done-7777"), n)
        results["search(task mail.send)"] = _time(lambda: source.search("mail.send"), n)
    finally:
        source.close()
    return results


def _has_dashboard_command() -> bool:
    out = subprocess.run(
        [*WORKERKIT, "dashboard", "--help"], capture_output=True, text=True, check=False
    )
    return out.returncode == 0


def _get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _http_pages(url: str, n: int, tmp: Path) -> dict[str, dict[str, float]]:
    from tests.support.servers import free_port

    port = free_port()
    env = child_env(WORKERKIT_DATABASE_URL=url, WORKERKIT_LOG_FORMAT="json")
    proc = Proc(
        [*WORKERKIT, "dashboard", "sql", "--host", "127.0.0.1", "--port", str(port)],
        log_path=tmp / "dashboard.log",
        env=env,
    )
    results: dict[str, dict[str, float]] = {}
    try:
        wait_for(
            lambda: _healthy(port), timeout=60, what="workerkit dashboard to answer", proc=proc
        )
        pages = [
            "/",
            "/jobs?state=waiting",
            "/jobs?state=scheduled",
            "/jobs?state=running",
            "/jobs?state=failed",
            "/jobs?state=finished",
            "/jobs?state=waiting&queue=mail",
            "/jobs/wait-1000",
            "/workers",
            "/search?q=mail.send",
        ]
        for path in pages:
            status, _ = _get(port, path)
            if status != 200:
                raise RuntimeError(f"GET {path}: {status}")
            results[f"GET {path}"] = _time(lambda p=path: _get(port, p), n)
    finally:
        proc.stop()
    return results


def _healthy(port: int) -> bool:
    with contextlib.suppress(OSError):
        return _get(port, "/healthz")[0] == 200
    return False


def _markdown(info: dict[str, Any], data: dict[str, Any]) -> str:
    lines = [
        "# Dashboard page loads on a big SQL queue (PostgreSQL)\n",
        f"Command: `{data['command']}`\n",
        machine_markdown(info),
        f"- table: {data['table']}; loaded in {data['load_s']:.0f} s\n",
        f"- goal: a page load under 300 ms; {data['n']} timed calls each (after one untimed)\n",
        "\n| call | median ms | p95 ms | max ms |\n|---|---|---|---|",
    ]
    for group in ("source", "http"):
        for name, row in data.get(group, {}).items():
            lines.append(
                f"| {name} | {row['median_ms']:.1f} | {row['p95_ms']:.1f} | {row['max_ms']:.1f} |"
            )
    if not data.get("http"):
        lines.append("\nNo HTTP rows: `workerkit dashboard` was not in this tree.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--finished", type=int, default=1_000_000)
    parser.add_argument("--waiting", type=int, default=100_000)
    parser.add_argument("-n", type=int, default=30, help="timed calls per page (default 30)")
    parser.add_argument("--no-record", action="store_true", help="print, write no results")
    args = parser.parse_args()
    info = machine()
    from tests.support import servers
    from workerkit.engines.sql import db

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="workerkit-bench-")))
        postgres = stack.enter_context(postgres_server())
        name = f"bench_{uuid.uuid4().hex[:8]}"
        servers.create_database(postgres, name, "template0")
        url = postgres.url(name)
        db.upgrade(url)
        load_s = _load(url, args.finished, args.waiting)
        print(f"loaded in {load_s:.1f} s", flush=True)
        data: dict[str, Any] = {
            "command": command_line("bench.dashboard"),
            "table": f"{args.finished:,} succeeded, {args.waiting:,} waiting, 1,000 scheduled, "
            "1,000 failed, 50 running; 20 presences",
            "load_s": load_s,
            "n": args.n,
            "source": _source_calls(url, args.n),
        }
        if _has_dashboard_command():
            data["http"] = _http_pages(url, args.n, tmp)
    markdown = _markdown(info, data)
    print(markdown)
    if not args.no_record:
        write_results("dashboard", {"machine": info, **data}, markdown)


if __name__ == "__main__":
    main()
