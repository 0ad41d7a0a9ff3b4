"""The scheduler through a store outage (PostgreSQL or Redis down 5 s) and with every replica
down 10 s, on every engine at once, with one 1 s schedule per misfire policy (``skip``,
``latest``, ``all``): nothing runs twice, and the missed fire times follow each policy.

A fire time is *missed* when it was already older than the misfire grace (2 s) when a
scheduler could fire it again; younger ones fire late, under every policy. Which fires the
leader made as catch-ups (``reason`` ``catch_up``) is read from the replicas' logs; every run
is read from the jobs' own records (tests/apps/sched_record.py).

Two groups of three engines run at once: the outage group on this module's own stores (one
redis-server for rq and celery, one PostgreSQL for sql), restarted by their pid with their
data kept, as a production store comes back; the all-down group on the session's servers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.apps.sched_record import MISFIRE_SCHEDULES, PERIOD
from tests.support import servers
from tests.support.sched_harness import ENGINES, SchedCase, concurrently, engine_stores
from tests.support.sched_records import expected_times
from tests.support.suite import start_or_skip
from workerkit.engines.sql import upgrade

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:celery"),
]

OUTAGE = 5.0
ALL_DOWN = 10.0
GRACE = 2.0  # scheduler_misfire_grace's default
AFTER = 6.0  # seconds of fire times judged after each recovery


class Stores:
    """The module's servers; an outage stops each by its pid and starts it again."""

    def __init__(self, redis: servers.RedisServer, postgres: servers.PostgresServer) -> None:
        self.redis = redis
        self.postgres = postgres
        self.down: dict[str, tuple[float, float]] = {}

    def urls(self) -> dict[str, str]:
        return {
            "sql": self.postgres.url("postgres"),
            "rq": self.redis.url(2),
            "celery": self.redis.url(3),
        }

    def outage(self, seconds: float) -> None:
        """Both servers down for ``seconds`` at the same time; when each was down, by engine.

        Started again from this (the main) thread: the servers' parent-death signal fires when
        the *thread* that started them ends.
        """
        redis, postgres = self.redis, self.postgres
        redis.process.stop()
        postgres.process.stop()
        went = time.time()
        time.sleep(seconds)
        self.redis = servers.start_redis(
            port=redis.port, directory=redis.directory, appendonly=True
        )
        self.down["rq"] = self.down["celery"] = (went, time.time())
        self.postgres = servers.start_postgres(port=postgres.port, directory=postgres.directory)
        self.down["sql"] = (went, time.time())

    def stop(self) -> None:
        self.redis.stop()
        self.postgres.stop()


def each(cases: dict[str, SchedCase], step: Callable[[SchedCase], Any]) -> None:
    errors = concurrently(cases, step)
    failed = {name: error for name, error in errors.items() if error is not None}
    for name, error in failed.items():
        cases[name].error = error
        del cases[name]


def start(case: SchedCase) -> None:
    case.start_worker()
    case.start_replicas(2)
    case.leader()
    case.mark("from", case.next_fire(time.time() + 1))
    for name in MISFIRE_SCHEDULES:
        case.wait_ran(case.marks["from"] + 2, schedule=name)


def after_outage(case: SchedCase) -> None:
    # ``all`` fires every time (the leader catches up every schedule before it fires on)
    case.settle(case.marks["from"], case.marks["outage_back"] + AFTER, "all", timeout=40)
    for name in MISFIRE_SCHEDULES:
        case.wait_ran(case.marks["outage_back"] + AFTER, schedule=name, timeout=40)


def all_down(case: SchedCase) -> None:
    start(case)
    case.stop_replicas()
    went = case.mark("all_down", time.time())
    time.sleep(max(0.0, went + ALL_DOWN - time.time()))
    case.mark("all_back", time.time())
    case.start_replicas(2)
    end = case.mark("end", case.marks["all_back"] + AFTER)
    case.settle(case.marks["from"], end, "all", timeout=40)
    for name in MISFIRE_SCHEDULES:
        case.wait_ran(end, schedule=name, timeout=40)


@pytest.fixture(scope="module")
def cases(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: servers.RedisServer,
    postgres_server: servers.PostgresServer,
    postgres_template: str,
) -> Iterator[dict[str, SchedCase]]:
    """Two groups at once: ``outage/ENGINE`` on this module's own servers (restarted from
    this thread), ``down/ENGINE`` (every replica stopped 10 s) on the session's servers."""
    redis = start_or_skip(lambda: servers.start_redis(appendonly=True))
    postgres = start_or_skip(servers.start_postgres)
    stores = Stores(redis, postgres)
    upgrade(postgres.url("postgres"))
    tmp = tmp_path_factory.mktemp("sched-outage")
    urls = stores.urls()
    outage = {
        e: SchedCase(e, Path(tmp / "outage" / e), urls[e], schedules="misfire") for e in ENGINES
    }
    with engine_stores(redis_server, postgres_server, postgres_template, slot=2) as down_urls:
        down = {
            e: SchedCase(e, Path(tmp / "down" / e), down_urls[e], schedules="misfire")
            for e in ENGINES
        }
        everyone = {f"outage/{e}": c for e, c in outage.items()} | {
            f"down/{e}": c for e, c in down.items()
        }
        down_group = threading.Thread(target=each, args=(dict(down), all_down))
        try:
            down_group.start()
            each(outage, start)
            stores.outage(OUTAGE)
            for engine, case in outage.items():
                case.mark("outage_down", stores.down[engine][0])
                case.mark("outage_back", stores.down[engine][1])
            each(outage, after_outage)
            down_group.join()
            yield everyone
        finally:
            down_group.join()
            for case in everyone.values():
                case.close()
            stores.stop()


def finished(cases: dict[str, SchedCase], name: str) -> SchedCase:
    case = cases[name]
    if case.error is not None:
        raise AssertionError(f"{name}: the scenario failed:\n{case.logs()}") from case.error
    return case


def catch_ups(case: SchedCase, schedule: str, since: float) -> int:
    """Fires the replicas logged with reason ``catch_up`` for ``schedule`` after ``since``."""
    count = 0
    for replica in case.replicas:
        if replica.started_at < since:
            continue
        for event in replica.fire_events():
            if (
                event.get("schedule") == schedule
                and event.get("reason") == "catch_up"
                and event.get("outcome") == "fired"
            ):
                count += 1
    return count


@pytest.mark.parametrize("engine", ENGINES)
def test_store_outage_leaves_no_duplicate_and_missed_times_follow_each_policy(
    cases: dict[str, SchedCase], engine: str
) -> None:
    case = finished(cases, f"outage/{engine}")
    down, back = case.marks["outage_down"], case.marks["outage_back"]
    # Older than the grace when the store came back (so when any replica could fire again);
    # ``back`` is when this test saw the server answer, a little after a replica could.
    missed = expected_times(down + 0.3, back - GRACE - 0.5, PERIOD)
    assert missed, (down, back)
    for name in MISFIRE_SCHEDULES:
        window = case.tally(case.marks["from"], back + AFTER, schedule=name)
        assert window.duplicates == 0, (name, window.describe())
        ran = [t for t in missed if t in window.runs_by_time]
        print(engine, "outage", name, "missed", len(missed), "ran", len(ran), window.summary())
        if name == "skip":
            assert ran == [], (name, missed, window.describe())
        elif name == "latest":
            assert len(ran) <= 1, (name, missed, window.describe())
        else:
            assert ran == missed, (name, missed, window.describe())
        # Fire times after the outage are on time again.
        after = case.tally(back + GRACE + 2, back + AFTER, schedule=name)
        assert after.missed == [], (name, after.describe())


@pytest.mark.parametrize("engine", ENGINES)
def test_all_replicas_down_skip_latest_all_fire_none_one_and_each_missed_time(
    cases: dict[str, SchedCase], engine: str
) -> None:
    case = finished(cases, f"down/{engine}")
    went, back = case.marks["all_down"], case.marks["all_back"]
    missed = expected_times(went + 0.3, back - GRACE, PERIOD)
    assert len(missed) >= ALL_DOWN - GRACE - 1, (went, back, missed)
    fired = {}
    for name in MISFIRE_SCHEDULES:
        window = case.tally(went - 2, case.marks["end"], schedule=name)
        assert window.duplicates == 0, (name, window.describe())
        fired[name] = [t for t in missed if t in window.runs_by_time]
        if name == "all":
            # every fire time of the window ran once: the missed ones as catch-ups, in order
            assert window.missed == [], (name, window.describe())
            starts = [window.runs_by_time[t][0].start for t in missed]
            assert starts == sorted(starts) or engine == "sql", (missed, starts)
    since = case.marks["all_down"]
    logged = {name: catch_ups(case, name, since) for name in MISFIRE_SCHEDULES}
    print(
        engine,
        "all down: missed",
        len(missed),
        "ran of them",
        {k: len(v) for k, v in fired.items()},
        "catch-ups logged",
        logged,
    )
    assert fired["skip"] == [], fired
    assert len(fired["latest"]) <= 1, fired
    assert fired["all"] == missed, fired
    assert logged["skip"] == 0, logged
    assert logged["latest"] == 1, logged
    assert logged["all"] >= len(missed), logged
