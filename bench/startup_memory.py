"""Start -> ready and resident memory of ``workerkit run ENGINE`` vs the bare engine (issue 16).

Variants, interleaved round by round (a burst of load from the shared machine hits all alike):

* ``workerkit-sql``: ``workerkit run sql --app bench.startup_apps:sql_app`` on a SQLite file;
* ``workerkit-sql-exec`` / ``workerkit-rq-exec``: the same with ``WORKERKIT_FORK_WORKER=0``, the
  early worker exec'd instead of forked from the CLI (supervisor/forked.py);
* ``workerkit-rq`` / ``bare-rq``: ``workerkit run rq --app bench.startup_rq_app:app`` and
  ``rq worker`` (RQ's default, forking Worker), on a private redis-server;
* ``workerkit-celery`` / ``bare-celery``: ``workerkit run celery -- --pool=solo`` and ``celery -A
  bench.startup_celery_app worker --pool solo -l INFO``, on the same redis-server;
* ``floor-rq``: bare ``rq worker`` forked from the least supervisor workerkit's stack allows
  (bench/supervisor_floor.py: CPython and anyio's event loop, nothing else; the modules both
  processes use imported before the fork, as workerkit's CLI does), compared with
  ``bare-rq``: what no supervisor written on that stack can go under; ``floor-rq-stdlib``: the
  same with a parent on the standard library alone (``signal.sigwait``, no anyio).

*Start -> ready*: from the spawn to the first ``/readyz`` 200 (workerkit), to the worker's
registration key in Redis (bare RQ; it is written just before the "Listening on" log line), to
the ``ready.`` log line (bare Celery, logged from ``worker_ready``). Each is polled every 10 ms.
Then, after ``--settle`` seconds idle, VmRSS (``/proc/PID/status``) and PSS
(``/proc/PID/smaps_rollup``) of the main process and of its descendants (workerkit's worker
child, RQ's idle worker has none, Celery solo has none), and PSS summed over the tree: the
memory comparison with the bare engine is made on that sum, not on RSS (bench/README.md, "What
the pod is charged"). Then the *idle CPU*: milliseconds of CPU per second over ``--idle``
seconds more, of the main process and of its descendants (``/proc/PID/task/*/schedstat``, the
scheduler's run time in nanoseconds: exact, where utime and stime count 10 ms ticks), what an
idle pod costs its node. Then SIGTERM and the exit is awaited.

Run from the repository root::

    .venv/bin/python -m bench.startup_memory              # 7 rounds, ~6 minutes
    .venv/bin/python -m bench.startup_memory --rounds 5 --only workerkit-sql

Results: bench/results/startup_memory.md and .json (``--no-record`` only prints them;
``--label`` names the run, e.g. ``before`` / ``after``, and keeps the other labels' runs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import (
    PYTHON,
    RESULTS,
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
from bench.supervisor import free_port, http_status

__all__ = ("main",)

VARIANTS = (
    "workerkit-sql", "workerkit-sql-exec", "workerkit-rq", "workerkit-rq-exec", "bare-rq",
    "workerkit-celery", "bare-celery", "floor-rq", "floor-rq-stdlib",
)  # fmt: skip
#: The bare engine each workerkit variant is compared with (sql has none: its goal is absolute).
BARE = {
    "workerkit-rq": "bare-rq",
    "workerkit-rq-exec": "bare-rq",
    "workerkit-celery": "bare-celery",
    "floor-rq": "bare-rq",
    "floor-rq-stdlib": "bare-rq",
}
#: The variants whose early worker is exec'd, not forked from the CLI (supervisor/forked.py).
EXEC = ("workerkit-sql-exec", "workerkit-rq-exec")
READY_TIMEOUT = 60.0


def pss_kib(pid: int) -> int | None:
    """Pss of ``pid`` in KiB from /proc/PID/smaps_rollup (None when unreadable or gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def run_ns(pid: int) -> int:
    """Nanoseconds ``pid`` (all its threads) has run, from /proc (0 when it is gone)."""
    total = 0
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
    return total


def idle_cpu(pid: int, seconds: float) -> tuple[float, float]:
    """CPU milliseconds per second of ``pid`` and of its descendants over ``seconds``."""
    children = descendants(pid)
    main0, kids0 = run_ns(pid), sum(run_ns(c) for c in children)
    time.sleep(seconds)
    main1, kids1 = run_ns(pid), sum(run_ns(c) for c in children)
    return (main1 - main0) / 1e6 / seconds, (kids1 - kids0) / 1e6 / seconds


def _argv_env(variant: str, tmp: Path, redis_url: str, db_url: str, index: int) -> Any:
    queue = f"startup-{index}"
    port = free_port() if variant.startswith("workerkit") else None
    env = child_env(
        BENCH_REDIS_URL=redis_url,
        WORKERKIT_DATABASE_URL=db_url,
        WORKERKIT_REDIS_URL=redis_url,
        WORKERKIT_QUEUES=queue,
        WORKERKIT_HTTP_HOST="127.0.0.1",
        WORKERKIT_HTTP_PORT=str(port or 0),
        WORKERKIT_LOG_FORMAT="json",
    )
    argv: list[str]
    if variant in EXEC:
        env["WORKERKIT_FORK_WORKER"] = "0"
        variant = variant.removesuffix("-exec")
    if variant == "workerkit-sql":
        argv = [*WORKERKIT, "run", "sql", "--app", "bench.startup_apps:sql_app"]
    elif variant == "workerkit-rq":
        argv = [*WORKERKIT, "run", "rq", "--app", "bench.startup_rq_app:app"]
    elif variant == "workerkit-celery":
        env["WORKERKIT_APP"] = "bench.startup_celery_app:app"
        argv = [*WORKERKIT, "run", "celery", "--", "--pool=solo", f"--hostname=wk{index}@%h"]
    elif variant == "bare-rq":
        argv = [PYTHON, "-m", "rq.cli", "worker", "--url", redis_url, queue]
    elif variant.startswith("floor-rq"):
        floor = [PYTHON, "-m", "bench.supervisor_floor"]
        if variant == "floor-rq-stdlib":
            floor.append("--stdlib")
        else:  # what workerkit's CLI imports before it forks its worker, less its own
            from workerkit.supervisor.forked import SHARED_IMPORTS

            shared = [name for name in SHARED_IMPORTS if not name.startswith("workerkit")]
            floor += ["--share", ",".join(shared)]
        argv = [*floor, "--", "worker", "--url", redis_url, queue]
    else:
        argv = [
            PYTHON, "-m", "celery", "-A", "bench.startup_celery_app", "worker", "--pool", "solo",
            "-Q", queue, "-n", f"bare{index}@%h", "-l", "INFO",
        ]  # fmt: skip
    return argv, env, port, queue


def run_one(
    variant: str, tmp: Path, redis_url: str, db_url: str, index: int, settle: float, idle: float
) -> dict[str, Any]:
    import redis

    argv, env, port, queue = _argv_env(variant, tmp, redis_url, db_url, index)
    proc = Proc(argv, log_path=tmp / f"{variant}-{index}.log", env=env)
    client = redis.Redis.from_url(redis_url)
    if port is not None:
        ready = lambda: http_status(port, "/readyz", timeout=0.5) == 200  # noqa: E731
    elif variant in ("bare-rq", "floor-rq", "floor-rq-stdlib"):
        ready = lambda: client.scard(f"rq:workers:{queue}") > 0  # noqa: E731
    else:
        ready = lambda: " ready." in proc.log_text(100_000)  # noqa: E731
    try:
        wait_for(ready, timeout=READY_TIMEOUT, what=f"{variant} ready", proc=proc)
        ready_after = time.monotonic() - proc.started
        time.sleep(settle)
        children = descendants(proc.pid)
        result = {
            "start_to_ready": ready_after,
            "rss_main_kib": rss_kib(proc.pid),
            "pss_main_kib": pss_kib(proc.pid),
            "rss_children_kib": sum(rss_kib(pid) or 0 for pid in children),
            "pss_children_kib": sum(pss_kib(pid) or 0 for pid in children),
            "children": len(children),
        }
        result["pss_tree_kib"] = (result["pss_main_kib"] or 0) + result["pss_children_kib"]
        if idle > 0:
            main_ms, children_ms = idle_cpu(proc.pid, idle)
            result |= {
                "idle_cpu_main_ms_s": main_ms,
                "idle_cpu_children_ms_s": children_ms,
                "idle_cpu_tree_ms_s": main_ms + children_ms,
            }
        proc.stop(signal.SIGTERM, timeout=30)
    finally:
        proc.stop(signal.SIGKILL)
        client.close()
    return result


def _med(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [float(r[key]) for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def _spread(rows: list[dict[str, Any]], key: str, scale: float, digits: int) -> str:
    s = summary([float(r[key]) * scale for r in rows if r.get(key) is not None])
    if not s.get("n"):
        return "-"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def ratios(samples: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, list[float]]]:
    """Same-round comparisons with the bare engine: start -> ready difference (s) and the
    memory ratio (workerkit supervisor + worker) / (bare worker), RSS."""
    out: dict[str, dict[str, list[float]]] = {}
    for variant, bare in BARE.items():
        deltas, mem, pss, cpu = [], [], [], []
        for wk, ref in zip(samples.get(variant, []), samples.get(bare, []), strict=False):
            deltas.append(wk["start_to_ready"] - ref["start_to_ready"])
            ref_total = (ref["rss_main_kib"] or 0) + ref["rss_children_kib"]
            mem.append(((wk["rss_main_kib"] or 0) + wk["rss_children_kib"]) / ref_total)
            if wk.get("pss_tree_kib") and ref.get("pss_tree_kib"):
                pss.append(wk["pss_tree_kib"] / ref["pss_tree_kib"])
            if "idle_cpu_tree_ms_s" in wk and "idle_cpu_tree_ms_s" in ref:
                cpu.append(wk["idle_cpu_tree_ms_s"] - ref["idle_cpu_tree_ms_s"])
        out[variant] = {
            "ready_delta_s": deltas,
            "rss_total_ratio": mem,
            "pss_tree_ratio": pss,
            "idle_cpu_delta_ms_s": cpu,
        }
    return out


def fork_vs_exec(samples: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, list[float]]]:
    """Same-round comparisons of the forked early worker with the exec'd one: start -> ready
    difference (s) and the ratio of the trees' summed PSS."""
    out: dict[str, dict[str, list[float]]] = {}
    for variant in EXEC:
        forked = variant.removesuffix("-exec")
        deltas, pss = [], []
        for fk, ex in zip(samples.get(forked, []), samples.get(variant, []), strict=False):
            deltas.append(fk["start_to_ready"] - ex["start_to_ready"])
            pss.append(fk["pss_tree_kib"] / ex["pss_tree_kib"])
        if deltas:
            out[forked] = {"ready_delta_s": deltas, "pss_tree_ratio": pss}
    return out


def table(label: str, run: dict[str, Any]) -> list[str]:
    samples = run["samples"]
    mib = 1 / 1024
    lines = [
        f"### {label}: `{run['command']}`",
        "",
        machine_markdown(run["machine"]),
        (
            f"Rounds: {run['rounds']}, interleaved; median (min-max). Memory in MiB after "
            f"{run['settle']:g} s idle."
        ),
        "",
        (
            "| variant | start -> ready (s) | main RSS | main PSS | child(ren) RSS | "
            "child(ren) PSS | tree PSS |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for variant, rows in samples.items():
        if not rows:
            continue
        lines.append(
            f"| {variant} | {_spread(rows, 'start_to_ready', 1, 2)} | "
            f"{_spread(rows, 'rss_main_kib', mib, 1)} | {_spread(rows, 'pss_main_kib', mib, 1)} | "
            f"{_spread(rows, 'rss_children_kib', mib, 1)} | "
            f"{_spread(rows, 'pss_children_kib', mib, 1)} | "
            f"{_spread(rows, 'pss_tree_kib', mib, 1)} |"
        )
    lines += [
        "",
        "Same-round comparisons with the bare engine (median (min-max)):",
        "",
        (
            "| variant | ready - bare ready (s) | (supervisor + worker) / bare, RSS | "
            "(supervisor + worker) / bare, PSS summed over each tree |"
        ),
        "|---|---|---|---|",
    ]
    for variant, values in run["same_round"].items():
        if not values["ready_delta_s"]:
            continue
        cells = []
        for key in ("ready_delta_s", "rss_total_ratio", "pss_tree_ratio"):
            if not values.get(key):
                cells.append("-")
                continue
            s = summary(values[key])
            low, high = fmt(s["min"], "", 2), fmt(s["max"], "", 2)
            cells.append(f"{fmt(s['median'], '', 2)} ({low}-{high})")
        lines.append(f"| {variant} | {' | '.join(cells)} |")
    if any("idle_cpu_tree_ms_s" in r for rows in samples.values() for r in rows):
        lines += [
            "",
            (
                f"Idle CPU, milliseconds per second over {run.get('idle', 0):g} s (1 ms/s is "
                "0.1% of a core; scheduler run time of every thread):"
            ),
            "",
            "| variant | main process | its children | tree | tree - bare, same round |",
            "|---|---|---|---|---|",
        ]
        for variant, rows in samples.items():
            if not any("idle_cpu_tree_ms_s" in r for r in rows):
                continue
            deltas = run["same_round"].get(variant, {}).get("idle_cpu_delta_ms_s") or []
            delta = "-"
            if deltas:
                s = summary(deltas)
                delta = f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"
            lines.append(
                f"| {variant} | {_spread(rows, 'idle_cpu_main_ms_s', 1, 2)} | "
                f"{_spread(rows, 'idle_cpu_children_ms_s', 1, 2)} | "
                f"{_spread(rows, 'idle_cpu_tree_ms_s', 1, 2)} | {delta} |"
            )
    forks = run.get("fork_vs_exec") or {}
    if forks:
        lines += [
            "",
            (
                "The early worker forked from the CLI against exec'd "
                "(`WORKERKIT_FORK_WORKER=0`), same round:"
            ),
            "",
            "| variant | ready - exec'd ready (s) | tree PSS / exec'd tree PSS |",
            "|---|---|---|",
        ]
        for variant, values in forks.items():
            cells = []
            for key in ("ready_delta_s", "pss_tree_ratio"):
                s = summary(values[key])
                low, high = fmt(s["min"], "", 2), fmt(s["max"], "", 2)
                cells.append(f"{fmt(s['median'], '', 2)} ({low}-{high})")
            lines.append(f"| {variant} | {' | '.join(cells)} |")
    return [*lines, ""]


def report(runs: dict[str, Any]) -> str:
    lines = [
        "# bench/startup_memory.py: start -> ready and resident memory (issue 16, item 5)",
        "",
        (
            "Goals: supervisor RSS <= 40 MiB on every engine; start -> ready <= the bare engine's "
            "+ 0.2 s (sql: <= 0.5 s). The machine is shared (2 cores, other engineers' test "
            "suites running): RSS and PSS are steady from run to run, start -> ready is CPU time "
            "under contention and swings with the load (read the same-round differences)."
        ),
        "",
    ]
    for label, run in runs.items():
        lines += table(label, run)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--settle", type=float, default=1.0, help="idle seconds before memory")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle CPU measured")
    parser.add_argument("--only", default="", help="comma-separated variants")
    parser.add_argument("--label", default="latest", help="name of this run in the results")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    variants = [v for v in VARIANTS if not args.only or v in args.only.split(",")]
    info = machine()
    samples: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="workerkit-bench-") as tmp_name, redis_server() as rs:
        tmp = Path(tmp_name)
        db_url = f"sqlite:///{tmp / 'startup.sqlite3'}"
        subprocess.run(
            [*WORKERKIT, "db", "upgrade"],
            env=child_env(WORKERKIT_DATABASE_URL=db_url),
            check=True,
            capture_output=True,
        )
        for index in range(args.rounds):
            line = [f"round {index + 1}:"]
            for variant in variants:
                result = run_one(variant, tmp, rs.url(), db_url, index, args.settle, args.idle)
                samples[variant].append(result)
                line.append(
                    f"{variant} {result['start_to_ready']:.2f}s "
                    f"{(result['rss_main_kib'] or 0) / 1024:.1f}+"
                    f"{result['rss_children_kib'] / 1024:.1f}MiB"
                )
            print("  ".join(line), flush=True)
    info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    run = {
        "command": command_line("bench.startup_memory"),
        "machine": info,
        "rounds": args.rounds,
        "settle": args.settle,
        "idle": args.idle,
        "duration_s": round(time.monotonic() - started, 1),
        "summary": {
            v: {k: summary([float(r[k]) for r in rows if r.get(k) is not None]) for k in rows[0]}
            for v, rows in samples.items()
            if rows
        },
        "same_round": ratios(samples),
        "fork_vs_exec": fork_vs_exec(samples),
        "samples": samples,
    }
    runs: dict[str, Any] = {}
    previous = RESULTS / "startup_memory.json"
    if not args.no_record and previous.exists():
        with contextlib.suppress(ValueError, KeyError):
            runs = dict(json.loads(previous.read_text())["runs"])
    runs[args.label] = run
    text = report(runs)
    print(text)
    if not args.no_record:
        paths = write_results("startup_memory", {"runs": runs}, text)
        print("recorded:", *paths)


if __name__ == "__main__":
    main()
