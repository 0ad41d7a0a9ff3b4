"""Where RQ's forking worker takes its page faults, by section: ``workerkit run rq`` against bare
``rq worker`` (issue 16).

Run from the repository root (needs redis-server on PATH)::

    .venv/bin/python -m bench.rq_faults [-k 1000] [--rounds 3]

On this machine a minor page fault costs ~2.5-3.5 us of the faulting process's kernel time.
After each fork, the first write to each page faults, in the work horse (a copy) and in the
worker (the page made writable again). Faults are most of the CPU by which the forking worker
trails bare RQ (bench/README.md, tenth and thirteenth rounds). This script says where they
come from: each round runs bare ``rq worker`` (RQ's defaults) and ``workerkit run rq
--worker-class forking`` (default settings, JSON lines at INFO to a file) one after the other,
each on K no-op jobs. ``bench/fault_probe/sitecustomize.py`` counts the faults inside the
worker's methods and at milestones in each horse. Per job, medians of the rounds; the horses'
figures are the median horse of each round, skipping the first tenth. Page-fault counts move
little with the machine's load, unlike CPU time. Results go to bench/results/rq_faults.{md,json}
unless ``--no-record``.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import _counter, rq_noop
from bench._common import (
    PYTHON,
    REPO,
    WORKERKIT,
    Proc,
    child_env,
    command_line,
    machine,
    machine_markdown,
    redis_server,
    wait_for,
    write_results,
)

PROBE = REPO / "bench" / "fault_probe"
KINDS = ("bare", "wk")

#: Rows of the worker's table: (label, method per kind; None: the kind has no such method).
WORKER_ROWS = (
    ("dequeue (`dequeue_job_and_maintain_ttl`)", "dequeue_job_and_maintain_ttl", "same"),
    ("`check_for_suspension`", "check_for_suspension", "same"),
    ("`execute_job`, all of it", "execute_job", "same"),
    ("- the attempt's start", "prepare_execution", "_wk_begin"),
    ("- `fork_work_horse` (the parent's side)", "fork_work_horse", "same"),
    ("- `monitor_work_horse`", "monitor_work_horse", "same"),
    ("- the attempt's end (its INFO line, the channel)", None, "_wk_end"),
    ("- back to idle (`_wk_idle`)", None, "_wk_idle"),
)


def _horse_sections(line: dict[str, int]) -> dict[str, int]:
    return {
        "fork -> first statement": line["first"],
        "first statement -> main_work_horse": line["main"] - line["first"],
        "perform_job": line["perform_job"],
        "after perform_job (to os._exit)": line["total"] - line["main"] - line["perform_job"],
        "all": line["total"],
    }


def one_run(kind: str, k: int, redis_url: str, client: Any, tmp: Path) -> dict[str, Any]:
    """K jobs through one worker of ``kind``; its faults per job, by section."""
    from rq import Queue
    from rq.serializers import JSONSerializer

    from tests.support.servers import free_port

    out = Path(tempfile.mkdtemp(dir=tmp, prefix=f"{kind}-"))
    client.flushall()
    queue = Queue(
        rq_noop.QUEUE, connection=client, serializer=JSONSerializer if kind == "wk" else None
    )
    for start in range(0, k, 500):
        batch = min(500, k - start)
        queue.enqueue_many([Queue.prepare_data(rq_noop.noop, args=(k,)) for _ in range(batch)])
    env = child_env(RQ_FAULTS_DIR=str(out), RQ_FAULTS_KIND=kind, **{_counter.URL_ENV: redis_url})
    env["PYTHONPATH"] = f"{PROBE}:{env['PYTHONPATH']}"
    if kind == "wk":
        env.update(
            WORKERKIT_APP="bench.rq_noop:app",
            WORKERKIT_REDIS_URL=redis_url,
            WORKERKIT_QUEUES=rq_noop.QUEUE,
            WORKERKIT_HTTP_HOST="127.0.0.1",
            WORKERKIT_HTTP_PORT=str(free_port()),
            WORKERKIT_LOG_FORMAT="json",
        )
        argv = [*WORKERKIT, "run", "rq", "--worker-class", "forking"]
    else:
        argv = [PYTHON, "-m", "rq.cli", "worker", "--worker-class", "rq.worker.Worker"]
        argv += ["--url", redis_url, rq_noop.QUEUE]

    def all_done() -> bool:
        return int(client.get(_counter.COUNTER) or 0) >= k

    proc = Proc(argv, log_path=out / "worker.log", env=env)
    try:
        wait_for(all_done, timeout=600, what=f"{kind}: {k} jobs", proc=proc)
        proc.stop(signal.SIGTERM, timeout=30)
    finally:
        proc.stop(signal.SIGKILL)
    worker = json.loads((out / "worker.json").read_text())
    jobs = worker["calls"]["execute_job"]
    horses = [json.loads(line) for line in (out / "horses.jsonl").read_text().splitlines()]
    horses = horses[len(horses) // 10 :]
    sections = [_horse_sections(line) for line in horses]
    return {
        "jobs": jobs,
        "worker": {name: n / jobs for name, n in worker["faults"].items()},
        "horse": {name: statistics.median(s[name] for s in sections) for name in sections[0]},
    }


def report(runs: dict[str, list[dict[str, Any]]]) -> str:
    def median(kind: str, part: str, name: str | None) -> float | None:
        if name is None:
            return None
        values = [run[part].get(name) for run in runs[kind]]
        present = [v for v in values if v is not None]
        return statistics.median(present) if present else None

    def cells(bare: float | None, ours: float | None) -> str:
        shown = [f"{v:.0f}" if v is not None else "-" for v in (bare, ours)]
        more = (ours or 0) - (bare or 0)
        return f"{shown[0]} | {shown[1]} | {more:+.0f}"

    lines = [
        "| the worker process, per job | bare RQ | workerkit | workerkit - bare |",
        "|---|---|---|---|",
    ]
    for label, bare_name, ours_name in WORKER_ROWS:
        method = bare_name if ours_name == "same" else ours_name
        lines.append(
            f"| {label} | "
            f"{cells(median('bare', 'worker', bare_name), median('wk', 'worker', method))} |"
        )
    loop = ("dequeue_job_and_maintain_ttl", "check_for_suspension", "execute_job")
    bare_loop, ours_loop = (
        sum(median(kind, "worker", name) or 0 for name in loop) for kind in KINDS
    )
    lines.append(f"| the worker's loop, all (the three above) | {cells(bare_loop, ours_loop)} |")
    lines += ["", "| each work horse | bare RQ | workerkit | workerkit - bare |"]
    lines.append("|---|---|---|---|")
    for name in _horse_sections({"first": 0, "main": 0, "perform_job": 0, "total": 0}):
        lines.append(
            f"| {name} | {cells(median('bare', 'horse', name), median('wk', 'horse', name))} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", "--jobs", type=int, default=1000, help="jobs per run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (bare, then workerkit)")
    parser.add_argument("--no-record", action="store_true", help="print, do not write results")
    args = parser.parse_args()
    info = machine()
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    with redis_server() as redis, tempfile.TemporaryDirectory() as tmp:
        import redis as redis_py

        client = redis_py.Redis.from_url(redis.url())
        for round_ in range(args.rounds):
            for kind in KINDS:
                runs[kind].append(one_run(kind, args.jobs, redis.url(), client, Path(tmp)))
                print(f"round {round_ + 1} {kind}: {runs[kind][-1]}", file=sys.stderr)
    tables = report(runs)
    markdown = (
        "# RQ's forking worker: minor page faults per job, by section\n\n"
        f"### latest: `{command_line('bench.rq_faults')}`\n\n"
        f"{machine_markdown(info)}\n"
        f"K = {args.jobs} no-op jobs per run, {args.rounds} rounds; medians of the rounds "
        "(bench/rq_faults.py). Sections nest: the rows under `execute_job` are parts of it.\n\n"
        f"{tables}"
    )
    print(markdown)
    if not args.no_record:
        data = {"command": command_line("bench.rq_faults"), "machine": info, "runs": runs}
        for path in write_results("rq_faults", data, markdown):
            print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
