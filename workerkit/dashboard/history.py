"""Throughput over time, for the overview's charts: sampled every 10 s, one hour kept in memory.

Each worker's presence carries its outcome counts since it started (queue -> outcome -> n); the
sampler takes the difference between two samples of the same worker and adds it to the current
minute of each queue. A worker that restarted (a new ``started_at``), or that started since the
last sample, counts from zero; a worker first seen when it had been running for a while (the
dashboard just started) is a baseline only. A difference is never negative. Nothing is stored:
a restarted dashboard starts with an empty chart.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import anyio
import anyio.to_thread

from workerkit.errors import StoreUnavailable

if TYPE_CHECKING:
    from workerkit.dashboard.model import DashboardSource, QueueSummary
    from workerkit.engines.presence import Presence

__all__ = ("FAILED_OUTCOMES", "SAMPLE_INTERVAL", "WINDOW", "History", "MinuteCount", "run_sampler")

log = logging.getLogger("workerkit.dashboard")

SAMPLE_INTERVAL: Final = 10.0
WINDOW: Final = 3600.0
#: The outcomes counted as failures: an attempt that failed, retried or not, or timed out.
FAILED_OUTCOMES: Final = ("failed", "retried", "timed_out")


@dataclass(frozen=True)
class MinuteCount:
    """One minute of one queue: ``minute`` is its start (epoch seconds, store clock)."""

    minute: float
    succeeded: int
    failed: int


@dataclass(frozen=True)
class _Seen:
    started_at: float
    counts: Mapping[str, Mapping[str, int]]


class History:
    """Per queue, succeeded and failed attempts per minute over ``window`` seconds. Thread-safe."""

    def __init__(self, window: float = WINDOW) -> None:
        self.window = window
        self._lock = threading.Lock()
        self._seen: dict[str, _Seen] = {}
        self._last_at: float | None = None
        self._minutes: dict[str, dict[int, list[int]]] = {}

    def sample(
        self, at: float, queues: Sequence[QueueSummary], presences: Sequence[Presence]
    ) -> None:
        """Add what happened since the last sample (``at``: the store's clock now)."""
        with self._lock:
            minute = int(at // 60)
            for presence in presences:
                for queue, succeeded, failed in self._deltas(presence):
                    counts = self._minutes.setdefault(queue, {}).setdefault(minute, [0, 0])
                    counts[0] += succeeded
                    counts[1] += failed
            self._seen = {p.worker_id: _Seen(p.started_at, _copy(p.counts)) for p in presences}
            for summary in queues:
                self._minutes.setdefault(summary.name, {})
            oldest = int((at - self.window) // 60)
            for minutes in self._minutes.values():
                for old in [m for m in minutes if m <= oldest]:
                    del minutes[old]
            self._last_at = at

    def _deltas(self, presence: Presence) -> list[tuple[str, int, int]]:
        before = self._seen.get(presence.worker_id)
        if before is not None and before.started_at == presence.started_at:
            previous: Mapping[str, Mapping[str, int]] = before.counts
        elif before is not None or (
            self._last_at is not None and presence.started_at >= self._last_at
        ):
            previous = {}  # restarted, or started since the last sample: all of it is new
        else:
            return []  # first seen long after its start: a baseline
        found = []
        for queue, outcomes in presence.counts.items():
            old = previous.get(queue, {})
            succeeded = _delta(outcomes, old, ("succeeded",))
            failed = _delta(outcomes, old, FAILED_OUTCOMES)
            if succeeded or failed:
                found.append((queue, succeeded, failed))
        return found

    def series(self, queue: str, now: float) -> list[MinuteCount]:
        """The last ``window`` of ``queue``, one entry per minute (zero where nothing ran)."""
        last = int(now // 60)
        count = max(1, int(self.window // 60))
        with self._lock:
            minutes = dict(self._minutes.get(queue, {}))
        return [
            MinuteCount(m * 60.0, *minutes.get(m, (0, 0)))
            for m in range(last - count + 1, last + 1)
        ]

    @property
    def sampled_at(self) -> float | None:
        return self._last_at


def _copy(counts: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    return {queue: dict(outcomes) for queue, outcomes in counts.items()}


def _delta(now: Mapping[str, int], before: Mapping[str, int], outcomes: Sequence[str]) -> int:
    """The increase of ``outcomes``, each never below zero (a count that went down restarted)."""
    total = 0
    for outcome in outcomes:
        current, previous = int(now.get(outcome, 0)), int(before.get(outcome, 0))
        total += current - previous if current >= previous else current
    return total


def sample_once(source: DashboardSource, history: History) -> None:
    """One sample (blocking: run it in a thread)."""
    at = source.clock()
    history.sample(at, source.queues(), source.workers())


async def run_sampler(
    source: DashboardSource, history: History, interval: float = SAMPLE_INTERVAL
) -> None:
    """Sample every ``interval`` seconds until cancelled; a store outage skips samples."""
    failing = False
    while True:
        try:
            await anyio.to_thread.run_sync(sample_once, source, history)
            if failing:
                log.info("history sampled again", extra={"event": "dashboard_sampler_recovered"})
            failing = False
        except StoreUnavailable as exc:
            if not failing:
                log.warning(
                    "history not sampled: %s",
                    exc,
                    extra={"event": "dashboard_sampler_failed", "error": str(exc)},
                )
            failing = True
        except Exception as exc:
            log.exception(
                "history not sampled",
                extra={"event": "dashboard_sampler_failed", "error": str(exc)},
            )
        await anyio.sleep(interval)
