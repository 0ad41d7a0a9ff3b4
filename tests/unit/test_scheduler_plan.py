"""The scheduler's pure parts: misfire arithmetic (plan.py) and leader-election timing."""

from __future__ import annotations

import math
from typing import Any

import pytest

from workerkit.scheduler.contract import Lease, Schedule
from workerkit.scheduler.leadership import Leadership
from workerkit.scheduler.plan import (
    SchedulerTiming,
    catch_up,
    slide,
    start_cursor,
    validate_schedule,
)
from workerkit.scheduler.triggers import Cron, Every

pytestmark = pytest.mark.unit

TIMING = SchedulerTiming(15.0, 10.0, 2.0, 0.5, 2.0, 604_800.0)


class ForwardOnly:
    """A trigger with only next_after (as an engine's own trigger may be)."""

    def __init__(self, seconds: float) -> None:
        self.every = Every(seconds)

    def next_after(self, after: float) -> float:
        return self.every.next_after(after)

    def describe(self) -> str:
        return "forward"

    def identity(self) -> str:
        return "forward"


def schedule(trigger: Any = None, **kw: Any) -> Schedule:
    return Schedule(name="s", task="t", trigger=trigger or Every(1.0), **kw)


@pytest.mark.parametrize("trigger", [Every(1.0), ForwardOnly(1.0)])
def test_slide_keeps_the_latest_missed_times_and_names_the_next_due(trigger: Any) -> None:
    assert slide(trigger, 101.0, 110.5, 3) == ([108.0, 109.0, 110.0], 111.0)
    assert slide(trigger, 101.0, 110.0, 100) == ([float(n) for n in range(101, 110)], 110.0)
    assert slide(trigger, 101.0, 110.5, 0) == ([], 111.0)
    assert slide(trigger, 111.0, 110.5, 5) == ([], 111.0)


def test_slide_over_a_cron_schedule_walks_backwards() -> None:
    hourly = Cron("0 * * * *")
    missed, due = slide(hourly, 3600.0, 10 * 3600 + 1, 2)
    assert (missed, due) == ([9 * 3600.0, 10 * 3600.0], 11 * 3600.0)


def test_start_cursor_from_the_last_record_or_from_the_start() -> None:
    latest = schedule(misfire="latest")
    cursor = start_cursor(latest, 100.0, 110.3, 2.0)
    assert (cursor.due, cursor.missed) == (109.0, [108.0])
    fresh = start_cursor(latest, None, 110.3, 2.0)
    assert (fresh.due, fresh.missed) == (111.0, [])
    skip = start_cursor(schedule(misfire="skip"), 100.0, 110.3, 2.0)
    assert (skip.due, skip.missed) == (109.0, [])
    everything = start_cursor(schedule(misfire="all", max_catch_up=4), 100.0, 110.3, 2.0)
    assert everything.missed == [105.0, 106.0, 107.0, 108.0]


def test_catch_up_follows_the_policy_oldest_first() -> None:
    missed = [3.0, 1.0, 2.0]
    assert catch_up(schedule(misfire="skip"), missed) == []
    assert catch_up(schedule(misfire="latest"), missed) == [3.0]
    assert catch_up(schedule(misfire="all"), missed) == [1.0, 2.0, 3.0]
    assert catch_up(schedule(misfire="all", max_catch_up=2), missed) == [2.0, 3.0]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"misfire": "sometimes"}, "misfire='sometimes'"),
        ({"max_catch_up": 0}, "max_catch_up=0"),
        ({"misfire_grace": 0.0}, "misfire_grace=0.0"),
        ({"misfire_grace": math.nan}, "misfire_grace=nan"),
    ],
)
def test_validate_schedule_names_the_argument(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_schedule(schedule(**kw))


def lease(epoch: int = 1) -> Lease:
    return Lease("me", epoch, 0.0)


def test_a_standby_tries_within_one_retry_period_and_not_in_lockstep() -> None:
    low, high = Leadership(TIMING, jitter=lambda: 0.0), Leadership(TIMING, jitter=lambda: 0.999)
    for lead in (low, high):
        assert lead.call_due(0.0) == "acquire"
        assert lead.answered(0.0, None) is None
    assert low.next_call() == 2.0
    assert 1.6 <= high.next_call() < low.next_call()


def test_the_leader_renews_every_retry_period_and_stops_at_the_renew_deadline() -> None:
    lead = Leadership(TIMING)
    assert lead.answered(0.0, lease()) == "gained"
    assert lead.call_due(1.9) is None
    assert lead.call_due(2.0) == "renew"
    lead.failed(2.0)
    lead.failed(4.0)
    assert lead.next_call() == 6.0
    assert not lead.expired(9.99)
    assert lead.expired(10.0)  # measured from the start of the last good call, before a
    assert lead.deadline() == 10.0  # 15 s lease can expire at the store
    assert lead.step_down(10.0) == lease()
    assert not lead.leading
    assert lead.call_due(12.0) == "acquire"


def test_a_renewal_moves_the_deadline_and_a_refusal_or_a_new_epoch_is_a_change() -> None:
    lead = Leadership(TIMING)
    lead.answered(0.0, lease())
    assert lead.answered(2.0, lease()) is None
    assert lead.deadline() == 12.0
    assert lead.answered(4.0, lease(2)) == "gained"  # another epoch: it is a new leadership
    assert lead.answered(6.0, None) == "lost"
    assert lead.deadline() == math.inf
