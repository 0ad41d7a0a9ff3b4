"""The fault suite's shared parts (tests/faults): three pods of one engine, a load of journaled
jobs, and the verdict read from the jobs' own records (tests/apps/fault_jobs.py).

A scenario enqueues its jobs (ids with its own prefix), waits until the load is under way,
injects its fault, waits until the engine holds none of its jobs any more, and then checks every
job: completed exactly once (or failed with a reason, for poison), never two runs at once.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import redis

from tests.support.harness import Supervisor, process_state
from tests.support.servers import PostgresServer, RedisServer, start_postgres, start_redis
from workerkit.supervisor.process import descendants

__all__ = (
    "LONGS",
    "SHORTS",
    "Databases",
    "Engine",
    "Load",
    "Once",
    "Pods",
    "Run",
    "alive",
    "kill_tree",
    "problems",
    "restart_postgres_during",
    "restart_redis_during",
    "running_long_jobs",
    "runs_of",
    "wait_for",
)

#: Per scenario: short jobs (a quarter idempotent) and longer checkpointed ones.
SHORTS = 120
LONGS = 6
SHORT_SECONDS = 0.02
LONG_STEPS = 12
LONG_STEP_SECONDS = 0.25

Once = Literal["exactly", "at least", "at most"]


@dataclass
class Run:
    """One run of one job, as the job journaled it."""

    job_id: str
    attempt: int
    pid: int
    begin: float
    last: float
    ended: bool = False


def runs_of(lines: Iterable[str]) -> dict[str, list[Run]]:
    """Every job's runs, in the order they began. A run is open from its ``begin`` until its
    ``end``; its ``last`` is the time of its last mark (a killed or fenced run has no end)."""
    runs: dict[str, list[Run]] = {}
    open_runs: dict[tuple[str, int], Run] = {}
    for line in lines:
        parts = line.split()
        if len(parts) != 5 or parts[0] not in ("begin", "step", "end"):
            continue
        kind, job_id, value, pid, at = parts[0], parts[1], parts[2], int(parts[3]), float(parts[4])
        key = (job_id, pid)
        if kind == "begin":
            run = Run(job_id, int(value), pid, at, at)
            open_runs[key] = run
            runs.setdefault(job_id, []).append(run)
            continue
        current = open_runs.get(key)
        if current is None:
            continue
        current.last = at
        if kind == "end":
            current.ended = True
            del open_runs[key]
    for job_runs in runs.values():
        job_runs.sort(key=lambda r: r.begin)
    return runs


def problems(
    runs: Mapping[str, list[Run]],
    expected: Iterable[str],
    *,
    failed: Iterable[str] = (),
    once: Once = "exactly",
    killed: Iterable[int] = (),
    killed_at: float | None = None,
) -> list[str]:
    """What is wrong with ``expected`` jobs, one line each (empty: all is well).

    Each job completed ``once``: "exactly" once, "at least" once (a redelivery that may repeat
    a run) or "at most" once (what a broker that lost its data still held); those in ``failed``
    never completed. A run in a process the test ``killed`` (by pid), or one that ended in the
    2 s before ``killed_at`` (a work horse that had exited, its worker not done with its
    bookkeeping), may be followed by one more: killed between its last line and its
    acknowledgement, it never settled, and no engine can tell it from one killed a moment
    earlier. No two runs of one job overlapped in time, whatever ``once`` says.
    """
    failed = set(failed)
    killed = set(killed)

    def cut_short(run: Run) -> bool:
        return run.pid in killed or (killed_at is not None and 0 <= killed_at - run.last <= 2.0)

    found: list[str] = []
    for job_id in expected:
        job_runs = runs.get(job_id, [])
        ended = [run for run in job_runs if run.ended]
        settled = [run for run in ended if not cut_short(run)]
        completions = len(settled) if settled else len(ended[:1])
        if job_id in failed:
            if completions:
                found.append(f"{job_id}: expected to fail, completed {completions} time(s)")
        elif completions == 0 and once != "at most":
            found.append(f"{job_id}: never completed ({len(job_runs)} run(s))")
        elif completions > 1 and once != "at least":
            found.append(f"{job_id}: completed {completions} times: {job_runs}")
        for first, second in itertools.pairwise(job_runs):
            if second.begin < first.last:
                found.append(f"{job_id}: two runs overlapped: {first} and {second}")
    return found


class Engine(Protocol):
    """What a scenario needs from one engine's test module."""

    def enqueue(self, jobs: list[tuple[str, str, tuple[object, ...]]]) -> None:
        """Enqueue each (task, job id, arguments)."""
        ...

    def busy(self, ids: list[str]) -> list[str]:
        """Those of ``ids`` the engine still holds (queued, running, unacknowledged)."""
        ...

    def stuck(self, ids: list[str]) -> list[str]:
        """Those of ``ids`` left marked as started or running once all is settled."""
        ...


@dataclass
class Load:
    """One scenario's jobs: ``SHORTS`` short ones (every fourth idempotent), ``LONGS`` long."""

    engine: Engine
    prefix: str
    journal: Path
    shorts: int = SHORTS
    longs: int = LONGS
    long_steps: int = LONG_STEPS
    gates: int = 0
    ticks: int = 0
    ids: list[str] = field(default_factory=list)

    def enqueue(self, *, batch: str = "", longs_last: bool = False) -> list[str]:
        """Enqueue the gate jobs, then the short ones with the long ones spread among them (or
        after them: ``longs_last``); the ids (also kept in ``ids``)."""
        gates: list[tuple[str, str, tuple[object, ...]]] = []
        for n in range(self.gates):
            job_id = f"{self.prefix}-gate{batch}-{n}"
            gates.append(("gate", job_id, (job_id, str(self.gate))))
        longs: list[tuple[str, str, tuple[object, ...]]] = []
        for n in range(self.longs):
            job_id = f"{self.prefix}-long{batch}-{n}"
            longs.append(("long", job_id, (job_id, self.long_steps, LONG_STEP_SECONDS)))
        for n in range(self.ticks):
            job_id = f"{self.prefix}-tick{batch}-{n}"
            longs.append(("tick", job_id, (job_id, self.long_steps, LONG_STEP_SECONDS)))
        shorts: list[tuple[str, str, tuple[object, ...]]] = []
        every = max(1, self.shorts // max(1, self.longs))
        for n in range(self.shorts):
            if not longs_last and n % every == 0 and longs:
                shorts.append(longs.pop(0))
            task = "idem" if n % 4 == 0 else "short"
            job_id = f"{self.prefix}-{task}{batch}-{n}"
            shorts.append((task, job_id, (job_id, SHORT_SECONDS)))
        jobs = [*gates, *shorts, *longs]
        self.engine.enqueue(jobs)
        ids = [job_id for _, job_id, _ in jobs]
        self.ids.extend(ids)
        return ids

    @property
    def gate(self) -> Path:
        """The file that ends the gate jobs (tests/apps/fault_jobs.py ``gate_body``)."""
        return self.journal.parent / f"{self.prefix}.gate"

    def open_gate(self) -> None:
        self.gate.touch()

    def lines(self) -> list[str]:
        try:
            return self.journal.read_text().splitlines()
        except FileNotFoundError:
            return []

    def runs(self) -> dict[str, list[Run]]:
        return {k: v for k, v in runs_of(self.lines()).items() if k.startswith(self.prefix)}

    def quiet(self, seconds: float = 1.0) -> bool:
        """No job of this load journaled anything for ``seconds``: no run is still going (a
        stale run whose broker entry another worker's ack removed would still be marking)."""
        last = max((run.last for runs in self.runs().values() for run in runs), default=0.0)
        return time.time() - last > seconds

    def ended(self) -> int:
        return sum(any(run.ended for run in runs) for runs in self.runs().values())

    def wait_under_way(
        self, ended: int | None = None, *, long_running: bool = False, timeout: float = 30.0
    ) -> None:
        """Until ``ended`` jobs completed (default a third) and every long, tick and gate job
        began; with ``long_running``, also until a long job is running (none ended yet)."""
        want = len(self.ids) // 3 if ended is None else ended
        longs = [job_id for job_id in self.ids if not _is_short(job_id)]

        def under_way() -> bool:
            runs = self.runs()
            if long_running and not any(
                "-long" in job_id and not any(run.ended for run in job_runs)
                for job_id, job_runs in runs.items()
            ):
                return False
            return self.ended() >= want and all(job_id in runs for job_id in longs)

        wait_for(under_way, timeout=timeout, what=f"{want} jobs done and the long ones begun")

    def wait_settled(
        self,
        *,
        failed: Iterable[str] = (),
        timeout: float = 40.0,
    ) -> None:
        """Until the engine holds none of the jobs and each one completed (or is ``failed``).

        Fails early when the engine has held none of them for 3 s while some never completed:
        those are lost, and waiting longer would not bring them back.
        """
        failed = set(failed)
        idle_since: list[float] = []

        def missing() -> list[str]:
            runs = self.runs()
            return [
                job_id
                for job_id in self.ids
                if job_id not in failed and not any(run.ended for run in runs.get(job_id, []))
            ]

        def settled() -> bool:
            if self.engine.busy(self.ids):
                idle_since.clear()
                return False
            lost = missing()
            if not lost:
                return self.quiet()
            idle_since.append(time.monotonic())
            if idle_since[-1] - idle_since[0] > 3.0:
                where = getattr(self.engine, "locate", None)
                seen = where(lost) if where else {}
                raise AssertionError(
                    f"lost (never completed, not held by the engine): {lost}; in the broker: {seen}"
                )
            return False

        try:
            wait_for(settled, timeout=timeout, what="every job settled")
        except AssertionError as exc:
            busy = self.engine.busy(self.ids)
            raise AssertionError(f"{exc}; still held: {busy[:10]} ({len(busy)})") from None

    def check(
        self,
        *,
        failed: Iterable[str] = (),
        once: Once = "exactly",
        killed: Iterable[int] = (),
        killed_at: float | None = None,
    ) -> None:
        """The verdict: every job's own records, and nothing left started in the engine."""
        found = problems(
            self.runs(), self.ids, failed=failed, once=once, killed=killed, killed_at=killed_at
        )
        stuck = self.engine.stuck(self.ids)
        if stuck:
            found.append(f"left started: {stuck}")
        assert not found, "\n".join(found[:20]) + f"\n({len(found)} problem(s))"


def _is_short(job_id: str) -> bool:
    return "-short" in job_id or "-idem" in job_id


def wait_for(predicate: Callable[[], object], *, timeout: float, what: str) -> None:
    """Poll every 0.1 s (the journal grows to thousands of lines: a lighter poll than the
    harness's) until ``predicate()`` is truthy; fail saying what did not happen."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.1)


def running_long_jobs(
    load: Load, pods: Pods, kind: str = "-long"
) -> tuple[Supervisor, int, list[str]]:
    """A pod whose worker (or one of its children) runs a job of ``kind`` of ``load`` now: the
    pod, its worker's pid and the long jobs it runs."""
    for pod in pods:
        tree = set(Pods.tree(pod))
        held = [
            runs[-1].job_id
            for runs in load.runs().values()
            if not _is_short(runs[-1].job_id) and not runs[-1].ended and runs[-1].pid in tree
        ]
        if any(kind in job_id for job_id in held):
            return pod, Pods.worker_pid(pod), held
    raise AssertionError(f"no pod runs a {kind[1:]} job")


def restart_redis_during(
    server: RedisServer, load: Load, *, down_for: float, lose_data: bool = False
) -> RedisServer:
    """:func:`~tests.support.servers.restart_redis`, ending ``load``'s gate jobs while Redis is
    down; with ``lose_data``, Redis comes back empty (no persistence, or a new disk)."""
    server.process.stop()
    load.open_gate()
    if lose_data:
        for name in ("appendonlydir", "appendonly.aof", "dump.rdb"):
            path = server.directory / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    time.sleep(down_for)
    return start_redis(port=server.port, directory=server.directory, appendonly=True)


def restart_postgres_during(
    server: PostgresServer, load: Load, *, down_for: float
) -> PostgresServer:
    """:func:`~tests.support.servers.restart_postgres`, ending ``load``'s gate jobs while
    PostgreSQL is down: jobs that finish during the outage."""
    server.process.stop()
    load.open_gate()
    time.sleep(down_for)
    return start_postgres(port=server.port, directory=server.directory)


def kill_tree(pids: Iterable[int]) -> None:
    """SIGKILL each pid (ours: supervisors, workers, their children), ignoring the gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    return process_state(pid) not in (None, "Z")


class Databases:
    """A Redis database number of its own for each scenario of a module (1 to 15, then round
    again; flushed before use): what a scenario leaves held (an unacknowledged message, a job
    left started) is never seen by the next one. The pods are restarted on it (:meth:`Pods.fresh`).

    ``holder`` is the module's one-item server list (a restart replaces the server in it).
    """

    def __init__(self, holder: list[RedisServer]) -> None:
        self.holder = holder
        self._numbers = itertools.cycle(range(1, 16))
        self.number = 0
        self.used = False  # a scenario ran on ``number``

    def url(self) -> str:
        return self.holder[0].url(self.number)

    def next(self) -> str:
        """The next database, emptied: its URL."""
        self.number = next(self._numbers)
        self.used = False
        with redis.Redis.from_url(self.url()) as client:
            client.flushdb()
        return self.url()


class Pods:
    """Three ``workerkit run ENGINE`` supervisors sharing one queue, replaced when one exits.

    ``start(name)`` starts one (a harness function). A scenario that leaves processes behind (a
    worker orphaned by its supervisor's SIGKILL) lists their pids in ``orphans``; they are
    killed by pid before the next scenario and at the end.
    """

    def __init__(self, start: Callable[[str], Supervisor], count: int = 3) -> None:
        self._start = start
        self._started = 0
        self.orphans: list[int] = []
        self.pods: list[Supervisor] = []
        for _ in range(count):
            self.pods.append(self._new())

    def _new(self) -> Supervisor:
        self._started += 1
        return self._start(f"pod{self._started}")

    def __iter__(self) -> Iterator[Supervisor]:
        return iter(self.pods)

    def fresh(self, databases: Databases) -> None:
        """Before a scenario: a database of its own, and every pod started on it (``start``
        reads the URL when it is called); the first scenario gets the pods the module started."""
        if databases.used:
            self.stop_all()
            self.orphans.clear()
            databases.next()
            self.pods = [self._new() for _ in self.pods]
        databases.used = True
        self.ensure()

    def ensure(self) -> None:
        """Orphans gone; every pod running and ready (one that exited is replaced)."""
        kill_tree(self.orphans)
        self.orphans.clear()
        for index, pod in enumerate(self.pods):
            if pod.proc.poll() is not None:
                pod.stop()
                self.pods[index] = self._new()
        for pod in self.pods:
            pod.wait_ready(timeout=40)

    @staticmethod
    def worker_pid(pod: Supervisor) -> int:
        """The pid of the pod's current engine worker (the last one it started)."""
        pod.wait_event("worker_started", timeout=30)
        return int(pod.events_named("worker_started")[-1]["pid"])

    @staticmethod
    def tree(pod: Supervisor) -> list[int]:
        """The pod's processes: its supervisor, then every descendant."""
        return [pod.pid, *descendants(pod.pid)]

    def stop_all(self) -> None:
        for pod in self.pods:
            if pod.proc.poll() is None:
                pod.signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for pod in self.pods:
            with contextlib.suppress(Exception):
                pod.proc.wait(max(0.1, deadline - time.monotonic()))
        for pod in self.pods:
            pod.stop()
        kill_tree(pid for pid in self.orphans if alive(pid))
