"""What the scheduler's runs say: duplicates, missed fire times, delays, gaps (pure functions).

Every periodic run of the recording apps (tests/apps/sched_record.py) appends one JSON line:
its engine, schedule, fire time, start time and pid. These functions read those lines and
answer the issue's questions for a window of fire times; the e2e suite asserts on them and
bench/scheduler.py reports them, for workerkit and for the peers alike.

A peer that has no fire time of its own (Celery beat) records the time it published the
message; ``bucket=True`` then counts a run against the period it was sent in, which is how
two beat replicas firing the same tick show up as a duplicate.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ("Run", "Tally", "expected_times", "gap_after", "load_runs", "percentile", "tally")


@dataclass(frozen=True)
class Run:
    """One execution of a periodic job, as the job recorded it."""

    engine: str
    schedule: str
    fire_time: float
    start: float
    pid: int

    @property
    def delay(self) -> float:
        """Seconds from the fire time to the start of the run (fire + queue + pickup)."""
        return self.start - self.fire_time


def load_runs(path: Path, *, schedule: str | None = None) -> list[Run]:
    """Every run recorded in ``path`` (of ``schedule`` only, when given), by fire time."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    runs = []
    for line in text.splitlines():
        if not line.strip():
            continue
        data = json.loads(line)
        if schedule is not None and data["schedule"] != schedule:
            continue
        runs.append(
            Run(
                engine=str(data["engine"]),
                schedule=str(data["schedule"]),
                fire_time=float(data["fire_time"]),
                start=float(data["start"]),
                pid=int(data["pid"]),
            )
        )
    return sorted(runs, key=lambda run: (run.fire_time, run.start))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between closest ranks; NaN if empty."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def expected_times(start: float, end: float, period: float, anchor: float = 0.0) -> list[float]:
    """The fire times ``anchor + k * period`` in ``[start, end)`` (an aligned Every)."""
    first = math.ceil(round((start - anchor) / period, 9))
    times = []
    k = first
    while (t := anchor + k * period) < end:
        times.append(round(t, 6))
        k += 1
    return times


@dataclass
class Tally:
    """A window of fire times, against the runs recorded for it."""

    expected: list[float]
    runs_by_time: dict[float, list[Run]] = field(default_factory=dict)

    @property
    def runs(self) -> int:
        return sum(len(runs) for runs in self.runs_by_time.values())

    @property
    def duplicated(self) -> dict[float, int]:
        """Fire time -> how many runs it had, for every fire time that ran more than once."""
        return {t: len(r) for t, r in self.runs_by_time.items() if len(r) > 1}

    @property
    def duplicates(self) -> int:
        """Runs beyond the first of their fire time."""
        return sum(n - 1 for n in self.duplicated.values())

    @property
    def missed(self) -> list[float]:
        return [t for t in self.expected if t not in self.runs_by_time]

    @property
    def delays(self) -> list[float]:
        """Per fire time that ran, the delay of its first run (s)."""
        return [min(run.delay for run in runs) for runs in self.runs_by_time.values()]

    def delay(self, q: float) -> float:
        return percentile(self.delays, q)

    def summary(self) -> dict[str, object]:
        delays = self.delays
        return {
            "fire_times": len(self.expected),
            "runs": self.runs,
            "duplicates": self.duplicates,
            "missed": len(self.missed),
            "delay_p50_ms": round(percentile(delays, 50) * 1000, 1) if delays else None,
            "delay_p95_ms": round(percentile(delays, 95) * 1000, 1) if delays else None,
            "delay_max_ms": round(max(delays) * 1000, 1) if delays else None,
        }

    def describe(self) -> str:
        """One line for an assertion message."""
        extra = ""
        if self.duplicated:
            extra += f"; duplicated {sorted(self.duplicated.items())[:10]}"
        if self.missed:
            extra += f"; missed {self.missed[:10]}"
        return f"{self.summary()}{extra}"


def tally(
    runs: Iterable[Run],
    *,
    start: float,
    end: float,
    period: float,
    anchor: float = 0.0,
    bucket: bool = False,
) -> Tally:
    """The fire times due in ``[start, end)`` and the runs recorded for them.

    ``bucket``: count a run against the period its fire time falls in (for a peer that records
    when it published, not a fire time); otherwise a run counts only for its exact fire time
    (compared in whole milliseconds, as the stores key fires).
    """
    expected = expected_times(start, end, period, anchor)
    wanted = {round(t * 1000): t for t in expected}
    result = Tally(expected=expected)
    for run in runs:
        if bucket:
            k = math.floor(round((run.fire_time - anchor) / period, 9))
            key = round((anchor + k * period) * 1000)
        else:
            key = round(run.fire_time * 1000)
        t = wanted.get(key)
        if t is not None:
            result.runs_by_time.setdefault(t, []).append(run)
    return result


def gap_after(runs: Sequence[Run], at: float, *, horizon: float) -> float:
    """The longest pause between consecutive run starts around ``at`` (s): from the last run
    that started before ``at`` to the end of ``at + horizon`` (a run in progress counts)."""
    starts = sorted(run.start for run in runs)
    before = [s for s in starts if s < at]
    after = [s for s in starts if at <= s <= at + horizon]
    points = [*(before[-1:] or [at]), *after]
    gaps = [b - a for a, b in itertools.pairwise(points)]
    tail = at + horizon - points[-1]
    return max([*gaps, tail])
