"""RQ's forking worker: ``workerkit run rq`` against bare ``rq worker``, both alive at once,
taking turns in short windows (issue 16).

Run from the repository root (needs redis-server on PATH)::

    .venv/bin/python -m bench.rq_fork [--windows 20] [--window 3] [--a bare] [--b .]

``bench.throughput`` runs one variant after the other, ~7 s apart, and this machine's speed
moves that much between two runs: its same-round ratios for the forking pair spread 0.78-1.00.
Here both workers start once, each on its own queue of no-op jobs, and take turns: one works
for ``--window`` seconds while the other is frozen (SIGSTOP on every process of its tree,
SIGCONT to resume; 0.3 s after each resume are not counted, for the job a freeze cut in two).
The ratio of each pair of adjacent windows compares runs made within a few seconds of each
other, and the order within a pair alternates.

For each window: the jobs done (the shared counter of ``bench._counter``), and from
``/proc/PID/stat`` the CPU (user and system apart) and minor page faults of the supervisor, the
worker's own process and its reaped work horses, per job, and the CPU of workerkit's lease guard
(the worker's child that lives as long as it does). Kernel time was where the forking worker's
gap was (bench/README.md, "eleventh round").

``--a`` and ``--b`` are ``bare`` (``rq worker --worker-class rq.worker.Worker``, RQ's defaults:
pickle, its INFO lines to a file) or a workerkit checkout (``.``: this one; another path runs
that tree's ``workerkit run rq --worker-class forking``, default settings, JSON lines at INFO to
a file): two checkouts compare a change with the same method. Results go to
bench/results/rq_fork.{md,json} unless ``--no-record``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import _counter, rq_noop
from bench._common import (
    PYTHON,
    REPO,
    Proc,
    child_env,
    command_line,
    descendants,
    machine,
    machine_markdown,
    redis_server,
    write_results,
)

#: After a resume, not counted: the job a freeze cut in two finishes, the cycle warms up.
SETTLE = 0.3
#: Jobs queued per worker: enough for every window at this rate of jobs per second, and more.
RATE_CEILING = 150
TICK = os.sysconf("SC_CLK_TCK")
PARTS = ("supervisor", "worker_user", "worker_sys", "horses_user", "horses_sys", "guard")


def _tree(pid: int) -> list[int]:
    """``pid`` and every live descendant, parents first."""
    return [pid, *descendants(pid)]


def _signal_tree(pid: int, signum: int) -> None:
    """``signum`` to ``pid`` first, then to its descendants: looked up three times, so that a
    work horse forked just before its parent stopped is not missed."""
    done: set[int] = set()
    for _ in range(3):
        for each in _tree(pid):
            if each not in done:
                done.add(each)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(each, signum)


def _stat(pid: int | None) -> list[float]:
    """utime, stime, cutime, cstime (seconds), minflt, cminflt of ``pid``; zeros when gone."""
    if pid is None:
        return [0.0] * 6
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return [0.0] * 6
    fields = text[text.rfind(")") + 2 :].split()
    return [int(f) / TICK for f in fields[11:15]] + [float(fields[7]), float(fields[8])]


class Variant:
    """One worker of the comparison, on a queue of its own."""

    def __init__(self, spec: str, label: str, queue: str, redis_url: str, tmp: Path) -> None:
        self.bare = spec == "bare"
        self.root = None if self.bare else Path(spec).resolve()
        self.spec = "." if self.root == REPO else spec  # as the results show it
        self.label, self.queue = label, queue
        log = tmp / f"{label}.log"
        if self.bare:
            argv = [PYTHON, "-m", "rq.cli", "worker", "--worker-class", "rq.worker.Worker"]
            argv += ["--url", redis_url, queue]
            self.proc = Proc(argv, log_path=log, env=child_env(**{_counter.URL_ENV: redis_url}))
        else:
            from tests.support.servers import free_port

            assert self.root is not None
            env = child_env(
                WORKERKIT_APP="bench.rq_noop:app",
                WORKERKIT_REDIS_URL=redis_url,
                WORKERKIT_QUEUES=queue,
                WORKERKIT_HTTP_HOST="127.0.0.1",
                WORKERKIT_HTTP_PORT=str(free_port()),
                WORKERKIT_LOG_FORMAT="json",
                **{_counter.URL_ENV: redis_url},
            )
            # That tree's workerkit first; bench.* and tests.* from this one.
            env["PYTHONPATH"] = os.pathsep.join([str(self.root), env["PYTHONPATH"]])
            cli = "from workerkit.cli import main; main()"
            argv = [PYTHON, "-c", cli, "run", "rq", "--worker-class", "forking"]
            self.proc = Proc(argv, log_path=log, env=env, cwd=self.root)
        self.windows: list[dict[str, float]] = []

    def worker_pid(self) -> int | None:
        if self.bare:
            return self.proc.pid
        tree = _tree(self.proc.pid)
        return tree[1] if len(tree) > 1 else None

    def guard_pid(self) -> int | None:
        """The worker's lease guard (a child that lives as long as the worker), if any."""
        worker = self.worker_pid()
        for pid in _tree(worker)[1:] if worker is not None else []:
            with contextlib.suppress(OSError):
                if b"leaseguard.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
        return None

    def sample(self) -> list[float]:
        """The figures :meth:`record` subtracts: supervisor CPU, the worker's six fields, the
        lease guard's CPU (not reaped while the worker runs, so not among the worker's)."""
        supervisor = 0.0 if self.bare else sum(_stat(self.proc.pid)[:2])
        return [supervisor, *_stat(self.worker_pid()), sum(_stat(self.guard_pid())[:2])]

    def record(self, before: list[float], after: list[float], jobs: int, seconds: float) -> None:
        per = max(1, jobs)
        delta = [b - a for a, b in zip(before, after, strict=True)]
        self.windows.append(
            {
                "jobs_per_s": jobs / seconds,
                "supervisor": 1e3 * delta[0] / per,
                "worker_user": 1e3 * delta[1] / per,
                "worker_sys": 1e3 * delta[2] / per,
                "horses_user": 1e3 * delta[3] / per,
                "horses_sys": 1e3 * delta[4] / per,
                "worker_faults": delta[5] / per,
                "horse_faults": delta[6] / per,
                "guard": 1e3 * delta[7] / per,
            }
        )

    def median(self, key: str) -> float:
        return statistics.median(w[key] for w in self.windows)


def enqueue(client: Any, queue: str, jobs: int, *, json: bool) -> None:
    from rq import Queue
    from rq.serializers import JSONSerializer

    target = Queue(queue, connection=client, serializer=JSONSerializer if json else None)
    for start in range(0, jobs, 500):
        count = min(500, jobs - start)
        data = [Queue.prepare_data(rq_noop.noop, args=(10**9,)) for _ in range(count)]
        target.enqueue_many(data)


def run(windows: int, window: float, specs: tuple[str, str]) -> tuple[Variant, Variant]:
    import redis as redis_lib

    with tempfile.TemporaryDirectory() as tmp, redis_server() as server:
        url = server.url()
        client = redis_lib.Redis.from_url(url)
        jobs = int((windows + 1) * (window + SETTLE + 1) * RATE_CEILING)
        for spec, queue in zip(specs, ("a", "b"), strict=True):
            enqueue(client, queue, jobs, json=spec != "bare")

        def done() -> int:
            return int(client.get(_counter.COUNTER) or 0)

        a = Variant(specs[0], "a", "a", url, Path(tmp))
        b = Variant(specs[1], "b", "b", url, Path(tmp))
        try:
            for variant in (a, b):  # one at a time, the other frozen, until each has warmed up
                other = b if variant is a else a
                _signal_tree(other.proc.pid, signal.SIGSTOP)
                _signal_tree(variant.proc.pid, signal.SIGCONT)
                start = done()
                deadline = time.monotonic() + 60
                while done() < start + 100 or variant.worker_pid() is None:
                    if time.monotonic() > deadline or not variant.proc.alive():
                        log = variant.proc.log_text()
                        raise RuntimeError(f"{variant.spec}: no jobs done\n{log}")
                    time.sleep(0.05)
                _signal_tree(variant.proc.pid, signal.SIGSTOP)
            for index in range(windows):
                pair = (a, b) if index % 2 == 0 else (b, a)
                for variant in pair:
                    _signal_tree(variant.proc.pid, signal.SIGCONT)
                    time.sleep(SETTLE)
                    before, count, started = variant.sample(), done(), time.monotonic()
                    time.sleep(window)
                    after, jobs_done = variant.sample(), done() - count
                    seconds = time.monotonic() - started
                    _signal_tree(variant.proc.pid, signal.SIGSTOP)
                    variant.record(before, after, jobs_done, seconds)
                ratio = b.windows[-1]["jobs_per_s"] / max(1e-9, a.windows[-1]["jobs_per_s"])
                print(
                    f"window {index + 1}/{windows}: a {a.windows[-1]['jobs_per_s']:.1f}/s, "
                    f"b {b.windows[-1]['jobs_per_s']:.1f}/s, b/a {ratio:.3f}",
                    flush=True,
                )
        finally:
            for variant in (a, b):
                _signal_tree(variant.proc.pid, signal.SIGCONT)
                variant.proc.stop(signal.SIGKILL)
            client.close()
    return a, b


def _quartiles(values: list[float]) -> list[float]:
    return statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3


def report(a: Variant, b: Variant, args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    ratios = [
        wb["jobs_per_s"] / max(1e-9, wa["jobs_per_s"])
        for wa, wb in zip(a.windows, b.windows, strict=True)
    ]
    q1, median, q3 = _quartiles(ratios)
    info = machine()
    names = {"a": a.spec, "b": b.spec}
    lines = [
        "# RQ's forking worker: two workers taking turns in short windows\n",
        f"### latest: `{command_line('bench.rq_fork')}`\n",
        machine_markdown(info),
        (
            f"a = `{a.spec}`, b = `{b.spec}` (`bare`: `rq worker`, RQ's defaults; a path: that "
            "checkout's `workerkit run rq --worker-class forking`, default settings). "
            f"{len(ratios)} pairs of {args.window:g} s windows, the order alternating.\n"
        ),
        (
            f"**b / a, jobs per second, same pair: median {median:.3f}** (quartiles "
            f"{q1:.3f}-{q3:.3f}, min-max {min(ratios):.3f}-{max(ratios):.3f})\n"
        ),
        (
            "Per job, median of the windows (CPU in ms; the worker's own process and its "
            "reaped work horses apart):\n"
        ),
        (
            "| | jobs/s | supervisor | worker user | worker sys | horses user | horses sys | "
            "lease guard | CPU, all | worker faults | horse faults |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, variant in (("a", a), ("b", b)):
        total = statistics.median(sum(w[p] for p in PARTS) for w in variant.windows)
        cells = [f"{variant.median(p):.2f}" for p in PARTS]
        lines.append(
            f"| {label} | {variant.median('jobs_per_s'):.1f} | {' | '.join(cells)} | "
            f"{total:.2f} | {variant.median('worker_faults'):.0f} | "
            f"{variant.median('horse_faults'):.0f} |"
        )
    data = {
        "command": command_line("bench.rq_fork"),
        "machine": info,
        "variants": names,
        "window_s": args.window,
        "ratio_b_over_a": {"median": median, "q1": q1, "q3": q3, "all": ratios},
        "windows": {"a": a.windows, "b": b.windows},
    }
    return data, "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=20, help="pairs of windows")
    parser.add_argument("--window", type=float, default=3.0, help="seconds per window")
    parser.add_argument("--a", default="bare", help="bare, or a workerkit checkout")
    parser.add_argument("--b", default=".", help="bare, or a workerkit checkout (.: this one)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    a, b = run(args.windows, args.window, (args.a, args.b))
    data, markdown = report(a, b, args)
    print(markdown)
    if not args.no_record:
        for path in write_results("rq_fork", data, markdown):
            print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
