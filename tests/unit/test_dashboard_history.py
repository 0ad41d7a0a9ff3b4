"""The throughput history: per-minute deltas of the workers' outcome counts, never negative,
across worker restarts, new workers and workers first seen long after their start."""

from __future__ import annotations

import pytest

from tests.support.dashboard_memory import MemoryDashboardSource
from workerkit.dashboard.charts import throughput_svg
from workerkit.dashboard.history import History, sample_once
from workerkit.dashboard.model import QueueSummary
from workerkit.engines.presence import Presence
from workerkit.testing import ManualClock

pytestmark = pytest.mark.unit

T0 = 1_800_000_000.0  # a minute boundary


def worker(worker_id: str, started_at: float, **counts: dict[str, int]) -> Presence:
    return Presence(worker_id, "host", 1, "sql", ("default",), 1, "ready", started_at,
                    started_at, 15.0, counts=counts)  # fmt: skip


def minute(history: History, queue: str, at: float) -> tuple[int, int]:
    entry = next(m for m in history.series(queue, at) if m.minute == (at // 60) * 60)
    return entry.succeeded, entry.failed


QUEUES = [QueueSummary("default", 0, 0, 0, 0, 0, None, False)]


def test_deltas_across_a_restart_and_a_new_worker() -> None:
    history = History()
    # Running for an hour when the dashboard starts: a baseline, not 500 jobs this minute.
    history.sample(T0, QUEUES, [worker("a", T0 - 3600, default={"succeeded": 500, "failed": 7})])
    assert minute(history, "default", T0) == (0, 0)
    counts = {"succeeded": 503, "failed": 7, "retried": 2}
    history.sample(T0 + 10, QUEUES, [worker("a", T0 - 3600, default=counts)])
    assert minute(history, "default", T0 + 10) == (3, 2)
    # Worker "a" restarted (same id, new start, counts from zero): its 4 are new, not -499.
    history.sample(T0 + 20, QUEUES, [worker("a", T0 + 15, default={"succeeded": 4})])
    assert minute(history, "default", T0 + 20) == (7, 2)
    # A new worker started since the last sample: all of its counts are new.
    history.sample(T0 + 30, QUEUES, [worker("a", T0 + 15, default={"succeeded": 4}),
                                     worker("b", T0 + 25, default={"timed_out": 1})])  # fmt: skip
    assert minute(history, "default", T0 + 30) == (7, 3)
    # A count that went down without a new start (a replaced record): never negative.
    history.sample(T0 + 40, QUEUES, [worker("a", T0 + 15, default={"succeeded": 1})])
    assert minute(history, "default", T0 + 40) == (8, 3)
    # The next minute starts at zero; the hour-long series has 60 entries.
    history.sample(T0 + 70, QUEUES, [worker("a", T0 + 15, default={"succeeded": 3})])
    assert minute(history, "default", T0 + 70) == (2, 0)
    series = history.series("default", T0 + 70)
    assert len(series) == 60
    assert sum(m.succeeded for m in series) == 10


def test_an_hour_is_kept() -> None:
    history = History(window=3600)
    history.sample(T0, QUEUES, [worker("a", T0 - 1, default={})])
    history.sample(T0 + 10, QUEUES, [worker("a", T0 - 1, default={"succeeded": 5})])
    assert minute(history, "default", T0 + 10) == (5, 0)
    history.sample(T0 + 3700, QUEUES, [worker("a", T0 - 1, default={"succeeded": 5})])
    assert all(m.succeeded == 0 for m in history.series("default", T0 + 3700))


def test_sample_once_reads_the_source_and_the_chart_draws_it() -> None:
    clock = ManualClock(T0)
    source = MemoryDashboardSource(clock_fn=clock)
    source.add("j1", enqueued_at=T0 - 5)
    history = History()
    source.presences["a"] = worker("a", T0 - 100, default={"succeeded": 1})
    sample_once(source, history)
    source.presences["a"] = worker("a", T0 - 100, default={"succeeded": 4, "failed": 1})
    clock.advance(10)
    sample_once(source, history)
    svg = throughput_svg("default", history.series("default", T0 + 10))
    assert svg.startswith('<svg class="chart"')
    assert 'data-succeeded="3" data-failed="1"' in svg
    assert '<rect class="ok"' in svg
    assert '<rect class="failed"' in svg
    assert "<title>default: 3 succeeded, 1 failed" in svg
