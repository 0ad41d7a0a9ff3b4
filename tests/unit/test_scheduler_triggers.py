"""Fire-time math: Every's alignment, Cron against croniter and against a brute-force reference
across DST gaps and folds, month ends and leap days (hypothesis property tests).
"""

from __future__ import annotations

import itertools
import math
from datetime import UTC, datetime, timedelta
from functools import cache
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workerkit.errors import ConfigurationError
from workerkit.scheduler.contract import fire_key
from workerkit.scheduler.triggers import Cron, Every, trigger_from, upcoming

pytestmark = pytest.mark.unit

DST_ZONES = ("Europe/Berlin", "America/New_York", "Australia/Lord_Howe")  # Lord Howe: 30 min
EXPRESSIONS = (
    "*/15 * * * *",
    "30 2 * * *",
    "0 2 * * *",
    "0 3 * * *",
    "0 * * * *",
    "*/7 1-3 * * *",
    "15,45 1,2 * * *",
    "59 1 * * *",
    "0 2 * * 0",
    "* 2 * * *",
)
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def berlin(*args: int) -> float:
    return datetime(*args, tzinfo=ZoneInfo("Europe/Berlin")).timestamp()  # type: ignore[misc]


def local(instant: float, zone: str = "Europe/Berlin") -> str:
    return datetime.fromtimestamp(instant, ZoneInfo(zone)).isoformat()


# -- Every ------------------------------------------------------------------------------------


@PROPERTY
@given(
    seconds=st.integers(1, 86_400_000).map(lambda ms: ms / 1000),
    anchor=st.integers(-(10**12), 10**12).map(lambda ms: ms / 1000),
    after=st.floats(1e9, 3e9),
)
def test_every_fires_on_its_grid_strictly_after(
    seconds: float, anchor: float, after: float
) -> None:
    trigger = Every(seconds, anchor)
    fire = trigger.next_after(after)
    assert fire > after
    assert fire_key(fire) / 1000 == fire  # whole milliseconds: read back from a store unchanged
    steps = (fire - anchor) / seconds
    assert abs(steps - round(steps)) * seconds < 0.001
    assert trigger.previous_before(fire) <= after  # nothing on the grid was skipped
    assert trigger.next_after(trigger.previous_before(fire)) == fire


@PROPERTY
@given(
    seconds=st.integers(1, 3_600_000).map(lambda ms: ms / 1000),
    base=st.floats(1e9, 3e9),
    offsets=st.lists(st.floats(0, 1), min_size=2, max_size=5),
)
def test_every_replica_computes_the_same_times_whatever_it_asks(
    seconds: float, base: float, offsets: list[float]
) -> None:
    trigger = Every(seconds)
    start = trigger.next_after(base)
    previous = trigger.previous_before(start)
    asked = [previous + offset * (start - previous) * 0.999 for offset in offsets]
    assert {trigger.next_after(after) for after in asked} == {start}
    assert upcoming(trigger, start, 3) == upcoming(trigger, start + seconds * 0.0001, 3)


def test_every_sixty_fires_on_whole_utc_minutes_and_the_anchor_moves_the_grid() -> None:
    at = datetime(2030, 1, 1, 12, 0, 30, tzinfo=UTC).timestamp()
    assert Every(60).next_after(at) == at + 30
    assert Every(60, anchor=15).next_after(at) == at + 45
    assert Every(0.1).next_after(0.3) == 0.4


# -- Cron against croniter, where croniter's own answer is the reference -----------------------


@PROPERTY
@given(
    expression=st.sampled_from(
        (*EXPRESSIONS, "0 0 31 * *", "0 0 29 2 *", "0 12 L * *", "0 0 30 * *", "5 4 * * mon-fri")
    ),
    after=st.floats(946_684_800, 2_145_916_800),  # 2000 .. 2038
)
def test_cron_in_utc_is_croniters_answer(expression: str, after: float) -> None:
    trigger = Cron(expression)
    # croniter takes whole seconds here (fire times are whole minutes, so nothing differs)
    floor, ceil = (datetime.fromtimestamp(f(after), UTC) for f in (math.floor, math.ceil))
    assert trigger.next_after(after) == croniter(expression, floor).get_next(float)
    assert trigger.previous_before(after) == croniter(expression, ceil).get_prev(float)


@PROPERTY
@given(
    expression=st.sampled_from(("0 0 31 * *", "0 0 29 2 *", "0 12 L * *", "30 23 28-31 * *")),
    zone=st.sampled_from(DST_ZONES),
    after=st.floats(946_684_800, 2_145_916_800),
)
def test_cron_month_ends_and_leap_days_in_a_zone_are_croniters(
    expression: str, zone: str, after: float
) -> None:
    # Midnight, noon and 23:30 are never inside a DST change in these zones, so croniter's
    # time-zone-aware answer is the reference.
    start = datetime.fromtimestamp(math.floor(after), ZoneInfo(zone))
    assert Cron(expression, zone).next_after(after) == croniter(expression, start).get_next(float)


def test_february_29_fires_only_in_leap_years() -> None:
    fires = upcoming(Cron("0 0 29 2 *", "Europe/Berlin"), berlin(2025, 1, 1), 3)
    assert [local(t) for t in fires] == [
        "2028-02-29T00:00:00+01:00",
        "2032-02-29T00:00:00+01:00",
        "2036-02-29T00:00:00+01:00",
    ]


# -- DST: a brute-force reference, minute by minute on the UTC line ------------------------------


@cache
def transitions(zone: str, year: int) -> tuple[int, ...]:
    """The instants (epoch s) at which the zone's UTC offset changes during ``year``."""
    tz = ZoneInfo(zone)
    start = int(datetime(year, 1, 1, tzinfo=UTC).timestamp())
    found = []
    hour = start
    while hour < start + 366 * 86_400:
        if tz.utcoffset(datetime.fromtimestamp(hour, UTC)) != tz.utcoffset(
            datetime.fromtimestamp(hour + 3600, UTC)
        ):
            lo, hi = hour, hour + 3600
            while hi - lo > 1:
                mid = (lo + hi) // 2
                same = tz.utcoffset(datetime.fromtimestamp(mid, UTC)) == tz.utcoffset(
                    datetime.fromtimestamp(lo, UTC)
                )
                lo, hi = (mid, hi) if same else (lo, mid)
            found.append(hi)
        hour += 3600
    return tuple(found)


def reference(expression: str, zone: str, lo: int, hi: int) -> list[float]:
    """Fire instants in (lo, hi]: each UTC minute whose local time matches and is its first
    occurrence, plus the first minute after a gap when a skipped local time matches."""
    tz = ZoneInfo(zone)
    fires: list[float] = []
    for instant in range(lo - lo % 60 + 60, hi + 1, 60):
        here = datetime.fromtimestamp(instant, tz)
        before = datetime.fromtimestamp(instant - 60, tz)
        wall = here.replace(tzinfo=None)
        jump = int((here.utcoffset() - before.utcoffset()).total_seconds())  # type: ignore[operator]
        skipped = [wall - timedelta(seconds=s) for s in range(60, jump + 1, 60)]
        if (here.fold == 0 and croniter.match(expression, wall)) or any(
            croniter.match(expression, w) for w in skipped
        ):
            fires.append(float(instant))
    return fires


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    expression=st.sampled_from(EXPRESSIONS),
    zone=st.sampled_from(DST_ZONES),
    year=st.integers(2000, 2037),
    which=st.integers(0, 1),
    lead=st.integers(-4 * 3600, 1 * 3600),
)
def test_cron_across_dst_changes_matches_the_brute_force_reference(
    expression: str, zone: str, year: int, which: int, lead: int
) -> None:
    change = transitions(zone, year)[which]
    lo, hi = change + lead, change + lead + 5 * 3600
    trigger = Cron(expression, zone)
    got: list[float] = []
    when = trigger.next_after(lo)
    while when <= hi:
        got.append(when)
        when = trigger.next_after(when)
    assert got == reference(expression, zone, lo, hi)
    for earlier, later in itertools.pairwise(got):
        assert trigger.previous_before(later) == earlier


def test_a_time_skipped_by_the_spring_gap_fires_once_at_the_end_of_the_gap() -> None:
    daily = upcoming(Cron("30 2 * * *", "Europe/Berlin"), berlin(2024, 3, 29), 4)
    assert [local(t) for t in daily] == [
        "2024-03-29T02:30:00+01:00",
        "2024-03-30T02:30:00+01:00",
        "2024-03-31T03:00:00+02:00",
        "2024-04-01T02:30:00+02:00",
    ]
    quarter = upcoming(Cron("*/15 * * * *", "America/New_York"), 1710052200.0, 3)  # 01:30 EST
    assert [local(t, "America/New_York") for t in quarter] == [
        "2024-03-10T01:45:00-05:00",
        "2024-03-10T03:00:00-04:00",  # 02:00 .. 02:45 do not exist: one fire for them all
        "2024-03-10T03:15:00-04:00",
    ]


def test_a_time_repeated_by_the_autumn_fold_fires_once() -> None:
    daily = upcoming(Cron("30 2 * * *", "Europe/Berlin"), berlin(2024, 10, 26), 3)
    assert [local(t) for t in daily] == [
        "2024-10-26T02:30:00+02:00",
        "2024-10-27T02:30:00+02:00",
        "2024-10-28T02:30:00+01:00",
    ]
    half = upcoming(Cron("*/30 * * * *", "Europe/Berlin"), berlin(2024, 10, 27, 1, 45), 4)
    assert [local(t) for t in half] == [
        "2024-10-27T02:00:00+02:00",
        "2024-10-27T02:30:00+02:00",
        "2024-10-27T03:00:00+01:00",  # the repeated 02:00 .. 02:59 fired the first time round
        "2024-10-27T03:30:00+01:00",
    ]


# -- arguments -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of cron"),
        ({"cron": "* * * * *", "every": 5}, "exactly one of cron"),
        ({"cron": "* * * * * *"}, "five fields"),
        ({"cron": "61 * * * *"}, "not a valid cron expression"),
        ({"cron": "R 3 * * *"}, "'R' .a random time. is refused"),
        ({"cron": "0 r * * *"}, "'R' .a random time. is refused"),
        ({"cron": "* * * * *", "timezone": "Mars/Olympus"}, "timezone='Mars/Olympus'"),
        ({"every": 0}, "every=0"),
        ({"every": math.inf}, "every=inf"),
        ({"every": 5, "timezone": "UTC"}, "timezone= applies to cron="),
        ({"cron": "* * * * *", "anchor": 3}, "anchor= applies to every="),
    ],
)
def test_bad_arguments_are_refused_naming_the_argument(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        trigger_from(**kwargs)  # type: ignore[arg-type]


def test_trigger_from_builds_each_kind() -> None:
    assert trigger_from(every=timedelta(minutes=2)) == Every(120.0)
    assert trigger_from(every=5, anchor=1) == Every(5.0, 1.0)
    cron = trigger_from(cron="*/5  *  * * *", timezone="Europe/Berlin")
    assert cron == Cron("*/5 * * * *", "Europe/Berlin")
    assert cron.describe() == "cron '*/5 * * * *' Europe/Berlin"
    assert Every(10).describe() == "every 10s"
    assert Cron("@hourly").next_after(0) == 3600
    assert Cron("0 0 1 mar,apr fri").describe() == "cron '0 0 1 mar,apr fri' UTC"
    assert cron.identity() != Cron("*/5 * * * *").identity()


def test_f7_a_cron_that_never_fires_is_refused_at_declaration() -> None:
    from workerkit.scheduler.declare import make_schedule

    with pytest.raises(ValueError, match="never fires"):
        Cron("0 0 30 2 *")
    with pytest.raises(ConfigurationError, match=r"schedule 'leap'.*0 0 31 4 \*.*never fires"):
        make_schedule("leap", "tasks.leap", cron="0 0 31 4 *")
    assert Cron("0 0 29 2 *").next_after(1_800_000_000.0) > 1_800_000_000.0  # leap days do fire
