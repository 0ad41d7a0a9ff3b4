"""What ``workerkit schedules list`` shows, read from a store and the app's code together."""

from __future__ import annotations

import dataclasses
import json

import pytest

from workerkit.scheduler.contract import Schedule, SchedulerBinding
from workerkit.scheduler.overview import overview, render_text, to_json
from workerkit.scheduler.triggers import Cron, Every
from workerkit.testing import InMemorySchedulerStore, ManualClock

pytestmark = pytest.mark.unit

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z
TICK = Schedule("tick", "tasks.tick", Every(10.0), queue="fast")
REPORT = Schedule("report", "tasks.report", Cron("0 3 * * *", "Europe/Berlin"), misfire="skip")


def test_lists_next_fires_last_fire_state_and_leader() -> None:
    clock = ManualClock(T0)
    store = InMemorySchedulerStore(clock=clock)
    lease = store.acquire("pod-a-1-abc", 15)
    assert lease is not None
    gone = Schedule("gone", "tasks.old", Every(60.0))
    assert store.register(lease, [TICK, REPORT, gone])
    assert store.register(lease, [TICK, REPORT])  # "gone" was removed from the code
    clock.advance(0.012)
    store.fire(TICK, T0, epoch=lease.epoch, reason="on_time")
    store.set_paused("report", True)
    changed = dataclasses.replace(TICK, args=(1,))  # this code's tick differs from the leader's
    view = overview(SchedulerBinding(store, (changed, REPORT)))

    data = to_json(view)
    json.dumps(data)  # all of it is JSON
    assert data["leader"]["holder"] == "pod-a-1-abc"
    by_name = {s["name"]: s for s in data["schedules"]}
    assert by_name["tick"]["status"] == "stale"
    assert by_name["tick"]["next_fires"] == [T0 + 10, T0 + 20, T0 + 30]
    assert by_name["tick"]["last_fire"]["reason"] == "on_time"
    assert by_name["tick"]["last_fire"]["delay"] == pytest.approx(0.012)
    assert by_name["report"]["status"] == "paused"
    assert by_name["report"]["last_fire"] is None
    assert by_name["gone"]["status"] == "removed"
    assert by_name["gone"]["in_code"] is False

    text = render_text(view)
    assert "leader: pod-a-1-abc (epoch 1" in text
    assert "tick: every 10" in text
    assert "next:  2027-01-15T08:00:10.000Z, 2027-01-15T08:00:20.000Z" in text
    assert "last:  2027-01-15T08:00:00.000Z on_time, recorded 12 ms after its time" in text
    assert "stale: the leader registered another definition" in text
    assert "paused (workerkit schedules resume NAME)" in text
    assert "removed: no longer in the leader's code" in text


def test_nobody_leads_and_nothing_registered_yet() -> None:
    store = InMemorySchedulerStore(clock=ManualClock(T0))
    view = overview(SchedulerBinding(store, (TICK,)))
    assert view.leader is None
    assert view.schedules[0].status == "not_registered"
    assert "leader: none" in render_text(view)
