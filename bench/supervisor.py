"""The supervisor's shutdown latency and memory, against bare RQ and bare Celery (issue 3).

For each run (variants interleaved, so that a burst of load from the shared machine hits all of
them alike):

* **workerkit**: ``workerkit run sql --app bench.noop_app:app`` on a SQLite file, idle. Once
  ``/readyz`` answers 200 (and 0.5 s more), read the VmRSS of the supervisor and of its worker
  child from /proc, send SIGTERM to the supervisor and poll ``/readyz`` in a tight loop (a new
  connection per request, no sleep) until the first 503: that is *SIGTERM -> 503*. A thread
  blocked in ``waitpid`` records the exit: *SIGTERM -> exit*.
* **rq**: ``rq worker --worker-class rq.worker.SimpleWorker`` on a private redis-server, idle;
  ready when it has registered itself in Redis (and 0.5 s more); SIGTERM -> exit and its RSS.
* **celery**: ``celery -A bench.celery_noop worker --pool=prefork -c 2`` (otherwise defaults,
  ``-l INFO`` only to see its "ready." line); SIGTERM -> exit and RSS (main process, and the
  main process plus its two pool children).

Run from the repository root::

    .venv/bin/python -m bench.supervisor            # 20 runs of each, ~3 minutes
    .venv/bin/python -m bench.supervisor --runs 5   # quicker

Results: bench/results/supervisor.md and .json (``--no-record`` only prints them).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench._common import (
    PYTHON,
    WORKERKIT,
    Proc,
    child_env,
    command_line,
    descendants,
    fmt,
    machine,
    machine_markdown,
    redis_server,
    rss_kib,
    summary,
    wait_for,
    write_results,
)

SETTLE = 0.5  # after "ready", before the signal: the worker is in its idle wait by then
EXIT_TIMEOUT = 20.0


def http_status(port: int, path: str, timeout: float = 1.0) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    except OSError:
        return None
    finally:
        conn.close()


def free_port() -> int:
    from tests.support.servers import free_port as tests_free_port

    return tests_free_port()


def _sigterm_and_wait(proc: Proc) -> tuple[float, threading.Thread, list[int]]:
    """Start a waitpid thread, then SIGTERM; returns the signal time, the thread, the code box."""
    code: list[int] = []
    waiter = threading.Thread(target=lambda: code.append(proc.wait_blocking()), daemon=True)
    waiter.start()
    sent = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    return sent, waiter, code


def _finish(proc: Proc, sent: float, waiter: threading.Thread, code: list[int]) -> float:
    waiter.join(EXIT_TIMEOUT)
    if waiter.is_alive() or proc.exited_at is None:
        proc.stop(signal.SIGKILL)
        raise RuntimeError(f"{proc.argv[:4]} did not exit {EXIT_TIMEOUT:g}s after SIGTERM")
    if code and code[0] != 0:
        print(f"  note: {proc.argv[:4]} exited with {code[0]}")
    proc.stop()  # closes the log file; the process is gone
    return proc.exited_at - sent


# --- one run of each variant ----------------------------------------------------------------


def run_workerkit(tmp: Path, database_url: str, index: int) -> dict[str, Any]:
    port = free_port()
    env = child_env(
        WORKERKIT_APP="bench.noop_app:app",
        WORKERKIT_DATABASE_URL=database_url,
        WORKERKIT_HTTP_HOST="127.0.0.1",
        WORKERKIT_HTTP_PORT=str(port),
        WORKERKIT_LOG_FORMAT="json",
        BENCH_REDIS_URL="redis://127.0.0.1:1/0",  # never used: no job runs
    )
    proc = Proc([*WORKERKIT, "run", "sql"], log_path=tmp / f"workerkit-{index}.log", env=env)
    try:
        wait_for(
            lambda: http_status(port, "/readyz") == 200,
            timeout=30,
            what="workerkit /readyz 200",
            proc=proc,
        )
        ready_after = time.monotonic() - proc.started
        time.sleep(SETTLE)
        children = descendants(proc.pid)
        supervisor_rss = rss_kib(proc.pid)
        worker_rss = sum(rss_kib(pid) or 0 for pid in children)

        sent, waiter, code = _sigterm_and_wait(proc)
        first_503: float | None = None
        polls = 0
        while proc.exited_at is None and time.monotonic() - sent < EXIT_TIMEOUT:
            status = http_status(port, "/readyz", timeout=0.5)
            polls += 1
            if status == 503:
                first_503 = time.monotonic() - sent
                break
            if status is None and polls > 1000:
                break  # the server is gone without ever answering 503
        exit_after = _finish(proc, sent, waiter, code)
    finally:
        proc.stop(signal.SIGKILL)
    return {
        "sigterm_to_503": first_503,
        "polls_until_503": polls,
        "sigterm_to_exit": exit_after,
        "rss_supervisor_kib": supervisor_rss,
        "rss_worker_kib": worker_rss,
        "worker_processes": len(children),
        "start_to_ready": ready_after,
    }


def run_rq(tmp: Path, redis_url: str, index: int) -> dict[str, Any]:
    import redis

    queue = f"idle-{index}"
    proc = Proc(
        [
            PYTHON,
            "-m",
            "rq.cli",
            "worker",
            "--worker-class",
            "rq.worker.SimpleWorker",
            "--url",
            redis_url,
            queue,
        ],
        log_path=tmp / f"rq-{index}.log",
        env=child_env(),
    )
    client = redis.Redis.from_url(redis_url)
    try:
        wait_for(
            lambda: client.scard(f"rq:workers:{queue}") > 0,
            timeout=30,
            what="rq worker registered",
            proc=proc,
        )
        ready_after = time.monotonic() - proc.started
        time.sleep(SETTLE)
        rss = rss_kib(proc.pid)
        sent, waiter, code = _sigterm_and_wait(proc)
        exit_after = _finish(proc, sent, waiter, code)
    finally:
        proc.stop(signal.SIGKILL)
        client.close()
    return {"sigterm_to_exit": exit_after, "rss_main_kib": rss, "start_to_ready": ready_after}


def run_celery(tmp: Path, redis_url: str, index: int) -> dict[str, Any]:
    log_path = tmp / f"celery-{index}.log"
    proc = Proc(
        [
            PYTHON,
            "-m",
            "celery",
            "-A",
            "bench.celery_noop",
            "worker",
            "--pool=prefork",
            "-c",
            "2",
            "-Q",
            f"idle-{index}",
            "-n",
            f"bench{index}@%h",
            "-l",
            "INFO",
        ],
        log_path=log_path,
        env=child_env(BENCH_REDIS_URL=redis_url),
    )
    try:
        wait_for(
            lambda: " ready." in proc.log_text(100_000),
            timeout=60,
            what="celery worker ready",
            proc=proc,
        )
        ready_after = time.monotonic() - proc.started
        time.sleep(SETTLE)
        children = descendants(proc.pid)
        main_rss = rss_kib(proc.pid) or 0
        total_rss = main_rss + sum(rss_kib(pid) or 0 for pid in children)
        sent, waiter, code = _sigterm_and_wait(proc)
        exit_after = _finish(proc, sent, waiter, code)
    finally:
        proc.stop(signal.SIGKILL)
    return {
        "sigterm_to_exit": exit_after,
        "rss_main_kib": main_rss,
        "rss_total_kib": total_rss,
        "pool_processes": len(children),
        "start_to_ready": ready_after,
    }


# --- report ---------------------------------------------------------------------------------


def _column(samples: list[dict[str, Any]], key: str) -> list[float]:
    return [float(s[key]) for s in samples if s.get(key) is not None]


def _row(label: str, values: list[float], scale: float, unit: str, digits: int) -> str:
    s = summary(values)
    if not s.get("n"):
        return f"| {label} | 0 | - | - | - | - |"
    cells = [fmt(s[k] * scale, unit, digits) for k in ("min", "median", "p90", "max")]
    return f"| {label} | {s['n']} | " + " | ".join(cells) + " |"


def report(data: dict[str, Any]) -> str:
    wk, rq, cel = data["samples"]["workerkit"], data["samples"]["rq"], data["samples"]["celery"]
    ms, mib = 1000.0, 1 / 1024
    lines = [
        "# bench/supervisor.py: shutdown latency and memory",
        "",
        f"Command: `{data['command']}`",
        "",
        machine_markdown(data["machine"]),
        "Latency (ms; n = runs, interleaved across variants):",
        "",
        "| measure | n | min | median | p90 | max |",
        "|---|---|---|---|---|---|",
        _row(
            "workerkit run sql: SIGTERM -> /readyz 503",
            _column(wk, "sigterm_to_503"),
            ms,
            "",
            1,
        ),
        _row(
            "workerkit run sql: SIGTERM -> exit (idle)", _column(wk, "sigterm_to_exit"), ms, "", 1
        ),
        _row(
            "bare rq SimpleWorker: SIGTERM -> exit (idle)",
            _column(rq, "sigterm_to_exit"),
            ms,
            "",
            1,
        ),
        _row(
            "bare celery prefork -c 2: SIGTERM -> exit (idle)",
            _column(cel, "sigterm_to_exit"),
            ms,
            "",
            1,
        ),
        "",
        "Resident memory after ready (MiB, VmRSS from /proc/PID/status):",
        "",
        "| process | n | min | median | p90 | max |",
        "|---|---|---|---|---|---|",
        _row("workerkit supervisor", _column(wk, "rss_supervisor_kib"), mib, "", 1),
        _row("workerkit sql worker (child)", _column(wk, "rss_worker_kib"), mib, "", 1),
        _row("bare rq worker", _column(rq, "rss_main_kib"), mib, "", 1),
        _row("bare celery main process", _column(cel, "rss_main_kib"), mib, "", 1),
        _row("bare celery main + 2 pool children", _column(cel, "rss_total_kib"), mib, "", 1),
        "",
        "Start -> ready (s; for context, not a goal):",
        "",
        "| variant | n | min | median | p90 | max |",
        "|---|---|---|---|---|---|",
        _row("workerkit run sql (/readyz 200)", _column(wk, "start_to_ready"), 1, "", 2),
        _row("bare rq (registered)", _column(rq, "start_to_ready"), 1, "", 2),
        _row('bare celery ("ready." logged)', _column(cel, "start_to_ready"), 1, "", 2),
        "",
    ]
    missing = sum(1 for s in wk if s.get("sigterm_to_503") is None)
    if missing:
        lines.append(f"**{missing} workerkit run(s) never answered 503 before exiting.**\n")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=20, help="runs of workerkit (default 20)")
    parser.add_argument(
        "--baseline-runs", type=int, default=None, help="runs of rq and celery (default: --runs)"
    )
    parser.add_argument("--no-celery", action="store_true", help="skip bare celery")
    parser.add_argument("--no-rq", action="store_true", help="skip bare rq")
    parser.add_argument("--no-record", action="store_true", help="print, do not write results")
    args = parser.parse_args()
    baseline_runs = args.runs if args.baseline_runs is None else args.baseline_runs

    from workerkit.engines.sql import db

    info = machine()
    samples: dict[str, list[dict[str, Any]]] = {"workerkit": [], "rq": [], "celery": []}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="workerkit-bench-") as tmp_name, redis_server() as rs:
        tmp = Path(tmp_name)
        database_url = f"sqlite:///{tmp / 'bench.sqlite3'}"
        db.upgrade(database_url)
        for index in range(max(args.runs, baseline_runs)):
            line = [f"run {index + 1}:"]
            if index < args.runs:
                result = run_workerkit(tmp, database_url, index)
                samples["workerkit"].append(result)
                line.append(
                    f"workerkit 503 {fmt(result['sigterm_to_503'], 's')} "
                    f"exit {fmt(result['sigterm_to_exit'], 's')}"
                )
            if index < baseline_runs and not args.no_rq:
                result = run_rq(tmp, rs.url(), index)
                samples["rq"].append(result)
                line.append(f"rq exit {fmt(result['sigterm_to_exit'], 's')}")
            if index < baseline_runs and not args.no_celery:
                result = run_celery(tmp, rs.url(), index)
                samples["celery"].append(result)
                line.append(f"celery exit {fmt(result['sigterm_to_exit'], 's')}")
            print("  ".join(line), flush=True)
    info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    data = {
        "command": command_line("bench.supervisor"),
        "machine": info,
        "duration_s": round(time.monotonic() - started, 1),
        "summary": {
            variant: {
                key: summary(_column(rows, key))
                for key in sorted({k for row in rows for k, v in row.items() if v is not None})
            }
            for variant, rows in samples.items()
        },
        "samples": samples,
    }
    text = report(data)
    print(text)
    if not args.no_record:
        with contextlib.suppress(OSError):
            paths = write_results("supervisor", data, text)
            print("recorded:", *paths)


if __name__ == "__main__":
    main()
