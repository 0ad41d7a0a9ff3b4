"""Running ``workerkit scheduler ENGINE`` for real: replicas, a worker, the runs they record.

A :class:`SchedCase` is one engine's scenario: its store, its records file, a worker
(``workerkit run ENGINE``) that runs what the scheduler enqueues, and scheduler replicas
(``workerkit scheduler ENGINE --app ...``), each a real process in a session of its own with
its own HTTP port. Who leads is read from each replica's ``/metrics``
(``workerkit_scheduler_leader``). SIGKILL of a replica kills its whole process tree by pid, as a
node failure would; SIGTERM goes to the supervisor, as the kubelet sends it.

Every process started here is stopped by its own pid in :meth:`SchedCase.close`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from tests.apps.sched_record import PERIOD
from tests.support import servers
from tests.support.harness import WORKERKIT, Supervisor, start_worker, try_http_get, wait_until
from tests.support.sched_records import Run, Tally, load_runs, tally
from workerkit.supervisor.process import descendants

if TYPE_CHECKING:
    from tests.support.servers import PostgresServer, RedisServer

__all__ = (
    "ENGINES",
    "Replica",
    "SchedCase",
    "concurrently",
    "engine_stores",
    "leader_gauge",
)

ENGINES = ("sql", "rq", "celery")
#: Redis databases (rq, celery) of each slot of :func:`engine_stores`.
_REDIS_SLOTS = ((2, 3), (8, 9), (10, 11), (14, 15))

_T = TypeVar("_T")


@dataclass(frozen=True)
class _EngineSpec:
    app: str
    worker_argv: tuple[str, ...]
    worker_settings: Mapping[str, str]
    store_settings: Callable[[str], dict[str, str]]


_SPECS = {
    "sql": _EngineSpec(
        app="tests.apps.sched_sql:app",
        worker_argv=("run", "sql"),
        worker_settings={"poll_interval": "0.1"},
        store_settings=lambda url: {"database_url": url},
    ),
    "rq": _EngineSpec(
        app="tests.apps.sched_rq:app",
        worker_argv=("run", "rq", "--worker-class", "simple"),
        worker_settings={},
        store_settings=lambda url: {"redis_url": url},
    ),
    "celery": _EngineSpec(
        app="tests.apps.sched_celery:app",
        worker_argv=("run", "celery", "--", "--pool", "solo"),
        worker_settings={"queues": "celery", "log_level": "info"},
        store_settings=lambda url: {"redis_url": url, "E2E_REDIS_URL": url},
    ),
}


def _log_time(event: Mapping[str, Any]) -> float:
    """A JSON log line's ``ts`` (``2026-12-03T11:41:58.519Z``) as epoch seconds."""
    stamp = str(event.get("ts", "")).replace("Z", "+00:00")
    try:
        return dt.datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return math.nan


def leader_gauge(metrics: str) -> float | None:
    """The value of ``workerkit_scheduler_leader`` in a ``/metrics`` text, or None."""
    for line in metrics.splitlines():
        name, _, value = line.partition(" ")
        if name == "workerkit_scheduler_leader" or name.startswith("workerkit_scheduler_leader{"):
            with contextlib.suppress(ValueError):
                return float(value.split()[0])
    return None


@dataclass
class Replica:
    """One ``workerkit scheduler`` pod."""

    name: str
    pod: Supervisor
    started_at: float

    @property
    def pid(self) -> int:
        return self.pod.pid

    def alive(self) -> bool:
        return self.pod.proc.poll() is None

    def leading(self) -> bool:
        if not self.alive():
            return False
        answer = try_http_get(self.pod.port, "/metrics")
        return answer is not None and answer[0] == 200 and leader_gauge(answer[1]) == 1.0

    def ready(self) -> bool:
        answer = try_http_get(self.pod.port, "/readyz")
        return answer is not None and answer[0] == 200

    def kill(self) -> float:
        """SIGKILL the pod's whole tree (children first, by pid); the time it happened."""
        at = time.time()
        for pid in [*descendants(self.pid), self.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.pod.proc.wait(10)
        return at

    def terminate(self, timeout: float = 20.0) -> tuple[float, int]:
        """SIGTERM the supervisor; the time it was sent and the exit code."""
        at = time.time()
        self.pod.signal(signal.SIGTERM)
        code, _ = self.pod.wait_exit(timeout)
        return at, code

    def fire_events(self) -> list[dict[str, Any]]:
        """The replica's log events about fires (each with ``schedule``, ``outcome``, ...)."""
        return [e for e in self.pod.log_events() if e.get("event") == "schedule_fired"]


@dataclass
class SchedCase:
    """One engine's scenario: a store, a records file, a worker and scheduler replicas."""

    engine: str
    tmp: Path
    store_url: str
    schedules: str = "tick"
    settings: Mapping[str, str] = field(default_factory=dict)
    replicas: list[Replica] = field(default_factory=list)
    error: BaseException | None = None  # the scenario's failure, for the tests to re-raise
    worker: Supervisor | None = None
    marks: dict[str, float] = field(default_factory=dict)
    _count: int = 0

    def __post_init__(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.records = self.tmp / "records.jsonl"
        self.journal = self.tmp / "journal.txt"  # for worker_env's shape; unused
        self.extra: dict[str, str] = {
            "E2E_SCHED_RECORDS": str(self.records),
            "E2E_SCHEDULES": self.schedules,
        }

    @property
    def spec(self) -> _EngineSpec:
        return _SPECS[self.engine]

    # --- processes ----------------------------------------------------------------------------

    def start_worker(self) -> Supervisor:
        self.worker = start_worker(
            [*WORKERKIT, *self.spec.worker_argv],
            self,
            app=self.spec.app,
            name=f"worker-{self.engine}",
            engine={**self.spec.store_settings(self.store_url)},
            settings=self.spec.worker_settings,
            new_session=True,
        )
        return self.worker

    def start_replica(self) -> Replica:
        self._count += 1
        name = f"scheduler-{self.engine}-{self._count}"
        pod = start_worker(
            [*WORKERKIT, "scheduler", self.engine, "--app", self.spec.app],
            self,
            app=self.spec.app,
            name=name,
            engine=self.spec.store_settings(self.store_url),
            settings=dict(self.settings),
            new_session=True,
        )
        replica = Replica(name, pod, time.time())
        self.replicas.append(replica)
        return replica

    def start_replicas(self, count: int) -> list[Replica]:
        started = [self.start_replica() for _ in range(count)]
        for replica in started:
            self.wait_ready(replica)
        return started

    def wait_ready(self, replica: Replica, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if not replica.alive():
                raise AssertionError(
                    f"{replica.name} exited with {replica.pod.proc.returncode}:\n"
                    f"{replica.pod.log_text()}"
                )
            return replica.ready()

        wait_until(ready, timeout=timeout, what=f"{replica.name} /readyz 200")

    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.alive()]

    def leader(self, timeout: float = 30.0) -> Replica:
        """The one live replica that says it leads (waits until exactly one does)."""

        def one() -> Replica | None:
            leading = [r for r in self.live() if r.leading()]
            return leading[0] if len(leading) == 1 else None

        found: Replica = wait_until(one, timeout=timeout, what=f"one {self.engine} leader")
        return found

    def stop_replicas(self) -> None:
        """SIGTERM every live replica (concurrently: all down at once)."""
        live = self.live()
        for replica in live:
            replica.pod.signal(signal.SIGTERM)
        for replica in live:
            replica.pod.wait_exit(20)

    def close(self) -> None:
        """Stop what is left; the marks stay beside the records (marks.json) for a post-mortem."""
        (self.tmp / "marks.json").write_text(json.dumps(self.marks, indent=1))
        for replica in self.replicas:
            replica.pod.stop()
        if self.worker is not None:
            self.worker.stop()

    # --- what happened --------------------------------------------------------------------------

    def runs(self, schedule: str | None = "tick") -> list[Run]:
        return load_runs(self.records, schedule=schedule)

    def wait_ran(self, fire_time: float, schedule: str = "tick", timeout: float = 20.0) -> None:
        """Until a run of a fire time two periods after ``fire_time`` is recorded: a worker
        that runs jobs concurrently may start a later fire before an earlier one, never two
        periods before it."""
        later = fire_time + 2 * PERIOD
        wait_until(
            lambda: any(r.fire_time >= later - 1e-3 for r in self.runs(schedule)),
            timeout=timeout,
            what=f"{self.engine}: a run of {schedule!r} fired at or after {fire_time:.3f}",
        )

    def settle(
        self, start: float, end: float, schedule: str = "tick", timeout: float = 20.0
    ) -> None:
        """Until every fire time in ``[start, end)`` has a run, or ``timeout`` (no error: the
        test's assertions say what is missing). A later fire time's run is no sign that the
        earlier ones are done: a standby fires new times while the leader still catches up."""
        deadline = time.monotonic() + timeout
        while self.tally(start, end, schedule).missed and time.monotonic() < deadline:
            time.sleep(0.1)

    def next_fire(self, after: float | None = None) -> float:
        """The first whole-second fire time after ``after`` (now)."""
        now = time.time() if after is None else after
        return float(int(now // PERIOD) + 1) * PERIOD

    def mark(self, name: str, at: float | None = None) -> float:
        self.marks[name] = time.time() if at is None else at
        return self.marks[name]

    def tally(self, start: float, end: float, schedule: str = "tick") -> Tally:
        return tally(self.runs(schedule), start=start, end=end, period=PERIOD)

    def fire_delays(self, since: float, until: float) -> list[float]:
        """How late (s) the replicas fired each fire they made between ``since`` and
        ``until`` (their ``schedule_fired`` log lines, by the line's time)."""
        return [
            float(event["delay"])
            for replica in self.replicas
            for event in replica.fire_events()
            if event.get("outcome") == "fired" and since <= _log_time(event) < until
        ]

    def logs(self) -> str:
        """The tail of every replica's log, for a failure message."""
        return "\n".join(f"--- {r.name}\n{r.pod.log_text()[-1500:]}" for r in self.replicas)


def concurrently(
    cases: Mapping[str, _T], scenario: Callable[[_T], Any]
) -> dict[str, BaseException | None]:
    """Run ``scenario`` on every case at once, one thread each; each case's failure, by name
    (so one engine's failure fails that engine's tests, not the others')."""
    with ThreadPoolExecutor(max_workers=max(1, len(cases))) as pool:
        futures = {name: pool.submit(scenario, case) for name, case in cases.items()}
        return {name: future.exception() for name, future in futures.items()}


@contextlib.contextmanager
def engine_stores(
    redis: RedisServer,
    postgres: PostgresServer,
    template: str,
    engines: Iterable[str] = ENGINES,
    *,
    slot: int = 0,
) -> Iterator[dict[str, str]]:
    """Each engine's store URL for one scenario: a PostgreSQL database copied from the
    migrated template for sql, a Redis database of its own (flushed before and after) for rq
    and celery, by ``slot`` (0-3; scenarios that run at once take different slots). The
    databases are ones no other test module uses (they use 1, 4, 6, 7, 12, 13)."""
    import redis as redis_lib

    urls: dict[str, str] = {}
    database = f"sched_{uuid.uuid4().hex[:10]}"
    wanted = set(engines)
    if "sql" in wanted:
        servers.create_database(postgres, database, template)
        urls["sql"] = postgres.url(database)
    for engine, db in zip(("rq", "celery"), _REDIS_SLOTS[slot], strict=True):
        if engine in wanted:
            urls[engine] = redis.url(db)
    flush = [url for engine, url in urls.items() if engine != "sql"]

    def flush_all() -> None:
        for url in flush:
            client = redis_lib.Redis.from_url(url)
            try:
                client.flushdb()
            finally:
                client.close()

    flush_all()
    try:
        yield urls
    finally:
        flush_all()
        if "sql" in wanted:
            servers.drop_database(postgres, database)
