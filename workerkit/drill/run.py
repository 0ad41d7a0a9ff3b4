"""Running a drill: enqueue canaries at a rate for a duration, wait for stragglers, report.

:func:`run_drill` is the whole drill behind ``workerkit drill ENGINE`` (and ``drill local``): it
paces the enqueues by the clock (a batch per tick, so a slow store makes the drill late, never
faster), reads the canaries' records once a second for the live counts, and after the last
enqueue waits, up to ``settle_timeout``, until every canary completed and no run that could still
complete a second time is in progress. The report comes from the records alone.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol

from workerkit.drill.canary import CANARY_TASK, KINDS, canary_kwargs
from workerkit.drill.report import DrillReport, Sent, build_report
from workerkit.errors import ConfigurationError

if TYPE_CHECKING:
    from workerkit.drill.records import CanaryRun, RecordStore
    from workerkit.settings import Settings

__all__ = (
    "DEFAULT_MIX",
    "DrillProgress",
    "DrillSpec",
    "EngineDriver",
    "assign_kinds",
    "open_driver",
    "run_drill",
)

DEFAULT_MIX: Final[Mapping[str, int]] = {"short": 90, "long": 5, "flaky": 5}

#: Seconds between two enqueue batches, and between two reads of the records.
TICK: Final = 0.1
POLL: Final = 1.0

#: A run still in progress this long after the longest canary could take is taken for dead
#: (its process was killed), so the settle does not wait for it.
_STRAGGLER_MARGIN: Final = 2.0


@dataclass(frozen=True)
class DrillSpec:
    """What to drill: where, how fast, how long, which canaries."""

    engine: str  # "sql" | "rq" | "celery"
    settings: Settings  # as `workerkit run ENGINE` loads them (store URLs, queues)
    rate: float = 10.0  # canaries per second
    duration: float = 10.0  # seconds of enqueueing
    mix: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_MIX))  # percentages
    queues: tuple[str, ...] = ()  # () = the engine's default queue
    settle_timeout: float = 60.0  # how long to wait for stragglers after enqueueing ends
    long_seconds: float = 10.0  # how long a "long" canary works (checkpointed)
    drill_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def check(self) -> None:
        """ConfigurationError naming the flag, for a spec that cannot run."""
        if self.engine not in ("sql", "rq", "celery"):
            raise ConfigurationError(f"drill: unknown engine {self.engine!r}; sql, rq or celery")
        if not self.rate > 0:
            raise ConfigurationError(f"--rate must be above 0 per second, got {self.rate:g}")
        if not self.duration > 0:
            raise ConfigurationError(f"--duration must be above 0 s, got {self.duration:g}")
        if self.settle_timeout < 0:
            raise ConfigurationError(
                f"--settle-timeout must be 0 s or more, got {self.settle_timeout:g}"
            )
        unknown = sorted(set(self.mix) - set(KINDS))
        if unknown:
            raise ConfigurationError(
                f"--mix: unknown canary kind {', '.join(unknown)}; the kinds are "
                f"{', '.join(KINDS)} (e.g. --mix short=90,long=5,flaky=5)"
            )
        if any(w < 0 for w in self.mix.values()) or sum(self.mix.values()) <= 0:
            raise ConfigurationError("--mix: weights must be 0 or more, and not all 0")
        if (self.mix.get("long") or self.mix.get("stubborn")) and not self.long_seconds > 0:
            raise ConfigurationError("--long-seconds must be above 0 s for long canaries")


@dataclass(frozen=True)
class DrillProgress:
    """Live counts, given to ``progress`` about once a second (from the records)."""

    phase: str  # "enqueueing" | "settling" | "done"
    elapsed: float  # seconds since the drill began
    sent: int
    started: int  # canaries with at least one run
    completed: int  # canaries completed at least once
    twice: int  # canaries completed more than once
    planned: int  # canaries the drill will send in all


class EngineDriver(Protocol):
    """An engine's side of a drill: enqueue canaries, read their records."""

    records: RecordStore
    default_queues: tuple[str, ...]  # where canaries go when the spec names no queue

    def enqueue(self, batch: Sequence[Sent], queue: str, spec: DrillSpec) -> None: ...

    def close(self) -> None: ...


class _SqlDriver:
    records: RecordStore

    def __init__(self, settings: Settings) -> None:
        from workerkit.app import App
        from workerkit.drill.canary import register_sql
        from workerkit.drill.records import SqlRecords

        self.app = App(settings.database_url, settings=settings)
        register_sql(self.app)
        self.records = SqlRecords(settings.database_url)
        self.default_queues = settings.queue_names

    def enqueue(self, batch: Sequence[Sent], queue: str, spec: DrillSpec) -> None:
        from workerkit.app import EnqueueOptions, PreparedJob

        self.app.enqueue_many(
            [
                PreparedJob(
                    CANARY_TASK,
                    (),
                    canary_kwargs(item, spec.drill_id, spec.long_seconds),
                    EnqueueOptions(job_id=f"drill-{spec.drill_id}-{item.seq}"),
                )
                for item in batch
            ],
            queue=queue,
        )

    def close(self) -> None:
        self.app.backend.close()
        self.records.close()


def open_driver(spec: DrillSpec) -> EngineDriver:
    """The engine's driver for ``spec`` (its libraries imported now, not before)."""
    if spec.engine == "sql":
        return _SqlDriver(spec.settings)
    from workerkit.drill.redis_drivers import open_redis_driver

    return open_redis_driver(spec)


def assign_kinds(mix: Mapping[str, int], count: int) -> list[str]:
    """``count`` kinds in the ``mix`` proportions, spread evenly (smooth weighted round robin)."""
    weights = {kind: w for kind, w in mix.items() if w > 0}
    total = sum(weights.values())
    current = dict.fromkeys(weights, 0)
    kinds = []
    for _ in range(count):
        for kind, weight in weights.items():
            current[kind] += weight
        chosen = max(current, key=lambda k: current[k])
        current[chosen] -= total
        kinds.append(chosen)
    return kinds


def run_drill(
    spec: DrillSpec,
    *,
    progress: Callable[[DrillProgress], None] | None = None,
    stop: threading.Event | None = None,
    driver: EngineDriver | None = None,
) -> DrillReport:
    """Run the drill ``spec`` describes and return its report (see the module docstring).

    ``stop``: set it to end the drill early (enqueueing and waiting); the report then says so and
    is not ``ok``. ``driver``: the engine's side, opened from ``spec`` when not given.
    """
    spec.check()
    stop = stop or threading.Event()
    own = driver is None
    driver = driver or open_driver(spec)
    try:
        if driver.records.runs(spec.drill_id):
            raise ConfigurationError(
                f"--drill-id {spec.drill_id}: that drill has records already (its canaries ran); "
                "give a new id, or none for a fresh one"
            )
        return _Drill(spec, driver, progress, stop).run()
    finally:
        if own:
            driver.close()


class _Drill:
    def __init__(
        self,
        spec: DrillSpec,
        driver: EngineDriver,
        progress: Callable[[DrillProgress], None] | None,
        stop: threading.Event,
    ) -> None:
        self.spec, self.driver, self.progress, self.stop = spec, driver, progress, stop
        self.planned = max(1, round(spec.rate * spec.duration))
        self.kinds = assign_kinds(spec.mix, self.planned)
        self.queues = spec.queues or driver.default_queues
        self.sent: list[Sent] = []
        self.started_at = time.time()
        self._t0 = time.monotonic()
        self._polled = -POLL

    def run(self) -> DrillReport:
        self._enqueue_all()
        settled = self._settle()
        runs = self.driver.records.runs(self.spec.drill_id)
        self._report_progress("done", runs, force=True)
        return build_report(
            drill_id=self.spec.drill_id,
            engine=self.spec.engine,
            started_at=self.started_at,
            sent=self.sent,
            runs=runs,
            settings={
                "rate": self.spec.rate,
                "duration": self.spec.duration,
                "mix": dict(self.spec.mix),
                "queues": list(self.queues),
                "settle_timeout": self.spec.settle_timeout,
                "long_seconds": self.spec.long_seconds,
                "settled": settled,
            },
            stopped_early=self.stop.is_set(),
        )

    def _elapsed(self) -> float:
        return time.monotonic() - self._t0

    def _enqueue_all(self) -> None:
        # Reading the records for the live counts takes time on a big drill: it runs beside the
        # enqueueing, never in its way (the rate is kept by the clock).
        enqueued = threading.Event()
        ticker = threading.Thread(target=self._tick_progress, args=(enqueued,), daemon=True)
        if self.progress is not None:
            ticker.start()
        try:
            while len(self.sent) < self.planned and not self.stop.is_set():
                due = min(self.planned, int(self.spec.rate * self._elapsed()) + 1)
                if due > len(self.sent):
                    self._send(due - len(self.sent))
                self.stop.wait(TICK)
        finally:
            enqueued.set()
            if ticker.is_alive():
                ticker.join()

    def _tick_progress(self, enqueued: threading.Event) -> None:
        while True:
            # The store blinked: the counts wait for the next tick.
            with contextlib.suppress(Exception):
                self._report_progress("enqueueing", None, force=True)
            if enqueued.wait(POLL):
                return

    def _send(self, count: int) -> None:
        now = time.time()
        start = len(self.sent)
        batch = [Sent(seq, self.kinds[seq], now) for seq in range(start, start + count)]
        by_queue: dict[str, list[Sent]] = {}
        for item in batch:
            by_queue.setdefault(self.queues[item.seq % len(self.queues)], []).append(item)
        for queue, items in by_queue.items():
            self.driver.enqueue(items, queue, self.spec)
        self.sent.extend(batch)

    def _settle(self) -> bool:
        deadline = time.monotonic() + self.spec.settle_timeout
        longest = (
            self.spec.long_seconds
            if self.spec.mix.get("long") or self.spec.mix.get("stubborn")
            else 0.0
        )
        while not self.stop.is_set():
            runs = self.driver.records.runs(self.spec.drill_id)
            self._report_progress("settling", runs, force=True)
            if self._settled(runs, longest):
                return True
            if time.monotonic() >= deadline:
                return False
            self.stop.wait(min(POLL / 2, max(0.0, deadline - time.monotonic())))
        return False

    def _settled(self, runs: list[CanaryRun], longest: float) -> bool:
        completed = {run.seq for run in runs if run.completed}
        if len(completed) < len(self.sent):
            return False
        now = time.time()
        # A run in progress could still complete a second time, unless it is too old to be alive.
        return not any(
            run.ended_at is None and now - run.started_at < longest + _STRAGGLER_MARGIN
            for run in runs
        )

    def _report_progress(
        self, phase: str, runs: list[CanaryRun] | None, *, force: bool = False
    ) -> None:
        if self.progress is None:
            return
        if not force and self._elapsed() - self._polled < POLL:
            return
        self._polled = self._elapsed()
        if runs is None:
            runs = self.driver.records.runs(self.spec.drill_id)
        done: dict[int, int] = {}
        for run in runs:
            if run.completed:
                done[run.seq] = done.get(run.seq, 0) + 1
        self.progress(
            DrillProgress(
                phase=phase,
                elapsed=self._elapsed(),
                sent=len(self.sent),
                started=len({run.seq for run in runs}),
                completed=len(done),
                twice=sum(1 for n in done.values() if n > 1),
                planned=self.planned,
            )
        )
