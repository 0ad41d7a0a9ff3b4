"""The scheduler process's own logic: its reporter (events and log lines), waiting for the
store at start, and the timing it builds from the settings. The process itself (signals, the
supervisor, probes, metrics) is tests/e2e/test_scheduler_process.py."""

from __future__ import annotations

import threading

import pytest

from workerkit.events import (
    Event,
    Heartbeat,
    ScheduleFired,
    SchedulerLeadership,
    StoreHealth,
)
from workerkit.scheduler.contract import FireOutcome, Schedule, SchedulerBinding
from workerkit.scheduler.process import EventReporter, timing_of, wait_for_store
from workerkit.scheduler.triggers import Every
from workerkit.settings import Settings
from workerkit.testing import InMemorySchedulerStore

pytestmark = pytest.mark.unit


class Client:
    """Records what would go to the supervisor."""

    def __init__(self) -> None:
        self.sent: list[Event] = []

    def send(self, event: Event) -> None:
        self.sent.append(event)


def reporter(on_ready: list[int] | None = None) -> tuple[EventReporter, Client]:
    client = Client()
    ready = (lambda: on_ready.append(1)) if on_ready is not None else None
    return EventReporter(client, "host-1-abc", on_ready=ready), client  # type: ignore[arg-type]


def test_reports_become_events() -> None:
    rep, client = reporter()
    rep.leadership(True, 4)
    rep.fired("tick", FireOutcome.FIRED, "on_time", 0.003)
    rep.fired("tick", FireOutcome.ALREADY_FIRED, "standby", -0.1)
    assert client.sent == [
        SchedulerLeadership(True, 4),
        ScheduleFired("tick", "fired", "on_time", 0.003),
        ScheduleFired("tick", "already_fired", "standby", -0.1),  # early: shown, not hidden
    ]


def test_readiness_comes_once_from_the_first_reachable_store_and_is_repeated() -> None:
    ready: list[int] = []
    rep, client = reporter(ready)
    rep.store_health(False, "refused")
    assert ready == []
    rep.store_health(True, "ok")
    rep.store_health(False, "timeout")
    rep.store_health(True, "ok")
    assert ready == [1]
    client.sent.clear()
    rep.beat()  # the heartbeat repeats the last store health: /readyz never goes stale
    assert isinstance(client.sent[0], Heartbeat)
    assert client.sent[1] == StoreHealth(ok=True, reason="ok")


def binding(store: InMemorySchedulerStore) -> SchedulerBinding:
    return SchedulerBinding(store, (Schedule("tick", "t", Every(1.0)),))


def test_wait_for_store_retries_until_the_store_answers() -> None:
    store = InMemorySchedulerStore()
    store.unavailable = True
    ready: list[int] = []
    rep, client = reporter(ready)
    timer = threading.Timer(0.3, lambda: setattr(store, "unavailable", False))
    timer.start()
    try:
        assert wait_for_store(binding(store), rep, budget=30, stop=threading.Event())
    finally:
        timer.cancel()
    health = [e for e in client.sent if isinstance(e, StoreHealth)]
    assert health[0].ok is False
    assert health[-1].ok is True
    assert ready == [1]


def test_wait_for_store_gives_up_after_its_budget_or_at_a_stop() -> None:
    store = InMemorySchedulerStore()
    store.unavailable = True
    rep, _ = reporter()
    assert not wait_for_store(binding(store), rep, budget=0.2, stop=threading.Event())
    stop = threading.Event()
    stop.set()
    assert not wait_for_store(binding(store), rep, budget=30, stop=stop)


def test_timing_comes_from_the_scheduler_settings() -> None:
    settings = Settings().replace(
        scheduler_lease_duration=20,
        scheduler_renew_deadline=12,
        scheduler_retry_period=1,
        scheduler_standby_delay=0.25,
        scheduler_misfire_grace=3,
        scheduler_retention=3600,
    )
    timing = timing_of(settings)
    assert (
        timing.lease_duration,
        timing.renew_deadline,
        timing.retry_period,
        timing.standby_delay,
        timing.misfire_grace,
        timing.retention,
    ) == (20, 12, 1, 0.25, 3, 3600)
