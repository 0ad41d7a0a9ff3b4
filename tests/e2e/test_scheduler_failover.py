"""``workerkit scheduler`` replicas and a 1 s schedule, on every engine: steady, a rolling
update and a SIGKILL of the leader (issue 14's first three "Done means"), each judged from
the runs the jobs recorded themselves (tests/apps/sched_record.py) with their ``fire_time``.

Two scenarios per engine, all six at once (each its own store; they share nothing but the
machine), so the module takes about as long as its longest scenario:

- **steady**: 2 replicas, 30 s of fire times.
- **handover**: 2 replicas; SIGTERM to the leader, its replacement 2 s later, 10 s watched;
  then SIGKILL of the leader's whole pod (the standby path), replacement 2 s later, 10 s.

Default scheduler timing (lease 15 s, renew deadline 10 s, retry 2 s, standby delay 0.5 s,
misfire grace 2 s). The leader killed again and again: test_scheduler_chaos.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.sched_harness import ENGINES, SchedCase, concurrently, engine_stores
from tests.support.sched_records import gap_after, percentile

if TYPE_CHECKING:
    from tests.support.servers import PostgresServer, RedisServer

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:celery"),
]

STEADY = 30.0  # seconds of fire times judged in the steady window
AFTER = 10.0  # seconds of fire times judged after each kill
REPLACE_AFTER = 2.0  # a killed pod's replacement starts this long after the signal
#: Issue: fire delay p95 <= 50 ms: the replicas' own measure (their ``schedule_fired`` log
#: lines: when each fire was made), asserted with a margin for a shared 2-core machine running
#: six scenarios at once that still tells on time (ms) from the peers' ~0.5-1 s.
STEADY_P95 = 0.25
#: The runs' own delay adds the worker's pickup, which a loaded machine stretches now and
#: then (a Celery solo worker once took 1.9 s at load 15): its median is held to the same bound,
#: its p95 to a second.
RUN_P95 = 1.0
#: Issue: no fire more than 1 s late (standby delay 0.5 s); margin for the pickup and the load.
LATE = 1.5
Cases = dict[str, SchedCase]


def steady(case: SchedCase) -> None:
    case.start_worker()
    case.start_replicas(2)
    case.leader()
    first = case.mark("from", case.next_fire(time.time() + 1))
    case.wait_ran(first + STEADY, timeout=STEADY + 30)
    case.settle(first, first + STEADY, timeout=5)
    case.mark("to", first + STEADY)


def handover(case: SchedCase) -> None:
    case.start_worker()
    case.start_replicas(2)
    case.leader()
    first = case.mark("from", case.next_fire(time.time() + 1))
    case.wait_ran(first + 2)  # firing steadily before the first kill

    # Rolling update: SIGTERM to the leader, its replacement 2 s later.
    leader = case.leader()
    at, code = leader.terminate()
    case.mark("sigterm", at)
    case.marks["sigterm_exit"] = code
    time.sleep(max(0.0, at + REPLACE_AFTER - time.time()))
    case.start_replica()
    case.wait_ran(at + AFTER, timeout=AFTER + 30)
    case.settle(at - 2, at + AFTER, timeout=5)

    # A crash: SIGKILL of the leader's whole pod; its replacement 2 s later.
    leader = case.leader()
    at = case.mark("sigkill", leader.kill())
    time.sleep(max(0.0, at + REPLACE_AFTER - time.time()))
    case.start_replica()
    case.wait_ran(at + AFTER, timeout=AFTER + 30)
    case.settle(at - 2, at + AFTER, timeout=5)
    case.mark("to", at + AFTER)


SCENARIOS: dict[str, Callable[[SchedCase], None]] = {
    "steady": steady,
    "handover": handover,
}


@pytest.fixture(scope="module")
def cases(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer,
    postgres_server: PostgresServer,
    postgres_template: str,
) -> Iterator[Cases]:
    tmp = tmp_path_factory.mktemp("sched-failover")
    with (
        engine_stores(redis_server, postgres_server, postgres_template, slot=0) as steady_urls,
        engine_stores(redis_server, postgres_server, postgres_template, slot=1) as handover_urls,
    ):
        urls = {"steady": steady_urls, "handover": handover_urls}
        everyone = {
            f"{scenario}/{engine}": SchedCase(
                engine,
                Path(tmp / scenario / engine),
                urls[scenario][engine],
            )
            for scenario in SCENARIOS
            for engine in ENGINES
        }
        try:
            errors = concurrently(everyone, lambda case: SCENARIOS[case.tmp.parent.name](case))
            for name, error in errors.items():
                everyone[name].error = error
            yield everyone
        finally:
            for case in everyone.values():
                case.close()


def ran(cases: Cases, scenario: str, engine: str) -> SchedCase:
    case = cases[f"{scenario}/{engine}"]
    if case.error is not None:
        raise AssertionError(f"{scenario}/{engine} failed:\n{case.logs()}") from case.error
    return case


@pytest.mark.parametrize("engine", ENGINES)
def test_two_replicas_fire_each_second_once_and_on_time(cases: Cases, engine: str) -> None:
    case = ran(cases, "steady", engine)
    window = case.tally(case.marks["from"], case.marks["to"])
    # The replicas' own measure: how late each fire was made (their log lines).
    logged = case.fire_delays(case.marks["from"], case.marks["to"])
    print(
        engine, "steady", window.summary(), "logged p50/p95 ms",
        round(percentile(logged, 50) * 1e3, 1), round(percentile(logged, 95) * 1e3, 1),
    )  # fmt: skip
    assert len(window.expected) == STEADY
    assert window.duplicates == 0, window.describe()
    assert window.missed == [], window.describe()
    assert len(logged) >= STEADY - 1, logged
    assert percentile(logged, 95) <= STEADY_P95, sorted(logged)[-10:]
    assert window.delay(50) <= STEADY_P95, window.describe()
    assert window.delay(95) <= RUN_P95, window.describe()


@pytest.mark.parametrize("engine", ENGINES)
def test_sigterm_of_the_leader_hands_over_without_a_gap(cases: Cases, engine: str) -> None:
    case = ran(cases, "handover", engine)
    at = case.marks["sigterm"]
    window = case.tally(at - 2, at + AFTER)
    gap = gap_after(case.runs(), at, horizon=AFTER)
    print(engine, "sigterm", window.summary(), "gap", round(gap, 3))
    assert case.marks["sigterm_exit"] == 0
    assert window.duplicates == 0, window.describe()
    assert window.missed == [], window.describe()
    assert max(window.delays) <= LATE, window.describe()
    assert gap <= LATE + 1.0


@pytest.mark.parametrize("engine", ENGINES)
def test_sigkill_of_the_leader_costs_a_late_fire_not_a_missed_one(
    cases: Cases, engine: str
) -> None:
    case = ran(cases, "handover", engine)
    at = case.marks["sigkill"]
    window = case.tally(at - 2, at + AFTER)
    gap = gap_after(case.runs(), at, horizon=AFTER)
    print(engine, "sigkill", window.summary(), "gap", round(gap, 3))
    assert window.duplicates == 0, window.describe()
    assert window.missed == [], window.describe()
    assert max(window.delays) <= LATE, window.describe()
    assert gap <= LATE + 1.0
    whole = case.tally(case.marks["from"], case.marks["to"])
    assert whole.duplicates == 0, whole.describe()
    assert whole.missed == [], whole.describe()
